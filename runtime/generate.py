"""`domex generate`: a one-off greedy generation from a pool with one mask's experts resident."""

from __future__ import annotations

import sys

from domex.store.mask import Mask

from .engine import Engine
from .pool import PoolManifest


def generate_command(pool: str, prompts: list[str], mask: str | None = None, budget: str | None = None,
                     device: str = "cpu", mode: str = "renormalize", max_new_tokens: int = 64, no_chat: bool = False) -> int:
    m = PoolManifest.from_dir(pool)
    kept = Mask.load(mask) if mask else Mask.full(m.num_layers, m.num_experts)
    engine = Engine.open(pool, budget=budget or str(max(kept.kept_counts())), device=device, mode=mode)  # default: the mask's slots
    try:
        report = engine.ensure(kept)
        for prompt in prompts:
            print(engine.generate(prompt, chat_template=False if no_chat else None, max_new_tokens=max_new_tokens,
                                  do_sample=False)[0])
        print(f"[{report.loaded} experts loaded ({report.bytes_read / 2**20:.1f} MiB) in {report.seconds * 1e3:.0f} ms; "
              f"{engine.cache.num_slots} slots per layer]", file=sys.stderr)
    finally:
        engine.close()
    return 0
