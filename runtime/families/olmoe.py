"""OLMoE: softmax router, renormalised iff norm_topk_prob (False by default), no shared expert."""

from . import Adapter, FusedLayout, PerExpertLayout, softmax_router

ADAPTER = Adapter(
    model_type="olmoe",
    count_key="num_experts",
    router_attr="gate",
    router_prefix="model.layers.{l}.mlp.gate.",
    router_config=softmax_router("num_experts"),
    fused=FusedLayout("model.layers.{l}.mlp.experts."),
    per_expert=PerExpertLayout("model.layers.{l}.mlp.experts.{e}."),
)
