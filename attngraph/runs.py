"""The vocabulary of runs: how a mask rule names the keys of each query row, and the
builder that turns runs into canonical edges.

Most masks give every query row a few *runs* of keys: an arithmetic progression
(a window, a dilated window, a whole document) -- a :class:`Range` -- or a slice of a sorted
table of key ids (global tokens, a hash bucket, the keys of some blocks) -- a :class:`Take`.
:func:`from_runs` turns per-row runs into a :class:`~attngraph.TokenGraph` in canonical
``(dst, src)`` order without sorting, in row chunks of about
:data:`attngraph.chunks.CHUNK_EDGES` edges, so temporaries stay small whatever ``E`` is.
Implicit graphs (:mod:`attngraph.implicit`) keep the rule itself and call it per row chunk.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence, Union

import torch
from torch import Tensor

from attngraph import chunks
from attngraph.chunks import row_chunks
from attngraph.graph import TokenGraph

__all__ = ["Range", "Take", "Run", "from_runs", "fill_rows", "run_values", "wrap",
           "empty_graph", "union", "keep_edges"]


# ---------------------------------------------------------------------------- runs
class Range(NamedTuple):
    """Keys ``start[i] + step * k`` for ``k < count[i]`` in query row i."""
    start: Tensor
    count: Tensor
    step: int = 1


class Take(NamedTuple):
    """Keys ``table[lo[i] + k]`` for ``k < count[i]`` in query row i (``table`` sorted)."""
    table: Tensor
    lo: Tensor
    count: Tensor


Run = Union[Range, Take]


def wrap(edge_index: Tensor, num_src: int, num_dst: int) -> TokenGraph:
    """TokenGraph around a canonical ``[2, E]`` int64 tensor, taken as is (no copy)."""
    return TokenGraph._from_edge_index(edge_index, num_src, num_dst)


def empty_graph(num_src: int, num_dst: int, device=None) -> TokenGraph:
    return wrap(torch.empty(2, 0, dtype=torch.long, device=device), num_src, num_dst)


def run_values(run: Run, rows: Tensor, k: Tensor) -> Tensor:
    """Key of the k-th element of ``run`` in each of ``rows`` (broadcasting)."""
    if isinstance(run, Range):
        return run.start[rows] + k * run.step
    return run.table[run.lo[rows] + k]


def from_runs(num_src: int, num_dst: int, runs: Sequence[Run], *, device=None,
              dtype: torch.dtype = torch.long) -> TokenGraph:
    """Graph whose query row i holds the keys of ``runs[0]``, then ``runs[1]``, ... .

    The caller guarantees that inside a row the keys are strictly increasing across the
    runs' concatenation (runs disjoint and in key order), so the result is canonical
    without a sort. Rows of one chunk that all have the same run lengths (the interior of
    a window, most block rows) are written as one broadcast; the rest through a ragged
    index. ``dtype``: the node ids' (int32 graphs are written through an int64 chunk).
    """
    device = runs[0].count.device if runs else device
    counts = [r.count.to(torch.long) for r in runs]
    runs = [r._replace(count=c) for r, c in zip(runs, counts)]
    deg = torch.zeros(num_dst, dtype=torch.long, device=device)
    for c in counts:
        deg += c
    ptr = torch.zeros(num_dst + 1, dtype=torch.long, device=device)
    torch.cumsum(deg, 0, out=ptr[1:])
    if dtype == torch.int32 and int(ptr[-1]) >= 2 ** 31:
        raise ValueError(f"int32 node ids need fewer than 2^31 edges, this graph has "
                         f"{int(ptr[-1]):,}")
    out = torch.empty(2, int(ptr[-1]), dtype=dtype, device=device)
    for r0, r1 in row_chunks(ptr, chunks.CHUNK_EDGES):
        if dtype == torch.long:
            fill_rows(out, ptr, deg, runs, r0, r1)
        else:
            e0, e1 = int(ptr[r0]), int(ptr[r1])
            chunk = torch.empty(2, e1 - e0, dtype=torch.long, device=device)
            fill_rows(chunk, ptr, deg, runs, r0, r1, base=e0)
            out[:, e0:e1].copy_(chunk)
    return wrap(out, num_src, num_dst)


def fill_rows(out: Tensor, ptr: Tensor, deg: Tensor, runs: Sequence[Run], r0: int,
               r1: int, base: int = 0) -> None:
    """Write rows ``[r0, r1)`` into ``out[:, ptr[r0] - base : ptr[r1] - base]``."""
    e0, e1 = int(ptr[r0]), int(ptr[r1])
    if e1 == e0:
        return
    device = out.device
    src_out, dst_out = out[0, e0 - base:e1 - base], out[1, e0 - base:e1 - base]
    rows = torch.arange(r0, r1, device=device)
    lengths = torch.stack([r.count[r0:r1] for r in runs])            # [S, R]
    if bool((lengths == lengths[:, :1]).all()):
        # Every row of the chunk has the same run lengths: the rows form an [R, width] grid.
        R = r1 - r0
        width = (e1 - e0) // R
        dst_out.view(R, width).copy_(rows.view(-1, 1).expand(R, width))
        grid = src_out.view(R, width)
        col = 0
        for run, length in zip(runs, lengths[:, 0].tolist()):
            if not length:
                continue
            k = torch.arange(length, device=device).view(1, -1)
            part = grid[:, col:col + length]
            if isinstance(run, Range):
                torch.add(run.start[r0:r1].view(-1, 1), k * run.step, out=part)
            elif length == width:
                torch.index_select(run.table, 0, (run.lo[r0:r1].view(-1, 1) + k).view(-1),
                                   out=src_out)
            else:
                part.copy_(run.table[run.lo[r0:r1].view(-1, 1) + k])
            col += length
        return
    # Ragged rows: per-edge row id (local to the chunk), then values run by run.
    local = torch.arange(r1 - r0, device=device)
    row = torch.repeat_interleave(local, deg[r0:r1], output_size=e1 - e0)
    torch.add(row, r0, out=dst_out)
    first = ptr[r0:r1] - e0                         # where each row starts in the chunk
    active = [(run, length) for run, length in zip(runs, lengths) if bool(length.any())]
    if len(active) == 1:
        # One run fills the rows: key = f(row) + position, position = edge - first[row].
        run = active[0][0]
        edge = torch.arange(e1 - e0, device=device)
        if isinstance(run, Take):
            torch.index_select(run.table, 0, (run.lo[r0:r1] - first)[row] + edge, out=src_out)
        elif run.step == 1:
            torch.add((run.start[r0:r1] - first)[row], edge, out=src_out)
        else:
            torch.add(run.start[r0:r1][row], (edge - first[row]) * run.step, out=src_out)
        return
    offset = first.clone()
    for run, length in active:
        total = int(length.sum())
        row = torch.repeat_interleave(local, length, output_size=total)
        k = torch.arange(total, device=device) - (torch.cumsum(length, 0) - length)[row]
        src_out[offset[row] + k] = run_values(run, row + r0, k)
        offset += length


# ---------------------------------------------------------------------------- union
def union(*graphs: TokenGraph) -> TokenGraph:
    """Union of graphs over the same nodes, merged row chunk by row chunk.

    Same result as ``g | h``, but each sort only spans a chunk of rows.
    """
    first = graphs[0]
    num_src, num_dst, device = first.num_src, first.num_dst, first.device
    ptrs = [g.ptr for g in graphs]
    bound = torch.stack(ptrs).sum(0)
    srcs, dsts = [], []
    width = max(num_src, 1)
    for r0, r1 in row_chunks(bound, chunks.CHUNK_EDGES):
        keys = torch.cat([(g.dst[p[r0]:p[r1]].long() - r0) * width + g.src[p[r0]:p[r1]]
                          for g, p in zip(graphs, ptrs)])
        keys = torch.unique(keys, sorted=True)
        srcs.append(keys % width)
        dsts.append(torch.div(keys, width, rounding_mode="floor") + r0)
    if not srcs:
        return empty_graph(num_src, num_dst, device)
    out = torch.empty(2, sum(s.numel() for s in srcs), dtype=torch.long, device=device)
    torch.cat(srcs, out=out[0])
    torch.cat(dsts, out=out[1])
    return wrap(out, num_src, num_dst)


def keep_edges(graph: TokenGraph, keep: Tensor) -> TokenGraph:
    """Subgraph with the edges where ``keep`` (bool ``[E]``) is True; order is preserved."""
    ei = graph.edge_index.as_tensor()[:, keep].long()
    return wrap(ei.contiguous(), graph.num_src, graph.num_dst)
