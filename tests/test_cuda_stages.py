"""The stage kernels (``stages.cu``) and the cupy backend, run through the CPU emulator.

Numerics follow the tolerance rule of docs/ARCHITECTURE.md ("Tests"): a kernel's error
against the float64 golden must be at most twice the error of the torch reference computed
in the same dtype, plus a small floor -- for outputs and for every gradient.
"""
import math

import pytest
import torch

import attngraph as ag
from attngraph import TokenGraph, masks
from attngraph.ops import reference
from attngraph.ops.cuda import emulator, stages
from attngraph.ops.dispatch import Inputs, explain, select_backend
from helpers import dense_attention, random_graph

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FLOOR = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def emulate(monkeypatch):
    monkeypatch.setenv("ATTNGRAPH_CUDA_EMULATE", "1")


def _hash_graph(n, buckets, seed):
    gen = torch.Generator().manual_seed(seed)
    return masks.hash_buckets(torch.randint(0, buckets, (n,), generator=gen))


def _bipartite():
    return random_graph(37, 70, p=0.2, seed=4, empty_rows=(3,))[1]


GRAPHS = {
    "window": lambda: masks.sliding_window(97, 4),
    "random": lambda: masks.random(128, 12, seed=3),
    "longformer-global": lambda: masks.longformer(150, 3, [0, 77]),   # rows with all keys
    "bigbird": lambda: masks.bigbird(96, 8, seed=1),
    "hash": lambda: _hash_graph(120, 6, seed=2),
    "bipartite": _bipartite,
    "empty-rows": lambda: random_graph(60, 60, p=0.15, seed=5, empty_rows=(0, 9, 59))[1],
    "no-edges": lambda: TokenGraph(torch.empty(2, 0, dtype=torch.long), num_nodes=11),
    "n1": lambda: TokenGraph(torch.zeros(2, 1, dtype=torch.long), num_nodes=1),
}


def _inputs(g, H, H_kv, D, D_v, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(g.num_dst, H, D, generator=gen, dtype=torch.float64)
    k = torch.randn(g.num_src, H_kv, D, generator=gen, dtype=torch.float64)
    v = torch.randn(g.num_src, H_kv, D_v, generator=gen, dtype=torch.float64)
    return q, k, v


def _err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_within_twice_reference(kernel, ref_same_dtype, golden, dtype):
    """The tolerance rule: |kernel - golden| <= 2 |reference(dtype) - golden| + floor."""
    assert kernel.shape == golden.shape and kernel.dtype == ref_same_dtype.dtype
    assert not kernel.isnan().any()
    scale = max(1.0, golden.abs().max().item()) if golden.numel() else 1.0
    bound = 2 * _err(ref_same_dtype, golden) + FLOOR[dtype] * scale
    assert _err(kernel, golden) <= bound, (_err(kernel, golden), bound)


def _grads(out, inputs, seed=7):
    gen = torch.Generator().manual_seed(seed)
    dout = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)
    return torch.autograd.grad(out, inputs, dout)


def _run_stage(stage, impl, q, k, v, g):
    """Forward of one stage and the gradients of its inputs, with ``impl`` the stage
    functions (``stages`` for the kernels, ``reference`` for torch)."""
    scale = 1.0 / math.sqrt(q.size(-1))
    if stage == "edge_scores":
        ins = (q.detach().requires_grad_(), k.detach().requires_grad_())
        out = impl.edge_scores(*ins, g, scale)
    else:
        # inputs of the later stages come from the float64 reference, cast to the dtype
        s = reference.edge_scores(q.double(), k.double(), g, scale).to(q.dtype)
        if stage == "edge_softmax":
            ins = (s.detach().requires_grad_(),)
            out = impl.edge_softmax(ins[0], g)
        else:
            p = reference.edge_softmax(s.double(), g).to(q.dtype)
            ins = (p.detach().requires_grad_(), v.detach().requires_grad_())
            out = impl.aggregate(*ins, g)
    return (out,) + (_grads(out, ins) if out.numel() else tuple(torch.zeros_like(i) for i in ins))


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("stage", ["edge_scores", "edge_softmax", "aggregate"])
@pytest.mark.parametrize("graph", list(GRAPHS), ids=list(GRAPHS))
def test_stage_kernels_and_gradients(graph, stage, dtype):
    g = GRAPHS[graph]()
    q, k, v = _inputs(g, H=8, H_kv=2, D=40, D_v=72)      # GQA 8/2, odd head dims
    golden = _run_stage(stage, reference, q, k, v, g)
    low = tuple(t.to(dtype) for t in (q, k, v))
    ref = _run_stage(stage, reference, *low, g)
    got = _run_stage(stage, stages, *low, g)
    for a, r, gold in zip(got, ref, golden):
        assert_within_twice_reference(a, r, gold, dtype)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("D", [40, 64, 72, 256])
def test_head_dims(D, dtype):
    g = masks.random(64, 9, seed=D)
    q, k, v = _inputs(g, H=2, H_kv=1, D=D, D_v=D, seed=D)
    for stage in ("edge_scores", "aggregate"):
        golden = _run_stage(stage, reference, q, k, v, g)
        low = tuple(t.to(dtype) for t in (q, k, v))
        ref = _run_stage(stage, reference, *low, g)
        for a, r, gold in zip(_run_stage(stage, stages, *low, g), ref, golden):
            assert_within_twice_reference(a, r, gold, dtype)


def test_public_stage_functions_take_backend():
    g = masks.longformer(70, 2, [5])
    q, k, v = (t.float() for t in _inputs(g, 4, 2, 16, 16))
    s = ag.ops.edge_scores(q, k, g, backend="cupy")
    assert torch.allclose(s, ag.ops.edge_scores(q, k, g, backend="torch"), atol=1e-5)
    p = ag.ops.edge_softmax(s, g, backend="cupy")
    assert torch.allclose(p, ag.ops.edge_softmax(s, g, backend="torch"), atol=1e-6)
    p1 = ag.ops.edge_softmax(s[:, 0], g, backend="cupy")           # 1-D scores
    assert p1.shape == (g.num_edges,) and torch.allclose(p1, p[:, 0])
    o = ag.ops.aggregate(p, v, g, backend="cupy")
    assert torch.allclose(o, ag.ops.aggregate(p, v, g, backend="torch"), atol=1e-5)
    # float64 is not a kernel dtype: "auto" takes torch, "cupy" says why not
    assert ag.ops.edge_scores(q.double(), k.double(), g).dtype == torch.float64
    with pytest.raises(RuntimeError, match="cupy: takes float16/bfloat16/float32"):
        ag.ops.edge_scores(q.double(), k.double(), g, backend="cupy")


def test_all_minus_inf_row_gets_zero_weights():
    g = masks.sliding_window(9, 1)
    s = torch.randn(g.num_edges, 2)
    s[g.ptr[4]:g.ptr[5]] = -math.inf
    p = ag.ops.edge_softmax(s, g, backend="cupy")
    assert not p.isnan().any() and (p[g.ptr[4]:g.ptr[5]] == 0).all()
    row_sums = torch.zeros(9, 2).index_add_(0, g.dst, p)
    assert torch.allclose(row_sums[torch.arange(9) != 4], torch.ones(8, 2))


# ---------------------------------------------------------------------------- graph_attention
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("graph", ["longformer-global", "bipartite", "empty-rows", "no-edges"])
def test_graph_attention_cupy_backend(graph, dtype):
    g = GRAPHS[graph]()
    q, k, v = _inputs(g, H=4, H_kv=2, D=24, D_v=20)
    gen = torch.Generator().manual_seed(1)
    bias = torch.randn(g.num_edges, 4, generator=gen, dtype=torch.float64)

    def run(backend, *ts):
        ts = tuple(t.detach().requires_grad_() for t in ts)
        out, lse = ag.graph_attention(*ts[:3], g, edge_bias=ts[3], return_lse=True,
                                      backend=backend)
        return (out, lse) + _grads(out, ts)

    golden = run("torch", q, k, v, bias)
    low = tuple(t.to(dtype) for t in (q, k, v, bias))
    ref, got = run("torch", *low), run("cupy", *low)
    assert got[1].dtype == torch.float32
    assert torch.equal(torch.isneginf(got[1]), torch.isneginf(golden[1]))
    for i, (a, r, gold) in enumerate(zip(got, ref, golden)):
        if i == 1:   # lse: compare where finite
            fin = torch.isfinite(gold)
            a, r, gold = a[fin], r[fin].to(a.dtype), gold[fin]
        assert_within_twice_reference(a, r, gold, dtype)


def test_graph_attention_cupy_matches_dense_and_batches():
    mask, g = random_graph(33, 33, p=0.3, seed=9, empty_rows=(4,), full_rows=(8,))
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(3, 33, 4, 16, generator=gen) for _ in range(3))
    out = ag.graph_attention(q, k, v, g, backend="cupy")
    for b in range(3):
        ref, _ = dense_attention(q[b], k[b], v[b], mask)
        assert torch.allclose(out[b], ref, atol=2e-6)


def test_gradients_are_deterministic():
    g = masks.longformer(80, 3, [0, 40])
    q, k, v = (t.float().requires_grad_() for t in _inputs(g, 4, 2, 32, 32))

    def grads():
        out = ag.graph_attention(q, k, v, g, backend="cupy")
        return torch.autograd.grad(out, (q, k, v), torch.ones_like(out))

    assert all(torch.equal(a, b) for a, b in zip(grads(), grads()))


# ---------------------------------------------------------------------------- dispatch
def _inp(device="cpu", dtype=torch.float32, d=64):
    return Inputs(device=torch.device(device), dtype=dtype, head_dim=d, value_dim=d,
                  requires_grad=False)


def test_emulation_flag_is_read_at_call_time(monkeypatch):
    g = masks.sliding_window(10, 2)
    q = torch.randn(10, 1, 8)
    assert "emulated on CPU" in explain("cupy", _inp())
    ag.graph_attention(q, q, q, g, backend="cupy")
    monkeypatch.setenv("ATTNGRAPH_CUDA_EMULATE", "0")
    with pytest.raises(RuntimeError, match="cupy: needs CUDA tensors, got cpu.*"
                                           "ATTNGRAPH_CUDA_EMULATE=1"):
        ag.graph_attention(q, q, q, g, backend="cupy")


def test_auto_on_cpu_stays_torch_under_emulation():
    assert select_backend("auto", _inp()).name == "torch"
    assert explain("auto", _inp()).startswith("torch")
    with pytest.raises(RuntimeError, match="head dims up to 256"):
        select_backend("cupy", _inp(d=320))


# ---------------------------------------------------------------------------- validation
def test_launchers_check_every_argument_before_a_launch():
    g = masks.sliding_window(12, 2)
    arrays = stages.graph_arrays(g)
    q = torch.randn(12, 2, 8)
    with pytest.raises(ValueError, match=r"b must have shape \[12, 2, 8\]"):
        stages.row_dot(q, torch.randn(11, 2, 8), arrays, 1.0)
    with pytest.raises(TypeError, match="b must be torch.float32"):
        stages.row_dot(q, q.half(), arrays, 1.0)
    with pytest.raises(ValueError, match="w must be contiguous"):
        stages.row_gather(torch.randn(2, g.num_edges).t(), q, arrays, 1.0)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        stages.row_dot(q.double(), q.double(), arrays, 1.0)
    with pytest.raises(ValueError, match="head dims up to 256"):
        stages.row_dot(torch.randn(12, 1, 300), torch.randn(12, 1, 300), arrays, 1.0)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        stages.row_dot(torch.randn(12, 3, 8), q, arrays, 1.0)


def test_graph_modified_in_place_is_caught_before_a_launch():
    g = masks.sliding_window(12, 2)
    g.edge_index.as_tensor()[0, 3] = 10 ** 6     # a key index far out of range
    q = torch.randn(12, 1, 8)
    with pytest.raises(ValueError, match=r"key indices leave \[0, 12\)"):
        ag.ops.edge_scores(q, q, g, backend="cupy")


def test_graph_arrays_are_cached():
    g = masks.random(50, 5, seed=0)
    assert stages.graph_arrays(g) is stages.graph_arrays(g)
    a = stages.graph_arrays(g)
    assert a.col.dtype == torch.int32 and a.krow.dtype == torch.int32
    assert torch.equal(a.ptr, g.ptr) and torch.equal(a.col.long(), g.src)
    # CSC: the k-th key-major edge is canonical edge perm[k], into query krow[k]
    assert torch.equal(g.dst[a.perm], a.krow.long())
    assert bool((g.src[a.perm].diff() >= 0).all())


def test_stage_kernels_read_coalesced_rows():
    """row_gather reads each edge's value row once per warp: D_v * 4 bytes in
    D_v * 4 / 32 sectors when rows are 32-byte aligned."""
    g = masks.random(64, 8, seed=1)
    p = torch.rand(g.num_edges, 1)
    v = torch.randn(64, 1, 64)
    with emulator.count() as launches:
        ag.ops.aggregate(p, v, g, backend="cupy")
    (s,) = launches
    E = g.num_edges
    row_sectors = 64 * 4 // 32
    # per edge: p and the key index, each one broadcast sector, and the v row; per row the
    # two offsets
    assert s.load_sectors == E * (row_sectors + 2) + 64 * 2
    assert s.load_bytes == E * (64 * 4 + 32 * 4 + 32 * 4) + 64 * 2 * 32 * 8
    assert s.store_sectors == 64 * row_sectors


def test_cupy_launch_glue_converts_arguments_and_uses_torchs_stream(monkeypatch):
    """The GPU launch path, with CuPy and torch.cuda stood in for: tensors go by DLPack,
    None and empty tensors as null pointers, scalars as they are, on torch's current stream."""
    import contextlib
    import sys
    import types

    import numpy as np

    from attngraph.ops.cuda import loader

    seen = {}

    @contextlib.contextmanager
    def context(*args):
        seen.setdefault("contexts", []).append(args)
        yield

    fake = types.SimpleNamespace(
        from_dlpack=lambda t: ("dlpack", tuple(t.shape)),
        cuda=types.SimpleNamespace(Device=context, ExternalStream=context))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(torch.cuda, "current_stream",
                        lambda device=None: types.SimpleNamespace(cuda_stream=1234))

    def fn(grid, block, args, shared_mem=0):
        seen.update(grid=grid, block=block, args=args, shared_mem=shared_mem)

    kernel = loader._CupyKernel(fn, "k", 0)
    kernel((3,), (128,), (torch.zeros(2, 5), None, torch.empty(0), np.int32(7)), shared_mem=64)
    assert seen["grid"] == (3,) and seen["block"] == (128,) and seen["shared_mem"] == 64
    a = seen["args"]
    assert a[0] == ("dlpack", (2, 5)) and a[1] == np.uint64(0) and a[2] == np.uint64(0)
    assert a[3] == np.int32(7) and a[3].dtype == np.int32
    assert (1234,) in seen["contexts"] and (0,) in seen["contexts"]


def test_gpu_check_script_is_valid_bash():
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
