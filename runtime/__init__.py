"""domex.runtime: everything that touches a model.

A request's path, one module per step: server -> selection (match, fallback policy, mask or plan) ->
serving (admission, continuous batching) -> cache (make resident from the pool, per tier) -> routing
(each row restricted to its mask; skipping, novices) -> engine (the model's forward; quantised experts
dequantised when used, quant.py).
"""
