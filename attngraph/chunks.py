"""Chunk sizes, each with its reason, and the one row chunker.

Every pass over edges in attngraph works on chunks of whole query rows, so temporaries stay
bounded whatever the number of edges E is. The sizes below are read at call time
(``chunks.MAX_CHUNK_ELEMENTS``), so a test may shrink one with ``monkeypatch``. Timings
behind them are in ``benchmarks/results/cpu/chunks.md``.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch import Tensor

__all__ = ["row_chunks", "CHUNK_EDGES", "MASK_MOD_CHUNK_ELEMENTS", "ROW_CHUNK", "EDGE_CHUNK",
           "MAX_CHUNK_ELEMENTS", "RANGE_MAX_ELEMENTS", "RANGE_MAX_CHUNK_ROWS",
           "MAX_TILE_ELEMENTS", "PLAN_CHUNK_EDGES", "DENSE_TABLE_LIMIT", "BIN_CHUNK_EDGES",
           "BIN_RULE_ROWS"]

# ---------------------------------------------------------------------------- core
# Edges written per step by `runs.from_runs` / `runs.union`: per-chunk overhead vanishes,
# temporaries stay in cache and far below E.
CHUNK_EDGES = 1 << 20
# Cells evaluated per call of a mask_mod (`TokenGraph.from_mask_mod`,
# `flex.from_block_mask`): a predicate may build int64 temporaries of this size (32 MB).
MASK_MOD_CHUNK_ELEMENTS = 1 << 22
# Rows of an implicit graph whose runs are counted at once (a few int64 per row).
ROW_CHUNK = 1 << 18
# Edges an implicit graph generates at once in `edge_chunks` (16 bytes each: 64 MB).
EDGE_CHUNK = 1 << 22

# ---------------------------------------------------------------------------- pictures
# Edges `viz.plot_mask` bins per step: temporaries of about 8 bytes x this.
BIN_CHUNK_EDGES = 1 << 23
# Rows of an implicit graph `viz.plot_mask` bins per step from its rule.
BIN_RULE_ROWS = 1 << 16

# ---------------------------------------------------------------------------- operators
# Per-edge elements (edges x heads x head dim) the torch backend gathers at once: small
# enough that temporaries come from the allocator's free lists and the CPU caches
# (larger chunks are slower, not only larger).
MAX_CHUNK_ELEMENTS = 1 << 20
# Score elements (block rows x keys x heads) of one piece of the key-range backend.
RANGE_MAX_ELEMENTS = 1 << 20
# Most query rows per chunk of the key-range backend (float32 accumulators per row).
RANGE_MAX_CHUNK_ROWS = 1 << 16
# Score elements (heads x query rows x keys) the tile backend computes at once.
MAX_TILE_ELEMENTS = 1 << 20
# Edges whose tile keys are computed at once while planning tiles.
PLAN_CHUNK_EDGES = 1 << 22
# Tile grids of up to this many tiles are counted with a dense table (O(E), no sort).
DENSE_TABLE_LIMIT = 1 << 24


def row_chunks(ptr: Tensor, max_edges: int) -> List[Tuple[int, int]]:
    """Cut rows ``0..R`` into consecutive ``[r0, r1)`` ranges of at most ``max_edges``
    edges each.

    Contract: ``ptr`` is a CSR offset array ``[R + 1]`` (non-decreasing, ``ptr[0]`` is
    the first row's start; on any device, one host sync per chunk); the ranges cover
    every row exactly once, in order; a chunk holds at most ``max_edges`` edges unless it
    is a single row with more (such a row forms a chunk alone); rows without edges ride
    along with their neighbours. ``R == 0`` gives no chunk.
    """
    num_rows = ptr.numel() - 1
    chunks, r0 = [], 0
    while r0 < num_rows:
        limit = ptr[r0] + max_edges
        r1 = int(torch.searchsorted(ptr, limit, right=True)) - 1
        r1 = min(max(r1, r0 + 1), num_rows)
        chunks.append((r0, r1))
        r0 = r1
    return chunks
