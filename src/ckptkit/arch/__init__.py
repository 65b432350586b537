"""The architecture registry: families, components, layouts and identification (no torch)."""
