"""The three stages on the CUDA kernels of ``stages.cu``: raw launchers, autograd, and the
unfused attention they compose.

Layers: ``row_dot`` / ``row_gather`` / ``col_gather`` / ``row_softmax`` launch one
kernel each after checking every argument on the host; the ``attngraph::edge_scores``,
``::edge_softmax`` and ``::aggregate`` custom ops give them autograd (each backward runs the
other kernels, no atomics, so gradients are deterministic) and make them opaque to
torch.compile; :func:`edge_scores`, :func:`edge_softmax` and :func:`aggregate` are what
:mod:`attngraph.ops.functional` calls.

Shapes: ``q [N_dst, H, D]``, ``k [N_src, H_kv, D]``, ``v [N_src, H_kv, D_v]``, per-edge
``[E, H]`` in the graph's canonical order; GQA query head ``h`` reads kv head ``h // G``,
``G = H // H_kv``. The kernels take float32 / float16 / bfloat16 and accumulate in float32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from attngraph.graph import TokenGraph, graph_of
from attngraph.ops.cuda import loader

__all__ = ["GraphArrays", "graph_arrays", "row_dot", "row_gather", "col_gather",
           "row_softmax", "row_softmax_bwd", "edge_scores", "edge_softmax", "aggregate",
           "KERNEL_DTYPES"]

KERNEL_DTYPES = {torch.float32: "float", torch.float16: "__half",
                 torch.bfloat16: "__nv_bfloat16"}
WARPS_PER_BLOCK = 4          # kWarps in stages.cu
THREADS = WARPS_PER_BLOCK * 32
_INT32_MAX = 2 ** 31 - 1


@dataclass(frozen=True)
class GraphArrays:
    """A graph's index arrays as the kernels read them, checked once and cached on the graph.

    ``ptr`` int64 ``[N_dst + 1]`` and ``col`` int32 ``[E]`` (CSR over queries, canonical
    order); ``kptr`` int64 ``[N_src + 1]``, ``krow`` int32 ``[E]`` and ``perm`` int64 ``[E]``
    (CSC over keys: the query and the canonical edge id of each key-major edge).
    """

    num_src: int
    num_dst: int
    num_edges: int
    ptr: Tensor
    col: Tensor
    kptr: Tensor
    krow: Tensor
    perm: Tensor


def _check_offsets(name: str, ptr: Tensor, rows: int, edges: int) -> None:
    ok = (ptr.numel() == rows + 1 and int(ptr[0]) == 0 and int(ptr[-1]) == edges
          and bool((ptr.diff() >= 0).all()))
    if not ok:
        raise ValueError(f"the graph's {name} offsets are inconsistent (expected {rows + 1} "
                         f"non-decreasing offsets from 0 to {edges}); was its edge_index "
                         f"modified in place?")


def _check_indices(name: str, idx: Tensor, bound: int) -> None:
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= bound):
        raise ValueError(f"the graph's {name} indices leave [0, {bound}); was its edge_index "
                         f"modified in place?")


def graph_arrays(graph: TokenGraph) -> GraphArrays:
    """The kernels' view of ``graph`` (computed once per graph; every index checked here, so
    no kernel can be led out of bounds by the graph)."""
    cached = graph.caches.cuda.get("cuda_arrays")
    if cached is not None:
        return cached
    S, R, E = graph.num_src, graph.num_dst, graph.num_edges
    if max(S, R) > _INT32_MAX:
        raise ValueError(f"the CUDA kernels take graphs of fewer than 2^31 nodes, got "
                         f"num_src={S}, num_dst={R}")
    # indices first: building the CSC from out-of-range indices would crash torch itself
    _check_indices("key", graph.src, S)
    _check_indices("query", graph.dst, R)
    ptr = graph.ptr.to(torch.int64).contiguous().clone()
    col = graph.src.to(torch.int32).contiguous()
    _check_offsets("CSR", ptr, R, E)
    kptr, kdst, perm = graph.csc()
    kptr = kptr.to(torch.int64).contiguous().clone()
    krow = kdst.to(torch.int32).contiguous()
    perm = perm.to(torch.int64).contiguous().clone()
    _check_offsets("CSC", kptr, S, E)   # krow permutes dst (checked above)
    _check_indices("edge permutation", perm, E)
    arrays = GraphArrays(S, R, E, ptr, col, kptr, krow, perm)
    graph.caches.cuda["cuda_arrays"] = arrays
    return arrays


# ---------------------------------------------------------------------------- launching
def lanes(dim: int) -> int:
    """Elements per lane for a head dim (the template bucket NT, 32 * NT >= dim)."""
    for nt in loader.HEAD_DIM_CHUNKS:
        if 32 * nt >= dim:
            return nt
    raise ValueError(f"the CUDA kernels take head dims up to {loader.MAX_HEAD_DIM}, got {dim}")


def expect(name: str, t: Tensor, shape: Tuple[int, ...], dtype: torch.dtype,
            device: torch.device) -> None:
    """Host-side check of one kernel argument; a mismatch would be an out-of-bounds access."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _check_arrays(g: GraphArrays, device: torch.device) -> None:
    expect("ptr", g.ptr, (g.num_dst + 1,), torch.int64, device)
    expect("col", g.col, (g.num_edges,), torch.int32, device)
    expect("kptr", g.kptr, (g.num_src + 1,), torch.int64, device)
    expect("krow", g.krow, (g.num_edges,), torch.int32, device)
    expect("perm", g.perm, (g.num_edges,), torch.int64, device)


def kernel_dtype(t: Tensor) -> str:
    try:
        return KERNEL_DTYPES[t.dtype]
    except KeyError:
        raise TypeError(f"the CUDA kernels take float32, float16 or bfloat16, got "
                        f"{t.dtype}") from None


def _launch(kernel: str, rows: int, args, device: torch.device) -> None:
    """One warp per row (node), grid-stride."""
    if rows == 0:
        return
    blocks = min(math.ceil(rows / WARPS_PER_BLOCK), loader.max_blocks(device))
    loader.module("stages", device).get_function(kernel)((blocks,), (THREADS,), args)


def row_dot(a: Tensor, b: Tensor, g: GraphArrays, scale: float) -> Tensor:
    """``out[e, h] = scale * a[dst_e, h] . b[src_e, h // G]`` -> ``[E, H]`` (a's dtype)."""
    R, H, D = a.shape
    Hk = b.size(1)
    _check_arrays(g, a.device)
    expect("a", a, (g.num_dst, H, D), a.dtype, a.device)
    expect("b", b, (g.num_src, Hk, D), a.dtype, a.device)
    if Hk == 0 or H % Hk:
        raise ValueError(f"heads ({H}) must be a multiple of kv heads ({Hk})")
    out = loader.poison(a.new_empty(g.num_edges, H))
    _launch(f"row_dot<{kernel_dtype(a)}, {lanes(D)}>", R,
            (a, b, g.ptr, g.col, out, np.int64(R), np.int32(H), np.int32(H // Hk),
             np.int32(D), np.float32(scale)), a.device)
    return out


def row_gather(w: Tensor, x: Tensor, g: GraphArrays, scale: float) -> Tensor:
    """``out[i, h] = scale * sum_{e into i} w[e, h] x[src_e, h // G]`` -> ``[N_dst, H, C]``;
    queries without edges get 0."""
    H = w.size(1)
    S, Hk, C = x.shape
    _check_arrays(g, x.device)
    expect("w", w, (g.num_edges, H), x.dtype, x.device)
    expect("x", x, (g.num_src, Hk, C), x.dtype, x.device)
    if Hk == 0 or H % Hk:
        raise ValueError(f"heads ({H}) must be a multiple of kv heads ({Hk})")
    out = loader.poison(x.new_empty(g.num_dst, H, C))
    _launch(f"row_gather<{kernel_dtype(x)}, {lanes(C)}>", g.num_dst,
            (w, x, g.ptr, g.col, out, np.int64(g.num_dst), np.int32(H), np.int32(H // Hk),
             np.int32(C), np.float32(scale)), x.device)
    return out


def col_gather(w: Tensor, y: Tensor, g: GraphArrays, kv_heads: int, scale: float) -> Tensor:
    """``out[j, hk] = scale * sum_{e out of j} sum_g w[e, hk G + g] y[dst_e, hk G + g]``
    -> ``[N_src, H_kv, C]``; keys without edges get 0."""
    R, H, C = y.shape
    _check_arrays(g, y.device)
    expect("w", w, (g.num_edges, H), y.dtype, y.device)
    expect("y", y, (g.num_dst, H, C), y.dtype, y.device)
    if kv_heads == 0 or H % kv_heads:
        raise ValueError(f"heads ({H}) must be a multiple of kv heads ({kv_heads})")
    out = loader.poison(y.new_empty(g.num_src, kv_heads, C))
    _launch(f"col_gather<{kernel_dtype(y)}, {lanes(C)}>", g.num_src,
            (w, y, g.kptr, g.krow, g.perm, out, np.int64(g.num_src), np.int32(H),
             np.int32(H // kv_heads), np.int32(C), np.float32(scale)), y.device)
    return out


def row_softmax(s: Tensor, g: GraphArrays, *, with_lse: bool = False
                ) -> Tuple[Tensor, Optional[Tensor]]:
    """Softmax of ``s [E, H]`` over each query's edges -> ``(p [E, H], lse [N_dst, H] or
    None)``; ``lse`` is float32, ``-inf`` for a query without edges."""
    H = s.size(1)
    _check_arrays(g, s.device)
    expect("s", s, (g.num_edges, H), s.dtype, s.device)
    p = loader.poison(torch.empty_like(s))
    lse = (loader.poison(torch.empty(g.num_dst, H, dtype=torch.float32, device=s.device)) if with_lse
           else None)
    _launch(f"row_softmax<{kernel_dtype(s)}>", g.num_dst,
            (s, g.ptr, p, lse, np.int64(g.num_dst), np.int32(H)), s.device)
    return p, lse


def row_softmax_bwd(p: Tensor, dp: Tensor, g: GraphArrays) -> Tensor:
    """``ds = p * (dp - sum_row p * dp)`` -> ``[E, H]``."""
    H = p.size(1)
    _check_arrays(g, p.device)
    expect("p", p, (g.num_edges, H), p.dtype, p.device)
    expect("dp", dp, (g.num_edges, H), p.dtype, p.device)
    ds = loader.poison(torch.empty_like(p))
    _launch(f"row_softmax_bwd<{kernel_dtype(p)}>", g.num_dst,
            (p, dp, g.ptr, ds, np.int64(g.num_dst), np.int32(H)), p.device)
    return ds


# ---------------------------------------------------------------------------- autograd
# Each stage is a torch.library custom op with a fake (shape) implementation and autograd,
# so torch.compile sees one opaque node per stage; each backward is an op too and runs the
# other kernels (no atomics, so gradients are deterministic). A graph enters as its
# (ptr, src, dst) tensors, which find the graph and its cached arrays again (graph_of).

def _arrays(ptr: Tensor, src: Tensor, dst: Tensor, num_src: int) -> GraphArrays:
    return graph_arrays(graph_of(ptr, src, dst, num_src, ptr.numel() - 1))


def _none(t: Tensor) -> Tensor:
    return t.new_empty(0)


@torch.library.custom_op("attngraph::edge_scores", mutates_args=())
def _scores_op(q: Tensor, k: Tensor, ptr: Tensor, src: Tensor, dst: Tensor, num_src: int,
               scale: float) -> Tensor:
    return row_dot(q, k, _arrays(ptr, src, dst, num_src), scale)


@_scores_op.register_fake
def _(q, k, ptr, src, *rest):
    return q.new_empty(src.size(0), q.size(1))


@torch.library.custom_op("attngraph::edge_scores_backward", mutates_args=())
def _scores_bwd_op(ds: Tensor, q: Tensor, k: Tensor, ptr: Tensor, src: Tensor, dst: Tensor,
                   num_src: int, scale: float, need_dq: bool, need_dk: bool
                   ) -> Tuple[Tensor, Tensor]:
    a = _arrays(ptr, src, dst, num_src)
    dq = row_gather(ds, k, a, scale) if need_dq else _none(q)
    dk = col_gather(ds, q, a, k.size(1), scale) if need_dk else _none(k)
    return dq, dk


@_scores_bwd_op.register_fake
def _(ds, q, k, ptr, src, dst, num_src, scale, need_dq, need_dk):
    return (torch.empty_like(q) if need_dq else _none(q),
            torch.empty_like(k) if need_dk else _none(k))


def _scores_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:5])
    ctx.num_src, ctx.scale = inputs[5:]


def _scores_backward(ctx, ds):
    q, k, ptr, src, dst = ctx.saved_tensors
    need_dq, need_dk = ctx.needs_input_grad[:2]
    dq, dk = _scores_bwd_op(ds.contiguous(), q, k, ptr, src, dst, ctx.num_src, ctx.scale,
                            need_dq, need_dk)
    return (dq if need_dq else None, dk if need_dk else None) + (None,) * 5


_scores_op.register_autograd(_scores_backward, setup_context=_scores_setup)


@torch.library.custom_op("attngraph::edge_softmax", mutates_args=())
def _softmax_op(s: Tensor, ptr: Tensor, src: Tensor, dst: Tensor, num_src: int) -> Tensor:
    return row_softmax(s, _arrays(ptr, src, dst, num_src))[0]


@_softmax_op.register_fake
def _(s, *rest):
    return torch.empty_like(s)


@torch.library.custom_op("attngraph::edge_softmax_backward", mutates_args=())
def _softmax_bwd_op(p: Tensor, dp: Tensor, ptr: Tensor, src: Tensor, dst: Tensor,
                    num_src: int) -> Tensor:
    return row_softmax_bwd(p, dp, _arrays(ptr, src, dst, num_src))


@_softmax_bwd_op.register_fake
def _(p, *rest):
    return torch.empty_like(p)


def _softmax_setup(ctx, inputs, output):
    ctx.save_for_backward(output, *inputs[1:4])
    ctx.num_src = inputs[4]


def _softmax_backward(ctx, dp):
    p, ptr, src, dst = ctx.saved_tensors
    return (_softmax_bwd_op(p, dp.contiguous(), ptr, src, dst, ctx.num_src),) + (None,) * 4


_softmax_op.register_autograd(_softmax_backward, setup_context=_softmax_setup)


@torch.library.custom_op("attngraph::aggregate", mutates_args=())
def _aggregate_op(p: Tensor, v: Tensor, ptr: Tensor, src: Tensor, dst: Tensor,
                  num_src: int) -> Tensor:
    return row_gather(p, v, _arrays(ptr, src, dst, num_src), 1.0)


@_aggregate_op.register_fake
def _(p, v, ptr, *rest):
    return v.new_empty(ptr.size(0) - 1, p.size(1), v.size(2))


@torch.library.custom_op("attngraph::aggregate_backward", mutates_args=())
def _aggregate_bwd_op(dout: Tensor, p: Tensor, v: Tensor, ptr: Tensor, src: Tensor,
                      dst: Tensor, num_src: int, need_dp: bool, need_dv: bool
                      ) -> Tuple[Tensor, Tensor]:
    a = _arrays(ptr, src, dst, num_src)
    dp = row_dot(dout, v, a, 1.0) if need_dp else _none(p)
    dv = col_gather(p, dout, a, v.size(1), 1.0) if need_dv else _none(v)
    return dp, dv


@_aggregate_bwd_op.register_fake
def _(dout, p, v, ptr, src, dst, num_src, need_dp, need_dv):
    return (torch.empty_like(p) if need_dp else _none(p),
            torch.empty_like(v) if need_dv else _none(v))


def _aggregate_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:5])
    ctx.num_src = inputs[5]


def _aggregate_backward(ctx, dout):
    p, v, ptr, src, dst = ctx.saved_tensors
    need_dp, need_dv = ctx.needs_input_grad[:2]
    dp, dv = _aggregate_bwd_op(dout.contiguous(), p, v, ptr, src, dst, ctx.num_src, need_dp,
                               need_dv)
    return (dp if need_dp else None, dv if need_dv else None) + (None,) * 4


_aggregate_op.register_autograd(_aggregate_backward, setup_context=_aggregate_setup)


# ---------------------------------------------------------------------------- entry points
def _graph(graph: TokenGraph) -> Tuple[Tensor, Tensor, Tensor, int]:
    return graph.ptr, graph.src, graph.dst, graph.num_src


def edge_scores(q: Tensor, k: Tensor, graph: TokenGraph, scale: float) -> Tensor:
    return _scores_op(q.contiguous(), k.contiguous(), *_graph(graph), float(scale))


def edge_softmax(scores: Tensor, graph: TokenGraph) -> Tensor:
    return _softmax_op(scores.contiguous(), *_graph(graph))


def aggregate(p: Tensor, v: Tensor, graph: TokenGraph) -> Tensor:
    return _aggregate_op(p.contiguous(), v.contiguous(), *_graph(graph))
