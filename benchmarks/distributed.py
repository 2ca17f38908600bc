"""Context parallel attention on this machine: halo exchange against ring attention and an
all-gather of K/V, balance, overlap, and the longest context that fits.

Three parts, each with P processes (spawn, gloo on loopback) holding an *implicit* graph
(its rule; no rank builds the edge list) and their own rows of q, k, v, float32:

* **Bytes, balance, overlap** (per mask): bytes received per rank in one forward (halo K/V
  rows, plus shipped queries and their partial results for dense rows); ring attention's
  and an all-gather's bytes, ``(P - 1) / P · N · H_kv · (D + D_v)`` elements each (the
  all-gather also holds all ``N`` tokens' K/V at once); the edges per rank, max / mean,
  for ranges balanced by edges and by tokens; and the forward + backward step time with
  the exchange overlapped and not (``overlap=False``), timed interleaved (A, B, A, B, ...),
  median of the slowest rank.
* **Longest context** (4 ranks, implicit sliding window 256, H = 1, D = 64): a bounded
  doubling search over N, forward and forward + backward, each step's peak resident memory
  per rank (high-water mark reset before the step) against the floor of its tensors.
  Before each doubling the peak is predicted from the last step; the search stops at the
  cap, when the prediction passes the memory budget, or when the time budget is spent.

All ranks share the machine's CPU cores, so step times show what the exchange costs, not
how the method scales. The bytes do not depend on the machine.
"""
from __future__ import annotations

import datetime
import gc
import json
import os
import socket
import statistics
import time
from pathlib import Path
from typing import Dict, List

import torch

M = 1 << 20


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_mask(name: str, n: int):
    """The preset's implicit masks by name."""
    from attngraph import masks

    if name.startswith("sliding_window("):
        return masks.sliding_window(n, int(name[15:-1]), implicit=True)
    if name.startswith("longformer("):          # longformer(w,gG): G globals spread evenly
        w, g = name[11:-1].split(",")
        G = int(g[1:])
        return masks.longformer(n, int(w), [i * n // G for i in range(G)], implicit=True)
    if name.startswith("documents("):           # documents(mean): lengths drawn, seed 0
        mean = int(name[10:-1])
        gen = torch.Generator().manual_seed(0)
        lengths, total = [], 0
        while total < n:
            length = min(n - total, int(torch.empty(1).exponential_(
                1.0 / mean, generator=gen).item()) + 1)
            lengths.append(length)
            total += length
        return masks.document(lengths, causal=True, implicit=True)
    if name.startswith("hash("):                # hash(B): causal buckets, drawn, seed 0
        B = int(name[5:-1])
        gen = torch.Generator().manual_seed(0)
        return masks.hash_buckets(torch.randint(0, B, (n,), generator=gen), implicit=True)
    raise ValueError(f"unknown mask {name!r}")


# ---------------------------------------------------------------------------- part 1
def _rank_main(rank: int, world: int, port: int, job: Dict, out: str) -> None:
    import torch.distributed as dist

    from attngraph import distributed as agd

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=900))
    n, H, D = job["n"], job["heads"], job["dim"]
    graph = build_mask(job["mask"], n)
    ranges = agd.shard_ranges(graph, world)
    tokens = agd.shard_ranges(graph, world, balance="tokens")
    r0, r1 = ranges[rank]
    gen = torch.Generator().manual_seed(rank)
    q, k, v = (torch.randn(r1 - r0, H, D, generator=gen).requires_grad_() for _ in range(3))
    times: Dict[bool, List[float]] = {True: [], False: []}
    t0 = time.perf_counter()
    agd.graph_attention(q, k, v, graph, ranges=ranges).square().mean().backward()
    first = time.perf_counter() - t0               # builds the plan
    for i in range(2 * job["repeats"]):
        overlap = i % 2 == 0                       # interleaved: A, B, A, B, ...
        q.grad = k.grad = v.grad = None
        dist.barrier()
        t0 = time.perf_counter()
        y = agd.graph_attention(q, k, v, graph, ranges=ranges, overlap=overlap)
        y.square().mean().backward()
        times[overlap].append(time.perf_counter() - t0)
    plan = agd.halo_plan(graph, ranges)
    row = H * 2 * D * 4                            # K and V rows, float32
    received = plan.bytes_received(row, query_bytes=H * D * 4, result_bytes=H * (D + 1) * 4)
    res = dict(rank=rank, tokens=r1 - r0, halo_tokens=plan.halo_size,
               shipped=sum(plan.ship_counts), guests=sum(plan.guest_counts),
               halo_bytes=received, first_step_s=first,
               overlap_s=times[True], serial_s=times[False],
               edges=agd.shard_edges(graph, ranges) if rank == 0 else None,
               edges_tokens=agd.shard_edges(graph, tokens) if rank == 0 else None)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    dist.destroy_process_group()


def _imbalance(edges: List[int]) -> float:
    return max(edges) / (sum(edges) / len(edges)) if sum(edges) else 1.0


def run_job(job: Dict, tmp: Path) -> Dict:
    import torch.multiprocessing as mp

    from attngraph.distributed import allgather_bytes

    world = job["world"]
    tmp.mkdir(parents=True, exist_ok=True)
    mp.start_processes(_rank_main, args=(world, _port(), job, str(tmp)), nprocs=world,
                       start_method="spawn")
    ranks = [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(world)]
    ring, held = allgather_bytes(job["n"], world, job["heads"], job["dim"], job["dim"], 4)
    halo = max(r["halo_bytes"] for r in ranks)
    # per round, the slowest rank's time
    slow = {key: [max(r[key][i] for r in ranks) for i in range(job["repeats"])]
            for key in ("overlap_s", "serial_s")}
    ratios = [s / o for s, o in zip(slow["serial_s"], slow["overlap_s"])]
    edges, by_tokens = ranks[0]["edges"], ranks[0]["edges_tokens"]
    return dict(job, ranks=ranks, halo_bytes_max=halo, ring_bytes=ring,
                allgather_held=held,
                halo_bytes_mean=sum(r["halo_bytes"] for r in ranks) / world,
                ring_over_halo=ring / halo if halo else None,
                edges=edges, imbalance=_imbalance(edges),
                imbalance_tokens=_imbalance(by_tokens),
                overlap_s=statistics.median(slow["overlap_s"]),
                serial_s=statistics.median(slow["serial_s"]),
                serial_over_overlap=statistics.median(ratios),
                ratio_range=(min(ratios), max(ratios)))


# ---------------------------------------------------------------------------- part 2
def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm() -> int:
    with open("/proc/self/status") as f:
        return [int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM")][0]


def _available() -> int:
    with open("/proc/meminfo") as f:
        return [int(line.split()[1]) * 1024 for line in f
                if line.startswith("MemAvailable")][0]


def _longest_main(rank: int, world: int, port: int, spec: Dict, out: str) -> None:
    """Doubling search, decided the same way on every rank (rank 0's numbers, broadcast)."""
    import torch.distributed as dist

    from attngraph import distributed as agd, masks

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=1800))
    steps, t_start = [], time.monotonic()
    for backward in (False, True):
        n, last = spec["start"][backward], None
        while n <= spec["cap"][backward]:
            # predicted peak: the last step's bytes per token, doubled tokens; all ranks
            # together against a share of the memory available now
            verdict = torch.zeros(1)
            if rank == 0 and last is not None:
                per_token = max(s["peak"] for s in last) / last[0]["tokens"]
                need = world * (per_token * n / world)
                spent = time.monotonic() - t_start
                if need > spec["memory_share"] * _available():
                    verdict[0] = 1
                elif spent + 2.2 * max(s["seconds"] for s in last) > spec["max_seconds"]:
                    verdict[0] = 2
            dist.broadcast(verdict, 0)
            if int(verdict[0]):
                steps.append(dict(n=n, backward=backward, skipped=("memory" if
                                  int(verdict[0]) == 1 else "time")))
                break
            graph = masks.sliding_window(n, spec["window"], implicit=True)
            ranges = agd.shard_ranges(n, world)
            r0, r1 = ranges[rank]
            gc.collect()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            base = _rss()
            gen = torch.Generator().manual_seed(rank)
            q, k, v = (torch.randn(r1 - r0, 1, spec["dim"], generator=gen)
                       .requires_grad_(backward) for _ in range(3))
            dist.barrier()
            t0 = time.perf_counter()
            y = agd.graph_attention(q, k, v, graph, ranges=ranges, ship_degree=-1)
            if backward:
                y.backward(torch.ones_like(y))
            seconds = time.perf_counter() - t0
            # the kernel syncs a thread's resident-page counts lazily, so the high-water
            # mark can read a few pages under the base when a step added nothing: 0 then
            mine = dict(rank=rank, peak=max(0, _hwm() - base), seconds=seconds,
                        tokens=r1 - r0)
            gathered: List = [None] * world
            dist.all_gather_object(gathered, mine)
            last = gathered
            steps.append(dict(n=n, backward=backward, ranks=gathered))
            del q, k, v, y, graph
            gc.collect()
            n *= 2
    if rank == 0:
        with open(os.path.join(out, "longest.json"), "w") as f:
            json.dump(steps, f)
    dist.destroy_process_group()


def longest(spec: Dict, tmp: Path) -> List[Dict]:
    import torch.multiprocessing as mp

    tmp.mkdir(parents=True, exist_ok=True)
    spec = dict(spec, start={False: spec["start"][0], True: spec["start"][1]},
                cap={False: spec["cap"][0], True: spec["cap"][1]})
    mp.start_processes(_longest_main, args=(spec["world"], _port(), spec, str(tmp)),
                       nprocs=spec["world"], start_method="spawn")
    return json.loads((tmp / "longest.json").read_text())


# ---------------------------------------------------------------------------- report
def table(results: List[Dict]) -> str:
    from benchmarks.specs import human_bytes

    rows = ["| mask | N | P | bytes into a rank: max | mean | ring / all-gather bytes "
            "per rank | ring / ours (max) | all-gather holds | edges max / mean (by edges) "
            "| by tokens | step fwd+bwd, overlapped (s) | not overlapped (s) | "
            "not / overlapped (median, range) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        ratio = f"{r['ring_over_halo']:,.0f}×" if r["ring_over_halo"] else "∞"
        lo, hi = r["ratio_range"]
        rows.append(f"| {r['mask']} | {r['n']:,} | {r['world']} | "
                    f"{human_bytes(r['halo_bytes_max'])} | "
                    f"{human_bytes(r['halo_bytes_mean'])} | {human_bytes(r['ring_bytes'])} | "
                    f"{ratio} | {human_bytes(r['allgather_held'])} | "
                    f"{r['imbalance']:.3f} | {r['imbalance_tokens']:.3f} | "
                    f"{r['overlap_s']:.3f} | {r['serial_s']:.3f} | "
                    f"{r['serial_over_overlap']:.3f} ({lo:.2f}–{hi:.2f}) |")
    return "\n".join(rows)


def longest_table(steps: List[Dict], spec: Dict) -> str:
    from benchmarks.specs import human_bytes

    D = spec["dim"]
    floor = {False: 4 * D * 4 + 4, True: 8 * D * 4 + 2 * 4}   # q k v out (+ grads), lse
    rows = ["| step | N | tokens per rank | peak per rank (max) | bytes per token | floor "
            "(B/token) | over floor | time (s, slowest rank) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s in steps:
        what = "forward + backward" if s["backward"] else "forward"
        if "skipped" in s:
            rows.append(f"| {what} | {s['n']:,} | | not run: predicted past the "
                        f"{s['skipped']} budget | | | | |")
            continue
        peak = max(r["peak"] for r in s["ranks"])
        tokens = s["ranks"][0]["tokens"]
        per = peak / tokens
        rows.append(f"| {what} | {s['n']:,} | {tokens:,} | {human_bytes(peak)} | "
                    f"{per:,.0f} | {floor[s['backward']]:,} | "
                    f"{per / floor[s['backward']]:.2f}× | "
                    f"{max(r['seconds'] for r in s['ranks']):.1f} |")
    return "\n".join(rows)


def run(preset: Dict, *, quick: bool, out_dir: Path, log=print) -> List[Path]:
    import shutil
    import tempfile

    ns = preset["quick_n"] if quick else preset["n"]
    results = []
    scratch = Path(tempfile.mkdtemp(prefix="attngraph-dist-"))     # the ranks' result files
    for mask in preset["masks"]:
        for n in ns:
            for world in preset["world"]:
                job = dict(mask=mask, n=n, heads=preset["heads"][0], dim=preset["dim"][0],
                           repeats=preset["repeats"], world=world)
                r = run_job(job, scratch / f"{mask}-{n}-{world}")
                log(f"{mask} N={n} P={world}: halo {r['halo_bytes_max']} B, ring "
                    f"{r['ring_bytes']} B, imbalance {r['imbalance']:.3f}, step "
                    f"{r['overlap_s']:.3f} s overlapped, {r['serial_s']:.3f} s not")
                results.append(r)
    spec = preset.get("longest")
    steps = []
    if spec and not quick:
        steps = longest(spec, scratch / "longest")
        for s in steps:
            log(f"longest: {s}")
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = dict(torch=torch.__version__, cpu_count=os.cpu_count(), quick=quick,
                heads=preset["heads"][0], dim=preset["dim"][0], dtype="float32")
    name = "distributed" + ("_quick" if quick else "")
    js = out_dir / f"{name}.json"
    js.write_text(json.dumps(dict(meta=meta, results=results, longest=steps,
                                  longest_spec=spec), indent=1))
    md = out_dir / f"{name}.md"
    text = (f"# Context parallel attention (gloo, one machine)\n\n"
            f"Implicit graphs, H = H_kv = {meta['heads']}, D = D_v = {meta['dim']}, float32, "
            f"torch {meta['torch']}, {meta['cpu_count']} CPU cores shared by all ranks "
            f"(one thread each).\n\n" + table(results) + "\n")
    if steps:
        text += (f"\n## Longest context: {spec['world']} ranks, implicit sliding_window("
                 f"{spec['window']}), H = 1, D = {spec['dim']}, float32\n\n"
                 f"Doubling from N = {spec['start'][0]:,} (forward) and {spec['start'][1]:,} "
                 f"(forward + backward), capped at {spec['cap'][0]:,} and {spec['cap'][1]:,}; "
                 f"a step runs only if its predicted total peak stays under "
                 f"{spec['memory_share']:.0%} of the memory available then, and the search "
                 f"within {spec['max_seconds']} s.\n\n" + longest_table(steps, spec) + "\n")
    md.write_text(text)
    shutil.rmtree(scratch, ignore_errors=True)
    return [js, md]


# ---------------------------------------------------------------------------- command line
def _tokens(text: str) -> int:
    """``8M`` / ``512K`` / ``4096`` -> tokens."""
    scale = {"K": 1024, "M": 1024 ** 2}.get(text[-1].upper(), 1)
    return int(text[:-1] if scale > 1 else text) * scale


def main(argv=None) -> None:
    """The longest-context search alone, from chosen start and cap sizes:

        python -m benchmarks.distributed --start 8M,4M --cap 16M,4M --memory-share 0.8

    (forward, forward + backward), written to ``results/distributed/longest.{json,md}``."""
    import argparse

    from benchmarks.presets import PRESETS

    p = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    p.add_argument("--start", default="2M,1M", help="first N: forward,forward+backward")
    p.add_argument("--cap", default="8M,4M", help="largest N tried: forward,forward+backward")
    p.add_argument("--memory-share", type=float, default=0.6,
                   help="a step runs if its predicted total peak is under this share of "
                        "the memory available")
    p.add_argument("--max-seconds", type=float, default=900.0)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "distributed"))
    args = p.parse_args(argv)
    spec = dict(PRESETS["distributed"]["longest"],
                start=tuple(_tokens(t) for t in args.start.split(",")),
                cap=tuple(_tokens(t) for t in args.cap.split(",")),
                memory_share=args.memory_share, max_seconds=args.max_seconds)
    import tempfile

    steps = longest(spec, Path(tempfile.mkdtemp(prefix="attngraph-longest-")))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.distributed " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in (("start", args.start), ("cap", args.cap),
                                                    ("memory_share", args.memory_share)))
    (out / "longest.json").write_text(json.dumps(dict(spec=spec, steps=steps,
                                                      command=command), indent=1))
    table_spec = dict(spec, start={False: spec["start"][0], True: spec["start"][1]})
    (out / "longest.md").write_text(
        f"# Longest context: {spec['world']} ranks, implicit sliding_window({spec['window']}),"
        f" H = 1, D = {spec['dim']}, float32\n\n`{command}` ({time.strftime('%Y-%m-%d %H:%M')}"
        f" UTC, torch {torch.__version__}, {os.cpu_count()} CPU cores shared by the ranks)\n\n"
        f"Doubling from N = {spec['start'][0]:,} (forward) and {spec['start'][1]:,} (forward "
        f"+ backward), capped at {spec['cap'][0]:,} and {spec['cap'][1]:,}; after the first "
        f"step of each, a step runs only if its predicted total peak stays under "
        f"{spec['memory_share']:.0%} of the memory available then.\n\n"
        + longest_table(steps, table_spec) + "\n")
    print((out / "longest.md").read_text())


if __name__ == "__main__":
    main()
