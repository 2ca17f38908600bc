"""Graph attention operators: the fused :func:`graph_attention` and its three stages."""
from attngraph.ops.functional import aggregate, edge_scores, edge_softmax, graph_attention

__all__ = ["graph_attention", "edge_scores", "edge_softmax", "aggregate"]
