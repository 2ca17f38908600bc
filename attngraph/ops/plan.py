"""Tile plans: which (query block x key block) tiles of a graph run as dense math, which
edges run per edge, and the cost model that decides it.

A tile costs about ``block_q * block_k`` cells of dense work whatever it holds; an edge on
the per-edge path costs about ``EDGE_COST_CELLS`` cells. A tile pays when it holds more
than ``block_q * block_k / EDGE_COST_CELLS`` edges: ``min_density = 1 / EDGE_COST_CELLS``.
:func:`tile_plan` picks the block size whose plan the model finds cheapest (from tile counts
alone, O(E) per size) and builds only that plan; plans are cached with the graph
(:attr:`attngraph.graph.GraphCaches.plan`). :mod:`attngraph.ops.tiles` runs a plan.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from attngraph import chunks
from attngraph.checks import check_int, check_perm
from attngraph.graph import TokenGraph

__all__ = ["TilePlan", "tile_plan", "best_block", "build_plan", "tile_counts", "plan_cost",
           "planned_graph", "tile_of_edges", "EDGE_COST_CELLS", "CELL_COST", "BLOCK_SIZES",
           "DEFAULT_BLOCK", "SEGMENT_TILES"]

DEFAULT_BLOCK = 128

# The cost model, in cells of a 128 x 128 tile: what one edge on the per-edge path costs,
# and what one cell of each block size costs. Measured by benchmarks/calibrate_tiles.py
# (figures in benchmarks/results/cpu/constants.md); set at the low end of the measurements,
# so tiles are taken only where they pay in every case measured.
EDGE_COST_CELLS = 32.0
CELL_COST = {64: 1.6, 128: 1.0}
BLOCK_SIZES = tuple(CELL_COST)

# Most tiles one query block's row of scores spans at once (longer rows are cut in runs
# whose results merge by log-sum-exp): 16 x 128 = 2048 keys.
SEGMENT_TILES = 16


class TilePlan:
    """Which ``block_q x block_k`` tiles of a graph run dense, and which edges run per edge.

    Attributes:
        block_q, block_k: tile size over queries and keys.
        num_q_blocks, num_k_blocks: ``ceil(num_dst / block_q)``, ``ceil(num_src / block_k)``.
        min_density: a tile runs dense when it holds at least ``min_density * block_q *
            block_k`` edges.
        tile_q, tile_k: int64 ``[T]``, query block and key block of every dense tile, in
            (query block, key block) order.
        mask_index: int64 ``[T]``, the tile's in-tile mask in ``masks`` (0: a full tile).
        masks: bool ``[1 + T_partial, block_q, block_k]``: ``masks[0]`` is all True, the
            others are the partial tiles' exact masks (cells past ``num_dst`` / ``num_src``
            are False).
        tile_edge_count: int64 ``[T]``, edges on each tile.
        residual: the :class:`TokenGraph` of the edges not on a dense tile (same nodes).
        residual_edges: int64 ``[E_r]``, their ids in the planned graph's canonical order.
        graph: the planned graph (the reordered one when ``order`` is set).
        order, src_order: the token order the plan computes in (``None``: the graph's own):
            planned query ``n`` is the graph's query ``order[n]``.
        source: the graph the plan was made for (``graph`` itself unless reordered).
        edge_perm: int64 ``[E]`` when reordered: planned edge ``e`` is the graph's canonical
            edge ``edge_perm[e]`` (computed on first use: an edge bias needs it).
        segments: the tiles as the forward and backward visit them: each query block's
            tiles cut into runs of at most ``SEGMENT_TILES``, grouped by run length ``L``:
            a list of ``(L, block [n], tiles [n, L], rank [n])`` (query block of each run,
            its tiles, its place among its block's runs); one run's scores are one row of
            ``L * block_k`` keys, softmaxed at once.
        segments_per_block: int64 ``[num_q_blocks]``, runs per query block.
    """

    __slots__ = ("block_q", "block_k", "num_q_blocks", "num_k_blocks", "min_density",
                 "tile_q", "tile_k", "mask_index", "masks", "tile_edge_count", "residual",
                 "residual_edges", "graph", "order", "src_order", "source", "_edge_perm",
                 "segments", "segments_per_block", "_tile_edges", "_run_masks",
                 "_additive_masks", "_empty_rows")

    def __init__(self, **fields):
        for name in self.__slots__:
            setattr(self, name, fields.pop(name, None))
        assert not fields, fields

    # ------------------------------------------------------------------ summary
    @property
    def num_tiles(self) -> int:
        return self.tile_q.numel()

    @property
    def num_full(self) -> int:
        return int((self.mask_index == 0).sum())

    @property
    def num_partial(self) -> int:
        return self.num_tiles - self.num_full

    @property
    def num_edges(self) -> int:
        return self.graph.num_edges

    @property
    def num_tile_edges(self) -> int:
        return self.num_edges - self.residual.num_edges

    @property
    def num_residual_edges(self) -> int:
        return self.residual.num_edges

    @property
    def tile_fraction(self) -> float:
        """Fraction of the edges that run on dense tiles."""
        return self.num_tile_edges / self.num_edges if self.num_edges else 0.0

    @property
    def tile_cells(self) -> int:
        """Dense cells computed: ``num_tiles * block_q * block_k``."""
        return self.num_tiles * self.block_q * self.block_k

    def cost(self, edge_cost_cells: float = EDGE_COST_CELLS) -> float:
        """Modelled work in units of a 128 x 128 tile's cell: tile cells (weighted by
        ``CELL_COST`` of the block size) plus the residual edges' cost."""
        per_cell = CELL_COST.get(max(self.block_q, self.block_k), 1.0)
        return per_cell * self.tile_cells + edge_cost_cells * self.num_residual_edges

    def summary(self) -> dict:
        return dict(block_q=self.block_q, block_k=self.block_k, tiles=self.num_tiles,
                    full=self.num_full, partial=self.num_partial,
                    tile_edges=self.num_tile_edges, residual_edges=self.num_residual_edges,
                    tile_fraction=round(self.tile_fraction, 4),
                    reordered=self.order is not None)

    def __repr__(self) -> str:
        s = self.summary()
        return (f"TilePlan(block={s['block_q']}x{s['block_k']}, tiles={s['tiles']} "
                f"({s['full']} full, {s['partial']} partial), tile_edges={s['tile_edges']}, "
                f"residual_edges={s['residual_edges']}, "
                f"tile_fraction={s['tile_fraction']:.3g}"
                f"{', reordered' if s['reordered'] else ''})")

    @property
    def edge_perm(self) -> Optional[Tensor]:
        if self.order is None:
            return None
        if self._edge_perm is None:
            self._edge_perm = self.source.permute(self.order, self.src_order,
                                                  return_edge_perm=True)[1]
        return self._edge_perm

    # ------------------------------------------------------------------ per-edge positions
    def tile_edges(self) -> Tuple[Tensor, Tensor, Tensor]:
        """The edges on dense tiles grouped by tile: ``(ptr [T + 1], edges [E_t], cell
        [E_t])``: tile t holds planned edges ``edges[ptr[t]:ptr[t+1]]``, at flat in-tile
        cells ``cell`` (``row * block_k + col``). Built on first use (an edge bias needs it)."""
        if self._tile_edges is None:
            g = self.graph
            tid = tile_of_edges(self, g.src, g.dst)
            on = tid >= 0
            edges = on.nonzero().view(-1)
            order = torch.sort(tid[edges], stable=True).indices
            edges = edges[order]
            cell = (mod_block(g.dst[edges].long(), self.block_q) * self.block_k
                    + mod_block(g.src[edges].long(), self.block_k))
            ptr = torch.zeros(self.num_tiles + 1, dtype=torch.long, device=g.device)
            ptr[1:] = torch.cumsum(self.tile_edge_count, 0)
            self._tile_edges = (ptr, edges, cell)
        return self._tile_edges


def div_block(x: Tensor, b: int) -> Tensor:
    """``x // b`` for non-negative int64 ``x``: a shift when ``b`` is a power of two (int64
    division is several times slower on CPU)."""
    return x >> (b.bit_length() - 1) if b & (b - 1) == 0 else x // b


def mod_block(x: Tensor, b: int) -> Tensor:
    return x & (b - 1) if b & (b - 1) == 0 else x % b


def tile_of_edges(plan: TilePlan, src: Tensor, dst: Tensor) -> Tensor:
    """Dense tile of each edge, or -1 for a residual edge."""
    nk = plan.num_k_blocks
    key = div_block(dst.long(), plan.block_q) * nk + div_block(src.long(), plan.block_k)
    tile_key = plan.tile_q * nk + plan.tile_k                        # sorted
    if plan.num_q_blocks * nk <= chunks.DENSE_TABLE_LIMIT:
        table = torch.full((plan.num_q_blocks * nk,), -1, dtype=torch.long, device=key.device)
        table[tile_key] = torch.arange(plan.num_tiles, device=key.device)
        return table[key]
    pos = torch.searchsorted(tile_key, key).clamp_max(max(plan.num_tiles - 1, 0))
    hit = tile_key[pos] == key if plan.num_tiles else torch.zeros_like(key, dtype=torch.bool)
    return torch.where(hit, pos, -1)


def _edge_slices(graph: TokenGraph):
    for e0 in range(0, graph.num_edges, chunks.PLAN_CHUNK_EDGES):
        e1 = min(e0 + chunks.PLAN_CHUNK_EDGES, graph.num_edges)
        yield e0, graph.src[e0:e1].long(), graph.dst[e0:e1].long()


def tile_counts(graph: TokenGraph, block_q: int, block_k: int) -> Tuple[Tensor, Tensor]:
    """``(tile key [T'], edges [T'])`` of the non-empty tiles, keys ``q_block * nK + k_block``
    ascending: a bincount over the tile grid when it is small enough (edges in chunks),
    else a sort."""
    nq, nk = -(-graph.num_dst // block_q), -(-graph.num_src // block_k)
    if nq * nk <= chunks.DENSE_TABLE_LIMIT:
        counts = torch.zeros(nq * nk, dtype=torch.long, device=graph.device)
        for _, src, dst in _edge_slices(graph):
            counts += torch.bincount(div_block(dst, block_q) * nk + div_block(src, block_k),
                                     minlength=nq * nk)
        nonempty = counts.nonzero().view(-1)
        return nonempty, counts[nonempty]
    # a large grid: query blocks a slab at a time (edges are sorted by query, so a slab's
    # edges are contiguous), each slab's tiles counted with a table of its own
    slab = max(1, chunks.DENSE_TABLE_LIMIT // max(nk, 1))
    ptr_host = graph.ptr.cpu()
    keys, counts = [], []
    for b0 in range(0, nq, slab):
        b1 = min(b0 + slab, nq)
        e0 = int(ptr_host[min(b0 * block_q, graph.num_dst)])
        e1 = int(ptr_host[min(b1 * block_q, graph.num_dst)])
        c = torch.zeros((b1 - b0) * nk, dtype=torch.long, device=graph.device)
        for a in range(e0, e1, chunks.PLAN_CHUNK_EDGES):
            b = min(a + chunks.PLAN_CHUNK_EDGES, e1)
            key = ((div_block(graph.dst[a:b].long(), block_q) - b0) * nk
                   + div_block(graph.src[a:b].long(), block_k))
            c += torch.bincount(key, minlength=(b1 - b0) * nk)
        nonempty = c.nonzero().view(-1)
        keys.append(nonempty + b0 * nk)
        counts.append(c[nonempty])
    if not keys:
        empty = torch.zeros(0, dtype=torch.long, device=graph.device)
        return empty, empty
    return torch.cat(keys), torch.cat(counts)


def planned_graph(graph: TokenGraph, order: Tensor, src_order: Optional[Tensor]):
    """The graph renumbered in ``order``: :meth:`TokenGraph.permuted` when that is the
    graph's own order (kept with the graph, and written without a sort by generators that
    know it), else :meth:`TokenGraph.permute`."""
    own = graph._order
    if own is not None and order is own[0] and (
            src_order is own[1] or own[1] is None and src_order is order):
        return graph.permuted()
    return graph.permute(order, src_order)


def plan_cost(counts: Tensor, num_edges: int, block_q: int, block_k: int,
              min_density: float, edge_cost_cells: float = EDGE_COST_CELLS) -> float:
    """Modelled cost (see :meth:`TilePlan.cost`) of the plan that ``tile_counts`` gives."""
    cells = block_q * block_k
    take = counts >= max(min_density * cells, 1)
    tiles, on_tiles = int(take.sum()), int(counts[take].sum())
    per_cell = CELL_COST.get(max(block_q, block_k), 1.0)
    return per_cell * tiles * cells + edge_cost_cells * (num_edges - on_tiles)


def build_plan(graph: TokenGraph, block_q: int = DEFAULT_BLOCK,
               block_k: Optional[int] = None, *, min_density: Optional[float] = None,
               order: Optional[Tensor] = None, src_order: Optional[Tensor] = None,
               counts: Optional[Tuple[Tensor, Tensor]] = None) -> TilePlan:
    """Plan ``graph`` in tiles of ``block_q x block_k`` (see :class:`TilePlan`), in O(E).

    ``min_density`` defaults to ``1 / EDGE_COST_CELLS``; 0 puts every non-empty tile on the
    dense path, a value above 1 none. With ``order`` (and ``src_order`` for bipartite
    graphs) the plan is made for the graph renumbered in that token order. ``counts``:
    :func:`tile_counts` of the planned graph, when already known.
    """
    block_k = block_q if block_k is None else block_k
    if min_density is None:
        min_density = 1.0 / EDGE_COST_CELLS
    planned = graph
    if order is not None:
        if src_order is None and not graph.is_bipartite:
            src_order = order
        planned = planned_graph(graph, order, src_order)
    nq = -(-planned.num_dst // block_q)
    nk = -(-planned.num_src // block_k)
    src, dst = planned.src, planned.dst
    uniq, counts = tile_counts(planned, block_q, block_k) if counts is None else counts
    cells = block_q * block_k
    take = counts >= max(min_density * cells, 1)
    tiles, tile_count = uniq[take], counts[take]
    full = tile_count == cells
    mask_index = torch.zeros(tiles.numel(), dtype=torch.long, device=graph.device)
    mask_index[~full] = torch.arange(1, int((~full).sum()) + 1, device=graph.device)
    plan = TilePlan(block_q=block_q, block_k=block_k, num_q_blocks=nq, num_k_blocks=nk,
                    min_density=float(min_density), tile_q=tiles // max(nk, 1),
                    tile_k=tiles % max(nk, 1), mask_index=mask_index,
                    tile_edge_count=tile_count, graph=planned, order=order,
                    src_order=src_order, source=graph)
    masks = torch.zeros(1 + int((~full).sum()), block_q, block_k, dtype=torch.bool,
                        device=graph.device)
    masks[0] = True
    residual = []
    for e0, src_c, dst_c in _edge_slices(planned):      # O(chunk) temporaries
        tid = tile_of_edges(plan, src_c, dst_c)
        on = tid >= 0
        part = on & (mask_index[tid.clamp_min(0)] > 0) if tiles.numel() else on
        e = part.nonzero().view(-1)
        cell = mod_block(dst_c[e], block_q) * block_k + mod_block(src_c[e], block_k)
        masks.view(-1)[mask_index[tid[e]] * cells + cell] = True
        residual.append((~on).nonzero().view(-1) + e0)
    res = (torch.cat(residual) if residual
           else torch.zeros(0, dtype=torch.long, device=graph.device))
    plan.masks = masks
    plan.residual_edges = res
    plan.residual = TokenGraph._from_canonical(src[res], dst[res], planned.num_src,
                                               planned.num_dst)
    plan.segments, plan.segments_per_block = segments(plan.tile_q, nq, SEGMENT_TILES)
    return plan


def segments(tile_q: Tensor, num_blocks: int, max_len: int):
    """Cut each query block's tiles (consecutive in ``tile_q``) into balanced runs of at
    most ``max_len`` tiles; group the runs by length."""
    count = torch.bincount(tile_q, minlength=num_blocks)
    first = torch.cumsum(count, 0) - count
    nseg = -(-count // max_len)
    block = torch.repeat_interleave(torch.arange(num_blocks, device=tile_q.device), nseg)
    rank = torch.arange(block.numel(), device=tile_q.device) - torch.repeat_interleave(
        torch.cumsum(nseg, 0) - nseg, nseg)
    c, n = count[block], nseg[block]
    length = c // n + (rank < c % n).long()
    start = first[block] + rank * (c // n) + torch.minimum(rank, c % n)
    groups = []
    for L in torch.unique(length).tolist():
        sel = length == L
        tiles = start[sel].unsqueeze(1) + torch.arange(L, device=tile_q.device)
        groups.append((int(L), block[sel], tiles, rank[sel]))
    return groups, nseg


# ---------------------------------------------------------------------------- execution
# Layouts: query blocks ``[H_kv, nQ, G * bq, C]`` (the G query heads of a kv head stacked,
# so one matmul per kv head serves them all), key blocks ``[H_kv, nK, bk, C]``.


def plan_order(graph: TokenGraph, order, src_order):
    """``(order, src_order, cacheable)`` of a tile plan: ``"auto"`` is the graph's own
    :attr:`~TokenGraph.order`; ``src_order`` defaults to ``order`` for self-attention.
    Plans in the graph's numbering or its ``order`` are cached; others are not (a tensor's
    id can be reused once it is freed)."""
    own = graph._order or (None, None)
    if isinstance(order, str):
        if order != "auto":
            raise ValueError(f"order must be 'auto', None or a permutation tensor, got "
                             f"{order!r}")
        order, src_order = own
    else:
        if order is not None:
            order = check_perm("order", order, graph.num_dst, graph.device)
        if src_order is not None:
            src_order = check_perm("src_order", src_order, graph.num_src, graph.device)
    if order is not None and src_order is None and not graph.is_bipartite:
        src_order = order
    own_src = own[0] if own[1] is None else own[1]
    cacheable = (order is None and src_order is None
                 or order is own[0] and src_order is own_src)
    return order, src_order, cacheable


def best_block(graph: TokenGraph, min_density: Optional[float] = None, order="auto",
               src_order=None):
    """``(block size, modelled cost, its tile counts or None)`` of the cheapest plan, from
    tile counts alone (O(E) per size): what :func:`tile_plan` builds, unbuilt. An implicit
    graph is planned materialised."""
    graph = graph.materialize()
    order, src_order, cacheable = plan_order(graph, order, src_order)
    key = ("best_block", min_density, order is not None)
    cache = graph.caches.plan
    if cacheable and key in cache:
        return cache[key] + (None,)
    planned = graph if order is None else planned_graph(graph, order, src_order)
    density = 1.0 / EDGE_COST_CELLS if min_density is None else min_density
    counts = {b: tile_counts(planned, b, b) for b in BLOCK_SIZES}
    costs = {b: plan_cost(counts[b][1], planned.num_edges, b, b, density)
             for b in BLOCK_SIZES}
    best = min(BLOCK_SIZES, key=costs.get)
    if cacheable:
        cache[key] = (best, costs[best])
    return best, costs[best], counts[best]


def tile_plan(graph: TokenGraph, block_size: Optional[int] = None, *,
              block_k: Optional[int] = None, min_density: Optional[float] = None,
              order="auto", src_order=None) -> TilePlan:
    """Which ``block_size x block_k`` tiles of ``graph`` run as dense math and which edges
    run per edge (a :class:`TilePlan`: counts, ``tile_fraction``, masks).

    Computed once per graph and arguments, and cached. ``block_size=None`` takes the
    size of ``BLOCK_SIZES`` (64, 128) whose plan has the least modelled cost
    (``TilePlan.cost``, from tile counts: only that plan is built). ``min_density``: a tile
    runs dense when it holds at least this fraction of its cells as edges (default: the
    measured break-even ``1 / EDGE_COST_CELLS``; 0: every non-empty tile; above 1: none).
    ``order``: ``"auto"`` (the graph's :attr:`~TokenGraph.order`), ``None`` (the graph's own
    numbering) or a permutation of the queries (``src_order``: of the keys, default
    ``order`` for self-attention). An implicit graph is planned materialised (attention on
    it needs no plan: it reads key ranges from the rule).
    """
    graph = graph.materialize()
    if min_density is not None:
        if isinstance(min_density, bool) or not isinstance(min_density, (int, float)) \
                or not min_density >= 0:
            raise ValueError(f"min_density must be a number >= 0, got {min_density!r}")
        min_density = float(min_density)
    order, src_order, cacheable = plan_order(graph, order, src_order)
    counts = None
    if block_size is None:
        if block_k is not None:
            raise ValueError("give block_size with block_k")
        block_size, _, counts = best_block(graph, min_density, order, src_order)
    bq = check_int("block_size", block_size, minimum=1)
    bk = bq if block_k is None else check_int("block_k", block_k, minimum=1)
    key = ("tile_plan", bq, bk, min_density, order is not None)
    cache = graph.caches.plan
    plan = cache.get(key) if cacheable else None
    if plan is None:
        plan = build_plan(graph, bq, bk, min_density=min_density, order=order,
                          src_order=src_order, counts=counts)
        if cacheable:
            cache[key] = plan
    return plan
