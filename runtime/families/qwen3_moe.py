"""Qwen3-MoE: softmax router, renormalised iff norm_topk_prob (True in real checkpoints), no shared expert."""

from .base import Adapter

ADAPTER = Adapter(model_type="qwen3_moe")
