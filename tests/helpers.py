"""Shared test oracles: dense attention in float64 and small graph builders."""
import math

import torch

from attngraph import TokenGraph


def dense_attention(q, k, v, mask, *, scale=None, bias=None):
    """Dense masked attention, node-major ``q [N, H, D]``, ``mask [N_dst, N_src]`` bool.

    ``bias`` is a dense ``[H or 1, N_dst, N_src]`` float added to the scores. Rows without
    keys give 0 and lse -inf. Returns ``(out [N, H, D_v], lse [N, H])``.
    """
    H, H_kv = q.size(1), k.size(1)
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    kk = k.repeat_interleave(H // H_kv, dim=1)
    vv = v.repeat_interleave(H // H_kv, dim=1)
    s = torch.einsum("ihd,jhd->hij", q, kk) * scale
    if bias is not None:
        s = s + bias
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)                      # [H, N_dst]
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0).unsqueeze(-1))
    p = torch.where(torch.isfinite(lse).unsqueeze(-1), p, 0)
    out = torch.einsum("hij,jhd->ihd", p, vv)
    return out, lse.t()


def sdpa_attention(q, k, v, mask, *, scale=None):
    """The same through torch's scaled_dot_product_attention (empty rows zeroed)."""
    H, H_kv = q.size(1), k.size(1)
    kk = k.repeat_interleave(H // H_kv, dim=1).transpose(0, 1)
    vv = v.repeat_interleave(H // H_kv, dim=1).transpose(0, 1)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), kk, vv, attn_mask=mask, scale=scale).transpose(0, 1)
    empty = ~mask.any(-1)
    return out.masked_fill(empty.view(-1, 1, 1), 0.0)


def random_graph(num_dst, num_src=None, p=0.3, seed=0, *, empty_rows=(), full_rows=()):
    """Random bool mask and its TokenGraph, with chosen empty and full rows."""
    num_src = num_dst if num_src is None else num_src
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(num_dst, num_src, generator=gen) < p
    for r in empty_rows:
        mask[r] = False
    for r in full_rows:
        mask[r] = True
    return mask, TokenGraph.from_dense(mask)


def qkv(num_dst, num_src, H, H_kv, D, D_v=None, *, dtype=torch.float64, seed=0, grad=True):
    gen = torch.Generator().manual_seed(seed)
    D_v = D if D_v is None else D_v
    ts = (torch.randn(num_dst, H, D, generator=gen, dtype=dtype),
          torch.randn(num_src, H_kv, D, generator=gen, dtype=dtype),
          torch.randn(num_src, H_kv, D_v, generator=gen, dtype=dtype))
    return tuple(t.requires_grad_(grad) for t in ts)
