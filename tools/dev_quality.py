"""Pruning quality on the development passages: what a pack change costs the masks (not a test; prints, writes JSON).

    python tools/dev_quality.py --pool P --store S [--budget 50%] [--criterion easyep] [--json out.json]

Twice a pack grew by request-style demos that routed better on patterns/dev, and twice `domex eval`
then showed they cost retention: the demos pull a domain's expert scores towards request-style
tokens, and dev had no measure of that. This is it: each domain's mask, a random mask (mean of
three seeds) and the task-agnostic mask of all domains, scored by next-token accuracy on items
150-199 of each held-out split patterns/eval/<domain>.jsonl.gz, the dev passages of
tools/dev_routing.py, which `domex eval` never reads. Retention = accuracy / the full model's.
Dev has no checkable tasks: task retention is measured by `domex eval` alone.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from dev_routing import dev_parser  # tools/ is this script's folder, first on sys.path


def main() -> int:
    from domex.runtime.engine import Engine
    from domex.runtime.evaluate import batches, dev_passages, evaluate_quality, plan, tokenize
    from domex.runtime.indexer import context_length
    from domex.store.budget import Budget
    from domex.store.db import Store
    from domex.store.scores import PRIMARY, check_criteria

    ap = dev_parser(__doc__)
    ap.add_argument("--budget", default="50%")
    ap.add_argument("--criterion", default=PRIMARY)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()

    criteria = check_criteria([args.criterion])
    store = Store.open(args.store, create=False)
    patterns = {n: store.get(n) for n in store.names()}
    engine = Engine.open(args.pool, budget="100%", fingerprint=store.fingerprint(), dtype="auto")  # as `domex eval`
    tok = engine.tokenizer
    context = context_length(engine.model.config, None)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    data = {d: batches(tokenize(tok, d, dev_passages(Path(args.eval_dir), d), context), args.batch_size, pad)
            for d in patterns}
    rows = evaluate_quality(engine, plan(patterns, [Budget.parse(args.budget)], tuple(criteria)), data)

    kinds = {"domain": args.criterion, "random": "random", "agnostic": f"{args.criterion} agnostic"}
    table = {d: {r.kind: r for r in rows if r.domain == d} for d in patterns}
    print(f"{'domain':<10}{'full':>8}" + "".join(f"{label:>20}" for label in kinds.values()))
    for d, by_kind in table.items():
        print(f"{d:<10}{by_kind['full'].accuracy:>8.3f}"
              + "".join(f"{by_kind[k].accuracy:>11.3f} ({by_kind[k].retention:>4.0%})" for k in kinds))
    mean = {k: sum(table[d][k].retention for d in table) / len(table) for k in kinds}
    print(f"{'mean':<10}{'':>8}" + "".join(f"{'':>12}{mean[k]:>6.1%}  " for k in kinds))
    if args.json:
        out = {"budget": args.budget, "criterion": args.criterion, "mean_retention": mean, "rows": [asdict(r) for r in rows]}
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
