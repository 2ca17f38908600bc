"""Dense tiles on FlexAttention, residual edges per edge, merged exactly.

The engine of backend ``"flex"``: the tile plan (:mod:`attngraph.ops.plan`) at
FlexAttention's tile, ``FLEX_BLOCK x FLEX_BLOCK``, becomes a FlexAttention ``BlockMask``:
full tiles are *full* blocks (the kernel skips the ``mask_mod``), partial tiles are
*partial* blocks whose ``mask_mod`` reads the plan's in-tile masks packed 32 cells to an
int32 word (:func:`packed_masks`). The BlockMask is built once per plan and kept with it
(``plan.flex``), so once per graph (plans live in ``graph.caches.plan``).

``flex_attention(..., return_lse=True)`` gives each query's output and log-sum-exp over its
tile edges; the residual edges run on a per-edge backend (the fused kernels on CUDA) and the
two partial softmax states merge exactly by log-sum-exp (:func:`attngraph.ops.numerics.merge`),
as :mod:`attngraph.ops.tiles` does with its own dense engine. The backward is
FlexAttention's (gradients of q, k, v, the lse, and of an edge bias read by the
``score_mod``) plus the per-edge backward, joined by autograd through the merge.

Which tiles go to FlexAttention is decided by the H100 model (:func:`attngraph.ops.plan.
flex_density`): a tile pays when it holds more edges than the fused kernels would run in its
time, unless every non-empty tile on FlexAttention (no residual, no merge) is faster. GQA is FlexAttention's ``enable_gqa``. An edge bias on tile edges is a ``score_mod``
adding a dense per-tile table (``[tiles, block², columns]``) built from the bias; where that
table would exceed ``BIAS_TABLE_ELEMENTS`` the engine refuses (:func:`bias_refusal`).

On CUDA FlexAttention runs compiled (``torch.compile(flex_attention)``, its fused Triton
kernel). On CPU it runs eagerly: forward only (torch has no CPU backward for it), computing
the whole ``[H, N_dst, N_src]`` score matrix, so it is a check of the engine there, not a
fast path (``backend="tiles"`` runs the same plan on ATen's flash kernel).

Inputs of :func:`attention` are node-major and GQA-grouped as for every backend
(``q [N_dst, H, D]``, ``k [N_src, H_kv, D]``, ``v [N_src, H_kv, D_v]``, ``bias`` ``None`` or
``[E, nb]`` with ``H % nb == 0``); a query without edges gets output 0 and lse ``-inf``.
"""
from __future__ import annotations

import re
import warnings
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from attngraph.graph import TokenGraph
from attngraph.ops import chunked
from attngraph.ops.numerics import compute_dtype, merge
from attngraph.ops.plan import FLEX_BLOCK, TilePlan, flex_density

__all__ = ["attention", "engine_plan", "block_mask", "packed_masks", "tile_mask_mod",
           "bias_refusal", "BIAS_TABLE_ELEMENTS", "EAGER_SCORE_ELEMENTS"]

# Largest dense per-tile bias table (tiles x block² x bias columns) the engine builds for an
# edge bias (2 GiB of float32); above it the engine refuses the bias.
BIAS_TABLE_ELEMENTS = 1 << 29
# Largest [H, N_dst, N_src] score matrix eager FlexAttention (CPU) may materialise.
EAGER_SCORE_ELEMENTS = 1 << 28

_COMPILED: Optional[Callable] = None


# ---------------------------------------------------------------------------- the BlockMask
def packed_masks(plan: TilePlan) -> Tensor:
    """The plan's in-tile masks packed 32 cells to a word: int32 ``[1 + P, block_q,
    ceil(block_k / 32)]``, bit ``c % 32`` of word ``c // 32`` of row ``r`` set where cell
    ``(r, c)`` of the tile is an edge (index 0: a full tile). Built once, kept with the
    plan."""
    flex = _state(plan)
    if "packed" not in flex:
        P, bq, bk = plan.masks.shape
        words = -(-bk // 32)
        bits = plan.masks
        if words * 32 != bk:
            bits = torch.cat([bits, bits.new_zeros(P, bq, words * 32 - bk)], -1)
        weight = torch.ones(32, dtype=torch.long, device=bits.device) << torch.arange(
            32, device=bits.device)
        packed = (bits.view(P, bq, words, 32).long() * weight).sum(-1)      # [0, 2^32)
        packed = torch.where(packed >= 1 << 31, packed - (1 << 32), packed)
        flex["packed"] = packed.to(torch.int32).contiguous()
    return flex["packed"]


def _state(plan: TilePlan) -> dict:
    if plan.flex is None:
        plan.flex = {}
    return plan.flex


def _tile_table(plan: TilePlan, values: Tensor) -> Tensor:
    """int32 ``[nQ, nK]``: ``values[t]`` at tile ``t``'s place, -1 where no dense tile is."""
    table = torch.full((plan.num_q_blocks, plan.num_k_blocks), -1, dtype=torch.int32,
                       device=plan.tile_q.device)
    table[plan.tile_q, plan.tile_k] = values.to(torch.int32)
    return table


def tile_mask_mod(mask_of: Tensor, packed: Tensor, block_q: int, block_k: int) -> Callable:
    """``mask_mod(b, h, q_idx, kv_idx)``: the planned tiles' cells, read from the packed
    masks. ``mask_of [nQ, nK]`` holds each tile's index in ``packed`` (0: full, -1: not a
    dense tile), so the predicate is exact on every cell (FlexAttention's eager path
    ignores the block lists and evaluates it everywhere). Tensor indexing, shifts and
    masks only: it works under ``torch.vmap`` and ``torch.compile`` as FlexAttention
    evaluates it."""
    def graph_mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        tile = mask_of[q_idx // block_q, kv_idx // block_k]
        col = kv_idx % block_k
        word = packed[tile.clamp(min=0), q_idx % block_q, col // 32]
        return (tile >= 0) & (((word >> (col % 32)) & 1) == 1)

    return graph_mask_mod


def _block_lists(q_block: Tensor, k_block: Tensor, num_q_blocks: int, num_k_blocks: int
                 ) -> Tuple[Tensor, Tensor]:
    """FlexAttention's ``(num_blocks [1, 1, nQ], indices [1, 1, nQ, nK])`` (int32) of the
    blocks ``(q_block[t], k_block[t])``: per query block, its listed key blocks ascending,
    then the others ascending, as ``create_block_mask`` orders them (entries past
    ``num_blocks`` are never read, but stay valid block ids)."""
    device = q_block.device
    layout = torch.zeros(num_q_blocks, num_k_blocks, dtype=torch.int32, device=device)
    layout[q_block, k_block] = 1
    num_blocks = layout.sum(-1, dtype=torch.int32)
    indices = torch.argsort(layout, dim=-1, descending=True, stable=True).to(torch.int32)
    return num_blocks.view(1, 1, num_q_blocks), indices.view(1, 1, num_q_blocks, num_k_blocks)


def block_mask(plan: TilePlan):
    """The FlexAttention ``BlockMask`` of the plan's dense tiles: full tiles as full
    blocks, partial tiles as partial blocks (``mask_mod``: :func:`tile_mask_mod` on
    :func:`packed_masks`); every other cell masked. ``seq_lengths`` are the planned graph's
    ``(num_dst, num_src)``, batch and head dims 1 (broadcast). Built once, kept with the
    plan."""
    flex = _state(plan)
    if "block_mask" not in flex:
        from torch.nn.attention.flex_attention import BlockMask

        nq, nk = plan.num_q_blocks, plan.num_k_blocks
        full = plan.mask_index == 0
        kv_num, kv_idx = _block_lists(plan.tile_q[~full], plan.tile_k[~full], nq, nk)
        full_num, full_idx = _block_lists(plan.tile_q[full], plan.tile_k[full], nq, nk)
        mask_mod = tile_mask_mod(_tile_table(plan, plan.mask_index), packed_masks(plan),
                                 plan.block_q, plan.block_k)
        flex["block_mask"] = BlockMask.from_kv_blocks(
            kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=(plan.block_q, plan.block_k),
            mask_mod=mask_mod, seq_lengths=(plan.graph.num_dst, plan.graph.num_src))
    return flex["block_mask"]


# ---------------------------------------------------------------------------- edge bias
def bias_refusal(plan: TilePlan, columns: int) -> Optional[str]:
    """Why the engine cannot take an edge bias of ``columns`` columns on this plan's
    tiles, or None: the dense per-tile table its ``score_mod`` reads must fit
    ``BIAS_TABLE_ELEMENTS``."""
    size = plan.num_tiles * plan.block_q * plan.block_k * max(columns, 1)
    if size > BIAS_TABLE_ELEMENTS:
        return (f"an edge bias on {plan.num_tiles} tiles of {plan.block_q}x{plan.block_k} "
                f"needs a dense {size:,}-element table for FlexAttention's score_mod, above "
                f"BIAS_TABLE_ELEMENTS = {BIAS_TABLE_ELEMENTS:,} (the cupy and torch backends "
                f"read the bias per edge)")
    return None


def _bias_score_mod(plan: TilePlan, bias: Tensor) -> Callable:
    """``score_mod`` adding each tile edge's bias (planned edge order, ``[E, nb]``; head h
    reads column ``h % nb``) from a dense per-tile table, built by differentiable indexing
    so the gradient reaches ``bias``."""
    ptr, edges, cell = plan.tile_edges()
    bq, bk = plan.block_q, plan.block_k
    nb = bias.size(1)
    tile = torch.repeat_interleave(torch.arange(plan.num_tiles, device=bias.device),
                                   plan.tile_edge_count)
    table = bias.new_zeros(plan.num_tiles * bq * bk, nb).index_put(
        (tile * (bq * bk) + cell,), bias.index_select(0, edges))
    table = table.view(plan.num_tiles, bq * bk, nb)
    tile_id = _tile_table(plan, torch.arange(plan.num_tiles, device=bias.device))

    def graph_score_mod(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor,
                        kv_idx: Tensor) -> Tensor:
        t = tile_id[q_idx // bq, kv_idx // bk].clamp(min=0)
        return score + table[t, (q_idx % bq) * bk + kv_idx % bk, h % nb]

    return graph_score_mod


# ---------------------------------------------------------------------------- running it
def engine_plan(graph: TokenGraph, *, heads: int, kv_heads: int, head_dim: int,
                value_dim: int, dtype: torch.dtype, requires_grad: bool = False,
                fused_available: bool = True) -> TilePlan:
    """The engine's tile plan: ``FLEX_BLOCK²`` tiles in the graph's own token order, at the
    density the H100 model picks (:func:`attngraph.ops.plan.flex_density`: the break-even
    density, or every non-empty tile where no residual and no merge is faster, as without
    the fused kernels). Cached with the graph."""
    density = flex_density(graph, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                           value_dim=value_dim, dtype=dtype, requires_grad=requires_grad,
                           fused_available=fused_available)
    return graph.tile_plan(FLEX_BLOCK, min_density=density)


_EAGER_WARNINGS = re.compile(r"(flex_attention called without torch\.compile|return_lse is "
                             r"deprecated)")


def _flex_call(q: Tensor, k: Tensor, v: Tensor, block: object, score_mod, scale: float
               ) -> Tuple[Tensor, Tensor]:
    """``flex_attention`` on ``[1, H, L, D]`` operands with the lse: compiled on CUDA,
    eager elsewhere."""
    from torch.nn.attention import flex_attention as fa

    global _COMPILED
    kwargs = dict(score_mod=score_mod, block_mask=block, scale=scale,
                  enable_gqa=q.size(1) != k.size(1))
    if hasattr(fa, "AuxRequest"):
        kwargs["return_aux"] = fa.AuxRequest(lse=True)
    else:
        kwargs["return_lse"] = True
    if q.device.type == "cuda":
        if _COMPILED is None:
            _COMPILED = torch.compile(fa.flex_attention)
        out, aux = _COMPILED(q, k, v, **kwargs)
    else:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_EAGER_WARNINGS.pattern)
            out, aux = fa.flex_attention(q, k, v, **kwargs)
    return out, getattr(aux, "lse", aux)


def _tiles_part(q: Tensor, k: Tensor, v: Tensor, plan: TilePlan, scale: float,
                bias: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """FlexAttention over the plan's tiles -> ``(out [N, H, D_v], lse [N, H])``."""
    cuda = q.device.type == "cuda"
    if not cuda:   # eager CPU FlexAttention: compute in float32 / float64
        cdt = compute_dtype(q.dtype)
        q, k, v = q.to(cdt), k.to(cdt), v.to(cdt)
    qf, kf, vf = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    if cuda:
        qf, kf, vf = qf.contiguous(), kf.contiguous(), vf.contiguous()
    score_mod = None
    if bias is not None:
        score_mod = _bias_score_mod(plan, bias.to(compute_dtype(bias.dtype)))
    out, lse = _flex_call(qf, kf, vf, block_mask(plan), score_mod, scale)
    return out[0].transpose(0, 1), lse[0].transpose(0, 1)


def attention(q: Tensor, k: Tensor, v: Tensor, graph: TokenGraph, scale: float,
              bias: Optional[Tensor] = None, *, plan: Optional[TilePlan] = None,
              residual: Optional[Callable] = None) -> Tuple[Tensor, Tensor]:
    """Graph attention on FlexAttention tiles plus per-edge residual -> ``(out, lse)``.

    ``q [N_dst, H, D]``, ``k [N_src, H_kv, D]``, ``v [N_src, H_kv, D_v]`` (validated,
    node-major); ``bias`` ``None`` or ``[E, nb]``. ``plan`` defaults to :func:`engine_plan`
    for these inputs; the residual edges run on ``residual(q, k, v, graph, scale, bias) ->
    (out, lse)``, a per-edge backend's ``run`` (the dispatcher passes the one ``auto`` takes
    for these tensors; default: the torch backend). Returns ``out`` in the input dtype and
    ``lse`` in the compute dtype (float32; float64 for float64 inputs). Differentiable in
    q, k, v and bias on CUDA; on CPU FlexAttention has no backward, and inputs that
    require a gradient raise ``ValueError``.
    """
    if q.device.type != "cuda" and any(
            t is not None and t.requires_grad for t in (q, k, v, bias)):
        raise ValueError("FlexAttention has no backward on CPU: call the flex engine under "
                         "torch.no_grad(), or use backend='tiles' (same plan idea, ATen's "
                         "flash kernel, with a backward)")
    if plan is None:
        plan = engine_plan(graph, heads=q.size(1), kv_heads=k.size(1), head_dim=q.size(-1),
                           value_dim=v.size(-1), dtype=q.dtype,
                           requires_grad=any(t.requires_grad for t in (q, k, v)))
    if bias is not None and (why := bias_refusal(plan, bias.size(1))) is not None:
        raise ValueError(why)
    dtype = q.dtype
    cdt = compute_dtype(dtype)
    if plan.order is not None:       # compute in the plan's token order, map back after
        q = q.index_select(0, plan.order)
        k, v = k.index_select(0, plan.src_order), v.index_select(0, plan.src_order)
        if bias is not None:
            bias = bias.index_select(0, plan.edge_perm)
    parts = []
    if plan.num_tiles:
        out_t, lse_t = _tiles_part(q, k, v, plan, float(scale), bias)
        parts.append((out_t.to(cdt), lse_t.to(cdt)))
    if plan.num_residual_edges or not parts:
        res_bias = None if bias is None else bias.index_select(0, plan.residual_edges)
        run = chunked.attention if residual is None else residual
        out_r, lse_r = run(q, k, v, plan.residual, scale, res_bias)
        parts.append((out_r.to(cdt), lse_r.to(cdt)))
    out, lse = parts[0] if len(parts) == 1 else merge(*parts[0], *parts[1])
    if plan.order is not None:       # planned query n is query order[n]
        out = out.new_empty(out.shape).index_copy(0, plan.order, out)
        lse = lse.new_empty(lse.shape).index_copy(0, plan.order, lse)
    return out.to(dtype), lse
