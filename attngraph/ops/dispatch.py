"""Backend choice, by declared capability, with reasons.

Each backend says which devices, dtypes and head dims it takes and, when it refuses an
input, why. ``backend="auto"`` takes the first backend in preference order that accepts the
input; naming a backend that refuses raises an error listing every backend's reason.
Import-time flags (``WITH_CUPY``) say what is installed, not what to do.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["Backend", "register_backend", "backends", "select_backend", "per_edge_backend",
           "explain", "WITH_CUPY"]

WITH_CUPY = importlib.util.find_spec("cupy") is not None


@dataclass(frozen=True)
class Inputs:
    """What a backend needs to know to accept or refuse a call."""

    device: torch.device
    dtype: torch.dtype
    head_dim: int
    value_dim: int
    requires_grad: bool
    graph: object = None        # the TokenGraph, for backends that decide by its structure


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


_BACKENDS: Dict[str, Backend] = {}


def register_backend(backend: Backend) -> None:
    _BACKENDS[backend.name] = backend


def backends() -> List[Backend]:
    """Registered backends, most preferred first."""
    return sorted(_BACKENDS.values(), key=lambda b: -b.priority)


def select_backend(name: str, inputs: Inputs, *, exclude: Tuple[str, ...] = ()) -> Backend:
    """The backend to run ``inputs`` with: ``name`` itself, or the best one for "auto"
    (never one named in ``exclude``)."""
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
            return b
        reasons.append((b.name, why))
    if name != "auto":  # say why the others would or would not have worked too
        reasons += [(b.name, b.refuse(inputs) or "would accept this input")
                    for b in backends() if b.name != name and b.name not in exclude]
    lines = "\n".join(f"  - {n}: {why}" for n, why in reasons)
    raise RuntimeError(f"no backend can run graph_attention with backend={name!r} on "
                       f"{inputs.dtype} tensors on {inputs.device} (head dim "
                       f"{inputs.head_dim}):\n{lines}")


def per_edge_backend(name: str, inputs: Inputs) -> Backend:
    """The per-edge backend (every one but ``tiles``) ``name`` resolves to for ``inputs``:
    where the tiled path runs its residual edges."""
    return select_backend("auto" if name == "tiles" else name, inputs, exclude=("tiles",))


_TORCH_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def explain(name: str, inputs: Inputs) -> str:
    """Which backend ``name`` resolves to for ``inputs`` and how it runs them, one line."""
    b = select_backend(name, inputs)
    how = b.describe(inputs) if b.describe is not None else ""
    return f"{b.name}: {how}" if how else b.name


def _implicit(x: Inputs) -> bool:
    return x.graph is not None and x.graph.is_implicit


def _rule(x: Inputs):
    """The rule an explicit graph was built from, kept for attention (hash buckets, QK
    drop: key ranges of a sorted table), or None."""
    return None if x.graph is None else x.graph._cache.get("rule")


def _torch_refuse(x: Inputs) -> Optional[str]:
    if x.dtype not in _TORCH_DTYPES:
        return f"takes float16/bfloat16/float32/float64, got {x.dtype}"
    if _implicit(x) and torch.compiler.is_compiling():
        return ("an implicit graph has no edge tensors for torch.compile to trace: run it "
                "eagerly, or trace graph.materialize()")
    return None


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

    if graph.is_implicit and bias is not None:   # a bias follows the canonical edge order
        from attngraph.ops import chunked

        return chunked.attention(q, k, v, graph, scale, bias)

    return fused.attention(q, k, v, graph, scale, bias)


def _cupy_stages():
    from attngraph.ops.cuda import stages

    return stages


register_backend(Backend("torch", priority=0, refuse=_torch_refuse, run=_torch_run,
                         stages=_torch_stages,
                         describe=lambda x: "memory-bounded torch ops (ops/chunked.py)"))
register_backend(Backend("cupy", priority=10, refuse=_cupy_refuse, run=_cupy_run,
                         stages=_cupy_stages, auto_refuse=_cupy_auto_refuse,
                         describe=_cupy_describe))


def _tiles_refuse(x: Inputs) -> Optional[str]:
    if x.dtype not in _TORCH_DTYPES:
        return f"takes float16/bfloat16/float32/float64, got {x.dtype}"
    if torch.compiler.is_compiling():
        return "plans tiles on the host: not traced by torch.compile (the torch backend is)"
    return None


# Below this modelled saving the tile plan is not worth a second code path.
_TILES_MIN_SAVING = 0.9


def _tiles_auto_refuse(x: Inputs) -> Optional[str]:
    from attngraph.ops.tiles import EDGE_COST_CELLS

    if _implicit(x) or (_rule(x) is not None and x.device.type == "cpu"):
        return None             # key ranges from the rule: no edge list, no plan to build
    if x.device.type != "cpu":
        # the break-even is measured on CPU only; on a GPU the fused kernels stay the
        # default (deterministic backward) until the tile path is measured against them
        return (f"auto takes dense tiles on CPU only (the cost model is measured there); "
                f"ask for backend='tiles' on {x.device.type}")
    g = x.graph
    if g is None or g.num_edges == 0:
        return "no graph to plan"
    # from tile counts only: a graph where tiles do not pay is never planned
    block, cost, _ = g._best_block()
    per_edge = EDGE_COST_CELLS * g.num_edges
    if cost > _TILES_MIN_SAVING * per_edge:
        return (f"the tile plan saves too little: modelled cost {cost:.3g} vs {per_edge:.3g} "
                f"per edge (tile_plan() puts few or no edges on dense tiles)")
    return None


def _tiles_describe(x: Inputs) -> str:
    if _implicit(x) or _rule(x) is not None:
        return ("key ranges read from the implicit graph's rule (ops/ranges.py): dense "
                "blocks where ranges are dense, generated edges elsewhere")
    plan = x.graph.tile_plan() if x.graph is not None else None
    how = "dense tiles (ops/tiles.py) + per-edge residual, merged by log-sum-exp"
    return f"{how}: {plan}" if plan is not None else how


def _tiles_run(q, k, v, graph, scale, bias):
    from attngraph.ops import tiles

    if graph.is_implicit:
        from attngraph.ops import chunked, ranges

        if bias is not None:    # a bias follows the canonical edge order: per-edge chunks
            return chunked.attention(q, k, v, graph, scale, bias)
        return ranges.attention(q, k, v, graph, scale)
    rule = graph._cache.get("rule")
    if rule is not None and bias is None:
        from attngraph.ops import ranges

        return ranges.attention(q, k, v, rule, scale)
    return tiles.attention(q, k, v, graph, scale, bias)


register_backend(Backend("tiles", priority=20, refuse=_tiles_refuse, run=_tiles_run,
                         stages=_torch_stages, auto_refuse=_tiles_auto_refuse,
                         describe=_tiles_describe))
