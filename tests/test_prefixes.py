"""The key-range path's engine for rows reading prefixes of one key segment (hash buckets,
QK-drop): ``attngraph/ops/prefixes.py``, checked against the float64 oracle."""
import pytest
import torch

import attngraph as ag
from attngraph.ops import prefixes, ranges, reference

pytestmark = pytest.mark.skipif(ranges.flash_ops(torch.zeros(1, 1, 4), torch.zeros(1, 1, 4))
                                is None, reason="this torch has no CPU flash kernel")


@pytest.fixture
def small_groups(monkeypatch):
    """Let groups of a few dozen rows qualify, in blocks of a few rows, so that small graphs
    exercise the engine."""
    monkeypatch.setattr(prefixes, "MIN_GROUP_ROWS", 8)
    monkeypatch.setattr(prefixes, "BLOCK_MIN", 8)


def _oracle(q, k, v, graph, scale, w_out, w_lse):
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    out, lse = reference.attention(q, k, v, graph.materialize(), scale=scale)
    loss = (out * w_out.double()).sum() + (torch.where(torch.isinf(lse), 0, lse)
                                           * w_lse.double()).sum()
    loss.backward()
    return out, lse, q.grad, k.grad, v.grad


def _ranges(q, k, v, graph, scale, w_out, w_lse):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = ranges.attention(q, k, v, graph, scale)
    loss = (out.float() * w_out).sum()
    if w_lse.any():
        loss = loss + (torch.where(torch.isinf(lse), 0, lse) * w_lse).sum()
    loss.backward()
    return out, lse, q.grad, k.grad, v.grad


def _check(graph, N_dst, N_src, H=2, H_kv=2, D=16, dtype=torch.float32, use_lse=False,
           seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(N_dst, H, D, generator=gen).to(dtype)
    k = torch.randn(N_src, H_kv, D, generator=gen).to(dtype)
    v = torch.randn(N_src, H_kv, D, generator=gen).to(dtype)
    w_out = torch.randn(N_dst, H, D, generator=gen)
    w_lse = torch.randn(N_dst, H, generator=gen) if use_lse else torch.zeros(N_dst, H)
    got = _ranges(q, k, v, graph, 0.3, w_out, w_lse)
    want = _oracle(q, k, v, graph, 0.3, w_out, w_lse)
    tol = 1e-4 if dtype == torch.float32 else (1e-10 if dtype == torch.float64 else 3e-2)
    names = ("out", "lse", "dq", "dk", "dv")
    for name, a, b in zip(names, got, want):
        a, b = a.double(), b.double()
        if name == "lse":
            assert torch.equal(torch.isneginf(a), torch.isneginf(b)), name
            a, b = torch.where(torch.isinf(a), 0, a), torch.where(torch.isinf(b), 0, b)
        err = float((a - b).detach().abs().max()) / max(1.0, float(b.abs().max()))
        assert err < tol, (name, err)


@pytest.mark.parametrize("num_buckets", [1, 3, 8])
@pytest.mark.parametrize("shared", [True, False])
def test_hash_buckets_match_the_oracle(small_groups, num_buckets, shared):
    gen = torch.Generator().manual_seed(num_buckets)
    N = 700
    qb = torch.randint(0, num_buckets, (N,), generator=gen)
    kb = None if shared else torch.randint(0, num_buckets, (N,), generator=gen)
    g = ag.masks.hash_buckets(qb, kb, implicit=True)
    classes = prefixes.plan(g)
    assert classes is not None
    # several query blocks per group; blocks with an unmasked prefix and a staircase
    assert max(len(c.blocks) for c in classes) >= 4
    assert any(a >= prefixes.SPLIT_MIN and w > a for c in classes for _, _, a, w in c.blocks)
    _check(g, N, N)


def test_qk_drop_and_cross_attention(small_groups):
    gen = torch.Generator().manual_seed(3)
    keep_q = torch.rand(600, generator=gen) > 0.4
    keep_k = torch.rand(900, generator=gen) > 0.6
    g = ag.masks.qk_drop(keep_q, keep_k, implicit=True)
    assert prefixes.plan(g) is not None
    _check(g, 600, 900)
    qb = torch.randint(0, 4, (500,), generator=gen)
    kb = torch.randint(0, 4, (800,), generator=gen)
    g = ag.masks.hash_buckets(qb, kb, implicit=True, strict=True)
    assert prefixes.plan(g) is not None
    _check(g, 500, 800)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_dtypes_and_grouped_heads(small_groups, dtype):
    gen = torch.Generator().manual_seed(5)
    qb = torch.randint(0, 5, (640,), generator=gen)
    kb = torch.randint(0, 5, (640,), generator=gen)
    g = ag.masks.hash_buckets(qb, kb, implicit=True)
    _check(g, 640, 640, H=4, H_kv=2, dtype=dtype)


def test_a_loss_on_lse_takes_the_general_path_and_is_right(small_groups, monkeypatch):
    gen = torch.Generator().manual_seed(6)
    g = ag.masks.qk_drop(torch.rand(500, generator=gen) > 0.3,
                         torch.rand(500, generator=gen) > 0.3, implicit=True)
    calls = []
    monkeypatch.setattr(prefixes, "backward", lambda *a: calls.append(a))
    _check(g, 500, 500, use_lse=True)
    assert not calls


def test_stacked_graphs_through_graph_attention(small_groups):
    gen = torch.Generator().manual_seed(7)
    B, L, H, D = 2, 300, 3, 16
    q, k, v = (torch.randn(B, L, H, D, generator=gen, requires_grad=True) for _ in range(3))
    g = ag.masks.hash_buckets(ag.masks.lsh_buckets(q, 4), ag.masks.lsh_buckets(k, 4),
                              implicit=True)
    out = ag.graph_attention(q, k, v, g, backend="ranges")
    dense = torch.stack([torch.stack([g[b, h].to_dense() for h in range(H)])
                         for b in range(B)])                         # [B, H, Lq, Lk]
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    s = torch.einsum("bqhd,bkhd->bhqk", qd, kd) * D ** -0.5
    p = torch.softmax(s.masked_fill(~dense, float("-inf")), -1).nan_to_num(0.0)
    want = torch.einsum("bhqk,bkhd->bqhd", p, vd)
    w = torch.randn(out.shape, generator=gen)
    (out * w).sum().backward()
    (want * w.double()).sum().backward()
    assert torch.allclose(out.double(), want, atol=1e-5)
    for a, b in ((q.grad, qd.grad), (k.grad, kd.grad), (v.grad, vd.grad)):
        assert torch.allclose(a.double(), b, atol=1e-4)


def test_which_rules_qualify():
    gen = torch.Generator().manual_seed(8)
    drop = ag.masks.qk_drop(torch.rand(4096, generator=gen) > 0.5,
                            torch.rand(4096, generator=gen) > 0.5, implicit=True)
    classes = prefixes.plan(drop)
    assert classes is not None and prefixes.plan(drop) is classes        # kept with it
    assert prefixes.computed_cells(classes) >= drop.num_edges
    # many small groups (hash buckets of ~256 rows), ranges and windows: the general path
    small = ag.masks.hash_buckets(torch.randint(0, 16, (4096,), generator=gen), implicit=True)
    assert prefixes.plan(small) is None
    assert prefixes.plan(ag.masks.causal(4096, implicit=True)) is None
    assert prefixes.plan(ag.masks.sliding_window(4096, 64, implicit=True)) is None


def test_a_rule_of_another_kind_is_turned_away_from_one_row(monkeypatch):
    g = ag.masks.causal(1 << 16, implicit=True)
    asked = []
    real = type(g).runs
    monkeypatch.setattr(type(g), "runs", lambda self, r0, r1: asked.append(r1 - r0)
                        or real(self, r0, r1))
    assert prefixes.plan(g) is None
    assert asked == [1]                  # never the runs of all 65,536 rows


def test_empty_rows_and_no_rows(small_groups):
    keep = torch.zeros(300, dtype=torch.bool)
    g = ag.masks.qk_drop(keep, torch.ones(300, dtype=torch.bool), implicit=True)
    assert prefixes.plan(g) is None                       # no row reads a key
    keep[::2] = True
    g = ag.masks.qk_drop(keep, torch.ones(300, dtype=torch.bool), implicit=True)
    _check(g, 300, 300)                                   # half the rows: 0 and -inf


def test_the_general_path_keeps_its_pieces_for_the_backward(monkeypatch):
    gen = torch.Generator().manual_seed(9)
    g = ag.masks.hash_buckets(torch.randint(0, 16, (2048,), generator=gen), implicit=True)
    assert prefixes.plan(g) is None                       # small buckets: the general path
    planned = []
    real = ranges.pieces
    monkeypatch.setattr(ranges, "pieces", lambda *a, **kw: planned.append(a) or real(*a, **kw))
    q, k, v = (torch.randn(2048, 2, 16, generator=gen, requires_grad=True) for _ in range(3))
    out, _ = ranges.attention(q, k, v, g, 0.25)
    out.sum().backward()
    n = len(planned)
    assert n and 0 < g.caches.ranges["pieces_bytes"] <= ranges.PIECES_CACHE_BYTES
    grads = [t.grad.clone() for t in (q, k, v)]
    # within the budget nothing is planned twice: neither by the backward nor a second call
    for t in (q, k, v):
        t.grad = None
    out2, _ = ranges.attention(q, k, v, g, 0.25)
    out2.sum().backward()
    assert len(planned) == n
    assert torch.equal(out, out2) and all(torch.equal(a, t.grad) for a, t in zip(grads, (q, k, v)))
    # past the budget every pass plans again, with the same result
    monkeypatch.setattr(ranges, "PIECES_CACHE_BYTES", 0)
    g2 = ag.masks.hash_buckets(torch.randint(0, 16, (2048,), generator=gen), implicit=True)
    out3, _ = ranges.attention(q, k, v, g2, 0.25)
    out3.sum().backward()
    assert len(planned) > n + 1 and not any(isinstance(x, tuple) for x in g2.caches.ranges)
