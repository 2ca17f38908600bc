import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attngraph as ag
from attngraph import TokenGraph
from attngraph import chunks as chunk_sizes
from attngraph.ops import chunked, reference
from helpers import (dense_attention, dense_attention_einsum, qkv, random_graph,  # noqa: F401
                     scatter_mode)


def grads(out, inputs, seed=1):
    gen = torch.Generator().manual_seed(seed)
    dout = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    return torch.autograd.grad(out, inputs, dout, allow_unused=True)


def assert_close(a, b, atol=1e-10, rtol=1e-8):
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol, equal_nan=False)


CASES = {
    # id: (num_dst, num_src, H, H_kv, D, D_v, graph kwargs)
    "tiny": (5, 5, 2, 2, 4, 4, {}),
    "gqa": (33, 33, 4, 2, 8, 8, {}),
    "mqa-dv": (17, 17, 4, 1, 8, 5, {}),
    "n1": (1, 1, 1, 1, 8, 8, {"p": 1.0}),
    "odd-97-d40": (97, 97, 2, 2, 40, 40, {}),
    "d72": (31, 31, 2, 1, 72, 72, {}),
    "empty-and-full-rows": (40, 40, 2, 2, 8, 8, {"empty_rows": (0, 5, 39), "full_rows": (7,)}),
    "cross": (23, 41, 2, 2, 8, 6, {}),
    "no-edges": (9, 9, 2, 2, 4, 4, {"p": 0.0}),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_matches_dense_float64(case, scatter_mode):
    n_dst, n_src, H, H_kv, D, D_v, kw = CASES[case]
    mask, g = random_graph(n_dst, n_src, **kw)
    q, k, v = qkv(n_dst, n_src, H, H_kv, D, D_v)
    out, lse = ag.graph_attention(q, k, v, g, return_lse=True)
    ref, ref_lse = dense_attention(q, k, v, mask)
    assert out.shape == (n_dst, H, D_v) and lse.shape == (n_dst, H)
    assert not out.isnan().any() and not lse.isnan().any()
    assert_close(out, ref)
    assert_close(lse, ref_lse)
    for a, b in zip(grads(out, (q, k, v)), grads(ref, (q, k, v))):
        assert_close(a, b)


def test_sdpa_oracle_agrees_with_einsum_formula():
    mask, g = random_graph(29, 29, p=0.4, empty_rows=(3,))
    q, k, v = qkv(29, 29, 4, 2, 8, grad=False)
    assert_close(dense_attention(q, k, v, mask)[0], dense_attention_einsum(q, k, v, mask))


@pytest.mark.parametrize("per_head", [False, True], ids=["bias-E", "bias-EH"])
def test_edge_bias_and_its_gradient(per_head, scatter_mode):
    mask, g = random_graph(21, 21, p=0.4, empty_rows=(2,))
    q, k, v = qkv(21, 21, 4, 2, 8)
    E, H = g.num_edges, 4
    gen = torch.Generator().manual_seed(3)
    bias = torch.randn((E, H) if per_head else (E,), generator=gen, dtype=torch.float64)
    bias.requires_grad_(True)
    dense_bias = torch.zeros(21, 21, H if per_head else 1, dtype=torch.float64)
    dense_bias = dense_bias.index_put((g.dst, g.src), bias.view(E, -1)).permute(2, 0, 1)
    out, lse = ag.graph_attention(q, k, v, g, edge_bias=bias, return_lse=True)
    ref, ref_lse = dense_attention(q, k, v, mask, bias=dense_bias)
    assert_close(out, ref)
    assert_close(lse, ref_lse)
    for a, b in zip(grads(out, (q, k, v, bias)), grads(ref, (q, k, v, bias))):
        assert_close(a, b)


def test_minus_inf_bias_masks_edges_without_nan():
    mask, g = random_graph(12, 12, p=0.5)
    q, k, v = qkv(12, 12, 2, 2, 4)
    bias = torch.zeros(g.num_edges, dtype=torch.float64)
    bias[g.dst == 4] = -math.inf           # every edge of query 4 masked out
    out, lse = ag.graph_attention(q, k, v, g, edge_bias=bias, return_lse=True)
    mask[4] = False
    ref, ref_lse = dense_attention(q, k, v, mask)
    assert_close(out, ref)
    assert torch.isneginf(lse[4]).all()
    dq, dk, dv = grads(out, (q, k, v))
    assert all(torch.isfinite(t).all() for t in (dq, dk, dv))


def test_gradcheck_tiny_graph():
    _, g = random_graph(6, 5, p=0.5, empty_rows=(1,), seed=4)
    q, k, v = qkv(6, 5, 2, 1, 3, 2, seed=5)
    bias = torch.randn(g.num_edges, 2, dtype=torch.float64, requires_grad=True)
    fn = lambda q, k, v, b: ag.graph_attention(q, k, v, g, edge_bias=b, backend="torch")
    assert torch.autograd.gradcheck(fn, (q, k, v, bias))


def test_gradcheck_through_the_log_sum_exp(scatter_mode):
    """lse is differentiable too (merging partial attentions needs it); a row without
    edges (lse = -inf) gets no gradient from it."""
    _, g = random_graph(6, 5, p=0.5, empty_rows=(1,), seed=4)
    q, k, v = qkv(6, 5, 2, 1, 3, 2, seed=5)
    bias = torch.randn(g.num_edges, 2, dtype=torch.float64, requires_grad=True)

    def fn(q, k, v, b):
        out, lse = ag.graph_attention(q, k, v, g, edge_bias=b, return_lse=True,
                                      backend="torch")
        return out, lse.nan_to_num(neginf=0.0).sin()
    assert torch.autograd.gradcheck(fn, (q, k, v, bias))


def test_batched_graph_without_queries():
    g = TokenGraph(torch.empty(2, 0, dtype=torch.long), num_src=5, num_dst=0)
    q = torch.randn(2, 0, 2, 4)
    k, v = torch.randn(2, 5, 2, 4), torch.randn(2, 5, 2, 3)
    out, lse = ag.graph_attention(q, k, v, g, return_lse=True)
    assert out.shape == (2, 0, 2, 3) and lse.shape == (2, 0, 2)


def test_gradcheck_stages():
    _, g = random_graph(5, 5, p=0.6, seed=6)
    q, k, v = qkv(5, 5, 2, 2, 3, seed=7)

    def fn(q, k, v):
        return ag.ops.aggregate(ag.ops.edge_softmax(ag.ops.edge_scores(q, k, g), g), v, g)

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_stages_compose_to_graph_attention():
    mask, g = random_graph(30, 30, p=0.3, empty_rows=(4,))
    q, k, v = qkv(30, 30, 4, 2, 8, grad=False)
    s = ag.ops.edge_scores(q, k, g)
    p = ag.ops.edge_softmax(s, g)
    assert s.shape == p.shape == (g.num_edges, 4)
    sums = torch.zeros(30, 4, dtype=p.dtype).index_add_(0, g.dst, p)
    has_edges = g.in_degree() > 0
    assert_close(sums[has_edges], torch.ones_like(sums[has_edges]))
    assert (sums[~has_edges] == 0).all()
    assert_close(ag.ops.aggregate(p, v, g), ag.graph_attention(q, k, v, g))
    # 1-D scores work too
    assert_close(ag.ops.edge_softmax(s[:, 0], g), p[:, 0])


def test_batched_equals_per_sequence():
    mask, g = random_graph(19, 19, p=0.3, empty_rows=(0,))
    gen = torch.Generator().manual_seed(8)
    B, H, H_kv = 3, 4, 2
    q = torch.randn(B, 19, H, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, 19, H_kv, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, 19, H_kv, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(g.num_edges, H, generator=gen, dtype=torch.float64, requires_grad=True)
    out, lse = ag.graph_attention(q, k, v, g, edge_bias=bias, return_lse=True)
    assert out.shape == (B, 19, H, 6) and lse.shape == (B, 19, H)
    refs = [ag.graph_attention(q[b], k[b], v[b], g, edge_bias=bias, return_lse=True)
            for b in range(B)]
    assert_close(out, torch.stack([r[0] for r in refs]))
    assert_close(lse, torch.stack([r[1] for r in refs]))
    ref_out = torch.stack([r[0] for r in refs])
    for a, b in zip(grads(out, (q, k, v, bias)), grads(ref_out, (q, k, v, bias))):
        assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
def test_low_precision_within_twice_reference_error(dtype):
    """Error vs a float64 golden is at most 2x that of dense SDPA in the same dtype."""
    mask, g = random_graph(64, 64, p=0.3, empty_rows=(5,), seed=9)
    q64, k64, v64 = qkv(64, 64, 4, 2, 32, seed=10)
    golden = dense_attention(q64, k64, v64, mask)[0]
    golden_grads = grads(golden, (q64, k64, v64))
    q, k, v = (t.detach().to(dtype).requires_grad_(True) for t in (q64, k64, v64))
    ref = dense_attention(q, k, v, mask)[0]
    out = ag.graph_attention(q, k, v, g)
    assert out.dtype == dtype
    floor = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype]
    err = (out.double() - golden).abs().max()
    ref_err = (ref.double() - golden).abs().max()
    assert err <= 2 * ref_err + floor
    for a, b, gold in zip(grads(out, (q, k, v)), grads(ref, (q, k, v)), golden_grads):
        assert (a.double() - gold).abs().max() <= 2 * (b.double() - gold).abs().max() + floor


def test_int32_edge_index_and_duplicates():
    ei = torch.tensor([[0, 1, 1, 2, 0, 2], [1, 1, 2, 2, 1, 0]], dtype=torch.int32)
    g = TokenGraph(ei, 3)
    mask = torch.zeros(3, 3, dtype=torch.bool)
    mask[ei[1].long(), ei[0].long()] = True
    q, k, v = qkv(3, 3, 2, 2, 4, grad=False)
    assert_close(ag.graph_attention(q, k, v, g), dense_attention(q, k, v, mask)[0])


def test_non_contiguous_inputs():
    mask, g = random_graph(15, 15, p=0.4)
    gen = torch.Generator().manual_seed(11)
    base = torch.randn(3, 15, 8, 2, generator=gen, dtype=torch.float64)
    q, k, v = (base[i].transpose(1, 2)[:, :2] for i in range(3))   # [15, 2, 8], strided
    assert not q.is_contiguous()
    assert_close(ag.graph_attention(q, k, v, g),
                 dense_attention(q.contiguous(), k.contiguous(), v.contiguous(), mask)[0])


def test_global_query_sees_every_key():
    n = 50
    ei = torch.stack([torch.arange(n), torch.zeros(n, dtype=torch.long)])  # query 0 <- all
    g = TokenGraph(ei, n)
    mask = g.to_dense()
    q, k, v = qkv(n, n, 2, 2, 8)
    out = ag.graph_attention(q, k, v, g)
    assert_close(out, dense_attention(q, k, v, mask)[0])
    assert (out[1:] == 0).all()


@pytest.mark.parametrize("max_elements", [1, 64, 1000], ids=["row-per-chunk", "small", "mid"])
def test_chunk_size_does_not_change_results(max_elements, monkeypatch):
    mask, g = random_graph(45, 45, p=0.3, empty_rows=(0, 44), full_rows=(10,))
    q, k, v = qkv(45, 45, 4, 2, 8)
    bias = torch.randn(g.num_edges, 4, dtype=torch.float64, requires_grad=True)
    ref, ref_lse = reference.attention(q, k, v, g, edge_bias=bias)
    monkeypatch.setattr(chunk_sizes, "MAX_CHUNK_ELEMENTS", max_elements)
    out, lse = ag.graph_attention(q, k, v, g, edge_bias=bias, return_lse=True)
    assert_close(out, ref)
    assert_close(lse, ref_lse)
    for a, b in zip(grads(out, (q, k, v, bias)), grads(ref, (q, k, v, bias))):
        assert_close(a, b)


def test_memory_bounded_chunks_and_saved_tensors(monkeypatch):
    """Per-edge work is done a chunk at a time, and autograd keeps only O(N H D) tensors."""
    n, H, D = 300, 2, 8
    g = ag.masks.sliding_window(n, 10)
    q, k, v = qkv(n, n, H, H, D)
    budget = 40 * H * D                                 # 40 edges per chunk
    monkeypatch.setattr(chunk_sizes, "MAX_CHUNK_ELEMENTS", budget)
    passes = []
    real = chunked._chunks
    monkeypatch.setattr(chunked, "_chunks", lambda *a: passes.append(real(*a)) or passes[-1])
    out = ag.graph_attention(q, k, v, g, backend="torch")
    # the graph's own index tensors (ptr, src, dst) are saved too, as references
    saved = sum(t.numel() for t in out.grad_fn.saved_tensors
                if t is not None and t.is_floating_point())
    assert all(t.data_ptr() in (g.ptr.data_ptr(), g.src.data_ptr(), g.dst.data_ptr())
               for t in out.grad_fn.saved_tensors if t is not None and not t.is_floating_point())
    out.sum().backward()
    assert len(passes) == 2                             # forward and backward
    for chunks in passes:
        sizes = [c.e1 - c.e0 for c in chunks]
        assert max(sizes) <= 40 and sum(sizes) == g.num_edges
    # saved for backward: q, k, v, out (N*H*D each) and lse (N*H): nothing per edge
    assert saved == 4 * n * H * D + n * H


@settings(max_examples=25, deadline=None)
@given(n_dst=st.integers(1, 12), n_src=st.integers(1, 12), H_kv=st.sampled_from([1, 2]),
       group=st.sampled_from([1, 2]), D=st.integers(1, 9), p=st.floats(0.0, 1.0),
       seed=st.integers(0, 10_000))
def test_property_random_graphs(n_dst, n_src, H_kv, group, D, p, seed):
    mask, g = random_graph(n_dst, n_src, p=p, seed=seed)
    q, k, v = qkv(n_dst, n_src, H_kv * group, H_kv, D, seed=seed)
    out, lse = ag.graph_attention(q, k, v, g, return_lse=True)
    ref, ref_lse = dense_attention(q, k, v, mask)
    assert_close(out, ref)
    assert_close(lse, ref_lse)
    for a, b in zip(grads(out, (q, k, v)), grads(ref, (q, k, v))):
        assert_close(a, b)


def test_scale_argument():
    mask, g = random_graph(10, 10, p=0.5)
    q, k, v = qkv(10, 10, 2, 2, 4, grad=False)
    assert_close(ag.graph_attention(q, k, v, g, scale=0.3),
                 dense_attention(q, k, v, mask, scale=0.3)[0])


# ------------------------------------------------------------------ dispatch


def test_auto_backend_on_cpu_is_torch():
    from attngraph.ops.dispatch import Inputs, select_backend

    x = Inputs(torch.device("cpu"), torch.float32, 64, 64, False)
    assert select_backend("auto", x).name == "torch"


def test_cupy_backend_refusal_lists_every_reason():
    mask, g = random_graph(4, 4)
    q, k, v = qkv(4, 4, 1, 1, 4, grad=False)
    with pytest.raises(RuntimeError, match=r"cupy: needs CUDA tensors, got cpu(.|\n)*torch:"):
        ag.graph_attention(q, k, v, g, backend="cupy")


def test_unknown_backend():
    mask, g = random_graph(4, 4)
    q, k, v = qkv(4, 4, 1, 1, 4, grad=False)
    with pytest.raises(ValueError, match="unknown backend 'triton'"):
        ag.graph_attention(q, k, v, g, backend="triton")


# ------------------------------------------------------------------ bad input


def _inputs():
    mask, g = random_graph(6, 6, p=0.5)
    return qkv(6, 6, 4, 2, 8, grad=False) + (g,)


BAD = {
    "q-not-tensor": (lambda q, k, v, g: (q.tolist(), k, v, g, {}), TypeError, "q must be a torch"),
    "int-dtype": (lambda q, k, v, g: (q.long(), k, v, g, {}), TypeError, "q must be float16"),
    "dtype-mismatch": (lambda q, k, v, g: (q.float(), k, v, g, {}), TypeError, "share one dtype"),
    "q-2d": (lambda q, k, v, g: (q[:, 0], k, v, g, {}), ValueError, r"\[N, H, D\]"),
    "k-dims": (lambda q, k, v, g: (q, k[None], v, g, {}), ValueError, "k must have shape"),
    "wrong-num-dst": (lambda q, k, v, g: (q[:5], k, v, g, {}), ValueError, "num_dst=6"),
    "wrong-num-src": (lambda q, k, v, g: (q, k[:5], v[:5], g, {}), ValueError, "num_src=6"),
    "v-heads": (lambda q, k, v, g: (q, k, v[:, :1], g, {}), ValueError, "same number of heads"),
    "gqa-divisibility": (lambda q, k, v, g: (q[:, :3], k, v, g, {}), ValueError, "multiple of"),
    "head-dim": (lambda q, k, v, g: (q, k[..., :4], v, g, {}), ValueError, "same head dim"),
    "graph-type": (lambda q, k, v, g: (q, k, v, g.edge_index, {}), TypeError, "TokenGraph"),
    "scale-nan": (lambda q, k, v, g: (q, k, v, g, {"scale": float("nan")}), ValueError,
                  "finite"),
    "scale-type": (lambda q, k, v, g: (q, k, v, g, {"scale": "1"}), TypeError, "real number"),
    "bias-shape": (lambda q, k, v, g: (q, k, v, g, {"edge_bias": torch.zeros(3)}), ValueError,
                   r"\[E\] or \[E, H\]"),
    "bias-heads": (lambda q, k, v, g: (q, k, v, g, {"edge_bias": torch.zeros(
        g.num_edges, 3, dtype=torch.float64)}), ValueError, r"\[E, H\]"),
    "bias-int": (lambda q, k, v, g: (q, k, v, g, {"edge_bias": torch.zeros(
        g.num_edges, dtype=torch.long)}), TypeError, "float tensor"),
    "bias-nan": (lambda q, k, v, g: (q, k, v, g, {"edge_bias": torch.full(
        (g.num_edges,), float("nan"), dtype=torch.float64)}), ValueError, "NaN"),
    "batch-mismatch": (lambda q, k, v, g: (q[None].expand(2, -1, -1, -1), k[None], v[None], g,
                                            {}), ValueError, "batch sizes differ"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_raises(case):
    make, exc, match = BAD[case]
    q, k, v, g, kw = make(*_inputs())
    with pytest.raises(exc, match=match):
        ag.graph_attention(q, k, v, g, **kw)


def test_graph_on_other_device_message():
    q, k, v, g = _inputs()
    meta = torch.empty(6, 4, 8, device="meta", dtype=torch.float64)
    with pytest.raises(ValueError, match="graph is on cpu"):
        ag.graph_attention(meta, meta[:, :2], meta[:, :2], g)


def test_stage_errors():
    q, k, v, g = _inputs()
    with pytest.raises(ValueError, match="scores must have shape"):
        ag.ops.edge_softmax(torch.zeros(g.num_edges + 1, 2), g)
    with pytest.raises(TypeError, match="scores must be a float"):
        ag.ops.edge_softmax(torch.zeros(g.num_edges, dtype=torch.long), g)
    with pytest.raises(ValueError, match="p must have shape"):
        ag.ops.aggregate(torch.zeros(g.num_edges, 3, dtype=torch.float64), v, g)
    with pytest.raises(ValueError, match="node-major"):
        ag.ops.edge_scores(q[None], k[None], g)


# ------------------------------------------------------------------ every mask family

_BUCKETS = torch.tensor([0, 2, 1, 0, 2, 2, 1, 0, 1, 0, 0, 2] * 4)
MASKS = {
    "full": lambda: ag.masks.full(37),
    "causal": lambda: ag.masks.causal(37),
    "sliding_window": lambda: ag.masks.sliding_window(41, 3),
    "sliding_window-causal": lambda: ag.masks.sliding_window(41, 3, causal=True),
    "dilated_window": lambda: ag.masks.dilated_window(41, 2, 1),
    "dilated_block": lambda: ag.masks.dilated_block(40, 8, 1),
    "global_tokens": lambda: ag.masks.global_tokens(33, [0, 17]),
    "random": lambda: ag.masks.random(45, 5, seed=0),
    "longformer-causal": lambda: ag.masks.longformer(48, 2, [0, 20], causal=True),
    "bigbird": lambda: ag.masks.bigbird(48, 4),
    "block_sparse": lambda: ag.masks.block_sparse(torch.tensor([[1, 0, 1], [0, 1, 0],
                                                                 [1, 1, 0]]), 5),
    "fixed": lambda: ag.masks.fixed(48, 4, num_local_blocks=3),
    "strided": lambda: ag.masks.strided(40, 6),
    "document": lambda: ag.masks.document([5, 0, 17, 9]),
    "hash_buckets": lambda: ag.masks.hash_buckets(_BUCKETS),
    "qk_drop": lambda: ag.masks.qk_drop(_BUCKETS > 0, _BUCKETS != 1),
}


@pytest.mark.parametrize("name", list(MASKS), ids=list(MASKS))
def test_every_mask_family(name):
    g = MASKS[name]()
    q, k, v = qkv(g.num_dst, g.num_src, 4, 2, 16)
    out, lse = ag.graph_attention(q, k, v, g, return_lse=True)
    ref, ref_lse = dense_attention(q, k, v, g.to_dense())
    assert_close(out, ref)
    assert_close(lse, ref_lse)
    for a, b in zip(grads(out, (q, k, v)), grads(ref, (q, k, v))):
        assert_close(a, b)
