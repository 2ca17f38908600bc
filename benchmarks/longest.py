"""Longest context: the largest N whose forward (or forward+backward) runs in a memory
budget, found by doubling N until a run fails for memory, then bisecting.

CPU: each trial runs in a fresh forked process whose address space is capped with
``RLIMIT_AS`` at its size after imports plus the budget, so the graph, the inputs and the
peer's work must all fit. CUDA: a trial that raises ``torch.cuda.OutOfMemoryError`` failed;
``--budget-gb`` below the device memory caps the allocator with
``torch.cuda.set_per_process_memory_fraction``.

The memory model next to each answer (:func:`memory_model`) says where the bytes go.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch

from benchmarks.harness import run_isolated
from benchmarks.specs import MaskSpec, human_bytes

__all__ = ["search", "memory_model", "ceiling", "graph_trial", "floor_bytes", "GRAPHS",
           "PAPER_TOKENS", "PAPER_BYTES"]

# How a graph is held: its rule only, or its edges with int64 / int32 node ids.
GRAPHS = ("implicit", "int64", "int32")
# The graph-processing paper's longest context: 160 M tokens on one 80 GB A100.
PAPER_TOKENS = 160e6
PAPER_BYTES = 80e9


def memory_model(spec: MaskSpec, dtype: torch.dtype, heads: int, dim: int, mode: str,
                 peer: str = "attngraph") -> Dict:
    """Bytes per token, per edge and a fixed workspace for ``peer`` (as implemented), plus
    the same for an ideal fused kernel with an int32 CSR and for an implicit mask.

    ``N_max = (budget - workspace) / (per_token + degree * per_edge)``.
    """
    s = torch.empty((), dtype=dtype).element_size()
    hd = heads * dim
    deg = spec.expected_edges(1 << 20) / float(1 << 20)
    if peer.startswith("attngraph"):
        from attngraph.chunks import MAX_CHUNK_ELEMENTS

        convert = 0 if s == 4 else 3 * hd * 4 + hd * s        # fp32 copies, out cast
        tok = 3 * hd * s + convert + hd * 4 + 4 * heads + 8   # q k v, out, lse, CSR offsets
        edge = 16 + 8                                         # int64 src+dst, chunk dst copies
        work = 3 * MAX_CHUNK_ELEMENTS * 4
        if mode == "fwdbwd":
            tok += hd * s + (0 if s == 4 else hd * 4) + 3 * hd * 4 + (0 if s == 4 else 3 * hd * s) \
                + 4 * heads
            work += 3 * MAX_CHUNK_ELEMENTS * 4
        what = ("torch backend as implemented: q, k, v (+ float32 copies for 16-bit inputs), "
                "float32 out and lse, int64 CSR offsets; per edge int64 src + dst (16 B) and "
                "the chunks' row ids (8 B); workspace = chunk temporaries")
    elif peer == "pyg":
        tok = 4 * hd * s + 8
        edge = 16 + (4 if mode == "fwd" else 7) * hd * s + 6 * heads * max(s, 4)
        work = 0
        what = "[E, H, D] gathers of q, k, v and products (4 alive fwd, ~7 fwd+bwd)"
    elif peer.startswith("sdpa"):
        return {"peer": peer, "what": "dense: N^2 bool mask + its additive float copy",
                "per_token": 4 * hd * s, "per_edge": None, "per_token_squared": 1 + s,
                "workspace": 0, "degree": deg}
    else:
        tok, edge, work, what = 4 * hd * s, 0, 0, "block mask only (implicit mask_mod)"
    model = {"peer": peer, "what": what, "per_token": tok, "per_edge": edge, "workspace": work,
             "degree": deg}
    if peer.startswith("attngraph"):
        # where the fused kernels (attngraph/ops/cuda) and implicit structured graphs go
        ideal_tok = 4 * hd * s + 4 * heads + 8
        if mode == "fwdbwd":
            ideal_tok += 4 * hd * s + 4 * heads + 8
        model["ideal_fused"] = {
            "per_token": ideal_tok, "per_edge": 4 if mode == "fwd" else 16,
            "what": "Q, K, V, O (+ dO, dQ, dK, dV) once, lse, CSR offsets; int32 columns "
                    "(+ CSC columns and an int64 permutation)"}
        model["implicit_mask"] = {"per_token": ideal_tok, "per_edge": 0}
    return model


def ceiling(model: Dict, budget: float) -> Dict[str, Optional[float]]:
    """Predicted largest N for ``budget`` bytes under each variant of ``model``."""
    deg = model["degree"]
    out = {}
    if model.get("per_token_squared"):
        a, b = model["per_token_squared"], model["per_token"]
        out["as_implemented"] = (-b + (b * b + 4 * a * budget) ** 0.5) / (2 * a)
        return out
    out["as_implemented"] = (budget - model["workspace"]) / (model["per_token"]
                                                             + deg * model["per_edge"])
    for k in ("ideal_fused", "implicit_mask"):
        if k in model:
            out[k] = budget / (model[k]["per_token"] + deg * model[k]["per_edge"])
    return out


def search(base: Dict, *, start_n: int, max_n: int = 1 << 31, min_n: int = 256,
           resolution: float = 0.1, round_to: int = 1024, isolate: str = "fork",
           timeout: float = 1800.0, max_trials: int = 40,
           log: Optional[Callable[[str], None]] = None) -> Dict:
    """Largest N (multiple of ``round_to``) for which ``base`` (a worker job without ``n``,
    one mode) succeeds. Doubling from ``start_n``, then bisection until the bracket is
    within ``resolution`` (relative)."""
    mode = base["modes"][0]
    trials: List[Dict] = []

    def rnd(n: int) -> int:
        return max(round_to, (n // round_to) * round_to)

    def trial(n: int) -> str:
        job = dict(base, n=n, trial=True, guard=False, check_rows=0, repeats=1, warmup=0)
        res = run_isolated(job, isolate, timeout)
        m = res.get("modes", {}).get(mode, {})
        status = res.get("status") if res.get("status") != "ok" else m.get("status", "error")
        t = {"n": res.get("n", n), "num_edges": res.get("num_edges"), "status": status,
             "reason": m.get("reason") or res.get("reason"), "time_s": m.get("median_s"),
             "peak_bytes": m.get("peak_bytes"), "floor_bytes": m.get("floor_bytes"),
             "check_max_abs_err": m.get("check_max_abs_err")}
        trials.append(t)
        if log:
            log(f"  {base['peer']} {mode} N={t['n']:,}: {status}"
                + (f" ({t['time_s']:.2f} s, peak {human_bytes(t['peak_bytes'])})"
                   if status == "ok" else f" — {(t['reason'] or '')[:100]}"))
        return status

    lo = hi = None
    stop = None
    n = rnd(start_n)
    while n <= max_n and len(trials) < max_trials:
        st = trial(n)
        if st == "ok":
            lo, n = n, n * 2
            continue
        if st not in ("oom", "crashed"):
            stop = st
        hi = n
        break
    if stop is None and lo is None and hi is not None:
        n = rnd(hi // 2)
        while n >= min_n and n < hi and len(trials) < max_trials:
            st = trial(n)
            if st == "ok":
                lo = n
                break
            if st not in ("oom", "crashed"):
                stop = st
                break
            hi, n = n, rnd(n // 2)
    while (stop is None and lo is not None and hi is not None and hi > lo * (1 + resolution)
           and len(trials) < max_trials):
        mid = rnd((lo + hi) // 2)
        if mid <= lo or mid >= hi:
            break
        st = trial(mid)
        if st == "ok":
            lo = mid
        elif st in ("oom", "crashed"):
            hi = mid
        else:
            stop = st
            break
    fail = next((t for t in trials if t["n"] == hi), None)
    best = next((t for t in trials if t["n"] == lo), None)
    return {"peer": base["peer"], "mode": mode, "max_n": lo, "first_failing_n": hi,
            "max_edges": best["num_edges"] if best else None,
            "time_s_at_max": best["time_s"] if best else None,
            "peak_bytes_at_max": best["peak_bytes"] if best else None,
            "floor_bytes_at_max": best["floor_bytes"] if best else None,
            "check_at_max": best["check_max_abs_err"] if best else None,
            "failure": fail["reason"] if fail else None,
            "stopped": (f"{stop}: {trials[-1]['reason']}" if stop else
                        ("reached max_n" if hi is None and lo is not None else None)),
            "trials": trials}


def markdown(data: Dict) -> str:
    meta, rows = data["meta"], data["results"]
    budget = meta["budget"]
    lines = [f"# Longest context: {meta['mask']}, H={meta['heads']}, D={meta['dim']}, "
             f"{meta['dtype']}, budget {human_bytes(budget)}", "",
             f"- device: `{meta['device']}` — {meta.get('device_name')}; torch "
             f"{meta.get('torch')}, torch_geometric {meta.get('torch_geometric')}, cupy "
             f"{meta.get('cupy')}",
             f"- command: `{meta['command']}` ({meta.get('date_utc')} UTC)",
             f"- method: {meta['method']}", "",
             "| peer | mode | largest N | E | time at largest N | peak at largest N | "
             "first failing N | failure | model N_max |",
             "|---|---|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        model = r.get("model_ceiling", {}).get("as_implemented")
        fail = r.get("stopped") or r.get("failure") or "-"
        t = r.get("time_s_at_max")
        cells = [r["peer"], r["mode"], _count(r.get("max_n")), _count(r.get("max_edges")),
                 "-" if t is None else f"{t:.2f} s", human_bytes(r.get("peak_bytes_at_max")),
                 _count(r.get("first_failing_n")), fail[:90].replace("|", "/"),
                 _count(model)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Memory model (bytes; N_max = (budget − workspace) / (per token + degree × "
              "per edge)):", ""]
    for r in rows:
        m = r.get("model")
        if not m:
            continue
        lines.append(f"- {r['peer']} {r['mode']}: {m['per_token']} B/token + "
                     f"{m['per_edge']} B/edge × degree {m['degree']:.1f} + workspace "
                     f"{human_bytes(m['workspace'])} — {m['what']}")
    return "\n".join(lines) + "\n"


def _count(x) -> str:
    return "-" if x is None else f"{int(x):,}"


# ---------------------------------------------------------------------- graph kinds
def floor_bytes(n: int, heads: int, dim: int, dtype: torch.dtype, mode: str) -> int:
    """What any exact attention must hold: Q, K, V, O and a float32 log-sum-exp per (token,
    head); for forward + backward also dO, dQ, dK, dV."""
    s = torch.empty((), dtype=dtype).element_size()
    tok = 4 * heads * dim * s + 4 * heads
    if mode == "fwdbwd":
        tok += 4 * heads * dim * s
    return n * tok


def graph_trial(job: Dict) -> Dict:
    """One trial of the search by graph kind (``job["graph"]`` in :data:`GRAPHS`), in the
    forked child: the graph, the inputs and one call of ``graph_attention`` (backend
    ``"auto"``: the rule's key ranges for an implicit graph, dense tiles plus residual for
    an explicit one) under ``RLIMIT_AS`` = the address space after imports + the budget.
    Peak = the RSS high-water mark above the state after imports, everything included."""
    import math
    import resource
    import time

    import attngraph as ag
    from benchmarks.memory import Meter, exact_heap, vm_size_bytes
    from benchmarks.specs import dtype_name, parse_dtype, parse_mask
    from benchmarks.worker import is_oom

    spec = parse_mask(job["mask"])
    dtype = parse_dtype(job["dtype"])
    n, H, D = int(job["n"]), int(job["heads"]), int(job["dim"])
    mode = job["modes"][0]
    res: Dict = {"mask": spec.label, "n": n, "heads": H, "dim": D, "dtype": dtype_name(dtype),
                 "peer": job["peer"], "graph": job["graph"], "device": "cpu", "status": "ok",
                 "modes": {}}
    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    torch.ones(1 << 20).add_(1).sum()      # thread pool first: its stacks are not the trial's
    exact_heap()
    meter = Meter(torch.device("cpu"))
    meter.baseline()
    limit = vm_size_bytes() + int(job["budget"])
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
    r = res["modes"].setdefault(mode, {"status": "ok"})
    try:
        t = time.perf_counter()
        graph = spec.build(n, job["graph"])
        res["num_edges"] = graph.num_edges
        res["graph_build_s"] = time.perf_counter() - t
        res["graph_bytes"] = (0 if graph.is_implicit else
                              graph.edge_index.as_tensor().element_size() * 2 * graph.num_edges
                              + 8 * (n + 1))
        gen = torch.Generator().manual_seed(0)
        need = mode == "fwdbwd"
        q, k, v = (torch.randn(n, H, D, generator=gen, dtype=dtype).requires_grad_(need)
                   for _ in range(3))
        dout = torch.randn(n, H, D, generator=gen, dtype=dtype) if need else None
        times = []
        for _ in range(max(1, int(job.get("repeats", 1)))):
            # the first call of an explicit graph includes its tile plan; later ones reuse it
            out = lse = None
            for x in (q, k, v):
                x.grad = None
            t = time.perf_counter()
            out, lse = ag.graph_attention(q, k, v, graph, return_lse=True)
            if need:
                out.backward(dout)
            times.append(time.perf_counter() - t)
        r["times_s"] = times
        r["median_s"] = times[-1]
        r["peak_bytes"] = meter.peak()
        r["floor_bytes"] = floor_bytes(n, H, D, dtype, mode)
        r["peak_over_floor"] = r["peak_bytes"] / r["floor_bytes"]
        # three rows checked against float64 softmax over the row's keys (from the graph);
        # after the peak is read, and never a global row (N keys: float64 copies of K, V)
        err = 0.0
        for i in (n // 3, n // 2, n - 1):
            ptr, src = graph.rows(i, i + 1)
            if src.numel() > 1 << 16:
                continue
            kk, vv = k[src].detach().double(), v[src].detach().double()
            s = torch.einsum("hd,jhd->hj", q[i].detach().double(), kk) / math.sqrt(D)
            want = torch.einsum("hj,jhd->hd", torch.softmax(s, -1), vv)
            err = max(err, float((out[i].detach().double() - want).abs().max()))
        r["check_max_abs_err"] = err
    except Exception as e:  # noqa: BLE001 - every failure is a result to report
        r.clear()
        r.update(status="oom" if is_oom(e) or isinstance(e, MemoryError) else "error",
                 reason=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200])
    return res


def graph_markdown(data: Dict) -> str:
    """The table of a search by graph kind, with the paper-scale column."""
    meta, rows = data["meta"], data["results"]
    lines = [f"# Longest context by graph kind: H={meta['heads']}, D={meta['dim']}, budget "
             f"{human_bytes(meta['budget'])}", "",
             f"- device: `{meta['device']}` — {meta.get('device_name')}; torch "
             f"{meta.get('torch')}",
             f"- command: `{meta['command']}` ({meta.get('date_utc')} UTC)",
             f"- method: {meta['method']}",
             "- floor: Q, K, V, O and a float32 lse per token (forward + backward: also dO, "
             "dQ, dK, dV); peak: RSS high-water mark of the trial above the state after "
             "imports (graph, inputs, outputs, gradients, work)",
             f"- paper scale: the N whose measured bytes per token fill "
             f"{PAPER_BYTES / 1e9:.0f} GB, next to the paper's {PAPER_TOKENS / 1e6:.0f} M "
             f"tokens (fp16, forward, one 80 GB A100)", "",
             "- (peak − floor) / E: the measured bytes per edge above the floor (the edge "
             "list itself is 16 B/edge for int64 and 8 for int32; the rest is the first "
             "call's work: tile planning)", "",
             "| mask | dtype | mode | graph | largest N | E | bytes/token | floor B/token | "
             "peak / floor | (peak − floor) / E | time at largest N | paper scale (80 GB) | "
             "first failing N |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        n, peak, floor = r.get("max_n"), r.get("peak_bytes_at_max"), r.get("floor_bytes_at_max")
        bpt = peak / n if n and peak else None
        fpt = floor / n if n and floor else None
        t = r.get("time_s_at_max")
        scale = PAPER_BYTES / bpt if bpt else None
        cells = [r["mask"], r["dtype"], r["mode"], r["graph"], _count(n),
                 _count(r.get("max_edges")), "-" if bpt is None else f"{bpt:,.0f}",
                 "-" if fpt is None else f"{fpt:,.0f}",
                 "-" if bpt is None else f"{bpt / fpt:.3f}",
                 "-" if not (peak and r.get("max_edges")) else
                 f"{(peak - floor) / r['max_edges']:.1f}",
                 "-" if t is None else f"{t:.1f} s",
                 "-" if scale is None else f"{scale / 1e6:,.0f} M",
                 _count(r.get("first_failing_n"))]
        lines.append("| " + " | ".join(cells) + " |")
    for note in data.get("notes") or []:
        lines += ["", f"Note: {note}"]
    same = data.get("same_n") or []
    if same:
        lines += ["", "Implicit vs explicit (int64) at the same N, the explicit graph's largest "
                  "N: two calls each in a fresh process, same inputs; first call (an explicit "
                  "graph builds its tile plan in it) and second call:", "",
                  "| mask | dtype | mode | N | graph | first call | second call | peak |",
                  "|---|---|---|---:|---|---:|---:|---:|"]
        for s in same:
            lines.append(f"| {s['mask']} | {s['dtype']} | {s['mode']} | {_count(s['n'])} | "
                         f"{s['graph']} | {s['first_s']:.2f} s | {s['time_s']:.2f} s | "
                         f"{human_bytes(s['peak_bytes'])} |")
    return "\n".join(lines) + "\n"


def merge_graph_results(paths, out, notes=()) -> Dict:
    """One results file (JSON and markdown) from several searches by graph kind, later
    files replacing earlier results of the same (mask, dtype, mode, graph)."""
    import json
    from pathlib import Path

    metas, results, same = [], {}, {}
    for path in map(Path, paths):
        data = json.loads(path.read_text())
        metas.append(data["meta"])
        for r in data["results"]:
            results[(r["mask"], r["dtype"], r["mode"], r["graph"])] = r
        for s in data.get("same_n") or []:
            same[(s["mask"], s["dtype"], s["mode"], s["graph"])] = s
    meta = dict(metas[0], command=" ; ".join(m["command"] for m in metas))
    data = {"meta": meta, "results": list(results.values()), "same_n": list(same.values()),
            "notes": list(notes)}
    out = Path(out)
    out.write_text(json.dumps(data, indent=1))
    out.with_suffix(".md").write_text(graph_markdown(data))
    return data
