"""One measurement: one peer on one (mask, N, H, D, dtype), every mode, in this process.

``run_job(job)`` builds the graph and the inputs, checks the peer's output against a float64
reference, then times and meters each mode. The harness runs it in a fresh process per job
(forked, or ``python -m benchmarks.worker`` reading the job as JSON on stdin and printing the
result as one JSON line after ``RESULT_MARKER``), so memory readings start clean.

Job keys: ``mask n heads dim dtype peer modes device`` and optionally ``repeats warmup
max_seconds budget check_rows seed guard rlimit trial``.
"""
from __future__ import annotations

import json
import math
import os
import resource
import statistics
import sys
import time
import traceback
from typing import Dict, List, Optional

import torch

from benchmarks.memory import Meter, exact_heap, fast_heap, vm_size_bytes
from benchmarks.peers import Context, Unavailable, make_peer
from benchmarks.specs import (density, dtype_name, flops, human_bytes, min_bytes, parse_dtype,
                              parse_mask)

__all__ = ["run_job", "RESULT_MARKER", "TOLERANCE", "is_oom"]

RESULT_MARKER = "@@BENCH_RESULT@@ "

# Max error of a peer vs the float64 reference, relative to max(1, max |reference|).
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2,
             torch.bfloat16: 5e-2}
GRAD_TOLERANCE_FACTOR = 4.0

DEFAULTS = dict(repeats=5, warmup=1, max_seconds=30.0, budget=12e9, check_rows=64, seed=0,
                guard=True, rlimit=False, trial=False)


def is_oom(e: BaseException) -> bool:
    if isinstance(e, MemoryError):
        return True
    if hasattr(torch.cuda, "OutOfMemoryError") and isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    msg = str(e)
    return any(s in msg for s in ("can't allocate memory", "out of memory",
                                  "DefaultCPUAllocator", "Cannot allocate memory",
                                  "std::bad_alloc"))


def _short(e: BaseException, limit: int = 160) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    return f"{type(e).__name__}: {text}"[:limit]


class _Timer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device

    def __call__(self, fn) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(self.device)
            return start.elapsed_time(end) / 1e3
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t


# ---------------------------------------------------------------------- reference
def _reference(graph, q, k, v, dout, rows: torch.Tensor):
    """float64 outputs (and dq) of the sampled query rows, by attngraph's torch backend on
    the subgraph of those rows: ``(out [R, H, D], dq [R, H, D] or None)``."""
    import attngraph

    ptr = graph.ptr
    start, count = ptr[rows], ptr[rows + 1] - ptr[rows]
    total = int(count.sum())
    first = torch.cumsum(count, 0) - count
    eid = (torch.arange(total, device=ptr.device)
           - torch.repeat_interleave(first, count, output_size=total)
           + torch.repeat_interleave(start, count, output_size=total))
    keys, src = torch.unique(graph.src[eid], return_inverse=True)
    dst = torch.repeat_interleave(torch.arange(rows.numel(), device=ptr.device), count,
                                  output_size=total)
    sub = attngraph.TokenGraph._from_canonical(src, dst, keys.numel(), rows.numel())
    qs = q[rows].double().requires_grad_(dout is not None)
    out = attngraph.graph_attention(qs, k[keys].double(), v[keys].double(), sub,
                                    backend="torch")
    if dout is None:
        return out.detach(), None
    out.backward(dout[rows].double())
    return out.detach(), qs.grad


def _error(got: torch.Tensor, want: torch.Tensor) -> float:
    got = got.double()
    if not torch.isfinite(got).all():
        return float("inf")
    return float((got - want).abs().max()) / max(1.0, float(want.abs().max()))


# ---------------------------------------------------------------------- the job
_GRAPH_CACHE: Dict = {}


def _graph(spec, n: int, device: torch.device, cache: bool = True):
    """The mask's graph on ``device``. The last one is kept (``cache``), so in-process runs
    (CUDA) build a large graph once for all its peers; forked jobs start from an empty
    cache, and longest-context trials keep nothing that would eat into the next trial."""
    key = (spec.label, n, str(device))
    if key not in _GRAPH_CACHE:
        _GRAPH_CACHE.clear()
        graph = spec.build(n).to(device)
        graph.ptr
        if not cache:
            return graph
        _GRAPH_CACHE[key] = graph
    return _GRAPH_CACHE[key]


def run_job(job: Dict) -> Dict:
    if job.get("kind") == "graph":        # longest context by graph kind (benchmarks.longest)
        from benchmarks.longest import graph_trial

        return graph_trial(job)
    job = {**DEFAULTS, **job}
    t_job = time.perf_counter()
    device = torch.device(job["device"])
    spec = parse_mask(job["mask"])
    dtype = parse_dtype(job["dtype"])
    n = spec.valid_n(int(job["n"]))
    H, D = int(job["heads"]), int(job["dim"])
    modes: List[str] = list(job["modes"])
    res: Dict = {"mask": spec.label, "n": n, "heads": H, "dim": D, "dtype": dtype_name(dtype),
                 "peer": job["peer"], "device": str(device), "status": "ok", "modes": {}}
    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    res["torch_threads"] = torch.get_num_threads()
    meter = Meter(device)
    res["memory_method"] = meter.method
    if job["rlimit"] and device.type == "cpu":
        # Start the intra-op thread pool first: its stacks must not count against the limit.
        torch.ones(1 << 20).add_(1).sum()
        limit = vm_size_bytes() + int(job["budget"])
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
        res["rlimit_as_bytes"] = limit
    if job.get("cuda_budget_fraction") and device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(float(job["cuda_budget_fraction"]), device)

    peer = make_peer(job["peer"])
    try:
        t = time.perf_counter()
        graph = _graph(spec, n, device, cache=not job["trial"])
        res["graph_build_s"] = time.perf_counter() - t
        E = graph.num_edges
        res.update(num_edges=E, density=density(n, E))
        gen = torch.Generator(device=device).manual_seed(int(job["seed"]))
        q, k, v = (torch.randn(n, H, D, device=device, dtype=dtype, generator=gen)
                   for _ in range(3))
        dout = (torch.randn(n, H, D, device=device, dtype=dtype, generator=gen)
                if "fwdbwd" in modes else None)
        ctx = Context(spec, graph, n, H, D, dtype, device, int(job["budget"]))
        res["input_bytes"] = 3 * ctx.token_bytes + (ctx.token_bytes if dout is not None else 0)
        res["graph_bytes"] = 16 * E + 8 * (n + 1)

        todo, estimates = [], {}
        for mode in modes:
            why = peer.refuse(ctx, mode)
            if why is not None:
                res["modes"][mode] = {"status": "n/a", "reason": why}
                continue
            est = peer.estimate(ctx, mode)
            estimates[mode] = est
            if job["guard"]:
                need = res["input_bytes"] + res["graph_bytes"] + est
                if need > ctx.budget:
                    res["modes"][mode] = {
                        "status": "over budget", "estimate_bytes": need,
                        "reason": f"over budget (estimated {human_bytes(need)} > "
                                  f"{human_bytes(ctx.budget)})"}
                    continue
            todo.append(mode)
        if not todo:
            return _finish(res, t_job)

        ref = None
        if job["check_rows"] and not job["trial"]:
            g = torch.Generator().manual_seed(1)
            rows = torch.randperm(n, generator=g)[:max(0, int(job["check_rows"]) - 2)]
            rows = torch.unique(torch.cat([rows, torch.tensor([0, n - 1])])).to(device)
            ref = (rows,) + _reference(graph, q, k, v, dout if "fwdbwd" in todo else None,
                                       rows)

        qn, kn, vn = (peer.to_native(x) for x in (q, k, v))
        dn = peer.to_native(dout) if dout is not None else None
        del q, k, v, dout

        meter.baseline()
        t = time.perf_counter()
        try:
            info = peer.setup(ctx)
        except Unavailable as e:
            for mode in todo:
                res["modes"][mode] = {"status": "n/a", "reason": str(e)}
            return _finish(res, t_job)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        res["setup"] = dict(info, setup_s=time.perf_counter() - t)
        res["setup"]["setup_peak_bytes"] = meter.peak()
        meter.settle()
        setup_bytes = max(0, meter.current() - meter._base)
        res["setup"]["setup_bytes"] = setup_bytes

        # Phase 1, exact heap (benchmarks.memory.exact_heap): the first call (checked), then
        # one metered call per mode. Phase 2, the allocator's fast steady state: warm-up and
        # timed calls. Metering needs a clean heap and timing a warm one, hence the order.
        runners = {m: _ModeRunner(peer, ctx, m, qn, kn, vn, dn) for m in todo}
        for phase in ("first", "meter", "time"):
            if phase == "first" and device.type == "cpu":
                res["exact_heap"] = exact_heap()
            if phase == "time" and device.type == "cpu":
                fast_heap()
            if phase == "time" and job["trial"]:
                break
            for mode in todo:
                if res["modes"].get(mode, {}).get("status", "ok") != "ok":
                    continue
                try:
                    r = res["modes"].setdefault(mode, {"status": "ok",
                                                       "estimate_bytes": estimates[mode]})
                    if phase == "first":
                        runners[mode].first(job, ref, r)
                    elif phase == "meter":
                        runners[mode].meter(job, meter, setup_bytes, r)
                    else:
                        runners[mode].time(job, r)
                except Unavailable as e:
                    res["modes"][mode] = {"status": "n/a", "reason": str(e)}
                except NotImplementedError as e:
                    res["modes"][mode] = {"status": "n/a", "reason": _short(e)}
                except Exception as e:  # noqa: BLE001 - every failure is a result to report
                    if is_oom(e):
                        res["modes"][mode] = {"status": "oom", "reason": _short(e)}
                    else:
                        res["modes"][mode] = {"status": "error", "reason": _short(e),
                                              "traceback": traceback.format_exc()[-2000:]}
                finally:
                    runners[mode].clear()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    except Exception as e:  # noqa: BLE001
        res["status"] = "oom" if is_oom(e) else "error"
        res["reason"] = _short(e)
        if not is_oom(e):
            res["traceback"] = traceback.format_exc()[-2000:]
    return _finish(res, t_job)


def _finish(res: Dict, t_job: float) -> Dict:
    res["elapsed_s"] = time.perf_counter() - t_job
    return res


class _ModeRunner:
    """Calls of one peer in one mode: ``fwd`` (no autograd) or ``fwdbwd`` (forward, then
    backward of a fixed random ``dO``)."""

    def __init__(self, peer, ctx, mode, qn, kn, vn, dn):
        self.peer, self.ctx, self.mode = peer, ctx, mode
        self.inputs, self.dout = (qn, kn, vn), dn
        self.timer = _Timer(ctx.device)
        self.leaves = None
        self.box: Dict = {}

    def _call(self) -> None:
        if self.mode == "fwd":
            with torch.no_grad():
                self.box["out"] = self.peer.forward(*self.inputs)
            return
        if self.leaves is None:
            self.leaves = [x.detach().clone().requires_grad_(True) for x in self.inputs]
        for x in self.leaves:
            x.grad = None
        out = self.peer.forward(*self.leaves)
        out.backward(self.dout)
        self.box["out"] = out.detach()

    def clear(self) -> None:
        self.box.clear()
        for x in self.leaves or ():
            x.grad = None

    def _ensure_leaves(self) -> None:
        if self.mode == "fwdbwd" and self.leaves is None:
            self.leaves = [x.detach().clone().requires_grad_(True) for x in self.inputs]

    def first(self, job: Dict, ref, r: Dict) -> None:
        """The first call (compiles, warms caches), checked against the reference."""
        if job["trial"]:
            return
        self._ensure_leaves()
        r["first_call_s"] = self.timer(self._call)
        if ref is None:
            return
        rows, ref_out, ref_dq = ref
        tol = TOLERANCE[self.ctx.dtype]
        chk = {"rows": int(rows.numel()), "tol": tol,
               "out_err": _error(self.peer.to_node_major(self.box["out"])[rows], ref_out)}
        ok = chk["out_err"] <= tol
        if self.mode == "fwdbwd" and ref_dq is not None:
            chk["dq_err"] = _error(self.peer.to_node_major(self.leaves[0].grad)[rows], ref_dq)
            chk["dq_tol"] = tol * GRAD_TOLERANCE_FACTOR
            ok = ok and chk["dq_err"] <= chk["dq_tol"]
        chk["passed"] = bool(ok)
        r["check"] = chk

    def meter(self, job: Dict, meter: Meter, setup_bytes: int, r: Dict) -> None:
        """Calls between a baseline and a peak reading: two when they are cheap, reporting
        the smaller peak (pages the host reclaimed in between and a call faults back in
        would otherwise count), one when a call takes more than a quarter of
        ``max_seconds``."""
        self._ensure_leaves()
        peaks, t = [], None
        for i in range(2):
            meter.baseline()
            t = self.timer(self._call)
            self.clear()
            peaks.append(meter.peak())
            if job["trial"] or t > float(job["max_seconds"]) / 4:
                break
        r["call_peak_bytes"] = min(peaks)
        r["peak_bytes"] = setup_bytes + r["call_peak_bytes"]
        r["metered_calls"] = len(peaks)
        r["metered_call_s"] = t
        if "first_call_s" not in r:  # a longest-context trial: this is its only call
            r.update(times_s=[t], median_s=t, repeats=1)
            _rates(r, self.ctx, self.mode)

    def time(self, job: Dict, r: Dict) -> None:
        """``warmup`` untimed calls (none for calls longer than ``max_seconds / 4``), then
        up to ``repeats`` timed ones (fewer when they would take longer than
        ``max_seconds``; at least one)."""
        one = min(r.get("metered_call_s", 1e9), r.get("first_call_s", 1e9))
        # a call longer than a quarter of max_seconds is past any warm-up effect
        for _ in range(int(job["warmup"]) if one <= float(job["max_seconds"]) / 4 else 0):
            self.timer(self._call)
            self.clear()
        times = []
        budget_runs = int(float(job["max_seconds"]) / max(one, 1e-6))
        for _ in range(max(1, min(int(job["repeats"]), budget_runs))):
            times.append(self.timer(self._call))
            self.clear()
        r.update(times_s=times, median_s=statistics.median(times), repeats=len(times))
        _rates(r, self.ctx, self.mode)


def _rates(r: Dict, ctx: Context, mode: str) -> Dict:
    t = r["median_s"]
    r["tflops"] = flops(ctx.num_edges, ctx.heads, ctx.dim, mode) / t / 1e12 if t else None
    r["gbps"] = min_bytes(ctx.n, ctx.num_edges, ctx.heads, ctx.dim, ctx.itemsize, mode) / t / 1e9 \
        if t else None
    return r


def main() -> None:
    job = json.loads(sys.stdin.read())
    try:
        res = run_job(job)
    except BaseException as e:  # noqa: BLE001
        res = {**job, "status": "error", "reason": _short(e),
               "traceback": traceback.format_exc()[-2000:]}
    sys.stdout.write("\n" + RESULT_MARKER + json.dumps(res) + "\n")
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
