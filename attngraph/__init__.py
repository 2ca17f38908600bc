"""attngraph: transformer attention as message passing on a token graph.

Tokens are nodes; "query i may attend to key j" is an edge ``j -> i``. Every sparse
attention mask is a :class:`TokenGraph`, and :func:`graph_attention` computes attention on
it with work proportional to the number of edges.
"""
import warnings

with warnings.catch_warnings():
    # torch_geometric imports tqdm.auto, which in a Jupyter kernel without ipywidgets warns
    # "IProgress not found" on import (its bars then print as text, as in a script).
    warnings.filterwarnings("ignore", message="IProgress not found")
    import torch_geometric  # noqa: F401

from attngraph.graph import TokenGraph
from attngraph import masks
from attngraph.ops import graph_attention
from attngraph import ops
from attngraph import nn
from attngraph.ordering import reorder

__version__ = "0.1.0"

__all__ = ["TokenGraph", "masks", "ops", "nn", "viz", "graph_attention", "reorder",
           "__version__"]


def __getattr__(name):
    # `attngraph.viz` needs matplotlib: load it on first use, not on `import attngraph`.
    if name == "viz":
        import importlib

        return importlib.import_module("attngraph.viz")
    raise AttributeError(f"module 'attngraph' has no attribute {name!r}")
