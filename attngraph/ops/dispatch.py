"""Backend choice, by declared capability, with reasons.

Backends are named for what runs: ``"ranges"`` (key ranges read from a graph's rule,
:mod:`attngraph.ops.ranges`), ``"tiles"`` (dense tiles of a tile plan plus per-edge residual,
:mod:`attngraph.ops.tiles`), ``"flex"`` (the tiles on FlexAttention plus per-edge residual,
:mod:`attngraph.ops.flex_tiles`), ``"cupy"`` (the fused CUDA kernels,
:mod:`attngraph.ops.cuda`) and ``"torch"`` (per-edge row chunks, :mod:`attngraph.ops.chunked`).
On CUDA, ``auto`` takes ``flex`` or ``cupy`` by the H100 model
(:func:`attngraph.ops.plan.choose_engine`). Each says which inputs
it takes and, when it refuses one, why; a backend never hands an input it refused to
another. ``backend="auto"`` takes the first backend in preference order that accepts the
input (and does not decline it under ``auto``); naming a backend that refuses raises an
error listing every backend's reason. :func:`explain` says which backend runs and why.
What is installed is in :mod:`attngraph.capabilities`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from attngraph import capabilities
from attngraph.capabilities import WITH_CUPY
from attngraph.ops.plan import EDGE_COST_CELLS, best_block, choose_engine

__all__ = ["Backend", "Inputs", "register_backend", "backends", "select_backend",
           "per_edge_backend", "explain", "WITH_CUPY"]


@dataclass(frozen=True)
class Inputs:
    """What a backend needs to know to accept or refuse a call."""

    device: torch.device
    dtype: torch.dtype
    head_dim: int
    value_dim: int
    requires_grad: bool
    graph: object = None        # the TokenGraph, for backends that decide by its structure
    has_bias: bool = False      # an edge bias comes with the call (canonical edge order)
    heads: int = 1              # query heads (a batch folded in: B * H)
    kv_heads: int = 1           # key / value heads (B * H_kv)
    bias_columns: int = 1       # columns of the edge bias ([E] or [E, nb])
    bias_requires_grad: bool = False

    @classmethod
    def of(cls, q: Tensor, k: Tensor, v: Tensor, graph=None, edge_bias=None) -> "Inputs":
        """The inputs of a :func:`~attngraph.graph_attention` call."""
        batch = q.size(0) if q.dim() == 4 else 1
        return cls(device=q.device, dtype=q.dtype, head_dim=q.size(-1), value_dim=v.size(-1),
                   requires_grad=any(t.requires_grad for t in (q, k, v)), graph=graph,
                   has_bias=edge_bias is not None,
                   heads=batch * q.size(-2) if q.dim() >= 2 else 1,
                   kv_heads=batch * k.size(-2) if k.dim() >= 2 else 1,
                   bias_columns=(1 if edge_bias is None or edge_bias.dim() < 2
                                 else edge_bias.size(1)),
                   bias_requires_grad=edge_bias is not None and edge_bias.requires_grad)


@dataclass(frozen=True)
class Backend:
    """A way to compute graph attention.

    ``refuse(inputs)`` returns ``None`` when the backend can run the input, else the reason
    it can't; ``run(q, k, v, graph, scale, bias)`` returns ``(out, lse)`` on grouped
    node-major inputs (see :mod:`attngraph.ops.chunked`).
    """

    name: str
    priority: int            # higher is preferred by "auto"
    refuse: Callable[[Inputs], Optional[str]]
    run: Callable
    # module with edge_scores(q, k, graph, scale), edge_softmax(s, graph), aggregate(p, v, graph)
    stages: Callable = None
    # a reason not to pick this backend under "auto" although it could run the input
    auto_refuse: Optional[Callable[[Inputs], Optional[str]]] = None
    # one line on how the backend would run an input it accepts
    describe: Optional[Callable[[Inputs], str]] = None
    # how "auto" runs the backend, where that differs from ``run`` (tiles: under
    # torch.compile its operator makes auto's choice when it runs)
    auto_run: Optional[Callable] = None
    # the torch.library operator the backend runs as, eagerly and under torch.compile
    op: str = ""


_BACKENDS: Dict[str, Backend] = {}


def register_backend(backend: Backend) -> None:
    _BACKENDS[backend.name] = backend


def backends() -> List[Backend]:
    """Registered backends, most preferred first."""
    return sorted(_BACKENDS.values(), key=lambda b: -b.priority)


def _resolve(name: str, inputs: Inputs, exclude: Tuple[str, ...] = ()
             ) -> Tuple[Optional[Backend], List[Tuple[str, str]]]:
    """``(backend or None, [(name, reason), ...] of the backends passed over)``."""
    if name != "auto" and name not in _BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected 'auto' or one of "
                         f"{sorted(_BACKENDS)}")
    reasons: List[Tuple[str, str]] = []
    for b in backends():
        if name not in ("auto", b.name) or b.name in exclude:
            continue
        why = b.refuse(inputs)
        if why is None and name == "auto" and b.auto_refuse is not None:
            why = b.auto_refuse(inputs)
        if why is None:
            return b, reasons
        reasons.append((b.name, why))
    return None, reasons


def select_backend(name: str, inputs: Inputs, *, exclude: Tuple[str, ...] = ()) -> Backend:
    """The backend to run ``inputs`` with: ``name`` itself, or the best one for "auto"
    (never one named in ``exclude``)."""
    chosen, reasons = _resolve(name, inputs, exclude)
    if chosen is not None:
        return chosen
    if name != "auto":  # say why the others would or would not have worked too
        reasons += [(b.name, b.refuse(inputs) or "would accept this input")
                    for b in backends() if b.name != name and b.name not in exclude]
    lines = "\n".join(f"  - {n}: {why}" for n, why in reasons)
    raise RuntimeError(f"no backend can run graph_attention with backend={name!r} on "
                       f"{inputs.dtype} tensors on {inputs.device} (head dim "
                       f"{inputs.head_dim}):\n{lines}")


# Backends that run a whole graph's structure, not a list of edges: the per-edge residual
# of a tile plan never goes to them.
_STRUCTURED = ("tiles", "ranges", "flex")


def per_edge_backend(name: str, inputs: Inputs) -> Backend:
    """The per-edge backend (``torch`` or ``cupy``) ``name`` resolves to for ``inputs``:
    where the tiled path runs its residual edges."""
    return select_backend("auto" if name in _STRUCTURED else name, inputs, exclude=_STRUCTURED)


def explain(name: str, inputs: Inputs) -> str:
    """Which backend ``name`` resolves to for ``inputs``, how it runs them, under
    ``auto`` why each preferred backend was passed over, and what runs when the call is
    compiled by torch.compile; one line. (Which backend a call *did* run:
    :func:`attngraph.ops.record.recording`.)"""
    b = select_backend(name, inputs)
    _, passed = _resolve(name, inputs)
    how = b.describe(inputs) if b.describe is not None else ""
    line = f"{b.name}: {how}" if how else b.name
    if name == "auto" and passed:
        line += " (" + "; ".join(f"not {n}: {why}" for n, why in passed) + ")"
    return line + "; under torch.compile: " + _compiled(name, b, inputs)


def _deferred(name: str, x: Inputs) -> bool:
    """Whether ``auto`` chooses between tiles and torch from the graph's tile counts,
    which torch.compile cannot trace: the tiles operator then chooses when it runs."""
    return (name == "auto" and x.device.type == "cpu" and x.graph is not None
            and not _implicit(x) and _rule(x) is None and x.graph.num_edges > 0
            and _tiles_refuse(x) is None)


def _compiled(name: str, b: Backend, x: Inputs) -> str:
    """What runs when this call is compiled by torch.compile."""
    if b.name in ("tiles", "torch") and _deferred(name, x):
        return (f"the same choice, made from the graph's tile counts when the compiled "
                f"code runs (the {_BACKENDS['tiles'].op} operator; {b.name} here)")
    if b.name == "flex":
        return ("refused: FlexAttention tiles are planned on the host, outside traced code "
                "(auto takes the next backend; the fused kernels on CUDA)")
    if _implicit(x) and b.name == "cupy":
        return ("refused: the fused kernels run an implicit graph eagerly (compiled: "
                "backend='ranges' or 'torch', or trace graph.materialize())")
    if _implicit(x) and b.name == "torch":
        return "the same, as the attngraph::chunked_attention_implicit operator"
    return f"the same, as the {b.op} operator" if b.op else "the same"


_TORCH_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _implicit(x: Inputs) -> bool:
    return x.graph is not None and x.graph.is_implicit


def _rule(x: Inputs):
    """The rule an explicit graph was built from, kept for attention (hash buckets, QK
    drop: key ranges of a sorted table), or None."""
    return None if x.graph is None else x.graph.rule


def _dtype_refuse(x: Inputs) -> Optional[str]:
    """The torch-computed backends' dtypes."""
    if x.dtype not in _TORCH_DTYPES:
        return f"takes float16/bfloat16/float32/float64, got {x.dtype}"
    return None


def _torch_refuse(x: Inputs) -> Optional[str]:
    return _dtype_refuse(x)


def _torch_run(q, k, v, graph, scale, bias):
    from attngraph.ops import chunked

    return chunked.attention(q, k, v, graph, scale, bias)


def _torch_stages():
    from attngraph.ops import reference

    return reference


_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_KERNEL_HEAD_DIM = 256


def _emulating() -> bool:
    from attngraph.ops.cuda.loader import emulation_enabled

    return emulation_enabled()


def _cupy_refuse(x: Inputs) -> Optional[str]:
    if x.device.type == "cpu":
        if not _emulating():
            return ("needs CUDA tensors, got cpu (ATTNGRAPH_CUDA_EMULATE=1 runs the CUDA "
                    "kernels on CPU tensors through the emulator)")
    elif x.device.type != "cuda":
        return f"needs CUDA tensors, got {x.device.type}"
    elif not WITH_CUPY:
        return "cupy is not installed (pip install 'attngraph[cuda12]' or '[cuda13]')"
    if x.dtype not in _KERNEL_DTYPES:
        return f"takes float16/bfloat16/float32, got {x.dtype}"
    if _implicit(x) and torch.compiler.is_compiling():
        return ("an implicit graph runs on the fused kernels chunk by chunk, eagerly: "
                "run it eagerly, or trace graph.materialize()")
    if _implicit(x) and x.has_bias:
        return ("an implicit graph with an edge bias: the fused kernels generate its edges "
                "chunk by chunk and index no bias by canonical edge (the torch backend "
                "does; or pass graph.materialize())")
    if max(x.head_dim, x.value_dim) > _MAX_KERNEL_HEAD_DIM:
        return (f"takes head dims up to {_MAX_KERNEL_HEAD_DIM}, got "
                f"{max(x.head_dim, x.value_dim)}")
    return None


def _cupy_auto_refuse(x: Inputs) -> Optional[str]:
    if x.device.type == "cpu":
        return ("emulated CUDA kernels are for checking them, far slower than the torch "
                "backend: ask for backend='cupy' to run them")
    return None


def _cupy_describe(x: Inputs) -> str:
    where = ("emulated on CPU (ATTNGRAPH_CUDA_EMULATE=1)" if x.device.type == "cpu"
             else f"CuPy raw kernels on {x.device}")
    return f"fused kernels (attention.cu), {where}"


def _cupy_run(q, k, v, graph, scale, bias):
    from attngraph.ops.cuda import fused

    return fused.attention(q, k, v, graph, scale, bias)


def _cupy_stages():
    from attngraph.ops.cuda import stages

    return stages


register_backend(Backend("torch", priority=0, refuse=_torch_refuse, run=_torch_run,
                         stages=_torch_stages,
                         describe=lambda x: "memory-bounded torch ops (ops/chunked.py)",
                         op="attngraph::chunked_attention"))
register_backend(Backend("cupy", priority=10, refuse=_cupy_refuse, run=_cupy_run,
                         stages=_cupy_stages, auto_refuse=_cupy_auto_refuse,
                         describe=_cupy_describe, op="attngraph::graph_attention"))


def _tiles_refuse(x: Inputs) -> Optional[str]:
    if (why := _dtype_refuse(x)) is not None:
        return why
    if _implicit(x):
        return ("an implicit graph has no edge list to plan tiles over: backend='ranges' "
                "reads its key ranges from the rule (or pass graph.materialize())")
    return None


# Below this modelled saving the tile plan is not worth a second code path.
_TILES_MIN_SAVING = 0.9


def _tiles_auto_refuse(x: Inputs) -> Optional[str]:
    if _rule(x) is not None and x.device.type == "cpu":
        return None             # a hash / QK-drop graph in its (bucket, position) order
    if x.device.type != "cpu":
        # the break-even is measured on CPU only; on a GPU the fused kernels stay the
        # default (deterministic backward) until the tile path is measured against them
        return (f"auto takes dense tiles on CPU only (the cost model is measured there); "
                f"ask for backend='tiles' on {x.device.type}")
    g = x.graph
    if g is None or g.num_edges == 0:
        return "no graph to plan"
    if torch.compiler.is_compiling():
        return None     # traced: the tiles operator asks again when it runs (auto_run)
    # from tile counts only: a graph where tiles do not pay is never planned
    block, cost, _ = best_block(g)
    per_edge = EDGE_COST_CELLS * g.num_edges
    if cost > _TILES_MIN_SAVING * per_edge:
        return (f"the tile plan saves too little: modelled cost {cost:.3g} vs {per_edge:.3g} "
                f"per edge (tile_plan() puts few or no edges on dense tiles)")
    return None


def _tiles_describe(x: Inputs) -> str:
    plan = x.graph.tile_plan() if x.graph is not None else None
    how = "dense tiles (ops/tiles.py) + per-edge residual, merged by log-sum-exp"
    return f"{how}: {plan}" if plan is not None else how


def _tiles_run(q, k, v, graph, scale, bias, auto=False):
    from attngraph.ops import tiles

    residual = per_edge_backend("auto", Inputs.of(q, k, v))
    # traced, auto's choice waits for the graph's tile counts: the operator makes it
    deferred = auto and torch.compiler.is_compiling() and graph.rule is None
    return tiles.attention(q, k, v, graph, scale, bias, residual=residual.name,
                           auto=deferred)


def _tiles_auto_run(q, k, v, graph, scale, bias):
    return _tiles_run(q, k, v, graph, scale, bias, auto=True)


register_backend(Backend("tiles", priority=20, refuse=_tiles_refuse, run=_tiles_run,
                         stages=_torch_stages, auto_refuse=_tiles_auto_refuse,
                         describe=_tiles_describe, auto_run=_tiles_auto_run,
                         op="attngraph::tile_attention"))


def _ranges_refuse(x: Inputs) -> Optional[str]:
    if (why := _dtype_refuse(x)) is not None:
        return why
    if x.graph is None:
        return "reads key ranges from a graph's rule: no graph given"
    if not _implicit(x) and _rule(x) is None:
        return ("the graph keeps no rule to read key ranges from (implicit graphs and "
                "hash_buckets / qk_drop graphs do)")
    if x.has_bias:
        return ("an edge bias follows the canonical edge order, which key ranges do not "
                "index (tiles or torch take it)")
    return None


def _ranges_auto_refuse(x: Inputs) -> Optional[str]:
    if not _implicit(x) and x.device.type != "cpu":
        return (f"auto reads a kept rule on CPU only (on {x.device.type} the fused kernels "
                f"take the stored edges); ask for backend='ranges'")
    return None


def _ranges_run(q, k, v, graph, scale, bias):
    from attngraph.ops import ranges

    return ranges.attention(q, k, v, graph if graph.is_implicit else graph.rule, scale)


def _ranges_describe(x: Inputs) -> str:
    whose = "implicit graph's" if _implicit(x) else "graph's kept"
    return (f"key ranges read from the {whose} rule (ops/ranges.py): dense blocks where "
            f"ranges are dense, generated edges elsewhere")


register_backend(Backend("ranges", priority=30, refuse=_ranges_refuse, run=_ranges_run,
                         stages=_torch_stages, auto_refuse=_ranges_auto_refuse,
                         describe=_ranges_describe, op="attngraph::range_attention"))


def _flex_plan(x: Inputs):
    from attngraph.ops import flex_tiles

    return flex_tiles.engine_plan(x.graph, heads=x.heads, kv_heads=x.kv_heads,
                                  head_dim=x.head_dim, value_dim=x.value_dim, dtype=x.dtype,
                                  requires_grad=x.requires_grad,
                                  fused_available=_fused_available(x))


def _fused_available(x: Inputs) -> bool:
    """Whether the flex engine plans for residual edges on the fused kernels: on CUDA when
    they run these tensors, and on CPU always (the engine there checks the plan it would
    run on a GPU)."""
    if x.device.type != "cuda":
        return True
    plain = Inputs(device=x.device, dtype=x.dtype, head_dim=x.head_dim,
                   value_dim=x.value_dim, requires_grad=x.requires_grad)
    return _cupy_refuse(plain) is None


def _flex_refuse(x: Inputs) -> Optional[str]:
    from attngraph.ops import flex_tiles

    if (why := capabilities.flex_attention_missing()) is not None:
        return why
    if (why := _dtype_refuse(x)) is not None:
        return why
    if x.device.type not in ("cpu", "cuda"):
        return f"runs FlexAttention on CUDA (compiled) or CPU (eager), got {x.device.type}"
    if torch.compiler.is_compiling():
        return "plans tiles on the host: not traced by torch.compile (the torch backend is)"
    if x.graph is None:
        return "plans tiles over a graph: no graph given"
    if _implicit(x):
        return ("an implicit graph has no edge list to plan tiles over: backend='ranges' "
                "reads its key ranges from the rule (or pass graph.materialize())")
    if x.device.type == "cpu":
        if x.requires_grad or x.bias_requires_grad:
            return ("FlexAttention has no backward on CPU (forward only, under "
                    "torch.no_grad()); backend='tiles' runs the tiles with a backward")
        cells = x.heads * x.graph.num_dst * x.graph.num_src
        if cells > flex_tiles.EAGER_SCORE_ELEMENTS:
            return (f"eager FlexAttention on CPU materialises the [H, N_dst, N_src] scores: "
                    f"{cells:,} elements, above EAGER_SCORE_ELEMENTS = "
                    f"{flex_tiles.EAGER_SCORE_ELEMENTS:,}")
    if x.has_bias:
        if x.bias_requires_grad and not capabilities.torch_at_least(
                capabilities.FLEX_BIAS_GRAD_MIN_TORCH):
            need = ".".join(map(str, capabilities.FLEX_BIAS_GRAD_MIN_TORCH))
            return (f"a bias gradient through FlexAttention's score_mod needs torch >= "
                    f"{need}, found {torch.__version__}")
        return flex_tiles.bias_refusal(_flex_plan(x), x.bias_columns)
    return None


def _flex_choice(x: Inputs):
    return choose_engine(x.graph, x.device.type, heads=x.heads, kv_heads=x.kv_heads,
                         head_dim=x.head_dim, value_dim=x.value_dim, dtype=x.dtype,
                         requires_grad=x.requires_grad, fused_available=_fused_available(x))


def _flex_auto_refuse(x: Inputs) -> Optional[str]:
    if x.device.type != "cuda":
        return (f"auto takes FlexAttention tiles on CUDA only: on {x.device.type} "
                f"FlexAttention runs eagerly (the whole score matrix, no backward) and "
                f"ATen's flash kernel runs the tiles faster (backend='tiles'; "
                f"benchmarks/results/cpu/tiles_flex.md); ask for backend='flex'")
    if x.graph.num_edges == 0:
        return "no edges to plan"
    choice = _flex_choice(x)
    if choice.engine != "flex":
        return f"the fused kernels are faster: {choice.reason}"
    return None


def _flex_describe(x: Inputs) -> str:
    how = ("dense tiles on FlexAttention (ops/flex_tiles.py, "
           + ("compiled" if x.device.type == "cuda" else "eager, forward only")
           + ") + per-edge residual, merged by log-sum-exp")
    if x.graph is None:
        return how
    line = f"{how}: {_flex_plan(x)}"
    if x.device.type == "cuda":
        line += f"; {_flex_choice(x).reason}"
    return line


def _flex_run(q, k, v, graph, scale, bias):
    from attngraph.ops import flex_tiles

    residual = per_edge_backend("auto", Inputs.of(q, k, v))
    plan = _flex_plan(Inputs.of(q, k, v, graph))
    return flex_tiles.attention(q, k, v, graph, scale, bias, plan=plan, residual=residual.run)


register_backend(Backend("flex", priority=15, refuse=_flex_refuse, run=_flex_run,
                         stages=_torch_stages, auto_refuse=_flex_auto_refuse,
                         describe=_flex_describe))
