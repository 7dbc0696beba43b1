"""OLMoE: softmax router, renormalised iff norm_topk_prob (False by default), no shared expert."""

from .base import Adapter

ADAPTER = Adapter(model_type="olmoe")
