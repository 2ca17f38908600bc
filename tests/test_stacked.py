"""Graphs per head and per sequence (StackedGraph) against running each slice alone."""
import pytest
import torch

import attngraph as ag
from attngraph.ops import dispatch
from attngraph.stacked import StackedGraph

assert_close = torch.testing.assert_close


def _qkv(B, L, S, H, H_kv, D=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, L, H, D, generator=gen, dtype=torch.float64, requires_grad=True),
            torch.randn(B, S, H_kv, D, generator=gen, dtype=torch.float64, requires_grad=True),
            torch.randn(B, S, H_kv, 5, generator=gen, dtype=torch.float64, requires_grad=True))


def _per_slice(q, k, v, stacked, bias=None):
    """Reference: a Python loop over (sequence, head), one graph_attention each."""
    B, _, H, _ = q.shape
    H_kv = k.size(2)
    G = H // H_kv
    B_g, H_g = stacked.shape
    ptr = stacked.slice_ptr()
    outs, lses = {}, {}
    for b in range(B):
        for h in range(H):
            s = (b if B_g > 1 else 0) * H_g + (h if H_g > 1 else 0)
            eb = None if bias is None else bias[ptr[s]:ptr[s + 1]]
            o, l = ag.graph_attention(q[b, :, h:h + 1], k[b, :, h // G:h // G + 1],
                                      v[b, :, h // G:h // G + 1], stacked[b, h],
                                      edge_bias=eb, return_lse=True, backend="torch")
            outs[b, h], lses[b, h] = o[:, 0], l[:, 0]
    out = torch.stack([torch.stack([outs[b, h] for h in range(H)], 1) for b in range(B)])
    lse = torch.stack([torch.stack([lses[b, h] for h in range(H)], 1) for b in range(B)])
    return out, lse


def _grads(out, lse, inputs):
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    wl = torch.randn(lse.shape, generator=gen, dtype=lse.dtype)
    loss = (out * w).sum() + (torch.where(torch.isinf(lse), 0.0, lse) * wl).sum()
    return torch.autograd.grad(loss, inputs)


def _check(stacked, q, k, v, backend="auto", bias=None):
    inputs = [q, k, v] + ([bias] if bias is not None else [])
    out, lse = ag.graph_attention(q, k, v, stacked, edge_bias=bias, return_lse=True,
                                  backend=backend)
    ref, ref_lse = _per_slice(q, k, v, stacked, bias)
    assert_close(out, ref)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    assert_close(lse, ref_lse)
    for a, b in zip(_grads(out, lse, inputs), _grads(ref, ref_lse, inputs)):
        assert_close(a, b)


def _hash_stack(B, H, L, buckets=4, seed=0, **kw):
    gen = torch.Generator().manual_seed(seed)
    qb = torch.randint(0, buckets, (B, H, L), generator=gen)
    return ag.masks.hash_buckets(qb if B > 1 else qb[0], **kw), qb


GENERATORS = {
    "hash-per-seq-head": lambda: _hash_stack(2, 4, 37)[0],
    "hash-per-head": lambda: _hash_stack(1, 4, 37)[0],
    "hash-strict": lambda: _hash_stack(2, 4, 37, strict=True)[0],
    "hash-cross": lambda: ag.masks.hash_buckets(torch.randint(0, 3, (2, 4, 37)),
                                                torch.randint(0, 3, (2, 4, 29)),
                                                causal=False),
    "qk_drop": lambda: ag.masks.qk_drop(torch.rand(2, 4, 37) < 0.7, torch.rand(2, 4, 37) < 0.6),
    "qk_drop-cross": lambda: ag.masks.qk_drop(torch.rand(4, 37) < 0.7,
                                              torch.rand(4, 29) < 0.6, causal=False),
    "dilated_block-offsets": lambda: ag.masks.dilated_block(37, 8, 1, offset=[0, 1, 0, 1]),
    "stack-per-seq": lambda: ag.masks.stack([ag.masks.sliding_window(37, 3),
                                             ag.masks.random(37, 4, seed=1)], shape=(2, 1)),
}


@pytest.mark.parametrize("backend", ["torch", "tiles"])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)], ids=["MHA", "GQA", "MQA"])
@pytest.mark.parametrize("name", list(GENERATORS), ids=list(GENERATORS))
def test_stacked_equals_each_slice_alone(name, heads, backend):
    torch.manual_seed(0)
    g = GENERATORS[name]()
    assert isinstance(g, StackedGraph)
    B = 2 if g.shape[0] == 1 else g.shape[0]
    q, k, v = _qkv(B, g.num_dst, g.num_src, *heads)
    _check(g, q, k, v, backend)


def test_stacked_bias_and_unbatched_inputs():
    g, _ = _hash_stack(1, 2, 30)
    q, k, v = _qkv(1, 30, 30, 2, 2)
    bias = torch.randn(g.num_edges, dtype=torch.float64, requires_grad=True)
    _check(g, q, k, v, bias=bias)
    out = ag.graph_attention(q[0], k[0], v[0], g, edge_bias=bias)
    assert_close(out, ag.graph_attention(q, k, v, g, edge_bias=bias)[0])


def test_hash_stack_slices_equal_one_dimensional_hashing():
    g, qb = _hash_stack(2, 3, 50, buckets=5, strict=True)
    for b in range(2):
        for h in range(3):
            assert g[b, h].equal(ag.masks.hash_buckets(qb[b, h], strict=True))
    keep_q, keep_k = torch.rand(3, 40) < 0.5, torch.rand(3, 40) < 0.5
    d = ag.masks.qk_drop(keep_q, keep_k)
    for h in range(3):
        assert d[0, h].equal(ag.masks.qk_drop(keep_q[h], keep_k[h]))


def test_one_backend_call_for_the_whole_stack(monkeypatch):
    """No Python loop over heads: 16 heads cost one backend call, as 1 head does."""
    calls = []
    torch_backend = dispatch._BACKENDS["torch"]
    monkeypatch.setitem(dispatch._BACKENDS, "torch", dispatch.Backend(
        "torch", torch_backend.priority, torch_backend.refuse,
        lambda *a: calls.append(1) or torch_backend.run(*a), torch_backend.stages))
    for H in (1, 16):
        g, _ = _hash_stack(2, H, 64)
        q, k, v = _qkv(2, 64, 64, H, H)
        calls.clear()
        ag.graph_attention(q, k, v, g, backend="torch").sum().backward()
        assert len(calls) == 1


def test_stages_on_a_stack():
    g, _ = _hash_stack(2, 4, 33)
    q, k, v = _qkv(2, 33, 33, 4, 2)
    s = ag.ops.edge_scores(q, k, g)
    assert s.shape == (g.num_edges, 1)
    p = ag.ops.edge_softmax(s, g)
    out = ag.ops.aggregate(p, v, g)
    assert_close(out, ag.graph_attention(q, k, v, g))


def test_sparse_self_attention_with_per_head_graphs():
    torch.manual_seed(0)
    layer = ag.nn.SparseSelfAttention(32, 4, num_kv_heads=2).double()
    x = torch.randn(2, 40, 32, dtype=torch.float64)
    qb = ag.masks.lsh_buckets(layer.q_proj(x).view(2, 40, 4, 8), 4)
    g = ag.masks.hash_buckets(qb)
    out = layer(x, g)
    B, L = 2, 40
    q = layer.q_proj(x).view(B, L, 4, 8)
    k = layer.k_proj(x).view(B, L, 2, 8)
    v = layer.v_proj(x).view(B, L, 2, 8)
    ref = layer.out_proj(_per_slice(q, k, v, g)[0].reshape(B, L, 32))
    assert_close(out, ref)


def test_lsh_buckets_per_head_and_reproducible():
    x = torch.randn(3, 100, 4, 16)
    b = ag.masks.lsh_buckets(x, 8, seed=3)
    assert b.shape == (3, 4, 100) and b.dtype == torch.long
    assert int(b.min()) >= 0 and int(b.max()) < 8
    assert torch.equal(b, ag.masks.lsh_buckets(x, 8, seed=3))
    assert not torch.equal(b, ag.masks.lsh_buckets(x, 8, seed=4))
    # scale-free (normalised), and a vector and its near copy share a bucket
    assert torch.equal(b, ag.masks.lsh_buckets(5.0 * x, 8, seed=3))
    assert torch.equal(b, ag.masks.lsh_buckets(x + 1e-6 * torch.randn_like(x), 8, seed=3))
    # heads hash with different rotations: the same vector in two heads may part ways
    same = x[:, :, :1].expand(-1, -1, 4, -1)
    per_head = ag.masks.lsh_buckets(same, 8, seed=3)
    assert not all(torch.equal(per_head[:, 0], per_head[:, h]) for h in range(1, 4))
    with pytest.raises(ValueError, match="even"):
        ag.masks.lsh_buckets(x, 7)


def test_stack_indexing_picture_and_errors():
    import matplotlib

    matplotlib.use("Agg")
    g = ag.masks.stack([ag.masks.causal(8), ag.masks.full(8)], shape=(1, 2))
    assert g[3, 1].equal(ag.masks.full(8))            # the batch dim is shared
    assert "StackedGraph(shape=(1, 2)" in repr(g)
    assert g.plot(0, 1).axes[0].get_title().startswith("sequence 0, head 1")
    with pytest.raises(ValueError, match="out of range"):
        g[0, 2]
    with pytest.raises(ValueError, match="needs 3 graphs"):
        ag.masks.stack([ag.masks.causal(8)] * 2, shape=(1, 3))
    with pytest.raises(ValueError, match="same num_src"):
        ag.masks.stack([ag.masks.causal(8), ag.masks.causal(9)])
    q, k, v = _qkv(2, 8, 8, 3, 3)
    with pytest.raises(ValueError, match="graphs per sequence for 3 heads"):
        ag.graph_attention(q, k, v, g)
    q, k, v = _qkv(2, 8, 8, 2, 2)
    with pytest.raises(ValueError, match=r"edge_bias must be \[E\]"):
        ag.graph_attention(q, k, v, g, edge_bias=torch.zeros(g.num_edges, 2))
    with pytest.raises(ValueError, match="leading shape"):
        ag.masks.hash_buckets(torch.zeros(2, 8, dtype=torch.long),
                              torch.zeros(3, 8, dtype=torch.long))


def test_sparse_self_attention_dropout_with_a_stack():
    torch.manual_seed(0)
    layer = ag.nn.SparseSelfAttention(16, 2, dropout=0.5).train()
    x = torch.randn(2, 24, 16)
    g = ag.masks.hash_buckets(torch.randint(0, 3, (2, 2, 24)))
    out = layer(x, g)
    assert out.shape == x.shape and torch.isfinite(out).all()
    layer.eval()
    assert_close(layer(x, g), layer(x, g))
