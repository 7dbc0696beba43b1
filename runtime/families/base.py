"""The pieces every family adapter is made of: the Adapter record, expert layouts on disk, router readers.

Kept apart from the package's registry so that each family module imports only this, and the
registry imports the family modules: no import cycle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from ..routing import RouterConfig, RoutingRule

Getter = Callable[[str], torch.Tensor]


@dataclass(frozen=True)
class PerExpertLayout:
    """One 2-D tensor per (layer, expert, projection): gate [I, H], up [I, H], down [H, I]."""

    prefix: str  # e.g. "model.layers.{l}.mlp.experts.{e}."
    gate: str = "gate_proj.weight"
    up: str = "up_proj.weight"
    down: str = "down_proj.weight"

    def keys(self, l: int, e: int) -> list[str]:
        p = self.prefix.format(l=l, e=e)
        return [p + self.gate, p + self.up, p + self.down]

    def read(self, get: Getter, l: int, e: int) -> dict[str, torch.Tensor]:
        gate, up, down = (get(k) for k in self.keys(l, e))
        return {"gate_up_proj": torch.cat([gate, up], dim=0), "down_proj": down}  # [2I, H], [H, I]

    def write(self, l: int, e: int, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        gate, up = params["gate_up_proj"].chunk(2, dim=0)
        return dict(zip(self.keys(l, e), (gate.contiguous(), up.contiguous(), params["down_proj"].contiguous())))


@dataclass(frozen=True)
class FusedLayout:
    """The in-memory fused tensors stored as they are: expert e of each parameter is `tensor[e]`."""

    prefix: str  # e.g. "model.layers.{l}.mlp.experts."
    params: tuple[str, ...] = ("gate_up_proj", "down_proj")

    def tensor_keys(self, l: int) -> list[str]:
        return [self.prefix.format(l=l) + p for p in self.params]

    def read(self, get_slice: Callable[[str, int], torch.Tensor], l: int, e: int) -> dict[str, torch.Tensor]:
        return {p: get_slice(k, e) for p, k in zip(self.params, self.tensor_keys(l))}


def softmax_router(count_key: str, *, always_renormalize: bool = False, cast_weights: bool = True):
    """RouterConfig reader for softmax routers: renormalised iff `norm_topk_prob` unless always."""

    def read(config) -> RouterConfig:
        renormalize = always_renormalize or bool(config.norm_topk_prob)
        return RouterConfig(RoutingRule.SOFTMAX_TOPK, int(getattr(config, count_key)), int(config.num_experts_per_tok),
                            renormalize=renormalize, cast_weights=cast_weights)

    return read


@dataclass(frozen=True)
class Adapter:
    """A family's facts; the defaults are transformers' common MoE layout (`mlp.gate`, `mlp.experts.{e}.*_proj`)."""

    model_type: str
    count_key: str = "num_experts"  # config key of the routed expert count (num_experts / num_local_experts / n_routed_experts)
    router_attr: str = "gate"  # attribute of the MoE block that holds the router
    router_prefix: str = "model.layers.{l}.mlp.gate."  # on-disk prefix of the router's tensors
    router_config: Callable[[object], RouterConfig] = softmax_router("num_experts")
    fused: FusedLayout = FusedLayout("model.layers.{l}.mlp.experts.")  # in memory; also save_original_format=False
    per_expert: PerExpertLayout | None = PerExpertLayout("model.layers.{l}.mlp.experts.{e}.")  # usual on disk; None if fused
    group_keys: tuple[str, str] | None = None  # config keys (n_group, topk_group) of group-limited routing
    renames: tuple[tuple[str, str], ...] = ()  # on-disk -> in-memory substrings of non-expert keys (pool build)
    block_attr: str = "mlp"  # attribute of a decoder layer that holds its MLP or MoE block
    experts_attr: str = "experts"  # attribute of the MoE block that holds the routed experts module
    residual_norm_attr: str = "post_attention_layernorm"  # its input is the residual the MoE output is added to

    def moe_blocks(self, model: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
        """(decoder layer index, MoE block) for every layer whose MLP has routed experts."""
        return [(i, self.block(layer)) for i, layer in enumerate(model.base_model.layers)
                if hasattr(self.block(layer), self.experts_attr)]

    def block(self, layer: torch.nn.Module) -> torch.nn.Module:
        return getattr(layer, self.block_attr)

    def router(self, block: torch.nn.Module) -> torch.nn.Module:
        return getattr(block, self.router_attr)

    def experts(self, block: torch.nn.Module) -> torch.nn.Module:
        return getattr(block, self.experts_attr)

    def residual_norm(self, layer: torch.nn.Module) -> torch.nn.Module:
        return getattr(layer, self.residual_norm_attr)

    def num_experts(self, config) -> int:
        return int(getattr(config, self.count_key))

    def memory_name(self, disk_key: str) -> str:
        """The in-memory parameter name transformers loads an on-disk key as."""
        for old, new in self.renames:
            disk_key = disk_key.replace(old, new)
        return disk_key

    def disk_name(self, memory_key: str) -> str:
        """The on-disk key of an in-memory name (renames undone, last first): what `domex export` writes."""
        for old, new in reversed(self.renames):
            memory_key = memory_key.replace(new, old)
        return memory_key
