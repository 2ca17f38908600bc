"""The CUDA kernels on a real GPU (``gpu`` marker; skipped cleanly without CUDA and cupy):
the same numerics as the emulated suites, through CuPy, on torch's current stream."""
import math

import pytest
import torch

import attngraph as ag
from attngraph import masks
from attngraph.ops.dispatch import WITH_CUPY

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or not WITH_CUPY,
                       reason="needs a CUDA device and cupy"),
]

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FLOOR = {torch.float32: 5e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}
GRAPHS = {
    "window": lambda: masks.sliding_window(4096, 64),
    "random": lambda: masks.random(4096, 64, seed=0),
    "longformer": lambda: masks.longformer(4096, 64, list(range(0, 4096, 256))),
    "bigbird": lambda: masks.bigbird(4096, 64),
}


def _run(backend, g, q, k, v, bias):
    ts = tuple(t.detach().requires_grad_() for t in (q, k, v, bias))
    out, lse = ag.graph_attention(*ts[:3], g, edge_bias=ts[3], return_lse=True, backend=backend)
    dout = torch.randn(out.shape, generator=torch.Generator(out.device).manual_seed(1),
                       device=out.device, dtype=torch.float32).to(out.dtype)
    return (out, lse) + torch.autograd.grad(out, ts, dout)


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("graph", list(GRAPHS), ids=list(GRAPHS))
def test_fused_kernels_on_gpu(graph, dtype):
    _check_within_twice_reference_error(GRAPHS[graph](), dtype, "cupy", "torch")


def _check_within_twice_reference_error(graph, dtype, backend, reference):
    """``backend``'s outputs and gradients err at most twice ``reference``'s (same dtype)
    from the float64 torch result, plus a floor."""
    dev = torch.device("cuda")
    g = graph.to(dev)
    gen = torch.Generator(dev).manual_seed(0)
    q = torch.randn(4096, 8, 64, generator=gen, device=dev, dtype=torch.float64)
    k, v = (torch.randn(4096, 2, 64, generator=gen, device=dev, dtype=torch.float64)
            for _ in range(2))
    bias = torch.randn(g.num_edges, 8, generator=gen, device=dev, dtype=torch.float64)
    golden = _run("torch", g, q, k, v, bias)
    low = [t.to(dtype) for t in (q, k, v, bias)]
    ref, got = _run(reference, g, *low), _run(backend, g, *low)
    for i, (a, r, gold) in enumerate(zip(got, ref, golden)):
        if i == 1:
            a, r, gold = a[torch.isfinite(gold)], r[torch.isfinite(gold)], gold[torch.isfinite(gold)]
        scale = max(1.0, gold.abs().max().item())
        assert _err(a, gold) <= 2 * _err(r, gold) + FLOOR[dtype] * scale, i


def test_auto_picks_the_kernels_and_backward_is_deterministic():
    from attngraph.ops.dispatch import Inputs, select_backend

    dev = torch.device("cuda")
    x = Inputs(device=dev, dtype=torch.bfloat16, head_dim=64, value_dim=64, requires_grad=True)
    assert select_backend("auto", x).name == "cupy"
    g = masks.longformer(2048, 32, [0, 1000]).to(dev)
    q, k, v = (torch.randn(2048, 4, 64, device=dev, dtype=torch.bfloat16).requires_grad_()
               for _ in range(3))

    def grads():
        out = ag.graph_attention(q, k, v, g)
        return torch.autograd.grad(out, (q, k, v), torch.ones_like(out))

    assert all(torch.equal(a, b) for a, b in zip(grads(), grads()))


def test_runs_on_the_current_stream():
    dev = torch.device("cuda")
    g = masks.sliding_window(1024, 16).to(dev)
    q = torch.randn(1024, 2, 64, device=dev)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        out = ag.graph_attention(q, q, q, g, backend="cupy")
    s.synchronize()
    ref = ag.graph_attention(q, q, q, g, backend="torch")
    assert torch.allclose(out, ref, atol=1e-4)
    assert math.isfinite(out.sum().item())


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("graph", ["window", "longformer", "bigbird"])
def test_tiles_on_gpu(graph, dtype):
    """Dense tiles by cuBLAS, the residual edges by the fused kernels, merged by lse."""
    g = GRAPHS[graph]() | masks.random(4096, 4, seed=1)
    plan = g.tile_plan()
    assert plan.num_tiles and plan.num_residual_edges
    _check_within_twice_reference_error(g, dtype, "tiles", "cupy")
