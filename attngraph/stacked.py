"""`StackedGraph`: one graph per sequence, per head, or per (sequence, head).

SCFA draws a mask per sequence and per head at every call (each head hashes its own queries
and keys); LongNet shifts dilation per head. A :class:`StackedGraph` holds ``B_g x H_g``
graphs over the same token counts (``B_g`` is 1 or the batch size, ``H_g`` 1 or the number
of heads) as *one* block-diagonal :class:`TokenGraph` whose slice ``s = b * H_g + h`` owns
queries ``s * L_q ...`` and keys ``s * L_k ...``. Attention folds the graph's (sequence,
head) dims into nodes and the others into heads, and runs one backend call over the whole
stack: one chunked pass or one kernel launch, never a Python loop over heads.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from attngraph.graph import TokenGraph

__all__ = ["StackedGraph", "stack"]


class StackedGraph:
    """``B_g x H_g`` graphs, each over ``num_dst`` queries and ``num_src`` keys.

    Attributes:
        shape: ``(B_g, H_g)``: graphs per sequence and per head (1: shared by all).
        num_src, num_dst: keys and queries of each graph.
        graph: the block-diagonal :class:`TokenGraph` of all of them, slice ``s = b * H_g +
            h`` at node offsets ``s * num_dst`` (queries) and ``s * num_src`` (keys); its
            canonical edge order is the slices' canonical orders one after the other, the
            order of a stacked ``edge_bias [E]``.
        num_edges: edges of all slices.
    """

    __slots__ = ("shape", "num_src", "num_dst", "graph", "_kv_graphs")

    def __init__(self, graph: TokenGraph, shape: Tuple[int, int], num_src: int, num_dst: int):
        self.graph, self.shape = graph, (int(shape[0]), int(shape[1]))
        self.num_src, self.num_dst = int(num_src), int(num_dst)
        self._kv_graphs = {}
        S = self.shape[0] * self.shape[1]
        assert graph.num_src == S * num_src and graph.num_dst == S * num_dst

    @property
    def num_slices(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def num_edges(self) -> int:
        return self.graph.num_edges

    @property
    def device(self) -> torch.device:
        return self.graph.device

    def slice_ptr(self) -> Tensor:
        """int64 ``[num_slices + 1]``: slice s holds stacked edges ``ptr[s]:ptr[s+1]``."""
        return self.graph.ptr[::self.num_dst] if self.num_dst else torch.zeros(
            self.num_slices + 1, dtype=torch.long, device=self.device)

    def __getitem__(self, index) -> TokenGraph:
        """``stacked[b, h]``: the graph of sequence ``b`` and head ``h`` (an index of a
        shared dim is ignored, as it broadcasts)."""
        b, h = index if isinstance(index, tuple) else (index, 0)
        for name, i, n in (("sequence", b, self.shape[0]), ("head", h, self.shape[1])):
            if not isinstance(i, int) or i < 0:
                raise ValueError(f"{name} index must be an int >= 0, got {i!r}")
        s = (b if self.shape[0] > 1 else 0) * self.shape[1] + (h if self.shape[1] > 1 else 0)
        if s >= self.num_slices or (self.shape[0] > 1 and b >= self.shape[0]) or (
                self.shape[1] > 1 and h >= self.shape[1]):
            raise ValueError(f"index {index} is out of range for a stack of shape {self.shape}")
        ptr = self.slice_ptr()
        e0, e1 = int(ptr[s]), int(ptr[s + 1])
        return TokenGraph._from_canonical(self.graph.src[e0:e1] - s * self.num_src,
                                          self.graph.dst[e0:e1] - s * self.num_dst,
                                          self.num_src, self.num_dst)

    def to(self, device) -> "StackedGraph":
        return StackedGraph(self.graph.to(device), self.shape, self.num_src, self.num_dst)

    def kv_graph(self, heads: int, kv_heads: int) -> TokenGraph:
        """The stacked graph with keys renumbered for GQA: with per-head graphs
        (``H_g = heads``), slice (b, h) reads the keys of kv head ``h // (heads /
        kv_heads)``, so key nodes are ``(b * kv_heads + h // G) * num_src + j``. Cached."""
        B_g, H_g = self.shape
        if H_g == 1 or heads == kv_heads:
            return self.graph
        key = (heads, kv_heads)
        if key not in self._kv_graphs:
            G = heads // kv_heads
            g = self.graph
            s = g.src // max(self.num_src, 1)
            src = ((s // H_g) * kv_heads + (s % H_g) // G) * self.num_src + g.src % max(
                self.num_src, 1)
            self._kv_graphs[key] = TokenGraph._from_canonical(
                src, g.dst, B_g * kv_heads * self.num_src, g.num_dst)
        return self._kv_graphs[key]

    def __repr__(self) -> str:
        return (f"StackedGraph(shape={self.shape}, num_src={self.num_src}, "
                f"num_dst={self.num_dst}, num_edges={self.num_edges})")

    def plot(self, b: int = 0, h: int = 0, **kwargs):
        """Draw the graph of sequence ``b``, head ``h`` (:func:`attngraph.viz.plot_mask`);
        returns the matplotlib ``Figure``, as :meth:`TokenGraph.plot` does."""
        from attngraph.viz import figure_of, plot_mask

        return figure_of(plot_mask(self[b, h], **{
            "title": f"sequence {b}, head {h} of {self.shape}", **kwargs}))

    def _repr_png_(self) -> Optional[bytes]:
        try:
            from attngraph.viz import mask_png
        except ImportError:
            return None
        return mask_png(self[0, 0])


def stack(graphs: Sequence[TokenGraph], shape: Optional[Tuple[int, int]] = None
          ) -> StackedGraph:
    """Stack graphs over the same token counts: ``shape = (B_g, H_g)``, graph ``b * H_g + h``
    for sequence ``b`` and head ``h`` (default ``(1, len(graphs))``: one graph per head).

    Example::

        >>> s = stack([causal(4), sliding_window(4, 1)], shape=(1, 2))   # per head
        >>> s[0, 1].equal(sliding_window(4, 1))
        True
    """
    from attngraph.graph import batch

    graphs = list(graphs)
    merged = batch(graphs)              # checks the graphs: TokenGraphs, one device
    shape = (1, len(graphs)) if shape is None else tuple(shape)
    if len(shape) != 2 or any(isinstance(x, bool) or not isinstance(x, int) or x < 1
                              for x in shape):
        raise ValueError(f"shape must be (B_g, H_g) of positive ints, got {shape!r}")
    if shape[0] * shape[1] != len(graphs):
        raise ValueError(f"shape {shape} needs {shape[0] * shape[1]} graphs, got {len(graphs)}")
    ns, nd = graphs[0].num_src, graphs[0].num_dst
    if any((g.num_src, g.num_dst) != (ns, nd) for g in graphs):
        raise ValueError("stacked graphs must all have the same num_src and num_dst")
    return StackedGraph(merged, shape, ns, nd)


# ---------------------------------------------------------------------------- folding
def fold(x: Tensor, shape: Tuple[int, int]) -> Tensor:
    """``[B, L, H, C]`` -> node-major ``[B_g * H_g * L, (B / B_g) * (H / H_g), C]``: the
    stack's dims become nodes (slice-major), the shared ones heads."""
    B, L, H, C = x.shape
    B_g, H_g = shape
    x = x.view(B_g, B // B_g, L, H_g, H // H_g, C).permute(0, 3, 2, 1, 4, 5)
    return x.reshape(B_g * H_g * L, (B // B_g) * (H // H_g), C)


def unfold(x: Tensor, shape: Tuple[int, int], B: int, H: int) -> Tensor:
    """Inverse of :func:`fold`: ``[S * L, R, C]`` -> ``[B, L, H, C]``."""
    B_g, H_g = shape
    C = x.size(-1)
    L = x.size(0) // (B_g * H_g)
    x = x.view(B_g, H_g, L, B // B_g, H // H_g, C).permute(0, 3, 2, 1, 4, 5)
    return x.reshape(B, L, H, C)
