"""Draw the pictures of README's "Neighbourhoods, prefix-LM and ranges" into docs/img.

    python docs/img/neighborhoods.py            # from the repository root, a few seconds
"""
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

import attngraph as ag

OUT = Path(__file__).resolve().parent


def new_figure(width, height, cols):
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, cols)


def windows():
    """NATTEN's windows on a 12 x 12 grid: centred, shifted inward at the borders,
    dilated (the query's dilation group only), causal."""
    shape = (12, 12)
    cases = [
        ("kernel 5", ag.masks.neighborhood(shape, 5), [(5, 6), (0, 0), (11, 9)]),
        ("kernel 3, dilation 3", ag.masks.neighborhood(shape, 3, 3), [(6, 6), (0, 1), (11, 11)]),
        ("kernel 5, causal", ag.masks.neighborhood(shape, 5, causal=True),
         [(6, 6), (1, 10), (11, 2)]),
        ("kernel (3, 7), causal rows", ag.masks.neighborhood(shape, (3, 7), causal=(True, False)),
         [(5, 5), (11, 0)]),
    ]
    fig, axes = new_figure(15, 4.3, len(cases))
    for ax, (name, g, queries) in zip(axes, cases):
        ag.viz.plot_grid(g, shape, queries, ax=ax, title=name)
    fig.savefig(OUT / "neighborhood_windows.png", dpi=90)


def orders():
    """The same 2-D neighbourhood, its tokens in row-major and in Hilbert order: tiles
    (outlined) and how much of each runs dense."""
    shape = (128, 128)
    g = ag.masks.neighborhood(shape, 13)
    fig, axes = new_figure(11, 5.4, 2)
    ag.viz.plot_mask(g, ax=axes[0], tiles=g.tile_plan(128, order=None),
                     title="neighborhood((128, 128), 13), row-major")
    g.order = ag.reorder(g, "hilbert", shape=shape)
    ag.viz.plot_mask(g, ax=axes[1], tiles=g.tile_plan(128),
                     title='reorder(g, "hilbert", shape=(128, 128))')
    fig.savefig(OUT / "neighborhood_orders.png", dpi=90)


def rectangles():
    """prefix-LM, and FlashMask's shared-question mask as rectangles."""
    fig, axes = new_figure(11, 5.4, 2)
    ag.viz.plot_mask(ag.masks.prefix_lm(48, 16), ax=axes[0], title="prefix_lm(48, 16)")
    # a question (0:12) shared by three answers, each causal and seeing the question
    q = [(0, 12), (12, 24), (24, 36), (36, 48), (12, 48)]
    k = [(0, 12), (12, 24), (24, 36), (36, 48), (0, 12)]
    kinds = ["causal", "causal", "causal", "causal", "full"]
    g = ag.TokenGraph.from_ranges(q, k, kinds, num_nodes=48)
    ag.viz.plot_mask(g, ax=axes[1], title="from_ranges: a question, three answers")
    fig.savefig(OUT / "ranges.png", dpi=90)


if __name__ == "__main__":
    windows()
    orders()
    rectangles()
    print("wrote", ", ".join(p.name for p in sorted(OUT.glob("*.png"))))
