"""Compositions of implicit graphs (``|``, ``&``, ``-``) stay rules: the same edges, in the
same canonical order, and the same attention as the explicit composition, and counting them
never generates an edge."""
import itertools
import operator

import pytest
import torch

import attngraph as ag
from attngraph import masks as M
from attngraph import runs as R
from attngraph.implicit import ImplicitGraph

N = 96          # divisible by the blocks below


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Hundreds of compositions of tiny graphs: one thread (intra-op threads only add
    start-up cost at this size); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

OPS = {"|": operator.or_, "&": operator.and_, "-": operator.sub}


def _bools(seed, p):
    return torch.rand(N, generator=torch.Generator().manual_seed(seed)) < p


FAMILIES = {
    "window": lambda imp: M.sliding_window(N, 5, implicit=imp),
    "window_causal": lambda imp: M.sliding_window(N, 9, causal=True, implicit=imp),
    "dilated": lambda imp: M.dilated_window(N, 3, 6, implicit=imp),
    "dilated_2": lambda imp: M.dilated_window(N, 20, 1, implicit=imp),
    "globals": lambda imp: M.global_tokens(N, [0, 40, 95], implicit=imp),
    "longformer": lambda imp: M.longformer(N, 8, [0, 1, 50, 95], implicit=imp),
    "longformer_dilated": lambda imp: M.longformer(N, 4, [3, 60], dilation=2, causal=True,
                                                   implicit=imp),
    "document": lambda imp: M.document([30, 0, 50, 16], implicit=imp),
    "causal": lambda imp: M.causal(N, implicit=imp),
    "strided": lambda imp: M.strided(N, 10, implicit=imp),
    "fixed": lambda imp: M.fixed(N, 4, num_local_blocks=3, implicit=imp),
    "dilated_block": lambda imp: M.dilated_block(N, 16, 1, offset=1, implicit=imp),
    "hash": lambda imp: M.hash_buckets(
        torch.randint(0, 4, (N,), generator=torch.Generator().manual_seed(0)), implicit=imp),
    "qk_drop": lambda imp: M.qk_drop(_bools(1, 0.7), _bools(2, 0.5), implicit=imp),
}


def _check(u, want):
    assert u.is_implicit
    assert u.num_edges == want.num_edges
    assert torch.equal(u.in_degree(), want.in_degree())
    assert u.equal(want)
    e = u.materialize()
    assert torch.equal(e.src, want.src) and torch.equal(e.dst, want.dst)   # edge for edge


# every family against every other (both orders: a union keeps the first graph's runs
# whole when a rule covers the other's pieces), and each against itself
PAIRS = list(itertools.combinations(FAMILIES, 2)) + [(f, f) for f in FAMILIES]


@pytest.mark.parametrize("a,b", PAIRS)
def test_pairs_equal_the_explicit_composition(a, b):
    A, B = FAMILIES[a](True), FAMILIES[b](True)
    Ae, Be = FAMILIES[a](False), FAMILIES[b](False)
    for op, f in OPS.items():
        _check(f(A, B), f(Ae, Be))
        if a != b:
            _check(f(B, A), f(Be, Ae))


TRIPLES = [("longformer", "dilated", "document"), ("window", "globals", "hash"),
           ("strided", "fixed", "qk_drop"), ("causal", "dilated_block", "longformer_dilated"),
           ("dilated_2", "window_causal", "globals")]


@pytest.mark.parametrize("names", TRIPLES, ids="-".join)
def test_triples_equal_the_explicit_composition(names):
    gs = [FAMILIES[n](True) for n in names]
    es = [FAMILIES[n](False) for n in names]
    for f1, f2 in itertools.product(OPS.values(), repeat=2):
        _check(f2(f1(gs[0], gs[1]), gs[2]), f2(f1(es[0], es[1]), es[2]))
        _check(f1(gs[0], f2(gs[1], gs[2])), f1(es[0], f2(es[1], es[2])))


def _qkv(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(n, 2, 4, generator=gen, dtype=torch.float64, requires_grad=True)
                 for _ in range(3))


def _fwd_bwd(q, k, v, g, **kw):
    out, lse = ag.graph_attention(q, k, v, g, return_lse=True, **kw)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    loss = (out * w).sum() + torch.where(torch.isinf(lse), 0.0, lse).sum()
    return (out, lse) + torch.autograd.grad(loss, (q, k, v))


def _close(got, want):
    for x, y in zip(got, want):
        fin = ~torch.isinf(y)
        assert torch.equal(torch.isinf(x), torch.isinf(y))
        torch.testing.assert_close(x[fin], y[fin], atol=1e-10, rtol=1e-10)


ATTENTION = [("longformer", "|", "dilated"), ("window", "|", "globals"),
             ("hash", "|", "window"), ("document", "&", "strided"),
             ("longformer", "-", "globals"), ("window_causal", "-", "dilated_2"),
             ("fixed", "|", "qk_drop")]


@pytest.mark.parametrize("a,op,b", ATTENTION, ids=lambda x: x)
@pytest.mark.parametrize("backend", ["auto", "ranges", "torch"])
def test_attention_forward_and_backward_equal_the_explicit_graph(a, op, b, backend):
    u = OPS[op](FAMILIES[a](True), FAMILIES[b](True))
    want_graph = OPS[op](FAMILIES[a](False), FAMILIES[b](False))
    q, k, v = _qkv(N)
    want = _fwd_bwd(q, k, v, want_graph, backend="torch")
    _close(_fwd_bwd(q, k, v, u, backend=backend), want)
    assert u._explicit is None                  # never materialised on the way
    if backend == "torch":
        assert torch.equal(u.out_degree(), want_graph.out_degree())
        ptr, src = u.rows(10, 37)
        assert torch.equal(src, want_graph.src[int(want_graph.ptr[10]):int(want_graph.ptr[37])])


def test_fused_kernels_on_a_composition(monkeypatch):
    """backend="cupy" (the CPU emulator) reads the composition's runs like any rule's."""
    monkeypatch.setenv("ATTNGRAPH_CUDA_EMULATE", "1")
    u = FAMILIES["longformer"](True) | FAMILIES["dilated"](True)
    want_graph = FAMILIES["longformer"](False) | FAMILIES["dilated"](False)
    q, k, v = (t.detach().float().requires_grad_() for t in _qkv(N))
    want = _fwd_bwd(q, k, v, want_graph, backend="torch")
    got = _fwd_bwd(q, k, v, u, backend="cupy")
    for x, y in zip(got, want):
        fin = ~torch.isinf(y)
        torch.testing.assert_close(x[fin], y[fin], atol=2e-5, rtol=2e-5)


def _forbid(monkeypatch, *names):
    def forbidden(*a, **kw):
        raise AssertionError("edges were generated")

    for name in names:
        if name in ("rows", "materialize", "edge_chunks"):
            monkeypatch.setattr(ImplicitGraph, name, forbidden)
        else:
            monkeypatch.setattr(R, name, forbidden)


def test_counting_a_union_generates_no_edge(monkeypatch):
    """num_edges, in_degree() and the ranges path on a union add up the runs' counts: a
    test that fails if any of them builds or generates the keys it counts."""
    n = 5000
    a = M.longformer(n, 64, range(16), implicit=True)
    b = M.dilated_window(n, 4, 40, implicit=True)
    want = a.materialize() | b.materialize()
    q, k, v = (torch.randn(n, 1, 8) for _ in range(3))
    want_out = ag.graph_attention(q, k, v, want, backend="torch")
    u = a | b
    _forbid(monkeypatch, "rows", "materialize", "edge_chunks", "from_runs", "generated",
            "fill_rows", "fill_rows_ranked", "union")
    assert u.num_edges == want.num_edges
    assert torch.equal(u.in_degree(), want.in_degree())
    torch.testing.assert_close(ag.graph_attention(q, k, v, u), want_out, atol=1e-5,
                               rtol=1e-5)
    # the union's runs: the longformer's and a few pieces of the window outside them
    runs = u.runs(0, n)
    assert len(runs) <= len(a.runs(0, n)) + 8


@pytest.mark.parametrize("make", [
    lambda: M.sliding_window(N, 6, implicit=True) & M.document([30, 66], implicit=True),
    lambda: M.sliding_window(N, 9, implicit=True) - M.sliding_window(N, 3, implicit=True),
    lambda: M.longformer(N, 8, [0, 50], implicit=True) - M.global_tokens(N, [0, 50],
                                                                         implicit=True),
    lambda: M.causal(N, implicit=True) - M.global_tokens(N, [5, 70], implicit=True),
    lambda: M.dilated_window(N, 9, 2, implicit=True) & M.sliding_window(N, 12,
                                                                        implicit=True),
    lambda: M.dilated_window(N, 9, 2, implicit=True) - M.sliding_window(N, 12,
                                                                        implicit=True),
    lambda: M.sliding_window(N, 12, implicit=True) | M.dilated_window(N, 9, 2,
                                                                      implicit=True),
], ids=["window&document", "window-window", "longformer-globals", "causal-globals",
        "dilated&window", "dilated-window", "window|dilated"])
def test_rules_that_compose_by_counting(monkeypatch, make):
    """Intervals with intervals, a lattice with an interval, anything minus a few table
    keys: composed by counting, no key generated (the documented cases)."""
    g = make()
    _forbid(monkeypatch, "generated")
    g.degrees()
    ranges_out = ag.graph_attention(*(torch.randn(N, 1, 4) for _ in range(3)), g)
    assert ranges_out.shape == (N, 1, 4)


def test_what_no_rule_covers_is_generated_per_row_chunk():
    """A window minus a dense lattice inside it cuts every row into more pieces than
    MAX_CUTS: those rows' keys are generated (still a rule, still exact)."""
    a, b = M.sliding_window(N, 40, implicit=True), M.dilated_window(N, 40, 1, implicit=True)
    assert R.subtract(R.normalized(a.runs(0, N)[0]), [R.normalized(b.runs(0, N)[0])]) is None
    _check(a - b, M.sliding_window(N, 40) - M.dilated_window(N, 40, 1))
    _check(a & b, M.sliding_window(N, 40) & M.dilated_window(N, 40, 1))


def test_explicit_operands_materialise():
    a = M.sliding_window(N, 5, implicit=True)
    r = M.random(N, 3, seed=0)
    for f in OPS.values():
        got = f(a, r)
        assert not got.is_implicit and got.equal(f(a.materialize(), r))


def test_composition_repr_device_and_int32():
    a, b, c = (FAMILIES[n](True) for n in ("window", "globals", "dilated"))
    u = (a | b) & c
    assert "(" in repr(u) and "&" in repr(u) and "|" in repr(u)
    want = (FAMILIES["window"](False) | FAMILIES["globals"](False)) & FAMILIES["dilated"](False)
    assert u.to("cpu") is u
    e32 = u.int32().materialize()
    assert e32.index_dtype == torch.int32 and torch.equal(e32.src.long(), want.src)
    with pytest.raises(ValueError):
        a | M.sliding_window(N + 1, 5, implicit=True)


def test_ranked_fill_orders_disjoint_runs():
    """from_runs(ordered=False): runs given out of key order come out canonical."""
    rows = torch.arange(6)
    runs = [R.Range(rows + 10, torch.full_like(rows, 3)),          # 10+i .. 12+i
            R.Take(torch.tensor([0, 2, 4, 31, 40]), torch.zeros_like(rows),
                   torch.tensor([0, 1, 2, 3, 5, 5])),
            R.Range(rows + 20, torch.tensor([2, 0, 1, 0, 3, 1]), 3)]
    got = R.from_runs(50, 6, runs, ordered=False)
    dense = torch.zeros(6, 50, dtype=torch.bool)
    for run in runs:
        for i in range(6):
            for k in range(int(run.count[i])):
                dense[i, int(R.run_values(run, torch.tensor(i), torch.tensor(k)))] = True
    assert got.equal(ag.TokenGraph.from_dense(dense))


def test_the_benchmark_puts_the_composition_beside_its_parts(tmp_path, monkeypatch):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    from benchmarks import compose

    out = tmp_path / "compose.md"
    compose.main(["--n", "3000", "--rounds", "1", "--cases", "0,3", "--ops",
                  "num_edges,graph_attention", "--out", str(out)])
    text = out.read_text()
    assert "| a | b | a op b | ratio |" in text and text.count("| graph_attention |") == 2
    assert "\\| dilated_window(4, 100)" in text and "--n 3000 --rounds 1" in text
