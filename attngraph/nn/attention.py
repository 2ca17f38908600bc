"""`SparseSelfAttention`: multi-head self-attention over the edges of a `TokenGraph`.

Like :class:`torch.nn.MultiheadAttention` (``batch_first=True``) for self-attention, with
the dense mask replaced by a graph: query token i attends to key token j iff the graph has
the edge ``j -> i``. Work and memory grow with the number of edges, not with L².
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attngraph.graph import TokenGraph
from attngraph.ops import aggregate, edge_scores, edge_softmax, graph_attention

__all__ = ["SparseSelfAttention"]


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


class SparseSelfAttention(nn.Module):
    r"""Multi-head self-attention masked by a :class:`~attngraph.TokenGraph`.

    ``out = out_proj(attention(q_proj(x), k_proj(x), v_proj(x), graph))`` with ``H`` query
    heads of size ``D = embed_dim / H`` and ``H_kv`` key/value heads (grouped-query
    attention: query head ``h`` reads key/value head ``h // (H / H_kv)``); scores are
    scaled by ``1 / sqrt(D)``.

    Args:
        embed_dim: ``E``, model width (a multiple of ``num_heads``).
        num_heads: ``H``, query heads.
        num_kv_heads: ``H_kv``, key/value heads (divides ``num_heads``); default ``H``.
        bias: learn biases in the four projections.
        dropout: dropout probability on the attention weights, in training only (as
            ``nn.MultiheadAttention``). With ``dropout > 0`` training runs the unfused
            stages (:func:`attngraph.ops.edge_scores`, ``edge_softmax``, dropout,
            ``aggregate``), which hold ``[E, H]`` weights and ``[E, H, D]`` gathers;
            evaluation and ``dropout = 0`` use the fused :func:`attngraph.graph_attention`.
        process_group: a ``torch.distributed`` group to shard the sequence over (context
            parallel, :mod:`attngraph.distributed`); ``forward`` then takes this rank's
            tokens. Attention dropout is not supported there.

    Parameters: ``q_proj`` ``[E, E]``, ``k_proj`` / ``v_proj`` ``[H_kv * D, E]``,
    ``out_proj`` ``[E, E]`` (``nn.Linear`` each). :meth:`from_multihead_attention` copies
    the weights of an ``nn.MultiheadAttention``.

    Shapes:
        - **x:** ``[B, L, E]`` or ``[L, E]``.
        - **graph:** a :class:`TokenGraph` over the ``L`` tokens (``num_src = num_dst = L``)
          shared by every sequence of the batch, or a
          :class:`~attngraph.stacked.StackedGraph` of one graph per head and/or sequence.
        - **output:** same shape as ``x``. A token without incoming edges attends to
          nothing: its attention output is 0, so it gets ``out_proj``'s bias.
    """

    def __init__(self, embed_dim: int, num_heads: int, *, num_kv_heads: Optional[int] = None,
                 bias: bool = True, dropout: float = 0.0, process_group=None):
        super().__init__()
        embed_dim = _check_positive_int("embed_dim", embed_dim)
        num_heads = _check_positive_int("num_heads", num_heads)
        num_kv_heads = num_heads if num_kv_heads is None else _check_positive_int(
            "num_kv_heads", num_kv_heads)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads "
                             f"({num_heads})")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads "
                             f"({num_kv_heads})")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = float(dropout)
        self.process_group = process_group
        kv_dim = num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, kv_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, kv_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.MultiheadAttention``'s initialisation: Xavier-uniform input projections
        (fan computed over the stacked q/k/v matrix), zero biases."""
        rows = self.embed_dim + 2 * self.k_proj.out_features
        bound = math.sqrt(6.0 / (self.embed_dim + rows))
        for lin in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.uniform_(lin.weight, -bound, bound)
        self.out_proj.reset_parameters()
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    @classmethod
    def from_multihead_attention(cls, mha: nn.MultiheadAttention) -> "SparseSelfAttention":
        """A layer with ``mha``'s weights, dropout, dtype and device.

        On ``attngraph.masks.full(L)`` it computes ``mha(x, x, x, need_weights=False)[0]``
        for ``batch_first=True`` (``x [B, L, E]``) — this layer is always batch-first.
        Needs ``kdim = vdim = embed_dim``, ``add_bias_kv=False`` and ``add_zero_attn=False``.
        """
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"expected a torch.nn.MultiheadAttention, got "
                            f"{type(mha).__name__}")
        if not mha._qkv_same_embed_dim:
            raise ValueError(f"self-attention needs kdim = vdim = embed_dim, got kdim="
                             f"{mha.kdim}, vdim={mha.vdim}, embed_dim={mha.embed_dim}")
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("add_bias_kv / add_zero_attn add keys outside the graph; build "
                             "the MultiheadAttention without them")
        E = mha.embed_dim
        w = mha.in_proj_weight
        layer = cls(E, mha.num_heads, bias=mha.in_proj_bias is not None,
                    dropout=mha.dropout).to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            for i, lin in enumerate((layer.q_proj, layer.k_proj, layer.v_proj)):
                lin.weight.copy_(w[i * E:(i + 1) * E])
                if lin.bias is not None:
                    lin.bias.copy_(mha.in_proj_bias[i * E:(i + 1) * E])
            layer.out_proj.weight.copy_(mha.out_proj.weight)
            if layer.out_proj.bias is not None:
                layer.out_proj.bias.copy_(mha.out_proj.bias)
        return layer

    def forward(self, x: Tensor, graph: TokenGraph, *, ranges=None) -> Tensor:
        """Attend over ``graph``: ``x [B, L, E]`` or ``[L, E]`` -> same shape.

        With a ``process_group`` the sequence is sharded: ``x`` holds this rank's tokens
        ``[B, n_r, E]`` of ``ranges`` (default
        :func:`attngraph.distributed.shard_ranges` ``(graph, world_size)``), and the
        attention runs through :func:`attngraph.distributed.graph_attention`.
        """
        sharded = self.process_group is not None
        self._check_input(x, graph, sharded)
        unbatched = x.dim() == 2
        if unbatched:
            x = x.unsqueeze(0)
        B, L, _ = x.shape
        H, H_kv, D = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(x).view(B, L, H, D)
        k = self.k_proj(x).view(B, L, H_kv, D)
        v = self.v_proj(x).view(B, L, H_kv, D)
        if sharded:
            from attngraph import distributed

            if self.training and self.dropout > 0:
                raise ValueError("attention dropout is not supported with a process_group; "
                                 "set dropout=0 or call eval()")
            out = distributed.graph_attention(q, k, v, graph, group=self.process_group,
                                              ranges=ranges)
        elif self.training and self.dropout > 0:
            out = self._attention_with_dropout(q, k, v, graph)
        else:
            out = graph_attention(q, k, v, graph)                    # [B, L, H, D]
        out = self.out_proj(out.reshape(B, L, H * D))
        return out.squeeze(0) if unbatched else out

    def _attention_with_dropout(self, q: Tensor, k: Tensor, v: Tensor,
                                graph: TokenGraph) -> Tensor:
        """Unfused stages with dropout on the ``[E, B * H]`` attention weights."""
        B, L, H, D = q.shape
        from attngraph.stacked import StackedGraph

        if isinstance(graph, StackedGraph):         # the stages fold the stack themselves
            p = edge_softmax(edge_scores(q, k, graph), graph)
            return aggregate(F.dropout(p, p=self.dropout, training=True), v, graph)
        # Fold the batch into heads, batch-major: head b * H + h reads kv head
        # b * H_kv + h // G, which is GQA grouping of the folded heads.
        q, k, v = (t.transpose(0, 1).reshape(L, B * t.size(2), D) for t in (q, k, v))
        p = edge_softmax(edge_scores(q, k, graph), graph)
        p = F.dropout(p, p=self.dropout, training=True)
        return aggregate(p, v, graph).view(L, B, H, D).transpose(0, 1)

    def _check_input(self, x, graph, sharded: bool = False) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor [B, L, E] or [L, E], got "
                            f"{type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a float tensor, got {x.dtype}")
        if x.dim() not in (2, 3):
            raise ValueError(f"x must have shape [B, L, E] or [L, E], got {list(x.shape)}")
        if x.size(-1) != self.embed_dim:
            raise ValueError(f"x has last dimension {x.size(-1)} but embed_dim is "
                             f"{self.embed_dim}")
        dtype = self.q_proj.weight.dtype
        if x.dtype != dtype:
            raise TypeError(f"x is {x.dtype} but the layer's parameters are {dtype}; cast x "
                            f"(x.to({dtype})) or the layer (layer.to({x.dtype}))")
        from attngraph.stacked import StackedGraph

        if not isinstance(graph, (TokenGraph, StackedGraph)):
            raise TypeError(f"graph must be an attngraph.TokenGraph (or a StackedGraph of one "
                            f"per head / sequence), got {type(graph).__name__}; build one "
                            f"with attngraph.masks or TokenGraph(edge_index, num_nodes=L)")
        L = x.size(-2)
        if sharded:     # x holds this rank's tokens: distributed.graph_attention checks them
            if isinstance(graph, StackedGraph):
                raise ValueError("a StackedGraph cannot be sharded over a process_group yet; "
                                 "pass one TokenGraph")
            return
        if graph.num_src != L or graph.num_dst != L:
            raise ValueError(f"graph must be over the {L} tokens of x (num_src = num_dst = "
                             f"{L}), got num_src={graph.num_src}, num_dst={graph.num_dst}")
        if graph.device != x.device:
            raise ValueError(f"graph is on {graph.device} but x is on {x.device}; use "
                             f"graph.to({str(x.device)!r})")

    def extra_repr(self) -> str:
        kv = "" if self.num_kv_heads == self.num_heads else f", num_kv_heads={self.num_kv_heads}"
        drop = f", dropout={self.dropout}" if self.dropout else ""
        return f"{self.embed_dim}, num_heads={self.num_heads}{kv}{drop}"
