"""The three stages of graph attention, unfused, with plain autograd.

This is the readable definition of what attngraph computes and the oracle the tests use:
scores per edge, a softmax over each query's incoming edges, and a weighted sum of values.
It materialises per-edge tensors (``[E, H, D]`` gathers), so it is meant for inspection and
small inputs; :mod:`attngraph.ops.chunked` computes the same thing in bounded memory.

Shapes: ``q [N_dst, H, D]``, ``k [N_src, H_kv, D]``, ``v [N_src, H_kv, D_v]``, ``E`` edges in
the graph's canonical order, GQA query head ``h`` reads kv head ``h // (H // H_kv)``.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from attngraph.graph import TokenGraph
from attngraph.ops.segment import segment_max, segment_sum

__all__ = ["edge_scores", "edge_softmax", "aggregate", "attention"]


def _group(x: Tensor, heads: int) -> Tensor:
    """``[M, H, ...]`` -> ``[M, H_kv, G, ...]`` for GQA with ``x.size(1) // heads = G``."""
    return x.view(x.size(0), heads, x.size(1) // heads, *x.shape[2:])


def edge_scores(q: Tensor, k: Tensor, graph: TokenGraph, scale: Optional[float] = None) -> Tensor:
    """``s[e, h] = scale * q[dst_e, h] . k[src_e, h // G]`` -> ``[E, H]``."""
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    H, H_kv = q.size(1), k.size(1)
    qe = _group(q.index_select(0, graph.dst), H_kv)              # [E, H_kv, G, D]
    ke = k.index_select(0, graph.src).unsqueeze(2)               # [E, H_kv, 1, D]
    return (qe * ke).sum(-1).reshape(-1, H) * scale


def edge_softmax(scores: Tensor, graph: TokenGraph) -> Tensor:
    """Softmax of ``scores [E, H]`` over each query's incoming edges -> ``[E, H]``."""
    ptr, dst = graph.ptr, graph.dst
    m = segment_max(scores.detach(), ptr, dst).index_select(0, dst)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))   # rows whose scores are all -inf
    e = torch.exp(scores - m)
    return e / segment_sum(e, ptr, dst).index_select(0, dst).clamp_min(torch.finfo(e.dtype).tiny)


def aggregate(p: Tensor, v: Tensor, graph: TokenGraph) -> Tensor:
    """``out[i, h] = sum_e p[e, h] * v[src_e, h // G]`` over edges into i -> ``[N_dst, H, D_v]``.

    Queries without edges get 0.
    """
    H, H_kv = p.size(1), v.size(1)
    ve = v.index_select(0, graph.src).unsqueeze(2)               # [E, H_kv, 1, D_v]
    msg = (_group(p, H_kv).unsqueeze(-1) * ve).reshape(-1, H, v.size(-1))
    return segment_sum(msg, graph.ptr, graph.dst)


def attention(q: Tensor, k: Tensor, v: Tensor, graph: TokenGraph, *,
              scale: Optional[float] = None, edge_bias: Optional[Tensor] = None
              ) -> Tuple[Tensor, Tensor]:
    """Unfused graph attention on node-major inputs -> ``(out [N_dst, H, D_v], lse [N_dst, H])``.

    Computes in the inputs' dtype; ``lse`` is ``-inf`` for queries without edges.
    """
    s = edge_scores(q, k, graph, scale)
    if edge_bias is not None:
        s = s + (edge_bias.unsqueeze(-1) if edge_bias.dim() == 1 else edge_bias)
    ptr, dst = graph.ptr, graph.dst
    m = segment_max(s.detach(), ptr, dst)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    total = segment_sum(torch.exp(s - m.index_select(0, dst)), ptr, dst)
    lse = torch.log(total) + m
    lse = torch.where(graph.in_degree().view(-1, 1) > 0, lse, torch.full_like(lse, -math.inf))
    return aggregate(edge_softmax(s, graph), v, graph), lse
