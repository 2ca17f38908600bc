"""The body of one rank in tests/test_distributed.py (started there with spawn, gloo on
loopback). Each scenario writes a dict of results to ``out/<scenario>-<rank>.pt``."""
import datetime
import os
import signal
import time
import traceback

import torch
import torch.distributed as dist

import attngraph as ag
from attngraph import TokenGraph, masks
from attngraph import distributed as agd
from attngraph.implicit import ImplicitGraph
from attngraph.nn import SparseSelfAttention

N = 60


def cases(world):
    """name -> (graph, ranges or None, batched, heads, kv heads, bias)."""
    even = agd.shard_ranges(N, world, balance="tokens")
    lengths = [b - a for a, b in even]
    uneven = [(0, 7), (7, 40), (40, N)] if world == 3 else [(0, 13), (13, N)]
    longformer = masks.longformer(N, 3, [0, 31, N - 1])
    return {   # the last entry: ship_degree (rows with more remote edges ship their query)
        "sliding_window": (masks.sliding_window(N, 4), None, False, 2, 2, None, None),
        "longformer": (longformer, None, False, 4, 2, "E", None),
        "random": (masks.random(N, 5, seed=1), uneven, True, 2, 1, "EH", None),
        "bigbird": (masks.bigbird(N, 5, seed=2), None, True, 4, 4, None, None),
        "no_halo": (masks.document(lengths), even, False, 2, 2, None, None),
        "every_key": (masks.full(N), uneven, False, 2, 2, "EH", None),
        # global rows ship their queries to the keys' owners; parts merged by lse
        "longformer_shipped": (longformer, None, False, 4, 2, "E", 8),
        "bigbird_shipped": (masks.bigbird(N, 5, seed=2), uneven, True, 4, 2, "EH", 3),
        "every_row_shipped": (masks.full(N), uneven, False, 2, 2, None, 0),
        # only rank 0 ships (one global row): it gets no guests, the others no parts
        "one_global_shipped": (masks.longformer(N, 3, [0]), None, True, 2, 2, "E", 8),
        # every part on the tiles backend, whose out depends on its lse (a merge inside)
        "longformer_tiles": (longformer, None, False, 2, 2, "EH", 8, "tiles"),
    }


def _inputs(graph, batched, H, H_kv, bias_kind, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lead = (2, N) if batched else (N,)
    q = torch.randn(*lead, H, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(*lead, H_kv, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(*lead, H_kv, 6, generator=gen, dtype=torch.float64)
    bias = None
    if bias_kind == "E":
        bias = torch.randn(graph.num_edges, generator=gen, dtype=torch.float64)
    elif bias_kind == "EH":
        bias = torch.randn(graph.num_edges, H, generator=gen, dtype=torch.float64)
    dout = torch.randn(*lead, H, 6, generator=gen, dtype=torch.float64)
    return q, k, v, bias, dout


def _rows(t, r0, r1, batched):
    return (t[:, r0:r1] if batched else t[r0:r1]).detach().clone()


def attention_case(rank, world, name):
    graph, ranges, batched, H, H_kv, bias_kind, ship, *backend = cases(world)[name]
    backend = backend[0] if backend else "auto"
    ranges = ranges or agd.shard_ranges(graph, world)
    r0, r1 = ranges[rank]
    e0, e1 = int(graph.ptr[r0]), int(graph.ptr[r1])
    q, k, v, bias, dout = _inputs(graph, batched, H, H_kv, bias_kind)
    # one process, the whole sequence
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    fb = bias.clone().requires_grad_() if bias is not None else None
    out, lse = ag.graph_attention(*full, graph, edge_bias=fb, return_lse=True)
    ref_grads = torch.autograd.grad(out, full + ([fb] if fb is not None else []), dout)
    want = {"out": _rows(out, r0, r1, batched), "lse": _rows(lse, r0, r1, batched),
            "dq": _rows(ref_grads[0], r0, r1, batched), "dk": _rows(ref_grads[1], r0, r1, batched),
            "dv": _rows(ref_grads[2], r0, r1, batched)}
    if fb is not None:
        want["dbias"] = ref_grads[3][e0:e1]

    def sharded():
        mine = [_rows(t, r0, r1, batched).requires_grad_() for t in (q, k, v)]
        mb = bias[e0:e1].clone().requires_grad_() if bias is not None else None
        o, l = agd.graph_attention(*mine, graph, ranges=ranges, edge_bias=mb, return_lse=True,
                                   ship_degree=ship, backend=backend)
        g = torch.autograd.grad(o, mine + ([mb] if mb is not None else []),
                                _rows(dout, r0, r1, batched))
        got = {"out": o.detach(), "lse": l, "dq": g[0], "dk": g[1], "dv": g[2]}
        if mb is not None:
            got["dbias"] = g[3]
        return got

    first, second = sharded(), sharded()
    plan = agd.halo_plan(graph, ranges, ship_degree=ship)
    return {"err": {key: (first[key] - want[key]).abs().max().item() if want[key].numel() else 0.0
                    for key in want},
            "bitwise": all(torch.equal(first[key], second[key]) for key in first),
            "halo": plan.halo_size, "own": r1 - r0, "shipped": sum(plan.ship_counts),
            "guests": sum(plan.guest_counts)}


def layer_case(rank, world):
    torch.manual_seed(0)
    graph = masks.longformer(N, 4, [0, 30])
    layer = SparseSelfAttention(16, 4, num_kv_heads=2).double()
    sharded = SparseSelfAttention(16, 4, num_kv_heads=2, process_group=dist.group.WORLD)
    sharded = sharded.double()
    sharded.load_state_dict(layer.state_dict())
    x = torch.randn(2, N, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ranges = agd.shard_ranges(graph, world)
    r0, r1 = ranges[rank]
    want = layer(x, graph)[:, r0:r1]
    got = sharded(x[:, r0:r1], graph)
    return {"err": (got - want).abs().max().item()}


def error_case(rank, world, kind):
    graph = masks.sliding_window(N, 4)
    ranges = agd.shard_ranges(graph, world)
    if kind == "graph" and rank == 1:
        graph = masks.sliding_window(N, 5)
    if kind == "ranges" and rank == 0:     # valid ranges, but not the others' ranges
        ranges = [(0, ranges[0][1] + 1)] + [(ranges[1][0] + 1, ranges[1][1])] + ranges[2:]
    r0, r1 = ranges[rank]
    n = r1 - r0
    if kind == "shard_size" and rank == 1:
        n -= 1
    q = torch.randn(n, 2, 8)
    try:
        agd.graph_attention(q, q, q, graph, ranges=ranges)
    except ValueError as e:
        return {"raised": str(e)}
    return {"raised": None}


# ---------------------------------------------------------------------------- implicit graphs
def implicit_cases():
    """name -> (build(implicit) -> graph, ship_degree, bias kind, batched, rows-only)."""
    gen = torch.Generator().manual_seed(5)
    buckets = torch.randint(0, 4, (N,), generator=gen)
    keep_q = torch.rand(N, generator=gen) > 0.3
    keep_k = torch.rand(N, generator=gen) > 0.3
    lf = lambda imp: masks.longformer(N, 3, [0, 31, N - 1], implicit=imp)   # noqa: E731
    return {
        "window": (lambda imp: masks.sliding_window(N, 4, implicit=imp), None, None, False,
                   False),
        "window_causal": (lambda imp: masks.sliding_window(N, 6, causal=True, implicit=imp),
                          None, None, True, False),
        "dilated_window": (lambda imp: masks.dilated_window(N, 3, 2, implicit=imp), None,
                           None, False, False),
        "dilated_block": (lambda imp: masks.dilated_block(N, 6, 2, implicit=imp), None, None,
                          False, False),
        "strided": (lambda imp: masks.strided(N, 7, implicit=imp), None, None, False, False),
        "longformer_pulled": (lf, -1, None, False, False),
        "longformer_shipped": (lf, 8, None, True, False),
        "global_tokens": (lambda imp: masks.global_tokens(N, [5, 40], implicit=imp), 8, None,
                          False, False),
        "documents": (lambda imp: masks.document([7, 20, 3, 30], implicit=imp), None, None,
                      True, False),
        "documents_causal": (lambda imp: masks.document([25, 1, 34], causal=True,
                                                        implicit=imp), None, None, False,
                             False),
        "hash": (lambda imp: masks.hash_buckets(buckets, implicit=imp), None, None, True,
                 False),
        "qk_drop": (lambda imp: masks.qk_drop(keep_q, keep_k, implicit=imp), None, None,
                    False, False),
        "union": (lambda imp: masks.sliding_window(N, 2, implicit=imp)
                  | masks.global_tokens(N, [17], implicit=imp), 8, None, False, False),
        "longformer_bias": (lf, 8, "EH", False, False),
        "rows_only": (lf, 8, "E", False, True),
    }


class _Watch:
    """Counts the rows of ``graph`` whose runs are asked for outside ``[r0, r1)`` and the
    calls that would materialise it."""

    def __init__(self, graph, r0, r1):
        self.graph, self.r0, self.r1 = graph, r0, r1
        self.foreign, self.materialised = 0, 0

    def __enter__(self):
        self.runs, self.materialize = ImplicitGraph.runs, ImplicitGraph.materialize
        watch = self

        def runs(g, a, b):
            if g is watch.graph:
                watch.foreign += (b - a) - max(0, min(b, watch.r1) - max(a, watch.r0))
            return watch.runs(g, a, b)

        def materialize(g, *args, **kwargs):
            if g is watch.graph:
                watch.materialised += 1
            return watch.materialize(g, *args, **kwargs)

        ImplicitGraph.runs, ImplicitGraph.materialize = runs, materialize
        return self

    def __exit__(self, *exc):
        ImplicitGraph.runs, ImplicitGraph.materialize = self.runs, self.materialize


def _err(got, want):
    """Largest difference; equal entries (a row without keys: lse -inf on both) count 0."""
    if not want.numel():
        return 0.0
    return torch.where(got == want, 0.0, (got - want).abs()).max().item()


def implicit_case(rank, world, name):
    build, ship, bias_kind, batched, rows_only = implicit_cases()[name]
    explicit = build(False)
    graph = build(True)
    ranges = agd.shard_ranges(explicit, world)
    r0, r1 = ranges[rank]
    e0, e1 = int(explicit.ptr[r0]), int(explicit.ptr[r1])
    q, k, v, bias, dout = _inputs(explicit, batched, 2, 2, bias_kind, seed=7)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    fb = bias.clone().requires_grad_() if bias is not None else None
    out, lse = ag.graph_attention(*full, explicit, edge_bias=fb, return_lse=True)
    ref = torch.autograd.grad(out, full + ([fb] if fb is not None else []), dout)
    want = {"out": _rows(out, r0, r1, batched), "lse": _rows(lse, r0, r1, batched),
            "dq": _rows(ref[0], r0, r1, batched), "dk": _rows(ref[1], r0, r1, batched),
            "dv": _rows(ref[2], r0, r1, batched)}
    if fb is not None:
        want["dbias"] = ref[3][e0:e1]
    g_in = agd.rows_of(explicit, r0, r1) if rows_only else graph

    def sharded(overlap=True):
        mine = [_rows(t, r0, r1, batched).requires_grad_() for t in (q, k, v)]
        mb = bias[e0:e1].clone().requires_grad_() if bias is not None else None
        o, l = agd.graph_attention(*mine, g_in, ranges=ranges, edge_bias=mb,
                                   return_lse=True, ship_degree=ship, overlap=overlap)
        g = torch.autograd.grad(o, mine + ([mb] if mb is not None else []),
                                _rows(dout, r0, r1, batched))
        got = {"out": o.detach(), "lse": l, "dq": g[0], "dk": g[1], "dv": g[2]}
        if mb is not None:
            got["dbias"] = g[3]
        return got

    with _Watch(graph, r0, r1) as watch:
        first, second, serial = sharded(), sharded(), sharded(overlap=False)
    plan = agd.halo_plan(g_in, ranges, ship_degree=ship, edges=bias is not None)
    return {"err": {key: _err(first[key], want[key]) for key in want},
            "bitwise": all(torch.equal(first[key], second[key])
                           and torch.equal(first[key], serial[key]) for key in first),
            "foreign_rows": watch.foreign, "materialised": watch.materialised,
            "own_implicit": plan.own.is_implicit, "halo": plan.halo_size,
            "shipped": sum(plan.ship_counts), "guests": sum(plan.guest_counts)}


def implicit_error_case(rank, world, kind):
    graph = masks.sliding_window(N, 4, implicit=True)
    ranges = agd.shard_ranges(graph, world)
    r0, r1 = ranges[rank]
    n = r1 - r0
    if kind == "implicit_graph" and rank == 1:
        graph = masks.sliding_window(N, 5, implicit=True)
    if kind == "implicit_shard_size" and rank == world - 1:
        n += 1
    if kind == "rows_only_size":
        graph = agd.rows_of(masks.sliding_window(N, 4), r0, r1 - (rank == 0))
    q = torch.randn(n, 2, 8)
    try:
        agd.graph_attention(q, q, q, graph, ranges=ranges)
    except ValueError as e:
        return {"raised": str(e)}
    return {"raised": None}


def kill_main(rank, world, port, out, timeout_s):
    """The last rank kills itself (SIGKILL) as it enters the second call's halo exchange;
    the others record what they raise, and how long it took."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
    graph = masks.longformer(N, 3, [0, 31], implicit=True)
    ranges = agd.shard_ranges(graph, world)
    r0, r1 = ranges[rank]
    q = torch.randn(r1 - r0, 2, 8, requires_grad=True)
    agd.graph_attention(q, q, q, graph, ranges=ranges, ship_degree=8).sum().backward()
    if rank == world - 1:
        real = dist.all_to_all_single

        def die(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)

        dist.all_to_all_single = die
    t0 = time.monotonic()
    result = {"raised": None}
    try:
        agd.graph_attention(q, q, q, graph, ranges=ranges, ship_degree=8).sum().backward()
    except Exception as e:
        result = {"raised": f"{type(e).__name__}: {e}"}
    result["seconds"] = time.monotonic() - t0
    torch.save(result, os.path.join(out, f"kill-{rank}.pt"))
    os._exit(0)             # the group is broken: leave without its teardown


def main(rank, world, port, scenario, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        if scenario == "attention":
            result = {name: attention_case(rank, world, name) for name in cases(world)}
        elif scenario == "implicit":
            result = {name: implicit_case(rank, world, name) for name in implicit_cases()}
        elif scenario == "layer":
            result = layer_case(rank, world)
        elif scenario.startswith(("implicit_", "rows_only")):
            result = implicit_error_case(rank, world, scenario)
        else:
            result = error_case(rank, world, scenario)
    except Exception:
        result = {"exception": traceback.format_exc()}
    torch.save(result, os.path.join(out, f"{scenario}-{rank}.pt"))
    dist.destroy_process_group()
