"""The torch backend: graph attention in bounded memory, on any device torch supports.

Query rows are processed in chunks of about ``max_chunk_elements / (H * D)`` edges, so the
forward and the backward hold ``O(N * H * D)`` plus one chunk of per-edge work — never the
whole ``[E, H, D]`` gather that an unfused implementation (PyG's ``TransformerConv``) keeps
alive for autograd. The backward recomputes each chunk's probabilities from the saved
log-sum-exp, as FlashAttention does.

Inputs here are already node-major and grouped: ``q [N_dst, H, D]``, ``k [N_src, H_kv, D]``,
``v [N_src, H_kv, D_v]``; ``bias`` is ``None``, ``[E, 1]`` or ``[E, H]`` (batched inputs are
folded into heads by :mod:`attngraph.ops.functional`, so ``bias`` may broadcast over a batch
factor ``B = H // bias_heads`` laid out batch-major).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from attngraph import chunks as sizes
from attngraph.checks import check_bias_values
from attngraph.chunks import row_chunks
from attngraph.graph import TokenGraph, graph_of
from attngraph.implicit import implicit_of
from attngraph.ops.numerics import backward_preamble, compute_dtype
from attngraph.ops.record import running
from attngraph.ops.segment import segment_max, segment_sum

__all__ = ["attention", "row_chunks", "MAX_CHUNK_ELEMENTS"]

# Per-edge elements materialised at once (read from attngraph.chunks at call time).
MAX_CHUNK_ELEMENTS = sizes.MAX_CHUNK_ELEMENTS


class _Chunk:
    """Index data of one chunk of query rows ``[r0, r1)``: edges ``[e0, e1)``."""

    __slots__ = ("r0", "r1", "e0", "e1", "ptr", "dst", "src")

    def __init__(self, graph: TokenGraph, r0: int, r1: int, ptr_host: Tensor):
        self.r0, self.r1 = r0, r1
        self.e0, self.e1 = int(ptr_host[r0]), int(ptr_host[r1])
        self.ptr = graph.ptr[r0:r1 + 1] - self.e0
        self.dst = graph.dst[self.e0:self.e1] - r0
        self.src = graph.src[self.e0:self.e1]


def _generated_chunks(graph, max_edges: int):
    """Row chunks of an implicit graph, their edges generated one chunk at a time."""
    for r0, r1, e0, ptr, src in graph.edge_chunks(max_edges):
        c = _Chunk.__new__(_Chunk)
        c.r0, c.r1, c.e0, c.e1 = r0, r1, e0, e0 + src.numel()
        c.ptr, c.src = ptr, src
        c.dst = torch.repeat_interleave(torch.arange(r1 - r0, device=src.device), ptr.diff(),
                                        output_size=src.numel())
        yield c


def _chunks(graph: TokenGraph, heads: int, dim: int, max_elements: int) -> List[_Chunk]:
    """The graph's row chunks for this chunk size, planned once per graph and size (the
    plan copies ``ptr`` to the host, a device sync on a GPU); an implicit graph's are
    generated on the fly, never kept."""
    max_edges = max(1, max_elements // max(1, heads * dim))
    if graph.is_implicit:
        return _generated_chunks(graph, max_edges)
    cache = graph.caches.chunks
    chunks = cache.get(max_edges)
    if chunks is None:
        ptr_host = graph.ptr.cpu()
        chunks = [_Chunk(graph, r0, r1, ptr_host) for r0, r1 in row_chunks(ptr_host, max_edges)]
        cache[max_edges] = chunks
    return chunks


def _bias_chunk(bias: Optional[Tensor], c: _Chunk, heads: int) -> Optional[Tensor]:
    if bias is None:
        return None
    b = bias[c.e0:c.e1]
    return b if b.size(1) in (1, heads) else b.repeat(1, heads // b.size(1))


def _scores(q: Tensor, k: Tensor, c: _Chunk, scale: float, bias: Optional[Tensor]) -> Tensor:
    """Scores of the chunk's edges, ``[E_c, H]``, in the compute dtype."""
    H, H_kv = q.size(1), k.size(1)
    qe = q[c.r0:c.r1].index_select(0, c.dst).view(-1, H_kv, H // H_kv, q.size(-1))
    ke = k.index_select(0, c.src).unsqueeze(-1)                   # [E_c, H_kv, D, 1]
    s = torch.matmul(qe, ke).view(-1, H) * scale                  # [E_c, H]
    b = _bias_chunk(bias, c, H)
    return s if b is None else s + b


def _weighted_sum(w: Tensor, x: Tensor, index: Tensor, H: int) -> Tensor:
    """Per edge ``w [E_c, H] * x[index] [E_c, H_kv, C]`` -> ``[E_c, H, C]`` (GQA-grouped)."""
    H_kv = x.size(1)
    xe = x.index_select(0, index).unsqueeze(2)                     # [E_c, H_kv, 1, C]
    return (w.view(-1, H_kv, H // H_kv, 1) * xe).view(-1, H, x.size(-1))


def _forward(q, k, v, graph, scale, bias, max_elements):
    H = q.size(1)
    out = q.new_zeros(q.size(0), H, v.size(-1))
    lse = q.new_full((q.size(0), H), float("-inf"))
    for c in _chunks(graph, H, max(q.size(-1), v.size(-1)), max_elements):
        if c.e1 == c.e0:
            continue
        s = _scores(q, k, c, scale, bias)
        m = segment_max(s, c.ptr, c.dst)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        p = torch.exp(s - m.index_select(0, c.dst))
        total = segment_sum(p, c.ptr, c.dst)                      # [R_c, H]
        acc = segment_sum(_weighted_sum(p, v, c.src, H), c.ptr, c.dst)
        out[c.r0:c.r1] = acc / total.clamp_min(torch.finfo(total.dtype).tiny).unsqueeze(-1)
        lse[c.r0:c.r1] = torch.log(total) + m                     # log 0 = -inf for empty rows
    return out, lse


def _add_rows(out: Tensor, index: Tensor, x: Tensor) -> None:
    """``out[index] += x`` over the first dim. On 2-D views: torch's CPU ``index_add_`` is
    ~20x slower on a 3-D destination (its cost then grows with the whole destination)."""
    out.view(out.size(0), -1).index_add_(0, index, x.reshape(x.size(0), -1))


def _sum_group(w: Tensor, x: Tensor) -> Tensor:
    """``sum_g w[e, h, g] * x[e, h, g, :]`` -> ``[E_c, H_kv, C]`` (the GQA group sum)."""
    if x.size(2) == 1:
        return w.view(w.size(0), x.size(1), 1) * x.squeeze(2)
    return (w.view(w.size(0), x.size(1), x.size(2), 1) * x).sum(2)


def _backward(q, k, v, out, lse, dout, graph, scale, bias, max_elements, need_bias_grad,
              dlse=None):
    H, H_kv = q.size(1), k.size(1)
    G, D, D_v = H // H_kv, q.size(-1), v.size(-1)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    dbias = bias.new_zeros(bias.shape) if need_bias_grad else None
    delta, lse, _ = backward_preamble(out, dout, lse, dlse)          # delta [N_dst, H]
    for c in _chunks(graph, H, max(D, D_v), max_elements):
        if c.e1 == c.e0:
            continue
        # Each operand is gathered once per chunk and reused by every product below.
        qe = q[c.r0:c.r1].index_select(0, c.dst).view(-1, H_kv, G, D)
        ke = k.index_select(0, c.src).unsqueeze(2)                 # [E_c, H_kv, 1, D]
        do_e = dout[c.r0:c.r1].index_select(0, c.dst).view(-1, H_kv, G, D_v)
        ve = v.index_select(0, c.src).unsqueeze(-1)                # [E_c, H_kv, D_v, 1]
        s = torch.matmul(qe, ke.transpose(-1, -2)).view(-1, H) * scale
        b = _bias_chunk(bias, c, H)
        if b is not None:
            s = s + b
        p = torch.exp(s - lse[c.r0:c.r1].index_select(0, c.dst))   # [E_c, H]
        dp = torch.matmul(do_e, ve).view(-1, H)
        ds = p * (dp - delta[c.r0:c.r1].index_select(0, c.dst))    # [E_c, H]
        if dbias is not None:
            nb = bias.size(1)
            dbias[c.e0:c.e1] = ds.view(ds.size(0), -1, nb).sum(1) if nb != H else ds
        dq[c.r0:c.r1] += segment_sum((ds.view(-1, H_kv, G, 1) * ke).view(-1, H, D),
                                     c.ptr, c.dst) * scale
        _add_rows(dk, c.src, _sum_group(ds, qe) * scale)
        _add_rows(dv, c.src, _sum_group(p, do_e))
    return dq, dk, dv, dbias


# ---------------------------------------------------------------------------- the custom op
# A torch.library custom op with a fake (shape) implementation and autograd, so that
# torch.compile sees one opaque node: the host-side chunk planning (a ``ptr`` copy to the
# host) and torch_scatter's kernels, which have no fake kernels, stay inside it. The graph
# enters as its (ptr, src, dst) tensors, which find the graph and its caches again.


# torch's on-disk AOT-autograd cache keys a compiled backward on the forward graph, not on
# the backward formula: a change to a backward op's schema must come with a change to the
# forward op's schema (or name), or graphs cached by an older version call the new op wrongly.
@torch.library.custom_op("attngraph::chunked_attention", mutates_args=())
def _attention_op(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], ptr: Tensor,
                  src: Tensor, dst: Tensor, num_src: int, scale: float, max_elements: int,
                  check_bias: bool) -> Tuple[Tensor, Tensor]:
    if check_bias and bias is not None:    # graph_attention could not check while traced
        check_bias_values(bias)
    graph = graph_of(ptr, src, dst, num_src, ptr.numel() - 1)
    with running("torch"):
        return _forward(q, k, v, graph, scale, bias, max_elements)


@_attention_op.register_fake
def _(q, k, v, bias, *rest):
    return q.new_empty(q.size(0), q.size(1), v.size(2)), q.new_empty(q.size(0), q.size(1))


@torch.library.custom_op("attngraph::chunked_attention_backward", mutates_args=())
def _attention_backward_op(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor],
                           out: Tensor, lse: Tensor, dout: Tensor, dlse: Optional[Tensor],
                           ptr: Tensor, src: Tensor, dst: Tensor, num_src: int, scale: float,
                           max_elements: int, bias_grad: bool
                           ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    graph = graph_of(ptr, src, dst, num_src, ptr.numel() - 1)
    dq, dk, dv, dbias = _backward(q, k, v, out, lse, dout.contiguous(), graph, scale, bias,
                                  max_elements, bias_grad, dlse)
    return dq, dk, dv, (dbias if dbias is not None else q.new_empty(0))


@_attention_backward_op.register_fake
def _(q, k, v, bias, out, lse, dout, *rest):
    bias_grad = rest[-1]
    dbias = torch.empty_like(bias) if bias_grad and bias is not None else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dbias


def _setup_context(ctx, inputs, output):
    q, k, v, bias, ptr, src, dst = inputs[:7]
    ctx.num_src, ctx.scale, ctx.max_elements = inputs[7:10]
    out, lse = output
    ctx.save_for_backward(q, k, v, bias, out, lse, ptr, src, dst)
    ctx.has_bias = bias is not None


def _backward_formula(ctx, dout, dlse):
    q, k, v, bias, out, lse, ptr, src, dst = ctx.saved_tensors
    bias_grad = ctx.has_bias and ctx.needs_input_grad[3]
    dq, dk, dv, dbias = _attention_backward_op(q, k, v, bias, out, lse, dout.contiguous(),
                                               dlse, ptr, src, dst, ctx.num_src, ctx.scale,
                                               ctx.max_elements, bias_grad)
    return (dq, dk, dv, dbias if bias_grad else None) + (None,) * 7


_attention_op.register_autograd(_backward_formula, setup_context=_setup_context)


# The same passes over an implicit graph, whose chunks exist one at a time: the graph
# enters as its ImplicitGraph.key, which finds it again (implicit_of).
@torch.library.custom_op("attngraph::chunked_attention_implicit", mutates_args=())
def _implicit_op(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], key: Tensor,
                 scale: float, max_elements: int, check_bias: bool) -> Tuple[Tensor, Tensor]:
    if check_bias and bias is not None:    # graph_attention could not check while traced
        check_bias_values(bias)
    with running("torch"):
        return _forward(q, k, v, implicit_of(key), scale, bias, max_elements)


@_implicit_op.register_fake
def _(q, k, v, bias, *rest):
    return q.new_empty(q.size(0), q.size(1), v.size(2)), q.new_empty(q.size(0), q.size(1))


@torch.library.custom_op("attngraph::chunked_attention_implicit_backward", mutates_args=())
def _implicit_backward_op(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor],
                          out: Tensor, lse: Tensor, dout: Tensor, dlse: Optional[Tensor],
                          key: Tensor, scale: float, max_elements: int, bias_grad: bool
                          ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    dq, dk, dv, dbias = _backward(q, k, v, out, lse, dout.contiguous(), implicit_of(key),
                                  scale, bias, max_elements, bias_grad, dlse)
    return dq, dk, dv, (dbias if dbias is not None else q.new_empty(0))


@_implicit_backward_op.register_fake
def _(q, k, v, bias, out, lse, dout, *rest):
    bias_grad = rest[-1]
    dbias = torch.empty_like(bias) if bias_grad and bias is not None else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dbias


def _implicit_setup_context(ctx, inputs, output):
    q, k, v, bias, key = inputs[:5]
    ctx.scale, ctx.max_elements = inputs[5:7]
    out, lse = output
    ctx.save_for_backward(q, k, v, bias, out, lse, key)
    ctx.has_bias = bias is not None


def _implicit_backward_formula(ctx, dout, dlse):
    q, k, v, bias, out, lse, key = ctx.saved_tensors
    bias_grad = ctx.has_bias and ctx.needs_input_grad[3]
    dq, dk, dv, dbias = _implicit_backward_op(q, k, v, bias, out, lse, dout.contiguous(),
                                              dlse, key, ctx.scale, ctx.max_elements,
                                              bias_grad)
    return (dq, dk, dv, dbias if bias_grad else None) + (None,) * 4


_implicit_op.register_autograd(_implicit_backward_formula,
                               setup_context=_implicit_setup_context)


def attention(q: Tensor, k: Tensor, v: Tensor, graph: TokenGraph, scale: float,
              bias: Optional[Tensor] = None, *, max_chunk_elements: Optional[int] = None
              ) -> Tuple[Tensor, Tensor]:
    """Graph attention on grouped node-major inputs -> ``(out, lse)``.

    Computes in float32 (float64 for float64 inputs); returns ``out`` in the input dtype and
    ``lse`` in the compute dtype. Inputs must already be validated. ``max_chunk_elements``
    (default ``MAX_CHUNK_ELEMENTS``) bounds the per-edge elements held at once. Differentiable
    in q, k, v and bias (the ``attngraph::chunked_attention`` op; for an implicit graph
    ``attngraph::chunked_attention_implicit``).
    """
    if max_chunk_elements is None:
        max_chunk_elements = sizes.MAX_CHUNK_ELEMENTS
    dtype = q.dtype
    cdt = compute_dtype(dtype)
    q, k, v = (t.to(cdt).contiguous() for t in (q, k, v))
    if bias is not None:
        bias = bias.to(cdt).contiguous()
    if graph.is_implicit:
        out, lse = _implicit_op(q, k, v, bias, graph.key, float(scale),
                                int(max_chunk_elements), torch.compiler.is_compiling())
        return out.to(dtype), lse
    # traced by torch.compile, graph_attention skipped the data-dependent bias check: the op
    # makes it when it runs
    out, lse = _attention_op(q, k, v, bias, graph.ptr, graph.src, graph.dst, graph.num_src,
                             float(scale), int(max_chunk_elements),
                             torch.compiler.is_compiling())
    return out.to(dtype), lse
