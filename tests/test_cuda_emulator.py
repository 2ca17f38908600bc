"""The CPU emulator of CUDA kernels does what CUDA specifies, and refuses what CUDA forbids.

Each test compiles a small kernel (builds are cached, so a rerun compiles nothing) and
checks one feature against values computed independently in torch.
"""
import os

import numpy as np
import pytest
import torch

from attngraph.ops.cuda import emulator
from attngraph.ops.cuda.emulator import EmulatorError, RawModule, count

FEATURES = r"""
#include <cuda_fp16.h>
#include <cuda_bf16.h>

// Each thread writes its id to shared memory; after the barrier it reads its neighbour's.
__global__ void barrier_order(int* out) {
  __shared__ int buf[256];
  const int t = threadIdx.x;
  buf[t] = t * 10 + blockIdx.x;
  __syncthreads();
  ag_store(out + blockIdx.x * blockDim.x + t, buf[(t + 1) % blockDim.x]);
}

// All four shuffles, with a sub-warp width.
__global__ void shuffles(const float* x, float* out, int width) {
  const int t = threadIdx.x;
  const float v = ag_load(x + t);
  float* o = out + 4 * t;
  ag_store(o + 0, __shfl_sync(0xffffffffu, v, 3, width));
  ag_store(o + 1, __shfl_up_sync(0xffffffffu, v, 2, width));
  ag_store(o + 2, __shfl_down_sync(0xffffffffu, v, 5, width));
  ag_store(o + 3, __shfl_xor_sync(0xffffffffu, v, 6, width));
}

// Votes and a partial-mask shuffle among the even lanes.
__global__ void votes(const int* pred, unsigned* out) {
  const int t = threadIdx.x;
  const int p = ag_load(pred + t);
  ag_store(out + 4 * t + 0, __ballot_sync(0xffffffffu, p));
  ag_store(out + 4 * t + 1, (unsigned)__any_sync(0xffffffffu, p));
  ag_store(out + 4 * t + 2, (unsigned)__all_sync(0xffffffffu, p));
  unsigned even = 0;
  if ((t & 1) == 0) even = __shfl_sync(0x55555555u, (unsigned)t * 7u, (t + 2) & 31);
  ag_store(out + 4 * t + 3, even);
}

// Threads past n exit before the barrier; the others must still get through it.
__global__ void early_exit(const float* x, float* out, int n) {
  __shared__ float buf[128];
  const int t = threadIdx.x;
  if (t >= n) return;
  buf[t] = ag_load(x + t);
  __syncthreads();
  ag_store(out + t, buf[n - 1 - t]);
}

// extern dynamic shared memory, sized by the launch; two arrays alias one buffer.
__global__ void dynamic_smem(const float* x, float* out, int n) {
  extern __shared__ float dyn[];
  extern __shared__ __align__(16) char raw[];
  const int t = threadIdx.x;
  for (int i = t; i < n; i += blockDim.x) dyn[i] = ag_load(x + blockIdx.x * n + i);
  __syncthreads();
  const float* again = reinterpret_cast<const float*>(raw);
  for (int i = t; i < n; i += blockDim.x) ag_store(out + blockIdx.x * n + i, again[n - 1 - i]);
}

// Atomics from every block and thread; blocks run on several host threads.
__global__ void atomics(float* fsum, unsigned long long* usum, int* imax) {
  const int g = blockIdx.x * blockDim.x + threadIdx.x;
  atomicAdd(fsum, 1.0f);
  atomicAdd(usum, (unsigned long long)g);
  atomicMax(imax, g);
}

// 2-D / 3-D indices.
__global__ void indices(int* out) {
  const int t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const int b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const int n = blockDim.x * blockDim.y * blockDim.z;
  ag_store(out + b * n + t, b * 1000 + t);
}

// Half and bfloat16 arithmetic from the CUDA headers, and a template.
template <class T>
__global__ void halves(const T* x, T* out, float scale) {
  const int t = threadIdx.x;
  const float v = static_cast<float>(ag_load(x + t));
  ag_store(out + t, static_cast<T>(v * scale));
}

// Deadlocks: two barriers, and a shuffle waiting for a lane that has exited.
__global__ void two_barriers(int* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

__global__ void shuffle_exited(int* out) {
  if (threadIdx.x == 7) return;
  out[threadIdx.x] = __shfl_sync(0xffffffffu, (int)threadIdx.x, 0);
}

__global__ void traps(int* out) {
  if (threadIdx.x == 3) __trap();
  out[threadIdx.x] = 1;
}

__global__ void reads_masked_out_lane(int* out) {
  if (threadIdx.x < 16) out[threadIdx.x] = __shfl_sync(0x0000ffffu, (int)threadIdx.x, 20);
}

// Coalescing: lane t reads element t * stride.
__global__ void strided_load(const float* x, float* out, int stride) {
  const int t = threadIdx.x;
  ag_store(out + t, ag_load(x + t * stride));
}

// A 16-byte vector load at a 4-byte boundary faults on a GPU.
__global__ void misaligned(const float* x, float* out) {
  const uint4 v = ag_load(reinterpret_cast<const uint4*>(x + 1));
  out[0] = __uint_as_float(v.x);
}

__global__ void scalars(long long* out, long long a, int b, float c, double d, unsigned e) {
  out[0] = a; out[1] = b; out[2] = (long long)(c * 4); out[3] = (long long)(d * 8); out[4] = e;
}
"""

NAMES = ("barrier_order", "shuffles", "votes", "early_exit", "dynamic_smem", "atomics",
         "indices", "halves<__half>", "halves<__nv_bfloat16>", "halves<float>", "two_barriers",
         "shuffle_exited", "traps", "reads_masked_out_lane", "strided_load", "scalars",
         "misaligned")


@pytest.fixture(scope="module")
def mod():
    return RawModule(code=FEATURES, options=("--std=c++17",), name_expressions=NAMES,
                     name="features.cu")


def test_barrier_orders_shared_memory(mod):
    out = torch.zeros(3 * 256, dtype=torch.int32)
    mod.get_function("barrier_order")((3,), (256,), (out,))
    t = torch.arange(256)
    want = torch.stack([((t + 1) % 256) * 10 + b for b in range(3)]).flatten()
    assert torch.equal(out.long(), want)


def _shuffle_ref(x, width):
    lanes = torch.arange(32)
    seg = lanes - lanes % width
    idx = seg + 3 % width
    up = torch.where(lanes - 2 >= seg, lanes - 2, lanes)
    down = torch.where(lanes + 5 < seg + width, lanes + 5, lanes)
    xo = lanes ^ 6
    xo = torch.where((xo >= seg) & (xo < seg + width), xo, lanes)
    return torch.stack([x[idx], x[up], x[down], x[xo]], dim=1)


@pytest.mark.parametrize("width", [32, 16, 8])
def test_shuffle_variants(mod, width):
    x = torch.randn(32)
    out = torch.zeros(32, 4)
    mod.get_function("shuffles")((1,), (32,), (x, out, np.int32(width)))
    assert torch.equal(out, _shuffle_ref(x, width))


def test_votes_and_partial_mask_shuffle(mod):
    pred = torch.zeros(64, dtype=torch.int32)
    pred[[1, 5, 31]] = 1              # warp 0: three lanes vote yes
    pred[32:] = 1                     # warp 1: every lane does
    out = torch.zeros(64, 4, dtype=torch.int32)
    mod.get_function("votes")((1,), (64,), (pred, out))
    out = out.long() & 0xFFFFFFFF
    ballot0 = (1 << 1) | (1 << 5) | (1 << 31)
    assert (out[:32, 0] == ballot0).all() and (out[32:, 0] == 0xFFFFFFFF).all()
    assert (out[:, 1] == 1).all()
    assert (out[:32, 2] == 0).all() and (out[32:, 2] == 1).all()
    t = torch.arange(64)
    src = ((t + 2) & 31) + 32 * (t // 32)           # even lanes read lane + 2 of their warp
    assert torch.equal(out[0::2, 3], (src[0::2] * 7))
    assert (out[1::2, 3] == 0).all()


def test_exited_threads_leave_the_barrier(mod, monkeypatch):
    # as on hardware since Volta; synccheck is stricter (see test_cuda_sanitizer.py)
    monkeypatch.setenv("ATTNGRAPH_EMU_CHECK",
                       ",".join(t for t in emulator.checks() if t != "synccheck"))
    x = torch.randn(128)
    out = torch.zeros(128)
    mod.get_function("early_exit")((1,), (128,), (x, out, np.int32(37)))
    assert torch.equal(out[:37], x[:37].flip(0)) and (out[37:] == 0).all()


def test_dynamic_shared_memory(mod):
    n = 300
    x = torch.randn(2 * n)
    out = torch.zeros(2 * n)
    mod.get_function("dynamic_smem")((2,), (64,), (x, out, np.int32(n)), shared_mem=4 * n)
    assert torch.equal(out.view(2, n), x.view(2, n).flip(1))


def test_atomics_across_blocks_and_host_threads(mod, monkeypatch):
    monkeypatch.setenv("ATTNGRAPH_EMU_THREADS", "2")
    f = torch.zeros(1)
    u = torch.zeros(1, dtype=torch.int64)
    m = torch.full((1,), -1, dtype=torch.int32)
    mod.get_function("atomics")((40,), (96,), (f, u, m))
    n = 40 * 96
    assert f.item() == n and u.item() == n * (n - 1) // 2 and m.item() == n - 1


def test_multidimensional_indices(mod):
    out = torch.zeros(2 * 3 * 2 * 4 * 3 * 2, dtype=torch.int32)
    mod.get_function("indices")((2, 3, 2), (4, 3, 2), (out,))
    b = torch.arange(12).view(-1, 1)
    t = torch.arange(24).view(1, -1)
    assert torch.equal(out.view(12, 24).long(), b * 1000 + t)


@pytest.mark.parametrize("dtype,name", [(torch.float16, "halves<__half>"),
                                        (torch.bfloat16, "halves<__nv_bfloat16>"),
                                        (torch.float32, "halves<float>")])
def test_half_types_and_templates(mod, dtype, name):
    x = torch.randn(64).to(dtype)
    out = torch.zeros(64, dtype=dtype)
    mod.get_function(name)((1,), (64,), (x, out, np.float32(0.75)))
    assert torch.equal(out, (x.float() * 0.75).to(dtype))


def test_different_barriers_deadlock_is_an_error(mod):
    out = torch.zeros(32, dtype=torch.int32)
    with pytest.raises(EmulatorError, match=r"two_barriers: deadlock in block \(0,0,0\).*"
                                            r"__syncthreads\(\) at features.cu:\d+.*"
                                            r"__syncthreads\(\) at features.cu:\d+"):
        mod.get_function("two_barriers")((1,), (32,), (out,))


def test_shuffle_with_an_exited_lane_is_an_error(mod):
    out = torch.zeros(32, dtype=torch.int32)
    with pytest.raises(EmulatorError, match=r"shuffle_exited: deadlock.*__shfl_sync.*"
                                            r"lane 7 has exited"):
        mod.get_function("shuffle_exited")((1,), (32,), (out,))


def test_trap_and_undefined_shuffle_source_are_errors(mod):
    out = torch.zeros(32, dtype=torch.int32)
    with pytest.raises(EmulatorError, match=r"traps: __trap\(\) in thread \(3,0,0\)"):
        mod.get_function("traps")((4,), (32,), (out,))
    with pytest.raises(EmulatorError, match=r"reads lane 20.*not in the mask"):
        mod.get_function("reads_masked_out_lane")((1,), (32,), (out,))


def test_misaligned_vector_access_is_an_error(mod):
    x, out = torch.zeros(64), torch.zeros(1)
    with pytest.raises(EmulatorError, match=r"misaligned: misaligned address: load of 16 bytes"
                                            r".*thread \(0,0,0\).*features.cu:\d+"):
        mod.get_function("misaligned")((1,), (1,), (x, out))


def test_a_failed_launch_leaves_the_module_usable(mod):
    out = torch.zeros(32, dtype=torch.int32)
    with pytest.raises(EmulatorError):
        mod.get_function("two_barriers")((3,), (32,), (out,))
    test_barrier_orders_shared_memory(mod)


@pytest.mark.parametrize("stride,sectors", [(1, 4), (2, 8), (8, 32), (64, 32)])
def test_sector_counts_show_coalescing(mod, stride, sectors):
    x = torch.randn(32 * 64)
    out = torch.zeros(32)
    with count() as launches:
        mod.get_function("strided_load")((1,), (32,), (x, out, np.int32(stride)))
    (s,) = launches
    assert s.kernel == "strided_load" and s.grid == (1, 1, 1) and s.block == (32, 1, 1)
    assert s.load_bytes == 128 and s.load_requests == 1 and s.load_sectors == sectors
    assert s.store_bytes == 128 and s.store_requests == 1 and s.store_sectors == 4
    assert torch.equal(out, x[::stride][:32])


def test_scalar_arguments_by_value_and_checked(mod):
    out = torch.zeros(5, dtype=torch.int64)
    k = mod.get_function("scalars")
    assert k.signature == ("p", "i8", "i4", "f4", "f8", "u4")
    k((1,), (1,), (out, np.int64(-(2 ** 40)), np.int32(-7), np.float32(2.5), np.float64(0.25),
                   np.uint32(2 ** 32 - 1)))
    assert out.tolist() == [-(2 ** 40), -7, 10, 2, 2 ** 32 - 1]
    with pytest.raises(TypeError, match=r"argument 2 has C\+\+ kind 'i4'.*int64"):
        k((1,), (1,), (out, np.int64(1), np.int64(1), np.float32(1), np.float64(1), np.uint32(1)))
    with pytest.raises(TypeError, match="pass a numpy scalar"):
        k((1,), (1,), (out, 1, np.int32(1), np.float32(1), np.float64(1), np.uint32(1)))
    with pytest.raises(TypeError, match="takes 6 arguments"):
        k((1,), (1,), (out,))
    with pytest.raises(TypeError, match="pointer parameter"):
        k((1,), (1,), (3.0, np.int64(1), np.int32(1), np.float32(1), np.float64(1),
                       np.uint32(1)))


def test_invalid_launch_configurations(mod):
    out = torch.zeros(2048, dtype=torch.int32)
    k = mod.get_function("barrier_order")
    with pytest.raises(EmulatorError, match="at most 1024 threads"):
        k((1,), (2048,), (out,))
    with pytest.raises(EmulatorError, match="invalid configuration"):
        k((0,), (32,), (out,))
    with pytest.raises(EmulatorError, match="dynamic shared memory"):
        k((1,), (32,), (out,), shared_mem=300_000)
    with pytest.raises(ValueError, match="not among this module's name_expressions"):
        mod.get_function("nope")


def test_builds_are_cached(mod):
    before = emulator.builds
    again = RawModule(code=FEATURES, options=("--std=c++17",), name_expressions=NAMES,
                      name="features.cu")
    assert emulator.builds == before and again.path == mod.path


def test_compile_errors_and_missing_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNGRAPH_CACHE_DIR", str(tmp_path))
    with pytest.raises(EmulatorError, match=r"building bad.cu for the CUDA emulator failed"
                                            r"(.|\n)*not_declared"):
        RawModule(code="__global__ void k(int* x) { x[0] = not_declared; }",
                  name_expressions=("k",), name="bad.cu")
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    with pytest.raises(EmulatorError, match=r"needs a host C\+\+ compiler.*no-such-compiler"):
        RawModule(code="__global__ void k(int* x) {}", name_expressions=("k",))


def test_ucontext_fallback_runs_the_same_kernels(monkeypatch, tmp_path):
    """Hosts without the hand-written x86-64 switch use ucontext; it must agree."""
    monkeypatch.setenv("ATTNGRAPH_EMU_UCONTEXT", "1")
    m = RawModule(code=FEATURES, name_expressions=("barrier_order", "shuffles",
                                                   "early_exit", "two_barriers"),
                  name="features.cu")
    test_barrier_orders_shared_memory(m)
    test_shuffle_variants(m, 16)
    test_exited_threads_leave_the_barrier(m, monkeypatch)
    test_different_barriers_deadlock_is_an_error(m)


ASAN_PROBE = r"""
import sys, numpy as np, torch
from attngraph.ops.cuda.emulator import RawModule
src = '''
__global__ void past_end(const float* x, float* out, int n) {
  ag_store(out + threadIdx.x, ag_load(x + threadIdx.x + n));   // n = 1: lane 31 reads x[32]
}
__global__ void smem_past_end(float* out) {
  extern __shared__ float dyn[];
  dyn[threadIdx.x + 1] = 1.0f;                                  // 32 floats of dynamic smem
  out[threadIdx.x] = dyn[threadIdx.x];
}
'''
m = RawModule(code=src, name_expressions=("past_end", "smem_past_end"), name="oob.cu")
x, out = torch.zeros(32), torch.zeros(32)
if sys.argv[1] == "global":
    m.get_function("past_end")((1,), (32,), (x, out, np.int32(1)))
else:
    m.get_function("smem_past_end")((1,), (32,), (out,), shared_mem=32 * 4)
"""


def _libasan():
    import shutil
    import subprocess

    cc = shutil.which("gcc")
    if cc is None:
        return None
    path = subprocess.run([cc, "-print-file-name=libasan.so"], capture_output=True,
                          text=True).stdout.strip()
    return path if path.startswith("/") else None


@pytest.fixture(scope="module")
def asan_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("asan-cache")


@pytest.mark.parametrize("where", ["global", "shared"])
def test_address_sanitizer_reports_out_of_bounds_accesses(where, asan_cache):
    """The emulated build under AddressSanitizer stands in for compute-sanitizer memcheck:
    a read one element past a tensor and a write past the dynamic shared memory are reported."""
    import os
    import subprocess
    import sys

    lib = _libasan()
    if lib is None:
        pytest.skip("gcc's libasan is not installed")
    env = dict(os.environ, LD_PRELOAD=lib, ASAN_OPTIONS="detect_leaks=0",
               ATTNGRAPH_EMU_SANITIZE="address", ATTNGRAPH_CACHE_DIR=str(asan_cache),
               ATTNGRAPH_EMU_CHECK="", ATTNGRAPH_EMU_SCHEDULE="")
    proc = subprocess.run([sys.executable, "-c", ASAN_PROBE, where], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode != 0
    # shared memory lives in the emulator's arena, whose redzones are poisoned
    want = "heap-buffer-overflow" if where == "global" else "use-after-poison"
    assert f"AddressSanitizer: {want}" in proc.stderr
    assert "oob.cu" in proc.stderr          # the report points at the kernel source line


def test_builds_with_the_pip_wheels_cuda_headers(monkeypatch, tmp_path):
    """Without a CUDA toolkit the headers come from the wheels of the `gate` extra."""
    from attngraph.ops.cuda import loader

    dirs = loader.wheel_include_dirs()
    assert dirs, "the test extra installs nvidia-cuda-runtime-cu12, -nvcc-cu12 and cupy"
    monkeypatch.setenv("ATTNGRAPH_CUDA_INCLUDE", os.pathsep.join(dirs))
    monkeypatch.setenv("ATTNGRAPH_CACHE_DIR", str(tmp_path))
    m = RawModule(code=FEATURES, name_expressions=("halves<__half>", "halves<__nv_bfloat16>"),
                  name="features.cu")
    assert all(f"-I{d}" in m.command for d in dirs)
    test_half_types_and_templates(m, torch.bfloat16, "halves<__nv_bfloat16>")


def test_missing_cuda_headers_say_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNGRAPH_CUDA_INCLUDE", str(tmp_path))
    with pytest.raises(EmulatorError, match=r"cuda_fp16\.h.*pip install 'attngraph\[gate\]'"):
        RawModule(code=FEATURES, name_expressions=("barrier_order",), name="features.cu")
