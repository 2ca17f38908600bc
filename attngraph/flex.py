"""FlexAttention interop: a :class:`TokenGraph` as a ``BlockMask``, and back.

A FlexAttention ``BlockMask`` cuts the ``[Q_LEN, KV_LEN]`` mask into ``BLOCK_SIZE`` tiles
and lists, per query block, the key blocks to visit: *full* blocks (every cell allowed, the
kernel skips the ``mask_mod``) and *partial* blocks (``mask_mod(b, h, q_idx, kv_idx)``
decides each cell). A graph's tile plan (``graph.tile_plan(block_size, min_density=0)``)
already holds exactly that: its non-empty tiles, which of them are full, and the exact
in-tile mask of the others, so :func:`to_block_mask` is a re-labelling of the plan plus a
``mask_mod`` that looks cells up in those masks, packed 32 cells to a word
(:func:`attngraph.ops.flex_tiles.block_mask`, the BlockMask ``backend="flex"`` runs).

:func:`from_block_mask` goes the other way: full blocks give all their cells, partial blocks
give the cells where ``mask_mod`` is True, evaluated a chunk of blocks at a time, so the
dense ``[Q_LEN, KV_LEN]`` mask never exists.
"""
from __future__ import annotations

import contextlib
from typing import Tuple

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from attngraph.graph import TokenGraph
from attngraph.checks import check_int
from attngraph.ops import flex_tiles

__all__ = ["to_block_mask", "from_block_mask", "MASK_MOD_CHUNK_ELEMENTS"]

# Cells (tokens x tokens) of partial blocks evaluated per call of a mask_mod in
# `from_block_mask`: bounds its peak memory whatever the sequence lengths are.
MASK_MOD_CHUNK_ELEMENTS = 1 << 22


# ---------------------------------------------------------------------------- graph -> mask
def to_block_mask(graph: TokenGraph, block_size: int = 128) -> BlockMask:
    """FlexAttention ``BlockMask`` of exactly the graph's mask.

    Tiles of ``block_size x block_size`` holding every one of their cells as edges become
    full blocks, other non-empty tiles partial blocks whose ``mask_mod`` looks each cell up
    in the tile plan's in-tile masks; empty tiles are skipped. The batch and head dims are 1
    (FlexAttention broadcasts them over every batch and head).

    Args:
        graph: :class:`TokenGraph` with ``num_dst`` queries and ``num_src`` keys (bipartite
            graphs allowed; sizes need not be multiples of ``block_size``).
        block_size: tile size over queries and keys (FlexAttention's kernels want a multiple
            of 16; 128 is its default).

    Returns:
        ``BlockMask`` with ``seq_lengths = (num_dst, num_src)``, ``BLOCK_SIZE = (block_size,
        block_size)``, int32 ``kv_num_blocks`` / ``full_kv_num_blocks`` ``[1, 1, nQ]`` and
        ``kv_indices`` / ``full_kv_indices`` ``[1, 1, nQ, nK]`` (``nQ = ceil(num_dst /
        block_size)``, ``nK = ceil(num_src / block_size)``), on the graph's device.
        ``mask_mod(b, h, q_idx, kv_idx)`` is True exactly on the graph's edges. A query
        without edges has no blocks; ``flex_attention`` gives it output 0.

    Example::

        >>> bm = attngraph.masks.sliding_window(300, 8).to_block_mask(128)
        >>> bm.to_dense()[0, 0]          # partial blocks around the diagonal
        tensor([[1, 1, 0],
                [1, 1, 1],
                [0, 1, 1]], dtype=torch.int32)
    """
    if not isinstance(graph, TokenGraph):
        raise TypeError(f"graph must be an attngraph.TokenGraph, got {type(graph).__name__}; "
                        f"build one with TokenGraph(edge_index, ...) or TokenGraph.from_dense")
    block_size = check_int("block_size", block_size, minimum=1)
    plan = graph.tile_plan(block_size, min_density=0.0, order=None)
    return flex_tiles.block_mask(plan)


# ---------------------------------------------------------------------------- mask -> graph
def _check_index(name: str, value, size: int) -> int:
    value = check_int(name, value)
    if size > 1 and value >= size:
        raise ValueError(f"{name}={value} is out of range: the BlockMask's {name} dim has "
                         f"size {size}, expected 0 <= {name} < {size}")
    return value


def _listed_blocks(num_blocks: Tensor, indices: Tensor, num_k_blocks: int
                   ) -> Tuple[Tensor, Tensor]:
    """``(q_block [T], k_block [T])`` listed by one (batch, head)'s ``num_blocks [nQ]`` and
    ``indices [nQ, M]``; ids past ``num_k_blocks`` are dropped."""
    num_q = indices.size(0)
    listed = (torch.arange(indices.size(1), device=indices.device)
              < num_blocks[:num_q].long().view(-1, 1))
    q_block, slot = listed.nonzero(as_tuple=True)
    k_block = indices[q_block, slot].long()
    keep = (k_block >= 0) & (k_block < num_k_blocks)
    return q_block[keep], k_block[keep]


def _index_mode():
    """FlexAttention evaluates a mask_mod with ``tensor[idx]`` turned into ``aten.index``
    (so it works on vmapped 0-d indices); do the same for the vmap fallback."""
    try:
        from torch._dynamo._trace_wrapped_higher_order_op import TransformGetItemToIndex
    except ImportError:     # an older or newer torch without it: plain indexing
        return contextlib.nullcontext()
    return TransformGetItemToIndex()


def _eval_broadcast(mask_mod, b: Tensor, h: Tensor, q: Tensor, kv: Tensor, shape):
    """``mask_mod`` on broadcast index tensors, or None when it does not broadcast."""
    try:
        out = mask_mod(b, h, q, kv)
        if not isinstance(out, Tensor):
            return None
        return torch.broadcast_to(out, shape)
    except Exception:   # noqa: BLE001 - a mask_mod written for 0-d indices only: use vmap
        return None


def _eval_vmap(mask_mod, b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
    """``mask_mod`` on 0-d indices under ``torch.vmap``, as FlexAttention calls it:
    ``q [C, BQ]`` and ``kv [C, BK]`` give ``[C, BQ, BK]``."""
    fn = torch.vmap(mask_mod, in_dims=(None, None, None, 0))       # over keys
    fn = torch.vmap(fn, in_dims=(None, None, 0, None))             # over queries
    fn = torch.vmap(fn, in_dims=(None, None, 0, 0))                # over blocks
    with _index_mode():
        return fn(b, h, q, kv)


def from_block_mask(block_mask: BlockMask, *, batch: int = 0, head: int = 0) -> TokenGraph:
    """The :class:`TokenGraph` of the mask a FlexAttention ``BlockMask`` stands for.

    Cell ``(q_idx, kv_idx)`` is an edge ``kv_idx -> q_idx`` when its block is listed as full
    (``full_kv_indices``), or listed as partial (``kv_indices``) and
    ``block_mask.mask_mod(batch, head, q_idx, kv_idx)`` is True: exactly the cells
    ``flex_attention`` lets a query see. Cells past ``seq_lengths`` are dropped. The
    ``mask_mod`` runs on broadcast index tensors (``q_idx [C, BQ, 1]``, ``kv_idx [C, 1,
    BK]`` for C blocks at once; under ``torch.vmap`` on 0-d indices when it does not
    broadcast), about ``MASK_MOD_CHUNK_ELEMENTS`` cells per call; the dense ``[Q_LEN,
    KV_LEN]`` mask is never built.

    Args:
        block_mask: a ``torch.nn.attention.flex_attention.BlockMask`` (from
            ``create_block_mask``, ``BlockMask.from_kv_blocks`` or :func:`to_block_mask`),
            block lists ``[B, H, nQ(, M)]``.
        batch, head: which batch and head to read (any value >= 0 for a dim of size 1,
            which FlexAttention broadcasts; ``mask_mod`` gets ``b = batch``, ``h = head``).

    Returns:
        TokenGraph with ``num_dst = Q_LEN``, ``num_src = KV_LEN`` (``block_mask.seq_lengths``)
        on the BlockMask's device. A query whose blocks hold no allowed cell gets no edges.
    """
    if not isinstance(block_mask, BlockMask):
        raise TypeError(f"block_mask must be a torch.nn.attention.flex_attention.BlockMask, "
                        f"got {type(block_mask).__name__}; build one with create_block_mask "
                        f"or TokenGraph.to_block_mask")
    num_dst, num_src = (int(n) for n in block_mask.seq_lengths)
    bs = block_mask.BLOCK_SIZE
    bq, bk = (bs, bs) if isinstance(bs, int) else (int(bs[0]), int(bs[1]))
    kv_indices = block_mask.kv_indices
    if kv_indices.dim() != 4:
        raise ValueError(f"block_mask must have block lists [B, H, num_q_blocks, M], got "
                         f"kv_indices of shape {list(kv_indices.shape)}")
    B, H = kv_indices.shape[:2]
    batch = _check_index("batch", batch, B)
    head = _check_index("head", head, H)
    device = kv_indices.device
    nk = -(-num_src // bk)

    lists = [(block_mask.kv_num_blocks, kv_indices, True)]
    if block_mask.full_kv_num_blocks is not None:
        lists.append((block_mask.full_kv_num_blocks, block_mask.full_kv_indices, False))
    b = torch.tensor(batch, device=device)
    h = torch.tensor(head, device=device)
    rows = torch.arange(bq, device=device)
    cols = torch.arange(bk, device=device)
    chunk = max(1, MASK_MOD_CHUNK_ELEMENTS // (bq * bk))
    srcs, dsts = [], []
    for num_blocks, indices, partial in lists:
        bi, hi = min(batch, num_blocks.size(0) - 1), min(head, num_blocks.size(1) - 1)
        q_block, k_block = _listed_blocks(num_blocks[bi, hi], indices[bi, hi], nk)
        for c0 in range(0, q_block.numel(), chunk):
            q = q_block[c0:c0 + chunk].view(-1, 1, 1) * bq + rows.view(1, -1, 1)  # [C, BQ, 1]
            kv = k_block[c0:c0 + chunk].view(-1, 1, 1) * bk + cols.view(1, 1, -1)  # [C, 1, BK]
            keep = (q < num_dst) & (kv < num_src)                          # [C, BQ, BK]
            if partial:
                # evaluate on in-range indices only: a mask_mod may index tensors of length
                # Q_LEN / KV_LEN, and FlexAttention never calls it past them
                qc, kvc = q.clamp(max=max(num_dst - 1, 0)), kv.clamp(max=max(num_src - 1, 0))
                allowed = _eval_broadcast(block_mask.mask_mod, b, h, qc, kvc, keep.shape)
                if allowed is None:
                    allowed = _eval_vmap(block_mask.mask_mod, b, h, qc.flatten(1),
                                         kvc.flatten(1))
                if not isinstance(allowed, Tensor) or allowed.dtype != torch.bool:
                    raise TypeError(f"block_mask.mask_mod must return a bool tensor, got "
                                    f"{getattr(allowed, 'dtype', type(allowed).__name__)}")
                keep = keep & allowed.to(device)
            c, r, s = keep.nonzero(as_tuple=True)
            dsts.append(q.view(-1, bq)[c, r])
            srcs.append(kv.view(-1, bk)[c, s])
    empty = torch.empty(0, dtype=torch.long, device=device)
    src = torch.cat(srcs) if srcs else empty
    dst = torch.cat(dsts) if dsts else empty
    return TokenGraph(torch.stack([src, dst]), num_src=num_src, num_dst=num_dst)
