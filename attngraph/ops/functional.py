"""Public operators: :func:`graph_attention` and its three stages, with input checks.

Every check happens here, on the host, before any computation: backends receive validated,
node-major, GQA-grouped inputs.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from attngraph.checks import check_bias_values
from attngraph.graph import TokenGraph
from attngraph.ops.dispatch import Inputs, select_backend

__all__ = ["graph_attention", "edge_scores", "edge_softmax", "aggregate"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_graph(graph) -> None:
    if not isinstance(graph, TokenGraph):
        raise TypeError(f"graph must be an attngraph.TokenGraph, got {type(graph).__name__}; "
                        f"wrap an edge_index with attngraph.TokenGraph(edge_index, num_nodes)")


def _check_tensor(name: str, t, dims: Tuple[int, ...]) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if t.dim() not in dims:
        shapes = " or ".join({3: "[N, H, D]", 4: "[B, L, H, D]"}[d] for d in dims)
        raise ValueError(f"{name} must have shape {shapes}, got {list(t.shape)}")


def _check_scale(scale, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim) if head_dim else 1.0
    if isinstance(scale, Tensor) and scale.numel() == 1:
        scale = scale.item()
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)


def _check_qkv(q, k, v, graph) -> None:
    """Shapes, dtypes and devices of q/k/v against each other and the graph."""
    _check_graph(graph)
    _check_tensor("q", q, (3, 4))
    _check_tensor("k", k, (q.dim(),))
    _check_tensor("v", v, (q.dim(),))
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.device != q.device:
            raise ValueError(f"q is on {q.device} but {name} is on {t.device}")
    if graph.device != q.device:
        raise ValueError(f"the graph is on {graph.device} but q is on {q.device}; "
                         f"use graph.to({str(q.device)!r})")
    node = q.dim() - 3  # dimension that indexes tokens
    if q.dim() == 4 and not (q.size(0) == k.size(0) == v.size(0)):
        raise ValueError(f"batch sizes differ: q {q.size(0)}, k {k.size(0)}, v {v.size(0)}")
    if q.size(node) != graph.num_dst:
        raise ValueError(f"q has {q.size(node)} query tokens but the graph has "
                         f"num_dst={graph.num_dst}")
    for name, t in (("k", k), ("v", v)):
        if t.size(node) != graph.num_src:
            raise ValueError(f"{name} has {t.size(node)} key tokens but the graph has "
                             f"num_src={graph.num_src}")
    H, H_kv = q.size(-2), k.size(-2)
    if v.size(-2) != H_kv:
        raise ValueError(f"k and v must have the same number of heads, got {H_kv} and "
                         f"{v.size(-2)}")
    if H_kv == 0 or H % H_kv:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({H_kv})")
    if k.size(-1) != q.size(-1):
        raise ValueError(f"q and k must have the same head dim, got {q.size(-1)} and "
                         f"{k.size(-1)}")
    if q.size(-1) == 0:
        raise ValueError(f"q and k must have a head dim >= 1, got shape {list(q.shape)}")
    if v.size(-1) == 0:
        raise ValueError(f"v must have a head dim >= 1, got shape {list(v.shape)}")


def _check_bias(edge_bias, graph: TokenGraph, q: Tensor) -> Optional[Tensor]:
    if edge_bias is None:
        return None
    if not isinstance(edge_bias, Tensor):
        raise TypeError(f"edge_bias must be a torch.Tensor, got {type(edge_bias).__name__}")
    if edge_bias.dtype not in _FLOATS:
        raise TypeError(f"edge_bias must be a float tensor, got {edge_bias.dtype}")
    H = q.size(-2)
    E = graph.num_edges
    if not (edge_bias.dim() == 1 and edge_bias.size(0) == E
            or edge_bias.dim() == 2 and edge_bias.size(0) == E and edge_bias.size(1) == H):
        raise ValueError(f"edge_bias must have shape [E] or [E, H] = [{E}] or [{E}, {H}] "
                         f"(canonical edge order of the graph), got {list(edge_bias.shape)}")
    if edge_bias.device != q.device:
        raise ValueError(f"edge_bias is on {edge_bias.device} but q is on {q.device}")
    # Under torch.compile a data-dependent check would break the graph: the cupy backend's
    # op makes it when it runs.
    if not torch.compiler.is_compiling():
        check_bias_values(edge_bias)
    return edge_bias if edge_bias.dim() == 2 else edge_bias.unsqueeze(-1)


def graph_attention(q: Tensor, k: Tensor, v: Tensor, graph: TokenGraph, *,
                    scale: Optional[float] = None, edge_bias: Optional[Tensor] = None,
                    return_lse: bool = False, backend: str = "auto"
                    ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    r"""Attention of each query over the keys the graph lets it see.

    ``out[i, h] = sum_{j -> i} softmax_j(scale * q[i, h] . k[j, h'] + bias_{ji,h}) v[j, h']``
    with ``h' = h // (H // H_kv)`` (GQA). Work and memory grow with the number of edges E,
    never with ``N_dst * N_src``.

    Args:
        q: ``[N_dst, H, D]`` queries, or ``[B, L, H, D]`` for a batch of sequences sharing
            one graph over ``L = N_dst`` tokens.
        k: ``[N_src, H_kv, D]`` keys (``[B, S, H_kv, D]`` batched).
        v: ``[N_src, H_kv, D_v]`` values (``[B, S, H_kv, D_v]`` batched).
        graph: :class:`TokenGraph` with ``num_dst`` queries and ``num_src`` keys.
        scale: score scale, default ``1 / sqrt(D)``.
        edge_bias: ``[E]`` or ``[E, H]`` added to the scores before the softmax, in the
            graph's canonical edge order (``-inf`` masks an edge out).
        return_lse: also return the log-sum-exp of each query's scores.
        backend: ``"auto"``, ``"torch"`` (per-edge row chunks), ``"cupy"`` (the fused
            CUDA kernels), ``"tiles"`` (dense tiles where ``graph.tile_plan()`` finds them,
            the other edges per edge; ``"auto"`` takes it when the plan's modelled cost is
            lower), ``"flex"`` (the tiles on FlexAttention, the other edges per edge;
            ``"auto"`` takes it on CUDA where the H100 model finds it faster than the fused
            kernels) or ``"ranges"`` (key ranges read from the rule of an implicit graph, or
            of a hash / QK-drop graph). A backend that cannot run the input raises, with
            every backend's reason; :func:`attngraph.ops.dispatch.explain` says which one
            ``"auto"`` takes and why.

    Returns:
        ``out [N_dst, H, D_v]`` (``[B, L, H, D_v]`` batched) in the dtype of ``q``, and with
        ``return_lse`` also ``lse [N_dst, H]`` (``[B, L, H]``), float32 (float64 for
        float64 inputs). A query without edges gets ``out = 0`` and ``lse = -inf``.

    Differentiable with respect to ``q``, ``k``, ``v`` and ``edge_bias``, through ``out``
    and ``lse`` (a loss may use the log-sum-exp, as merging partial attentions does);
    computes in float32 (float64 for float64 inputs) whatever the input dtype.

    ``graph`` may be a :class:`~attngraph.stacked.StackedGraph`: one graph per sequence,
    per head or per (sequence, head), with ``q [B, L, H, D]`` (or ``[L, H, D]``) and
    ``edge_bias [E]`` in the stack's edge order; the whole stack runs as one backend call.
    """
    from attngraph.stacked import StackedGraph

    if isinstance(graph, StackedGraph):
        return _stacked_attention(q, k, v, graph, scale, edge_bias, return_lse, backend)
    _check_qkv(q, k, v, graph)
    bias = _check_bias(edge_bias, graph, q)
    scale = _check_scale(scale, q.size(-1))
    chosen = select_backend(backend, Inputs.of(q, k, v, graph, bias))

    batched = q.dim() == 4
    if batched:  # fold the batch into heads: head b * H + h; GQA grouping is preserved
        B, L, H = q.shape[:3]
        q, k, v = (t.transpose(0, 1).reshape(t.size(1), B * t.size(2), t.size(3))
                   for t in (q, k, v))
    run = chosen.auto_run if backend == "auto" and chosen.auto_run is not None else chosen.run
    out, lse = run(q, k, v, graph, scale, bias)
    if batched:
        out = out.view(L, B, H, v.size(-1)).transpose(0, 1)
        lse = lse.view(L, B, H).transpose(0, 1)
    return (out, lse) if return_lse else out


def _check_stacked(q: Tensor, k: Tensor, v: Tensor, stacked) -> Tuple[int, int, int]:
    """Shapes of q/k/v against a stack; returns ``(B, H, H_kv)``."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f"with a StackedGraph, {name} must be a [B, L, H, D] tensor, got "
                             f"{list(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    B, L, H = q.shape[:3]
    H_kv = k.size(2)
    B_g, H_g = stacked.shape
    if B_g not in (1, B):
        raise ValueError(f"the stack has {B_g} graphs per head for a batch of {B} sequences "
                         f"(expected 1 or {B})")
    if H_g not in (1, H):
        raise ValueError(f"the stack has {H_g} graphs per sequence for {H} heads (expected 1 "
                         f"or {H})")
    if L != stacked.num_dst or k.size(1) != stacked.num_src or v.size(1) != stacked.num_src:
        raise ValueError(f"q has {L} tokens and k/v {k.size(1)}/{v.size(1)}, but the stacked "
                         f"graphs have num_dst={stacked.num_dst}, num_src={stacked.num_src}")
    if H_kv == 0 or H % H_kv:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({H_kv})")
    return B, H, H_kv


def _fold_qkv(q, k, v, stacked):
    from attngraph.stacked import fold

    unbatched = q.dim() == 3
    if unbatched:
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    B, H, H_kv = _check_stacked(q, k, v, stacked)
    kv_shape = (stacked.shape[0], H_kv if stacked.shape[1] > 1 else 1)
    return (fold(q, stacked.shape), fold(k, kv_shape), fold(v, kv_shape),
            stacked.kv_graph(H, H_kv), B, H, unbatched)


def _stacked_attention(q, k, v, stacked, scale, edge_bias, return_lse, backend):
    from attngraph.stacked import unfold

    qn, kn, vn, graph, B, H, unbatched = _fold_qkv(q, k, v, stacked)
    if edge_bias is not None and (not isinstance(edge_bias, Tensor) or edge_bias.dim() != 1):
        raise ValueError(f"with a StackedGraph, edge_bias must be [E] = [{stacked.num_edges}] "
                         f"(the stack's edge order), got "
                         f"{list(edge_bias.shape) if isinstance(edge_bias, Tensor) else edge_bias}")
    out, lse = graph_attention(qn, kn, vn, graph, scale=scale, edge_bias=edge_bias,
                               return_lse=True, backend=backend)
    out = unfold(out, stacked.shape, B, H)
    lse = unfold(lse.unsqueeze(-1), stacked.shape, B, H).squeeze(-1)
    if unbatched:
        out, lse = out.squeeze(0), lse.squeeze(0)
    return (out, lse) if return_lse else out


def _stages(backend: str, x: Tensor, head_dim: int = 0, value_dim: int = 0,
            grad: bool = False):
    """The stage implementations of the backend chosen for ``x``."""
    return select_backend(backend, Inputs(device=x.device, dtype=x.dtype, head_dim=head_dim,
                                          value_dim=value_dim, requires_grad=grad)).stages()


def edge_scores(q: Tensor, k: Tensor, graph: TokenGraph, scale: Optional[float] = None, *,
                backend: str = "auto") -> Tensor:
    """Stage 1: ``s[e, h] = scale * q[dst_e, h] . k[src_e, h // G]`` -> ``[E, H]``.

    ``q [N_dst, H, D]``, ``k [N_src, H_kv, D]``; edges in the graph's canonical order; the
    result has q's dtype. ``backend`` as for :func:`graph_attention` (``"cupy"``: the
    ``row_dot`` kernel, differentiable through ``row_gather`` / ``col_gather``). With a
    :class:`~attngraph.stacked.StackedGraph`, ``q [B, L, H, D]`` and ``k [B, S, H_kv, D]``
    give ``[E, R]`` over the stack's edges (R: the heads the stack shares, ``(B / B_g) *
    (H / H_g)``).
    """
    from attngraph.stacked import StackedGraph

    if isinstance(graph, StackedGraph):
        qn, kn, _, g, *_ = _fold_qkv(q, k, k, graph)
        return edge_scores(qn, kn, g, scale, backend=backend)
    _check_qkv(q, k, k, graph)
    if q.dim() != 3:
        raise ValueError(f"the stage functions take node-major [N, H, D] inputs, got "
                         f"{list(q.shape)}")
    impl = _stages(backend, q, q.size(-1), 0, q.requires_grad or k.requires_grad)
    return impl.edge_scores(q, k, graph, _check_scale(scale, q.size(-1)))


def edge_softmax(scores: Tensor, graph: TokenGraph, *, backend: str = "auto") -> Tensor:
    """Stage 2: softmax of ``scores [E, H]`` (or ``[E]``) over each query's edges.

    Each query's weights sum to 1 (queries without edges have none); a query whose scores
    are all ``-inf`` gets weights 0. A :class:`~attngraph.stacked.StackedGraph` takes the
    stack's ``[E, R]`` scores.
    """
    from attngraph.stacked import StackedGraph

    if isinstance(graph, StackedGraph):
        graph = graph.graph
    _check_graph(graph)
    if not isinstance(scores, Tensor) or scores.dtype not in _FLOATS:
        raise TypeError(f"scores must be a float tensor, got "
                        f"{getattr(scores, 'dtype', type(scores).__name__)}")
    if scores.dim() not in (1, 2) or scores.size(0) != graph.num_edges:
        raise ValueError(f"scores must have shape [E] or [E, H] with E={graph.num_edges}, "
                         f"got {list(scores.shape)}")
    if scores.device != graph.device:
        raise ValueError(f"scores are on {scores.device} but the graph is on {graph.device}")
    impl = _stages(backend, scores, grad=scores.requires_grad)
    if scores.dim() == 1:
        return impl.edge_softmax(scores.unsqueeze(-1), graph).squeeze(-1)
    return impl.edge_softmax(scores, graph)


def aggregate(p: Tensor, v: Tensor, graph: TokenGraph, *, backend: str = "auto") -> Tensor:
    """Stage 3: ``out[i, h] = sum_e p[e, h] v[src_e, h // G]`` -> ``[N_dst, H, D_v]``.

    ``p [E, H]`` edge weights (v's dtype), ``v [N_src, H_kv, D_v]``. Queries without edges
    get 0. A :class:`~attngraph.stacked.StackedGraph` takes the stack's ``p [E, R]`` and
    ``v [B, S, H_kv, D_v]`` and gives ``[B, L, H, D_v]``.
    """
    from attngraph.stacked import StackedGraph, fold, unfold

    if isinstance(graph, StackedGraph):
        if not isinstance(v, Tensor) or v.dim() != 4 or not isinstance(p, Tensor) or \
                p.dim() != 2:
            raise ValueError("with a StackedGraph, aggregate takes p [E, R] and v "
                             "[B, S, H_kv, D_v]")
        B, H_kv = v.size(0), v.size(2)
        B_g, H_g = graph.shape
        if B_g not in (1, B) or p.size(1) * B_g % B:
            raise ValueError(f"p [E, {p.size(1)}] and v's batch {B} do not fit a stack of "
                             f"shape {graph.shape}")
        H = p.size(1) * H_g * B_g // B
        vn = fold(v, (B_g, H_kv if H_g > 1 else 1))
        out = aggregate(p, vn, graph.kv_graph(H, H_kv), backend=backend)
        return unfold(out, graph.shape, B, H)
    _check_graph(graph)
    _check_tensor("v", v, (3,))
    if v.size(-1) == 0:
        raise ValueError(f"v must have a head dim >= 1, got shape {list(v.shape)}")
    if not isinstance(p, Tensor) or p.dtype != v.dtype:
        raise TypeError(f"p must be a tensor of v's dtype {v.dtype}, got "
                        f"{getattr(p, 'dtype', type(p).__name__)}")
    if p.dim() != 2 or p.size(0) != graph.num_edges or p.size(1) % max(v.size(1), 1):
        raise ValueError(f"p must have shape [E, H] with E={graph.num_edges} and H a multiple "
                         f"of v's {v.size(1)} heads, got {list(p.shape)}")
    if v.size(0) != graph.num_src:
        raise ValueError(f"v has {v.size(0)} key tokens but the graph has "
                         f"num_src={graph.num_src}")
    if p.device != graph.device or v.device != graph.device:
        raise ValueError(f"p ({p.device}), v ({v.device}) and the graph ({graph.device}) "
                         f"must share one device")
    impl = _stages(backend, v, 0, v.size(-1), p.requires_grad or v.requires_grad)
    return impl.aggregate(p, v, graph)
