"""Neighbourhoods, prefix-LM and rectangle unions: each generator, explicit and implicit,
against a brute-force dense definition written here, attention on them against the dense
float64 oracle, bad arguments; grid orders (Hilbert, Morton)."""
import itertools
import math

import pytest
import torch

import attngraph as ag
from attngraph.masks import from_ranges, neighborhood, prefix_lm
from attngraph.runs import from_runs

from helpers import dense_attention


# ---------------------------------------------------------------------------- definitions
def axis_window(c, size, k, d, causal):
    """Keys of coordinate ``c`` along one axis, by definition: the members of its dilation
    group; causal: the last ``k`` of them up to ``c``; else, among the windows of ``k``
    consecutive members that contain ``c``, the one whose centre member is nearest ``c``
    (the whole group when it has fewer than ``k`` members)."""
    group = [x for x in range(size) if x % d == c % d]
    if causal:
        return [x for x in group if x <= c][-k:]
    if len(group) <= k:
        return group
    windows = [group[s:s + k] for s in range(len(group) - k + 1) if c in group[s:s + k]]
    return min(windows, key=lambda w: abs(w[k // 2] - c))


def dense_neighborhood(shape, kernel, dilation, causal):
    rank = len(shape)
    kernel, dilation, causal = ((x,) * rank if not isinstance(x, tuple) else x
                                for x in (kernel, dilation, causal))
    n = math.prod(shape)
    mask = torch.zeros(n, n, dtype=torch.bool)
    cells = list(itertools.product(*(range(s) for s in shape)))
    flat = {cell: i for i, cell in enumerate(cells)}
    for cell in cells:
        wins = [axis_window(c, s, k, d, ca)
                for c, s, k, d, ca in zip(cell, shape, kernel, dilation, causal)]
        for key in itertools.product(*wins):
            mask[flat[cell], flat[key]] = True
    return mask


def dense_prefix_lm(n, prefix):
    return torch.tensor([[j <= i or j < prefix for j in range(n)] for i in range(n)],
                        dtype=torch.bool).reshape(n, n)


def dense_ranges(q_ranges, k_ranges, kinds, n):
    mask = torch.zeros(n, n, dtype=torch.bool)
    for (qa, qb), (ka, kb), kind in zip(q_ranges, k_ranges, kinds):
        for i in range(qa, qb):
            for j in range(ka, kb):
                if kind == "full" or (j - ka) <= (i - qa) + ((kb - ka) - (qb - qa)):
                    mask[i, j] = True
    return mask


def check_both_forms(make, dense):
    explicit, implicit = make(False), make(True)
    assert not explicit.is_implicit and implicit.is_implicit
    assert torch.equal(explicit.to_dense(), dense)
    assert torch.equal(implicit.to_dense(), dense)
    assert implicit.equal(explicit) and explicit.equal(implicit)
    assert implicit.num_edges == int(dense.sum())
    assert torch.equal(implicit.in_degree(), dense.sum(1))
    return explicit, implicit


# ---------------------------------------------------------------------------- neighborhood
NEIGHBORHOOD_CASES = [
    # 1-D: borders, dilation with groups of unequal size, causal, kernel = size
    ((9,), 3, 1, False), ((9,), 5, 2, False), ((10,), 3, 3, False), ((7,), 7, 1, False),
    ((11,), 5, 1, True), ((11,), 3, 2, True), ((5,), 1, 1, False), ((6,), 3, 4, False),
    ((7,), 5, 2, False),               # groups of 4 and 3 members: smaller than the kernel
    ((1,), 1, 1, False), ((4,), 3, 9, False),
    # 2-D
    ((6, 7), 3, 1, False), ((7, 6), (5, 3), (1, 2), False), ((8, 8), 3, 2, False),
    ((5, 9), (3, 5), 1, (True, False)), ((6, 6), 5, 1, True), ((9, 4), (3, 1), (3, 1), False),
    ((4, 10), (3, 7), (1, 1), (False, True)), ((1, 8), (1, 3), 1, False),
    # 3-D
    ((4, 5, 6), 3, 1, False), ((4, 4, 5), (3, 1, 5), (1, 2, 1), (True, False, False)),
    ((5, 3, 4), (1, 3, 3), (2, 1, 1), False), ((3, 4, 5), 3, (1, 1, 2), (False, True, True)),
]


def case_id(case):
    shape, k, d, c = case
    return f"{'x'.join(map(str, shape))}-k{k}-d{d}-{'c' if c else 'nc'}{c if isinstance(c, tuple) else ''}"


@pytest.mark.parametrize("case", NEIGHBORHOOD_CASES, ids=[case_id(c) for c in NEIGHBORHOOD_CASES])
def test_neighborhood_matches_definition(case):
    shape, kernel, dilation, causal = case
    dense = dense_neighborhood(shape, kernel, dilation, causal)
    shape_arg = shape[0] if len(shape) == 1 else shape
    check_both_forms(lambda imp: neighborhood(shape_arg, kernel, dilation, causal,
                                              implicit=imp), dense)


@pytest.mark.parametrize("size,k,d", [(9, 3, 1), (9, 5, 2), (13, 5, 3), (10, 3, 4),
                                      (8, 7, 1), (16, 5, 3)])
def test_exactly_kernel_keys_when_the_group_is_large_enough(size, k, d):
    """NATTEN's border rule: the window shifts inward, it never shrinks, whenever the
    query's dilation group has at least ``kernel`` members."""
    deg = neighborhood(size, k, d).in_degree()
    for i in range(size):
        members = len(range(i % d, size, d))
        assert int(deg[i]) == min(k, members)
        if members >= k:
            assert int(deg[i]) == k


def test_neighborhood_2d_is_a_product_of_1d_windows():
    """Rows of the 2-D mask are outer products of the 1-D masks along each axis."""
    h, w = 7, 9
    g = neighborhood((h, w), (3, 5), (2, 1)).to_dense().view(h, w, h, w)
    rows = neighborhood(h, 3, 2).to_dense()
    cols = neighborhood(w, 5, 1).to_dense()
    assert torch.equal(g, rows[:, None, :, None] & cols[None, :, None, :])


def test_neighborhood_rule_gives_one_range_per_window_row():
    """The implicit form: one run per window position on the axes before the last, steps
    of the last axis' dilation, keys strictly increasing across the row."""
    g = neighborhood((6, 8, 10), (3, 5, 3), (1, 2, 3), implicit=True)
    runs = g.runs(0, g.num_dst)
    assert len(runs) == 3 * 5
    assert all(r.step == 3 for r in runs)
    keys = torch.stack([r.start for r in runs], 1)
    counts = torch.stack([r.count for r in runs], 1)
    # consecutive non-empty runs of a row never overlap or go backwards
    last = keys + (counts - 1) * 3
    for j in range(1, len(runs)):
        both = (counts[:, j] > 0) & (counts[:, :j] > 0).any(1)
        prev_last = torch.where(counts[:, :j] > 0, last[:, :j], -1).max(1).values
        assert bool((keys[:, j][both] > prev_last[both]).all())
    assert from_runs(g.num_src, g.num_dst, runs).equal(g)


def test_neighborhood_large_implicit_stores_no_edges(monkeypatch):
    from attngraph.implicit import ImplicitGraph

    def forbidden(self, *args):
        raise AssertionError("the edge list was built")

    monkeypatch.setattr(ImplicitGraph, "materialize", forbidden)
    g = neighborhood((512, 512), 13, implicit=True)
    assert g.num_edges == 512 * 512 * 169
    assert int(g.in_degree().min()) == 169


@pytest.mark.parametrize("args,kwargs,error,message", [
    (((8, 8), 4), {}, ValueError, "kernel must be odd"),
    (((8, 8), (3, 2)), {}, ValueError, "got 2 on axis 1"),
    (((8, 8), 9), {}, ValueError, "exceeds that axis"),
    (((8, 4), (3, 5)), {}, ValueError, "kernel 5 on axis 1"),
    (((8, 8), 3, 0), {}, ValueError, "dilation must be >= 1"),
    (((8, 8), 3, (1, 0)), {}, ValueError, "dilation[1] must be >= 1"),
    (((8, 8), (3, 3, 3)), {}, ValueError, "one per axis of the 2-D grid"),
    (((8, 8), 3, (1, 1, 1)), {}, ValueError, "dilation must be one value or 2"),
    (((8, 8), 3, 1, (True,)), {}, ValueError, "causal must be one value or 2"),
    (((2, 2, 2, 2), 1), {}, ValueError, "1, 2 or 3 axes"),
    (((), 1), {}, ValueError, "1, 2 or 3 axes"),
    (((8, 0), 1), {}, ValueError, "shape[1] must be >= 1"),
    (((8, 8.0), 1), {}, TypeError, "shape[1] must be an int"),
    (("8x8", 1), {}, TypeError, "shape must be an int or a tuple"),
    (((8, 8), 3.0), {}, TypeError, "kernel must be an int"),
    (((8, 8), 3, 1, 1), {}, TypeError, "causal must be True or False"),
    (((8, 8), 3), {"implicit": 1}, TypeError, "implicit must be True or False"),
    (((70000, 70000), 1), {}, ValueError, "more than the"),
], ids=["even", "even-axis", "kernel-too-big", "kernel-too-big-axis", "dilation-0",
        "dilation-axis-0", "kernel-rank", "dilation-rank", "causal-rank", "rank-4", "rank-0",
        "empty-axis", "float-shape", "str-shape", "float-kernel", "int-causal",
        "int-implicit", "too-many-cells"])
def test_neighborhood_bad_arguments(args, kwargs, error, message):
    with pytest.raises(error, match=message.replace("[", r"\[").replace("]", r"\]")):
        neighborhood(*args, **kwargs)


# ---------------------------------------------------------------------------- prefix_lm
@pytest.mark.parametrize("n,prefix", [(1, 0), (1, 1), (7, 0), (7, 3), (7, 7), (12, 5),
                                      (0, 0)])
def test_prefix_lm_matches_definition(n, prefix):
    g, _ = check_both_forms(lambda imp: prefix_lm(n, prefix, implicit=imp),
                            dense_prefix_lm(n, prefix))
    assert g.num_edges == n * (n + 1) // 2 + prefix * (prefix - 1) // 2


@pytest.mark.parametrize("args,error,message", [
    ((8, 9), ValueError, "prefix must be <= 8"),
    ((8, -1), ValueError, "prefix must be >= 0"),
    ((8, 2.0), TypeError, "prefix must be an int"),
    ((-1, 0), ValueError, "n must be >= 0"),
])
def test_prefix_lm_bad_arguments(args, error, message):
    with pytest.raises(error, match=message):
        prefix_lm(*args)


# ---------------------------------------------------------------------------- from_ranges
RANGE_CASES = {
    # FlashMask's document mask: causal blocks on the diagonal
    "documents": ([(0, 3), (3, 8), (8, 12)], [(0, 3), (3, 8), (8, 12)], "causal", 12),
    # shared question: answers see the question and themselves causally
    "shared-question": ([(0, 4), (4, 7), (7, 10), (4, 7), (7, 10)],
                        [(0, 4), (4, 7), (7, 10), (0, 4), (0, 4)],
                        ["causal", "causal", "causal", "full", "full"], 10),
    # prefix-LM as two rectangles that overlap
    "prefix-overlap": ([(0, 11), (0, 11)], [(0, 11), (0, 4)], ["causal", "full"], 11),
    # unequal lengths, aligned at the bottom-right: more keys than queries, and fewer
    "causal-wide": ([(5, 8)], [(0, 8)], "causal", 9),
    "causal-tall": ([(0, 8)], [(2, 5)], "causal", 9),
    # MagiAttention-style slices: overlapping, unsorted, with empty ranges
    "slices": ([(6, 10), (0, 5), (2, 9), (3, 3), (1, 4), (0, 10)],
               [(0, 2), (3, 9), (5, 7), (0, 10), (4, 4), (8, 10)],
               ["full", "causal", "full", "full", "causal", "causal"], 10),
    "nested": ([(0, 10), (2, 6), (3, 5)], [(0, 10), (1, 9), (4, 6)],
               ["causal", "full", "causal"], 10),
    "empty": ([], [], [], 5),
    "tensor": (torch.tensor([[0, 4], [4, 8]]), torch.tensor([[4, 8], [0, 4]]), "full", 8),
}


@pytest.mark.parametrize("name", list(RANGE_CASES))
def test_from_ranges_matches_definition(name):
    q, k, kinds, n = RANGE_CASES[name]
    kinds_list = [kinds] * len(q) if isinstance(kinds, str) else kinds
    dense = dense_ranges([tuple(map(int, r)) for r in q], [tuple(map(int, r)) for r in k],
                         kinds_list, n)
    check_both_forms(lambda imp: ag.TokenGraph.from_ranges(q, k, kinds, num_nodes=n,
                                                           implicit=imp), dense)
    assert ag.masks.from_ranges(q, k, kinds, num_nodes=n).equal(
        ag.TokenGraph.from_ranges(q, k, kinds, num_nodes=n))


def test_from_ranges_random_unions_in_row_chunks(monkeypatch):
    """Many random overlapping rectangles, the implicit rule read in small row chunks."""
    from attngraph import chunks

    monkeypatch.setattr(chunks, "ROW_CHUNK", 7)
    gen = torch.Generator().manual_seed(0)
    n = 40
    for _ in range(5):
        R = int(torch.randint(1, 12, (1,), generator=gen))
        q = torch.sort(torch.randint(0, n + 1, (R, 2), generator=gen), 1).values
        k = torch.sort(torch.randint(0, n + 1, (R, 2), generator=gen), 1).values
        kinds = ["causal" if b else "full" for b in torch.rand(R, generator=gen) < 0.5]
        dense = dense_ranges(q.tolist(), k.tolist(), kinds, n)
        check_both_forms(lambda imp: from_ranges(q, k, kinds, num_nodes=n, implicit=imp),
                         dense)


def test_prefix_lm_is_two_rectangles():
    n, p = 20, 6
    g = from_ranges([(0, n), (0, n)], [(0, n), (0, p)], ["causal", "full"], num_nodes=n,
                    implicit=True)
    assert g.equal(prefix_lm(n, p))


@pytest.mark.parametrize("args,error,message", [
    (([(0, 5)], [(0, 5)], "full", 4), ValueError, r"q_ranges\[0\] = \(0, 5\) is out of bounds"),
    (([(0, 2)], [(-1, 2)], "full", 4), ValueError, r"k_ranges\[0\] = \(-1, 2\) is out of"),
    (([(0, 2), (3, 1)], [(0, 2), (0, 1)], "full", 4), ValueError, "is reversed"),
    (([(0, 2)], [(0, 2), (0, 1)], "full", 4), ValueError, "q_ranges has 1 ranges and "
                                                          "k_ranges 2"),
    (([(0, 2), (2, 4)], [(0, 2), (2, 4)], ["full"], 4), ValueError, "kinds has 1 entries"),
    (([(0, 2)], [(0, 2)], "bidirectional", 4), ValueError, "'bidirectional' is not a "
                                                           "known kind"),
    (([(0, 2)], [(0, 2)], [1], 4), TypeError, r"kinds\[0\] must be a string"),
    (([(0, 2)], [(0, 2)], None, 4), TypeError, "kinds must be"),
    (([(0, 1, 2)], [(0, 2)], "full", 4), ValueError, r"q_ranges\[0\] must be a pair"),
    (([(0, 2.5)], [(0, 2)], "full", 4), TypeError, "must be an int"),
    ((torch.tensor([[0.0, 2.0]]), [(0, 2)], "full", 4), TypeError, "must hold integers"),
    ((torch.tensor([0, 2]), [(0, 2)], "full", 4), ValueError, r"shape \[R, 2\]"),
    (("0:2", [(0, 2)], "full", 4), TypeError, "list of \\(start, end\\) pairs"),
    (([(0, 2)], [(0, 2)], "full", -1), ValueError, "num_nodes must be >= 0"),
], ids=["q-out-of-bounds", "k-negative", "reversed", "count-mismatch", "kinds-length",
        "unknown-kind", "kind-not-str", "kinds-none", "not-a-pair", "float-bound",
        "float-tensor", "tensor-shape", "string", "negative-n"])
def test_from_ranges_bad_arguments(args, error, message):
    q, k, kinds, n = args
    with pytest.raises(error, match=message):
        ag.TokenGraph.from_ranges(q, k, kinds, num_nodes=n)


# ---------------------------------------------------------------------------- attention
ATTENTION_GRAPHS = {
    "neighborhood-2d": lambda imp: neighborhood((6, 7), (3, 5), (2, 1), implicit=imp),
    "neighborhood-3d-causal": lambda imp: neighborhood((3, 4, 5), 3, 1, (True, False, False),
                                                       implicit=imp),
    "prefix_lm": lambda imp: prefix_lm(37, 9, implicit=imp),
    "from_ranges": lambda imp: from_ranges(*RANGE_CASES["slices"][:3], num_nodes=10,
                                           implicit=imp),
}


@pytest.mark.parametrize("implicit", [False, True], ids=["explicit", "implicit"])
@pytest.mark.parametrize("backend", ["auto", "torch", "structured"])
@pytest.mark.parametrize("name", list(ATTENTION_GRAPHS))
def test_attention_matches_dense_float64(name, backend, implicit):
    """Every backend that takes the graph (``structured``: key ranges read from the rule
    for an implicit graph, dense tiles for an explicit one)."""
    g = ATTENTION_GRAPHS[name](implicit)
    if backend == "structured":
        backend = "ranges" if implicit else "tiles"
    n = g.num_dst
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n, 4, 8, dtype=torch.float64, generator=gen, requires_grad=True)
               for _ in range(3))
    out, lse = ag.graph_attention(q, k, v, g, backend=backend, return_lse=True)
    mask = g.to_dense()
    ref, ref_lse = dense_attention(q, k, v, mask)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite], ref_lse[finite], rtol=1e-9, atol=1e-9)
    grads = torch.autograd.grad((out * out).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * ref).sum(), (q, k, v))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)


# ---------------------------------------------------------------------------- grid orders
@pytest.mark.parametrize("shape", [(8, 8), (16, 16), (4, 4, 4), (8, 8, 8)])
def test_hilbert_steps_to_a_grid_neighbour(shape):
    """On a power-of-two cube, consecutive tokens of the Hilbert order are grid neighbours
    (the curve's defining property), and every cell is visited once."""
    g = neighborhood(shape, 1)
    perm = ag.reorder(g, "hilbert", shape=shape)
    assert torch.equal(torch.sort(perm).values, torch.arange(g.num_dst))
    coords = torch.stack(torch.unravel_index(perm, shape), 1)
    assert bool(((coords.diff(dim=0).abs().sum(1)) == 1).all())
    assert perm[0] == 0                       # starts at the origin


def test_morton_is_the_z_curve():
    g = neighborhood((4, 4), 1)
    perm = ag.reorder(g, "morton", shape=(4, 4))
    # Z order: 2x2 blocks, each row by row, the blocks themselves in Z order
    want = [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]
    assert perm.tolist() == want


@pytest.mark.parametrize("method", ["hilbert", "morton"])
@pytest.mark.parametrize("shape", [(5, 7), (12, 10), (3, 5, 6), (9,)])
def test_curve_orders_are_permutations_of_any_grid(method, shape):
    g = neighborhood(shape, 1)
    perm = ag.reorder(g, method, shape=shape)
    assert perm.dtype == torch.long
    assert torch.equal(torch.sort(perm).values, torch.arange(g.num_dst))
    g.order = perm                       # accepted as the graph's order
    assert torch.equal(g.permuted().to_dense(), g.to_dense()[perm][:, perm])


@pytest.mark.parametrize("block", [64, 128])
def test_hilbert_order_fills_tiles(block):
    """A 2-D neighbourhood on a grid wider than a tile needs far fewer tiles, each denser,
    in Hilbert order than in row-major order (the benchmark's mask: 128 x 128, kernel 13)."""
    shape = (128, 128)
    g = neighborhood(shape, 13)
    row_major = g.tile_plan(block, min_density=0.0)
    g.order = ag.reorder(g, "hilbert", shape=shape)
    hilbert = g.tile_plan(block, min_density=0.0)
    assert hilbert.num_edges == row_major.num_edges == g.num_edges
    assert hilbert.num_tiles < 0.65 * row_major.num_tiles
    assert g.num_edges / hilbert.num_tiles > 1.5 * g.num_edges / row_major.num_tiles


@pytest.mark.parametrize("method", ["hilbert", "morton"])
def test_attention_in_a_curve_order_matches_dense(method):
    shape = (16, 12)
    g = neighborhood(shape, (5, 3), (1, 2))
    g.order = ag.reorder(g, method, shape=shape)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(g.num_dst, 2, 8, dtype=torch.float64, generator=gen)
               for _ in range(3))
    torch.testing.assert_close(ag.graph_attention(q, k, v, g, backend="tiles"),
                               dense_attention(q, k, v, g.to_dense())[0])


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(method="hilbert"), ValueError, "needs shape="),
    (dict(method="hilbert", shape=(4, 5)), ValueError, "20 cells but the graph has 16"),
    (dict(method="morton", shape=(4, 0)), ValueError, r"shape\[1\] must be >= 1"),
    (dict(method="morton", shape="4x4"), TypeError, "shape must be a tuple"),
    (dict(method="rcm", shape=(4, 4)), ValueError, "shape= is for the 'hilbert'"),
    (dict(method="peano", shape=(4, 4)), ValueError, "shape= is for the"),
    (dict(method="peano"), ValueError, "'rcm', 'hilbert', 'morton'"),
], ids=["no-shape", "wrong-size", "empty-axis", "str-shape", "shape-with-rcm",
        "unknown-with-shape", "unknown"])
def test_reorder_bad_arguments(kwargs, error, message):
    g = neighborhood((4, 4), 3)
    with pytest.raises(error, match=message):
        ag.reorder(g, **kwargs)


@pytest.mark.parametrize("module", ["neighborhood", "rectangles"])
def test_docstring_examples(module):
    import doctest
    import importlib

    mod = importlib.import_module(f"attngraph.masks.{module}")
    names = {name: getattr(mod, name) for name in mod.__all__}
    result = doctest.testmod(mod, extraglobs={"torch": torch, **names},
                             optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
