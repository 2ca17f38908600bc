"""The body of one rank of the memory test in tests/test_distributed.py (and of the
longest-context search in benchmarks/distributed.py): implicit sliding window, this rank's
rows of q, k, v (H = 1, D = 64, float32), forward (and backward), peak resident memory."""
import datetime
import json
import os
import resource
import time

import torch
import torch.distributed as dist


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(rank, world, port, out, n, window, backward, threads=1):
    from attngraph import distributed as agd, masks

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=900))
    result = {}
    try:
        graph = masks.sliding_window(n, window, implicit=True)
        ranges = agd.shard_ranges(n, world)
        r0, r1 = ranges[rank]
        # the baseline: interpreter, torch, the group; its high-water mark reset here
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = rss_bytes()
        gen = torch.Generator().manual_seed(rank)
        q, k, v = (torch.randn(r1 - r0, 1, 64, generator=gen) for _ in range(3))
        for t in (q, k, v):
            t.requires_grad_(backward)
        t0 = time.perf_counter()
        y = agd.graph_attention(q, k, v, graph, ranges=ranges, ship_degree=-1)
        if backward:
            y.backward(torch.ones_like(y))
        dist.barrier()
        seconds = time.perf_counter() - t0
        plan = agd.halo_plan(graph, ranges, ship_degree=-1)
        with open("/proc/self/status") as f:
            hwm = [int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM")][0]
        result = dict(rank=rank, base=base, peak=hwm, rows_bytes=q.numel() * 4,
                      seconds=seconds, halo=plan.halo_size, plan_bytes=plan.plan_bytes(),
                      tokens=r1 - r0)
    except Exception as e:
        result = dict(rank=rank, error=f"{type(e).__name__}: {e}")
    with open(os.path.join(out, f"mem-{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()
