"""Global tokens and Longformer: a few tokens see everything and are seen by everyone."""
from __future__ import annotations

from functools import partial
from typing import Sequence, Union

import torch
from torch import Tensor

from attngraph.graph import TokenGraph
from attngraph.checks import as_index_tensor, check_bool, check_int, check_nodes
from attngraph.masks._common import rule_graph
from attngraph.runs import Range, Take, from_runs, union

__all__ = ["global_tokens", "longformer"]

Indices = Union[Sequence[int], Tensor]


def _global_ids(n: int, indices: Indices, name: str) -> Tensor:
    """Sorted unique global token ids, each checked to lie in ``[0, n)``."""
    ids = as_index_tensor(name, indices)
    if ids.numel():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= n:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{name} holds {bad}, out of range for n={n}; global token ids "
                             f"must lie in [0, {n})")
    return torch.unique(ids, sorted=True)


def _global_part(i: Tensor, n: int, ids: Tensor, causal: bool):
    """For rows ``i``: which are global, how many global keys each sees (``<= i`` when
    causal) and how many keys a global row sees."""
    pos = torch.searchsorted(ids, i)
    is_global = (ids[pos.clamp_max(ids.numel() - 1)] == i) if ids.numel() else \
        torch.zeros_like(i, dtype=torch.bool)
    seen = (torch.searchsorted(ids, i, right=True) if causal
            else torch.full_like(i, ids.numel()))
    everything = i + 1 if causal else torch.full_like(i, n)
    return is_global, seen, everything


def _global_runs(i, state, *, n):
    ids = state["ids"]
    is_global, seen, everything = _global_part(i, n, ids, causal=False)
    zero = torch.zeros_like(i)
    return [Range(zero, torch.where(is_global, everything, 0)),
            Take(ids, zero, torch.where(is_global, 0, seen))]


def global_tokens(n: int, indices: Indices, *, implicit: bool = False) -> TokenGraph:
    """Global attention: edge ``j -> i`` when ``i`` or ``j`` is one of ``indices``.

    Global tokens attend to every token and every token attends to them (Longformer's /
    BigBird's "global" part, ETC's "global-local" tokens).

    Args:
        n: number of tokens N.
        indices: global token ids (list, tuple or 1-D integer tensor; duplicates ignored),
            each in ``[0, N)``.
        implicit: keep the mask as its rule (:class:`attngraph.implicit.ImplicitGraph`):
            only the global ids are stored.

    Returns:
        TokenGraph over N nodes, ``E = G (2N - G)`` for G distinct global tokens.

    Example::

        >>> global_tokens(4, [1]).to_dense().int()
        tensor([[0, 1, 0, 0],
                [1, 1, 1, 1],
                [0, 1, 0, 0],
                [0, 1, 0, 0]], dtype=torch.int32)
    """
    n = check_nodes("n", n)
    implicit = check_bool("implicit", implicit)
    ids = _global_ids(n, indices, "indices")
    return rule_graph(n, n, partial(_global_runs, n=n), implicit=implicit, state={"ids": ids},
                      name=f"global_tokens({ids.numel()} globals)")


def _longformer_runs(i, state, *, n, window, step, causal):
    ids = state["ids"]
    is_global, seen, everything = _global_part(i, n, ids, causal)
    # The window of row i: lo, lo + step, ..., hi (as in dilated_window).
    left = torch.clamp(torch.div(i, step, rounding_mode="floor"), max=window)
    right = (torch.zeros_like(i) if causal
             else torch.clamp(torch.div(n - 1 - i, step, rounding_mode="floor"), max=window))
    lo, hi, count = i - left * step, i + right * step, left + 1 + right
    below = torch.searchsorted(ids, lo)                     # global keys < lo
    upto_hi = torch.searchsorted(ids, hi, right=True)       # global keys <= hi
    # A global key inside [lo, hi] but off the window's lattice (dilation > 0) interleaves
    # with the window: such "mixed" rows take their middle part from a table merged by a
    # sort. All other rows are: global keys < lo, the window, global keys > hi.
    mixed = torch.zeros_like(is_global)
    if step > 1 and ids.numel():
        lattice = torch.sort(torch.remainder(ids, step) * n + ids).values
        r = torch.remainder(i, step) * n
        on_lattice = (torch.searchsorted(lattice, r + hi, right=True)
                      - torch.searchsorted(lattice, r + lo))
        mixed = ~is_global & (upto_hi - below > on_lattice)
    rows = mixed.nonzero().view(-1)
    mid_lo, mid_count = torch.zeros_like(i), torch.zeros_like(i)
    table = torch.zeros(0, dtype=torch.long, device=i.device)
    if rows.numel():
        mid = union(from_runs(n, rows.numel(), [Range(lo[rows], count[rows], step)]),
                    from_runs(n, rows.numel(), [Take(ids, below[rows], (upto_hi - below)[rows])]))
        table, mid_lo[rows], mid_count[rows] = mid.src, mid.ptr[:-1], mid.in_degree()
    plain = ~is_global & ~mixed
    zero = torch.zeros_like(i)
    return [
        Range(zero, torch.where(is_global, everything, 0)),                 # global rows
        Take(ids, zero, torch.where(is_global, 0, below)),
        Range(lo, torch.where(plain, count, 0), step),
        Take(table, mid_lo, mid_count),
        Take(ids, upto_hi, torch.where(is_global, 0, torch.clamp(seen - upto_hi, min=0))),
    ]


def longformer(n: int, window: int, global_indices: Indices = (), *, dilation: int = 0,
               causal: bool = False, implicit: bool = False) -> TokenGraph:
    """Longformer attention: a (dilated) sliding window plus global tokens.

    Edge ``j -> i`` when ``j = i + m (dilation + 1)`` with ``|m| <= window``, or when ``i``
    or ``j`` is in ``global_indices``: ``dilated_window(...) | global_tokens(...)``. With
    ``causal`` only ``j <= i`` is kept, so global tokens, too, see only the past.

    Args:
        n: number of tokens N.
        window: window steps on each side (Longformer's one-sided ``w / 2``).
        global_indices: global token ids in ``[0, N)`` (e.g. ``[0]`` for a CLS token).
        dilation: gap between window keys (0: contiguous window).
        causal: keep only ``j <= i``.
        implicit: keep the mask as its rule (:class:`attngraph.implicit.ImplicitGraph`):
            only the global ids are stored.

    Returns:
        TokenGraph over N nodes, about ``N (2 window + 1 + 2 G)`` edges for G globals.

    Example::

        >>> longformer(6, 1, [0]).to_dense().int()
        tensor([[1, 1, 1, 1, 1, 1],
                [1, 1, 1, 0, 0, 0],
                [1, 1, 1, 1, 0, 0],
                [1, 0, 1, 1, 1, 0],
                [1, 0, 0, 1, 1, 1],
                [1, 0, 0, 0, 1, 1]], dtype=torch.int32)
    """
    n = check_nodes("n", n)
    window = check_int("window", window)
    dilation = check_int("dilation", dilation)
    causal = check_bool("causal", causal)
    implicit = check_bool("implicit", implicit)
    ids = _global_ids(n, global_indices, "global_indices")
    step = min(dilation + 1, max(n, 1))
    window = min(window, n)
    return rule_graph(n, n, partial(_longformer_runs, n=n, window=window, step=step,
                                    causal=causal), implicit=implicit, state={"ids": ids},
                      name=f"longformer(window={window}, {ids.numel()} globals, "
                           f"dilation={dilation}, causal={causal})")
