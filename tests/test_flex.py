"""FlexAttention interop: ``TokenGraph.to_block_mask`` / ``TokenGraph.from_block_mask``.

The dense oracle for a BlockMask is FlexAttention's own: ``create_mask(mask_mod, ...)``
(``mask_mod`` under ``torch.vmap``) restricted to the blocks the BlockMask lists
(``bm.to_dense()``), which is exactly what ``flex_attention`` computes on.
"""
import doctest
import warnings

import pytest
import torch
from torch.nn.attention.flex_attention import (BlockMask, create_block_mask, create_mask,
                                               flex_attention)

import attngraph
from attngraph import TokenGraph, masks
from attngraph import chunks, flex

from helpers import qkv, random_graph


# ---------------------------------------------------------------------------- helpers
def _divisor(n, at_most=8):
    """Largest block size <= at_most dividing n (generators that need n % block == 0)."""
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


def _keep(n, seed, p=0.7):
    return torch.rand(n, generator=torch.Generator().manual_seed(seed)) < p


def _buckets(n, seed, num=4):
    return torch.randint(num, (n,), generator=torch.Generator().manual_seed(seed))


def _lengths(n):
    out, left, step = [], n, 1
    while left:
        out.append(min(left, 3 * step + 2))
        left -= out[-1]
        step = step * 2 % 11
    return out


# every family of attngraph.masks at about n tokens (block_sparse: a multiple of its block)
FAMILIES = {
    "full": lambda n: masks.full(n),
    "full_causal": lambda n: masks.full(n, causal=True),
    "causal": lambda n: masks.causal(n),
    "sliding_window": lambda n: masks.sliding_window(n, 5),
    "sliding_window_causal": lambda n: masks.sliding_window(n, 20, causal=True),
    "dilated_window": lambda n: masks.dilated_window(n, 3, 2),
    "dilated_block": lambda n: masks.dilated_block(n, 16, 1, offset=1),
    "global_tokens": lambda n: masks.global_tokens(n, sorted({0, n // 2, n - 1})),
    "random": lambda n: masks.random(n, 3, seed=1),
    "longformer": lambda n: masks.longformer(n, 4, [0], dilation=1),
    "bigbird": lambda n: masks.bigbird(n, _divisor(n), seed=2),
    "block_sparse": lambda n: masks.block_sparse(
        torch.rand(max(n // 5, 1), max(n // 5, 1),
                   generator=torch.Generator().manual_seed(3)) < 0.4, 5 if n >= 5 else 1),
    "fixed": lambda n: masks.fixed(n, _divisor(n), num_local_blocks=2, num_global_blocks=1),
    "strided": lambda n: masks.strided(n, 7),
    "document": lambda n: masks.document(_lengths(n), causal=True),
    "hash_buckets": lambda n: masks.hash_buckets(_buckets(n, 4)),
    "qk_drop": lambda n: masks.qk_drop(_keep(n, 5), _keep(n, 6)),
}

SIZES = [(1, 16), (37, 16), (130, 64), (300, 128)]


def token_layout(bm, which="all"):
    """Token-level ``[Q_LEN, KV_LEN]`` view of the blocks a BlockMask lists (``"all"``:
    partial or full, ``"full"``: full only)."""
    bq, bk = bm.BLOCK_SIZE
    q_len, kv_len = bm.seq_lengths
    if which == "all":
        layout = bm.to_dense()[0, 0]
    elif bm.full_kv_num_blocks is None:
        return torch.zeros(q_len, kv_len, dtype=torch.bool)
    else:
        layout = BlockMask.from_kv_blocks(bm.full_kv_num_blocks, bm.full_kv_indices,
                                          BLOCK_SIZE=bm.BLOCK_SIZE).to_dense()[0, 0]
    tokens = layout.bool().repeat_interleave(bq, 0).repeat_interleave(bk, 1)
    return tokens[:q_len, :kv_len]


def flex_dense(bm):
    """What flex_attention computes on: mask_mod (vmapped) inside the listed blocks, and
    every cell of a full block."""
    q_len, kv_len = bm.seq_lengths
    mod = create_mask(bm.mask_mod, 1, 1, q_len, kv_len, device="cpu")[0, 0]
    return (mod & token_layout(bm)) | token_layout(bm, "full")


def check_block_mask(g, bm, block_size):
    """``bm`` is the graph's mask, block by block and cell by cell."""
    nq, nk = -(-g.num_dst // block_size), -(-g.num_src // block_size)
    assert isinstance(bm, BlockMask)
    assert bm.seq_lengths == (g.num_dst, g.num_src)
    assert tuple(bm.BLOCK_SIZE) == (block_size, block_size)
    assert bm.kv_num_blocks.shape == bm.full_kv_num_blocks.shape == (1, 1, nq)
    assert bm.kv_indices.shape == bm.full_kv_indices.shape == (1, 1, nq, nk)
    for t in (bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices):
        assert t.dtype == torch.int32
    dense = g.to_dense()
    # the mask_mod is exact on every cell (FlexAttention's eager path evaluates it on all)
    assert torch.equal(create_mask(bm.mask_mod, 1, 1, g.num_dst, g.num_src, device="cpu")[0, 0],
                       dense)
    assert torch.equal(flex_dense(bm), dense)
    # listed blocks are exactly the non-empty tiles, and full blocks are truly full
    padded = torch.zeros(nq * block_size, nk * block_size, dtype=torch.bool)
    padded[:g.num_dst, :g.num_src] = dense
    tiles = padded.view(nq, block_size, nk, block_size).sum((1, 3))
    assert torch.equal(bm.to_dense()[0, 0].bool(), tiles > 0)
    full = BlockMask.from_kv_blocks(bm.full_kv_num_blocks, bm.full_kv_indices).to_dense()[0, 0]
    assert torch.equal(full.bool(), tiles == block_size * block_size)


# ---------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("n,block_size", SIZES, ids=[f"n{n}-bs{b}" for n, b in SIZES])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_round_trip_families(family, n, block_size):
    g = FAMILIES[family](n)
    bm = g.to_block_mask(block_size)
    check_block_mask(g, bm, block_size)
    back = TokenGraph.from_block_mask(bm)
    assert back.equal(g)
    assert torch.equal(back.to_dense(), g.to_dense())


@pytest.mark.parametrize("num_dst,num_src,block_size", [(37, 130, 16), (130, 37, 64),
                                                         (1, 300, 128), (200, 3, 16)])
def test_round_trip_bipartite(num_dst, num_src, block_size):
    _, g = random_graph(num_dst, num_src, p=0.2, seed=7, empty_rows=(0,),
                        full_rows=(num_dst - 1,))
    bm = g.to_block_mask(block_size)
    check_block_mask(g, bm, block_size)
    assert TokenGraph.from_block_mask(bm).equal(g)


@pytest.mark.parametrize("num_dst,num_src", [(0, 0), (0, 5), (5, 0), (5, 5), (130, 37)])
def test_round_trip_empty(num_dst, num_src):
    g = TokenGraph(torch.empty(2, 0, dtype=torch.long), num_src=num_src, num_dst=num_dst)
    bm = g.to_block_mask(16)
    assert bm.seq_lengths == (num_dst, num_src)
    assert int(bm.kv_num_blocks.sum()) == int(bm.full_kv_num_blocks.sum()) == 0
    back = TokenGraph.from_block_mask(bm)
    assert back.equal(g) and back.num_edges == 0


def test_matches_create_block_mask_exactly():
    """Same block lists as FlexAttention builds for the same mask (causal, N = 130)."""
    ours = masks.causal(130).to_block_mask(16)
    theirs = create_block_mask(lambda b, h, q, kv: q >= kv, 1, 1, 130, 130, device="cpu",
                               BLOCK_SIZE=16)
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                 "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"):
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name


def test_docstring_example():
    result = doctest.testmod(flex, extraglobs={"torch": torch, "attngraph": attngraph},
                             optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_methods_delegate():
    g = masks.sliding_window(100, 3)
    bm = attngraph.flex.to_block_mask(g, 32)
    assert torch.equal(g.to_block_mask(32).kv_indices, bm.kv_indices)
    assert flex.from_block_mask(bm).equal(TokenGraph.from_block_mask(bm))


# ---------------------------------------------------------------------------- mask -> graph
def _doc_ids(n):
    """Document id of each of n tokens: four documents, one of them empty."""
    lengths = torch.tensor([n // 4, n // 2, 0, n - n // 4 - n // 2])
    return torch.repeat_interleave(torch.arange(4), lengths)


MASK_MODS = {
    # name: (mask_mod(b, h, q, kv), predicate(q [R, 1], kv [1, S]) for from_mask_mod)
    "causal": (lambda b, h, q, kv: q >= kv, lambda q, kv: q >= kv),
    "sliding_window": (lambda b, h, q, kv: (q - kv).abs() <= 9,
                       lambda q, kv: (q - kv).abs() <= 9),
    "causal_window": (lambda b, h, q, kv: (q >= kv) & (q - kv < 20),
                      lambda q, kv: (q >= kv) & (q - kv < 20)),
    "prefix_lm": (lambda b, h, q, kv: (kv < 10) | (q >= kv), lambda q, kv: (kv < 10) | (q >= kv)),
    # written for 0-d indices only (torch.stack needs equal shapes): evaluated under vmap
    "vmap_only": (lambda b, h, q, kv: torch.stack([q, kv])[0] >= torch.stack([q, kv])[1],
                  lambda q, kv: q >= kv),
}


@pytest.mark.parametrize("separate_full", [True, False], ids=["full_blocks", "no_full_blocks"])
@pytest.mark.parametrize("n,block_size", [(1, 16), (37, 16), (130, 64), (300, 128)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("name", list(MASK_MODS))
def test_from_create_block_mask(name, n, block_size, separate_full):
    mod, pred = MASK_MODS[name]
    bm = create_block_mask(mod, 1, 1, n, n, device="cpu", BLOCK_SIZE=block_size,
                           separate_full_blocks=separate_full)
    g = TokenGraph.from_block_mask(bm)
    expected = TokenGraph.from_mask_mod(pred, n)
    assert g.equal(expected)
    assert torch.equal(g.to_dense(), flex_dense(bm))


def test_from_block_mask_vmap_fallback(monkeypatch):
    """A mask_mod that fails on broadcast indices is evaluated under vmap, and only it."""
    calls = []
    eval_vmap = flex._eval_vmap

    def counting(mask_mod, *args):
        calls.append(mask_mod)
        return eval_vmap(mask_mod, *args)

    monkeypatch.setattr(flex, "_eval_vmap", counting)
    vmap_only, _ = MASK_MODS["vmap_only"]
    bm = create_block_mask(vmap_only, 1, 1, 70, 70, device="cpu", BLOCK_SIZE=16)
    assert TokenGraph.from_block_mask(bm).equal(masks.causal(70))
    assert calls and all(c is vmap_only for c in calls)
    calls.clear()
    assert TokenGraph.from_block_mask(masks.causal(70).to_block_mask(16)).equal(masks.causal(70))
    assert calls == []


def test_from_create_block_mask_captured_tensor_bipartite():
    """A mask_mod indexing a captured tensor (documents), Q_LEN != KV_LEN, BLOCK_SIZE (q, kv)."""
    q_doc, kv_doc = _doc_ids(70), _doc_ids(150)

    def mod(b, h, q, kv):
        return q_doc[q] == kv_doc[kv]

    bm = create_block_mask(mod, 1, 1, 70, 150, device="cpu", BLOCK_SIZE=(16, 32))
    g = TokenGraph.from_block_mask(bm)
    assert (g.num_dst, g.num_src) == (70, 150)
    assert torch.equal(g.to_dense(), q_doc.view(-1, 1) == kv_doc.view(1, -1))


def _per_head_window(b, h, q, kv):
    return (q - kv).abs() <= 4 * b + 8 * h + 1


@pytest.mark.parametrize("batch,head", [(0, 0), (0, 2), (1, 0), (1, 1)],
                         ids=lambda v: str(v))
def test_from_block_mask_batch_and_head(batch, head):
    """B, H > 1: each (batch, head) reads its own block lists, mask_mod gets b and h."""
    bm = create_block_mask(_per_head_window, 2, 3, 100, 100, device="cpu", BLOCK_SIZE=16)
    g = TokenGraph.from_block_mask(bm, batch=batch, head=head)
    assert g.equal(masks.sliding_window(100, 4 * batch + 8 * head + 1))


def test_from_block_mask_broadcast_batch():
    """A BlockMask with B = H = 1 broadcasts: any batch / head reads its one block list."""
    bm = masks.causal(40).to_block_mask(16)
    assert TokenGraph.from_block_mask(bm, batch=5, head=3).equal(masks.causal(40))


def test_from_block_mask_full_blocks_clip_to_seq_lengths():
    """Full blocks hanging over seq_lengths give only their in-range cells."""
    ones = torch.ones(1, 1, 3, dtype=torch.int32)
    idx = torch.arange(3, dtype=torch.int32).expand(1, 1, 3, 3).contiguous()
    bm = BlockMask.from_kv_blocks(torch.zeros_like(ones), idx, 3 * ones, idx, BLOCK_SIZE=16,
                                  seq_lengths=(40, 35))
    everything = TokenGraph.from_dense(torch.ones(40, 35, dtype=torch.bool))
    assert TokenGraph.from_block_mask(bm).equal(everything)


def test_from_block_mask_bounded_chunks(monkeypatch):
    """Chunks of one block at a time give the same graph."""
    g = masks.longformer(300, 5, [0, 299])
    bm = g.to_block_mask(16)
    monkeypatch.setattr(chunks, "MASK_MOD_CHUNK_ELEMENTS", 1)
    assert TokenGraph.from_block_mask(bm).equal(g)


# ---------------------------------------------------------------------------- attention
ATTN_CASES = {
    "sliding_window": lambda: masks.sliding_window(50, 5),
    "longformer_causal": lambda: masks.longformer(64, 4, [0, 33], causal=True),
    "document": lambda: masks.document([10, 0, 25, 14]),
    "qk_drop": lambda: masks.qk_drop(_keep(45, 8), _keep(45, 9)),
    "bigbird": lambda: masks.bigbird(48, 8, seed=3),
    "bipartite": lambda: random_graph(40, 56, p=0.3, seed=10, empty_rows=(3,))[1],
}


@pytest.mark.parametrize("case", list(ATTN_CASES))
def test_flex_attention_matches_graph_attention(case):
    g = ATTN_CASES[case]()
    q, k, v = qkv(g.num_dst, g.num_src, 2, 2, 8, dtype=torch.float32, seed=11, grad=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "flex_attention called without torch.compile")
        out = flex_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                             v.transpose(0, 1)[None], block_mask=g.to_block_mask(16))
    out = out[0].transpose(0, 1)                                       # [N_dst, H, D]
    ref = attngraph.graph_attention(q, k, v, g)
    rows = g.in_degree() > 0
    assert out.shape == ref.shape
    torch.testing.assert_close(out[rows], ref[rows], rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize("block_size,error", [(0, ValueError), (-16, ValueError),
                                              (16.0, TypeError), (True, TypeError),
                                              ("128", TypeError), (None, TypeError)],
                         ids=["zero", "negative", "float", "bool", "str", "none"])
def test_to_block_mask_bad_block_size(block_size, error):
    with pytest.raises(error, match="block_size"):
        masks.causal(10).to_block_mask(block_size)


@pytest.mark.parametrize("graph", [torch.ones(4, 4, dtype=torch.bool), None],
                         ids=["dense_tensor", "none"])
def test_to_block_mask_not_a_graph(graph):
    with pytest.raises(TypeError, match="TokenGraph"):
        flex.to_block_mask(graph)


@pytest.mark.parametrize("block_mask", [masks.causal(4), torch.ones(4, 4, dtype=torch.bool)],
                         ids=["graph", "dense_tensor"])
def test_from_block_mask_not_a_block_mask(block_mask):
    with pytest.raises(TypeError, match="BlockMask"):
        TokenGraph.from_block_mask(block_mask)


@pytest.mark.parametrize("kwargs,error", [({"batch": 2}, ValueError), ({"head": 3}, ValueError),
                                          ({"batch": -1}, ValueError), ({"head": 1.0}, TypeError)],
                         ids=["batch_range", "head_range", "negative", "float"])
def test_from_block_mask_bad_index(kwargs, error):
    bm = create_block_mask(lambda b, h, q, kv: q >= kv, 2, 3, 32, 32, device="cpu",
                           BLOCK_SIZE=16)
    with pytest.raises(error, match=next(iter(kwargs))):
        TokenGraph.from_block_mask(bm, **kwargs)


def test_from_block_mask_non_bool_mask_mod():
    bm = BlockMask.from_kv_blocks(torch.ones(1, 1, 1, dtype=torch.int32),
                                  torch.zeros(1, 1, 1, 1, dtype=torch.int32), BLOCK_SIZE=8,
                                  mask_mod=lambda b, h, q, kv: q - kv, seq_lengths=(8, 8))
    with pytest.raises(TypeError, match="bool"):
        TokenGraph.from_block_mask(bm)
