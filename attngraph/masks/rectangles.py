"""Masks made of rectangles: prefix-LM, and any union of (query range x key range)
rectangles, each full or causal (MagiAttention's attention slices, FlashMask's document,
shared-question and prefix masks).

A query row of a union of rectangles is a union of key intervals. The rule sorts the
intervals of each row by their start and cuts each one at the running maximum of the ends
before it, which leaves disjoint runs in key order: overlapping rectangles give an edge
once, and :func:`attngraph.runs.from_runs` takes the runs as they are.
"""
from __future__ import annotations

from functools import partial
from typing import Sequence, Union

import torch
from torch import Tensor

from attngraph.checks import check_bool, check_int, check_nodes
from attngraph.graph import TokenGraph
from attngraph.masks._common import rule_graph
from attngraph.runs import Range

__all__ = ["prefix_lm", "from_ranges", "KINDS"]

KINDS = ("full", "causal")

Ranges = Union[Sequence[Sequence[int]], Tensor]


def _prefix_runs(i, state, *, prefix):
    return [Range(torch.zeros_like(i), torch.clamp(i + 1, min=prefix))]


def prefix_lm(n: int, prefix: int, *, implicit: bool = False) -> TokenGraph:
    """Prefix-LM mask: query i attends to key j when ``j <= i`` or ``j < prefix``.

    The first ``prefix`` tokens (the prompt, an image, a prefix) see each other
    bidirectionally; the rest is causal.

    Args:
        n: number of tokens N.
        prefix: length of the bidirectional prefix, ``0 <= prefix <= n`` (0: causal,
            n: full).
        implicit: keep the mask as its rule (:class:`attngraph.implicit.ImplicitGraph`):
            no edge list is stored.

    Returns:
        TokenGraph over N nodes, ``E = N (N + 1) / 2 + P (P - 1) / 2`` for ``P = prefix``.

    Example::

        >>> prefix_lm(4, 2).to_dense().int()
        tensor([[1, 1, 0, 0],
                [1, 1, 0, 0],
                [1, 1, 1, 0],
                [1, 1, 1, 1]], dtype=torch.int32)
    """
    n = check_nodes("n", n)
    prefix = check_int("prefix", prefix, maximum=n)
    implicit = check_bool("implicit", implicit)
    return rule_graph(n, n, partial(_prefix_runs, prefix=prefix), implicit=implicit,
                      name=f"prefix_lm(prefix={prefix})")


def _as_ranges(name: str, value, n: int) -> Tensor:
    """``value`` (pairs ``(start, end)`` or an integer tensor ``[R, 2]``) as int64
    ``[R, 2]``, each ``0 <= start <= end <= n``."""
    if isinstance(value, Tensor):
        if value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
            raise TypeError(f"{name} must hold integers, got a {value.dtype} tensor")
        if value.dim() != 2 or value.size(1) != 2:
            raise ValueError(f"{name} must have shape [R, 2] (start, end), got "
                             f"{list(value.shape)}")
        t = value.detach().to(device="cpu", dtype=torch.long)
    elif isinstance(value, (list, tuple)):
        pairs = []
        for r, pair in enumerate(value):
            if not isinstance(pair, (list, tuple, range)) or len(pair) != 2:
                raise ValueError(f"{name}[{r}] must be a pair (start, end), got {pair!r}")
            pairs.append([check_int(f"{name}[{r}][{c}]", v, minimum=-(1 << 62))
                          for c, v in enumerate(pair)])
        t = torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)
    else:
        raise TypeError(f"{name} must be a list of (start, end) pairs or an integer tensor "
                        f"[R, 2], got {type(value).__name__}")
    if t.numel():
        bad = (t[:, 0] < 0) | (t[:, 1] > n)
        if bool(bad.any()):
            r = int(bad.nonzero()[0, 0])
            raise ValueError(f"{name}[{r}] = ({int(t[r, 0])}, {int(t[r, 1])}) is out of "
                             f"bounds for num_nodes={n}: ranges must lie in [0, {n}]")
        rev = t[:, 0] > t[:, 1]
        if bool(rev.any()):
            r = int(rev.nonzero()[0, 0])
            raise ValueError(f"{name}[{r}] = ({int(t[r, 0])}, {int(t[r, 1])}) is reversed: "
                             f"a range is (start, end) with start <= end")
    return t


def _as_kinds(kinds, count: int) -> Tensor:
    """``kinds`` (one kind for every rectangle or one per rectangle) as a bool tensor
    ``[R]``: True where causal."""
    if isinstance(kinds, str):
        kinds = [kinds] * count
    elif not isinstance(kinds, (list, tuple)):
        raise TypeError(f"kinds must be 'full', 'causal' or a list of them, got "
                        f"{type(kinds).__name__}")
    if len(kinds) != count:
        raise ValueError(f"kinds has {len(kinds)} entries for {count} rectangles; give one "
                         f"kind per (q range, k range) pair, or one string for all")
    for r, kind in enumerate(kinds):
        if not isinstance(kind, str):
            raise TypeError(f"kinds[{r}] must be a string ('full' or 'causal'), got "
                            f"{kind!r} ({type(kind).__name__})")
        if kind not in KINDS:
            raise ValueError(f"kinds[{r}] = {kind!r} is not a known kind; expected one of "
                             f"{', '.join(map(repr, KINDS))}")
    return torch.tensor([k == "causal" for k in kinds], dtype=torch.bool)


def _ranges_runs(rows: Tensor, state, *, n: int, depth: int):
    """``depth`` runs per row (``depth``: the most rectangles over one row): the row's key
    intervals sorted by start, each cut at the running maximum of the ends before it."""
    device = rows.device
    R = rows.numel()
    if R == 0 or depth == 0:
        zero = torch.zeros_like(rows)
        return [Range(zero, zero)] * max(depth, 1)
    r0, r1 = int(rows[0]), int(rows[-1]) + 1
    q0, q1, k0, k1, causal = (state[key] for key in ("q0", "q1", "k0", "k1", "causal"))
    sel = ((q0 < r1) & (q1 > r0)).nonzero().view(-1)
    a = torch.clamp(q0[sel], min=r0)
    lens = torch.clamp(q1[sel], max=r1) - a
    rect = torch.repeat_interleave(sel, lens)
    total = rect.numel()
    first = torch.repeat_interleave(torch.cumsum(lens, 0) - lens, lens)
    row = torch.repeat_interleave(a, lens) + torch.arange(total, device=device) - first
    qlen, klen = q1[rect] - q0[rect], k1[rect] - k0[rect]
    # causal, aligned at the bottom-right: key offset <= query offset + (klen - qlen)
    count = torch.where(causal[rect], torch.clamp(row - q0[rect] + klen - qlen + 1, min=0),
                        klen)
    count = torch.minimum(count, klen)
    keep = count > 0
    row, start, end = row[keep] - r0, k0[rect][keep], k0[rect][keep] + count[keep]
    order = torch.argsort(row * (n + 1) + start, stable=True)
    row, start, end = row[order], start[order], end[order]
    per_row = torch.bincount(row, minlength=R)
    slot = torch.arange(row.numel(), device=device) - (torch.cumsum(per_row, 0) - per_row)[row]
    starts = torch.zeros(R, depth, dtype=torch.long, device=device)
    ends = torch.zeros(R, depth, dtype=torch.long, device=device)
    starts[row, slot] = start
    ends[row, slot] = end
    # prev[:, j]: the furthest end among intervals 0..j-1 of the row
    prev = torch.zeros_like(ends)
    prev[:, 1:] = torch.cummax(ends, dim=1).values[:, :-1]
    lo = torch.maximum(starts, prev)
    counts = torch.clamp(ends - lo, min=0)
    lo = torch.where(counts > 0, lo, 0)
    return [Range(lo[:, j], counts[:, j]) for j in range(depth)]


def from_ranges(q_ranges: Ranges, k_ranges: Ranges, kinds: Union[str, Sequence[str]], *,
                num_nodes: int, implicit: bool = False) -> TokenGraph:
    """Union of rectangles: for each ``r``, queries ``q_ranges[r]`` attend to keys
    ``k_ranges[r]``, all of them (``"full"``) or causally (``"causal"``).

    A causal rectangle is aligned at its bottom-right, as FlashAttention aligns a query
    block and a key block of unequal lengths: query offset ``a`` (from the start of its
    range) attends to key offset ``b`` when ``b <= a + (k_len - q_len)``. Rectangles may
    overlap; an edge in several counts once. This writes MagiAttention's attention slices
    and FlashMask's document, shared-question and prefix masks.

    Args:
        q_ranges, k_ranges: ``R`` half-open ranges ``(start, end)`` each (lists of pairs or
            integer tensors ``[R, 2]``), ``0 <= start <= end <= num_nodes``.
        kinds: ``"full"`` or ``"causal"`` for every rectangle, or a list of ``R`` of them.
        num_nodes: number of tokens N.
        implicit: keep the mask as its rule (:class:`attngraph.implicit.ImplicitGraph`):
            only the ``R`` rectangles are stored.

    Returns:
        TokenGraph over N nodes.

    Example::

        >>> from_ranges([(0, 2), (2, 5)], [(0, 2), (0, 5)], ["full", "causal"],
        ...             num_nodes=5).to_dense().int()
        tensor([[1, 1, 0, 0, 0],
                [1, 1, 0, 0, 0],
                [1, 1, 1, 0, 0],
                [1, 1, 1, 1, 0],
                [1, 1, 1, 1, 1]], dtype=torch.int32)
    """
    n = check_nodes("num_nodes", num_nodes)
    implicit = check_bool("implicit", implicit)
    q = _as_ranges("q_ranges", q_ranges, n)
    k = _as_ranges("k_ranges", k_ranges, n)
    if q.size(0) != k.size(0):
        raise ValueError(f"q_ranges has {q.size(0)} ranges and k_ranges {k.size(0)}; each "
                         f"rectangle needs one of each")
    causal = _as_kinds(kinds, q.size(0))
    live = (q[:, 1] > q[:, 0]) & (k[:, 1] > k[:, 0])
    q, k, causal = q[live], k[live], causal[live]
    # the most rectangles over one query row: the number of runs a row needs
    cover = torch.zeros(n + 1, dtype=torch.long)
    cover.index_add_(0, q[:, 0], torch.ones(q.size(0), dtype=torch.long))
    cover.index_add_(0, q[:, 1], torch.full((q.size(0),), -1, dtype=torch.long))
    depth = int(torch.cumsum(cover, 0).max()) if q.numel() else 0
    state = {"q0": q[:, 0].contiguous(), "q1": q[:, 1].contiguous(),
             "k0": k[:, 0].contiguous(), "k1": k[:, 1].contiguous(), "causal": causal}
    kinds_text = ("causal" if bool(causal.all()) else "full" if not bool(causal.any())
                  else "mixed")
    return rule_graph(n, n, partial(_ranges_runs, n=n, depth=depth), implicit=implicit,
                      name=f"from_ranges({q.size(0)} rectangles, {kinds_text})", state=state)
