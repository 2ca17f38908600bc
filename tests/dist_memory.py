"""The body of one rank of the memory test in tests/test_distributed.py (the same
measurement as the longest-context search in benchmarks/distributed.py, which keeps its own
copy: a benchmark does not import from tests): implicit sliding window, this rank's
rows of q, k, v (H = 1, D = 64, float32), forward (and backward), and the peak resident
memory each step adds to the process (Linux: the high-water mark is reset before it)."""
import datetime
import gc
import json
import os
import time

import torch
import torch.distributed as dist


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        return [int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM")][0]


def reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                       # VmHWM := current RSS


def step(rank, world, n, window, backward, overlap=True):
    from attngraph import distributed as agd, masks

    graph = masks.sliding_window(n, window, implicit=True)
    ranges = agd.shard_ranges(n, world)
    r0, r1 = ranges[rank]
    gc.collect()
    reset_hwm()
    base = rss_bytes()
    gen = torch.Generator().manual_seed(rank)
    q, k, v = (torch.randn(r1 - r0, 1, 64, generator=gen) for _ in range(3))
    for t in (q, k, v):
        t.requires_grad_(backward)
    dist.barrier()
    t0 = time.perf_counter()
    y = agd.graph_attention(q, k, v, graph, ranges=ranges, ship_degree=-1)
    if backward:
        y.backward(torch.ones_like(y))
    seconds = time.perf_counter() - t0
    dist.barrier()
    plan = agd.halo_plan(graph, ranges, ship_degree=-1)
    res = dict(n=n, backward=backward, rank=rank, base=base, peak=hwm_bytes() - base,
               rows_bytes=q.numel() * 4, seconds=seconds, halo=plan.halo_size,
               plan_bytes=plan.plan_bytes(), tokens=r1 - r0)
    del q, k, v, y, plan, graph
    gc.collect()
    return res


def main(rank, world, port, out, jobs, window=256, threads=1):
    """``jobs``: ``[(n, backward), ...]`` run in order; ``out/mem-<rank>.json``: a result
    per job, or the error that stopped it."""
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=900))
    results = []
    try:
        for n, backward in jobs:
            results.append(step(rank, world, n, window, backward))
    except Exception as e:
        results.append(dict(rank=rank, error=f"{type(e).__name__}: {e}"))
    with open(os.path.join(out, f"mem-{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()
