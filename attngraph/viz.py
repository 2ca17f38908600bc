"""Pictures of token graphs: the mask as an image, and a small graph as an arc diagram.

* :func:`plot_mask` draws the dense view ``mask[i, j]`` (query i attends to key j) with the
  origin top-left like a matrix. Small graphs are drawn exactly; large ones as a binned
  density image computed from the edge list, so a graph over 10^8 tokens is never densified.
* :func:`plot_graph` draws a small graph as an arc diagram: tokens on a line, one arc per
  edge from key to query, width and opacity from attention weights.
* :func:`plot_grid` draws, for tokens that are the cells of a 2-D grid (an image), the
  keys of a few queries on the grid itself: a neighbourhood reads as a window there.
* :func:`mask_png` renders :func:`plot_mask` to PNG bytes (``TokenGraph._repr_png_``) on an
  explicit Agg canvas, leaving pyplot's global state alone.

matplotlib is imported here only: ``import attngraph`` does not import it.
"""
from __future__ import annotations

import io
import math
from typing import Optional, Sequence

import matplotlib
import numpy as np
import torch
from matplotlib import colors as mcolors
from matplotlib import ticker
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import Tensor

from attngraph import chunks
from attngraph.graph import TokenGraph
from attngraph.runs import Range, from_runs

__all__ = ["plot_mask", "plot_graph", "plot_grid", "mask_png", "MAX_ARC_NODES",
           "MAX_ARC_EDGES"]

# plot_graph refuses larger graphs: beyond this, labels and arcs stop being readable.
MAX_ARC_NODES = 64
MAX_ARC_EDGES = 2048


_EDGE_COLOR = "#1f3b73"     # exact mask: edge cells
_EMPTY_COLOR = "#ffffff"    # exact mask / density image: cells without edges
_DENSITY_CMAP = ("YlGnBu", 0.3, 1.0)  # base colormap and the part of it used


def _density_cmap():
    """Light blue (few edges) to dark navy (all cells): dense reads dark, as in the exact
    picture, and the sparsest bins stay visible on the white of empty bins."""
    base = matplotlib.colormaps[_DENSITY_CMAP[0]](np.linspace(*_DENSITY_CMAP[1:], 256))
    return mcolors.LinearSegmentedColormap.from_list("attngraph_density", base).with_extremes(
        bad=_EMPTY_COLOR)


def _check_graph(graph) -> None:
    if not isinstance(graph, TokenGraph):
        raise TypeError(f"graph must be an attngraph.TokenGraph, got {type(graph).__name__}; "
                        f"wrap an edge_index with attngraph.TokenGraph(edge_index, num_nodes)")


class _PyplotFigure(Figure):
    """The figure of a picture drawn without a caller's Axes (a pyplot figure). As a notebook
    cell's value (``g.plot()`` returns it) it is shown once: drawn here and closed, so that
    pyplot's inline backend does not show it again when the cell ends."""

    def _ipython_display_(self):
        import matplotlib.pyplot as plt
        from IPython.display import Image, display

        if "inline" not in matplotlib.get_backend():
            return                      # a window or widget backend shows pyplot figures
        buf = io.BytesIO()
        self.savefig(buf, format="png", bbox_inches="tight")
        display(Image(buf.getvalue()))
        plt.close(self)


def _new_axes(figsize) -> Axes:
    # Only when the caller gives no Axes: pyplot makes the figure show up in notebooks.
    import matplotlib.pyplot as plt

    _, ax = plt.subplots(figsize=figsize, layout="constrained", FigureClass=_PyplotFigure)
    return ax


def figure_of(ax: Axes) -> Figure:
    """The top-level ``Figure`` holding ``ax`` (the one that ``savefig`` writes, also when
    ``ax`` sits in a subfigure)."""
    fig = ax.figure
    return getattr(fig, "figure", None) or fig


def _count(x: float) -> str:
    """8192 -> '8,192', 1234567 -> '1.23M' (short, for titles)."""
    if abs(x) < 1e5 and float(x).is_integer():
        return f"{int(x):,}"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{int(x)}"


def _stats(graph: TokenGraph) -> str:
    nodes = (f"N = {_count(graph.num_dst)}" if not graph.is_bipartite else
             f"{_count(graph.num_dst)} queries x {_count(graph.num_src)} keys")
    d = graph.density
    dens = f"{100 * d:.3g}%" if d >= 1e-3 else f"{d:.2e}"
    return f"{nodes} · E = {_count(graph.num_edges)} · density {dens}"


def _title(ax: Axes, graph: TokenGraph, title: Optional[str], extra: str = "") -> None:
    stats = _stats(graph) + extra
    ax.set_title(stats if title is None else f"{title}\n{stats}", fontsize=10)


def _bin_counts(graph: TokenGraph, rows: int, cols: int) -> np.ndarray:
    """Edges per ``[rows, cols]`` bin: query i -> row bin ``i * rows // num_dst``, key j ->
    column bin ``j * cols // num_src``. Works in chunks on the graph's device; an implicit
    graph is binned from its rule (:func:`_bin_rule`)."""
    if graph.is_implicit:
        return _bin_rule(graph, rows, cols)
    src, dst = graph.src, graph.dst
    counts = torch.zeros(rows * cols, dtype=torch.int64, device=graph.device)
    for e0 in range(0, graph.num_edges, chunks.BIN_CHUNK_EDGES):
        s = src[e0:e0 + chunks.BIN_CHUNK_EDGES].long()
        d = dst[e0:e0 + chunks.BIN_CHUNK_EDGES].long()
        key = torch.div(d * rows, graph.num_dst, rounding_mode="floor") * cols
        key += torch.div(s * cols, graph.num_src, rounding_mode="floor")
        counts += torch.bincount(key, minlength=rows * cols)
    return counts.view(rows, cols).cpu().numpy()



def _bin_rule(graph, rows: int, cols: int) -> np.ndarray:
    """:func:`_bin_counts` of an implicit graph without its edge list: a ``Range`` run of a
    row adds, to each column bin its keys cross, the lattice points inside the bin (closed
    form, work per row = bins crossed); ``Take`` runs (a few table keys per row) are
    generated and counted."""
    nd, ns = graph.num_dst, graph.num_src
    dev = graph.device
    counts = torch.zeros(rows * cols, dtype=torch.int64, device=dev)
    # column bin c holds keys [ceil(c ns / cols), ceil((c + 1) ns / cols))
    edges = -torch.div(-torch.arange(cols + 1, device=dev) * ns, cols, rounding_mode="floor")
    for r0 in range(0, nd, chunks.BIN_RULE_ROWS):
        r1 = min(r0 + chunks.BIN_RULE_ROWS, nd)
        i = torch.arange(r0, r1, device=dev)
        row_bin = torch.div(i * rows, nd, rounding_mode="floor")
        for run in graph.runs(r0, r1):
            if not isinstance(run, Range):
                local = from_runs(ns, r1 - r0, [run], device=dev)
                if local.num_edges:
                    key = row_bin[local.dst] * cols + torch.div(local.src * cols, ns,
                                                                rounding_mode="floor")
                    counts += torch.bincount(key, minlength=rows * cols)
                continue
            on = run.count > 0
            a, n, s = run.start[on], run.count[on], int(run.step)
            last = a + (n - 1) * s
            c0 = torch.div(a * cols, ns, rounding_mode="floor")
            c1 = torch.div(last * cols, ns, rounding_mode="floor")
            span = c1 - c0 + 1
            pair_row = torch.repeat_interleave(torch.arange(a.numel(), device=dev), span)
            c = c0[pair_row] + torch.arange(pair_row.numel(), device=dev) - torch.repeat_interleave(
                torch.cumsum(span, 0) - span, span)
            lo = torch.maximum(edges[c], a[pair_row])
            hi = torch.minimum(edges[c + 1] - 1, last[pair_row])
            # lattice points a + m s in [lo, hi]
            m_lo = -torch.div(-(lo - a[pair_row]), s, rounding_mode="floor")
            m_hi = torch.div(hi - a[pair_row], s, rounding_mode="floor")
            hits = torch.clamp(m_hi - m_lo + 1, min=0)
            key = row_bin[on][pair_row] * cols + c
            counts.index_add_(0, key, hits)
    return counts.view(rows, cols).cpu().numpy()


def _bin_sizes(n: int, bins: int) -> np.ndarray:
    """Indices per bin when index x goes to bin ``x * bins // n``: bin b holds
    ``[ceil(b n / bins), ceil((b + 1) n / bins))``."""
    b = np.arange(bins + 1, dtype=np.int64)
    return np.diff(-((-b * n) // bins))


def plot_mask(graph: TokenGraph, *, ax: Optional[Axes] = None, resolution: int = 512,
              title: Optional[str] = None, color_scale: str = "auto", tiles=None) -> Axes:
    r"""Draw the mask of ``graph``: ``mask[i, j]`` (query i attends to key j) as an image.

    Rows are queries ``i`` (top to bottom), columns keys ``j`` (left to right), origin
    top-left like a matrix; the title gives N, E and the density.

    * ``num_dst, num_src <= resolution``: the exact pattern, one cell per (query, key).
    * larger: a ``[min(num_dst, resolution), min(num_src, resolution)]`` density image —
      the fraction of each bin's cells that are edges, with a colorbar — counted from the
      edge list in chunks on the graph's device (``O(E)`` time, ``O(resolution^2)``
      memory). Bins without edges stay white. The graph is never densified, so this stays
      fast for 10^8 tokens.

    Args:
        graph: the :class:`~attngraph.TokenGraph` to draw (``num_dst`` queries x ``num_src``
            keys).
        ax: matplotlib Axes to draw on; a new figure (via pyplot) when None.
        resolution: largest image side in cells before binning.
        title: first title line (e.g. the mask's name); the stats line follows it.
        color_scale: ``"linear"``, ``"log"`` or ``"auto"`` (log when the non-empty bins'
            densities span more than a decade) — for binned images.
        tiles: ``True`` (the graph's ``tile_plan()``) or a
            :class:`~attngraph.ops.tiles.TilePlan` of it: draw which edges run on dense
            tiles and which per edge, in two colours, with the tiles outlined (in the
            plan's token order when it reorders).

    Returns:
        the matplotlib Axes.
    """
    _check_graph(graph)
    if tiles is not None and tiles is not False:
        return _plot_tiles(graph, tiles, ax=ax, resolution=resolution, title=title)
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"resolution must be a positive int, got {resolution!r}")
    if color_scale not in ("auto", "linear", "log"):
        raise ValueError(f"color_scale must be 'auto', 'linear' or 'log', got {color_scale!r}")
    nd, ns = graph.num_dst, graph.num_src
    if ax is None:
        ax = _new_axes((5.2, 4.8))
    ratio = max(nd, 1) / max(ns, 1)
    aspect = "equal" if 0.25 <= ratio <= 4 else "auto"

    if nd <= resolution and ns <= resolution:
        img = graph.to_dense().cpu().numpy().astype(np.uint8)
        cmap = mcolors.ListedColormap([_EMPTY_COLOR, _EDGE_COLOR])
        ax.imshow(img, cmap=cmap, vmin=0, vmax=1, interpolation="antialiased",
                  interpolation_stage="rgba", aspect=aspect,
                  extent=(-0.5, ns - 0.5, nd - 0.5, -0.5))
        if max(nd, ns) <= 64:  # cell grid: individual (query, key) pairs stay countable
            ax.set_xticks(np.arange(-0.5, ns, 1), minor=True)
            ax.set_yticks(np.arange(-0.5, nd, 1), minor=True)
            ax.grid(which="minor", color="#d0d0d0", linewidth=0.4)
            ax.tick_params(which="minor", length=0)
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True, nbins=8))
        ax.yaxis.set_major_locator(ticker.MaxNLocator(integer=True, nbins=8))
        extra = ""
    else:
        rows, cols = min(nd, resolution), min(ns, resolution)
        counts = _bin_counts(graph, rows, cols)
        cells = np.outer(_bin_sizes(nd, rows), _bin_sizes(ns, cols)).astype(np.float64)
        frac = np.ma.masked_equal(counts / cells, 0.0)
        positive = frac.compressed()
        lo = float(positive.min()) if positive.size else 1.0
        hi = float(positive.max()) if positive.size else 1.0
        use_log = color_scale == "log" or (color_scale == "auto" and hi / lo > 10)
        # log: the sparsest bins sit a little above the scale's light end, so that one-bin
        # lines (a global token in a large graph) stay visible after resampling
        norm = (mcolors.LogNorm(vmin=lo / 4, vmax=max(hi, lo * 1.0001)) if use_log
                else mcolors.Normalize(vmin=0.0, vmax=hi))
        cmap = _density_cmap()
        # antialiased resampling: a one-bin line (a global token) must not vanish when the
        # image has more bins than the axes have pixels
        im = ax.imshow(frac, cmap=cmap, norm=norm, interpolation="antialiased",
                       interpolation_stage="rgba", aspect=aspect, extent=(0, ns, nd, 0))
        cb = ax.figure.colorbar(im, ax=ax, shrink=0.85, pad=0.02)
        cb.set_label("fraction of cells that are edges" + (" (log)" if use_log else ""))
        if use_log and norm.vmax / norm.vmin < 1e3:  # few decades: label 1, 2, 5 x 10^k
            cb.ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
            cb.ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%.2g"))
            cb.ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        eng = ticker.EngFormatter(sep="")
        ax.xaxis.set_major_formatter(eng)
        ax.yaxis.set_major_formatter(eng)
        extra = f"\n{rows} x {cols} bins of ~{_count(nd / rows)} x {_count(ns / cols)} cells"
    for spine in ax.spines.values():  # light frame: edge cells on row/column 0 stay visible
        spine.set(color="#b0b0b0", linewidth=0.6)
    ax.xaxis.tick_top()
    ax.xaxis.set_label_position("top")
    ax.set_xlabel("key j")
    ax.set_ylabel("query i")
    _title(ax, graph, title, extra)
    return ax


def _as_edge_weights(weights, num_edges: int) -> np.ndarray:
    """``[E]`` or ``[E, H]`` (mean over heads) -> float64 numpy ``[E]``."""
    if isinstance(weights, Tensor):
        w = weights.detach().float().cpu().numpy()
    else:
        try:
            w = np.asarray(weights, dtype=np.float64)
        except (TypeError, ValueError):
            raise TypeError(f"weights must be a tensor or array of floats, got "
                            f"{type(weights).__name__}") from None
    if w.ndim not in (1, 2) or w.shape[0] != num_edges:
        raise ValueError(f"weights must have shape [E] or [E, H] with E = {num_edges} (one per "
                         f"edge, canonical order), got {list(w.shape)}")
    w = w.mean(axis=1) if w.ndim == 2 else w
    if not np.all(np.isfinite(w)) or (w < 0).any():
        raise ValueError("weights must be finite and non-negative (attention probabilities)")
    return w.astype(np.float64)


_TILE_COLOR, _RESIDUAL_COLOR = "#3182bd", "#e6550d"


def _plot_tiles(graph: TokenGraph, plan, *, ax: Optional[Axes], resolution: int,
                title: Optional[str]) -> Axes:
    """The mask with tile edges and residual edges in two colours (see :func:`plot_mask`)."""
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Patch, Rectangle

    from attngraph.ops.tiles import TilePlan

    if plan is True:
        plan = graph.tile_plan()
    if not isinstance(plan, TilePlan):
        raise TypeError(f"tiles must be True or a TilePlan of the graph, got "
                        f"{type(plan).__name__}")
    if plan.num_edges != graph.num_edges or (plan.graph.num_src, plan.graph.num_dst) != (
            graph.num_src, graph.num_dst):
        raise ValueError("tiles must be a TilePlan of this graph (graph.tile_plan(...))")
    g = plan.graph
    nd, ns = g.num_dst, g.num_src
    if ax is None:
        ax = _new_axes((5.2, 4.8))
    rows, cols = min(nd, resolution), min(ns, resolution)
    residual = _bin_counts(plan.residual, rows, cols)
    on_tiles = _bin_counts(g, rows, cols) - residual
    img = np.ones((rows, cols, 3))
    img[on_tiles > 0] = mcolors.to_rgb(_TILE_COLOR)
    img[residual > 0] = mcolors.to_rgb(_RESIDUAL_COLOR)   # residual edges drawn on top
    ratio = max(nd, 1) / max(ns, 1)
    ax.imshow(img, interpolation="antialiased", interpolation_stage="rgba",
              aspect="equal" if 0.25 <= ratio <= 4 else "auto", extent=(0, ns, nd, 0))
    if 0 < plan.num_tiles <= 4096:
        tq, tk = plan.tile_q.tolist(), plan.tile_k.tolist()
        boxes = [Rectangle((kb * plan.block_k, qb * plan.block_q), plan.block_k, plan.block_q)
                 for qb, kb in zip(tq, tk)]
        ax.add_collection(PatchCollection(boxes, facecolor=_TILE_COLOR, alpha=0.12,
                                          edgecolor=_TILE_COLOR, linewidth=0.4))
    ax.legend(handles=[Patch(color=_TILE_COLOR, label=f"on {plan.num_tiles} dense tiles "
                             f"({plan.tile_fraction:.1%})"),
                       Patch(color=_RESIDUAL_COLOR,
                             label=f"per edge ({plan.num_residual_edges:,})")],
              loc="lower left", fontsize=7, framealpha=0.85)
    for spine in ax.spines.values():
        spine.set(color="#b0b0b0", linewidth=0.6)
    ax.xaxis.tick_top()
    ax.xaxis.set_label_position("top")
    order = ", reordered" if plan.order is not None else ""
    ax.set_xlabel("key j" + (" (plan order)" if order else ""))
    ax.set_ylabel("query i" + (" (plan order)" if order else ""))
    extra = f"\ntiles {plan.block_q} x {plan.block_k}{order}"
    if rows < nd or cols < ns:
        extra += f"; {rows} x {cols} bins"
    _title(ax, graph, title, extra)
    return ax


def _arc(x0: float, x1: float, above: bool, height: float, points: int = 32) -> np.ndarray:
    """Half ellipse from (x0, 0) to (x1, 0), ``height`` tall, above or below the line."""
    t = np.linspace(0.0, math.pi, points)
    mid, r = (x0 + x1) / 2, (x1 - x0) / 2
    y = np.sin(t) * height * (1 if above else -1)
    return np.column_stack([mid - r * np.cos(t), y])


def plot_graph(graph: TokenGraph, *, tokens: Optional[Sequence[str]] = None, weights=None,
               ax: Optional[Axes] = None, title: Optional[str] = None) -> Axes:
    r"""Draw a small token graph as an arc diagram.

    Tokens sit on a horizontal line at x = position, labelled below the axis. Each edge
    ``j -> i`` (query i attends to key j) is an arc from key to query: **above** the line
    when ``j < i`` (a past key), **below** when ``j > i`` (a future key); self-edges
    ``i -> i`` are rings around the token. Bipartite graphs (cross-attention) put keys on
    a lower line and queries on an upper one, joined by straight segments.

    Args:
        graph: a :class:`~attngraph.TokenGraph` with at most ``MAX_ARC_NODES`` tokens and
            ``MAX_ARC_EDGES`` edges (use :func:`plot_mask` for larger ones).
        tokens: labels of the tokens, ``len(tokens) == num_src`` (self-attention); default
            the positions. For bipartite graphs a pair ``(key_labels, query_labels)``.
        weights: attention weights ``[E]`` or ``[E, H]`` (averaged over heads) in the graph's
            canonical edge order, e.g. ``attngraph.ops.edge_softmax(scores, graph)``. They set
            each arc's colour, width and opacity; heavier arcs are drawn on top.
        ax: matplotlib Axes to draw on; a new figure (via pyplot) when None.
        title: first title line; a stats line (N, E, density) follows it.

    Returns:
        the matplotlib Axes.
    """
    _check_graph(graph)
    nd, ns, E = graph.num_dst, graph.num_src, graph.num_edges
    if max(nd, ns) > MAX_ARC_NODES or E > MAX_ARC_EDGES:
        raise ValueError(f"plot_graph draws graphs of at most {MAX_ARC_NODES} tokens and "
                         f"{MAX_ARC_EDGES} edges legibly, got {max(nd, ns)} tokens and {E} "
                         f"edges; use attngraph.viz.plot_mask(graph) (or graph.plot()) for a "
                         f"mask picture, or draw a subgraph")
    w = None if weights is None else _as_edge_weights(weights, E)
    key_labels, query_labels = _labels(graph, tokens)
    src = graph.src.cpu().numpy()
    dst = graph.dst.cpu().numpy()
    n = max(nd, ns)
    if ax is None:
        ax = _new_axes((max(6.0, 0.32 * n + 2), 4.2))

    loops = np.zeros(E, dtype=bool)
    if graph.is_bipartite:  # keys on y = 0, queries on y = 1: straight segments
        # centre the shorter row so segments do not all lean one way
        kx = np.arange(ns) + (n - ns) / 2
        qx = np.arange(nd) + (n - nd) / 2
        segments = [np.array([[kx[j], 0.0], [qx[i], 1.0]]) for j, i in zip(src, dst)]
    else:
        loops = src == dst
        segments = [_arc(min(i, j), max(i, j), j < i, abs(i - j) / 2)
                    for j, i in zip(src, dst)]
        gap = (dst - src) / 2  # arc height: positive above, negative below
        above_h = gap.max(initial=0.0)
        below_h = -gap.min(initial=0.0)

    if w is None:
        alpha = 0.9 if E <= 64 else max(0.25, min(0.9, 40.0 / E ** 0.5))
        colors = np.tile(mcolors.to_rgba(_EDGE_COLOR, alpha), (E, 1))
        widths = np.full(E, 1.2)
        order = np.arange(E)
    else:
        wmax = float(w.max()) if E and w.max() > 0 else 1.0
        rel = w / wmax
        cmap = mcolors.LinearSegmentedColormap.from_list(
            "attention", matplotlib.colormaps["plasma_r"](np.linspace(0.15, 1.0, 64)))
        colors = cmap(rel)
        colors[:, 3] = 0.15 + 0.85 * rel
        widths = 0.4 + 3.6 * rel
        order = np.argsort(w, kind="stable")  # heaviest on top
    arcs = order[~loops[order]]
    if arcs.size:
        ax.add_collection(LineCollection([segments[e] for e in arcs], colors=colors[arcs],
                                         linewidths=widths[arcs], capstyle="round", zorder=2))
    self_edges = order[loops[order]]
    if self_edges.size:  # self-attention i -> i: a ring around the token
        ax.scatter(src[self_edges], np.zeros(self_edges.size), s=110, marker="o",
                   facecolors="none", edgecolors=colors[self_edges],
                   linewidths=widths[self_edges], zorder=4)
    if w is not None:
        sm = ScalarMappable(norm=mcolors.Normalize(0.0, wmax), cmap=cmap)
        cb = ax.figure.colorbar(sm, ax=ax, shrink=0.8, pad=0.01)
        cb.set_label("attention weight" + (" (mean over heads)" if np.ndim(weights) == 2
                                           and np.shape(weights)[1] > 1 else ""))

    if graph.is_bipartite:
        ax.scatter(kx, np.zeros(ns), s=22, color="#333333", zorder=3)
        ax.scatter(qx, np.ones(nd), s=22, color="#c03030", zorder=3)
        ax.set_xticks(kx, key_labels, rotation=_rotation(key_labels), fontsize=8)
        top = ax.secondary_xaxis("top")
        top.set_xticks(qx, query_labels, rotation=_rotation(query_labels), fontsize=8)
        top.set_xlabel("query i")
        ax.set_xlabel("key j")
        ax.set_ylim(-0.15, 1.15)
        ax.set_yticks([])
    else:
        ax.axhline(0.0, color="#999999", linewidth=0.6, zorder=1)
        ax.scatter(np.arange(n), np.zeros(n), s=18, color="#333333", zorder=3)
        ax.set_xticks(np.arange(n), key_labels, rotation=_rotation(key_labels), fontsize=8)
        ax.set_yticks([])
        pad = 0.25 + 0.03 * n
        ax.set_ylim(-max(below_h, 0.1) - pad, max(above_h, 0.5) + pad)
        legend = "arc above: key j < query i (past)"
        if below_h:
            legend += " · below: key j > query i (future)"
        if loops.any():
            legend += " · ring: i -> i"
        ax.set_xlabel(legend, fontsize=8, color="#555555")
    ax.set_xlim(-0.8, n - 0.2)
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    _title(ax, graph, title)
    return ax


def _rotation(labels: Sequence[str]) -> int:
    longest = max((len(s) for s in labels), default=0)
    return 0 if longest * len(labels) <= 60 else 90


def _labels(graph: TokenGraph, tokens):
    ns, nd = graph.num_src, graph.num_dst
    if tokens is None:
        return [str(j) for j in range(ns)], [str(i) for i in range(nd)]
    if graph.is_bipartite:
        if not (isinstance(tokens, (tuple, list)) and len(tokens) == 2):
            raise ValueError(f"for a bipartite graph give tokens=(key_labels, query_labels) "
                             f"with {ns} and {nd} labels")
        keys, queries = [str(t) for t in tokens[0]], [str(t) for t in tokens[1]]
    else:
        keys = queries = [str(t) for t in tokens]
    if len(keys) != ns or len(queries) != nd:
        raise ValueError(f"tokens must label every node: expected {ns} key and {nd} query "
                         f"labels, got {len(keys)} and {len(queries)}")
    return keys, queries


_GRID_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
                "#e377c2", "#17becf")


def plot_grid(graph: TokenGraph, shape: Sequence[int], queries: Sequence, *,
              ax: Optional[Axes] = None, title: Optional[str] = None) -> Axes:
    """Draw the keys of some queries on the 2-D grid the tokens are the cells of.

    Token ``y * W + x`` is cell ``(y, x)`` of an ``H x W`` grid (row-major, the numbering of
    :func:`attngraph.masks.neighborhood`). Each query's keys are filled in its own colour
    (keys of several queries: the colours mixed), the query cell is outlined in black and
    marked with a dot. Only the given queries' rows are read (``graph.rows``), so an
    implicit graph stays a rule.

    Args:
        graph: a self-attention :class:`~attngraph.TokenGraph` over ``H * W`` tokens.
        shape: ``(H, W)``.
        queries: up to 8 query cells, each a token id or a ``(y, x)`` pair.
        ax: matplotlib Axes to draw on; a new figure (via pyplot) when None.
        title: first title line; the stats line follows it.

    Returns:
        the matplotlib Axes.
    """
    _check_graph(graph)
    if (not isinstance(shape, (list, tuple)) or len(shape) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1
                       for s in shape)):
        raise ValueError(f"shape must be (H, W), two positive ints, got {shape!r}")
    h, w = shape
    if graph.num_dst != h * w or graph.num_src != h * w:
        raise ValueError(f"shape {tuple(shape)} has {h * w} cells but the graph has "
                         f"{graph.num_dst} queries and {graph.num_src} keys")
    if not isinstance(queries, (list, tuple)) or not 1 <= len(queries) <= len(_GRID_COLORS):
        raise ValueError(f"queries must be a list of 1 to {len(_GRID_COLORS)} cells, got "
                         f"{queries!r}")
    ids = []
    for q in queries:
        if isinstance(q, (list, tuple)) and len(q) == 2:
            y, x = q
            if not (0 <= y < h and 0 <= x < w):
                raise ValueError(f"query cell {tuple(q)} lies outside the {h} x {w} grid")
            ids.append(int(y) * w + int(x))
        elif isinstance(q, int) and not isinstance(q, bool) and 0 <= q < h * w:
            ids.append(q)
        else:
            raise ValueError(f"a query is a token id in [0, {h * w}) or a (y, x) cell, got "
                             f"{q!r}")
    if ax is None:
        ax = _new_axes((min(9.0, 1.0 + 0.2 * w), min(9.0, 1.2 + 0.2 * h)))
    rgb = np.ones((h * w, 3))
    hits = np.zeros(h * w)
    for q, color in zip(ids, _GRID_COLORS):
        _, src = graph.rows(q, q + 1)
        keys = src.cpu().numpy()
        c = np.array(mcolors.to_rgb(color))
        # average the colours of the queries that share a key
        rgb[keys] = np.where(hits[keys, None] > 0,
                             (rgb[keys] * hits[keys, None] + c) / (hits[keys, None] + 1), c)
        hits[keys] += 1
    ax.imshow(rgb.reshape(h, w, 3), interpolation="nearest")
    for q in ids:
        y, x = divmod(q, w)
        ax.add_patch(Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, edgecolor="black",
                               linewidth=1.5))
        ax.plot([x], [y], "o", color="white", markersize=3)
    ax.set_xticks(np.arange(-0.5, w, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, h, 1), minor=True)
    ax.grid(which="minor", color="#dddddd", linewidth=0.5)
    ax.tick_params(which="minor", length=0)
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    _title(ax, graph, title)
    return ax


def mask_png(graph: TokenGraph, *, resolution: int = 512, dpi: int = 100) -> bytes:
    """PNG bytes of :func:`plot_mask` (what a notebook shows for a ``TokenGraph``).

    Renders on an explicit Agg canvas: no pyplot figure is created or left open.
    """
    _check_graph(graph)
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = Figure(figsize=(5.2, 4.8), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    plot_mask(graph, ax=fig.add_subplot(), resolution=resolution)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
