"""Run CUDA C++ kernels on CPU tensors, with CUDA semantics: ``cupy.RawModule`` on the host.

The same ``.cu`` source the GPU runs is compiled with the host C++ compiler (g++ >= 12,
``-std=c++20``) after ``attngraph_emu.h``, which gives it grid / block / thread indices,
warps of 32, ``__shared__`` memory (static and ``extern`` dynamic), ``__syncthreads``, the
warp collectives (``__shfl*_sync``, ``__syncwarp``, ``__ballot_sync``, ...), atomics and
``__half`` / ``__nv_bfloat16`` from the CUDA headers. A block's threads run as fibers on one
OS thread; blocks run on several. A kernel whose threads can never meet (different
barriers, a shuffle waiting for a lane that has exited) raises :class:`EmulatorError`
naming the kernel instead of hanging.

Example::

    mod = RawModule(code=src, options=("--std=c++17",), name_expressions=("k<64>",))
    mod.get_function("k<64>")((grid_x,), (128,), (tensor, np.int32(n)), shared_mem=0)

Arguments follow CuPy: tensors (CPU) and numpy arrays pass as pointers, ``None`` as a null
pointer, numpy scalars by value; each is checked against the kernel's parameter types.

The emulator is also a sanitizer. ``ATTNGRAPH_EMU_CHECK`` (a comma list of ``memcheck``,
``racecheck``, ``initcheck``, ``synccheck``, or ``all``: compute-sanitizer's names) turns on
checks whose findings raise :class:`SanitizerError`; ``ATTNGRAPH_EMU_SCHEDULE`` (``forward``,
``reverse`` or ``random[:seed]``) sets the order of a block's threads and of blocks. Both are
read at every launch. Shared memory lives in a per-block arena with redzones (static
``__shared__`` declarations are rewritten to it), poisoned at the start of every block. The
shared-memory checks and the random schedule need a build whose every load and store calls
back into the emulator (``-fsanitize=kernel-address`` with the callbacks attngraph_emu.h
defines); :func:`build_variant` tells which build the environment asks for. Launch limits
(threads and dimensions, grid, shared memory with the ``max_dynamic_shared_size_bytes``
opt-in, registers x threads from the NVRTC gate) are always checked, as on a GPU.

Builds are cached under ``$ATTNGRAPH_CACHE_DIR`` (default ``~/.cache/attngraph``) by a hash
of the source, the headers, the options and the compiler, so a module is compiled once.
Environment: ``CXX`` (compiler), ``ATTNGRAPH_EMU_THREADS`` (worker threads, default: the
usable cores), ``ATTNGRAPH_EMU_SANITIZE=address`` (build with AddressSanitizer; the
process must preload libasan), ``ATTNGRAPH_EMU_STACK_KB`` (fiber stack size).
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["RawModule", "RawKernel", "EmulatorError", "SanitizerError", "LaunchStats", "count",
           "COUNTER_NAMES", "CHECK_TOOLS", "checks", "schedule", "poison", "build_variant"]

HEADER = Path(__file__).resolve().parent / "attngraph_emu.h"

# Keep in step with `enum Counter` in attngraph_emu.h.
COUNTER_NAMES = (
    "load_bytes", "load_requests", "load_sectors", "store_bytes", "store_requests",
    "store_sectors", "atomic_bytes", "atomic_requests", "atomic_sectors",
    "unique_load_sectors", "unique_store_sectors", "barriers", "warp_ops", "threads", "blocks",
    "warps", "max_warp_load_requests",
)


class EmulatorError(RuntimeError):
    """A kernel could not be built or failed while running under the emulator."""


class SanitizerError(EmulatorError):
    """A finding of one of the emulator's checks (``ATTNGRAPH_EMU_CHECK``): ``tool`` is
    compute-sanitizer's name for it (``memcheck``, ``racecheck``, ``initcheck`` or
    ``synccheck``)."""

    def __init__(self, tool: str, message: str):
        super().__init__(message)
        self.tool = tool


# compute-sanitizer's tool names, in the order of `enum Tool` in attngraph_emu.h (bit i).
CHECK_TOOLS = ("memcheck", "racecheck", "initcheck", "synccheck")
SCHEDULES = ("forward", "reverse", "random")


def checks() -> Tuple[str, ...]:
    """The tools ``ATTNGRAPH_EMU_CHECK`` turns on (a comma list of :data:`CHECK_TOOLS`, or
    ``all``); read at every launch, so tests may set it."""
    raw = os.environ.get("ATTNGRAPH_EMU_CHECK", "").strip().lower()
    if raw in ("", "0", "none", "off"):
        return ()
    names = [n.strip() for n in raw.split(",") if n.strip()]
    if "all" in names:
        return CHECK_TOOLS
    bad = [n for n in names if n not in CHECK_TOOLS]
    if bad:
        raise ValueError(f"ATTNGRAPH_EMU_CHECK={raw!r}: unknown tool(s) {bad}; use a comma list "
                         f"of {', '.join(CHECK_TOOLS)}, or 'all'")
    return tuple(t for t in CHECK_TOOLS if t in names)


def schedule() -> Tuple[str, int]:
    """``ATTNGRAPH_EMU_SCHEDULE``: ``forward`` (default), ``reverse`` or ``random[:seed]`` ->
    (kind, seed)."""
    raw = os.environ.get("ATTNGRAPH_EMU_SCHEDULE", "").strip().lower() or "forward"
    kind, _, seed = raw.partition(":")
    if kind not in SCHEDULES or (seed and (kind != "random" or not seed.isdigit())):
        raise ValueError(f"ATTNGRAPH_EMU_SCHEDULE={raw!r}: use 'forward', 'reverse' or "
                         f"'random[:seed]' (seed a non-negative integer)")
    return kind, int(seed) if seed else 0


def _instrumented() -> bool:
    """A build whose every memory access calls the emulator: for the shared-memory checks and
    for the random schedule's switches inside a warp."""
    return bool(set(checks()) - {"synccheck"}) or schedule()[0] == "random"


def build_variant() -> Tuple[bool, str]:
    """What the environment changes in a build: (instrumented, ATTNGRAPH_EMU_SANITIZE)."""
    return _instrumented(), _sanitize()


def poison(t):
    """Fill a freshly allocated output or workspace with a signalling pattern (NaN, or -1 for
    integers) when initcheck is on, so a read of what no kernel wrote shows in the results;
    otherwise return it as it is."""
    if "initcheck" in checks() and t.device.type == "cpu" and t.numel():
        t.fill_(float("nan") if t.is_floating_point() else -1)
    return t


@dataclass
class LaunchStats:
    """What one emulated launch did. Sectors are 32-byte segments of global memory touched
    by one warp-level request (the same access site in the lanes of one warp)."""

    kernel: str
    grid: Tuple[int, int, int]
    block: Tuple[int, int, int]
    shared_mem: int
    counters: Dict[str, int] = field(default_factory=dict)

    def __getattr__(self, name):
        counters = self.__dict__.get("counters", {})
        if name in counters:
            return counters[name]
        raise AttributeError(name)


_recording = threading.local()


@contextlib.contextmanager
def count() -> Iterator[List[LaunchStats]]:
    """Count global-memory traffic of every emulated launch in the block::

        with count() as launches:
            kernel(grid, block, args)
        launches[0].load_sectors
    """
    prev = getattr(_recording, "launches", None)
    launches: List[LaunchStats] = []
    _recording.launches = launches
    try:
        yield launches
    finally:
        _recording.launches = prev


# ---------------------------------------------------------------------------- building
_EXTERN_SHARED = re.compile(
    r"extern\s+__shared__\s+(?:__align__\s*\(\s*\d+\s*\)\s*|alignas\s*\(\s*\d+\s*\)\s*)*"
    r"(?P<type>[A-Za-z_][\w:<>, ]*?)\s+(?:__align__\s*\(\s*\d+\s*\)\s*|alignas\s*\(\s*\d+\s*\)\s*)*"
    r"(?P<name>[A-Za-z_]\w*)\s*\[\s*\]\s*;")


def _rewrite_extern_shared(code: str) -> str:
    """``extern __shared__ T name[];`` -> a pointer to the launch's dynamic shared memory.

    In CUDA every such array aliases the block's dynamic buffer; here each becomes a pointer
    to that buffer (``shared_mem`` bytes of the block's arena, between redzones that memcheck
    and AddressSanitizer watch). Namespace-scope declarations become a macro.
    """
    out, pos = [], 0
    for m in _EXTERN_SHARED.finditer(code):
        depth = _brace_depth(code, m.start())
        t, name = m.group("type").strip(), m.group("name")
        if depth > 0:
            repl = f"{t}* const {name} = reinterpret_cast<{t}*>(::emu::dynamic_shared());"
        else:
            line = code.count("\n", 0, m.end()) + 1   # keep later lines' numbers
            repl = (f"\n#define {name} (reinterpret_cast<{t}*>(::emu::dynamic_shared()))\n"
                    f"#line {line}\n")
        out += [code[pos:m.start()], repl]
        pos = m.end()
    out.append(code[pos:])
    return "".join(out)


_STATIC_SHARED = re.compile(
    r"(?:\bstatic\s+)?\b__shared__\b(?P<body>(?:[^;{}()]|\([^()]*(?:\([^()]*\)[^()]*)*\))*);")
_ALIGN = re.compile(r"\b(?:__align__|alignas)\s*\(\s*(?P<n>[^()]*)\)")
_DECLARATOR = re.compile(r"^(?P<type>.*?)(?P<name>[A-Za-z_]\w*)\s*(?P<dims>(?:\[[^\]]*\]\s*)*)$", re.S)


def _split_top(text: str) -> List[str]:
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "([<":
            depth += 1
        elif ch in ")]>":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def _rewrite_static_shared(code: str) -> str:
    """``__shared__ T name[N];`` -> a reference to the block's copy in the emulator's shared
    memory arena (``emu::static_shared``), where each array has redzones around it and a
    shadow for the checks. A declaration the pattern does not understand stays a
    ``thread_local`` (correct, but unchecked)."""
    out, pos, ident = [], 0, 0
    for m in _STATIC_SHARED.finditer(code):
        line_start = code.rfind("\n", 0, m.start()) + 1
        if "//" in code[line_start:m.start()]:
            continue
        body = m.group("body")
        align = _ALIGN.search(body)
        body = _ALIGN.sub(" ", body)
        parts = [p.strip() for p in _split_top(body)]
        first = _DECLARATOR.match(parts[0])
        if first is None or not first.group("type").strip():
            continue
        base = first.group("type").strip()
        decls = [(first.group("name"), first.group("dims"))]
        for part in parts[1:]:
            d = _DECLARATOR.match(part)
            if d is None:
                break
            decls.append((d.group("name"), (d.group("type").strip() + d.group("dims")).strip()))
        else:
            depth = _brace_depth(code, m.start())
            repl = []
            for name, dims in decls:
                ptr = "".join(c for c in dims if c == "*")
                dims = "".join(c for c in dims if c != "*").strip()
                args = f'{ident}, "{name}"' + (f", {align.group('n')}" if align else "")
                ref = f"::emu::static_shared<{base}{ptr} {dims}>({args})"
                line = code.count("\n", 0, m.end()) + 1   # keep later lines' numbers
                repl.append(f"auto& {name} = {ref};" if depth > 0
                            else f"\n#define {name} ({ref})\n#line {line}\n")
                ident += 1
            out += [code[pos:m.start()], " ".join(repl)]
            pos = m.end()
    out.append(code[pos:])
    return "".join(out)


def _brace_depth(code: str, end: int) -> int:
    text = re.sub(r"//[^\n]*|/\*.*?\*/|\"(?:\\.|[^\"\\])*\"|'(?:\\.|[^'\\])*'", "",
                  code[:end], flags=re.S)
    return text.count("{") - text.count("}")


def _wrappers(name_expressions: Sequence[str]) -> str:
    lines = ["", "// ---- emulator entry points, one per name expression"]
    for i, expr in enumerate(name_expressions):
        lines += [
            f'extern "C" __attribute__((visibility("default"))) int attngraph_emu_launch_{i}('
            "const unsigned* grid, const unsigned* block, unsigned long long smem, int workers, "
            "int counting, unsigned long long* counters, char* err, unsigned long errlen, "
            "const void* config, void** args) {",
            f"  return ::emu::launch_kernel(&{expr}, grid, block, smem, workers, counting, "
            "reinterpret_cast<uint64_t*>(counters), err, errlen, "
            "static_cast<const ::emu::LaunchConfig*>(config), args);",
            "}",
            f'extern "C" __attribute__((visibility("default"))) const char* '
            f"attngraph_emu_signature_{i}() {{ return ::emu::signature(&{expr}); }}",
        ]
    return "\n".join(lines) + "\n"


def _translate_options(options: Sequence[str]) -> Tuple[List[str], List[str]]:
    """NVRTC options -> g++ flags (defines and include dirs); the rest have no host meaning."""
    flags, ignored = [], []
    it = iter(options)
    for opt in it:
        if opt in ("-D", "-I", "--define-macro", "--include-path"):
            val = next(it, "")
            flags.append(("-D" if opt in ("-D", "--define-macro") else "-I") + val)
        elif opt.startswith(("-D", "-I")):
            flags.append(opt)
        elif opt.startswith(("--define-macro=", "--include-path=")):
            key, val = opt.split("=", 1)
            flags.append(("-D" if key == "--define-macro" else "-I") + val)
        else:
            ignored.append(opt)   # --std=..., -arch, --use_fast_math, ...
    return flags, ignored


def _compiler() -> str:
    cxx = os.environ.get("CXX") or "g++"
    path = shutil.which(cxx)
    if path is None:
        raise EmulatorError(
            f"the CUDA emulator needs a host C++ compiler with C++20 (g++ >= 12) but "
            f"{cxx!r} was not found; install one (e.g. `apt-get install g++`) or set CXX")
    return path


def _compiler_id(cxx: str) -> str:
    try:
        return subprocess.run([cxx, "--version"], capture_output=True, text=True,
                              timeout=60).stdout.splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):  # pragma: no cover
        return cxx


def _cache_dir() -> Path:
    root = os.environ.get("ATTNGRAPH_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "attngraph")
    return Path(root) / "emu"


def _sanitize() -> str:
    return os.environ.get("ATTNGRAPH_EMU_SANITIZE", "").strip().lower()


def _local_includes(code: str, flags: Sequence[str]) -> List[str]:
    """Text of the ``#include "..."`` files the source finds in its -I dirs (for the cache
    key: a changed header rebuilds)."""
    texts = []
    for inc in re.findall(r'#\s*include\s+"([^"]+)"', code):
        for f in flags:
            p = Path(f[2:], inc) if f.startswith("-I") else None
            if p is not None and p.is_file():
                texts.append(p.read_text())
                break
    return texts


def _emulator_headers() -> List[str]:
    """Text of the emulator's own headers (for the cache key)."""
    return [p.read_text() for p in sorted(HEADER.parent.glob("attngraph_emu*.h"))]


def _include_has_cuda_fp16(flags: Sequence[str]) -> bool:
    return any(f.startswith("-I") and Path(f[2:], "cuda_fp16.h").is_file() for f in flags)


_BUILD_LOCK = threading.Lock()
builds = 0   # number of compiler runs in this process (tests check the cache with it)


def build(code: str, options: Sequence[str], name_expressions: Sequence[str],
          name: str = "kernel.cu") -> Tuple[Path, List[str]]:
    """Compile ``code`` for the emulator -> (the cached shared library, the compiler command
    that builds it)."""
    global builds
    flags, _ = _translate_options(options)
    if not _include_has_cuda_fp16(flags):
        from attngraph.ops.cuda.loader import cuda_include_dirs

        dirs = cuda_include_dirs()
        if not any(Path(d, "cuda_fp16.h").is_file() for d in dirs):
            raise EmulatorError(
                "the CUDA emulator needs the CUDA headers cuda_fp16.h / cuda_bf16.h: "
                "`pip install 'attngraph[gate]'` (cupy-cuda12x, nvidia-cuda-runtime-cu12, "
                "nvidia-cuda-nvcc-cu12), or set CUDA_HOME to a CUDA toolkit")
        flags += [f"-I{d}" for d in dirs]
    cxx = _compiler()
    sanitize = _sanitize()
    cmd_flags = ["-std=c++20", "-fPIC", "-shared", "-pthread", "-fno-strict-aliasing",
                 "-Wno-attributes", "-Wno-unknown-pragmas", f"-I{HEADER.parent}"]
    if sanitize and sanitize != "address":
        raise EmulatorError(f"ATTNGRAPH_EMU_SANITIZE={sanitize!r}: only 'address' is supported")
    if sanitize and _instrumented():
        raise EmulatorError("ATTNGRAPH_EMU_SANITIZE=address cannot be combined with the "
                            "shared-memory checks or the random schedule (ATTNGRAPH_EMU_CHECK / "
                            "ATTNGRAPH_EMU_SCHEDULE): use one or the other")
    if sanitize == "address":
        cmd_flags += ["-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer"]
    elif _instrumented():
        # every load and store calls back into the emulator (no sanitizer runtime is linked:
        # attngraph_emu.h defines the callbacks); -g lets findings name source lines
        cmd_flags += ["-O2", "-g", "-DATTNGRAPH_EMU_CHECKED=1", "-fsanitize=kernel-address",
                      "--param=asan-instrumentation-with-call-threshold=0",
                      "--param=asan-stack=0", "--param=asan-globals=0",
                      "-fno-sanitize-address-use-after-scope"]
    else:
        cmd_flags += ["-O2"]
    if os.environ.get("ATTNGRAPH_EMU_UCONTEXT"):
        cmd_flags += ["-DATTNGRAPH_EMU_UCONTEXT=1"]
    text = ("#define ATTNGRAPH_EMULATE 1\n#include \"attngraph_emu.h\"\n"
            f"#line 1 \"{name}\"\n" + _rewrite_static_shared(_rewrite_extern_shared(code))
            + _wrappers(name_expressions))
    key = hashlib.sha256("\0".join(
        [text, *_emulator_headers(), _compiler_id(cxx), *cmd_flags, *flags,
         *_local_includes(code, flags)]).encode()).hexdigest()[:24]
    out_dir = _cache_dir()
    lib = out_dir / f"{Path(name).stem}-{key}.so"
    command = [cxx, *cmd_flags, *flags, Path(name).stem + ".cpp", "-o", lib.name]
    if lib.is_file():
        return lib, command
    with _BUILD_LOCK:
        if lib.is_file():
            return lib, command
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
            src = Path(tmp, Path(name).stem + ".cpp")
            src.write_text(text)
            tmp_lib = Path(tmp, lib.name)
            cmd = [cxx, *cmd_flags, *flags, str(src), "-o", str(tmp_lib)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            builds += 1
            if proc.returncode != 0:
                raise EmulatorError(f"building {name} for the CUDA emulator failed:\n"
                                    f"{' '.join(cmd)}\n{proc.stderr[-8000:]}")
            os.replace(tmp_lib, lib)
    return lib, command


# ---------------------------------------------------------------------------- running
def _workers() -> int:
    env = os.environ.get("ATTNGRAPH_EMU_THREADS")
    if env:
        return max(1, int(env))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover
        return max(1, os.cpu_count() or 1)


def _dim3(v, what: str) -> Tuple[int, int, int]:
    if isinstance(v, (int, np.integer)):
        v = (int(v),)
    try:
        dims = tuple(int(x) for x in v)
    except TypeError:
        raise TypeError(f"{what} must be an int or a tuple of up to 3 ints, got {v!r}") from None
    if not 1 <= len(dims) <= 3 or any(d < 0 for d in dims):
        raise ValueError(f"{what} must have 1 to 3 non-negative entries, got {v!r}")
    return dims + (1,) * (3 - len(dims))


def _pointer(arg, i: int, kernel: str):
    import torch

    if arg is None:
        return ctypes.c_void_p(0)
    if isinstance(arg, torch.Tensor):
        if arg.device.type != "cpu":
            raise TypeError(f"{kernel}: argument {i} is a tensor on {arg.device}; the emulator "
                            f"runs on CPU tensors")
        return ctypes.c_void_p(arg.data_ptr() if arg.numel() else 0)
    if isinstance(arg, np.ndarray):
        return ctypes.c_void_p(arg.ctypes.data if arg.size else 0)
    raise TypeError(f"{kernel}: argument {i} is a pointer parameter; pass a CPU tensor, a "
                    f"numpy array or None, got {type(arg).__name__}")


def _scalar(arg, kind: str, i: int, kernel: str):
    if not isinstance(arg, np.generic):
        raise TypeError(f"{kernel}: argument {i} takes a value of kind {kind!r}; pass a numpy "
                        f"scalar of that type (e.g. numpy.int32(n)), got {type(arg).__name__}")
    size = int(kind[1:])
    dt = arg.dtype
    # "b" parameters (bool, __half, structs) take any scalar of their size, bit for bit
    if dt.itemsize != size or (kind[0] != "b" and dt.kind != kind[0]):
        raise TypeError(f"{kernel}: argument {i} has C++ kind {kind!r} ({size} bytes) but got "
                        f"numpy {dt}")
    return ctypes.create_string_buffer(arg.tobytes(), size)


class _LaunchConfig(ctypes.Structure):
    # keep in step with `struct LaunchConfig` in attngraph_emu.h
    _fields_ = [("checks", ctypes.c_uint32), ("schedule", ctypes.c_uint32),
                ("seed", ctypes.c_uint64), ("max_dynamic_smem", ctypes.c_uint64),
                ("smem_limit", ctypes.c_uint64), ("regs", ctypes.c_uint32),
                ("nranges", ctypes.c_uint32), ("ranges", ctypes.POINTER(ctypes.c_uint64))]


# Shared memory per block with the opt-in attribute (cudaDevAttrMaxSharedMemoryPerBlockOptin).
SMEM_LIMIT = {"sm_80": 163 * 1024, "sm_86": 99 * 1024, "sm_89": 99 * 1024, "sm_90": 227 * 1024}
DEFAULT_ARCH = "sm_80"
REGISTERS_PER_BLOCK = 65536


def _arch(options: Sequence[str]) -> str:
    """The architecture the options name (``-arch=sm_90``, ``--gpu-architecture=...``), else
    sm_80, the smallest the kernels target (its limits are the tighter ones)."""
    for i, opt in enumerate(options):
        for key in ("-arch=", "--gpu-architecture=", "-arch", "--gpu-architecture"):
            if opt.startswith(key):
                val = opt[len(key):] if key.endswith("=") else (
                    options[i + 1] if opt == key and i + 1 < len(options) else "")
                val = val.replace("compute_", "sm_")
                if val in SMEM_LIMIT:
                    return val
    return DEFAULT_ARCH


def _buffer_range(arg) -> Tuple[int, int]:
    """[begin, end) of the memory a pointer argument may reach: its whole storage."""
    import torch

    if isinstance(arg, torch.Tensor) and arg.numel():
        st = arg.untyped_storage()
        return st.data_ptr(), st.data_ptr() + st.nbytes()
    if isinstance(arg, np.ndarray) and arg.size:
        base = arg
        while isinstance(base.base, np.ndarray):
            base = base.base
        return base.ctypes.data, base.ctypes.data + base.nbytes
    return 0, 0


_PC = re.compile(r"\{pc:0x([0-9a-f]+)\}")


def _symbolize(message: str, lib: Path) -> str:
    """Replace the emulator's ``{pc:0x...}`` code addresses by source lines (addr2line on the
    checked build, which carries debug information)."""
    lines: Dict[str, str] = {}
    tool = shutil.which("addr2line")
    for pc in sorted(set(_PC.findall(message))) if tool else ():
        try:
            out = subprocess.run([tool, "-e", str(lib), "-i", f"0x{pc}"], capture_output=True,
                                 text=True, timeout=60).stdout.split()
        except (OSError, subprocess.SubprocessError):  # pragma: no cover
            continue
        # -i lists the inline chain innermost first: the first frame in kernel source
        frames = [f.split(" ")[0] for f in out if ":" in f and not f.startswith("??")]
        kernel = [f for f in frames if not Path(f.rsplit(":", 1)[0]).name.startswith("attngraph_emu")]
        if kernel or frames:
            file, _, line = (kernel or frames)[0].rpartition(":")
            # a `#line` name (the kernel's .cu file) comes back joined to the build directory
            lines[pc] = f"{file if Path(file).is_file() else Path(file).name}:{line}"
    return _PC.sub(lambda m: lines.get(m.group(1), f"<code offset 0x{m.group(1)}>"), message)


class RawKernel:
    """One kernel of a :class:`RawModule`: ``kernel(grid, block, args, shared_mem=0)``.

    ``max_dynamic_shared_size_bytes`` is CuPy's kernel attribute: dynamic shared memory
    beyond 48 KiB must be raised through it first, as on a GPU.
    """

    def __init__(self, module: "RawModule", lib: ctypes.CDLL, index: int, name: str):
        self.name = name
        self._module = module
        self.max_dynamic_shared_size_bytes = 0
        self._launch = getattr(lib, f"attngraph_emu_launch_{index}")
        self._launch.restype = ctypes.c_int
        self._launch.argtypes = [ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(ctypes.c_uint),
                                 ctypes.c_ulonglong, ctypes.c_int, ctypes.c_int,
                                 ctypes.POINTER(ctypes.c_ulonglong), ctypes.c_char_p,
                                 ctypes.c_ulong, ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)]
        sig = getattr(lib, f"attngraph_emu_signature_{index}")
        sig.restype = ctypes.c_char_p
        raw = sig().decode()
        self.signature: Tuple[str, ...] = tuple(raw.split(",")) if raw else ()

    def _config(self, args, nthreads: int):
        tools = checks()
        kind, seed = schedule()
        ranges = []
        if "memcheck" in tools:
            for a, k in zip(args, self.signature):
                ranges += _buffer_range(a) if k == "p" else (0, 0)
        arr = (ctypes.c_uint64 * max(1, len(ranges)))(*ranges)
        arch = self._module.arch
        cfg = _LaunchConfig(
            checks=sum(1 << CHECK_TOOLS.index(t) for t in tools),
            schedule=SCHEDULES.index(kind), seed=seed,
            max_dynamic_smem=int(self.max_dynamic_shared_size_bytes),
            smem_limit=SMEM_LIMIT[arch],
            # only a block of more than 256 threads can pass the limit at <= 255 registers
            regs=self._module.registers(self.name) if nthreads > 256 else 0,
            nranges=len(ranges) // 2, ranges=arr)
        return cfg, arr

    def __call__(self, grid, block, args, shared_mem: int = 0, stream=None) -> None:
        grid, block = _dim3(grid, "grid"), _dim3(block, "block")
        args = tuple(args)
        if len(args) != len(self.signature):
            raise TypeError(f"{self.name} takes {len(self.signature)} arguments "
                            f"({', '.join(self.signature)}), got {len(args)}")
        keep = []
        for i, (a, kind) in enumerate(zip(args, self.signature)):
            keep.append(_pointer(a, i, self.name) if kind == "p"
                        else _scalar(a, kind, i, self.name))
        argv = (ctypes.c_void_p * max(1, len(keep)))(
            *[ctypes.cast(ctypes.pointer(k), ctypes.c_void_p) if isinstance(k, ctypes.c_void_p)
              else ctypes.cast(k, ctypes.c_void_p) for k in keep])
        counters = (ctypes.c_ulonglong * len(COUNTER_NAMES))()
        err = ctypes.create_string_buffer(8192)
        launches = getattr(_recording, "launches", None)
        cfg, _ranges = self._config(args, block[0] * block[1] * block[2])
        rc = self._launch((ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block),
                          int(shared_mem), _workers(), int(launches is not None), counters,
                          err, len(err), ctypes.cast(ctypes.pointer(cfg), ctypes.c_void_p), argv)
        if rc != 0:
            msg = _symbolize(err.value.decode(errors="replace"), self._module.path)
            if rc & 0x100:
                tool = CHECK_TOOLS[(rc & 0xff).bit_length() - 1]
                raise SanitizerError(tool, f"{tool}: {self.name}: {msg}")
            raise EmulatorError(f"{self.name}: {msg}")
        if launches is not None:
            launches.append(LaunchStats(self.name, grid, block, int(shared_mem),
                                        dict(zip(COUNTER_NAMES, map(int, counters)))))


class RawModule:
    """``cupy.RawModule``'s interface on the CPU: build once, then ``get_function(name)``.

    Args:
        code: CUDA C++ source in the emulated subset.
        options: NVRTC-style options; ``-D`` / ``-I`` are honoured, the rest (``--std``,
            ``-arch``, ...) have no host meaning.
        name_expressions: the kernels (template instantiations) to export, e.g. ``"k<64>"``.
        name: file name used in diagnostics and ``#line``.
    """

    def __init__(self, code: str, options: Sequence[str] = (),
                 name_expressions: Sequence[str] = (), *, name: str = "kernel.cu"):
        if not name_expressions:
            raise ValueError("name_expressions must list the kernels to build, e.g. "
                             "('my_kernel', 'tmpl<float>')")
        self.name_expressions = tuple(name_expressions)
        self._code, self._options, self._name = code, tuple(options), name
        self.arch = _arch(self._options)
        self._registers: Optional[Dict[str, int]] = None
        self.path, command = build(code, tuple(options), self.name_expressions, name)
        self.command = " ".join(command)   # how the host compiler builds it (diagnostics)
        self._lib = ctypes.CDLL(str(self.path))
        self._kernels: Dict[str, RawKernel] = {}

    def get_function(self, name: str) -> RawKernel:
        if name not in self._kernels:
            try:
                index = self.name_expressions.index(name)
            except ValueError:
                raise ValueError(f"{name!r} is not among this module's name_expressions "
                                 f"{self.name_expressions}") from None
            self._kernels[name] = RawKernel(self, self._lib, index, name)
        return self._kernels[name]

    def registers(self, name: str) -> int:
        """Registers per thread of kernel ``name`` on this module's architecture, from the
        NVRTC compile gate (0 when NVRTC is not installed: the limit is then not checked)."""
        if self._registers is None:
            self._registers = _gate_registers(self._code, self.name_expressions, self._options,
                                              self.arch, self._name)
        return self._registers.get(name, 0)


_GATE_CACHE: Dict[str, Dict[str, int]] = {}


def _gate_registers(code: str, exprs: Tuple[str, ...], options: Tuple[str, ...], arch: str,
                    name: str) -> Dict[str, int]:
    key = hashlib.sha256("\0".join([code, *exprs, *options, arch]).encode()).hexdigest()
    if key not in _GATE_CACHE:
        from attngraph.ops.cuda import gate

        try:
            result = gate.compile_nvrtc(code, exprs, options, arch, filename=name)
            _GATE_CACHE[key] = {e: u.registers for e, u in result.kernels.items()}
        except (gate.GateUnavailable, gate.GateError):
            _GATE_CACHE[key] = {}
    return _GATE_CACHE[key]
