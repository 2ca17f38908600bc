"""Shared pieces of the mask generators: argument checks and a builder of canonical edges.

Most masks give every query row a few *runs* of keys: an arithmetic progression
(a window, a dilated window, a whole document) or a slice of a sorted table of key ids
(global tokens, a hash bucket, the keys of some blocks). :func:`from_runs` turns per-row
runs into a :class:`TokenGraph` in canonical ``(dst, src)`` order without sorting, in row
chunks of about ``CHUNK_EDGES`` edges, so temporaries stay small whatever ``E`` is.
"""
from __future__ import annotations

import operator
from typing import Iterator, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from attngraph.graph import TokenGraph

# Edges produced per step of `from_runs` / `union`: large enough that per-chunk overhead
# vanishes, small enough that temporaries stay in cache and far below E.
CHUNK_EDGES = 1 << 20


# ---------------------------------------------------------------------------- checks
def check_int(name: str, value, *, minimum: int = 0, maximum: Optional[int] = None) -> int:
    """``value`` as a Python int in ``[minimum, maximum]``; TypeError for non-integers
    (bool included)."""
    if isinstance(value, bool) or isinstance(value, float):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {value!r} "
                        f"({type(value).__name__})") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_nodes(name: str, value) -> int:
    """A token count: an int in ``[0, MAX_NODES]`` (see :data:`attngraph.graph.MAX_NODES`)."""
    from attngraph.graph import MAX_NODES

    value = check_int(name, value)
    if value > MAX_NODES:
        raise ValueError(f"{name}={value} exceeds the {MAX_NODES:,} tokens a TokenGraph can "
                         f"hold (int32 node ids)")
    return value


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r} "
                        f"({type(value).__name__})")
    return value


def as_index_tensor(name: str, value, *, device=None) -> Tensor:
    """A list / tuple / range / 1-D integer tensor of ids as a 1-D int64 tensor."""
    if isinstance(value, Tensor):
        if value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
            raise TypeError(f"{name} must hold integers, got a {value.dtype} tensor")
        if value.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {list(value.shape)}")
        return value.to(device=device, dtype=torch.long)
    if not isinstance(value, (list, tuple, range)):
        raise TypeError(f"{name} must be a list, tuple or 1-D integer tensor, got "
                        f"{type(value).__name__}")
    items = [check_int(f"{name}[{k}]", v, minimum=-(1 << 63)) for k, v in enumerate(value)]
    return torch.tensor(items, dtype=torch.long, device=device)


def check_1d_tensor(name: str, value, kind: str) -> Tensor:
    """A 1-D tensor holding integers (``kind="int"``) or booleans (``kind="bool"``)."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a 1-D torch.Tensor of {kind}s, got "
                        f"{type(value).__name__}")
    if kind == "bool" and value.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True = keep), got {value.dtype}; "
                        f"use {name} != 0")
    if kind == "int" and (value.dtype == torch.bool or value.is_floating_point()
                          or value.is_complex()):
        raise TypeError(f"{name} must be an integer tensor, got {value.dtype}")
    if value.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {list(value.shape)}")
    return value


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


def row_chunks(ptr: Tensor, chunk: Optional[int] = None) -> Iterator[Tuple[int, int]]:
    """Consecutive row ranges ``[r0, r1)`` holding about ``chunk`` edges each (at least a row).

    ``chunk`` defaults to ``CHUNK_EDGES``, read at call time (tests shrink it).
    """
    chunk = CHUNK_EDGES if chunk is None else chunk
    num_rows, total = ptr.numel() - 1, int(ptr[-1])
    if num_rows <= 0:
        return
    targets = torch.arange(chunk, max(total, chunk), chunk, device=ptr.device)
    cuts = torch.searchsorted(ptr, targets).clamp_(1, num_rows).tolist()
    r0 = 0
    for r1 in cuts + [num_rows]:
        if r1 > r0:
            yield r0, r1
            r0 = r1


def _values(run: Run, rows: Tensor, k: Tensor) -> Tensor:
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
    for r0, r1 in row_chunks(ptr):
        if dtype == torch.long:
            _fill_rows(out, ptr, deg, runs, r0, r1)
        else:
            e0, e1 = int(ptr[r0]), int(ptr[r1])
            chunk = torch.empty(2, e1 - e0, dtype=torch.long, device=device)
            _fill_rows(chunk, ptr, deg, runs, r0, r1, base=e0)
            out[:, e0:e1].copy_(chunk)
    return wrap(out, num_src, num_dst)


def rule_graph(num_src: int, num_dst: int, runs, *, implicit: bool, name: str,
               state: Optional[dict] = None) -> TokenGraph:
    """The graph of a rule ``runs(rows, state) -> [Run, ...]``: kept as the rule
    (:class:`attngraph.implicit.ImplicitGraph`) with ``implicit``, else built at once by
    :func:`from_runs` over every row."""
    state = {} if state is None else state
    if implicit:
        from attngraph.implicit import ImplicitGraph

        return ImplicitGraph(runs, num_src, num_dst, name=name, state=state)
    return from_runs(num_src, num_dst, runs(torch.arange(num_dst, dtype=torch.long), state))


def _fill_rows(out: Tensor, ptr: Tensor, deg: Tensor, runs: Sequence[Run], r0: int,
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
        src_out[offset[row] + k] = _values(run, row + r0, k)
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
    for r0, r1 in row_chunks(bound):
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
