"""GraphAttentionConv vs PyG's TransformerConv: forward + backward time and peak memory.

Random graphs with a fixed out-degree (every node sends ``E / N`` edges to uniformly random
targets, listed source-major: not sorted by target), ``in_channels = out_channels = 64``,
``heads = 4`` (output ``4 * 64``), float32 on CPU. Each layer runs on the same plain
``edge_index`` (``GraphAttentionConv`` sorts it into a TokenGraph on every call); the
"TokenGraph" rows pass a graph built once, as a model that reuses its graph would.

Method. Every (layer, graph) measurement runs in a fresh subprocess, so allocator state
and high-water marks never leak between measurements:

* **warm-up**: one forward + backward on a 1000-node subgraph through the same code paths,
  so that code pages and one-time allocations are not counted.
* **memory**: peak resident set size during a forward + backward minus the RSS just before
  it (after ``gc.collect()`` and ``malloc_trim(0)``); the largest over ``--reps`` calls.
  The peak is the kernel's ``VmHWM``, reset through ``/proc/self/clear_refs`` before each
  call; where that is refused, ``ru_maxrss`` of the first call.
* **budget**: the subprocess runs under ``RLIMIT_AS = current address space + budget``, so
  a layer that needs more than the budget fails an allocation (reported "out of budget")
  instead of exhausting the machine.
* **time**: median wall time of the same ``--reps`` forward + backward calls
  (``loss = out.square().mean()``), and of their forward part.
* **compiled** rows: ``torch.compile(layer)`` with the default backend; the warm-up adds one
  call at full size, so no compilation is timed or counted.

    python benchmarks/layer.py                  # 1e5 nodes, 1e6 and 1e7 edges
    python benchmarks/layer.py --quick          # 1e4 nodes, 1e5 edges: seconds
"""
import argparse
import ctypes
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time

LAYERS = {
    "TransformerConv": "edge_index",
    "GraphAttentionConv": "edge_index",
    "GraphAttentionConv (TokenGraph)": "token_graph",
    "TransformerConv (compiled)": "edge_index",
    "GraphAttentionConv (compiled)": "edge_index",
    "GraphAttentionConv (TokenGraph, compiled)": "token_graph",
}


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak():
    """Reset VmHWM to the current RSS; False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child(args):
    """One measurement; prints a JSON line."""
    import torch
    from torch_geometric.nn import TransformerConv

    import attngraph as ag
    from attngraph.nn import GraphAttentionConv

    N, E, C, H = args.nodes, args.edges, args.channels, args.heads
    gen = torch.Generator().manual_seed(0)
    degree = E // N
    src = torch.arange(N).repeat_interleave(degree)
    dst = torch.randint(0, N, (src.numel(),), generator=gen)
    edge_index = torch.stack([src, dst])
    x = torch.randn(N, C, generator=gen)
    torch.manual_seed(0)
    cls = TransformerConv if args.layer.startswith("TransformerConv") else GraphAttentionConv
    layer = module = cls(C, C, heads=H)
    compiled = args.layer.endswith("compiled)")
    if compiled:
        layer = torch.compile(module)
    graph = edge_index
    if LAYERS[args.layer] == "token_graph":
        graph = ag.TokenGraph(edge_index, num_nodes=N)

    def step(inputs, graph):
        """Forward + backward; returns the forward's share of the time."""
        t0 = time.perf_counter()
        out = layer(inputs, graph)
        t1 = time.perf_counter()
        out.square().mean().backward()
        module.zero_grad(set_to_none=True)
        return t1 - t0

    # Warm up on a small graph through the same code paths, so that pages of code and
    # one-time allocations are not counted as the layer's memory.
    small = edge_index[:, (edge_index < 1000).all(0)]
    step(x[:1000], small if graph is edge_index else ag.TokenGraph(small, num_nodes=1000))
    if compiled:   # the full size is a second shape: the compile it triggers isn't timed
        step(x, graph)
    vm = _status_kib("VmSize") * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + int(args.budget_gb * 2**30),
                                            resource.RLIM_INFINITY))
    result = {"layer": args.layer, "nodes": N, "edges": src.numel()}
    times, forward, peaks = [], [], []
    for _ in range(args.reps):
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        resettable = _reset_peak()
        base = _status_kib("VmRSS") if resettable else \
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        try:
            forward.append(step(x, graph))
        except (RuntimeError, MemoryError) as err:  # an allocation refused by RLIMIT_AS
            result["error"] = f"out of budget (> {args.budget_gb:g} GiB)"
            result["detail"] = str(err)[:120]
            break
        times.append(time.perf_counter() - t0)
        peak = _status_kib("VmHWM") if resettable else \
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if resettable or not peaks:  # ru_maxrss never resets: only the first call counts
            peaks.append((peak - base) / 2**20)
    else:
        result.update(seconds=statistics.median(times), forward=statistics.median(forward),
                      peak_gib=max(peaks),
                      peak_method="VmHWM" if resettable else "ru_maxrss")
    print(json.dumps(result), flush=True)


def measure(args, layer, edges):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", layer, "--nodes",
           str(args.nodes), "--edges", str(edges), "--channels", str(args.channels),
           "--heads", str(args.heads), "--reps", str(args.reps), "--budget-gb",
           str(args.budget_gb)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        kind = "killed" if proc.returncode < 0 else "failed"
        return {"layer": layer, "nodes": args.nodes, "edges": edges,
                "error": f"{kind}: {tail[0][:80]}"}
    return json.loads(lines[-1])


def _eager_name(layer):
    """The eager layer a compiled row compares with."""
    return layer.replace(", compiled)", ")").replace(" (compiled)", "")


def table(results):
    rows = ["| nodes | edges | layer | forward (s) | fwd+bwd (s) | peak memory (GiB) | "
            "fwd+bwd time vs PyG | memory vs PyG | fwd+bwd time vs eager |",
            "|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    ok = [r for r in results if "error" not in r]

    def ratio(r, name, key, fmt):
        ref = next((q for q in ok if q["edges"] == r["edges"] and q["layer"] == name), None)
        return "—" if ref is None or ref is r else fmt.format(r[key] / ref[key])

    for r in results:
        if "error" in r:
            rows.append(f"| {r.get('nodes', 0):.0e} | {r['edges']:.0e} | {r['layer']} | "
                        f"{r['error']} | | | | | |")
            continue
        eager = _eager_name(r["layer"])
        rows.append(f"| {r['nodes']:.0e} | {r['edges']:.0e} | {r['layer']} | "
                    f"{r['forward']:.2f} | {r['seconds']:.2f} | {r['peak_gib']:.2f} | "
                    f"{ratio(r, 'TransformerConv', 'seconds', '{:.2f}×')} | "
                    f"{ratio(r, 'TransformerConv', 'peak_gib', '{:.3f}×')} | "
                    f"{ratio(r, eager, 'seconds', '{:.2f}×') if eager != r['layer'] else '—'} |")
    return "\n".join(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=100_000)
    parser.add_argument("--edges", type=float, nargs="+", default=[1e6, 1e7])
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--budget-gb", type=float, default=14.0,
                        help="address-space budget per measurement (GiB)")
    parser.add_argument("--layers", nargs="+", default=list(LAYERS), choices=list(LAYERS))
    parser.add_argument("--quick", action="store_true",
                        help="--nodes 10000 --edges 1e5")
    parser.add_argument("--child", choices=list(LAYERS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.layer, args.edges = args.child, int(args.edges[0])
        return child(args)
    if args.quick:
        args.nodes, args.edges = 10_000, [1e5]

    import torch

    print(f"# {args.nodes} nodes, in = out = {args.channels} channels, {args.heads} heads, "
          f"float32, torch {torch.__version__}, {os.cpu_count()} CPU cores, "
          f"{torch.get_num_threads()} threads", flush=True)
    results = []
    for edges in args.edges:
        for layer in args.layers:
            r = measure(args, layer, int(edges))
            print(f"# {json.dumps(r)}", flush=True)
            results.append(r)
    print(table(results))


if __name__ == "__main__":
    main()
