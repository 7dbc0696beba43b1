"""Routing on the development data: what matcher settings were chosen on (not a test; prints, writes JSON).

    python tools/dev_routing.py --pool P --store S [--matcher hybrid] [--ood-quantile Q] [--json out.json]

Reads patterns/dev/queries, patterns/dev/ood and, as dev passages, items 150-199 of each held-out
split patterns/eval/<domain>.jsonl.gz (`domex eval` reads the first 100 for routing and the first 30
for quality, so these are never measured there). patterns/eval/queries and ood are never read: they
are for the final measurement only (DESIGN §12). The figures are `domex eval`'s own (runtime/evaluate.py):
for each in-domain set top-1, false alarms and the share each check flagged (queries also per group: the
first batch and those added later, the `group` field, patterns/dev/README.md); the share of each OOD kind caught.
Chats (patterns/dev/conversations.jsonl, 48 of them): the domain of each one's last user turn, matched on that
turn alone ("chats, last turn") and as the server reads a chat ("chats": runtime/query.py, the user turns newest first).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def dev_parser(doc: str) -> argparse.ArgumentParser:
    """What every dev tool takes: the pool and store measured, where the held-out splits are, a JSON path."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--pool", required=True)
    ap.add_argument("--store", required=True)
    ap.add_argument("--eval-dir", default=str(ROOT / "patterns/eval"), help="only its held-out passage splits are read")
    ap.add_argument("--json")
    return ap


def main() -> int:
    from domex.runtime.evaluate import (CHATS, dev_passages, evaluate_detection, evaluate_routing, read_chats, read_ood,
                                        read_query_folder)
    from domex.runtime.match import open_matcher
    from domex.store.db import Store

    ap = dev_parser(__doc__)
    ap.add_argument("--matcher", default="hybrid")
    ap.add_argument("--ood-quantile", type=float)
    ap.add_argument("--dev-dir", default=str(ROOT / "patterns/dev"))
    args = ap.parse_args()

    store = Store.open(args.store, create=False)
    matcher = open_matcher(args.matcher, store, args.pool, quantile=args.ood_quantile)
    snapshot, dev = store.snapshot(), Path(args.dev_dir)
    queries = evaluate_routing(matcher, snapshot, "queries", *read_query_folder(dev / "queries", snapshot.names))
    passages = evaluate_routing(matcher, snapshot, "passages", {d: dev_passages(Path(args.eval_dir), d) for d in snapshot.names})
    chats = {c: evaluate_routing(matcher, snapshot, c, texts) for c, texts in read_chats(dev / CHATS, snapshot.names).items()}
    rows = [("queries", queries), *((f"queries, {g}", x) for g, x in (queries.groups or {}).items()), ("passages", passages),
            *chats.items()]
    detection = evaluate_detection(matcher, snapshot, read_ood(dev))

    print(f"{'data':<21}{'top-1':>8}{'false alarms':>14}  " + "  ".join(f"{v} flagged" for v in matcher.checked))
    for name, r in rows:
        print(f"{name:<21}{r.accuracy:>8.1%}{r.false_alarms:>14.1%}  "
              + "  ".join(f"{r.flagged[v]:>{len(v) + 8}.1%}" for v in matcher.checked))
    print(f"OOD caught {detection.caught:.1%}: " + ", ".join(f"{k} {v:.0%}" for k, v in detection.per_kind.items()))
    if args.json:
        out = {"matcher": args.matcher, "quantile": matcher.quantile, "routing": [asdict(queries), asdict(passages)],
               "chats": {c: asdict(r) for c, r in chats.items()}, "detection": asdict(detection)}
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
