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

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from attngraph import chunks
from attngraph.checks import check_int, check_perm
from attngraph.graph import TokenGraph

__all__ = ["TilePlan", "tile_plan", "best_block", "build_plan", "tile_counts", "plan_cost",
           "planned_graph", "tile_of_edges", "EDGE_COST_CELLS", "CELL_COST", "BLOCK_SIZES",
           "DEFAULT_BLOCK", "SEGMENT_TILES", "H100", "FA2_FLOPS", "FA2_SOURCE",
           "FLEX_FRACTION", "FLEX_SOURCE", "FLEX_BLOCK", "FLEX_BACKWARD_FLOPS",
           "warp_instructions", "fused_kernels", "fused_seconds", "flex_seconds",
           "merge_seconds", "flex_min_density", "flex_density", "EngineChoice",
           "choose_engine"]

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
        flex: what :mod:`attngraph.ops.flex_tiles` derives from the plan (its BlockMask,
            packed in-tile masks), a dict built on first use and kept with the plan.
    """

    __slots__ = ("block_q", "block_k", "num_q_blocks", "num_k_blocks", "min_density",
                 "tile_q", "tile_k", "mask_index", "masks", "tile_edge_count", "residual",
                 "residual_edges", "graph", "order", "src_order", "source", "_edge_perm",
                 "segments", "segments_per_block", "_tile_edges", "_run_masks",
                 "_additive_masks", "_empty_rows", "flex")

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


# ---------------------------------------------------------------------------- GPU model
# The H100 roofline of the traffic model (benchmarks/model.py, benchmarks/results/model/
# model.md), which reads these figures from here: what `auto` on CUDA decides by. Every
# time it gives is a model, not a measurement.
H100 = dict(
    name="H100 SXM (model)",
    warp_instr_per_s=132 * 4 * 1.98e9,
    issue_source="NVIDIA H100 whitepaper: 132 SMs x 4 warp schedulers, 1.98 GHz boost",
    hbm_bytes_per_s=3.35e12, hbm_source="NVIDIA H100 SXM datasheet: 3.35 TB/s HBM3",
    l2_bytes=50e6, l2_source="NVIDIA H100 whitepaper: 50 MB L2",
    fp32_flops=67e12, fp32_source="NVIDIA H100 SXM datasheet: 67 TFLOP/s fp32 FMA",
    bf16_tensor_flops=989e12, bf16_source="NVIDIA H100 SXM datasheet: 989 TFLOP/s dense bf16",
    sms=132, regs_per_sm=65536, max_warps_per_sm=64,
)
FA2_FLOPS = 370e12
FA2_SOURCE = ("REFERENCES.md: FlashAttention-2 dense forward on H100, d = 128, ~370 TFLOP/s "
              "at long sequences (used for d = 64 too)")
FLEX_FRACTION = 0.875
FLEX_SOURCE = ("REFERENCES.md: FlexAttention runs block-structured masks at 85-90 % of "
               "FlashAttention speed: 87.5 % x FA2, on every non-empty 128 x 128 tile")
# FlexAttention's tile (its default BLOCK_SIZE), the tile of the FlexAttention engine's plans.
FLEX_BLOCK = 128
# A tile's backward does 5 matmuls to the forward's 2 (FlashAttention's backward), modelled
# at the forward's rate: fwd + bwd = (1 + 2.5) x fwd.
FLEX_BACKWARD_FLOPS = 2.5
_FUSED_FLOPS_PER_EDGE = {"fwd": 4, "dq": 6, "dkdv": 8}   # per edge, head, head-dim element


def warp_instructions(kernel: str, edges: float, heads: int, groups: int = 1) -> float:
    """Warp instructions a fused kernel issues on ``edges`` edges and ``heads`` query heads
    (the per-edge counts written in benchmarks/results/model/model.md); ``groups``: query
    heads per kv head (G)."""
    base, _, targs = kernel.partition("<")
    args = [a.strip() for a in targs.rstrip(">").split(",")]
    nt = int(args[1]) if len(args) > 1 else 1
    gq = int(args[2]) if len(args) > 2 else 1
    if base == "attn_fwd":
        return edges * heads / gq * (2 * nt + 6 + gq * (3 * nt + 20))
    vec = 4 if args and args[0] == "float" else 8
    lpe, steps = nt, nt / 32          # *_vec args: T, LPE[, GQ]; 32 / LPE edges per step
    if base == "attn_fwd_vec":
        return edges * heads / gq * steps * (
            2 + 2 * vec + 5 + gq * (3 * vec + 2 * math.log2(lpe) + 11))
    if base == "attn_bwd_dq_vec":
        return edges * heads / gq * steps * (
            2 + 2 * vec + 5 + gq * (3 * vec + 4 * math.log2(lpe) + 7))
    if base == "attn_bwd_dkdv_vec":
        return edges * heads / groups * steps * (
            2 + groups * (6 * vec + 4 * math.log2(lpe) + 11))
    if base == "attn_bwd_dq":
        return edges * heads / gq * (2 * nt + 6 + gq * (3 * nt + 26))
    if base == "attn_bwd_dkdv":
        return edges * heads / groups * (2 + groups * (6 * nt + 29))
    return 0.0


def fused_kernels(dtype: torch.dtype, head_dim: int, value_dim: int, groups: int
                  ) -> Optional[dict]:
    """``{"fwd", "dq", "dkdv"}``: the fused kernels (``ops/cuda/attention.cu``) that run
    these inputs (16-byte aligned rows, as torch allocates them), or None when the fused
    kernels take no such input (float64, head dims above 256)."""
    from attngraph.ops.cuda import loader
    from attngraph.ops.cuda.stages import KERNEL_DTYPES

    T = KERNEL_DTYPES.get(dtype)
    width = max(head_dim, value_dim)
    if T is None or width > loader.MAX_HEAD_DIM:
        return None
    nt = next(n for n in loader.HEAD_DIM_CHUNKS if 32 * n >= width)
    vec = loader.vec_layout(T, head_dim, value_dim, groups)
    fwd = (f"attn_fwd_vec<{T}, {vec[0]}, {vec[1]}>" if vec is not None
           else f"attn_fwd<{T}, {nt}, {loader.group_heads(groups, nt)}>")
    vec = loader.vec_layout(T, head_dim, value_dim, groups, "dq")
    if vec is not None:
        dq, dkdv = f"attn_bwd_dq_vec<{T}, {vec[0]}, {vec[1]}>", f"attn_bwd_dkdv_vec<{T}, {vec[0]}>"
    else:
        dq = f"attn_bwd_dq<{T}, {nt}, {loader.group_heads(groups, nt, 'dq')}>"
        dkdv = f"attn_bwd_dkdv<{T}, {nt}>"
    return dict(fwd=fwd, dq=dq, dkdv=dkdv)


def fused_seconds(edges: float, heads: int, groups: int, head_dim: int, value_dim: int,
                  dtype: torch.dtype, backward: bool = False) -> float:
    """Modelled H100 time of the fused kernels on ``edges`` edges (``heads`` query heads):
    per kernel the larger of instruction issue and fp32 FLOPs (the kernels are issue-bound
    at every mask of model.md). ``inf`` where the fused kernels take no such input."""
    kernels = fused_kernels(dtype, head_dim, value_dim, groups)
    if kernels is None:
        return float("inf")
    total = 0.0
    for stage in (("fwd", "dq", "dkdv") if backward else ("fwd",)):
        issue = (warp_instructions(kernels[stage], edges, heads, groups)
                 / H100["warp_instr_per_s"])
        flops = _FUSED_FLOPS_PER_EDGE[stage] * edges * heads * max(head_dim, value_dim)
        total += max(issue, flops / H100["fp32_flops"])
    return total


def flex_seconds(tiles: float, heads: int, head_dim: int, value_dim: int,
                 backward: bool = False) -> float:
    """Modelled H100 time of FlexAttention on ``tiles`` 128 x 128 tiles (``heads`` query
    heads): ``2 * 128 * 128 * (D + D_v)`` FLOPs per tile and head at ``FLEX_FRACTION`` of
    FlashAttention-2's rate; the backward ``FLEX_BACKWARD_FLOPS`` times the forward's."""
    flops = tiles * 2 * FLEX_BLOCK * FLEX_BLOCK * (head_dim + value_dim) * heads
    t = flops / (FLEX_FRACTION * FA2_FLOPS)
    return t * (1 + FLEX_BACKWARD_FLOPS) if backward else t


def merge_seconds(n: int, heads: int, value_dim: int, backward: bool = False) -> float:
    """Modelled H100 time of the log-sum-exp merge of two partial results: two float32
    ``(out, lse)`` read, one written, at HBM bandwidth (twice that with the backward)."""
    per_row = 3 * (value_dim * 4 + 4)
    t = n * heads * per_row / H100["hbm_bytes_per_s"]
    return 2 * t if backward else t


def flex_min_density(heads: int, groups: int, head_dim: int, value_dim: int,
                     dtype: torch.dtype, backward: bool = False) -> float:
    """The FlexAttention engine's break-even tile density on the H100 model: a 128 x 128
    tile takes as long as this fraction of its cells as edges on the fused kernels; 0 (every
    non-empty tile) where the fused kernels take no such input."""
    edge = fused_seconds(1.0, heads, groups, head_dim, value_dim, dtype, backward)
    if edge == float("inf"):
        return 0.0
    tile = flex_seconds(1.0, heads, head_dim, value_dim, backward)
    return tile / (edge * FLEX_BLOCK * FLEX_BLOCK)


class EngineChoice:
    """What :func:`choose_engine` decided, and why.

    Attributes:
        engine: ``"flex"`` (tiles on FlexAttention + residual edges on the fused kernels),
            ``"fused"`` (the fused kernels alone), or None (no model for the device).
        hybrid_s, fused_s: modelled H100 seconds of either (None without a model).
        tiles, tile_edges, residual_edges: the FlexAttention engine's plan, from tile counts.
        min_density: its break-even tile density.
        reason: one line saying which engine and why.
    """

    __slots__ = ("engine", "hybrid_s", "fused_s", "tiles", "tile_edges", "residual_edges",
                 "min_density", "reason")

    def __init__(self, **fields):
        for name in self.__slots__:
            setattr(self, name, fields.pop(name, None))
        assert not fields, fields

    def __repr__(self) -> str:
        return f"EngineChoice({self.engine!r}: {self.reason})"


def _flex_counts(graph: TokenGraph):
    """Tile counts at ``FLEX_BLOCK`` in the graph's own token order (``order="auto"``), as
    the FlexAttention engine plans it; cached."""
    order, src_order, cacheable = plan_order(graph, "auto", None)
    key = ("flex_counts", order is not None)
    cache = graph.caches.plan
    if cacheable and key in cache:
        return cache[key]
    planned = graph if order is None else planned_graph(graph, order, src_order)
    counts = tile_counts(planned, FLEX_BLOCK, FLEX_BLOCK)[1]
    if cacheable:
        cache[key] = counts
    return counts


def _hybrid(counts: Tensor, num_edges: int, num_dst: int, density: float, heads: int,
            groups: int, head_dim: int, value_dim: int, dtype: torch.dtype, backward: bool):
    """``(seconds, tiles, tile edges)`` of the hybrid when tiles of at least ``density``
    go to FlexAttention and the other edges to the fused kernels, merged."""
    take = counts >= max(density * FLEX_BLOCK * FLEX_BLOCK, 1)
    tiles, tile_edges = int(take.sum()), int(counts[take].sum())
    t = flex_seconds(tiles, heads, head_dim, value_dim, backward)
    if num_edges - tile_edges:
        t += fused_seconds(num_edges - tile_edges, heads, groups, head_dim, value_dim, dtype,
                           backward)
        if tiles:
            t += merge_seconds(num_dst, heads, value_dim, backward)
    return t, tiles, tile_edges


def flex_density(graph: TokenGraph, *, heads: int, kv_heads: int, head_dim: int,
                 value_dim: int, dtype: torch.dtype, requires_grad: bool = False,
                 fused_available: bool = True) -> float:
    """The FlexAttention engine's ``min_density`` for ``graph``: the break-even density
    (:func:`flex_min_density`), or 0 (every non-empty tile on FlexAttention: no residual,
    no merge) where the H100 model finds that faster, as when the edges a break-even plan
    leaves over are too few to pay for the merge; 0 without the fused kernels."""
    if not fused_available:
        return 0.0
    graph = graph.materialize()
    G = max(1, heads // max(kv_heads, 1))
    bwd = bool(requires_grad)
    counts = _flex_counts(graph)
    best, best_t = 0.0, None
    for d in (flex_min_density(heads, G, head_dim, value_dim, dtype, bwd), 0.0):
        t = _hybrid(counts, graph.num_edges, graph.num_dst, d, heads, G, head_dim,
                    value_dim, dtype, bwd)[0]
        if best_t is None or t < best_t:
            best, best_t = d, t
    return best


def choose_engine(graph: TokenGraph, device_type: str, *, heads: int, kv_heads: int,
                  head_dim: int, value_dim: int, dtype: torch.dtype,
                  requires_grad: bool = False, fused_available: bool = True) -> EngineChoice:
    """Tiles on FlexAttention plus residual edges on the fused kernels, or the fused kernels
    alone: which the H100 model finds faster for ``graph`` on ``device_type``.

    On ``"cuda"`` both are timed by the model of benchmarks/results/model/model.md (the same
    tile counts, at ``FLEX_BLOCK`` in the graph's :attr:`~TokenGraph.order`, and constants):
    the engine's plan (:func:`flex_density`) puts a tile on FlexAttention when it holds at
    least the break-even fraction of its cells as edges (:func:`flex_min_density`), or
    every non-empty tile where that is faster, the rest on the fused kernels, and the two
    merge by log-sum-exp (:func:`merge_seconds`). ``requires_grad`` times forward and
    backward. Without the fused kernels (``fused_available=False``, or inputs they do not
    take) every non-empty tile goes to FlexAttention. On another device there is no model:
    ``engine`` is None. The decision is a model, never a measurement; it takes the device
    type (not a tensor), so it can be asked on any machine.
    """
    if device_type != "cuda":
        return EngineChoice(engine=None, reason=f"the H100 model chooses engines for CUDA "
                                                f"tensors only, not {device_type}")
    graph = graph.materialize()
    G = max(1, heads // max(kv_heads, 1))
    bwd = bool(requires_grad)
    if fused_kernels(dtype, head_dim, value_dim, G) is None:
        fused_available = False
    density = flex_density(graph, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                           value_dim=value_dim, dtype=dtype, requires_grad=bwd,
                           fused_available=fused_available)
    hybrid, tiles, tile_edges = _hybrid(_flex_counts(graph), graph.num_edges, graph.num_dst,
                                        density, heads, G, head_dim, value_dim, dtype, bwd)
    residual = graph.num_edges - tile_edges
    fused = (fused_seconds(graph.num_edges, heads, G, head_dim, value_dim, dtype, bwd)
             if fused_available else float("inf"))
    engine = "flex" if tiles and hybrid < fused else "fused"
    what = "forward + backward" if bwd else "forward"
    ms = lambda t: "n/a" if t == float("inf") else f"{t * 1e3:.3g} ms"  # noqa: E731
    reason = (f"H100 model ({what}, H = {heads}, D = {head_dim}): tiles on FlexAttention "
              f"({tiles} tiles of {FLEX_BLOCK}², {residual} residual edges) "
              f"{ms(hybrid)} vs the fused kernels {ms(fused)}")
    if not fused_available:
        reason += " (the fused kernels are not available for these inputs)"
    return EngineChoice(engine=engine, hybrid_s=hybrid, fused_s=fused, tiles=tiles,
                        tile_edges=tile_edges, residual_edges=residual, min_density=density,
                        reason=reason)
