"""Implicit compositions beside their parts: ``num_edges``, ``in_degree()`` and
``graph_attention`` on ``a | b`` (and ``a & b``, ``a - b``) against ``a`` and ``b`` alone.

Each case builds its implicit parts and their composition; a timed operation starts on
fresh graphs (``num_edges`` is cached once counted), so every timing includes reading the
rules. Rounds interleave the variants (part a, part b, composition, the order rotating every
round), so load from other work on the machine falls on all of them alike. The ratio is
``composition / (a + b)`` per round, reported as the median with its range.

    python benchmarks/compose.py --n 100000 --rounds 5 --threads 1
    python benchmarks/compose.py --n 100000 --rounds 5 --threads 1 \
        --out benchmarks/results/cpu/compose.md
"""
from __future__ import annotations

import argparse
import operator
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import attngraph as ag
from attngraph import masks as M

CASES = {
    # the composition the slow union was measured on
    "longformer(256, 16 globals) | dilated_window(4, 100)": (
        lambda n: M.longformer(n, 256, range(16), implicit=True),
        lambda n: M.dilated_window(n, 4, 100, implicit=True), operator.or_),
    # README's union example
    "longformer(256, 16 globals) | dilated_window(8, 127)": (
        lambda n: M.longformer(n, 256, range(16), implicit=True),
        lambda n: M.dilated_window(n, 8, 127, implicit=True), operator.or_),
    "sliding_window(256) & dilated_window(64, 3)": (
        lambda n: M.sliding_window(n, 256, implicit=True),
        lambda n: M.dilated_window(n, 64, 3, implicit=True), operator.and_),
    "longformer(256, 16 globals) - global_tokens(16)": (
        lambda n: M.longformer(n, 256, range(16), implicit=True),
        lambda n: M.global_tokens(n, range(16), implicit=True), operator.sub),
}


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def operations(n: int, heads: int, dim: int):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n, heads, dim, generator=gen) for _ in range(3))
    return {
        "num_edges": lambda g: g.num_edges,
        "in_degree()": lambda g: g.in_degree(),
        "graph_attention": lambda g: ag.graph_attention(q, k, v, g),
    }


def run(n: int, rounds: int, heads: int, dim: int, cases, ops):
    rows = []
    for case in cases:
        make_a, make_b, op = CASES[case]
        for name, fn in ops.items():
            times = {"a": [], "b": [], "a op b": []}
            makers = {"a": make_a, "b": make_b,
                      "a op b": lambda n, make_a=make_a, make_b=make_b, op=op:
                      op(make_a(n), make_b(n))}
            order = list(times)
            fn(makers["a op b"](n))                 # warm-up
            for r in range(rounds):
                for key in order[r % 3:] + order[:r % 3]:
                    g = makers[key](n)
                    times[key].append(timed(lambda: fn(g)))
            ratio = [c / (a + b) for a, b, c in zip(times["a"], times["b"], times["a op b"])]
            rows.append((case, name, *(statistics.median(times[k]) for k in order),
                         statistics.median(ratio), min(ratio), max(ratio)))
            print(f"{case:52s} {name:16s} a {rows[-1][2]:.4f}s  b {rows[-1][3]:.4f}s  "
                  f"a op b {rows[-1][4]:.4f}s  ratio {rows[-1][5]:.2f} "
                  f"[{rows[-1][6]:.2f}, {rows[-1][7]:.2f}]", flush=True)
    return rows


def markdown(rows, args, argv) -> str:
    lines = [
        "# Implicit compositions beside their parts",
        "",
        f"Command: `python benchmarks/compose.py {' '.join(argv)}`",
        "",
        f"N = {args.n:,} tokens; graph_attention: forward, float32, H = {args.heads}, "
        f"D = {args.dim}, backend auto (key ranges); {args.rounds} interleaved rounds, "
        f"median seconds; ratio = composition / (a + b) per round: median [min, max]. "
        f"CPU: {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}; a shared, noisy "
        f"2-core machine.",
        "",
        "| composition (a op b) | operation | a | b | a op b | ratio |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for case, name, a, b, c, ratio, lo, hi in rows:
        lines.append(f"| `{case.replace('|', chr(92) + '|')}` | {name} | {a:.4f} | {b:.4f} | {c:.4f} | "
                     f"{ratio:.2f} [{lo:.2f}, {hi:.2f}] |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--cases", default=",".join(map(str, range(len(CASES)))),
                   help="comma-separated case numbers (0-based)")
    p.add_argument("--ops", default="num_edges,in_degree(),graph_attention")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's own)")
    p.add_argument("--out", default=None, help="write a markdown table here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = [list(CASES)[int(i)] for i in args.cases.split(",")]
    ops = {k: v for k, v in operations(args.n, args.heads, args.dim).items()
           if k in args.ops.split(",")}
    rows = run(args.n, args.rounds, args.heads, args.dim, cases, ops)
    if args.out:
        Path(args.out).write_text(markdown(rows, args, sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
