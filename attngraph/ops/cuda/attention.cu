// attention.cu -- fused graph attention: one-pass forward with an online softmax, and a
// deterministic backward (dQ over CSR rows, dK / dV over the CSC of keys, no atomics).
//
// Layouts (node-major, contiguous): q [R, H, D], k [S, H_kv, D], v [S, H_kv, Dv],
// out [R, H, Dv], lse float [R, H]; bias float [E, bias_cols] or null, head h reading column
// h % bias_cols (a batch folded into heads repeats the bias per sequence); G = H / H_kv.
//
// Balanced rows. The launch walks *work items*, not rows: an item is (node, first edge,
// end edge, slot) and holds at most a chunk of edges, so a row with N edges (a global token)
// is cut into many items that run on different warps. An item that covers its whole row
// writes the result; the items of a cut row write partial states to their slots (forward:
// running max m, sum l and the unnormalised accumulator; backward: partial gradient sums),
// which a small second kernel merges in slot order -- deterministic.
//
// One warp takes one item and GQ query heads of one kv head (blockIdx.y picks the group):
// lanes split the head dim (lane l holds elements l, l + 32, ..., NT per lane), so every K
// and V row is read once per edge by coalesced requests and serves the GQ heads. The keys of
// 32 edges at a time are read by one request and broadcast by shuffles.
//
// Implicit graphs. The row kernels (forward, dQ) also take items over the runs of a rule
// (KeyRule below): a window's keys are computed in the kernel, u * step + residue, and a
// slice of a sorted table (hash buckets, global tokens) is read from the table, so no edge
// list exists; a row with several runs has an item per run, merged like a cut row.
#include "common.cuh"

namespace {
constexpr int kWarps = 4;  // warps per block
constexpr int kEdgeBatch = 32;

template <class T, int NT>
__device__ __forceinline__ void load_row(const T* __restrict__ p, int n, int lane, float (&x)[NT]) {
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    const int d = lane + t * ag::kWarpSize;
    x[t] = d < n ? ag::load_float(p + d) : 0.0f;
  }
}

template <int NT>
__device__ __forceinline__ float dot_lanes(const float (&a)[NT], const float (&b)[NT]) {
  float s = 0.0f;
#pragma unroll
  for (int t = 0; t < NT; ++t) s += a[t] * b[t];
  return s;
}

template <class T, int NT>
__device__ __forceinline__ void store_row(T* __restrict__ p, int n, int lane, const float (&x)[NT], float f) {
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    const int d = lane + t * ag::kWarpSize;
    if (d < n) ag::store_float(p + d, x[t] * f);
  }
}

template <int NT>
__device__ __forceinline__ void store_row_f32(float* __restrict__ p, int n, int lane, const float (&x)[NT], float f) {
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    const int d = lane + t * ag::kWarpSize;
    if (d < n) ag_store(p + d, x[t] * f);
  }
}

struct Item {
  long long node, begin, end, slot;
};

// Keys of an item. An explicit graph's item spans edges of the CSR: key = col[e]. An
// implicit graph's items come with rule int32 [n_items, 2] = (step, residue) and span
// positions u of a run of the rule: key = u * step + residue for a range (step > 0),
// col[u] for a slice of the rule's table (step 0). rule == nullptr: the explicit case.
struct KeyRule {
  int step, res;
};

__device__ __forceinline__ KeyRule load_rule(const int* __restrict__ rule, long long i) {
  if (rule == nullptr) return KeyRule{0, 0};
  return KeyRule{ag_load(rule + i * 2), ag_load(rule + i * 2 + 1)};
}

__device__ __forceinline__ int key_at(const int* __restrict__ col, const KeyRule& r, long long u) {
  return r.step > 0 ? static_cast<int>(u * r.step + r.res) : ag_load(col + u);
}

__device__ __forceinline__ Item load_item(const long long* __restrict__ items, long long i) {
  const long long* p = items + i * 4;
  return Item{ag_load(p), ag_load(p + 1), ag_load(p + 2), ag_load(p + 3)};
}

// Lane l < n loads the bias of edge e0 + l for each of the warp's GQ heads (0 without bias);
// the edge's owner reads it back with a shuffle.
template <int GQ>
__device__ __forceinline__ void load_batch_bias(const float* __restrict__ bias, int bias_cols,
                                                long long e0, int n, int lane, int h0,
                                                float (&b)[GQ]) {
#pragma unroll
  for (int g = 0; g < GQ; ++g)
    b[g] = (bias != nullptr && lane < n)
               ? ag_load(bias + (e0 + lane) * bias_cols + (h0 + g) % bias_cols) : 0.0f;
}

// A row's lse (as +inf when -inf, so exp(s - lse) = 0) and delta, for the dQ kernels.
__device__ __forceinline__ void load_row_stats(const float* __restrict__ lse,
                                               const float* __restrict__ delta, long long rh,
                                               bool has_edges, float& L, float& dl) {
  const float x = has_edges ? ag_load(lse + rh) : 0.0f;
  L = x == -INFINITY ? INFINITY : x;
  dl = has_edges ? ag_load(delta + rh) : 0.0f;
}

// VEC floats * f to fp32 scratch (partial results), as 16-byte stores.
template <int VEC>
__device__ __forceinline__ void store_vec_f32(float* __restrict__ p, const float (&x)[VEC], float f) {
#pragma unroll
  for (int i = 0; i < VEC; i += 4)
    ag_store(reinterpret_cast<float4*>(p + i),
             make_float4(x[i] * f, x[i + 1] * f, x[i + 2] * f, x[i + 3] * f));
}

// One edge of the online softmax: running max m, sum l and accumulator acc take score s
// and value row v. A -inf score with nothing seen yet changes nothing. Callers keep the
// branch uniform where lanes shuffle afterwards (all of a warp, or of a sub-warp, hold s).
template <int N>
__device__ __forceinline__ void softmax_step(float& m, float& l, float (&acc)[N], float s,
                                             const float (&v)[N]) {
  const float mn = fmaxf(m, s);
  if (mn == -INFINITY) return;
  const float c = __expf(m - mn), p = __expf(s - mn);
  l = l * c + p;
#pragma unroll
  for (int i = 0; i < N; ++i) acc[i] = acc[i] * c + p * v[i];
  m = mn;
}

#define AG_ITEM_LOOP(n_items)                                                             \
  const int lane = threadIdx.x % ag::kWarpSize;                                            \
  const long long item_stride = static_cast<long long>(gridDim.x) * kWarps;               \
  for (long long it = static_cast<long long>(blockIdx.x) * kWarps + threadIdx.x / ag::kWarpSize; \
       it < (n_items); it += item_stride)
}  // namespace

// ---------------------------------------------------------------------------- forward
template <class T, int NT, int GQ>
__global__ void __launch_bounds__(kWarps * 32, 4)
attn_fwd(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
         const float* __restrict__ bias, int bias_cols, const long long* __restrict__ items,
         long long n_items, const int* __restrict__ col, const int* __restrict__ rule,
         T* __restrict__ out, float* __restrict__ lse, float* __restrict__ part_ml,
         float* __restrict__ part_acc, int H, int G, int D, int Dv, float scale) {
  const int h0 = blockIdx.y * GQ, hk = h0 / G, Hk = H / G;
  AG_ITEM_LOOP(n_items) {
    const Item item = load_item(items, it);
    const KeyRule key_rule = load_rule(rule, it);
    float qv[GQ][NT], acc[GQ][NT], m[GQ], l[GQ];
#pragma unroll
    for (int g = 0; g < GQ; ++g) {
      load_row(q + (item.node * H + h0 + g) * D, D, lane, qv[g]);
#pragma unroll
      for (int t = 0; t < NT; ++t) acc[g][t] = 0.0f;
      m[g] = -INFINITY;
      l[g] = 0.0f;
    }
    for (long long e0 = item.begin; e0 < item.end; e0 += kEdgeBatch) {
      const int n = static_cast<int>(min(static_cast<long long>(kEdgeBatch), item.end - e0));
      const int my_key = lane < n ? key_at(col, key_rule, e0 + lane) : 0;
      float my_bias[GQ];
      load_batch_bias(bias, bias_cols, e0, n, lane, h0, my_bias);
      for (int t = 0; t < n; ++t) {
        const long long j = __shfl_sync(ag::kFullMask, my_key, t);
        float kr[NT], vr[NT], s[GQ];
        load_row(k + (j * Hk + hk) * D, D, lane, kr);
#pragma unroll
        for (int g = 0; g < GQ; ++g) s[g] = dot_lanes(qv[g], kr);
#pragma unroll
        for (int g = 0; g < GQ; ++g) s[g] = ag::warp_sum(s[g]) * scale + __shfl_sync(ag::kFullMask, my_bias[g], t);
        load_row(v + (j * Hk + hk) * Dv, Dv, lane, vr);
#pragma unroll
        for (int g = 0; g < GQ; ++g) softmax_step(m[g], l[g], acc[g], s[g], vr);
      }
    }
#pragma unroll
    for (int g = 0; g < GQ; ++g) {
      const long long rh = item.node * H + h0 + g;
      if (item.slot < 0) {
        store_row(out + rh * Dv, Dv, lane, acc[g], l[g] > 0.0f ? 1.0f / l[g] : 0.0f);
        if (lane == 0) ag_store(lse + rh, l[g] > 0.0f ? m[g] + logf(l[g]) : -INFINITY);
      } else {
        const long long sh = item.slot * H + h0 + g;
        store_row_f32(part_acc + sh * Dv, Dv, lane, acc[g], 1.0f);
        if (lane == 0) {
          ag_store(part_ml + sh * 2, m[g]);
          ag_store(part_ml + sh * 2 + 1, l[g]);
        }
      }
    }
  }
}

// The forward for 16-byte aligned rows with D, Dv multiples of VEC = 16 / sizeof(T): a warp
// is S = 32 / LPE sub-warps of LPE lanes, each lane holding one 16-byte vector (VEC
// elements) of a row, so S edges are in flight per step and each reduction takes log2(LPE)
// shuffles shared by S edges. Each sub-warp keeps its own online-softmax state over its
// edges; the S states merge by shuffles once per item. Same arguments and results as
// attn_fwd.
template <class T, int LPE, int GQ>
__global__ void __launch_bounds__(kWarps * 32, 4)
attn_fwd_vec(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
             const float* __restrict__ bias, int bias_cols, const long long* __restrict__ items,
             long long n_items, const int* __restrict__ col, const int* __restrict__ rule,
             T* __restrict__ out, float* __restrict__ lse, float* __restrict__ part_ml,
             float* __restrict__ part_acc, int H, int G, int D, int Dv, float scale) {
  constexpr int VEC = ag::VecTraits<T>::kN, S = ag::kWarpSize / LPE;
  const int h0 = blockIdx.y * GQ, hk = h0 / G, Hk = H / G;
  AG_ITEM_LOOP(n_items) {
    const int sub = lane / LPE, d0 = (lane % LPE) * VEC;
    const bool has_d = d0 < D, has_dv = d0 < Dv;
    const Item item = load_item(items, it);
    const KeyRule key_rule = load_rule(rule, it);
    float qv[GQ][VEC], acc[GQ][VEC], m[GQ], l[GQ];
#pragma unroll
    for (int g = 0; g < GQ; ++g) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) qv[g][i] = acc[g][i] = 0.0f;
      if (has_d) ag::load_vec(q + (item.node * H + h0 + g) * D + d0, qv[g]);
      m[g] = -INFINITY;
      l[g] = 0.0f;
    }
    for (long long e0 = item.begin; e0 < item.end; e0 += kEdgeBatch) {
      const int n = static_cast<int>(min(static_cast<long long>(kEdgeBatch), item.end - e0));
      const int my_key = lane < n ? key_at(col, key_rule, e0 + lane) : 0;
      float my_bias[GQ];
      load_batch_bias(bias, bias_cols, e0, n, lane, h0, my_bias);
      for (int t = 0; t < n; t += S) {
        const int idx = t + sub;                 // this sub-warp's edge, < 32
        const bool valid = idx < n;
        const long long j = __shfl_sync(ag::kFullMask, my_key, idx);
        float kr[VEC], vr[VEC], s[GQ];
#pragma unroll
        for (int i = 0; i < VEC; ++i) kr[i] = vr[i] = 0.0f;
        if (valid && has_d) ag::load_vec(k + (j * Hk + hk) * D + d0, kr);
        if (valid && has_dv) ag::load_vec(v + (j * Hk + hk) * Dv + d0, vr);
#pragma unroll
        for (int g = 0; g < GQ; ++g) {
          float x = 0.0f;
#pragma unroll
          for (int i = 0; i < VEC; ++i) x += qv[g][i] * kr[i];
#pragma unroll
          for (int o = LPE / 2; o > 0; o >>= 1) x += __shfl_xor_sync(ag::kFullMask, x, o);
          const float b = __shfl_sync(ag::kFullMask, my_bias[g], idx);
          s[g] = valid ? x * scale + b : -INFINITY;
        }
#pragma unroll
        for (int g = 0; g < GQ; ++g) softmax_step(m[g], l[g], acc[g], s[g], vr);
      }
    }
    // merge the sub-warps' states (log-sum-exp), once per item
#pragma unroll
    for (int o = LPE; o < ag::kWarpSize; o <<= 1) {
#pragma unroll
      for (int g = 0; g < GQ; ++g) {
        const float mo = __shfl_xor_sync(ag::kFullMask, m[g], o);
        const float lo = __shfl_xor_sync(ag::kFullMask, l[g], o);
        const float mn = fmaxf(m[g], mo);
        const float a = mn == -INFINITY ? 0.0f : __expf(m[g] - mn);
        const float b = mn == -INFINITY ? 0.0f : __expf(mo - mn);
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const float ao = __shfl_xor_sync(ag::kFullMask, acc[g][i], o);
          acc[g][i] = acc[g][i] * a + ao * b;
        }
        l[g] = l[g] * a + lo * b;
        m[g] = mn;
      }
    }
    if (sub == 0) {
#pragma unroll
      for (int g = 0; g < GQ; ++g) {
        const long long rh = item.node * H + h0 + g;
        if (item.slot < 0) {
          if (has_dv) ag::store_vec(out + rh * Dv + d0, acc[g], l[g] > 0.0f ? 1.0f / l[g] : 0.0f);
          if (lane == 0) ag_store(lse + rh, l[g] > 0.0f ? m[g] + logf(l[g]) : -INFINITY);
        } else {
          const long long sh = item.slot * H + h0 + g;
          if (has_dv) store_vec_f32(part_acc + sh * Dv + d0, acc[g], 1.0f);
          if (lane == 0) {
            ag_store(part_ml + sh * 2, m[g]);
            ag_store(part_ml + sh * 2 + 1, l[g]);
          }
        }
      }
    }
  }
}

// Merges the partial (m, l, acc) states of each cut row, in slot order.
// splits [n_split, 3] = (row, first slot, end slot).
template <class T, int NT>
__global__ void __launch_bounds__(kWarps * 32, 8)
attn_fwd_merge(const long long* __restrict__ splits, long long n_split,
               const float* __restrict__ part_ml, const float* __restrict__ part_acc,
               T* __restrict__ out, float* __restrict__ lse, int H, int Dv) {
  AG_ITEM_LOOP(n_split) {
    const long long row = ag_load(splits + it * 3), s0 = ag_load(splits + it * 3 + 1),
                    s1 = ag_load(splits + it * 3 + 2);
    for (int h = 0; h < H; ++h) {
      float M = -INFINITY;
      for (long long s = s0; s < s1; ++s) M = fmaxf(M, ag_load(part_ml + (s * H + h) * 2));
      float L = 0.0f, acc[NT];
#pragma unroll
      for (int t = 0; t < NT; ++t) acc[t] = 0.0f;
      for (long long s = s0; s < s1 && M != -INFINITY; ++s) {
        const float w = __expf(ag_load(part_ml + (s * H + h) * 2) - M);
        L += w * ag_load(part_ml + (s * H + h) * 2 + 1);
        float a[NT];
        load_row(part_acc + (s * H + h) * Dv, Dv, lane, a);
#pragma unroll
        for (int t = 0; t < NT; ++t) acc[t] += w * a[t];
      }
      store_row(out + (row * H + h) * Dv, Dv, lane, acc, L > 0.0f ? 1.0f / L : 0.0f);
      if (lane == 0) ag_store(lse + row * H + h, L > 0.0f ? M + logf(L) : -INFINITY);
    }
  }
}

// ---------------------------------------------------------------------------- backward
// dQ over CSR items: ds = p (dO . v - delta), dq = scale * sum_e ds k; with dbias given,
// dbias[e, h] = ds. lse = -inf (no edge, or all scores -inf) gives p = 0.
template <class T, int NT, int GQ>
__global__ void __launch_bounds__(kWarps * 32, 4)
attn_bwd_dq(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
            const float* __restrict__ bias, int bias_cols, const T* __restrict__ dout,
            const float* __restrict__ lse, const float* __restrict__ delta,
            const long long* __restrict__ items, long long n_items, const int* __restrict__ col,
            const int* __restrict__ rule,
            T* __restrict__ dq, float* __restrict__ part_dq, float* __restrict__ dbias,
            int H, int G, int D, int Dv, float scale) {
  const int h0 = blockIdx.y * GQ, hk = h0 / G, Hk = H / G;
  AG_ITEM_LOOP(n_items) {
    const Item item = load_item(items, it);
    const KeyRule key_rule = load_rule(rule, it);
    float qv[GQ][NT], dov[GQ][NT], dqa[GQ][NT], L[GQ], dl[GQ];
#pragma unroll
    for (int g = 0; g < GQ; ++g) {
      const long long rh = item.node * H + h0 + g;
      load_row(q + rh * D, D, lane, qv[g]);
      load_row(dout + rh * Dv, Dv, lane, dov[g]);
#pragma unroll
      for (int t = 0; t < NT; ++t) dqa[g][t] = 0.0f;
      load_row_stats(lse, delta, rh, item.begin < item.end, L[g], dl[g]);
    }
    for (long long e0 = item.begin; e0 < item.end; e0 += kEdgeBatch) {
      const int n = static_cast<int>(min(static_cast<long long>(kEdgeBatch), item.end - e0));
      const int my_key = lane < n ? key_at(col, key_rule, e0 + lane) : 0;
      float my_bias[GQ];
      load_batch_bias(bias, bias_cols, e0, n, lane, h0, my_bias);
      for (int t = 0; t < n; ++t) {
        const long long j = __shfl_sync(ag::kFullMask, my_key, t);
        float kr[NT], vr[NT], s[GQ], dp[GQ];
        load_row(k + (j * Hk + hk) * D, D, lane, kr);
        load_row(v + (j * Hk + hk) * Dv, Dv, lane, vr);
#pragma unroll
        for (int g = 0; g < GQ; ++g) {
          s[g] = dot_lanes(qv[g], kr);
          dp[g] = dot_lanes(dov[g], vr);
        }
#pragma unroll
        for (int g = 0; g < GQ; ++g) {
          s[g] = ag::warp_sum(s[g]) * scale + __shfl_sync(ag::kFullMask, my_bias[g], t);
          dp[g] = ag::warp_sum(dp[g]);
          const float p = __expf(s[g] - L[g]), ds = p * (dp[g] - dl[g]);
#pragma unroll
          for (int t2 = 0; t2 < NT; ++t2) dqa[g][t2] += ds * kr[t2];
          if (dbias != nullptr && lane == 0) ag_store(dbias + (e0 + t) * H + h0 + g, ds);
        }
      }
    }
#pragma unroll
    for (int g = 0; g < GQ; ++g) {
      if (item.slot < 0)
        store_row(dq + (item.node * H + h0 + g) * D, D, lane, dqa[g], scale);
      else
        store_row_f32(part_dq + (item.slot * H + h0 + g) * D, D, lane, dqa[g], scale);
    }
  }
}

// attn_bwd_dq for rows of whole 16-byte vectors: 32 / LPE edges per warp step, as
// attn_fwd_vec; the sub-warps' dq sums are added by shuffles once per item.
template <class T, int LPE, int GQ>
__global__ void __launch_bounds__(kWarps * 32, 4)
attn_bwd_dq_vec(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                const float* __restrict__ bias, int bias_cols, const T* __restrict__ dout,
                const float* __restrict__ lse, const float* __restrict__ delta,
                const long long* __restrict__ items, long long n_items,
                const int* __restrict__ col, const int* __restrict__ rule,
                T* __restrict__ dq, float* __restrict__ part_dq,
                float* __restrict__ dbias, int H, int G, int D, int Dv, float scale) {
  constexpr int VEC = ag::VecTraits<T>::kN, S = ag::kWarpSize / LPE;
  const int h0 = blockIdx.y * GQ, hk = h0 / G, Hk = H / G;
  AG_ITEM_LOOP(n_items) {
    const int sub = lane / LPE, d0 = (lane % LPE) * VEC;
    const bool has_d = d0 < D, has_dv = d0 < Dv;
    const Item item = load_item(items, it);
    const KeyRule key_rule = load_rule(rule, it);
    float qv[GQ][VEC], dov[GQ][VEC], dqa[GQ][VEC], L[GQ], dl[GQ];
#pragma unroll
    for (int g = 0; g < GQ; ++g) {
      const long long rh = item.node * H + h0 + g;
#pragma unroll
      for (int i = 0; i < VEC; ++i) qv[g][i] = dov[g][i] = dqa[g][i] = 0.0f;
      if (has_d) ag::load_vec(q + rh * D + d0, qv[g]);
      if (has_dv) ag::load_vec(dout + rh * Dv + d0, dov[g]);
      load_row_stats(lse, delta, rh, item.begin < item.end, L[g], dl[g]);
    }
    for (long long e0 = item.begin; e0 < item.end; e0 += kEdgeBatch) {
      const int n = static_cast<int>(min(static_cast<long long>(kEdgeBatch), item.end - e0));
      const int my_key = lane < n ? key_at(col, key_rule, e0 + lane) : 0;
      float my_bias[GQ];
      load_batch_bias(bias, bias_cols, e0, n, lane, h0, my_bias);
      for (int t = 0; t < n; t += S) {
        const int idx = t + sub;
        const bool valid = idx < n;
        const long long j = __shfl_sync(ag::kFullMask, my_key, idx);
        float kr[VEC], vr[VEC];
#pragma unroll
        for (int i = 0; i < VEC; ++i) kr[i] = vr[i] = 0.0f;
        if (valid && has_d) ag::load_vec(k + (j * Hk + hk) * D + d0, kr);
        if (valid && has_dv) ag::load_vec(v + (j * Hk + hk) * Dv + d0, vr);
#pragma unroll
        for (int g = 0; g < GQ; ++g) {
          float s = 0.0f, dp = 0.0f;
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            s += qv[g][i] * kr[i];
            dp += dov[g][i] * vr[i];
          }
#pragma unroll
          for (int o = LPE / 2; o > 0; o >>= 1) {
            s += __shfl_xor_sync(ag::kFullMask, s, o);
            dp += __shfl_xor_sync(ag::kFullMask, dp, o);
          }
          const float b = __shfl_sync(ag::kFullMask, my_bias[g], idx);
          const float p = valid ? __expf(s * scale + b - L[g]) : 0.0f;
          const float ds = p * (dp - dl[g]);
#pragma unroll
          for (int i = 0; i < VEC; ++i) dqa[g][i] += ds * kr[i];
          if (dbias != nullptr && valid && lane % LPE == 0)
            ag_store(dbias + (e0 + idx) * H + h0 + g, ds);
        }
      }
    }
#pragma unroll
    for (int o = LPE; o < ag::kWarpSize; o <<= 1)
#pragma unroll
      for (int g = 0; g < GQ; ++g)
#pragma unroll
        for (int i = 0; i < VEC; ++i) dqa[g][i] += __shfl_xor_sync(ag::kFullMask, dqa[g][i], o);
    if (sub == 0 && has_d) {
#pragma unroll
      for (int g = 0; g < GQ; ++g) {
        if (item.slot < 0) {
          ag::store_vec(dq + (item.node * H + h0 + g) * D + d0, dqa[g], scale);
        } else {
          store_vec_f32(part_dq + (item.slot * H + h0 + g) * D + d0, dqa[g], scale);
        }
      }
    }
  }
}

// dK and dV over CSC items of keys: for each edge into query i and each head h of the kv
// head's group, p = exp(s - lse), dv += p dO, ds = p (dO . v - delta), dk += scale ds q.
// citems hold key-major edge positions; krow / perm give the query and canonical edge id.
template <class T, int NT>
__global__ void __launch_bounds__(kWarps * 32, 4)
attn_bwd_dkdv(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
              const float* __restrict__ bias, int bias_cols, const T* __restrict__ dout,
              const float* __restrict__ lse, const float* __restrict__ delta,
              const long long* __restrict__ items, long long n_items,
              const int* __restrict__ krow, const long long* __restrict__ perm,
              T* __restrict__ dk, T* __restrict__ dv, float* __restrict__ part_dk,
              float* __restrict__ part_dv, int H, int G, int D, int Dv, float scale) {
  const int hk = blockIdx.y, Hk = H / G;
  AG_ITEM_LOOP(n_items) {
    const Item item = load_item(items, it);
    float kr[NT], vr[NT], dka[NT], dva[NT];
    load_row(k + (item.node * Hk + hk) * D, D, lane, kr);
    load_row(v + (item.node * Hk + hk) * Dv, Dv, lane, vr);
#pragma unroll
    for (int t = 0; t < NT; ++t) dka[t] = dva[t] = 0.0f;
    for (long long e0 = item.begin; e0 < item.end; e0 += kEdgeBatch) {
      const int n = static_cast<int>(min(static_cast<long long>(kEdgeBatch), item.end - e0));
      const int my_row = lane < n ? ag_load(krow + e0 + lane) : 0;
      const long long my_edge = lane < n ? ag_load(perm + e0 + lane) : 0;
      for (int t = 0; t < n; ++t) {
        const long long i = __shfl_sync(ag::kFullMask, my_row, t);
        const long long e = __shfl_sync(ag::kFullMask, my_edge, t);
        for (int g = 0; g < G; ++g) {
          const int h = hk * G + g;
          const long long ih = i * H + h;
          float qv[NT], dov[NT];
          load_row(q + ih * D, D, lane, qv);
          load_row(dout + ih * Dv, Dv, lane, dov);
          const float b = bias != nullptr ? ag_load(bias + e * bias_cols + h % bias_cols) : 0.0f;
          const float x = ag_load(lse + ih);
          const float s = ag::warp_sum(dot_lanes(qv, kr)) * scale + b;
          const float dp = ag::warp_sum(dot_lanes(dov, vr));
          const float p = x == -INFINITY ? 0.0f : __expf(s - x);
          const float ds = p * (dp - ag_load(delta + ih));
#pragma unroll
          for (int t2 = 0; t2 < NT; ++t2) {
            dva[t2] += p * dov[t2];
            dka[t2] += ds * qv[t2];
          }
        }
      }
    }
    const long long nh = item.node * Hk + hk;
    if (item.slot < 0) {
      store_row(dk + nh * D, D, lane, dka, scale);
      store_row(dv + nh * Dv, Dv, lane, dva, 1.0f);
    } else {
      const long long sh = item.slot * Hk + hk;
      store_row_f32(part_dk + sh * D, D, lane, dka, scale);
      store_row_f32(part_dv + sh * Dv, Dv, lane, dva, 1.0f);
    }
  }
}

// attn_bwd_dkdv for rows of whole 16-byte vectors: 32 / LPE edges (queries) per warp
// step; the sub-warps' dk / dv sums are added by shuffles once per item.
template <class T, int LPE>
__global__ void __launch_bounds__(kWarps * 32, 4)
attn_bwd_dkdv_vec(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                  const float* __restrict__ bias, int bias_cols, const T* __restrict__ dout,
                  const float* __restrict__ lse, const float* __restrict__ delta,
                  const long long* __restrict__ items, long long n_items,
                  const int* __restrict__ krow, const long long* __restrict__ perm,
                  T* __restrict__ dk, T* __restrict__ dv, float* __restrict__ part_dk,
                  float* __restrict__ part_dv, int H, int G, int D, int Dv, float scale) {
  constexpr int VEC = ag::VecTraits<T>::kN, S = ag::kWarpSize / LPE;
  const int hk = blockIdx.y, Hk = H / G;
  AG_ITEM_LOOP(n_items) {
    const int sub = lane / LPE, d0 = (lane % LPE) * VEC;
    const bool has_d = d0 < D, has_dv = d0 < Dv;
    const Item item = load_item(items, it);
    float kr[VEC], vr[VEC], dka[VEC], dva[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) kr[i] = vr[i] = dka[i] = dva[i] = 0.0f;
    if (has_d) ag::load_vec(k + (item.node * Hk + hk) * D + d0, kr);
    if (has_dv) ag::load_vec(v + (item.node * Hk + hk) * Dv + d0, vr);
    for (long long e0 = item.begin; e0 < item.end; e0 += kEdgeBatch) {
      const int n = static_cast<int>(min(static_cast<long long>(kEdgeBatch), item.end - e0));
      const int my_row = lane < n ? ag_load(krow + e0 + lane) : 0;
      const long long my_edge = lane < n ? ag_load(perm + e0 + lane) : 0;
      for (int t = 0; t < n; t += S) {
        const int idx = t + sub;
        const bool valid = idx < n;
        const long long i = __shfl_sync(ag::kFullMask, my_row, idx);
        const long long e = __shfl_sync(ag::kFullMask, my_edge, idx);
        for (int g = 0; g < G; ++g) {
          const int h = hk * G + g;
          const long long ih = i * H + h;
          float qv[VEC], dov[VEC];
#pragma unroll
          for (int x = 0; x < VEC; ++x) qv[x] = dov[x] = 0.0f;
          if (valid && has_d) ag::load_vec(q + ih * D + d0, qv);
          if (valid && has_dv) ag::load_vec(dout + ih * Dv + d0, dov);
          float s = 0.0f, dp = 0.0f;
#pragma unroll
          for (int x = 0; x < VEC; ++x) {
            s += qv[x] * kr[x];
            dp += dov[x] * vr[x];
          }
#pragma unroll
          for (int o = LPE / 2; o > 0; o >>= 1) {
            s += __shfl_xor_sync(ag::kFullMask, s, o);
            dp += __shfl_xor_sync(ag::kFullMask, dp, o);
          }
          float p = 0.0f, ds = 0.0f;
          if (valid) {
            const float b = bias != nullptr ? ag_load(bias + e * bias_cols + h % bias_cols) : 0.0f;
            const float x = ag_load(lse + ih);
            p = x == -INFINITY ? 0.0f : __expf(s * scale + b - x);
            ds = p * (dp - ag_load(delta + ih));
          }
#pragma unroll
          for (int x = 0; x < VEC; ++x) {
            dva[x] += p * dov[x];
            dka[x] += ds * qv[x];
          }
        }
      }
    }
#pragma unroll
    for (int o = LPE; o < ag::kWarpSize; o <<= 1)
#pragma unroll
      for (int x = 0; x < VEC; ++x) {
        dka[x] += __shfl_xor_sync(ag::kFullMask, dka[x], o);
        dva[x] += __shfl_xor_sync(ag::kFullMask, dva[x], o);
      }
    if (sub == 0) {
      const long long nh = item.node * Hk + hk;
      if (item.slot < 0) {
        if (has_d) ag::store_vec(dk + nh * D + d0, dka, scale);
        if (has_dv) ag::store_vec(dv + nh * Dv + d0, dva, 1.0f);
      } else {
        const long long sh = item.slot * Hk + hk;
        if (has_d) store_vec_f32(part_dk + sh * D + d0, dka, scale);
        if (has_dv) store_vec_f32(part_dv + sh * Dv + d0, dva, 1.0f);
      }
    }
  }
}

// out[row, h, :] = sum over the row's slots of part[slot, h, :], in slot order.
template <class T, int NT>
__global__ void __launch_bounds__(kWarps * 32, 8)
sum_partials(const long long* __restrict__ splits, long long n_split,
             const float* __restrict__ part, T* __restrict__ out, int heads, int C) {
  AG_ITEM_LOOP(n_split) {
    const long long row = ag_load(splits + it * 3), s0 = ag_load(splits + it * 3 + 1),
                    s1 = ag_load(splits + it * 3 + 2);
    for (int h = 0; h < heads; ++h) {
      float acc[NT];
#pragma unroll
      for (int t = 0; t < NT; ++t) acc[t] = 0.0f;
      for (long long s = s0; s < s1; ++s) {
        float a[NT];
        load_row(part + (s * heads + h) * C, C, lane, a);
#pragma unroll
        for (int t = 0; t < NT; ++t) acc[t] += a[t];
      }
      store_row(out + (row * heads + h) * C, C, lane, acc, 1.0f);
    }
  }
}
