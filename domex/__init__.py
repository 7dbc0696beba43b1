"""domex: serve MoE models with only the experts each query's domain needs.

The code lives in two packages: `domex.runtime` (everything that touches a model) and
`domex.store` (the domain pattern store and the maths on recorded statistics); `domex.errors`
holds the errors both raise, each a one-line message for the CLI and an HTTP status for the server.
"""

__version__ = "0.1.0"
