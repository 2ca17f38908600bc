"""Implicit graphs: the rule's edges equal the explicit generator's, every operator gives the
explicit graph's results, and what must not build the edge list does not."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings, strategies as st

import attngraph as ag
from attngraph import masks as M
from attngraph.implicit import ImplicitGraph
from attngraph import chunks
from attngraph.ops import ranges

SIZES = (0, 1, 7, 97, 300)


def _families(n):
    """(name, generator, args, kwargs) of every implicit family at size n, edge cases
    included: window >= N, dilation beyond N, globals at both ends, empty documents."""
    ends = sorted({x for x in (0, 1, n // 2, n - 1) if 0 <= x < n})
    out = []
    for c in (False, True):
        out += [("full", M.full, (n,), dict(causal=c)),
                ("sliding_window", M.sliding_window, (n, 3), dict(causal=c)),
                ("sliding_window_wide", M.sliding_window, (n, n + 5), dict(causal=c)),
                ("dilated_window", M.dilated_window, (n, 4, 2), dict(causal=c)),
                ("dilated_window_far", M.dilated_window, (n, 3, n + 1), dict(causal=c)),
                ("strided", M.strided, (n, 5), dict(causal=c)),
                ("longformer", M.longformer, (n, 4, ends), dict(causal=c)),
                ("longformer_dilated", M.longformer, (n, 3, ends), dict(dilation=2, causal=c)),
                ("document", M.document, ([n // 3, 0, n - n // 3, 0],), dict(causal=c))]
    out += [("causal", M.causal, (n,), {}),
            ("global_tokens", M.global_tokens, (n, ends), {}),
            ("dilated_block", M.dilated_block, (n, 8, 1), dict(offset=1)),
            ("dilated_block_far", M.dilated_block, (n, 4, 2 * n + 3), dict(offset=5))]
    if n % 4 == 0:
        out += [("fixed", M.fixed, (n, 4), dict(num_local_blocks=2, causal=c))
                for c in (False, True)]
    return out


def _cases():
    for n in SIZES:
        for name, fn, args, kw in _families(n):
            yield pytest.param(fn, args, kw, id=f"{name}-{n}-{kw}")


@pytest.mark.parametrize("fn,args,kw", list(_cases()))
def test_edges_equal_explicit(fn, args, kw):
    e = fn(*args, **kw)
    g = fn(*args, implicit=True, **kw)
    assert g.is_implicit and not e.is_implicit
    assert isinstance(g, ag.TokenGraph)
    assert g.num_edges == e.num_edges
    assert g.density == pytest.approx(e.density)
    assert torch.equal(g.in_degree(), e.in_degree())
    assert torch.equal(g.out_degree(), e.out_degree())
    assert g.equal(e) and e.equal(g)
    assert torch.equal(g.to_dense(), e.to_dense())
    assert g.materialize().equal(e) and not g.materialize().is_implicit
    # rows of any range are the explicit graph's rows
    n = e.num_dst
    for r0, r1 in ((0, n), (n // 3, n), (n // 2, n // 2 + 1)):
        if n >= r1 > r0:
            ptr, src = g.rows(r0, r1)
            p2, s2 = e.rows(r0, r1)
            assert torch.equal(ptr, p2) and torch.equal(src, s2)


@st.composite
def _random_family(draw):
    n = draw(st.integers(0, 90))
    c = draw(st.booleans())
    ids = sorted(set(draw(st.lists(st.integers(0, max(n - 1, 0)), max_size=5)))) if n else []
    kind = draw(st.sampled_from(["full", "sliding_window", "dilated_window", "strided",
                                 "global_tokens", "longformer", "document", "dilated_block",
                                 "fixed"]))
    w, d = draw(st.integers(0, 100)), draw(st.integers(0, 100))
    if kind == "full":
        return M.full, (n,), dict(causal=c)
    if kind == "sliding_window":
        return M.sliding_window, (n, w), dict(causal=c)
    if kind == "dilated_window":
        return M.dilated_window, (n, w, d), dict(causal=c)
    if kind == "strided":
        return M.strided, (n, max(1, w)), dict(causal=c)
    if kind == "global_tokens":
        return M.global_tokens, (n, ids), {}
    if kind == "longformer":
        return M.longformer, (n, w, ids), dict(dilation=d % 7, causal=c)
    if kind == "document":
        return M.document, (draw(st.lists(st.integers(0, 30), max_size=6)),), dict(causal=c)
    if kind == "dilated_block":
        return M.dilated_block, (n, max(1, w), d), dict(offset=draw(st.integers(0, 50)))
    block = draw(st.integers(1, 6))
    nl = draw(st.integers(1, 4))
    return M.fixed, (block * draw(st.integers(0, 12)), block), dict(
        num_local_blocks=nl, num_global_blocks=draw(st.sampled_from([0, 1, nl])), causal=c)


@settings(max_examples=60, deadline=None)
@given(_random_family())
def test_random_parameters_edges_and_attention(case):
    fn, args, kw = case
    e, g = fn(*args, **kw), fn(*args, implicit=True, **kw)
    assert g.num_edges == e.num_edges and g.equal(e)
    assert torch.equal(g.to_dense(), e.to_dense())
    q, k, v = _qkv(e.num_dst, H=2, H_kv=1, D=3, Dv=2)
    _close(_run(q, k, v, g), _run(q, k, v, e, backend="torch"))


@pytest.mark.parametrize("causal,strict", [(True, False), (True, True), (False, False)])
def test_hash_buckets_as_a_rule(causal, strict):
    """SCFA's hashed mask without an edge list: one sort, then a slice of the sorted keys
    per query; per-head buckets give a stack over the rule."""
    gen = torch.Generator().manual_seed(0)
    b = torch.randint(0, 6, (257,), generator=gen)
    e = M.hash_buckets(b, causal=causal, strict=strict)
    g = M.hash_buckets(b, causal=causal, strict=strict, implicit=True)
    assert g.is_implicit and g.equal(e)
    q, k, v = _qkv(257, H=2, H_kv=2)
    _close(_run(q, k, v, g), _run(q, k, v, e, backend="torch"))
    bq = torch.randint(0, 4, (2, 3, 60), generator=gen)
    bk = torch.randint(0, 4, (2, 3, 50), generator=gen)
    s = M.hash_buckets(bq, bk, causal=False, implicit=True)
    se = M.hash_buckets(bq, bk, causal=False)
    assert s.graph.is_implicit and s.graph.equal(se.graph)
    q = torch.randn(2, 60, 3, 4, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 50, 3, 4, dtype=torch.float64, requires_grad=True) for _ in "kv")
    _close(_run(q, k, v, s), _run(q, k, v, se, backend="torch"))


def test_a_different_graph_is_not_equal():
    g = M.sliding_window(50, 3, implicit=True)
    assert not g.equal(M.sliding_window(50, 4))
    assert not g.equal(M.sliding_window(51, 3))
    h = M.sliding_window(50, 3)
    h2 = ag.TokenGraph(torch.cat([h.edge_index.as_tensor()[:, :-1],
                                  torch.tensor([[0], [49]])], 1), 50)
    assert not g.equal(h2)


def _qkv(n, H=2, H_kv=1, D=5, Dv=3, dtype=torch.float64, seed=0, batch=None):
    gen = torch.Generator().manual_seed(seed)
    shape = (n,) if batch is None else (batch, n)
    q = torch.randn(*shape, H, D, generator=gen, dtype=dtype, requires_grad=True)
    k = torch.randn(*shape, H_kv, D, generator=gen, dtype=dtype, requires_grad=True)
    v = torch.randn(*shape, H_kv, Dv, generator=gen, dtype=dtype, requires_grad=True)
    return q, k, v


def _run(q, k, v, g, **kw):
    out, lse = ag.graph_attention(q, k, v, g, return_lse=True, **kw)
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    wl = torch.randn(lse.shape, generator=gen, dtype=lse.dtype)
    loss = (out * w).sum() + (torch.where(torch.isinf(lse), 0.0, lse) * wl).sum()
    grads = torch.autograd.grad(loss, (q, k, v) + ((kw["edge_bias"],) if
                                                  kw.get("edge_bias") is not None else ()))
    return out, lse, grads


def _close(a, b, tol=1e-10):
    for x, y in zip(a, b):
        if isinstance(x, (tuple, list)):
            _close(x, y, tol)
        else:
            assert x.shape == y.shape
            assert torch.equal(torch.isinf(x), torch.isinf(y))
            fin = ~torch.isinf(x)
            torch.testing.assert_close(x[fin], y[fin], atol=tol, rtol=tol)


# Dense pieces run on ATen's CPU flash kernel where the key and value head dims agree
# (D = Dv = 4), on the matmul engine otherwise (D = 5, Dv = 3) or when it is switched off.
ENGINES = [pytest.param((5, 3, True), id="matmul"), pytest.param((4, 4, True), id="flash"),
           pytest.param((4, 4, False), id="flash-off")]


@pytest.fixture
def engine(request, monkeypatch):
    D, Dv, flash = request.param
    monkeypatch.setattr(ranges, "USE_FLASH", flash)
    return dict(D=D, Dv=Dv)


def test_the_flash_engine_is_there_on_cpu():
    q, v = torch.zeros(1, 1, 4), torch.zeros(1, 1, 4)
    assert ranges.flash_ops(q, v) is not None
    assert ranges.flash_ops(q, torch.zeros(1, 1, 3)) is None


@pytest.mark.parametrize("engine", ENGINES, indirect=True)
@pytest.mark.parametrize("backend", ["auto", "torch", "ranges"])
@pytest.mark.parametrize("n", [7, 300])
def test_attention_equals_explicit(n, backend, engine):
    for name, fn, args, kw in _families(n):
        g, e = fn(*args, implicit=True, **kw), fn(*args, **kw)
        q, k, v = _qkv(n, H=4, H_kv=2, **engine)
        _close(_run(q, k, v, g, backend=backend), _run(q, k, v, e, backend="torch"))


@pytest.mark.parametrize("engine", ENGINES, indirect=True)
@pytest.mark.parametrize("max_elements", [64, 1 << 12])
def test_attention_in_small_pieces(monkeypatch, max_elements, engine):
    """Key pieces and row chunks far smaller than a row: long rows (global tokens, full
    rows) are cut and merged."""
    monkeypatch.setattr(chunks, "RANGE_MAX_ELEMENTS", max_elements)
    n = 257
    for g in (M.longformer(n, 9, [0, 5, n - 1], implicit=True),
              M.full(n, causal=True, implicit=True),
              M.strided(n, 16, causal=False, implicit=True)):
        q, k, v = _qkv(n, H=3, H_kv=3, **engine)
        _close(_run(q, k, v, g), _run(q, k, v, g.materialize(), backend="torch"))


@pytest.mark.parametrize("threads", [1, 64])
@pytest.mark.parametrize("engine", ENGINES, indirect=True)
def test_hash_and_drop_masks_per_head(engine, threads, monkeypatch):
    """SCFA's masks, one per (sequence, head), as rules: sorted-table runs whose rows are
    causal prefixes of a bucket; outputs, lse and gradients (through lse too) exact. With
    many threads the flash backward cuts blocks into fewer rows."""
    monkeypatch.setattr(ranges, "_threads", lambda: threads)
    B, H, n = 2, 3, 200
    gen = torch.Generator().manual_seed(3)
    qb = torch.randint(0, 4, (B, H, n), generator=gen)
    kb = torch.randint(0, 4, (B, H, n), generator=gen)
    keep_q = torch.rand(B, H, n, generator=gen) > 0.4
    keep_k = torch.rand(B, H, n, generator=gen) > 0.4
    for g, e in ((M.hash_buckets(qb, kb, implicit=True), M.hash_buckets(qb, kb)),
                 (M.hash_buckets(qb, strict=True, implicit=True),
                  M.hash_buckets(qb, strict=True)),
                 (M.qk_drop(keep_q, keep_k, implicit=True), M.qk_drop(keep_q, keep_k))):
        assert g.graph.is_implicit and not e.graph.is_implicit
        q, k, v = _qkv(n, H=H, H_kv=H, batch=B, **engine)
        _close(_run(q, k, v, g), _run(q, k, v, e, backend="torch"))


def test_batched_gqa_bias_and_low_precision():
    n = 130
    g = M.longformer(n, 6, [0, 64], implicit=True)
    e = g.materialize()
    q, k, v = _qkv(n, H=4, H_kv=1, batch=3)
    _close(_run(q, k, v, g), _run(q, k, v, e, backend="torch"))
    # a bias follows the canonical edge order (runs per edge, generated chunk by chunk)
    bias = torch.randn(e.num_edges, 4, dtype=torch.float64, requires_grad=True)
    a = _run(q, k, v, g, edge_bias=bias)
    b = _run(q, k, v, e, edge_bias=bias, backend="torch")
    _close(a, b)
    assert g._explicit is e     # (e came from materialize(): the bias run used no new list)
    # bfloat16 inputs compute in float32: error within twice the explicit path's
    q16, k16, v16 = (t.detach().to(torch.bfloat16) for t in (q, k, v))
    gold = ag.graph_attention(q, k, v, e).detach()
    err_i = (ag.graph_attention(q16, k16, v16, g).double() - gold).abs().max()
    err_e = (ag.graph_attention(q16, k16, v16, e, backend="torch").double() - gold).abs().max()
    assert err_i <= 2 * err_e + 1e-3


def test_gradcheck():
    g = M.longformer(9, 2, [0, 8], dilation=1, implicit=True)
    q, k, v = _qkv(9, H=2, H_kv=1, D=3, Dv=2)
    assert torch.autograd.gradcheck(lambda q, k, v: ag.graph_attention(q, k, v, g),
                                     (q, k, v))


def test_empty_rows_and_empty_graph():
    g = M.dilated_block(40, 8, 1, implicit=True)      # odd rows have no edge
    q, k, v = _qkv(40)
    out, lse = ag.graph_attention(q, k, v, g, return_lse=True)
    assert torch.isneginf(lse[1::2]).all() and (out[1::2] == 0).all()
    e = M.document([0, 0], implicit=True)
    q, k, v = _qkv(0)
    assert ag.graph_attention(q, k, v, e).shape == (0, 2, 3)


def test_union_stays_implicit():
    n = 200
    a = M.sliding_window(n, 5, implicit=True)
    b = M.global_tokens(n, [0, 100], implicit=True)
    c = M.dilated_window(n, 2, 6, implicit=True)
    u = a | b | c
    assert u.is_implicit and "|" in repr(u)
    want = a.materialize() | b.materialize() | c.materialize()
    assert u.equal(want) and u.num_edges == want.num_edges     # overlaps counted once
    q, k, v = _qkv(n)
    _close(_run(q, k, v, u), _run(q, k, v, want, backend="torch"))
    # with an explicit graph: materialises (documented)
    r = M.random(n, 3, seed=0)
    assert not (a | r).is_implicit and (a | r).equal(a.materialize() | r)
    assert (a & r).equal(a.materialize() & r) and (a - r).equal(a.materialize() - r)


def test_operators_never_build_the_edge_list(monkeypatch):
    """Everything a long-context user runs works from the rule alone: a test that fails if
    any of it asks for the edge list."""
    def forbidden(self):
        raise AssertionError("the edge list was built")

    n = 1000
    g = M.longformer(n, 16, [0, 500], implicit=True)
    e = M.longformer(n, 16, [0, 500])
    q, k, v = _qkv(n, H=2, H_kv=2, D=4, Dv=4, dtype=torch.float32)
    want = ag.graph_attention(q, k, v, e)
    monkeypatch.setattr(ImplicitGraph, "materialize", forbidden)
    assert g.num_edges == e.num_edges and torch.equal(g.in_degree(), e.in_degree())
    assert torch.equal(g.out_degree(), e.out_degree()) and g.equal(e)
    out = ag.graph_attention(q, k, v, g)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    out.sum().backward()
    ag.graph_attention(q, k, v, g, backend="torch").sum().backward()
    layer = ag.nn.SparseSelfAttention(8, 2)
    layer(torch.randn(2, n, 8), g).sum().backward()
    conv = ag.nn.GraphAttentionConv(8, 4, heads=2)
    conv(torch.randn(n, 8), g).sum().backward()
    assert g.to("cpu") is g and repr(g)
    pytest.importorskip("matplotlib")
    from attngraph.viz import plot_mask

    plot_mask(g, resolution=64)
    import matplotlib.pyplot as plt

    plt.close("all")


def test_layers_equal_explicit():
    n = 150
    g = M.sliding_window(n, 7, implicit=True)
    e = g.materialize()
    torch.manual_seed(0)
    conv = ag.nn.GraphAttentionConv(6, 3, heads=2).double()
    x = torch.randn(n, 6, dtype=torch.float64)
    _close([conv(x, g)], [conv(x, e)])
    out, (ei, alpha) = conv(x, g, return_attention_weights=True)
    out2, (ei2, alpha2) = conv(x, e, return_attention_weights=True)
    _close([out, alpha], [out2, alpha2])
    attn = ag.nn.SparseSelfAttention(8, 2).double()
    x = torch.randn(2, n, 8, dtype=torch.float64)
    _close([attn(x, g)], [attn(x, e)])


def test_plot_bins_from_the_rule():
    from attngraph.viz import _bin_counts

    for fn, args, kw in [(M.longformer, (3000, 40, [0, 7, 2999]), dict(dilation=2)),
                         (M.strided, (2500, 37), dict(causal=False)),
                         (M.document, ([100, 0, 900, 1000],), {}),
                         (M.full, (1000,), dict(causal=True)),
                         (M.fixed, (64 * 20, 64), {})]:
        e, g = fn(*args, **kw), fn(*args, implicit=True, **kw)
        for rows, cols in ((512, 512), (100, 37), (7, 700)):
            assert (_bin_counts(e, rows, cols) == _bin_counts(g, rows, cols)).all()


def test_dispatch_reasons(monkeypatch):
    from attngraph.ops.dispatch import Inputs, explain, select_backend

    monkeypatch.setenv("ATTNGRAPH_CUDA_EMULATE", "1")    # cupy would take CPU tensors
    g = M.sliding_window(64, 4, implicit=True)
    x = Inputs(device=torch.device("cpu"), dtype=torch.float32, head_dim=8, value_dim=8,
               requires_grad=False, graph=g)
    assert select_backend("auto", x).name == "ranges"
    assert "rule" in explain("auto", x)
    # no silent fallback: tiles plan stored edges, an implicit graph has none
    with pytest.raises(RuntimeError, match="tiles: an implicit graph has no edge list"):
        select_backend("tiles", x)
    # a bias follows the canonical edge order: ranges and the fused kernels refuse it
    xb = Inputs(device=torch.device("cpu"), dtype=torch.float32, head_dim=8, value_dim=8,
                requires_grad=False, graph=g, has_bias=True)
    assert select_backend("auto", xb).name == "torch"
    assert "not ranges: an edge bias" in explain("auto", xb)
    with pytest.raises(RuntimeError, match="cupy: an implicit graph with an edge bias"):
        select_backend("cupy", xb)


def test_explicit_hash_and_drop_graphs_keep_their_rule_for_attention(monkeypatch):
    """An explicit hash / QK-drop graph keeps the rule it was built from: auto on CPU reads
    key ranges from it instead of planning tiles; with a bias it runs on tiles."""
    from attngraph.ops import tiles
    from attngraph.ops.dispatch import Inputs, explain

    gen = torch.Generator().manual_seed(5)
    n = 150
    buckets = torch.randint(0, 5, (n,), generator=gen)
    keep_q, keep_k = torch.rand(n, generator=gen) > 0.3, torch.rand(n, generator=gen) > 0.3
    for e, g in ((M.hash_buckets(buckets), M.hash_buckets(buckets, implicit=True)),
                 (M.qk_drop(keep_q, keep_k), M.qk_drop(keep_q, keep_k, implicit=True))):
        assert not e.is_implicit and e.rule.equal(e)
        assert g.is_implicit and g.equal(e)
        x = Inputs(device=torch.device("cpu"), dtype=torch.float64, head_dim=4, value_dim=4,
                   requires_grad=True, graph=e)
        assert "rule" in explain("auto", x)
        q, k, v = _qkv(n, H=2, H_kv=1, D=4, Dv=4)
        gold = _run(q, k, v, e, backend="torch")
        planned = []
        monkeypatch.setattr(tiles, "attention", lambda *a, **kw: planned.append(1))
        _close(_run(q, k, v, e), gold)
        assert not planned                           # no tile plan was built or run
        monkeypatch.undo()
        bias = torch.randn(e.num_edges, dtype=torch.float64, requires_grad=True)
        _close(_run(q, k, v, e, edge_bias=bias),
               _run(q, k, v, e, edge_bias=bias, backend="torch"))


def _rule_families():
    gen = torch.Generator().manual_seed(2)
    return (M.longformer(90, 3, [0, 89], implicit=True),        # long rows: items cut
            M.dilated_block(64, 8, 1, implicit=True),           # rows without edges
            M.strided(70, 9, causal=False, implicit=True),       # ranges with step 9
            M.hash_buckets(torch.randint(0, 4, (80,), generator=gen), implicit=True),
            M.document([30, 0, 25], causal=True, implicit=True)
            | M.global_tokens(55, [3], implicit=True))          # a union: two runs a row


def test_rule_items_name_every_edge_once():
    """The work items of a rule, read back as the kernels read them (u * step + residue,
    or the table), are exactly the graph's edges, a row's items in slot order."""
    from attngraph.ops.cuda import fused

    for g in _rule_families():
        e = g.materialize()
        for chunk in (4, 1 << 20):
            for r0, r1 in ((0, g.num_dst), (5, g.num_dst - 7)):
                ri = fused.rule_items(g, r0, r1, chunk=chunk)
                items, rule = ri.rows.items, ri.rule
                assert (items[:, 2] - items[:, 1] <= chunk).all()
                assert torch.equal(torch.unique(items[:, 0]), torch.arange(r1 - r0))
                got = []
                for (node, b, end, slot), (step, res) in zip(items.tolist(), rule.tolist()):
                    u = torch.arange(b, end)
                    keys = u * step + res if step else ri.table[u].long()
                    got += [(node + r0, int(j)) for j in keys]
                want = [(i, j) for j, i in e.edge_index.as_tensor().t().tolist() if r0 <= i < r1]
                assert sorted(got) == sorted(want)
                # a row with several items has consecutive slots, listed in splits
                cut = items[items[:, 3] >= 0]
                for row, s0, s1 in ri.rows.splits.tolist():
                    mine = cut[cut[:, 0] == row]
                    assert sorted(mine[:, 3].tolist()) == list(range(s0, s1))
                assert ri.rows.num_slots == cut.size(0)


def test_rule_items_refuse_keys_out_of_range():
    """A user's rule that names keys outside [0, num_src) is refused on the host, before a
    kernel could read them."""
    from attngraph.runs import Range, Take
    from attngraph.ops.cuda import fused

    def far(rows, state):
        return [Range(rows + 5, torch.full_like(rows, 2))]      # row 9 reaches key 15

    def bad_table(rows, state):
        return [Take(torch.tensor([0, 99]), torch.zeros_like(rows), torch.ones_like(rows))]

    def past_table(rows, state):
        return [Take(torch.tensor([0, 1]), torch.ones_like(rows), torch.full_like(rows, 2))]

    def zero_step(rows, state):
        return [Range(rows, torch.ones_like(rows), 0)]

    for rule in (far, bad_table, past_table, zero_step):
        with pytest.raises(ValueError, match="rule"):
            fused.rule_items(ImplicitGraph(rule, 12, 10), 0, 10)


@pytest.mark.parametrize("rows_per_chunk,chunk_edges", [(16, 40), (1 << 18, 1 << 24)])
def test_fused_kernels_compute_keys_from_the_rule(monkeypatch, rows_per_chunk, chunk_edges):
    """backend="cupy" (here through the CPU emulator): forward and dQ read each row's keys
    from the rule in the kernels (the forward never generates an edge), dK / dV generate
    each row chunk's edges; equal to the explicit graph, gradients (through lse too)."""
    from attngraph.ops.cuda import emulator, fused

    monkeypatch.setenv("ATTNGRAPH_CUDA_EMULATE", "1")
    monkeypatch.setattr(fused, "RULE_CHUNK_ROWS", rows_per_chunk)
    monkeypatch.setattr(fused, "IMPLICIT_CHUNK_EDGES", chunk_edges)
    for g in _rule_families():
        q, k, v = (t.float() for t in _qkv(g.num_dst, H=4, H_kv=2, D=8, Dv=8))
        want = _run(q, k, v, g.materialize(), backend="torch")
        g = ImplicitGraph(g._runs, g.num_src, g.num_dst, state=g._state)   # no cache

        def no_edges(*a, **kw):
            raise AssertionError("the forward generated edges")

        with monkeypatch.context() as m, emulator.count() as launches:
            for name in ("edge_chunks", "materialize"):
                m.setattr(ImplicitGraph, name, no_edges)
            with torch.no_grad():
                out, lse = ag.graph_attention(q, k, v, g, return_lse=True, backend="cupy")
        assert g._explicit is None
        assert any(s.kernel.startswith("attn_fwd") for s in launches)
        _close((out, lse), want[:2], tol=2e-5)
        _close(_run(q, k, v, g, backend="cupy"), want, tol=2e-5)


def test_compiles_on_ranges_and_torch_and_cupy_refuses_clearly(monkeypatch):
    g = M.sliding_window(32, 2, implicit=True)
    q = torch.randn(32, 1, 4)
    for backend in ("auto", "ranges", "torch"):
        fn = torch.compile(lambda q: ag.graph_attention(q, q, q, g, backend=backend),
                           backend="eager", fullgraph=True)
        torch.testing.assert_close(fn(q), ag.graph_attention(q, q, q, g.materialize()))
    monkeypatch.setenv("ATTNGRAPH_CUDA_EMULATE", "1")
    fn = torch.compile(lambda q: ag.graph_attention(q, q, q, g, backend="cupy"),
                       backend="eager", fullgraph=True)
    with pytest.raises(Exception, match="implicit graph"):
        fn(q)


def test_long_context_in_bounded_memory(tmp_path):
    """Forward over 4M tokens of sliding_window(64) in an address space 3 GB above the
    interpreter's: the edge list alone would take 8.7 GB, q, k, v, out ~0.27 GB."""
    script = textwrap.dedent("""
        import resource, torch
        import attngraph as ag
        from attngraph import masks as M
        torch.set_num_threads(1)
        def vm():
            with open("/proc/self/status") as f:
                return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmSize"))
        limit = vm() + 3 * 2 ** 30
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        n = 1 << 22
        g = M.sliding_window(n, 64, implicit=True)
        assert g.num_edges == n * 129 - 64 * 65
        q, k, v = (torch.randn(n, 1, 4) for _ in range(3))
        out, lse = ag.graph_attention(q, k, v, g, return_lse=True)
        rows = torch.tensor([0, 1, 12345, n - 1])
        for i in rows.tolist():
            lo, hi = max(0, i - 64), min(n, i + 65)
            s = (q[i, 0] @ k[lo:hi, 0].T) / 2.0
            want = torch.softmax(s, -1) @ v[lo:hi, 0]
            assert torch.allclose(out[i, 0], want, atol=1e-5), i
            assert torch.allclose(lse[i, 0], torch.logsumexp(s, -1), atol=1e-5)
        try:                       # the same graph's edge list does not fit
            g.materialize()
        except (MemoryError, RuntimeError):
            print("materialize: out of memory")
        print("ok")
    """)
    path = tmp_path / "long.py"
    path.write_text(script)
    res = subprocess.run([sys.executable, str(path)], capture_output=True, text=True,
                         timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "materialize: out of memory" in res.stdout and res.stdout.strip().endswith("ok")


# ---------------------------------------------------------------------------- int32 graphs
def _int32_cases():
    n = 300
    return [M.sliding_window(n, 5), M.longformer(n, 4, [0, 299], dilation=1),
            M.bigbird(n - n % 10, 10, seed=0), M.random(n, 7, seed=1),
            M.document([100, 0, 200], causal=True), M.strided(n, 17, causal=False),
            M.hash_buckets(torch.randint(0, 8, (n,), generator=torch.Generator().manual_seed(0)))]


def test_int32_graphs_halve_the_bytes_and_give_the_same_answers():
    for e in _int32_cases():
        g = e.int32()
        assert g.index_dtype == torch.int32 and g.src.dtype == g.dst.dtype == torch.int32
        assert g.ptr.dtype == torch.int64 and torch.equal(g.ptr, e.ptr)
        assert g.equal(e) and e.equal(g) and g.int64().equal(e)
        assert g.int32() is g and g.int64().index_dtype == torch.int64
        ei = g.edge_index.as_tensor()
        assert ei.element_size() * ei.numel() == 8 * e.num_edges       # 8 bytes per edge
        assert torch.equal(g.to_dense(), e.to_dense())
        assert torch.equal(g.out_degree(), e.out_degree())
        assert (g | e).equal(e) and (g - e).num_edges == 0
        q, k, v = _qkv(e.num_dst, H=4, H_kv=2)
        want = _run(q, k, v, e, backend="torch")
        for backend in ("torch", "tiles", "auto"):
            _close(_run(q, k, v, g, backend=backend), want)
        bias = torch.randn(e.num_edges, dtype=torch.float64, requires_grad=True)
        _close(_run(q, k, v, g, edge_bias=bias), _run(q, k, v, e, edge_bias=bias,
                                                       backend="torch"))
        p_e, p_g = e.tile_plan(64), g.tile_plan(64)
        assert p_e.num_tiles == p_g.num_tiles and torch.equal(p_e.masks, p_g.masks)


def test_materialize_writes_int32_straight_from_the_rule():
    g = M.longformer(500, 8, [0, 250], dilation=1, implicit=True)
    e32 = g.materialize(torch.int32)
    assert e32.index_dtype == torch.int32 and e32.equal(M.longformer(500, 8, [0, 250],
                                                                     dilation=1))
    assert g.materialize(torch.int32) is e32
    with pytest.raises(TypeError, match="index_dtype"):
        g.materialize(torch.float32)


def test_int32_graphs_on_the_emulated_kernels(monkeypatch):
    monkeypatch.setenv("ATTNGRAPH_CUDA_EMULATE", "1")
    e = M.longformer(64, 3, [0])
    g = e.int32()
    q, k, v = (t.float() for t in _qkv(64, H=2, H_kv=1, D=8, Dv=8))
    torch.testing.assert_close(ag.graph_attention(q, k, v, g, backend="cupy"),
                               ag.graph_attention(q, k, v, e, backend="torch"),
                               atol=1e-5, rtol=1e-5)


def test_index_dtype_and_int32_on_an_implicit_graph():
    g = M.sliding_window(50, 3, implicit=True)
    assert g.index_dtype == torch.int64 and g.int64() is g
    g32 = g.int32()
    assert g32.is_implicit and g32.index_dtype == torch.int32 and g32.int32() is g32
    assert g32.src.dtype == torch.int32 and g32.materialize().index_dtype == torch.int32
    assert g32.equal(M.sliding_window(50, 3)) and g32.int64().index_dtype == torch.int64
    q = torch.randn(50, 2, 8)
    torch.testing.assert_close(ag.graph_attention(q, q, q, g32),
                               ag.graph_attention(q, q, q, g, backend="torch"))


def test_hash_graph_keeps_its_rule_and_fast_path_in_int32():
    from attngraph.ops.dispatch import Inputs, select_backend

    buckets = torch.randint(0, 4, (120,), generator=torch.Generator().manual_seed(0))
    g = M.hash_buckets(buckets).int32()
    assert g.rule is not None and g.index_dtype == torch.int32
    q = torch.randn(120, 2, 8)
    assert select_backend("auto", Inputs.of(q, q, q, g)).name == "ranges"
    torch.testing.assert_close(ag.graph_attention(q, q, q, g),
                               ag.graph_attention(q, q, q, g, backend="torch"))


@pytest.mark.parametrize("backend", ["ranges", "torch"])
@pytest.mark.parametrize("compiled", [False, True])
def test_a_dropped_implicit_graph_lives_until_its_backward(backend, compiled):
    """graph_attention(q, k, v, make_graph()): the operators find the graph from its key in
    the backward, after the caller's reference is gone; once the backward has run and the
    output is dropped, the graph is freed."""
    import gc
    import weakref

    def attend(q, k, v, graph):
        return ag.graph_attention(q, k, v, graph, backend=backend)

    run = torch.compile(attend, backend="aot_eager", fullgraph=True) if compiled else attend
    q, k, v = (torch.randn(64, 2, 8, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    graph = ag.masks.sliding_window(64, 4, implicit=True)
    alive = weakref.ref(graph)
    out = run(q, k, v, graph)
    del graph
    gc.collect()
    out.backward(torch.ones_like(out))
    expect = ag.masks.sliding_window(64, 4)
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ag.graph_attention(q2, k2, v2, expect, backend="torch").sum().backward()
    for a, b in ((q, q2), (k, k2), (v, v2)):
        assert torch.allclose(a.grad, b.grad, atol=1e-10)
    del out
    gc.collect()
    assert alive() is None
