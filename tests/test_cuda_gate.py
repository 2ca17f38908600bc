"""The NVRTC compile gate: real sm_80 / sm_90 compiles without a GPU, ptxas' report parsed.

Compiling needs CuPy and libnvrtc (the `test` extra installs them) but no device; the parser
and the error paths are also tested on their own.
"""
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from attngraph.ops.cuda import gate, loader

ARCHS = ["sm_80", "sm_90"]
REPO = Path(__file__).resolve().parents[1]

# A template kernel touching what attngraph's kernels use: half / bfloat16 storage, warp
# shuffles, static and dynamic shared memory. The static tile is W * TILE * sizeof(T) bytes,
# so its size tells the instantiations apart in ptxas' report.
TILE = 48
SOURCE = r"""
#include <cuda_fp16.h>
#include <cuda_bf16.h>

__device__ inline float to_float(__half v) { return __half2float(v); }
__device__ inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T, int W>
__global__ void warp_reduce(const T* __restrict__ x, float* __restrict__ out, int n) {
  __shared__ T tile[W * %(tile)d];
  extern __shared__ float partial[];
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  tile[threadIdx.x %% (W * %(tile)d)] = i < n ? x[i] : T(0.0f);
  __syncthreads();
  float v = to_float(tile[(threadIdx.x + 1) %% (W * %(tile)d)]);
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  if (threadIdx.x %% 32 == 0) partial[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x == 0) out[blockIdx.x] = partial[0] * W;
}
""" % {"tile": TILE}
NAMES = {"warp_reduce<__half, 1>": 2 * TILE, "warp_reduce<__nv_bfloat16, 4>": 4 * 2 * TILE}

# Four float4 rows kept live across a loop: at the 24-register floor ptxas must spill.
SPILLING_SOURCE = r"""
__global__ void pressure(const float4* __restrict__ x, float* __restrict__ y, int n) {
  float4 a[12];
#pragma unroll
  for (int i = 0; i < 12; ++i) a[i] = x[i * n + threadIdx.x];
  float s = 0.0f;
#pragma unroll
  for (int i = 0; i < 12; ++i)
    s += a[i].x * a[(i + 3) % 12].y + a[(i + 5) % 12].z * a[(i + 7) % 12].w;
#pragma unroll
  for (int i = 0; i < 12; ++i) s = s * a[i].w + a[11 - i].x;
  y[threadIdx.x] = s;
}
"""

# ptxas' -v lines as NVRTC 12.9 prints them, a non-inlined device function included.
PTXAS_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z4heavyPfi' for 'sm_80'
ptxas info    : Function properties for _Z4heavyPfi
ptxas         .     192 bytes stack frame, 184 bytes spill stores, 204 bytes spill loads
ptxas info    : Used 24 registers, used 1 barriers, 512 bytes smem, 372 bytes cmem[0], 8 bytes cmem[2]
ptxas info    : Compile time = 5.355 ms
ptxas info    : Compiling entry function '_Z5lightPfi' for 'sm_80'
ptxas info    : Function properties for _Z5lightPfi
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 12 registers, used 0 barriers
ptxas info    : Compile time = 1.877 ms
ptxas info    : Function properties for _Z6helperPKfi
ptxas         .     64 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads
"""


def _registered():
    """Every (module, name expression) the gate must report, as the command line sees it:
    importing the package runs whatever registration its ``__init__`` does."""
    import attngraph.ops.cuda  # noqa: F401

    return {(m.name, expr) for m in loader.MODULES.values() for expr in m.name_expressions}


def test_parse_ptxas_reads_each_entry_and_skips_device_functions():
    entries = gate._parse_ptxas(PTXAS_LOG)
    assert set(entries) == {"_Z4heavyPfi", "_Z5lightPfi"}
    heavy, light = entries["_Z4heavyPfi"], entries["_Z5lightPfi"]
    assert (heavy["registers"], heavy["stack_frame"], heavy["spill_stores"],
            heavy["spill_loads"], heavy["static_smem"], heavy["barriers"]) == (
        24, 192, 184, 204, 512, 1)
    assert heavy["cmem"] == {0: 372, 2: 8}
    # zero smem / cmem are left out of the "Used" line; the helper's frame is not light's
    assert (light["registers"], light["stack_frame"], light["spill_stores"],
            light["static_smem"], light["cmem"]) == (12, 0, 0, 0, {})


@pytest.mark.parametrize("arch", ["compute_90", "90", "sm90", ""])
def test_virtual_or_malformed_arch_is_refused(arch):
    with pytest.raises(ValueError, match="real GPU architecture"):
        gate.check_arch(arch)


def test_missing_cupy_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy_backends.cuda.libs.nvrtc", None)
    with pytest.raises(gate.GateUnavailable, match="pip install cupy-cuda12x"):
        gate.nvrtc_version()


def test_missing_libnvrtc_says_what_to_install(monkeypatch):
    def get_version():
        raise RuntimeError('Failure finding "libnvrtc.so.12"')

    fake = types.SimpleNamespace(getVersion=get_version)
    monkeypatch.setitem(sys.modules, "cupy_backends.cuda.libs.nvrtc", fake)
    with pytest.raises(gate.GateUnavailable, match=r"(?s)libnvrtc\.so\.12.*nvidia-cuda-nvrtc-cu12"):
        gate.nvrtc_version()


@pytest.fixture(scope="module")
def nvrtc():
    pytest.importorskip("cupy")
    try:
        gate.nvrtc_version()
    except gate.GateUnavailable as e:
        pytest.skip(str(e))


@pytest.mark.parametrize("arch", ARCHS)
def test_compile_reports_sane_usage(nvrtc, arch):
    result = gate.compile_nvrtc(SOURCE, list(NAMES), ("--std=c++17",), arch,
                                filename="warp_reduce.cu")
    assert list(result.kernels) == list(NAMES)
    assert f"-arch={arch}" in result.options and "-ftz=true" in result.options
    assert result.cubin[:4] == b"\x7fELF"
    for expr, usage in result.kernels.items():
        assert usage.arch == arch
        assert usage.lowered_name.startswith("_Z") and "warp_reduce" in usage.lowered_name
        assert 0 < usage.registers <= 255
        assert usage.spill_stores >= 0 and usage.spill_loads >= 0 and usage.stack_frame >= 0
        # extern __shared__ is sized at launch: only the static tile counts
        assert usage.static_smem == NAMES[expr]
        assert usage.barriers >= 1


@pytest.mark.parametrize("arch", ARCHS)
def test_gate_compiles_what_cupy_rawmodule_compiles(nvrtc, arch, monkeypatch):
    # Run CuPy's own RawModule compile path (core.compile_with_cache, as _get_raw_module
    # calls it) with only its device queries answered for it, and the final module load
    # captured: the gate must hand NVRTC the same options, so the SASS is the same.
    from cupy._core import core
    from cupy.cuda import compiler, function

    hooks = ("_get_arch", "_get_arch_for_options_for_nvrtc", "function")
    if not all(hasattr(compiler, h) for h in hooks) or not hasattr(core, "compile_with_cache"):
        pytest.skip("this CuPy's compile path is laid out differently")

    class Captured(function.Module):
        def load(self, cubin):
            self.cubin = bytes(cubin)

    cc = arch[len("sm_"):]
    monkeypatch.setenv("CUPY_CACHE_IN_MEMORY", "1")  # no kernel cache read or written
    monkeypatch.setattr(compiler, "_get_arch", lambda: cc)
    monkeypatch.setattr(compiler, "_get_arch_for_options_for_nvrtc",
                        lambda arch=None: (f"-arch=sm_{arch or cc}", "cubin"))
    monkeypatch.setattr(compiler, "function", types.SimpleNamespace(Module=Captured))
    options = ("--std=c++17",)
    runtime_options = options + tuple(   # what loader._cupy_module passes to RawModule
        f"-I{d}" for d in (str(loader.SOURCE_DIR),) + loader.cuda_include_dirs())
    mod = core.compile_with_cache(SOURCE, runtime_options + ("--ptxas-options=-v",),
                                  prepend_cupy_headers=False, name_expressions=tuple(NAMES))

    result = gate.compile_nvrtc(SOURCE, list(NAMES), options, arch)
    assert mod.mapping == {e: u.lowered_name for e, u in result.kernels.items()}
    assert mod.cubin == result.cubin


@pytest.mark.parametrize("arch", ARCHS)
def test_spills_are_reported(nvrtc, arch):
    result = gate.compile_nvrtc(SPILLING_SOURCE, ["pressure"], ("-maxrregcount=24",), arch)
    usage = result.kernels["pressure"]
    assert usage.registers <= 24
    assert usage.spill_stores > 0 and usage.spill_loads > 0 and usage.stack_frame > 0


def test_syntax_error_raises_gate_error_with_compiler_text(nvrtc):
    broken = SOURCE.replace("const int i =", "const int i ==")
    with pytest.raises(gate.GateError) as info:
        gate.compile_nvrtc(broken, list(NAMES), (), "sm_90", filename="broken.cu")
    assert "broken.cu(" in info.value.log and "error" in info.value.log
    assert info.value.log in str(info.value)
    assert info.value.arch == "sm_90"


def test_unknown_name_expression_raises_gate_error(nvrtc):
    with pytest.raises(gate.GateError, match="warp_reduse"):
        gate.compile_nvrtc(SOURCE, ["warp_reduse<__half, 1>"], (), "sm_80")


def _fake_module(monkeypatch, code, name="fake"):
    """Register ``code`` as a kernel module without a file beside the loader."""
    mod = loader.KernelModule(name=name, file=f"{name}.cu", name_expressions=("pressure",),
                              options=("-maxrregcount=24",))
    monkeypatch.setitem(loader.MODULES, name, mod)
    monkeypatch.setattr(loader, "source", lambda m: code if m is mod else m.path.read_text())
    return mod


def test_cli_spill_bounds(nvrtc, monkeypatch, capsys):
    from attngraph.ops.cuda.__main__ import main

    _fake_module(monkeypatch, SPILLING_SOURCE)
    argv = ["--arch", "sm_90", "--module", "fake"]
    assert main(argv) == 0
    assert main(argv + ["--max-spill", "1000000"]) == 0
    assert main(argv + ["--max-spill", "0"]) == 2
    assert main(argv + ["--fail-on-spill"]) == 1
    assert "pressure" in capsys.readouterr().out


def test_cli_compile_error_prints_log_and_exits_1(nvrtc, monkeypatch, capsys):
    from attngraph.ops.cuda.__main__ import main

    _fake_module(monkeypatch, SPILLING_SOURCE.replace("float s = 0.0f;", "float s = ;"))
    assert main(["--arch", "sm_80", "--module", "fake"]) == 1
    assert "fake.cu(" in capsys.readouterr().err


def test_cli_without_cupy_exits_3_with_install_line(monkeypatch, capsys):
    from attngraph.ops.cuda.__main__ import main

    monkeypatch.setitem(sys.modules, "cupy_backends.cuda.libs.nvrtc", None)
    assert main(["--arch", "sm_90"]) == 3
    assert gate.PIP_HINT in capsys.readouterr().err


def test_cli_unknown_module_is_a_usage_error(capsys):
    from attngraph.ops.cuda.__main__ import main

    with pytest.raises(SystemExit) as info:
        main(["--module", "no_such_module"])
    assert info.value.code == 2
    assert "no_such_module" in capsys.readouterr().err


def test_cli_compiles_every_registered_kernel(nvrtc, tmp_path):
    out = tmp_path / "gate.json"
    proc = subprocess.run(
        [sys.executable, "-m", "attngraph.ops.cuda", "--arch", *ARCHS, "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())["rows"]
    seen = {(r["module"], r["name_expression"], r["arch"]) for r in rows}
    expected = {(m, expr, arch) for m, expr in _registered() for arch in ARCHS}
    assert seen == expected
    for _, expr, _ in expected:
        assert expr in proc.stdout
    assert "compiled by NVRTC" in proc.stdout.splitlines()[-1]
    # no kernel serving head dims up to 128 may spill, on either arch
    for r in rows:
        if _max_head_dim(r["name_expression"]) <= 128:
            assert r["spill_stores"] == r["spill_loads"] == 0, r


def _max_head_dim(expr: str) -> int:
    """Widest head dim an instantiation serves: 32 * NT (elements per lane), or LPE * VEC
    for attn_fwd_vec; 0 for kernels without a head-dim parameter."""
    name, _, targs = expr.partition("<")
    args = [a.strip() for a in targs.rstrip(">").split(",")]
    if len(args) < 2:
        return 0
    if name == "attn_fwd_vec":
        return int(args[1]) * (4 if args[0] == "float" else 8)
    return 32 * int(args[1])
