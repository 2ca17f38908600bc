"""Compiled vs eager ``graph_attention``, per backend: does a compiled call keep its path?

For each mask and backend (``torch``, ``tiles``, ``ranges``, ``auto``) one process times the
eager call and ``torch.compile(fn, fullgraph=True)`` of the same call, interleaved: every
round runs eager forward, compiled forward, eager forward + backward, compiled forward +
backward, one after the other, so machine noise hits both sides alike. Reported: the median
over the rounds, the spread (min-max), and the median of the per-round ratios compiled /
eager. ``ranges`` reads the implicit form of the mask (``implicit=True``: the explicit graph
keeps no rule); ``auto`` runs on both forms. The backend that ran each compiled call is read
from :func:`attngraph.ops.record.recording`, not assumed.

Compilation happens in the warm-up (one forward and one forward + backward call of each
compiled function) and is not timed.

    python benchmarks/compile_paths.py                      # N = 4096, H = 4, D = 64
    python benchmarks/compile_paths.py --n 1024 --rounds 3  # seconds
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import attngraph as ag  # noqa: E402
from attngraph.ops.record import recording  # noqa: E402

MASKS = {
    "sliding_window(64)": lambda n, implicit: ag.masks.sliding_window(n, 64,
                                                                      implicit=implicit),
    "longformer(64, g16)": lambda n, implicit: ag.masks.longformer(
        n, 64, list(range(0, n, n // 16)), implicit=implicit),
}
# (backend, graph form)
ROWS = [("tiles", "explicit"), ("auto", "explicit"), ("ranges", "implicit"),
        ("auto", "implicit"), ("torch", "explicit")]


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measure(graph, backend: str, n: int, heads: int, dim: int, rounds: int,
            compile_backend: str) -> dict:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n, heads, dim, generator=gen) for _ in range(3))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]

    def fn(q, k, v):
        return ag.graph_attention(q, k, v, graph, backend=backend)

    compiled = torch.compile(fn, fullgraph=True, backend=compile_backend)

    def forward(f):
        with torch.no_grad():
            f(q, k, v)

    def train(f):
        for t in leaves:
            t.grad = None
        f(*leaves).square().mean().backward()

    calls = {"eager fwd": lambda: forward(fn), "compiled fwd": lambda: forward(compiled),
             "eager fwd+bwd": lambda: train(fn), "compiled fwd+bwd": lambda: train(compiled)}
    start = time.perf_counter()
    with recording() as ran:
        for call in calls.values():          # warm-up: compiles, builds plans and caches
            call()
    warmup_s = time.perf_counter() - start
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            times[name].append(_timed(call))
    with recording() as compiled_ran:
        forward(compiled)
    with recording() as eager_ran:
        forward(fn)
    row = {"ran eager": eager_ran, "ran compiled": compiled_ran, "warmup_s": warmup_s}
    for name, ts in times.items():
        row[name] = {"median": statistics.median(ts), "min": min(ts), "max": max(ts)}
    for part in ("fwd", "fwd+bwd"):
        ratios = [c / e for c, e in zip(times[f"compiled {part}"], times[f"eager {part}"])]
        row[f"ratio {part}"] = statistics.median(ratios)
    return row


def _ms(x: dict) -> str:
    return f"{x['median'] * 1e3:,.1f} ({x['min'] * 1e3:,.0f}–{x['max'] * 1e3:,.0f})"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--masks", default=",".join(MASKS),
                   help="masks to run, comma-separated (default: all)")
    p.add_argument("--backends", default="tiles,auto,ranges,torch",
                   help="backends to run, comma-separated (default: all)")
    p.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, N = {args.n}, "
          f"H = {args.heads}, D = {args.dim}, float32, {args.rounds} interleaved rounds, "
          f"torch.compile(fullgraph=True, backend={args.compile_backend!r})")
    print()
    print("| mask | graph | backend | ran (eager / compiled) | eager fwd ms | compiled fwd ms "
          "| compiled / eager fwd | eager fwd+bwd ms | compiled fwd+bwd ms "
          "| compiled / eager fwd+bwd |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|")
    rows = []
    wanted = set(args.backends.split(","))
    for mask in args.masks.split(";") if ";" in args.masks else [
            m for m in MASKS if m in args.masks]:
        make = MASKS[mask]
        graphs = {"explicit": make(args.n, False), "implicit": make(args.n, True)}
        for backend, form in ROWS:
            if backend not in wanted:
                continue
            torch._dynamo.reset()
            r = measure(graphs[form], backend, args.n, args.heads, args.dim, args.rounds,
                        args.compile_backend)
            r.update(mask=mask, graph=form, backend=backend)
            rows.append(r)
            ran = f"{'/'.join(r['ran eager'])} / {'/'.join(r['ran compiled'])}"
            print(f"| {mask} | {form} | {backend} | {ran} | {_ms(r['eager fwd'])} | "
                  f"{_ms(r['compiled fwd'])} | {r['ratio fwd']:.2f}x | "
                  f"{_ms(r['eager fwd+bwd'])} | {_ms(r['compiled fwd+bwd'])} | "
                  f"{r['ratio fwd+bwd']:.2f}x |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
