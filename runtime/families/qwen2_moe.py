"""Qwen2-MoE: softmax router (not renormalised by default) plus a shared expert behind a sigmoid gate.

The shared expert (`mlp.shared_expert`, `mlp.shared_expert_gate`) is a dense weight: always kept.
"""

from .base import Adapter

ADAPTER = Adapter(model_type="qwen2_moe")
