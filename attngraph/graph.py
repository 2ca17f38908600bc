"""`TokenGraph`: a sparse attention mask as a directed graph over tokens.

Edge ``j -> i`` means *query i attends to key j*. ``edge_index[0]`` holds sources (keys),
``edge_index[1]`` holds targets (queries), PyG's ``flow="source_to_target"``. Edges are kept
in the canonical order: sorted by ``(dst, src)`` with no duplicates, so per-edge tensors
(``edge_bias``, attention weights) line up with ``graph.edge_index`` and rows of the CSR
over targets (``graph.ptr``) are contiguous slices.

Sort state and the CSR / CSC caches live in a :class:`torch_geometric.EdgeIndex` sorted by
target (``sort_order="col"``), with ``sparse_size = (num_src, num_dst)``.
"""
from __future__ import annotations

import weakref
from typing import Callable, Iterable, Optional, Tuple

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary
from torch_geometric import EdgeIndex

from attngraph import chunks
from attngraph.checks import MAX_NODES, check_count, check_edge_index, check_perm
from attngraph.chunks import row_chunks

__all__ = ["TokenGraph", "GraphCaches", "MAX_NODES", "graph_of", "batch"]

# graph.src -> the graph: torch.library operators receive a graph as its tensors
_BY_SRC = WeakIdKeyDictionary()
# _address(src) -> the graph whose src is there (see graph_of)
_BY_ADDRESS: dict = {}


class GraphCaches:
    """Data derived from a graph's edges for one module's work, built on first use and kept
    with the graph (a graph's edges never change, so neither does any of this).

    One namespace per owning module; only that module reads or writes it, keyed by its own
    arguments. :meth:`clear` empties them all; :meth:`TokenGraph.to`, :meth:`TokenGraph.int32`
    and :meth:`TokenGraph.int64` start a new graph with empty caches, and setting
    :attr:`TokenGraph.order` drops the tile plans (they are made in that order).

    Attributes:
        plan: :mod:`attngraph.ops.plan`: tile plans and best block sizes, by arguments.
        chunks: :mod:`attngraph.ops.chunked`: the torch backend's row chunks, by size.
        cuda: :mod:`attngraph.ops.cuda`: the kernels' index arrays (``"cuda_arrays"``, of
            ``stages.py``) and launch plan (``"cuda_plan"``, of ``fused.py``).
        distributed: :mod:`attngraph.distributed`: the graph's fingerprint, halo plans.
        ranges: :mod:`attngraph.ops.ranges`: planned pieces (within a byte budget);
            :mod:`attngraph.ops.prefixes`: the padded layout of a rule's row groups.
    """

    __slots__ = ("plan", "chunks", "cuda", "distributed", "ranges")

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        for name in self.__slots__:
            setattr(self, name, {})

    def __repr__(self) -> str:
        held = ", ".join(f"{n}: {len(getattr(self, n))}" for n in self.__slots__)
        return f"GraphCaches({held})"


class TokenGraph:
    r"""A sparse attention mask as a graph: ``num_src`` key nodes, ``num_dst`` query nodes.

    Args:
        edge_index: ``[2, E]`` integer tensor (or PyG ``EdgeIndex``), row 0 = keys ``j``,
            row 1 = queries ``i``, any order, duplicates allowed (they are dropped).
        num_nodes: number of tokens for self-attention (``num_src = num_dst = num_nodes``).
            Inferred as ``max index + 1`` when nothing is given.
        num_src, num_dst: key / query counts for cross-attention (bipartite graphs).

    Example::

        >>> g = TokenGraph(torch.tensor([[0, 0, 1], [0, 1, 1]]), num_nodes=2)
        >>> g.to_dense()            # mask[i, j]: query i attends to key j
        tensor([[ True, False],
                [ True,  True]])
    """

    # _meta: (num_src, num_dst, num_edges, device) as plain Python values and _arrays:
    # (ptr, src, dst) as plain tensors, the same objects on every access, so code that
    # torch.compile traces reads them without calling into the EdgeIndex, and an operator
    # that receives them finds the graph again (graph_of). rule, _order and _permuted are
    # facts about the mask (kept wherever they stay true); caches holds what modules derive.
    __slots__ = ("_ei", "_meta", "_arrays", "rule", "_order", "_permuted", "caches",
                 "__weakref__")

    def __init__(self, edge_index, num_nodes: Optional[int] = None, *,
                 num_src: Optional[int] = None, num_dst: Optional[int] = None):
        ei = check_edge_index(edge_index)
        num_nodes = check_count("num_nodes", num_nodes, allow_none=True)
        num_src = check_count("num_src", num_src, allow_none=True)
        num_dst = check_count("num_dst", num_dst, allow_none=True)
        if num_nodes is not None:
            for name, val in (("num_src", num_src), ("num_dst", num_dst)):
                if val is not None and val != num_nodes:
                    raise ValueError(f"{name}={val} contradicts num_nodes={num_nodes}; give "
                                     f"num_nodes for self-attention or num_src/num_dst")
            num_src = num_dst = num_nodes
        if ei.numel() and int(ei.min()) < 0:
            raise ValueError(f"edge_index holds a negative index ({int(ei.min())}); node ids "
                             f"must be in [0, num_nodes)")
        max_src = int(ei[0].max()) + 1 if ei.numel() else 0
        max_dst = int(ei[1].max()) + 1 if ei.numel() else 0
        if num_src is None and num_dst is None:
            num_src = num_dst = check_count("num_nodes (inferred from edge_index)",
                                             max(max_src, max_dst))
        elif num_src is None or num_dst is None:
            raise ValueError("give both num_src and num_dst (or num_nodes), got only one")
        if max_src > num_src:
            raise ValueError(f"edge_index[0] (keys) holds index {max_src - 1}, out of range "
                             f"for num_src={num_src}")
        if max_dst > num_dst:
            raise ValueError(f"edge_index[1] (queries) holds index {max_dst - 1}, out of range "
                             f"for num_dst={num_dst}")
        # One sort on a combined key puts edges in (dst, src) order and drops duplicates.
        key = torch.unique(ei[1] * max(num_src, 1) + ei[0], sorted=True)
        src, dst = key % max(num_src, 1), torch.div(key, max(num_src, 1), rounding_mode="floor")
        self._init(self._make_edge_index(src, dst, num_src, num_dst))

    # ------------------------------------------------------------------ construction
    @staticmethod
    def _make_edge_index(src: Tensor, dst: Tensor, num_src: int, num_dst: int) -> EdgeIndex:
        return EdgeIndex(torch.stack([src.long(), dst.long()]), sparse_size=(num_src, num_dst),
                         sort_order="col")

    @classmethod
    def _from_edge_index(cls, edge_index: Tensor, num_src: int, num_dst: int) -> "TokenGraph":
        """Wrap a canonical int64 ``[2, E]`` tensor as is: no checks, no copy.

        Mask generators write their edges in canonical (dst, src) order straight into one
        buffer, which saves an O(E log E) sort and a copy at 10^8 edges.
        """
        g = cls.__new__(cls)
        g._init(EdgeIndex(edge_index, sparse_size=(num_src, num_dst), sort_order="col"))
        return g

    @classmethod
    def _from_arrays(cls, src: Tensor, dst: Tensor, num_src: int, num_dst: int) -> "TokenGraph":
        """Wrap canonical int64 ``src``, ``dst`` (no checks) with plain tensors only: code
        that torch.compile traces builds graphs this way (the EdgeIndex is made on demand,
        and such a graph is found again by ``graph_of`` only through its tensors)."""
        g = cls.__new__(cls)
        g._ei = None
        g._reset()
        g._meta = (num_src, num_dst, src.size(0), src.device)
        ptr = torch.searchsorted(dst, torch.arange(num_dst + 1, device=dst.device))
        g._arrays = (ptr, src, dst)
        return g

    def _reset(self) -> None:
        """No rule, no order, empty caches: the state of a new graph."""
        self.rule = None
        self._order = None
        self._permuted = None
        self.caches = GraphCaches()

    def _init(self, ei: EdgeIndex) -> None:
        self._ei = ei
        self._reset()
        self._meta = (int(ei.sparse_size(0)), int(ei.sparse_size(1)), ei.size(1), ei.device)
        plain = ei.as_tensor()
        ptr = ei.get_indptr()
        if ptr.dtype != torch.long:       # int32 indices, int64 row offsets
            ptr = ptr.long()
        ptr, src, dst = self._arrays = (ptr, plain[0], plain[1])
        _BY_SRC[src] = (weakref.ref(self), id(ptr), id(dst))
        key = _address(src)
        _BY_ADDRESS[key] = weakref.ref(
            self, lambda r, key=key: _BY_ADDRESS.pop(key) if _BY_ADDRESS.get(key) is r else None)

    @classmethod
    def _from_canonical(cls, src: Tensor, dst: Tensor, num_src: int,
                        num_dst: Optional[int] = None) -> "TokenGraph":
        """Wrap edges already in canonical (dst, src) order without duplicates (no checks)."""
        num_dst = num_src if num_dst is None else num_dst
        return cls._from_edge_index(torch.stack([src.long(), dst.long()]), num_src, num_dst)

    @classmethod
    def _from_keys(cls, key: Tensor, num_src: int, num_dst: int) -> "TokenGraph":
        """From sorted unique keys ``dst * num_src + src``."""
        ns = max(num_src, 1)
        return cls._from_canonical(key % ns, torch.div(key, ns, rounding_mode="floor"),
                                   num_src, num_dst)

    @classmethod
    def from_dense(cls, mask: Tensor) -> "TokenGraph":
        """Graph of a boolean ``[num_dst, num_src]`` mask (``mask[i, j]``: query i sees key j)."""
        if not isinstance(mask, Tensor):
            raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
        if mask.dim() != 2:
            raise ValueError(f"mask must have shape [num_dst, num_src], got {list(mask.shape)}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor (True = attend), got {mask.dtype}; "
                            f"use mask.bool() or mask != 0")
        dst, src = mask.nonzero(as_tuple=True)  # row-major: already canonical
        return cls._from_canonical(src, dst, mask.size(1), mask.size(0))

    @classmethod
    def from_mask_mod(cls, fn: Callable[[Tensor, Tensor], Tensor], num_dst: int,
                      num_src: Optional[int] = None, *, device=None) -> "TokenGraph":
        """Graph of a FlexAttention-style predicate ``fn(q_idx, kv_idx) -> bool``.

        ``fn`` gets broadcastable index tensors ``q_idx: [R, 1]`` and ``kv_idx: [1, num_src]``
        for a chunk of R query rows at a time, so peak memory is about
        :data:`attngraph.chunks.MASK_MOD_CHUNK_ELEMENTS` booleans whatever ``num_dst *
        num_src`` is.
        """
        if not callable(fn):
            raise TypeError(f"fn must be callable as fn(q_idx, kv_idx), got {type(fn).__name__}")
        num_dst = check_count("num_dst", num_dst)
        num_src = num_dst if num_src is None else check_count("num_src", num_src)
        kv = torch.arange(num_src, device=device).view(1, -1)
        rows = max(1, chunks.MASK_MOD_CHUNK_ELEMENTS // max(num_src, 1))
        srcs, dsts = [], []
        for r0 in range(0, num_dst, rows):
            q = torch.arange(r0, min(r0 + rows, num_dst), device=device).view(-1, 1)
            m = fn(q, kv)
            if not isinstance(m, Tensor) or m.dtype != torch.bool:
                raise TypeError(f"fn must return a bool tensor, got "
                                f"{getattr(m, 'dtype', type(m).__name__)}")
            d, s = m.expand(q.size(0), num_src).nonzero(as_tuple=True)
            srcs.append(s)
            dsts.append(d + r0)
        empty = torch.empty(0, dtype=torch.long, device=device)
        src = torch.cat(srcs) if srcs else empty
        dst = torch.cat(dsts) if dsts else empty
        return cls._from_canonical(src, dst, num_src, num_dst)

    @classmethod
    def from_ranges(cls, q_ranges, k_ranges, kinds, *, num_nodes: int,
                    implicit: bool = False) -> "TokenGraph":
        """Union of rectangles ``q_ranges[r] x k_ranges[r]``, each ``"full"`` or ``"causal"``
        (aligned at the bottom-right: key offset ``<= query offset + (k_len - q_len)``)
        over ``num_nodes`` tokens; ``implicit`` keeps the rectangles as the rule
        (:func:`attngraph.masks.from_ranges`, which documents the arguments)."""
        from attngraph.masks.rectangles import from_ranges

        return from_ranges(q_ranges, k_ranges, kinds, num_nodes=num_nodes, implicit=implicit)

    @classmethod
    def from_networkx(cls, G) -> "TokenGraph":
        """Inverse of :meth:`to_networkx` (integer node ids, or ``("key", j)`` / ``("query", i)``)."""
        nodes = list(G.nodes)
        if nodes and isinstance(nodes[0], tuple):
            num_src = G.graph.get("num_src", sum(1 for n in nodes if n[0] == "key"))
            num_dst = G.graph.get("num_dst", sum(1 for n in nodes if n[0] == "query"))
            pairs = [(u[1], v[1]) for u, v in G.edges]
        else:
            num_src = num_dst = G.number_of_nodes()
            pairs = list(G.edges)
        ei = torch.tensor(pairs, dtype=torch.long).t().reshape(2, -1)
        return cls(ei, num_src=num_src, num_dst=num_dst)

    # ------------------------------------------------------------------ properties
    @property
    def edge_index(self) -> EdgeIndex:
        """``[2, E]`` EdgeIndex in canonical (dst, src) order; row 0 keys, row 1 queries."""
        if self._ei is None:    # a graph built while torch.compile traced (_from_arrays)
            self._ei = EdgeIndex(torch.stack([self.src, self.dst]),
                                 sparse_size=(self.num_src, self.num_dst), sort_order="col")
        return self._ei

    @property
    def src(self) -> Tensor:
        """Key index of every edge, ``[E]`` (canonical order): int64, or int32 for a graph
        from :meth:`int32`."""
        return self._arrays[1]

    @property
    def dst(self) -> Tensor:
        """Query index of every edge, ``[E]`` (canonical order, non-decreasing), in
        :attr:`index_dtype`."""
        return self._arrays[2]

    @property
    def index_dtype(self) -> torch.dtype:
        """dtype of ``src`` / ``dst``: ``torch.int64``, or ``torch.int32`` (:meth:`int32`);
        ``ptr`` is int64 either way."""
        return self._arrays[1].dtype

    def int32(self) -> "TokenGraph":
        """The same graph with int32 node ids (``ptr`` stays int64): 8 bytes per edge
        instead of 16. Every operator takes it. Needs ``E < 2^31`` (PyG's EdgeIndex keeps
        its own CSR offsets in the index dtype)."""
        return self._with_index_dtype(torch.int32)

    def int64(self) -> "TokenGraph":
        """The same graph with int64 node ids."""
        return self._with_index_dtype(torch.int64)

    def _with_index_dtype(self, dtype: torch.dtype) -> "TokenGraph":
        if self.index_dtype == dtype:
            return self
        if dtype == torch.int32 and self.num_edges >= 2 ** 31:
            raise ValueError(f"int32 node ids need fewer than 2^31 edges, the graph has "
                             f"{self.num_edges:,}")
        g = self._from_edge_index(self.edge_index.as_tensor().to(dtype), self.num_src,
                                  self.num_dst)
        g._keep_facts(self)
        return g

    def _keep_facts(self, other: "TokenGraph") -> None:
        """Take ``other``'s rule, order and renumbered graph (same edges, same device)."""
        self.rule = other.rule
        self._order = other._order
        self._permuted = other._permuted

    def clear_caches(self) -> None:
        """Drop every derived cache (:class:`GraphCaches`); they are rebuilt on use."""
        self.caches.clear()

    @property
    def num_src(self) -> int:
        return self._meta[0]

    @property
    def num_dst(self) -> int:
        return self._meta[1]

    @property
    def num_edges(self) -> int:
        return self._meta[2]

    @property
    def device(self) -> torch.device:
        return self._meta[3]

    @property
    def is_bipartite(self) -> bool:
        return self.num_src != self.num_dst

    @property
    def ptr(self) -> Tensor:
        """int64 ``[num_dst + 1]`` CSR offsets over queries: row i is ``ptr[i]:ptr[i+1]``."""
        return self._arrays[0]

    def csc(self) -> Tuple[Tensor, Tensor, Tensor]:
        """Edges grouped by key: ``(key_ptr [num_src + 1], dst [E], perm [E])``.

        ``perm`` maps this order to the canonical one: the k-th edge of the key-major order
        is canonical edge ``perm[k]``. Cached on the graph (used by backward passes).
        """
        (ptr, dst), perm = self.edge_index.get_csr()
        if perm is None:  # pragma: no cover - only when sorted by row, which we never are
            perm = torch.arange(self.num_edges, device=self.device)
        return ptr, dst, perm

    @property
    def density(self) -> float:
        cells = self.num_src * self.num_dst
        return self.num_edges / cells if cells else 0.0

    @property
    def is_implicit(self) -> bool:
        """Whether the edges are a rule (:class:`attngraph.implicit.ImplicitGraph`) rather
        than stored."""
        return False

    def materialize(self) -> "TokenGraph":
        """The graph with its edges stored: itself (an implicit graph builds them)."""
        return self

    def rows(self, r0: int, r1: int) -> Tuple[Tensor, Tensor]:
        """Edges of query rows ``[r0, r1)``: ``(ptr [r1 - r0 + 1], src [E_c])``, row
        ``r0 + i`` holding keys ``src[ptr[i]:ptr[i+1]]``."""
        ptr = self.ptr[r0:r1 + 1]
        return ptr - ptr[0], self.src[int(ptr[0]):int(ptr[-1])]

    def edge_chunks(self, max_edges: Optional[int] = None):
        """``(r0, r1, e0, ptr, src)`` for consecutive row chunks of at most ``max_edges``
        edges (default :data:`attngraph.chunks.EDGE_CHUNK`; as
        :meth:`attngraph.implicit.ImplicitGraph.edge_chunks`)."""
        max_edges = chunks.EDGE_CHUNK if max_edges is None else max_edges
        ptr_host = self.ptr.cpu()
        for r0, r1 in row_chunks(ptr_host, max_edges):
            e0 = int(ptr_host[r0])
            yield (r0, r1, e0, self.ptr[r0:r1 + 1] - e0,
                   self.src[e0:int(ptr_host[r1])])

    def in_degree(self) -> Tensor:
        """Keys per query, int64 ``[num_dst]``."""
        return self.ptr.diff()

    def out_degree(self) -> Tensor:
        """Queries per key, int64 ``[num_src]``."""
        return torch.bincount(self.src, minlength=self.num_src)

    def _keys(self) -> Tensor:
        return self.dst.long() * max(self.num_src, 1) + self.src.long()

    # ------------------------------------------------------------------ conversions
    def to(self, device) -> "TokenGraph":
        device = torch.device(device)
        if device == self.device:
            return self
        g = self._from_edge_index(self.edge_index.as_tensor().to(device), self.num_src,
                                  self.num_dst)
        g.rule = None if self.rule is None else self.rule.to(device)
        if self._order is not None:
            g._order = tuple(None if p is None else p.to(device) for p in self._order)
        return g

    def cpu(self) -> "TokenGraph":
        return self.to("cpu")

    def to_dense(self) -> Tensor:
        """bool ``[num_dst, num_src]``: ``mask[i, j]`` is True when query i attends to key j."""
        mask = torch.zeros(self.num_dst, self.num_src, dtype=torch.bool, device=self.device)
        mask[self.dst, self.src] = True
        return mask

    def to_networkx(self):
        """A ``networkx.DiGraph`` with an edge ``j -> i`` per allowed (query i, key j).

        Self-attention graphs use integer node ids; bipartite ones use ``("key", j)`` and
        ``("query", i)``.
        """
        import networkx as nx

        G = nx.DiGraph(num_src=self.num_src, num_dst=self.num_dst)
        src, dst = self.src.tolist(), self.dst.tolist()
        if self.is_bipartite:
            G.add_nodes_from((("key", j) for j in range(self.num_src)), bipartite=0)
            G.add_nodes_from((("query", i) for i in range(self.num_dst)), bipartite=1)
            G.add_edges_from((("key", j), ("query", i)) for j, i in zip(src, dst))
        else:
            G.add_nodes_from(range(self.num_src))
            G.add_edges_from(zip(src, dst))
        return G

    # ------------------------------------------------------------------ algebra
    def _check_same_nodes(self, other, op: str) -> None:
        if not isinstance(other, TokenGraph):
            raise TypeError(f"cannot apply {op} to TokenGraph and {type(other).__name__}")
        if (self.num_src, self.num_dst) != (other.num_src, other.num_dst):
            raise ValueError(f"{op} needs graphs over the same nodes, got (num_src, num_dst) = "
                             f"{(self.num_src, self.num_dst)} and "
                             f"{(other.num_src, other.num_dst)}")
        if self.device != other.device:
            raise ValueError(f"{op} needs graphs on one device, got {self.device} and "
                             f"{other.device}")

    def __or__(self, other: "TokenGraph") -> "TokenGraph":
        """Union: an edge of either graph."""
        self._check_same_nodes(other, "|")
        key = torch.unique(torch.cat([self._keys(), other._keys()]), sorted=True)
        return self._from_keys(key, self.num_src, self.num_dst)

    def __and__(self, other: "TokenGraph") -> "TokenGraph":
        """Intersection: an edge of both graphs."""
        self._check_same_nodes(other, "&")
        key = self._keys()
        return self._from_keys(key[torch.isin(key, other._keys())], self.num_src, self.num_dst)

    def __sub__(self, other: "TokenGraph") -> "TokenGraph":
        """Difference: an edge of this graph that ``other`` lacks."""
        self._check_same_nodes(other, "-")
        key = self._keys()
        return self._from_keys(key[~torch.isin(key, other._keys())], self.num_src, self.num_dst)

    def transpose(self) -> "TokenGraph":
        """Swap keys and queries: edge ``j -> i`` becomes ``i -> j``."""
        order = torch.sort(self.src, stable=True).indices  # (src, dst) order: canonical after swap
        return self._from_canonical(self.dst[order], self.src[order], self.num_dst, self.num_src)

    def permute(self, perm, src_perm=None, *, return_edge_perm: bool = False):
        """The same mask over renumbered tokens: new query ``n`` is old query ``perm[n]``
        (new key ``n`` is old key ``src_perm[n]``; ``src_perm`` defaults to ``perm`` for
        self-attention and must be given for a bipartite graph).

        Attention on the permuted graph with ``q[perm]``, ``k[src_perm]``, ``v[src_perm]``
        gives ``out[perm]``. With ``return_edge_perm`` also returns int64 ``[E]``: new
        canonical edge ``e`` is old canonical edge ``edge_perm[e]`` (reorder an
        ``edge_bias`` with ``edge_bias[edge_perm]``).
        """
        perm = check_perm("perm", perm, self.num_dst, self.device)
        if src_perm is None:
            if self.is_bipartite:
                raise ValueError(f"a bipartite graph ({self.num_src} keys, {self.num_dst} "
                                 f"queries) needs src_perm for its keys")
            src_perm = perm
        else:
            src_perm = check_perm("src_perm", src_perm, self.num_src, self.device)
        inv_dst = torch.empty_like(perm)
        inv_dst[perm] = torch.arange(perm.numel(), device=perm.device)
        inv_src = inv_dst if src_perm is perm else torch.empty_like(src_perm)
        if src_perm is not perm:
            inv_src[src_perm] = torch.arange(src_perm.numel(), device=perm.device)
        src, dst = inv_src[self.src], inv_dst[self.dst]
        edge_perm = torch.sort(dst * max(self.num_src, 1) + src).indices
        g = self._from_canonical(src[edge_perm], dst[edge_perm], self.num_src, self.num_dst)
        return (g, edge_perm) if return_edge_perm else g

    @property
    def order(self):
        """The token order dense tiles compute in: ``None`` (the graph's own), a query
        permutation (self-attention: keys follow it), or ``(query_perm, key_perm)``.

        ``graph.order = perm`` asks the tiled path to run on :meth:`permute` ``(perm)``,
        where the mask is closer to block diagonal, and to map the results back: the mask
        and every result stay the same. ``hash_buckets`` sets it to (bucket, position);
        :func:`attngraph.reorder` computes one for any graph. Kept by :meth:`to`,
        :meth:`int32` and :meth:`int64`.
        """
        order = self._order
        if order is None:
            return None
        return order[0] if order[1] is None else order

    @order.setter
    def order(self, perm) -> None:
        self.set_order(perm)

    def set_order(self, perm, *, permuted: Optional[Callable[[], "TokenGraph"]] = None
                  ) -> None:
        """Set :attr:`order`; ``permuted``, when given, builds the graph renumbered in that
        order (what :meth:`permuted` returns) faster than :meth:`permute` would (a mask
        generator that knows its sorted form writes it without a sort)."""
        if perm is None:
            self._order = None
        else:
            q_perm, k_perm = perm if isinstance(perm, tuple) else (perm, None)
            q_perm = check_perm("order", q_perm, self.num_dst, self.device)
            if k_perm is not None:
                k_perm = check_perm("order (keys)", k_perm, self.num_src, self.device)
            elif self.is_bipartite:
                raise ValueError("a bipartite graph needs an order for queries and one for "
                                 "keys: graph.order = (query_perm, key_perm)")
            self._order = (q_perm, k_perm)
        self._permuted = permuted if perm is not None else None
        self.caches.plan.clear()        # plans are made in the order

    def permuted(self) -> "TokenGraph":
        """The graph renumbered in its own :attr:`order` (``permute(order)``), built once and
        kept; the graph itself when it has no order."""
        if self._order is None:
            return self
        if self._permuted is None or callable(self._permuted):
            q_perm, k_perm = self._order
            self._permuted = (self._permuted() if callable(self._permuted)
                              else self.permute(q_perm, k_perm))
        return self._permuted

    def tile_plan(self, block_size: Optional[int] = None, *, block_k: Optional[int] = None,
                  min_density: Optional[float] = None, order="auto", src_order=None):
        """Which ``block_size x block_k`` tiles run as dense math and which edges run per
        edge (:func:`attngraph.ops.plan.tile_plan`, which documents the arguments; a
        :class:`attngraph.ops.plan.TilePlan`), cached with the graph."""
        from attngraph.ops.plan import tile_plan

        return tile_plan(self, block_size, block_k=block_k, min_density=min_density,
                         order=order, src_order=src_order)

    def to_block_mask(self, block_size: int = 128):
        """FlexAttention ``BlockMask`` of exactly this mask
        (:func:`attngraph.flex.to_block_mask`).

        Full ``block_size x block_size`` tiles become full blocks, other non-empty tiles
        partial blocks with an exact ``mask_mod``; ``seq_lengths = (num_dst, num_src)``,
        batch and head dims 1 (broadcast). Pass it as ``flex_attention(q, k, v,
        block_mask=...)`` with ``q [B, H, num_dst, D]``, ``k/v [B, H_kv, num_src, D]``.
        """
        from attngraph.flex import to_block_mask

        return to_block_mask(self, block_size)

    @classmethod
    def from_block_mask(cls, block_mask, *, batch: int = 0, head: int = 0) -> "TokenGraph":
        """Graph of the mask a FlexAttention ``BlockMask`` stands for, for one ``batch`` and
        ``head`` (:func:`attngraph.flex.from_block_mask`): full blocks give all their cells,
        partial blocks the cells where ``mask_mod`` is True, evaluated in chunks of blocks
        (never the dense ``[Q_LEN, KV_LEN]`` mask); ``num_dst, num_src = seq_lengths``.
        """
        from attngraph.flex import from_block_mask

        return from_block_mask(block_mask, batch=batch, head=head)

    def equal(self, other: "TokenGraph") -> bool:
        """Same node counts and the same edges."""
        if getattr(other, "is_implicit", False):
            return other.equal(self)
        if not (isinstance(other, TokenGraph)
                and (self.num_src, self.num_dst) == (other.num_src, other.num_dst)
                and self.num_edges == other.num_edges):
            return False
        dtype = self.index_dtype

        def same(a, b):
            return torch.equal(a, b.to(device=self.device, dtype=dtype))

        return same(self.src, other.src) and same(self.dst, other.dst)

    # ------------------------------------------------------------------ display
    def __repr__(self) -> str:
        nodes = (f"num_nodes={self.num_src}" if not self.is_bipartite
                 else f"num_src={self.num_src}, num_dst={self.num_dst}")
        dev = "" if self.device.type == "cpu" else f", device={self.device}"
        return f"TokenGraph({nodes}, num_edges={self.num_edges}, density={self.density:.3g}{dev})"

    def plot(self, *args, **kwargs):
        """Draw the mask (:func:`attngraph.viz.plot_mask`, same arguments) and return the
        matplotlib ``Figure`` it is on, so that a script can save it:
        ``g.plot().savefig("mask.png")``. The mask's Axes is ``fig.axes[0]``.

        Without ``ax=`` the figure is a new pyplot figure: a notebook shows it when the cell
        ends, a script shows it only on ``matplotlib.pyplot.show()``."""
        from attngraph.viz import figure_of, plot_mask

        return figure_of(plot_mask(self, *args, **kwargs))

    def _repr_png_(self) -> Optional[bytes]:
        """Notebook picture of the mask (None without matplotlib)."""
        try:
            from attngraph.viz import mask_png
        except ImportError:
            return None
        return mask_png(self)


def _address(t: Tensor):
    """Where a tensor's elements are: a live graph's index tensors are never freed, so
    another tensor there with the same layout holds its edges."""
    return (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())


def graph_of(ptr: Tensor, src: Tensor, dst: Tensor, num_src: int, num_dst: int) -> TokenGraph:
    """The graph whose ``(ptr, src, dst)`` these are, with its caches.

    A ``torch.library`` operator receives a graph as these tensors (the graph itself cannot
    cross the op boundary): eager calls and compiled graphs pass the very tensor objects of
    ``graph.ptr`` / ``src`` / ``dst``, so the graph is found again and its CSC and kernel
    plans are not rebuilt. Other tensors (say, a copy) get a graph wrapped around them.
    """
    entry = _BY_SRC.get(src)
    if entry is not None:
        graph, ptr_id, dst_id = entry[0](), entry[1], entry[2]
        if graph is not None and ptr_id == id(ptr) and dst_id == id(dst):
            return graph
    # other tensor objects over the graph's own memory (torch.compile hands a backward
    # operator aliases of the tensors it saved): the same edges, so the same graph
    ref = _BY_ADDRESS.get(_address(src))
    graph = None if ref is None else ref()
    if graph is not None and graph._arrays is not None and all(
            _address(a) == _address(b) for a, b in zip(graph._arrays, (ptr, src, dst))):
        return graph
    graph = TokenGraph._from_edge_index(torch.stack([src, dst]), num_src, num_dst)
    if entry is None or entry[0]() is None:
        # the wrapper holds copies, not src: a strong reference, released with src
        _BY_SRC[src] = ((lambda: graph), id(ptr), id(dst))
    return graph


def batch(graphs: Iterable[TokenGraph]) -> TokenGraph:
    """Block-diagonal union: graph k's node ids are offset by the nodes of graphs 0..k-1.

    Example: ``batch([causal(2), full(1)]).to_dense()`` is
    ``[[1, 0, 0], [1, 1, 0], [0, 0, 1]]``.
    """
    graphs = list(graphs)
    if not graphs:
        raise ValueError("batch needs at least one TokenGraph, got none")
    for g in graphs:
        if not isinstance(g, TokenGraph):
            raise TypeError(f"batch takes TokenGraphs, got {type(g).__name__}")
    device = graphs[0].device
    if any(g.device != device for g in graphs):
        raise ValueError("batch needs every graph on one device")
    src_off = dst_off = 0
    srcs, dsts = [], []
    for g in graphs:
        srcs.append(g.src.long() + src_off)
        dsts.append(g.dst.long() + dst_off)
        src_off += g.num_src
        dst_off += g.num_dst
    # Each block is canonical and blocks ascend in dst, so the concatenation is canonical.
    return TokenGraph._from_canonical(torch.cat(srcs), torch.cat(dsts), src_off, dst_off)
