"""The implementations compared, each behind one small interface.

Every peer gets the same mask (one :class:`attngraph.TokenGraph`) and the same q, k, v
values, in its own native layout: node-major ``[N, H, D]`` for attngraph and the PyG way,
``[1, H, N, D]`` for SDPA and FlexAttention (the copy into that layout happens before timing).

=================  =========================================================================
``attngraph``      ``attngraph.graph_attention(..., backend="torch")`` (chunked, fused autograd)
``attngraph-cupy`` ``attngraph.graph_attention(..., backend="cupy")`` (the CUDA kernels)
``attngraph-       ``attngraph.graph_attention(..., backend="tiles")``: dense tiles where
tiles``            ``graph.tile_plan()`` finds them, the other edges per edge (the plan is
                   built in setup and its time reported)
``attngraph-       the ``attngraph`` peer under ``torch.compile(..., fullgraph=True)``
compiled``         (compiled in the warm-up)
``pyg``            what ``torch_geometric.nn.TransformerConv`` computes per head: gather
                   ``q[dst]``, ``k[src]``, ``v[src]`` as ``[E, H, D]``, score, ``utils.softmax``
                   by target, ``utils.scatter`` (sum) of ``alpha * v_j`` — plain autograd
``sdpa``           dense ``scaled_dot_product_attention`` with the bool ``[N, N]`` mask,
                   torch's own kernel choice; ``sdpa-efficient`` / ``sdpa-math`` pin one
                   backend with ``sdpa_kernel``; ``sdpa-flash`` only runs pure causal masks
                   (``is_causal=True``; flash takes no mask)
``flex``           ``torch.compile(flex_attention)`` with a ``BlockMask`` from
                   ``create_block_mask`` (block size 128) and a mask_mod that computes the
                   same mask (see :meth:`benchmarks.specs.MaskSpec.mask_mod`); for a spec
                   whose tokens run in the graph's order (``neighborhood_hilbert``) the
                   mask_mod reads positions through that order and each call permutes
                   q, k, v in and the output back, as attngraph's tiles do
=================  =========================================================================

``estimate(ctx, mode)`` is each peer's memory model (bytes above the inputs, setup
included), used to skip runs that would exceed the budget; the README lists them.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor

from benchmarks.specs import MaskSpec, human_bytes

__all__ = ["Context", "Peer", "Unavailable", "PEERS", "make_peer", "default_peers"]


class Unavailable(Exception):
    """The peer cannot run this input; the message says why (reported as ``n/a``)."""


@dataclass
class Context:
    spec: MaskSpec
    graph: object            # attngraph.TokenGraph on `device`
    n: int
    heads: int
    dim: int
    dtype: torch.dtype
    device: torch.device
    budget: int              # bytes the whole measurement may use

    @property
    def num_edges(self) -> int:
        return self.graph.num_edges

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def token_bytes(self) -> int:
        """Bytes of one [N, H, D] tensor in the input dtype."""
        return self.n * self.heads * self.dim * self.itemsize


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Peer:
    name = ""
    layout = "nhd"           # "nhd": [N, H, D]; "bhnd": [1, H, N, D]

    def refuse(self, ctx: Context, mode: str) -> Optional[str]:
        """Why this peer can't run ``mode`` on ``ctx`` (``None``: it can try)."""
        return None

    def estimate(self, ctx: Context, mode: str) -> int:
        """Bytes this peer needs above the inputs (setup plus one call)."""
        raise NotImplementedError

    def setup(self, ctx: Context) -> Dict[str, object]:
        """Build per-mask state (dense mask, block mask, ...); returns facts to report."""
        self.ctx = ctx
        return {}

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        raise NotImplementedError

    # layout conversions (outside the timed region)
    def to_native(self, x: Tensor) -> Tensor:
        return x.contiguous() if self.layout == "nhd" else x.transpose(0, 1).unsqueeze(0).contiguous()

    def to_node_major(self, x: Tensor) -> Tensor:
        return x if self.layout == "nhd" else x[0].transpose(0, 1)


# ---------------------------------------------------------------------- attngraph
class AttnGraphPeer(Peer):
    def __init__(self, backend: str):
        self.backend = backend
        self.name = "attngraph" if backend == "torch" else f"attngraph-{backend}"

    def refuse(self, ctx, mode):
        from attngraph.ops.dispatch import Inputs, backends

        if self.backend == "flex":     # the dispatcher's reasons that need no graph
            from attngraph.capabilities import flex_attention_missing
            from attngraph.ops.flex_tiles import EAGER_SCORE_ELEMENTS

            if (why := flex_attention_missing()) is not None:
                return why
            if ctx.device.type != "cuda" and mode == "fwdbwd":
                return "FlexAttention has no backward on CPU"
            if ctx.device.type != "cuda" and ctx.heads * ctx.n * ctx.n > EAGER_SCORE_ELEMENTS:
                return "eager FlexAttention on CPU: the [H, N, N] scores exceed its limit"
            return None
        inputs = Inputs(device=ctx.device, dtype=ctx.dtype, head_dim=ctx.dim,
                        value_dim=ctx.dim, requires_grad=mode == "fwdbwd")
        for b in backends():
            if b.name == self.backend:
                return b.refuse(inputs)
        return f"attngraph has no backend {self.backend!r}"

    def estimate(self, ctx, mode):
        if self.backend == "flex":
            tok32 = ctx.n * ctx.heads * ctx.dim * 4
            # eager (CPU): the [H, N, N] scores, their mask and probabilities in float32;
            # compiled (CUDA): out, lse and the residual's; the BlockMask, plan and masks
            dense = 3 * ctx.heads * ctx.n * ctx.n * 4 if ctx.device.type != "cuda" else 0
            fwd = dense + 5 * tok32 + 17 * ctx.num_edges
            return fwd if mode == "fwd" else 2 * fwd + 6 * tok32
        if self.backend == "tiles":
            from attngraph.chunks import MAX_TILE_ELEMENTS

            tok32 = ctx.n * ctx.heads * ctx.dim * 4
            # blocked q, k, v and out; ~4 score-sized temporaries per run chunk; the plan's
            # in-tile masks (at most a byte per edge) and index arrays
            fwd = 5 * tok32 + 16 * MAX_TILE_ELEMENTS + 17 * ctx.num_edges
            return fwd if mode == "fwd" else 2 * fwd + 6 * tok32
        if self.backend != "torch":
            return 2 * ctx.token_bytes + 4 * ctx.n * ctx.heads
        from attngraph.chunks import MAX_CHUNK_ELEMENTS

        tok32 = ctx.n * ctx.heads * ctx.dim * 4
        convert = 0 if ctx.itemsize == 4 else 3 * tok32 + ctx.token_bytes
        chunk = min(MAX_CHUNK_ELEMENTS, ctx.num_edges * ctx.heads * ctx.dim) * 4
        # out + lse, the chunks' row indices (8 bytes per edge), ~3 chunk-sized temporaries
        fwd = convert + tok32 + 4 * ctx.n * ctx.heads + 8 * ctx.num_edges + 3 * chunk
        if mode == "fwd":
            return fwd
        return fwd + 5 * tok32 + 3 * ctx.token_bytes + 8 * ctx.num_edges + 3 * chunk

    def setup(self, ctx):
        info = super().setup(ctx)
        if self.backend == "tiles":
            t = time.perf_counter()
            plan = ctx.graph.tile_plan()
            info["tile_plan_s"] = round(time.perf_counter() - t, 4)
            info["tile_plan"] = plan.summary()
        if self.backend == "flex":   # the engine's plan and BlockMask, built once per graph
            from attngraph.ops import flex_tiles

            t = time.perf_counter()
            plan = flex_tiles.engine_plan(ctx.graph, heads=ctx.heads, kv_heads=ctx.heads,
                                          head_dim=ctx.dim, value_dim=ctx.dim,
                                          dtype=ctx.dtype)
            flex_tiles.block_mask(plan)
            info["tile_plan_s"] = round(time.perf_counter() - t, 4)
            info["tile_plan"] = plan.summary()
        return info

    def forward(self, q, k, v):
        import attngraph

        return attngraph.graph_attention(q, k, v, self.ctx.graph, backend=self.backend)


class CompiledAttnGraphPeer(AttnGraphPeer):
    """``torch.compile(graph_attention, fullgraph=True)`` (compiled during the warm-up): the
    same kernels as the eager peer, one opaque op in the compiled graph."""

    def __init__(self, backend: str):
        super().__init__(backend)
        self.name += "-compiled"
        self._fn = None

    def forward(self, q, k, v):
        import attngraph

        if self._fn is None:
            graph, backend = self.ctx.graph, self.backend
            self._fn = torch.compile(
                lambda q, k, v: attngraph.graph_attention(q, k, v, graph, backend=backend),
                fullgraph=True)
        return self._fn(q, k, v)


# ---------------------------------------------------------------------- PyG way
class PyGPeer(Peer):
    """TransformerConv's message passing, head-wise, with plain autograd."""

    name = "pyg"

    def estimate(self, ctx, mode):
        ehd = ctx.num_edges * ctx.heads * ctx.dim * ctx.itemsize
        eh = ctx.num_edges * ctx.heads * max(ctx.itemsize, 4)
        # fwd: q_i, k_j, v_j gathers and one [E, H, D] product alive at a time (4 x ehd,
        # measured 4.1x); fwd+bwd keeps the 3 gathers for autograd plus ~3 [E, H, D]
        # gradients (measured 6.1x). Plus a few [E, H] score/softmax tensors.
        return (4 * ehd + 6 * eh) if mode == "fwd" else (6 * ehd + 10 * eh)

    def setup(self, ctx):
        super().setup(ctx)
        self.src, self.dst = ctx.graph.src, ctx.graph.dst
        return {}

    def forward(self, q, k, v):
        from torch_geometric.utils import scatter, softmax

        n = q.size(0)
        q_i = q.index_select(0, self.dst)                          # [E, H, D]
        k_j = k.index_select(0, self.src)
        v_j = v.index_select(0, self.src)
        alpha = (q_i * k_j).sum(dim=-1) / math.sqrt(q.size(-1))    # [E, H]
        alpha = softmax(alpha, self.dst, num_nodes=n)
        return scatter(v_j * alpha.unsqueeze(-1), self.dst, dim=0, dim_size=n, reduce="sum")


# ---------------------------------------------------------------------- dense SDPA
class SDPAPeer(Peer):
    layout = "bhnd"

    def __init__(self, kernel: Optional[str]):
        self.kernel = kernel
        self.name = "sdpa" if kernel is None else f"sdpa-{kernel}"

    def refuse(self, ctx, mode):
        if self.kernel == "flash" and ctx.spec.kind != "causal":
            return "the flash backend takes no mask (only is_causal=True for a causal mask)"
        if self.kernel in ("efficient", "flash", "cudnn") and ctx.device.type != "cuda":
            return f"the {self.kernel} SDPA backend needs CUDA tensors"
        return None

    def estimate(self, ctx, mode):
        nn_ = ctx.n * ctx.n
        if self.kernel == "flash":
            return 6 * ctx.token_bytes
        # the bool mask, plus the additive float mask SDPA converts it to (CPU, efficient);
        # the math backend also holds [H, N, N] scores and probabilities (and their grads)
        mask = nn_ * (1 + ctx.itemsize)
        if self.kernel == "math":
            return mask + (2 if mode == "fwd" else 5) * ctx.heads * nn_ * 4
        return mask + 6 * ctx.token_bytes

    def setup(self, ctx):
        super().setup(ctx)
        t = time.perf_counter()
        self.mask = None if self.kernel == "flash" else ctx.graph.to_dense()
        _sync(ctx.device)
        return {"dense_mask_s": time.perf_counter() - t,
                "dense_mask_bytes": 0 if self.mask is None else self.mask.numel()}

    def _backend(self):
        from torch.nn.attention import SDPBackend

        return {"efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH,
                "flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION
                }[self.kernel]

    def forward(self, q, k, v):
        f = torch.nn.functional.scaled_dot_product_attention
        if self.kernel is None:
            return f(q, k, v, attn_mask=self.mask)
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(self._backend()):
            try:
                if self.kernel == "flash":
                    return f(q, k, v, is_causal=True)
                return f(q, k, v, attn_mask=self.mask)
            except RuntimeError as e:
                if "No available kernel" in str(e):
                    raise Unavailable(str(e).strip().splitlines()[0]) from None
                raise


# ---------------------------------------------------------------------- FlexAttention
_COMPILED: Dict[str, Callable] = {}


def _compiled(name: str) -> Callable:
    if name not in _COMPILED:
        from torch.nn.attention import flex_attention as fa

        _COMPILED[name] = torch.compile(getattr(fa, name))
    return _COMPILED[name]


class FlexPeer(Peer):
    name = "flex"
    perm = None              # the graph's token order when FlexAttention runs in it
    layout = "bhnd"
    BLOCK = 128

    def _dense_limit(self, ctx) -> int:
        return ctx.budget // 4

    def refuse(self, ctx, mode):
        # Checked up front: letting flex_attention raise this inside torch.compile makes
        # dynamo run every later call of the function eagerly (dense scores, 100x slower).
        if mode == "fwdbwd" and ctx.device.type == "cpu":
            return (f"FlexAttention does not support backward on CPU (torch "
                    f"{torch.__version__})")
        return None

    def estimate(self, ctx, mode):
        nb = -(-ctx.n // self.BLOCK)
        blockmask = 4 * nb * nb * 4 + (17 * ctx.n * ctx.n if self._eager(ctx) else 0)
        lookup = ctx.n * ctx.n if ctx.spec.kind == "random" else 0
        call = ctx.token_bytes + 4 * ctx.n * ctx.heads
        if mode == "fwdbwd":
            call += 5 * ctx.token_bytes
        return blockmask + lookup + call

    def _eager(self, ctx) -> bool:
        # Eager create_block_mask evaluates the mask_mod on all N x N pairs at once (about
        # 16 N^2 bytes at its peak, 9 s at N = 16k on a CPU core); the compiled one does not.
        return ctx.n <= 4096 and 17 * ctx.n * ctx.n <= ctx.budget // 4

    def setup(self, ctx):
        super().setup(ctx)
        from torch.nn.attention.flex_attention import create_block_mask

        mask_mod, how = ctx.spec.mask_mod(ctx.graph, ctx.device, self._dense_limit(ctx))
        if mask_mod is None:
            raise Unavailable(how)
        self._check_mask_mod(ctx, mask_mod)
        self.perm = None
        if ctx.spec.flex_in_order and ctx.graph.order is not None:
            # The tokens in the graph's order, as attngraph's tiles compute: the mask_mod
            # sees positions in that order, the inputs are permuted in and out per call.
            perm = ctx.graph.order.to(ctx.device)
            base = mask_mod

            def mask_mod(b, h, q, kv):
                return base(b, h, perm[q], perm[kv])

            self.perm = perm
            how += ", tokens in the graph's order"
        build = create_block_mask if self._eager(ctx) else _compiled("create_block_mask")
        info = {"mask_mod": how, "block_mask_build": "eager" if self._eager(ctx) else "compiled"}
        t = time.perf_counter()
        self.block_mask = build(mask_mod, None, None, ctx.n, ctx.n, device=ctx.device,
                                BLOCK_SIZE=self.BLOCK)
        _sync(ctx.device)
        info["block_mask_first_s"] = time.perf_counter() - t
        t = time.perf_counter()
        self.block_mask = build(mask_mod, None, None, ctx.n, ctx.n, device=ctx.device,
                                BLOCK_SIZE=self.BLOCK)
        _sync(ctx.device)
        info["block_mask_s"] = time.perf_counter() - t
        info["block_mask_sparsity_pct"] = round(float(self.block_mask.sparsity()), 2)
        return info

    @staticmethod
    def _check_mask_mod(ctx, mask_mod) -> None:
        """The mask_mod must give the graph's rows exactly (checked on a few rows)."""
        g = ctx.graph
        rows = torch.unique(torch.tensor([0, ctx.n // 2, ctx.n - 1], device=ctx.device))
        kv = torch.arange(ctx.n, device=ctx.device)
        got = mask_mod(None, None, rows.view(-1, 1), kv.view(1, -1))
        ptr = g.ptr
        want = torch.zeros(rows.numel(), ctx.n, dtype=torch.bool, device=ctx.device)
        for r, i in enumerate(rows.tolist()):
            want[r, g.src[ptr[i]:ptr[i + 1]]] = True
        if not torch.equal(got.expand_as(want), want):
            raise AssertionError(f"flex mask_mod disagrees with the {ctx.spec} graph")

    def forward(self, q, k, v):
        perm = self.perm
        if perm is None:
            return _compiled("flex_attention")(q, k, v, block_mask=self.block_mask)
        q, k, v = (x.index_select(2, perm) for x in (q, k, v))
        out = _compiled("flex_attention")(q, k, v, block_mask=self.block_mask)
        return out.new_empty(out.shape).index_copy(2, perm, out)


# ---------------------------------------------------------------------- registry
PEERS: Dict[str, Callable[[], Peer]] = {
    "attngraph": lambda: AttnGraphPeer("torch"),
    "attngraph-cupy": lambda: AttnGraphPeer("cupy"),
    "attngraph-tiles": lambda: AttnGraphPeer("tiles"),
    "attngraph-flex": lambda: AttnGraphPeer("flex"),
    "attngraph-compiled": lambda: CompiledAttnGraphPeer("torch"),
    "pyg": PyGPeer,
    "sdpa": lambda: SDPAPeer(None),
    "sdpa-efficient": lambda: SDPAPeer("efficient"),
    "sdpa-math": lambda: SDPAPeer("math"),
    "sdpa-flash": lambda: SDPAPeer("flash"),
    "flex": FlexPeer,
}


def make_peer(name: str) -> Peer:
    try:
        return PEERS[name]()
    except KeyError:
        raise ValueError(f"unknown peer {name!r}; expected one of {sorted(PEERS)}") from None


def default_peers(device_type: str) -> List[str]:
    if device_type == "cuda":
        return ["attngraph", "attngraph-cupy", "pyg", "sdpa-efficient", "sdpa-math",
                "sdpa-flash", "flex"]
    return ["attngraph", "attngraph-cupy", "pyg", "sdpa", "flex"]
