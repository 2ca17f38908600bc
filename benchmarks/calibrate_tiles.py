"""Measure the tile cost model's constants on this machine.

``attngraph.ops.plan.EDGE_COST_CELLS`` (what one edge on the per-edge path costs, in cells
of a 128 x 128 tile) and ``CELL_COST`` (what one cell of each block size costs) come from
this script run on the reference CPU; the figures are in benchmarks/results/cpu/constants.md.

    python benchmarks/calibrate_tiles.py
"""
from __future__ import annotations

import json
import math
import statistics
import time
from typing import Tuple

import torch

from attngraph import masks
from attngraph.ops import chunked
from attngraph.ops.tiles import attention, build_plan

def calibrate(*, device="cpu", dtype=torch.float32, heads: int = 4, dim: int = 64,
              blocks: Tuple[int, ...] = (64, 128), backward: bool = False, n: int = 8192,
              repeats: int = 5) -> dict:
    """Measure, on this machine, what one dense tile cell and one per-edge edge cost.

    Times :func:`attention` on graphs that are all full tiles (documents of four blocks,
    so each query block runs four tiles) and the per-edge torch backend on a random graph;
    returns ``{"edge_cost_cells": E, "cell_cost": {block: c}, "cell_s": {block: s},
    "edge_s": s}``, with costs relative to one cell of the largest block.
    ``attngraph.ops.plan.EDGE_COST_CELLS`` and ``CELL_COST`` are these figures measured on
    the reference CPU (benchmarks/results/cpu/constants.md).
    """
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n, heads, dim, generator=gen).to(device=device, dtype=dtype)
               for _ in range(3))
    if backward:
        for t in (q, k, v):
            t.requires_grad_(True)
    scale = 1.0 / math.sqrt(dim)

    def timed(fn) -> float:
        times = []
        for _ in range(repeats + 1):
            t = time.perf_counter()
            out, lse = fn()
            if backward:
                out.sum().backward()
            if q.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return statistics.median(times[1:])

    cell_s = {}
    for block in blocks:
        doc = 4 * block
        graph = masks.document([doc] * (n // doc) + ([n % doc] if n % doc else []))
        plan = build_plan(graph.to(device), block, min_density=0.0)
        cell_s[block] = timed(lambda: attention(q, k, v, plan.graph, scale,
                                                plan=plan)) / plan.tile_cells
    rnd = masks.random(n, 64, seed=0).to(device)
    edge_s = timed(lambda: chunked.attention(q, k, v, rnd, scale)) / rnd.num_edges
    ref = cell_s[max(blocks)]
    return dict(edge_cost_cells=edge_s / ref, cell_cost={b: c / ref for b, c in cell_s.items()},
                cell_s=cell_s, edge_s=edge_s)


if __name__ == "__main__":      # python benchmarks/calibrate_tiles.py: the constants, measured
    for backward in (False, True):
        print(("forward + backward: " if backward else "forward: ")
              + json.dumps(calibrate(backward=backward, repeats=3), default=float))
