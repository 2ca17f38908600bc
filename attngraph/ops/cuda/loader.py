"""Where the CUDA kernels come from: the module registry, header discovery, and one loader.

Every kernel lives in a ``.cu`` file beside this module. ``MODULES`` lists, per file, every
template instantiation the runtime can request (CuPy / NVRTC ``name_expressions``) and the
compile options; the NVRTC compile gate (``python -m attngraph.ops.cuda``) compiles exactly
this list, and :func:`module` compiles it at run time:

* on a CUDA device with ``cupy.RawModule`` (memoized per device), launched on torch's current
  stream with tensors shared by DLPack;
* under emulation (``ATTNGRAPH_CUDA_EMULATE=1``) with the host C++ compiler through
  :mod:`attngraph.ops.cuda.emulator`, on CPU tensors.

Both return kernels called as ``kernel(grid, block, args, shared_mem=0)`` so the launch code
above this module is one path.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional, Tuple

__all__ = ["KernelModule", "MODULES", "SOURCE_DIR", "source", "cuda_include_dirs",
           "emulation_enabled", "module", "register_module", "poison"]

SOURCE_DIR = Path(__file__).resolve().parent

# Options shared by every module (NVRTC spelling; the emulator maps what it understands).
COMMON_OPTIONS: Tuple[str, ...] = ("--std=c++17",)

# Dynamic shared memory a launch may use without raising max_dynamic_shared_size_bytes.
DEFAULT_SHARED_MEM = 48 * 1024

# Storage types of the kernels' float arguments, as the CUDA sources spell them.
DTYPE_NAMES = ("float", "__half", "__nv_bfloat16")


@dataclass(frozen=True)
class KernelModule:
    """One ``.cu`` file and every instantiation the runtime may ask of it."""

    name: str                            # registry key, e.g. "stages"
    file: str                            # file name beside this module
    name_expressions: Tuple[str, ...]    # e.g. ("edge_dot<float, 2>", ...)
    options: Tuple[str, ...] = COMMON_OPTIONS

    @property
    def path(self) -> Path:
        return SOURCE_DIR / self.file


MODULES: Dict[str, KernelModule] = {}


def register_module(mod: KernelModule) -> KernelModule:
    MODULES[mod.name] = mod
    return mod


def source(mod: KernelModule) -> str:
    return mod.path.read_text()


def emulation_enabled() -> bool:
    """``ATTNGRAPH_CUDA_EMULATE`` is read at call time, so tests and users may flip it."""
    return os.environ.get("ATTNGRAPH_CUDA_EMULATE", "").strip().lower() not in (
        "", "0", "false", "no", "off")


def poison(t):
    """An output or workspace the launch glue just allocated: under the emulator's initcheck
    filled with NaN (or -1), so that a read of what no kernel wrote shows in the results
    (``emulator.poison``); unchanged otherwise, and always on a GPU."""
    if t.device.type != "cpu":
        return t
    from attngraph.ops.cuda import emulator

    return emulator.poison(t)


def _site_dirs() -> List[Path]:
    dirs = []
    for p in sys.path:
        if p and Path(p, "nvidia").is_dir():
            dirs.append(Path(p, "nvidia"))
    return dirs


def _complete(d: Path) -> bool:
    return (d / "cuda_fp16.h").is_file() and (d / "crt" / "host_defines.h").is_file()


def _cupy_cccl() -> Optional[Path]:
    """CuPy's bundled libcu++ (``nv/target``, which the wheels' cuda_fp16.h includes)."""
    import importlib.util

    spec = importlib.util.find_spec("cupy")
    if spec is None or not spec.origin:
        return None
    d = Path(spec.origin).parent / "_core" / "include" / "cupy" / "_cccl" / "libcudacxx"
    return d if (d / "nv" / "target").is_file() else None


def cuda_include_dirs() -> Tuple[str, ...]:
    """Include directories for ``cuda_fp16.h`` / ``cuda_bf16.h`` and what they include
    (``crt/host_defines.h``, ``nv/target``), for the emulator's host build.

    ``$ATTNGRAPH_CUDA_INCLUDE`` (``os.pathsep``-separated) when set; else a CUDA toolkit
    (``$CUDA_HOME``, ``$CUDA_PATH``, ``/usr/local/cuda``); else the pip wheels:
    ``nvidia-cuda-runtime-cu12`` (the headers), ``nvidia-cuda-nvcc-cu12`` (their ``crt/``)
    and CuPy's bundled libcu++. Empty when none is complete.
    """
    override = os.environ.get("ATTNGRAPH_CUDA_INCLUDE")
    if override:
        return tuple(d for d in override.split(os.pathsep) if d)
    return _found_include_dirs()


@lru_cache(maxsize=None)
def _found_include_dirs() -> Tuple[str, ...]:
    toolkits = [Path(os.environ[v], "include") for v in ("CUDA_HOME", "CUDA_PATH")
                if os.environ.get(v)]
    toolkits.append(Path("/usr/local/cuda/include"))
    for d in toolkits:
        if _complete(d):
            return (str(d),)
    return wheel_include_dirs()


def wheel_include_dirs() -> Tuple[str, ...]:
    """The CUDA headers from pip wheels alone (see :func:`cuda_include_dirs`)."""
    cccl = _cupy_cccl()
    for nv in _site_dirs():
        runtime, crt = nv / "cuda_runtime" / "include", nv / "cuda_nvcc" / "include"
        if ((runtime / "cuda_fp16.h").is_file() and (crt / "crt" / "host_defines.h").is_file()
                and cccl is not None):
            return (str(runtime), str(crt), str(cccl))
    return ()


def module(name: str, device=None):
    """The compiled module ``name`` for ``device`` (a CUDA ``torch.device``, or CPU under
    emulation); memoized."""
    import torch

    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type == "cuda":
        return _cupy_module(name, device.index if device.index is not None
                            else torch.cuda.current_device())
    from attngraph.ops.cuda import emulator

    return _emulated_module(name, emulator.build_variant())


@lru_cache(maxsize=None)
def _emulated_module(name: str, variant: Tuple[bool, str]):
    """``variant``: the build the emulator's settings ask for (a checked build is another
    module)."""
    from attngraph.ops.cuda import emulator

    mod = MODULES[name]
    return emulator.RawModule(code=source(mod), options=mod.options + _include_options(),
                              name_expressions=mod.name_expressions, name=mod.file)


def _include_options(*, emulated: bool = True) -> Tuple[str, ...]:
    """``-I`` options: the kernel sources, and for the host build the CUDA headers (on a GPU,
    CuPy supplies the headers matching its NVRTC)."""
    dirs = (str(SOURCE_DIR),) + (cuda_include_dirs() if emulated else ())
    return tuple(f"-I{d}" for d in dirs)


@lru_cache(maxsize=None)
def _cupy_module(name: str, device_index: int):
    import cupy

    mod = MODULES[name]
    with cupy.cuda.Device(device_index):
        raw = cupy.RawModule(code=source(mod), options=mod.options + _include_options(emulated=False),
                             name_expressions=mod.name_expressions)
        raw.compile()
    return _CupyModule(raw, device_index)


class _CupyModule:
    """``cupy.RawModule`` whose kernels launch on torch's current stream and take torch
    tensors (shared by DLPack, no copies)."""

    def __init__(self, raw, device_index: int):
        self._raw, self._device = raw, device_index
        self._kernels: Dict[str, "_CupyKernel"] = {}

    def get_function(self, name: str) -> "_CupyKernel":
        if name not in self._kernels:
            self._kernels[name] = _CupyKernel(self._raw.get_function(name), name, self._device)
        return self._kernels[name]


class _CupyKernel:
    def __init__(self, fn, name: str, device_index: int):
        self._fn, self.name, self._device = fn, name, device_index

    def __call__(self, grid, block, args, shared_mem: int = 0) -> None:  # pragma: no cover
        import cupy
        import numpy
        import torch

        conv = []
        for a in args:
            if a is None:                   # an optional pointer argument: null
                conv.append(numpy.uint64(0))
            elif isinstance(a, torch.Tensor):
                # an empty tensor's pointer is never dereferenced: pass a null pointer
                conv.append(cupy.from_dlpack(a.detach()) if a.numel() else numpy.uint64(0))
            else:
                conv.append(a)
        stream = torch.cuda.current_stream(self._device).cuda_stream
        with cupy.cuda.Device(self._device), cupy.cuda.ExternalStream(stream):
            if (shared_mem > DEFAULT_SHARED_MEM
                    and self._fn.max_dynamic_shared_size_bytes < shared_mem):
                # beyond 48 KiB a launch needs the opt-in attribute first (cudaFuncSetAttribute)
                self._fn.max_dynamic_shared_size_bytes = shared_mem
            self._fn(tuple(grid), tuple(block), tuple(conv), shared_mem=shared_mem)


def max_blocks(device) -> int:
    """Blocks a grid-stride launch needs to fill ``device`` (a few waves of every SM); the
    emulator runs blocks on host cores, so a small grid keeps its fiber count low."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return props.multi_processor_count * 8
    return 16


def _stage_expressions() -> Tuple[str, ...]:
    exprs = []
    for t in DTYPE_NAMES:
        for nt in HEAD_DIM_CHUNKS:
            exprs += [f"row_dot<{t}, {nt}>", f"row_gather<{t}, {nt}>", f"col_gather<{t}, {nt}>"]
        exprs += [f"row_softmax<{t}>", f"row_softmax_bwd<{t}>"]
    return tuple(exprs)


# Head dims are bucketed by elements per lane (a warp covers 32 * NT >= D).
HEAD_DIM_CHUNKS = (1, 2, 4, 8)
MAX_HEAD_DIM = 32 * HEAD_DIM_CHUNKS[-1]

register_module(KernelModule("stages", "stages.cu", _stage_expressions()))


# Query heads one warp of the fused kernels carries (GQA: one K/V read serves them), by the
# elements per lane NT: the forward holds q and the accumulator of each (GQ * NT <= 16), the
# dQ pass q, dO and dQ (GQ * NT <= 8). A larger group reads each K/V row G / GQ times.
GROUP_HEADS = (8, 4, 2, 1)
MAX_GROUP_ELEMENTS = {"fwd": 16, "dq": 8}


def group_heads(G: int, nt: int, kernel: str = "fwd") -> int:
    """The GQ of a launch: the largest allowed divisor of the GQA group size G."""
    for gq in GROUP_HEADS:
        if G % gq == 0 and gq * nt <= MAX_GROUP_ELEMENTS[kernel]:
            return gq
    return 1


def _attention_expressions() -> Tuple[str, ...]:
    exprs = []
    for t in DTYPE_NAMES:
        for nt in HEAD_DIM_CHUNKS:
            for gq in GROUP_HEADS:
                if gq * nt <= MAX_GROUP_ELEMENTS["fwd"]:
                    exprs.append(f"attn_fwd<{t}, {nt}, {gq}>")
                if gq * nt <= MAX_GROUP_ELEMENTS["dq"]:
                    exprs.append(f"attn_bwd_dq<{t}, {nt}, {gq}>")
            exprs += [f"attn_fwd_merge<{t}, {nt}>", f"attn_bwd_dkdv<{t}, {nt}>",
                      f"sum_partials<{t}, {nt}>"]
        vec = VEC_ELEMENTS[t]
        for lpe in VEC_LANES:
            for gq in VEC_GROUP_HEADS:
                exprs.append(f"attn_fwd_vec<{t}, {lpe}, {gq}>")
            for gq in VEC_DQ_GROUP_HEADS:
                exprs.append(f"attn_bwd_dq_vec<{t}, {lpe}, {gq}>")
            exprs.append(f"attn_bwd_dkdv_vec<{t}, {lpe}>")
    return tuple(exprs)


# attn_fwd_vec: elements of a 16-byte vector, lanes per edge (one vector each), and query
# heads per warp (GQ = 8 spills on fp32).
VEC_ELEMENTS = {"float": 4, "__half": 8, "__nv_bfloat16": 8}
VEC_LANES = (4, 8, 16, 32)
VEC_GROUP_HEADS = (4, 2, 1)
VEC_DQ_GROUP_HEADS = (2, 1)      # q, dO and dQ vectors per head: GQ = 4 would spill


def vec_layout(dtype_name: str, D: int, Dv: int, G: int, kernel: str = "fwd"
               ) -> Optional[Tuple[int, int]]:
    """``(LPE, GQ)`` of attn_fwd_vec for these dims, or None when rows are not whole
    16-byte vectors or too wide for one vector per lane."""
    vec = VEC_ELEMENTS[dtype_name]
    width = max(D, Dv)
    if D % vec or Dv % vec or width > 32 * vec:
        return None
    lpe = next(n for n in VEC_LANES if n * vec >= width)
    heads = VEC_GROUP_HEADS if kernel == "fwd" else VEC_DQ_GROUP_HEADS
    gq = next(g for g in heads if G % g == 0)
    return lpe, gq


register_module(KernelModule("attention", "attention.cu", _attention_expressions()))
