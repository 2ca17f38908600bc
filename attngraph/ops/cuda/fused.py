"""Fused graph attention on the kernels of ``attention.cu``: work items, launchers, autograd.

The forward is one pass per (work item, head group) with an online softmax; no per-edge
tensor exists in memory. The backward recomputes ``p = exp(s - lse)`` per edge: ``dQ`` (and
``d edge_bias``) over the CSR rows, ``dK`` / ``dV`` over the CSC of keys. Rows or key columns
longer than a chunk are cut into several work items whose partial results a second kernel
merges in a fixed order, so no row serialises a launch and two runs give bitwise-equal
gradients.

Shapes: ``q [N_dst, H, D]``, ``k [N_src, H_kv, D]``, ``v [N_src, H_kv, D_v]`` (grouped,
node-major; a batch is folded into heads by :mod:`attngraph.ops.functional`), ``bias``
``None`` or ``[E, b]`` with ``H % b == 0`` (head ``h`` reads column ``h % b``). Returns
``out [N_dst, H, D_v]`` in the input dtype and ``lse [N_dst, H]`` float32.
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
from attngraph.ops.numerics import backward_preamble
from attngraph.ops.record import running
from attngraph.checks import check_bias_values
from attngraph.ops.cuda.stages import GraphArrays, expect, graph_arrays, kernel_dtype, lanes
from attngraph.runs import Range

__all__ = ["WorkItems", "Plan", "plan", "work_items", "chunk_size", "RuleItems", "rule_items",
           "attention", "forward", "backward"]

WARPS_PER_BLOCK = 4          # kWarps in attention.cu
THREADS = WARPS_PER_BLOCK * 32
MIN_CHUNK = 64


@dataclass(frozen=True)
class WorkItems:
    """Rows cut into work items (of at most :func:`chunk_size` edges).

    ``items`` int64 ``[n_items, 4]``: (node, first edge, end edge, slot), longest first; slot
    is -1 when the item is its node's whole row, else the index of its partial result. ``splits`` int64
    ``[n_split, 3]``: (node, first slot, end slot) of every cut row. Every node has at least
    one item (an empty row's item writes zeros and ``lse = -inf``).
    """

    items: Tensor
    splits: Tensor
    num_slots: int

    @property
    def num_items(self) -> int:
        return self.items.size(0)


def chunk_size(num_edges: int, num_rows: int) -> int:
    """Edges per work item: 1.25x the mean degree (at least 64), a multiple of 32, so rows of
    ordinary degree stay whole and only outliers are cut, into pieces no warp waits long on
    even when a GPU gives each warp a single item."""
    mean = num_edges / max(num_rows, 1)
    return max(MIN_CHUNK, 32 * math.ceil(1.25 * mean / 32))


def work_items(ptr: Tensor, chunk: int) -> WorkItems:
    """Cut the rows of a CSR with offsets ``ptr [R + 1]`` into items of <= ``chunk`` edges."""
    R = ptr.numel() - 1
    dev = ptr.device
    deg = ptr.diff()
    n_chunks = ((deg + chunk - 1) // chunk).clamp_min(1)
    node = torch.repeat_interleave(torch.arange(R, device=dev), n_chunks)
    first = torch.cumsum(n_chunks, 0) - n_chunks
    part = torch.arange(node.numel(), device=dev) - first[node]
    begin = ptr[node] + part * chunk
    end = torch.minimum(begin + chunk, ptr[node + 1])
    cut = n_chunks[node] > 1
    slot = torch.where(cut, torch.cumsum(cut.long(), 0) - 1, torch.full_like(node, -1))
    # Longest items first (stable: rows stay in order within a size): warps walk items
    # grid-stride, so the heavy pieces of cut rows land on different warps.
    order = torch.argsort(begin - end, stable=True)
    items = torch.stack([node, begin, end, slot], 1)[order].contiguous()
    rows = torch.nonzero(n_chunks > 1).flatten()
    slot0 = slot[first[rows]]
    splits = torch.stack([rows, slot0, slot0 + n_chunks[rows]], 1).contiguous()
    return WorkItems(items, splits, int(cut.sum()))


@dataclass(frozen=True)
class Plan:
    """Everything the fused kernels read about a graph: its index arrays and the work items
    of its rows (CSR, forward and dQ) and of its key columns (CSC, dK / dV)."""

    arrays: GraphArrays
    rows: WorkItems
    cols: WorkItems


def plan(graph: TokenGraph) -> Plan:
    """The graph's :class:`Plan`, built once and cached on the graph."""
    cached = graph.caches.cuda.get("cuda_plan")
    if cached is None:
        a = graph_arrays(graph)
        cached = Plan(a, work_items(a.ptr, chunk_size(a.num_edges, a.num_dst)),
                      work_items(a.kptr, chunk_size(a.num_edges, a.num_src)))
        graph.caches.cuda["cuda_plan"] = cached
    return cached


def _check_items(w: WorkItems, rows: int, device: torch.device) -> None:
    expect("items", w.items, (w.num_items, 4), torch.int64, device)
    expect("splits", w.splits, (w.splits.size(0), 3), torch.int64, device)
    if w.num_items < rows:
        raise ValueError(f"work items cover {w.num_items} < {rows} rows")


def _grid(n: int, heads: int, device: torch.device) -> Tuple[int, int]:
    if heads > 65535:
        raise ValueError(f"the fused kernels take at most 65535 head groups, got {heads}")
    return (max(1, min(math.ceil(n / WARPS_PER_BLOCK), loader.max_blocks(device))), heads)


def _kernel(name: str, device: torch.device):
    return loader.module("attention", device).get_function(name)


def _bias_arg(bias: Optional[Tensor], E: int, H: int, device) -> Tuple[Optional[Tensor], int]:
    if bias is None:
        return None, 1
    expect("bias", bias, (E, bias.size(1)), torch.float32, device)
    if bias.size(1) == 0 or H % bias.size(1):
        raise ValueError(f"bias columns ({bias.size(1)}) must divide the heads ({H})")
    return bias, bias.size(1)


def _check_qkv(q: Tensor, k: Tensor, v: Tensor, a: GraphArrays) -> Tuple[int, int, int, int, int]:
    R, H, D = q.shape
    Hk, Dv = k.size(1), v.size(2)
    expect("q", q, (a.num_dst, H, D), q.dtype, q.device)
    expect("k", k, (a.num_src, Hk, D), q.dtype, q.device)
    expect("v", v, (a.num_src, Hk, Dv), q.dtype, q.device)
    if Hk == 0 or H % Hk:
        raise ValueError(f"heads ({H}) must be a multiple of kv heads ({Hk})")
    kernel_dtype(q)
    return R, H, Hk, D, Dv


def _aligned(*ts: Tensor) -> bool:
    """Every tensor starts on a 16-byte boundary (rows then do too when they are whole
    16-byte vectors)."""
    return all(t.numel() == 0 or t.data_ptr() % 16 == 0 for t in ts)


def forward(q: Tensor, k: Tensor, v: Tensor, p: Plan, scale: float,
            bias: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """The fused forward (no autograd) -> ``(out, lse)``."""
    a = p.arrays
    _check_qkv(q, k, v, a)
    bias, bc = _bias_arg(bias, a.num_edges, q.size(1), q.device)
    return _forward_items(q, k, v, p.rows, a.col, None, scale, bias, bc)


def _forward_items(q, k, v, w: WorkItems, col: Tensor, rule: Optional[Tensor], scale: float,
                   bias: Optional[Tensor], bc: int) -> Tuple[Tensor, Tensor]:
    """The forward over work items whose keys are ``col`` (edges of a CSR) or, with
    ``rule [n_items, 2]``, computed from each item's run (:func:`rule_items`)."""
    R, H, D = q.shape
    Hk, Dv = k.size(1), v.size(2)
    dev = q.device
    _check_items(w, R, dev)
    nt = lanes(max(D, Dv))
    gq = loader.group_heads(H // Hk, nt)
    T = kernel_dtype(q)
    out = loader.poison(q.new_empty(R, H, Dv))
    lse = loader.poison(torch.empty(R, H, dtype=torch.float32, device=dev))
    part_ml = loader.poison(torch.empty(w.num_slots, H, 2, dtype=torch.float32, device=dev))
    part_acc = loader.poison(torch.empty(w.num_slots, H, Dv, dtype=torch.float32, device=dev))
    vec = loader.vec_layout(T, D, Dv, H // Hk) if _aligned(q, k, v) else None
    if vec is not None:    # whole 16-byte vectors per lane, several edges per warp step
        lpe, gq = vec
        name = f"attn_fwd_vec<{T}, {lpe}, {gq}>"
    else:
        name = f"attn_fwd<{T}, {nt}, {gq}>"
    if R and H:
        _kernel(name, dev)(
            _grid(w.num_items, H // gq, dev), (THREADS,),
            (q, k, v, bias, np.int32(bc), w.items, np.int64(w.num_items), col, rule, out, lse,
             part_ml, part_acc, np.int32(H), np.int32(H // Hk), np.int32(D), np.int32(Dv),
             np.float32(scale)))
    if w.splits.size(0) and H:
        _kernel(f"attn_fwd_merge<{T}, {nt}>", dev)(
            _grid(w.splits.size(0), 1, dev), (THREADS,),
            (w.splits, np.int64(w.splits.size(0)), part_ml, part_acc, out, lse, np.int32(H),
             np.int32(Dv)))
    return out, lse


def _sum_partials(w: WorkItems, part: Tensor, out: Tensor) -> None:
    if not w.splits.size(0) or not out.numel():
        return
    heads, C = out.size(1), out.size(2)
    expect("part", part, (w.num_slots, heads, C), torch.float32, out.device)
    _kernel(f"sum_partials<{kernel_dtype(out)}, {lanes(C)}>", out.device)(
        _grid(w.splits.size(0), 1, out.device), (THREADS,),
        (w.splits, np.int64(w.splits.size(0)), part, out, np.int32(heads), np.int32(C)))


def backward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Tensor,
             p: Plan, scale: float, bias: Optional[Tensor], need_bias_grad: bool,
             dlse: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """``(dq, dk, dv, dbias)``; deterministic (no atomics). ``dlse``: a gradient of the
    log-sum-exp, which enters as ``ds = p * (dp - (delta - dlse))``."""
    a = p.arrays
    R, H, Hk, D, Dv = _check_qkv(q, k, v, a)
    dev = q.device
    expect("dout", dout, (R, H, Dv), q.dtype, dev)
    expect("lse", lse, (R, H), torch.float32, dev)
    bias, bc = _bias_arg(bias, a.num_edges, H, dev)
    delta = _delta(out, dout, lse, dlse)
    _check_items(p.cols, a.num_src, dev)
    # every (edge, head) is written by the dQ kernel (each edge lies in exactly one item)
    ds = (loader.poison(torch.empty(a.num_edges, H, dtype=torch.float32, device=dev))
          if need_bias_grad else None)
    dq = _backward_dq(q, k, v, dout, lse, delta, p.rows, a.col, None, scale, bias, bc, ds)
    dk, dv = _backward_dkdv(q, k, v, dout, lse, delta, p, scale, bias, bc)
    dbias = None
    if ds is not None:   # head h = b * bc + c reads column c: sum over the b copies
        dbias = ds.view(a.num_edges, H // bc, bc).sum(1)
    return dq, dk, dv, dbias


def _delta(out: Tensor, dout: Tensor, lse: Tensor, dlse: Optional[Tensor]) -> Tensor:
    """``delta [R, H]`` float32 of the backward: ``rowsum(dout * out)``, less ``dlse``
    (where the row has edges)."""
    delta, _, _ = backward_preamble(out, dout, lse, dlse, dtype=torch.float32)
    return delta.contiguous()


def _backward_kernels(q, k, v, dout) -> Tuple[str, str, int]:
    """``(dQ kernel, dK/dV kernel, GQ)`` for these inputs."""
    D, Dv, G = q.size(-1), v.size(-1), q.size(1) // k.size(1)
    T = kernel_dtype(q)
    vec = loader.vec_layout(T, D, Dv, G, "dq") if _aligned(q, k, v, dout) else None
    if vec is not None:
        lpe, gq = vec
        return f"attn_bwd_dq_vec<{T}, {lpe}, {gq}>", f"attn_bwd_dkdv_vec<{T}, {lpe}>", gq
    nt = lanes(max(D, Dv))
    gq = loader.group_heads(G, nt, "dq")
    return f"attn_bwd_dq<{T}, {nt}, {gq}>", f"attn_bwd_dkdv<{T}, {nt}>", gq


def _backward_dq(q, k, v, dout, lse, delta, rows: WorkItems, col: Tensor,
                 rule: Optional[Tensor], scale: float, bias, bc: int,
                 ds: Optional[Tensor]) -> Tensor:
    """dQ over work items (keys from ``col`` or, with ``rule``, from the items' runs)."""
    R, H, D = q.shape
    Hk = k.size(1)
    dev = q.device
    _check_items(rows, R, dev)
    dq_name, _, gq = _backward_kernels(q, k, v, dout)
    dq = loader.poison(torch.empty_like(q))
    part_dq = loader.poison(torch.empty(rows.num_slots, H, D, dtype=torch.float32, device=dev))
    if R and H:
        _kernel(dq_name, dev)(
            _grid(rows.num_items, H // gq, dev), (THREADS,),
            (q, k, v, bias, np.int32(bc), dout, lse, delta, rows.items,
             np.int64(rows.num_items), col, rule, dq, part_dq, ds, np.int32(H),
             np.int32(H // Hk), np.int32(D), np.int32(v.size(-1)), np.float32(scale)))
    _sum_partials(rows, part_dq, dq)
    return dq


def _backward_dkdv(q, k, v, dout, lse, delta, p: Plan, scale: float, bias,
                   bc: int) -> Tuple[Tensor, Tensor]:
    """dK and dV over the CSC of keys."""
    a, cols = p.arrays, p.cols
    H, D = q.size(1), q.size(2)
    Hk, Dv = k.size(1), v.size(2)
    dev = q.device
    _, dkdv_name, _ = _backward_kernels(q, k, v, dout)
    dk, dv = loader.poison(torch.empty_like(k)), loader.poison(torch.empty_like(v))
    part_dk = loader.poison(torch.empty(cols.num_slots, Hk, D, dtype=torch.float32, device=dev))
    part_dv = loader.poison(torch.empty(cols.num_slots, Hk, Dv, dtype=torch.float32, device=dev))
    if a.num_src and Hk:
        _kernel(dkdv_name, dev)(
            _grid(cols.num_items, Hk, dev), (THREADS,),
            (q, k, v, bias, np.int32(bc), dout, lse, delta, cols.items,
             np.int64(cols.num_items), a.krow, a.perm, dk, dv, part_dk, part_dv, np.int32(H),
             np.int32(H // Hk), np.int32(D), np.int32(Dv), np.float32(scale)))
    _sum_partials(cols, part_dk, dk)
    _sum_partials(cols, part_dv, dv)
    return dk, dv


# ---------------------------------------------------------------------------- the custom op
# graph_attention on the fused kernels is a torch.library custom op with a fake (meta)
# implementation and autograd, so torch.compile sees one opaque node and no graph break.
# A graph enters as its (ptr, src, dst) tensors, which find the graph again (graph_of) with
# its cached plan: the plan's construction is data-dependent host code, never traced.


# torch's on-disk AOT-autograd cache keys a compiled backward on the forward graph, not on
# the backward formula: a change to a backward op's schema must come with a change to the
# forward op's schema (or name), or graphs cached by an older version call the new op wrongly.
@torch.library.custom_op("attngraph::graph_attention", mutates_args=())
def _attention_op(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], ptr: Tensor,
                  src: Tensor, dst: Tensor, num_src: int, scale: float, check_bias: bool
                  ) -> Tuple[Tensor, Tensor]:
    if check_bias and bias is not None:   # graph_attention could not check while traced

        check_bias_values(bias)
    with running("cupy"):
        return forward(q, k, v, plan(graph_of(ptr, src, dst, num_src, ptr.numel() - 1)),
                       scale, bias)


@_attention_op.register_fake
def _(q, k, v, bias, *rest):
    return (q.new_empty(q.size(0), q.size(1), v.size(2)),
            q.new_empty(q.size(0), q.size(1), dtype=torch.float32))


@torch.library.custom_op("attngraph::graph_attention_backward", mutates_args=())
def _attention_backward_op(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor],
                           out: Tensor, lse: Tensor, dout: Tensor, dlse: Optional[Tensor],
                           ptr: Tensor, src: Tensor, dst: Tensor, num_src: int, scale: float,
                           bias_grad: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    p = plan(graph_of(ptr, src, dst, num_src, ptr.numel() - 1))
    dq, dk, dv, dbias = backward(q, k, v, out, lse, dout.contiguous(), p, scale, bias,
                                 bias_grad, dlse)
    return dq, dk, dv, (dbias if dbias is not None else q.new_empty(0, dtype=torch.float32))


@_attention_backward_op.register_fake
def _(q, k, v, bias, out, lse, dout, *rest):
    bias_grad = rest[-1]
    dbias = (torch.empty_like(bias, dtype=torch.float32) if bias_grad and bias is not None
             else q.new_empty(0, dtype=torch.float32))
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dbias


def _setup_context(ctx, inputs, output):
    q, k, v, bias, ptr, src, dst = inputs[:7]
    ctx.num_src, ctx.scale = inputs[7:9]         # inputs[9]: check_bias
    out, lse = output
    ctx.save_for_backward(q, k, v, bias, out, lse, ptr, src, dst)
    ctx.has_bias = bias is not None


def _backward(ctx, dout, dlse):
    q, k, v, bias, out, lse, ptr, src, dst = ctx.saved_tensors
    bias_grad = ctx.has_bias and ctx.needs_input_grad[3]
    dq, dk, dv, dbias = _attention_backward_op(q, k, v, bias, out, lse, dout.contiguous(),
                                               dlse, ptr, src, dst, ctx.num_src, ctx.scale,
                                               bias_grad)
    return (dq, dk, dv, dbias if bias_grad else None) + (None,) * 6


_attention_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------- implicit graphs
# An implicit graph has no CSR. The row kernels (forward and dQ) read its rule instead: the
# rows of a chunk become work items over the runs of their rows (rule_items), each with its
# (step, residue), and the kernels compute a range's keys as u * step + residue or read a
# slice of the rule's table -- no edge exists in memory. dK / dV need the keys' side of the
# graph: there each row chunk's edges are generated on the device, as a small graph over the
# keys the chunk touches, and its dK / dV are added in chunk order (one index_add per chunk
# over distinct keys): deterministic.
IMPLICIT_CHUNK_EDGES = 1 << 24
RULE_CHUNK_ROWS = 1 << 18


@dataclass(frozen=True)
class RuleItems:
    """Work items of rows ``[r0, r1)`` of an implicit graph over the runs of its rule:
    ``rows`` as :class:`WorkItems` (node local to the chunk, first and end *position*,
    slot), ``rule [n_items, 2]`` int32 (step, residue; step 0: positions index ``table``),
    ``table`` int32: the runs' tables one after the other (positions offset to match)."""

    rows: WorkItems
    rule: Tensor
    table: Tensor


def rule_items(graph, r0: int, r1: int, chunk: Optional[int] = None,
               checked: Optional[set] = None) -> RuleItems:
    """The :class:`RuleItems` of rows ``[r0, r1)``, each item at most ``chunk`` positions
    (default :func:`chunk_size` of the chunk). Every key an item names is checked to lie in
    ``[0, num_src)`` here, before any kernel reads it (``checked``: tables already checked,
    by ``(data_ptr, numel)``, skipped)."""

    dev = graph.device
    R = r1 - r0
    nodes, begins, counts, steps, residues, tables = [], [], [], [], [], []
    offset = 0
    for run in graph.runs(r0, r1):
        cnt = run.count.to(torch.long)
        if isinstance(run, Range):
            step = int(run.step)
            if step < 1:
                raise ValueError(f"the rule of {graph!r} gives a range with step {step} "
                                 f"(must be >= 1)")
            start = run.start.to(torch.long)
            u0 = torch.div(start, step, rounding_mode="floor")
            res = start - u0 * step
            last = (u0 + cnt - 1) * step + res                 # the run's last key
            bad = (cnt > 0) & ((start < 0) | (last >= graph.num_src))
            st = torch.full_like(cnt, step)
        else:
            table = run.table.to(torch.int32)
            tag = (run.table.data_ptr(), run.table.numel())
            if checked is None or tag not in checked:
                if table.numel() and (int(run.table.min()) < 0
                                      or int(run.table.max()) >= graph.num_src):
                    raise ValueError(f"the rule of {graph!r} has a table with keys outside "
                                     f"[0, {graph.num_src})")
                if checked is not None:
                    checked.add(tag)
            lo = run.lo.to(torch.long)
            bad = (cnt > 0) & ((lo < 0) | (lo + cnt > table.numel()))
            u0, res, st = lo + offset, torch.zeros_like(cnt), torch.zeros_like(cnt)
            tables.append(table)
            offset += table.numel()
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0]) + r0
            raise ValueError(f"the rule of {graph!r} gives row {row} keys outside [0, "
                             f"{graph.num_src})")
        live = (cnt > 0).nonzero().view(-1)
        nodes.append(live)
        begins.append(u0[live])
        counts.append(cnt[live])
        steps.append(st[live])
        residues.append(res[live])
    # a row without runs still gets one (empty) item: it writes out = 0, lse = -inf
    seen = torch.zeros(R, dtype=torch.bool, device=dev)
    for n in nodes:
        seen[n] = True
    empty = (~seen).nonzero().view(-1)
    zeros = torch.zeros_like(empty)
    node = torch.cat(nodes + [empty])
    begin, count = torch.cat(begins + [zeros]), torch.cat(counts + [zeros])
    step, res = torch.cat(steps + [zeros + 1]), torch.cat(residues + [zeros])
    if chunk is None:
        chunk = chunk_size(int(count.sum()), R)
    # runs longer than a chunk are cut; a row's pieces sit side by side (row-major)
    pieces = ((count + chunk - 1) // chunk).clamp_min(1)
    item = torch.repeat_interleave(torch.arange(node.numel(), device=dev), pieces)
    first = torch.cumsum(pieces, 0) - pieces
    part = torch.arange(item.numel(), device=dev) - first[item]
    node_i = node[item]
    order = torch.sort(node_i, stable=True).indices          # rows in order, runs in order
    item, part, node_i = item[order], part[order], node_i[order]
    b = begin[item] + part * chunk
    e = torch.minimum(b + chunk, begin[item] + count[item])
    per_row = torch.bincount(node_i, minlength=R)
    cut = per_row[node_i] > 1
    slot = torch.where(cut, torch.cumsum(cut.long(), 0) - 1, torch.full_like(node_i, -1))
    rows_cut = (per_row > 1).nonzero().view(-1)
    slot0 = torch.cumsum(torch.where(per_row > 1, per_row, 0), 0) - torch.where(
        per_row > 1, per_row, 0)
    splits = torch.stack([rows_cut, slot0[rows_cut], slot0[rows_cut] + per_row[rows_cut]],
                         1).contiguous()
    by_length = torch.argsort(b - e, stable=True)            # longest first, as work_items
    items = torch.stack([node_i, b, e, slot], 1)[by_length].contiguous()
    rule = torch.stack([step[item], res[item]], 1)[by_length].to(torch.int32).contiguous()
    table = (torch.cat(tables) if tables else torch.zeros(1, dtype=torch.int32, device=dev))
    return RuleItems(WorkItems(items, splits, int(cut.sum())), rule, table.contiguous())


def _rule_chunks(graph):
    checked = set()
    for r0 in range(0, graph.num_dst, RULE_CHUNK_ROWS):
        r1 = min(r0 + RULE_CHUNK_ROWS, graph.num_dst)
        yield r0, r1, rule_items(graph, r0, r1, checked=checked)


def _implicit_chunks(graph):
    for r0, r1, _, ptr, src in graph.edge_chunks(IMPLICIT_CHUNK_EDGES):
        if not src.numel():         # rows without edges keep out = 0, lse = -inf
            continue
        keys, local = torch.unique(src, sorted=True, return_inverse=True)
        rows = torch.repeat_interleave(torch.arange(r1 - r0, device=src.device), ptr.diff(),
                                       output_size=src.numel())
        # rows ascend and keys ascend inside a row, so (row, local key) stays canonical
        yield r0, r1, keys, TokenGraph._from_canonical(local, rows, keys.numel(), r1 - r0)


def _check_implicit(q, k, v, graph) -> None:
    expect("q", q, (graph.num_dst, q.size(1), q.size(2)), q.dtype, q.device)
    expect("k", k, (graph.num_src, k.size(1), q.size(2)), q.dtype, q.device)
    expect("v", v, (graph.num_src, k.size(1), v.size(2)), q.dtype, q.device)
    if k.size(1) == 0 or q.size(1) % k.size(1):
        raise ValueError(f"heads ({q.size(1)}) must be a multiple of kv heads ({k.size(1)})")
    if graph.num_src >= 1 << 31:
        raise ValueError(f"the fused kernels take keys as int32: {graph.num_src} keys")
    kernel_dtype(q)


class _ImplicitFused(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, graph, scale):
        _check_implicit(q, k, v, graph)
        with running("cupy"):
            return _ImplicitFused._run(ctx, q, k, v, graph, scale)

    @staticmethod
    def _run(ctx, q, k, v, graph, scale):
        out = loader.poison(q.new_empty(q.size(0), q.size(1), v.size(-1)))
        lse = loader.poison(torch.empty(q.size(0), q.size(1), dtype=torch.float32, device=q.device))
        for r0, r1, ri in _rule_chunks(graph):
            out[r0:r1], lse[r0:r1] = _forward_items(q[r0:r1], k, v, ri.rows, ri.table,
                                                    ri.rule, scale, None, 1)
        ctx.graph, ctx.scale = graph, scale
        ctx.save_for_backward(q, k, v, out, lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dout = dout.contiguous()
        delta = _delta(out, dout, lse, dlse)
        dq = loader.poison(torch.empty_like(q))
        for r0, r1, ri in _rule_chunks(ctx.graph):              # dQ from the rule
            dq[r0:r1] = _backward_dq(q[r0:r1], k, v, dout[r0:r1], lse[r0:r1],
                                     delta[r0:r1], ri.rows, ri.table, ri.rule, ctx.scale,
                                     None, 1, None)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        for r0, r1, keys, sub in _implicit_chunks(ctx.graph):   # dK / dV chunk by chunk
            dk_c, dv_c = _backward_dkdv(
                q[r0:r1], k.index_select(0, keys), v.index_select(0, keys), dout[r0:r1],
                lse[r0:r1], delta[r0:r1], plan(sub), ctx.scale, None, 1)
            dk.index_add_(0, keys, dk_c.float())
            dv.index_add_(0, keys, dv_c.float())
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None


def attention(q: Tensor, k: Tensor, v: Tensor, graph: TokenGraph, scale: float,
              bias: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Fused graph attention -> ``(out [N_dst, H, D_v], lse [N_dst, H] float32)``,
    differentiable in q, k, v and bias (the ``attngraph::graph_attention`` op). An implicit
    graph (no bias) runs from its rule (eager only): forward and dQ compute each row's keys
    in the kernels, dK / dV generate each row chunk's edges on the device."""
    q, k, v = (t.contiguous() for t in (q, k, v))
    if graph.is_implicit:
        return _ImplicitFused.apply(q, k, v, graph, float(scale))
    if bias is not None:
        bias = bias.to(torch.float32).contiguous()
    # traced by torch.compile, graph_attention skipped the data-dependent bias check: the op
    # makes it when it runs (is_compiling() is True while tracing, baked into the graph)
    return _attention_op(q, k, v, bias, graph.ptr, graph.src, graph.dst, graph.num_src,
                         float(scale), torch.compiler.is_compiling())
