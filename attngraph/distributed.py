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
picks. A dense row (a global token's, with more remote edges than ``ship_degree``) would
pull every key, so it ships its query to the keys' owners instead. They return the partial
attention over their own keys, and the parts are merged by log-sum-exp. The backward runs
the same exchanges in reverse, in one fixed order on every rank, and gradients are added in
a fixed order. So two runs with the same world size give bitwise-equal results, and results
match one process up to float summation order.

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
from attngraph.ops.numerics import merge_many

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
    """What one rank exchanges for one (graph, ranges) pair, and the graphs it computes on.

    * **Pulled keys.** ``local`` has this rank's queries as targets and ``[own keys, halo
      keys]`` as sources. ``order[i]`` is the edge of this rank's slice of the canonical
      order that local edge ``i`` is. ``send_idx`` lists the own keys each peer needs
      (grouped by peer, sizes ``send_counts``); ``recv_counts[p]`` halo keys come from
      peer ``p``.
    * **Shipped queries.** A *dense* row (more remote edges than the ship threshold, such as
      a global token's) does not pull its keys. Its query goes to each peer that owns some of
      them, and the peer returns the partial attention ``(out, lse)`` over its own keys. The
      rank merges those parts with its own part by log-sum-exp. ``local`` keeps only a dense
      row's own-key edges. ``ship_idx`` (sizes ``ship_counts``) lists the local rows sent to
      each peer, and ``ship_edge_idx`` (sizes ``ship_edge_counts``) the bias entries of
      their edges. ``guest`` is the graph of the queries this rank receives (``guest_counts``
      from each peer) over its own keys.
    """

    rank: int
    ranges: Tuple[Tuple[int, int], ...]
    local: TokenGraph
    order: Tensor
    send_idx: Tensor
    send_counts: Tuple[int, ...]
    recv_counts: Tuple[int, ...]
    ship_any: bool = False
    dense_rows: Optional[Tensor] = None          # local rows computed partly elsewhere
    ship_idx: Optional[Tensor] = None
    ship_pos: Optional[Tensor] = None            # position in dense_rows of each shipped row
    ship_peer: Optional[Tensor] = None
    ship_counts: Tuple[int, ...] = ()
    guest_counts: Tuple[int, ...] = ()
    ship_edge_idx: Optional[Tensor] = None
    ship_edge_counts: Tuple[int, ...] = ()
    guest_edge_counts: Tuple[int, ...] = ()
    guest: Optional[TokenGraph] = None

    @property
    def halo_size(self) -> int:
        return sum(self.recv_counts)

    def bytes_received(self, row_bytes: int, query_bytes: int = 0,
                       result_bytes: int = 0) -> int:
        """Bytes one forward brings into this rank: halo K/V rows of ``row_bytes`` each,
        the queries shipped here (``query_bytes`` each) and the partial results of this
        rank's shipped queries (``result_bytes`` each)."""
        return (self.halo_size * row_bytes + sum(self.guest_counts) * query_bytes
                + sum(self.ship_counts) * result_bytes)


def _fingerprint(graph: TokenGraph) -> int:
    """A cheap hash of the graph (sizes and edges), computed once per graph."""
    fp = graph.caches.distributed.get("fingerprint")
    if fp is None:
        mix = (graph.src * 2654435761 + graph.dst * 40503 + 17) % 2147483647
        fp = hash((graph.num_src, graph.num_dst, graph.num_edges, int(mix.sum()),
                   int((mix * mix % 2147483629).sum()))) & (2 ** 62 - 1)
        graph.caches.distributed["fingerprint"] = fp
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


def _default_ship_degree(graph: TokenGraph) -> int:
    """Remote edges above which a row ships its query: 8x the mean degree, at least 64
    (the cost of pulling that many keys exceeds sending a query and its result back)."""
    return max(64, 8 * math.ceil(graph.num_edges / max(graph.num_dst, 1)))


def halo_plan(graph: TokenGraph, ranges: Sequence[Tuple[int, int]], group=None, *,
              ship_degree: Optional[int] = None) -> HaloPlan:
    """This rank's :class:`HaloPlan` (collective: every rank of ``group`` calls it), built
    once per graph, ranges, group and ship threshold and cached on the graph.
    ``ship_degree``: rows with more remote edges ship their query (default
    :func:`_default_ship_degree`); ``-1`` ships none."""
    rank, world = _world(group)
    ranges = _check_ranges(ranges, graph.num_dst, world)
    if ship_degree is None:
        ship_degree = _default_ship_degree(graph)
    key = ("halo_plan", ranges, rank, world, id(group), ship_degree)
    cached = graph.caches.distributed.get(key)
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
    remote_per_row = torch.bincount(dst[~own], minlength=n_own)
    dense_row = (remote_per_row > ship_degree) if ship_degree >= 0 else \
        torch.zeros(n_own, dtype=torch.bool, device=dev)
    shipped = ~own & dense_row[dst]                                 # edges computed elsewhere
    pulled = ~own & ~shipped
    need = torch.unique(src[pulled])                                # sorted: grouped by owner
    owner = torch.searchsorted(starts, need, right=True) - 1
    recv = torch.bincount(owner, minlength=world)
    # how many of my keys each peer needs, then which
    send = _all_to_all(recv, [1] * world, [1] * world, group)
    recv_counts, send_counts = tuple(recv.tolist()), tuple(send.tolist())
    send_idx = _all_to_all(need - starts[owner], send_counts, recv_counts, group)
    # local graph: every edge but the shipped ones; sources [own keys, halo keys]
    kept = torch.nonzero(~shipped).flatten()
    k_src, k_dst = src[kept], dst[kept]
    k_own = own[kept]
    local_src = torch.where(k_own, k_src - r0,
                            n_own + torch.searchsorted(need, k_src).clamp_max(
                                max(need.numel() - 1, 0)))
    num_src = n_own + need.numel()
    perm = torch.argsort(k_dst * max(num_src, 1) + local_src)
    local = TokenGraph._from_canonical(local_src[perm], k_dst[perm], num_src, n_own)
    order = kept[perm]
    plan = dict(rank=rank, ranges=ranges, local=local, order=order, send_idx=send_idx,
                send_counts=send_counts, recv_counts=recv_counts)

    flag = torch.tensor([int(bool(shipped.any()))], device=_comm_device(group))
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    if int(flag):
        plan.update(_ship_plan(graph, ranges, rank, world, group, src, dst, shipped,
                               dense_row, starts))
    plan = HaloPlan(**plan)
    graph.caches.distributed[key] = plan
    return plan


def _ship_plan(graph, ranges, rank, world, group, src, dst, shipped, dense_row, starts):
    """The query-shipping half of a plan: which rows go where, and the guest graph."""
    dev = graph.device
    r0 = ranges[rank][0]
    dense_rows = torch.nonzero(dense_row).flatten()
    edges = torch.nonzero(shipped).flatten()                        # canonical order
    peer = torch.searchsorted(starts, src[edges], right=True) - 1
    by_peer = torch.argsort(peer, stable=True)                      # (peer, row, src) order
    ship_edge_idx = edges[by_peer]
    ship_edge_counts = torch.bincount(peer, minlength=world)
    pair = torch.unique(peer * max(dense_row.numel(), 1) + dst[edges])   # (peer, row)
    ship_peer = torch.div(pair, max(dense_row.numel(), 1), rounding_mode="floor")
    ship_idx = pair % max(dense_row.numel(), 1)
    ship_pos = torch.searchsorted(dense_rows, ship_idx)
    ship_counts = torch.bincount(ship_peer, minlength=world)
    guest_counts = _all_to_all(ship_counts, [1] * world, [1] * world, group)
    guest_edge_counts = _all_to_all(ship_edge_counts, [1] * world, [1] * world, group)
    sc, gc = tuple(ship_counts.tolist()), tuple(guest_counts.tolist())
    guest_rows = _all_to_all(ship_idx + r0, gc, sc, group)          # global ids
    # the guest graph: each guest row's edges into this rank's keys, in arrival order
    a, b = ranges[rank]
    g_src, g_dst = [], []
    for g, i in enumerate(guest_rows.tolist()):
        row = graph.src[int(graph.ptr[i]):int(graph.ptr[i + 1])]
        lo, hi = torch.searchsorted(row, torch.tensor([a, b], device=dev)).tolist()
        g_src.append(row[lo:hi] - a)
        g_dst.append(torch.full((hi - lo,), g, dtype=torch.long, device=dev))
    cat = (lambda xs: torch.cat(xs) if xs else torch.empty(0, dtype=torch.long, device=dev))
    guest = TokenGraph._from_canonical(cat(g_src), cat(g_dst), b - a, len(g_src))
    if guest.num_edges != int(guest_edge_counts.sum()):     # both sides list the same edges
        raise RuntimeError("attngraph.distributed: the ranks' graphs disagree")
    return dict(ship_any=True, dense_rows=dense_rows, ship_idx=ship_idx, ship_pos=ship_pos,
                ship_peer=ship_peer, ship_counts=sc, guest_counts=gc,
                ship_edge_idx=ship_edge_idx, ship_edge_counts=tuple(ship_edge_counts.tolist()),
                guest_edge_counts=tuple(guest_edge_counts.tolist()), guest=guest)


def _exchange(x: Tensor, idx: Optional[Tensor], out_counts, in_counts, group) -> Tensor:
    """Send ``x[idx]`` (grouped by peer, sizes ``in_counts``), receive ``out_counts``."""
    send = x if idx is None else x.index_select(0, idx)
    return _all_to_all(send, out_counts, in_counts, group)


def _exchange_back(grad: Tensor, idx: Optional[Tensor], n: int, out_counts, in_counts,
                   group) -> Tensor:
    """The adjoint of :func:`_exchange`: gradients back to the senders, added to the rows
    they came from peer by peer (unique indices within a peer: deterministic)."""
    back = _all_to_all(grad, in_counts, out_counts, group)
    if idx is None:
        return back
    out = back.new_zeros((n,) + tuple(back.shape[1:]))
    offset = 0
    for count in in_counts:
        out.index_add_(0, idx[offset:offset + count], back[offset:offset + count])
        offset += count
    return out


def _rows(t: Tensor, nd: int) -> Tensor:
    """``[.., n, ...]`` with the token dim ``nd`` -> ``[n, features]``."""
    t = t.movedim(nd, 0)
    return t.reshape(t.size(0), math.prod(t.shape[1:]))


def _unrows(rows: Tensor, like_shape, nd: int) -> Tensor:
    """Inverse of :func:`_rows` for a tensor shaped ``like_shape`` but ``rows.size(0)``
    tokens."""
    shape = list(like_shape)
    shape.pop(nd)
    return rows.view([rows.size(0)] + shape).movedim(0, nd)


def _kv_shape(k: Tensor, v: Tensor) -> Tuple[int, ...]:
    """Shape of ``torch.cat([k, v], -1)``, without making it."""
    return tuple(k.shape[:-1]) + (k.size(-1) + v.size(-1),)


class _ContextParallel(torch.autograd.Function):
    """The whole sharded computation: its backward runs every collective in one fixed
    order on every rank (results back, shipped queries and bias back, halo K/V back), and
    the local math through autograd on the graphs the forward kept."""

    @staticmethod
    def forward(ctx, q, k, v, bias, plan: HaloPlan, group, scale, backend, grad):
        nd = q.dim() - 3
        D = k.size(-1)
        with torch.enable_grad() if grad else torch.no_grad():
            qd, kd, vd = (t.detach().requires_grad_(grad) for t in (q, k, v))
            bd = bias.detach().requires_grad_(grad) if bias is not None else None
            kv_rows = _rows(torch.cat([kd, vd], -1), nd)
            halo = _exchange(kv_rows.detach(), plan.send_idx, plan.recv_counts,
                             plan.send_counts, group).requires_grad_(grad)
            halo_t = _unrows(halo, _kv_shape(k, v), nd)
            k_ext = torch.cat([kd, halo_t[..., :D]], nd)
            v_ext = torch.cat([vd, halo_t[..., D:]], nd)
            b_loc = bd.index_select(0, plan.order) if bd is not None else None
            out, lse = functional.graph_attention(qd, k_ext, v_ext, plan.local, scale=scale,
                                                  edge_bias=b_loc, return_lse=True,
                                                  backend=backend)
            saved = dict(qd=qd, kd=kd, vd=vd, bd=bd, halo=halo, out_l=out, lse_l=lse)
            if plan.ship_any:
                out, lse = _ship_forward(ctx, saved, plan, group, scale, backend, grad, nd)
        ctx.plan, ctx.group, ctx.nd, ctx.saved = plan, group, nd, saved
        ctx.final = (out, lse)
        return out.detach(), lse.detach()

    @staticmethod
    def backward(ctx, dout, dlse):
        plan, group, nd, sv = ctx.plan, ctx.group, ctx.nd, ctx.saved
        out, lse = ctx.final
        dout = torch.zeros_like(out) if dout is None else dout
        dlse = torch.zeros_like(lse) if dlse is None else dlse
        leaves = [sv["qd"], sv["kd"], sv["vd"], sv["halo"]] + \
            ([sv["bd"]] if sv["bd"] is not None else []) + \
            ([sv["parts"]] if plan.ship_any else [])
        g = list(torch.autograd.grad((out, lse), leaves, (dout, dlse), allow_unused=True))
        g = [torch.zeros_like(x) if gx is None else gx for x, gx in zip(leaves, g)]
        dq, dk, dv, dhalo = g[:4]
        dbias = g[4] if sv["bd"] is not None else None
        if plan.ship_any:
            # 1. the parts' gradients back to the ranks that computed them
            d_guest = _exchange_back(g[-1], None, 0, plan.ship_counts, plan.guest_counts,
                                     group)
            gl = [sv["gq"], sv["kd"], sv["vd"]] + ([sv["gb"]] if sv["gb"] is not None else [])
            gg = torch.autograd.grad((sv["g_msg"],), gl, (d_guest,), allow_unused=True)
            gg = [torch.zeros_like(x) if gx is None else gx for x, gx in zip(gl, gg)]
            dk, dv = dk + gg[1], dv + gg[2]
            # 2. the shipped queries' (and bias entries') gradients back to their rows
            dq = dq + _unrows(_exchange_back(gg[0], plan.ship_idx, dq.size(nd),
                                             plan.guest_counts, plan.ship_counts, group),
                              dq.shape, nd)
            if sv["bd"] is not None:
                dbias = dbias + _exchange_back(gg[3], plan.ship_edge_idx, dbias.size(0),
                                               plan.guest_edge_counts,
                                               plan.ship_edge_counts, group)
        # 3. the halo's dK/dV back to the keys' owners
        dkv = _unrows(_exchange_back(dhalo, plan.send_idx, dk.size(nd), plan.recv_counts,
                                     plan.send_counts, group), _kv_shape(dk, dv), nd)
        D = dk.size(-1)
        return dq, dk + dkv[..., :D], dv + dkv[..., D:], dbias, None, None, None, None, None


def _ship_forward(ctx, sv, plan: HaloPlan, group, scale, backend, grad, nd):
    """Ship dense rows' queries, attend guests over own keys, merge the returned parts."""
    qd, kd, vd, bd = sv["qd"], sv["kd"], sv["vd"], sv["bd"]
    gq = _exchange(_rows(qd, nd).detach(), plan.ship_idx, plan.guest_counts,
                   plan.ship_counts, group).requires_grad_(grad)
    gq_t = _unrows(gq, qd.shape, nd)
    gb = None
    if bd is not None:
        gb = _exchange(bd.detach(), plan.ship_edge_idx, plan.guest_edge_counts,
                       plan.ship_edge_counts, group).requires_grad_(grad)
    g_out, g_lse = functional.graph_attention(gq_t, kd, vd, plan.guest, scale=scale,
                                              edge_bias=gb, return_lse=True, backend=backend)
    g_msg = torch.cat([_rows(g_out, nd).to(g_lse.dtype), _rows(g_lse, nd)], 1)
    parts = _exchange(g_msg.detach(), None, plan.ship_counts, plan.guest_counts,
                      group).requires_grad_(grad)
    sv.update(gq=gq, gb=gb, g_msg=g_msg, parts=parts)
    # merge: own part (slot `rank`) and each peer's part, by log-sum-exp
    out_l, lse_l = sv["out_l"], sv["lse_l"]
    o_rows, l_rows = _rows(out_l, nd), _rows(lse_l, nd)
    Fo = o_rows.size(1)
    nd_rows = plan.dense_rows.numel()
    world = len(plan.ranges)
    lse_tab = l_rows.new_full((nd_rows, world, l_rows.size(1)), -math.inf)
    out_tab = parts.new_zeros((nd_rows, world, Fo))
    own = torch.full_like(plan.dense_rows, plan.rank)
    lse_tab = lse_tab.index_put((torch.arange(nd_rows, device=own.device), own),
                                l_rows.index_select(0, plan.dense_rows))
    out_tab = out_tab.index_put((torch.arange(nd_rows, device=own.device), own),
                                o_rows.index_select(0, plan.dense_rows).to(parts.dtype))
    lse_tab = lse_tab.index_put((plan.ship_pos, plan.ship_peer), parts[:, Fo:].to(lse_tab.dtype))
    out_tab = out_tab.index_put((plan.ship_pos, plan.ship_peer), parts[:, :Fo])
    heads = l_rows.size(1)
    out_m, lse_m = merge_many(out_tab.view(nd_rows, world, heads, Fo // max(heads, 1)),
                              lse_tab)                               # [rows, world, B*H]
    out_m = out_m.reshape(nd_rows, Fo).to(o_rows.dtype)
    o_rows = o_rows.index_copy(0, plan.dense_rows, out_m)
    l_rows = l_rows.index_copy(0, plan.dense_rows, lse_m)
    return _unrows(o_rows, out_l.shape, nd), _unrows(l_rows, lse_l.shape, nd)


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
                    return_lse: bool = False, backend: str = "auto",
                    ship_degree: Optional[int] = None
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
        ship_degree: a row with more remote edges than this (a global token's) sends its
            query to the keys' owners instead of pulling its keys, and merges their
            partial results by log-sum-exp; default 8x the mean degree (at least 64),
            ``-1``: never.

    Returns this rank's ``out`` (and ``lse``), differentiable in q, k, v and edge_bias.
    Collective: every rank of the group must call it with the same graph and ranges.
    """
    rank, world = _world(group)
    error, facts = None, (0, 0, 0, 0)
    try:
        functional._check_graph(graph)
        if graph.num_src != graph.num_dst:
            raise ValueError(f"context parallel attention takes a self-attention graph "
                             f"(num_src = num_dst), got {graph.num_src} keys and "
                             f"{graph.num_dst} queries")
        if ranges is None:
            ranges = shard_ranges(graph, world)
        ranges = _check_ranges(ranges, graph.num_dst, world)
        if ship_degree is not None and (isinstance(ship_degree, bool)
                                        or not isinstance(ship_degree, int)
                                        or ship_degree < -1):
            raise ValueError(f"ship_degree must be an int >= -1 or None, got {ship_degree!r}")
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
        # the backward exchanges gradients only where an input needs one: every rank must
        # agree, or one would wait in the reverse exchange for the others
        needs_grad = torch.is_grad_enabled() and any(
            isinstance(t, Tensor) and t.requires_grad for t in (q, k, v, edge_bias))
        facts = (_fingerprint(graph), hash((ranges, -2 if ship_degree is None else int(ship_degree)))
                 & (2 ** 62 - 1),
                 int(needs_grad), int(edge_bias is not None))
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

    plan = halo_plan(graph, ranges, group, ship_degree=ship_degree)
    grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, edge_bias))
    out, lse = _ContextParallel.apply(q, k, v, edge_bias, plan, group, scale, backend, grad)
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


def ring_bytes(n: int, world: int, kv_heads: int, head_dim: int, value_dim: int,
               itemsize: int) -> int:
    """Bytes per rank that ring attention moves for one forward: all other ranks' K and V,
    ``(P - 1) / P * N * H_kv * (D + D_v)`` elements."""
    return math.ceil((world - 1) / world * n) * kv_heads * (head_dim + value_dim) * itemsize
