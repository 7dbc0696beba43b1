"""domex.runtime: everything that touches a model.

A request's path, one module per step: server -> engine -> match -> budget -> cache -> routing -> forward.
"""
