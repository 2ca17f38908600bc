"""Cost per attended cell, forward + backward: SCFA's masks on the key-range path vs dense.

One attention call with the shapes of ``examples/scfa_lm.py`` (``[B, L, H, D]``, float32,
CPU) is timed forward + backward for dense causal ``scaled_dot_product_attention`` and for
``graph_attention`` on

* ``hash<b>``: ``hash_buckets(lsh_buckets(q, b), lsh_buckets(k, b), implicit=True)``, keys
  sorted by (bucket, position), a query attending to the earlier keys of its bucket;
* ``drop<p>``: ``qk_drop(keep_q, keep_k, implicit=True)`` with a fraction ``p`` of the
  queries and keys dropped at random (every kept query keeps key 0).

A cell is one (query, key) pair the mask allows: ``B * H * L * (L + 1) / 2`` for dense, the
graph's ``num_edges`` for a sparse mask. The mask is built before the clock starts; its
build time is reported on its own. The variants take turns (one call each per round, the
order rotating every round), so noise from other work on the machine falls on all of them
alike; the ratio ``(sparse time / sparse cells) / (dense time / dense cells)`` is read per
round and reported as a median with its quartiles and range, beside the per-round speed-up
``dense time / sparse time``.

``--breakdown`` adds where a sparse call's time goes: the cells the key-range path computes
(its dense pieces, padding and masked-out cells included) per attended cell, and one
forward + backward under ``torch.profiler`` split into ATen's flash kernel, gathers and
scatters of rows (``index_select``, ``index_add_``, ...), mask building (compares,
``where``) and the rest (planning, merges, Python), as shares of the profiled time.

    python benchmarks/scfa_cells.py --lengths 8192 --rounds 10
    python benchmarks/scfa_cells.py --lengths 8192,16384 --out benchmarks/results/cpu/scfa_cells.md
    python benchmarks/scfa_cells.py --lengths 8192 --rounds 3 --breakdown
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import attngraph as ag
from attngraph.ops import prefixes, ranges


def build_mask(variant: str, q: torch.Tensor, k: torch.Tensor, seed: int):
    """This round's mask for ``q, k`` ``[B, L, H, D]``: one graph per (sequence, head)."""
    if variant.startswith("hash"):
        nb = int(variant[4:])
        return ag.masks.hash_buckets(ag.masks.lsh_buckets(q, nb, seed=seed),
                                     ag.masks.lsh_buckets(k, nb, seed=seed), implicit=True)
    rate = float(variant[4:])
    gen = torch.Generator().manual_seed(seed)
    B, L, H, _ = q.shape
    keep_q = torch.rand(B, H, L, generator=gen) >= rate
    keep_k = torch.rand(B, H, L, generator=gen) >= rate
    keep_k[..., 0] = True
    return ag.masks.qk_drop(keep_q, keep_k, implicit=True)


def fwd_bwd(variant: str, q, k, v, dout, graph) -> float:
    """Seconds for one forward + backward."""
    for t in (q, k, v):
        t.grad = None
    t0 = time.perf_counter()
    if variant == "dense":
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), is_causal=True).transpose(1, 2)
    else:
        o = ag.graph_attention(q, k, v, graph)
    o.backward(dout)
    return time.perf_counter() - t0


KERNEL = "_scaled_dot_product_flash_attention_for_cpu"
GATHER = {"aten::index_select", "aten::index_add_", "aten::scatter_add_", "aten::index",
          "aten::index_put_", "aten::_index_put_impl_", "aten::index_copy_", "aten::gather"}
MASK = {"aten::where", "aten::lt", "aten::ge", "aten::le", "aten::gt", "aten::bitwise_and",
        "aten::bitwise_not", "aten::masked_fill_", "aten::logical_and"}


def computed_cells(graph, dim: int) -> int:
    """Cells the key-range path computes on ``graph`` (a StackedGraph: its inner graph, one
    head per row): its dense pieces' rows x keys (or the padded query blocks of
    :mod:`attngraph.ops.prefixes` where it serves), padding and masked-out cells
    included, plus the edges of its per-edge pieces."""
    g = getattr(graph, "graph", graph)
    g = g if g.is_implicit else g.rule
    classes = prefixes.plan(g)
    if classes is not None:            # rows reading prefixes of one segment, padded
        return prefixes.computed_cells(classes)
    total = 0
    for p in ranges.pieces(g, 0, g.num_dst, 1, dim, flash=True):
        total += p.rows.numel() * p.keys.size(1) if isinstance(p, ranges.Dense) \
            else p.src.numel()
    return total


def breakdown(variant: str, q, k, v, dout, graph) -> dict:
    """Shares of one profiled forward + backward: kernel, gathers, masks, the rest."""
    fwd_bwd(variant, q, k, v, dout, graph)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fwd_bwd(variant, q, k, v, dout, graph)
    parts = dict(kernel=0.0, gather=0.0, mask=0.0)
    total = 0.0
    for e in prof.key_averages():
        t = e.self_cpu_time_total
        total += t
        if KERNEL in e.key:
            parts["kernel"] += t
        elif e.key in GATHER:
            parts["gather"] += t
        elif e.key in MASK:
            parts["mask"] += t
    parts = {n: t / total for n, t in parts.items()}
    parts["rest"] = 1.0 - sum(parts.values())
    return parts


def quartiles(xs) -> tuple:
    xs = sorted(xs)
    q1, med, q3 = (statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1
                   else (xs[0],) * 3)
    return med, q1, q3, xs[0], xs[-1]


def measure(L: int, variants: list, args) -> list:
    torch.manual_seed(args.seed)
    B, H, D = args.batch, args.heads, args.dim
    q, k, v = (torch.randn(B, L, H, D, requires_grad=True) for _ in range(3))
    dout = torch.randn(B, L, H, D)
    dense_cells = B * H * L * (L + 1) // 2
    times = {v_: [] for v_ in variants}
    cells = {v_: [] for v_ in variants}
    builds = {v_: [] for v_ in variants}
    for r in range(args.rounds + 1):                       # round 0: warm-up, not kept
        shift = r % len(variants)
        for var in variants[shift:] + variants[:shift]:
            graph, n = None, dense_cells
            if var != "dense":
                t0 = time.perf_counter()
                graph = build_mask(var, q.detach(), k.detach(), seed=args.seed + r)
                build = time.perf_counter() - t0
                n = graph.num_edges
            t = fwd_bwd(var, q, k, v, dout, graph)
            if r:
                times[var].append(t)
                cells[var].append(n)
                if var != "dense":
                    builds[var].append(build)
    rows = []
    for var in variants:
        per_cell = [t / n for t, n in zip(times[var], cells[var])]
        dense_per_cell = [t / n for t, n in zip(times["dense"], cells["dense"])]
        rows.append(dict(
            L=L, variant=var, cells=statistics.median(cells[var]),
            density=statistics.median(cells[var]) / dense_cells,
            ms=statistics.median(times[var]) * 1e3,
            ns_per_cell=statistics.median(per_cell) * 1e9,
            cost_ratio=quartiles([s / d for s, d in zip(per_cell, dense_per_cell)]),
            speedup=quartiles([d / s for d, s in zip(times["dense"], times[var])]),
            build_ms=statistics.median(builds[var]) * 1e3 if builds[var] else None))
        if args.breakdown and var != "dense":
            graph = build_mask(var, q.detach(), k.detach(), seed=args.seed)
            rows[-1]["computed"] = computed_cells(graph, D) / graph.num_edges
            rows[-1]["shares"] = breakdown(var, q, k, v, dout, graph)
    return rows


def table(rows: list) -> str:
    out = ["| L | variant | cells (of causal) | fwd+bwd ms | ns / cell | cost per cell vs "
           "dense (median) | IQR | min-max | speed-up (median) | IQR | mask build ms |",
           "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        c, s = r["cost_ratio"], r["speedup"]
        out.append(f"| {r['L']} | {r['variant']} | {r['density']:.3f} | {r['ms']:.0f} | "
                   f"{r['ns_per_cell']:.2f} | {c[0]:.2f}x | {c[1]:.2f}-{c[2]:.2f} | "
                   f"{c[3]:.2f}-{c[4]:.2f} | {s[0]:.2f}x | {s[1]:.2f}-{s[2]:.2f} | "
                   + (f"{r['build_ms']:.0f} |" if r["build_ms"] is not None else "- |"))
    parts = [r for r in rows if "shares" in r]
    if parts:
        out += ["", "| L | variant | computed cells per attended cell | flash kernel | gathers, "
                "scatters | masks | rest |", "|---:|---|---:|---:|---:|---:|---:|"]
        for r in parts:
            sh = r["shares"]
            out.append(f"| {r['L']} | {r['variant']} | {r['computed']:.2f} | "
                       + " | ".join(f"{100 * sh[n]:.0f} %" for n in ("kernel", "gather",
                                                                      "mask", "rest")) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="8192")
    p.add_argument("--variants", default="dense,hash8,hash16,drop0.3,drop0.5")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="also write the table (markdown)")
    p.add_argument("--breakdown", action="store_true",
                   help="also the computed cells and a profiled split of each sparse call")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = args.variants.split(",")
    if variants[0] != "dense":
        variants = ["dense"] + [v for v in variants if v != "dense"]
    load_before = os.getloadavg()
    rows = [r for L in args.lengths.split(",") for r in measure(int(L), variants, args)]
    text = table(rows)
    print(text)
    if args.out is not None:
        cmd = " ".join(sys.argv[1:] if argv is None else argv)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            f"# Cost per attended cell, forward + backward: key-range path vs dense SDPA\n\n"
            f"    python benchmarks/scfa_cells.py {cmd}\n\n"
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}"
            f", {torch.get_num_threads()} threads on {os.cpu_count()} CPU cores, load average "
            f"(1, 5, 15 min) {', '.join(f'{x:.1f}' for x in load_before)} before, "
            f"{', '.join(f'{x:.1f}' for x in os.getloadavg())} after. B = {args.batch}, "
            f"H = {args.heads}, D = {args.dim}, float32, {args.rounds} rounds, the variants "
            f"interleaved. Cells: the (query, key) pairs the mask allows; \"of causal\" is "
            f"their share of the causal mask's. Cost per cell vs dense is "
            f"(sparse ms / sparse cells) / (dense ms / dense cells) per round; speed-up is "
            f"dense ms / sparse ms per round. Mask build (not in fwd+bwd) is the median "
            f"time to draw and build the mask.\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
