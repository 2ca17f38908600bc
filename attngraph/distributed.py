"""Context parallel graph attention over ``torch.distributed``: one graph, many processes.

The tokens of a self-attention graph are split into contiguous ranges, one per rank; each
rank holds its range's rows of q, k and v. Ring attention would move every key past every
rank. Here a rank receives only the keys its queries' edges point at: its *halo*. This is
the halo exchange of graph-partitioned GNN training, done with ``all_to_all_single``
(variable split sizes), over gloo on CPU or NCCL on GPUs.

Per graph, ranges and group, a plan is made once and cached on the graph. In it, each rank
finds the remote keys its rows read and swaps these index lists with its peers. It then
builds a local graph whose sources are [own tokens, halo tokens]. Per call, one K/V
exchange (K and V in one message) feeds the local backend, whatever ``backend="auto"``
picks. The backward sends the halo's dK/dV back to their owners, which add them to their
own in a fixed order. So two runs with the same world size give bitwise-equal results, and
results match one process up to float summation order.

Every call first checks, collectively, that the ranks agree: shard sizes against
``ranges``, the graph's fingerprint, the ranges themselves. A rank with bad input makes
every rank raise the same ``ValueError`` instead of leaving the others waiting in a
collective.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor

from attngraph.graph import TokenGraph
from attngraph.ops import functional

__all__ = ["shard_ranges", "graph_attention", "halo_plan", "HaloPlan", "ring_bytes"]

Ranges = List[Tuple[int, int]]


def shard_ranges(graph_or_n: Union[TokenGraph, int], world_size: int, *,
                 balance: str = "edges") -> Ranges:
    """Contiguous token ranges ``[(start, end), ...]``, one per rank, covering all tokens.

    ``balance="edges"`` (for a graph) cuts so that each range has about the same number of
    edges plus tokens: a global token's row weighs what it costs. ``"tokens"`` (and any
    plain token count) cuts into equal numbers of tokens. Ranges may be empty when there
    are more ranks than tokens.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if balance not in ("edges", "tokens"):
        raise ValueError(f"balance must be 'edges' or 'tokens', got {balance!r}")
    if isinstance(graph_or_n, TokenGraph):
        n = graph_or_n.num_dst
        weight = (graph_or_n.in_degree().cpu() + 1 if balance == "edges"
                  else torch.ones(n, dtype=torch.long))
    elif isinstance(graph_or_n, int) and not isinstance(graph_or_n, bool) and graph_or_n >= 0:
        n, weight = graph_or_n, torch.ones(graph_or_n, dtype=torch.long)
    else:
        raise TypeError(f"shard_ranges takes a TokenGraph or a token count, got "
                        f"{graph_or_n!r}")
    cum = torch.cumsum(weight, 0)
    total = int(cum[-1]) if n else 0
    targets = torch.tensor([total * p / world_size for p in range(1, world_size)],
                           dtype=torch.float64)
    cuts = (torch.searchsorted(cum.double(), targets) + 1).clamp(0, n).tolist() if n else \
        [0] * (world_size - 1)
    bounds = [0] + sorted(cuts) + [n]
    return [(bounds[p], bounds[p + 1]) for p in range(world_size)]


@dataclass(frozen=True)
class HaloPlan:
    """What one rank exchanges for one (graph, ranges) pair, and the graph it computes on.

    ``local`` has this rank's queries as targets and ``[own keys, halo keys]`` as sources;
    ``order[i]`` is the edge of this rank's slice of the graph's canonical order that local
    edge ``i`` is. ``send_idx`` lists the own keys each peer needs (grouped by peer, sizes
    ``send_counts``); ``recv_counts[p]`` halo keys come from peer ``p``.
    """

    rank: int
    ranges: Tuple[Tuple[int, int], ...]
    local: TokenGraph
    order: Tensor
    send_idx: Tensor
    send_counts: Tuple[int, ...]
    recv_counts: Tuple[int, ...]
    edge_range: Tuple[int, int]

    @property
    def halo_size(self) -> int:
        return sum(self.recv_counts)

    def bytes_received(self, row_bytes: int) -> int:
        """Bytes of one K/V exchange into this rank for ``row_bytes`` per token."""
        return self.halo_size * row_bytes


def _fingerprint(graph: TokenGraph) -> int:
    """A cheap hash of the graph (sizes and edges), computed once per graph."""
    fp = graph._cache.get("fingerprint")
    if fp is None:
        mix = (graph.src * 2654435761 + graph.dst * 40503 + 17) % 2147483647
        fp = hash((graph.num_src, graph.num_dst, graph.num_edges, int(mix.sum()),
                   int((mix * mix % 2147483629).sum()))) & (2 ** 62 - 1)
        graph._cache["fingerprint"] = fp
    return fp


def _world(group) -> Tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("attngraph.distributed needs an initialised process group: call "
                           "torch.distributed.init_process_group first")
    return dist.get_rank(group), dist.get_world_size(group)


def _check_ranges(ranges, n: int, world: int) -> Tuple[Tuple[int, int], ...]:
    try:
        ranges = tuple((int(a), int(b)) for a, b in ranges)
    except (TypeError, ValueError):
        raise ValueError(f"ranges must be a list of (start, end) pairs, got {ranges!r}") \
            from None
    if len(ranges) != world:
        raise ValueError(f"ranges has {len(ranges)} entries for {world} ranks")
    end = 0
    for p, (a, b) in enumerate(ranges):
        if a != end or b < a:
            raise ValueError(f"ranges must be contiguous and ordered from 0, got {ranges}")
        end = b
    if end != n:
        raise ValueError(f"ranges cover tokens [0, {end}) but the graph has {n}")
    return ranges


def _comm_device(group) -> torch.device:
    """Where the group's collectives take tensors: the current GPU for NCCL, else CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_to_all(x: Tensor, out_counts: Sequence[int], in_counts: Sequence[int],
                group) -> Tensor:
    """``all_to_all_single`` with split sizes, on the group's device, back on x's."""
    dev = _comm_device(group)
    xc = x.contiguous().to(dev)
    out = xc.new_empty((sum(out_counts),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, xc, list(out_counts), list(in_counts), group=group)
    return out.to(x.device)


def halo_plan(graph: TokenGraph, ranges: Sequence[Tuple[int, int]], group=None) -> HaloPlan:
    """This rank's :class:`HaloPlan` (collective: every rank of ``group`` calls it), built
    once per graph, ranges and group and cached on the graph."""
    rank, world = _world(group)
    ranges = _check_ranges(ranges, graph.num_dst, world)
    key = ("halo_plan", ranges, rank, world, id(group))
    cached = graph._cache.get(key)
    if cached is not None:
        return cached
    dev = graph.device
    r0, r1 = ranges[rank]
    n_own = r1 - r0
    e0, e1 = int(graph.ptr[r0]), int(graph.ptr[r1])
    src = graph.src[e0:e1]
    dst = graph.dst[e0:e1] - r0
    starts = torch.tensor([a for a, _ in ranges], device=dev)
    own = (src >= r0) & (src < r1)
    need = torch.unique(src[~own])                                  # sorted: grouped by owner
    owner = torch.searchsorted(starts, need, right=True) - 1
    recv = torch.bincount(owner, minlength=world)
    # how many of my keys each peer needs, then which
    send = _all_to_all(recv, [1] * world, [1] * world, group)
    recv_counts, send_counts = tuple(recv.tolist()), tuple(send.tolist())
    send_idx = _all_to_all(need - starts[owner], send_counts, recv_counts, group)
    # local sources: own keys 0..n_own-1, then halo keys in the order they arrive
    local_src = torch.where(own, src - r0, n_own + torch.searchsorted(need, src))
    num_src = n_own + need.numel()
    order = torch.argsort(dst * max(num_src, 1) + local_src)
    local = TokenGraph._from_canonical(local_src[order], dst[order], num_src, n_own)
    plan = HaloPlan(rank, ranges, local, order, send_idx, send_counts, recv_counts, (e0, e1))
    graph._cache[key] = plan
    return plan


class _HaloExchange(torch.autograd.Function):
    """``rows [n_own, C]`` -> the halo rows ``[n_halo, C]`` this rank needs; backward sends
    the halo's gradients back and adds them to their owners' rows, peer by peer (unique
    indices within a peer: deterministic on every device)."""

    @staticmethod
    def forward(ctx, rows: Tensor, plan: HaloPlan, group) -> Tensor:
        ctx.plan, ctx.group, ctx.n = plan, group, rows.size(0)
        send = rows.index_select(0, plan.send_idx)
        return _all_to_all(send, plan.recv_counts, plan.send_counts, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        plan = ctx.plan
        back = _all_to_all(grad, plan.send_counts, plan.recv_counts, ctx.group)
        out = grad.new_zeros((ctx.n,) + tuple(grad.shape[1:]))
        offset = 0
        for count in plan.send_counts:
            idx = plan.send_idx[offset:offset + count]
            out.index_add_(0, idx, back[offset:offset + count])
            offset += count
        return out, None, None


def _agree(group, world: int, error: Optional[str], facts: Tuple[int, ...]) -> None:
    """Every rank learns whether any rank failed its checks or disagrees on ``facts``;
    all then raise together (one small all_gather, two when something is wrong)."""
    t = torch.tensor([1 if error else 0, *facts], dtype=torch.int64,
                     device=_comm_device(group))
    gathered = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(gathered, t, group=group)
    rows = [g.cpu() for g in gathered]
    bad = any(int(r[0]) for r in rows) or any(not torch.equal(r[1:], rows[0][1:])
                                             for r in rows)
    if not bad:
        return
    messages: List[Optional[str]] = [None] * world
    dist.all_gather_object(messages, error, group=group)
    lines = [f"rank {p}: {m}" for p, m in enumerate(messages) if m]
    if not lines:
        lines = ["the ranks hold different graphs or ranges, or disagree on whether k and "
                 "v need gradients; every rank must pass the same graph and ranges, with "
                 "the same requires_grad"]
    raise ValueError("attngraph.distributed.graph_attention: " + "; ".join(lines))


def graph_attention(q: Tensor, k: Tensor, v: Tensor, graph: TokenGraph, *, group=None,
                    ranges: Optional[Sequence[Tuple[int, int]]] = None,
                    scale: Optional[float] = None, edge_bias: Optional[Tensor] = None,
                    return_lse: bool = False, backend: str = "auto"
                    ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """This rank's rows of :func:`attngraph.graph_attention` over a sharded sequence.

    Args:
        q, k, v: this rank's shard: ``[n_r, H, D]`` / ``[n_r, H_kv, D]`` / ``[n_r, H_kv,
            D_v]``, or batched ``[B, n_r, ...]``, with ``n_r = end - start`` of its range.
        graph: the whole self-attention graph (``num_src = num_dst = N``), the same on
            every rank; each rank reads only its rows.
        group: the process group (default: the world).
        ranges: ``[(start, end)]`` per rank, contiguous from 0 to N; default
            :func:`shard_ranges` ``(graph, world_size)``.
        scale, return_lse, backend: as for :func:`attngraph.graph_attention`.
        edge_bias: the bias of this rank's rows' edges, ``[E_r]`` or ``[E_r, H]`` in the
            graph's canonical order (edges ``graph.ptr[start]:graph.ptr[end]``), or the
            whole ``[E]`` / ``[E, H]`` bias, of which the rank's slice is used.

    Returns this rank's ``out`` (and ``lse``), differentiable in q, k, v and edge_bias.
    Collective: every rank of the group must call it with the same graph and ranges.
    """
    rank, world = _world(group)
    error, facts = None, (0, 0, 0)
    try:
        functional._check_graph(graph)
        if graph.num_src != graph.num_dst:
            raise ValueError(f"context parallel attention takes a self-attention graph "
                             f"(num_src = num_dst), got {graph.num_src} keys and "
                             f"{graph.num_dst} queries")
        if ranges is None:
            ranges = shard_ranges(graph, world)
        ranges = _check_ranges(ranges, graph.num_dst, world)
        r0, r1 = ranges[rank]
        for name, t in (("q", q), ("k", k), ("v", v)):
            functional._check_tensor(name, t, (3, 4))
            if t.dim() != q.dim():
                raise ValueError(f"q, k, v must all be node-major or all batched, got "
                                 f"{list(q.shape)}, {list(k.shape)}, {list(v.shape)}")
            if t.dtype != q.dtype or t.device != graph.device:
                raise TypeError(f"q, k, v must share one dtype and the graph's device "
                                f"({graph.device}), got {name} {t.dtype} on {t.device}")
            if t.size(t.dim() - 3) != r1 - r0:
                raise ValueError(f"{name} has {t.size(t.dim() - 3)} tokens but this rank's "
                                 f"range [{r0}, {r1}) has {r1 - r0}")
        # the backward exchanges dK/dV only where k or v needs a gradient: every rank must
        # agree, or one would wait in the reverse exchange for the others
        kv_grad = torch.is_grad_enabled() and (k.requires_grad or v.requires_grad)
        facts = (_fingerprint(graph), hash(ranges) & (2 ** 62 - 1), int(kv_grad))
        if edge_bias is not None:
            if not isinstance(edge_bias, Tensor):
                raise TypeError(f"edge_bias must be a torch.Tensor, got "
                                f"{type(edge_bias).__name__}")
            e0, e1 = int(graph.ptr[r0]), int(graph.ptr[r1])
            if edge_bias.dim() in (1, 2) and edge_bias.size(0) == graph.num_edges:
                edge_bias = edge_bias[e0:e1]
            elif not (edge_bias.dim() in (1, 2) and edge_bias.size(0) == e1 - e0):
                raise ValueError(f"edge_bias must have this rank's {e1 - e0} edges or all "
                                 f"{graph.num_edges} in its first dim, got "
                                 f"{list(edge_bias.shape)}")
    except Exception as e:          # reported by every rank, raised by every rank
        error = f"{type(e).__name__}: {e}"
    _agree(group, world, error, facts)

    plan = halo_plan(graph, ranges, group)
    nd = q.dim() - 3                                          # the token dim
    kv = torch.cat([k, v], -1)                                # one message for K and V
    rows = kv.movedim(nd, 0)
    halo = _HaloExchange.apply(rows.reshape(rows.size(0), -1), plan, group)
    halo = halo.view((halo.size(0),) + tuple(rows.shape[1:])).movedim(0, nd)
    kv_ext = torch.cat([kv, halo], nd)
    k_ext, v_ext = kv_ext.split([k.size(-1), v.size(-1)], -1)
    bias = None if edge_bias is None else edge_bias.index_select(0, plan.order)
    return functional.graph_attention(q, k_ext, v_ext, plan.local, scale=scale,
                                      edge_bias=bias, return_lse=return_lse, backend=backend)


def ring_bytes(n: int, world: int, kv_heads: int, head_dim: int, value_dim: int,
               itemsize: int) -> int:
    """Bytes per rank that ring attention moves for one forward: all other ranks' K and V,
    ``(P - 1) / P * N * H_kv * (D + D_v)`` elements."""
    return math.ceil((world - 1) / world * n) * kv_heads * (head_dim + value_dim) * itemsize
