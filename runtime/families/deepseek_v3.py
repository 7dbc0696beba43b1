"""DeepSeek-V3: sigmoid scores, e_score_correction_bias for selection only, group-limited top-k,
routed_scaling_factor, always-on shared experts and dense first layers (`first_k_dense_replace`)."""

from ..routing import RouterConfig, RoutingRule
from .base import Adapter


def router_config(config) -> RouterConfig:
    return RouterConfig(RoutingRule.SIGMOID_BIAS_GROUPED, config.n_routed_experts, config.num_experts_per_tok,
                        renormalize=bool(config.norm_topk_prob), scaling=float(config.routed_scaling_factor),
                        n_group=int(config.n_group), topk_group=int(config.topk_group))


ADAPTER = Adapter(
    model_type="deepseek_v3",
    count_key="n_routed_experts",
    router_config=router_config,
    group_keys=("n_group", "topk_group"),
)
