import pytest
import torch
from torch_geometric import EdgeIndex

from attngraph import TokenGraph, masks
from attngraph import chunks
from attngraph import graph as graph_module


def dense(n_dst, n_src, p, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n_dst, n_src, generator=gen) < p


def test_canonical_order_and_dedup():
    ei = torch.tensor([[2, 0, 1, 0, 2, 1], [1, 2, 1, 2, 0, 1]])
    g = TokenGraph(ei, 3)
    assert g.edge_index.tolist() == [[2, 1, 2, 0], [0, 1, 1, 2]]
    assert isinstance(g.edge_index, EdgeIndex)
    assert g.edge_index.is_sorted_by_col and g.edge_index.sparse_size() == (3, 3)
    assert g.num_edges == 4 and g.num_src == g.num_dst == 3
    assert g.ptr.tolist() == [0, 1, 3, 4]
    assert g.in_degree().tolist() == [1, 2, 1]
    assert g.out_degree().tolist() == [1, 1, 2]
    assert g.density == pytest.approx(4 / 9)


def test_num_nodes_inferred_and_isolated_nodes():
    g = TokenGraph(torch.tensor([[0, 3], [1, 1]]))
    assert g.num_src == g.num_dst == 4
    g = TokenGraph(torch.tensor([[0], [1]]), num_nodes=10)
    assert g.num_dst == 10 and g.in_degree().sum() == 1


def test_empty_graph():
    g = TokenGraph(torch.empty(2, 0, dtype=torch.long), 5)
    assert g.num_edges == 0 and g.ptr.tolist() == [0] * 6
    assert not g.to_dense().any()
    assert g.density == 0.0
    assert TokenGraph(torch.empty(2, 0, dtype=torch.long)).num_dst == 0


@pytest.mark.parametrize("shape", [(5, 5), (4, 9), (9, 4), (1, 1)], ids=str)
def test_dense_round_trip(shape):
    mask = dense(*shape, 0.4, 0)
    g = TokenGraph.from_dense(mask)
    assert torch.equal(g.to_dense(), mask)
    assert (g.num_dst, g.num_src) == shape
    g2 = TokenGraph(g.edge_index, num_src=shape[1], num_dst=shape[0])
    assert g2.equal(g)


def test_edge_index_round_trip_with_int32_and_edgeindex_input():
    mask = dense(13, 13, 0.3, 1)
    g = TokenGraph.from_dense(mask)
    ei32 = g.edge_index.as_tensor().int().flip(1)  # reversed order, int32
    assert TokenGraph(ei32, 13).equal(g)
    assert TokenGraph(g.edge_index, 13).equal(g)


@pytest.mark.parametrize("bipartite", [False, True], ids=["self", "bipartite"])
def test_networkx_round_trip(bipartite):
    shape = (6, 9) if bipartite else (8, 8)
    g = TokenGraph.from_dense(dense(*shape, 0.3, 2))
    G = g.to_networkx()
    assert G.number_of_edges() == g.num_edges
    assert TokenGraph.from_networkx(G).equal(g)
    if not bipartite:
        j, i = next(iter(G.edges))
        assert g.to_dense()[i, j]


@pytest.mark.parametrize("op", ["|", "&", "-"])
def test_algebra_matches_dense(op):
    a, b = dense(17, 11, 0.3, 3), dense(17, 11, 0.5, 4)
    ga, gb = TokenGraph.from_dense(a), TokenGraph.from_dense(b)
    expect = {"|": a | b, "&": a & b, "-": a & ~b}[op]
    got = {"|": ga | gb, "&": ga & gb, "-": ga - gb}[op]
    assert torch.equal(got.to_dense(), expect)
    assert torch.equal(got.edge_index.as_tensor(), TokenGraph.from_dense(expect).edge_index)


def test_algebra_needs_same_nodes():
    with pytest.raises(ValueError, match="same nodes"):
        TokenGraph.from_dense(dense(3, 3, 0.5, 0)) | TokenGraph.from_dense(dense(4, 4, 0.5, 0))
    with pytest.raises(TypeError, match="cannot apply"):
        TokenGraph.from_dense(dense(3, 3, 0.5, 0)) & 1


def test_transpose():
    mask = dense(7, 12, 0.3, 5)
    gt = TokenGraph.from_dense(mask).transpose()
    assert (gt.num_dst, gt.num_src) == (12, 7)
    assert torch.equal(gt.to_dense(), mask.t())
    assert gt.equal(TokenGraph.from_dense(mask.t().contiguous()))


def test_csc_view_groups_edges_by_key():
    g = TokenGraph.from_dense(dense(9, 9, 0.4, 6))
    key_ptr, dst, perm = g.csc()
    assert key_ptr.tolist() == [0] + g.out_degree().cumsum(0).tolist()
    assert torch.equal(g.src[perm], torch.repeat_interleave(torch.arange(9), g.out_degree()))
    assert torch.equal(g.dst[perm], dst)


@pytest.mark.parametrize("shape", [(9, 9), (5, 13)], ids=str)
def test_from_mask_mod_equals_from_dense(shape):
    n_dst, n_src = shape
    fn = lambda q, kv: ((q - kv).abs() <= 2) | (kv % 4 == 0)
    expect = fn(torch.arange(n_dst)[:, None], torch.arange(n_src)[None, :])
    assert TokenGraph.from_mask_mod(fn, n_dst, n_src).equal(TokenGraph.from_dense(expect))


def test_from_mask_mod_evaluates_in_bounded_chunks(monkeypatch):
    monkeypatch.setattr(chunks, "MASK_MOD_CHUNK_ELEMENTS", 1 << 14)
    n, calls = 4_000, []

    def window(q, kv):
        calls.append(q.numel() * kv.numel())
        return (q - kv).abs() <= 1

    g = TokenGraph.from_mask_mod(window, n)
    assert g.num_edges == 3 * n - 2
    assert max(calls) <= 1 << 14 and len(calls) > 1


def test_from_mask_mod_rejects_non_bool():
    with pytest.raises(TypeError, match="bool tensor"):
        TokenGraph.from_mask_mod(lambda q, kv: q - kv, 4)
    with pytest.raises(TypeError, match="callable"):
        TokenGraph.from_mask_mod(3, 4)


def test_batch_offsets():
    a = TokenGraph.from_dense(dense(3, 3, 0.6, 7))
    b = TokenGraph.from_dense(dense(4, 2, 0.6, 8))
    g = masks.batch([a, b])
    assert (g.num_dst, g.num_src) == (7, 5)
    expect = torch.zeros(7, 5, dtype=torch.bool)
    expect[:3, :3], expect[3:, 3:] = a.to_dense(), b.to_dense()
    assert torch.equal(g.to_dense(), expect)
    assert g.equal(TokenGraph.from_dense(expect))
    with pytest.raises(ValueError, match="at least one"):
        masks.batch([])
    with pytest.raises(TypeError, match="TokenGraphs"):
        masks.batch([a, "b"])


def test_to_device_and_repr():
    g = TokenGraph.from_dense(dense(4, 6, 0.5, 9))
    assert g.to("cpu") is g
    assert repr(g).startswith("TokenGraph(num_src=6, num_dst=4, num_edges=")
    assert "density=" in repr(TokenGraph.from_dense(dense(3, 3, 0.5, 0)))


BAD = {
    "not-tensor": (lambda: TokenGraph([[0], [1]]), TypeError, "torch.Tensor"),
    "float": (lambda: TokenGraph(torch.zeros(2, 3)), TypeError, "integers"),
    "bool": (lambda: TokenGraph(torch.zeros(2, 3, dtype=torch.bool)), TypeError, "integers"),
    "shape-3xE": (lambda: TokenGraph(torch.zeros(3, 2, dtype=torch.long)), ValueError,
                  r"\[2, E\]"),
    "shape-1d": (lambda: TokenGraph(torch.zeros(4, dtype=torch.long)), ValueError, r"\[2, E\]"),
    "negative": (lambda: TokenGraph(torch.tensor([[0, -1], [1, 1]])), ValueError, "negative"),
    "src-range": (lambda: TokenGraph(torch.tensor([[5], [0]]), 3), ValueError,
                  "edge_index\\[0\\].*num_src=3"),
    "dst-range": (lambda: TokenGraph(torch.tensor([[0], [7]]), num_src=3, num_dst=4),
                  ValueError, "edge_index\\[1\\].*num_dst=4"),
    "only-num-src": (lambda: TokenGraph(torch.tensor([[0], [0]]), num_src=3), ValueError,
                     "both num_src and num_dst"),
    "contradiction": (lambda: TokenGraph(torch.tensor([[0], [0]]), 3, num_src=4), ValueError,
                      "contradicts"),
    "num-nodes-negative": (lambda: TokenGraph(torch.tensor([[0], [0]]), -1), ValueError, ">= 0"),
    "num-nodes-float": (lambda: TokenGraph(torch.tensor([[0], [0]]), 2.5), TypeError, "int"),
    "dense-not-bool": (lambda: TokenGraph.from_dense(torch.ones(2, 2)), TypeError, "bool"),
    "dense-3d": (lambda: TokenGraph.from_dense(torch.ones(2, 2, 2, dtype=torch.bool)),
                 ValueError, "num_dst, num_src"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_validation_errors(case):
    make, exc, match = BAD[case]
    with pytest.raises(exc, match=match):
        make()


# ---------------------------------------------------------------------------- facts, caches
def test_meta_edge_index_is_refused_with_a_clear_error():
    ei = torch.tensor([[0, 1], [1, 1]], device="meta")
    with pytest.raises(ValueError, match="meta device"):
        TokenGraph(ei, num_nodes=2)


def test_rule_and_order_are_attributes_kept_where_they_stay_true():
    buckets = torch.tensor([0, 1, 0, 1, 2, 0, 2, 1])
    g = masks.hash_buckets(buckets)
    assert g.rule is not None and g.rule.equal(g) and g.order is not None
    for h in (g.int32(), g.int32().int64(), g.to("cpu")):
        assert h.rule is g.rule and h.order is g.order
    moved = g.int32()
    assert moved.index_dtype == torch.int32 and moved.rule.equal(moved)
    assert moved.permuted().equal(g.permute(g.order))
    # other graphs know no rule, and a new order drops the plans made in the old one
    plain = masks.sliding_window(64, 3)
    assert plain.rule is None and plain.order is None
    plain.tile_plan(16)
    assert plain.caches.plan
    plain.order = torch.arange(63, -1, -1)
    assert not plain.caches.plan and plain.permuted().equal(plain.permute(plain.order))


def test_derived_caches_have_one_namespace_per_owner_and_clear_together():
    import attngraph as ag

    g = masks.sliding_window(64, 3)
    q = torch.randn(64, 2, 8)
    ag.graph_attention(q, q, q, g, backend="torch")
    g.tile_plan(16)
    assert g.caches.chunks and g.caches.plan
    assert set(type(g.caches).__slots__) == {"plan", "chunks", "cuda", "distributed",
                                           "ranges"}
    g.clear_caches()
    assert not any(getattr(g.caches, n) for n in type(g.caches).__slots__)
