"""attngraph: transformer attention as message passing on a token graph.

Tokens are nodes; "query i may attend to key j" is an edge ``j -> i``. Every sparse
attention mask is a :class:`TokenGraph`, and :func:`graph_attention` computes attention on
it with work proportional to the number of edges.
"""
from attngraph.graph import TokenGraph
from attngraph import masks
from attngraph.ops import graph_attention
from attngraph import ops

__version__ = "0.1.0"

__all__ = ["TokenGraph", "masks", "ops", "graph_attention", "__version__"]
