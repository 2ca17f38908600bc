"""torch.compile of the operator, the stages and the layers: no graph break, eager results.

Every public entry point goes through ``torch.library`` custom ops with fake (shape)
implementations, so ``fullgraph=True`` (which raises on any graph break) compiles it, on the
torch backend with and without torch_scatter and on the CUDA kernels through the emulator.
The main cases compile with the default backend (inductor); the larger matrices use
``aot_eager``, which runs the same tracing (dynamo, fake tensors, autograd) without
generating C++.
"""
import math

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

import attngraph as ag
from attngraph import TokenGraph, masks
from attngraph.nn import GraphAttentionConv, SparseSelfAttention
from attngraph.ops import segment
from helpers import scatter_mode  # noqa: F401


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# (backend, torch_scatter used): the CUDA kernels don't use the segment ops
BACKENDS = [("torch", True), ("torch", False), ("cupy", None)]


@pytest.fixture(params=BACKENDS, ids=["torch-scatter", "torch-ops", "cupy-emulated"])
def backend(request, monkeypatch):
    name, scatter = request.param
    if name == "cupy":
        monkeypatch.setenv("ATTNGRAPH_CUDA_EMULATE", "1")
    elif scatter:
        pytest.importorskip("torch_scatter")
    monkeypatch.setattr(segment, "USE_TORCH_SCATTER", bool(scatter))
    return name


def breaks(fn, *args) -> int:
    """Graph breaks dynamo finds in ``fn(*args)``."""
    torch._dynamo.reset()
    count = torch._dynamo.explain(fn)(*args).graph_break_count
    torch._dynamo.reset()
    return count


def leaves(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


def run(fn, inputs, seed=1):
    """``fn(*inputs)`` and the gradients of a random projection of it w.r.t. ``inputs``."""
    out = fn(*inputs)
    gen = torch.Generator().manual_seed(seed)
    dout = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    return out, torch.autograd.grad(out, inputs, dout)


def assert_close(a, b, atol=2e-5, rtol=1e-4):
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


# ---------------------------------------------------------------------------- graph_attention
def _node_major_case():
    """GQA, a per-head bias, a graph with empty rows and a long (split) row."""
    mask = masks.longformer(70, 3, [0, 41]).to_dense()
    mask[[5, 6, 60]] = False
    g = TokenGraph.from_dense(mask)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(70, 4, 16, generator=gen)
    k, v = torch.randn(2, 70, 2, 16, generator=gen)
    bias = torch.randn(g.num_edges, 4, generator=gen)
    return g, (q, k, v, bias)


def _batched_bipartite_case():
    """Batched ``[B, L, H, D]`` inputs on a bipartite graph, a shared ``[E]`` bias."""
    mask = torch.rand(30, 45, generator=torch.Generator().manual_seed(1)) < 0.2
    mask[3] = False
    g = TokenGraph.from_dense(mask)
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, 30, 2, 8, generator=gen)
    k, v = torch.randn(2, 2, 45, 2, 8, generator=gen)
    bias = torch.randn(g.num_edges, generator=gen)
    return g, (q, k, v, bias)


@pytest.mark.parametrize("case", [_node_major_case, _batched_bipartite_case],
                         ids=["gqa-bias", "batched-bipartite"])
def test_graph_attention_compiles_fullgraph(backend, case):
    g, inputs = case()

    def fn(q, k, v, bias):
        out, lse = ag.graph_attention(q, k, v, g, edge_bias=bias, return_lse=True,
                                      backend=backend)
        return out + lse.unsqueeze(-1)       # both outputs reach the loss

    assert breaks(fn, *inputs) == 0
    want, want_grads = run(fn, leaves(*inputs))
    got, got_grads = run(torch.compile(fn, fullgraph=True), leaves(*inputs))
    assert_close(got, want)
    for a, b in zip(got_grads, want_grads):
        assert_close(a, b)


def test_a_new_graph_of_the_same_size_reuses_the_compiled_code():
    """The graph enters the compiled code as tensors, not as constants: another graph with
    the same sizes runs the same code, with its own edges."""
    counter = CompileCounterWithBackend("aot_eager")
    fn = torch.compile(lambda q, g: ag.graph_attention(q, q, q, g), backend=counter,
                       fullgraph=True)
    q = torch.randn(64, 2, 8)
    for seed in range(3):
        g = masks.random(64, 8, seed=seed)
        assert_close(fn(q, g), ag.graph_attention(q, q, q, g))
    assert counter.frame_count == 1


@pytest.mark.parametrize("name", ["torch", "cupy"])
def test_dynamic_compiles_once_for_graphs_of_every_size(name, monkeypatch):
    monkeypatch.setenv("ATTNGRAPH_CUDA_EMULATE", "1")
    counter = CompileCounterWithBackend("aot_eager")

    def fn(q, g):
        return ag.graph_attention(q, q, q, g, backend=name)

    compiled = torch.compile(fn, backend=counter, dynamic=True, fullgraph=True)
    for n in (48, 80, 96):
        g = masks.sliding_window(n, 5) | masks.random(n, 2, seed=n)
        q = torch.randn(n, 2, 8, requires_grad=True)
        out, (dq,) = run(lambda q: compiled(q, g), [q])
        want, (want_dq,) = run(lambda q: fn(q, g), [q])
        assert_close(out, want)
        assert_close(dq, want_dq)
    assert counter.frame_count <= 2      # the bound; dynamic=True compiles once


@pytest.mark.parametrize("name", ["torch", "cupy"])
def test_nan_bias_is_an_error_in_compiled_code(name, monkeypatch):
    monkeypatch.setenv("ATTNGRAPH_CUDA_EMULATE", "1")
    g = masks.sliding_window(20, 2)
    q = torch.randn(20, 1, 8)
    bias = torch.zeros(g.num_edges)
    bias[3] = math.nan
    fn = torch.compile(lambda q, b: ag.graph_attention(q, q, q, g, edge_bias=b, backend=name),
                       backend="aot_eager", fullgraph=True)
    with pytest.raises(ValueError, match="edge_bias contains NaN"):
        fn(q, bias)


# ---------------------------------------------------------------------------- stages
def test_stages_compile_fullgraph(backend):
    g = masks.bigbird(50, 5, seed=0)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(50, 4, 8, generator=gen)
    k, v = torch.randn(2, 50, 2, 8, generator=gen)

    def fn(q, k, v):
        s = ag.ops.edge_scores(q, k, g, backend=backend)
        p = ag.ops.edge_softmax(s, g, backend=backend)
        return ag.ops.aggregate(p, v, g, backend=backend)

    assert breaks(fn, q, k, v) == 0
    want, want_grads = run(fn, leaves(q, k, v))
    got, got_grads = run(torch.compile(fn, backend="aot_eager", fullgraph=True),
                         leaves(q, k, v))
    assert_close(got, want)
    for a, b in zip(got_grads, want_grads):
        assert_close(a, b)


# ---------------------------------------------------------------------------- layers
class _GNN(torch.nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.conv1 = GraphAttentionConv(8, 4, heads=2, **kwargs)
        self.conv2 = GraphAttentionConv(8, 4, heads=2, **kwargs)

    def forward(self, x, edge_index, edge_attr=None):
        return self.conv2(self.conv1(x, edge_index, edge_attr).relu(), edge_index, edge_attr)


def _edges(num_nodes=40, num_edges=160):
    gen = torch.Generator().manual_seed(3)
    ei = torch.randint(0, num_nodes, (2, num_edges), generator=gen)
    ei[:, -5:] = ei[:, :5]                        # duplicate edges, as PyG counts them
    return ei


@pytest.mark.parametrize("form", ["edge_index", "token_graph", "edge_attr", "unfused"])
def test_two_layer_gnn_compiles_fullgraph(scatter_mode, form):
    torch.manual_seed(0)
    ei = _edges()
    x = torch.randn(40, 8)
    model = _GNN(edge_dim=3) if form == "edge_attr" else _GNN()
    if form == "unfused":
        model.conv1.fused = model.conv2.fused = False
    args = [ei if form != "token_graph" else TokenGraph(ei, 40)]
    if form == "edge_attr":
        args.append(torch.randn(ei.size(1), 3, generator=torch.Generator().manual_seed(4)))

    assert breaks(model, x, *args) == 0
    xs = leaves(x)
    want, want_grads = run(lambda x: model(x, *args), xs)
    params = list(model.parameters())
    want_pgrads = torch.autograd.grad(model(xs[0], *args).sum(), params)
    compiled = torch.compile(model, fullgraph=True,
                             backend="inductor" if form == "edge_index" else "aot_eager")
    got, got_grads = run(lambda x: compiled(x, *args), xs)
    got_pgrads = torch.autograd.grad(compiled(xs[0], *args).sum(), params)
    assert_close(got, want)
    for a, b in zip(list(got_grads) + list(got_pgrads), list(want_grads) + list(want_pgrads)):
        assert_close(a, b)


@pytest.mark.parametrize("as_graph", [False, True], ids=["edge_index", "token_graph"])
def test_attention_weights_compile_fullgraph(scatter_mode, as_graph):
    torch.manual_seed(0)
    ei = _edges()
    edges = TokenGraph(ei, 40) if as_graph else ei
    conv = GraphAttentionConv(8, 4, heads=2)
    x = torch.randn(40, 8)

    def fn(x):
        out, (_, alpha) = conv(x, edges, return_attention_weights=True)
        return out, alpha

    assert breaks(fn, x) == 0
    got = torch.compile(fn, backend="aot_eager", fullgraph=True)(x)
    want = fn(x)
    for a, b in zip(got, want):
        assert_close(a, b)


def test_compiled_gnn_rejects_out_of_range_edges():
    conv = GraphAttentionConv(8, 4, heads=2)
    compiled = torch.compile(conv, backend="aot_eager", fullgraph=True)
    x = torch.randn(10, 8)
    compiled(x, torch.tensor([[0, 1], [1, 2]]))
    with pytest.raises(ValueError, match="outside"):
        compiled(x, torch.tensor([[0, 10], [1, 2]]))


class _Block(torch.nn.Module):
    def __init__(self, graph, dropout=0.0):
        super().__init__()
        self.graph = graph
        self.attn = SparseSelfAttention(32, 4, num_kv_heads=2, dropout=dropout)
        self.mlp = torch.nn.Linear(32, 32)

    def forward(self, x):
        x = x + self.attn(x, self.graph)
        return x + self.mlp(x).relu()


def test_sparse_self_attention_compiles_fullgraph(backend):
    torch.manual_seed(0)
    block = _Block(masks.longformer(48, 4, [0, 47])).eval()
    x = torch.randn(2, 48, 32)
    assert breaks(block, x) == 0
    want, (want_dx,) = run(block, leaves(x))
    got, (got_dx,) = run(torch.compile(block, fullgraph=True), leaves(x))
    assert_close(got, want)
    assert_close(got_dx, want_dx)


def test_sparse_self_attention_with_dropout_compiles_fullgraph(scatter_mode):
    """Training with attention dropout runs the unfused stages: they compile too."""
    torch.manual_seed(0)
    block = _Block(masks.sliding_window(48, 4), dropout=0.5).train()
    x = torch.randn(2, 48, 32)
    assert breaks(block, x) == 0
    out = torch.compile(block, backend="aot_eager", fullgraph=True)(x)
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for p in block.parameters())
    block.eval()                                   # without dropout: the eager result
    assert_close(torch.compile(block, backend="aot_eager", fullgraph=True)(x), block(x))


# ---------------------------------------------------------------------------- the ops
def test_custom_ops_pass_opcheck(monkeypatch):
    """Schema, fake implementation and autograd registration of every op attngraph adds."""
    from attngraph.ops import chunked  # noqa: F401 - register the ops
    from attngraph.ops.cuda import fused, stages  # noqa: F401

    monkeypatch.setenv("ATTNGRAPH_CUDA_EMULATE", "1")
    g = masks.longformer(30, 2, [0])
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(30, 2, 8, generator=gen).requires_grad_() for _ in range(3))
    bias = torch.randn(g.num_edges, 1, generator=gen).requires_grad_()
    s = torch.randn(g.num_edges, 2, generator=gen).requires_grad_()
    arrays = (g.ptr, g.src, g.dst, g.num_src)
    ops = torch.ops.attngraph
    cases = [
        (ops.chunked_attention, (q, k, v, bias, *arrays, 0.3, 1 << 20, True)),
        (ops.graph_attention, (q, k, v, bias, *arrays, 0.3, True)),
        (ops.edge_scores, (q, k, *arrays, 0.5)),
        (ops.edge_softmax, (s, *arrays)),
        (ops.aggregate, (s, v, *arrays)),
        (ops.checked_edges, (g.src, g.dst, g.num_src, g.num_dst)),
    ]
    if segment.WITH_TORCH_SCATTER:
        x = torch.randn(g.num_edges, 3, generator=gen).requires_grad_()
        y = torch.randn(g.num_dst, 3, generator=gen).requires_grad_()
        cases += [(ops.segment_sum, (x, g.ptr)), (ops.segment_max, (x.detach(), g.ptr)),
                  (ops.gather_rows, (y, g.ptr, g.num_edges))]
    for op, args in cases:
        torch.library.opcheck(op.default, args)


# ---------------------------------------------------------------------------- fast paths
# The tile and key-range paths are operators too: compiled, every backend runs what it runs
# eagerly, and auto takes the same one (the tiles operator makes auto's tiles-or-torch
# choice when it runs, from the graph's tile counts, which are never traced).
def _fast_graphs():
    buckets = torch.randint(0, 4, (300,), generator=torch.Generator().manual_seed(5))
    return {
        "window": (masks.sliding_window(300, 40), "tiles"),
        "longformer": (masks.longformer(300, 40, [0, 150]), "tiles"),
        "implicit-longformer": (masks.longformer(300, 16, [0, 150], implicit=True), "ranges"),
        "implicit-union": (masks.sliding_window(300, 8, implicit=True)
                           | masks.dilated_window(300, 3, 20, implicit=True), "ranges"),
        "hash": (masks.hash_buckets(buckets, causal=True), "ranges"),
        "random": (masks.random(300, 6, seed=0), "torch"),
    }


# (graph, backend): every backend that takes the graph eagerly
FAST = [("window", "auto"), ("window", "tiles"), ("longformer", "auto"),
        ("longformer", "tiles"), ("implicit-longformer", "auto"),
        ("implicit-longformer", "ranges"), ("implicit-longformer", "torch"),
        ("implicit-union", "auto"),
        ("implicit-union", "ranges"), ("hash", "auto"), ("hash", "tiles"),
        ("hash", "ranges"), ("random", "auto"), ("random", "tiles")]


def _fast_inputs(n=300, batched=False):
    gen = torch.Generator().manual_seed(0)
    shape = (2, n) if batched else (n,)
    q = torch.randn(*shape, 4, 16, generator=gen)
    k, v = torch.randn(2, *shape, 2, 16, generator=gen)
    return q, k, v


@pytest.mark.parametrize("name,backend", FAST, ids=[f"{n}-{b}" for n, b in FAST])
def test_fast_paths_compile_fullgraph_and_run_what_eager_runs(name, backend):
    from attngraph.ops.dispatch import Inputs, select_backend
    from attngraph.ops.record import recording

    g, auto_runs = _fast_graphs()[name]
    inputs = _fast_inputs()
    assert select_backend(backend, Inputs.of(*inputs, g)).name == (
        auto_runs if backend == "auto" else backend)

    def fn(q, k, v):
        out, lse = ag.graph_attention(q, k, v, g, return_lse=True, backend=backend)
        return out + lse.unsqueeze(-1)       # both outputs reach the loss

    assert breaks(fn, *inputs) == 0
    with recording() as eager_ran:
        want, want_grads = run(fn, leaves(*inputs))
    with recording() as compiled_ran:
        got, got_grads = run(torch.compile(fn, backend="aot_eager", fullgraph=True),
                             leaves(*inputs))
    assert eager_ran == compiled_ran == [auto_runs if backend == "auto" else backend]
    assert_close(got, want)
    for a, b in zip(got_grads, want_grads):
        assert_close(a, b)


@pytest.mark.parametrize("name", ["longformer", "implicit-longformer"])
def test_compiled_auto_runs_the_fast_path_under_inductor(name):
    """Inductor too: auto's compiled call runs the tiles / ranges operator, not the
    torch backend, and gives the eager result (batched GQA inputs)."""
    from attngraph.ops.record import recording

    g, expected = _fast_graphs()[name]
    inputs = _fast_inputs(batched=True)

    def fn(q, k, v):
        return ag.graph_attention(q, k, v, g)

    compiled = torch.compile(fn, fullgraph=True)
    want, want_grads = run(fn, leaves(*inputs))
    with recording() as ran:
        got, got_grads = run(compiled, leaves(*inputs))
        compiled(*inputs)
    assert ran == [expected, expected]
    assert_close(got, want)
    for a, b in zip(got_grads, want_grads):
        assert_close(a, b)


def test_compiled_tiles_take_a_bias_and_its_gradient():
    g = masks.longformer(300, 40, [0, 150])
    q, k, v = _fast_inputs()
    bias = torch.randn(g.num_edges, 4, generator=torch.Generator().manual_seed(7))

    def fn(q, k, v, bias):
        return ag.graph_attention(q, k, v, g, edge_bias=bias, backend="tiles")

    assert breaks(fn, q, k, v, bias) == 0
    want, want_grads = run(fn, leaves(q, k, v, bias))
    got, got_grads = run(torch.compile(fn, backend="aot_eager", fullgraph=True),
                         leaves(q, k, v, bias))
    assert_close(got, want)
    for a, b in zip(got_grads, want_grads):
        assert_close(a, b)


@pytest.mark.parametrize("implicit", [False, True], ids=["tiles", "ranges"])
def test_a_new_graph_reuses_the_compiled_fast_path(implicit):
    """The graph enters the operators as tensors (its edges, or an implicit graph's key):
    another graph of the same sizes runs the same compiled code, with its own plan (a new
    edge count compiles once more, then sizes are dynamic)."""
    from attngraph.ops.record import recording

    counter = CompileCounterWithBackend("aot_eager")
    fn = torch.compile(lambda q, g: ag.graph_attention(q, q, q, g), backend=counter,
                       fullgraph=True)
    q = torch.randn(256, 2, 8)
    for w in (20, 30, 40):
        g = masks.sliding_window(256, w, implicit=implicit)
        with recording() as ran:
            got = fn(q, g)
        assert_close(got, ag.graph_attention(q, q, q, g))
        assert ran == ["ranges" if implicit else "tiles"]
    assert counter.frame_count == (1 if implicit else 2)


def test_compiled_auto_chooses_per_graph_when_it_runs():
    """One compiled function, graphs on either side of the tile plan's break-even: each
    call runs what auto runs eagerly on that graph."""
    from attngraph.ops.record import recording

    fn = torch.compile(lambda q, g: ag.graph_attention(q, q, q, g), backend="aot_eager",
                       fullgraph=True)
    q = torch.randn(300, 2, 8)
    for g in (masks.sliding_window(300, 40), masks.random(300, 6, seed=1)):
        with recording() as eager:
            want = ag.graph_attention(q, q, q, g)
        with recording() as compiled:
            got = fn(q, g)
        assert compiled == eager and eager[0] in ("tiles", "torch")
        assert_close(got, want)


def test_fast_path_ops_pass_opcheck():
    from attngraph.ops import chunked, ranges, tiles  # noqa: F401 - register the ops
    g = masks.longformer(70, 8, [0, 40])
    gi = masks.longformer(70, 8, [0, 40], implicit=True)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(70, 2, 8, generator=gen).requires_grad_() for _ in range(3))
    bias = torch.randn(g.num_edges, 1, generator=gen).requires_grad_()
    ops = torch.ops.attngraph
    for auto in (False, True):
        torch.library.opcheck(ops.tile_attention.default,
                              (q, k, v, bias, g.ptr, g.src, g.dst, g.num_src, 0.3, "torch",
                               auto, True))
    torch.library.opcheck(ops.range_attention.default, (q, k, v, gi.key, 0.3))
    torch.library.opcheck(ops.chunked_attention_implicit.default,
                          (q, k, v, None, gi.key, 0.3, 1 << 20, True))
