"""domex.store: the domain pattern store and the maths on recorded statistics (arrays, not torch modules)."""
