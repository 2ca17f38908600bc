"""The two engines of the dense tiles on this machine, forward, interleaved: ATen's flash
kernel (``backend="tiles"``, what ``auto`` takes on CPU) and FlexAttention
(``backend="flex"``; eager on CPU, where it computes the whole score matrix).

Each round times one forward of each engine in turn (order alternating between rounds), so
machine noise falls on both alike; the table gives the median and the spread (min..max) of
each and the median of the per-round ratios. Plans and BlockMasks are built before timing
(both are cached with the graph).

    python benchmarks/tile_engines.py [--n 4096] [--rounds 5] [--out benchmarks/results/cpu]
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import time
from pathlib import Path

import torch

import attngraph
from attngraph.ops import flex_tiles
from benchmarks.specs import parse_mask

MASKS = ("sliding_window(128)", "longformer(128,g16)", "bigbird(64)", "random(32)",
         "hash(64)", "window_random(128,16)")


def measure(mask: str, n: int, heads: int, dim: int, rounds: int) -> dict:
    g = parse_mask(mask).build(n)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n, heads, dim, generator=gen) for _ in range(3))
    plan = flex_tiles.engine_plan(g, heads=heads, kv_heads=heads, head_dim=dim,
                                  value_dim=dim, dtype=q.dtype)
    flex_tiles.block_mask(plan)
    g.tile_plan()
    times = {"tiles": [], "flex": []}
    with torch.no_grad():
        outs = {b: attngraph.graph_attention(q, k, v, g, backend=b) for b in times}  # warm
        err = float((outs["tiles"] - outs["flex"]).abs().max())
        for r in range(rounds):
            for b in (("tiles", "flex") if r % 2 == 0 else ("flex", "tiles")):
                t = time.perf_counter()
                attngraph.graph_attention(q, k, v, g, backend=b)
                times[b].append(time.perf_counter() - t)
    ratios = [f / t for f, t in zip(times["flex"], times["tiles"])]
    return dict(mask=mask, n=n, edges=g.num_edges, times=times, ratio=statistics.median(ratios),
                max_abs_diff=err, flex_plan=str(plan), tiles_plan=str(g.tile_plan()))


def markdown(rows, args) -> str:
    ms = lambda xs: (f"{statistics.median(xs) * 1e3:.3g} ({min(xs) * 1e3:.3g}..."  # noqa: E731
                     f"{max(xs) * 1e3:.3g})")
    lines = [
        "# Tile engines on CPU: ATen flash (`tiles`) vs FlexAttention (`flex`), forward",
        "",
        f"Measured: `python benchmarks/tile_engines.py --n {args.n} --rounds {args.rounds}`; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, H = {args.heads}, "
        f"D = {args.dim}, float32, no grad; {args.rounds} interleaved rounds on a shared, "
        f"noisy 2-core machine (median (min..max) ms). FlexAttention runs eagerly on CPU "
        f"(the whole [H, N, N] score matrix; torch has no CPU backward for it), so `auto` "
        f"keeps the flash engine on CPU. Load average at the end: "
        f"{' / '.join(f'{x:.1f}' for x in os.getloadavg())} (1 / 5 / 15 min).",
        "",
        "| mask | N | E | tiles fwd ms | flex fwd ms | flex / tiles (median of rounds) | "
        "max abs diff | flex plan |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(f"| {r['mask']} | {r['n']} | {r['edges']:,} | {ms(r['times']['tiles'])} | "
                     f"{ms(r['times']['flex'])} | {r['ratio']:.3g} | {r['max_abs_diff']:.2g} | "
                     f"{r['flex_plan']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--masks", default=",".join(MASKS))
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    rows = []
    for mask in re.split(r",(?![^(]*\))", args.masks):
        rows.append(measure(mask, args.n, args.heads, args.dim, args.rounds))
        print(f"{mask}: flex / tiles {rows[-1]['ratio']:.3g}", flush=True)
    text = markdown(rows, args)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "tile_engines.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
