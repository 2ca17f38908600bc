"""Pictures: every plot writes a PNG that is not blank, large masks are binned from the edge
list (never densified), and `import attngraph` stays free of matplotlib."""
import io
import subprocess
import sys
import time

import pytest
import torch

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

import matplotlib.image as mpimg  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

import attngraph as ag  # noqa: E402
from attngraph import TokenGraph, viz  # noqa: E402


def new_axes(figsize=(5, 4.5)):
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig.add_subplot()


def png_bytes(ax) -> bytes:
    buf = io.BytesIO()
    ax.figure.savefig(buf, format="png", dpi=80)
    return buf.getvalue()


def assert_not_blank(png: bytes, *, min_ink=0.02):
    """The picture has contrast and a meaningful share of non-white pixels."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(io.BytesIO(png), format="png")[..., :3]
    assert img.std() > 0.05
    ink = (img < 0.9).any(-1).mean()
    assert ink > min_ink, f"only {ink:.3%} of the pixels are drawn"


def longformer_small():
    return ag.masks.longformer(40, 3, [0, 20])


SMALL_GRAPHS = {
    "longformer40": longformer_small,
    "causal1": lambda: ag.masks.causal(1),
    "empty": lambda: TokenGraph(torch.empty(2, 0, dtype=torch.long), num_nodes=8),
    "bipartite": lambda: TokenGraph(torch.tensor([[0, 1, 2, 3, 4, 1], [0, 0, 1, 1, 2, 2]]),
                                    num_src=5, num_dst=3),
}


# ---------------------------------------------------------------------------- plot_mask
@pytest.mark.parametrize("make", SMALL_GRAPHS.values(), ids=SMALL_GRAPHS.keys())
def test_plot_mask_small_is_exact(make):
    g = make()
    ax = viz.plot_mask(g, ax=new_axes())
    img = ax.images[0].get_array()
    assert img.shape == (g.num_dst, g.num_src)
    assert torch.equal(torch.as_tensor(img).bool(), g.to_dense())
    assert ax.get_xlabel() == "key j" and ax.get_ylabel() == "query i"
    assert f"E = {g.num_edges:,}" in ax.get_title()
    if g.num_edges:
        assert_not_blank(png_bytes(ax))


@pytest.mark.parametrize("n, resolution", [(1000, 100), (997, 300), (600, 512)],
                         ids=["even-bins", "uneven-bins", "rows-below-resolution"])
def test_plot_mask_binned_fractions(n, resolution):
    """Each bin shows the fraction of its cells that are edges (checked densely here)."""
    g = ag.masks.longformer(n, 7, [0, n // 3]) | ag.masks.random(n, 3, seed=1)
    ax = viz.plot_mask(g, ax=new_axes(), resolution=resolution)
    img = ax.images[0].get_array().filled(0.0)
    rows = cols = min(n, resolution)
    assert img.shape == (rows, cols)
    mask = g.to_dense().double()
    row_bin = torch.arange(n) * rows // n
    col_bin = torch.arange(n) * cols // n
    counts = torch.zeros(rows, cols, dtype=torch.float64)
    counts.index_put_((row_bin.view(-1, 1).expand(n, n), col_bin.view(1, -1).expand(n, n)),
                      mask, accumulate=True)
    cells = torch.outer(torch.bincount(row_bin), torch.bincount(col_bin)).double()
    torch.testing.assert_close(torch.as_tensor(img), counts / cells)
    assert "bins" in ax.get_title()
    assert_not_blank(png_bytes(ax))


@pytest.mark.parametrize("color_scale", ["linear", "log"])
def test_plot_mask_color_scales(color_scale):
    g = ag.masks.longformer(2000, 10, [5])
    ax = viz.plot_mask(g, ax=new_axes(), color_scale=color_scale)
    norm = ax.images[0].norm
    assert isinstance(norm, matplotlib.colors.LogNorm) == (color_scale == "log")
    assert len(ax.figure.axes) == 2  # the colorbar


def test_plot_mask_ten_million_tokens_never_densifies(monkeypatch):
    g = ag.masks.sliding_window(10 ** 7, 1)  # 3e7 edges; its dense mask would be 100 TB

    def refuse(self):
        raise AssertionError("plot_mask densified the graph")

    monkeypatch.setattr(TokenGraph, "to_dense", refuse)
    t0 = time.perf_counter()
    ax = viz.plot_mask(g, ax=new_axes())
    png = png_bytes(ax)
    assert time.perf_counter() - t0 < 30  # ~1 s on a laptop; generous on shared CI
    assert ax.images[0].get_array().shape == (512, 512)
    assert "N = 10M" in ax.get_title()
    assert_not_blank(png, min_ink=0.005)


def test_plot_mask_default_axes_via_pyplot():
    import matplotlib.pyplot as plt

    ax = viz.plot_mask(longformer_small())
    try:
        assert ax.figure.number in plt.get_fignums()
    finally:
        plt.close(ax.figure)


def test_graph_plot_method():
    ax = new_axes()
    fig = longformer_small().plot(ax=ax, resolution=16)
    assert fig is ax.figure
    assert ax.images[0].get_array().shape == (16, 16)


def test_graph_plot_returns_a_figure_that_saves(tmp_path):
    """In a script nothing shows a pyplot figure, so plot() hands back the Figure."""
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    for g in (longformer_small(), ag.masks.sliding_window(1000, 8, implicit=True)):
        fig = g.plot()
        try:
            assert isinstance(fig, Figure) and fig.number in plt.get_fignums()
            assert fig.axes[0].get_ylabel() == "query i"
            fig.savefig(tmp_path / "mask.png")
            assert (tmp_path / "mask.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        finally:
            plt.close(fig)
    # an Axes in a subfigure: the figure that savefig writes
    root = Figure()
    ax = root.subfigures(1, 2)[1].subplots()
    assert longformer_small().plot(ax=ax) is root


@pytest.mark.parametrize("kwargs, error", [
    ({"resolution": 0}, ValueError),
    ({"resolution": 2.5}, ValueError),
    ({"color_scale": "sqrt"}, ValueError),
], ids=["resolution-0", "resolution-float", "color-scale"])
def test_plot_mask_rejects_bad_arguments(kwargs, error):
    with pytest.raises(error):
        viz.plot_mask(longformer_small(), ax=new_axes(), **kwargs)


# ---------------------------------------------------------------------------- plot_grid
@pytest.mark.parametrize("implicit", [False, True], ids=["explicit", "implicit"])
def test_plot_grid_colours_exactly_the_queries_keys(implicit, monkeypatch):
    """Each query's keys, and only those cells, take its colour; an implicit graph is read
    row by row from its rule."""
    from attngraph.implicit import ImplicitGraph

    def forbidden(self, *args):
        raise AssertionError("the edge list was built")

    monkeypatch.setattr(ImplicitGraph, "materialize", forbidden)
    shape = (9, 11)
    g = ag.masks.neighborhood(shape, 3, 2, implicit=implicit)
    ax = viz.plot_grid(g, shape, [(4, 5), 0], ax=new_axes(), title="grid")
    img = ax.get_images()[0].get_array()
    dense = ag.masks.neighborhood(shape, 3, 2).to_dense()
    red = torch.tensor(matplotlib.colors.to_rgb(viz._GRID_COLORS[1]), dtype=torch.float64)
    blue = torch.tensor(matplotlib.colors.to_rgb(viz._GRID_COLORS[0]), dtype=torch.float64)
    cells = torch.as_tensor(img, dtype=torch.float64).reshape(-1, 3)
    blue_cells = (cells - blue).abs().sum(1) < 1e-6
    red_cells = (cells - red).abs().sum(1) < 1e-6
    assert torch.equal(blue_cells, dense[4 * 11 + 5])   # the two windows don't overlap
    assert torch.equal(red_cells, dense[0])
    assert_not_blank(png_bytes(ax), min_ink=0.01)


@pytest.mark.parametrize("args, message", [
    (((9,), [0]), "shape must be"),
    (((3, 3), [0]), "has 9 cells but the graph has 99"),
    (((9, 11), []), "queries must be a list"),
    (((9, 11), [(9, 0)]), "outside the 9 x 11 grid"),
    (((9, 11), [99]), "a query is a token id"),
], ids=["rank", "size", "no-queries", "cell-outside", "id-outside"])
def test_plot_grid_rejects_bad_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        viz.plot_grid(ag.masks.neighborhood((9, 11), 3), *args, ax=new_axes())


# ---------------------------------------------------------------------------- plot_graph
def test_plot_graph_arcs_with_tokens_and_weights():
    g = ag.masks.sliding_window(12, 2, causal=True) | ag.masks.global_tokens(12, [0])
    scores = ag.ops.edge_scores(torch.randn(12, 4, 8), torch.randn(12, 4, 8), g)
    p = ag.ops.edge_softmax(scores, g)                                  # [E, H]
    tokens = "the cat sat on the mat and then it slept all day".split()
    ax = viz.plot_graph(g, tokens=tokens, weights=p, ax=new_axes((8, 4)))
    assert [t.get_text() for t in ax.get_xticklabels()] == tokens
    assert "j > query i" in ax.get_xlabel()       # token 0 is global: arcs below too
    assert len(ax.figure.axes) == 2                # colorbar of the weights
    assert_not_blank(png_bytes(ax))


@pytest.mark.parametrize("make", SMALL_GRAPHS.values(), ids=SMALL_GRAPHS.keys())
def test_plot_graph_small_graphs(make):
    g = make()
    ax = viz.plot_graph(g, ax=new_axes((6, 3)), weights=torch.rand(g.num_edges))
    assert_not_blank(png_bytes(ax), min_ink=0.005)


def test_plot_graph_default_axes_via_pyplot():
    import matplotlib.pyplot as plt

    ax = viz.plot_graph(ag.masks.causal(6))
    plt.close(ax.figure)


def test_plot_graph_refuses_large_graphs():
    with pytest.raises(ValueError, match="plot_mask"):
        viz.plot_graph(ag.masks.sliding_window(viz.MAX_ARC_NODES + 1, 1), ax=new_axes())
    with pytest.raises(ValueError, match="edges"):
        viz.plot_graph(ag.masks.full(60), ax=new_axes())


@pytest.mark.parametrize("weights", [torch.rand(5), torch.rand(7, 2), torch.rand(6, 2, 2)],
                         ids=["short", "long-2d", "3d"])
def test_plot_graph_rejects_wrong_weights(weights):
    g = ag.masks.causal(3)  # 6 edges
    with pytest.raises(ValueError, match="E = 6"):
        viz.plot_graph(g, weights=weights, ax=new_axes())


def test_plot_graph_rejects_bad_weight_values_and_tokens():
    g = ag.masks.causal(3)
    with pytest.raises(ValueError, match="non-negative"):
        viz.plot_graph(g, weights=-torch.ones(6), ax=new_axes())
    with pytest.raises(ValueError, match="label every node"):
        viz.plot_graph(g, tokens=["a", "b"], ax=new_axes())


@pytest.mark.parametrize("fn", [viz.plot_mask, viz.plot_graph, viz.mask_png],
                         ids=["plot_mask", "plot_graph", "mask_png"])
def test_rejects_non_graphs(fn):
    with pytest.raises(TypeError, match="TokenGraph"):
        fn(torch.ones(3, 3, dtype=torch.bool))


# ---------------------------------------------------------------------------- PNG / import
@pytest.mark.parametrize("make", [longformer_small, lambda: ag.masks.sliding_window(5000, 20)],
                         ids=["exact", "binned"])
def test_repr_png(make):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    png = make()._repr_png_()
    assert isinstance(png, bytes)
    assert_not_blank(png)
    assert plt.get_fignums() == before  # no pyplot figure left behind


def test_import_attngraph_does_not_import_matplotlib():
    code = ("import sys, attngraph, attngraph.cli; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('matplotlib', 'networkx')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
