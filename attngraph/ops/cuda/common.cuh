// common.cuh -- what every attngraph kernel shares: storage-type conversions, warp
// reductions and the global-memory access helpers.
//
// Kernels read and write global memory through ag_load / ag_store. On a GPU they are plain
// accesses; under the CPU emulator (ATTNGRAPH_EMULATE, see attngraph_emu.h) they also count
// bytes and 32-byte sectors per warp request, which is how coalescing is judged without a GPU.
#pragma once

#include <cuda_fp16.h>
#include <cuda_bf16.h>

#ifndef INFINITY  // NVRTC brings no math.h
#define INFINITY __int_as_float(0x7f800000)
#endif

#ifndef ATTNGRAPH_EMULATE
template <class T>
__device__ __forceinline__ T ag_load(const T* p) { return *p; }
template <class T>
__device__ __forceinline__ void ag_store(T* p, T v) { *p = v; }
#endif

namespace ag {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarpSize = 32;

// Storage type <-> fp32 (all arithmetic is fp32).
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <class T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

template <class T>
__device__ __forceinline__ float load_float(const T* p) { return to_float(ag_load(p)); }

template <class T>
__device__ __forceinline__ void store_float(T* p, float x) { ag_store(p, from_float<T>(x)); }

// 16-byte vectors of a row: VecTraits<T>::kN elements, loaded and stored as one uint4 (rows
// must be 16-byte aligned: the host checks).
template <class T> struct VecTraits { static constexpr int kN = 16 / sizeof(T); };

template <class T>
__device__ __forceinline__ void load_vec(const T* p, float (&x)[16 / sizeof(T)]) {
  const uint4 raw = ag_load(reinterpret_cast<const uint4*>(p));
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < VecTraits<T>::kN; ++i) x[i] = to_float(e[i]);
}

template <class T>
__device__ __forceinline__ void store_vec(T* p, const float (&x)[16 / sizeof(T)], float f) {
  uint4 raw;
  T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
  for (int i = 0; i < VecTraits<T>::kN; ++i) e[i] = from_float<T>(x[i] * f);
  ag_store(reinterpret_cast<uint4*>(p), raw);
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o >>= 1) x += __shfl_xor_sync(kFullMask, x, o);
  return x;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(kFullMask, x, o));
  return x;
}

// exp(x - m) that is 0 when both are -inf (a row whose scores are all masked out).
__device__ __forceinline__ float exp_shifted(float x, float m) {
  return m == -INFINITY ? 0.0f : __expf(x - m);
}

}  // namespace ag
