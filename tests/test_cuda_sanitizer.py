"""The emulator as a sanitizer: each kernel below carries one bug that only a GPU shows, and
the tool that compute-sanitizer would use finds it, naming the kernel and the source line.
Clean kernels pass every tool under every schedule, with bitwise-equal results.

``ATTNGRAPH_EMU_CHECK`` and ``ATTNGRAPH_EMU_SCHEDULE`` are read at every launch; the checked
build is another module (``_instrumented``), so each test makes its module after setting them.
"""
import re

import numpy as np
import pytest
import torch

from attngraph.ops.cuda import emulator
from attngraph.ops.cuda.emulator import EmulatorError, RawModule, SanitizerError

BUGS = r"""
// racecheck, read-after-write: warp 1 reads what warp 0 wrote, with no barrier.
__global__ void raw_across_warps(float* out) {
  __shared__ float buf[64];
  const int t = threadIdx.x;
  if (t < 32) buf[t] = t;
  else ag_store(out + t, buf[t - 32]);                     // LINE raw_read
}

// racecheck, write-after-read: warp 1 overwrites what warp 0 is reading.
__global__ void war_across_warps(float* out) {
  __shared__ float buf[64];
  const int t = threadIdx.x;
  buf[t] = t;
  __syncthreads();
  if (t < 32) ag_store(out + t, buf[t + 32]);              // LINE war_read
  else buf[t] = 0.0f;                                      // LINE war_write
}

// racecheck inside one warp: lanes are not in lockstep, so the exchange needs __syncwarp().
__global__ void race_in_warp(float* out, int sync) {
  __shared__ float buf[32];
  const int t = threadIdx.x;
  buf[t] = t * 2.0f;
  if (sync) __syncwarp();
  ag_store(out + t, buf[(t + 1) % 32]);                    // LINE warp_read
}

// initcheck: threads 0..31 read buf[63..32], which no thread wrote.
__global__ void uninitialized_read(float* out) {
  __shared__ float buf[64];
  const int t = threadIdx.x;
  if (t < 32) buf[t] = t;
  __syncthreads();
  ag_store(out + t, buf[63 - t]);                          // LINE uninit_read
}

// synccheck: a barrier only half the block reaches.
__global__ void half_barrier(float* out) {
  __shared__ float buf[64];
  const int t = threadIdx.x;
  buf[t] = t;
  if (t < 32) __syncthreads();                             // LINE half_barrier
  ag_store(out + t, 1.0f);
}

// synccheck: a full-mask shuffle inside a branch half the warp takes.
__global__ void shuffle_in_branch(float* out) {
  const int t = threadIdx.x;
  float v = t;
  if (t < 16) v = __shfl_sync(0xffffffffu, v, t + 1);      // LINE branch_shuffle
  ag_store(out + t, v);
}

// synccheck: a collective executed by lanes outside its mask.
__global__ void outside_mask(float* out) {
  const int t = threadIdx.x;
  ag_store(out + t, __shfl_sync(0x0000ffffu, (float)t, 0)); // LINE outside_mask
}

// memcheck: a write one element past the dynamic shared memory given at launch.
__global__ void past_dynamic(float* out) {
  extern __shared__ float dyn[];
  const int t = threadIdx.x;
  dyn[t + 1] = 1.0f;                                       // LINE past_dynamic
  __syncthreads();
  ag_store(out + t, dyn[t]);
}

// memcheck: a write one element past a static array.
__global__ void past_static(float* out) {
  __shared__ float first[32];
  __shared__ float second[32];
  const int t = threadIdx.x;
  second[t] = 0.0f;
  first[t + 1] = 1.0f;                                     // LINE past_static
  __syncthreads();
  ag_store(out + t, first[t] + second[t]);
}

// memcheck: a global read one element past the tensor.
__global__ void past_tensor(const float* x, float* out) {
  const int t = threadIdx.x;
  ag_store(out + t, ag_load(x + t + 1));                   // LINE past_tensor
}

// launch limits: 64 KiB of dynamic shared memory, legal only with the opt-in attribute.
__global__ void big_dynamic(float* out) {
  extern __shared__ float dyn[];
  const int t = threadIdx.x;
  dyn[t] = t;
  __syncthreads();
  ag_store(out + t, dyn[(t + 1) % blockDim.x]);
}

// synccheck with shared atomics: atomics are not hazards, and they initialise nothing.
__global__ void shared_atomics(float* out) {
  __shared__ float total;
  const int t = threadIdx.x;
  if (t == 0) total = 0.0f;
  __syncthreads();
  atomicAdd(&total, 1.0f);
  __syncthreads();
  ag_store(out + t, total);
}

// Threads past n exit before the barrier (as test_cuda_emulator's early_exit).
__global__ void early_exit(const float* x, float* out, int n) {
  __shared__ float buf[128];
  const int t = threadIdx.x;
  if (t >= n) return;
  buf[t] = ag_load(x + t);
  __syncthreads();
  ag_store(out + t, buf[n - 1 - t]);
}
"""

CLEAN = r"""
// A warp reduction by shuffles, then a block reduction through shared memory.
__global__ void block_sum(const float* x, float* out, int n) {
  __shared__ float partial[32];
  const int t = threadIdx.x, lane = t % 32, warp = t / 32;
  float v = 0.0f;
  for (int i = blockIdx.x * blockDim.x + t; i < n; i += gridDim.x * blockDim.x) v += ag_load(x + i);
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < blockDim.x / 32 ? partial[lane] : 0.0f;
    for (int o = 16; o > 0; o /= 2) v += __shfl_down_sync(0xffffffffu, v, o);
    if (lane == 0) ag_store(out + blockIdx.x, v);
  }
}

// A barrier'd exchange, twice over the same buffer (the second barrier orders the reuse).
__global__ void exchange(const float* x, float* out) {
  __shared__ float buf[128];
  const int t = threadIdx.x, n = blockDim.x, base = blockIdx.x * n;
  buf[t] = ag_load(x + base + t);
  __syncthreads();
  float v = buf[n - 1 - t];
  __syncthreads();
  buf[t] = v * 2.0f;
  __syncthreads();
  ag_store(out + base + t, buf[(t + 7) % n] + v);
}

// Counts the runs of every block.
__global__ void block_runs(int* runs) {
  if (threadIdx.x == 0)
    atomicAdd(runs + blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z), 1);
}

// A warp exchange ordered by __syncwarp(), in dynamic shared memory.
__global__ void warp_exchange(const float* x, float* out) {
  extern __shared__ float dyn[];
  const int t = threadIdx.x, w = t / 32 * 32;
  dyn[t] = ag_load(x + t);
  __syncwarp();
  ag_store(out + t, dyn[w + (t + 5) % 32]);
}
"""


def _line(src: str, tag: str) -> int:
    """The source line of the statement marked ``// LINE tag``."""
    for i, text in enumerate(src.splitlines(), start=1):
        if text.rstrip().endswith(f"LINE {tag}"):
            return i
    raise AssertionError(tag)


BUG_NAMES = ("raw_across_warps", "war_across_warps", "race_in_warp", "uninitialized_read",
             "half_barrier", "shuffle_in_branch", "outside_mask", "past_dynamic", "past_static",
             "past_tensor", "big_dynamic", "shared_atomics", "early_exit")
CLEAN_NAMES = ("block_sum", "exchange", "warp_exchange", "block_runs")


@pytest.fixture
def env(monkeypatch):
    """Set the checks and the schedule, then build the modules that go with them."""
    def set_(check="", schedule="forward"):
        monkeypatch.setenv("ATTNGRAPH_EMU_CHECK", check)
        monkeypatch.setenv("ATTNGRAPH_EMU_SCHEDULE", schedule)
        return (RawModule(code=BUGS, name_expressions=BUG_NAMES, name="bugs.cu"),
                RawModule(code=CLEAN, name_expressions=CLEAN_NAMES, name="clean.cu"))
    return set_


def _finding(kernel, tool: str, *args, **kw) -> SanitizerError:
    with pytest.raises(SanitizerError) as info:
        kernel(*args, **kw)
    assert info.value.tool == tool, str(info.value)
    assert str(info.value).startswith(f"{tool}: {kernel.name}: ")
    return info.value


def _names_line(err: Exception, tag: str, *more: str) -> None:
    """The finding names the source line(s) of the tagged statements."""
    for t in (tag,) + more:
        assert f"bugs.cu:{_line(BUGS, t)}" in str(err), (t, str(err))


# --------------------------------------------------------------------------- the bug classes
def test_racecheck_read_after_write_across_warps(env):
    bugs, _ = env("racecheck")
    err = _finding(bugs.get_function("raw_across_warps"), "racecheck", (1,), (64,),
                   (torch.zeros(64),))
    assert "read-after-write hazard on __shared__ `buf`" in str(err)
    assert re.search(r"block \(0,0,0\): thread \(32,0,0\) \[warp 1 lane 0\] reads it", str(err))
    assert "thread (0,0,0) [warp 0 lane 0] wrote it" in str(err)
    assert "no __syncthreads() between them" in str(err)
    _names_line(err, "raw_read")


def test_racecheck_write_after_read_across_warps(env):
    # in the reverse order thread 0 reads buf[32] before thread 32 overwrites it
    bugs, _ = env("racecheck", "reverse")
    err = _finding(bugs.get_function("war_across_warps"), "racecheck", (1,), (64,),
                   (torch.zeros(64),))
    assert "write-after-read hazard on __shared__ `buf`, byte 128 of 256" in str(err)
    assert re.search(r"thread \(32,0,0\) .* writes it .* thread \(0,0,0\) .* read it", str(err))
    _names_line(err, "war_read", "war_write")
    # in the forward order the same race shows as a read after the write
    bugs, _ = env("racecheck", "forward")
    err = _finding(bugs.get_function("war_across_warps"), "racecheck", (1,), (64,),
                   (torch.zeros(64),))
    assert "read-after-write hazard" in str(err)
    _names_line(err, "war_read", "war_write")


def test_racecheck_inside_a_warp_needs_syncwarp(env):
    bugs, _ = env("racecheck")
    k = bugs.get_function("race_in_warp")
    err = _finding(k, "racecheck", (1,), (32,), (torch.zeros(32), np.int32(0)))
    assert "no __syncwarp() or warp collective between them" in str(err)
    _names_line(err, "warp_read")
    out = torch.zeros(32)
    k((1,), (32,), (out, np.int32(1)))                 # with __syncwarp(): clean
    assert torch.equal(out, (torch.arange(32).roll(-1) * 2).float())


def test_initcheck_finds_a_read_of_unwritten_shared_memory(env):
    bugs, _ = env("initcheck")
    err = _finding(bugs.get_function("uninitialized_read"), "initcheck", (1,), (64,),
                   (torch.zeros(64),))
    assert "__shared__ `buf`, byte 252 of 256" in str(err)
    assert "which no thread of the block has written" in str(err)
    _names_line(err, "uninit_read")


def test_initcheck_poisons_shared_memory_in_every_block(env):
    """What block 0 wrote is gone in block 1, even on the same host thread."""
    bugs, _ = env("initcheck")
    src = r"""
    __global__ void carry(float* out) {
      __shared__ float v;
      if (blockIdx.x == 0 && threadIdx.x == 0) v = 1.0f;
      __syncthreads();
      if (threadIdx.x == 0) ag_store(out + blockIdx.x, v);
    }"""
    k = RawModule(code=src, name_expressions=("carry",), name="carry.cu").get_function("carry")
    err = _finding(k, "initcheck", (2,), (32,), (torch.zeros(2),))
    assert "block (1,0,0)" in str(err)


def test_synccheck_finds_a_barrier_half_the_block_reaches(env):
    bugs, _ = env("synccheck")
    err = _finding(bugs.get_function("half_barrier"), "synccheck", (1,), (64,),
                   (torch.zeros(64),))
    assert "divergent barrier in block (0,0,0)" in str(err)
    _names_line(err, "half_barrier")


def test_synccheck_finds_a_shuffle_half_the_warp_skips(env):
    bugs, _ = env("synccheck")
    err = _finding(bugs.get_function("shuffle_in_branch"), "synccheck", (1,), (32,),
                   (torch.zeros(32),))
    assert "__shfl_sync" in str(err) and "lane 16 has exited" in str(err)
    _names_line(err, "branch_shuffle")


def test_synccheck_finds_a_collective_outside_its_mask(env):
    bugs, _ = env("synccheck")
    err = _finding(bugs.get_function("outside_mask"), "synccheck", (1,), (32,),
                   (torch.zeros(32),))
    assert "does not include its own lane" in str(err)
    _names_line(err, "outside_mask")


def test_synccheck_is_stricter_than_hardware_about_early_exits(env):
    """Exited threads pass barriers on hardware since Volta (so without synccheck the kernel
    runs), but CUDA allows a barrier in conditional code only when the whole block agrees."""
    bugs, _ = env("")
    x, out = torch.randn(128), torch.zeros(128)
    bugs.get_function("early_exit")((1,), (128,), (x, out, np.int32(37)))
    assert torch.equal(out[:37], x[:37].flip(0))
    bugs, _ = env("synccheck")
    err = _finding(bugs.get_function("early_exit"), "synccheck", (1,), (128,),
                   (x, out, np.int32(37)))
    assert "thread (37,0,0) [warp 1 lane 5] exited without reaching __syncthreads()" in str(err)


def test_memcheck_finds_a_write_past_the_dynamic_shared_memory(env):
    bugs, _ = env("memcheck")
    err = _finding(bugs.get_function("past_dynamic"), "memcheck", (1,), (32,),
                   (torch.zeros(32),), shared_mem=32 * 4)
    assert "thread (31,0,0) [warp 0 lane 31] in block (0,0,0) writes 4 bytes" in str(err)
    assert "0 bytes past the end of the dynamic shared memory (128 bytes given at launch)" in str(err)
    _names_line(err, "past_dynamic")


def test_memcheck_finds_a_write_past_a_static_array(env):
    bugs, _ = env("memcheck")
    err = _finding(bugs.get_function("past_static"), "memcheck", (1,), (32,),
                   (torch.zeros(32),))
    assert "0 bytes past the end of __shared__ `first` (128 bytes)" in str(err)
    _names_line(err, "past_static")


def test_memcheck_finds_a_global_read_past_the_tensor(env):
    bugs, _ = env("memcheck")
    x = torch.zeros(32)
    err = _finding(bugs.get_function("past_tensor"), "memcheck", (1,), (32,),
                   (x, torch.zeros(32)))
    assert "invalid global read of 4 bytes" in str(err)
    assert "thread (31,0,0)" in str(err) and "0 bytes past its end" in str(err)
    _names_line(err, "past_tensor")
    bugs.get_function("past_tensor")((1,), (31,), (x, torch.zeros(32)))   # in bounds: clean


def test_atomics_are_no_hazard_but_need_initialised_memory(env):
    bugs, _ = env("all")
    out = torch.zeros(64)
    bugs.get_function("shared_atomics")((1,), (64,), (out,))
    assert (out == 64).all()


# --------------------------------------------------------------------------- launch limits
def test_dynamic_shared_memory_over_48_kib_needs_the_opt_in(env):
    bugs, _ = env("")
    k = bugs.get_function("big_dynamic")
    out = torch.zeros(64)
    with pytest.raises(EmulatorError, match=r"invalid configuration argument.*65536 bytes > "
                                            r"49152 \(48 KiB without opt-in"):
        k((1,), (64,), (out,), shared_mem=64 * 1024)
    k.max_dynamic_shared_size_bytes = 64 * 1024
    k((1,), (64,), (out,), shared_mem=64 * 1024)
    assert torch.equal(out, torch.arange(64).roll(-1).float())
    k.max_dynamic_shared_size_bytes = 200 * 1024        # sm_80 allows 163 KiB per block
    with pytest.raises(EmulatorError, match=r"204800 bytes > 166912"):
        k((1,), (64,), (out,), shared_mem=200 * 1024)


def test_static_and_dynamic_shared_memory_share_the_48_kib(env):
    src = r"""
    __global__ void both(float* out) {
      __shared__ float table[8192];                    // 32 KiB static
      extern __shared__ float dyn[];
      table[threadIdx.x] = 1.0f;
      dyn[threadIdx.x] = 2.0f;
      __syncthreads();
      ag_store(out + threadIdx.x, table[threadIdx.x] + dyn[threadIdx.x]);
    }"""
    env("")
    k = RawModule(code=src, name_expressions=("both",), name="both.cu").get_function("both")
    out = torch.zeros(32)
    k((1,), (32,), (out,), shared_mem=16 * 1024)        # 32 + 16 KiB: fits
    assert (out == 3).all()
    with pytest.raises(EmulatorError, match=r"static 32768 bytes .* dynamic 20480 bytes > 49152"):
        k((1,), (32,), (out,), shared_mem=20 * 1024)


@pytest.mark.parametrize("block,what", [((2048,), "at most 1024 threads"),
                                        ((1, 1, 65), "<= \\(1024,1024,64\\)"),
                                        ((1, 1025), "<= \\(1024,1024,64\\)")])
def test_block_shape_limits(env, block, what):
    bugs, _ = env("")
    with pytest.raises(EmulatorError, match=what):
        bugs.get_function("shuffle_in_branch")((1,), block, (torch.zeros(4096),))


def test_grid_limits(env):
    bugs, _ = env("")
    with pytest.raises(EmulatorError, match=r"grid.y and grid.z <= 65535, got \(1,65536,1\)"):
        bugs.get_function("shuffle_in_branch")((1, 65536), (32,), (torch.zeros(32),))


REGISTERS = r"""
__global__ void many_registers(const float* x, float* out) {
  float r[64];
  const int t = threadIdx.x;
#pragma unroll
  for (int i = 0; i < 64; ++i) r[i] = x[t * 64 + i];
  float acc = 0.0f;
#pragma unroll
  for (int i = 0; i < 64; ++i)
#pragma unroll
    for (int j = 0; j < 64; ++j) acc += r[i] * r[(i * 7 + j) % 64];
  out[t] = acc;
}
"""


def test_registers_times_threads_within_the_register_file(env):
    """The register count comes from the NVRTC compile gate for that instantiation."""
    env("")
    mod = RawModule(code=REGISTERS, name_expressions=("many_registers",), name="regs.cu")
    regs = mod.registers("many_registers")
    if regs == 0:
        pytest.skip("NVRTC is not installed: the register limit is not checked")
    k = mod.get_function("many_registers")
    threads = 1024
    assert regs * threads > 65536, regs
    with pytest.raises(EmulatorError, match=rf"{regs} registers x 1024 threads = "
                                            rf"{regs * 1024} > 65536"):
        k((1,), (threads,), (torch.zeros(threads * 64), torch.zeros(threads)))
    k((1,), (65536 // regs // 32 * 32,), (torch.zeros(threads * 64), torch.zeros(threads)))


# --------------------------------------------------------------------------- schedules
SCHEDULES = ["forward", "reverse", "random:1", "random:2"]


def _run_clean(clean) -> list:
    x = torch.randn(4 * 128, generator=torch.Generator().manual_seed(0))
    sums = torch.zeros(4)
    clean.get_function("block_sum")((4,), (128,), (x, sums, np.int32(x.numel())))
    ex = torch.zeros(4 * 128)
    clean.get_function("exchange")((4,), (128,), (x, ex))
    we = torch.zeros(128)
    clean.get_function("warp_exchange")((1,), (128,), (x, we), shared_mem=128 * 4)
    return [sums, ex, we]


@pytest.mark.parametrize("check", ["", "all"])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_clean_kernels_pass_every_tool_and_schedule_bitwise(env, check, schedule):
    _, clean = env("", "forward")
    want = _run_clean(clean)
    _, clean = env(check, schedule)
    got = _run_clean(clean)
    for a, b in zip(want, got):
        assert torch.equal(a, b)
    x = torch.randn(4 * 128, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(want[0], x.view(4, 128).sum(1), atol=1e-5)


@pytest.mark.parametrize("schedule", ["reverse", "random:1", "random:2", "random:5"])
@pytest.mark.parametrize("grid", [(1,), (2,), (3,), (9,), (5, 2), (7, 3, 2)])
def test_every_schedule_runs_every_block_once(env, schedule, grid):
    _, clean = env("", schedule)
    runs = torch.zeros(int(np.prod(grid)), dtype=torch.int32)
    clean.get_function("block_runs")(grid, (32,), (runs,))
    assert (runs == 1).all()


def test_a_race_shows_as_a_schedule_dependent_result(env):
    """Without the checks the racy kernel runs; the reverse schedule reads the poison that
    shared memory starts with where the forward one read the values."""
    outs = []
    for schedule in ("forward", "reverse"):
        bugs, _ = env("", schedule)
        out = torch.zeros(64)
        bugs.get_function("raw_across_warps")((1,), (64,), (out,))
        outs.append(out[32:])
    assert torch.equal(outs[0], torch.arange(32).float())
    assert torch.isnan(outs[1]).all()


def test_random_schedule_finds_the_race_too(env):
    bugs, _ = env("racecheck", "random:3")
    _finding(bugs.get_function("raw_across_warps"), "racecheck", (1,), (64,),
             (torch.zeros(64),))


def test_settings_are_validated(env, monkeypatch):
    monkeypatch.setenv("ATTNGRAPH_EMU_CHECK", "memcheck,leakcheck")
    with pytest.raises(ValueError, match="unknown tool.*leakcheck"):
        emulator.checks()
    monkeypatch.setenv("ATTNGRAPH_EMU_CHECK", "all")
    assert emulator.checks() == emulator.CHECK_TOOLS
    monkeypatch.setenv("ATTNGRAPH_EMU_SCHEDULE", "sideways")
    with pytest.raises(ValueError, match="forward.*reverse.*random"):
        emulator.schedule()
    monkeypatch.setenv("ATTNGRAPH_EMU_SCHEDULE", "random:17")
    assert emulator.schedule() == ("random", 17)


def test_poison_fills_outputs_only_under_initcheck(monkeypatch):
    monkeypatch.setenv("ATTNGRAPH_EMU_CHECK", "")
    assert emulator.poison(torch.zeros(3)).eq(0).all()
    monkeypatch.setenv("ATTNGRAPH_EMU_CHECK", "initcheck")
    assert emulator.poison(torch.zeros(3)).isnan().all()
    assert emulator.poison(torch.zeros(3, dtype=torch.int32)).eq(-1).all()


def test_static_shared_declarations_are_rewritten():
    src = ("__shared__ float a[4][8], b[3];\n"
           "template <class T> __global__ void k() {\n"
           "  __shared__ __align__(16) T buf[32];\n"
           "  // __shared__ float in_a_comment[2];\n"
           "  __shared__ int count;\n}\n")
    out = emulator._rewrite_static_shared(src)
    assert '#define a (::emu::static_shared<float [4][8]>(0, "a"))' in out
    assert '#define b (::emu::static_shared<float [3]>(1, "b"))' in out
    assert 'auto& buf = ::emu::static_shared<T [32]>(2, "buf", 16);' in out
    assert 'auto& count = ::emu::static_shared<int >(3, "count");' in out
    assert "// __shared__ float in_a_comment[2];" in out
    # lines after a namespace-scope rewrite keep their numbers
    assert "#line 1\n" in out


# --------------------------------------------------------------------------- attngraph's own
def _fused_and_stages(g, dtype):
    """Forward and every gradient of the fused kernels, and (explicit graphs) the three stage
    kernels."""
    import attngraph as ag

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(g.num_dst, 4, 16, generator=gen).to(dtype).requires_grad_()
    k = torch.randn(g.num_src, 2, 16, generator=gen).to(dtype).requires_grad_()
    v = torch.randn(g.num_src, 2, 8, generator=gen).to(dtype).requires_grad_()
    out, lse = ag.graph_attention(q, k, v, g, return_lse=True, backend="cupy")
    dout = torch.randn(out.shape, generator=gen).to(dtype)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    if g.is_implicit:                     # the rule kernels; the stages take edge lists
        return [out, lse, *grads]
    kk = k.detach().repeat_interleave(2, dim=1)
    s = ag.ops.edge_scores(q.detach(), kk, g, backend="cupy")
    p = ag.ops.edge_softmax(s, g, backend="cupy")
    o = ag.ops.aggregate(p, v.detach().repeat_interleave(2, dim=1), g, backend="cupy")
    return [out, lse, *grads, s, p, o]


KERNEL_CASES = {
    "window-fp32": (lambda m: m.sliding_window(70, 4), torch.float32),
    "longformer-bf16": (lambda m: m.longformer(160, 2, [0, 80]), torch.bfloat16),  # cut rows
    "hash-fp16": (lambda m: m.hash_buckets(torch.arange(64) % 5), torch.float16),
    "implicit-window-fp32": (lambda m: m.sliding_window(50, 3, implicit=True), torch.float32),
}


@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_attngraphs_kernels_are_clean_under_every_check_and_schedule(monkeypatch, case):
    """CI's share of `make sanitize`: the fused and stage kernels on a few graphs find nothing
    under every tool and give bitwise-equal results under every schedule."""
    from attngraph import masks

    make, dtype = KERNEL_CASES[case]
    g = make(masks)
    monkeypatch.setenv("ATTNGRAPH_CUDA_EMULATE", "1")
    results = {}
    for check, schedule in [("", "forward"), ("all", "forward"), ("all", "reverse"),
                            ("all", "random:1"), ("", "random:2")]:
        monkeypatch.setenv("ATTNGRAPH_EMU_CHECK", check)
        monkeypatch.setenv("ATTNGRAPH_EMU_SCHEDULE", schedule)
        got = _fused_and_stages(g, dtype)
        results[(check, schedule)] = got
    want = results[("", "forward")]
    for key, got in results.items():
        for a, b in zip(want, got):
            assert torch.equal(a, b), key
        assert not any(t.isnan().any() for t in got), key
