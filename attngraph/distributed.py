"""Context parallel graph attention over ``torch.distributed``: one graph, many processes.

The tokens of a self-attention graph are split into contiguous ranges, one per rank; each
rank holds its range's rows of q, k and v. Ring attention would move every key past every
rank, and an all-gather of K/V would hold them all on every rank. Here a rank receives
only the keys its queries' edges point at: its *halo*. This is the halo exchange of
graph-partitioned GNN training, done with ``all_to_all_single`` (variable split sizes),
over gloo on CPU or NCCL on GPUs.

Per graph, ranges and group, a plan is made once and cached on the graph. Each rank reads
only its own rows: an implicit graph's runs of those rows (the plan's own-key graph stays a
rule, cut to the own key range), an explicit graph's slice of rows, or a graph of those rows
alone (:func:`rows_of`), so no rank builds another rank's edges. It finds the remote keys
its rows read and swaps these index lists with its peers. Per call, the K/V exchange (K and
V in one message) starts asynchronously; every row's attention over its own keys runs while
it travels; then the rows that read the halo attend over it, and the two parts merge by
log-sum-exp. A dense row (a global token's, with more remote edges than ``ship_degree``)
would pull every key, so it ships its query, with the key intervals it reads, to the keys'
owners instead; they return the partial attention over their keys, merged the same way.
The backward runs the same exchanges in reverse, in one fixed order on every rank (the halo
dK/dV travel while the own-key part's backward runs), and gradients are added in a fixed
order. So two runs with the same world size give bitwise-equal results, and results match
one process up to float summation order.

Every call first checks, collectively, that the ranks agree: shard sizes against
``ranges``, the graph's fingerprint, the ranges themselves. A rank with bad input makes
every rank raise the same ``ValueError`` instead of leaving the others waiting in a
collective. A collective that fails (a peer died, or the group's timeout passed) raises a
``RuntimeError`` naming the exchange.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from functools import partial
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor

from attngraph import chunks
from attngraph.chunks import row_chunks
from attngraph.graph import TokenGraph
from attngraph.implicit import ImplicitGraph
from attngraph.ops import functional
from attngraph.ops.numerics import merge, merge_many
from attngraph.runs import Range, Take, from_runs, wrap

__all__ = ["shard_ranges", "shard_edges", "graph_attention", "halo_plan", "HaloPlan",
           "rows_of", "ring_bytes", "allgather_bytes"]

Ranges = List[Tuple[int, int]]


def _weights(graph_or_n, balance: str) -> Tuple[int, Iterator[Tensor]]:
    """``(n, chunks of per-token weights)``: edges + 1 per row (``"edges"``), else 1."""
    if isinstance(graph_or_n, TokenGraph):
        g = graph_or_n
        n = g.num_dst
        if balance == "tokens":
            return n, iter([torch.ones(n, dtype=torch.long)])
        if g.is_implicit:           # degrees from the rule, a row chunk at a time
            step = chunks.ROW_CHUNK
            return n, (g.degrees(a, min(a + step, n)).cpu() + 1 for a in range(0, n, step))
        return n, iter([g.in_degree().cpu() + 1])
    if isinstance(graph_or_n, int) and not isinstance(graph_or_n, bool) and graph_or_n >= 0:
        return graph_or_n, iter([torch.ones(graph_or_n, dtype=torch.long)])
    raise TypeError(f"shard_ranges takes a TokenGraph or a token count, got {graph_or_n!r}")


def shard_ranges(graph_or_n: Union[TokenGraph, int], world_size: int, *,
                 balance: str = "edges") -> Ranges:
    """Contiguous token ranges ``[(start, end), ...]``, one per rank, covering all tokens.

    ``balance="edges"`` (for a graph) cuts so that each range has about the same number of
    edges plus tokens: a global token's row weighs what it costs, and each cut falls on the
    side of its row that leaves the running total nearer the share. ``"tokens"`` (and any
    plain token count) cuts into equal numbers of tokens. An implicit graph's degrees are
    read from its rule a row chunk at a time (O(N) time, no edges). Ranges may be empty
    when there are more ranks than tokens. A single row heavier than a rank's share (a
    global token of a short sequence) cannot be cut: :func:`shard_edges` shows what
    remains.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if balance not in ("edges", "tokens"):
        raise ValueError(f"balance must be 'edges' or 'tokens', got {balance!r}")
    n, parts = _weights(graph_or_n, balance)
    if isinstance(graph_or_n, TokenGraph) and balance == "edges":
        total = graph_or_n.num_edges + n
    else:
        total = n
    targets = [total * p / world_size for p in range(1, world_size)]
    cuts, seen, row0, t = [], 0, 0, 0
    for w in parts:
        cum = torch.cumsum(w, 0) + seen
        while t < len(targets) and (cum.numel() and targets[t] <= int(cum[-1])):
            at = int(torch.searchsorted(cum.double(), torch.tensor([targets[t]],
                                                                   dtype=torch.float64)))
            # row `at` reaches the target: it goes to the range whose total it leaves
            # nearer the target (a heavy row, a global token's, is not always the first's)
            before = int(cum[at - 1]) if at else seen
            nearer = targets[t] - before < int(cum[at]) - targets[t]
            cuts.append(row0 + at + (0 if nearer else 1))
            t += 1
        seen = int(cum[-1]) if cum.numel() else seen
        row0 += w.numel()
    cuts += [n] * (world_size - 1 - len(cuts))
    bounds = [0] + sorted(min(c, n) for c in cuts) + [n]
    return [(bounds[p], bounds[p + 1]) for p in range(world_size)]


def shard_edges(graph: TokenGraph, ranges: Sequence[Tuple[int, int]]) -> List[int]:
    """Edges of each range's rows (an implicit graph's counted from its rule, a row chunk at
    a time): ``max / mean`` of it is the work imbalance of a sharding."""
    out = []
    for a, b in ranges:
        if graph.is_implicit:
            step = chunks.ROW_CHUNK
            out.append(sum(int(graph.degrees(s, min(s + step, b)).sum())
                           for s in range(a, b, step)))
        else:
            out.append(int(graph.ptr[b]) - int(graph.ptr[a]))
    return out


@dataclass(frozen=True)
class HaloPlan:
    """What one rank computes and exchanges for one (graph, ranges) pair.

    * **Own keys.** ``own`` has this rank's query rows as targets and its own keys as
      sources (local ids ``0 .. end - start``). For an implicit graph it is implicit too:
      its runs are the graph's runs of these rows, cut to the own key range, computed when
      asked. For an explicit graph it holds the own-key edges, ``own_order[i]`` being the
      edge of the rank's slice of the canonical order that its edge ``i`` is.
    * **Pulled keys (the halo).** ``halo`` has the rows ``halo_rows`` (local ids, sorted)
      that read remote keys as targets and the halo keys as sources, in the order they
      arrive (grouped by owner, ascending); ``halo_order`` maps its edges to the canonical
      slice. ``send_idx`` lists the own keys each peer needs (grouped by peer, sizes
      ``send_counts``); ``recv_counts[p]`` halo keys come from peer ``p``.
    * **Shipped queries.** A *dense* row (more remote edges than the ship threshold, such as
      a global token's) does not pull its keys. Its query goes to each peer that owns some of
      them, with the key intervals it reads there, and the peer returns the partial
      attention ``(out, lse)`` over those keys. ``ship_idx`` (sizes ``ship_counts``) lists
      the local rows sent to each peer, and ``ship_edge_idx`` (sizes ``ship_edge_counts``)
      the bias entries of their edges. ``guest`` is the graph of the queries this rank
      receives (``guest_counts`` from each peer) over its own keys.

    Every part of a row (own keys, halo, each peer's shipped part) is an exact partial
    attention over disjoint keys; they merge by log-sum-exp.
    """

    rank: int
    ranges: Tuple[Tuple[int, int], ...]
    own: TokenGraph
    own_order: Optional[Tensor]
    halo_rows: Tensor
    halo: TokenGraph
    halo_order: Optional[Tensor]
    send_idx: Tensor
    send_counts: Tuple[int, ...]
    recv_counts: Tuple[int, ...]
    ship_any: bool = False
    dense_rows: Optional[Tensor] = None          # local rows computed partly elsewhere
    ship_idx: Optional[Tensor] = None
    ship_pos: Optional[Tensor] = None            # position in dense_rows of each shipped row
    ship_peer: Optional[Tensor] = None
    ship_counts: Tuple[int, ...] = ()
    guest_counts: Tuple[int, ...] = ()
    ship_edge_idx: Optional[Tensor] = None
    ship_edge_counts: Tuple[int, ...] = ()
    guest_edge_counts: Tuple[int, ...] = ()
    guest: Optional[TokenGraph] = None
    halo_edges: int = 0

    @property
    def halo_size(self) -> int:
        return sum(self.recv_counts)

    def bytes_received(self, row_bytes: int, query_bytes: int = 0,
                       result_bytes: int = 0) -> int:
        """Bytes one forward brings into this rank: halo K/V rows of ``row_bytes`` each,
        the queries shipped here (``query_bytes`` each) and the partial results of this
        rank's shipped queries (``result_bytes`` each)."""
        return (self.halo_size * row_bytes + sum(self.guest_counts) * query_bytes
                + sum(self.ship_counts) * result_bytes)

    def plan_bytes(self) -> int:
        """Bytes of the plan's own index tensors (the graphs' rules or edges excluded when
        implicit): what the plan adds to a rank's memory."""
        total = 0
        for t in (self.own_order, self.halo_rows, self.halo_order, self.send_idx,
                  self.dense_rows, self.ship_idx, self.ship_pos, self.ship_peer,
                  self.ship_edge_idx):
            if t is not None:
                total += t.numel() * t.element_size()
        for g in (self.own, self.halo, self.guest):
            if g is not None and not g.is_implicit:
                total += 2 * g.num_edges * 8 + (g.num_dst + 1) * 8
        return total


# ---------------------------------------------------------------------------- fingerprints
def _mix(x: Tensor) -> Tuple[int, int]:
    m = (x.long() * 2654435761 + 17) % 2147483647
    return int(m.sum()), int((m * m % 2147483629).sum())


def _fingerprint(graph: TokenGraph) -> int:
    """A cheap hash of the graph, computed once per graph. Explicit: sizes and edges.
    Implicit: sizes, and the degrees (and keys, where at most 1024) of 16 sample rows:
    never the whole edge list, nor a pass over every row."""
    fp = graph.caches.distributed.get("fingerprint")
    if fp is None:
        if graph.is_implicit:
            n = graph.num_dst
            parts: list = [type(graph).__name__, graph.num_src, n]
            for i in sorted({(n - 1) * j // 15 for j in range(16)} if n else ()):
                deg = int(graph.degrees(i, i + 1)[0])
                parts.append(deg)
                if deg <= 1024:
                    parts.append(_mix(graph.rows(i, i + 1)[1]))
            fp = zlib.crc32(repr(parts).encode())     # str hashes differ between processes
        else:
            mix = (graph.src.long() * 2654435761 + graph.dst.long() * 40503 + 17) % 2147483647
            fp = hash((graph.num_src, graph.num_dst, graph.num_edges, int(mix.sum()),
                       int((mix * mix % 2147483629).sum()))) & (2 ** 62 - 1)
        graph.caches.distributed["fingerprint"] = fp
    return fp


def _world(group) -> Tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("attngraph.distributed needs an initialised process group: call "
                           "torch.distributed.init_process_group first")
    return dist.get_rank(group), dist.get_world_size(group)


def _check_ranges(ranges, n: int, world: int) -> Tuple[Tuple[int, int], ...]:
    try:
        ranges = tuple((int(a), int(b)) for a, b in ranges)
    except (TypeError, ValueError):
        raise ValueError(f"ranges must be a list of (start, end) pairs, got {ranges!r}") \
            from None
    if len(ranges) != world:
        raise ValueError(f"ranges has {len(ranges)} entries for {world} ranks")
    end = 0
    for p, (a, b) in enumerate(ranges):
        if a != end or b < a:
            raise ValueError(f"ranges must be contiguous and ordered from 0, got {ranges}")
        end = b
    if end != n:
        raise ValueError(f"ranges cover tokens [0, {end}) but the graph has {n}")
    return ranges


def _rows_only(graph: TokenGraph, ranges, rank: int) -> bool:
    """Whether ``graph`` holds only this rank's rows (``num_dst = end - start`` queries over
    all ``num_src = N`` keys) rather than the whole self-attention graph."""
    if graph.num_src == graph.num_dst:
        return False
    r0, r1 = ranges[rank]
    if graph.num_dst != r1 - r0 or graph.num_src != ranges[-1][1]:
        raise ValueError(f"graph must be the whole self-attention graph (num_src = num_dst "
                         f"= N) or this rank's rows of it ({r1 - r0} queries over all "
                         f"{ranges[-1][1]} keys), got {graph.num_dst} queries over "
                         f"{graph.num_src} keys")
    return True


def rows_of(graph: TokenGraph, start: int, end: int) -> TokenGraph:
    """Query rows ``[start, end)`` of ``graph`` as a graph of their own: ``end - start``
    queries over all ``num_src`` keys (global key ids), edges in canonical order. What
    :func:`graph_attention` takes from a rank that holds only its own rows of an explicit
    graph; an implicit graph's rows are computed from its rule."""
    if not 0 <= start <= end <= graph.num_dst:
        raise ValueError(f"rows [{start}, {end}) out of range for {graph.num_dst} queries")
    if graph.is_implicit:
        ptr, src = graph.rows(start, end)
    else:
        ptr = graph.ptr[start:end + 1].long()
        src = graph.src[int(ptr[0]):int(ptr[-1])].long()
        ptr = ptr - ptr[0]
    dst = torch.repeat_interleave(torch.arange(end - start, device=src.device), ptr.diff(),
                                  output_size=src.numel())
    return wrap(torch.stack([src, dst]), graph.num_src, end - start)


# ---------------------------------------------------------------------------- collectives
def _comm_device(group) -> torch.device:
    """Where the group's collectives take tensors: the current GPU for NCCL, else CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _failed(what: str, e: Exception) -> RuntimeError:
    return RuntimeError(f"attngraph.distributed: the {what} failed on rank "
                        f"{dist.get_rank()}: {type(e).__name__}: {e} (a peer may have died, "
                        f"left the group or passed the group's timeout)")


class _Pending:
    """An ``all_to_all_single`` in flight (``async_op``): :meth:`wait` returns what came in,
    on the sender's device."""

    def __init__(self, x: Tensor, out_counts: Sequence[int], in_counts: Sequence[int],
                 group, what: str):
        dev = _comm_device(group)
        self.device, self.what = x.device, what
        self.send = x.contiguous().to(dev)
        self.out = self.send.new_empty((sum(out_counts),) + tuple(x.shape[1:]))
        try:
            self.work = dist.all_to_all_single(self.out, self.send, list(out_counts),
                                               list(in_counts), group=group, async_op=True)
        except Exception as e:
            raise _failed(what, e) from e

    def wait(self) -> Tensor:
        if self.send is not None:
            try:
                self.work.wait()
            except Exception as e:
                raise _failed(self.what, e) from e
            self.send = None
        return self.out.to(self.device)


def _all_to_all(x: Tensor, out_counts: Sequence[int], in_counts: Sequence[int],
                group, what: str = "plan exchange") -> Tensor:
    """``all_to_all_single`` with split sizes, on the group's device, back on x's."""
    return _Pending(x, out_counts, in_counts, group, what).wait()


# ---------------------------------------------------------------------------- runs, cut
def _count_below(table: Tensor, lo: Tensor, count: Tensor, x: int) -> Tensor:
    """Per row, how many of ``table[lo : lo + count]`` (sorted inside the row) are ``< x``:
    a binary search on every row at once."""
    a, b = lo.clone(), lo + count
    if not table.numel():
        return torch.zeros_like(count)
    last = table.numel() - 1
    while True:
        live = a < b
        if not bool(live.any()):
            return a - lo
        mid = torch.div(a + b, 2, rounding_mode="floor")
        less = table[mid.clamp(0, last)] < x
        a = torch.where(live & less, mid + 1, a)
        b = torch.where(live & ~less, mid, b)


def _shifted(table: Tensor, r0: int, r1: int, cache: dict) -> Tensor:
    """``table - r0`` clamped to the own ids ``[0, r1 - r0)``, kept for the table last asked
    about (a rule's state table is the same tensor at every call). The own part of a row
    reads only entries inside the range; the clamp keeps the others valid ids for the key
    range backend, which reads whole spans of the table under a mask."""
    hit = cache.get("table")
    if hit is not None and hit[0] is table:
        return hit[1]
    shifted = (table - r0).clamp_(0, max(r1 - r0 - 1, 0))
    cache["table"] = (table, shifted)
    return shifted


def _cut(runs: list, r0: int, r1: int, cache: dict):
    """Runs of some rows cut at the own key range ``[r0, r1)``: ``(own, halo, remote)``,
    ``own`` the runs of the keys inside (local ids, ``key - r0``), ``halo`` the runs of the
    keys outside (global ids, in key order), ``remote`` the latter's count per row."""
    own, halo, remote = [], [], None
    for run in runs:
        count = run.count.long()
        if isinstance(run, Range):
            s = int(run.step)
            below = torch.div(r0 - run.start + s - 1, s, rounding_mode="floor")
            upto = torch.div(r1 - run.start + s - 1, s, rounding_mode="floor")
            below = torch.minimum(below.clamp_min(0), count)
            upto = torch.minimum(upto.clamp_min(0), count)
            own.append(Range(run.start + below * s - r0, upto - below, s))
            halo.append(Range(run.start, below, s))
            halo.append(Range(run.start + upto * s, count - upto, s))
        else:
            below = _count_below(run.table, run.lo, count, r0)
            upto = _count_below(run.table, run.lo, count, r1)
            own.append(Take(_shifted(run.table, r0, r1, cache), run.lo + below, upto - below))
            halo.append(Take(run.table, run.lo, below))
            halo.append(Take(run.table, run.lo + upto, count - upto))
        far = below + count - upto
        remote = far if remote is None else remote + far
    return own, halo, remote


def _slice_runs(runs: list, a: int, b: int) -> list:
    """The runs of rows ``[a, b)`` of a list of runs."""
    return [Range(r.start[a:b], r.count[a:b], r.step) if isinstance(r, Range)
            else Take(r.table, r.lo[a:b], r.count[a:b]) for r in runs]


def _own_runs(rows: Tensor, state, *, graph, r0: int, r1: int, cache: dict) -> list:
    """The rule of a plan's ``own`` graph: the graph's runs of rows ``r0 + rows`` cut to
    the own key range."""
    if not rows.numel():
        return [Range(rows, rows)]
    a = int(rows[0])
    own, _, _ = _cut(graph.runs(r0 + a, r0 + a + rows.numel()), r0, r1, cache)
    return own


def _interval_runs(rows: Tensor, state, *, iptr: Tensor, lo: Tensor, hi: Tensor) -> list:
    """The rule of a plan's ``guest`` graph: guest row ``g`` reads the key intervals
    ``[lo[j], hi[j])`` for ``j`` in ``iptr[g] .. iptr[g + 1]`` (disjoint, ascending)."""
    if not rows.numel():
        return [Range(rows, rows)]
    a, b = int(rows[0]), int(rows[-1]) + 1
    p = iptr[a:b + 1]
    cnt = p.diff()
    slots = int(cnt.max()) if cnt.numel() else 0
    if slots == 0:
        return [Range(torch.zeros_like(rows), torch.zeros_like(rows))]
    if slots <= 8:                       # a few intervals a row: one Range per slot
        runs = []
        last = max(lo.numel() - 1, 0)
        for j in range(slots):
            has = cnt > j
            at = (p[:-1] + j).clamp_max(last)
            runs.append(Range(torch.where(has, lo[at], 0), torch.where(has, hi[at] - lo[at], 0)))
        return runs
    # many intervals: the rows' keys, written out, read as one Take
    i0, i1 = int(p[0]), int(p[-1])
    length = hi[i0:i1] - lo[i0:i1]
    total = int(length.sum())
    first = torch.cumsum(length, 0) - length
    which = torch.repeat_interleave(torch.arange(i1 - i0, device=rows.device), length,
                                    output_size=total)
    keys = lo[i0:i1][which] + torch.arange(total, device=rows.device) - first[which]
    ends = torch.cumsum(length, 0)
    row_end = torch.where(cnt > 0, ends[(p[1:] - i0 - 1).clamp_min(0)], 0)
    row_end = torch.cummax(row_end, 0).values
    row_lo = torch.cat([row_end.new_zeros(1), row_end[:-1]])
    return [Take(keys, row_lo, row_end - row_lo)]


# ---------------------------------------------------------------------------- the plan
def _default_ship_degree(graph: TokenGraph) -> int:
    """Remote edges above which a row ships its query: 8x the mean degree, at least 64
    (the cost of pulling that many keys exceeds sending a query and its result back). The
    mean is the whole graph's for an explicit graph, the rank's own rows' for an implicit
    one or a graph of a rank's rows (never a pass over other ranks' rows)."""
    return max(64, 8 * math.ceil(graph.num_edges / max(graph.num_dst, 1)))


class _Remote:
    """The remote edges of a rank's rows, as they come (row order, keys ascending): the
    pulled ones kept as edges, the dense rows' ones kept as key intervals per owner."""

    def __init__(self, starts: Tensor, dense: Tensor):
        self.starts, self.dense = starts, dense
        self.rows, self.keys, self.pos = [], [], []
        self.i_row, self.i_peer, self.i_lo, self.i_hi, self.i_pos = [], [], [], [], []

    def add(self, row: Tensor, key: Tensor, pos: Optional[Tensor]) -> None:
        d = self.dense[row]
        if not bool(d.any()):
            self.rows.append(row), self.keys.append(key)
            if pos is not None:
                self.pos.append(pos)
            return
        keep = ~d
        self.rows.append(row[keep]), self.keys.append(key[keep])
        if pos is not None:
            self.pos.append(pos[keep])
        row, key = row[d], key[d]
        peer = torch.searchsorted(self.starts, key, right=True) - 1
        order = torch.argsort(peer, stable=True)                 # (peer, row, key)
        row, key, peer = row[order], key[order], peer[order]
        if pos is not None:
            self.i_pos.append(pos[d][order])
        brk = torch.ones(key.numel(), dtype=torch.bool, device=key.device)
        brk[1:] = (row[1:] != row[:-1]) | (peer[1:] != peer[:-1]) | (key[1:] != key[:-1] + 1)
        first = brk.nonzero().flatten()
        last = torch.cat([first[1:], first.new_tensor([key.numel()])]) - 1
        self.i_row.append(row[first]), self.i_peer.append(peer[first])
        self.i_lo.append(key[first]), self.i_hi.append(key[last] + 1)


def _cat(xs, device) -> Tensor:
    return torch.cat(xs) if xs else torch.empty(0, dtype=torch.long, device=device)


def halo_plan(graph: TokenGraph, ranges: Sequence[Tuple[int, int]], group=None, *,
              ship_degree: Optional[int] = None, edges: bool = False) -> HaloPlan:
    """This rank's :class:`HaloPlan` (collective: every rank of ``group`` calls it), built
    once per graph, ranges, group and ship threshold and cached on the graph.

    It reads only this rank's rows: an implicit graph's runs of rows ``[start, end)`` (in
    row chunks), an explicit graph's slice ``ptr[start:end]``, or a graph of these rows
    alone (:func:`rows_of`). Time and memory: O(own rows + halo edges) for an implicit
    graph (the own-key part stays a rule), O(own edges) for an explicit one.

    ``ship_degree``: rows with more remote edges ship their query (default
    :func:`_default_ship_degree`); ``-1`` ships none. ``edges``: plan an implicit graph on
    its own rows' edges (needed for an edge bias, which follows the canonical edge
    order)."""
    rank, world = _world(group)
    rows_only = False
    if graph.num_src != graph.num_dst:
        ranges = _check_ranges(ranges, graph.num_src, world)
        rows_only = _rows_only(graph, ranges, rank)
    else:
        ranges = _check_ranges(ranges, graph.num_dst, world)
    explicit = rows_only or not graph.is_implicit or edges
    key = ("halo_plan", ranges, rank, world, id(group), ship_degree, explicit)
    cached = graph.caches.distributed.get(key)
    if cached is not None:
        return cached
    dev = graph.device
    r0, r1 = ranges[rank]
    n_own = r1 - r0
    starts = torch.tensor([a for a, _ in ranges], device=dev)
    plan: dict = dict(rank=rank, ranges=ranges)
    if explicit:
        plan_rows = rows_of(graph, r0, r1) if not rows_only else graph
        ptr, src = plan_rows.ptr.long(), plan_rows.src.long()
        dst = plan_rows.dst.long()
        own = (src >= r0) & (src < r1)
        remote = torch.bincount(dst[~own], minlength=n_own)
        if ship_degree is None:
            ship_degree = _default_ship_degree(plan_rows if graph.is_implicit else graph)
        dense = (remote > ship_degree) if ship_degree >= 0 else \
            torch.zeros(n_own, dtype=torch.bool, device=dev)
        own_idx = own.nonzero().flatten()
        plan["own"] = wrap(torch.stack([src[own_idx] - r0, dst[own_idx]]), n_own, n_own)
        plan["own_order"] = own_idx
        far = (~own).nonzero().flatten()
        remote_edges = _Remote(starts, dense)
        remote_edges.add(dst[far], src[far], far)
        del src, dst, own, ptr
    else:
        cache: dict = {}
        plan["own"] = ImplicitGraph(partial(_own_runs, graph=graph, r0=r0, r1=r1,
                                            cache=cache), n_own, n_own,
                                    name=f"own keys of rows [{r0}, {r1})", device=dev)
        plan["own_order"] = None
        # pass 1: remote edges per row (counts only)
        step = chunks.ROW_CHUNK
        remote = torch.zeros(n_own, dtype=torch.long, device=dev)
        own_edges = 0
        for a in range(0, n_own, step):
            b = min(a + step, n_own)
            runs = graph.runs(r0 + a, r0 + b)
            own_edges += sum(int(r.count.sum()) for r in runs)
            _, _, far = _cut(runs, r0, r1, cache)
            if far is not None:
                remote[a:b] = far
        if ship_degree is None:
            ship_degree = max(64, 8 * math.ceil(own_edges / max(n_own, 1)))
        dense = (remote > ship_degree) if ship_degree >= 0 else \
            torch.zeros(n_own, dtype=torch.bool, device=dev)
        # pass 2: the remote edges, in chunks of about CHUNK_EDGES
        remote_edges = _Remote(starts, dense)
        for a in range(0, n_own, step):
            b = min(a + step, n_own)
            if not bool(remote[a:b].any()):
                continue
            _, halo_runs, _ = _cut(graph.runs(r0 + a, r0 + b), r0, r1, cache)
            hptr = torch.zeros(b - a + 1, dtype=torch.long, device=dev)
            torch.cumsum(remote[a:b], 0, out=hptr[1:])
            for s, t in row_chunks(hptr, chunks.CHUNK_EDGES):
                if int(hptr[t]) == int(hptr[s]):
                    continue
                part = from_runs(graph.num_src, t - s, _slice_runs(halo_runs, s, t),
                                 device=dev)
                remote_edges.add(part.dst + (a + s), part.src, None)
        cache.clear()
    plan.update(_pull_plan(remote_edges, starts, n_own, world, group, dev))
    flag = torch.tensor([int(bool(dense.any()))], device=_comm_device(group))
    try:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    except Exception as e:
        raise _failed("plan exchange", e) from e
    if int(flag):
        plan.update(_ship_plan(remote_edges, dense, n_own, world, group, dev,
                               with_pos=explicit))
    plan = HaloPlan(**plan)
    graph.caches.distributed[key] = plan
    return plan


def _pull_plan(remote: _Remote, starts: Tensor, n_own: int, world: int, group, dev) -> dict:
    """The halo half of a plan: which keys come from whom, and the halo graph."""
    rows, keys = _cat(remote.rows, dev), _cat(remote.keys, dev)
    pos = _cat(remote.pos, dev) if remote.pos else None
    remote.rows = remote.keys = remote.pos = None
    need = torch.unique(keys)                                   # sorted: grouped by owner
    owner = torch.searchsorted(starts, need, right=True) - 1
    recv = torch.bincount(owner, minlength=world)
    send = _all_to_all(recv, [1] * world, [1] * world, group)   # how many of my keys, then which
    recv_counts, send_counts = tuple(recv.tolist()), tuple(send.tolist())
    send_idx = _all_to_all(need - starts[owner], send_counts, recv_counts, group)
    halo_rows = torch.unique(rows)
    halo = wrap(torch.stack([torch.searchsorted(need, keys),
                             torch.searchsorted(halo_rows, rows)]),
                need.numel(), halo_rows.numel())
    return dict(halo_rows=halo_rows, halo=halo, halo_order=pos, send_idx=send_idx,
                send_counts=send_counts, recv_counts=recv_counts, halo_edges=keys.numel())


def _ship_plan(remote: _Remote, dense: Tensor, n_own: int, world: int, group, dev,
               with_pos: bool) -> dict:
    """The query-shipping half of a plan: which rows go where with which key intervals,
    and the guest graph of the rows that come here."""
    i_row, i_peer = _cat(remote.i_row, dev), _cat(remote.i_peer, dev)
    i_lo, i_hi = _cat(remote.i_lo, dev), _cat(remote.i_hi, dev)
    # intervals ordered by (peer, row, key); chunks came in row order, each (peer, row, key)
    width = max(n_own, 1)
    order = torch.argsort(i_peer * width + i_row, stable=True)
    i_row, i_peer, i_lo, i_hi = i_row[order], i_peer[order], i_lo[order], i_hi[order]
    starts = remote.starts
    dense_rows = dense.nonzero().flatten()
    pair, i_count = torch.unique_consecutive(i_peer * width + i_row, return_counts=True)
    ship_peer = torch.div(pair, width, rounding_mode="floor")
    ship_idx = pair % width
    ship_pos = torch.searchsorted(dense_rows, ship_idx)
    ship_counts = torch.bincount(ship_peer, minlength=world)
    interval_counts = torch.bincount(i_peer, minlength=world)
    length = i_hi - i_lo
    ship_edge_counts = torch.zeros(world, dtype=torch.long, device=dev).index_add_(
        0, i_peer, length)
    # the bias entries of the shipped edges, in (peer, row, key) order: an explicit plan adds
    # its remote edges in one call, whose intervals (and positions) are in that order
    ship_edge_idx = _cat(remote.i_pos, dev) if with_pos else None
    ones = [1] * world
    guest_counts = _all_to_all(ship_counts, ones, ones, group)
    guest_edge_counts = _all_to_all(ship_edge_counts, ones, ones, group)
    guest_interval_counts = _all_to_all(interval_counts, ones, ones, group)
    sc, gc = tuple(ship_counts.tolist()), tuple(guest_counts.tolist())
    ic, gic = tuple(interval_counts.tolist()), tuple(guest_interval_counts.tolist())
    g_icount = _all_to_all(i_count, gc, sc, group)
    lo_hi = torch.stack([i_lo - starts[i_peer], i_hi - starts[i_peer]], 1)   # receiver ids
    g_lohi = _all_to_all(lo_hi, gic, ic, group)
    iptr = torch.zeros(g_icount.numel() + 1, dtype=torch.long, device=dev)
    torch.cumsum(g_icount, 0, out=iptr[1:])
    guest = ImplicitGraph(partial(_interval_runs, iptr=iptr, lo=g_lohi[:, 0].contiguous(),
                                  hi=g_lohi[:, 1].contiguous()), n_own, g_icount.numel(),
                          name="shipped queries over own keys", device=dev)
    return dict(ship_any=True, dense_rows=dense_rows, ship_idx=ship_idx, ship_pos=ship_pos,
                ship_peer=ship_peer, ship_counts=sc, guest_counts=gc,
                ship_edge_idx=ship_edge_idx,
                ship_edge_counts=tuple(ship_edge_counts.tolist()),
                guest_edge_counts=tuple(guest_edge_counts.tolist()), guest=guest)


# ---------------------------------------------------------------------------- compute
def _exchange_back(grad: Tensor, idx: Optional[Tensor], out_counts, in_counts, group,
                   what: str) -> "_Back":
    """The adjoint of an exchange, started: gradients go back to the senders, who add them
    to the rows they came from (:meth:`_Back.add_into`)."""
    return _Back(_Pending(grad, in_counts, out_counts, group, what), idx, in_counts)


class _Back:
    def __init__(self, pending: _Pending, idx, counts):
        self.pending, self.idx, self.counts = pending, idx, counts

    def wait(self) -> Tensor:
        return self.pending.wait()

    def add_into(self, targets: Sequence[Tensor], shape_of, nd: int, cut=None) -> None:
        """Add the returned rows into ``targets`` (token dim ``nd``) at ``idx``, peer by
        peer (indices unique within a peer: deterministic); ``shape_of(m)`` is the shape of
        ``m`` returned rows, ``cut`` splits them between the targets."""
        back = self.pending.wait()
        offset = 0
        for count in self.counts:
            if count:
                at = self.idx[offset:offset + count]
                rows = _unrows(back[offset:offset + count], shape_of(count), nd)
                pieces = cut(rows) if cut is not None else (rows,)
                for t, piece in zip(targets, pieces):
                    t.index_add_(nd, at, piece.to(t.dtype))
            offset += count


def _rows(t: Tensor, nd: int) -> Tensor:
    """``[.., n, ...]`` with the token dim ``nd`` -> ``[n, features]``."""
    t = t.movedim(nd, 0)
    return t.reshape(t.size(0), math.prod(t.shape[1:]))


def _unrows(rows: Tensor, like_shape, nd: int) -> Tensor:
    """Inverse of :func:`_rows` for a tensor shaped ``like_shape`` but ``rows.size(0)``
    tokens."""
    shape = list(like_shape)
    shape.pop(nd)
    return rows.reshape([rows.size(0)] + shape).movedim(0, nd)


def _kv_shape(k: Tensor, v: Tensor, n: int, nd: int) -> Tuple[int, ...]:
    """Shape of ``torch.cat([k, v], -1)`` with ``n`` tokens, without making it."""
    shape = list(k.shape[:-1]) + [k.size(-1) + v.size(-1)]
    shape[nd] = n
    return tuple(shape)


def _attend(q, k, v, graph, scale, bias, backend, nd):
    """``(out, lse)`` of ``q`` over ``graph``; rows without any query: empty results."""
    if q.size(nd) == 0 or graph.num_dst == 0:
        shape = list(q.shape[:-1]) + [v.size(-1)]
        lse_dt = torch.float64 if q.dtype == torch.float64 else torch.float32
        return q.new_zeros(shape), q.new_full(tuple(q.shape[:-1]), float("-inf"),
                                               dtype=lse_dt)
    if k.size(nd) == 0:            # no keys: every row empty
        shape = list(q.shape[:-1]) + [v.size(-1)]
        lse_dt = torch.float64 if q.dtype == torch.float64 else torch.float32
        return (q.new_zeros(shape),
                q.new_full(tuple(q.shape[:-1]), float("-inf"), dtype=lse_dt))
    return functional.graph_attention(q, k, v, graph, scale=scale, edge_bias=bias,
                                      return_lse=True, backend=backend)


def _heads(rows: Tensor, lse_rows: Tensor) -> Tuple[Tensor, int]:
    """``[n, F]`` out rows as ``[n, heads, F / heads]`` for the merges."""
    h = lse_rows.size(1)
    return rows.view(rows.size(0), h, rows.size(1) // max(h, 1)), h


class _ContextParallel(torch.autograd.Function):
    """The whole sharded computation. Forward: the halo K/V exchange and the shipped
    queries start asynchronously; the own-key part of every row runs meanwhile; then the
    guests, the halo part, and the merge by log-sum-exp. Backward: the same exchanges in
    reverse, in one fixed order on every rank; the returned halo dK/dV travel while the
    own-key part's backward runs."""

    @staticmethod
    def forward(ctx, q, k, v, bias, plan: HaloPlan, group, scale, backend, grad, overlap):
        nd = q.dim() - 3
        D = k.size(-1)
        n_own = q.size(nd)
        with torch.enable_grad() if grad else torch.no_grad():
            qd, kd, vd = (t.detach().requires_grad_(grad) for t in (q, k, v))
            bd = bias.detach().requires_grad_(grad) if bias is not None else None
            sv = dict(qd=qd, kd=kd, vd=vd, bd=bd)
            # 1. start the halo K/V exchange (K and V of the requested rows, one message)
            send = _rows(torch.cat([kd.detach().index_select(nd, plan.send_idx),
                                    vd.detach().index_select(nd, plan.send_idx)], -1), nd)
            halo_kv = _Pending(send, plan.recv_counts, plan.send_counts, group,
                               "halo exchange")
            del send
            if not overlap:
                halo_kv.wait()
            if plan.ship_any:
                gq_p = _Pending(_rows(qd.detach(), nd).index_select(0, plan.ship_idx),
                                plan.guest_counts, plan.ship_counts, group, "query shipping")
                gb_p = (_Pending(bd.detach().index_select(0, plan.ship_edge_idx),
                                 plan.guest_edge_counts, plan.ship_edge_counts, group,
                                 "bias shipping") if bd is not None else None)
            # 2. every row over its own keys, while those travel
            b_own = bd.index_select(0, plan.own_order) if bd is not None else None
            out_a, lse_a = _attend(qd, kd, vd, plan.own, scale, b_own, backend, nd)
            sv.update(out_a=out_a, lse_a=lse_a)
            # the merges read each part through leaves of its own: a backend's out may
            # depend on its lse (a merge inside it), and the gradients each part's backward
            # takes are the merge's partial derivatives, not totals through the other output
            out_a, lse_a = _leaf(out_a, grad), _leaf(lse_a, grad)
            sv.update(out_a_m=out_a, lse_a_m=lse_a)
            # 3. queries shipped here, over own keys; their parts go back
            if plan.ship_any:
                gq = gq_p.wait().requires_grad_(grad)
                gb = gb_p.wait().requires_grad_(grad) if gb_p is not None else None
                gq_t = _unrows(gq, qd.shape, nd)
                guest = plan.guest.materialize() if backend == "tiles" else plan.guest
                g_out, g_lse = _attend(gq_t, kd, vd, guest, scale, gb, backend, nd)
                g_msg = torch.cat([_rows(g_out, nd).to(g_lse.dtype), _rows(g_lse, nd)], 1)
                parts_p = _Pending(g_msg.detach(), plan.ship_counts, plan.guest_counts,
                                   group, "shipped results")
                sv.update(gq=gq, gb=gb, g_msg=g_msg)
            # 4. the rows that read the halo, over the halo
            halo = halo_kv.wait().requires_grad_(grad)
            sv["halo"] = halo
            o_rows, l_rows = _rows(out_a, nd), _rows(lse_a, nd)
            hr = plan.halo_rows
            if hr.numel():
                halo_t = _unrows(halo, _kv_shape(kd, vd, halo.size(0), nd), nd)
                q_h = qd.detach().index_select(nd, hr).requires_grad_(grad)
                sv["q_h"] = q_h
                b_h = bd.index_select(0, plan.halo_order) if bd is not None else None
                out_b, lse_b = _attend(q_h, halo_t[..., :D], halo_t[..., D:], plan.halo,
                                       scale, b_h, backend, nd)
                sv.update(out_b=out_b, lse_b=lse_b)
                out_b, lse_b = _leaf(out_b, grad), _leaf(lse_b, grad)
                sv.update(out_b_m=out_b, lse_b_m=lse_b)
                oa, h = _heads(o_rows.index_select(0, hr), l_rows)
                ob, _ = _heads(_rows(out_b, nd).to(oa.dtype), l_rows)
                om, lm = merge(oa, l_rows.index_select(0, hr), ob, _rows(lse_b, nd))
                if grad:
                    o_rows = o_rows.index_copy(0, hr, om.reshape(hr.numel(), -1))
                    l_rows = l_rows.index_copy(0, hr, lm)
                else:
                    o_rows.index_copy_(0, hr, om.reshape(hr.numel(), -1))
                    l_rows.index_copy_(0, hr, lm)
            # 5. the shipped rows' parts, merged with their own-key part
            if plan.ship_any:
                parts = parts_p.wait().requires_grad_(grad)
                sv["parts"] = parts
                o_rows, l_rows = _merge_shipped(plan, o_rows, l_rows, parts, grad)
            out = _unrows(o_rows, out_a.shape, nd)
            lse = _unrows(l_rows, lse_a.shape, nd)
        ctx.plan, ctx.group, ctx.nd, ctx.saved, ctx.overlap = plan, group, nd, sv, overlap
        ctx.final = (out, lse)
        return out.detach(), lse.detach()

    @staticmethod
    def backward(ctx, dout, dlse):
        plan, group, nd, sv = ctx.plan, ctx.group, ctx.nd, ctx.saved
        out, lse = ctx.final
        ctx.final = None
        dout = torch.zeros_like(out) if dout is None else dout
        dlse = torch.zeros_like(lse) if dlse is None else dlse
        qd, kd, vd, bd = sv["qd"], sv["kd"], sv["vd"], sv["bd"]
        has_halo = "out_b" in sv
        # the parts' gradients, through the merges
        parts = [sv["out_a_m"], sv["lse_a_m"]] \
            + ([sv["out_b_m"], sv["lse_b_m"]] if has_halo else []) \
            + ([sv["parts"]] if plan.ship_any else [])
        gp = _grad((out, lse), parts, (dout, dlse))
        gp = [torch.zeros_like(x) if g is None else g for x, g in zip(parts, gp)]
        del out, lse, dout, dlse, ctx.saved
        D = kd.size(-1)
        # 1. the shipped rows: their parts' gradients go to the ranks that computed them;
        #    the guests' query (and bias) gradients come back
        guest_kv, dq_ship, db_ship = None, None, None
        if plan.ship_any:
            d_guest = _exchange_back(gp[-1], None, plan.ship_counts, plan.guest_counts,
                                     group, "shipped results (backward)").wait()
            gl = [sv["gq"], kd, vd] + ([sv["gb"]] if sv["gb"] is not None else [])
            gg = _grad((sv["g_msg"],), gl, (d_guest,))
            gg = [torch.zeros_like(x) if g is None else g for x, g in zip(gl, gg)]
            dq_ship = _exchange_back(gg[0], plan.ship_idx, plan.guest_counts,
                                     plan.ship_counts, group, "query shipping (backward)")
            if bd is not None:
                db_ship = _exchange_back(gg[3], plan.ship_edge_idx, plan.guest_edge_counts,
                                         plan.ship_edge_counts, group,
                                         "bias shipping (backward)")
            guest_kv = (gg[1], gg[2])
            del gg
        # 2. the halo part; its dK/dV start back to the keys' owners
        dq_h, db_h, dhalo = None, None, None
        if has_halo:
            hl = [sv["q_h"], sv["halo"]] + ([bd] if bd is not None else [])
            dq_h, dhalo, *db = _grad((sv["out_b"], sv["lse_b"]), hl, (gp[2], gp[3]))
            db_h = db[0] if db else None
        if dhalo is None:
            dhalo = torch.zeros_like(sv["halo"])
        back = _exchange_back(dhalo, plan.send_idx, plan.recv_counts, plan.send_counts,
                              group, "halo exchange (backward)")
        if not ctx.overlap:
            back.wait()
        # 3. the own-key part, while they travel
        leaves = [qd, kd, vd] + ([bd] if bd is not None else [])
        dq, dk, dv, *db = _grad((sv["out_a"], sv["lse_a"]), leaves, (gp[0], gp[1]))
        del gp
        dq, dk, dv = (torch.zeros_like(x) if g is None else g
                      for x, g in zip((qd, kd, vd), (dq, dk, dv)))
        dbias = None
        if bd is not None:
            dbias = db[0] if db[0] is not None else torch.zeros_like(bd)
            for extra in (db_h,):
                if extra is not None:
                    dbias.add_(extra)
        # 4. the small contributions, added in place in one fixed order
        if guest_kv is not None:
            dk.add_(guest_kv[0])
            dv.add_(guest_kv[1])
        if dq_h is not None:
            dq.index_add_(nd, plan.halo_rows, dq_h)
        if dq_ship is not None:
            dq_ship.add_into([dq], lambda m: _row_shape(qd, m, nd), nd)
        if db_ship is not None:
            db_ship.add_into([dbias], lambda m: (m,) + tuple(bd.shape[1:]), 0)
        back.add_into([dk, dv], lambda m: _kv_shape(kd, vd, m, nd), nd,
                      cut=lambda t: (t[..., :D], t[..., D:]))
        return dq, dk, dv, dbias, None, None, None, None, None, None


def _leaf(t: Tensor, grad: bool) -> Tensor:
    return t.detach().requires_grad_(grad and t.dtype.is_floating_point)


def _row_shape(x: Tensor, m: int, nd: int) -> Tuple[int, ...]:
    shape = list(x.shape)
    shape[nd] = m
    return tuple(shape)


def _grad(outputs, inputs, grads) -> List[Optional[Tensor]]:
    """``torch.autograd.grad`` with None for inputs the outputs do not reach."""
    pairs = [(o, g) for o, g in zip(outputs, grads) if o.requires_grad]
    if not pairs:
        return [None] * len(inputs)
    return list(torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs],
                                    allow_unused=True))


def _merge_shipped(plan: HaloPlan, o_rows: Tensor, l_rows: Tensor, parts: Tensor,
                   grad: bool) -> Tuple[Tensor, Tensor]:
    """Merge each dense row's own-key part (slot ``rank``) with the parts its peers
    returned, by log-sum-exp."""
    Fo = o_rows.size(1)
    nd_rows = plan.dense_rows.numel()
    world = len(plan.ranges)
    heads = l_rows.size(1)
    dev = o_rows.device
    lse_tab = l_rows.new_full((nd_rows, world, heads), -math.inf)
    out_tab = parts.new_zeros((nd_rows, world, Fo))
    slot = (torch.arange(nd_rows, device=dev), torch.full_like(plan.dense_rows, plan.rank))
    lse_tab = lse_tab.index_put(slot, l_rows.index_select(0, plan.dense_rows))
    out_tab = out_tab.index_put(slot, o_rows.index_select(0, plan.dense_rows).to(parts.dtype))
    lse_tab = lse_tab.index_put((plan.ship_pos, plan.ship_peer),
                                parts[:, Fo:].to(lse_tab.dtype))
    out_tab = out_tab.index_put((plan.ship_pos, plan.ship_peer), parts[:, :Fo])
    out_m, lse_m = merge_many(out_tab.view(nd_rows, world, heads, Fo // max(heads, 1)),
                              lse_tab)
    out_m = out_m.reshape(nd_rows, Fo).to(o_rows.dtype)
    if grad:
        return (o_rows.index_copy(0, plan.dense_rows, out_m),
                l_rows.index_copy(0, plan.dense_rows, lse_m))
    o_rows.index_copy_(0, plan.dense_rows, out_m)
    l_rows.index_copy_(0, plan.dense_rows, lse_m)
    return o_rows, l_rows


def _agree(group, world: int, error: Optional[str], facts: Tuple[int, ...]) -> None:
    """Every rank learns whether any rank failed its checks or disagrees on ``facts``;
    all then raise together (one small all_gather, two when something is wrong)."""
    t = torch.tensor([1 if error else 0, *facts], dtype=torch.int64,
                     device=_comm_device(group))
    gathered = [torch.empty_like(t) for _ in range(world)]
    try:
        dist.all_gather(gathered, t, group=group)
    except Exception as e:
        raise _failed("check of the inputs", e) from e
    rows = [g.cpu() for g in gathered]
    bad = any(int(r[0]) for r in rows) or any(not torch.equal(r[1:], rows[0][1:])
                                             for r in rows)
    if not bad:
        return
    messages: List[Optional[str]] = [None] * world
    try:
        dist.all_gather_object(messages, error, group=group)
    except Exception as e:
        raise _failed("check of the inputs", e) from e
    lines = [f"rank {p}: {m}" for p, m in enumerate(messages) if m]
    if not lines:
        lines = ["the ranks hold different graphs or ranges, or disagree on whether k and "
                 "v need gradients; every rank must pass the same graph and ranges, with "
                 "the same requires_grad"]
    raise ValueError("attngraph.distributed.graph_attention: " + "; ".join(lines))


def _own_edge_span(graph: TokenGraph, rows_only: bool, r0: int, r1: int,
                   ) -> Tuple[int, int]:
    """``(e0, e1)``: this rank's edges in the graph's canonical order (``(0, E_r)`` for a
    rows-only graph; an implicit graph's counted from its rule)."""
    if rows_only:
        return 0, graph.num_edges
    if graph.is_implicit:
        e_r = shard_edges(graph, [(r0, r1)])[0]
        return -1, e_r                       # e0 is counted only if a whole bias is given
    return int(graph.ptr[r0]), int(graph.ptr[r1])


def graph_attention(q: Tensor, k: Tensor, v: Tensor, graph: TokenGraph, *, group=None,
                    ranges: Optional[Sequence[Tuple[int, int]]] = None,
                    scale: Optional[float] = None, edge_bias: Optional[Tensor] = None,
                    return_lse: bool = False, backend: str = "auto",
                    ship_degree: Optional[int] = None, overlap: bool = True
                    ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """This rank's rows of :func:`attngraph.graph_attention` over a sharded sequence.

    Args:
        q, k, v: this rank's shard: ``[n_r, H, D]`` / ``[n_r, H_kv, D]`` / ``[n_r, H_kv,
            D_v]``, or batched ``[B, n_r, ...]``, with ``n_r = end - start`` of its range.
        graph: the whole self-attention graph (``num_src = num_dst = N``), the same on
            every rank, of which each rank reads only its rows (an implicit graph: only
            its rows' runs); or this rank's rows alone, ``n_r`` queries over all ``N``
            keys with global key ids (:func:`rows_of`), with ``ranges`` given.
        group: the process group (default: the world).
        ranges: ``[(start, end)]`` per rank, contiguous from 0 to N; default
            :func:`shard_ranges` ``(graph, world_size)``.
        scale, return_lse, backend: as for :func:`attngraph.graph_attention`.
        edge_bias: the bias of this rank's rows' edges, ``[E_r]`` or ``[E_r, H]`` in the
            graph's canonical order, or the whole ``[E]`` / ``[E, H]`` bias, of which the
            rank's slice is used.
        ship_degree: a row with more remote edges than this (a global token's) sends its
            query to the keys' owners instead of pulling its keys, and merges their
            partial results by log-sum-exp; default 8x the mean degree (at least 64),
            ``-1``: never.
        overlap: compute every row's own-key part while the halo travels (forward) and
            the own-key backward while the halo's dK/dV travel back (default); ``False``
            waits for each exchange first (the same results, bit for bit).

    Returns this rank's ``out`` (and ``lse``), differentiable in q, k, v and edge_bias.
    Collective: every rank of the group must call it with the same graph (or its rows of
    it) and ranges.
    """
    rank, world = _world(group)
    error, facts = None, (0, 0, 0, 0, 0)
    rows_only = False
    try:
        functional._check_graph(graph)
        if graph.num_src != graph.num_dst:
            if ranges is None:
                raise ValueError(f"a graph of this rank's rows ({graph.num_dst} queries over "
                                 f"{graph.num_src} keys) needs ranges=; a whole "
                                 f"self-attention graph has num_src = num_dst")
            ranges = _check_ranges(ranges, graph.num_src, world)
            rows_only = _rows_only(graph, ranges, rank)
        else:
            if ranges is None:
                ranges = shard_ranges(graph, world)
            ranges = _check_ranges(ranges, graph.num_dst, world)
        if ship_degree is not None and (isinstance(ship_degree, bool)
                                        or not isinstance(ship_degree, int)
                                        or ship_degree < -1):
            raise ValueError(f"ship_degree must be an int >= -1 or None, got {ship_degree!r}")
        r0, r1 = ranges[rank]
        for name, t in (("q", q), ("k", k), ("v", v)):
            functional._check_tensor(name, t, (3, 4))
            if t.dim() != q.dim():
                raise ValueError(f"q, k, v must all be node-major or all batched, got "
                                 f"{list(q.shape)}, {list(k.shape)}, {list(v.shape)}")
            if t.dtype != q.dtype or t.device != graph.device:
                raise TypeError(f"q, k, v must share one dtype and the graph's device "
                                f"({graph.device}), got {name} {t.dtype} on {t.device}")
            if t.size(t.dim() - 3) != r1 - r0:
                raise ValueError(f"{name} has {t.size(t.dim() - 3)} tokens but this rank's "
                                 f"range [{r0}, {r1}) has {r1 - r0}")
        # the backward exchanges gradients only where an input needs one: every rank must
        # agree, or one would wait in the reverse exchange for the others
        needs_grad = torch.is_grad_enabled() and any(
            isinstance(t, Tensor) and t.requires_grad for t in (q, k, v, edge_bias))
        n_total = ranges[-1][1]
        facts = ((-1 - n_total) if rows_only else _fingerprint(graph),
                 hash((ranges, -2 if ship_degree is None else int(ship_degree)))
                 & (2 ** 62 - 1), int(needs_grad), int(edge_bias is not None),
                 int(rows_only))
        if edge_bias is not None:
            if not isinstance(edge_bias, Tensor):
                raise TypeError(f"edge_bias must be a torch.Tensor, got "
                                f"{type(edge_bias).__name__}")
            e0, e1 = _own_edge_span(graph, rows_only, r0, r1)
            own_edges = e1 - e0 if e0 >= 0 else e1
            if not (edge_bias.dim() in (1, 2) and edge_bias.size(0) == own_edges):
                if (edge_bias.dim() not in (1, 2) or rows_only
                        or edge_bias.size(0) != graph.num_edges):
                    raise ValueError(f"edge_bias must have this rank's {own_edges} edges or "
                                     f"all {graph.num_edges} in its first dim, got "
                                     f"{list(edge_bias.shape)}")
                if e0 < 0:                   # implicit: this rank's first edge, counted
                    e0, e1 = shard_edges(graph, [(0, r0)])[0], None
                    e1 = e0 + own_edges
                edge_bias = edge_bias[e0:e1]
    except Exception as e:          # reported by every rank, raised by every rank
        error = f"{type(e).__name__}: {e}"
    _agree(group, world, error, facts)

    plan = halo_plan(graph, ranges, group, ship_degree=ship_degree,
                     edges=edge_bias is not None)
    grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, edge_bias))
    out, lse = _ContextParallel.apply(q, k, v, edge_bias, plan, group, scale, backend, grad,
                                      bool(overlap))
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


def ring_bytes(n: int, world: int, kv_heads: int, head_dim: int, value_dim: int,
               itemsize: int) -> int:
    """Bytes per rank that ring attention moves for one forward: all other ranks' K and V,
    ``(P - 1) / P * N * H_kv * (D + D_v)`` elements."""
    return math.ceil((world - 1) / world * n) * kv_heads * (head_dim + value_dim) * itemsize


def allgather_bytes(n: int, world: int, kv_heads: int, head_dim: int, value_dim: int,
                    itemsize: int) -> Tuple[int, int]:
    """``(bytes in, bytes held)`` per rank of an all-gather of K/V (PyTorch's context
    parallel for FlexAttention): it receives the same ``(P - 1) / P`` of K and V as ring
    attention, and holds all ``N`` tokens' K and V at once."""
    return (ring_bytes(n, world, kv_heads, head_dim, value_dim, itemsize),
            n * kv_heads * (head_dim + value_dim) * itemsize)
