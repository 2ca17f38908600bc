"""Run jobs (one peer on one configuration each) in fresh processes and collect results.

Isolation: ``fork`` (CPU default: a child of this process, which has imported torch but run
no op, so the child starts with a clean heap and its own high-water mark), ``spawn``
(``python -m benchmarks.worker``, a brand-new interpreter), or ``none`` (in this process;
the CUDA default, where the allocator's peak counters isolate calls and forking after CUDA
initialisation is not allowed).
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import re
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import torch

from benchmarks.peers import Context, make_peer
from benchmarks.specs import parse_dtype, parse_mask
from benchmarks.worker import RESULT_MARKER, run_job

__all__ = ["run_isolated", "run_jobs", "environment", "device_slug", "static_result"]

REPO_ROOT = Path(__file__).resolve().parent.parent


def device_slug(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _version(module: str) -> str:
    try:
        mod = __import__(module)
        return getattr(mod, "__version__", "installed")
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return "not installed"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _source_digest() -> str:
    """sha1 over attngraph's Python and CUDA sources: which code produced the numbers."""
    import hashlib

    import attngraph

    root = Path(attngraph.__file__).resolve().parent
    h = hashlib.sha1()
    for f in sorted(root.rglob("*")):
        if f.suffix in (".py", ".cu", ".cuh") and "__pycache__" not in f.parts:
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:12]


def environment(device: torch.device, argv: List[str]) -> Dict:
    import attngraph
    import attngraph.ops.chunked  # noqa: F401 - imported here so every forked job runs
    import torch_geometric         # the same code even if the sources change mid-run

    meta = {
        "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else _cpu_model()),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else None,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_geometric": torch_geometric.__version__,
        "cupy": _version("cupy"),
        "torch_scatter": _version("torch_scatter"),
        "attngraph": attngraph.__version__,
        "attngraph_source_sha1": _source_digest(),
        "command": "python -m benchmarks " + " ".join(_quote(a) for a in argv),
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
    }
    if device.type == "cuda":
        meta["cuda"] = torch.version.cuda
        meta["device_memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
    try:
        with open("/proc/meminfo") as f:
            meta["host_memory_bytes"] = int(f.readline().split()[1]) * 1024
    except OSError:
        pass
    return meta


def _quote(a: str) -> str:
    return a if re.fullmatch(r"[\w.,:=/+-]+", a) else "'" + a.replace("'", "'\\''") + "'"


# ---------------------------------------------------------------------- one job
def static_result(job: Dict) -> Optional[Dict]:
    """The result of a job whose peer refuses every mode before any tensor is built."""
    peer = make_peer(job["peer"])
    spec = parse_mask(job["mask"])
    ctx = Context(spec, None, spec.valid_n(job["n"]), job["heads"], job["dim"],
                  parse_dtype(job["dtype"]), torch.device(job["device"]), int(job["budget"]))
    reasons = {m: peer.refuse(ctx, m) for m in job["modes"]}
    if any(r is None for r in reasons.values()):
        return None
    return {"mask": spec.label, "n": ctx.n, "heads": ctx.heads, "dim": ctx.dim,
            "dtype": job["dtype"], "peer": job["peer"], "device": job["device"],
            "status": "ok", "num_edges": None,
            "modes": {m: {"status": "n/a", "reason": r} for m, r in reasons.items()}}


def _child(job: Dict, conn) -> None:
    try:
        res = run_job(job)
    except BaseException as e:  # noqa: BLE001
        res = {"status": "error", "reason": f"{type(e).__name__}: {e}"[:300]}
    try:
        conn.send(res)
    finally:
        conn.close()


def _failed(job: Dict, status: str, reason: str) -> Dict:
    return {"mask": job["mask"], "n": job["n"], "heads": job["heads"], "dim": job["dim"],
            "dtype": job["dtype"], "peer": job["peer"], "device": job["device"],
            "status": status, "reason": reason, "modes": {}}


def _exit_reason(code: Optional[int]) -> str:
    if code is not None and code < 0:
        import signal

        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else code
        hint = " (killed: likely out of memory)" if code == -9 else ""
        return f"worker died on signal {name}{hint}"
    return f"worker exited with code {code} without a result"


def _run_fork(job: Dict, timeout: float) -> Dict:
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(job, send), daemon=True)
    proc.start()
    send.close()
    res = None
    try:
        if recv.poll(timeout):
            try:
                res = recv.recv()
            except EOFError:
                res = None
        else:
            res = _failed(job, "timeout", f"no result within {timeout:.0f} s")
    finally:
        recv.close()
        proc.join(5)
        if proc.is_alive():
            proc.terminate()
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()
    if res is None:
        res = _failed(job, "crashed", _exit_reason(proc.exitcode))
    return res


def _run_spawn(job: Dict, timeout: float) -> Dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep)
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.worker"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=str(REPO_ROOT), env=env)
    try:
        out, err = proc.communicate(json.dumps(job), timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return _failed(job, "timeout", f"no result within {timeout:.0f} s")
    for line in reversed(out.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER):])
    tail = (err.strip().splitlines() or [""])[-1][:200]
    return _failed(job, "crashed", f"{_exit_reason(proc.returncode)}; {tail}")


def run_isolated(job: Dict, isolate: str = "fork", timeout: float = 1800.0) -> Dict:
    """Run one job in a fresh process (``fork`` / ``spawn``) or here (``none``)."""
    res = None if job.get("kind") == "graph" else static_result(job)
    if res is not None:
        return res
    if isolate == "fork":
        return _run_fork(job, timeout)
    if isolate == "spawn":
        return _run_spawn(job, timeout)
    if isolate == "none":
        try:
            return run_job(job)
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    raise ValueError(f"isolate must be 'fork', 'spawn' or 'none', got {isolate!r}")


# ---------------------------------------------------------------------- many jobs
def run_jobs(jobs: List[Dict], *, isolate: str, timeout: float, meta: Dict,
             out_json: Optional[Path] = None, progress: bool = True,
             log=None) -> List[Dict]:
    """Run ``jobs`` in order; rewrite ``out_json`` after each (partial results survive)."""
    records: List[Dict] = []
    bar = None
    if progress:
        import tqdm

        tqdm.tqdm.monitor_interval = 0   # no monitor thread: children are forked
        bar = tqdm.tqdm(total=len(jobs), unit="job", dynamic_ncols=True, mininterval=0.5)
    t0 = time.perf_counter()
    try:
        for job in jobs:
            if bar is not None:
                bar.set_postfix_str(f"{job['peer']} {job['mask']} N={job['n']}", refresh=True)
            res = run_isolated(job, isolate, timeout)
            records.append(res)
            if log is not None:
                log(_one_line(res))
            if out_json is not None:
                write_json(out_json, meta, records, elapsed=time.perf_counter() - t0)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return records


def _one_line(res: Dict) -> str:
    parts = [f"{res['peer']:<15} {res['mask']:<22} N={res['n']:<8} "
             f"E={res.get('num_edges') or '-'}"]
    if res.get("status") != "ok":
        parts.append(f"{res.get('status')}: {res.get('reason')}")
    for mode, r in res.get("modes", {}).items():
        if r.get("status") == "ok":
            chk = r.get("check", {}).get("passed")
            parts.append(f"{mode} {r['median_s'] * 1e3:.1f} ms peak "
                         f"{(r.get('peak_bytes') or 0) / 1e6:.0f} MB"
                         + ("" if chk is None else f" check={'ok' if chk else 'FAIL'}"))
        else:
            parts.append(f"{mode} {r.get('status')}: {r.get('reason', '')[:80]}")
    tracebacks = [m["traceback"] for m in res.get("modes", {}).values() if m.get("traceback")]
    if res.get("traceback"):
        tracebacks.append(res["traceback"])
    return " | ".join(parts) + "".join("\n" + t for t in tracebacks)


def write_json(path: Path, meta: Dict, records: List[Dict], **extra) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    slim = [{k: v for k, v in r.items() if k != "traceback"} for r in records]
    for r in slim:
        for m in r.get("modes", {}).values():
            m.pop("traceback", None)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"meta": {**meta, **extra}, "records": slim}, indent=1,
                              default=float))
    tmp.replace(path)


def expand(groups: Iterable[Dict], *, heads, dim, dtype, peers, modes, **common) -> List[Dict]:
    """All jobs of a sweep, ordered so each configuration's peers run back to back."""
    jobs = []
    for g in groups:
        for mask in g["masks"]:
            for n in g["n"]:
                for h in heads:
                    for d in dim:
                        for dt in dtype:
                            for p in peers:
                                jobs.append(dict(mask=mask, n=int(n), heads=int(h), dim=int(d),
                                                 dtype=dt, peer=p, modes=list(modes), **common))
    return jobs
