"""Dense tiles where the graph is dense, edges where it is sparse.

A *tile plan* cuts the ``[num_dst, num_src]`` mask into ``block_q x block_k`` tiles. A tile
holding enough edges runs as dense math: two batched matmuls over contiguous query and key
rows, with an exact in-tile mask, as FlexAttention and FlashAttention do. The edges left
over (the *residual*) run on a per-edge backend. The two partial softmax states, each an
output and a log-sum-exp per query, are merged exactly by log-sum-exp, so the result is the
attention of the whole graph, forward and backward.

Which tiles run dense is decided by cost, in the plan (:mod:`attngraph.ops.plan`): a tile
costs about ``block_q * block_k`` cells of dense work whatever it holds, an edge on the
per-edge path about ``EDGE_COST_CELLS`` cells (measured by
``benchmarks/calibrate_tiles.py``), so a tile pays from ``min_density = 1 / EDGE_COST_CELLS``.

How the dense part runs: each query block's tiles form one row of ``L * block_k`` keys (a
*run*); keys and values of runs whose key blocks are consecutive and step evenly (windows)
are strided views, not copies. On CPU, where the value head size equals the key's, a chunk
of runs is one call of ATen's fused flash-attention kernel (the scores never stored; the
in-tile masks, made additive once per plan, ride as its ``attn_mask``), which returns the
lse, and its backward runs from the tiles' ``out`` and ``lse`` (``dlse`` as one more value
column of ones). Elsewhere one ``bmm`` per kv head scores a chunk of runs, one ``softmax``
normalises whole rows and one ``bmm`` aggregates values; the backward recomputes ``p =
exp(s - lse)`` run by run, as FlashAttention does. Both accumulate ``dK``/``dV`` by key
block; an edge bias that needs a gradient takes the matmul engine (``dS`` is its
gradient). On CUDA tensors the same code runs on cuBLAS (``backend="tiles"``) and the residual
edges on the fused per-edge kernels; the GPU design this stands in for
(docs/ARCHITECTURE.md, "Tiles") is a tile kernel: one CTA per (query block, kv head) walking
its runs with tensor-core MMAs and an online softmax, the plan's tile lists as its schedule
(the layout FlexAttention's Triton kernel reads from a BlockMask, which
:meth:`TokenGraph.to_block_mask` produces), the lse written for the merge. ``backend="auto"`` keeps the fused kernels on CUDA until the two are
measured against each other on a GPU.

Inputs of :func:`attention` are node-major and GQA-grouped as for every backend
(``q [N_dst, H, D]``, ``k [N_src, H_kv, D]``, ``v [N_src, H_kv, D_v]``, ``bias`` ``None`` or
``[E, nb]`` with ``H % nb == 0``); a query without edges gets output 0 and lse ``-inf``.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from attngraph import chunks
from attngraph.checks import check_bias_values
from attngraph.graph import TokenGraph, graph_of
from attngraph.ops.plan import (BLOCK_SIZES, CELL_COST, DEFAULT_BLOCK, EDGE_COST_CELLS,
                                TilePlan, build_plan, plan_cost, tile_counts)
from attngraph.ops import chunked
from attngraph.ops.numerics import backward_preamble, compute_dtype, merge
from attngraph.ops.ranges import flash_ops
from attngraph.ops.record import running

__all__ = ["TilePlan", "build_plan", "tile_counts", "plan_cost", "attention", "merge",
           "EDGE_COST_CELLS", "CELL_COST", "BLOCK_SIZES", "DEFAULT_BLOCK",
           "MAX_TILE_ELEMENTS"]

# Score elements computed at once (read from attngraph.chunks at call time).
MAX_TILE_ELEMENTS = chunks.MAX_TILE_ELEMENTS

def _q_blocks(x: Tensor, plan: TilePlan, kv_heads: int, scale: float = 1.0) -> Tensor:
    nq, bq = plan.num_q_blocks, plan.block_q
    pad = nq * bq - x.size(0)
    if pad:
        x = torch.cat([x, x.new_zeros(pad, *x.shape[1:])])
    G, C = x.size(1) // kv_heads, x.size(-1)
    x = x.view(nq, bq, kv_heads, G, C).permute(2, 0, 3, 1, 4)
    out = torch.empty(kv_heads, nq, G, bq, C, dtype=x.dtype, device=x.device)
    if scale == 1.0:
        out.copy_(x)
    else:
        torch.mul(x, scale, out=out)                       # the scale rides on the copy
    return out.view(kv_heads, nq, G * bq, C)


def _from_q_blocks(x: Tensor, plan: TilePlan, n: int) -> Tensor:
    H_kv, nq, rows, C = x.shape
    G = rows // plan.block_q
    x = x.view(H_kv, nq, G, plan.block_q, C).permute(1, 3, 0, 2, 4)
    return x.reshape(nq * plan.block_q, H_kv * G, C)[:n].contiguous()


def _k_blocks(x: Tensor, plan: TilePlan) -> Tensor:
    nk, bk = plan.num_k_blocks, plan.block_k
    pad = nk * bk - x.size(0)
    if pad:
        x = torch.cat([x, x.new_zeros(pad, *x.shape[1:])])
    return x.view(nk, bk, x.size(1), x.size(2)).permute(2, 0, 1, 3).contiguous()


def _from_k_blocks(x: Tensor, n: int) -> Tensor:
    H_kv, nk, bk, C = x.shape
    return x.permute(1, 2, 0, 3).reshape(nk * bk, H_kv, C)[:n].contiguous()


def _run_masks(plan: TilePlan) -> List[Optional[Tensor]]:
    """Per run group, bool ``[n, bq, L * bk]``: True where a run's cell is *not* an edge
    (None for a group of full tiles only). Built on first use, kept with the plan."""
    if plan._run_masks is None:
        plan._run_masks = []
        for L, _, tiles, _ in plan.segments:
            mi = plan.mask_index[tiles]
            if not bool((mi > 0).any()):
                plan._run_masks.append(None)
                continue
            n, bq, bk = tiles.size(0), plan.block_q, plan.block_k
            off = ~plan.masks.index_select(0, mi.reshape(-1)).view(n, L, bq, bk)
            plan._run_masks.append(off.transpose(1, 2).reshape(n, bq, L * bk))
    return plan._run_masks


def _additive_masks(plan: TilePlan, dtype: torch.dtype) -> List[Optional[Tensor]]:
    """:func:`_run_masks` as the flash kernel takes them: ``[n, bq, L * bk]``, 0 on the
    edges and ``-inf`` off them, in ``dtype``. Built on first use, kept with the plan."""
    if plan._additive_masks is None:
        plan._additive_masks = {}
    if dtype not in plan._additive_masks:
        plan._additive_masks[dtype] = [
            None if off is None else torch.zeros(off.shape, dtype=dtype, device=off.device)
            .masked_fill_(off, -math.inf) for off in _run_masks(plan)]
    return plan._additive_masks[dtype]


def _empty_rows(plan: TilePlan) -> List[Optional[Tensor]]:
    """Per run group, bool ``[n, bq]``: True where a run's row holds no edge (None where
    every row holds one). Built on first use, kept with the plan."""
    if plan._empty_rows is None:
        plan._empty_rows = []
        for off in _run_masks(plan):
            empty = None if off is None else off.all(-1)
            plan._empty_rows.append(empty if empty is not None and bool(empty.any())
                                    else None)
    return plan._empty_rows


def _chunks(plan: TilePlan, heads: int, flash: Optional[torch.dtype] = None):
    """``(blocks [n], tiles [n, L], rank [n], off [n, bq, L*bk] or None, empty [n, bq] or
    None)`` pieces of the plan's runs, each within ``MAX_TILE_ELEMENTS`` score elements
    (``heads`` of them per cell: the flash kernel stores no scores, only its mask, so
    ``heads`` is the mask's). ``off`` is True where a cell is not an edge, or with
    ``flash`` (a dtype) the additive mask of :func:`_additive_masks`; ``empty``: the rows
    without an edge (:func:`_empty_rows`)."""
    masks = _run_masks(plan) if flash is None else _additive_masks(plan, flash)
    for (L, blocks, tiles, rank), off, empty in zip(plan.segments, masks, _empty_rows(plan)):
        per = max(1, chunks.MAX_TILE_ELEMENTS // (heads * plan.block_q * L * plan.block_k))
        for i in range(0, blocks.numel(), per):
            yield (blocks[i:i + per], tiles[i:i + per], rank[i:i + per],
                   None if off is None else off[i:i + per],
                   None if empty is None else empty[i:i + per])


def _add_rows(dst: Tensor, index: Tensor, src: Tensor) -> None:
    """``dst[:, index] += src`` along dim 1, one kv head at a time on 2-D views (torch's
    CPU ``index_add_`` is far slower on a many-dimensional destination)."""
    for h in range(dst.size(0)):
        dst[h].view(dst.size(1), -1).index_add_(0, index, src[h].reshape(index.numel(), -1))


def _block_rows(blocks: Tensor):
    """Query blocks ``blocks`` as a ``slice`` where they are consecutive (read in place by
    :func:`_pick`), else the index itself."""
    b0, n = int(blocks[0]), blocks.numel()
    if n == 1 or bool((blocks.diff() == 1).all()):
        return slice(b0, b0 + n)
    return blocks


def _pick(x: Tensor, rows) -> Tensor:
    """``x[:, rows]`` of ``x [Hkv, nB, ...]`` (``rows`` from :func:`_block_rows`): a view of
    a slice, else gathered by :func:`_take_blocks`."""
    return x[:, rows] if isinstance(rows, slice) else _take_blocks(x, rows)


def _take_blocks(x: Tensor, index: Tensor) -> Tensor:
    """``x[:, index]`` of ``x [Hkv, nB, ...]``, one kv head at a time on 2-D views (as
    :func:`_add_rows`: torch's CPU ``index_select`` along dim 1 of a 4-D tensor is several
    times slower)."""
    out = x.new_empty((x.size(0), index.numel()) + x.shape[2:])
    for h in range(x.size(0)):
        torch.index_select(x[h].view(x.size(1), -1), 0, index,
                           out=out[h].view(index.numel(), -1))
    return out


def _bmm(a: Tensor, b: Tensor) -> Tensor:
    """``[Hkv, n, i, j] @ [Hkv, n, j, k] -> [Hkv, n, i, k]``, one ``bmm`` per kv head:
    ``torch.matmul`` copies a transposed or strided 4-D operand first (2-3x slower on CPU),
    ``bmm`` reads it in place."""
    out = a.new_empty(a.size(0), a.size(1), a.size(2), b.size(3))
    for h in range(a.size(0)):
        torch.bmm(a[h], b[h], out=out[h])
    return out


def _even_step(kblocks: Tensor, L: int) -> Optional[int]:
    """The step (in blocks) between consecutive runs' first key blocks when every run is
    ``L`` consecutive key blocks and the starts step evenly, else None."""
    if kblocks.size(0) > 1:
        steps = kblocks[1:, 0] - kblocks[:-1, 0]
        if int(steps.min()) != int(steps.max()) or int(steps[0]) < 0:
            return None
        step = int(steps[0])
    else:
        step = 0
    if L > 1 and not bool((kblocks.diff(dim=1) == 1).all()):
        return None
    return step


def _run_view(x: Tensor, first: int, step: int, n: int, L: int) -> Tensor:
    """``[Hkv, n, L * bk, C]`` view of key blocks ``first + i * step ... + L - 1`` of
    ``x [Hkv, nK, bk, C]`` (contiguous), without a copy."""
    H_kv, nk, bk, C = x.shape
    return x.as_strided((H_kv, n, L * bk, C), (nk * bk * C, step * bk * C, C, 1),
                        x.storage_offset() + first * bk * C)


class _Tiles:
    """One call's blocked operands and the scores of any run of tiles."""

    def __init__(self, plan: TilePlan, q: Tensor, k: Tensor, v: Tensor, scale: float,
                 bias: Optional[Tensor]):
        self.plan = plan
        self.H, self.H_kv = q.size(1), k.size(1)
        self.qh = _q_blocks(q, plan, self.H_kv, scale)                 # [Hkv, nQ, G*bq, D]
        self.kh = _k_blocks(k, plan)                                    # [Hkv, nK, bk, D]
        self.vh = _k_blocks(v, plan)
        self.bias = bias
        if bias is not None:
            self.edge_ptr, self.edges, self.cell = plan.tile_edges()

    def gather(self, rows, tiles: Tensor):
        """``(q [Hkv, n, G*bq, D], key block ids [n * L], k [Hkv, n, L*bk, D], v)`` of query
        blocks ``rows`` (:func:`_block_rows`).

        Runs of consecutive key blocks whose starts step evenly (a window's runs) are read
        in place through strided views; others are gathered."""
        n, L = tiles.shape
        kblocks = self.plan.tile_k[tiles]
        kidx = kblocks.reshape(-1)
        step = _even_step(kblocks, L)
        if step is None:
            kg, vg = (_take_blocks(x, kidx).view(self.H_kv, n, -1, x.size(-1))
                      for x in (self.kh, self.vh))
        else:
            kg, vg = (_run_view(x, int(kblocks[0, 0]), step, n, L) for x in (self.kh, self.vh))
        return _pick(self.qh, rows), kidx, kg, vg

    def _edge_cells(self, tiles: Tensor) -> Tuple[Tensor, Tensor]:
        """The tile edges of a run chunk and their cells in ``[n, bq, L * bk]``."""
        plan = self.plan
        n, L = tiles.shape
        flat_tiles = tiles.reshape(-1)
        counts = plan.tile_edge_count[flat_tiles]
        starts = torch.repeat_interleave(self.edge_ptr[flat_tiles], counts)
        offsets = torch.arange(starts.numel(), device=starts.device) - torch.repeat_interleave(
            torch.cumsum(counts, 0) - counts, counts)
        at = starts + offsets
        slot = torch.repeat_interleave(torch.arange(n * L, device=starts.device), counts)
        cell = self.cell[at]
        row, col = cell // plan.block_k, cell % plan.block_k
        j, l = slot // L, slot % L
        flat = ((j * plan.block_q + row) * L + l) * plan.block_k + col
        return self.edges[at], flat

    def scores(self, qg: Tensor, kg: Tensor, tiles: Tensor, off: Optional[Tensor]) -> Tensor:
        """Masked (and biased) scores ``[Hkv, n, G*bq, L*bk]`` of one run chunk (``off``:
        its cells that are not edges)."""
        plan, H, H_kv = self.plan, self.H, self.H_kv
        bq, bk = plan.block_q, plan.block_k
        n, L = tiles.shape
        s = _bmm(qg, kg.transpose(-1, -2))
        per_head = s.view(H_kv, n, -1, bq, L * bk)                     # [Hkv, n, G, bq, .]
        if self.bias is None:
            if off is not None:
                per_head.masked_fill_(off.unsqueeze(1), float("-inf"))
            return s
        # the bias carries the mask: -inf off the edges, the edge's bias on them
        edges, flat = self._edge_cells(tiles)
        nb = self.bias.size(1)
        dense = s.new_full((n * bq * L * bk, nb), float("-inf"))
        dense[flat] = self.bias.index_select(0, edges)
        # head h = kvh * G + g reads bias column h % nb (a bias broadcast over a batch)
        dense = dense.view(n, bq, L * bk, nb).permute(3, 0, 1, 2).repeat(H // nb, 1, 1, 1)
        per_head.add_(dense.view(H_kv, -1, n, bq, L * bk).transpose(1, 2))
        return s

    def mask_heads(self, flash) -> int:
        """Score elements per cell of a run chunk: every head's on the matmul engine, the
        mask's on the flash kernel (query heads of a kv head stacked in its rows)."""
        if not flash:
            return self.H
        return self.H if self.bias is not None else self.H // self.H_kv

    def additive(self, tiles: Tensor, off: Optional[Tensor]) -> Optional[Tensor]:
        """The flash kernel's ``attn_mask`` of one run chunk (``off``: its additive mask
        from :func:`_additive_masks`, None for full tiles): ``[n, 1, G*bq, L*bk]``, or
        ``[n, Hkv, G*bq, L*bk]`` with the bias on the edges; None for full tiles without
        a bias."""
        plan, H, H_kv = self.plan, self.H, self.H_kv
        bq, bk = plan.block_q, plan.block_k
        n, L = tiles.shape
        G = H // H_kv
        if self.bias is None:
            if off is None:
                return None
            return (off if G == 1 else off.repeat(1, G, 1)).unsqueeze(1)
        edges, flat = self._edge_cells(tiles)
        nb = self.bias.size(1)
        dense = self.qh.new_full((n * bq * L * bk, nb), float("-inf"))
        dense[flat] = self.bias.index_select(0, edges)
        dense = dense.view(n, bq, L * bk, nb).permute(0, 3, 1, 2).repeat(1, H // nb, 1, 1)
        return dense.reshape(n, H_kv, G * bq, L * bk)

    def bias_grad(self, ds: Tensor, tiles: Tensor, dbias: Tensor) -> None:
        edges, flat = self._edge_cells(tiles)
        H_kv, n = ds.size(0), ds.size(1)
        bq = self.plan.block_q
        per_cell = ds.view(H_kv, n, -1, bq, ds.size(-1)).permute(1, 3, 4, 0, 2)
        g = per_cell.reshape(-1, self.H).index_select(0, flat)           # [E_c, H]
        dbias[edges] = g.view(g.size(0), -1, dbias.size(1)).sum(1)


def _flash_run(ops, tiles: _Tiles, qg, kg, vg, run, off, empty) -> Tuple[Tensor, Tensor]:
    """One run chunk on ATen's CPU flash kernel -> ``(o [Hkv, n, G*bq, Dv], lse [Hkv, n,
    G*bq])``; a row without an edge on these tiles (``empty``; with a bias, also a row whose
    every bias is -inf) gets ``lse = -inf`` (and ``o = 0``)."""
    mask = tiles.additive(run, off)
    o, l = ops[0](qg.transpose(0, 1), kg.transpose(0, 1), vg.transpose(0, 1),
                  attn_mask=mask, scale=1.0)
    o, l = o.transpose(0, 1), l.transpose(0, 1)
    # the kernel gives a row whose every score is -inf output 0 but lse 0
    if tiles.bias is not None:
        empty = torch.isneginf(mask).all(-1).transpose(0, 1)         # [Hkv, n, G*bq]
    elif empty is not None:
        empty = empty.repeat(1, tiles.H // tiles.H_kv).unsqueeze(0)  # [1, n, G*bq]
    if empty is not None and bool(empty.any()):
        l = l.masked_fill(empty, float("-inf"))
    return o, l


def _forward(tiles: _Tiles, dv: int) -> Tuple[Tensor, Tensor]:
    """Attention over the plan's tiles -> ``(out [Hkv, nQ, G*bq, D_v], lse [Hkv, nQ, G*bq])``."""
    plan = tiles.plan
    qh = tiles.qh
    out = qh.new_zeros(qh.size(0), qh.size(1), qh.size(2), dv)
    lse = qh.new_full(qh.shape[:3], float("-inf"))
    ops = flash_ops(qh, tiles.vh)
    flash = None if ops is None else qh.dtype
    for blocks, run, rank, off, empty in _chunks(plan, tiles.mask_heads(ops), flash):
        qg, kidx, kg, vg = tiles.gather(_block_rows(blocks), run)
        if ops is not None:
            o, l = _flash_run(ops, tiles, qg, kg, vg, run, off, empty)
        else:
            s = tiles.scores(qg, kg, run, off)
            m = s.amax(-1)
            p = torch.softmax(s, -1)
            del s
            # p = exp(s - lse), so at the row's largest score: lse = m - log(max p)
            l = m - torch.log(p.amax(-1))
            empty = torch.isneginf(m)   # a row with no edge on these tiles: softmax gives NaN
            if bool(empty.any()):
                p.masked_fill_(empty.unsqueeze(-1), 0.0)
                l.masked_fill_(empty, float("-inf"))
            o = _bmm(p, vg)
            del p
        if bool((plan.segments_per_block[blocks] == 1).all()):
            out.index_copy_(1, blocks, o)
            lse.index_copy_(1, blocks, l)
            continue
        # a long row in several runs: merge them (out starts at 0 / -inf, which merges
        # into a run's result unchanged); a block has at most one run of each rank
        for r in torch.unique(rank).tolist():
            sel = rank == r
            rows = blocks[sel]
            out[:, rows], lse[:, rows] = merge(out[:, rows], lse[:, rows], o[:, sel],
                                               l[:, sel])
    return out, lse


def _backward(tiles: _Tiles, out: Tensor, lse: Tensor, dout: Tensor, dlse: Optional[Tensor],
              scale: float, bias_grad: bool):
    """Gradients over the plan's tiles; ``out``, ``lse``, ``dout``, ``dlse`` blocked."""
    plan = tiles.plan
    dqh, dkh, dvh = (torch.zeros_like(x) for x in (tiles.qh, tiles.kh, tiles.vh))
    ops = None if bias_grad else flash_ops(tiles.qh, tiles.vh)    # dbias needs dS
    # the flash kernel takes dlse as a value column: it needs no delta
    delta, lse, dlse = backward_preamble(out, dout, lse, dlse, delta=ops is None)
    if ops is not None:
        _flash_backward(ops, tiles, out, lse, dout, dlse, dqh, dkh, dvh)
        return dqh * scale, dkh, dvh, None
    dbias = tiles.bias.new_zeros(tiles.bias.shape) if bias_grad else None
    for blocks, run, rank, off, _ in _chunks(plan, tiles.H):
        rows = _block_rows(blocks)
        qg, kidx, kg, vg = tiles.gather(rows, run)
        p = tiles.scores(qg, kg, run, off).sub_(_pick(lse, rows).unsqueeze(-1)).exp_()
        dog = _pick(dout, rows)                                        # [Hkv, n, G*bq, Dv]
        _add_rows(dvh, kidx, _bmm(p.transpose(-1, -2), dog))
        ds = _bmm(dog, vg.transpose(-1, -2))
        ds.sub_(_pick(delta, rows).unsqueeze(-1)).mul_(p)
        del p
        if dbias is not None:
            tiles.bias_grad(ds, run, dbias)
        _add_rows(dqh, blocks, _bmm(ds, kg))
        _add_rows(dkh, kidx, _bmm(ds.transpose(-1, -2), qg))
    return dqh * scale, dkh, dvh, dbias


def _flash_backward(ops, tiles: _Tiles, out, lse, dout, dlse, dqh, dkh, dvh) -> None:
    """The tiles' gradients on ATen's CPU flash backward, run chunk by run chunk, from the
    blocked ``out`` and ``lse`` (``+inf`` in rows without edges) of all the tiles of each
    row, so that a run's share is exact; ``dlse`` enters as one more value column of ones
    (q and k take a zero column), whose output the kernel is told is 0, so that ``dS = P
    (dP - delta + dlse)``."""
    def column(x, fill):                               # [Hkv, n, rows, C] -> C + 1
        return torch.cat([x, x.new_full(x.shape[:-1] + (1,), fill)], -1)

    for blocks, run, rank, off, _ in _chunks(tiles.plan, tiles.mask_heads(ops), out.dtype):
        rows = _block_rows(blocks)
        qg, kidx, kg, vg = tiles.gather(rows, run)
        o, do = _pick(out, rows), _pick(dout, rows)
        if dlse is not None:
            qg, kg, vg, o = column(qg, 0.0), column(kg, 0.0), column(vg, 1.0), column(o, 0.0)
            do = torch.cat([do, _pick(dlse, rows).unsqueeze(-1)], -1)
        dq, dk, dv = ops[1](do.transpose(0, 1), qg.transpose(0, 1), kg.transpose(0, 1),
                            vg.transpose(0, 1), o.transpose(0, 1),
                            _pick(lse, rows).transpose(0, 1), 0.0, False,
                            attn_mask=tiles.additive(run, off), scale=1.0)
        D, Dv = dqh.size(-1), dvh.size(-1)
        _add_rows(dqh, blocks, dq[..., :D].transpose(0, 1))
        _add_rows(dkh, kidx, dk[..., :D].transpose(0, 1))
        _add_rows(dvh, kidx, dv[..., :Dv].transpose(0, 1))


# ---------------------------------------------------------------------------- whole passes
# The forward merges the tiles' and the residual's partial states; the backward takes the
# rows' merged out and lse, from which each part's share of every gradient is exact (p = exp(s
# - lse) of the whole row, delta = rowsum(dout . out) - dlse), so the parts' backward passes
# run side by side and add up, without the merge's own backward.
def _in_plan_order(plan: TilePlan, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor]):
    if plan.order is None:
        return q, k, v, bias
    src_order = plan.src_order
    return (q.index_select(0, plan.order), k.index_select(0, src_order),
            v.index_select(0, src_order),
            None if bias is None else bias.index_select(0, plan.edge_perm))


def _to_graph_order(x: Optional[Tensor], perm: Optional[Tensor]) -> Optional[Tensor]:
    """Row ``n`` of ``x`` computed in a plan's order is row ``perm[n]`` of the graph's."""
    if x is None or perm is None:
        return x
    return x.new_empty(x.shape).index_copy(0, perm, x)


def _residual_forward(name: str, q, k, v, graph, scale, bias) -> Tuple[Tensor, Tensor]:
    """``(out, lse)`` of ``graph``'s edges on the per-edge backend ``name``."""
    if name == "cupy":
        from attngraph.ops.cuda import fused

        return fused.attention(q, k, v, graph, scale, bias)
    return chunked.attention(q, k, v, graph, scale, bias)


def _residual_backward(name: str, q, k, v, graph, scale, bias, out, lse, dout, dlse,
                       bias_grad: bool):
    """Gradients of ``graph``'s edges on the per-edge backend ``name``, from the rows'
    merged ``out`` and ``lse`` (its backward operator)."""
    cdt = compute_dtype(q.dtype)
    ptr, src, dst = graph.ptr, graph.src, graph.dst
    if name == "cupy":
        q, k, v = (t.contiguous() for t in (q, k, v))
        bias = None if bias is None else bias.to(torch.float32).contiguous()
        grads = torch.ops.attngraph.graph_attention_backward(
            q, k, v, bias, out.to(q.dtype), lse.float(), dout.to(q.dtype).contiguous(),
            None if dlse is None else dlse.float(), ptr, src, dst, graph.num_src, scale,
            bias_grad)
    else:
        q, k, v = (t.to(cdt).contiguous() for t in (q, k, v))
        bias = None if bias is None else bias.to(cdt).contiguous()
        grads = torch.ops.attngraph.chunked_attention_backward(
            q, k, v, bias, out.to(cdt), lse.to(cdt), dout.to(cdt).contiguous(),
            None if dlse is None else dlse.to(cdt), ptr, src, dst, graph.num_src, scale,
            chunks.MAX_CHUNK_ELEMENTS, bias_grad)
    dq, dk, dv, dbias = grads
    return dq, dk, dv, dbias if bias_grad else None


def _blocked_lse(lse: Tensor, plan: TilePlan, kv_heads: int) -> Tensor:
    """``lse [n, H]`` blocked as the tiles' forward leaves it: ``-inf`` in padding rows."""
    n = lse.size(0)
    padded = lse.new_full((plan.num_q_blocks * plan.block_q, lse.size(1)), float("-inf"))
    padded[:n] = lse
    return _q_blocks(padded.unsqueeze(-1), plan, kv_heads).squeeze(-1)


def _plan_forward(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], plan: TilePlan,
                  scale: float, residual: str) -> Tuple[Tensor, Tensor]:
    """``(out, lse)`` of the plan's tiles and residual edges, merged (no autograd)."""
    dtype = q.dtype
    cdt = compute_dtype(dtype)
    q, k, v, bias = _in_plan_order(plan, q, k, v, bias)
    parts = []
    if plan.num_tiles:
        q_c, k_c, v_c = (t.to(cdt).contiguous() for t in (q, k, v))
        bias_c = None if bias is None else bias.to(cdt)
        out_b, lse_b = _forward(_Tiles(plan, q_c, k_c, v_c, scale, bias_c), v.size(-1))
        n = q.size(0)
        parts.append((_from_q_blocks(out_b, plan, n),
                      _from_q_blocks(lse_b.unsqueeze(-1), plan, n).squeeze(-1)))
    if plan.num_residual_edges or not parts:
        res_bias = None if bias is None else bias.index_select(0, plan.residual_edges)
        out_r, lse_r = _residual_forward(residual, q, k, v, plan.residual, scale, res_bias)
        parts.append((out_r.to(cdt), lse_r.to(cdt)))
    out, lse = parts[0] if len(parts) == 1 else merge(*parts[0], *parts[1])
    return _to_graph_order(out, plan.order).to(dtype), _to_graph_order(lse, plan.order)


def _plan_backward(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], out: Tensor,
                   lse: Tensor, dout: Tensor, dlse: Optional[Tensor], plan: TilePlan,
                   scale: float, residual: str, bias_grad: bool):
    """``(dq, dk, dv, dbias or None)`` of :func:`_plan_forward` from its merged ``out`` and
    ``lse``: the tiles' share plus the residual's."""
    dtypes = q.dtype, k.dtype, v.dtype
    cdt = compute_dtype(q.dtype)
    q, k, v, bias = _in_plan_order(plan, q, k, v, bias)
    if plan.order is not None:
        out, lse, dout = (x.index_select(0, plan.order) for x in (out, lse, dout))
        dlse = None if dlse is None else dlse.index_select(0, plan.order)
    n, H_kv = q.size(0), k.size(1)
    dq = torch.zeros(q.shape, dtype=cdt, device=q.device)
    dk = torch.zeros(k.shape, dtype=cdt, device=k.device)
    dv = torch.zeros(v.shape, dtype=cdt, device=v.device)
    dbias = torch.zeros(bias.shape, dtype=cdt, device=bias.device) if bias_grad else None
    if plan.num_tiles:
        q_c, k_c, v_c = (t.to(cdt).contiguous() for t in (q, k, v))
        tiles = _Tiles(plan, q_c, k_c, v_c, scale, None if bias is None else bias.to(cdt))
        dlse_b = None if dlse is None else _q_blocks(
            dlse.to(cdt).unsqueeze(-1), plan, H_kv).squeeze(-1)
        dqh, dkh, dvh, db = _backward(tiles, _q_blocks(out.to(cdt), plan, H_kv),
                                      _blocked_lse(lse.to(cdt), plan, H_kv),
                                      _q_blocks(dout.to(cdt), plan, H_kv), dlse_b, scale,
                                      bias_grad)
        dq += _from_q_blocks(dqh, plan, n)
        dk += _from_k_blocks(dkh, k.size(0))
        dv += _from_k_blocks(dvh, k.size(0))
        if db is not None:
            dbias += db
    if plan.num_residual_edges:
        res_bias = None if bias is None else bias.index_select(0, plan.residual_edges)
        dq_r, dk_r, dv_r, db_r = _residual_backward(residual, q, k, v, plan.residual, scale,
                                                    res_bias, out, lse, dout, dlse, bias_grad)
        dq += dq_r
        dk += dk_r
        dv += dv_r
        if db_r is not None:
            dbias.index_add_(0, plan.residual_edges, db_r.to(cdt))
    dq = _to_graph_order(dq, plan.order)
    dk, dv = (_to_graph_order(x, plan.src_order) for x in (dk, dv))
    if dbias is not None:
        dbias = _to_graph_order(dbias, plan.edge_perm).to(bias.dtype)
    return dq.to(dtypes[0]), dk.to(dtypes[1]), dv.to(dtypes[2]), dbias


class _TileAttention(torch.autograd.Function):
    """``(q, k, v, bias) -> (out, lse)`` over a given plan (node-major in and out)."""

    @staticmethod
    def forward(ctx, q, k, v, bias, plan, scale, residual):
        out, lse = _plan_forward(q, k, v, bias, plan, scale, residual)
        ctx.plan, ctx.scale, ctx.residual = plan, scale, residual
        ctx.save_for_backward(q, k, v, bias, out, lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, bias, out, lse = ctx.saved_tensors
        bias_grad = bias is not None and ctx.needs_input_grad[3]
        dq, dk, dv, dbias = _plan_backward(q, k, v, bias, out, lse, dout, dlse, ctx.plan,
                                           ctx.scale, ctx.residual, bias_grad)
        return dq, dk, dv, dbias, None, None, None


# ---------------------------------------------------------------------------- the custom op
# The tile path on a graph's own plan is a torch.library custom op with a fake (shape)
# implementation and autograd, so torch.compile sees one opaque node: the plan is built (or
# taken from graph.caches.plan) on the host when the op runs, never traced. The graph enters
# as its (ptr, src, dst) tensors, which find it again (graph_of) with its order and plans.
# With ``auto`` the op asks the dispatcher's "auto" when it runs whether the plan pays, as an
# eager call does before it (torch.compile traces no tile counts): where it does not, the
# graph's edges run on the per-edge backend ``residual``.
def _op_plan(graph: TokenGraph, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor],
             auto: bool) -> Optional[TilePlan]:
    """The graph's tile plan, or None where ``auto`` runs the whole graph per edge."""
    if auto:
        from attngraph.ops.dispatch import Inputs, select_backend

        if select_backend("auto", Inputs.of(q, k, v, graph, bias)).name != "tiles":
            return None
    return graph.tile_plan()


@torch.library.custom_op("attngraph::tile_attention", mutates_args=())
def _attention_op(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], ptr: Tensor,
                  src: Tensor, dst: Tensor, num_src: int, scale: float, residual: str,
                  auto: bool, check_bias: bool) -> Tuple[Tensor, Tensor]:
    if check_bias and bias is not None:    # graph_attention could not check while traced
        check_bias_values(bias)
    graph = graph_of(ptr, src, dst, num_src, ptr.numel() - 1)
    plan = _op_plan(graph, q, k, v, bias, auto)
    with running("tiles" if plan is not None else residual):
        if plan is None:
            out, lse = _residual_forward(residual, q, k, v, graph, scale, bias)
            return out.to(q.dtype), lse.to(compute_dtype(q.dtype))
        return _plan_forward(q, k, v, bias, plan, scale, residual)


@_attention_op.register_fake
def _(q, k, v, bias, *rest):
    return (q.new_empty(q.size(0), q.size(1), v.size(-1)),
            q.new_empty(q.size(0), q.size(1), dtype=compute_dtype(q.dtype)))


@torch.library.custom_op("attngraph::tile_attention_backward", mutates_args=())
def _attention_backward_op(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor],
                           out: Tensor, lse: Tensor, dout: Tensor, dlse: Optional[Tensor],
                           ptr: Tensor, src: Tensor, dst: Tensor, num_src: int, scale: float,
                           residual: str, auto: bool, bias_grad: bool
                           ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    graph = graph_of(ptr, src, dst, num_src, ptr.numel() - 1)
    plan = _op_plan(graph, q, k, v, bias, auto)
    if dlse is not None and not bool(dlse.any()):
        dlse = None         # autograd's zeros for an unused lse: no extra value column
    if plan is None:
        dq, dk, dv, dbias = _residual_backward(residual, q, k, v, graph, scale, bias, out,
                                               lse, dout, dlse, bias_grad)
        dq, dk, dv = dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
        dbias = None if dbias is None else dbias.to(bias.dtype)
    else:
        dq, dk, dv, dbias = _plan_backward(q, k, v, bias, out, lse, dout, dlse, plan, scale,
                                           residual, bias_grad)
    return dq, dk, dv, (dbias if dbias is not None else q.new_empty(0))


@_attention_backward_op.register_fake
def _(q, k, v, bias, out, lse, dout, *rest):
    bias_grad = rest[-1]
    dbias = torch.empty_like(bias) if bias_grad and bias is not None else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dbias


def _setup_context(ctx, inputs, output):
    q, k, v, bias, ptr, src, dst = inputs[:7]
    ctx.num_src, ctx.scale, ctx.residual, ctx.auto = inputs[7:11]   # inputs[11]: check_bias
    out, lse = output
    ctx.save_for_backward(q, k, v, bias, out, lse, ptr, src, dst)
    ctx.has_bias = bias is not None


def _backward_formula(ctx, dout, dlse):
    q, k, v, bias, out, lse, ptr, src, dst = ctx.saved_tensors
    bias_grad = ctx.has_bias and ctx.needs_input_grad[3]
    dq, dk, dv, dbias = _attention_backward_op(q, k, v, bias, out, lse, dout.contiguous(),
                                               dlse, ptr, src, dst, ctx.num_src, ctx.scale,
                                               ctx.residual, ctx.auto, bias_grad)
    return (dq, dk, dv, dbias if bias_grad else None) + (None,) * 8


_attention_op.register_autograd(_backward_formula, setup_context=_setup_context)


def attention(q: Tensor, k: Tensor, v: Tensor, graph: TokenGraph, scale: float,
              bias: Optional[Tensor] = None, *, plan: Optional[TilePlan] = None,
              residual: str = "torch", auto: bool = False) -> Tuple[Tensor, Tensor]:
    """Graph attention on dense tiles plus per-edge residual -> ``(out, lse)``.

    ``q [N_dst, H, D]``, ``k [N_src, H_kv, D]``, ``v [N_src, H_kv, D_v]`` (validated,
    node-major); ``bias`` ``None`` or ``[E, nb]``. ``plan`` defaults to
    ``graph.tile_plan()``; the residual edges run on the per-edge backend named
    ``residual`` (``"torch"`` or ``"cupy"``: the dispatcher passes the one ``auto`` takes
    for these tensors). Computes in float32 (float64 for float64 inputs); returns ``out``
    in the input dtype and ``lse`` in the compute dtype. Differentiable in q, k, v and bias.

    On the graph's own plan this is the ``attngraph::tile_attention`` operator, eagerly
    and under torch.compile (the plan is made when the operator runs, never traced); with
    ``auto`` the operator runs the whole graph on ``residual`` where ``backend="auto"``
    would not take tiles (the dispatcher sets it under torch.compile, which cannot ask).
    """
    if residual not in ("torch", "cupy"):
        raise ValueError(f"residual must be 'torch' or 'cupy', got {residual!r}")
    if plan is not None or graph.is_implicit:
        plan = graph.tile_plan() if plan is None else plan
        return _TileAttention.apply(q, k, v, bias, plan, float(scale), residual)
    # traced by torch.compile, graph_attention skipped the data-dependent bias check: the op
    # makes it when it runs
    return _attention_op(q, k, v, bias, graph.ptr, graph.src, graph.dst, graph.num_src,
                         float(scale), residual, bool(auto), torch.compiler.is_compiling())
