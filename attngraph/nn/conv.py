"""`GraphAttentionConv`: PyG's `TransformerConv`, computed by attngraph's fused operator.

Same constructor, parameter names, initialisation, forward signature and outputs as
:class:`torch_geometric.nn.TransformerConv`, so a state_dict loads either way and a model
swaps one class for the other. Two paths compute the same function:

* **fused** (default): :meth:`GraphAttentionConv.message_and_aggregate` calls
  :func:`attngraph.graph_attention`, whose memory is bounded by a chunk of edges: no
  ``[E, H, C]`` gathers of queries, keys and values are kept for backward;
* **unfused**: PyG's own formula, :meth:`edge_update` (scores and
  :func:`torch_geometric.utils.softmax`) then :meth:`message` through
  :meth:`~torch_geometric.nn.conv.MessagePassing.propagate`: the readable reference, and
  what explainers, message hooks and attention dropout need.

Shapes (N_src keys, N_dst queries, E edges, H heads, C = ``out_channels``):
``x [N, F]`` or ``(x_src [N_src, F_src], x_dst [N_dst, F_dst])``; ``edge_index [2, E]``;
``edge_attr [E, edge_dim]``; output ``[N_dst, H * C]`` (``concat``) or ``[N_dst, C]``;
attention weights ``[E, H]`` aligned with the edges as given. A node without incoming edges
aggregates 0 (its output is the skip term, plus bias).
"""

import math
from typing import NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch_geometric import EdgeIndex
from torch_geometric.nn.conv import MessagePassing
from torch_geometric.nn.dense.linear import Linear
from torch_geometric.typing import Adj, OptTensor, SparseTensor
from torch_geometric.utils import softmax

from attngraph.graph import TokenGraph
from attngraph.ops import edge_scores, edge_softmax, graph_attention

__all__ = ["GraphAttentionConv"]

_SPARSE_LAYOUTS = (torch.sparse_coo, torch.sparse_csr, torch.sparse_csc)


class _Edges(NamedTuple):
    """Edges of any accepted input, in the order the input lists them."""

    src: Tensor                  # [E] int64 keys j
    dst: Tensor                  # [E] int64 queries i
    num_src: int
    num_dst: int
    values: Optional[Tensor]     # per-edge values of a sparse adjacency, if any
    graph: Optional[TokenGraph]  # set when the input was a TokenGraph (already canonical)


def _rows_of(ptr: Tensor) -> Tensor:
    return torch.repeat_interleave(torch.arange(ptr.numel() - 1, device=ptr.device),
                                   ptr.diff())


def _read_edges(edge_index, num_src: int, num_dst: int) -> _Edges:
    """Normalise a plain/EdgeIndex tensor, TokenGraph, torch sparse adjacency or SparseTensor.

    Sparse adjacencies follow PyG's transposed convention ``adj_t[target, source]``.
    """
    values = graph = None
    if isinstance(edge_index, TokenGraph) and edge_index.is_implicit:
        # a rule, not a list: the fused operator reads it as it is (see forward)
        g = edge_index
        for name, given, expected, x in (("source", g.num_src, num_src, "x_src"),
                                         ("target", g.num_dst, num_dst, "x_dst")):
            if given != expected:
                raise ValueError(f"the graph has {given} {name} nodes but {x} has "
                                 f"{expected} rows")
        return _Edges(None, None, num_src, num_dst, None, g)
    if isinstance(edge_index, TokenGraph):
        graph = edge_index
        sizes = (graph.num_src, graph.num_dst)
        src, dst = graph.src, graph.dst
    elif isinstance(edge_index, SparseTensor):  # torch_sparse, when installed
        dst, src, values = edge_index.coo()
        sizes = (edge_index.size(1), edge_index.size(0))
    elif isinstance(edge_index, Tensor) and edge_index.layout in _SPARSE_LAYOUTS:
        if edge_index.dim() < 2 or edge_index.sparse_dim() != 2:
            raise ValueError(f"a sparse adjacency must be a 2-D sparse matrix adj_t[target, "
                             f"source], got sparse shape {list(edge_index.shape)}")
        if edge_index.layout == torch.sparse_coo:  # as PyG: the stored order, not coalesced
            dst, src = edge_index._indices()
            values = edge_index._values()
        elif edge_index.layout == torch.sparse_csr:
            dst, src = _rows_of(edge_index.crow_indices()), edge_index.col_indices()
            values = edge_index.values()
        else:
            src, dst = _rows_of(edge_index.ccol_indices()), edge_index.row_indices()
            values = edge_index.values()
        sizes = (edge_index.size(1), edge_index.size(0))
    elif isinstance(edge_index, Tensor):
        if edge_index.is_floating_point() or edge_index.is_complex() \
                or edge_index.dtype == torch.bool:
            raise TypeError(f"edge_index must hold integers (int32 or int64), got "
                            f"{edge_index.dtype}")
        if edge_index.dim() != 2 or edge_index.size(0) != 2:
            raise ValueError(f"edge_index must have shape [2, E] (row 0 = sources/keys, row 1 "
                             f"= targets/queries), got {list(edge_index.shape)}")
        sizes = (None, None)
        if isinstance(edge_index, EdgeIndex):
            sizes = (edge_index.sparse_size(0), edge_index.sparse_size(1))
            edge_index = edge_index.as_tensor()
        src, dst = edge_index.long()
    else:
        raise TypeError(f"edge_index must be a [2, E] integer tensor, a torch_geometric "
                        f"EdgeIndex, an attngraph.TokenGraph or a sparse adjacency "
                        f"adj_t[target, source], got {type(edge_index).__name__}")
    for name, given, expected, x in (("source", sizes[0], num_src, "x_src"),
                                     ("target", sizes[1], num_dst, "x_dst")):
        if given is not None and given != expected:
            raise ValueError(f"the graph has {given} {name} nodes but {x} has {expected} "
                             f"rows")
    src, dst = src.long(), dst.long()
    if graph is None:
        if torch.compiler.is_compiling():   # the check is data-dependent: an op makes it
            src, dst = _checked_edges(src, dst, num_src, num_dst)
        else:
            _check_edges(src, dst, num_src, num_dst)
    return _Edges(src, dst, num_src, num_dst, values, graph)


def _check_edges(src: Tensor, dst: Tensor, num_src: int, num_dst: int) -> None:
    if not src.numel():
        return
    for name, idx, n in (("sources (edge_index[0])", src, num_src),
                         ("targets (edge_index[1])", dst, num_dst)):
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= n:
            raise ValueError(f"{name} hold index {lo if lo < 0 else hi}, outside "
                             f"[0, {n}) for {n} nodes")


@torch.library.custom_op("attngraph::checked_edges", mutates_args=())
def _checked_edges(src: Tensor, dst: Tensor, num_src: int, num_dst: int
                   ) -> Tuple[Tensor, Tensor]:
    """``(src, dst)`` once their range is checked (copies: what a compiled graph computes
    next reads them, so the check cannot be pruned)."""
    _check_edges(src, dst, num_src, num_dst)
    return src.clone(), dst.clone()


@_checked_edges.register_fake
def _(src, dst, num_src, num_dst):
    return torch.empty_like(src), torch.empty_like(dst)


class GraphAttentionConv(MessagePassing):
    r"""The graph transformer operator of `TransformerConv
    <https://arxiv.org/abs/2009.03509>`_, computed by :func:`attngraph.graph_attention`.

    .. math::
        \mathbf{x}'_i = \mathbf{W}_1 \mathbf{x}_i + \sum_{j \in \mathcal{N}(i)}
        \alpha_{i,j} (\mathbf{W}_2 \mathbf{x}_j + \mathbf{W}_6 \mathbf{e}_{ij}),\qquad
        \alpha_{i,j} = \operatorname{softmax}_j \left(
        \frac{(\mathbf{W}_3 \mathbf{x}_i)^\top (\mathbf{W}_4 \mathbf{x}_j +
        \mathbf{W}_6 \mathbf{e}_{ij})}{\sqrt{C}} \right)

    A drop-in replacement for :class:`torch_geometric.nn.TransformerConv`: the same
    arguments and defaults, the same submodules (``lin_key``, ``lin_query``, ``lin_value``,
    ``lin_edge``, ``lin_skip``, ``lin_beta``) initialised the same way, the same outputs.

    Args:
        in_channels: size of each input sample, or ``(F_src, F_dst)`` for bipartite graphs
            (``-1`` infers it lazily).
        out_channels: ``C``, channels per head.
        heads: ``H``, number of attention heads.
        concat: concatenate the heads (output ``H * C``) or average them (output ``C``).
        beta: gate the skip connection, ``beta_i * W_1 x_i + (1 - beta_i) m_i``.
        dropout: dropout probability of the attention weights (training only).
        edge_dim: edge feature size; edge features projected by ``lin_edge`` are added to
            the keys and to the values.
        bias: learn additive biases.
        root_weight: add the transformed target features ``W_1 x_i`` (``lin_skip``).
        **kwargs: passed to :class:`~torch_geometric.nn.conv.MessagePassing` (``aggr``,
            default ``"add"``; any other aggregation runs the unfused path).

    Shapes:
        - **input:** ``x [N, F]`` or ``(x_src [N_src, F_src], x_dst [N_dst, F_dst])``;
          ``edge_index``: a ``[2, E]`` integer tensor or PyG ``EdgeIndex`` (row 0 sources
          = keys j, row 1 targets = queries i), an :class:`attngraph.TokenGraph`, or a
          sparse adjacency ``adj_t [N_dst, N_src]`` (torch COO/CSR/CSC or
          ``torch_sparse.SparseTensor``, PyG's transposed convention); ``edge_attr
          [E, edge_dim]`` in the order of ``edge_index``.
        - **output:** ``[N_dst, H * C]`` or ``[N_dst, C]``; with
          ``return_attention_weights`` also ``(edge_index, alpha [E, H])`` as PyG returns
          it: the ``edge_index`` given (``graph.edge_index`` for a TokenGraph, the adjacency
          with ``alpha`` as values for a ``SparseTensor``) and ``alpha`` aligned with its
          edges, before dropout. A node without incoming edges aggregates 0.

    Paths. The fused path (:meth:`message_and_aggregate`) runs when :attr:`fused` is True
    (the default), the module is not being explained (``self.explain``), no attention
    dropout is active (``training`` with ``dropout > 0``), aggregation is ``"add"`` and no
    propagate / message / aggregate / edge-update hooks are registered; otherwise the unfused
    PyG formula (:meth:`edge_update`, :meth:`message`, via ``propagate``) runs. Both give the
    same result. Set ``conv.fused = False`` to force the reference path. Asking for
    attention weights on the fused path adds the differentiable stages
    (:func:`attngraph.ops.edge_scores`, :func:`attngraph.ops.edge_softmax`) on the same
    graph, which materialise ``[E, H]`` weights and an ``[E, H, C]`` gather.

    Edge features make keys and values per-edge (``k_j + e_ji``, ``v_j + e_ji``): the fused
    path gives every edge its own key node and runs the operator on that graph, so it holds
    ``[E, H, C]`` keys and values (PyG holds several such tensors) but still no per-edge
    softmax state; without edge features nothing per-edge is kept for backward.

    Duplicate edges count once per copy in the softmax, exactly as in PyG: the fused path
    merges copies of an edge into one :class:`TokenGraph` edge with a ``log(multiplicity)``
    score bias and splits its weight evenly among the copies in ``alpha``. With edge
    features every input edge is kept as its own edge (copies may carry different
    features). Plain edge lists are sorted into canonical order on every call (O(E log E),
    skipped when already canonical); pass a :class:`TokenGraph` to skip it.
    """

    #: Use :func:`attngraph.graph_attention` when possible (see "Paths"); set to False on an
    #: instance to always run PyG's unfused formula.
    fused: bool = True

    def __init__(self, in_channels: Union[int, Tuple[int, int]], out_channels: int,
                 heads: int = 1, concat: bool = True, beta: bool = False,
                 dropout: float = 0., edge_dim: Optional[int] = None, bias: bool = True,
                 root_weight: bool = True, **kwargs):
        kwargs.setdefault("aggr", "add")
        super().__init__(node_dim=0, **kwargs)
        if self.flow != "source_to_target":
            raise ValueError(f"GraphAttentionConv supports flow='source_to_target' only (edge "
                             f"j -> i: target i attends to source j), got flow={self.flow!r}; "
                             f"flip edge_index instead")
        if self.decomposed_layers != 1:
            raise ValueError(f"GraphAttentionConv does not support decomposed_layers "
                             f"(got {self.decomposed_layers}): the softmax needs whole heads")

        self.in_channels = in_channels
        self.out_channels = out_channels
        self.heads = heads
        self.beta = beta and root_weight
        self.root_weight = root_weight
        self.concat = concat
        self.dropout = dropout
        self.edge_dim = edge_dim

        if isinstance(in_channels, int):
            in_channels = (in_channels, in_channels)

        # Created in TransformerConv's order, so one seed gives both layers equal weights.
        self.lin_key = Linear(in_channels[0], heads * out_channels, bias=bias)
        self.lin_query = Linear(in_channels[1], heads * out_channels, bias=bias)
        self.lin_value = Linear(in_channels[0], heads * out_channels, bias=bias)
        if edge_dim is not None:
            self.lin_edge = Linear(edge_dim, heads * out_channels, bias=False)
        else:
            self.lin_edge = self.register_parameter("lin_edge", None)

        skip = heads * out_channels if concat else out_channels
        self.lin_skip = Linear(in_channels[1], skip, bias=bias)
        if self.beta:
            self.lin_beta = Linear(3 * skip, 1, bias=False)
        else:
            self.lin_beta = self.register_parameter("lin_beta", None)

        self.reset_parameters()

    def reset_parameters(self):
        super().reset_parameters()
        self.lin_key.reset_parameters()
        self.lin_query.reset_parameters()
        self.lin_value.reset_parameters()
        if self.edge_dim:
            self.lin_edge.reset_parameters()
        self.lin_skip.reset_parameters()
        if self.beta:
            self.lin_beta.reset_parameters()

    # ------------------------------------------------------------------ forward
    def forward(self, x: Union[Tensor, Tuple[Tensor, Tensor]], edge_index: Adj,
                edge_attr: OptTensor = None, return_attention_weights: Optional[bool] = None):
        r"""Runs the layer.

        Args:
            x: ``[N, F]`` node features, or ``(x_src [N_src, F_src], x_dst [N_dst, F_dst])``.
            edge_index: ``[2, E]`` tensor / ``EdgeIndex``, :class:`TokenGraph` or sparse
                ``adj_t [N_dst, N_src]``.
            edge_attr: ``[E, edge_dim]`` edge features in the order of ``edge_index`` (for
                a TokenGraph, its canonical order ``graph.edge_index``).
            return_attention_weights: if set to any bool (True *or* False, as in PyG), also
                return ``(edge_index, alpha [E, H])``.

        Returns:
            ``[N_dst, H * C]`` (``concat``) or ``[N_dst, C]``, and optionally
            ``(edge_index, alpha)``.
        """
        H, C = self.heads, self.out_channels
        x_src, x_dst = (x, x) if isinstance(x, Tensor) else self._check_pair(x)
        self._check_features(x_src, self.lin_key, "x_src" if x_src is not x_dst else "x")
        self._check_features(x_dst, self.lin_query, "x_dst" if x_src is not x_dst else "x")

        query = self.lin_query(x_dst).view(-1, H, C)
        key = self.lin_key(x_src).view(-1, H, C)
        value = self.lin_value(x_src).view(-1, H, C)

        edges = _read_edges(edge_index, key.size(0), query.size(0))
        need_alpha = isinstance(return_attention_weights, bool)
        if edges.src is None and (edge_attr is not None or self.lin_edge is not None
                                  or need_alpha or not self._use_fused()):
            # per-edge work (edge features, weights, dropout) needs the edge list
            edges = _read_edges(edges.graph.materialize(), key.size(0), query.size(0))
        if edge_attr is None and edges.values is not None and edges.values.dim() > 1:
            edge_attr = edges.values  # PyG reads multi-dim sparse values as edge features
        if self.lin_edge is not None:
            if edge_attr is None:
                raise ValueError(f"this layer has edge_dim={self.edge_dim}: pass edge_attr "
                                 f"[E, {self.edge_dim}]")
            if (edge_attr.dim() != 2 or edge_attr.size(0) != edges.src.numel()
                    or self.edge_dim > 0 and edge_attr.size(1) != self.edge_dim):
                raise ValueError(f"edge_attr must have shape [E, edge_dim] = "
                                 f"[{edges.src.numel()}, {self.edge_dim}], got "
                                 f"{list(edge_attr.shape)}")
        elif edge_attr is not None and edge_attr.size(0) != edges.src.numel():
            raise ValueError(f"edge_attr has {edge_attr.size(0)} rows for "
                             f"{edges.src.numel()} edges")

        if self._use_fused():
            out, alpha = self._fused(edges, query, key, value, edge_attr, need_alpha)
        else:
            out, alpha = self._unfused(edges, query, key, value, edge_attr)

        if self.concat:
            out = out.view(-1, H * C)
        else:
            out = out.mean(dim=1)

        if self.root_weight:
            x_r = self.lin_skip(x_dst)
            if self.lin_beta is not None:
                beta = self.lin_beta(torch.cat([out, x_r, out - x_r], dim=-1)).sigmoid()
                out = beta * x_r + (1 - beta) * out
            else:
                out = out + x_r

        if not need_alpha:
            return out
        if isinstance(edge_index, TokenGraph):
            return out, (edge_index.edge_index, alpha)
        if isinstance(edge_index, SparseTensor):
            return out, edge_index.set_value(alpha, layout="coo")
        return out, (edge_index, alpha)

    @staticmethod
    def _check_features(x: Tensor, lin, name: str) -> None:
        """``x [N, F]`` against the linear layer that reads it (a lazy ``in_channels=-1``
        layer takes any F on its first call)."""
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a float tensor, got {x.dtype}")
        if x.dim() != 2:
            raise ValueError(f"{name} must have shape [N, F], got {list(x.shape)}")
        weight = lin.weight
        if isinstance(weight, torch.nn.parameter.UninitializedParameter):
            return
        if x.size(-1) != weight.size(1):
            raise ValueError(f"{name} has {x.size(-1)} features but the layer expects "
                             f"{weight.size(1)} (in_channels)")
        if x.dtype != weight.dtype:
            raise TypeError(f"{name} is {x.dtype} but the layer's parameters are "
                            f"{weight.dtype}; cast one to the other")

    @staticmethod
    def _check_pair(x) -> Tuple[Tensor, Tensor]:
        if not (isinstance(x, (tuple, list)) and len(x) == 2
                and all(isinstance(t, Tensor) for t in x)):
            raise TypeError(f"x must be a tensor [N, F] or a pair of tensors (x_src, x_dst), "
                            f"got {type(x).__name__}")
        return x[0], x[1]

    def _use_fused(self) -> bool:
        hooks = (self._propagate_forward_pre_hooks, self._propagate_forward_hooks,
                 self._message_forward_pre_hooks, self._message_forward_hooks,
                 self._aggregate_forward_pre_hooks, self._aggregate_forward_hooks,
                 self._edge_update_forward_pre_hooks, self._edge_update_forward_hooks)
        return (self.fused and not self.explain and self.aggr in ("add", "sum")
                and not (self.training and self.dropout > 0) and not any(hooks))

    # ------------------------------------------------------------------ fused path
    def _fused(self, edges: _Edges, query: Tensor, key: Tensor, value: Tensor,
               edge_attr: OptTensor, need_alpha: bool) -> Tuple[Tensor, OptTensor]:
        """``(out [N_dst, H, C], alpha [E, H] in input edge order or None)``."""
        scale = 1.0 / math.sqrt(self.out_channels)
        if edges.src is None:               # an implicit graph, read as its rule
            return self.message_and_aggregate(edges.graph, query, key, value), None
        E = edges.src.numel()
        bias = user_to_graph = counts = None
        if edge_attr is not None:
            # Per-edge keys/values: every edge gets its own key node ("virtual key"), so the
            # fused operator sees q_i . (k_j + e_ji) and v_j + e_ji exactly. Sorting by
            # target alone makes (dst, virtual id) canonical.
            dst = edges.dst
            if torch.compiler.is_compiling() or E and not bool((dst[1:] >= dst[:-1]).all()):
                order = torch.sort(dst, stable=True).indices
                user_to_graph = torch.empty_like(order)
                user_to_graph[order] = torch.arange(E, device=order.device)
            else:
                order = None
            take = (lambda t: t) if order is None else (lambda t: t.index_select(0, order))
            src = take(edges.src)
            e = take(edge_attr)
            if self.lin_edge is not None:
                e = self.lin_edge(e).view(-1, self.heads, self.out_channels)
                key = key.index_select(0, src) + e
            else:  # PyG adds raw edge_attr to the values only
                key = key.index_select(0, src)
            value = value.index_select(0, src) + e
            virtual = torch.arange(E, device=dst.device)
            graph = (TokenGraph._from_arrays(virtual, take(dst), E, edges.num_dst)
                     if torch.compiler.is_compiling()
                     else TokenGraph._from_canonical(virtual, take(dst), E, edges.num_dst))
        elif edges.graph is not None:
            graph = edges.graph
        else:
            graph, user_to_graph, counts = self._canonical_graph(edges)
            if counts is not None:
                bias = counts.to(query.dtype).log()

        out = self.message_and_aggregate(graph, query, key, value, edge_bias=bias)
        if not need_alpha:
            return out, None
        # Differentiable weights, as PyG returns them: the stages, on the same graph.
        s = edge_scores(query, key, graph, scale)
        alpha = edge_softmax(s if bias is None else s + bias.unsqueeze(-1), graph)
        if counts is not None:
            alpha = alpha / counts.unsqueeze(-1).to(alpha.dtype)
        if user_to_graph is not None:
            alpha = alpha.index_select(0, user_to_graph)
        return out, alpha

    @staticmethod
    def _canonical_graph(edges: _Edges
                         ) -> Tuple[TokenGraph, Optional[Tensor], Optional[Tensor]]:
        """TokenGraph of an edge list -> ``(graph, user_to_graph [E], counts [E_u])``.

        ``user_to_graph[e]`` is the graph edge of input edge ``e`` (None when the input is
        already canonical); ``counts`` are multiplicities (None without duplicates).

        Under torch.compile, where a graph's size must not depend on data, duplicates are
        not merged: every copy stays an edge of its own (an internal multigraph, which the
        operators compute exactly as PyG does), and the edges are sorted unconditionally.
        """
        ns = max(edges.num_src, 1)
        key = edges.dst * ns + edges.src
        if torch.compiler.is_compiling():
            key, order = torch.sort(key, stable=True)
            user_to_graph = torch.empty_like(order)
            user_to_graph[order] = torch.arange(order.numel(), device=order.device)
            graph = TokenGraph._from_arrays(key % ns, torch.div(key, ns, rounding_mode="floor"),
                                            edges.num_src, edges.num_dst)
            return graph, user_to_graph, None
        if key.numel() < 2 or bool((key[1:] > key[:-1]).all()):
            graph = TokenGraph._from_canonical(edges.src, edges.dst, edges.num_src,
                                               edges.num_dst)
            return graph, None, None
        uniq, user_to_graph, counts = torch.unique(key, sorted=True, return_inverse=True,
                                                   return_counts=True)
        graph = TokenGraph._from_keys(uniq, edges.num_src, edges.num_dst)
        return graph, user_to_graph, (counts if uniq.numel() < key.numel() else None)

    def message_and_aggregate(self, graph: TokenGraph, query: Tensor, key: Tensor,
                              value: Tensor, edge_bias: OptTensor = None) -> Tensor:
        """Fused attention: ``out [N_dst, H, C]`` from ``query [N_dst, H, C]``,
        ``key``/``value [N_src, H, C]`` and ``edge_bias [E]`` in the graph's canonical order.

        One call to :func:`attngraph.graph_attention` with PyG's scale ``1 / sqrt(C)``.
        """
        return graph_attention(query, key, value, graph, edge_bias=edge_bias,
                               scale=1.0 / math.sqrt(self.out_channels))

    # ------------------------------------------------------------------ unfused path
    def _unfused(self, edges: _Edges, query: Tensor, key: Tensor, value: Tensor,
                 edge_attr: OptTensor) -> Tuple[Tensor, Tensor]:
        edge_index = torch.stack([edges.src, edges.dst])
        if self.lin_edge is not None:
            edge_attr = self.lin_edge(edge_attr).view(-1, self.heads, self.out_channels)
        # edge_updater_type: (query: Tensor, key: Tensor, edge_attr: Optional[Tensor])
        alpha = self.edge_updater(edge_index, query=query, key=key, edge_attr=edge_attr)
        dropped = F.dropout(alpha, p=self.dropout, training=self.training)
        # propagate_type: (value: Tensor, alpha: Tensor, edge_attr: Optional[Tensor])
        out = self.propagate(edge_index, value=value, alpha=dropped, edge_attr=edge_attr,
                             size=(edges.num_src, edges.num_dst))
        return out, alpha

    def edge_update(self, query_i: Tensor, key_j: Tensor, edge_attr: OptTensor,
                    index: Tensor, ptr: OptTensor, size_i: Optional[int]) -> Tensor:
        """Attention weights ``[E, H]``: PyG's scores and softmax over each target's edges."""
        if self.lin_edge is not None:
            key_j = key_j + edge_attr
        alpha = (query_i * key_j).sum(dim=-1) / math.sqrt(self.out_channels)
        return softmax(alpha, index, ptr, size_i)

    def message(self, value_j: Tensor, alpha: Tensor, edge_attr: OptTensor) -> Tensor:
        """Messages ``[E, H, C]``: ``alpha * (v_j + e_ji)``."""
        out = value_j
        if edge_attr is not None:
            out = out + edge_attr
        return out * alpha.view(-1, self.heads, 1)

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}({self.in_channels}, "
                f"{self.out_channels}, heads={self.heads})")
