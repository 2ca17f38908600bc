"""Token orders under which a graph's mask is closer to block diagonal.

Dense tiles (``graph.tile_plan()``) pay where edges crowd into few tiles. A graph whose
numbering scatters its neighbourhoods (a GNN graph, hashed buckets) can be renumbered so
that they don't: :func:`reorder` returns such an order, ``graph.order = perm`` makes the
tiled path compute in it, and results come back in the original order. Tokens that are the
cells of a grid (an image, a video) take a space-filling curve instead: in Hilbert or
Morton (Z) order, cells near each other on the grid get numbers near each other, so a
neighbourhood's keys fall into few tiles.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor

from attngraph.checks import check_int
from attngraph.graph import TokenGraph

__all__ = ["reorder", "bandwidth"]


def bandwidth(graph: TokenGraph) -> int:
    """``max |i - j|`` over the edges ``j -> i`` (0 for a graph without edges)."""
    if graph.num_edges == 0:
        return 0
    return int((graph.dst - graph.src).abs().max())


def _cuthill_mckee(graph: TokenGraph) -> Tensor:
    """Cuthill–McKee order of the symmetrised graph, level by level.

    Each breadth-first level lists its new nodes by (position of the earliest already
    ordered neighbour, degree, id), which is the order the classic queue-based algorithm
    visits them in. Every component starts at a node of least degree.
    """
    n = graph.num_dst
    src = torch.cat([graph.src, graph.dst])
    dst = torch.cat([graph.dst, graph.src])
    keep = src != dst
    src, dst = src[keep], dst[keep]
    degree = torch.bincount(dst, minlength=n)
    # neighbours of each node as a CSR over `dst`
    order_e = torch.sort(src * max(n, 1) + dst).indices
    nbr_ptr = torch.zeros(n + 1, dtype=torch.long)
    nbr_ptr[1:] = torch.cumsum(torch.bincount(src, minlength=n), 0)
    nbr = dst[order_e]
    position = torch.full((n,), -1, dtype=torch.long)
    by_degree = torch.sort(degree * max(n, 1) + torch.arange(n)).indices.tolist()
    next_start, placed = 0, 0
    while placed < n:
        while position[by_degree[next_start]] >= 0:
            next_start += 1
        frontier = torch.tensor([by_degree[next_start]])
        position[frontier] = placed
        placed += 1
        while frontier.numel():
            counts = nbr_ptr[frontier + 1] - nbr_ptr[frontier]
            starts = torch.repeat_interleave(nbr_ptr[frontier], counts)
            offs = torch.arange(int(counts.sum())) - torch.repeat_interleave(
                torch.cumsum(counts, 0) - counts, counts)
            cand = nbr[starts + offs]
            parent_pos = torch.repeat_interleave(position[frontier], counts)
            new = position[cand] < 0
            cand, parent_pos = cand[new], parent_pos[new]
            if cand.numel() == 0:
                break
            # earliest parent of each new node, then (parent, degree, id)
            first = torch.full((n,), n, dtype=torch.long)
            first.scatter_reduce_(0, cand, parent_pos, "amin")
            cand = torch.unique(cand)
            key = (first[cand] * (n + 1) + degree[cand]) * (n + 1) + cand
            cand = cand[torch.sort(key).indices]
            position[cand] = torch.arange(placed, placed + cand.numel())
            placed += cand.numel()
            frontier = cand
    perm = torch.empty(n, dtype=torch.long)
    perm[position] = torch.arange(n)
    return perm


def _grid_coords(shape: Sequence[int]) -> List[Tensor]:
    """Row-major coordinates of every cell of ``shape``, one int64 ``[N]`` per axis."""
    n = math.prod(shape)
    coords, rest = [], torch.arange(n, dtype=torch.long)
    for size in reversed(shape):
        coords.append(torch.remainder(rest, size))
        rest = torch.div(rest, size, rounding_mode="floor")
    return coords[::-1]


def _interleave(xs: List[Tensor], bits: int) -> Tensor:
    """Bits of ``xs`` interleaved, most significant first, ``xs[0]`` leading each group."""
    key = torch.zeros_like(xs[0])
    for b in range(bits - 1, -1, -1):
        for x in xs:
            key = (key << 1) | ((x >> b) & 1)
    return key


def morton_key(coords: List[Tensor], bits: int) -> Tensor:
    """Position of each cell along the Morton (Z-order) curve of a ``2^bits`` cube."""
    return _interleave(coords, bits)


def hilbert_key(coords: List[Tensor], bits: int) -> Tensor:
    """Position of each cell along the Hilbert curve of a ``2^bits`` cube (any number of
    axes): J. Skilling's transform of the coordinates (AIP Conf. Proc. 707, 381, 2004),
    then their bits interleaved. Consecutive positions are grid neighbours."""
    x = [c.clone() for c in coords]
    dims = len(x)
    q = 1 << (bits - 1)
    while q > 1:                            # undo the excess work of each level
        p = q - 1
        for i in range(dims):
            high = (x[i] & q) != 0
            t = (x[0] ^ x[i]) & p
            x0 = torch.where(high, x[0] ^ p, x[0] ^ t)
            if i:
                x[i] = torch.where(high, x[i], x[i] ^ t)
            x[0] = x0
        q >>= 1
    for i in range(1, dims):                # Gray encode
        x[i] = x[i] ^ x[i - 1]
    t = torch.zeros_like(x[0])
    q = 1 << (bits - 1)
    while q > 1:
        t = torch.where((x[dims - 1] & q) != 0, t ^ (q - 1), t)
        q >>= 1
    return _interleave([xi ^ t for xi in x], bits)


def _curve_order(graph: TokenGraph, method: str, shape) -> Tensor:
    if shape is None:
        raise ValueError(f"reorder(graph, {method!r}) needs shape=: the grid whose cells the "
                         f"tokens are, numbered row-major, e.g. shape=(128, 128)")
    if isinstance(shape, int) and not isinstance(shape, bool):
        shape = (shape,)
    if not isinstance(shape, (list, tuple, torch.Size)):
        raise TypeError(f"shape must be a tuple of ints, got {type(shape).__name__}")
    shape = tuple(check_int(f"shape[{a}]", s, minimum=1) for a, s in enumerate(shape))
    if not shape:
        raise ValueError("shape must have at least one axis")
    if math.prod(shape) != graph.num_dst:
        raise ValueError(f"shape {shape} has {math.prod(shape):,} cells but the graph has "
                         f"{graph.num_dst:,} tokens")
    bits = max(1, max(shape) - 1).bit_length()
    if bits * len(shape) > 62:
        raise ValueError(f"shape {shape} is too large for a {method} key (int64)")
    coords = _grid_coords(shape)
    key = (hilbert_key if method == "hilbert" else morton_key)(coords, bits)
    return torch.sort(key).indices.to(graph.device)


def reorder(graph: TokenGraph, method: Union[str, Tensor] = "rcm", *,
            shape: Optional[Sequence[int]] = None) -> Tensor:
    """A token order for ``graph`` (int64 ``[N]``: new token ``n`` is old token
    ``perm[n]``), to set as ``graph.order``.

    Args:
        graph: a self-attention :class:`TokenGraph`.
        method: ``"rcm"`` (reverse Cuthill–McKee on the symmetrised graph: a small
            bandwidth, so neighbourhoods fall into few tiles); ``"hilbert"`` or
            ``"morton"`` (tokens are the cells of a grid of ``shape``, numbered row-major;
            they are ordered along that space-filling curve of the smallest power-of-two
            cube holding the grid, which keeps grid neighbourhoods in few tiles); or an
            integer key tensor ``[N]``: tokens sorted by (key, position), e.g. hash
            buckets, document or cluster ids.
        shape: the grid, for ``"hilbert"`` and ``"morton"`` (1 to any number of axes,
            ``prod(shape) == N``).

    Example::

        >>> g = attngraph.masks.random(1024, 8, seed=0)
        >>> g.order = attngraph.reorder(g)      # the tiled path computes in this order
        >>> img = attngraph.masks.neighborhood((64, 64), 7)
        >>> img.order = attngraph.reorder(img, "hilbert", shape=(64, 64))
    """
    if not isinstance(graph, TokenGraph):
        raise TypeError(f"graph must be a TokenGraph, got {type(graph).__name__}")
    if graph.is_bipartite:
        raise ValueError("reorder takes a self-attention graph (num_src == num_dst); order "
                         "a bipartite graph's queries and keys by keys of your own")
    if shape is not None and not (isinstance(method, str) and method in ("hilbert", "morton")):
        raise ValueError(f"shape= is for the 'hilbert' and 'morton' orders, not "
                         f"{method if isinstance(method, str) else 'a key tensor'!r}")
    if isinstance(method, Tensor):
        if method.dtype == torch.bool or method.is_floating_point() or method.dim() != 1 \
                or method.numel() != graph.num_dst:
            raise ValueError(f"a key must be an integer tensor of shape [{graph.num_dst}], "
                             f"got {method.dtype} {list(method.shape)}")
        return torch.sort(method.to(graph.device), stable=True).indices
    if method in ("hilbert", "morton"):
        return _curve_order(graph, method, shape)
    if method == "rcm":
        return _cuthill_mckee(graph.cpu()).flip(0).to(graph.device)
    raise ValueError(f"method must be 'rcm', 'hilbert', 'morton' or an integer key tensor, "
                     f"got {method!r}")
