"""domex.runtime: everything that touches a model.

A request's path, one module per step: server -> selection (match, fallback policy, mask) ->
serving (admission, continuous batching) -> cache (make resident from the pool) -> routing (each
row restricted to its mask) -> engine (the model's forward).
"""
