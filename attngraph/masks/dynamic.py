"""Data-dependent masks of Sparse Causal Flash Attention (Pagliardini et al., 2023).

Both keep causality on *original* positions: the graph is built over the tokens where
they are, so nothing has to be gathered, reordered and scattered back.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from attngraph.graph import TokenGraph
from attngraph.masks._common import Take, check_1d_tensor, check_bool, from_runs

__all__ = ["hash_buckets", "qk_drop"]


def hash_buckets(q_buckets: Tensor, k_buckets: Optional[Tensor] = None, *,
                 causal: bool = True, strict: bool = False) -> TokenGraph:
    """Hash-sparse attention: query i attends to key j when they fall in the same bucket.

    With ``causal`` only keys ``j <= i`` (``j < i`` when ``strict``) are kept, comparing
    original positions. Built in O(N log N + E): keys sorted by (bucket, position), and
    each query's keys are one slice of that order found by binary search, so no
    ``N x N`` tensor ever exists.

    Args:
        q_buckets: integer bucket id of every query, ``[N_dst]`` (e.g. an LSH hash of q).
        k_buckets: integer bucket id of every key, ``[N_src]``; defaults to ``q_buckets``.
            Lengths may differ (cross-attention).
        causal: keep only ``j <= i``.
        strict: with ``causal``, keep only ``j < i`` (a query does not see itself).

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
    q = check_1d_tensor("q_buckets", q_buckets, "int")
    k = q if k_buckets is None else check_1d_tensor("k_buckets", k_buckets, "int")
    causal = check_bool("causal", causal)
    strict = check_bool("strict", strict)
    if strict and not causal:
        raise ValueError("strict=True only applies with causal=True (it drops j == i from "
                         "the causal mask); pass causal=True or strict=False")
    if k.device != q.device:
        raise ValueError(f"q_buckets and k_buckets must be on one device, got {q.device} and "
                         f"{k.device}")
    nq, nk = q.numel(), k.numel()
    # Dense bucket ranks, so that rank * (nk + 1) + position cannot overflow.
    if k_buckets is None:
        _, q_rank = torch.unique(q.long(), return_inverse=True)
        k_rank = q_rank
    else:
        _, rank = torch.unique(torch.cat([q.long(), k.long()]), return_inverse=True)
        q_rank, k_rank = rank[:nq], rank[nq:]
    order = torch.sort(k_rank, stable=True).indices        # keys by (bucket, position)
    width = nk + 1
    sort_key = k_rank[order] * width + order
    lo = torch.searchsorted(sort_key, q_rank * width)
    i = torch.arange(nq, device=q.device)
    limit = torch.clamp(i + (0 if strict else 1), max=nk) if causal else nk
    hi = torch.searchsorted(sort_key, q_rank * width + limit)     # keys at positions < limit
    graph = from_runs(nk, nq, [Take(order, lo, hi - lo)], device=q.device)
    # Renumbered by (bucket, position) the mask is block diagonal: dense tiles compute there
    graph.order = order if k_buckets is None else (
        torch.sort(q_rank, stable=True).indices, order)
    return graph


def qk_drop(keep_q: Tensor, keep_k: Tensor, *, causal: bool = True) -> TokenGraph:
    """Query/key dropping: edge ``j -> i`` when ``keep_q[i]`` and ``keep_k[j]``.

    A dropped query gets no edges (output 0); a dropped key is seen by nobody. With
    ``causal`` only ``j <= i`` is kept, on original positions.

    Args:
        keep_q: bool ``[N_dst]``, True for queries that attend.
        keep_k: bool ``[N_src]``, True for keys that may be attended (lengths may differ:
            cross-attention).
        causal: keep only ``j <= i``.

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
    keep_q = check_1d_tensor("keep_q", keep_q, "bool")
    keep_k = check_1d_tensor("keep_k", keep_k, "bool")
    causal = check_bool("causal", causal)
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
    return from_runs(nk, nq, [Take(kept, torch.zeros_like(count), count)],
                     device=keep_q.device)
