// stages.cu -- the three stages of graph attention as CUDA kernels, and their backward.
//
// Graph: CSR over queries (row r = query, `ptr` int64 [R + 1], `col` int32 [E] = key of each
// edge, canonical order) and CSC over keys (`kptr` int64 [S + 1], `krow` int32 [E] = query of
// each edge in key-major order, `perm` int64 [E] = its canonical edge id). Tensors are
// node-major and contiguous: a [R, H, D], b / x [S, H_kv, D], per-edge w / s / p [E, H];
// GQA: query head h reads kv head h / G.
//
// Every kernel gives one warp one node -- lanes split the head dim, lane l holding elements
// l, l + 32, ... (NT per lane, NT * 32 >= D) -- and walks that node's edges head by head:
// pull-style sums, no atomics, so results are deterministic. Blocks of kWarps warps walk the
// nodes grid-stride (no 64-bit division of an item index: it costs registers and spills).
// Arithmetic and accumulation are fp32 whatever the storage type T.
//
//   row_dot     out[e, h]  = scale * a[r, h] . b[col_e, h / G]        edge_scores; d p of aggregate
//   row_gather  out[r, h]  = scale * sum_e w[e, h] x[col_e, h / G]    aggregate; d q of edge_scores
//   col_gather  out[j, hk] = scale * sum_{e into j} sum_g w[e, hk G + g] y[dst_e, hk G + g]
//                                                                     d k of edge_scores; d v of aggregate
//   row_softmax / row_softmax_bwd                                     edge_softmax and its backward
#include "common.cuh"

namespace {
constexpr int kWarps = 4;      // warps per block
constexpr int kMinBlocks = 8;  // resident blocks per SM: caps registers at 64, where
                               // ptxas' own choice spilled on sm_80
}

// for each node r of [0, rows) given to this warp, and each head h of [0, heads)
#define AG_WARP_LOOP(rows, heads)                                                    \
  const int lane = threadIdx.x % ag::kWarpSize;                                       \
  const long long warp_stride = static_cast<long long>(gridDim.x) * kWarps;          \
  for (long long r = static_cast<long long>(blockIdx.x) * kWarps + threadIdx.x / ag::kWarpSize; \
       r < (rows); r += warp_stride)                                                  \
    for (int h = 0; h < (heads); ++h)

template <class T, int NT>
__global__ void __launch_bounds__(kWarps * 32, kMinBlocks)
row_dot(const T* __restrict__ a, const T* __restrict__ b, const long long* __restrict__ ptr,
        const int* __restrict__ col, T* __restrict__ out, long long R, int H, int G, int D,
        float scale) {
  const int Hk = H / G;
  AG_WARP_LOOP(R, H) {
    const int hk = h / G;
    float av[NT];
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      const int d = lane + t * ag::kWarpSize;
      av[t] = d < D ? ag::load_float(a + (r * H + h) * D + d) : 0.0f;
    }
    const long long e1 = ag_load(ptr + r + 1);
    for (long long e = ag_load(ptr + r); e < e1; ++e) {
      const long long j = ag_load(col + e);
      const T* bj = b + (j * Hk + hk) * D;
      float s = 0.0f;
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        const int d = lane + t * ag::kWarpSize;
        if (d < D) s += av[t] * ag::load_float(bj + d);
      }
      s = ag::warp_sum(s);
      if (lane == 0) ag::store_float(out + e * H + h, s * scale);
    }
  }
}

template <class T, int NT>
__global__ void __launch_bounds__(kWarps * 32, kMinBlocks)
row_gather(const T* __restrict__ w, const T* __restrict__ x, const long long* __restrict__ ptr,
           const int* __restrict__ col, T* __restrict__ out, long long R, int H, int G, int C,
           float scale) {
  const int Hk = H / G;
  AG_WARP_LOOP(R, H) {
    const int hk = h / G;
    float acc[NT];
#pragma unroll
    for (int t = 0; t < NT; ++t) acc[t] = 0.0f;
    const long long e1 = ag_load(ptr + r + 1);
    for (long long e = ag_load(ptr + r); e < e1; ++e) {
      const float we = ag::load_float(w + e * H + h);
      const T* xj = x + (static_cast<long long>(ag_load(col + e)) * Hk + hk) * C;
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        const int d = lane + t * ag::kWarpSize;
        if (d < C) acc[t] += we * ag::load_float(xj + d);
      }
    }
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      const int d = lane + t * ag::kWarpSize;
      if (d < C) ag::store_float(out + (r * H + h) * C + d, acc[t] * scale);
    }
  }
}

template <class T, int NT>
__global__ void __launch_bounds__(kWarps * 32, kMinBlocks)
col_gather(const T* __restrict__ w, const T* __restrict__ y, const long long* __restrict__ kptr,
           const int* __restrict__ krow, const long long* __restrict__ perm, T* __restrict__ out,
           long long S, int H, int G, int C, float scale) {
  const int Hk = H / G;
  AG_WARP_LOOP(S, Hk) {
    const long long j = r;
    const int hk = h;
    float acc[NT];
#pragma unroll
    for (int t = 0; t < NT; ++t) acc[t] = 0.0f;
    const long long k1 = ag_load(kptr + j + 1);
    for (long long k = ag_load(kptr + j); k < k1; ++k) {
      const long long e = ag_load(perm + k), i = ag_load(krow + k);
      for (int g = 0; g < G; ++g) {
        const int h = hk * G + g;
        const float we = ag::load_float(w + e * H + h);
        const T* yi = y + (i * H + h) * C;
#pragma unroll
        for (int t = 0; t < NT; ++t) {
          const int d = lane + t * ag::kWarpSize;
          if (d < C) acc[t] += we * ag::load_float(yi + d);
        }
      }
    }
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      const int d = lane + t * ag::kWarpSize;
      if (d < C) ag::store_float(out + (j * Hk + hk) * C + d, acc[t] * scale);
    }
  }
}

// p[e, h] = exp(s[e, h] - m) / sum over the row; lse[r, h] = m + log(sum) when lse is given.
// A row without edges writes nothing but lse = -inf; a row whose scores are all -inf gets
// p = 0.
template <class T>
__global__ void __launch_bounds__(kWarps * 32, kMinBlocks)
row_softmax(const T* __restrict__ s, const long long* __restrict__ ptr, T* __restrict__ p,
            float* __restrict__ lse, long long R, int H) {
  AG_WARP_LOOP(R, H) {
    const long long e0 = ag_load(ptr + r), e1 = ag_load(ptr + r + 1);
    float m = -INFINITY;
    for (long long e = e0 + lane; e < e1; e += ag::kWarpSize) m = fmaxf(m, ag::load_float(s + e * H + h));
    m = ag::warp_max(m);
    float sum = 0.0f;
    for (long long e = e0 + lane; e < e1; e += ag::kWarpSize) sum += ag::exp_shifted(ag::load_float(s + e * H + h), m);
    sum = ag::warp_sum(sum);
    const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
    for (long long e = e0 + lane; e < e1; e += ag::kWarpSize)
      ag::store_float(p + e * H + h, ag::exp_shifted(ag::load_float(s + e * H + h), m) * inv);
    if (lse != nullptr && lane == 0) ag_store(lse + r * H + h, sum > 0.0f ? m + logf(sum) : -INFINITY);
  }
}

// ds[e, h] = p[e, h] * (dp[e, h] - sum over the row of p * dp).
template <class T>
__global__ void __launch_bounds__(kWarps * 32, kMinBlocks)
row_softmax_bwd(const T* __restrict__ p, const T* __restrict__ dp, const long long* __restrict__ ptr,
                T* __restrict__ ds, long long R, int H) {
  AG_WARP_LOOP(R, H) {
    const long long e0 = ag_load(ptr + r), e1 = ag_load(ptr + r + 1);
    float dot = 0.0f;
    for (long long e = e0 + lane; e < e1; e += ag::kWarpSize)
      dot += ag::load_float(p + e * H + h) * ag::load_float(dp + e * H + h);
    dot = ag::warp_sum(dot);
    for (long long e = e0 + lane; e < e1; e += ag::kWarpSize) {
      const float pe = ag::load_float(p + e * H + h);
      ag::store_float(ds + e * H + h, pe * (ag::load_float(dp + e * H + h) - dot));
    }
  }
}
