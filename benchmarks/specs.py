"""What to benchmark: mask specs (``sliding_window(64)``), dtypes, sizes, and the models of
work (FLOPs) and minimum traffic (bytes) every result is judged against.

A mask spec is written ``name(arg, ...)`` or ``name:arg:...`` on the command line:

==========================  ==========================================================
``sliding_window(w)``       ``attngraph.masks.sliding_window(n, w)``: ``|i - j| <= w``
``random(k)``               ``attngraph.masks.random(n, k, seed=0)``: k keys per query
``longformer(w, gG)``       ``attngraph.masks.longformer(n, w, range(G))``: window + the
                            first G tokens global (``longformer(256,g16)``)
``bigbird(b)``              ``attngraph.masks.bigbird(n, b)`` (3 window blocks, 1 global
                            block, 1 random block, seed 0)
``causal`` / ``full``       ``attngraph.masks.causal(n)`` / ``full(n)``
``hash(b)``                 ``attngraph.masks.hash_buckets(buckets)``, causal, with each
                            token's bucket drawn uniformly from ``b`` (seed 0), as an
                            LSH of random queries gives
``window_random(w,r)``      ``sliding_window(n, w) | random(n, r, seed=0)``: a window
                            with random long-range edges (the mixed mask)
``neighborhood(k)``         ``attngraph.masks.neighborhood((s, s), k)``: 2-D neighbourhood
                            attention over an ``s x s`` grid, ``s = ceil(sqrt(n))``,
                            tokens in row-major order
``neighborhood_hilbert(k)`` the same mask with ``graph.order`` set to the grid's Hilbert
                            order (``attngraph.reorder(g, "hilbert", shape=(s, s))``);
                            FlexAttention gets the tokens in that order too
==========================  ==========================================================
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

__all__ = ["MaskSpec", "parse_mask", "parse_dtype", "dtype_name", "flops", "min_bytes",
           "DTYPES", "human_bytes"]

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float64": torch.float64, "fp64": torch.float64}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(set(DTYPES))}") \
            from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def human_bytes(b: Optional[float]) -> str:
    if b is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(b) >= scale:
            return f"{b / scale:.3g} {unit}"
    return f"{int(b)} B"


_ARITY = {"sliding_window": 1, "random": 1, "longformer": 2, "bigbird": 1, "causal": 0,
          "full": 0, "hash": 1, "window_random": 2, "neighborhood": 1,
          "neighborhood_hilbert": 1}


@dataclass(frozen=True)
class MaskSpec:
    """A mask family and its parameters (everything but the number of tokens)."""

    kind: str
    args: Tuple[int, ...] = ()

    @property
    def label(self) -> str:
        if self.kind == "longformer":
            return f"longformer({self.args[0]},g{self.args[1]})"
        return f"{self.kind}({','.join(map(str, self.args))})" if self.args else self.kind

    def __str__(self) -> str:
        return self.label

    # ------------------------------------------------------------------ graphs
    def valid_n(self, n: int) -> int:
        """``n`` rounded up to what the mask accepts (bigbird needs multiples of its block)."""
        if self.kind == "bigbird":
            b = self.args[0]
            return -(-n // b) * b
        if self.is_grid:
            return self.grid_side(n) ** 2
        return n

    @property
    def is_grid(self) -> bool:
        return self.kind in ("neighborhood", "neighborhood_hilbert")

    @property
    def flex_in_order(self) -> bool:
        """FlexAttention runs on the tokens permuted into the graph's order (and back)."""
        return self.kind == "neighborhood_hilbert"

    @staticmethod
    def grid_side(n: int) -> int:
        """Side of the square grid of a neighbourhood mask over (at least) ``n`` tokens."""
        side = math.isqrt(max(n, 1))
        return side if side * side >= n else side + 1

    def _grid(self, n: int, implicit: bool = False):
        from attngraph import masks, reorder

        side = self.grid_side(n)
        g = masks.neighborhood((side, side), self.args[0], implicit=implicit)
        if self.kind == "neighborhood_hilbert":
            g.order = reorder(g, "hilbert", shape=(side, side))
        return g

    def build(self, n: int, graph: str = "int64"):
        """The :class:`attngraph.TokenGraph` of this mask over ``n`` tokens (on the CPU):
        ``graph="int64"`` (explicit), ``"int32"`` (explicit, int32 node ids, written
        straight from the rule) or ``"implicit"`` (the rule itself; structured masks)."""
        from attngraph import masks

        if graph != "int64":
            rule = self._rule(n)
            if graph == "implicit":
                return rule
            if graph == "int32":
                return rule.materialize(torch.int32)
            raise ValueError(f"graph must be int64, int32 or implicit, got {graph!r}")
        if self.kind == "sliding_window":
            return masks.sliding_window(n, self.args[0])
        if self.kind == "random":
            return masks.random(n, self.args[0], seed=0)
        if self.kind == "longformer":
            return masks.longformer(n, self.args[0], self.global_indices(n))
        if self.kind == "bigbird":
            return masks.bigbird(n, self.args[0])
        if self.kind == "causal":
            return masks.causal(n)
        if self.kind == "full":
            return masks.full(n)
        if self.kind == "hash":
            return masks.hash_buckets(self.buckets(n))
        if self.kind == "window_random":
            return masks.sliding_window(n, self.args[0]) | masks.random(n, self.args[1], seed=0)
        if self.is_grid:
            return self._grid(n)
        raise AssertionError(self.kind)

    def _rule(self, n: int):
        from attngraph import masks

        if self.kind == "sliding_window":
            return masks.sliding_window(n, self.args[0], implicit=True)
        if self.kind == "longformer":
            return masks.longformer(n, self.args[0], self.global_indices(n), implicit=True)
        if self.kind in ("causal", "full"):
            return getattr(masks, self.kind)(n, implicit=True)
        if self.is_grid:
            return self._grid(n, implicit=True)
        raise ValueError(f"{self.label} has no implicit form (structured masks do)")

    def buckets(self, n: int):
        """The bucket of every token of a ``hash(b)`` mask."""
        gen = torch.Generator().manual_seed(0)
        return torch.randint(0, self.args[0], (n,), generator=gen)

    def global_indices(self, n: int) -> range:
        return range(min(self.args[1], n)) if self.kind == "longformer" else range(0)

    def expected_edges(self, n: int) -> int:
        """Number of edges over ``n`` tokens, exact or a close upper bound (for budgets)."""
        if self.kind == "sliding_window":
            w = min(self.args[0], n)
            return n * (2 * w + 1) - w * (w + 1)
        if self.kind == "random":
            return n * min(self.args[0], n)
        if self.kind == "longformer":
            w, g = min(self.args[0], n), min(self.args[1], n)
            return n * (2 * w + 1) - w * (w + 1) + 2 * g * n
        if self.kind == "bigbird":
            b = self.args[0]
            nb = -(-n // b)
            return min(n * n, nb * b * b * 5 + 2 * n * b)
        if self.kind == "causal":
            return n * (n + 1) // 2
        if self.kind == "hash":
            b = self.args[0]
            return n * (n // b + 1) // 2 + n
        if self.kind == "window_random":
            w = min(self.args[0], n)
            return n * (2 * w + 1) - w * (w + 1) + n * min(self.args[1], n)
        if self.is_grid:
            side = self.grid_side(n)
            return side * side * min(self.args[0], side) ** 2
        return n * n

    # ------------------------------------------------------------------ FlexAttention
    def mask_mod(self, graph, device, dense_limit_bytes: int
                 ) -> Tuple[Optional[Callable], str]:
        """A FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` that computes this graph's mask.

        Returns ``(mask_mod, how)``; ``mask_mod`` is None when the mask has no formula and a
        dense ``[N, N]`` lookup table would exceed ``dense_limit_bytes`` (``how`` says so).
        Block-structured masks (bigbird) look their block layout up, derived from the graph
        itself so the random blocks are exactly the graph's.
        """
        n = graph.num_dst
        if self.kind == "sliding_window":
            w = self.args[0]
            return (lambda b, h, q, kv: (q - kv).abs() <= w), "formula |q-kv|<=w"
        if self.kind == "causal":
            return (lambda b, h, q, kv: kv <= q), "formula kv<=q"
        if self.is_grid:
            side, k = self.grid_side(n), self.args[0]

            def in_window(qc, kc):         # NATTEN: window of k, shifted inward at borders
                start = torch.clamp(qc - k // 2, min=0, max=side - k)
                return (kc >= start) & (kc < start + k)

            return ((lambda b, h, q, kv: in_window(q // side, kv // side)
                     & in_window(q % side, kv % side)),
                    "formula: window of k per grid axis, row-major numbering")
        if self.kind == "full":
            return (lambda b, h, q, kv: q >= 0), "formula True"
        if self.kind == "hash":
            bucket = self.buckets(n).to(device)
            return ((lambda b, h, q, kv: (bucket[q] == bucket[kv]) & (kv <= q)),
                    "formula bucket[q]==bucket[kv] & kv<=q")
        if self.kind == "longformer":
            w = self.args[0]
            is_global = torch.zeros(n, dtype=torch.bool, device=device)
            is_global[list(self.global_indices(n))] = True
            return ((lambda b, h, q, kv: ((q - kv).abs() <= w) | is_global[q] | is_global[kv]),
                    "formula |q-kv|<=w | global[q] | global[kv]")
        if self.kind == "bigbird":
            blk = self.args[0]
            nb = -(-n // blk)
            layout = torch.zeros(nb, nb, dtype=torch.bool)
            layout[graph.dst // blk, graph.src // blk] = True
            if int(layout.sum()) * blk * blk == graph.num_edges and n % blk == 0:
                layout = layout.to(device)
                return ((lambda b, h, q, kv: layout[q // blk, kv // blk]),
                        f"block layout lookup [{nb}, {nb}]")
        if n * n > dense_limit_bytes:
            return None, (f"no formula for {self.label}, and a dense [N, N] lookup would take "
                          f"{human_bytes(n * n)} (limit {human_bytes(dense_limit_bytes)})")
        dense = graph.to_dense().to(device)
        return (lambda b, h, q, kv: dense[q, kv]), "dense [N, N] lookup"


def parse_mask(text: str) -> MaskSpec:
    """``"sliding_window(64)"``, ``"sliding_window:64"``, ``"longformer(256,g16)"`` ..."""
    t = text.strip().replace(" ", "")
    m = re.fullmatch(r"([a-z_]+)(?:\((.*)\)|:(.*))?", t)
    if not m or m.group(1) not in _ARITY:
        raise ValueError(f"unknown mask {text!r}; expected one of "
                         f"{', '.join(k + '(...)' if a else k for k, a in _ARITY.items())}")
    kind = m.group(1)
    raw = m.group(2) if m.group(2) is not None else m.group(3)
    parts = [p for p in re.split(r"[,:]", raw or "") if p]
    try:
        args = tuple(int(p.lstrip("gw")) for p in parts)
    except ValueError:
        raise ValueError(f"mask {text!r}: arguments must be integers") from None
    if kind == "longformer" and len(args) == 1:
        args = args + (1,)
    if len(args) != _ARITY[kind]:
        raise ValueError(f"mask {kind} takes {_ARITY[kind]} integer argument(s), got {text!r}")
    return MaskSpec(kind, args)


# ---------------------------------------------------------------------- models
def flops(num_edges: int, heads: int, dim: int, mode: str) -> float:
    """Useful FLOPs: ``4 E H D`` forward (QK^T and PV, 2 each); backward 2.5x that."""
    f = 4.0 * num_edges * heads * dim
    return f if mode == "fwd" else 3.5 * f


def min_bytes(n: int, num_edges: int, heads: int, dim: int, itemsize: int, mode: str) -> float:
    """Minimum memory traffic of a fused kernel (the GB/s floor).

    Forward: read Q, K, V and write O once (``4 N H D`` elements), write the float32 lse
    (``4 N H`` bytes), read the structure once (8 bytes per edge: an int32 column and a
    share of int32/int64 row offsets, rounded up). Backward adds: read Q, K, V, O, dO, lse,
    write dQ, dK, dV (``8 N H D`` elements + ``4 N H``), and the structure twice more (a CSR
    pass for dQ and a CSC pass for dK, dV: 16 bytes per edge).
    """
    tok = n * heads * dim * itemsize
    fwd = 4 * tok + 4 * n * heads + 8 * num_edges
    if mode == "fwd":
        return float(fwd)
    return float(fwd + 8 * tok + 4 * n * heads + 16 * num_edges)


def density(n: int, num_edges: int) -> float:
    return num_edges / float(n * n) if n else 0.0


def log2_ceil(x: int) -> int:
    return int(math.ceil(math.log2(max(1, x))))
