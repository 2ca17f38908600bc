"""Numerics every backend shares, written once: the compute dtype, the exact log-sum-exp
merge of partial attentions, and the preamble of every backward.

Conventions: ``out [N, H, D_v]`` is normalised attention, ``lse [N, H]`` its log-sum-exp
(``-inf`` for a row without edges, whose ``out`` is 0). A gradient of ``lse`` (``dlse``)
enters the backward through ``delta``: ``d lse / d s = p``, so
``ds = p * (dp - (rowsum(dout * out) - dlse))``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["compute_dtype", "merge", "merge_many", "backward_preamble"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype attention accumulates in: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def merge(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> Tuple[Tensor, Tensor]:
    """Exact merge of two partial attentions over disjoint edge sets of the same queries.

    ``out [N, H, D_v]`` normalised, ``lse [N, H]``; a row empty in both stays 0 / ``-inf``.
    Differentiable (no NaN gradients for empty rows).
    """
    m = torch.maximum(lse_a, lse_b)
    m = torch.where(torch.isneginf(m), 0.0, m).detach()
    total = torch.exp(lse_a - m) + torch.exp(lse_b - m)
    nonempty = total > 0
    lse = torch.where(nonempty, torch.log(torch.where(nonempty, total, 1.0)) + m,
                      float("-inf"))
    safe = torch.where(nonempty, lse, 0.0)
    out = (out_a * torch.exp(lse_a - safe).unsqueeze(-1)
           + out_b * torch.exp(lse_b - safe).unsqueeze(-1))
    return out.to(out_a.dtype), lse


def merge_many(out: Tensor, lse: Tensor) -> Tuple[Tensor, Tensor]:
    """Exact merge of P partial attentions of the same rows, as :func:`merge` merges two:
    ``out [R, P, H, D_v]`` normalised, ``lse [R, P, H]`` (``-inf`` for a part without edges)
    -> ``(out [R, H, D_v], lse [R, H])``. Differentiable."""
    m = lse.detach().amax(1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp(lse - m)                                           # [R, P, H]
    total = w.sum(1)
    merged_lse = torch.log(total) + m.squeeze(1)
    w = w / total.clamp_min(torch.finfo(total.dtype).tiny).unsqueeze(1)
    return (w.unsqueeze(-1) * out).sum(1), merged_lse


def backward_preamble(out: Tensor, dout: Tensor, lse: Tensor, dlse: Optional[Tensor], *,
                      dtype: Optional[torch.dtype] = None, delta: bool = True
                      ) -> Tuple[Optional[Tensor], Tensor, Optional[Tensor]]:
    """``(delta, lse, dlse)`` as every backward starts: ``delta [..., H] = rowsum(dout *
    out) - dlse``; ``dlse`` set to 0 on rows without edges (``lse = -inf``: nothing there
    depends on it); ``lse`` with those rows set to ``+inf``, so ``p = exp(s - lse)`` is 0
    there instead of NaN. ``dtype``: compute ``delta`` and ``dlse`` in it; ``delta=False``
    skips ``delta`` (a backward that takes ``dlse`` otherwise) and returns None for it.
    Shapes are any ``[..., H, D_v]`` / ``[..., H]`` pair."""
    empty = torch.isneginf(lse)
    if dlse is not None:
        dlse = torch.where(empty, 0.0, dlse)
        if dtype is not None:
            dlse = dlse.to(dtype)
    d = None
    if delta:
        d = (dout.to(dtype) * out.to(dtype)).sum(-1) if dtype is not None \
            else (dout * out).sum(-1)
        if dlse is not None:
            d = d - dlse
    return d, lse.masked_fill(empty, float("inf")), dlse
