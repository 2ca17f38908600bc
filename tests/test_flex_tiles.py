"""Tiles on FlexAttention plus per-edge residual (ops/flex_tiles.py, backend "flex"):
forward and merge on CPU (eager FlexAttention) against the per-edge path and the dense
float64 oracle; the H100 model's engine choice (ops/plan.py) asked for a CUDA device; the
FlexAttention version guard. Backward and the compiled CUDA path: ``gpu``-marked tests."""
import sys

import pytest
import torch

import attngraph as ag
from attngraph import capabilities
from attngraph.ops import chunked, dispatch, flex_tiles
from attngraph.ops import plan as plan_module
from attngraph.ops.dispatch import Inputs, explain

from helpers import dense_attention, qkv, random_graph

assert_close = torch.testing.assert_close

_BUCKETS = torch.randint(0, 9, (260,), generator=torch.Generator().manual_seed(4))
MASKS = {
    "sliding_window": lambda: ag.masks.sliding_window(300, 9),
    "sliding_window-causal": lambda: ag.masks.sliding_window(300, 20, causal=True),
    "dilated_window": lambda: ag.masks.dilated_window(260, 6, 2),
    "global_tokens": lambda: ag.masks.global_tokens(200, [0, 17, 150]),
    "longformer": lambda: ag.masks.longformer(280, 8, [0, 100, 279]),
    "bigbird": lambda: ag.masks.bigbird(256, 16),
    "block_sparse": lambda: ag.masks.block_sparse(torch.tensor([[1, 0, 1], [0, 1, 0],
                                                                 [1, 1, 0]]), 70),
    "document": lambda: ag.masks.document([50, 0, 137, 61]),
    "hash_buckets": lambda: ag.masks.hash_buckets(_BUCKETS),
    "hash_buckets-unordered": lambda: _unordered(ag.masks.hash_buckets(_BUCKETS)),
    "random": lambda: ag.masks.random(240, 7, seed=0),
    "window+random": lambda: ag.masks.sliding_window(300, 10) | ag.masks.random(300, 4, seed=1),
}
# Plans: every non-empty tile on FlexAttention, a middle density (full, partial tiles and
# residual edges), every edge per edge; at a 32 block and at FlexAttention's 128.
PLANS = {"all-tiles-32": (32, 0.0), "mid-32": (32, 0.25), "mid-128": (128, 0.05),
         "all-edges-128": (128, 2.0)}


def _unordered(g):
    """The graph without its kept token order (FlexAttention on the numbering as given)."""
    return ag.TokenGraph(torch.stack([g.src, g.dst]), num_src=g.num_src, num_dst=g.num_dst)


def _check(g, plan, *, H=4, H_kv=2, D=8, D_v=5, bias_heads=None, scale=0.37):
    q, k, v = qkv(g.num_dst, g.num_src, H, H_kv, D, D_v, grad=False)
    bias = None
    if bias_heads:
        gen = torch.Generator().manual_seed(3)
        bias = torch.randn(g.num_edges, bias_heads, generator=gen, dtype=torch.float64)
    out, lse = flex_tiles.attention(q, k, v, g, scale, bias, plan=plan)
    ref, ref_lse = chunked.attention(q, k, v, g, scale, bias)
    assert out.dtype == torch.float64 and out.shape == ref.shape
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert_close(lse, ref_lse, rtol=1e-10, atol=1e-10)
    # the dense float64 oracle (SDPA on the dense mask, bias spread over the cells)
    dense_bias = None
    if bias is not None:
        dense_bias = torch.zeros(bias_heads, g.num_dst, g.num_src, dtype=torch.float64)
        dense_bias[:, g.dst.long(), g.src.long()] = bias.t()
        dense_bias = dense_bias.repeat(H // bias_heads, 1, 1)
    gold, gold_lse = dense_attention(q, k, v, g.to_dense(), scale=scale, bias=dense_bias)
    assert_close(out, gold, rtol=1e-9, atol=1e-9)
    finite = ~torch.isneginf(gold_lse)
    assert torch.equal(finite, ~torch.isneginf(lse))
    assert_close(lse[finite], gold_lse[finite], rtol=1e-9, atol=1e-9)
    return out, lse


@pytest.mark.parametrize("plan_name", list(PLANS))
@pytest.mark.parametrize("name", list(MASKS))
def test_forward_and_merge_match_per_edge_and_dense(name, plan_name):
    g = MASKS[name]()
    block, density = PLANS[plan_name]
    plan = g.tile_plan(block, min_density=density)
    if name == "hash_buckets":
        assert plan.order is not None       # computed in (bucket, position) order
    if plan_name.startswith("mid") and name in ("sliding_window", "window+random"):
        assert plan.num_tiles and plan.num_residual_edges      # both parts, merged
    if plan_name.startswith("all-edges"):
        assert plan.num_tiles == 0
    _check(g, plan)


@pytest.mark.parametrize("bias_heads", [1, 2, 4])
@pytest.mark.parametrize("name", ["sliding_window", "longformer", "hash_buckets",
                                  "window+random"])
def test_edge_bias_through_score_mod(name, bias_heads):
    g = MASKS[name]()
    _check(g, g.tile_plan(32, min_density=0.25), bias_heads=bias_heads)


@pytest.mark.parametrize("H,H_kv", [(2, 2), (4, 1), (8, 2)])
def test_gqa(H, H_kv):
    g = MASKS["window+random"]()
    _check(g, g.tile_plan(32, min_density=0.25), H=H, H_kv=H_kv, D=16, D_v=16,
           bias_heads=H_kv)


def test_empty_rows_bipartite_and_no_edges():
    mask, g = random_graph(150, 170, p=0.2, seed=2, empty_rows=(0, 5, 149),
                           full_rows=(7,))
    for density in (0.0, 0.1, 0.3):
        out, lse = _check(g, g.tile_plan(32, min_density=density))
        assert torch.isneginf(lse[[0, 5, 149]]).all() and (out[[0, 5, 149]] == 0).all()
    empty = ag.TokenGraph(torch.zeros(2, 0, dtype=torch.long), num_nodes=40)
    out, lse = _check(empty, empty.tile_plan(32, min_density=0.0))
    assert (out == 0).all() and torch.isneginf(lse).all()


def test_engine_plan_default_through_graph_attention():
    """backend="flex" with the engine's own plan (128² tiles at the H100 model's
    break-even density): float32 against the per-edge backend."""
    g = ag.masks.sliding_window(600, 24) | ag.masks.random(600, 3, seed=2)
    q, k, v = qkv(600, 600, 4, 2, 16, dtype=torch.float32, grad=False)
    out, lse = ag.graph_attention(q, k, v, g, backend="flex", return_lse=True)
    ref, ref_lse = ag.graph_attention(q, k, v, g, backend="torch", return_lse=True)
    assert_close(out, ref, rtol=2e-5, atol=2e-5)
    assert_close(lse, ref_lse, rtol=2e-5, atol=2e-5)
    plan = flex_tiles.engine_plan(g, heads=4, kv_heads=2, head_dim=16, value_dim=16,
                                  dtype=torch.float32)
    assert plan.block_q == plan.block_k == plan_module.FLEX_BLOCK
    assert plan.num_tiles and plan.num_residual_edges
    # batched inputs [B, L, H, D] fold the batch into heads
    qb, kb, vb = (torch.stack([t, t.flip(0)]) for t in (q, k, v))
    outb = ag.graph_attention(qb, kb, vb, g, backend="flex")
    assert_close(outb[0], ref, rtol=2e-5, atol=2e-5)


def test_block_mask_is_the_plan_and_is_cached():
    g = MASKS["window+random"]()
    plan = g.tile_plan(32, min_density=0.25)
    bm = flex_tiles.block_mask(plan)
    assert flex_tiles.block_mask(plan) is bm
    assert g.tile_plan(32, min_density=0.25) is plan            # cached with the graph
    # full blocks = full tiles, partial blocks = partial tiles, nothing else
    dense = bm.to_dense()[0, 0]
    layout = torch.zeros(plan.num_q_blocks, plan.num_k_blocks, dtype=dense.dtype)
    layout[plan.tile_q, plan.tile_k] = 1
    assert torch.equal(dense, layout)
    assert int(bm.full_kv_num_blocks.sum()) == plan.num_full
    assert int(bm.kv_num_blocks.sum()) == plan.num_partial
    # the mask_mod is exactly the tile edges (from_block_mask evaluates it per cell)
    tiles_graph = ag.TokenGraph.from_block_mask(bm)
    tile_edges = torch.ones(g.num_edges, dtype=torch.bool)
    tile_edges[plan.residual_edges] = False
    expect = ag.TokenGraph(torch.stack([g.src[tile_edges], g.dst[tile_edges]]),
                           num_src=g.num_src, num_dst=g.num_dst)
    assert tiles_graph.equal(expect)
    g.clear_caches()
    assert g.tile_plan(32, min_density=0.25) is not plan


@pytest.mark.parametrize("block", [128, 64, 20])
def test_packed_masks_unpack_to_the_plan(block):
    g = ag.masks.random(200, 30, seed=3) | ag.masks.sliding_window(200, 5)
    plan = g.tile_plan(block, min_density=0.0)
    packed = flex_tiles.packed_masks(plan)
    words = -(-block // 32)
    assert packed.dtype == torch.int32 and packed.shape == (plan.masks.size(0), block, words)
    bits = (packed.unsqueeze(-1).long() >> torch.arange(32)) & 1           # [P, bq, W, 32]
    unpacked = bits.reshape(plan.masks.size(0), block, words * 32)[..., :block].bool()
    assert torch.equal(unpacked, plan.masks)
    assert flex_tiles.packed_masks(plan) is packed


# ---------------------------------------------------------------------------- dispatch
def _cuda_inputs(g, *, grad=False, dtype=torch.bfloat16, heads=8, kv_heads=8, dim=64,
                 bias=False, bias_grad=False):
    return Inputs(device=torch.device("cuda"), dtype=dtype, head_dim=dim, value_dim=dim,
                  requires_grad=grad, graph=g, has_bias=bias, heads=heads,
                  kv_heads=kv_heads, bias_requires_grad=bias_grad)


def test_cpu_flex_is_forward_only_and_never_auto():
    g = MASKS["sliding_window"]()
    q, k, v = qkv(300, 300, 2, 2, 8, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="no backward on CPU"):
        ag.graph_attention(q, k, v, g, backend="flex")
    with pytest.raises(ValueError, match="no backward on CPU"):
        flex_tiles.attention(q, k, v, g, 0.3)
    x = Inputs.of(q.detach(), k.detach(), v.detach(), g)
    assert x.heads == 2 and x.kv_heads == 2
    assert explain("flex", x).startswith("flex: dense tiles on FlexAttention")
    assert explain("auto", x).startswith("tiles:")          # ATen's flash engine
    g = ag.masks.random(300, 7, seed=0)                      # tiles do not pay: per edge
    line = explain("auto", Inputs.of(q.detach(), k.detach(), v.detach(), g))
    assert line.startswith("torch") and "not flex: auto takes FlexAttention tiles on " \
        "CUDA only" in line


def test_eager_score_limit(monkeypatch):
    g = MASKS["sliding_window"]()
    x = Inputs(device=torch.device("cpu"), dtype=torch.float32, head_dim=8, value_dim=8,
               requires_grad=False, graph=g, heads=4, kv_heads=4)
    assert dispatch._flex_refuse(x) is None
    monkeypatch.setattr(flex_tiles, "EAGER_SCORE_ELEMENTS", 300 * 300 * 4 - 1)
    assert "materialises the [H, N_dst, N_src] scores" in dispatch._flex_refuse(x)


def test_bias_refused_where_the_table_does_not_fit(monkeypatch):
    g = MASKS["sliding_window"]()
    q, k, v = qkv(300, 300, 2, 2, 8, dtype=torch.float32, grad=False)
    bias = torch.randn(g.num_edges, 2)
    ag.graph_attention(q, k, v, g, edge_bias=bias, backend="flex")
    monkeypatch.setattr(flex_tiles, "BIAS_TABLE_ELEMENTS", 1000)
    with pytest.raises(RuntimeError, match="dense .*-element table for FlexAttention's "
                                           "score_mod"):
        ag.graph_attention(q, k, v, g, edge_bias=bias, backend="flex")
    # a bias gradient through score_mod needs torch 2.6
    monkeypatch.setattr(flex_tiles, "BIAS_TABLE_ELEMENTS", 1 << 29)
    monkeypatch.setattr(torch, "__version__", "2.5.1")
    why = dispatch._flex_refuse(_cuda_inputs(g, grad=True, bias=True, bias_grad=True))
    assert "needs torch >= 2.6, found 2.5.1" in why
    assert dispatch._flex_refuse(_cuda_inputs(g, grad=True, bias=True)) is None


def test_version_guard(monkeypatch):
    g = MASKS["sliding_window"]()
    q, k, v = qkv(300, 300, 2, 2, 8, dtype=torch.float32, grad=False)
    assert capabilities.flex_attention_missing() is None
    monkeypatch.setattr(torch, "__version__", "2.4.1+cu121")
    why = capabilities.flex_attention_missing()
    assert "FlexAttention needs torch >= 2.5, found 2.4.1+cu121" in why
    with pytest.raises(RuntimeError, match="flex: FlexAttention needs torch >= 2.5"):
        ag.graph_attention(q, k, v, g, backend="flex")
    assert "not flex: FlexAttention needs torch >= 2.5" in explain(
        "auto", _cuda_inputs(ag.masks.sliding_window(4096, 256)))
    ag.graph_attention(q, k, v, g)                                  # auto still runs
    monkeypatch.setattr(torch, "__version__", "2.13.0")
    monkeypatch.setitem(sys.modules, "torch.nn.attention.flex_attention", None)
    assert "does not import" in capabilities.flex_attention_missing()
    assert capabilities.torch_at_least((2, 13)) and not capabilities.torch_at_least((2, 14))


# ---------------------------------------------------------------------------- the model
def test_choose_engine_by_the_model():
    kw = dict(heads=8, kv_heads=8, head_dim=64, value_dim=64, dtype=torch.bfloat16)
    window = ag.masks.sliding_window(8192, 256)
    c = plan_module.choose_engine(window, "cuda", **kw)
    assert c.engine == "flex" and c.residual_edges == 0 and c.hybrid_s < c.fused_s / 5
    rnd = ag.masks.random(8192, 64, seed=0)
    c = plan_module.choose_engine(rnd, "cuda", **kw)
    assert c.engine == "fused" and c.tiles == 0 and c.hybrid_s == pytest.approx(c.fused_s)
    mixed = ag.masks.sliding_window(8192, 256) | ag.masks.random(8192, 16, seed=0)
    c = plan_module.choose_engine(mixed, "cuda", **kw, requires_grad=True)
    assert c.engine == "flex" and c.tiles and c.residual_edges
    # the same figures from the tile counts and constants by hand
    counts = plan_module.tile_counts(mixed, 128, 128)[1]
    d = plan_module.flex_min_density(8, 1, 64, 64, torch.bfloat16, True)
    take = counts >= d * 128 * 128
    assert c.tiles == int(take.sum()) and c.min_density == d
    expect = (plan_module.flex_seconds(int(take.sum()), 8, 64, 64, True)
              + plan_module.fused_seconds(mixed.num_edges - int(counts[take].sum()), 8, 1,
                                          64, 64, torch.bfloat16, True)
              + plan_module.merge_seconds(8192, 8, 64, True))
    assert c.hybrid_s == pytest.approx(expect)
    # hash buckets, planned in bucket order: the edges a break-even plan would leave over
    # do not pay for the merge, so every non-empty tile goes to FlexAttention
    h = ag.masks.hash_buckets(torch.randint(0, 128, (8192,),
                                            generator=torch.Generator().manual_seed(0)))
    c = plan_module.choose_engine(h, "cuda", **kw)
    assert c.engine == "flex" and c.min_density == 0.0 and c.residual_edges == 0
    assert plan_module.flex_density(h, **kw) == 0.0
    plan = flex_tiles.engine_plan(h, **kw)
    assert plan.order is not None and plan.num_residual_edges == 0
    assert plan.num_tiles == c.tiles
    # no model off CUDA; without the fused kernels every non-empty tile is FlexAttention's
    assert plan_module.choose_engine(window, "cpu", **kw).engine is None
    c = plan_module.choose_engine(rnd, "cuda", **kw, fused_available=False)
    assert c.engine == "flex" and c.min_density == 0 and c.residual_edges == 0
    # float64: the fused kernels take none
    assert plan_module.fused_seconds(10, 8, 1, 64, 64, torch.float64) == float("inf")


def test_auto_on_cuda_asks_the_model(monkeypatch):
    """What dispatch would do for CUDA tensors, asked without a GPU."""
    monkeypatch.setattr(dispatch, "WITH_CUPY", True)
    line = explain("auto", _cuda_inputs(ag.masks.sliding_window(8192, 256), grad=True))
    assert line.startswith("flex: dense tiles on FlexAttention (ops/flex_tiles.py, compiled)")
    assert "H100 model (forward + backward, H = 8, D = 64)" in line
    line = explain("auto", _cuda_inputs(ag.masks.random(8192, 64, seed=0)))
    assert line.startswith("cupy: fused kernels")
    assert "not flex: the fused kernels are faster: H100 model (forward" in line
    # an implicit graph stays on the key ranges of its rule
    line = explain("auto", _cuda_inputs(ag.masks.sliding_window(8192, 256, implicit=True)))
    assert line.startswith("ranges")
    # without cupy the flex engine plans every non-empty tile
    monkeypatch.setattr(dispatch, "WITH_CUPY", False)
    line = explain("auto", _cuda_inputs(ag.masks.random(2048, 64, seed=0)))
    assert line.startswith("flex") and "the fused kernels are not available" in line


def test_benchmark_model_uses_the_library():
    """benchmarks/model.py times the hybrid with the library's decision function."""
    from benchmarks import model

    assert model.H100 is plan_module.H100
    assert model.warp_instructions is plan_module.warp_instructions
    g = ag.masks.sliding_window(4096, 256) | ag.masks.random(4096, 16, seed=0)
    choice = plan_module.choose_engine(g, "cuda", heads=8, kv_heads=8, head_dim=64,
                                       value_dim=64, dtype=torch.bfloat16)
    assert model.hybrid(g, 64, 8, torch.bfloat16)["hybrid_fwd"] == pytest.approx(
        choice.hybrid_s)


# ---------------------------------------------------------------------------- GPU
@pytest.mark.parametrize("name", ["sliding_window", "longformer", "bigbird", "hash_buckets",
                                  "window+random"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_forward_backward_against_per_edge(name, dtype):
    """Compiled FlexAttention tiles + fused residual, forward and every gradient (q, k, v,
    bias, through out and lse), against the torch backend in float64."""
    g = MASKS[name]().to("cuda")
    plan = g.tile_plan(128, min_density=0.05)
    q, k, v = (t.to("cuda") for t in qkv(g.num_dst, g.num_src, 4, 2, 64, grad=False))
    bias = torch.randn(g.num_edges, 2, device="cuda", dtype=torch.float64)
    inputs = [t.to(dtype).requires_grad_() for t in (q, k, v)] + [
        bias.float().requires_grad_()]
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    out, lse = flex_tiles.attention(*inputs[:3], g, 0.125, inputs[3], plan=plan,
                                    residual=dispatch.per_edge_backend(
                                        "auto", Inputs.of(*inputs[:3])).run)
    ref, ref_lse = chunked.attention(*inputs64[:3], g, 0.125, inputs64[3])
    gen = torch.Generator(device="cuda").manual_seed(1)
    w = torch.randn(ref.shape, generator=gen, device="cuda", dtype=torch.float64)
    wl = torch.randn(ref_lse.shape, generator=gen, device="cuda", dtype=torch.float64)

    def loss(o, l):
        return (o.double() * w).sum() + (torch.where(torch.isinf(l), 0.0, l.double()) * wl).sum()

    grads = torch.autograd.grad(loss(out, lse), inputs)
    ref_grads = torch.autograd.grad(loss(ref, ref_lse), inputs64)
    tol = 2e-3 if dtype == torch.float32 else 6e-2
    assert (out.double() - ref).abs().max() < tol
    for a, b in zip(grads, ref_grads):
        assert (a.double() - b).abs().max() / max(1.0, b.abs().max()) < tol


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_auto_takes_flex_on_a_window():
    g = ag.masks.sliding_window(8192, 256).to("cuda")
    q, k, v = (torch.randn(8192, 8, 64, device="cuda", dtype=torch.bfloat16,
                           requires_grad=True) for _ in range(3))
    line = explain("auto", Inputs.of(q, k, v, g))
    assert line.startswith("flex:"), line
    out = ag.graph_attention(q, k, v, g)
    ref = ag.graph_attention(q.float(), k.float(), v.float(), g, backend="torch")
    assert (out.float() - ref).abs().max() < 3e-2
    out.float().sum().backward()
    assert torch.isfinite(q.grad).all()
