import math

import pytest
import torch
from torch import nn
from torch_geometric import EdgeIndex
from torch_geometric.nn import TransformerConv

import attngraph as ag
from attngraph import TokenGraph
from attngraph.nn import GraphAttentionConv, SparseSelfAttention
from attngraph.nn import conv as conv_module

pytestmark = pytest.mark.filterwarnings("ignore:Sparse (CSR|invariant).*:UserWarning")

F64 = torch.float64


def assert_close(a, b, atol=1e-12, rtol=1e-10):
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


# ---------------------------------------------------------------------- graph data
def random_edges(num_src, num_dst, num_edges, seed=0, *, empty_targets=(0,)):
    """Random ``[2, E]`` edges in random order, with duplicates and self loops, and no edge
    into ``empty_targets``."""
    gen = torch.Generator().manual_seed(seed)
    src = torch.randint(0, num_src, (num_edges,), generator=gen)
    dst = torch.randint(0, num_dst, (num_edges,), generator=gen)
    keep = ~torch.isin(dst, torch.tensor(list(empty_targets), dtype=torch.long))
    ei = torch.stack([src[keep], dst[keep]])
    key = ei[1] * num_src + ei[0]
    assert torch.unique(key).numel() < key.numel(), "the data should hold duplicate edges"
    return ei


def features(*shape, seed=1, grad=True):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=F64).requires_grad_(grad)


def pair(seed=0, **kwargs):
    """A TransformerConv and a GraphAttentionConv with equal float64 weights."""
    torch.manual_seed(seed)
    ref = TransformerConv(**kwargs).double()
    torch.manual_seed(seed)
    ours = GraphAttentionConv(**kwargs).double()
    return ref, ours


def param_grads(module, out, seed=7):
    gen = torch.Generator().manual_seed(seed)
    dout = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    params = [p for p in module.parameters()]
    return torch.autograd.grad(out, params, dout, retain_graph=True, allow_unused=True)


# id: (constructor kwargs, bipartite)
CONFIGS = {
    "h1": (dict(heads=1), False),
    "h3-concat": (dict(heads=3), False),
    "h3-mean": (dict(heads=3, concat=False), False),
    "h3-beta": (dict(heads=3, beta=True), False),
    "h3-mean-beta": (dict(heads=3, concat=False, beta=True), False),
    "edge4": (dict(heads=3, edge_dim=4), False),
    "edge4-mean-beta": (dict(heads=3, concat=False, beta=True, edge_dim=4), False),
    "no-root": (dict(heads=3, root_weight=False), False),
    "no-root-beta-edge4": (dict(heads=1, root_weight=False, beta=True, edge_dim=4), False),
    "no-bias": (dict(heads=3, bias=False, edge_dim=4), False),
    "bipartite": (dict(heads=3), True),
    "bipartite-edge4-mean-beta": (dict(heads=3, concat=False, beta=True, edge_dim=4), True),
}


def make_inputs(bipartite, edge_dim, num_edges=90, seed=0):
    n_src, n_dst, f_src, f_dst = (13, 9, 6, 5) if bipartite else (13, 13, 6, 6)
    ei = random_edges(n_src, n_dst, num_edges, seed)
    if bipartite:
        x = (features(n_src, f_src, seed=seed + 1), features(n_dst, f_dst, seed=seed + 2))
        in_channels = (f_src, f_dst)
    else:
        x = features(n_src, f_src, seed=seed + 1)
        in_channels = f_src
    ea = features(ei.size(1), edge_dim, seed=seed + 3) if edge_dim else None
    return x, ei, ea, in_channels


def leaves(x, ea):
    ts = list(x) if isinstance(x, tuple) else [x]
    return ts + ([ea] if ea is not None else [])


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("config", list(CONFIGS), ids=list(CONFIGS))
def test_matches_transformer_conv(config, fused):
    kwargs, bipartite = CONFIGS[config]
    x, ei, ea, in_channels = make_inputs(bipartite, kwargs.get("edge_dim"))
    ref, ours = pair(in_channels=in_channels, out_channels=4, **kwargs)
    ours.fused = fused
    out_ref, (ei_ref, a_ref) = ref(x, ei, ea, return_attention_weights=True)
    out, (ei_out, alpha) = ours(x, ei, ea, return_attention_weights=True)
    assert ei_out is ei and ei_ref is ei
    H, C = kwargs["heads"], 4
    n_dst = (x[1] if bipartite else x).size(0)
    assert out.shape == (n_dst, H * C if kwargs.get("concat", True) else C)
    assert alpha.shape == (ei.size(1), H)
    assert_close(out, out_ref)
    assert_close(alpha, a_ref)
    # Gradients of every parameter and input, through the output and the weights.
    loss_ref = out_ref.square().sum() + (a_ref * torch.arange(a_ref.numel()).view_as(a_ref)).sum()
    loss = out.square().sum() + (alpha * torch.arange(alpha.numel()).view_as(alpha)).sum()
    g_ref = torch.autograd.grad(loss_ref, list(ref.parameters()) + leaves(x, ea),
                                allow_unused=True)  # lin_skip is unused without root_weight
    g = torch.autograd.grad(loss, list(ours.parameters()) + leaves(x, ea), allow_unused=True)
    for a, b in zip(g, g_ref):
        assert (a is None) == (b is None)
        if a is not None:
            assert_close(a, b)


@pytest.mark.parametrize("edge_dim", [None, 4], ids=["no-edge-attr", "edge4"])
def test_fused_and_unfused_paths_agree(edge_dim):
    x, ei, ea, in_channels = make_inputs(False, edge_dim, num_edges=200, seed=3)
    _, ours = pair(in_channels=in_channels, out_channels=5, heads=2, edge_dim=edge_dim,
                   beta=True)
    results = []
    for fused in (True, False):
        ours.fused = fused
        out, (_, alpha) = ours(x, ei, ea, return_attention_weights=True)
        results.append((out, alpha, param_grads(ours, out)))
    (o1, a1, g1), (o2, a2, g2) = results
    assert_close(o1, o2)
    assert_close(a1, a2)
    for a, b in zip(g1, g2):
        assert_close(a, b)


def test_fused_path_calls_graph_attention_and_unfused_does_not(monkeypatch):
    calls = []
    real = conv_module.graph_attention

    def spy(*args, **kwargs):
        calls.append(args[3])
        return real(*args, **kwargs)

    monkeypatch.setattr(conv_module, "graph_attention", spy)
    x, ei, _, _ = make_inputs(False, None)
    _, ours = pair(in_channels=6, out_channels=4, heads=2)
    ours(x, ei)
    assert len(calls) == 1 and isinstance(calls[0], TokenGraph)
    ours.fused = False
    ours(x, ei)
    assert len(calls) == 1


def test_state_dict_loads_either_way():
    kw = dict(in_channels=(6, 5), out_channels=4, heads=3, beta=True, edge_dim=2)
    ref, ours = pair(**kw)
    # The same seed gives the same weights: same submodules, same init order.
    assert list(ref.state_dict()) == list(ours.state_dict())
    for (k, a), b in zip(ref.state_dict().items(), ours.state_dict().values()):
        assert torch.equal(a, b), k
    torch.manual_seed(5)
    other = TransformerConv(**kw).double()
    ours.load_state_dict(other.state_dict(), strict=True)
    x = (features(7, 6), features(4, 5))
    ei = torch.tensor([[0, 1, 6, 2, 2], [0, 0, 3, 1, 3]])
    ea = features(5, 2)
    assert_close(ours(x, ei, ea), other(x, ei, ea))
    torch.manual_seed(6)
    mine = GraphAttentionConv(**kw).double()
    ref.load_state_dict(mine.state_dict(), strict=True)
    assert_close(ref(x, ei, ea), mine(x, ei, ea))


def test_repr():
    assert repr(GraphAttentionConv(16, 8, heads=2)) == "GraphAttentionConv(16, 8, heads=2)"
    assert repr(GraphAttentionConv((16, 4), 8)) == "GraphAttentionConv((16, 4), 8, heads=1)"


# ---------------------------------------------------------------------- input kinds
def unique_edges(n, num_edges, seed):
    """Random edges without duplicates, in random order."""
    ei = torch.unique(random_edges(n, n, num_edges, seed), dim=1)
    return ei[:, torch.randperm(ei.size(1), generator=torch.Generator().manual_seed(seed))]


INPUT_KINDS = ["int64", "int32", "edge_index_unsorted", "edge_index_sorted_by_col",
               "token_graph", "sparse_coo", "sparse_csr", "sparse_csc"]


def as_kind(kind, ei, n):
    if kind == "int64":
        return ei
    if kind == "int32":
        return ei.int()
    if kind == "edge_index_unsorted":
        return EdgeIndex(ei, sparse_size=(n, n))
    if kind == "edge_index_sorted_by_col":
        return EdgeIndex(ei, sparse_size=(n, n)).sort_by("col")[0]
    if kind == "token_graph":
        return TokenGraph(ei, num_nodes=n)
    adj = torch.sparse_coo_tensor(ei.flip(0), torch.ones(ei.size(1), dtype=F64), (n, n))
    adj = adj.coalesce()
    return {"sparse_coo": adj, "sparse_csr": adj.to_sparse_csr(),
            "sparse_csc": adj.to_sparse_csc()}[kind]


def edges_of(kind, given):
    """``[2, E]`` (src, dst) in the order a layer reports alpha for input ``given``."""
    if isinstance(given, TokenGraph):
        return given.edge_index.as_tensor()
    if kind.startswith("sparse"):
        coo = given.to_sparse_coo().coalesce() if kind != "sparse_coo" else given
        idx = coo.indices()
        if kind == "sparse_csc":  # column-major: sorted by source
            order = torch.argsort(idx[1] * given.size(0) + idx[0])
            idx = idx[:, order]
        return idx.flip(0)
    return given.as_tensor() if isinstance(given, EdgeIndex) else given.long()


@pytest.mark.parametrize("edge_dim", [None, 3], ids=["no-edge-attr", "edge3"])
@pytest.mark.parametrize("kind", INPUT_KINDS, ids=INPUT_KINDS)
def test_every_input_kind_gives_the_same_result(kind, edge_dim):
    n = 11
    ei = unique_edges(n, 70, seed=4)
    x = features(n, 6)
    ref, ours = pair(in_channels=6, out_channels=4, heads=2, edge_dim=edge_dim)
    given = as_kind(kind, ei, n)
    order = edges_of(kind, given)
    ea = features(order.size(1), edge_dim) if edge_dim else None
    out_ref, (_, a_ref) = ref(x, order, ea, return_attention_weights=True)
    out, (ret, alpha) = ours(x, given, ea, return_attention_weights=True)
    assert_close(out, out_ref)
    assert_close(alpha, a_ref)
    if kind == "token_graph":
        assert ret is given.edge_index
    else:
        assert ret is given


@pytest.mark.parametrize("kind", ["sparse_coo", "sparse_csr"])
def test_sparse_adjacency_matches_pyg_on_the_same_input(kind):
    n = 10
    ei = unique_edges(n, 50, seed=2)
    x = features(n, 6)
    ref, ours = pair(in_channels=6, out_channels=3, heads=2)
    adj = as_kind(kind, ei, n)
    out_ref, (r_ref, a_ref) = ref(x, adj, return_attention_weights=True)
    out, (r, alpha) = ours(x, adj, return_attention_weights=True)
    assert r is adj and r_ref is adj
    assert_close(out, out_ref)
    assert_close(alpha, a_ref)


@pytest.mark.parametrize("edge_dim", [None, 2], ids=["no-edge-attr", "edge2"])
def test_duplicate_edges_count_once_per_copy_as_in_pyg(edge_dim):
    x = features(4, 3)
    ei = torch.tensor([[1, 1, 1, 2, 0, 2], [0, 0, 0, 0, 3, 3]])  # 1 -> 0 three times
    ea = features(6, edge_dim) if edge_dim else None
    ref, ours = pair(in_channels=3, out_channels=2, heads=2, edge_dim=edge_dim)
    out_ref, (_, a_ref) = ref(x, ei, ea, return_attention_weights=True)
    out, (_, alpha) = ours(x, ei, ea, return_attention_weights=True)
    assert_close(out, out_ref)
    assert_close(alpha, a_ref)
    if edge_dim is None:
        assert_close(alpha[:3], alpha[:1].expand(3, -1))


def test_no_edges_and_isolated_targets():
    x = features(5, 4)
    ref, ours = pair(in_channels=4, out_channels=3, heads=2, edge_dim=2)
    ei = torch.empty(2, 0, dtype=torch.long)
    ea = features(0, 2)
    out, (_, alpha) = ours(x, ei, ea, return_attention_weights=True)
    assert alpha.shape == (0, 2)
    assert_close(out, ref(x, ei, ea))
    ei = torch.tensor([[1, 2], [0, 0]])  # only node 0 receives messages
    ea = features(2, 2)
    assert_close(ours(x, ei, ea), ref(x, ei, ea))


def test_raw_edge_attr_without_edge_dim_is_added_to_values_as_in_pyg():
    x, ei, _, _ = make_inputs(False, None)
    ea = features(ei.size(1), 2, 4)  # broadcasts against the [E, H, C] values
    ref, ours = pair(in_channels=6, out_channels=4, heads=2)
    for fused in (True, False):
        ours.fused = fused
        assert_close(ours(x, ei, ea), ref(x, ei, ea))


# ---------------------------------------------------------------------- dropout, explain
def test_attention_dropout_in_training_only():
    x, ei, ea, _ = make_inputs(False, 4)
    ref, ours = pair(in_channels=6, out_channels=4, heads=2, edge_dim=4, dropout=0.5)
    ours.train()
    torch.manual_seed(11)
    a = ours(x, ei, ea)
    b = ours(x, ei, ea)
    assert not torch.allclose(a, b)
    # Same RNG stream, same alpha layout: exactly PyG's dropout.
    ref.train()
    torch.manual_seed(11)
    assert_close(a, ref(x, ei, ea))
    ours.eval()
    ref.eval()
    assert_close(ours(x, ei, ea), ours(x, ei, ea))
    assert_close(ours(x, ei, ea), ref(x, ei, ea))
    assert ours._use_fused()


def test_explain_mode_runs_the_message_path_like_pyg():
    x, ei, ea, _ = make_inputs(False, 4)
    ref, ours = pair(in_channels=6, out_channels=4, heads=2, edge_dim=4)
    mask = torch.rand(ei.size(1), generator=torch.Generator().manual_seed(0), dtype=F64)
    for m in (ref, ours):
        m.explain = True
        m._edge_mask = mask
    assert not ours._use_fused()
    assert_close(ours(x, ei, ea), ref(x, ei, ea))


def test_message_hooks_force_the_message_path():
    x, ei, _, _ = make_inputs(False, None)
    _, ours = pair(in_channels=6, out_channels=4, heads=2)
    seen = []
    handle = ours.register_message_forward_hook(lambda mod, inp, out: seen.append(out.shape))
    ours(x, ei)
    assert seen == [(ei.size(1), 2, 4)]
    handle.remove()
    assert ours._use_fused()


def test_fused_path_saves_no_per_edge_gathers():
    n, num_edges, H, C = 60, 3000, 2, 8
    ei = torch.randint(0, n, (2, num_edges), generator=torch.Generator().manual_seed(0))
    x = features(n, 8)
    ref, ours = pair(in_channels=8, out_channels=C, heads=H)

    def saved_bytes(module):
        total = []

        def pack(t):
            total.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            module(x, ei)
        return sum(total)

    per_edge_tensor = num_edges * H * C * 8
    assert saved_bytes(ref) > 3 * per_edge_tensor
    assert saved_bytes(ours) < per_edge_tensor


# ---------------------------------------------------------------------- errors
def test_conv_input_errors():
    x, ei, _, _ = make_inputs(False, None)
    _, ours = pair(in_channels=6, out_channels=4, heads=2, edge_dim=3)
    with pytest.raises(ValueError, match="edge_dim=3: pass edge_attr"):
        ours(x, ei)
    with pytest.raises(ValueError, match=r"edge_attr must have shape \[E, edge_dim\]"):
        ours(x, ei, features(ei.size(1), 2))
    ea = features(ei.size(1), 3)
    with pytest.raises(ValueError, match=r"shape \[2, E\]"):
        ours(x, ei[:1], ea)
    with pytest.raises(TypeError, match="integers"):
        ours(x, ei.double(), ea)
    with pytest.raises(ValueError, match="outside"):
        ours(x, ei + 100, ea)
    with pytest.raises(ValueError, match="the graph has 20 source nodes but x_src has 13 rows"):
        ours(x, TokenGraph(ei, num_nodes=20), ea)
    with pytest.raises(TypeError, match="TokenGraph"):
        ours(x, ei.tolist(), ea)
    with pytest.raises(TypeError, match="pair of tensors"):
        ours((x,), ei, ea)
    with pytest.raises(ValueError, match="source_to_target"):
        GraphAttentionConv(4, 4, flow="target_to_source")


# ---------------------------------------------------------------------- SparseSelfAttention
def full_graph(L):
    return TokenGraph.from_dense(torch.ones(L, L, dtype=torch.bool))


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_sparse_self_attention_equals_multihead_attention_on_full_graph(batched, bias):
    E, H, L = 12, 3, 7
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, bias=bias, batch_first=True).double()
    if bias:
        with torch.no_grad():  # MHA initialises biases to 0; make them matter
            mha.in_proj_bias.normal_()
            mha.out_proj.bias.normal_()
    layer = SparseSelfAttention.from_multihead_attention(mha)
    x = features(2, L, E) if batched else features(L, E)
    ref = mha(x, x, x, need_weights=False)[0]
    out = layer(x, full_graph(L))
    assert out.shape == x.shape
    assert_close(out, ref)
    gx_ref, gw_ref = torch.autograd.grad(ref.sum(), (x, mha.in_proj_weight))
    gx, *gw = torch.autograd.grad(out.sum(), (x, layer.q_proj.weight, layer.k_proj.weight,
                                              layer.v_proj.weight))
    assert_close(gx, gx_ref)
    assert_close(torch.cat(gw), gw_ref)


def dense_gqa_reference(layer, x, mask):
    """Dense masked GQA attention with the layer's weights; rows without keys give 0."""
    B, L, _ = x.shape
    H, H_kv, D = layer.num_heads, layer.num_kv_heads, layer.head_dim
    q = layer.q_proj(x).view(B, L, H, D).transpose(1, 2)
    k = layer.k_proj(x).view(B, L, H_kv, D).transpose(1, 2).repeat_interleave(H // H_kv, 1)
    v = layer.v_proj(x).view(B, L, H_kv, D).transpose(1, 2).repeat_interleave(H // H_kv, 1)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(D)
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num(0.0)
    o = (p @ v).transpose(1, 2).reshape(B, L, H * D)
    return layer.out_proj(o)


@pytest.mark.parametrize("num_kv_heads", [1, 2, 4], ids=["mqa", "gqa", "mha"])
def test_sparse_self_attention_gqa_against_dense_reference(num_kv_heads):
    L = 19
    torch.manual_seed(1)
    layer = SparseSelfAttention(16, 4, num_kv_heads=num_kv_heads).double()
    with torch.no_grad():
        layer.q_proj.bias.normal_()
        layer.out_proj.bias.normal_()
    assert layer.k_proj.weight.shape == (num_kv_heads * 4, 16)
    mask = torch.rand(L, L, generator=torch.Generator().manual_seed(2)) < 0.3
    mask[3] = False  # a token without keys gets the output projection's bias
    x = features(3, L, 16)
    out = layer(x, TokenGraph.from_dense(mask))
    ref = dense_gqa_reference(layer, x, mask)
    assert_close(out, ref)
    assert_close(out[:, 3], layer.out_proj.bias.expand(3, -1))
    params = list(layer.parameters())
    for a, b in zip(torch.autograd.grad(out.square().sum(), params + [x]),
                    torch.autograd.grad(ref.square().sum(), params + [x])):
        assert_close(a, b)


def test_sparse_self_attention_dropout(monkeypatch):
    L = 9
    torch.manual_seed(0)
    layer = SparseSelfAttention(8, 2, num_kv_heads=1, dropout=0.4).double()
    g = ag.TokenGraph.from_dense(torch.rand(L, L, generator=torch.Generator().manual_seed(1))
                                 < 0.5)
    x = features(2, L, 8)
    layer.eval()
    ref = layer(x, g)
    assert_close(layer(x, g), ref)
    layer.train()
    a, b = layer(x, g), layer(x, g)
    assert not torch.allclose(a, b) and not torch.allclose(a, ref)
    torch.autograd.grad(a.sum(), list(layer.parameters()))
    # The training path is the unfused stages: without dropout it equals the fused path.
    from attngraph.nn import attention

    monkeypatch.setattr(attention.F, "dropout", lambda input, *args, **kwargs: input)
    assert_close(layer(x, g), ref)


def test_sparse_self_attention_errors():
    layer = SparseSelfAttention(8, 2)
    g = full_graph(5)
    with pytest.raises(ValueError, match="last dimension 6 but embed_dim is 8"):
        layer(torch.randn(5, 6), g)
    with pytest.raises(ValueError, match=r"\[B, L, E\] or \[L, E\]"):
        layer(torch.randn(1, 2, 5, 8), g)
    with pytest.raises(TypeError, match="float"):
        layer(torch.ones(5, 8, dtype=torch.long), g)
    with pytest.raises(TypeError, match="TokenGraph"):
        layer(torch.randn(5, 8), torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="over the 4 tokens"):
        layer(torch.randn(4, 8), g)
    with pytest.raises(ValueError, match="over the 5 tokens"):
        layer(torch.randn(5, 8), TokenGraph(torch.tensor([[0], [0]]), num_src=6, num_dst=5))
    with pytest.raises(ValueError, match="divisible by num_heads"):
        SparseSelfAttention(10, 4)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        SparseSelfAttention(12, 4, num_kv_heads=3)
    with pytest.raises(ValueError, match="dropout"):
        SparseSelfAttention(8, 2, dropout=1.0)
    with pytest.raises(TypeError, match="num_heads must be an int"):
        SparseSelfAttention(8, 2.0)
    with pytest.raises(ValueError, match="kdim"):
        SparseSelfAttention.from_multihead_attention(nn.MultiheadAttention(8, 2, kdim=4))
    with pytest.raises(ValueError, match="add_bias_kv"):
        SparseSelfAttention.from_multihead_attention(
            nn.MultiheadAttention(8, 2, add_bias_kv=True))


def test_package_exports():
    assert ag.nn.GraphAttentionConv is GraphAttentionConv
    assert ag.nn.SparseSelfAttention is SparseSelfAttention
    assert "num_kv_heads=1" in repr(SparseSelfAttention(8, 2, num_kv_heads=1))


def test_single_node_with_a_self_loop():
    x = features(1, 3)
    ref, ours = pair(in_channels=3, out_channels=2, heads=2)
    ei = torch.tensor([[0], [0]], dtype=torch.int32)
    out, (_, alpha) = ours(x, ei, return_attention_weights=True)
    assert_close(out, ref(x, ei))
    assert_close(alpha, torch.ones(1, 2, dtype=F64))
