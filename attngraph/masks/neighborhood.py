"""Neighbourhood attention on a 1-, 2- or 3-D grid of tokens (NATTEN's semantics).

Tokens are the cells of a grid numbered row-major (the last axis fastest). Along every axis
a query sees a window of ``kernel`` cells of its own dilation group, shifted inward at the
borders; the query's keys are the product of its per-axis windows. Each query row is one
arithmetic run of keys per combination of window positions on the axes before the last,
in key order, so the rule feeds :func:`attngraph.runs.from_runs` directly.
"""
from __future__ import annotations

import itertools
import math
from functools import partial
from typing import List, Sequence, Tuple, Union

import torch
from torch import Tensor

from attngraph.checks import MAX_NODES, check_bool, check_int
from attngraph.graph import TokenGraph
from attngraph.masks._common import rule_graph
from attngraph.runs import Range

__all__ = ["neighborhood", "grid_shape", "axis_windows"]

IntOrInts = Union[int, Sequence[int]]
BoolOrBools = Union[bool, Sequence[bool]]


def grid_shape(shape) -> Tuple[int, ...]:
    """``shape`` (an int or a sequence of 1 to 3 ints, each ``>= 1``) as a tuple; its
    product must fit a :class:`~attngraph.TokenGraph`."""
    if isinstance(shape, (list, tuple, torch.Size)):
        dims = tuple(check_int(f"shape[{a}]", s, minimum=1) for a, s in enumerate(shape))
    else:
        try:
            dims = (check_int("shape", shape, minimum=1),)
        except TypeError:
            raise TypeError(f"shape must be an int or a tuple of 1 to 3 ints, got "
                            f"{shape!r} ({type(shape).__name__})") from None
    if not 1 <= len(dims) <= 3:
        raise ValueError(f"shape must have 1, 2 or 3 axes, got {len(dims)}: {dims}")
    n = math.prod(dims)
    if n > MAX_NODES:
        raise ValueError(f"shape {dims} has {n:,} cells, more than the {MAX_NODES:,} tokens "
                         f"a TokenGraph can hold")
    return dims


def _per_axis(name: str, value, rank: int, check) -> Tuple:
    """An int / bool given once for every axis, or a tuple with one entry per axis."""
    if isinstance(value, (list, tuple)):
        if len(value) != rank:
            raise ValueError(f"{name} must be one value or {rank} (one per axis of the "
                             f"{rank}-D grid), got {len(value)}: {tuple(value)!r}")
        return tuple(check(f"{name}[{a}]", v) for a, v in enumerate(value))
    return (check(name, value),) * rank


def axis_windows(coord: Tensor, size: int, kernel: int, dilation: int, causal: bool
                 ) -> Tuple[Tensor, Tensor]:
    """The window of cells ``coord`` (int64, any shape) sees along one axis of ``size``
    cells: ``(first, count)``, the keys being ``first + dilation * m`` for ``m < count``.

    The window lies in the query's dilation group (the cells congruent to it mod
    ``dilation``). Without ``causal`` it is the ``kernel`` group members nearest the query,
    shifted inward at the borders (the whole group when it has fewer); with ``causal``, the
    last ``kernel`` members up to and including the query.
    """
    d = max(1, min(dilation, size))       # a dilation past the axis leaves groups of one
    rem = torch.remainder(coord, d)
    pos = torch.div(coord, d, rounding_mode="floor")     # the query's place in its group
    members = torch.div(size - rem + d - 1, d, rounding_mode="floor")
    if causal:
        lo = torch.clamp(pos - (kernel - 1), min=0)
        count = pos - lo + 1
    else:
        count = torch.clamp(members, max=kernel)
        lo = torch.minimum(torch.clamp(pos - kernel // 2, min=0), members - count)
    return rem + lo * d, count


def _neighborhood_runs(i: Tensor, state, *, shape, kernel, dilation, causal) -> List[Range]:
    rank = len(shape)
    coords, rest = [], i
    for size in reversed(shape):
        coords.append(torch.remainder(rest, size))
        rest = torch.div(rest, size, rounding_mode="floor")
    coords.reverse()
    windows = [axis_windows(c, s, k, d, ca)
               for c, s, k, d, ca in zip(coords, shape, kernel, dilation, causal)]
    last_first, last_count = windows[-1]
    step = max(1, min(dilation[-1], shape[-1]))
    if rank == 1:
        return [Range(last_first, last_count, step)]
    # strides of the row-major numbering, and the dilation of each axis before the last
    strides = [math.prod(shape[a + 1:]) for a in range(rank)]
    steps = [max(1, min(d, s)) for d, s in zip(dilation, shape)]
    runs = []
    for offsets in itertools.product(*(range(k) for k in kernel[:-1])):
        base = last_first
        valid = torch.ones_like(i, dtype=torch.bool)
        for a, m in enumerate(offsets):
            first, count = windows[a]
            valid &= count > m
            base = base + (first + m * steps[a]) * strides[a]
        count = torch.where(valid, last_count, 0)
        runs.append(Range(torch.where(valid, base, 0), count, step))
    return runs


def neighborhood(shape: IntOrInts, kernel: IntOrInts, dilation: IntOrInts = 1,
                 causal: BoolOrBools = False, *, implicit: bool = False) -> TokenGraph:
    """Neighbourhood attention (NATTEN) over the cells of a 1-, 2- or 3-D grid.

    Tokens are the grid's cells in row-major order (token ``y * W + x`` of an ``H x W``
    grid is cell ``(y, x)``). Along each axis the query's dilation group is the cells
    congruent to it modulo that axis' dilation; its window there is:

    * without ``causal``: the ``kernel`` group members nearest the query, shifted inward at
      the borders, so a query has exactly ``kernel`` keys along the axis whenever its group
      has at least ``kernel`` members (a smaller group is taken whole);
    * with ``causal``: the last ``kernel`` group members up to and including the query.

    The keys of a query are the product of its per-axis windows (at most
    ``prod(kernel)``).

    Args:
        shape: the grid, an int (1-D) or a tuple of 2 or 3 ints, each ``>= 1``;
            ``N = prod(shape)``.
        kernel: window size per axis: odd, ``1 <= kernel <= size``; one int for every axis
            or a tuple with one per axis.
        dilation: gap between window cells per axis, ``>= 1`` (int or per-axis tuple).
        causal: per axis, a window that ends at the query (bool or per-axis tuple).
        implicit: keep the mask as its rule (:class:`attngraph.implicit.ImplicitGraph`):
            no edge list is stored.

    Returns:
        TokenGraph over N nodes, ``E <= N prod(kernel)``: one run of keys along the last
        axis per window position on the axes before it.

    Example::

        >>> neighborhood(5, 3).to_dense().int()
        tensor([[1, 1, 1, 0, 0],
                [1, 1, 1, 0, 0],
                [0, 1, 1, 1, 0],
                [0, 0, 1, 1, 1],
                [0, 0, 1, 1, 1]], dtype=torch.int32)
        >>> neighborhood((2, 3), (1, 3)).to_dense().int()    # 2 rows of 3: each row alone
        tensor([[1, 1, 1, 0, 0, 0],
                [1, 1, 1, 0, 0, 0],
                [1, 1, 1, 0, 0, 0],
                [0, 0, 0, 1, 1, 1],
                [0, 0, 0, 1, 1, 1],
                [0, 0, 0, 1, 1, 1]], dtype=torch.int32)
    """
    shape = grid_shape(shape)
    rank = len(shape)
    kernel = _per_axis("kernel", kernel, rank, lambda name, v: check_int(name, v, minimum=1))
    dilation = _per_axis("dilation", dilation, rank,
                         lambda name, v: check_int(name, v, minimum=1))
    causal = _per_axis("causal", causal, rank, check_bool)
    implicit = check_bool("implicit", implicit)
    for a, (k, s) in enumerate(zip(kernel, shape)):
        if k % 2 == 0:
            raise ValueError(f"kernel must be odd on every axis (a window centred on the "
                             f"query), got {k} on axis {a}; use {k - 1} or {k + 1}")
        if k > s:
            raise ValueError(f"kernel {k} on axis {a} exceeds that axis' {s} cells; a "
                             f"window must fit the grid (kernel <= {s})")
    n = math.prod(shape)
    rule = partial(_neighborhood_runs, shape=shape, kernel=kernel, dilation=dilation,
                   causal=causal)
    return rule_graph(n, n, rule, implicit=implicit,
                      name=f"neighborhood(shape={shape}, kernel={kernel}, "
                           f"dilation={dilation}, causal={causal})")
