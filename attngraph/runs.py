"""The vocabulary of runs: how a mask rule names the keys of each query row, and the
builder that turns runs into canonical edges.

Most masks give every query row a few *runs* of keys: an arithmetic progression
(a window, a dilated window, a whole document) -- a :class:`Range` -- or a slice of a sorted
table of key ids (global tokens, a hash bucket, the keys of some blocks) -- a :class:`Take`.
:func:`from_runs` turns per-row runs into a :class:`~attngraph.TokenGraph` in canonical
``(dst, src)`` order without sorting, in row chunks of about
:data:`attngraph.chunks.CHUNK_EDGES` edges, so temporaries stay small whatever ``E`` is.
Implicit graphs (:mod:`attngraph.implicit`) keep the rule itself and call it per row chunk.

The run algebra at the end (:func:`union_runs`, :func:`meet_runs`, :func:`minus_runs`)
combines two rules' runs of the same rows into disjoint runs of the same kinds, counting
keys below bounds (:func:`below`) instead of generating them; :func:`from_runs` with
``ordered=False`` turns such runs, disjoint but not in key order, into canonical edges.
"""
from __future__ import annotations

import weakref
from typing import NamedTuple, Sequence, Union

import torch
from torch import Tensor

from attngraph import chunks
from attngraph.chunks import row_chunks
from attngraph.graph import TokenGraph

__all__ = ["Range", "Take", "Run", "from_runs", "fill_rows", "run_values", "wrap",
           "empty_graph", "union", "keep_edges", "below", "contains", "minus", "meet",
           "subtract", "union_runs", "meet_runs", "minus_runs"]


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
              dtype: torch.dtype = torch.long, ordered: bool = True) -> TokenGraph:
    """Graph whose query row i holds the keys of ``runs[0]``, then ``runs[1]``, ... .

    The caller guarantees that inside a row the keys are strictly increasing across the
    runs' concatenation (runs disjoint and in key order), so the result is canonical
    without a sort. Rows of one chunk that all have the same run lengths (the interior of
    a window, most block rows) are written as one broadcast; the rest through a ragged
    index. ``dtype``: the node ids' (int32 graphs are written through an int64 chunk).

    With ``ordered=False`` the runs of a row need only be disjoint, in any order (what a
    composition of rules gives): each key is written at its rank among its row's keys,
    the count of keys below it in every run (:func:`below`), still without a sort.
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
    fill = fill_rows if ordered else fill_rows_ranked
    for r0, r1 in row_chunks(ptr, chunks.CHUNK_EDGES):
        if dtype == torch.long:
            fill(out, ptr, deg, runs, r0, r1)
        else:
            e0, e1 = int(ptr[r0]), int(ptr[r1])
            chunk = torch.empty(2, e1 - e0, dtype=torch.long, device=device)
            fill(chunk, ptr, deg, runs, r0, r1, base=e0)
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


def _rows_of(run: Run, r0: int, r1: int) -> Run:
    if isinstance(run, Range):
        return Range(run.start[r0:r1], run.count[r0:r1], run.step)
    return Take(run.table, run.lo[r0:r1], run.count[r0:r1])


def fill_rows_ranked(out: Tensor, ptr: Tensor, deg: Tensor, runs: Sequence[Run], r0: int,
                     r1: int, base: int = 0) -> None:
    """:func:`fill_rows` for runs disjoint in each row but in any order: a key's place in
    its row is its position in its run plus the keys of the other runs below it."""
    sub = [r for r in (_rows_of(run, r0, r1) for run in runs) if bool((r.count > 0).any())]
    if len(sub) <= 1:
        fill_rows(out, ptr, deg, runs, r0, r1, base)
        return
    e0, e1 = int(ptr[r0]), int(ptr[r1])
    device = out.device
    src_out, dst_out = out[0, e0 - base:e1 - base], out[1, e0 - base:e1 - base]
    local = torch.arange(r1 - r0, device=device)
    row = torch.repeat_interleave(local, deg[r0:r1], output_size=e1 - e0)
    torch.add(row, r0, out=dst_out)
    first = ptr[r0:r1] - e0
    for i, run in enumerate(sub):
        cnt = run.count
        total = int(cnt.sum())
        if not total:
            continue
        r = torch.repeat_interleave(local, cnt, output_size=total)
        k = torch.arange(total, device=device) - (torch.cumsum(cnt, 0) - cnt)[r]
        key = key_at(run, k, r)
        rank = first[r] + k
        for j, other in enumerate(sub):
            if j != i:
                rank += below(other, key, r)
        src_out[rank] = key


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


# ---------------------------------------------------------------------------- run algebra
# Sets of runs per row, combined without generating their keys: a run minus (or met with)
# an interval, a same-step lattice or a slice of the same sorted table is a slice of the run
# (the keys on either side, or in between), found by counting keys below a bound; a run
# minus a few single keys (global ids, a dilated lattice crossing a window's tail) is cut
# at those keys. What no rule covers is generated for the rows at hand and kept as a Take
# of those rows' remaining keys.

# At most this many keys of another run cut a run per row (else the cut is generated).
MAX_CUTS = 16
# Candidate keys enumerated per row chunk to find the cuts: at most this many per row.
CUT_CANDIDATES_PER_ROW = 4
# At most this many runs per row chunk come out of one composition (else generated).
MAX_RUNS = 64


def normalized(run: Run) -> Run:
    """``run`` with int64 per-row tensors."""
    if isinstance(run, Range):
        return Range(run.start.long(), run.count.long(), int(run.step))
    return Take(run.table.long(), run.lo.long(), run.count.long())


def is_empty(run: Run) -> bool:
    """No key in any row (one host sync)."""
    return not int(run.count.count_nonzero())


def _take_at(table: Tensor, pos: Tensor) -> Tensor:
    if not table.numel():
        return torch.zeros_like(pos)
    return table[pos.clamp(0, table.numel() - 1)]


def key_at(run: Run, k: Tensor, idx: Tensor = None) -> Tensor:
    """Key at position ``k`` of ``run`` in its rows (``idx``: the row of each ``k``;
    positions outside the run give some key, never an index error)."""
    if isinstance(run, Range):
        start = run.start if idx is None else run.start[idx]
        return start + k * run.step
    lo = run.lo if idx is None else run.lo[idx]
    return _take_at(run.table, lo + k)


# Tables up to this size are checked once for being sorted as a whole (global ids, block
# columns): then one searchsorted finds every bound.
SORTED_CHECK = 1 << 16
_SORTED: dict = {}          # id(table) -> (version, sorted), dropped with the table


def sorted_table(t: Tensor) -> bool:
    """Whether ``t`` is strictly increasing as a whole (remembered per tensor and version;
    tables over :data:`SORTED_CHECK` entries are not checked and read as unsorted)."""
    if t.numel() < 2:
        return True
    if t.numel() > SORTED_CHECK:
        return False
    known = _SORTED.get(id(t))
    if known is not None and known[0] == t._version:
        return known[1]
    result = bool((t[1:] > t[:-1]).all())
    if known is None:
        weakref.finalize(t, _SORTED.pop, id(t), None)
    _SORTED[id(t)] = (t._version, result)
    return result


def _search(table: Tensor, lo: Tensor, count: Tensor, x: Tensor) -> Tensor:
    """Entries of each slice ``table[lo : lo + count]`` (sorted) smaller than ``x``: one
    searchsorted where the whole table is sorted, else a binary search on every slice at
    once (only slices are sorted, not the table)."""
    if not x.numel():
        return torch.zeros_like(x)
    if sorted_table(table):
        pos = torch.searchsorted(table, x)
        return torch.minimum((pos - lo).clamp_min(0), count)
    a, b = lo.clone(), lo + count
    span = int(count.max())
    for _ in range(max(span, 1).bit_length()):
        mid = torch.div(a + b, 2, rounding_mode="floor")
        right = (a < b) & (_take_at(table, mid) < x)
        left = (a < b) & ~right
        a = torch.where(right, mid + 1, a)
        b = torch.where(left, mid, b)
    return a - lo


def below(run: Run, x: Tensor, idx: Tensor = None) -> Tensor:
    """How many keys of ``run`` are smaller than ``x``, per row (``idx``: the row of each
    ``x``; else ``x`` is aligned with the run's rows)."""
    count = run.count if idx is None else run.count[idx]
    if isinstance(run, Range):
        start = run.start if idx is None else run.start[idx]
        n = x - start if run.step == 1 else torch.div(x - start + (run.step - 1), run.step,
                                                      rounding_mode="floor")
        return torch.minimum(n.clamp_min_(0), count)
    lo = run.lo if idx is None else run.lo[idx]
    return _search(run.table, lo, count, x)


def contains(run: Run, x: Tensor, idx: Tensor) -> Tensor:
    """Whether key ``x`` is in ``run``'s row ``idx`` (bool, elementwise)."""
    count = run.count[idx]
    if isinstance(run, Range):
        d = x - run.start[idx]
        return (d >= 0) & (torch.remainder(d, run.step) == 0) & (
            torch.div(d, run.step, rounding_mode="floor") < count)
    lo = run.lo[idx]
    pos = _search(run.table, lo, count, x)
    return (pos < count) & (_take_at(run.table, lo + pos) == x)


def piece(run: Run, a, b: Tensor) -> Run:
    """Positions ``[a, b)`` of ``run`` in each row (``0 <= a``, ``b <= count``; ``b < a``
    reads as empty; ``a`` None: from the first)."""
    if a is None:
        return run._replace(count=b)
    n = (b - a).clamp_min_(0)
    if isinstance(run, Range):
        return Range(run.start + a * run.step, n, run.step)
    return Take(run.table, run.lo + a, n)


def _same_sorted_table(x: Take, y: Take) -> bool:
    if not sorted_table(x.table):
        return False
    return x.table is y.table or (x.table.numel() == y.table.numel()
                                  and torch.equal(x.table, y.table))


def _span_rule(x: Run, y: Run):
    """``(a, b)``: positions of ``x`` whose keys lie in ``y`` are exactly ``[a, b)`` (the
    keys of ``x`` inside ``y``'s first..last key), or None where that does not hold:
    ``y`` an interval, a lattice whose step divides ``x``'s, or a slice of the same sorted
    table as ``x``."""
    cx, cy = x.count, y.count
    if isinstance(y, Range):
        if y.step == 1:
            compat = None
        elif isinstance(x, Range) and x.step % y.step == 0:
            compat = torch.remainder(x.start - y.start, y.step) == 0
        else:
            return None
    elif isinstance(x, Take) and _same_sorted_table(x, y):
        compat = None
    else:
        return None
    # an empty y gives b = a: the cut removes nothing
    first = y.start if isinstance(y, Range) else _take_at(y.table, y.lo)
    if isinstance(y, Range):
        end = first + cy if y.step == 1 else key_at(y, cy - 1) + 1
    else:
        end = torch.where(cy > 0, key_at(y, cy - 1) + 1, first)
    a = below(x, first)
    b = torch.maximum(a, below(x, end))
    if compat is not None:
        a = torch.where(compat, a, cx)
        b = torch.where(compat, b, cx)
    return a, b


def _hits(x: Run, y: Run):
    """``(rows, hits)``: the rows where keys of ``x`` are in ``y``, and those keys'
    positions in ``x``, ``[len(rows), H]`` (ascending per row, ``count`` where a row has
    fewer than H); None where more than :data:`MAX_CUTS` per row or too many candidates to
    look at."""
    cx = x.count
    R = cx.numel()
    none = cx.new_zeros(0)
    if not R:
        return none, None
    first = x.start if isinstance(x, Range) else _take_at(x.table, x.lo)
    last = key_at(x, cx - 1)
    idx = None
    if isinstance(y, Take) and sorted_table(y.table):
        # only rows whose keys reach the table's first..last key can be cut
        if not y.table.numel():
            return none, None
        t0, t1 = y.table[0], y.table[-1]
        idx = ((cx > 0) & (last >= t0) & (first <= t1)).nonzero().view(-1)
        first, last = first[idx], last[idx]
    ya = below(y, first, idx)
    nc = (below(y, last + 1, idx) - ya).clamp_min_(0)
    if idx is None:
        nc = torch.where(cx > 0, nc, 0)
    total = int(nc.sum())
    if total > CUT_CANDIDATES_PER_ROW * R + 4096:
        return None
    if not total:
        return none, None
    row = torch.repeat_interleave(torch.arange(nc.numel(), device=cx.device), nc,
                                  output_size=total)
    k = torch.arange(total, device=cx.device) - (torch.cumsum(nc, 0) - nc)[row]
    k += ya[row]
    if idx is not None:
        row = idx[row]
    key = key_at(y, k, row)
    if isinstance(x, Range):
        d = key - x.start[row]
        on = torch.remainder(d, x.step) == 0
        pos = torch.div(d, x.step, rounding_mode="floor")
    else:
        pos = _search(x.table, x.lo[row], cx[row], key)
        on = _take_at(x.table, x.lo[row] + pos) == key
    row, pos = row[on], pos[on]
    if not row.numel():
        return none, None
    nh = torch.bincount(row, minlength=R)
    H = int(nh.max())
    if H > MAX_CUTS:
        return None
    rows = nh.nonzero().view(-1)
    local = torch.cumsum(nh > 0, 0) - 1                 # row -> its place in rows
    nh = nh[rows]
    hits = cx[rows].view(-1, 1).repeat(1, H)
    rank = torch.arange(row.numel(), device=cx.device) - (torch.cumsum(nh, 0) - nh)[local[row]]
    hits[local[row], rank] = pos
    return rows, hits


def _gather(run: Run, idx: Tensor) -> Run:
    if isinstance(run, Range):
        return Range(run.start[idx], run.count[idx], run.step)
    return Take(run.table, run.lo[idx], run.count[idx])


def _spread(x: Run, idx: Tensor, parts) -> list:
    """Pieces of ``x`` over all rows from ``parts``, its pieces over rows ``idx``: the other
    rows keep ``x`` whole, in the first piece (the others share one allocation)."""
    R = x.count.numel()
    count = x.count.clone()
    count[idx] = parts[0].count
    more = x.count.new_zeros(2, len(parts) - 1, R)
    if isinstance(x, Range):
        start = x.start.clone()
        start[idx] = parts[0].start
        out = [Range(start, count, x.step)]
    else:
        lo = x.lo.clone()
        lo[idx] = parts[0].lo
        out = [Take(x.table, lo, count)]
    for j, p in enumerate(parts[1:]):
        more[0, j, idx] = p.count
        if isinstance(x, Range):
            more[1, j, idx] = p.start
            out.append(Range(more[1, j], more[0, j], x.step))
        else:
            more[1, j, idx] = p.lo
            out.append(Take(x.table, more[1, j], more[0, j]))
    return out


# Where one of two runs holds keys in at most 1 / SPARSE_SHARE of the rows (the global
# rows of a Longformer mask, the rows a cut left a piece in), their cut is computed on
# those rows only.
SPARSE_SHARE = 8


def _on_few_rows(fn, x: Run, y: Run):
    """``fn(x, y)`` (a list of pieces of ``x``, or None), computed on the rows where the
    sparser of the two holds keys when they are few."""
    R = x.count.numel()
    nx, ny = int(x.count.count_nonzero()), int(y.count.count_nonzero())
    if not nx or not ny:
        return [] if fn is _meet_pair else [x]
    sparse = x if nx <= ny else y
    if min(nx, ny) * SPARSE_SHARE > R:
        return fn(x, y)
    idx = sparse.count.nonzero().view(-1)
    parts = fn(_gather(x, idx), _gather(y, idx))
    if parts is None:
        return None
    if fn is _meet_pair:
        return [_spread_zero(p, idx, R) for p in parts]
    return _spread(x, idx, parts)


def _spread_zero(p: Run, idx: Tensor, R: int) -> Run:
    """A piece over rows ``idx`` as a run over all ``R`` rows (empty elsewhere)."""
    count = p.count.new_zeros(R)
    count[idx] = p.count
    if isinstance(p, Range):
        start = p.start.new_zeros(R)
        start[idx] = p.start
        return Range(start, count, p.step)
    lo = p.lo.new_zeros(R)
    lo[idx] = p.lo
    return Take(p.table, lo, count)


def minus(x: Run, y: Run):
    """The keys of ``x`` not in ``y``, per row, as runs of ``x``'s kind (at most
    ``MAX_CUTS + 1``), or None where no rule covers it."""
    return _on_few_rows(_minus_pair, x, y)


def meet(x: Run, y: Run):
    """The keys of ``x`` also in ``y``, per row, as runs, or None where no rule covers it."""
    return _on_few_rows(_meet_pair, x, y)


def _minus_pair(x: Run, y: Run):
    span = _span_rule(x, y)
    if span is not None:
        a, b = span
        return [piece(x, None, a), piece(x, b, x.count)]
    found = _hits(x, y)
    if found is None:
        return None
    rows, hits = found
    if hits is None:
        return [x]
    R = x.count.numel()
    sub = _gather(x, rows) if rows.numel() < R else x
    bounds = torch.cat([torch.full_like(sub.count, -1).view(-1, 1), hits,
                        sub.count.view(-1, 1)], 1)
    parts = [piece(sub, torch.minimum(bounds[:, j] + 1, sub.count), bounds[:, j + 1])
             for j in range(bounds.size(1) - 1)]
    return parts if rows.numel() == R else _spread(x, rows, parts)


def _meet_pair(x: Run, y: Run):
    span = _span_rule(x, y)
    if span is not None:
        return [piece(x, *span)]
    span = _span_rule(y, x)
    if span is not None:
        return [piece(y, *span)]
    found = _hits(x, y)
    if found is None:
        return None
    rows, hits = found
    if hits is None:
        return []
    R = x.count.numel()
    sub = _gather(x, rows) if rows.numel() < R else x
    parts = [piece(sub, hits[:, j], torch.minimum(hits[:, j] + 1, sub.count))
             for j in range(hits.size(1))]
    return parts if rows.numel() == R else [_spread_zero(p, rows, R) for p in parts]


def _live(runs) -> list:
    return [r for r in runs if not is_empty(r)]


def subtract(x: Run, ys: Sequence[Run]):
    """The keys of ``x`` in no run of ``ys``, per row, as runs of ``x``'s kind, or None
    where no rule covers it (or the pieces would exceed :data:`MAX_RUNS`)."""
    parts = [x]
    for y in ys:
        out = []
        for p in parts:
            cut = minus(p, y)
            if cut is None:
                return None
            out += _live(cut)
        if len(out) > MAX_RUNS:
            return None
        parts = out
    return parts


def generated(x: Run, ys: Sequence[Run], *, inside: bool) -> Take:
    """The keys of ``x`` that are in some run of ``ys`` (``inside``) or in none, generated
    for these rows and kept as a Take of them (each row's keys ascending)."""
    cx = x.count
    R = cx.numel()
    total = int(cx.sum())
    row = torch.repeat_interleave(torch.arange(R, device=cx.device), cx, output_size=total)
    k = torch.arange(total, device=cx.device) - (torch.cumsum(cx, 0) - cx)[row]
    key = key_at(x, k, row)
    member = torch.zeros(total, dtype=torch.bool, device=cx.device)
    for y in ys:
        member |= contains(y, key, row)
    keep = member if inside else ~member
    count = torch.bincount(row[keep], minlength=R)
    return Take(key[keep], torch.cumsum(count, 0) - count, count)


def union_runs(a: Sequence[Run], b: Sequence[Run]) -> list:
    """Disjoint runs of the keys of ``a`` or ``b`` per row (each list disjoint): ``a``
    plus what of ``b`` is not in ``a`` (or the other way round, whichever a rule covers;
    generated where neither is)."""
    a, b = _live(normalized(r) for r in a), _live(normalized(r) for r in b)
    for first, second in ((a, b), (b, a)):
        rest = [subtract(x, first) for x in second]
        if all(r is not None for r in rest) and sum(map(len, rest)) <= MAX_RUNS:
            return first + [p for r in rest for p in r]
    out = list(a)
    for x in b:
        rest = subtract(x, a)
        out += rest if rest is not None else _live([generated(x, a, inside=False)])
    return out


def meet_runs(a: Sequence[Run], b: Sequence[Run]) -> list:
    """Disjoint runs of the keys in both ``a`` and ``b`` per row."""
    a, b = _live(normalized(r) for r in a), _live(normalized(r) for r in b)
    out = []
    for x in a:
        parts = []
        for y in b:
            m = meet(x, y)
            if m is None:
                parts = None
                break
            parts += _live(m)
        out += parts if parts is not None else _live([generated(x, b, inside=True)])
    return out


def minus_runs(a: Sequence[Run], b: Sequence[Run]) -> list:
    """Disjoint runs of the keys of ``a`` in no run of ``b`` per row."""
    a, b = _live(normalized(r) for r in a), _live(normalized(r) for r in b)
    out = []
    for x in a:
        rest = subtract(x, b)
        out += rest if rest is not None else _live([generated(x, b, inside=False)])
    return out
