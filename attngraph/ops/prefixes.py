"""Rows that read prefixes of one key segment, laid out once per call: the key-range path's
engine for hash buckets and QK-drop on CPU.

SCFA's masks (:mod:`attngraph.masks.dynamic`) give every query row one ``Take`` run, the
slice ``table[lo : lo + count]`` of a table of keys sorted by (bucket, position): the rows
of one bucket (of one kept set, for QK-drop) share ``lo``, and a row's count grows with its
position (causal on original positions). Such a *group* of rows is a staircase over one
contiguous segment of keys.

The plan (made once per graph, kept in its caches, shared by forward and backward):

* groups of similar slope (keys per row) and size form a *class*; a class pads its groups
  to one row count ``Pq`` (rows of a group sorted by count) and one key count ``Pk``;
* per call, a class gathers q, k and v once into that padded layout ``[m, P, H, D]``, so
  that query block ``t`` of every group of the class is one strided view, and its keys, a
  prefix ``[0, w_t)`` of every group's segment, another;
* block ``t`` runs as at most two calls of ATen's CPU flash kernel over all ``m`` groups:
  the columns every real row of the block reads, ``[0, a_t)``, without a mask, and the
  block's staircase ``[a_t, w_t)`` under a mask made from the counts, the two partial
  results merged by log-sum-exp (one masked call when ``a_t`` is small);
* the results go back to their rows with one copy per class; the backward accumulates dk
  and dv in the padded layout and adds them to their keys once.

So a call costs the kernel's work on the computed cells (each block reads its rows'
longest prefix, and a class's groups climb their staircases in lock step: 1.09-1.13 cells
per attended cell on QK-drop) and a few copies of q, k, v, out per class, instead of a
gather per piece.

Used where the rows of a rule form few, large groups (:func:`plan` says when); the general
path of :mod:`attngraph.ops.ranges` serves every other rule. docs/ARCHITECTURE.md, "Backends".
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional

import torch
from torch import Tensor

from attngraph.ops.numerics import merge
from attngraph.runs import Take

__all__ = ["plan", "forward", "backward", "computed_cells", "MIN_GROUP_ROWS"]

# A rule qualifies when its rows form groups of at least this many rows on average. Below
# it the general path's blocks, batched by width wherever they lie, waste fewer cells than
# a class's lock-step blocks and win (benchmarks/scfa_cells.py on CPU: hash buckets of ~512
# rows 1.26x slower here, of ~1024 rows even, of ~2048 rows and QK-drop 1.1-1.2x faster).
MIN_GROUP_ROWS = 1536
# Query blocks per group: a class's rows are cut into at most BLOCKS blocks (a power of
# two) of at least BLOCK_MIN rows. A block's staircase wastes about half its rows' worth
# of columns per row, and the kernel's cost per cell falls as blocks grow (measured on
# CPU, benchmarks/scfa_cells.py): 16 blocks of a QK-drop group of 4096 rows compute 1.12
# cells per attended cell.
BLOCKS, BLOCK_MIN = 16, 48
# A class pads its groups to its largest row and key counts: by at most this share of cells.
CLASS_PAD = 0.1
# The unmasked columns of a block run as their own call when at least this many.
SPLIT_MIN = 32


class Class(NamedTuple):
    """Groups padded to one layout. ``rows [m, Pq]`` query ids (-1: padding), sorted by
    count inside a group; ``cnt [m, Pq]`` keys each row reads (padding: ``Pk``, every key,
    so that no padding row is empty); ``keys [m, Pk]`` key ids (padding: the group's first
    key); ``blocks``: ``(r0, r1, a, w)`` per query block, rows ``[r0, r1)`` reading keys
    ``[0, w)``, each real row at least ``[0, a)``; ``real`` and ``key_real``: flat
    positions of the real rows and keys in the layout, ``row_ids`` and ``key_ids`` their
    ids."""
    rows: Tensor
    cnt: Tensor
    keys: Tensor
    blocks: list
    real: Tensor
    row_ids: Tensor
    key_real: Tensor
    key_ids: Tensor


def plan(graph) -> Optional[List[Class]]:
    """The classes of an implicit graph's rule, or None where it does not qualify (not a
    single ``Take`` run, or its rows in groups of fewer than :data:`MIN_GROUP_ROWS` rows on
    average). Kept in ``graph.caches.ranges``."""
    cache = graph.caches.ranges
    if "prefixes" not in cache:
        cache["prefixes"] = _plan(graph)
    return cache["prefixes"]


def _plan(graph) -> Optional[List[Class]]:
    n = graph.num_dst
    if n == 0 or graph.num_src == 0:
        return None
    # one row tells the rule's kind: a rule that is not a single Take run (a window, a
    # causal range on millions of rows) is turned away before its runs are made for all
    def single_take(runs) -> bool:
        return len(runs) == 1 and isinstance(runs[0], Take)

    if not single_take(graph.runs(0, 1)):
        return None
    runs = graph.runs(0, n)
    if not single_take(runs):
        return None
    table, lo, cnt = runs[0].table, runs[0].lo.long(), runs[0].count.long()
    active = (cnt > 0).nonzero().view(-1)
    n_a = active.numel()
    if n_a == 0:
        return None
    # rows by (segment start, count): a group's staircase grows row by row
    active = active[torch.sort(cnt[active], stable=True).indices]
    active = active[torch.sort(lo[active], stable=True).indices]
    seg = lo[active]
    starts = torch.ones(n_a, dtype=torch.bool, device=seg.device)
    starts[1:] = seg[1:] != seg[:-1]
    first = starts.nonzero().view(-1)
    if n_a < MIN_GROUP_ROWS * first.numel():
        return None
    size = torch.diff(first, append=first.new_tensor([n_a]))
    width = cnt[active[first + size - 1]]                    # the group's longest prefix
    # groups by slope (keys per row), then size; a class grows while its padding stays
    # within CLASS_PAD of its cells: groups of one class climb their staircases together
    slope = width.double() / size.double()
    order = torch.sort(size, stable=True).indices
    by_slope = order[torch.sort(slope[order], stable=True).indices]
    sizes, widths = size[by_slope].tolist(), width[by_slope].tolist()
    classes, i = [], 0
    while i < len(sizes):
        j, cells, max_s, max_w = i + 1, sizes[i] * widths[i], sizes[i], widths[i]
        while j < len(sizes):
            n_, w_ = max(max_s, sizes[j]), max(max_w, widths[j])
            if (j - i + 1) * n_ * w_ > (1 + CLASS_PAD) * (cells + sizes[j] * widths[j]):
                break
            cells, max_s, max_w, j = cells + sizes[j] * widths[j], n_, w_, j + 1
        classes.append(_layout(by_slope[i:j], first, size, width, active, lo, cnt, table))
        i = j
    return classes


def _layout(groups, first, size, width, active, lo, cnt, table) -> Class:
    device = first.device
    g_first, g_size, g_width = first[groups], size[groups], width[groups]
    n_max = int(g_size.max())
    T = 1
    while T < BLOCKS and -(-n_max // (2 * T)) >= BLOCK_MIN:
        T *= 2
    bq = -(-n_max // T)
    Pq = T * bq
    Pk = int(g_width.max())
    lane = torch.arange(Pq, device=device)
    valid = lane < g_size.unsqueeze(1)
    rows = active[(g_first.unsqueeze(1) + lane).clamp_max(active.numel() - 1)]
    rows = torch.where(valid, rows, -1)
    row_cnt = torch.where(valid, cnt[rows.clamp_min(0)], Pk)
    big = torch.iinfo(torch.long).max
    lows = torch.where(valid, row_cnt, big).view(-1, T, bq).amin(2).amin(0).tolist()
    highs = torch.where(valid, row_cnt, 0).view(-1, T, bq).amax(2).amax(0).tolist()
    blocks = [(t * bq, (t + 1) * bq, min(lows[t], highs[t]), highs[t])
              for t in range(T) if highs[t] > 0]
    kl = torch.arange(Pk, device=device)
    g_lo = lo[active[g_first]]
    pos = torch.where(kl < g_width.unsqueeze(1), g_lo.unsqueeze(1) + kl, g_lo.unsqueeze(1))
    keys = table[pos].long()
    real = valid.view(-1).nonzero().view(-1)
    key_real = (kl < g_width.unsqueeze(1)).view(-1).nonzero().view(-1)
    return Class(rows, row_cnt, keys, blocks, real, rows.view(-1)[real], key_real,
                 keys.view(-1)[key_real])


def computed_cells(classes: List[Class]) -> int:
    """Cells the kernel computes for one head (padding and masked cells included)."""
    return sum(c.rows.size(0) * (r1 - r0) * w for c in classes for r0, r1, _, w in c.blocks)


# ---------------------------------------------------------------------------- one block
def _mask(cls: Class, r0: int, r1: int, a: int, w: int, dtype) -> Tensor:
    """Additive mask ``[m, 1, r1 - r0, w - a]`` of keys ``[a, w)``: 0 where a row reads it."""
    cols = torch.arange(a, w, device=cls.cnt.device)
    zero = torch.zeros((), dtype=dtype, device=cls.cnt.device)
    return torch.where(cols < cls.cnt[:, r0:r1].unsqueeze(-1), zero,
                       zero - float("inf")).unsqueeze(1)


def _pieces(a: int, w: int):
    """Key pieces ``(k0, k1, masked)`` of a block reading ``[0, w)``, every real row
    ``[0, a)``: the columns all rows read without a mask, the staircase under one (the
    whole block under a mask when the first are few)."""
    if a >= w:
        return ((0, w, False),)
    if a >= SPLIT_MIN:
        return ((0, a, False), (a, w, True))
    return ((0, w, True),)


def _heads(x: Tensor, i0: int, i1: int, repeat: int = 1) -> Tensor:
    """``[m, P, Hx, C]`` layout -> rows ``[i0, i1)`` as ``[m, Hx * repeat, i1 - i0, C]``."""
    t = x[:, i0:i1].transpose(1, 2)
    return t if repeat == 1 else t.repeat_interleave(repeat, dim=1)


def _call_forward(ops, cls: Class, Q, K, V, s0, s1, k0, k1, masked, G, scale, cdt):
    """One kernel call: ``(o [m, s1 - s0, H, Dv], lse [m, s1 - s0, H])``."""
    mask = _mask(cls, s0, s1, k0, k1, cdt) if masked else None
    o, l = ops[0](_heads(Q, s0, s1), _heads(K, k0, k1, G), _heads(V, k0, k1, G),
                  attn_mask=mask, scale=scale)
    l = l.transpose(1, 2)
    if masked and k0 > 0:                # a row without a key here: lse -inf, not 0
        empty = cls.cnt[:, s0:s1] <= k0
        if bool(empty.any()):
            l = l.masked_fill(empty.unsqueeze(-1), float("-inf"))
    return o.transpose(1, 2), l


def forward(ops, classes: List[Class], q: Tensor, k: Tensor, v: Tensor, scale: float,
            cdt: torch.dtype):
    """``(out [N, H, Dv], lse [N, H])``; rows outside every group: 0 and ``-inf``."""
    N, H, D = q.shape
    H_kv, Dv = k.size(1), v.size(-1)
    G = H // H_kv
    out = q.new_zeros(N, H, Dv)
    lse = torch.full((N, H), float("-inf"), dtype=cdt, device=q.device)
    for cls in classes:
        m, Pq = cls.rows.shape
        Pk = cls.keys.size(1)
        Q = q.index_select(0, cls.rows.view(-1).clamp_min(0)).to(cdt).view(m, Pq, H, D)
        K = k.index_select(0, cls.keys.view(-1)).to(cdt).view(m, Pk, H_kv, D)
        V = v.index_select(0, cls.keys.view(-1)).to(cdt).view(m, Pk, H_kv, Dv)
        O = torch.empty(m, Pq, H, Dv, dtype=cdt, device=q.device)
        L = torch.empty(m, Pq, H, dtype=cdt, device=q.device)
        for r0, r1, a, w in cls.blocks:
            o = l = None
            for k0, k1, masked in _pieces(a, w):
                o_p, l_p = _call_forward(ops, cls, Q, K, V, r0, r1, k0, k1, masked, G,
                                         scale, cdt)
                o, l = (o_p, l_p) if o is None else merge(o, l, o_p, l_p)
            O[:, r0:r1] = o
            L[:, r0:r1] = l
        out.index_copy_(0, cls.row_ids, O.view(m * Pq, H, Dv).index_select(0, cls.real)
                        .to(out.dtype))
        lse.index_copy_(0, cls.row_ids, L.view(m * Pq, H).index_select(0, cls.real))
    return out, lse


def backward(ops, classes: List[Class], q: Tensor, k: Tensor, v: Tensor, out: Tensor,
             lse: Tensor, dout: Tensor, scale: float, cdt: torch.dtype):
    """``(dq, dk, dv)`` from the merged ``out`` and ``lse`` (no gradient through lse)."""
    N, H, D = q.shape
    H_kv, Dv = k.size(1), v.size(-1)
    G = H // H_kv
    dq = torch.zeros(N, H, D, dtype=cdt, device=q.device)
    dk = torch.zeros(k.shape, dtype=cdt, device=k.device)
    dv = torch.zeros(v.shape, dtype=cdt, device=v.device)
    for cls in classes:
        m, Pq = cls.rows.shape
        Pk = cls.keys.size(1)
        rows = cls.rows.view(-1).clamp_min(0)
        Q = q.index_select(0, rows).to(cdt).view(m, Pq, H, D)
        K = k.index_select(0, cls.keys.view(-1)).to(cdt).view(m, Pk, H_kv, D)
        V = v.index_select(0, cls.keys.view(-1)).to(cdt).view(m, Pk, H_kv, Dv)
        O = out.index_select(0, rows).to(cdt).view(m, Pq, H, Dv)
        dO = dout.index_select(0, rows).to(cdt).view(m, Pq, H, Dv)
        # padding rows: lse +inf, so that p = exp(s - lse) = 0 and they add nothing
        Lr = lse.index_select(0, rows).view(m, Pq, H)
        Lr = Lr.masked_fill((cls.rows < 0).unsqueeze(-1), float("inf"))
        dQ = torch.zeros(m, Pq, H, D, dtype=cdt, device=q.device)
        dK = torch.zeros(m, Pk, H_kv, D, dtype=cdt, device=q.device)
        dV = torch.zeros(m, Pk, H_kv, Dv, dtype=cdt, device=q.device)
        for s0, s1, a, w in cls.blocks:
            for k0, k1, masked in _pieces(a, w):
                mask = _mask(cls, s0, s1, k0, k1, cdt) if masked else None
                dq_p, dk_p, dv_p = ops[1](
                    _heads(dO, s0, s1), _heads(Q, s0, s1), _heads(K, k0, k1, G),
                    _heads(V, k0, k1, G), _heads(O, s0, s1), Lr[:, s0:s1].transpose(1, 2),
                    0.0, False, attn_mask=mask, scale=scale)
                if G > 1:                    # GQA: the query heads of a key head summed
                    dk_p = dk_p.reshape(m, H_kv, G, k1 - k0, D).sum(2)
                    dv_p = dv_p.reshape(m, H_kv, G, k1 - k0, Dv).sum(2)
                dQ[:, s0:s1] += dq_p.transpose(1, 2)
                dK[:, k0:k1] += dk_p.transpose(1, 2)
                dV[:, k0:k1] += dv_p.transpose(1, 2)
        dq.index_copy_(0, cls.row_ids, dQ.view(m * Pq, H, D).index_select(0, cls.real))
        dk.index_add_(0, cls.key_ids, dK.view(m * Pk, H_kv, D).index_select(0, cls.key_real))
        dv.index_add_(0, cls.key_ids,
                      dV.view(m * Pk, H_kv, Dv).index_select(0, cls.key_real))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)

