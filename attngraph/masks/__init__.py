"""Mask generators: each returns a :class:`~attngraph.TokenGraph` (edge ``j -> i``: query i
attends to key j), built vectorised in canonical order."""
from attngraph.graph import batch

__all__ = ["batch"]
