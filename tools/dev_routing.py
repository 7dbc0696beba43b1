"""Routing on the development data: what matcher settings were chosen on (not a test; prints, writes JSON).

    python tools/dev_routing.py --pool P --store S [--matcher hybrid] [--ood-quantile Q] [--json out.json]

Reads patterns/dev/queries, patterns/dev/ood and, as dev passages, items 150-199 of each held-out
split patterns/eval/<domain>.jsonl.gz (`domex eval` reads the first 100 for routing and the first 30
for quality, so these are never measured there). patterns/eval/queries and ood are never read: they
are for the final measurement only (DESIGN §12). For each in-domain set: top-1, false alarms and the
share each check flagged; for each dev OOD kind: the share caught.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEV_PASSAGES = slice(150, 200)


def in_domain(matches, domain: str, checked: tuple[str, ...]) -> dict:
    return {"n": len(matches), "top1": float(np.mean([m.domain == domain for m in matches])),
            "false_alarms": float(np.mean([m.ood for m in matches])),
            **{f"flagged_{view}": float(np.mean([not c.passed for m in matches for c in m.checks if c.view == view]))
               for view in checked}}


def pooled(rows: dict[str, dict]) -> dict:
    """Every text counts once: the per-domain figures weighted by their sizes."""
    n = sum(r["n"] for r in rows.values())
    return {k: sum(r[k] * r["n"] for r in rows.values()) / n for k in next(iter(rows.values())) if k != "n"} | {"n": n}


def main() -> int:
    sys.path.insert(0, str(ROOT))
    from domex.runtime.evaluate import read_ood, read_split, split_path
    from domex.runtime.match import open_matcher
    from domex.store.db import Store

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pool", required=True)
    ap.add_argument("--store", required=True)
    ap.add_argument("--matcher", default="hybrid")
    ap.add_argument("--ood-quantile", type=float)
    ap.add_argument("--dev-dir", default=str(ROOT / "patterns/dev"))
    ap.add_argument("--eval-dir", default=str(ROOT / "patterns/eval"), help="only its held-out passage splits are read")
    ap.add_argument("--json")
    args = ap.parse_args()

    store = Store.open(args.store)
    matcher = open_matcher(args.matcher, store, args.pool, quantile=args.ood_quantile)
    names, dev = store.snapshot().names, Path(args.dev_dir)
    data = {"queries": {d: read_split(dev / "queries" / f"{d}.jsonl", None) for d in names},
            "passages": {d: read_split(split_path(Path(args.eval_dir), d), DEV_PASSAGES.stop)[DEV_PASSAGES] for d in names}}
    out = {"matcher": args.matcher, "quantile": matcher.quantile}
    print(f"{'data':<10}{'top-1':>8}{'false alarms':>14}  " + "  ".join(f"{v} flagged" for v in matcher.checked))
    for kind, texts in data.items():
        rows = {d: in_domain(matcher.match_many(t), d, matcher.checked) for d, t in texts.items()}
        out[kind] = {"all": pooled(rows), "domains": rows}
        a = out[kind]["all"]
        print(f"{kind:<10}{a['top1']:>8.1%}{a['false_alarms']:>14.1%}  "
              + "  ".join(f"{a['flagged_' + v]:>{len(v) + 8}.1%}" for v in matcher.checked))
    caught = {k: float(np.mean([m.ood for m in matcher.match_many(t)])) for k, t in read_ood(dev).items()}
    out["ood"] = {"mean": float(np.mean(list(caught.values()))), "kinds": caught}
    print(f"OOD caught {out['ood']['mean']:.1%}: " + ", ".join(f"{k} {v:.0%}" for k, v in caught.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
