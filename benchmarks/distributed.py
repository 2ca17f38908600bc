"""Context parallel attention on this machine: halo exchange vs ring attention.

For each (mask, N, P) it starts P processes (spawn, gloo on loopback). Each process
holds the graph and its own shard of q, k and v, and runs :func:`attngraph.distributed.
graph_attention` forward and backward. It reports:

* **halo bytes**: bytes received per rank in one forward: the K/V rows of its halo, plus,
  for dense rows (global tokens), the queries other ranks ship to it and the partial
  results its own shipped queries get back. The backward moves the same bytes the other way.
* **ring bytes**: what ring attention moves into each rank per forward, all other ranks'
  K and V: ``(P - 1) / P · N · H_kv · (D + D_v)`` elements.
* **step time**: median wall time of ``--repeats`` forward + backward steps (slowest rank).
  Time is also measured for one process on the whole sequence (P = 1).

All ranks share the same 2 CPU cores, so the step times show what the exchange costs, not
how the method scales. The bytes do not depend on the machine.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import statistics
import time
from pathlib import Path
from typing import Dict, List

import torch


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, job: Dict, out: str) -> None:
    import torch.distributed as dist

    from attngraph import distributed as agd
    from benchmarks.specs import parse_mask

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=600))
    n, H, D = job["n"], job["heads"], job["dim"]
    graph = parse_mask(job["mask"]).build(n)
    ranges = agd.shard_ranges(graph, world)
    r0, r1 = ranges[rank]
    gen = torch.Generator().manual_seed(rank)
    q, k, v = (torch.randn(r1 - r0, H, D, generator=gen).requires_grad_() for _ in range(3))
    times, plan_s = [], None
    for i in range(job["repeats"] + 1):            # the first step builds the plan
        dist.barrier()
        t0 = time.perf_counter()
        y = agd.graph_attention(q, k, v, graph, ranges=ranges)
        y.square().mean().backward()
        dist.barrier()
        (times.append if i else (lambda t: None))(time.perf_counter() - t0)
        if not i:
            plan_s = time.perf_counter() - t0
        q.grad = k.grad = v.grad = None
    plan = agd.halo_plan(graph, ranges)
    row = H * 2 * D * 4                            # K and V rows, float32
    # shipped queries in, their (out, lse) back: float32
    received = plan.bytes_received(row, query_bytes=H * D * 4, result_bytes=H * (D + 1) * 4)
    res = dict(rank=rank, tokens=r1 - r0, edges=int(graph.ptr[r1] - graph.ptr[r0]),
               halo_tokens=plan.halo_size, shipped=sum(plan.ship_counts),
               guests=sum(plan.guest_counts), halo_bytes=received,
               step_s=statistics.median(times), first_step_s=plan_s)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    dist.destroy_process_group()


def _single(job: Dict) -> float:
    """Median forward + backward time of one process on the whole sequence."""
    import attngraph as ag
    from benchmarks.specs import parse_mask

    graph = parse_mask(job["mask"]).build(job["n"])
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(job["n"], job["heads"], job["dim"], generator=gen).requires_grad_()
               for _ in range(3))
    times = []
    for i in range(job["repeats"] + 1):
        t0 = time.perf_counter()
        ag.graph_attention(q, k, v, graph).square().mean().backward()
        if i:
            times.append(time.perf_counter() - t0)
        q.grad = k.grad = v.grad = None
    return statistics.median(times)


def run_job(job: Dict, tmp: Path) -> Dict:
    import torch.multiprocessing as mp

    from attngraph.distributed import ring_bytes

    world = job["world"]
    tmp.mkdir(parents=True, exist_ok=True)
    mp.start_processes(_rank_main, args=(world, _port(), job, str(tmp)), nprocs=world,
                       start_method="spawn")
    ranks = [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(world)]
    ring = ring_bytes(job["n"], world, job["heads"], job["dim"], job["dim"], 4)
    halo = max(r["halo_bytes"] for r in ranks)
    return dict(job, ranks=ranks, halo_bytes_max=halo, ring_bytes=ring,
                halo_bytes_mean=sum(r["halo_bytes"] for r in ranks) / world,
                ring_over_halo=ring / halo if halo else None,
                step_s=max(r["step_s"] for r in ranks))


def table(results: List[Dict], single: Dict) -> str:
    rows = ["| mask | N | P | bytes into a rank (halo K/V, shipped q, results): max | mean | "
            "ring attention bytes per rank | ring / ours (max) | step fwd+bwd (s) | "
            "one process (s) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    from benchmarks.specs import human_bytes

    for r in results:
        ratio = f"{r['ring_over_halo']:,.0f}×" if r["ring_over_halo"] else "∞"
        rows.append(f"| {r['mask']} | {r['n']:,} | {r['world']} | "
                    f"{human_bytes(r['halo_bytes_max'])} | {human_bytes(r['halo_bytes_mean'])} | "
                    f"{human_bytes(r['ring_bytes'])} | "
                    f"{ratio} | {r['step_s']:.3f} | {single[(r['mask'], r['n'])]:.3f} |")
    return "\n".join(rows)


def run(preset: Dict, *, quick: bool, out_dir: Path, log=print) -> List[Path]:
    import tempfile

    ns = preset["quick_n"] if quick else preset["n"]
    results, single = [], {}
    scratch = Path(tempfile.mkdtemp(prefix="attngraph-dist-"))     # the ranks' result files
    for mask in preset["masks"]:
        for n in ns:
            base = dict(mask=mask, n=n, heads=preset["heads"][0], dim=preset["dim"][0],
                        repeats=preset["repeats"])
            single[(mask, n)] = _single(base)
            log(f"{mask} N={n} one process: {single[(mask, n)]:.3f} s")
            for world in preset["world"]:
                r = run_job(dict(base, world=world), scratch / f"{mask}-{n}-{world}")
                log(f"{mask} N={n} P={world}: halo {r['halo_bytes_max']} B, ring "
                    f"{r['ring_bytes']} B, step {r['step_s']:.3f} s")
                results.append(r)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = dict(torch=torch.__version__, cpu_count=os.cpu_count(), quick=quick,
                heads=preset["heads"][0], dim=preset["dim"][0], dtype="float32")
    name = "distributed" + ("_quick" if quick else "")
    js = out_dir / f"{name}.json"
    js.write_text(json.dumps(dict(meta=meta, results=results,
                                  single={f"{m} {n}": t for (m, n), t in single.items()}),
                             indent=1))
    md = out_dir / f"{name}.md"
    md.write_text(f"# Context parallel attention (gloo, one machine)\n\n"
                  f"H = H_kv = {meta['heads']}, D = D_v = {meta['dim']}, float32, torch "
                  f"{meta['torch']}, {meta['cpu_count']} CPU cores shared by all ranks.\n\n"
                  + table(results, single) + "\n")
    import shutil

    shutil.rmtree(scratch, ignore_errors=True)
    return [js, md]
