"""Block masks: a block layout expanded to tokens, Sparse Transformer "fixed", LongNet blocks.

A block layout is a small graph over blocks of ``block`` tokens; :func:`expand_blocks`
turns block edge ``c -> r`` into every token edge between block c and block r, building
token rows straight in canonical order (each token row reads a slice of one table of key
ids per block row).
"""
from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from attngraph.graph import TokenGraph
from attngraph.checks import check_bool, check_int, check_nodes
from attngraph.masks._common import rule_graph
from attngraph.runs import Range, Take, from_runs, keep_edges

__all__ = ["block_sparse", "fixed", "dilated_block"]


def _expand_runs(i, state, *, block, causal):
    """Runs of token rows ``i`` (consecutive) of a block layout: one slice of a table of the
    key ids of the block rows these tokens lie in."""
    ptr, cols = state["ptr"], state["cols"]
    if not i.numel():
        return [Take(i, i, i)]
    token_block = torch.div(i, block, rounding_mode="floor")
    b0, b1 = int(token_block[0]), int(token_block[-1]) + 1
    e0, e1 = int(ptr[b0]), int(ptr[b1])
    table = (cols[e0:e1].view(-1, 1) * block + torch.arange(block, device=i.device)).view(-1)
    count = (ptr[1:] - ptr[:-1])[token_block] * block
    if causal:
        count = count - state["has_diag"][token_block] * (block - 1 - i % block)
    return [Take(table, (ptr[token_block] - e0) * block, count)]


def expand_blocks(layout: TokenGraph, block: int, *, causal: bool = False,
                  implicit: bool = False) -> TokenGraph:
    """Token graph of a block graph: block edge ``c -> r`` becomes every ``j -> i`` with
    ``i`` in block r and ``j`` in block c (``N = num_blocks * block``).

    With ``causal``, block edges above the diagonal (c > r) are dropped and diagonal blocks
    keep only ``j <= i``. With ``implicit`` only the block layout is stored.
    """
    nb = layout.num_dst
    check_nodes("block", block)
    n = check_nodes(f"num_blocks * block ({nb} * {block})", nb * block)
    if causal:
        layout = keep_edges(layout, layout.src <= layout.dst)
    # Key ids of every block column, block row after block row. Token row i reads its block
    # row's slice; with causal only up to i inside the diagonal block, which comes last.
    has_diag = torch.zeros(nb, dtype=torch.long)
    if causal:
        has_diag[layout.dst[layout.src == layout.dst]] = 1
    state = {"ptr": layout.ptr, "cols": layout.src, "has_diag": has_diag}
    return rule_graph(n, n, partial(_expand_runs, block=block, causal=causal),
                      implicit=implicit, state=state,
                      name=f"blocks({nb} x {block}, {layout.num_edges} block edges)")


def block_sparse(layout: Tensor, block: int) -> TokenGraph:
    """Token graph of a ``[num_blocks, num_blocks]`` block layout (DeepSpeed / Triton style).

    ``layout[r, c]`` nonzero means every token of block row r attends to every token of
    block column c. For a per-head layout ``[H, nb, nb]`` pass ``layout[h]``.

    Args:
        layout: square 2-D bool or integer tensor ``[nb, nb]``.
        block: tokens per block.

    Returns:
        TokenGraph over ``N = nb * block`` nodes, ``E = block^2 * layout.count_nonzero()``.

    Example::

        >>> block_sparse(torch.tensor([[1, 0], [1, 1]]), 2).to_dense().int()
        tensor([[1, 1, 0, 0],
                [1, 1, 0, 0],
                [1, 1, 1, 1],
                [1, 1, 1, 1]], dtype=torch.int32)
    """
    if not isinstance(layout, Tensor):
        raise TypeError(f"layout must be a torch.Tensor [num_blocks, num_blocks], got "
                        f"{type(layout).__name__}")
    if layout.is_floating_point() or layout.is_complex():
        raise TypeError(f"layout must be a bool or integer tensor (nonzero = attend), got "
                        f"{layout.dtype}; use layout != 0")
    if layout.dim() != 2 or layout.size(0) != layout.size(1):
        raise ValueError(f"layout must be square 2-D [num_blocks, num_blocks], got shape "
                         f"{list(layout.shape)}; for a per-head layout pass layout[h]")
    block = check_int("block", block, minimum=1)
    return expand_blocks(TokenGraph.from_dense(layout.cpu() != 0), block)


def _fixed_layout(nb: int, num_local: int, num_global: int, causal: bool) -> TokenGraph:
    """Block graph of DeepSpeed's ``FixedSparsityConfig`` (one head, no horizontal globals)."""
    r = torch.arange(nb)
    first = torch.div(r, num_local, rounding_mode="floor") * num_local
    last = torch.clamp(first + num_local, max=nb)     # window end (exclusive)
    local = from_runs(nb, nb, [Range(first, (r + 1 if causal else last) - first)])
    if num_global == 0 or nb == 0:
        return local
    # Global groups: the last num_global blocks of every full window, then the same place
    # in a short last window (moved left so it fits; at column 0 at the earliest).
    offset = num_local - num_global
    full_end = nb - nb % num_local
    starts = list(range(offset, full_end, num_local))
    if full_end < nb:
        starts.append(max(0, min(full_end + offset, nb - num_global)))
    cols = torch.tensor(starts).view(-1, 1) + torch.arange(num_global)
    opens = torch.tensor(starts).view(-1, 1).expand_as(cols)       # first row that sees it
    cols, opens = cols.reshape(-1), opens.reshape(-1)
    keep = cols < nb
    cols, opens = cols[keep], opens[keep]
    # A column in two groups (short last window) opens with the earlier group.
    cols, inverse = torch.unique(cols, sorted=True, return_inverse=True)
    first_row = torch.full_like(cols, nb).scatter_reduce_(0, inverse, opens, "amin")
    if not causal:
        first_row.zero_()
    # Opening rows grow with the column, so row r sees a prefix of the global columns.
    seen = torch.searchsorted(first_row, r, right=True)
    glob = from_runs(nb, nb, [Take(cols, torch.zeros_like(r), seen)])
    return local | glob


def fixed(n: int, block: int, *, num_local_blocks: int = 4, num_global_blocks: int = 1,
          causal: bool = False, implicit: bool = False) -> TokenGraph:
    """Sparse Transformer "fixed" pattern, with DeepSpeed ``FixedSparsityConfig`` semantics.

    Blocks of ``block`` tokens are grouped into non-overlapping windows of
    ``num_local_blocks`` blocks (the last window may be shorter):

    * local: a block row attends to every block of its window (with ``causal``, to the
      blocks of its window up to itself);
    * global: the last ``num_global_blocks`` blocks of every window are global columns,
      attended by every block row (with ``causal``, by the rows from the global group's
      first block on). In a short last window the group sits at the same offset, moved
      left to fit inside the sequence.

    DeepSpeed defaults are kept: ``horizontal_global_attention=False`` (global blocks do
    not attend to everything) and ``num_different_global_patterns=1``. With ``causal`` the
    block layout is DeepSpeed's unidirectional one, then intersected with ``j <= i`` token
    by token. ``num_global_blocks=0`` gives the local windows only.

    Args:
        n: number of tokens N, a multiple of ``block``.
        block: tokens per block.
        num_local_blocks: blocks per local window.
        num_global_blocks: global blocks per window; must divide ``num_local_blocks``.
        causal: unidirectional (``j <= i``).
        implicit: keep the mask as its rule (:class:`attngraph.implicit.ImplicitGraph`):
            only the block layout is stored.

    Returns:
        TokenGraph over N nodes.

    Example (block 1, windows of 2 tokens, the second one global)::

        >>> fixed(6, 1, num_local_blocks=2).to_dense().int()
        tensor([[1, 1, 0, 1, 0, 1],
                [1, 1, 0, 1, 0, 1],
                [0, 1, 1, 1, 0, 1],
                [0, 1, 1, 1, 0, 1],
                [0, 1, 0, 1, 1, 1],
                [0, 1, 0, 1, 1, 1]], dtype=torch.int32)
    """
    n = check_nodes("n", n)
    block = check_int("block", block, minimum=1)
    num_local_blocks = check_int("num_local_blocks", num_local_blocks, minimum=1)
    num_global_blocks = check_int("num_global_blocks", num_global_blocks)
    causal = check_bool("causal", causal)
    if num_global_blocks and num_local_blocks % num_global_blocks:
        raise ValueError(f"num_global_blocks must divide num_local_blocks, got "
                         f"num_local_blocks={num_local_blocks}, "
                         f"num_global_blocks={num_global_blocks}")
    if n % block:
        raise ValueError(f"fixed needs n divisible by block, got n={n}, block={block}; "
                         f"pad the sequence to {-(-n // block) * block} tokens")
    implicit = check_bool("implicit", implicit)
    layout = _fixed_layout(n // block, num_local_blocks, num_global_blocks, causal)
    return expand_blocks(layout, block, causal=causal, implicit=implicit)


def _dilated_block_runs(i, state, *, n, block, step, residue):
    first = torch.div(i, block, rounding_mode="floor") * block
    if residue >= block:                    # no position of any block is on the lattice
        return [Range(first, torch.zeros_like(i))]
    step = min(step, block)                 # same lattice inside a block, safe int64 math
    size = torch.clamp(n - first, max=block)          # length of i's block
    on = torch.remainder(i - first, step) == residue
    count = torch.div(torch.clamp(size - residue, min=0) + step - 1, step,
                      rounding_mode="floor")
    return [Range(first + residue, torch.where(on, count, 0), step)]


def dilated_block(n: int, block: int, dilation: int, *, offset=0, implicit: bool = False):
    """LongNet dilated attention for one segment length and dilation (the 2D dilated mask).

    Tokens are split into blocks of ``block`` (the last one may be shorter). Query i
    attends to key j when both lie in the same block and both positions inside the block,
    ``p = i mod block`` and ``q = j mod block``, satisfy ``(p - offset) % (dilation + 1) ==
    0`` (Python's ``%``, so ``p - offset = -2`` counts as divisible by 2). Only
    ``offset % (dilation + 1)`` matters: it is LongNet's per-head shift. Rows off the
    lattice get no edges.

    Args:
        n: number of tokens N.
        block: segment length (LongNet's ``w``), >= 1.
        dilation: gap between selected positions (LongNet's ``r - 1``), >= 0.
        offset: shift of the selected positions, >= 0; a sequence (or 1-D tensor) of one
            offset per head gives one graph per head (LongNet's shifted heads) as a
            :class:`~attngraph.stacked.StackedGraph` of shape ``(1, H)``.
        implicit: keep the mask as its rule (:class:`attngraph.implicit.ImplicitGraph`):
            no edge list is stored.

    Returns:
        TokenGraph over N nodes, about ``N block / (dilation + 1)^2`` edges.

    Example::

        >>> dilated_block(6, 3, 1).to_dense().int()
        tensor([[1, 0, 1, 0, 0, 0],
                [0, 0, 0, 0, 0, 0],
                [1, 0, 1, 0, 0, 0],
                [0, 0, 0, 1, 0, 1],
                [0, 0, 0, 0, 0, 0],
                [0, 0, 0, 1, 0, 1]], dtype=torch.int32)
    """
    if isinstance(offset, (list, tuple, range)) or (isinstance(offset, Tensor)
                                                     and offset.dim() == 1):
        from attngraph.stacked import stack

        offsets = offset.tolist() if isinstance(offset, Tensor) else list(offset)
        if not offsets:
            raise ValueError("offset per head needs at least one offset")
        if implicit:
            raise ValueError("a per-head offset stacks explicit graphs: give one offset "
                             "per implicit graph")
        return stack([dilated_block(n, block, dilation, offset=o) for o in offsets],
                     shape=(1, len(offsets)))
    n = check_nodes("n", n)
    block = check_int("block", block, minimum=1)
    dilation = check_int("dilation", dilation)
    offset = check_int("offset", offset)
    implicit = check_bool("implicit", implicit)
    step = dilation + 1
    residue = offset % step                 # the positions p with p % step == residue
    return rule_graph(n, n, partial(_dilated_block_runs, n=n, block=block, step=step,
                                    residue=residue), implicit=implicit,
                      name=f"dilated_block(block={block}, dilation={dilation}, "
                           f"offset={offset})")
