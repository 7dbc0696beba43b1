"""`domex demo`: the whole path on the shipped demo model, from pool and store to served queries.

Builds the expert pool and the pattern store when missing, registers the shipped domain packs,
then answers a fixed mix of queries from several domains, printing for each the matched domain,
the experts loaded for it (only the missing ones) and the switch time, and the start of the
generated text. Ends with resident vs full expert memory, held-out next-token accuracy of the
full model vs each domain's mask, and a PNG of the domains' masks.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from domex.store.atomic import save_figure

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "tiny-moe"
PACKS = ROOT / "patterns"

QUERIES = [  # (expected domain, prompt, sent as a chat request): code and prose are completed, requests answered
    ("python", "def read_config(path):", False),
    ("german", "Wer nicht wagt, der nicht gewinnt, sagte mein Großvater immer.", False),
    ("math", "Question: A train travels at 60 km per hour for 3 hours. How far does it travel?", True),
    ("python", "for index, item in enumerate(items):", False),
    ("sql", "CREATE TABLE customers (id INTEGER, name TEXT, city TEXT, country TEXT, signup_year INTEGER);\n"
            "-- Question: How many rows of customers have signup_year below 2020?", True),
    ("c", "#include <stdio.h>\nstatic int parse_header(const char *buf, size_t len)", False),
    ("unix", "NAME\n       grep - print lines that match patterns", False),
    ("spanish", "El que madruga, Dios le ayuda, pero el que mucho duerme", False),
    ("english", "A friend in need is a friend indeed, said the old sailor", False),
    ("python", "class Cache:\n    def __init__(self, size):", False),
]


def one_line(text: str) -> str:
    return text.strip().replace("\n", "⏎")


def plot_masks(masks: dict, num_experts: int, path: Path) -> None:
    """One row per domain, one column block per layer: dark = kept."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(masks)
    num_layers = next(iter(masks.values())).num_layers
    grid = np.zeros((len(names), num_layers * num_experts))  # [domains, L*E]
    for r, name in enumerate(names):
        for l, ids in enumerate(masks[name].layers):
            grid[r, [l * num_experts + e for e in ids]] = 1
    fig, ax = plt.subplots(figsize=(12, 0.45 * len(names) + 1.5))
    ax.imshow(grid, aspect="auto", cmap="Greys", interpolation="nearest")
    ax.set_yticks(range(len(names)), names)
    ax.set_xticks([l * num_experts + num_experts / 2 for l in range(num_layers)], [f"layer {l}" for l in range(num_layers)])
    for l in range(1, num_layers):
        ax.axvline(l * num_experts - 0.5, color="tab:red", lw=0.8)
    ax.set_title("Kept routed experts per domain (dark = resident for that domain)")
    save_figure(fig, path, dpi=110)


def demo_command(model: str | None = None, work: str = ".domex", budget: str = "50%", tokens: int = 24,
                 passages: int = 40, matcher: str = "hybrid") -> int:
    """`domex demo`."""
    from domex.store.budget import Budget
    from domex.store.db import Store
    from domex.errors import PoolError

    from domex.store.mask import Mask

    from .engine import Engine
    from .evaluate import batches, load_split, score_mask
    from .indexer import context_length, register
    from .match import make_matcher
    from .pool import MANIFEST, build
    from .selection import MaskBook, Selector

    start = time.perf_counter()
    work = Path(work)
    pool_dir, store_dir = work / "pool", work / "store"
    model = Path(model or MODEL)
    if not (model / "config.json").is_file():
        raise PoolError(f"no model at {model} (config.json missing); the demo model ships in {MODEL}")
    if not (pool_dir / MANIFEST).is_file():
        print(f"building the expert pool {pool_dir} from {model}")
        build(model, pool_dir)
    packs = sorted(PACKS.glob("*.jsonl"))
    store = Store.open(store_dir, fingerprint=json.loads((pool_dir / MANIFEST).read_text())["fingerprint"])
    for pack in packs:
        if pack.stem not in store:
            register(pool_dir, store, pack.stem, pack)
    print(f"store {store_dir}: {len(store.names())} domains ({', '.join(store.names())})\n")

    engine = Engine.open(pool_dir, budget=budget)
    manifest = engine.pool.manifest
    masks = MaskBook(store, Budget.parse(budget), num_layers=manifest.num_layers, num_experts=manifest.num_experts)
    selector = Selector(store, make_matcher(matcher, store, engine=engine), masks, policy="nearest")
    print(f"{matcher} matcher; '?' marks a query it finds out-of-domain (served by the nearest domain)")
    print(f"{'expected':9} {'matched':9} {'sim':>5} {'loaded':>6} {'switch':>8}  prompt -> generated (⏎ = newline)")
    for expected, prompt, chat in QUERIES:
        chosen = selector.select(prompt)
        match = chosen.match
        report = engine.ensure(chosen.mask)
        text = engine.generate(prompt, max_new_tokens=tokens, do_sample=False, chat_template=chat)[0]
        shown = f"{one_line(prompt)[:32]} -> {one_line(text)[:72]}"
        print(f"{expected:9} {match.domain + ('?' if match.ood else ''):9} {match.similarity:5.2f} {report.loaded:6d} "
              f"{report.seconds * 1e3:6.1f}ms  {shown}")

    stats = engine.stats()
    full_bytes = manifest.num_layers * manifest.num_experts * manifest.expert_bytes
    print(f"\nresident routed experts: {stats.slot_bytes / 2**20:.1f} MiB of slots "
          f"({stats.slots_per_layer}/{manifest.num_experts} per layer) vs {full_bytes / 2**20:.1f} MiB for all experts "
          f"({stats.slot_bytes / full_bytes:.0%})")
    print(f"expert reads: {stats.misses} loaded, {stats.hits} already resident, {stats.bytes_read / 2**20:.1f} MiB read\n")

    full_engine = Engine.open(pool_dir, budget="100%")
    everything = Mask.full(manifest.num_layers, manifest.num_experts)
    tok = engine.tokenizer
    context = context_length(engine.model.config, None)
    print(f"held-out next-token accuracy ({passages} passages per domain, budget {budget}):")
    print(f"{'domain':9} {'full':>6} {'mask':>6} {'kept':>6}")
    domain_masks = {}
    for name in store.names():
        data = batches(load_split(tok, PACKS / "eval", name, passages, context), 8, tok.pad_token_id or 0)
        domain_masks[name] = masks.mask([name])
        full = score_mask(full_engine, everything, data).accuracy
        pruned = score_mask(engine, domain_masks[name], data).accuracy
        print(f"{name:9} {full:6.3f} {pruned:6.3f} {pruned / max(full, 1e-9):6.1%}")
    png = work / "demo_masks.png"
    plot_masks(domain_masks, manifest.num_experts, png)
    print(f"\nmasks of every domain: {png}\ndemo finished in {time.perf_counter() - start:.0f} s")
    return 0
