"""Family adapters: the few facts domex needs about one MoE architecture, one small module per family.

An adapter says where the MoE blocks are, how the router scores and selects (its RouterConfig),
which config key counts the routed experts, and how routed experts are laid out on disk. Nothing
outside this package reads `model_type`; a new family is one file here plus one registry line.

In memory (transformers 5) routed experts are fused 3-D parameters of `block.experts`, e.g.
`gate_up_proj [E, 2I, H]` and `down_proj [E, H, I]`; one expert is the slice `[e]` of each.
On disk real checkpoints mostly keep one 2-D tensor per expert and projection (PerExpertLayout);
GPT-OSS, and checkpoints saved with `save_original_format=False`, keep the fused tensors (FusedLayout).
"""

from __future__ import annotations

import torch

from domex.errors import UnsupportedFamily
from domex.store.mask import Mask

from ..routing import honour_sentinels, restrict_router, unrestrict_router
from . import deepseek_v3, gpt_oss, mixtral, olmoe, qwen2_moe, qwen3_moe
from .base import Adapter, FusedLayout, PerExpertLayout, softmax_router

__all__ = ["Adapter", "FusedLayout", "PerExpertLayout", "softmax_router", "FAMILIES", "adapter_for", "restrict",
           "unrestrict"]

FAMILIES: dict[str, Adapter] = {m.ADAPTER.model_type: m.ADAPTER
                                 for m in (qwen3_moe, qwen2_moe, mixtral, olmoe, deepseek_v3, gpt_oss)}


def adapter_for(config) -> Adapter:
    """The adapter for an HF config (or its `model_type` string); refuses unknown architectures."""
    model_type = config if isinstance(config, str) else getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedFamily(
            f"model_type {model_type!r} has no domex family adapter; supported: {', '.join(sorted(FAMILIES))}. "
            "Add one module under runtime/families/ to support another MoE architecture."
        )
    return FAMILIES[model_type]


def restrict(model: torch.nn.Module, mask: Mask, *, mode: str = "renormalize", skip_ratio: float = 0.0) -> None:
    """Restrict every MoE layer of a stock transformers model to the mask's experts, in place;
    `skip_ratio` > 0 also drops selected experts of small weight (routing.py, dynamic skipping)."""
    adapter = adapter_for(model.config)
    cfg = adapter.router_config(model.config)
    blocks = adapter.moe_blocks(model)
    mask.check(len(blocks), cfg.num_experts, cfg.top_k)
    for (_, block), kept in zip(blocks, mask.layers):
        restrict_router(adapter.router(block), cfg, kept, mode=mode, skip_ratio=skip_ratio)
        honour_sentinels(adapter.experts(block), skip_ratio > 0)


def unrestrict(model: torch.nn.Module) -> None:
    """Give every router of the model its stock forward back."""
    adapter = adapter_for(model.config)
    for _, block in adapter.moe_blocks(model):
        unrestrict_router(adapter.router(block))
        honour_sentinels(adapter.experts(block), False)
