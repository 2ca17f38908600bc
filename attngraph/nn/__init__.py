"""Neural-network layers built on :func:`attngraph.graph_attention`.

* :class:`GraphAttentionConv`: a drop-in replacement for PyG's ``TransformerConv``.
* :class:`SparseSelfAttention`: ``nn.MultiheadAttention``-style self-attention masked by a
  :class:`~attngraph.TokenGraph`.
"""
from attngraph.nn.attention import SparseSelfAttention
from attngraph.nn.conv import GraphAttentionConv

__all__ = ["GraphAttentionConv", "SparseSelfAttention"]
