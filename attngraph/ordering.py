"""Token orders under which a graph's mask is closer to block diagonal.

Dense tiles (``graph.tile_plan()``) pay where edges crowd into few tiles. A graph whose
numbering scatters its neighbourhoods (a GNN graph, hashed buckets) can be renumbered so
that they don't: :func:`reorder` returns such an order, ``graph.order = perm`` makes the
tiled path compute in it, and results come back in the original order.
"""
from __future__ import annotations

from typing import Union

import torch
from torch import Tensor

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


def reorder(graph: TokenGraph, method: Union[str, Tensor] = "rcm") -> Tensor:
    """A token order for ``graph`` (int64 ``[N]``: new token ``n`` is old token
    ``perm[n]``), to set as ``graph.order``.

    Args:
        graph: a self-attention :class:`TokenGraph`.
        method: ``"rcm"`` (reverse Cuthill–McKee on the symmetrised graph: a small
            bandwidth, so neighbourhoods fall into few tiles), or an integer key tensor
            ``[N]``: tokens sorted by (key, position), e.g. hash buckets, document or
            cluster ids.

    Example::

        >>> g = attngraph.masks.random(1024, 8, seed=0)
        >>> g.order = attngraph.reorder(g)      # the tiled path computes in this order
    """
    if not isinstance(graph, TokenGraph):
        raise TypeError(f"graph must be a TokenGraph, got {type(graph).__name__}")
    if graph.is_bipartite:
        raise ValueError("reorder takes a self-attention graph (num_src == num_dst); order "
                         "a bipartite graph's queries and keys by keys of your own")
    if isinstance(method, Tensor):
        if method.dtype == torch.bool or method.is_floating_point() or method.dim() != 1 \
                or method.numel() != graph.num_dst:
            raise ValueError(f"a key must be an integer tensor of shape [{graph.num_dst}], "
                             f"got {method.dtype} {list(method.shape)}")
        return torch.sort(method.to(graph.device), stable=True).indices
    if method == "rcm":
        return _cuthill_mckee(graph.cpu()).flip(0).to(graph.device)
    raise ValueError(f"method must be 'rcm' or an integer key tensor, got {method!r}")
