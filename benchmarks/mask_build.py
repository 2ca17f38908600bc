"""Mask construction time and memory: attngraph generators vs FlexAttention block masks.

For each pattern, builds the attngraph ``TokenGraph`` (wall time, median of ``--repeats``
after a warm-up at a small size; bytes = ``edge_index`` + CSR ``ptr``) and, in a child
process with a time limit, ``torch.nn.attention.flex_attention.create_block_mask`` for the
same pattern written as a ``mask_mod`` (CPU, ``B=None, H=None``, default 128x128 blocks).
Eager ``create_block_mask`` materialises an ``N x N`` bool mask, so above
``--eager-max-cells`` the compiled form ``torch.compile(create_block_mask, dynamic=True)``
is used (compiled once at a small size, so the timing excludes compilation).

Patterns (N = ``--n``):

* sliding_window(N, 64)
* longformer(N, 64, 16 global tokens evenly spaced over the sequence)
* bigbird(N, block=64): window of 3 blocks, 1 global block, 1 random block per block row
* hash_buckets: causal, bucket ids uniform in [0, 8192) (seeded), E ~ N^2 / 16384

Usage::

    python benchmarks/mask_build.py --n 1000000 --threads 1
    python benchmarks/mask_build.py --n 65536            # quick
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from attngraph import masks

WINDOW = 64
NUM_GLOBALS = 16
BLOCK = 64
NUM_BUCKETS = 8192
SEED = 0
WARMUP_N = 4096


def global_ids(n: int) -> torch.Tensor:
    return torch.unique(torch.linspace(0, n - 1, NUM_GLOBALS).round().long())


def bucket_ids(n: int) -> torch.Tensor:
    return torch.randint(0, NUM_BUCKETS, (n,), generator=torch.Generator().manual_seed(SEED))


def bigbird_random_blocks(n: int) -> torch.Tensor:
    """The random block of every block row, as attngraph's bigbird draws it."""
    layout = masks.random(n // BLOCK, 1, seed=SEED)
    return layout.src


BUILDERS = {
    "sliding_window": lambda n: masks.sliding_window(n, WINDOW),
    "longformer": lambda n: masks.longformer(n, WINDOW, global_ids(n)),
    "bigbird": lambda n: masks.bigbird(n, BLOCK, seed=SEED),
    "hash_buckets": lambda n: masks.hash_buckets(bucket_ids(n), causal=True),
}

DESCRIPTIONS = {
    "sliding_window": f"sliding_window(N, {WINDOW})",
    "longformer": f"longformer(N, {WINDOW}, {NUM_GLOBALS} globals)",
    "bigbird": f"bigbird(N, block={BLOCK}), 3 window / 1 global / 1 random blocks",
    "hash_buckets": f"hash_buckets, {NUM_BUCKETS} buckets, causal",
}


def mask_mod_for(name: str, n: int):
    """FlexAttention mask_mod(b, h, q_idx, kv_idx) for the same pattern."""
    if name == "sliding_window":
        return lambda b, h, q, kv: (q - kv).abs() <= WINDOW
    if name == "longformer":
        is_global = torch.zeros(n, dtype=torch.bool)
        is_global[global_ids(n)] = True
        return lambda b, h, q, kv: ((q - kv).abs() <= WINDOW) | is_global[q] | is_global[kv]
    if name == "bigbird":
        rnd = bigbird_random_blocks(n)

        def bigbird_mod(b, h, q, kv):
            qb, kb = q // BLOCK, kv // BLOCK
            return ((qb - kb).abs() <= 1) | (qb < 1) | (kb < 1) | (rnd[qb] == kb)
        return bigbird_mod
    if name == "hash_buckets":
        bq = bucket_ids(n)
        return lambda b, h, q, kv: (bq[q] == bq[kv]) & (kv <= q)
    raise KeyError(name)


def fmt_bytes(num: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if num < 1024 or unit == "GB":
            return f"{num:.3g} {unit}" if unit != "B" else f"{num} B"
        num /= 1024
    return str(num)


def timed(fn, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        result = None
        gc.collect()
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), result


def run_attngraph(name: str, n: int, repeats: int) -> dict:
    BUILDERS[name](WARMUP_N)
    seconds, g = timed(lambda: BUILDERS[name](n), repeats)
    out = {"edges": g.num_edges, "seconds": seconds,
           "bytes": g.edge_index.as_tensor().nbytes + g.ptr.nbytes}
    del g
    gc.collect()
    return out


def flex_child(name: str, n: int, repeats: int, eager_max_cells: int) -> None:
    """Runs in a child process: prints one JSON line with the FlexAttention result."""
    from torch.nn.attention.flex_attention import create_block_mask

    eager = n * n <= eager_max_cells
    build = create_block_mask if eager else torch.compile(create_block_mask, dynamic=True)
    build(mask_mod_for(name, WARMUP_N), None, None, WARMUP_N, WARMUP_N, device="cpu")
    mod = mask_mod_for(name, n)
    first_t = time.perf_counter()
    bm = build(mod, None, None, n, n, device="cpu")
    first = time.perf_counter() - first_t
    times = [first]
    if first < 30:      # repeat only when it is quick
        for _ in range(repeats - 1):
            del bm
            gc.collect()
            t = time.perf_counter()
            bm = build(mod, None, None, n, n, device="cpu")
            times.append(time.perf_counter() - t)
    nbytes = sum(t.nbytes for t in bm.as_tuple() if isinstance(t, torch.Tensor))
    print(json.dumps({"seconds": statistics.median(times), "runs": len(times),
                      "bytes": nbytes, "mode": "eager" if eager else "compiled"}))


def run_flex(name: str, n: int, args) -> tuple:
    cmd = [sys.executable, os.path.abspath(__file__), "--flex-child", name, "--n", str(n),
           "--repeats", str(args.repeats), "--eager-max-cells", str(args.eager_max_cells)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    def limit_memory():  # the child must not take the machine down if it materialises N x N
        limit = int(args.flex_memory_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.flex_timeout,
                              preexec_fn=limit_memory)
    except subprocess.TimeoutExpired:
        return f"stopped after {args.flex_timeout} s (not finished)", "–"
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        reason = lines[-1][:100] if lines else f"exit code {proc.returncode}"
        if proc.returncode < 0:
            reason = f"killed by signal {-proc.returncode}"
        return f"failed: {reason}", "–"
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    runs = "" if res["runs"] > 1 else ", 1 run"
    return f"{res['seconds']:.2f} ({res['mode']}{runs})", fmt_bytes(res["bytes"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="tokens (default 1e6)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--patterns", nargs="*", default=list(BUILDERS), choices=list(BUILDERS))
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    parser.add_argument("--flex-timeout", type=int, default=300,
                        help="seconds allowed per FlexAttention pattern (child process)")
    parser.add_argument("--flex-memory-gb", type=float, default=12,
                        help="address-space limit of the FlexAttention child process")
    parser.add_argument("--eager-max-cells", type=int, default=1 << 28,
                        help="largest N*N for eager create_block_mask (it allocates N*N bools)")
    parser.add_argument("--flex-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.flex_child:
        flex_child(args.flex_child, args.n, args.repeats, args.eager_max_cells)
        return

    n = args.n
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, N = {n:,}")
    rows = []
    for name in args.patterns:
        ours = run_attngraph(name, n, args.repeats)
        flex_time, flex_bytes = ("not run", "–") if args.no_flex else run_flex(name, n, args)
        rows.append((DESCRIPTIONS[name], f"{ours['edges']:,}", f"{ours['seconds']:.2f}",
                     fmt_bytes(ours["bytes"]), flex_time, flex_bytes))
        print(f"  done {name}", file=sys.stderr, flush=True)
    print()
    print("| pattern | edges E | attngraph build (s) | attngraph bytes (edge_index + ptr) "
          "| FlexAttention create_block_mask (s) | BlockMask bytes |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
