"""Qwen2-MoE: softmax router (not renormalised by default) plus a shared expert behind a sigmoid gate.

The shared expert (`mlp.shared_expert`, `mlp.shared_expert_gate`) is a dense weight: always kept.
"""

from . import Adapter, FusedLayout, PerExpertLayout, softmax_router

ADAPTER = Adapter(
    model_type="qwen2_moe",
    count_key="num_experts",
    router_attr="gate",
    router_prefix="model.layers.{l}.mlp.gate.",
    router_config=softmax_router("num_experts"),
    fused=FusedLayout("model.layers.{l}.mlp.experts."),
    per_expert=PerExpertLayout("model.layers.{l}.mlp.experts.{e}."),
)
