"""Shared test oracles: dense attention in float64 and small graph builders."""
import math

import pytest
import torch

from attngraph import TokenGraph


def dense_attention(q, k, v, mask, *, scale=None, bias=None):
    """Dense masked attention through ``scaled_dot_product_attention``, node-major.

    ``q [N_dst, H, D]``, ``k/v [N_src, H_kv, D]``, ``mask [N_dst, N_src]`` bool, ``bias`` a
    dense ``[H or 1, N_dst, N_src]`` float added to the scores. Rows without keys give 0 and
    lse -inf. Returns ``(out [N_dst, H, D_v], lse [N_dst, H])``; differentiable.
    """
    H, H_kv = q.size(1), k.size(1)
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    qh = q.transpose(0, 1)                                        # [H, N_dst, D]
    kh = k.repeat_interleave(H // H_kv, dim=1).transpose(0, 1)
    vh = v.repeat_interleave(H // H_kv, dim=1).transpose(0, 1)
    attn = torch.zeros(mask.shape, dtype=q.dtype).masked_fill(~mask, float("-inf"))
    if bias is not None:
        attn = attn + bias
    # SDPA gives NaN on rows with no allowed key: let them see every key, zero them after.
    empty = torch.isneginf(attn).all(-1, keepdim=True)            # [H or 1, N_dst, 1]
    attn = attn.masked_fill(empty, 0.0)
    out = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=attn,
                                                           scale=scale)
    out = out.masked_fill(empty, 0.0).transpose(0, 1)
    s = (torch.einsum("hid,hjd->hij", qh, kh) * scale + attn).masked_fill(empty, float("-inf"))
    return out, torch.logsumexp(s, dim=-1).t()


def dense_attention_einsum(q, k, v, mask, *, scale=None):
    """An independent dense formula (einsum), to check the SDPA-based oracle itself."""
    H, H_kv = q.size(1), k.size(1)
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    kk = k.repeat_interleave(H // H_kv, dim=1)
    vv = v.repeat_interleave(H // H_kv, dim=1)
    s = (torch.einsum("ihd,jhd->hij", q, kk) * scale).masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return torch.einsum("hij,jhd->ihd", p, vv)


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


@pytest.fixture(params=["torch_scatter", "torch_ops"])
def scatter_mode(request, monkeypatch):
    """Run a test with torch_scatter's segment kernels and with torch's own ops."""
    from attngraph.ops import segment

    if request.param == "torch_scatter":
        pytest.importorskip("torch_scatter")
        monkeypatch.setattr(segment, "USE_TORCH_SCATTER", True)
    else:
        monkeypatch.setattr(segment, "USE_TORCH_SCATTER", False)
    return request.param
