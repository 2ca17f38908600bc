"""Attention on an implicit graph, read straight from its rule: no edge list, ever.

An :class:`~attngraph.implicit.ImplicitGraph` gives each query row a few runs of keys
(:mod:`attngraph.runs`): ``Range`` runs (``start + step * k``) and ``Take`` runs
(slices of a small sorted table: global ids, a document's keys). In *position space* each
run of a row is an interval ``[u0, u0 + count)``: the key itself for a step-1 range, the
lattice index for a dilated one (rows grouped by residue), the table index for a take.

Rows are processed in chunks. Inside a chunk, each run's active rows are sorted by (first
position, count) and cut into blocks of ``BLOCK`` rows inside each segment of rows that
share a first position (a hash bucket, the kept keys of QK-drop, a residue group), from the
segment's end, so that its one partial block is its narrowest; a block's keys are the union
of its rows' intervals, one contiguous span of positions. Where the span is dense enough
(``rows * span <= EDGE_COST_CELLS * edges``, the tile path's measured break-even) the block
runs as dense math over contiguous K/V rows with an exact mask from the intervals; blocks
of similar width (within ``PAD_WIDTH``) are batched wherever they lie (the causal
prefixes of a hash bucket grow block by block), the columns every row of a batch covers
form a piece of their own without a mask (a causal prefix and its diagonal
tail, as FlashAttention splits them), and spans longer than a piece's budget are cut into
key pieces. On CPU a dense piece runs on ATen's fused flash-attention kernel, which returns
the log-sum-exp; elsewhere (or when key and value head dims differ) on ``bmm``, mask and
softmax. Other blocks run per edge, their edges generated for that block only. Every piece
returns a partial ``(out, lse)`` per row; runs of a row are disjoint, so the partials merge
exactly by log-sum-exp. The backward recomputes the same pieces, ``p = exp(s - lse)`` as
FlashAttention does, from each row's merged ``out`` and ``lse``.

Rules whose rows form a few large groups reading prefixes of one key segment (QK-drop, hash
buckets of thousands of rows) run instead, on CPU, on :mod:`attngraph.ops.prefixes`: the
groups padded into one layout per class, q, k and v gathered once per class, no merge of
key pieces beyond a block's two.

The planned pieces are kept with the graph (within ``PIECES_CACHE_BYTES``), so the
backward, and the next call on the same graph, do not plan them again.

Memory: q, k, v, out and lse, plus one piece of work (``MAX_ELEMENTS`` scores) and one row
chunk of float32 accumulators; for the backward also dq, float32 dk and dv.
"""
from __future__ import annotations

from typing import Iterator, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from attngraph import chunks
from attngraph.capabilities import cpu_flash_ops
from attngraph.chunks import row_chunks
from attngraph.implicit import implicit_of
from attngraph.ops import prefixes
from attngraph.ops.numerics import backward_preamble, compute_dtype, merge
from attngraph.ops.plan import EDGE_COST_CELLS
from attngraph.ops.record import running
from attngraph.ops.segment import segment_max, segment_sum
from attngraph.runs import Range, Take

__all__ = ["attention", "pieces", "BLOCK", "MAX_ELEMENTS"]

# Query rows per dense block.
BLOCK = 128
# Score elements of one piece (read from attngraph.chunks at call time).
MAX_ELEMENTS = chunks.RANGE_MAX_ELEMENTS


class Dense(NamedTuple):
    """``rows [nb, bq]`` (global query ids, -1: padding) x ``keys [nb, W]`` (global key
    ids) with ``mask`` (True: an edge) ``[nb, bq, W]``, ``[1, bq, W]`` when every block
    has the same pattern, or None when every cell is an edge. ``row0``: the first row when
    block b's rows are ``row0 + b * bq + r`` (none padded); ``key0``: ``(first, step)``
    when block b's keys are ``first + b * step + w``: such operands are read in place.
    ``empty`` (with a mask; None: read it from the mask) ``[nb|1, bq]``: True on the rows
    the mask leaves without a key."""
    rows: Tensor
    keys: Tensor
    mask: Optional[Tensor]
    row0: Optional[int] = None
    key0: Optional[Tuple[int, int]] = None
    empty: Optional[Tensor] = None


class Sparse(NamedTuple):
    """Edges of ``rows [R]`` (global query ids): row ``r`` holds keys
    ``src[ptr[r]:ptr[r+1]]``."""
    rows: Tensor
    ptr: Tensor
    src: Tensor


def _positions(run):
    """``(u0, count, group, key_of)`` of a run in position space; ``key_of(u, g)`` maps
    positions (and the group of their block) to key ids."""
    count = run.count.to(torch.long)
    if isinstance(run, Range):
        step = int(run.step)
        if step == 1:
            return run.start, count, None, lambda u, g: u
        group = torch.remainder(run.start, step)
        u0 = torch.div(run.start, step, rounding_mode="floor")
        return u0, count, group, lambda u, g: g + step * u
    table = run.table
    return run.lo, count, None, lambda u, g: table[u]


def pieces(graph, r0: int, r1: int, heads: int, dim: int,
           max_elements: Optional[int] = None, flash: bool = False) -> Iterator:
    """The :class:`Dense` and :class:`Sparse` pieces of query rows ``[r0, r1)``: together
    they hold every edge of these rows exactly once. With ``flash`` a dense piece stores no
    scores, only its mask: ``4 * max_elements`` cells of it, whatever the heads."""
    max_elements = chunks.RANGE_MAX_ELEMENTS if max_elements is None else max_elements
    bq = BLOCK
    cost = EDGE_COST_CELLS
    device = graph.device
    lane = torch.arange(bq, device=device)
    for run in graph.runs(r0, r1):
        u0, cnt, group, key_of = _positions(run)
        active = (cnt > 0).nonzero().view(-1)
        n_a = active.numel()
        if not n_a:
            continue
        if group is not None:
            active = active[torch.sort(group[active], stable=True).indices]
            seg = group[active]
        else:
            # rows by (first position, count): the rows of a hash bucket (a stretch of the
            # table) side by side, each bucket's causal prefixes growing row by row
            active = active[torch.sort(cnt[active], stable=True).indices]
            active = active[torch.sort(u0[active], stable=True).indices]
            seg = u0[active]
        starts = torch.ones(n_a, dtype=torch.bool, device=device)
        starts[1:] = seg[1:] != seg[:-1]
        first = starts.nonzero().view(-1)
        if group is None and n_a < first.numel() * bq // 2:
            # rows of distinct first positions (sliding windows): blocks in that order
            block_first = torch.arange(0, n_a, bq, device=device)
        else:
            # blocks inside a segment (a residue group, a bucket), cut from its end: the
            # partial block is the first, the narrowest of a growing staircase
            seg_len = torch.diff(first, append=first.new_tensor([n_a]))
            lead = torch.remainder(seg_len - 1, bq) + 1        # rows of the first block
            cuts = [first]
            extra = (seg_len - lead) // bq                     # full blocks after it
            if bool((extra > 0).any()):
                j = torch.arange(int(extra.max()), device=device)
                at = (first + lead).unsqueeze(1) + j * bq
                cuts.append(at[j < extra.unsqueeze(1)])
            block_first = torch.sort(torch.cat(cuts)).values
        nb = block_first.numel()
        block_len = torch.diff(block_first, append=block_first.new_tensor([n_a]))
        slot = block_first.unsqueeze(1) + lane                          # [nb, bq]
        valid = lane < block_len.unsqueeze(1)
        local = active[slot.clamp_max(n_a - 1)]
        lo_m = u0[local]
        cnt_m = torch.where(valid, cnt[local], 0)
        hi_m = lo_m + cnt_m
        big = torch.iinfo(torch.long).max
        lo_b = torch.where(valid, lo_m, big).amin(1)
        hi_b = torch.where(valid, hi_m, -1).amax(1)
        edges_b = cnt_m.sum(1)
        width = hi_b - lo_b
        dense = block_len * width <= cost * edges_b
        rows_m = torch.where(valid, local + r0, -1)
        g_b = group[local[:, 0]] if group is not None else lo_b
        # dense blocks: consecutive blocks of similar width batched, cut into key pieces
        ids = dense.nonzero().view(-1)
        if ids.numel():
            # blocks of similar width batched together wherever they lie (a bucket's
            # causal prefixes grow block by block); equal widths keep their order
            ids = ids[torch.sort(width[ids], stable=True).indices]
            yield from _dense_batches(ids, width, lo_b, hi_b, lo_m, hi_m, rows_m, valid,
                                      g_b, key_of, group is None and not _is_take(run),
                                      graph.num_src, 1 if flash else heads,
                                      4 * max_elements if flash else max_elements)
        # sparse blocks: their rows' edges, generated here, in chunks of edges
        ids = (~dense).nonzero().view(-1)
        if ids.numel():
            rows = rows_m[ids][valid[ids]]
            lo_r = lo_m[ids][valid[ids]]
            cnt_r = cnt_m[ids][valid[ids]]
            g_r = (group[rows - r0] if group is not None else None)
            yield from _sparse(rows, lo_r, cnt_r, g_r, key_of,
                               max(1, max_elements // max(1, heads * dim)))


# A graph keeps its planned pieces (for the backward, for the next call), up to this many
# bytes of index and mask tensors in all; past it they are planned again at every pass.
PIECES_CACHE_BYTES = 1 << 26


def _planned(graph, r0: int, r1: int, heads: int, dim: int, flash: bool) -> Iterator:
    """:func:`pieces` of rows ``[r0, r1)``, kept in ``graph.caches.ranges`` the first time
    while the graph's kept pieces stay within :data:`PIECES_CACHE_BYTES`: planning costs
    as much as a fifth of a call on hash buckets, and the backward needs the same pieces."""
    cache = graph.caches.ranges
    key = ("pieces", r0, r1, heads, dim, flash, BLOCK, chunks.RANGE_MAX_ELEMENTS)
    kept = cache.get(key)
    if kept is not None:
        yield from kept
        return
    kept, size = [], cache.get("pieces_bytes", 0)
    for piece in pieces(graph, r0, r1, heads, dim, flash=flash):
        if kept is not None:
            size += sum(t.numel() * t.element_size() for t in piece if isinstance(t, Tensor))
            if size > PIECES_CACHE_BYTES:
                kept = None
            else:
                kept.append(piece)
        yield piece
    if kept is not None:
        cache[key] = kept
        cache["pieces_bytes"] = size


def _is_take(run) -> bool:
    return isinstance(run, Take)


def _segments(W: int, inner_lo: int, inner_hi: int, w_piece: int):
    """Key pieces ``(offset, width)`` of a batch ``W`` wide: the columns every row covers,
    ``[inner_lo, inner_hi)``, are pieces of their own that need no mask when they are at
    least half the batch (a causal prefix and its diagonal tail, as FlashAttention splits
    them); every piece at most ``w_piece`` wide."""
    cuts = [0, inner_lo, inner_hi, W] if 2 * (inner_hi - inner_lo) >= W else [0, W]
    for a, b in zip(cuts, cuts[1:]):
        for o in range(a, b, w_piece):
            yield o, min(w_piece, b - o)


# Batching blocks of unequal widths pads the narrower ones: by at most this share of the
# narrowest block's width (and PAD_MIN keys), against one more piece per batch.
PAD_WIDTH = 0.125
PAD_MIN = 16


def _pad(width: int) -> int:
    return max(PAD_MIN, int(PAD_WIDTH * width))


def _dense_batches(ids, width, lo_b, hi_b, lo_m, hi_m, rows_m, valid, g_b, key_of,
                   contiguous: bool, num_src: int, heads: int, max_elements: int):
    bq = rows_m.size(1)
    device = ids.device
    w_list = width[ids].tolist()
    w_piece = max(1, max_elements // (heads * bq))
    i = 0
    while i < len(w_list):
        j, W = i + 1, w_list[i]
        # widths ascend: a batch pads its blocks to at most PAD_WIDTH of the narrowest
        while j < len(w_list) and w_list[j] <= w_list[i] + _pad(w_list[i]) and \
                (j - i + 1) * min(w_list[j], w_piece) * bq * heads <= max_elements:
            W = w_list[j]
            j += 1
        batch = ids[i:j]
        i = j
        nb = batch.numel()
        lo, hi = lo_b.index_select(0, batch), hi_b.index_select(0, batch)
        rows = rows_m.index_select(0, batch)
        blo, bhi = lo_m.index_select(0, batch), hi_m.index_select(0, batch)
        gb = g_b.index_select(0, batch).unsqueeze(1)
        row0 = None
        r0 = int(rows[0, 0])
        if int(rows[-1, -1]) - r0 == nb * bq - 1 and bool((rows.view(-1).diff() == 1).all()):
            row0 = r0
        # padding rows cover everything (their results are dropped, their p is 0): only
        # real rows decide where a piece needs a mask
        real = rows >= 0
        blo = torch.where(real, blo, lo.unsqueeze(1))
        bhi = torch.where(real, bhi, hi.unsqueeze(1))
        for o, wc in _segments(W, int((blo - lo.unsqueeze(1)).amax()),
                               int((bhi - lo.unsqueeze(1)).amin()), w_piece):
            if contiguous:      # keys are positions: slide the span inside [0, num_src)
                start = torch.clamp(torch.minimum(lo + o, hi - wc), min=0) \
                    if wc < num_src else torch.zeros_like(lo)
                wc = min(wc, num_src)
                keys = start.unsqueeze(1) + torch.arange(wc, device=device)
                steps = start.diff()
                key0 = None
                if nb == 1 or int(steps.min()) == int(steps.max()) >= 0:
                    key0 = (int(start[0]), int(steps[0]) if nb > 1 else 0)
            else:
                start = lo + o
                pos = start.unsqueeze(1) + torch.arange(wc, device=device)
                keys = key_of(torch.minimum(pos, hi.unsqueeze(1) - 1), gb)
                key0 = None
            # this piece's own positions [lo + o, lo + o + wc) within the row's interval
            own_lo, own_hi = (lo + o).unsqueeze(1), torch.minimum(lo + o + wc, hi).unsqueeze(1)
            rel_lo = torch.maximum(blo, own_lo) - start.unsqueeze(1)         # [nb, bq]
            rel_hi = torch.minimum(bhi, own_hi) - start.unsqueeze(1)
            same = nb == 1 or (bool((rel_lo == rel_lo[:1]).all())
                               and bool((rel_hi == rel_hi[:1]).all()))
            if same:
                rel_lo, rel_hi = rel_lo[:1], rel_hi[:1]
            from_start = bool((rel_lo <= 0).all())
            if from_start and bool((rel_hi >= wc).all()):
                yield Dense(rows, keys, None, row0, key0)
                continue
            w = torch.arange(wc, device=device)
            mask = w < rel_hi.unsqueeze(-1)             # one compare for causal prefixes
            if not from_start:
                mask &= w >= rel_lo.unsqueeze(-1)
            empty = rel_hi.clamp_max(wc) <= rel_lo.clamp_min(0)
            yield Dense(rows, keys, mask, row0, key0, empty)


def _sparse(rows, lo, cnt, group, key_of, max_edges):
    ptr = torch.zeros(rows.numel() + 1, dtype=torch.long, device=rows.device)
    torch.cumsum(cnt, 0, out=ptr[1:])
    ptr_host = ptr.cpu()
    for a, b in row_chunks(ptr_host, max_edges):
        e0, e1 = int(ptr_host[a]), int(ptr_host[b])
        row = torch.repeat_interleave(torch.arange(b - a, device=rows.device), cnt[a:b],
                                      output_size=e1 - e0)
        k = torch.arange(e1 - e0, device=rows.device) - (ptr[a:b] - e0)[row]
        u = lo[a:b][row] + k
        src = key_of(u, group[a:b][row] if group is not None else None)
        yield Sparse(rows[a:b], ptr[a:b + 1] - e0, src)


def _row_chunks(graph, heads: int):
    """Row chunks of about ``16 * RANGE_MAX_ELEMENTS`` scores (whole blocks): the merge of
    a chunk's pieces happens in accumulators of its rows, so chunks are cut by rows, not by
    edges as :func:`attngraph.chunks.row_chunks` cuts them."""
    n = graph.num_dst
    mean = graph.num_edges / max(n, 1)
    rows = int(16 * chunks.RANGE_MAX_ELEMENTS / max(1.0, heads * mean * 1.25))
    rows = max(BLOCK, min(chunks.RANGE_MAX_CHUNK_ROWS, rows // BLOCK * BLOCK))
    for r0 in range(0, n, rows):
        yield r0, min(r0 + rows, n)


# ---------------------------------------------------------------------------- dense pieces
# Operands are per-head ``[nb, L, C]`` matrices: views of the inputs themselves where a
# piece's rows (keys) are evenly stepping contiguous ranges and the input is already in the
# compute dtype, else views of one gathered copy.
class _Operand:
    __slots__ = ("base", "first", "step", "length")

    def __init__(self, x: Tensor, index: Optional[Tensor], span, length: int,
                 cdt: torch.dtype):
        if span is not None and x.dtype == cdt and x.is_contiguous():
            self.base, (self.first, self.step) = x, span
        else:
            self.base = x.index_select(0, index.reshape(-1)).to(cdt)
            self.first, self.step = 0, length
        self.length = length

    def head(self, h: int, nb: int) -> Tensor:
        x = self.base
        Hx, C = x.size(1), x.size(2)
        return x.as_strided((nb, self.length, C), (self.step * Hx * C, Hx * C, 1),
                            x.storage_offset() + (self.first * Hx + h) * C)

    def heads(self, nb: int, repeat: int = 1) -> Tensor:
        """All heads ``[nb, Hx * repeat, L, C]`` (each head ``repeat`` times: GQA)."""
        x = self.base
        Hx, C = x.size(1), x.size(2)
        t = x.as_strided((nb, Hx, self.length, C), (self.step * Hx * C, C, Hx * C, 1),
                         x.storage_offset() + self.first * Hx * C)
        return t if repeat == 1 else t.repeat_interleave(repeat, dim=1)


def _operands(piece: Dense, q, k, v, cdt, qo: Optional[_Operand] = None):
    """The piece's q, k, v operands; ``qo``: its rows' q operand, already gathered (the
    pieces of one batch of blocks share their rows)."""
    nb, bq = piece.rows.shape
    W = piece.keys.size(1)
    if qo is None:
        rspan = None if piece.row0 is None else (piece.row0, bq)
        qo = _Operand(q, piece.rows.clamp_min(0), rspan, bq, cdt)
    return (qo, _Operand(k, piece.keys, piece.key0, W, cdt),
            _Operand(v, piece.keys, piece.key0, W, cdt))


def _dense_scores(piece: Dense, qo, ko, H, G, scale):
    """Masked scores ``[H, nb, bq, W]``."""
    nb, bq = piece.rows.shape
    W = piece.keys.size(1)
    s = torch.empty(H, nb, bq, W, dtype=ko.base.dtype, device=piece.rows.device)
    for h in range(H):
        torch.baddbmm(s[h], qo.head(h, nb), ko.head(h // G, nb).transpose(1, 2), beta=0,
                      alpha=scale, out=s[h])
    if piece.mask is not None:
        s.masked_fill_(~piece.mask, float("-inf"))
    return s


def _heads_to_rows(x: Tensor) -> Tensor:
    """``[H, nb, bq, C]`` -> ``[nb * bq, H, C]``."""
    H, nb, bq, C = x.shape
    return x.permute(1, 2, 0, 3).reshape(nb * bq, H, C)


# ---------------------------------------------------------------------------- flash engine
# On CPU a dense piece runs through ATen's fused flash-attention kernel (blocked, online
# softmax, the scores never stored), which returns the log-sum-exp merging needs; its
# backward takes the row's merged ``out`` and ``lse``, so a piece's share of a row's
# gradient is exact. Where the kernel is missing, the matmul engine below serves.
USE_FLASH = True


def flash_ops(q: Tensor, v: Tensor):
    """``(forward, backward)`` of ATen's CPU flash attention, or None where unusable (not
    on CPU, value and key head dims differ, which the kernel does not take, or this torch
    lacks it: :func:`attngraph.capabilities.cpu_flash_ops`)."""
    if not USE_FLASH or q.device.type != "cpu" or q.size(-1) != v.size(-1):
        return None
    return cpu_flash_ops()


def _additive(mask: Optional[Tensor], cdt: torch.dtype) -> Optional[Tensor]:
    """``[nb|1, bq, W]`` bool mask -> ``[nb|1, 1, bq, W]`` additive 0 / -inf."""
    if mask is None:
        return None
    zero = torch.zeros((), dtype=cdt, device=mask.device)
    return torch.where(mask, zero, zero - float("inf")).unsqueeze(1)


def _flash_forward(ops, piece: Dense, q, k, v, scale, cdt, qo=None):
    nb, bq = piece.rows.shape
    H, H_kv, Dv = q.size(1), k.size(1), v.size(-1)
    G = H // H_kv
    qo, ko, vo = _operands(piece, q, k, v, cdt, qo)
    o, lse = ops[0](qo.heads(nb), ko.heads(nb, G), vo.heads(nb, G),
                    attn_mask=_additive(piece.mask, cdt), scale=scale)
    if piece.mask is not None:              # a row without edges here: lse -inf, not 0
        empty = ~piece.mask.any(-1) if piece.empty is None else piece.empty  # [nb|1, bq]
        if bool(empty.any()):
            lse = lse.masked_fill(empty.unsqueeze(1), float("-inf"))
    return (o.permute(0, 2, 1, 3).reshape(nb * bq, H, Dv),
            lse.permute(0, 2, 1).reshape(nb * bq, H), qo)


def _flash_backward(ops, piece: Dense, q, k, v, scale, cdt, lse_rows, out_rows, do_rows,
                    dlse_rows, dk, dv, qo=None):
    """Like :func:`_dense_backward`, from the rows' merged ``out_rows`` and ``lse_rows``
    (+inf where a row has no edge at all); ``dlse_rows`` (or None) enters as one more value
    column of ones whose output the kernel takes as 0, so that ``dS = P (dP - delta +
    dlse)``."""
    nb, bq = piece.rows.shape
    W = piece.keys.size(1)
    H, H_kv = q.size(1), k.size(1)
    G, D, Dv = H // H_kv, q.size(-1), v.size(-1)
    qo, ko, vo = _operands(piece, q, k, v, cdt, qo)
    Q, K, V = qo.heads(nb), ko.heads(nb, G), vo.heads(nb, G)

    def heads_major(x):                      # [nb * bq, H, C] -> [nb, H, bq, C]
        return x.view(nb, bq, H, -1).permute(0, 2, 1, 3)

    O, dO = heads_major(out_rows), heads_major(do_rows)
    if dlse_rows is not None:               # q and k take a zero column: same head size
        Q = torch.cat([Q, Q.new_zeros(Q.shape[:-1] + (1,))], -1)
        K = torch.cat([K, K.new_zeros(K.shape[:-1] + (1,))], -1)
        V = torch.cat([V, V.new_ones(V.shape[:-1] + (1,))], -1)
        O = torch.cat([O, O.new_zeros(O.shape[:-1] + (1,))], -1)
        dO = torch.cat([dO, heads_major(dlse_rows.unsqueeze(-1))], -1)
    lse = lse_rows.view(nb, bq, H).permute(0, 2, 1).unsqueeze(-1)
    mask = _additive(piece.mask, cdt)
    # The kernel's backward runs a thread per (block, head): few blocks are cut into
    # blocks of fewer rows over the same keys, so that every thread has work.
    f = 1
    while nb * H * f < _threads() and bq % (2 * f) == 0 and bq // f > 16:
        f *= 2
    if f > 1:
        Q, O, dO, lse = (_split_rows(t, f) for t in (Q, O, dO, lse))
        K, V = (_repeat_blocks(t, f) for t in (K, V))
        if mask is not None:
            mask = _split_rows(mask.expand(nb, 1, bq, W), f)
    dq, dk_b, dv_b = ops[1](dO, Q, K, V, O, lse.squeeze(-1), 0.0, False, attn_mask=mask,
                            scale=scale)
    if f > 1:
        dq = _join_rows(dq, f)
        dk_b, dv_b = (t.view(nb, f, *t.shape[1:]).sum(1) for t in (dk_b, dv_b))
    kidx = piece.keys.reshape(-1)
    dq, dk_b = dq[..., :D], dk_b[..., :D]
    dv_b = dv_b[..., :Dv]
    if G > 1:                                # GQA: the query heads of a key head summed
        dk_b = dk_b.reshape(nb, H_kv, G, W, D).sum(2)
        dv_b = dv_b.reshape(nb, H_kv, G, W, Dv).sum(2)
    _add_rows(dk, kidx, dk_b.transpose(1, 2))
    _add_rows(dv, kidx, dv_b.transpose(1, 2))
    return dq.permute(0, 2, 1, 3).reshape(nb * bq, H, D), qo


def _threads() -> int:
    return torch.get_num_threads()


def _split_rows(x: Tensor, f: int) -> Tensor:
    """``[nb, Hx, bq, C]`` -> ``[nb * f, Hx, bq / f, C]``: each block's rows in ``f`` parts."""
    nb, Hx, bq, C = x.shape
    return x.reshape(nb, Hx, f, bq // f, C).transpose(1, 2).reshape(nb * f, Hx, bq // f, C)


def _join_rows(x: Tensor, f: int) -> Tensor:
    """Inverse of :func:`_split_rows`."""
    nbf, Hx, r, C = x.shape
    return x.view(nbf // f, f, Hx, r, C).transpose(1, 2).reshape(nbf // f, Hx, f * r, C)


def _repeat_blocks(x: Tensor, f: int) -> Tensor:
    """``[nb, Hx, W, C]`` -> ``[nb * f, Hx, W, C]``: each block's keys for its ``f`` parts."""
    return x.unsqueeze(1).expand(x.size(0), f, *x.shape[1:]).reshape(-1, *x.shape[1:])


def _dense_forward(piece: Dense, q, k, v, scale, cdt, qo=None):
    """``(out, lse)`` of the piece's rows ``[nb * bq, H, Dv]``, ``[nb * bq, H]``, and its
    q operand (for the next piece of the same rows)."""
    ops = flash_ops(q, v)
    if ops is not None:
        return _flash_forward(ops, piece, q, k, v, scale, cdt, qo)
    nb, bq = piece.rows.shape
    H, H_kv = q.size(1), k.size(1)
    G = H // H_kv
    qo, ko, vo = _operands(piece, q, k, v, cdt, qo)
    s = _dense_scores(piece, qo, ko, H, G, scale)
    m = s.amax(-1)
    p = torch.softmax(s, -1)
    del s
    lse = m - torch.log(p.amax(-1))          # p = exp(s - lse): at the largest score
    empty = torch.isneginf(m)                # no edge in this piece: softmax gave NaN
    if bool(empty.any()):
        p.masked_fill_(empty.unsqueeze(-1), 0.0)
        lse.masked_fill_(empty, float("-inf"))
    o = p.new_empty(H, nb, bq, v.size(-1))
    for h in range(H):
        torch.bmm(p[h], vo.head(h // G, nb), out=o[h])
    return _heads_to_rows(o), lse.permute(1, 2, 0).reshape(nb * bq, H), qo


def _dense_backward(piece: Dense, q, k, v, scale, cdt, lse_rows, delta_rows, do_rows,
                    dk, dv, qo=None):
    """Gradients of one dense piece: returns dq of its rows ``[nb * bq, H, D]``, adds dk,
    dv in place. ``lse_rows``, ``delta_rows [nb * bq, H]``, ``do_rows [nb * bq, H, Dv]``."""
    nb, bq = piece.rows.shape
    W = piece.keys.size(1)
    H, H_kv = q.size(1), k.size(1)
    G, D, Dv = H // H_kv, q.size(-1), v.size(-1)
    qo, ko, vo = _operands(piece, q, k, v, cdt, qo)
    p = _dense_scores(piece, qo, ko, H, G, scale)
    p.sub_(lse_rows.t().reshape(H, nb, bq, 1)).exp_()
    do_h = do_rows.view(nb, bq, H, Dv).permute(2, 0, 1, 3)            # [H, nb, bq, Dv]
    dq = p.new_empty(H, nb, bq, D)
    dk_b = p.new_zeros(nb, W, H_kv, D)
    dv_b = p.new_zeros(nb, W, H_kv, Dv)
    delta = delta_rows.t().reshape(H, nb, bq, 1)
    for h in range(H):
        kv_h = h // G
        dv_b[:, :, kv_h] += torch.bmm(p[h].transpose(1, 2), do_h[h])
        ds = torch.bmm(do_h[h], vo.head(kv_h, nb).transpose(1, 2))
        ds.sub_(delta[h]).mul_(p[h])
        torch.bmm(ds, ko.head(kv_h, nb), out=dq[h])
        dk_b[:, :, kv_h] += torch.bmm(ds.transpose(1, 2), qo.head(h, nb))
    kidx = piece.keys.reshape(-1)
    _add_rows(dk, kidx, dk_b.mul_(scale))
    _add_rows(dv, kidx, dv_b)
    return _heads_to_rows(dq).mul_(scale), qo


# ---------------------------------------------------------------------------- sparse pieces
def _sparse_gather(piece: Sparse, q, k, cdt):
    deg = piece.ptr.diff()
    dst = torch.repeat_interleave(torch.arange(piece.rows.numel(), device=q.device), deg,
                                  output_size=piece.src.numel())
    H, H_kv = q.size(1), k.size(1)
    qe = q.index_select(0, piece.rows.index_select(0, dst)).to(cdt).view(
        -1, H_kv, H // H_kv, q.size(-1))
    ke = k.index_select(0, piece.src).to(cdt)
    return dst, qe, ke


def _sparse_forward(piece: Sparse, q, k, v, scale, cdt):
    H, H_kv = q.size(1), k.size(1)
    dst, qe, ke = _sparse_gather(piece, q, k, cdt)
    s = torch.matmul(qe, ke.unsqueeze(-1)).view(-1, H) * scale
    m = segment_max(s, piece.ptr, dst)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m.index_select(0, dst))
    total = segment_sum(p, piece.ptr, dst)
    ve = v.index_select(0, piece.src).to(cdt).unsqueeze(2)            # [E, Hkv, 1, Dv]
    acc = segment_sum((p.view(-1, H_kv, H // H_kv, 1) * ve).view(-1, H, v.size(-1)),
                      piece.ptr, dst)
    o = acc / total.clamp_min(torch.finfo(cdt).tiny).unsqueeze(-1)
    return o, torch.log(total) + m


# ---------------------------------------------------------------------------- passes
def _merge_into(acc_o, acc_l, seen, rows, o, lse):
    """Merge partial results of ``rows`` (distinct) into the chunk's accumulators; rows
    seen for the first time take them as they are."""
    if not bool(seen.index_select(0, rows).any()):
        acc_o.index_copy_(0, rows, o)
        acc_l.index_copy_(0, rows, lse)
    else:
        acc_o[rows], acc_l[rows] = merge(acc_o[rows], acc_l[rows], o, lse)
    seen.index_fill_(0, rows, True)


def _forward(q, k, v, graph, scale):
    cdt = compute_dtype(q.dtype)
    N, H, Dv = q.size(0), q.size(1), v.size(-1)
    ops = flash_ops(q, v)
    classes = prefixes.plan(graph) if ops is not None else None
    if classes is not None:             # rows in groups reading prefixes of one segment
        return prefixes.forward(ops, classes, q, k, v, scale, cdt)
    out = q.new_empty(N, H, Dv)
    lse = torch.empty(N, H, dtype=cdt, device=q.device)
    flash = ops is not None
    for r0, r1 in _row_chunks(graph, H):
        # float32 results go straight into out; 16-bit ones through a chunk accumulator
        acc_o = out[r0:r1] if out.dtype == cdt else torch.empty(r1 - r0, H, Dv, dtype=cdt,
                                                                 device=q.device)
        acc_l = lse[r0:r1]
        acc_o.zero_()
        acc_l.fill_(float("-inf"))
        seen = torch.zeros(r1 - r0, dtype=torch.bool, device=q.device)
        # the key pieces of one batch of blocks share its rows: their partials merge in
        # the batch's own (out, lse) first, then once into the chunk's accumulators
        batch = None                                # [piece, out, lse, q operand]
        for piece in _planned(graph, r0, r1, H, max(q.size(-1), Dv), flash):
            if isinstance(piece, Dense):
                if batch is not None and piece.rows is batch[0].rows:
                    o, l, batch[3] = _dense_forward(piece, q, k, v, scale, cdt, batch[3])
                    batch[1], batch[2] = merge(batch[1], batch[2], o, l)
                    continue
                if batch is not None:
                    _flush_forward(acc_o, acc_l, seen, r0, *batch[:3])
                batch = list((piece,) + _dense_forward(piece, q, k, v, scale, cdt))
            else:
                o, l = _sparse_forward(piece, q, k, v, scale, cdt)
                _merge_into(acc_o, acc_l, seen, piece.rows - r0, o, l)
        if batch is not None:
            _flush_forward(acc_o, acc_l, seen, r0, *batch[:3])
        if acc_o.data_ptr() != out[r0:r1].data_ptr():
            out[r0:r1] = acc_o
    return out, lse


def _flush_forward(acc_o, acc_l, seen, r0, piece: Dense, o, l):
    """Merge a batch's partial ``(o, lse)`` into the chunk's accumulators."""
    if piece.row0 is not None:
        a = piece.row0 - r0
        _merge_slice(acc_o, acc_l, seen, a, a + o.size(0), o, l)
        return
    keep = (piece.rows.view(-1) >= 0).nonzero().view(-1)
    rows = piece.rows.view(-1).index_select(0, keep) - r0
    _merge_into(acc_o, acc_l, seen, rows, o.index_select(0, keep), l.index_select(0, keep))


def _merge_slice(acc_o, acc_l, seen, a, b, o, lse):
    if not bool(seen[a:b].any()):
        acc_o[a:b] = o.view(acc_o[a:b].shape)
        acc_l[a:b] = lse
    else:
        acc_o[a:b], acc_l[a:b] = merge(acc_o[a:b], acc_l[a:b], o, lse)
    seen[a:b] = True


def _add_rows(dst: Tensor, index: Tensor, x: Tensor) -> None:
    dst.view(dst.size(0), -1).index_add_(0, index, x.reshape(index.numel(), -1))


def _backward(q, k, v, out, lse, dout, dlse, graph, scale):
    cdt = compute_dtype(q.dtype)
    N, H = q.size(0), q.size(1)
    H_kv = k.size(1)
    G, D, Dv = H // H_kv, q.size(-1), v.size(-1)
    if dlse is not None and not bool(dlse.any()):
        dlse = None                          # lse unused (autograd passes zeros): no column
    ops = flash_ops(q, v)
    classes = prefixes.plan(graph) if ops is not None and dlse is None else None
    if classes is not None:
        return prefixes.backward(ops, classes, q, k, v, out, lse, dout, scale, cdt)
    dq = torch.empty_like(q)
    dk = torch.zeros(k.shape, dtype=cdt, device=k.device)
    dv = torch.zeros(v.shape, dtype=cdt, device=v.device)
    for r0, r1 in _row_chunks(graph, H):
        do_c = dout[r0:r1].to(cdt)
        o_c = out[r0:r1].to(cdt)
        delta, l_c, dl_c = backward_preamble(o_c, do_c, lse[r0:r1],
                                             None if dlse is None else dlse[r0:r1], dtype=cdt)
        acc = torch.zeros(r1 - r0, H, D, dtype=cdt, device=q.device)
        # the key pieces of one batch of blocks share its rows: their rows' out, dout and
        # lse are gathered once, their dq summed before it goes into the chunk's
        batch = None                            # [rows, local, pad, gathered, dq, q operand]
        for piece in _planned(graph, r0, r1, H, max(D, Dv), ops is not None):
            if isinstance(piece, Dense):
                if batch is None or piece.rows is not batch[0]:
                    if batch is not None:
                        _flush_backward(acc, *batch[1:5])
                    rows = piece.rows.view(-1)
                    pad = rows < 0
                    if piece.row0 is not None:
                        a = piece.row0 - r0
                        local = torch.arange(a, a + rows.numel(), device=q.device)
                        l_rows = l_c[a:a + rows.numel()]
                        got = (o_c[a:a + rows.numel()], do_c[a:a + rows.numel()],
                               None if dl_c is None else dl_c[a:a + rows.numel()],
                               delta[a:a + rows.numel()])
                    else:
                        local = torch.where(pad, 0, rows - r0)
                        l_rows = l_c.index_select(0, local).masked_fill(pad.unsqueeze(-1),
                                                                        float("inf"))
                        got = (o_c.index_select(0, local) if ops is not None else None,
                               do_c.index_select(0, local),
                               None if dl_c is None else dl_c.index_select(0, local),
                               delta.index_select(0, local) if ops is None else None)
                    batch = [piece.rows, local, pad, (l_rows,) + got, None, None]
                l_rows, o_rows, do_rows, dl_rows, d_rows = batch[3]
                if ops is not None:
                    dq_b, batch[5] = _flash_backward(ops, piece, q, k, v, scale, cdt, l_rows,
                                                     o_rows, do_rows, dl_rows, dk, dv,
                                                     batch[5])
                else:
                    dq_b, batch[5] = _dense_backward(piece, q, k, v, scale, cdt, l_rows,
                                                     d_rows, do_rows, dk, dv, batch[5])
                batch[4] = dq_b if batch[4] is None else batch[4].add_(dq_b)
            else:
                local = piece.rows - r0
                dst, qe, ke = _sparse_gather(piece, q, k, cdt)
                s = torch.matmul(qe, ke.unsqueeze(-1)).view(-1, H) * scale
                at = local.index_select(0, dst)
                p = torch.exp(s - l_c.index_select(0, at))
                ve = v.index_select(0, piece.src).to(cdt)                     # [E, Hkv, Dv]
                do_e = do_c.index_select(0, at).view(-1, H_kv, G, Dv)
                dp = torch.matmul(do_e, ve.unsqueeze(-1)).view(-1, H)
                ds = p * (dp - delta.index_select(0, at))
                dq_r = segment_sum((ds.view(-1, H_kv, G, 1) * ke.unsqueeze(2)).view(-1, H, D),
                                   piece.ptr, dst) * scale
                _add_rows(acc, local, dq_r)
                _add_rows(dk, piece.src, (ds.view(-1, H_kv, G, 1) * qe).sum(2) * scale)
                _add_rows(dv, piece.src, (p.view(-1, H_kv, G, 1) * do_e).sum(2))
        if batch is not None:
            _flush_backward(acc, *batch[1:5])
        dq[r0:r1] = acc
    return dq, dk.to(k.dtype), dv.to(v.dtype)


def _flush_backward(acc, local, pad, gathered, dq_b):
    """Add a batch's dq (its rows' sum over its key pieces) into the chunk's."""
    if not bool(pad.any()):
        _add_rows(acc, local, dq_b)
        return
    keep = (~pad).nonzero().view(-1)
    _add_rows(acc, local.index_select(0, keep), dq_b.index_select(0, keep))


# ---------------------------------------------------------------------------- the custom op
# Attention on a rule is a torch.library custom op with a fake (shape) implementation and
# autograd, so torch.compile sees one opaque node: the pieces are cut from the rule on the
# host when the op runs, never traced. The rule enters as its ImplicitGraph.key, an empty
# tensor that finds the graph again (implicit_of); torch.compile passes it as a graph input,
# so another graph of the same sizes runs the same compiled code.
@torch.library.custom_op("attngraph::range_attention", mutates_args=())
def _attention_op(q: Tensor, k: Tensor, v: Tensor, key: Tensor, scale: float
                  ) -> Tuple[Tensor, Tensor]:
    with running("ranges"):
        return _forward(q, k, v, implicit_of(key), scale)


@_attention_op.register_fake
def _(q, k, v, key, scale):
    return (q.new_empty(q.size(0), q.size(1), v.size(-1)),
            q.new_empty(q.size(0), q.size(1), dtype=compute_dtype(q.dtype)))


@torch.library.custom_op("attngraph::range_attention_backward", mutates_args=())
def _attention_backward_op(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                           dout: Tensor, dlse: Optional[Tensor], key: Tensor, scale: float
                           ) -> Tuple[Tensor, Tensor, Tensor]:
    if dlse is not None and not bool(dlse.any()):
        dlse = None         # autograd's zeros for an unused lse: no extra value column
    return _backward(q, k, v, out, lse, dout, dlse, implicit_of(key), scale)


@_attention_backward_op.register_fake
def _(q, k, v, *rest):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, key, scale = inputs
    out, lse = output
    ctx.scale = scale
    ctx.save_for_backward(q, k, v, key, out, lse)


def _backward_formula(ctx, dout, dlse):
    q, k, v, key, out, lse = ctx.saved_tensors
    dq, dk, dv = _attention_backward_op(q, k, v, out, lse, dout.contiguous(), dlse, key,
                                        ctx.scale)
    return dq, dk, dv, None, None


_attention_op.register_autograd(_backward_formula, setup_context=_setup_context)


def attention(q: Tensor, k: Tensor, v: Tensor, graph, scale: float
              ) -> Tuple[Tensor, Tensor]:
    """Attention over an implicit graph's rule -> ``(out, lse)``.

    ``q [N_dst, H, D]``, ``k [N_src, H_kv, D]``, ``v [N_src, H_kv, D_v]`` (validated,
    node-major, any float dtype: pieces compute in float32, float64 for float64 inputs);
    ``out`` in q's dtype, ``lse`` in the compute dtype. Differentiable in q, k, v (and
    through lse), eagerly and under torch.compile (the ``attngraph::range_attention`` op).
    """
    return _attention_op(q, k, v, graph.key, float(scale))
