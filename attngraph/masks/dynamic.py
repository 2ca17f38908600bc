"""Data-dependent masks of Sparse Causal Flash Attention (Pagliardini et al., 2023).

Both keep causality on *original* positions: the graph is built over the tokens where
they are, so nothing has to be gathered, reordered and scattered back.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from attngraph.graph import TokenGraph
from attngraph.implicit import ImplicitGraph
from attngraph.checks import check_1d_tensor, check_bool, check_int
from attngraph.runs import Range, Take, from_runs

__all__ = ["hash_buckets", "qk_drop", "lsh_buckets"]


def hash_buckets(q_buckets: Tensor, k_buckets: Optional[Tensor] = None, *,
                 causal: bool = True, strict: bool = False,
                 implicit: bool = False) -> TokenGraph:
    """Hash-sparse attention: query i attends to key j when they fall in the same bucket.

    With ``causal`` only keys ``j <= i`` (``j < i`` when ``strict``) are kept, comparing
    original positions. Built in O(N log N + E): keys sorted by (bucket, position), and
    each query's keys are one slice of that order found by binary search, so no
    ``N x N`` tensor ever exists.

    Args:
        q_buckets: integer bucket id of every query, ``[N_dst]`` (e.g. an LSH hash of q,
            :func:`lsh_buckets`); ``[H, N_dst]`` or ``[B, H, N_dst]`` for a graph per head or
            per (sequence, head), returned as one :class:`~attngraph.stacked.StackedGraph`.
        k_buckets: integer bucket id of every key, ``[N_src]`` (``[..., N_src]`` with the
            leading shape of ``q_buckets``); defaults to ``q_buckets``. Lengths may differ
            (cross-attention).
        causal: keep only ``j <= i``.
        strict: with ``causal``, keep only ``j < i`` (a query does not see itself).
        implicit: keep the mask as its rule (:class:`attngraph.implicit.ImplicitGraph`):
            the keys sorted by (bucket, position) and each query's slice of them, O(N)
            after one sort, no edge list (what a mask drawn anew at every step wants).

    Returns:
        TokenGraph with ``num_dst = N_dst``, ``num_src = N_src``; a query whose bucket holds
        no (earlier) key gets no edges. Its :attr:`~attngraph.TokenGraph.order` is
        (bucket, position), as SCFA sorts tokens: there the mask is block diagonal and the
        tiled path computes on dense tiles, with results mapped back to the original
        positions.

    Example::

        >>> hash_buckets(torch.tensor([0, 1, 0, 1])).to_dense().int()
        tensor([[1, 0, 0, 0],
                [0, 1, 0, 0],
                [1, 0, 1, 0],
                [0, 1, 0, 1]], dtype=torch.int32)
    """
    causal = check_bool("causal", causal)
    strict = check_bool("strict", strict)
    implicit = check_bool("implicit", implicit)
    if strict and not causal:
        raise ValueError("strict=True only applies with causal=True (it drops j == i from "
                         "the causal mask); pass causal=True or strict=False")
    if isinstance(q_buckets, Tensor) and q_buckets.dim() > 1:
        q, k, shape = _stacked_inputs("q_buckets", q_buckets,
                                      q_buckets if k_buckets is None else k_buckets,
                                      "int")
        return _stack(_hash(q, k, causal, strict, k_buckets is None, implicit), shape, q, k)
    q = check_1d_tensor("q_buckets", q_buckets, "int")
    k = q if k_buckets is None else check_1d_tensor("k_buckets", k_buckets, "int")
    if k.device != q.device:
        raise ValueError(f"q_buckets and k_buckets must be on one device, got {q.device} and "
                         f"{k.device}")
    return _hash(q.view(1, -1), k.view(1, -1), causal, strict, k_buckets is None, implicit)


def _stacked_inputs(name: str, q: Tensor, k: Tensor, kind: str):
    """Batched per-(sequence, head) inputs ``[H, L]`` or ``[B, H, L]`` as ``[S, L]``."""
    if q.dim() not in (2, 3):
        raise ValueError(f"{name} must be [L], [H, L] (per head) or [B, H, L] (per sequence "
                         f"and head), got shape {list(q.shape)}")
    if not isinstance(k, Tensor) or k.shape[:-1] != q.shape[:-1]:
        raise ValueError(f"the key-side input must have the leading shape "
                         f"{list(q.shape[:-1])} of {name}, got "
                         f"{list(k.shape) if isinstance(k, Tensor) else type(k).__name__}")
    for n, t in ((name, q), ("the key-side input", k)):
        if kind == "bool" and t.dtype != torch.bool:
            raise TypeError(f"{n} must be a bool tensor, got {t.dtype}")
        if kind == "int" and (t.dtype == torch.bool or t.is_floating_point()
                              or t.is_complex()):
            raise TypeError(f"{n} must hold integers, got {t.dtype}")
    if k.device != q.device:
        raise ValueError(f"inputs must be on one device, got {q.device} and {k.device}")
    shape = (1, q.size(0)) if q.dim() == 2 else (q.size(0), q.size(1))
    return q.reshape(-1, q.size(-1)), k.reshape(-1, k.size(-1)), shape


def _stack(graph: TokenGraph, shape, q: Tensor, k: Tensor):
    from attngraph.stacked import StackedGraph

    return StackedGraph(graph, shape, k.size(-1), q.size(-1))


def _take_runs(rows: Tensor, state) -> list:
    return [Take(state["table"], state["lo"][rows], state["count"][rows])]


def _rule(num_src: int, num_dst: int, table: Tensor, lo: Tensor, count: Tensor, name: str):
    """The mask as its rule: row i reads ``table[lo[i] : lo[i] + count[i]]``. An explicit
    graph keeps it too (:attr:`~attngraph.TokenGraph.rule`): attention reads dense key
    ranges from it, as from an implicit graph, instead of planning tiles over the edges."""
    return ImplicitGraph(_take_runs, num_src, num_dst, device=table.device, name=name,
                         state={"table": table, "lo": lo, "count": count})


def _hash(q: Tensor, k: Tensor, causal: bool, strict: bool, shared: bool,
          implicit: bool = False) -> TokenGraph:
    """Hash-bucket edges of ``S`` independent slices: ``q [S, L_q]``, ``k [S, L_k]`` bucket
    ids; slice s owns queries ``s * L_q ...`` and keys ``s * L_k ...``."""
    S, nq = q.shape
    nk = k.size(1)
    # Dense ranks of (slice, bucket), so that rank * (nk + 1) + position cannot overflow.
    _, rank = torch.unique(torch.cat([q.reshape(-1), k.reshape(-1)]).long(),
                           return_inverse=True)
    U = int(rank.max()) + 1 if rank.numel() else 1
    slice_q = torch.arange(S, device=q.device).repeat_interleave(nq)
    slice_k = torch.arange(S, device=q.device).repeat_interleave(nk)
    q_rank = slice_q * U + rank[:S * nq]
    k_rank = q_rank if shared else slice_k * U + rank[S * nq:]
    order = torch.sort(k_rank, stable=True).indices        # keys by (slice, bucket, position)
    width = nk + 1
    sort_key = k_rank[order] * width + order % max(nk, 1)
    lo = torch.searchsorted(sort_key, q_rank * width)
    i = torch.arange(S * nq, device=q.device) % max(nq, 1)  # position inside the slice
    limit = torch.clamp(i + (0 if strict else 1), max=nk) if causal else nk
    hi = torch.searchsorted(sort_key, q_rank * width + limit)     # keys at positions < limit
    rule = _rule(S * nk, S * nq, order, lo, hi - lo,
                 f"hash_buckets(causal={causal}, strict={strict})")
    if implicit:
        return rule
    graph = from_runs(S * nk, S * nq, [Take(order, lo, hi - lo)], device=q.device)
    graph.rule = rule
    # Renumbered by (bucket, position) the mask is block diagonal: dense tiles compute there.
    # Key order[m] becomes key m, so a query's keys are the range lo..hi: the renumbered
    # graph is written directly when the tiles first need it, without the sort of permute.
    q_order = order if shared else torch.sort(q_rank, stable=True).indices
    graph.set_order(q_order if shared else (q_order, order), permuted=lambda: from_runs(
        S * nk, S * nq, [Range(lo[q_order], (hi - lo)[q_order])], device=q.device))
    return graph


def qk_drop(keep_q: Tensor, keep_k: Tensor, *, causal: bool = True,
            implicit: bool = False) -> TokenGraph:
    """Query/key dropping: edge ``j -> i`` when ``keep_q[i]`` and ``keep_k[j]``.

    A dropped query gets no edges (output 0); a dropped key is seen by nobody. With
    ``causal`` only ``j <= i`` is kept, on original positions.

    Args:
        keep_q: bool ``[N_dst]``, True for queries that attend; ``[H, N_dst]`` or
            ``[B, H, N_dst]`` for a mask per head or per (sequence, head), returned as one
            :class:`~attngraph.stacked.StackedGraph`.
        keep_k: bool ``[N_src]``, True for keys that may be attended (lengths may differ:
            cross-attention; the leading shape of ``keep_q``).
        causal: keep only ``j <= i``.
        implicit: keep the mask as its rule (:class:`attngraph.implicit.ImplicitGraph`):
            the kept keys and each kept query's prefix of them, no edge list.

    Returns:
        TokenGraph with ``num_dst = N_dst``, ``num_src = N_src``.

    Example::

        >>> qk_drop(torch.tensor([True, True, False, True]),
        ...         torch.tensor([True, False, True, True])).to_dense().int()
        tensor([[1, 0, 0, 0],
                [1, 0, 0, 0],
                [0, 0, 0, 0],
                [1, 0, 1, 1]], dtype=torch.int32)
    """
    causal = check_bool("causal", causal)
    implicit = check_bool("implicit", implicit)
    if isinstance(keep_q, Tensor) and keep_q.dim() > 1:
        q, k, shape = _stacked_inputs("keep_q", keep_q, keep_k, "bool")
        # kept queries and keys of a slice share one bucket, dropped ones have their own
        qb = torch.where(q, 0, -1)
        kb = torch.where(k, 0, -2)
        return _stack(_hash(qb, kb, causal, False, False, implicit), shape, q, k)
    keep_q = check_1d_tensor("keep_q", keep_q, "bool")
    keep_k = check_1d_tensor("keep_k", keep_k, "bool")
    if keep_k.device != keep_q.device:
        raise ValueError(f"keep_q and keep_k must be on one device, got {keep_q.device} and "
                         f"{keep_k.device}")
    nq, nk = keep_q.numel(), keep_k.numel()
    kept = keep_k.nonzero().view(-1)
    if causal:
        # Kept keys at positions <= i; queries past the last key see all of them.
        upto = torch.cumsum(keep_k, 0)
        i = torch.clamp(torch.arange(nq, device=keep_q.device), max=max(nk - 1, 0))
        seen = upto[i] if nk else torch.zeros(nq, dtype=torch.long, device=keep_q.device)
    else:
        seen = torch.full((nq,), kept.numel(), dtype=torch.long, device=keep_q.device)
    count = torch.where(keep_q, seen, 0)
    rule = _rule(nk, nq, kept, torch.zeros_like(count), count, f"qk_drop(causal={causal})")
    if implicit:
        return rule
    graph = from_runs(nk, nq, [Take(kept, torch.zeros_like(count), count)],
                      device=keep_q.device)
    graph.rule = rule
    return graph


def lsh_buckets(x: Tensor, num_buckets: int, *, seed: int = 0) -> Tensor:
    """Angular LSH buckets, as Reformer and SCFA hash queries and keys.

    Each head draws its own random rotation ``R_h [D, num_buckets / 2]`` (standard normal,
    from ``seed``); a token's bucket is ``argmax([x R_h, -x R_h])`` of its normalised
    vector ``x / |x|``, so vectors at a small angle tend to share a bucket.

    Args:
        x: ``[L, H, D]`` or ``[B, L, H, D]`` queries or keys (node-major, as
            :func:`attngraph.graph_attention` takes them).
        num_buckets: even number of buckets, >= 2.
        seed: the rotations' seed: the same seed hashes queries and keys alike.

    Returns:
        int64 ``[H, L]`` (``[B, H, L]`` batched): input of :func:`hash_buckets`, which then
        returns one graph per (sequence,) head.

    Example::

        >>> q = torch.randn(2, 1024, 4, 64)                     # [B, L, H, D]
        >>> g = hash_buckets(lsh_buckets(q, 16), causal=True)  # StackedGraph (2, 4)
    """
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() not in (3, 4):
        raise ValueError(f"x must be a float tensor [L, H, D] or [B, L, H, D], got "
                         f"{list(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    num_buckets = check_int("num_buckets", num_buckets, minimum=2)
    if num_buckets % 2:
        raise ValueError(f"num_buckets must be even (buckets come in +/- pairs), got "
                         f"{num_buckets}")
    seed = check_int("seed", seed, minimum=-(1 << 63))
    H, D = x.size(-2), x.size(-1)
    gen = torch.Generator().manual_seed(seed)
    rot = torch.randn(H, D, num_buckets // 2, generator=gen).to(device=x.device,
                                                                dtype=torch.float32)
    xn = torch.nn.functional.normalize(x.detach().float(), dim=-1)
    proj = torch.einsum("...hd,hdr->...hr", xn, rot)
    buckets = torch.cat([proj, -proj], dim=-1).argmax(-1)       # [(B,) L, H]
    return buckets.movedim(-1, -2)                              # [(B,) H, L]
