"""Random keys per query, and BigBird (window + global + random blocks)."""
from __future__ import annotations

import torch
from torch import Tensor

from attngraph.graph import TokenGraph
from attngraph import chunks
from attngraph.checks import check_bool, check_int, check_nodes
from attngraph.runs import wrap
from attngraph.masks.blocks import expand_blocks
from attngraph.masks.global_tokens import global_tokens
from attngraph.masks.windows import sliding_window

__all__ = ["random", "bigbird"]

# Rows with at most this many candidates per requested key are sampled by ranking random
# scores of every candidate (exact, cost ~ candidates); sparser rows by drawing keys and
# redrawing collisions (cost ~ keys, each draw collides with probability < 1 / DENSE_RATIO).
DENSE_RATIO = 4


def _sample_dense(gen: torch.Generator, cand: Tensor, k: int) -> Tensor:
    """``k`` distinct keys in ``[0, cand[r])`` per row (``cand > k``), sorted: ``[R, k]``."""
    width = int(cand.max())
    rows = max(1, chunks.CHUNK_EDGES // width)
    parts = []
    for r0 in range(0, cand.numel(), rows):
        c = cand[r0:r0 + rows]
        scores = torch.rand(c.numel(), width, generator=gen)
        scores.masked_fill_(torch.arange(width).view(1, -1) >= c.view(-1, 1), 2.0)
        parts.append(torch.topk(scores, k, dim=1, largest=False, sorted=False).indices)
    return torch.sort(torch.cat(parts), dim=1).values


def _draw(gen: torch.Generator, cand: Tensor) -> Tensor:
    """One uniform integer in ``[0, cand[r])`` per element of ``cand``."""
    return torch.randint(0, 1 << 62, cand.shape, generator=gen) % cand


def _sample_sparse(gen: torch.Generator, cand: Tensor, k: int) -> Tensor:
    """``k`` distinct keys in ``[0, cand[r])`` per row (``cand >= DENSE_RATIO k``), sorted.

    Draw with replacement, then redraw the duplicates until none is left. Every step treats
    all key ids alike, so each k-subset is equally likely.
    """
    keys = torch.sort(_draw(gen, cand.view(-1, 1).expand(-1, k).contiguous()), dim=1).values
    todo = torch.arange(cand.numel())
    while todo.numel():
        sub = keys[todo]
        dup = torch.zeros_like(sub, dtype=torch.bool)
        dup[:, 1:] = sub[:, 1:] == sub[:, :-1]
        has_dup = dup.any(1)
        todo, sub, dup = todo[has_dup], sub[has_dup], dup[has_dup]
        if not todo.numel():
            break
        sub[dup] = _draw(gen, cand[todo].view(-1, 1).expand_as(sub)[dup])
        keys[todo] = torch.sort(sub, dim=1).values
    return keys


def random(n: int, per_row: int, *, seed: int, causal: bool = False) -> TokenGraph:
    """Random attention: each query attends to ``per_row`` distinct keys drawn uniformly.

    A query with fewer candidates (``n`` keys, or ``i + 1`` with ``causal``) gets them all.
    The result is a pure function of the arguments: draws come from a ``torch.Generator``
    seeded with ``seed``.

    Args:
        n: number of tokens N.
        per_row: keys per query (0 gives an empty graph).
        seed: random seed (required, so that masks are reproducible).
        causal: draw only among keys ``j <= i``.

    Returns:
        TokenGraph over N nodes with ``min(per_row, candidates)`` keys in every row.

    Example (which keys depends on the seed)::

        >>> random(4, 2, seed=0).in_degree()
        tensor([2, 2, 2, 2])
        >>> random(4, 2, seed=0, causal=True).to_dense().int()
        tensor([[1, 0, 0, 0],
                [1, 1, 0, 0],
                [1, 0, 1, 0],
                [1, 0, 1, 0]], dtype=torch.int32)
    """
    n = check_nodes("n", n)
    per_row = check_int("per_row", per_row)
    seed = check_int("seed", seed, minimum=-(1 << 63), maximum=(1 << 64) - 1)
    causal = check_bool("causal", causal)
    gen = torch.Generator().manual_seed(seed)
    i = torch.arange(n, dtype=torch.long)
    cand = i + 1 if causal else torch.full_like(i, n)
    k = min(per_row, n)
    # Candidate counts never decrease with i, so rows split into three consecutive groups:
    # take every candidate / rank random scores / draw and redraw collisions.
    n_all = int(torch.searchsorted(cand, k, right=True))
    n_dense = int(torch.searchsorted(cand, DENSE_RATIO * k, right=True)) - n_all
    n_all_edges = int(cand[:n_all].sum())
    num_edges = n_all_edges + (n - n_all) * k
    out = torch.empty(2, num_edges, dtype=torch.long)
    if n_all:
        c = cand[:n_all]
        out[1, :n_all_edges] = torch.repeat_interleave(i[:n_all], c, output_size=n_all_edges)
        first = torch.cumsum(c, 0) - c
        out[0, :n_all_edges] = (torch.arange(n_all_edges)
                                - torch.repeat_interleave(first, c, output_size=n_all_edges))
    if n > n_all and k:
        sampled = out[0, n_all_edges:].view(n - n_all, k)
        dense = slice(n_all, n_all + n_dense)
        if n_dense:
            sampled[:n_dense] = _sample_dense(gen, cand[dense], k)
        if n > n_all + n_dense:
            sampled[n_dense:] = _sample_sparse(gen, cand[n_all + n_dense:], k)
        out[1, n_all_edges:].view(n - n_all, k).copy_(i[n_all:].view(-1, 1).expand(-1, k))
    return wrap(out, n, n)


def bigbird(n: int, block: int, *, num_window_blocks: int = 3, num_global_blocks: int = 1,
            num_random_blocks: int = 1, seed: int = 0, causal: bool = False) -> TokenGraph:
    """BigBird block-sparse attention, with DeepSpeed ``BigBirdSparsityConfig`` semantics.

    Tokens are grouped in blocks of ``block``; block row r attends to block column c when

    * ``|r - c| <= num_window_blocks // 2`` (sliding window of blocks),
    * r or c is one of the first ``num_global_blocks`` blocks (global rows and columns), or
    * c is one of ``num_random_blocks`` distinct blocks drawn uniformly per block row
      (among blocks ``c <= r`` when ``causal``, as DeepSpeed's unidirectional mode), which
      may coincide with window or global blocks.

    With ``causal`` the block layout is DeepSpeed's unidirectional one (lower block
    triangle), then intersected with ``j <= i`` token by token. Unlike DeepSpeed, counts
    larger than the number of blocks are clamped instead of rejected (a window or global
    part wider than the sequence covers all of it; fewer random candidates than
    ``num_random_blocks`` gives all of them).

    Args:
        n: number of tokens N, a multiple of ``block``.
        block: tokens per block.
        num_window_blocks: width of the block window (DeepSpeed's
            ``num_sliding_window_blocks``; odd, e.g. 3 = the block and one on each side).
        num_global_blocks: leading blocks that are global.
        num_random_blocks: random blocks per block row.
        seed: seed of the random blocks (``torch.Generator``).
        causal: unidirectional (``j <= i``).

    Returns:
        TokenGraph over N nodes.

    Example (block 1, no random blocks: a window plus a global first token)::

        >>> bigbird(5, 1, num_random_blocks=0).to_dense().int()
        tensor([[1, 1, 1, 1, 1],
                [1, 1, 1, 0, 0],
                [1, 1, 1, 1, 0],
                [1, 0, 1, 1, 1],
                [1, 0, 0, 1, 1]], dtype=torch.int32)
    """
    n = check_nodes("n", n)
    block = check_int("block", block, minimum=1)
    num_window_blocks = check_int("num_window_blocks", num_window_blocks)
    num_global_blocks = check_int("num_global_blocks", num_global_blocks)
    num_random_blocks = check_int("num_random_blocks", num_random_blocks)
    seed = check_int("seed", seed, minimum=-(1 << 63), maximum=(1 << 64) - 1)
    causal = check_bool("causal", causal)
    if n % block:
        raise ValueError(f"bigbird needs n divisible by block, got n={n}, block={block}; "
                         f"pad the sequence to {-(-n // block) * block} tokens")
    nb = n // block
    layout = (sliding_window(nb, num_window_blocks // 2)
              | global_tokens(nb, range(min(num_global_blocks, nb)))
              | random(nb, num_random_blocks, seed=seed, causal=causal))
    return expand_blocks(layout, block, causal=causal)
