"""GPT-OSS: router with a bias, top-k on logits then softmax over the k; experts fused and transposed
on disk and in memory (gate/up interleaved, `gate_up_proj [E, H, 2I]`, `down_proj [E, I, H]`) with biases."""

from ..routing import RouterConfig, RoutingRule
from .base import Adapter, FusedLayout


def router_config(config) -> RouterConfig:
    return RouterConfig(RoutingRule.TOPK_SOFTMAX, config.num_local_experts, config.num_experts_per_tok)


ADAPTER = Adapter(
    model_type="gpt_oss",
    count_key="num_local_experts",
    router_attr="router",
    router_prefix="model.layers.{l}.mlp.router.",
    router_config=router_config,
    fused=FusedLayout("model.layers.{l}.mlp.experts.",
                      ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")),
    per_expert=None,
)
