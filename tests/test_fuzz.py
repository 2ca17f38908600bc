"""Fuzzing the public API: every call either returns a right answer or raises a
``ValueError`` / ``TypeError`` whose message names what was wrong -- never another exception,
a crash, a hang, or NaN from finite inputs.

Examples per test: ``ATTNGRAPH_FUZZ_EXAMPLES`` (default 40, what CI runs); a long run sets it
higher. The CUDA kernels are fuzzed through the emulator (``backend="cupy"``).
"""
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import attngraph as ag
from attngraph import TokenGraph, masks
from attngraph.nn import GraphAttentionConv, SparseSelfAttention
from helpers import dense_attention

EXAMPLES = int(os.environ.get("ATTNGRAPH_FUZZ_EXAMPLES", "40"))
fuzz = settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 40,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.filter_too_much])


def clear_error_or(fn, names):
    """``fn()``'s result, or None when it raised a ValueError/TypeError naming one of
    ``names``; any other exception fails the test."""
    try:
        return fn()
    except (ValueError, TypeError) as e:
        msg = str(e)
        assert any(n in msg for n in names), f"error does not name its argument: {msg!r}"
        return None


def assert_canonical(g):
    ei = g.edge_index.as_tensor()
    assert ei.dtype == torch.int64 and ei.shape == (2, g.num_edges)
    if g.num_edges:
        key = ei[1] * max(g.num_src, 1) + ei[0]
        assert bool((key[1:] > key[:-1]).all())
        assert 0 <= int(ei[0].min()) and int(ei[0].max()) < g.num_src
        assert 0 <= int(ei[1].min()) and int(ei[1].max()) < g.num_dst
    counts = torch.bincount(ei[1], minlength=g.num_dst) if g.num_edges else \
        torch.zeros(g.num_dst, dtype=torch.long)
    assert torch.equal(g.ptr, torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]))


# ---------------------------------------------------------------------------- TokenGraph
counts = st.one_of(st.none(), st.integers(-2, 14), st.just(2 ** 40), st.booleans(),
                   st.floats(0, 5), st.just(torch.tensor(3)))


@st.composite
def edge_indices(draw):
    kind = draw(st.sampled_from(["ok", "ok", "ok", "3-rows", "1-d", "float", "bool", "list"]))
    e = draw(st.integers(0, 20))
    if kind == "list":
        return [[0, 1], [1, 0]]
    shape = {"3-rows": (3, e), "1-d": (e,)}.get(kind, (2, e))
    t = torch.tensor(draw(st.lists(st.integers(-2, 12), min_size=math.prod(shape),
                                   max_size=math.prod(shape))), dtype=torch.long).view(shape)
    if kind == "float":
        return t.float()
    if kind == "bool":
        return t > 0
    return t.to(draw(st.sampled_from([torch.int32, torch.int64])))


@fuzz
@given(ei=edge_indices(), num_nodes=counts, num_src=counts, num_dst=counts)
def test_token_graph_construction(ei, num_nodes, num_src, num_dst):
    kw = {k: v for k, v in (("num_src", num_src), ("num_dst", num_dst)) if v is not None}
    g = clear_error_or(lambda: TokenGraph(ei, num_nodes, **kw),
                       ["edge_index", "num_nodes", "num_src", "num_dst"])
    if g is None:
        return
    assert_canonical(g)
    pairs = {(int(j), int(i)) for j, i in ei.t().tolist()}
    assert {(int(j), int(i)) for j, i in g.edge_index.as_tensor().t().tolist()} == pairs


def _random_graph(seed, n_dst, n_src, p):
    gen = torch.Generator().manual_seed(seed)
    return TokenGraph.from_dense(torch.rand(n_dst, n_src, generator=gen) < p)


@fuzz
@given(seed=st.integers(0, 1000), n1=st.integers(0, 9), n2=st.integers(0, 9),
       op=st.sampled_from(["|", "&", "-"]), other=st.sampled_from(["graph", "int", "tensor"]))
def test_graph_algebra(seed, n1, n2, op, other):
    a = _random_graph(seed, n1, n1, 0.4)
    b = _random_graph(seed + 1, n2, n2, 0.4)
    rhs = {"graph": b, "int": 3, "tensor": torch.ones(2)}[other]
    fn = {"|": lambda: a | rhs, "&": lambda: a & rhs, "-": lambda: a - rhs}[op]
    g = clear_error_or(fn, ["same nodes", "TokenGraph", "cannot apply"])
    if g is None:
        assert other != "graph" or n1 != n2
        return
    assert_canonical(g)
    da, db = a.to_dense(), b.to_dense()
    want = {"|": da | db, "&": da & db, "-": da & ~db}[op]
    assert torch.equal(g.to_dense(), want)


# ---------------------------------------------------------------------------- mask generators
ints = st.one_of(st.integers(-3, 40), st.just(2 ** 40), st.booleans(), st.floats(-1, 5))
GENERATORS = {
    "full": (masks.full, ["n"], {"causal": st.booleans()}),
    "causal": (masks.causal, ["n"], {}),
    "sliding_window": (masks.sliding_window, ["n", "window"], {"causal": st.booleans()}),
    "dilated_window": (masks.dilated_window, ["n", "window", "dilation"], {}),
    "dilated_block": (masks.dilated_block, ["n", "block", "dilation"], {}),
    "random": (masks.random, ["n", "per_row"], {"seed": st.integers(0, 5)}),
    "longformer": (masks.longformer, ["n", "window"], {"dilation": st.integers(0, 2)}),
    "bigbird": (masks.bigbird, ["n", "block"], {"seed": st.integers(0, 5)}),
    "fixed": (masks.fixed, ["n", "block"], {"causal": st.booleans()}),
    "strided": (masks.strided, ["n", "stride"], {}),
}


@fuzz
@given(name=st.sampled_from(sorted(GENERATORS)), data=st.data())
def test_mask_generators(name, data):
    fn, positional, keywords = GENERATORS[name]
    args = [data.draw(ints if i else st.one_of(st.integers(-2, 60), ints)) for i, _ in
            enumerate(positional)]
    kw = {k: data.draw(s) for k, s in keywords.items()}
    g = clear_error_or(lambda: fn(*args, **kw), positional + list(kw))
    if g is None:
        return
    assert_canonical(g)
    if kw.get("causal") or name in ("causal", "strided"):
        assert bool((g.src <= g.dst).all())


@fuzz
@given(buckets=st.lists(st.integers(-2, 4), max_size=30), strict=st.booleans(),
       dtype=st.sampled_from([torch.int64, torch.int32, torch.float32]))
def test_hash_buckets_and_qk_drop(buckets, strict, dtype):
    b = torch.tensor(buckets, dtype=torch.long).to(dtype)
    g = clear_error_or(lambda: masks.hash_buckets(b, strict=strict), ["q_buckets", "bucket"])
    if g is not None:
        assert_canonical(g)
        assert bool((g.src < g.dst).all() if strict else (g.src <= g.dst).all())
        assert bool((b[g.src] == b[g.dst]).all())
    keep = b > 0
    g = clear_error_or(lambda: masks.qk_drop(keep, keep), ["keep_q", "keep_k"])
    if g is not None:
        assert_canonical(g)
        assert bool(keep[g.dst].all() and keep[g.src].all())


# ---------------------------------------------------------------------------- graph_attention
ATTN_NAMES = ["q", "k", "v", "graph", "scale", "edge_bias", "backend", "heads", "batch"]
CORRUPTIONS = ["none", "none", "none", "q-dims", "k-heads", "v-tokens", "graph-type",
               "scale-nan", "scale-str", "bias-shape", "bias-nan", "bias-posinf", "bias-int",
               "backend-name", "dtype-int", "dtype-mixed", "head-dim-0", "gqa-indivisible",
               "q-meta", "bias-meta"]


@st.composite
def attention_cases(draw):
    n_dst, n_src = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    H_kv, G = draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2, 3]))
    D, D_v = draw(st.integers(1, 20)), draw(st.integers(1, 20))
    return dict(n_dst=n_dst, n_src=n_src, H=H_kv * G, H_kv=H_kv, D=D, D_v=D_v,
                p=draw(st.floats(0, 1)), seed=draw(st.integers(0, 2 ** 16)),
                batch=draw(st.sampled_from([None, 2])),
                dtype=draw(st.sampled_from([torch.float64, torch.float32, torch.float16,
                                            torch.bfloat16])),
                bias=draw(st.sampled_from([None, "E", "EH", "minus-inf"])),
                scale=draw(st.sampled_from([None, 0.3, 2])),
                backend=draw(st.sampled_from(["auto", "torch", "cupy"])),
                corrupt=draw(st.sampled_from(CORRUPTIONS)))


def _build(c):
    gen = torch.Generator().manual_seed(c["seed"])
    mask = torch.rand(c["n_dst"], c["n_src"], generator=gen) < c["p"]
    g = TokenGraph.from_dense(mask)
    lead = () if c["batch"] is None else (c["batch"],)
    q = torch.randn(*lead, c["n_dst"], c["H"], c["D"], generator=gen, dtype=torch.float64)
    k = torch.randn(*lead, c["n_src"], c["H_kv"], c["D"], generator=gen, dtype=torch.float64)
    v = torch.randn(*lead, c["n_src"], c["H_kv"], c["D_v"], generator=gen, dtype=torch.float64)
    bias = None
    if c["bias"] is not None:
        shape = (g.num_edges,) if c["bias"] in ("E", "minus-inf") else (g.num_edges, c["H"])
        bias = torch.randn(shape, generator=gen, dtype=torch.float64)
        if c["bias"] == "minus-inf" and g.num_edges:
            bias[::3] = -math.inf
    return mask, g, q, k, v, bias


def _corrupt(c, g, q, k, v, bias, kw):
    x = c["corrupt"]
    if x == "q-dims":
        q = q.reshape(-1)
    elif x == "k-heads":
        k = torch.cat([k, k[..., :1, :]], dim=-2)
    elif x == "v-tokens":
        v = v[..., 1:, :, :] if v.size(-3) > 1 else torch.cat([v, v], dim=-3)
    elif x == "graph-type":
        g = g.edge_index
    elif x == "scale-nan":
        kw["scale"] = math.nan
    elif x == "scale-str":
        kw["scale"] = "0.5"
    elif x == "bias-shape":
        bias = torch.zeros(g.num_edges + 1)
    elif x == "bias-nan" and g.num_edges:
        bias = torch.zeros(g.num_edges, dtype=q.dtype)
        bias[0] = math.nan
    elif x == "bias-posinf" and g.num_edges:
        bias = torch.zeros(g.num_edges, dtype=q.dtype)
        bias[-1] = math.inf
    elif x == "bias-int":
        bias = torch.zeros(g.num_edges, dtype=torch.long)
    elif x == "backend-name":
        kw["backend"] = "triton"
    elif x == "dtype-int":
        q, k, v = (t.round().long() for t in (q, k, v))
    elif x == "dtype-mixed":
        k = k.float() if k.dtype != torch.float32 else k.double()
    elif x == "head-dim-0":
        q, k = q[..., :0], k[..., :0]
    elif x == "q-meta":             # another device than the graph's
        q = q.to("meta")
    elif x == "bias-meta":
        bias = torch.zeros(g.num_edges, dtype=q.dtype, device="meta")
    elif x == "gqa-indivisible":
        k, v = (torch.cat([t, t[..., :1, :]], dim=-2) for t in (k, v))
        if q.size(-2) % k.size(-2) == 0:
            q = torch.cat([q, q[..., :1, :]], dim=-2)
    return g, q, k, v, bias


@fuzz
@given(c=attention_cases())
def test_graph_attention(c, monkeypatch):
    monkeypatch.setenv("ATTNGRAPH_CUDA_EMULATE", "1")
    mask, g, q, k, v, bias = _build(c)
    dt = c["dtype"]
    q, k, v = (t.to(dt) for t in (q, k, v))
    bias = bias.to(dt) if bias is not None else None
    kw = {"scale": c["scale"], "backend": c["backend"]}
    g2, q2, k2, v2, b2 = _corrupt(c, g, q, k, v, bias, kw)

    def call():
        return ag.graph_attention(q2, k2, v2, g2, edge_bias=b2, return_lse=True, **kw)

    try:
        res = clear_error_or(call, ATTN_NAMES)
    except RuntimeError as e:      # a backend that cannot take the input says why
        assert str(e).startswith("no backend can run graph_attention"), str(e)
        assert kw["backend"] == "cupy" and (dt == torch.float64 or c["corrupt"] != "none")
        return
    if res is None:
        assert c["corrupt"] != "none", "a valid input was refused"
        return
    out, lse = res
    if c["corrupt"] != "none":     # the corruption was harmless (e.g. no edge to spoil)
        assume(False)
    assert not out.isnan().any() and not lse.isnan().any()
    ref, ref_lse = ag.graph_attention(q.double(), k.double(), v.double(), g,
                                      edge_bias=None if bias is None else bias.double(),
                                      return_lse=True, scale=kw["scale"], backend="torch")
    tol = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 3e-2,
           torch.bfloat16: 1e-1}[dt]
    assert torch.allclose(out.double(), ref, atol=tol, rtol=tol)
    if c["batch"] is None and dt == torch.float64 and bias is None:
        dense, _ = dense_attention(q, k, v, mask, scale=kw["scale"])
        assert torch.allclose(out, dense, atol=1e-9)
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    assert torch.allclose(lse.double()[fin], ref_lse[fin], atol=max(tol, 1e-6), rtol=tol)


@fuzz
@given(c=attention_cases(), stage=st.sampled_from(["edge_scores", "edge_softmax", "aggregate"]))
def test_stage_functions(c, stage, monkeypatch):
    monkeypatch.setenv("ATTNGRAPH_CUDA_EMULATE", "1")
    c = dict(c, batch=None)
    _, g, q, k, v, _ = _build(c)
    backend = c["backend"] if c["dtype"] != torch.float64 else "torch"
    q, k, v = (t.to(c["dtype"]) for t in (q, k, v))
    s = ag.ops.edge_scores(q, k, g, backend="torch")
    bad = c["corrupt"] not in ("none", "q-dims", "graph-type", "dtype-int")
    if bad:
        c = dict(c, corrupt="none")
    if c["corrupt"] == "q-dims":
        q, s, v = q.reshape(-1), s.reshape(-1, 1, 1), v.reshape(-1)
    elif c["corrupt"] == "graph-type":
        g = g.edge_index
    elif c["corrupt"] == "dtype-int":
        q, k, v, s = (t.round().long() for t in (q, k, v, s))
    fn = {"edge_scores": lambda: ag.ops.edge_scores(q, k, g, backend=backend),
          "edge_softmax": lambda: ag.ops.edge_softmax(s, g, backend=backend),
          "aggregate": lambda: ag.ops.aggregate(s.to(v.dtype), v, g, backend=backend)}[stage]
    out = clear_error_or(fn, ATTN_NAMES + ["scores", "p"])
    if out is None:
        assert c["corrupt"] != "none", "a valid input was refused"
        return
    assert c["corrupt"] == "none"
    assert not out.isnan().any()
    ref = {"edge_scores": lambda: ag.ops.edge_scores(q, k, g, backend="torch"),
           "edge_softmax": lambda: ag.ops.edge_softmax(s, g, backend="torch"),
           "aggregate": lambda: ag.ops.aggregate(s.to(v.dtype), v, g, backend="torch")}[stage]()
    tol = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 3e-2,
           torch.bfloat16: 2e-1}[c["dtype"]]
    assert torch.allclose(out.double(), ref.double(), atol=tol, rtol=tol)


# ---------------------------------------------------------------------------- layers
@fuzz
@given(n=st.integers(1, 10), f_in=st.integers(1, 6), f_x=st.integers(1, 7),
       heads=st.integers(1, 3), seed=st.integers(0, 999),
       x_dtype=st.sampled_from([torch.float32, torch.float64, torch.int64]),
       ei_kind=st.sampled_from(["ok", "ok", "out-of-range", "float", "1-d"]))
def test_graph_attention_conv_inputs(n, f_in, f_x, heads, seed, x_dtype, ei_kind):
    torch.manual_seed(seed)
    conv = GraphAttentionConv(f_in, 4, heads=heads)
    x = (torch.randn(n, f_x) * 3).to(x_dtype)
    ei = torch.randint(0, n, (2, 3 * n))
    ei = {"ok": ei, "out-of-range": ei + n, "float": ei.float(), "1-d": ei[0]}[ei_kind]
    out = clear_error_or(lambda: conv(x, ei), ["x", "edge_index", "features", "sources",
                                                "targets", "index"])
    if out is None:
        assert f_in != f_x or x_dtype != torch.float32 or ei_kind != "ok"
        return
    assert ei_kind == "ok" and f_x == f_in and x_dtype == torch.float32
    assert out.shape == (n, heads * 4) and not out.isnan().any()


@fuzz
@given(L=st.integers(1, 9), embed=st.sampled_from([4, 8]), x_embed=st.sampled_from([4, 8]),
       batch=st.sampled_from([None, 1, 3]), graph_n=st.integers(1, 9),
       x_dtype=st.sampled_from([torch.float32, torch.float64, torch.int32]))
def test_sparse_self_attention_inputs(L, embed, x_embed, batch, graph_n, x_dtype):
    att = SparseSelfAttention(embed, 2)
    shape = (L, x_embed) if batch is None else (batch, L, x_embed)
    x = torch.randn(shape).to(x_dtype)
    g = masks.sliding_window(graph_n, 1)
    out = clear_error_or(lambda: att(x, g), ["x", "graph", "embed_dim"])
    if out is None:
        assert x_embed != embed or graph_n != L or x_dtype != torch.float32
        return
    assert out.shape == x.shape and not out.isnan().any()


# ---------------------------------------------------------------------------- the CLI
@settings(max_examples=max(5, EXAMPLES // 4), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mask=st.sampled_from(["longformer", "sliding_window", "random", "bigbird", "nope",
                             "hash_buckets"]),
       n=st.sampled_from(["64", "-3", "x", "0", "2"]),
       extra=st.sampled_from([[], ["--window", "3"], ["--window", "-1"], ["--block", "8"],
                              ["--bogus", "1"], ["--buckets", "2"]]))
def test_cli_show_arguments(mask, n, extra, tmp_path, capsys):
    from attngraph import cli

    out = tmp_path / "m.png"
    try:
        rc = cli.main(["show", mask, "--n", n, *extra, "--out", str(out)])
    except SystemExit as e:        # argparse's usage error: exit status 2 and a message
        assert e.code == 2 and "error:" in capsys.readouterr().err
        return
    assert rc in (0, None) and out.exists()


index_lists = st.one_of(st.lists(st.integers(-3, 20), max_size=6), st.just("0,1"),
                        st.just([1.5]), st.just(torch.tensor([[0, 1]])))


@fuzz
@given(n=st.one_of(st.integers(-2, 20), ints), indices=index_lists,
       lengths=st.one_of(st.lists(st.integers(-1, 6), max_size=5), st.just([2.0]), st.just(3)),
       layout=st.lists(st.lists(st.integers(0, 2), min_size=2, max_size=2), max_size=3),
       block=st.one_of(st.integers(-1, 4), ints), causal=st.booleans())
def test_index_and_layout_masks(n, indices, lengths, layout, block, causal):
    g = clear_error_or(lambda: masks.global_tokens(n, indices), ["n", "indices", "index"])
    if g is not None:
        assert_canonical(g)
        ids = set(int(i) for i in torch.as_tensor(indices).flatten().tolist())
        assert all(int(i) in ids or int(j) in ids for j, i in g.edge_index.as_tensor().t().tolist())
    g = clear_error_or(lambda: masks.document(lengths, causal=causal), ["lengths", "length"])
    if g is not None:
        assert_canonical(g)
        assert g.num_dst == sum(lengths)
    lay = torch.tensor(layout, dtype=torch.long) if layout else torch.zeros(0, 0, dtype=torch.long)
    g = clear_error_or(lambda: masks.block_sparse(lay, block), ["layout", "block"])
    if g is not None:
        assert_canonical(g)
