"""Implicit token graphs: a mask kept as its rule, never as an edge list.

A structured mask gives every query row a few *runs* of keys (see
:mod:`attngraph.runs`): a window is one arithmetic run per row, Longformer adds
slices of the sorted global ids. An :class:`ImplicitGraph` stores the function that computes
those runs for any range of rows, plus the few integers and small tensors it needs (global
ids, document lengths). Degrees and edge counts come from the runs in bounded row chunks;
edges exist only one chunk at a time, when something asks for them.

Operators take implicit graphs as they are: ``graph_attention`` computes on contiguous key
ranges read straight from the rule (:mod:`attngraph.ops.ranges`); the torch backend, and
the fused CUDA kernels (``backend="cupy"``), run on each row chunk's edges generated on the
fly; pictures bin from the runs. What needs the whole edge
list (``graph.src``, ``graph.edge_index``, ``transpose``, ``permute``, tile plans, stage
functions, which return per-edge tensors anyway, and ``|``, ``&``, ``-`` with an explicit
graph) materialises it once and caches it; :meth:`ImplicitGraph.materialize` does so
explicitly.

``|``, ``&`` and ``-`` of two implicit graphs give an implicit graph whose rule combines
the two rules' runs row chunk by row chunk (:func:`attngraph.runs.union_runs`,
:func:`~attngraph.runs.meet_runs`, :func:`~attngraph.runs.minus_runs`): a union is one
graph's runs plus the pieces of the other's outside them, found by counting keys below a
bound, never by generating keys, so counting, degrees and attention on it cost about what
its parts cost. A run minus (or met with) an interval, a lattice whose step divides its
own, or a slice of the same sorted table is a slice of the run; a run minus a few keys of
another (global ids, a lattice crossing a window's tail: up to
:data:`attngraph.runs.MAX_CUTS` per row) is cut into pieces there. What no such rule
covers (a window minus a dense lattice inside it, two unrelated tables) is generated for
the rows of each chunk and kept as a table of those rows' keys: still a rule and exact,
but those rows cost per edge. A composition's runs are disjoint but not in key order;
:meth:`ImplicitGraph.rows` and :meth:`ImplicitGraph.materialize` place each key at its
rank, so the edges come out in canonical order, equal to the explicit composition's.
"""
from __future__ import annotations

import weakref
from functools import partial
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch
from torch import Tensor
import itertools

from attngraph import chunks
from attngraph.chunks import row_chunks
from attngraph.graph import TokenGraph
from attngraph.runs import Range, from_runs, meet_runs, minus_runs, union_runs

__all__ = ["ImplicitGraph", "ROW_CHUNK", "implicit_of"]

# The chunk sizes, as attngraph.chunks sets them (read from there at call time).
ROW_CHUNK = chunks.ROW_CHUNK
EDGE_CHUNK = chunks.EDGE_CHUNK

RunsFn = Callable[[Tensor], list]

# the number in a key tensor -> the implicit graph it stands for (see ImplicitGraph.key)
_BY_KEY: "weakref.WeakValueDictionary[int, ImplicitGraph]" = weakref.WeakValueDictionary()
_KEYS = itertools.count(1)


class ImplicitGraph(TokenGraph):
    r"""A :class:`~attngraph.TokenGraph` whose edges are a rule.

    Made by the structured generators with ``implicit=True`` (``full``, ``causal``,
    ``sliding_window``, ``dilated_window``, ``dilated_block``, ``global_tokens``,
    ``longformer``, ``strided``, ``fixed``, ``document``, ``hash_buckets``, ``qk_drop``,
    ``neighborhood``, ``prefix_lm``, ``from_ranges``) and by ``|``, ``&``, ``-`` of two implicit graphs. Same edges, same canonical order,
    same answers as the explicit graph; memory holds the rule only.

    Args:
        runs: ``runs(rows) -> [Range | Take, ...]``: the key runs of query rows ``rows``
            (an int64 tensor of consecutive row ids), each run's per-row tensors aligned
            with ``rows``; inside a row the runs' keys are strictly increasing across their
            concatenation (as :func:`attngraph.runs.from_runs` requires), or, with
            ``ordered=False``, the runs of a row are disjoint, in any order.
        num_src, num_dst: key and query counts.
        name: the rule in words, for ``repr``.
        state: the rule's tensors by name (moved by :meth:`to`; ``runs`` reads them from
            the mapping it is given as ``state``).
        ordered: whether the runs of a row come in key order (the generators' do; a
            composition's do not, and its edges are placed by rank).
    """

    __slots__ = ("_runs", "_state", "_name", "_explicit", "_num_edges", "_index_dtype",
                 "_ordered", "_key")

    def __init__(self, runs: Callable, num_src: int, num_dst: int, *, name: str = "rule",
                 state: Optional[Dict[str, Tensor]] = None, device=None,
                 ordered: bool = True):
        self._runs = runs
        self._ordered = bool(ordered)
        self._state = dict(state or {})
        self._name = name
        self._explicit = None
        self._num_edges = None
        self._index_dtype = torch.int64
        self._ei = None
        self._arrays = None
        self._reset()
        device = torch.device("cpu") if device is None else torch.device(device)
        self._meta = (int(num_src), int(num_dst), None, device)
        self._key = torch.tensor(next(_KEYS))
        # The key holds its graph: autograd saves the key for the backward, so a graph the
        # caller has dropped (``graph_attention(q, k, v, make_graph())``) lives until the
        # backward has run, eager or compiled.
        self._key._attngraph_graph = self
        _BY_KEY[int(self._key)] = self

    # ------------------------------------------------------------------ the rule
    @property
    def is_implicit(self) -> bool:
        return True

    @property
    def key(self) -> Tensor:
        """A one-number CPU tensor that stands for this graph where only tensors can go: a
        ``torch.library`` operator receives it (torch.compile passes it as a graph input,
        so another graph runs the same compiled code) and finds the graph again with
        :func:`implicit_of`."""
        return self._key

    def runs(self, r0: int, r1: int) -> list:
        """The key runs of query rows ``[r0, r1)`` (:class:`~attngraph.runs.Range`
        / ``Take``), computed from the rule."""
        rows = torch.arange(r0, r1, dtype=torch.long, device=self.device)
        return self._runs(rows, self._state)

    def degrees(self, r0: int = 0, r1: Optional[int] = None) -> Tensor:
        """Keys per query of rows ``[r0, r1)``, int64."""
        r1 = self.num_dst if r1 is None else r1
        parts = []
        for a in range(r0, r1, chunks.ROW_CHUNK):
            b = min(a + chunks.ROW_CHUNK, r1)
            deg = torch.zeros(b - a, dtype=torch.long, device=self.device)
            for run in self.runs(a, b):
                deg += run.count
            parts.append(deg)
        if not parts:
            return torch.zeros(0, dtype=torch.long, device=self.device)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def rows(self, r0: int, r1: int) -> Tuple[Tensor, Tensor]:
        """Edges of query rows ``[r0, r1)``: ``(ptr [r1 - r0 + 1], src [E_c])`` int64, row
        ``r0 + i`` holding keys ``src[ptr[i]:ptr[i+1]]`` in canonical order."""
        local = from_runs(self.num_src, r1 - r0, self.runs(r0, r1), device=self.device,
                          ordered=self._ordered)
        return local.ptr, local.src

    def edge_chunks(self, max_edges: Optional[int] = None
                    ) -> Iterator[Tuple[int, int, int, Tensor, Tensor]]:
        """``(r0, r1, e0, ptr, src)`` for consecutive row chunks of about ``max_edges``
        edges: rows ``[r0, r1)`` hold canonical edges ``e0 ...`` (``rows(r0, r1)``)."""
        max_edges = chunks.EDGE_CHUNK if max_edges is None else max_edges
        e0 = 0
        for a in range(0, self.num_dst, chunks.ROW_CHUNK):
            b = min(a + chunks.ROW_CHUNK, self.num_dst)
            deg = self.degrees(a, b)
            ptr = torch.zeros(deg.numel() + 1, dtype=torch.long)
            torch.cumsum(deg.cpu(), 0, out=ptr[1:])
            for r, s in row_chunks(ptr, max_edges):
                p, src = self.rows(a + r, a + s)
                yield a + r, a + s, e0, p, src
                e0 += src.numel()

    # ------------------------------------------------------------------ counts
    @property
    def num_edges(self) -> int:
        if self._num_edges is None:
            total = 0
            for a in range(0, self.num_dst, chunks.ROW_CHUNK):
                total += int(self.degrees(a, min(a + chunks.ROW_CHUNK, self.num_dst)).sum())
            self._num_edges = total
        return self._num_edges

    def in_degree(self) -> Tensor:
        return self.degrees()

    def out_degree(self) -> Tensor:
        out = torch.zeros(self.num_src, dtype=torch.long, device=self.device)
        for *_, src in self.edge_chunks():
            out += torch.bincount(src, minlength=self.num_src)
        return out

    # ------------------------------------------------------------------ edges on demand
    def materialize(self, index_dtype: Optional[torch.dtype] = None) -> TokenGraph:
        """The explicit :class:`TokenGraph` with the same edges (built once, cached), with
        node ids of ``index_dtype`` (default :attr:`index_dtype`: int64, or int32 for a
        graph from :meth:`int32`); int32 ones are written straight from the rule (8 bytes
        per edge)."""
        index_dtype = self._index_dtype if index_dtype is None else index_dtype
        if index_dtype not in (torch.int32, torch.int64):
            raise TypeError(f"index_dtype must be torch.int32 or torch.int64, got "
                            f"{index_dtype!r}")
        if self._explicit is None or self._explicit.index_dtype != index_dtype:
            self._explicit = None       # one list at a time
            self._explicit = from_runs(self.num_src, self.num_dst,
                                       self.runs(0, self.num_dst), device=self.device,
                                       dtype=index_dtype, ordered=self._ordered)
        return self._explicit

    @property
    def edge_index(self):
        """Materialises the edge list (see :meth:`materialize`)."""
        return self.materialize().edge_index

    @property
    def src(self) -> Tensor:
        """Materialises the edge list (see :meth:`materialize`)."""
        return self.materialize().src

    @property
    def dst(self) -> Tensor:
        """Materialises the edge list (see :meth:`materialize`)."""
        return self.materialize().dst

    @property
    def ptr(self) -> Tensor:
        """Materialises the edge list (see :meth:`materialize`)."""
        return self.materialize().ptr

    def csc(self):
        return self.materialize().csc()

    @property
    def index_dtype(self) -> torch.dtype:
        """dtype of the node ids of the edges the rule generates when they are stored
        (:meth:`materialize`, ``src``, ``dst``): int64, or int32 after :meth:`int32`."""
        return self._index_dtype

    def _with_index_dtype(self, dtype: torch.dtype) -> "ImplicitGraph":
        if self._index_dtype == dtype:
            return self
        g = ImplicitGraph(self._runs, self.num_src, self.num_dst, name=self._name,
                          state=self._state, device=self.device, ordered=self._ordered)
        g._index_dtype = dtype
        g._num_edges = self._num_edges
        g._keep_facts(self)
        return g

    # ------------------------------------------------------------------ conversions
    def to(self, device) -> "ImplicitGraph":
        device = torch.device(device)
        if device == self.device:
            return self
        state = {k: _to(v, device) for k, v in self._state.items()}
        g = ImplicitGraph(self._runs, self.num_src, self.num_dst, name=self._name,
                          state=state, device=device, ordered=self._ordered)
        g._index_dtype = self._index_dtype
        g._num_edges = self._num_edges
        if self._order is not None:
            g._order = tuple(None if p is None else p.to(device) for p in self._order)
        return g

    def to_dense(self) -> Tensor:
        mask = torch.zeros(self.num_dst, self.num_src, dtype=torch.bool, device=self.device)
        for r0, r1, _, ptr, src in self.edge_chunks():
            row = torch.repeat_interleave(torch.arange(r0, r1, device=self.device), ptr.diff())
            mask[row, src] = True
        return mask

    def equal(self, other: TokenGraph) -> bool:
        """Same node counts and edges, compared chunk by chunk (never both lists whole)."""
        if not isinstance(other, TokenGraph) or (self.num_src, self.num_dst) != (
                other.num_src, other.num_dst):
            return False
        if self.num_edges != other.num_edges:
            return False
        implicit = getattr(other, "is_implicit", False)
        for r0, r1, e0, ptr, src in self.edge_chunks():
            if implicit:
                p2, s2 = other.rows(r0, r1)
            else:
                p2 = other.ptr[r0:r1 + 1] - other.ptr[r0]
                s2 = other.src[int(other.ptr[r0]):int(other.ptr[r1])]
            if not (torch.equal(ptr, p2.to(ptr.device)) and torch.equal(src, s2.to(src.device))):
                return False
        return True

    # ------------------------------------------------------------------ algebra
    def __or__(self, other: TokenGraph) -> TokenGraph:
        """Union. With ``other`` implicit too it stays a rule: each row's runs are this
        graph's runs plus the parts of ``other``'s runs outside them (or the other way
        round), found by counting, never by generating keys (:func:`attngraph.runs.union_runs`);
        with an explicit ``other`` it materialises."""
        return self._compose(other, "|")

    def __and__(self, other: TokenGraph) -> TokenGraph:
        """Intersection. With ``other`` implicit too it stays a rule (runs met run by run,
        :func:`attngraph.runs.meet_runs`); with an explicit ``other`` it materialises."""
        return self._compose(other, "&")

    def __sub__(self, other: TokenGraph) -> TokenGraph:
        """Difference. With ``other`` implicit too it stays a rule (each run cut by
        ``other``'s runs, :func:`attngraph.runs.minus_runs`); with an explicit ``other`` it
        materialises."""
        return self._compose(other, "-")

    def _compose(self, other: TokenGraph, op: str) -> TokenGraph:
        self._check_same_nodes(other, op)
        if not getattr(other, "is_implicit", False):
            explicit = self.materialize()
            return {"|": explicit.__or__, "&": explicit.__and__, "-": explicit.__sub__}[op](
                other)
        other = other.to(self.device)
        names = [_operand_name(g, op) for g in (self, other)]
        return ImplicitGraph(partial(_composed_runs, op=op), self.num_src, self.num_dst,
                             name=f" {op} ".join(names), state={"graphs": [self, other]},
                             device=self.device, ordered=False)

    def transpose(self):
        """Materialises, then transposes."""
        return self.materialize().transpose()

    def permute(self, *args, **kwargs):
        """Materialises, then renumbers (see :meth:`TokenGraph.permute`)."""
        return self.materialize().permute(*args, **kwargs)

    # ------------------------------------------------------------------ display
    def __repr__(self) -> str:
        nodes = (f"num_nodes={self.num_src}" if not self.is_bipartite
                 else f"num_src={self.num_src}, num_dst={self.num_dst}")
        dev = "" if self.device.type == "cpu" else f", device={self.device}"
        return (f"TokenGraph({nodes}, num_edges={self.num_edges}, density={self.density:.3g}, "
                f"implicit: {self._name}{dev})")


def implicit_of(key: Tensor) -> ImplicitGraph:
    """The implicit graph whose :attr:`ImplicitGraph.key` ``key`` is."""
    graph = _BY_KEY.get(int(key)) if key.numel() == 1 else None
    if graph is None:
        raise LookupError("no live implicit graph has this key: an operator received a key "
                          "that is not an ImplicitGraph.key")
    return graph


def _to(value, device):
    """A rule's state entry on ``device``: a tensor, or a list of implicit graphs (a union)."""
    if isinstance(value, (list, tuple)):
        return type(value)(_to(v, device) for v in value)
    return value.to(device)


def _operand_name(g: ImplicitGraph, op: str) -> str:
    """``g``'s name in a composition: bracketed when it is a composition by another
    operator (``a | b | c`` reads as it is built, ``(a | b) & c`` keeps its brackets)."""
    inner = g._runs.keywords.get("op") if isinstance(g._runs, partial) and \
        g._runs.func is _composed_runs else None
    return f"({g._name})" if inner is not None and inner != op else g._name


_COMBINE = {"|": union_runs, "&": meet_runs, "-": minus_runs}


def _composed_runs(rows: Tensor, state, *, op: str) -> list:
    """The runs of a composition: its two graphs' runs of these rows, combined by the
    run algebra of :mod:`attngraph.runs` (disjoint, not in key order)."""
    a, b = state["graphs"]
    out = _COMBINE[op](a._runs(rows, a._state), b._runs(rows, b._state))
    return out or [Range(torch.zeros_like(rows), torch.zeros_like(rows))]
