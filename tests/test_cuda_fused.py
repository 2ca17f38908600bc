"""The fused kernels (``attention.cu``) through the CPU emulator: forward, lse and every
gradient against the float64 golden with the 2x rule (docs/ARCHITECTURE.md, "Tests"), on every mask family,
skewed degrees and the edge cases; bitwise-deterministic backward; coalesced loads; rows
cut into work items so no row serialises a launch."""
import math

import pytest
import torch

import attngraph as ag
from attngraph import TokenGraph, masks
from attngraph.ops.cuda import emulator, fused, loader
from helpers import random_graph

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FLOOR = {torch.float32: 5e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def emulate(monkeypatch):
    monkeypatch.setenv("ATTNGRAPH_CUDA_EMULATE", "1")


def _skewed(n=160, seed=0):
    """Power-law in-degrees: a few rows with most keys, many with one or two."""
    gen = torch.Generator().manual_seed(seed)
    deg = (n / (1 + torch.arange(n)) ** 1.3).long().clamp(1, n)
    deg = deg[torch.randperm(n, generator=gen)]
    dst = torch.repeat_interleave(torch.arange(n), deg)
    src = torch.cat([torch.randperm(n, generator=gen)[:d] for d in deg.tolist()])
    return TokenGraph(torch.stack([src, dst]), num_nodes=n)


GRAPHS = {
    "window": lambda: masks.sliding_window(97, 5),
    "dilated": lambda: masks.dilated_window(100, 3, 1),
    "random": lambda: masks.random(128, 12, seed=3),
    "longformer-global": lambda: masks.longformer(300, 3, [0, 150, 299]),  # rows cut in items
    "bigbird": lambda: masks.bigbird(96, 8, seed=1),
    "hash": lambda: masks.hash_buckets(torch.randint(0, 5, (120,),
                                                     generator=torch.Generator().manual_seed(2))),
    "qk-drop": lambda: masks.qk_drop(torch.arange(90) % 3 != 0, torch.arange(90) % 4 != 1),
    "document": lambda: masks.document([30, 1, 50, 19]),
    "strided": lambda: masks.strided(80, 8),
    "skewed": _skewed,
    "bipartite": lambda: random_graph(37, 70, p=0.2, seed=4, empty_rows=(3,))[1],
    "empty-rows": lambda: random_graph(60, 60, p=0.15, seed=5, empty_rows=(0, 9, 59))[1],
    "no-edges": lambda: TokenGraph(torch.empty(2, 0, dtype=torch.long), num_nodes=11),
    "n1": lambda: TokenGraph(torch.zeros(2, 1, dtype=torch.long), num_nodes=1),
}


def _err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_within_twice_reference(kernel, ref, golden, dtype, what):
    assert kernel.shape == golden.shape, what
    assert not kernel.isnan().any(), what
    scale = max(1.0, golden.abs().max().item()) if golden.numel() else 1.0
    bound = 2 * _err(ref, golden) + FLOOR[dtype] * scale
    assert _err(kernel, golden) <= bound, (what, _err(kernel, golden), bound)


def _run(backend, g, q, k, v, bias, batched=False):
    ts = tuple(t.detach().requires_grad_() for t in (q, k, v) + ((bias,) if bias is not None
                                                                  else ()))
    out, lse = ag.graph_attention(*ts[:3], g, edge_bias=ts[3] if bias is not None else None,
                                  return_lse=True, backend=backend)
    gen = torch.Generator().manual_seed(7)
    dout = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)
    grads = torch.autograd.grad(out, ts, dout)
    return {"out": out, "lse": lse, "dq": grads[0], "dk": grads[1], "dv": grads[2],
            **({"dbias": grads[3]} if bias is not None else {})}


def check_case(g, dtype, *, H=4, H_kv=2, D=24, D_v=20, bias_heads=None, batch=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lead = () if batch is None else (batch,)
    q = torch.randn(*lead, g.num_dst, H, D, generator=gen, dtype=torch.float64)
    k = torch.randn(*lead, g.num_src, H_kv, D, generator=gen, dtype=torch.float64)
    v = torch.randn(*lead, g.num_src, H_kv, D_v, generator=gen, dtype=torch.float64)
    bias = None
    if bias_heads is not None:
        shape = (g.num_edges,) if bias_heads == 1 else (g.num_edges, bias_heads)
        bias = torch.randn(shape, generator=gen, dtype=torch.float64)
    golden = _run("torch", g, q, k, v, bias)
    low = [t.to(dtype) for t in (q, k, v)] + [bias.to(dtype) if bias is not None else None]
    ref = _run("torch", g, *low)
    got = _run("cupy", g, *low)
    fin = torch.isfinite(golden["lse"])
    assert torch.equal(torch.isneginf(got["lse"]), torch.isneginf(golden["lse"]))
    assert got["lse"].dtype == torch.float32
    for name in golden:
        a, r, gold = got[name], ref[name], golden[name]
        if name == "lse":
            a, r, gold = a[fin], r[fin].float(), gold[fin]
        assert a.dtype == (torch.float32 if name == "lse" else dtype), name
        assert_within_twice_reference(a, r, gold, dtype, name)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("graph", list(GRAPHS), ids=list(GRAPHS))
def test_every_mask_family(graph, dtype):
    check_case(GRAPHS[graph](), dtype, bias_heads=4)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("D,D_v", [(40, 40), (64, 64), (72, 72), (128, 128), (256, 256),
                                   (64, 24)])
def test_head_dims(D, D_v, dtype):
    check_case(masks.longformer(100, 3, [0, 50]), dtype, H=2, H_kv=1, D=D, D_v=D_v, seed=D)


@pytest.mark.parametrize("H,H_kv", [(8, 2), (8, 1), (6, 3), (4, 4)], ids=str)
def test_gqa_groups(H, H_kv):
    check_case(masks.random(80, 10, seed=1), torch.float32, H=H, H_kv=H_kv, D=32, D_v=32,
               bias_heads=1)


@pytest.mark.parametrize("bias_heads", [None, 1, 4], ids=["no-bias", "bias-E", "bias-EH"])
def test_batched_with_bias(bias_heads):
    check_case(masks.longformer(300, 2, [0, 299]), torch.float32, H=4, H_kv=2, D=16,
               D_v=16, bias_heads=bias_heads, batch=3)


def test_minus_inf_bias_rows_and_edges():
    g = masks.sliding_window(40, 3)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(40, 2, 16, generator=gen) for _ in range(3))
    bias = torch.zeros(g.num_edges)
    bias[g.ptr[5]:g.ptr[6]] = -math.inf          # query 5: every edge masked out
    bias[g.ptr[9]] = -math.inf                   # query 9: one edge masked out
    out, lse = ag.graph_attention(q, k, v, g, edge_bias=bias, return_lse=True,
                                  backend="cupy")
    ref, rlse = ag.graph_attention(q, k, v, g, edge_bias=bias, return_lse=True,
                                   backend="torch")
    assert not out.isnan().any() and (out[5] == 0).all() and torch.isneginf(lse[5]).all()
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.allclose(lse[torch.isfinite(rlse)], rlse[torch.isfinite(rlse)], atol=1e-5)


def test_gradient_through_the_log_sum_exp():
    g = masks.longformer(90, 3, [0, 44])            # split rows: partial states merged
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(90, 2, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    w = torch.randn(90, 2, generator=gen, dtype=torch.float64)

    def loss(backend, dtype):
        ins = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out, lse = ag.graph_attention(*ins, g, return_lse=True, backend=backend)
        total = out.double().sum() + (lse.double() * w).sum()
        return torch.autograd.grad(total, ins)

    for got, want in zip(loss("cupy", torch.float32), loss("torch", torch.float64)):
        assert torch.allclose(got.double(), want, atol=1e-4)


def test_backward_is_bitwise_deterministic():
    g = masks.longformer(300, 4, [0, 100, 200])      # cut rows and cut key columns
    assert fused.plan(g).rows.num_slots > 0 and fused.plan(g).cols.num_slots > 0
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(300, 4, 32, generator=gen).requires_grad_() for _ in range(3))
    bias = torch.randn(g.num_edges, 4, generator=gen).requires_grad_()

    def grads():
        out = ag.graph_attention(q, k, v, g, edge_bias=bias, backend="cupy")
        return torch.autograd.grad(out, (q, k, v, bias), torch.ones_like(out))

    first, second = grads(), grads()
    assert all(torch.equal(a, b) for a, b in zip(first, second))


# ---------------------------------------------------------------------------- work items
def test_work_items_cut_long_rows_only():
    g = masks.longformer(1000, 8, [0, 500])
    w = fused.work_items(g.ptr, 256)
    items, deg = w.items, g.in_degree()
    assert (items[:, 2] - items[:, 1] <= 256).all()
    # every edge belongs to exactly one item, every row has at least one item
    covered = torch.zeros(g.num_edges, dtype=torch.long)
    for node, b, e, _ in items.tolist():
        assert g.ptr[node] <= b <= e <= g.ptr[node + 1]
        covered[b:e] += 1
    assert (covered == 1).all() and torch.equal(items[:, 0].unique(), torch.arange(1000))
    cut = (deg > 256).nonzero().flatten()
    assert torch.equal(w.splits[:, 0], cut)
    assert w.num_slots == int(((deg[cut] + 255) // 256).sum())
    assert (items[:, 3] >= 0).sum() == w.num_slots
    assert fused.chunk_size(g.num_edges, 1000) % 32 == 0


def _warp_work(g, *, blocks):
    """Per-warp load requests of one forward launch with a GPU-like number of warps."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(g.num_dst, 1, 32, generator=gen)
    old = loader.max_blocks
    loader.max_blocks = lambda device: blocks
    try:
        with emulator.count() as launches:
            ag.graph_attention(q, q, q, g, backend="cupy")
    finally:
        loader.max_blocks = old
    fwd = next(s for s in launches if s.kernel.split("<")[0] in ("attn_fwd", "attn_fwd_vec"))
    return fwd


def test_global_rows_do_not_serialise_the_launch():
    """longformer with 16 global tokens vs the same window without them: the busiest warp's
    work (load requests) over the mean within 1.5x, with warps taking ~8 items each as on a
    full GPU (N = 64k rows over 132 SMs x 64 warps)."""
    n, w = 2048, 8
    plain = masks.sliding_window(n, w)
    glob = masks.longformer(n, w, list(range(0, n, n // 16)))
    ratios = []
    for g in (plain, glob):
        items = fused.plan(g).rows
        s = _warp_work(g, blocks=math.ceil(items.num_items / 32))
        ratios.append(s.max_warp_load_requests / (s.load_requests / s.warps))
    assert ratios[1] <= 1.5 * ratios[0], ratios


# ---------------------------------------------------------------------------- coalescing
@pytest.mark.parametrize("dtype,D", [(torch.bfloat16, 64), (torch.float32, 64),
                                     (torch.bfloat16, 128)])
def test_forward_sectors_per_edge_near_ideal(dtype, D):
    """On random(64) the forward's sectors per edge are <= 1.25x the ideal: a K and a V row
    of D x dtype bytes per edge and kv head, read once for the whole GQA group."""
    g = masks.random(512, 64, seed=0)
    H, H_kv = 8, 2
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(512, H, D, generator=gen).to(dtype)
    kv = torch.randn(512, H_kv, D, generator=gen).to(dtype)
    with emulator.count() as launches:
        ag.graph_attention(q, kv, kv, g, backend="cupy")
    fwd = [s for s in launches if s.kernel.startswith("attn_fwd")]
    sectors = sum(s.load_sectors for s in fwd)
    row_sectors = D * dtype.itemsize // 32
    ideal = g.num_edges * H_kv * 2 * row_sectors
    assert sectors <= 1.25 * ideal, (sectors / ideal)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("D,D_v", [(64, 64), (40, 24), (36, 20), (30, 30), (256, 256)])
def test_vectorised_and_scalar_forward_agree(D, D_v, dtype):
    """Rows of whole 16-byte vectors no wider than 32 vectors take the *_vec kernels (several
    edges per warp step, forward and backward), the rest the scalar ones; both meet the 2x
    rule on a graph with cut rows and cut key columns.
    (36, 20) is vectorised in fp32 only, (30, 30) in none, (256, 256) in 2-byte types."""
    vec = 16 // dtype.itemsize
    vectorised = D % vec == 0 and D_v % vec == 0 and max(D, D_v) <= 32 * vec
    g = masks.longformer(300, 3, [0, 150])
    with emulator.count() as launches:
        check_case(g, dtype, H=4, H_kv=2, D=D, D_v=D_v, bias_heads=4)
    names = {s.kernel.split("<")[0] for s in launches}
    for kernel in ("attn_fwd", "attn_bwd_dq", "attn_bwd_dkdv"):
        assert (kernel + "_vec" in names) == vectorised and (kernel in names) != vectorised


def test_misaligned_rows_take_the_scalar_forward():
    g = masks.sliding_window(50, 3)
    base = torch.randn(50 * 2 * 16 + 1)
    q = base[1:].view(50, 2, 16)             # 4-byte aligned, not 16-byte aligned
    assert q.data_ptr() % 16 != 0
    with emulator.count() as launches:
        out = ag.graph_attention(q, q, q, g, backend="cupy")
    assert {s.kernel.split("<")[0] for s in launches} >= {"attn_fwd"}
    assert torch.allclose(out, ag.graph_attention(q, q, q, g, backend="torch"), atol=1e-6)


# ---------------------------------------------------------------------------- torch.compile
class _Block(torch.nn.Module):
    def __init__(self, graph, dim=16, heads=2):
        super().__init__()
        self.graph, self.heads = graph, heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)

    def forward(self, x, bias):
        n = x.size(0)
        q, k, v = self.qkv(x).view(n, 3, self.heads, -1).unbind(1)
        return ag.graph_attention(q, k, v, self.graph, edge_bias=bias, backend="cupy")


def test_compiles_with_fullgraph_and_no_graph_break():
    """torch.compile(fullgraph=True) raises on any graph break; the fused op is one node."""
    torch.manual_seed(0)
    g = masks.longformer(96, 2, [0, 50])          # a fresh graph: its plan is built while tracing
    block = _Block(g)
    x = torch.randn(96, 16)
    bias = torch.randn(g.num_edges, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True)
    out = compiled(x, bias)
    out.square().sum().backward()
    got = [p.grad.clone() for p in block.parameters()] + [bias.grad.clone()]
    block.zero_grad()
    bias.grad = None
    ref = block(x, bias)
    ref.square().sum().backward()
    want = [p.grad for p in block.parameters()] + [bias.grad]
    assert torch.allclose(out, ref, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, want))


def test_custom_op_passes_opcheck():
    """Schema, fake (meta) implementation and autograd registration of the op."""
    g = masks.longformer(40, 2, [0])
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(40, 2, 8, generator=gen).requires_grad_() for _ in range(3))
    bias = torch.randn(g.num_edges, 1, generator=gen).requires_grad_()
    args = (q, k, v, bias, g.ptr, g.src, g.dst, g.num_src, 0.3, True)
    torch.library.opcheck(torch.ops.attngraph.graph_attention.default, args)


def test_nan_bias_is_rejected_when_compiled_too():
    g = masks.sliding_window(20, 2)
    q = torch.randn(20, 1, 8)
    bias = torch.zeros(g.num_edges)
    bias[3] = math.nan
    fn = torch.compile(lambda q, b: ag.graph_attention(q, q, q, g, edge_bias=b,
                                                       backend="cupy"), fullgraph=True)
    with pytest.raises(ValueError, match="edge_bias contains NaN"):
        fn(q, bias)


# ---------------------------------------------------------------------------- properties
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n_dst=st.integers(1, 40), n_src=st.integers(1, 40), H_kv=st.sampled_from([1, 2]),
       group=st.sampled_from([1, 2, 4]), D=st.integers(1, 70), p=st.floats(0.0, 1.0),
       seed=st.integers(0, 2 ** 16), dtype=st.sampled_from(list(DTYPES.values())))
def test_property_random_graphs(n_dst, n_src, H_kv, group, D, p, seed, dtype):
    g = random_graph(n_dst, n_src, p=p, seed=seed)[1]
    check_case(g, dtype, H=H_kv * group, H_kv=H_kv, D=D, D_v=max(1, D // 2), bias_heads=1,
               seed=seed)


def test_int32_edge_index_duplicates_and_non_contiguous_inputs():
    ei = torch.tensor([[0, 1, 1, 2, 2, 0], [1, 1, 1, 2, 0, 0]], dtype=torch.int32)
    g = TokenGraph(ei, num_nodes=3)                      # a duplicate edge, int32
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(3, 16, 4, generator=gen).transpose(1, 2)       # [3, 4, 16], strided
    k = torch.randn(2, 3, 16, generator=gen).permute(1, 0, 2)      # [3, 2, 16], strided
    v = torch.randn(3, 2, 32, generator=gen)[..., ::2]              # [3, 2, 16], strided
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    out = ag.graph_attention(q, k, v, g, backend="cupy")
    ref = ag.graph_attention(q, k, v, g, backend="torch")
    assert torch.allclose(out, ref, atol=1e-6)
