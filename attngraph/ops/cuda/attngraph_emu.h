// attngraph_emu.h -- CUDA semantics on the CPU for the subset of CUDA C++ attngraph's
// kernels use. Included (by attngraph.ops.cuda.emulator) before a .cu file, which is then
// built with the host C++ compiler into a shared library.
//
// Model: a kernel launch runs its blocks on a few OS threads ("workers"); a block's threads
// run as fibers on one worker, switched in user space (a hand-written context switch on
// x86-64, ucontext elsewhere), so one worker's `thread_local` storage is the block's
// __shared__ memory. A fiber runs until it waits: at __syncthreads, at a warp collective
// (__shfl_*_sync, __syncwarp, __ballot_sync, ...) or at its end. When no fiber of a block
// can run and the block has not finished, the waits can never be satisfied: a deadlock,
// reported as an error (never a hang). Exited threads leave the barrier counts, as on
// hardware.
//
// Global memory accesses made through ag_load / ag_store / the atomics are counted per
// launch when counting is on: bytes requested, warp-level requests and the 32-byte sectors
// each request touches (the same access site in the lanes of one warp, matched by the
// number of times each lane reached it, forms one request).
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <numeric>
#include <source_location>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include <dlfcn.h>
#include <sys/mman.h>
#include <unistd.h>

#if !defined(__x86_64__) || defined(ATTNGRAPH_EMU_UCONTEXT)
#define ATTNGRAPH_EMU_USE_UCONTEXT 1
#include <ucontext.h>
#endif

#if defined(__SANITIZE_ADDRESS__) && !defined(ATTNGRAPH_EMU_CHECKED)   // not kernel-address
#define ATTNGRAPH_EMU_ASAN 1
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#include <cuda_fp16.h>
#include <cuda_bf16.h>

// The CUDA headers define the execution-space keywords for nvcc; on the host they must be
// plain C++.
#undef __device__
#undef __global__
#undef __host__
#undef __shared__
#undef __forceinline__
#undef __noinline__
#undef __constant__
#undef __launch_bounds__
#undef __restrict__
#define __device__
#define __host__
#define __global__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __constant__ const
#define __launch_bounds__(...)
#define __restrict__ __restrict
// Block scope `thread_local` is static: one copy per worker thread, i.e. per running block.
// (`extern __shared__` arrays are rewritten by the builder to the block's dynamic buffer.)
#define __shared__ thread_local

namespace emu {

constexpr int kWarp = 32;
using Loc = std::source_location;

enum class State : uint8_t { Runnable, AtBarrier, AtWarp, Exited };

// Sanitizer tools, as bits of LaunchConfig::checks (emulator.py's CHECK_TOOLS, same order).
enum Tool : uint32_t { kMemcheck = 1, kRacecheck = 2, kInitcheck = 4, kSynccheck = 8 };
enum class Schedule : uint32_t { Forward, Reverse, Random };

// Per-launch settings from Python (keep in step with emulator.py's _LaunchConfig).
struct LaunchConfig {
  uint32_t checks;            // Tool bits
  uint32_t schedule;          // Schedule
  uint64_t seed;              // for Schedule::Random
  uint64_t max_dynamic_smem;  // the kernel's max_dynamic_shared_size_bytes (0: not raised)
  uint64_t smem_limit;        // the architecture's shared memory per block (opt-in maximum)
  uint32_t regs;              // registers per thread (0: unknown)
  uint32_t nranges;           // [begin, end) byte ranges of the buffers passed, for memcheck
  const uint64_t* ranges;
};

constexpr uint64_t kDefaultSmem = 48 * 1024;   // per block without the opt-in attribute
constexpr size_t kRedzone = 64;                // poisoned bytes around each shared array
constexpr size_t kMaxStaticSlots = 64;
enum class WarpOp : uint8_t { Sync, ShflIdx, ShflUp, ShflDown, ShflXor, Ballot, Any, All, Match };

const char* op_name(WarpOp op) {
  switch (op) {
    case WarpOp::Sync: return "__syncwarp";
    case WarpOp::ShflIdx: return "__shfl_sync";
    case WarpOp::ShflUp: return "__shfl_up_sync";
    case WarpOp::ShflDown: return "__shfl_down_sync";
    case WarpOp::ShflXor: return "__shfl_xor_sync";
    case WarpOp::Ballot: return "__ballot_sync";
    case WarpOp::Any: return "__any_sync";
    case WarpOp::All: return "__all_sync";
    case WarpOp::Match: return "__match_any_sync";
  }
  return "?";
}

// Counter slots returned to Python (keep in step with emulator.py's COUNTER_NAMES).
enum Counter : int {
  kLoadBytes, kLoadRequests, kLoadSectors, kStoreBytes, kStoreRequests, kStoreSectors,
  kAtomicBytes, kAtomicRequests, kAtomicSectors, kUniqueLoadSectors, kUniqueStoreSectors,
  kBarriers, kWarpOps, kThreads, kBlocks, kWarps, kMaxWarpLoadRequests, kNumCounters
};

struct SiteKey {  // one access instruction: call site and kind (load / store / atomic)
  const char* file;
  uint32_t line, column, kind;
  bool operator==(const SiteKey&) const = default;
};

struct GroupKey {  // one warp-level request: a site, the how-many-th visit, the warp
  SiteKey site;
  uint32_t visit, warp;
  bool operator==(const GroupKey&) const = default;
};

inline size_t mix(size_t h, uint64_t v) { return h ^ (v + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2)); }

struct SiteHash {
  size_t operator()(const SiteKey& k) const {
    return mix(mix(mix(reinterpret_cast<uintptr_t>(k.file), k.line), k.column), k.kind);
  }
};

struct GroupHash {
  size_t operator()(const GroupKey& k) const { return mix(mix(SiteHash{}(k.site), k.visit), k.warp); }
};

struct Fiber {
  void* sp = nullptr;
#ifdef ATTNGRAPH_EMU_USE_UCONTEXT
  ucontext_t ctx;
#endif
  void* fake_stack = nullptr;
  char* stack = nullptr;
  uint3 idx{0, 0, 0};
  unsigned tid = 0, lane = 0, warp = 0;
  State st = State::Runnable;
  Loc site;
  // warp collective in progress
  WarpOp op = WarpOp::Sync;
  unsigned mask = 0;
  int arg = 0, width = 32;
  uint64_t val = 0, res = 0;
  // counting: per access site, how often this lane reached it
  std::unordered_map<SiteKey, uint32_t, SiteHash> visits;
  // racecheck: the lanes' clocks this thread has seen (its own at vc[lane]); synccheck:
  // barriers passed
  uint32_t vc[32] = {};
  uint32_t barriers = 0;
};

// One shared-memory access, as racecheck remembers it.
struct Access {
  uint32_t epoch = 0;   // barrier interval (0: none)
  uint32_t clock = 0;   // the thread's own clock at the access
  uint16_t tid = 0, warp = 0;
  uintptr_t pc = 0;
};

enum ShadowState : uint8_t { kUnwritten = 0, kWritten = 1, kRedzoneByte = 2 };

struct Shadow {         // per byte of the shared-memory arena
  Access w, r1, r2;     // last write; last read; last read from another warp than r1's
  uint8_t state = kRedzoneByte;
};

struct StaticSlot {     // one static __shared__ array of the running block
  int id;
  size_t size, offset;
  const char* name;
};

struct Group {  // one warp-level memory request
  uint64_t bytes = 0;
  std::vector<uint64_t> sectors;
};

struct Worker;
inline thread_local Worker* tw = nullptr;   // the worker running on this OS thread
inline thread_local Fiber* tf = nullptr;    // the fiber running on this OS thread

using Body = void (*)(void* closure);

struct Worker {
  // launch geometry
  uint3 bidx{0, 0, 0};
  dim3 bdim, gdim;
  unsigned nthreads = 0;
  // fibers and their stacks
  std::vector<Fiber> fibers;
  char* stacks = nullptr;
  size_t stack_size = 0, stack_stride = 0, stack_count = 0;
  void* sched_sp = nullptr;
#ifdef ATTNGRAPH_EMU_USE_UCONTEXT
  ucontext_t sched_ctx;
#endif
  void* sched_fake = nullptr;
  const void* sched_bottom = nullptr;
  size_t sched_size = 0;
  Body body = nullptr;
  void* closure = nullptr;
  // block state
  unsigned live = 0, at_barrier = 0;
  char* dyn_smem = nullptr;
  size_t dyn_smem_size = 0;
  bool failed = false;
  std::string error;
  uint32_t error_tool = 0;   // the Tool that found the error (0: an emulator error)
  // shared memory: one arena per worker, [redzone][dynamic][redzone] then static arrays,
  // each followed by a redzone; refilled for every block (nothing carries over)
  const LaunchConfig* cfg = nullptr;
  char* arena = nullptr;         // this worker's slice of the launch's arenas
  size_t arena_size = 0, arena_used = 0, static_bytes = 0;
  std::vector<StaticSlot> slots;
  std::vector<Shadow> shadow;   // sized like the arena when a check needs it
  uint32_t epoch = 1;           // barrier intervals of the running block
  std::vector<Loc> barrier_sites;
  // schedule
  uint64_t rng = 0;
  // counting
  bool counting = false;
  uint64_t counters[kNumCounters] = {};
  std::unordered_map<GroupKey, Group, GroupHash> groups[3];   // load / store / atomic, per block
  std::unordered_set<uint64_t> unique[2];          // load / store sectors, per launch
};

// ------------------------------------------------------------------ context switching
#ifndef ATTNGRAPH_EMU_USE_UCONTEXT
extern "C" void attngraph_emu_switch(void** save_sp, void* to_sp);
extern "C" void attngraph_emu_trampoline();
// Saves the callee-saved registers on the current stack, stores the stack pointer, loads
// the other one and restores its registers: ~20 instructions, no system call (glibc's
// swapcontext saves the signal mask with a syscall per switch).
asm(R"(
    .text
    .p2align 4
    .hidden attngraph_emu_switch
    .globl attngraph_emu_switch
    .type attngraph_emu_switch, @function
attngraph_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size attngraph_emu_switch, .-attngraph_emu_switch

    .p2align 4
    .hidden attngraph_emu_trampoline
    .globl attngraph_emu_trampoline
    .type attngraph_emu_trampoline, @function
attngraph_emu_trampoline:
    andq $-16, %rsp
    call attngraph_emu_fiber_main
    ud2
    .size attngraph_emu_trampoline, .-attngraph_emu_trampoline
)");
#endif

extern "C" __attribute__((visibility("hidden"), noreturn)) void attngraph_emu_fiber_main();

inline void asan_start(void** fake, const void* bottom, size_t size) {
#ifdef ATTNGRAPH_EMU_ASAN
  __sanitizer_start_switch_fiber(fake, bottom, size);
#else
  (void)fake; (void)bottom; (void)size;
#endif
}

inline void asan_finish(void* fake, const void** bottom_old, size_t* size_old) {
#ifdef ATTNGRAPH_EMU_ASAN
  __sanitizer_finish_switch_fiber(fake, bottom_old, size_old);
#else
  (void)fake; (void)bottom_old; (void)size_old;
#endif
}

// Scheduler -> fiber.
inline void resume(Worker* w, Fiber* f) {
  tf = f;
  asan_start(&w->sched_fake, f->stack, w->stack_size);
#ifdef ATTNGRAPH_EMU_USE_UCONTEXT
  swapcontext(&w->sched_ctx, &f->ctx);
#else
  attngraph_emu_switch(&w->sched_sp, f->sp);
#endif
  asan_finish(w->sched_fake, nullptr, nullptr);
  tf = nullptr;
}

// Fiber -> scheduler; returns when the scheduler resumes this fiber.
inline void yield() {
  Worker* w = tw;
  Fiber* f = tf;
  asan_start(&f->fake_stack, w->sched_bottom, w->sched_size);
#ifdef ATTNGRAPH_EMU_USE_UCONTEXT
  swapcontext(&f->ctx, &w->sched_ctx);
#else
  attngraph_emu_switch(&f->sp, w->sched_sp);
#endif
  asan_finish(f->fake_stack, nullptr, nullptr);
}

[[noreturn]] inline void exit_fiber() {
  Worker* w = tw;
  Fiber* f = tf;
  asan_start(nullptr, w->sched_bottom, w->sched_size);  // this stack is done
#ifdef ATTNGRAPH_EMU_USE_UCONTEXT
  setcontext(&w->sched_ctx);
#else
  void* dummy;
  attngraph_emu_switch(&dummy, w->sched_sp);
#endif
  (void)f;
  __builtin_unreachable();
}

// ------------------------------------------------------------------ errors
inline std::string where(const Loc& l) {
  return std::string(l.file_name()) + ":" + std::to_string(l.line());
}

inline std::string thread_name(const Fiber& f) {
  return "thread (" + std::to_string(f.idx.x) + "," + std::to_string(f.idx.y) + "," +
         std::to_string(f.idx.z) + ") [warp " + std::to_string(f.warp) + " lane " +
         std::to_string(f.lane) + "]";
}

inline std::string block_name(const Worker* w) {
  return "block (" + std::to_string(w->bidx.x) + "," + std::to_string(w->bidx.y) + "," +
         std::to_string(w->bidx.z) + ")";
}

// Stop the block with an error; the fiber never resumes.
[[noreturn]] inline void fail(const std::string& msg) {
  Worker* w = tw;
  if (!w->failed) {
    w->failed = true;
    w->error = msg;
  }
  if (tf) exit_fiber();
  std::fprintf(stderr, "attngraph emulator: %s\n", msg.c_str());
  std::abort();
}

inline bool checking(uint32_t tool) { return tw && tw->cfg && (tw->cfg->checks & tool); }

// A sanitizer finding: stops the block like fail(), marked with the tool that found it.
[[noreturn]] inline void report(uint32_t tool, const std::string& msg) {
  if (!tw->failed) tw->error_tool = tool;
  fail(msg);
}

// An error that `tool` classifies: its finding when the tool is on, else an emulator error.
[[noreturn]] inline void fail_as(uint32_t tool, const std::string& msg) {
  if (checking(tool)) report(tool, msg);
  fail(msg);
}

// An error found by the scheduler (no fiber running).
inline void block_error(Worker* w, uint32_t tool, const std::string& msg) {
  if (w->failed) return;
  w->failed = true;
  w->error = msg;
  w->error_tool = tool;
}

// A code address inside this module, as a token Python resolves to a source line.
// (No function-local static here: an inline function's statics are one object across every
// module the process loads.)
inline std::string pc_token(uintptr_t pc) {
  Dl_info info{};
  dladdr(reinterpret_cast<void*>(pc), &info);
  const uintptr_t base = reinterpret_cast<uintptr_t>(info.dli_fbase);
  char buf[40];
  std::snprintf(buf, sizeof buf, "{pc:0x%lx}", static_cast<unsigned long>(pc - base - 1));
  return buf;
}

inline std::string thread_of(const Worker* w, unsigned tid) {
  const Fiber& f = w->fibers[tid];
  return thread_name(f);
}

inline bool same_site(const Loc& a, const Loc& b) {
  return a.line() == b.line() && a.column() == b.column() &&
         std::strcmp(a.file_name(), b.file_name()) == 0;
}

// ------------------------------------------------------------------ barriers
inline void release_barrier(Worker* w) {
  for (auto& g : w->fibers)
    if (g.st == State::AtBarrier) g.st = State::Runnable;
  w->at_barrier = 0;
  ++w->epoch;   // every access before the barrier is ordered before every access after it
}

// All live threads wait at a barrier: release them if it is one barrier; threads at
// different __syncthreads calls never meet (an error, as a hang on hardware would be).
inline void check_barrier(Worker* w) {
  if (w->live == 0 || w->at_barrier != w->live) return;
  const Fiber* first = nullptr;
  for (auto& g : w->fibers) {
    if (g.st != State::AtBarrier) continue;
    if (!first) {
      first = &g;
    } else if (!same_site(g.site, first->site)) {
      fail_as(kSynccheck, "deadlock in " + block_name(w) + ": " + thread_name(*first) +
           " waits at __syncthreads() at " + where(first->site) + " but " + thread_name(g) +
           " waits at __syncthreads() at " + where(g.site));
    }
  }
  release_barrier(w);
}

inline void syncthreads(Loc loc) {
  Worker* w = tw;
  Fiber* f = tf;
  w->counters[kBarriers] += (f->tid == 0);
  if (f->barriers >= w->barrier_sites.size()) w->barrier_sites.push_back(loc);
  ++f->barriers;
  f->st = State::AtBarrier;
  f->site = loc;
  ++w->at_barrier;
  if (w->at_barrier == w->live) {
    check_barrier(w);   // releases everyone, this fiber included, or fails
    return;
  }
  yield();
}

// ------------------------------------------------------------------ warp collectives
inline unsigned warp_lanes(const Worker* w, unsigned warp) {
  unsigned first = warp * kWarp;
  unsigned n = std::min<unsigned>(kWarp, w->nthreads - first);
  return n == kWarp ? 0xffffffffu : ((1u << n) - 1u);
}

inline Fiber& lane_fiber(Worker* w, unsigned warp, unsigned lane) {
  return w->fibers[warp * kWarp + lane];
}

inline int source_lane(const Fiber& f, int lane) {
  const int width = f.width, seg = lane & ~(width - 1);
  switch (f.op) {
    case WarpOp::ShflIdx: return seg + (f.arg & (width - 1));
    case WarpOp::ShflUp: {
      int s = lane - f.arg;
      return s < seg ? lane : s;
    }
    case WarpOp::ShflDown: {
      int s = lane + f.arg;
      return s >= seg + width ? lane : s;
    }
    case WarpOp::ShflXor: {
      int s = lane ^ f.arg;
      return s >= seg + width || s < seg ? lane : s;
    }
    default: return lane;
  }
}

// The last lane of `mask` to arrive computes every participant's result.
inline void complete_collective(Worker* w, Fiber* me) {
  const unsigned warp = me->warp, mask = me->mask;
  uint32_t ballot = 0;
  for (unsigned l = 0; l < kWarp; ++l) {
    if (!(mask >> l & 1u)) continue;
    Fiber& g = lane_fiber(w, warp, l);
    if (g.op != me->op || g.mask != mask || (checking(kSynccheck) && !same_site(g.site, me->site)))
      fail_as(kSynccheck, "in " + block_name(w) + ", " + thread_name(*me) + " calls " + op_name(me->op) +
           "(mask 0x" + [&] { char b[16]; std::snprintf(b, 16, "%08x", mask); return std::string(b); }() +
           ") at " + where(me->site) + " while " + thread_name(g) + " calls " +
           op_name(g.op) + " at " + where(g.site) +
           (g.op == me->op && g.mask == mask ? " (another call site)" : " with another mask or operation"));
    if (g.val) ballot |= 1u << l;
  }
  for (unsigned l = 0; l < kWarp; ++l) {
    if (!(mask >> l & 1u)) continue;
    Fiber& g = lane_fiber(w, warp, l);
    switch (g.op) {
      case WarpOp::Sync: g.res = 0; break;
      case WarpOp::Ballot: g.res = ballot; break;
      case WarpOp::Any: g.res = ballot != 0; break;
      case WarpOp::All: g.res = ballot == mask; break;
      case WarpOp::Match: {
        uint32_t m = 0;
        for (unsigned o = 0; o < kWarp; ++o)
          if ((mask >> o & 1u) && lane_fiber(w, warp, o).val == g.val) m |= 1u << o;
        g.res = m;
        break;
      }
      default: {
        int s = source_lane(g, static_cast<int>(l));
        if (!(mask >> s & 1u))
          fail_as(kSynccheck, "in " + block_name(w) + ", " + thread_name(g) + " reads lane " +
               std::to_string(s) + " with " + op_name(g.op) + " at " + where(g.site) +
               ", but that lane is not in the mask (its value is undefined on hardware)");
        g.res = lane_fiber(w, warp, static_cast<unsigned>(s)).val;
      }
    }
    g.st = State::Runnable;
  }
  if (!w->shadow.empty() && checking(kRacecheck) && (w->dyn_smem_size || !w->slots.empty())) {
    // the lanes of the mask now know each other (only shared memory can race)
    uint32_t join[kWarp] = {};
    for (unsigned l = 0; l < kWarp; ++l)
      if (mask >> l & 1u)
        for (unsigned k = 0; k < kWarp; ++k) join[k] = std::max(join[k], lane_fiber(w, warp, l).vc[k]);
    for (unsigned l = 0; l < kWarp; ++l)
      if (mask >> l & 1u) {
        Fiber& g = lane_fiber(w, warp, l);
        std::memcpy(g.vc, join, sizeof join);
        ++g.vc[l];
      }
  }
}

inline uint64_t collective(WarpOp op, unsigned mask, uint64_t val, int arg, int width, Loc loc) {
  Worker* w = tw;
  Fiber* f = tf;
  if (!(mask >> f->lane & 1u))
    fail_as(kSynccheck, thread_name(*f) + " in " + block_name(w) + " calls " + op_name(op) + " at " +
         where(loc) + " with a mask that does not include its own lane");
  if (mask & ~warp_lanes(w, f->warp))
    fail_as(kSynccheck, thread_name(*f) + " in " + block_name(w) + " calls " + op_name(op) + " at " +
         where(loc) + " with a mask naming lanes past the end of the block");
  if (width <= 0 || width > kWarp || (width & (width - 1)))
    fail(std::string(op_name(op)) + " at " + where(loc) + ": width must be a power of 2 <= 32");
  w->counters[kWarpOps] += 1;
  f->op = op;
  f->mask = mask;
  f->val = val;
  f->arg = arg;
  f->width = width;
  f->site = loc;
  f->st = State::AtWarp;
  bool all = true;
  for (unsigned l = 0; l < kWarp && all; ++l)
    if ((mask >> l & 1u) && lane_fiber(w, f->warp, l).st != State::AtWarp) all = false;
  if (all)
    complete_collective(w, f);
  else
    yield();
  return f->res;
}

template <class T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffle of a type > 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}

template <class T>
inline T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

// ------------------------------------------------------------------ memory counting
inline void touch(const void* p, size_t n, int kind, const Loc& loc) {
  Worker* w = tw;
  if (!w || !w->counting || n == 0) return;
  Fiber* f = tf;
  const SiteKey site{loc.file_name(), loc.line(), loc.column(), static_cast<uint32_t>(kind)};
  const uint32_t visit = f->visits[site]++;
  Group& g = w->groups[kind][GroupKey{site, visit, f->warp}];
  g.bytes += n;
  const uint64_t a = reinterpret_cast<uintptr_t>(p);
  for (uint64_t s = a >> 5; s <= (a + n - 1) >> 5; ++s) {
    g.sectors.push_back(s);
    if (kind < 2) w->unique[kind].insert(s);
  }
}

inline void flush_groups(Worker* w) {
  static constexpr int bytes[3] = {kLoadBytes, kStoreBytes, kAtomicBytes};
  static constexpr int reqs[3] = {kLoadRequests, kStoreRequests, kAtomicRequests};
  static constexpr int secs[3] = {kLoadSectors, kStoreSectors, kAtomicSectors};
  std::vector<uint64_t> warp_loads((w->nthreads + kWarp - 1) / kWarp, 0);
  for (int k = 0; k < 3; ++k) {
    for (auto& [key, g] : w->groups[k]) {
      if (k == 0) warp_loads[key.warp] += 1;
      std::sort(g.sectors.begin(), g.sectors.end());
      w->counters[bytes[k]] += g.bytes;
      w->counters[reqs[k]] += 1;
      w->counters[secs[k]] +=
          std::unique(g.sectors.begin(), g.sectors.end()) - g.sectors.begin();
    }
    w->groups[k].clear();
  }
  // the busiest warp of the launch: how evenly the work was spread
  for (uint64_t n : warp_loads)
    w->counters[kMaxWarpLoadRequests] = std::max(w->counters[kMaxWarpLoadRequests], n);
}


// ------------------------------------------------------------------ schedules
inline uint64_t next_random(Worker* w) {   // xorshift64*
  uint64_t x = w->rng;
  x ^= x >> 12;
  x ^= x << 25;
  x ^= x >> 27;
  w->rng = x;
  return x * 0x2545F4914F6CDD1Dull;
}

inline uint64_t mix64(uint64_t z) {   // splitmix64's finaliser
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// Schedule::Random: after a memory access, now and then let another thread of the block run,
// so the interleavings inside a warp that a GPU may choose happen here too.
// Every arena of the running launch lies in [g_shared_lo, g_shared_lo + g_shared_size): the
// callbacks of checked builds reject other addresses without thread-local storage. `static`:
// one pair per module.
static uintptr_t g_shared_lo = 0, g_shared_size = 0;

inline void maybe_switch(Worker* w) {
  if (w->cfg->schedule == uint32_t(Schedule::Random) && tf && (next_random(w) & 3) == 0) yield();
}

// ------------------------------------------------------------------ shared memory
inline size_t round_up(size_t n, size_t a) { return (n + a - 1) / a * a; }

// Under AddressSanitizer the arena's redzones are poisoned, so an overflow of a shared array
// is a report there too.
inline void asan_poison(Worker* w, size_t begin, size_t end, bool poison) {
#ifdef ATTNGRAPH_EMU_ASAN
  if (end <= begin) return;
  if (poison) ASAN_POISON_MEMORY_REGION(w->arena + begin, end - begin);
  else ASAN_UNPOISON_MEMORY_REGION(w->arena + begin, end - begin);
#else
  (void)w; (void)begin; (void)end; (void)poison;
#endif
}

inline void mark(Worker* w, size_t begin, size_t end, uint8_t state) {
  if (w->shadow.empty()) return;
  for (size_t i = begin; i < end; ++i) w->shadow[i] = Shadow{Access{}, Access{}, Access{}, state};
}

// A new block: dynamic shared memory at the start of the arena, static arrays allocated as
// their declarations run; everything poisoned (0xff: NaN for floats, -1 for integers).
inline void reset_shared(Worker* w) {
  const size_t dyn_end = kRedzone + round_up(w->dyn_smem_size, 16);
  w->slots.clear();
  w->static_bytes = 0;
  w->arena_used = dyn_end + kRedzone;
  w->dyn_smem = w->dyn_smem_size ? w->arena + kRedzone : nullptr;
  asan_poison(w, 0, w->arena_size, false);
  std::memset(w->arena, 0xff, w->arena_used);
  asan_poison(w, 0, kRedzone, true);
  asan_poison(w, kRedzone + w->dyn_smem_size, w->arena_size, true);
  if (!w->shadow.empty()) {
    mark(w, 0, w->arena_used, kRedzoneByte);
    mark(w, kRedzone, kRedzone + w->dyn_smem_size, kUnwritten);
  }
}

__attribute__((noinline)) inline char* allocate_static(Worker* w, int id, size_t size, size_t align,
                                                       const char* name) {
  const uint64_t limit = w->cfg->max_dynamic_smem ? w->cfg->smem_limit : kDefaultSmem;
  const size_t offset = round_up(w->arena_used, std::max<size_t>(align, 16));
  if (w->static_bytes + size > kDefaultSmem || w->static_bytes + size + w->dyn_smem_size > limit ||
      w->slots.size() >= kMaxStaticSlots || offset + size + kRedzone > w->arena_size)
    fail("too much shared memory for one block: static " + std::to_string(w->static_bytes + size) +
         " bytes (with __shared__ `" + name + "`) + dynamic " + std::to_string(w->dyn_smem_size) +
         " bytes > " + std::to_string(limit) + " (static shared memory is at most 49152 bytes; " +
         "static + dynamic at most 49152 without the max_dynamic_shared_size_bytes attribute, " +
         "else the architecture's limit " + std::to_string(w->cfg->smem_limit) + ")");
  w->slots.push_back(StaticSlot{id, size, offset, name});
  w->static_bytes += size;
  asan_poison(w, offset, offset + size, false);
  std::memset(w->arena + offset, 0xff, size);
  mark(w, w->arena_used, offset + size + kRedzone, kRedzoneByte);
  mark(w, offset, offset + size, kUnwritten);
  w->arena_used = offset + size + kRedzone;
  return w->arena + offset;
}

// A static `__shared__ T name;` of the running block (the builder rewrites declarations to
// this): every thread of the block gets the same object, a new block a new, poisoned one.
template <class T>
inline T& static_shared(int id, const char* name, size_t align = alignof(T)) {
  Worker* w = tw;
  for (const StaticSlot& s : w->slots)
    if (s.id == id && s.size == sizeof(T)) return *reinterpret_cast<T*>(w->arena + s.offset);
  return *reinterpret_cast<T*>(allocate_static(w, id, sizeof(T), std::max(align, alignof(T)), name));
}

inline void* dynamic_shared() { return tw->dyn_smem; }

inline std::string hex(uint64_t v) {
  char b[24];
  std::snprintf(b, sizeof b, "0x%llx", static_cast<unsigned long long>(v));
  return b;
}

// Where byte `off` of the arena lies, in the kernel's terms.
inline std::string shared_where(const Worker* w, size_t off) {
  const size_t dyn = kRedzone, dyn_end = kRedzone + w->dyn_smem_size;
  if (off >= dyn && off < dyn_end)
    return "dynamic shared memory, byte " + std::to_string(off - dyn) + " of " +
           std::to_string(w->dyn_smem_size);
  for (const StaticSlot& s : w->slots)
    if (off >= s.offset && off < s.offset + s.size)
      return "__shared__ `" + std::string(s.name) + "`, byte " + std::to_string(off - s.offset) +
             " of " + std::to_string(s.size);
  // a redzone: name the array it follows or precedes
  const StaticSlot* before = nullptr;
  for (const StaticSlot& s : w->slots)
    if (s.offset + s.size <= off && (!before || s.offset > before->offset)) before = &s;
  if (before)
    return std::to_string(off - before->offset - before->size) + " bytes past the end of __shared__ `" +
           before->name + "` (" + std::to_string(before->size) + " bytes)";
  if (off >= dyn_end)
    return std::to_string(off - dyn_end) + " bytes past the end of the dynamic shared memory (" +
           std::to_string(w->dyn_smem_size) + " bytes given at launch)";
  return std::to_string(dyn - off) + " bytes before the start of shared memory";
}

enum AccessKind { kRead = 0, kWrite = 1, kAtomic = 2 };

inline const char* verb(int kind) { return kind == kRead ? "reads" : kind == kWrite ? "writes" : "updates atomically"; }

inline std::string hazard(Worker* w, const char* what, size_t off, const Fiber* f, int kind,
                          uintptr_t pc, const Access& other, const char* other_verb) {
  const bool same_warp = other.warp == f->warp;
  return std::string(what) + " hazard on " + shared_where(w, off) + " (shared offset " +
         hex(off - kRedzone) + ") in " + block_name(w) + ": " + thread_name(*f) + " " + verb(kind) +
         " it at " + pc_token(pc) + ", " + thread_of(w, other.tid) + " " + other_verb + " it at " +
         pc_token(other.pc) +
         (same_warp ? ", with no __syncwarp() or warp collective between them (the lanes of a "
                      "warp are not in lockstep)"
                    : ", with no __syncthreads() between them");
}

// One access of `n` bytes at arena offset `off` by the running thread.
__attribute__((no_sanitize_address)) inline void shared_access(Worker* w, size_t off, size_t n,
                                                               int kind, uintptr_t pc,
                                                               const Loc* loc = nullptr) {
  auto at = [&] { return loc ? where(*loc) : pc_token(pc); };
  Fiber* f = tf;
  const uint32_t checks = w->cfg->checks;
  const Access cur{w->epoch, f->vc[f->lane], static_cast<uint16_t>(f->tid),
                   static_cast<uint16_t>(f->warp), pc};
  auto ordered = [&](const Access& r) {
    return r.epoch < w->epoch || r.tid == f->tid ||
           (r.warp == f->warp && r.clock <= f->vc[r.tid % kWarp]);
  };
  for (size_t i = off; i < off + n; ++i) {
    Shadow& sh = w->shadow[i];
    if (sh.state == kRedzoneByte) {
      if (checks & kMemcheck)
        report(kMemcheck, std::string("invalid shared memory access: ") + thread_name(*f) + " in " +
                              block_name(w) + " " + verb(kind) + " " + std::to_string(n) +
                              " bytes at " + at() + ", " + shared_where(w, i) +
                              " (shared offset " + hex(i - kRedzone) + ")");
      continue;
    }
    if (kind != kWrite && sh.state == kUnwritten && (checks & kInitcheck))
      report(kInitcheck, std::string("uninitialized shared memory read: ") + thread_name(*f) +
                             " in " + block_name(w) + " " + verb(kind) + " " + std::to_string(n) +
                             " bytes at " + at() + " of " + shared_where(w, i) +
                             " (shared offset " + hex(i - kRedzone) +
                             "), which no thread of the block has written");
    if (kind != kRead) sh.state = kWritten;
    if (kind == kAtomic || !(checks & kRacecheck)) continue;
    if (sh.w.epoch && !ordered(sh.w))
      report(kRacecheck, hazard(w, kind == kRead ? "read-after-write" : "write-after-write", i, f,
                                kind, pc, sh.w, "wrote"));
    if (kind == kRead) {
      if (sh.r1.epoch && sh.r1.warp != f->warp) sh.r2 = sh.r1;
      sh.r1 = cur;
      continue;
    }
    const Access& other_warp = sh.r1.warp != f->warp ? sh.r1 : sh.r2;
    if (sh.r1.epoch && !ordered(sh.r1))
      report(kRacecheck, hazard(w, "write-after-read", i, f, kind, pc, sh.r1, "read"));
    if (other_warp.epoch && !ordered(other_warp))
      report(kRacecheck, hazard(w, "write-after-read", i, f, kind, pc, other_warp, "read"));
    sh.w = cur;
    sh.r1 = sh.r2 = Access{};
  }
}

// Every instrumented memory access of kernel code arrives here (checked builds only).
__attribute__((no_sanitize_address)) inline void on_access(uintptr_t a, size_t n, int kind,
                                                           uintptr_t pc) {
  if (a - g_shared_lo >= g_shared_size) return;   // not shared memory
  Worker* w = tw;
  if (!w || !tf || !w->cfg) return;
  const uintptr_t off = a - reinterpret_cast<uintptr_t>(w->arena);
  if (off >= w->arena_size) return;   // not shared memory
  if (!w->shadow.empty()) shared_access(w, off, n, kind, pc);
  maybe_switch(w);
}

// memcheck of a global access made through ag_load / ag_store / the atomics: it must lie in
// one of the buffers passed to the kernel.
inline void check_global(const void* p, size_t n, int kind, const Loc& loc) {
  Worker* w = tw;
  if (!w->cfg || !(w->cfg->checks & kMemcheck) || !w->cfg->nranges) return;
  const uint64_t a = reinterpret_cast<uintptr_t>(p);
  if (a - reinterpret_cast<uintptr_t>(w->arena) < w->arena_size) return;
  const uint64_t* r = w->cfg->ranges;
  uint64_t best_gap = ~0ull;
  uint32_t best = 0;
  for (uint32_t i = 0; i < w->cfg->nranges; ++i) {
    if (a >= r[2 * i] && a + n <= r[2 * i + 1]) return;
    const uint64_t gap = a >= r[2 * i + 1] ? a - r[2 * i + 1] : r[2 * i] - a;
    if (gap < best_gap) best_gap = gap, best = i;
  }
  const bool past = a >= r[2 * best + 1];
  report(kMemcheck, std::string("invalid global ") + (kind == kRead ? "read" : kind == kWrite ? "write" : "atomic") +
                        " of " + std::to_string(n) + " bytes at " + hex(a) + " by " + thread_name(*tf) +
                        " in " + block_name(w) + " at " + where(loc) +
                        ": outside every buffer passed to the kernel (nearest: pointer argument " +
                        std::to_string(best) + ", " +
                        std::to_string(past ? a - r[2 * best + 1] : r[2 * best] - a) + " bytes " +
                        (past ? "past its end" : "before its start") + ")");
}

// An atomic on shared memory: it reads and writes, but is no hazard.
inline void atomic_access(const void* p, size_t n, const Loc& loc) {
  Worker* w = tw;
  if (!w || !w->cfg) return;
  const uintptr_t off = reinterpret_cast<uintptr_t>(p) - reinterpret_cast<uintptr_t>(w->arena);
  if (off >= w->arena_size) {
    check_global(p, n, kAtomic, loc);
    return;
  }
  if (!w->shadow.empty()) shared_access(w, off, n, kAtomic, 0, &loc);
}

// ------------------------------------------------------------------ block execution
inline size_t page_size() { return static_cast<size_t>(sysconf(_SC_PAGESIZE)); }

// Fibers abandoned by a failed block leave their frames' redzones poisoned; a later mapping
// at the same address must not inherit that.
inline void unpoison_stacks(Worker* w) {
#ifdef ATTNGRAPH_EMU_ASAN
  if (w->stacks) ASAN_UNPOISON_MEMORY_REGION(w->stacks, w->stack_stride * w->stack_count);
#else
  (void)w;
#endif
}

inline void release_stacks(Worker* w) {
  unpoison_stacks(w);
  if (w->stacks) munmap(w->stacks, w->stack_stride * w->stack_count);
  w->stacks = nullptr;
  w->stack_count = 0;
}

inline void ensure_stacks(Worker* w, size_t count) {
  if (w->stack_count >= count) return;
  release_stacks(w);
  const size_t page = page_size();
  w->stack_stride = w->stack_size + page;   // a guard page below each stack
  void* m = mmap(nullptr, w->stack_stride * count, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED) {
    w->stacks = nullptr;
    w->stack_count = 0;
    w->failed = true;
    w->error = "cannot map fiber stacks (" + std::to_string(count) + " x " +
               std::to_string(w->stack_size) + " bytes)";
    return;
  }
  w->stacks = static_cast<char*>(m);
  w->stack_count = count;
  unpoison_stacks(w);
  for (size_t i = 0; i < count; ++i) mprotect(w->stacks + i * w->stack_stride, page, PROT_NONE);
}

inline void init_fiber(Worker* w, Fiber& f, size_t i) {
  f.stack = w->stacks + i * w->stack_stride + page_size();
  char* top = f.stack + w->stack_size;
#ifdef ATTNGRAPH_EMU_USE_UCONTEXT
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = f.stack;
  f.ctx.uc_stack.ss_size = w->stack_size;
  f.ctx.uc_link = nullptr;
  makecontext(&f.ctx, reinterpret_cast<void (*)()>(attngraph_emu_fiber_main), 0);
#else
  auto* p = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(top) & ~uintptr_t(15));
  *--p = 0;                                                  // alignment slot
  *--p = reinterpret_cast<uint64_t>(&attngraph_emu_trampoline);  // `ret` target
  for (int r = 0; r < 6; ++r) *--p = 0;                      // rbp rbx r12 r13 r14 r15
  --p;                                                       // mxcsr / x87 control word
  uint32_t mx;
  uint16_t cw;
  asm volatile("stmxcsr %0" : "=m"(mx));
  asm volatile("fnstcw %0" : "=m"(cw));
  std::memcpy(p, &mx, 4);
  std::memcpy(reinterpret_cast<char*>(p) + 4, &cw, 2);
  f.sp = p;
#endif
}

// Runs one block to completion (or to an error). Returns false on error.
inline bool run_block(Worker* w, uint3 bidx) {
  w->bidx = bidx;
  const unsigned n = w->nthreads;
  for (unsigned i = 0; i < n; ++i) {
    Fiber& f = w->fibers[i];
    f.idx = uint3{i % w->bdim.x, (i / w->bdim.x) % w->bdim.y, i / (w->bdim.x * w->bdim.y)};
    f.tid = i;
    f.lane = i % kWarp;
    f.warp = i / kWarp;
    f.st = State::Runnable;
    f.fake_stack = nullptr;
    f.visits.clear();
    std::memset(f.vc, 0, sizeof f.vc);
    f.vc[f.lane] = 1;
    f.barriers = 0;
    init_fiber(w, f, i);
  }
  w->live = n;
  w->at_barrier = 0;
  w->epoch = 1;
  w->barrier_sites.clear();
  reset_shared(w);
  const uint64_t linear = bidx.x + uint64_t(w->gdim.x) * (bidx.y + uint64_t(w->gdim.y) * bidx.z);
  w->rng = mix64(w->cfg->seed ^ mix64(linear)) | 1;
  const auto schedule = static_cast<Schedule>(w->cfg->schedule);
  std::vector<unsigned> order(n);
  for (unsigned i = 0; i < n; ++i) order[i] = schedule == Schedule::Reverse ? n - 1 - i : i;
  for (;;) {
    bool ran = false;
    if (schedule == Schedule::Random)   // a new order between every two synchronisation points
      for (unsigned i = n; i > 1; --i) std::swap(order[i - 1], order[next_random(w) % i]);
    for (unsigned j = 0; j < n && !w->failed; ++j) {
      Fiber* f = &w->fibers[order[j]];
      if (f->st != State::Runnable) continue;
      ran = true;
      resume(w, f);
    }
    if (w->failed) return false;
    if (w->live == 0) break;
    if (ran) continue;
    // Nobody can run: a barrier everyone reached was released above, so this is a deadlock.
    std::string msg = "deadlock in " + block_name(w) + ":";
    int shown = 0;
    for (auto& g : w->fibers) {
      if (g.st == State::Exited || shown >= 4) continue;
      ++shown;
      if (g.st == State::AtBarrier) {
        msg += " " + thread_name(g) + " waits at __syncthreads() at " + where(g.site) + ";";
      } else if (g.st == State::AtWarp) {
        std::string missing;
        for (unsigned l = 0; l < kWarp; ++l) {
          if (!(g.mask >> l & 1u)) continue;
          const Fiber& o = lane_fiber(w, g.warp, l);
          if (o.st == State::AtWarp) continue;
          missing = " lane " + std::to_string(l) +
                    (o.st == State::Exited ? " has exited" : " waits elsewhere");
          break;
        }
        msg += " " + thread_name(g) + " waits at " + op_name(g.op) + " at " + where(g.site) +
               " for the lanes of its mask (" + missing.substr(1) + ");";
      }
    }
    block_error(w, (w->cfg->checks & kSynccheck) ? kSynccheck : 0, msg);
    return false;
  }
  if (w->cfg->checks & kSynccheck) {
    // The CUDA Programming Guide allows __syncthreads() in conditional code only when the
    // condition is the same for the whole block: a thread that left before a barrier the
    // others passed broke that rule (hardware since Volta lets exited threads through, so the
    // emulator does too when synccheck is off).
    for (const Fiber& g : w->fibers) {
      if (g.barriers >= w->barrier_sites.size()) continue;
      const Fiber* passed = nullptr;
      for (const Fiber& o : w->fibers)
        if (o.barriers > g.barriers) { passed = &o; break; }
      block_error(w, kSynccheck,
                  "divergent barrier in " + block_name(w) + ": " + thread_name(g) +
                      " exited without reaching __syncthreads() at " +
                      where(w->barrier_sites[g.barriers]) + ", which " + thread_name(*passed) +
                      " reached (a barrier in conditional code must be reached by every thread "
                      "of the block)");
      return false;
    }
  }
  if (w->counting) flush_groups(w);
  return true;
}

}  // namespace emu

extern "C" __attribute__((visibility("hidden"), noreturn)) void attngraph_emu_fiber_main() {
  emu::Worker* w = emu::tw;
  emu::asan_finish(nullptr, &w->sched_bottom, &w->sched_size);
  w->body(w->closure);
  emu::Fiber* f = emu::tf;
  f->st = emu::State::Exited;
  --w->live;
  emu::check_barrier(w);  // the threads still waiting may now be all there are
  emu::exit_fiber();
}

namespace emu {

// ------------------------------------------------------------------ launches
struct LaunchError {
  char* buf;
  size_t len;
  void set(const std::string& s) const {
    if (!buf || !len) return;
    std::snprintf(buf, len, "%s", s.c_str());
  }
};

inline size_t env_size(const char* name, size_t fallback) {
  const char* v = std::getenv(name);
  if (!v || !*v) return fallback;
  return static_cast<size_t>(std::strtoull(v, nullptr, 10));
}

inline std::string launch_refused(const std::string& what) {
  return "invalid configuration argument (a GPU refuses this launch): " + what;
}

// Validates the configuration like cudaLaunchKernel on the architecture of `cfg`, then runs
// every block. Returns 0, 1 (refused launch), 2 (error while running) or 0x100 | the Tool of
// a sanitizer finding.
inline int launch(const unsigned* grid, const unsigned* block, uint64_t smem, int workers,
                  int counting, uint64_t* counters_out, LaunchError err, const LaunchConfig* cfg,
                  Body body, void* closure) {
  const uint64_t nthreads = uint64_t(block[0]) * block[1] * block[2];
  auto dims = [](const unsigned* d) {
    return "(" + std::to_string(d[0]) + "," + std::to_string(d[1]) + "," + std::to_string(d[2]) + ")";
  };
  if (!grid[0] || !grid[1] || !grid[2] || !block[0] || !block[1] || !block[2]) {
    err.set(launch_refused("a grid or block dimension is 0: grid " + dims(grid) + ", block " + dims(block)));
    return 1;
  }
  if (nthreads > 1024 || block[0] > 1024 || block[1] > 1024 || block[2] > 64) {
    err.set(launch_refused("a block has at most 1024 threads and dimensions <= (1024,1024,64), got " +
                           dims(block) + " = " + std::to_string(nthreads) + " threads"));
    return 1;
  }
  if (grid[0] > 0x7fffffffu || grid[1] > 65535 || grid[2] > 65535) {
    err.set(launch_refused("grid.x <= 2^31-1, grid.y and grid.z <= 65535, got " + dims(grid)));
    return 1;
  }
  const uint64_t smem_max = cfg->max_dynamic_smem ? std::min(cfg->max_dynamic_smem, cfg->smem_limit)
                                                  : kDefaultSmem;
  if (smem > smem_max) {
    err.set(launch_refused(
        "too much dynamic shared memory: " + std::to_string(smem) + " bytes > " +
        std::to_string(smem_max) +
        (cfg->max_dynamic_smem
             ? " (the kernel's max_dynamic_shared_size_bytes, within the architecture's " +
                   std::to_string(cfg->smem_limit) + ")"
             : " (48 KiB without opt-in: set the kernel's max_dynamic_shared_size_bytes "
               "attribute, at most " + std::to_string(cfg->smem_limit) + " on this architecture)")));
    return 1;
  }
  if (cfg->regs && cfg->regs * nthreads > 65536) {
    err.set(launch_refused("too many resources requested: " + std::to_string(cfg->regs) +
                           " registers x " + std::to_string(nthreads) + " threads = " +
                           std::to_string(cfg->regs * nthreads) + " > 65536 registers per block"));
    return 1;
  }
  const uint64_t nblocks = uint64_t(grid[0]) * grid[1] * grid[2];
  const int nw = static_cast<int>(std::max<uint64_t>(1, std::min<uint64_t>(nblocks, workers > 0 ? workers : 1)));
#ifdef ATTNGRAPH_EMU_ASAN
  const size_t default_stack = 256 * 1024;
#else
  const size_t default_stack = 64 * 1024;
#endif
  const size_t stack = (env_size("ATTNGRAPH_EMU_STACK_KB", default_stack / 1024) * 1024 + 4095) & ~size_t(4095);
  const bool shared_checks = cfg->checks & (kMemcheck | kRacecheck | kInitcheck);
  // blocks in the schedule's order: b -> (a * b + c) mod nblocks, a permutation when a and
  // nblocks are coprime
  const auto schedule = static_cast<Schedule>(cfg->schedule);
  uint64_t perm_a = 1, perm_c = 0;
  if (schedule == Schedule::Random && nblocks > 1) {
    perm_a = 1 + mix64(cfg->seed) % (nblocks - 1);   // in [1, nblocks): 1 ends the search
    while (std::gcd(perm_a, nblocks) != 1) perm_a = perm_a % (nblocks - 1) + 1;
    perm_c = mix64(cfg->seed + 1) % nblocks;
  }

  std::atomic<uint64_t> next{0};
  std::atomic<bool> stop{false};
  std::vector<Worker> ws(nw);
  const size_t arena_size = 2 * kRedzone + round_up(smem, 16) + kDefaultSmem +
                            kMaxStaticSlots * (kRedzone + 16);
  std::vector<char> arenas(arena_size * nw);
  g_shared_lo = reinterpret_cast<uintptr_t>(arenas.data());
  g_shared_size = arenas.size();
  auto work = [&](Worker* w) {
    tw = w;
    w->gdim = dim3(grid[0], grid[1], grid[2]);
    w->bdim = dim3(block[0], block[1], block[2]);
    w->nthreads = static_cast<unsigned>(nthreads);
    w->stack_size = stack;
    w->body = body;
    w->closure = closure;
    w->counting = counting != 0;
    w->cfg = cfg;
    w->fibers.resize(nthreads);
    w->dyn_smem_size = smem;
    w->arena = arenas.data() + (w - ws.data()) * arena_size;
    w->arena_size = arena_size;
    if (shared_checks) w->shadow.assign(w->arena_size, Shadow{});
    ensure_stacks(w, nthreads);
    while (!w->failed && !stop.load(std::memory_order_relaxed)) {
      uint64_t b = next.fetch_add(1);
      if (b >= nblocks) break;
      if (schedule == Schedule::Reverse) b = nblocks - 1 - b;
      else if (schedule == Schedule::Random) b = static_cast<uint64_t>(
          (static_cast<unsigned __int128>(perm_a) * b + perm_c) % nblocks);
      uint3 bi{static_cast<unsigned>(b % grid[0]), static_cast<unsigned>((b / grid[0]) % grid[1]),
               static_cast<unsigned>(b / (uint64_t(grid[0]) * grid[1]))};
      if (!run_block(w, bi)) stop = true;
      w->counters[kBlocks] += 1;
      w->counters[kThreads] += nthreads;
      w->counters[kWarps] += (nthreads + kWarp - 1) / kWarp;
    }
    release_stacks(w);
    asan_poison(w, 0, w->arena_size, false);
    std::vector<Shadow>().swap(w->shadow);
    tw = nullptr;
  };
  std::vector<std::thread> threads;
  for (int i = 1; i < nw; ++i) threads.emplace_back(work, &ws[i]);
  work(&ws[0]);
  for (auto& t : threads) t.join();
  g_shared_size = 0;

  std::unordered_set<uint64_t> unique[2];
  for (auto& w : ws) {
    if (w.failed) {
      err.set(w.error);
      return w.error_tool ? 0x100 | static_cast<int>(w.error_tool) : 2;
    }
    for (int c = 0; c < kNumCounters; ++c)
      counters_out[c] = c == kMaxWarpLoadRequests ? std::max(counters_out[c], w.counters[c])
                                                  : counters_out[c] + w.counters[c];
    for (int k = 0; k < 2; ++k) unique[k].insert(w.unique[k].begin(), w.unique[k].end());
  }
  counters_out[kUniqueLoadSectors] = unique[0].size();
  counters_out[kUniqueStoreSectors] = unique[1].size();
  return 0;
}

// A kernel's arguments arrive as an array of pointers to their values (cuLaunchKernel's
// kernelParams); the builder's wrapper unpacks them with the kernel's own parameter types.
template <class... A, size_t... I>
inline void invoke(void (*k)(A...), void** args, std::index_sequence<I...>) {
  k(*static_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(args[I])...);
}

template <class... A>
struct Call {
  void (*kernel)(A...);
  void** args;
  static void run(void* self) {
    auto* c = static_cast<Call*>(self);
    invoke(c->kernel, c->args, std::index_sequence_for<A...>{});
  }
};

template <class... A>
inline int launch_kernel(void (*k)(A...), const unsigned* grid, const unsigned* block,
                         uint64_t smem, int workers, int counting, uint64_t* counters,
                         char* err, size_t errlen, const LaunchConfig* cfg, void** args) {
  Call<A...> call{k, args};
  return launch(grid, block, smem, workers, counting, counters, LaunchError{err, errlen}, cfg,
                &Call<A...>::run, &call);
}

// Parameter kinds, so Python can check each argument: p (pointer), iN / uN (integers of N
// bytes), fN (floats), bN (other trivially copyable values).
template <class T>
inline std::string kind() {
  using U = std::remove_cv_t<std::remove_reference_t<T>>;
  if constexpr (std::is_pointer_v<U>) return "p";
  else if constexpr (std::is_same_v<U, bool>) return "b1";
  else if constexpr (std::is_integral_v<U>) return (std::is_signed_v<U> ? "i" : "u") + std::to_string(sizeof(U));
  else if constexpr (std::is_floating_point_v<U>) return "f" + std::to_string(sizeof(U));
  else return "b" + std::to_string(sizeof(U));
}

template <class... A>
inline const char* signature(void (*)(A...)) {
  static const std::string s = [] {
    std::string r;
    ((r += kind<A>() + ","), ...);
    if (!r.empty()) r.pop_back();
    return r;
  }();
  return s.c_str();
}

}  // namespace emu

// ------------------------------------------------------------------ the CUDA names
#define threadIdx (::emu::tf->idx)
#define blockIdx (::emu::tw->bidx)
#define blockDim (::emu::tw->bdim)
#define gridDim (::emu::tw->gdim)
#define warpSize 32

inline void __syncthreads(emu::Loc loc = emu::Loc::current()) { emu::syncthreads(loc); }
inline void __syncwarp(unsigned mask = 0xffffffffu, emu::Loc loc = emu::Loc::current()) {
  emu::collective(emu::WarpOp::Sync, mask, 0, 0, 32, loc);
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }
[[noreturn]] inline void __trap(emu::Loc loc = emu::Loc::current()) {
  emu::fail("__trap() in " + emu::thread_name(*emu::tf) + " of " + emu::block_name(emu::tw) +
            " at " + emu::where(loc));
}
inline unsigned __activemask() {
  unsigned m = 0;
  const emu::Fiber* f = emu::tf;
  for (unsigned l = 0; l < 32; ++l) {
    unsigned t = f->warp * 32 + l;
    if (t < emu::tw->nthreads && emu::tw->fibers[t].st != emu::State::Exited) m |= 1u << l;
  }
  return m;
}

template <class T>
inline T __shfl_sync(unsigned mask, T var, int src, int width = 32, emu::Loc loc = emu::Loc::current()) {
  return emu::from_bits<T>(emu::collective(emu::WarpOp::ShflIdx, mask, emu::to_bits(var), src, width, loc));
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32, emu::Loc loc = emu::Loc::current()) {
  return emu::from_bits<T>(emu::collective(emu::WarpOp::ShflUp, mask, emu::to_bits(var), int(delta), width, loc));
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32, emu::Loc loc = emu::Loc::current()) {
  return emu::from_bits<T>(emu::collective(emu::WarpOp::ShflDown, mask, emu::to_bits(var), int(delta), width, loc));
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32, emu::Loc loc = emu::Loc::current()) {
  return emu::from_bits<T>(emu::collective(emu::WarpOp::ShflXor, mask, emu::to_bits(var), lane_mask, width, loc));
}
inline unsigned __ballot_sync(unsigned mask, int pred, emu::Loc loc = emu::Loc::current()) {
  return static_cast<unsigned>(emu::collective(emu::WarpOp::Ballot, mask, pred != 0, 0, 32, loc));
}
inline int __any_sync(unsigned mask, int pred, emu::Loc loc = emu::Loc::current()) {
  return static_cast<int>(emu::collective(emu::WarpOp::Any, mask, pred != 0, 0, 32, loc));
}
inline int __all_sync(unsigned mask, int pred, emu::Loc loc = emu::Loc::current()) {
  return static_cast<int>(emu::collective(emu::WarpOp::All, mask, pred != 0, 0, 32, loc));
}
template <class T>
inline unsigned __match_any_sync(unsigned mask, T value, emu::Loc loc = emu::Loc::current()) {
  return static_cast<unsigned>(emu::collective(emu::WarpOp::Match, mask, emu::to_bits(value), 0, 32, loc));
}

// Atomics: atomic across the worker threads (blocks run in parallel), counted as accesses;
// not instrumented (an atomic is no hazard), checked by atomic_access.
#define AG_ATOMIC __attribute__((no_sanitize_address))
template <class T>
AG_ATOMIC inline T ag_atomic_add(T* p, T v, emu::Loc loc) {
  emu::touch(p, sizeof(T), 2, loc);
  emu::atomic_access(p, sizeof(T), loc);
  return std::atomic_ref<T>(*p).fetch_add(v, std::memory_order_relaxed);
}
AG_ATOMIC inline float atomicAdd(float* p, float v, emu::Loc loc = emu::Loc::current()) { return ag_atomic_add(p, v, loc); }
AG_ATOMIC inline double atomicAdd(double* p, double v, emu::Loc loc = emu::Loc::current()) { return ag_atomic_add(p, v, loc); }
AG_ATOMIC inline int atomicAdd(int* p, int v, emu::Loc loc = emu::Loc::current()) { return ag_atomic_add(p, v, loc); }
AG_ATOMIC inline unsigned atomicAdd(unsigned* p, unsigned v, emu::Loc loc = emu::Loc::current()) { return ag_atomic_add(p, v, loc); }
AG_ATOMIC inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v, emu::Loc loc = emu::Loc::current()) {
  return ag_atomic_add(p, v, loc);
}
template <class T>
AG_ATOMIC inline T atomicCAS(T* p, T expected, T desired, emu::Loc loc = emu::Loc::current()) {
  emu::touch(p, sizeof(T), 2, loc);
  emu::atomic_access(p, sizeof(T), loc);
  std::atomic_ref<T>(*p).compare_exchange_strong(expected, desired);
  return expected;
}
template <class T>
AG_ATOMIC inline T atomicExch(T* p, T v, emu::Loc loc = emu::Loc::current()) {
  emu::touch(p, sizeof(T), 2, loc);
  emu::atomic_access(p, sizeof(T), loc);
  return std::atomic_ref<T>(*p).exchange(v);
}
template <class T>
AG_ATOMIC inline T atomicMax(T* p, T v, emu::Loc loc = emu::Loc::current()) {
  emu::touch(p, sizeof(T), 2, loc);
  emu::atomic_access(p, sizeof(T), loc);
  std::atomic_ref<T> r(*p);
  T old = r.load();
  while (old < v && !r.compare_exchange_weak(old, v)) {}
  return old;
}
template <class T>
AG_ATOMIC inline T atomicMin(T* p, T v, emu::Loc loc = emu::Loc::current()) {
  emu::touch(p, sizeof(T), 2, loc);
  emu::atomic_access(p, sizeof(T), loc);
  std::atomic_ref<T> r(*p);
  T old = r.load();
  while (old > v && !r.compare_exchange_weak(old, v)) {}
  return old;
}

// Math intrinsics and integer helpers of the device runtime.
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __log2f(float x) { return std::log2(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __int_as_float(int x) { float f; std::memcpy(&f, &x, 4); return f; }
inline int __float_as_int(float x) { int i; std::memcpy(&i, &x, 4); return i; }
inline float __uint_as_float(unsigned x) { float f; std::memcpy(&f, &x, 4); return f; }
inline unsigned __float_as_uint(float x) { unsigned i; std::memcpy(&i, &x, 4); return i; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}
template <class A, class B>
inline auto min(A a, B b) -> std::common_type_t<A, B> { return b < a ? b : a; }
template <class A, class B>
inline auto max(A a, B b) -> std::common_type_t<A, B> { return a < b ? b : a; }
template <class T>
inline T __ldg(const T* p) { return *p; }

// Instrumented global memory accesses (see attngraph/ops/cuda/common.cuh). A GPU faults on
// an access not aligned to its size (a 16-byte vector at an 8-byte boundary, say): so does
// the emulator.
namespace emu {
template <class T>
inline void check_aligned(const void* p, const char* what, const Loc& loc) {
  constexpr size_t align = alignof(T) > sizeof(T) ? alignof(T) : sizeof(T);
  constexpr size_t need = (align & (align - 1)) == 0 && align <= 16 ? align : alignof(T);
  if (reinterpret_cast<uintptr_t>(p) % need != 0) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%p", p);
    fail(std::string("misaligned address: ") + what + " of " + std::to_string(sizeof(T)) +
         " bytes at " + buf + " by " + thread_name(*tf) + " in " + block_name(tw) + " at " +
         where(loc));
  }
}
}  // namespace emu

template <class T>
inline T ag_load(const T* p, emu::Loc loc = emu::Loc::current()) {
  emu::check_aligned<T>(p, "load", loc);
  emu::touch(p, sizeof(T), 0, loc);
  emu::check_global(p, sizeof(T), emu::kRead, loc);
  emu::maybe_switch(emu::tw);
  return *p;
}
template <class T>
inline void ag_store(T* p, T v, emu::Loc loc = emu::Loc::current()) {
  emu::check_aligned<T>(p, "store", loc);
  emu::touch(p, sizeof(T), 1, loc);
  emu::check_global(p, sizeof(T), emu::kWrite, loc);
  emu::maybe_switch(emu::tw);
  *p = v;
}

#ifdef ATTNGRAPH_EMU_CHECKED
// Checked builds are compiled with -fsanitize=kernel-address and callbacks for every access:
// these are the callbacks (no sanitizer runtime is linked), feeding racecheck, initcheck and
// memcheck of shared memory and the random schedule's switches.
#define AG_HOOK(bytes)                                                                        \
  extern "C" __attribute__((no_sanitize_address, visibility("hidden"))) void                  \
      __asan_load##bytes##_noabort(uintptr_t a) {                                             \
    emu::on_access(a, bytes, emu::kRead, reinterpret_cast<uintptr_t>(__builtin_return_address(0)));  \
  }                                                                                           \
  extern "C" __attribute__((no_sanitize_address, visibility("hidden"))) void                  \
      __asan_store##bytes##_noabort(uintptr_t a) {                                            \
    emu::on_access(a, bytes, emu::kWrite, reinterpret_cast<uintptr_t>(__builtin_return_address(0))); \
  }
AG_HOOK(1)
AG_HOOK(2)
AG_HOOK(4)
AG_HOOK(8)
AG_HOOK(16)
#undef AG_HOOK
extern "C" __attribute__((no_sanitize_address, visibility("hidden"))) void
__asan_loadN_noabort(uintptr_t a, size_t n) {
  emu::on_access(a, n, emu::kRead, reinterpret_cast<uintptr_t>(__builtin_return_address(0)));
}
extern "C" __attribute__((no_sanitize_address, visibility("hidden"))) void
__asan_storeN_noabort(uintptr_t a, size_t n) {
  emu::on_access(a, n, emu::kWrite, reinterpret_cast<uintptr_t>(__builtin_return_address(0)));
}
extern "C" __attribute__((visibility("hidden"))) void __asan_handle_no_return() {}
#endif

// Half and bfloat16 intrinsics that the CUDA headers declare for device code only.
#include "attngraph_emu_fp16.h"
