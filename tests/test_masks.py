"""Mask generators against independently written brute-force dense definitions.

Every ``dense_*`` oracle below loops over (i, j) in plain Python, straight from the
definition in the generator's docstring; the generators are vectorised.
"""
import doctest
import importlib

import pytest
import torch

from attngraph import TokenGraph, masks


# ---------------------------------------------------------------------------- helpers
def dense(n_dst, n_src, pred):
    return torch.tensor([[bool(pred(i, j)) for j in range(n_src)] for i in range(n_dst)],
                        dtype=torch.bool).view(n_dst, n_src)


def assert_canonical(g):
    """Edges strictly increasing in (dst, src), int64, contiguous, ptr consistent."""
    ei = g.edge_index.as_tensor()
    assert ei.dtype == torch.int64 and ei.is_contiguous() and ei.shape == (2, g.num_edges)
    key = ei[1] * max(g.num_src, 1) + ei[0]
    assert bool((key[1:] > key[:-1]).all())
    if g.num_edges:
        assert 0 <= int(ei[0].min()) and int(ei[0].max()) < g.num_src
        assert 0 <= int(ei[1].min()) and int(ei[1].max()) < g.num_dst
    assert torch.equal(g.ptr, torch.cat([torch.zeros(1, dtype=torch.long),
                                         torch.bincount(ei[1], minlength=g.num_dst).cumsum(0)]))
    assert g.equal(TokenGraph(ei.clone(), num_src=g.num_src, num_dst=g.num_dst))


def assert_matches(g, expected):
    assert_canonical(g)
    assert (g.num_dst, g.num_src) == tuple(expected.shape)
    assert torch.equal(g.to_dense(), expected)


def case_id(val):
    """Readable ids for list / tuple / range / tensor parameters."""
    if isinstance(val, torch.Tensor):
        return f"tensor{val.tolist()}"
    if isinstance(val, (list, tuple, range)):
        return str(list(val)).replace(" ", "")
    return None


causal_flag = pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])


# ---------------------------------------------------------------------------- windows
@causal_flag
@pytest.mark.parametrize("n", [0, 1, 7, 97])
def test_full(n, causal):
    assert_matches(masks.full(n, causal=causal), dense(n, n, lambda i, j: not causal or j <= i))


@pytest.mark.parametrize("n", [0, 1, 7, 97])
def test_causal(n):
    assert_matches(masks.causal(n), dense(n, n, lambda i, j: j <= i))


@causal_flag
@pytest.mark.parametrize("n,window", [(0, 3), (1, 0), (1, 5), (7, 0), (7, 2), (7, 6), (7, 100),
                                      (97, 5), (257, 16)])
def test_sliding_window(n, window, causal):
    expected = dense(n, n, lambda i, j: abs(i - j) <= window and (not causal or j <= i))
    assert_matches(masks.sliding_window(n, window, causal=causal), expected)


def dense_dilated_window(n, window, dilation, causal):
    step = dilation + 1
    return dense(n, n, lambda i, j: (j - i) % step == 0 and abs(j - i) // step <= window
                 and (not causal or j <= i))


@causal_flag
@pytest.mark.parametrize("n,window,dilation", [(0, 1, 1), (1, 0, 0), (1, 3, 2), (7, 1, 1),
                                               (7, 3, 2), (7, 2, 10), (7, 0, 3), (97, 3, 2),
                                               (97, 0, 3), (97, 200, 1), (257, 4, 7)])
def test_dilated_window(n, window, dilation, causal):
    assert_matches(masks.dilated_window(n, window, dilation, causal=causal),
                   dense_dilated_window(n, window, dilation, causal))


@pytest.mark.parametrize("n,window", [(7, 2), (97, 5)])
def test_dilation_zero_is_sliding_window(n, window):
    assert masks.dilated_window(n, window, 0).equal(masks.sliding_window(n, window))


def dense_strided(n, stride, causal):
    if causal:
        return dense(n, n, lambda i, j: j <= i and (i - j < stride or (i - j) % stride == 0))
    return dense(n, n, lambda i, j: abs(i - j) < stride or (i - j) % stride == 0)


@causal_flag
@pytest.mark.parametrize("n,stride", [(0, 2), (1, 1), (7, 1), (7, 2), (7, 3), (7, 7), (7, 10),
                                      (97, 10), (257, 16)])
def test_strided(n, stride, causal):
    assert_matches(masks.strided(n, stride, causal=causal), dense_strided(n, stride, causal))


def test_strided_defaults_to_causal():
    assert masks.strided(10, 3).equal(masks.strided(10, 3, causal=True))


# ---------------------------------------------------------------------------- dilated blocks
def dense_dilated_block(n, block, dilation, offset):
    step = dilation + 1

    def on(p):
        return (p % block - offset) % step == 0    # Python %: -2 % 2 == 0
    return dense(n, n, lambda i, j: i // block == j // block and on(i) and on(j))


@pytest.mark.parametrize("n,block,dilation,offset", [
    (0, 3, 1, 0), (1, 1, 0, 0), (7, 3, 1, 0), (7, 3, 1, 1), (7, 4, 1, 3), (7, 3, 0, 2),
    (7, 2, 5, 0), (7, 2, 5, 4), (97, 10, 2, 1), (97, 16, 3, 5), (97, 200, 4, 0),
    (97, 8, 1, 100), (257, 32, 1, 0),
])
def test_dilated_block(n, block, dilation, offset):
    assert_matches(masks.dilated_block(n, block, dilation, offset=offset),
                   dense_dilated_block(n, block, dilation, offset))


def test_dilated_block_offset_counts_modulo_step():
    assert masks.dilated_block(40, 8, 2, offset=1).equal(masks.dilated_block(40, 8, 2, offset=4))


# ---------------------------------------------------------------------------- global tokens
@pytest.mark.parametrize("n,indices", [(1, [0]), (7, []), (7, [0]), (7, (3, 3, 6)),
                                       (7, range(7)), (97, [96, 0, 50]),
                                       (97, torch.tensor([5, 6, 7]))], ids=case_id)
def test_global_tokens(n, indices):
    ids = set(int(x) for x in indices)
    assert_matches(masks.global_tokens(n, indices), dense(n, n, lambda i, j: i in ids or j in ids))


def dense_longformer(n, window, ids, dilation, causal):
    win = dense_dilated_window(n, window, dilation, False)
    return dense(n, n, lambda i, j: (bool(win[i, j]) or i in ids or j in ids)
                 and (not causal or j <= i))


@causal_flag
@pytest.mark.parametrize("n,window,ids,dilation", ids=case_id, argvalues=[
    (1, 0, [0], 0), (7, 1, [0], 0), (7, 0, [], 0), (7, 2, [3], 1), (7, 1, [], 2),
    (97, 4, [0, 10, 96], 0), (97, 3, [5, 20, 21], 2), (97, 100, [1], 0), (97, 0, [50], 0),
    (257, 16, [0, 128], 0), (257, 5, [7, 100], 3),
])
def test_longformer(n, window, ids, dilation, causal):
    g = masks.longformer(n, window, ids, dilation=dilation, causal=causal)
    assert_matches(g, dense_longformer(n, window, set(ids), dilation, causal))


def test_longformer_is_window_union_globals():
    g = masks.longformer(50, 3, [0, 25])
    assert g.equal(masks.sliding_window(50, 3) | masks.global_tokens(50, [0, 25]))


# ---------------------------------------------------------------------------- documents
@causal_flag
@pytest.mark.parametrize("lengths", [[], [0], [1], [2, 0, 3], [7], (30, 0, 0, 40, 27),
                                     torch.tensor([3, 1, 0, 5])], ids=case_id)
def test_document(lengths, causal):
    doc = [d for d, length in enumerate(lengths) for _ in range(int(length))]
    n = len(doc)
    assert_matches(masks.document(lengths, causal=causal),
                   dense(n, n, lambda i, j: doc[i] == doc[j] and (not causal or j <= i)))


# ---------------------------------------------------------------------------- dynamic
def _ints(n, high, seed, low=0):
    return torch.randint(low, high, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("causal,strict", [(True, False), (True, True), (False, False)],
                         ids=["causal", "strict", "bidir"])
@pytest.mark.parametrize("n,buckets,seed", [(1, 1, 0), (7, 1, 0), (7, 3, 1), (97, 4, 2),
                                            (97, 16, 3), (257, 8, 4), (0, 1, 0)])
def test_hash_buckets(n, buckets, seed, causal, strict):
    qb = _ints(n, buckets, seed)
    expected = dense(n, n, lambda i, j: qb[i] == qb[j] and (
        not causal or (j < i if strict else j <= i)))
    assert_matches(masks.hash_buckets(qb, causal=causal, strict=strict), expected)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("nq,nk", [(5, 9), (9, 5), (0, 4), (4, 0), (30, 31)])
def test_hash_buckets_cross_attention(nq, nk, causal):
    # Negative and huge ids: only equality of ids matters.
    ids = torch.tensor([-(1 << 40), -1, 7, 1 << 50])
    qb, kb = ids[_ints(nq, 4, 5)], ids[_ints(nk, 4, 6)]
    g = masks.hash_buckets(qb, kb, causal=causal)
    assert_matches(g, dense(nq, nk, lambda i, j: qb[i] == kb[j] and (not causal or j <= i)))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_hash_buckets_integer_dtypes(dtype):
    qb = _ints(20, 3, 7)
    assert masks.hash_buckets(qb.to(dtype)).equal(masks.hash_buckets(qb))


@causal_flag
@pytest.mark.parametrize("nq,nk,seed", [(1, 1, 0), (7, 7, 1), (97, 97, 2), (257, 257, 3),
                                        (7, 12, 4), (12, 7, 5), (0, 3, 6), (3, 0, 7)])
def test_qk_drop(nq, nk, seed, causal):
    keep_q, keep_k = _ints(nq, 2, seed).bool(), _ints(nk, 2, seed + 100).bool()
    expected = dense(nq, nk, lambda i, j: keep_q[i] and keep_k[j] and (not causal or j <= i))
    assert_matches(masks.qk_drop(keep_q, keep_k, causal=causal), expected)


# ---------------------------------------------------------------------------- block layouts
@pytest.mark.parametrize("nb,block,seed", [(1, 1, 0), (1, 4, 1), (3, 2, 2), (6, 5, 3),
                                           (9, 3, 4), (0, 4, 5)])
@pytest.mark.parametrize("dtype", [torch.bool, torch.int64, torch.int32])
def test_block_sparse(nb, block, seed, dtype):
    layout = _ints(nb * nb, 3, seed).view(nb, nb)            # values 0, 1, 2: nonzero attends
    n = nb * block
    expected = dense(n, n, lambda i, j: layout[i // block, j // block] != 0)
    assert_matches(masks.block_sparse(layout.to(dtype), block), expected)


def dense_fixed_layout(nb, L, G, causal):
    """DeepSpeed FixedSparsityConfig block layout (one head, horizontal globals off),
    written from its documentation: local windows of L blocks, the last G blocks of each
    window global; unidirectional rows see a global group from its first block on."""
    layout = [[False] * nb for _ in range(nb)]
    for r in range(nb):
        w0 = r // L * L
        for c in range(w0, min(w0 + L, nb)):
            if not causal or c <= r:
                layout[r][c] = True
    if G:
        groups = [w0 + L - G for w0 in range(0, nb, L) if w0 + L <= nb]
        if nb % L:
            groups.append(max(0, min(nb - nb % L + L - G, nb - G)))
        for s in groups:
            for c in range(s, min(s + G, nb)):
                for r in range(nb):
                    if not causal or r >= s:
                        layout[r][c] = True
    return layout


@causal_flag
@pytest.mark.parametrize("nb,block,L,G", [
    (1, 1, 4, 1), (1, 3, 4, 2), (3, 2, 4, 2), (4, 1, 4, 1), (7, 2, 4, 1), (7, 1, 4, 2),
    (9, 3, 4, 4), (10, 2, 2, 1), (16, 4, 4, 2), (12, 3, 6, 3), (13, 1, 3, 0), (0, 2, 4, 1),
])
def test_fixed(nb, block, L, G, causal):
    layout = dense_fixed_layout(nb, L, G, causal)
    n = nb * block
    expected = dense(n, n, lambda i, j: layout[i // block][j // block]
                     and (not causal or j <= i))
    assert_matches(masks.fixed(n, block, num_local_blocks=L, num_global_blocks=G,
                               causal=causal), expected)


def test_fixed_defaults():
    assert masks.fixed(64, 4).equal(
        masks.fixed(64, 4, num_local_blocks=4, num_global_blocks=1, causal=False))


# ---------------------------------------------------------------------------- random
@causal_flag
@pytest.mark.parametrize("n,per_row", [(0, 3), (1, 1), (7, 0), (7, 3), (7, 7), (7, 50),
                                       (97, 3), (97, 30), (257, 1), (257, 64), (1000, 8)])
def test_random_counts_and_causality(n, per_row, causal):
    g = masks.random(n, per_row, seed=11, causal=causal)
    assert_canonical(g)                                    # canonical: keys distinct per row
    candidates = torch.arange(1, n + 1) if causal else torch.full((n,), n)
    assert torch.equal(g.in_degree(), torch.clamp(candidates, max=per_row))
    if causal:
        assert bool((g.src <= g.dst).all())


@causal_flag
@pytest.mark.parametrize("n,per_row", [(7, 3), (97, 30), (1000, 8)])
def test_random_is_deterministic_per_seed(n, per_row, causal):
    g = masks.random(n, per_row, seed=5, causal=causal)
    assert g.equal(masks.random(n, per_row, seed=5, causal=causal))
    assert not g.equal(masks.random(n, per_row, seed=6, causal=causal))


@pytest.mark.parametrize("n,per_row,causal,seeds", [(40, 10, False, 100), (2000, 10, False, 20),
                                                    (300, 10, True, 50)],
                         ids=["ranked", "redrawn", "causal"])
def test_random_keys_are_uniform(n, per_row, causal, seeds):
    # Key j is picked by row i with probability min(1, per_row / candidates(i)), rows
    # independently: compare every key's count over `seeds` graphs with that, 5 sigma.
    counts = sum(torch.bincount(masks.random(n, per_row, seed=s, causal=causal).src,
                                minlength=n) for s in range(seeds)).double()
    candidates = torch.arange(1, n + 1) if causal else torch.full((n,), n)
    p = torch.clamp(per_row / candidates.double(), max=1.0)
    if causal:   # rows i >= j see key j
        mean, var = p.flip(0).cumsum(0).flip(0), (p * (1 - p)).flip(0).cumsum(0).flip(0)
    else:
        mean, var = p.sum().expand(n), (p * (1 - p)).sum().expand(n)
    assert bool(((counts - seeds * mean).abs() <= 5 * (seeds * var).sqrt() + 1).all())


def test_random_without_replacement_when_dense():
    # per_row close to n exercises score ranking; every row must still be distinct keys.
    g = masks.random(50, 49, seed=0)
    assert torch.equal(g.in_degree(), torch.full((50,), 49))
    assert_canonical(g)


def dense_bigbird_fixed_part(nb, window_blocks, global_blocks):
    half = window_blocks // 2
    return [[abs(r - c) <= half or r < global_blocks or c < global_blocks for c in range(nb)]
            for r in range(nb)]


def block_layout(g, block):
    """Block layout of a token graph whose blocks are all-or-nothing (causal: lower part)."""
    nb = g.num_dst // block
    hit = torch.zeros(nb, nb, dtype=torch.bool)
    hit[g.dst // block, g.src // block] = True
    return hit


@causal_flag
@pytest.mark.parametrize("nb,block,window_blocks,global_blocks,random_blocks", [
    (1, 1, 3, 1, 1), (4, 2, 3, 1, 1), (8, 3, 3, 1, 2), (8, 1, 5, 2, 0), (12, 4, 1, 0, 3),
    (20, 2, 7, 3, 2), (6, 5, 3, 10, 1), (3, 2, 9, 1, 5), (0, 4, 3, 1, 1),
])
def test_bigbird(nb, block, window_blocks, global_blocks, random_blocks, causal):
    n = nb * block
    g = masks.bigbird(n, block, num_window_blocks=window_blocks,
                      num_global_blocks=global_blocks, num_random_blocks=random_blocks,
                      seed=3, causal=causal)
    assert_canonical(g)
    layout = block_layout(g, block)
    # Token level: whole blocks of the layout, cut to j <= i when causal.
    assert torch.equal(g.to_dense(), dense(n, n, lambda i, j: layout[i // block, j // block]
                                           and (not causal or j <= i)))
    # Block level: the window and global parts exactly, plus a few random blocks per row.
    fixed_part = dense_bigbird_fixed_part(nb, window_blocks, global_blocks)
    for r in range(nb):
        expected = {c for c in range(nb) if fixed_part[r][c] and (not causal or c <= r)}
        got = set(layout[r].nonzero().view(-1).tolist())
        assert expected <= got
        assert len(got - expected) <= random_blocks
        if causal:
            assert max(got) <= r
    # The random part is `random` at block level with the same seed.
    rnd = masks.random(nb, random_blocks, seed=3, causal=causal).to_dense()
    fixed_dense = torch.tensor(fixed_part, dtype=torch.bool).view(nb, nb)
    if causal:
        fixed_dense = fixed_dense.tril()
    assert torch.equal(layout, fixed_dense | rnd)


def test_bigbird_random_blocks_depend_on_seed():
    a = masks.bigbird(64 * 4, 4, seed=0)
    assert a.equal(masks.bigbird(64 * 4, 4, seed=0))
    assert not a.equal(masks.bigbird(64 * 4, 4, seed=1))


# ---------------------------------------------------------------------------- chunking
@pytest.mark.parametrize("chunk", [1, 7, 100])
@pytest.mark.parametrize("build", [
    pytest.param(lambda: masks.strided(97, 5, causal=False), id="strided"),
    pytest.param(lambda: masks.longformer(97, 4, [0, 10, 50, 96]), id="longformer"),
    pytest.param(lambda: masks.longformer(97, 3, [5, 20, 21], dilation=2, causal=True),
                 id="longformer-dilated-causal"),
    pytest.param(lambda: masks.global_tokens(97, [3, 40]), id="global_tokens"),
    pytest.param(lambda: masks.bigbird(96, 4, num_random_blocks=2, seed=1, causal=True),
                 id="bigbird-causal"),
    pytest.param(lambda: masks.fixed(96, 4), id="fixed"),
    pytest.param(lambda: masks.hash_buckets(_ints(97, 5, 0)), id="hash_buckets"),
    pytest.param(lambda: masks.dilated_window(97, 3, 2), id="dilated_window"),
])
def test_row_chunking_does_not_change_the_graph(build, chunk, monkeypatch):
    # Tiny chunks exercise the grid (equal rows) and ragged paths with several runs.
    expected = build()
    monkeypatch.setattr("attngraph.chunks.CHUNK_EDGES", chunk)
    g = build()
    assert_canonical(g)
    assert g.equal(expected)


# ---------------------------------------------------------------------------- scale
def test_windows_scale_without_dense_memory():
    n, window = 200_000, 8
    g = masks.sliding_window(n, window)
    assert g.num_edges == n * (2 * window + 1) - window * (window + 1)
    assert int(g.in_degree().max()) == 2 * window + 1


def test_hash_buckets_scale():
    n = 100_000
    qb = _ints(n, 1000, 9)
    g = masks.hash_buckets(qb, causal=False)
    assert g.num_edges == int((torch.bincount(qb) ** 2).sum())


# ---------------------------------------------------------------------------- validation
def bad(case, call, error, match):
    return pytest.param(call, error, match, id=case)


def _long(*shape):
    return torch.zeros(*shape, dtype=torch.long)


def _bool(*shape):
    return torch.ones(*shape, dtype=torch.bool)


@pytest.mark.parametrize("call,error,match", [
    bad("full-negative-n", lambda: masks.full(-1), ValueError, "n must be >= 0, got -1"),
    bad("full-float-n", lambda: masks.full(3.0), TypeError, "n must be an int, got 3.0"),
    bad("full-bool-n", lambda: masks.full(True), TypeError, "n must be an int"),
    bad("full-int-causal", lambda: masks.full(3, causal=1), TypeError,
        "causal must be True or False, got 1"),
    bad("causal-str-n", lambda: masks.causal("4"), TypeError, "n must be an int, got '4'"),
    bad("window-negative", lambda: masks.sliding_window(5, -1), ValueError,
        "window must be >= 0, got -1"),
    bad("window-float", lambda: masks.sliding_window(5, 1.5), TypeError,
        "window must be an int"),
    bad("dilation-negative", lambda: masks.dilated_window(5, 1, -2), ValueError,
        "dilation must be >= 0, got -2"),
    bad("stride-zero", lambda: masks.strided(5, 0), ValueError, "stride must be >= 1, got 0"),
    bad("dilated-block-zero", lambda: masks.dilated_block(5, 0, 1), ValueError,
        "block must be >= 1, got 0"),
    bad("dilated-block-negative-offset", lambda: masks.dilated_block(5, 2, 1, offset=-1),
        ValueError, "offset must be >= 0"),
    bad("global-too-large", lambda: masks.global_tokens(5, [5]), ValueError,
        "holds 5, out of range for n=5"),
    bad("global-negative", lambda: masks.global_tokens(5, [-1]), ValueError,
        "holds -1, out of range"),
    bad("global-int", lambda: masks.global_tokens(5, 2), TypeError,
        "indices must be a list, tuple"),
    bad("global-float-item", lambda: masks.global_tokens(5, [1.0]), TypeError,
        r"indices\[0\] must be an int"),
    bad("global-float-tensor", lambda: masks.global_tokens(5, torch.tensor([0.0])), TypeError,
        "must hold integers"),
    bad("global-2d", lambda: masks.global_tokens(5, _long(1, 1)), ValueError, "must be 1-D"),
    bad("longformer-global-range", lambda: masks.longformer(5, 1, [7]), ValueError,
        "global_indices holds 7"),
    bad("longformer-window", lambda: masks.longformer(5, -1), ValueError,
        "window must be >= 0"),
    bad("random-per-row", lambda: masks.random(5, -1, seed=0), ValueError,
        "per_row must be >= 0, got -1"),
    bad("random-float-seed", lambda: masks.random(5, 2, seed=0.5), TypeError,
        "seed must be an int"),
    bad("random-huge-seed", lambda: masks.random(5, 2, seed=1 << 64), ValueError,
        "seed must be <="),
    bad("random-no-seed", lambda: masks.random(5, 2), TypeError, "seed"),
    bad("bigbird-indivisible", lambda: masks.bigbird(10, 4), ValueError,
        "n divisible by block, got n=10, block=4"),
    bad("bigbird-block-zero", lambda: masks.bigbird(8, 0), ValueError,
        "block must be >= 1, got 0"),
    bad("bigbird-random-negative", lambda: masks.bigbird(8, 4, num_random_blocks=-1),
        ValueError, "num_random_blocks"),
    bad("fixed-indivisible", lambda: masks.fixed(10, 4), ValueError,
        "n divisible by block, got n=10, block=4"),
    bad("fixed-global-not-divisor",
        lambda: masks.fixed(16, 4, num_local_blocks=4, num_global_blocks=3), ValueError,
        "num_global_blocks must divide num_local_blocks"),
    bad("fixed-local-zero", lambda: masks.fixed(16, 4, num_local_blocks=0), ValueError,
        "num_local_blocks must be >= 1"),
    bad("layout-float", lambda: masks.block_sparse(torch.ones(2, 2), 2), TypeError,
        "bool or integer"),
    bad("layout-not-square", lambda: masks.block_sparse(_bool(2, 3), 2), ValueError,
        r"square 2-D .*got shape \[2, 3\]"),
    bad("layout-3d", lambda: masks.block_sparse(_bool(2, 2, 2), 2), ValueError,
        r"pass layout\[h\]"),
    bad("layout-list", lambda: masks.block_sparse([[1]], 2), TypeError,
        "layout must be a torch.Tensor"),
    bad("layout-block-zero", lambda: masks.block_sparse(_bool(2, 2), 0), ValueError,
        "block must be >= 1"),
    bad("document-negative", lambda: masks.document([2, -1]), ValueError,
        "lengths must be >= 0, got -1 at position 1"),
    bad("document-int", lambda: masks.document(3), TypeError, "lengths must be a list, tuple"),
    bad("document-float-tensor", lambda: masks.document(torch.tensor([1.0])), TypeError,
        "must hold integers"),
    bad("buckets-list", lambda: masks.hash_buckets([0, 1]), TypeError,
        "q_buckets must be a 1-D torch.Tensor"),
    bad("buckets-float", lambda: masks.hash_buckets(torch.zeros(3)), TypeError,
        "q_buckets must be an integer tensor, got torch.float32"),
    bad("buckets-bool", lambda: masks.hash_buckets(_bool(3)), TypeError,
        "must be an integer tensor, got torch.bool"),
    bad("buckets-4d", lambda: masks.hash_buckets(_long(2, 2, 2, 2)), ValueError,
        r"q_buckets must be \[L\], \[H, L\] \(per head\) or \[B, H, L\]"),
    bad("key-buckets-float", lambda: masks.hash_buckets(_long(3), torch.zeros(3)), TypeError,
        "k_buckets must be an integer tensor"),
    bad("buckets-strict-bidir", lambda: masks.hash_buckets(_long(3), causal=False, strict=True),
        ValueError, "strict=True only applies with causal=True"),
    bad("keep-q-float", lambda: masks.qk_drop(torch.ones(3), _bool(3)), TypeError,
        "keep_q must be a bool tensor"),
    bad("keep-k-list", lambda: masks.qk_drop(_bool(3), [True]), TypeError,
        "keep_k must be a 1-D torch.Tensor"),
    bad("keep-k-2d", lambda: masks.qk_drop(_bool(3), _bool(1, 3)), ValueError,
        r"keep_k must be 1-D, got shape \[1, 3\]"),
])
def test_invalid_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ---------------------------------------------------------------------------- package
def test_all_exports():
    expected = {"batch", "full", "causal", "sliding_window", "dilated_window", "dilated_block",
                "strided", "global_tokens", "longformer", "random", "bigbird", "block_sparse",
                "fixed", "document", "hash_buckets", "qk_drop", "lsh_buckets", "stack",
                "prefix_lm", "neighborhood", "from_ranges"}
    assert set(masks.__all__) == expected
    assert all(callable(getattr(masks, name)) for name in expected)


def test_batch_of_generated_masks():
    g = masks.batch([masks.causal(2), masks.full(1)])
    assert torch.equal(g.to_dense().int(), torch.tensor([[1, 0, 0], [1, 1, 0], [0, 0, 1]]))


@pytest.mark.parametrize("module", ["windows", "global_tokens", "random", "blocks",
                                    "documents", "dynamic"])
def test_docstring_examples(module):
    mod = importlib.import_module(f"attngraph.masks.{module}")
    names = {name: getattr(mod, name) for name in mod.__all__}
    result = doctest.testmod(mod, extraglobs={"torch": torch, **names},
                             optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
