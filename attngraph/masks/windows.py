"""Position-based masks: full, causal, sliding and dilated windows, Sparse Transformer strides.

Each query row is one to three arithmetic runs of keys, built by
:func:`attngraph.runs.from_runs` straight into canonical order: O(E) time and
memory, never an ``N x N`` tensor.
"""
from __future__ import annotations

from functools import partial

import torch

from attngraph.graph import TokenGraph
from attngraph.checks import check_bool, check_int, check_nodes
from attngraph.masks._common import rule_graph
from attngraph.runs import Range

__all__ = ["full", "causal", "sliding_window", "dilated_window", "strided"]


def _full_runs(i, state, *, n, causal):
    count = i + 1 if causal else torch.full_like(i, n)
    return [Range(torch.zeros_like(i), count)]


def full(n: int, *, causal: bool = False, implicit: bool = False) -> TokenGraph:
    """Every query attends to every key (with ``causal``, key j only when ``j <= i``).

    Args:
        n: number of tokens N.
        causal: keep only ``j <= i``.
        implicit: keep the mask as its rule (:class:`attngraph.implicit.ImplicitGraph`):
            no edge list is stored.

    Returns:
        TokenGraph over N nodes, ``E = N^2`` (``N (N + 1) / 2`` when causal).

    Example::

        >>> full(3, causal=True).to_dense().int()
        tensor([[1, 0, 0],
                [1, 1, 0],
                [1, 1, 1]], dtype=torch.int32)
    """
    n = check_nodes("n", n)
    causal = check_bool("causal", causal)
    implicit = check_bool("implicit", implicit)
    return rule_graph(n, n, partial(_full_runs, n=n, causal=causal), implicit=implicit,
                      name=f"full(causal={causal})")


def causal(n: int, *, implicit: bool = False) -> TokenGraph:
    """Causal (lower-triangular) mask: query i attends to keys ``j <= i``.

    Same as ``full(n, causal=True)`` (``implicit``: keep the rule, store no edges).

    Example::

        >>> causal(3).to_dense().int()
        tensor([[1, 0, 0],
                [1, 1, 0],
                [1, 1, 1]], dtype=torch.int32)
    """
    return full(n, causal=True, implicit=implicit)


def sliding_window(n: int, window: int, *, causal: bool = False,
                   implicit: bool = False) -> TokenGraph:
    """Local attention: query i attends to keys with ``|i - j| <= window``.

    Args:
        n: number of tokens N.
        window: keys on each side (0: only the diagonal; ``>= N - 1``: full).
        causal: keep only ``j <= i`` (the ``window`` keys before i and i itself).
        implicit: keep the mask as its rule (:class:`attngraph.implicit.ImplicitGraph`):
            no edge list is stored.

    Returns:
        TokenGraph over N nodes, ``E <= N (2 window + 1)``.

    Example::

        >>> sliding_window(5, 1).to_dense().int()
        tensor([[1, 1, 0, 0, 0],
                [1, 1, 1, 0, 0],
                [0, 1, 1, 1, 0],
                [0, 0, 1, 1, 1],
                [0, 0, 0, 1, 1]], dtype=torch.int32)
    """
    return dilated_window(n, window, 0, causal=causal, implicit=implicit)


def _dilated_runs(i, state, *, n, window, step, causal):
    left = torch.clamp(torch.div(i, step, rounding_mode="floor"), max=window)
    right = (torch.zeros_like(i) if causal
             else torch.clamp(torch.div(n - 1 - i, step, rounding_mode="floor"), max=window))
    return [Range(i - left * step, left + 1 + right, step)]


def dilated_window(n: int, window: int, dilation: int, *, causal: bool = False,
                   implicit: bool = False) -> TokenGraph:
    """Dilated local attention: keys ``j = i + m (dilation + 1)`` with ``|m| <= window``.

    Args:
        n: number of tokens N.
        window: steps on each side (0: only the diagonal).
        dilation: gap between attended keys (0: plain sliding window).
        causal: keep only ``j <= i`` (``m <= 0``).
        implicit: keep the mask as its rule (:class:`attngraph.implicit.ImplicitGraph`):
            no edge list is stored.

    Returns:
        TokenGraph over N nodes, ``E <= N (2 window + 1)``.

    Example::

        >>> dilated_window(5, 1, 1).to_dense().int()
        tensor([[1, 0, 1, 0, 0],
                [0, 1, 0, 1, 0],
                [1, 0, 1, 0, 1],
                [0, 1, 0, 1, 0],
                [0, 0, 1, 0, 1]], dtype=torch.int32)
    """
    n = check_nodes("n", n)
    window = check_int("window", window)
    dilation = check_int("dilation", dilation)
    causal = check_bool("causal", causal)
    implicit = check_bool("implicit", implicit)
    # Steps and windows past the sequence change nothing; clamping keeps int64 math safe.
    step = min(dilation + 1, max(n, 1))
    window = min(window, n)
    return rule_graph(n, n, partial(_dilated_runs, n=n, window=window, step=step,
                                    causal=causal), implicit=implicit,
                      name=f"dilated_window(window={window}, dilation={dilation}, "
                           f"causal={causal})")


def _strided_runs(i, state, *, n, stride, causal):
    # Row i, in key order: multiples i - m*stride (m >= 1), the window, multiples i + m*stride.
    before = Range(torch.remainder(i, stride), torch.div(i, stride, rounding_mode="floor"),
                   stride)
    lo = torch.clamp(i - stride + 1, min=0)
    hi = i if causal else torch.clamp(i + stride - 1, max=n - 1)
    runs = [before, Range(lo, hi - lo + 1)]
    if not causal:
        runs.append(Range(i + stride, torch.div(n - 1 - i, stride, rounding_mode="floor"),
                          stride))
    return runs


def strided(n: int, stride: int, *, causal: bool = True,
            implicit: bool = False) -> TokenGraph:
    """Sparse Transformer "strided" pattern (Child et al., 2019).

    Query i attends to key j when ``|i - j| < stride`` (the previous ``stride - 1`` tokens,
    and with ``causal=False`` the next ones too) or when ``i - j`` is a multiple of
    ``stride``; ``causal`` keeps only ``j <= i``. ``stride=1`` is the full (causal) mask.

    Args:
        n: number of tokens N.
        stride: the stride ``l`` (>= 1), usually about ``sqrt(N)``.
        causal: keep only ``j <= i`` (default, as in the paper).
        implicit: keep the mask as its rule (:class:`attngraph.implicit.ImplicitGraph`):
            no edge list is stored.

    Returns:
        TokenGraph over N nodes, about ``N (stride + N / stride)`` edges (half when causal).

    Example::

        >>> strided(6, 2).to_dense().int()
        tensor([[1, 0, 0, 0, 0, 0],
                [1, 1, 0, 0, 0, 0],
                [1, 1, 1, 0, 0, 0],
                [0, 1, 1, 1, 0, 0],
                [1, 0, 1, 1, 1, 0],
                [0, 1, 0, 1, 1, 1]], dtype=torch.int32)
    """
    n = check_nodes("n", n)
    stride = check_int("stride", stride, minimum=1)
    causal = check_bool("causal", causal)
    implicit = check_bool("implicit", implicit)
    stride = min(stride, max(n, 1))
    return rule_graph(n, n, partial(_strided_runs, n=n, stride=stride, causal=causal),
                      implicit=implicit, name=f"strided(stride={stride}, causal={causal})")
