"""The NVRTC compile gate: every kernel instantiation compiled for real GPUs, without one.

CuPy's ``RawModule`` compiles the ``.cu`` files at run time on the GPU it runs on; this module
compiles the same sources, with the same options, through the same NVRTC library, but for an
architecture named on the command line (``sm_80``, ``sm_90``), which needs no device and no
driver. ptxas' verbose report (``--ptxas-options=-v``) is parsed into one
:class:`KernelUsage` per name expression: registers, spill bytes, stack frame, static shared
memory. ``python -m attngraph.ops.cuda`` prints it as a table over :data:`loader.MODULES`.

Only ``cupy_backends.cuda.libs.nvrtc`` is used: CuPy's own compile path queries the device
for its compute capability and fails on a machine without a driver.
"""
from __future__ import annotations

import importlib
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from attngraph.ops.cuda import loader

__all__ = ["GateError", "GateUnavailable", "KernelUsage", "GateResult", "GateRow",
           "PIP_HINT", "check_arch", "nvrtc_version", "nvrtc_options", "compile_nvrtc",
           "select_modules", "gate_module", "run_gate"]

PIP_HINT = ("pip install cupy-cuda12x nvidia-cuda-nvrtc-cu12 nvidia-cuda-runtime-cu12"
            "  (or install attngraph's `test` extra: pip install -e '.[test]')")


class GateError(RuntimeError):
    """NVRTC rejected a source (or an option). ``log`` is the compiler's full log; the
    message carries it too, so a traceback alone shows the compiler's error."""

    def __init__(self, message: str, log: str, *, filename: str = "", arch: str = "",
                 options: Tuple[str, ...] = ()):
        super().__init__(f"{message}\n{log}" if log else message)
        self.log, self.filename, self.arch, self.options = log, filename, arch, options


class GateUnavailable(RuntimeError):
    """CuPy or the NVRTC library is not installed; the message says what to install."""


@dataclass(frozen=True)
class KernelUsage:
    """ptxas' resource report for one kernel instantiation on one architecture.

    Sizes are bytes. ``static_smem`` counts ``__shared__`` arrays only: ``extern __shared__``
    memory is sized at launch. ``cmem`` maps a constant bank to its bytes; ptxas prints it
    for some architectures only (sm_80 yes, sm_90 no), so it may be empty.
    """

    name_expression: str      # as registered, e.g. "edge_dot<float, 2>"
    lowered_name: str         # the mangled entry name NVRTC gave it
    arch: str                 # e.g. "sm_90"
    registers: int
    spill_stores: int
    spill_loads: int
    stack_frame: int
    static_smem: int
    barriers: int = 0
    cmem: Dict[int, int] = field(default_factory=dict)

    @property
    def spills(self) -> int:
        """Spill traffic per thread, stores plus loads (bytes)."""
        return self.spill_stores + self.spill_loads


@dataclass(frozen=True)
class GateResult:
    """One NVRTC compile: every name expression's usage, in registration order."""

    arch: str
    options: Tuple[str, ...]            # the full option list handed to NVRTC
    kernels: Dict[str, KernelUsage]     # name expression -> usage
    log: str                            # NVRTC's program log (ptxas lines included)
    cubin: bytes = field(repr=False)    # the SASS module, for cuobjdump / nvdisasm

    @property
    def warnings(self) -> Tuple[str, ...]:
        """Lines of the log that report a warning (front end or ptxas)."""
        return tuple(line for line in self.log.splitlines() if "warning" in line.lower())


@dataclass(frozen=True)
class GateRow:
    """One row of the gate's table: a module's kernel instantiation on one architecture."""

    module: str
    usage: KernelUsage

    def as_dict(self) -> dict:
        d = {"module": self.module, **asdict(self.usage)}
        d["cmem"] = {str(k): v for k, v in self.usage.cmem.items()}
        return d


# --------------------------------------------------------------------------------------
# NVRTC, loaded lazily so that this module imports without CuPy.

def _nvrtc():
    """``cupy_backends.cuda.libs.nvrtc`` with its shared library loaded, or a
    :class:`GateUnavailable` that says what to install."""
    try:
        nvrtc = importlib.import_module("cupy_backends.cuda.libs.nvrtc")
    except ImportError as e:
        raise GateUnavailable(
            f"the NVRTC compile gate needs CuPy ({e}); install it with:\n  {PIP_HINT}") from e
    try:
        # libnvrtc is opened on first use (CuPy finds it through cuda-pathfinder, which
        # looks in site-packages/nvidia/cuda_nvrtc/lib first): probe it here so a missing
        # library is reported as such, not as a failure of the first kernel.
        nvrtc.getVersion()
    except (RuntimeError, OSError) as e:
        reason = str(e).strip()
        raise GateUnavailable(
            f"CuPy is installed but the NVRTC library could not be loaded ({reason}); "
            f"install it with:\n  {PIP_HINT}") from e
    return nvrtc


def nvrtc_version() -> Tuple[int, int]:
    """(major, minor) of the NVRTC library the gate compiles with."""
    return tuple(_nvrtc().getVersion())


def check_arch(arch: str) -> str:
    """``arch`` if it names a real architecture (``sm_90``, ``sm_90a``), else ValueError."""
    if not isinstance(arch, str) or not re.fullmatch(r"sm_\d{2,3}[af]?", arch):
        raise ValueError(
            f"arch must name a real GPU architecture such as 'sm_80' or 'sm_90' (ptxas only "
            f"reports resources for SASS, not for a virtual 'compute_*' target); got {arch!r}")
    return arch


def _env_flag(name: str) -> bool:
    # Same reading as CuPy's own environment switches: "1" is on, anything else off.
    try:
        return int(os.environ.get(name, "0") or "0") == 1
    except ValueError:
        return False


def nvrtc_options(options: Sequence[str], arch: str) -> Tuple[str, ...]:
    """The option list CuPy hands NVRTC for ``cupy.RawModule(code, options=options)`` on a
    device of architecture ``arch``, plus ``--ptxas-options=-v``.

    ``options`` are the module's own options; the include directories the loader adds at run
    time (``-I`` :data:`loader.SOURCE_DIR` and :func:`loader.cuda_include_dirs`) are added
    here, so pass the module's ``options`` as registered.
    """
    arch = check_arch(arch)
    _nvrtc()  # CuPy and libnvrtc present, or an error that says what to install
    user = tuple(options) + tuple(
        f"-I{d}" for d in (str(loader.SOURCE_DIR),) + tuple(loader.cuda_include_dirs()))
    try:
        # CuPy's own assembly: default --std, the bundled CCCL headers first, cupy/_core/
        # include and the CUDA headers after the user's options. Taken from CuPy rather than
        # copied, so the gate follows the installed CuPy.
        from cupy._core.core import assemble_cupy_compiler_options
    except ImportError:
        assemble_cupy_compiler_options = None
    if assemble_cupy_compiler_options is not None:
        full = tuple(assemble_cupy_compiler_options(user))
    else:
        import cupy

        std = () if any("-std=" in o for o in user) else ("--std=c++14",)
        cupy_include = os.path.join(os.path.dirname(cupy.__file__), "_core", "include")
        full = std + user + (f"-I{cupy_include}",)
    # What cupy.cuda.compiler adds on the way to NVRTC (_compile_with_cache_cuda, then
    # _compile_using_nvrtc_no_warning): flush-to-zero changes code, as do debug builds; the
    # execution-space default decides what compiles at all. CuPy's optional --pch only
    # caches parsed headers and changes no code, so it is left out.
    full += ("-ftz=true",)
    if _env_flag("CUPY_CUDA_COMPILE_WITH_DEBUG"):
        full += ("--device-debug", "--generate-line-info")
    # CuPy asks for SASS (-arch=sm_XX) whenever NVRTC knows the device's architecture.
    full += (f"-arch={arch}", "--device-as-default-execution-space")
    return full + ("--ptxas-options=-v",)


# --------------------------------------------------------------------------------------
# ptxas' verbose report. Measured with NVRTC 12.9 (the lines come in this order per entry;
# a field whose value is zero, smem or cmem, is left out of the "Used" line):
#   ptxas info    : Compiling entry function '_Z1kI6__halfLi2EEvPKT_Pfi' for 'sm_80'
#   ptxas info    : Function properties for _Z1kI6__halfLi2EEvPKT_Pfi
#   ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
#   ptxas info    : Used 14 registers, used 1 barriers, 256 bytes smem, 372 bytes cmem[0]
# "Function properties for" also names non-inlined device functions, after the entries.

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '([^']+)'")
_PROPERTIES = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_BARRIERS = re.compile(r"used (\d+) barriers")
_SMEM = re.compile(r"(\d+) bytes smem")
_CMEM = re.compile(r"(\d+) bytes cmem\[(\d+)\]")


def _parse_ptxas(log: str) -> Dict[str, dict]:
    """Mangled entry name -> its resource fields, from ptxas' verbose lines in ``log``."""
    entries: Dict[str, dict] = {}
    current: Optional[dict] = None
    properties_of: Optional[str] = None
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            current = entries.setdefault(m.group(1), {"arch": m.group(2)})
            current["name"] = m.group(1)
            properties_of = None
            continue
        m = _PROPERTIES.search(line)
        if m:
            properties_of = m.group(1)
            continue
        m = _FRAME.search(line)
        if m:
            # only the entry's own frame line: a device function's belongs to that function
            if current is not None and properties_of == current["name"]:
                current.update(stack_frame=int(m.group(1)), spill_stores=int(m.group(2)),
                               spill_loads=int(m.group(3)))
            continue
        m = _USED.search(line)
        if m and current is not None:
            b, s = _BARRIERS.search(line), _SMEM.search(line)
            current.update(registers=int(m.group(1)), barriers=int(b.group(1)) if b else 0,
                           static_smem=int(s.group(1)) if s else 0,
                           cmem={int(bank): int(n) for n, bank in _CMEM.findall(line)})
    return entries


def compile_nvrtc(code: str, name_expressions: Iterable[str], options: Sequence[str],
                  arch: str, *, filename: str = "kernel.cu") -> GateResult:
    """Compile ``code`` for ``arch`` as ``cupy.RawModule`` would on such a GPU, and read
    ptxas' resource usage of every name expression.

    Args:
        code: CUDA C++ source; it may include headers beside the loader
            (``-I SOURCE_DIR``) and the CUDA runtime headers (``cuda_fp16.h`` ...).
        name_expressions: kernels to instantiate and report, e.g. ``"edge_dot<float, 2>"``.
        options: the module's NVRTC options (see :func:`nvrtc_options` for what is added).
        arch: a real architecture, ``"sm_80"`` or ``"sm_90"``.
        filename: the name the compiler's messages give the source.

    Returns:
        A :class:`GateResult` whose ``kernels`` follow the order of ``name_expressions``.

    Raises:
        GateError: NVRTC rejected the source or an option; the error carries the log.
        GateUnavailable: CuPy or libnvrtc is missing.
        ValueError: ``arch`` is not of the form ``sm_NN``.
    """
    name_expressions = tuple(name_expressions)
    if not name_expressions:
        raise ValueError("name_expressions is empty: give at least one kernel to compile, "
                         "e.g. ('edge_dot<float, 2>',)")
    full = nvrtc_options(options, arch)
    nvrtc = _nvrtc()
    prog = nvrtc.createProgram(code, filename, (), ())
    try:
        for expr in name_expressions:
            nvrtc.addNameExpression(prog, expr)
        try:
            nvrtc.compileProgram(prog, full)
        except nvrtc.NVRTCError as e:
            log = _clean(nvrtc.getProgramLog(prog))
            hint = ""
            if not loader.cuda_include_dirs() and "cuda_fp16.h" in log:
                hint = (" (no directory with cuda_fp16.h was found: install "
                        "nvidia-cuda-runtime-cu12 or set CUDA_HOME)")
            raise GateError(f"NVRTC failed to compile {filename} for {arch}: {e}{hint}", log,
                            filename=filename, arch=arch, options=full) from None
        log = _clean(nvrtc.getProgramLog(prog))
        lowered = {expr: nvrtc.getLoweredName(prog, expr) for expr in name_expressions}
        cubin = bytes(nvrtc.getCUBIN(prog))
    finally:
        nvrtc.destroyProgram(prog)

    found = _parse_ptxas(log)
    kernels: Dict[str, KernelUsage] = {}
    for expr in name_expressions:
        entry = found.get(lowered[expr])
        keys = ("registers", "stack_frame", "spill_stores", "spill_loads")
        if entry is None or any(k not in entry for k in keys):
            # ptxas always reports an entry it compiled; missing lines mean its format moved
            raise GateError(f"no ptxas resource report for {expr!r} ({lowered[expr]}) in the "
                            f"log of {filename} for {arch}; has ptxas' -v format changed?",
                            log, filename=filename, arch=arch, options=full)
        kernels[expr] = KernelUsage(
            name_expression=expr, lowered_name=lowered[expr], arch=entry["arch"],
            registers=entry["registers"], spill_stores=entry["spill_stores"],
            spill_loads=entry["spill_loads"], stack_frame=entry["stack_frame"],
            static_smem=entry.get("static_smem", 0), barriers=entry.get("barriers", 0),
            cmem=entry.get("cmem", {}))
    return GateResult(arch=arch, options=full, kernels=kernels, log=log, cubin=cubin)


def _clean(log) -> str:
    # NVRTC's log is a C string: CuPy hands back its trailing NUL.
    if isinstance(log, bytes):
        log = log.decode("utf-8", "replace")
    return log.replace("\x00", "").rstrip()


def select_modules(modules: Optional[Iterable[str]]) -> List[loader.KernelModule]:
    """The registered modules named in ``modules`` (all of them for ``None``)."""
    if modules is None:
        return list(loader.MODULES.values())
    chosen = []
    for name in modules:
        if name not in loader.MODULES:
            raise ValueError(f"no kernel module {name!r} in loader.MODULES; registered: "
                             f"{sorted(loader.MODULES) or 'none'}")
        chosen.append(loader.MODULES[name])
    return chosen


def gate_module(mod: loader.KernelModule, arch: str) -> List[GateRow]:
    """Compile one registered module for ``arch``: one row per name expression."""
    result = compile_nvrtc(loader.source(mod), mod.name_expressions, mod.options, arch,
                           filename=mod.file)
    return [GateRow(mod.name, usage) for usage in result.kernels.values()]


def run_gate(archs: Sequence[str], modules: Optional[Iterable[str]] = None) -> List[GateRow]:
    """Compile every name expression of ``modules`` (names in :data:`loader.MODULES`; all by
    default) for every architecture in ``archs``.

    Returns rows ordered by module, then architecture, then name expression. The first
    compile error raises :class:`GateError`; the command line keeps going instead.
    """
    archs = [check_arch(a) for a in archs]
    rows: List[GateRow] = []
    for mod in select_modules(modules):
        for arch in archs:
            rows += gate_module(mod, arch)
    return rows
