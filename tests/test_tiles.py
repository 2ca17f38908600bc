"""Dense tiles plus per-edge residual (ops/tiles.py) against the per-edge path, exactly."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import attngraph as ag
from attngraph import chunks
from attngraph.ops import chunked, ranges, tiles
from attngraph.ops import plan as plan_module
from attngraph.ordering import bandwidth

from helpers import dense_attention, qkv, random_graph

assert_close = torch.testing.assert_close

_BUCKETS = torch.tensor([0, 2, 1, 0, 2, 2, 1, 0, 1, 0, 0, 2, 3] * 7)
MASKS = {
    "full": lambda: ag.masks.full(37),
    "causal": lambda: ag.masks.causal(50),
    "sliding_window": lambda: ag.masks.sliding_window(83, 9),
    "sliding_window-causal": lambda: ag.masks.sliding_window(83, 9, causal=True),
    "dilated_window": lambda: ag.masks.dilated_window(71, 4, 1),
    "dilated_block": lambda: ag.masks.dilated_block(80, 16, 1),
    "global_tokens": lambda: ag.masks.global_tokens(65, [0, 17, 64]),
    "random": lambda: ag.masks.random(70, 6, seed=0),
    "longformer": lambda: ag.masks.longformer(96, 5, [0, 50, 95]),
    "longformer-causal": lambda: ag.masks.longformer(96, 5, [0, 50], causal=True),
    "bigbird": lambda: ag.masks.bigbird(96, 8),
    "block_sparse": lambda: ag.masks.block_sparse(torch.tensor([[1, 0, 1], [0, 1, 0],
                                                                 [1, 1, 0]]), 11),
    "fixed": lambda: ag.masks.fixed(64, 8, num_local_blocks=3),
    "strided": lambda: ag.masks.strided(60, 7),
    "document": lambda: ag.masks.document([5, 0, 37, 19]),
    "hash_buckets": lambda: ag.masks.hash_buckets(_BUCKETS),
    "hash_buckets-strict": lambda: ag.masks.hash_buckets(_BUCKETS, causal=True, strict=True),
    "qk_drop": lambda: ag.masks.qk_drop(_BUCKETS > 0, _BUCKETS != 1),
    "window+random": lambda: ag.masks.sliding_window(90, 6) | ag.masks.random(90, 3, seed=1),
}
DENSITIES = {"all-tiles": 0.0, "measured": None, "mid": 0.3, "all-edges": 2.0}


def grads(out, lse, inputs, seed=1):
    """Gradients of a random linear function of out and of the finite lse."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    wl = torch.randn(lse.shape, generator=gen, dtype=lse.dtype)
    loss = (out * w).sum() + (torch.where(torch.isinf(lse), 0.0, lse) * wl).sum()
    return torch.autograd.grad(loss, inputs)


@pytest.fixture(autouse=True, params=["flash", "matmul"])
def engine(request, monkeypatch):
    """Every test runs on both engines of the dense tiles: ATen's CPU flash kernel and the
    batched matmuls it falls back to (the latter taken by :func:`check_equal`'s value head
    size unlike the key's, and elsewhere by switching the flash kernel off)."""
    flash = request.param == "flash"
    monkeypatch.setattr(ranges, "USE_FLASH", flash)
    return request.param


def check_equal(g, plan, *, H=4, H_kv=2, D=8, D_v=None, bias_heads=None, scale=0.37):
    if D_v is None:
        D_v = D if ranges.USE_FLASH else 5
    q, k, v = qkv(g.num_dst, g.num_src, H, H_kv, D, D_v)
    inputs = [q, k, v]
    bias = None
    if bias_heads:
        gen = torch.Generator().manual_seed(3)
        bias = torch.randn(g.num_edges, bias_heads, generator=gen,
                           dtype=torch.float64).requires_grad_()
        inputs.append(bias)
    out, lse = tiles.attention(q, k, v, g, scale, bias, plan=plan)
    ref, ref_lse = chunked.attention(q, k, v, g, scale, bias)
    assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    assert_close(lse, ref_lse, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads(out, lse, inputs), grads(ref, ref_lse, inputs)):
        assert_close(a, b, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("density", list(DENSITIES), ids=list(DENSITIES))
@pytest.mark.parametrize("name", list(MASKS), ids=list(MASKS))
def test_every_mask_family_equals_per_edge(name, density):
    g = MASKS[name]()
    plan = g.tile_plan(16, min_density=DENSITIES[density])
    check_equal(g, plan, bias_heads=2 if name.startswith("longformer") else None)


@pytest.mark.parametrize("bias", [None, "E", "EH"], ids=["no-bias", "bias-E", "bias-EH"])
@pytest.mark.parametrize("heads", [(4, 4), (4, 1), (6, 2)], ids=["MHA", "MQA", "GQA"])
def test_bias_and_head_groups(heads, bias):
    g = ag.masks.longformer(77, 6, [0, 40])
    check_equal(g, g.tile_plan(8, min_density=0.05), H=heads[0], H_kv=heads[1],
                bias_heads={None: None, "E": 1, "EH": heads[0]}[bias])


@pytest.mark.parametrize("block", [(8, 8), (16, 4), (5, 12)], ids=["8x8", "16x4", "5x12"])
def test_bipartite_and_rectangular_tiles(block):
    mask, g = random_graph(45, 61, p=0.4, seed=2, empty_rows=(3, 44), full_rows=(10,))
    plan = g.tile_plan(block[0], block_k=block[1], min_density=0.2)
    assert plan.num_tiles and plan.num_residual_edges
    check_equal(g, plan, bias_heads=4)


def test_long_rows_are_cut_in_runs_and_merged(monkeypatch):
    """A global query's row spans more tiles than one run holds: runs merge by lse."""
    monkeypatch.setattr(plan_module, "SEGMENT_TILES", 3)
    monkeypatch.setattr(chunks, "MAX_TILE_ELEMENTS", 4 * 8 * 8 * 2)    # two runs' tiles
    g = ag.masks.longformer(150, 4, [0, 75, 149])
    plan = tiles.build_plan(g, 8, min_density=0.0)
    assert int(plan.segments_per_block.max()) > 2
    assert len({L for L, *_ in plan.segments}) > 1
    check_equal(g, plan, bias_heads=1)


def test_the_flash_engine_serves_tiles_on_cpu(monkeypatch):
    """Where the value head size equals the key's, CPU tiles run on the flash kernel."""
    calls = []

    def counted(q, v):
        ops = ranges.flash_ops(q, v)
        if ops is None:
            return None
        return tuple((lambda *a, op=op, **kw: calls.append(op) or op(*a, **kw)) for op in ops)

    monkeypatch.setattr(tiles, "flash_ops", counted)
    g = ag.masks.sliding_window(64, 5)
    q, k, v = qkv(64, 64, 2, 2, 4)
    plan = g.tile_plan(8, min_density=0.0)
    tiles.attention(q, k, v, g, 0.5, plan=plan)[0].sum().backward()
    runs = sum(1 for _ in tiles._chunks(plan, 1, torch.float64))   # H / H_kv mask heads
    assert len(calls) == (2 * runs if ranges.USE_FLASH else 0)


def test_minus_inf_bias_on_tile_edges():
    g = ag.masks.sliding_window(40, 3)
    q, k, v = qkv(40, 40, 2, 2, 4)
    bias = torch.zeros(g.num_edges, dtype=torch.float64)
    bias[g.dst == 7] = float("-inf")                 # query 7 loses every edge
    bias[::5] = float("-inf")
    out, lse = tiles.attention(q, k, v, g, 0.5, bias.unsqueeze(-1),
                               plan=g.tile_plan(8, min_density=0.0))
    ref, ref_lse = chunked.attention(q, k, v, g, 0.5, bias.unsqueeze(-1))
    assert torch.isneginf(lse[7]).all() and (out[7] == 0).all()
    assert_close(out, ref)
    assert_close(lse, ref_lse)
    assert all(torch.isfinite(t).all() for t in grads(out, lse, (q, k, v)))


def test_empty_graph_and_rows_without_edges():
    g = ag.TokenGraph(torch.zeros(2, 0, dtype=torch.long), 20)
    plan = g.tile_plan(8, min_density=0.0)
    assert plan.num_tiles == 0 and plan.num_edges == 0
    q, k, v = qkv(20, 20, 2, 1, 4)
    out, lse = tiles.attention(q, k, v, g, 1.0, plan=plan)
    assert (out == 0).all() and torch.isneginf(lse).all()


def test_against_dense_oracle_through_graph_attention():
    mask, g = random_graph(50, 50, p=0.6, seed=5, empty_rows=(0, 49))
    q, k, v = qkv(50, 50, 4, 2, 8)
    out, lse = ag.graph_attention(q, k, v, g, return_lse=True, backend="tiles")
    ref, ref_lse = dense_attention(q, k, v, mask)
    assert_close(out, ref)
    assert_close(lse, ref_lse)


def test_batched_sequences_share_the_plan():
    g = ag.masks.bigbird(64, 8)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 64, 4, 8, generator=gen, dtype=torch.float64,
                           requires_grad=True) for _ in range(3))
    bias = torch.randn(g.num_edges, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    out, lse = ag.graph_attention(q, k, v, g, edge_bias=bias, return_lse=True,
                                  backend="tiles")
    ref, ref_lse = ag.graph_attention(q, k, v, g, edge_bias=bias, return_lse=True,
                                      backend="torch")
    assert_close(out, ref)
    assert_close(lse, ref_lse)
    for a, b in zip(grads(out, lse, (q, k, v, bias)), grads(ref, ref_lse, (q, k, v, bias))):
        assert_close(a, b)


def test_gradcheck_tiny():
    g = ag.masks.sliding_window(11, 2) | ag.masks.global_tokens(11, [5])
    plan = g.tile_plan(4, min_density=0.5)
    assert plan.num_tiles and plan.num_residual_edges
    q, k, v = qkv(11, 11, 2, 1, 3)
    bias = torch.randn(g.num_edges, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v, b: tiles.attention(q, k, v, g, 0.7, b, plan=plan), (q, k, v, bias))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_low_precision_within_twice_per_edge_error(dtype):
    g = ag.masks.longformer(130, 12, [0, 64])
    q, k, v = qkv(130, 130, 4, 2, 16)
    gold, _ = chunked.attention(q, k, v, g, 0.25)
    low = [t.detach().to(dtype) for t in (q, k, v)]
    err_tiles = (tiles.attention(*low, g, 0.25, plan=g.tile_plan(32, min_density=0.0))[0]
                 .double() - gold).abs().max()
    err_edges = (chunked.attention(*low, g, 0.25)[0].double() - gold).abs().max()
    assert err_tiles <= 2 * err_edges + 1e-6


# ------------------------------------------------------------------ the plan itself
@pytest.mark.parametrize("name", ["bigbird", "window+random", "hash_buckets", "strided"])
def test_plan_partitions_the_edges_exactly(name):
    g = MASKS[name]()
    plan = g.tile_plan(8, min_density=0.1, order=None)
    assert plan.num_tile_edges + plan.num_residual_edges == g.num_edges
    assert plan.num_full + plan.num_partial == plan.num_tiles
    assert int(plan.tile_edge_count.sum()) == plan.num_tile_edges
    assert (plan.tile_edge_count >= 0.1 * 64).all()
    # the tiles' masks and the residual edges rebuild the mask
    dense = torch.zeros(plan.num_q_blocks * 8, plan.num_k_blocks * 8, dtype=torch.bool)
    for qb, kb, mi in zip(plan.tile_q.tolist(), plan.tile_k.tolist(),
                          plan.mask_index.tolist()):
        dense[qb * 8:qb * 8 + 8, kb * 8:kb * 8 + 8] = plan.masks[mi]
    dense = dense[:g.num_dst, :g.num_src]
    dense[plan.residual.dst, plan.residual.src] = True
    assert torch.equal(dense, g.to_dense())
    # no residual edge lies on a dense tile
    tile_keys = plan.tile_q * plan.num_k_blocks + plan.tile_k
    residual_keys = (plan.residual.dst // 8) * plan.num_k_blocks + plan.residual.src // 8
    assert not torch.isin(residual_keys, tile_keys).any()
    on_tiles = dense.clone()
    on_tiles[plan.residual.dst, plan.residual.src] = False
    assert int(on_tiles.sum()) == plan.num_tile_edges


def test_plan_cached_and_block_size_chosen_by_cost():
    g = ag.masks.bigbird(1024, 64)
    assert g.tile_plan(64) is g.tile_plan(64)
    auto = g.tile_plan()
    assert auto.block_q == 64           # bigbird's own blocks: full tiles, nothing wasted
    assert auto.cost() == min(g.tile_plan(b).cost() for b in tiles.BLOCK_SIZES)
    assert auto.num_full == auto.num_tiles and auto.tile_fraction == 1.0
    assert "tiles=" in repr(auto) and auto.summary()["tile_fraction"] == 1.0


def test_measured_threshold_sends_sparse_tiles_to_edges():
    g = ag.masks.random(1024, 16, seed=0)          # 16 of 1024 keys per row: 1.6 %
    plan = g.tile_plan(128)
    per_tile = 1024 * 16 / plan.num_q_blocks / plan.num_k_blocks
    assert per_tile / (128 * 128) < 1 / tiles.EDGE_COST_CELLS
    assert plan.num_tiles == 0 and plan.tile_fraction == 0.0


def test_bad_plan_arguments():
    g = ag.masks.causal(10)
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        g.tile_plan(0)
    with pytest.raises(ValueError, match="min_density"):
        g.tile_plan(4, min_density=-1)
    with pytest.raises(ValueError, match="order must be"):
        g.tile_plan(4, order="rcm")
    with pytest.raises(ValueError, match="not a permutation"):
        g.tile_plan(4, order=torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError, match=r"shape \[10\]"):
        g.order = torch.arange(9)


# ------------------------------------------------------------------ dispatch
def _inputs(g, dtype=torch.float32):
    from attngraph.ops.dispatch import Inputs

    return Inputs(torch.device("cpu"), dtype, 64, 64, False, graph=g)


def test_auto_takes_tiles_where_the_plan_pays():
    from attngraph.ops.dispatch import explain, select_backend

    assert select_backend("auto", _inputs(ag.masks.sliding_window(1024, 64))).name == "tiles"
    rnd = ag.masks.random(1024, 8, seed=0)
    assert select_backend("auto", _inputs(rnd)).name == "torch"
    # decided from tile counts: no plan was built for the graph it does not pay on
    assert not any(k[0] == "tile_plan" for k in rnd.caches.plan)
    assert "dense tiles" in explain("auto", _inputs(ag.masks.bigbird(512, 64)))


def test_auto_leaves_the_tiles_choice_to_the_op_under_compile(monkeypatch):
    """Traced, auto cannot count tiles: it takes the tiles operator, which makes the
    choice when it runs (tests/test_compile.py runs it)."""
    from attngraph.ops.dispatch import explain, select_backend

    rnd = ag.masks.random(1024, 8, seed=0)
    eager = explain("auto", _inputs(rnd))
    assert eager.startswith("torch") and "torch here" in eager
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert select_backend("auto", _inputs(ag.masks.sliding_window(1024, 64))).name == "tiles"
    assert select_backend("auto", _inputs(rnd)).name == "tiles"
    assert not any(k[0] == "tile_plan" for k in rnd.caches.plan)
    assert select_backend("tiles", _inputs(ag.masks.sliding_window(1024, 64))).name == "tiles"


# ------------------------------------------------------------------ token orders
def test_hash_buckets_compute_reordered_and_map_back():
    gen = torch.Generator().manual_seed(0)
    buckets = torch.randint(0, 8, (300,), generator=gen)
    g = ag.masks.hash_buckets(buckets)
    assert g.order is not None
    plan, plain = g.tile_plan(16, min_density=0.0), g.tile_plan(16, min_density=0.0,
                                                                order=None)
    assert plan.order is not None and plain.order is None
    assert plan.num_tiles < plain.num_tiles / 3      # block diagonal after reordering
    check_equal(g, plan, bias_heads=4)
    check_equal(g, plain)


def test_hash_buckets_cross_attention_orders_queries_and_keys():
    gen = torch.Generator().manual_seed(1)
    qb, kb = torch.randint(0, 5, (90,), generator=gen), torch.randint(0, 5, (70,),
                                                                        generator=gen)
    g = ag.masks.hash_buckets(qb, kb, causal=False)
    assert isinstance(g.order, tuple)
    check_equal(g, g.tile_plan(8, min_density=0.0), bias_heads=1)


def test_permute_relabels_tokens_and_edges():
    g = ag.masks.longformer(40, 3, [0, 9])
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    gp, edge_perm = g.permute(perm, return_edge_perm=True)
    assert torch.equal(gp.to_dense(), g.to_dense()[perm][:, perm])
    assert torch.equal(g.src[edge_perm], perm[gp.src])
    assert torch.equal(g.dst[edge_perm], perm[gp.dst])
    q, k, v = qkv(40, 40, 2, 2, 4, grad=False)
    bias = torch.randn(g.num_edges, 2, dtype=torch.float64)
    out = ag.graph_attention(q, k, v, g, edge_bias=bias)
    out_p = ag.graph_attention(q[perm], k[perm], v[perm], gp, edge_bias=bias[edge_perm])
    assert_close(out_p, out[perm])


def test_permute_bipartite_needs_both_orders():
    mask, g = random_graph(6, 9, p=0.5)
    with pytest.raises(ValueError, match="src_perm"):
        g.permute(torch.arange(6))
    gp = g.permute(torch.arange(6).flip(0), torch.arange(9).flip(0))
    assert torch.equal(gp.to_dense(), mask.flip(0).flip(1))


def test_reorder_rcm_recovers_a_shuffled_band():
    n = 400
    band = ag.masks.sliding_window(n, 4)
    shuffle = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    g = band.permute(shuffle)
    assert bandwidth(g) > 100
    perm = ag.reorder(g)
    assert torch.equal(torch.sort(perm).values, torch.arange(n))
    assert bandwidth(g.permute(perm)) <= 2 * 4
    g.order = perm
    assert g.tile_plan(16, min_density=0.0).num_tiles < g.tile_plan(
        16, min_density=0.0, order=None).num_tiles / 4
    check_equal(g, g.tile_plan(16))


def test_reorder_by_key_and_errors():
    g = ag.masks.random(12, 3, seed=0)
    key = torch.tensor([2, 0, 1] * 4)
    perm = ag.reorder(g, key)
    assert torch.equal(key[perm], torch.sort(key).values)
    with pytest.raises(ValueError, match="rcm"):
        ag.reorder(g, "metis")
    with pytest.raises(ValueError, match="integer tensor of shape"):
        ag.reorder(g, torch.zeros(5, dtype=torch.long))


def test_setting_order_drops_cached_plans():
    g = ag.masks.sliding_window(64, 4)
    first = g.tile_plan(8)
    g.order = torch.arange(64).flip(0)
    assert g.tile_plan(8) is not first and g.tile_plan(8).order is not None
    g.order = None
    assert g.tile_plan(8).order is None


# ------------------------------------------------------------------ pictures
def test_plot_mask_draws_tiles_and_residual_edges():
    import matplotlib

    matplotlib.use("Agg")
    g = MASKS["window+random"]()
    ax = ag.viz.plot_mask(g, tiles=g.tile_plan(16, min_density=0.2))
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("dense tiles" in t for t in labels) and any("per edge" in t for t in labels)
    assert len(ax.collections) == 1                  # the tile outlines
    with pytest.raises(TypeError, match="TilePlan"):
        ag.viz.plot_mask(g, tiles="yes")
    with pytest.raises(ValueError, match="of this graph"):
        ag.viz.plot_mask(g, tiles=ag.masks.causal(5).tile_plan(4))


# ------------------------------------------------------------------ random plans, memory
@settings(max_examples=30, deadline=None)
@given(n_dst=st.integers(1, 40), n_src=st.integers(1, 40), p=st.floats(0.0, 1.0),
       block_q=st.integers(1, 12), block_k=st.integers(1, 12),
       min_density=st.floats(0.0, 1.2), heads=st.sampled_from([(1, 1), (2, 1), (4, 2)]),
       bias=st.booleans(), seed=st.integers(0, 10_000))
def test_property_random_plans(n_dst, n_src, p, block_q, block_k, min_density, heads, bias,
                               seed):
    mask, g = random_graph(n_dst, n_src, p=p, seed=seed)
    plan = g.tile_plan(block_q, block_k=block_k, min_density=min_density)
    check_equal(g, plan, H=heads[0], H_kv=heads[1], D=3, D_v=2,
                bias_heads=heads[0] if bias else None)


def test_saved_tensors_are_per_token_not_per_edge():
    """Autograd keeps q, k, v and the blocked out / lse: nothing per edge or per cell."""
    n, H, D, block = 256, 2, 8, 64
    g = ag.masks.sliding_window(n, 40)
    q, k, v = qkv(n, n, H, H, D)
    plan = g.tile_plan(block, min_density=0.0)
    assert plan.num_residual_edges == 0
    out, lse = tiles.attention(q, k, v, g, 0.3, plan=plan)
    node = out.grad_fn
    while type(node).__name__ != "_TileAttentionBackward":
        node = node.next_functions[0][0]
    saved = sum(t.numel() for t in node.saved_tensors if t is not None)
    assert saved == 4 * n * H * D + n * H
    assert saved < g.num_edges * H           # less than one score per edge and head


# ------------------------------------------------------------------ the operator
@pytest.mark.parametrize("residual", ["torch", "cupy"])
def test_operator_backward_adds_the_parts_shares(residual, monkeypatch):
    """The tile operator's backward runs the tiles' and the residual's passes from the
    merged out and lse (on the fused kernels too, emulated here): gradients of q, k, v and
    a bias equal the per-edge backend's, with an empty row and a reordered hash graph."""
    monkeypatch.setenv("ATTNGRAPH_CUDA_EMULATE", "1")
    buckets = torch.randint(0, 3, (70,), generator=torch.Generator().manual_seed(2))
    mask = (ag.masks.sliding_window(70, 6) | ag.masks.random(70, 2, seed=3)).to_dense()
    mask[9] = False
    for g in (ag.TokenGraph.from_dense(mask), ag.masks.hash_buckets(buckets)):
        q, k, v = qkv(70, 70, 4, 2, 8, dtype=torch.float32, grad=False)
        bias = torch.randn(g.num_edges, 4, generator=torch.Generator().manual_seed(1))
        plan = g.tile_plan()
        assert plan.num_tiles and plan.num_residual_edges
        leaves = [t.clone().requires_grad_() for t in (q, k, v, bias)]
        out, lse = tiles.attention(*leaves[:3], g, 0.4, leaves[3], residual=residual)
        want_leaves = [t.clone().requires_grad_() for t in (q, k, v, bias)]
        want, want_lse = chunked.attention(*want_leaves[:3], g, 0.4, want_leaves[3])
        torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(lse, want_lse, atol=2e-5, rtol=1e-4)
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
        dlse = torch.randn(lse.shape, generator=torch.Generator().manual_seed(5))
        dlse[9] = 0.0                                   # the empty row's lse is -inf
        got = torch.autograd.grad((out * dout).sum() + (lse.nan_to_num(0, 0, 0) * dlse).sum(),
                                  leaves)
        ref = torch.autograd.grad((want * dout).sum()
                                  + (want_lse.nan_to_num(0, 0, 0) * dlse).sum(), want_leaves)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4)
