"""Mixtral: softmax router, always renormalised, weights kept in fp32; on disk the block is `block_sparse_moe`
with per-expert w1 (gate), w3 (up), w2 (down)."""

from .base import Adapter, PerExpertLayout, softmax_router

ADAPTER = Adapter(
    model_type="mixtral",
    count_key="num_local_experts",
    router_prefix="model.layers.{l}.block_sparse_moe.gate.",
    router_config=softmax_router("num_local_experts", always_renormalize=True, cast_weights=False),
    per_expert=PerExpertLayout("model.layers.{l}.block_sparse_moe.experts.{e}.", "w1.weight", "w3.weight", "w2.weight"),
    renames=((".block_sparse_moe.", ".mlp."),),
)
