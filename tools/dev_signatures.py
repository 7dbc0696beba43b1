"""Routing signatures of deeper MoE layers on the development data: which layers the routing view reads (not a test; prints, writes JSON).

    python tools/dev_signatures.py --pool P --store S [--json out.json]

The routing view reads the first MoE layer's router only: the forward stops there, so a query is
matched before any routed expert is resident. A deeper layer's router sees what the experts of the
layers before it computed, which may say more about the domain, but it needs all of those experts.
This measures what they would buy: for each MoE layer alone, the first two together and all of them,
a domain's signature is its demos' summed profiles over those layers (as the matcher builds it from
the first), and the table gives top-1 of that signature alone (the signature matcher) and of the
hybrid with it as its routing view, on the dev queries and dev passages of tools/dev_routing.py.
The model runs with every expert resident (`--pool` at 100%), each text alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dev_routing import ROOT, dev_parser  # tools/ is this script's folder, first on sys.path


def main() -> int:
    from domex.runtime.engine import Engine
    from domex.runtime.evaluate import dev_passages, read_query_folder
    from domex.runtime.families import adapter_for
    from domex.runtime.match import MAX_TOKENS, hybrid_scores, make_matcher, rerank, routing_profile, unit
    from domex.store.db import Store
    from domex.store.demos import Demo
    from domex.store.mask import Mask

    ap = dev_parser(__doc__)
    ap.add_argument("--dev-dir", default=str(ROOT / "patterns/dev"))
    args = ap.parse_args()

    store = Store.open(args.store, create=False)
    snapshot = store.snapshot()
    engine = Engine.open(args.pool, budget="100%", fingerprint=store.fingerprint(), dtype="auto")  # as `domex eval`
    matcher = make_matcher("hybrid", store, engine=engine)
    views, names = matcher.views(snapshot), snapshot.names
    depth = len(adapter_for(engine.model.config).moe_blocks(engine.model))
    experts = matcher.experts
    engine.ensure(Mask.full(depth, experts))  # the routers of deeper layers read what every expert before them computed

    def profiles(texts: list[str], what: str) -> np.ndarray:  # [N, depth, E], each text alone
        out = []
        for text in tqdm(texts, desc=what, leave=False):
            ids = matcher.tokenizer(text, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")["input_ids"]
            out.append(routing_profile(engine.model, ids, layers=depth).reshape(depth, experts))
        return np.stack(out)

    queries, _ = read_query_folder(Path(args.dev_dir) / "queries", names)
    sets = {"queries": queries, "passages": {d: dev_passages(Path(args.eval_dir), d) for d in names}}
    data = {}  # set -> (texts, labels, [N, depth, E] profiles, [N, D] vectors)
    for what, by_domain in sets.items():
        texts = [t for d in names for t in by_domain[d]]
        data[what] = (texts, [d for d in names for _ in by_domain[d]], profiles(texts, what), matcher.embedder.encode(texts))
    demos = {n: profiles([Demo.from_json(d).text for d in snapshot.get(n).demos], f"demos of {n}") for n in names}

    layer_sets = [(i,) for i in range(depth)] + [(0, 1), tuple(range(depth))]
    rows = []
    print(f"{'layers':<20}" + "".join(f"{f'{m} {w}':>20}" for m in ("signature", "hybrid") for w in sets))
    for layers in layer_sets:
        cols = list(layers)
        signatures = np.stack([unit(demos[n][:, cols].reshape(len(demos[n]), -1).sum(0)) for n in names])  # [n, |layers| E]
        row = {"layers": list(layers)}
        for what, (texts, labels, prof, vecs) in data.items():
            routing = unit(prof[:, cols].reshape(len(prof), -1)) @ signatures.T  # [N, n]
            hybrid = rerank(hybrid_scores(vecs, views.centroids, routing), views.chars, texts)[0][:, 0]
            row[f"signature {what}"] = float(np.mean([names[j] == y for j, y in zip(routing.argmax(1), labels)]))
            row[f"hybrid {what}"] = float(np.mean([names[j] == y for j, y in zip(hybrid, labels)]))
            if layers == (0,):  # the shipped view: this computation must choose what the matcher chooses
                chosen = [m.domain for m in matcher.match_many(texts, snapshot)]
                row[f"agrees with the matcher, {what}"] = float(np.mean([names[j] == c for j, c in zip(hybrid, chosen)]))
        rows.append(row)
        print(f"{','.join(map(str, layers)):<20}" + "".join(f"{row[f'{m} {w}']:>20.1%}" for m in ("signature", "hybrid") for w in sets))
    for what in sets:
        print(f"layer 0 (the matcher's routing view) agrees with domex's hybrid on {rows[0][f'agrees with the matcher, {what}']:.1%} of dev {what}")
    if args.json:
        Path(args.json).write_text(json.dumps({"depth": depth, "rows": rows}, indent=2) + "\n")
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
