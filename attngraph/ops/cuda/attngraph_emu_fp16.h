// attngraph_emu_fp16.h -- host definitions of the cuda_fp16.h / cuda_bf16.h intrinsics that
// the CUDA headers provide only for device code. Included at the end of attngraph_emu.h.
//
// cuda_fp16.h and cuda_bf16.h declare part of their intrinsics only when the compiler is nvcc
// (inside `#if defined(__CUDACC__)`): in a host build kernels that call __hfma2, hexp or
// __half2int_rn do not compile. Probed by declaration, for half and bfloat16 alike:
//   * missing with the CUDA 12.9 (nvidia-cuda-runtime-cu12) and the CUDA 13.0 headers:
//     - fused multiply-add: __hfma, __hfma_sat, __hfma_relu, __hfma2, __hfma2_sat,
//       __hfma2_relu, __hcmadd;
//     - math: hceil hfloor hrint htrunc hsqrt hrsqrt hrcp hexp hexp2 hexp10 hlog hlog2 hlog10
//       hsin hcos htanh htanh_approx and their h2* forms;
//     - to integers rounding to nearest / down / up: __half2{short,ushort,int,uint,ll,ull}_{rn,rd,ru},
//       __bfloat162..._{rn,rd,ru};
//     - integers to bfloat16 rounding toward zero / down / up: __{short,...,ull}2bfloat16_{rz,rd,ru};
//   * missing too with the CUDA 12.0 headers (host versions came with 12.2): the arithmetic
//     (__hadd, __hmul2, __h2div, _rn and _sat forms, __hneg, __habs, __hmin, __hmax, _nan
//     forms), the comparisons (__heq ... __hgeu, 2-wide, _mask and __hb forms, __hisnan,
//     __hisinf), the lane moves (__low2half, __halves2half2, __lows2half2, __lowhigh2highlow,
//     ...), __half22float2 / __float22half2_rn, the bit casts and the other integer
//     conversions.
// (Not here: the cache-hinted loads and stores __ldcg ... __stwt, and atomicAdd on half types.)
//
// Every definition here is a function template. Where a header does declare a name for the
// host, its non-template function is the better overload and wins; these definitions then stay
// unused instead of clashing. `name<>(...)` selects the definition here explicitly (the tests
// do, to check it whatever the header version).
//
// Semantics follow the hardware: operands are exact in fp32/fp64, results are rounded once to
// half / bfloat16 (nearest even unless the name says _rz / _rd / _ru), subnormals are kept,
// NaN results are the canonical NaN 0x7fff, overflow rounds to infinity or to the largest
// finite value as the rounding direction says. The math functions are rounded from the fp64
// libm result (the device's approximations aim at the correctly rounded value).
#pragma once

#include <bit>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include <vector_functions.h>   // float2, make_float2 (not declared for the host by CUDA 12.0's cuda_fp16.h)
#include <vector_types.h>

namespace emu::fp16 {

template <class T>
concept scalar = std::same_as<T, __half> || std::same_as<T, __nv_bfloat16>;
template <class T2>
concept pair = std::same_as<T2, __half2> || std::same_as<T2, __nv_bfloat162>;

template <scalar T> struct format;
template <> struct format<__half> { static constexpr int man = 10, exp = 5; };
template <> struct format<__nv_bfloat16> { static constexpr int man = 7, exp = 8; };

constexpr uint16_t kNaN = 0x7fff;   // CUDART_NAN_FP16 and CUDART_NAN_BF16

template <scalar T> inline uint16_t bits(T h) { return std::bit_cast<uint16_t>(h); }
template <scalar T> inline T from_bits(uint16_t b) { return std::bit_cast<T>(b); }

// The exact value of a half / bfloat16.
template <scalar T> inline double value(T h) {
  constexpr int M = format<T>::man, E = format<T>::exp, bias = (1 << (E - 1)) - 1;
  const uint16_t b = bits(h);
  const int ef = (b >> M) & ((1 << E) - 1), mf = b & ((1 << M) - 1);
  double v;
  if (ef == (1 << E) - 1) v = mf ? std::numeric_limits<double>::quiet_NaN() : HUGE_VAL;
  else if (ef == 0) v = std::ldexp(mf, 1 - bias - M);
  else v = std::ldexp(mf | (1 << M), ef - bias - M);
  return (b & 0x8000) ? -v : v;
}

enum class Round { rn, rz, rd, ru };

// `x` rounded once to T. x must carry the exact result, or one rounded to odd (see odd_sum):
// both round the same way to a format of fewer than 52 bits.
template <scalar T> inline T round(double x, Round mode) {
  constexpr int M = format<T>::man, E = format<T>::exp, bias = (1 << (E - 1)) - 1;
  constexpr uint32_t inf = ((1u << E) - 1) << M;
  if (std::isnan(x)) return from_bits<T>(kNaN);
  const bool neg = std::signbit(x);
  const uint16_t sign = neg ? 0x8000 : 0;
  const double a = std::fabs(x);
  if (a == 0 || std::isinf(a)) return from_bits<T>(uint16_t(sign | (a == 0 ? 0 : inf)));
  int e = 0;
  std::frexp(a, &e);
  e = std::max(e - 1, 1 - bias);               // a < 2^(e+1); subnormals share the least e
  uint32_t b = inf;
  if (e <= bias) {
    const double m = std::ldexp(a, M - e);     // on the grid of T's significand: exact
    double n = std::floor(m);
    const double frac = m - n;
    switch (mode) {
      case Round::rn: n += frac > 0.5 || (frac == 0.5 && std::fmod(n, 2.0) != 0); break;
      case Round::rz: break;
      case Round::rd: n += neg && frac > 0; break;
      case Round::ru: n += !neg && frac > 0; break;
    }
    b = (uint32_t(e + bias - 1) << M) + uint32_t(n);   // a carry out of n bumps the exponent
  }
  if (b >= inf) {                               // overflow: infinity or the largest finite
    const bool to_inf = mode == Round::rn || (mode == Round::ru && !neg) || (mode == Round::rd && neg);
    b = to_inf ? inf : inf - 1;
  }
  return from_bits<T>(uint16_t(sign | b));
}

template <scalar T> inline T rn(double x) { return round<T>(x, Round::rn); }

// p + c rounded to odd (to the neighbour with an odd last bit when inexact): rounding that
// again to a format of at most 51 bits gives the correctly rounded p + c.
inline double odd_sum(double p, double c) {
  double s = p + c;
  if (!std::isfinite(s)) return s;
  const double bb = s - p, err = (p - (s - bb)) + (c - bb);   // TwoSum: p + c == s + err
  if (err != 0 && (std::bit_cast<uint64_t>(s) & 1) == 0)
    s = std::nextafter(s, err > 0 ? HUGE_VAL : -HUGE_VAL);
  return s;
}

// a * b + c with one rounding (the product of two halves or bfloat16s is exact in fp64).
template <scalar T> inline T fma(T a, T b, T c) { return rn<T>(odd_sum(value(a) * value(b), value(c))); }

template <scalar T> inline T relu(T r) {           // NaN stays (canonical) NaN; -0 becomes +0
  const double v = value(r);
  return std::isnan(v) ? from_bits<T>(kNaN) : v > 0 ? r : from_bits<T>(0);
}
template <scalar T> inline T sat(T r) {            // clamp to [0, 1]; NaN becomes +0
  const double v = value(r);
  return !(v > 0) ? from_bits<T>(0) : v < 1 ? r : rn<T>(1.0);
}

// Round to an integral value (the value stays a double), as cvt.rni / rmi / rpi / rzi do.
inline double integral(double v, Round mode) {
  if (!std::isfinite(v)) return v;
  double r = std::trunc(v);
  const double frac = v - r;                    // exact
  switch (mode) {
    case Round::rn:
      if (std::fabs(frac) > 0.5 || (std::fabs(frac) == 0.5 && std::fmod(r, 2.0) != 0))
        r += frac > 0 ? 1 : -1;
      break;
    case Round::rz: break;
    case Round::rd: r -= frac < 0; break;
    case Round::ru: r += frac > 0; break;
  }
  return std::copysign(r, v);                   // -0.3 rounds to -0
}

// To an integer type, saturating; NaN gives 0, or 0x8000000000000000 for 64-bit types (as the
// headers' host _rz forms).
template <class I, scalar T> inline I to_int(T h, Round mode) {
  const double v = value(h);
  if (std::isnan(v)) return sizeof(I) == 8 ? I(1ull << 63) : I(0);
  const double r = integral(v, mode);
  if (r <= double(std::numeric_limits<I>::min())) return std::numeric_limits<I>::min();
  if (r >= double(std::numeric_limits<I>::max())) return std::numeric_limits<I>::max();
  return I(r);
}

// From an integer: |i| rounded to odd at 53 bits if wider, then rounded once to T.
template <scalar T, std::integral I> inline T from_int(I i, Round mode) {
  const bool neg = i < 0;
  const auto u = static_cast<unsigned long long>(i);
  unsigned long long m = neg ? 0ull - u : u;
  int shift = 0;
  unsigned long long sticky = 0;
  while (m >> 53) { sticky |= m & 1; m >>= 1; ++shift; }
  const double a = std::ldexp(double(m | sticky), shift);
  return round<T>(neg ? -a : a, mode);
}

template <scalar T, class F> inline T map(T a, F f) { return rn<T>(f(value(a))); }

}  // namespace emu::fp16

// ------------------------------------------------------------------ arithmetic, comparisons, lanes
// Declared for the host by the CUDA 12.2+ headers (the 12.0 / 12.1 headers declare them for
// device code only): used from the header where it has them.
namespace emu::fp16 {
template <pair T2> using lane_t = decltype(T2().x);

// min / max with -0 below +0. A NaN operand gives NaN with `nan` (the _nan forms), else the
// other operand (NaN, canonical, only if both are).
template <scalar T> inline T minmax(T a, T b, bool take_max, bool nan) {
  const double x = value(a), y = value(b);
  if (std::isnan(x) && std::isnan(y)) return from_bits<T>(kNaN);
  if (std::isnan(x) || std::isnan(y)) return nan ? from_bits<T>(kNaN) : std::isnan(x) ? b : a;
  if (x == y) return ((bits(a) & 0x8000) != 0) == take_max ? b : a;
  return (x < y) == take_max ? b : a;
}
template <scalar T> inline bool unordered(T a, T b) { return std::isnan(value(a)) || std::isnan(value(b)); }
template <pair T2, class F> inline T2 lanes(T2 a, T2 b, F f) { return T2(f(a.x, b.x), f(a.y, b.y)); }
template <pair T2> inline T2 truth(bool lo, bool hi) { return T2(rn<lane_t<T2>>(lo), rn<lane_t<T2>>(hi)); }
inline unsigned mask(bool lo, bool hi) { return (lo ? 0xffffu : 0u) | (hi ? 0xffff0000u : 0u); }
}  // namespace emu::fp16

#define AG_FP16_T template <emu::fp16::scalar T> inline
#define AG_FP16_T2 template <emu::fp16::pair T2> inline
AG_FP16_T T __hadd(T a, T b) { return emu::fp16::rn<T>(emu::fp16::value(a) + emu::fp16::value(b)); }
AG_FP16_T T __hsub(T a, T b) { return emu::fp16::rn<T>(emu::fp16::value(a) - emu::fp16::value(b)); }
AG_FP16_T T __hmul(T a, T b) { return emu::fp16::rn<T>(emu::fp16::value(a) * emu::fp16::value(b)); }
AG_FP16_T T __hdiv(T a, T b) { return emu::fp16::rn<T>(emu::fp16::value(a) / emu::fp16::value(b)); }
AG_FP16_T T __hadd_rn(T a, T b) { return __hadd<>(a, b); }
AG_FP16_T T __hsub_rn(T a, T b) { return __hsub<>(a, b); }
AG_FP16_T T __hmul_rn(T a, T b) { return __hmul<>(a, b); }
AG_FP16_T T __hadd_sat(T a, T b) { return emu::fp16::sat(__hadd<>(a, b)); }
AG_FP16_T T __hsub_sat(T a, T b) { return emu::fp16::sat(__hsub<>(a, b)); }
AG_FP16_T T __hmul_sat(T a, T b) { return emu::fp16::sat(__hmul<>(a, b)); }
AG_FP16_T T __hneg(T a) { return emu::fp16::from_bits<T>(emu::fp16::bits(a) ^ 0x8000); }
AG_FP16_T T __habs(T a) { return emu::fp16::from_bits<T>(emu::fp16::bits(a) & 0x7fff); }
AG_FP16_T T __hmin(T a, T b) { return emu::fp16::minmax(a, b, false, false); }
AG_FP16_T T __hmax(T a, T b) { return emu::fp16::minmax(a, b, true, false); }
AG_FP16_T T __hmin_nan(T a, T b) { return emu::fp16::minmax(a, b, false, true); }
AG_FP16_T T __hmax_nan(T a, T b) { return emu::fp16::minmax(a, b, true, true); }
AG_FP16_T bool __hisnan(T a) { return std::isnan(emu::fp16::value(a)); }
AG_FP16_T int __hisinf(T a) { const double x = emu::fp16::value(a); return std::isinf(x) ? (x < 0 ? -1 : 1) : 0; }
// Ordered comparisons are false and unordered ones (`u`) true when an operand is NaN.
AG_FP16_T bool __heq(T a, T b) { return emu::fp16::value(a) == emu::fp16::value(b); }
AG_FP16_T bool __hne(T a, T b) { return !emu::fp16::unordered(a, b) && emu::fp16::value(a) != emu::fp16::value(b); }
AG_FP16_T bool __hlt(T a, T b) { return emu::fp16::value(a) < emu::fp16::value(b); }
AG_FP16_T bool __hle(T a, T b) { return emu::fp16::value(a) <= emu::fp16::value(b); }
AG_FP16_T bool __hgt(T a, T b) { return emu::fp16::value(a) > emu::fp16::value(b); }
AG_FP16_T bool __hge(T a, T b) { return emu::fp16::value(a) >= emu::fp16::value(b); }
AG_FP16_T bool __hequ(T a, T b) { return emu::fp16::unordered(a, b) || __heq<>(a, b); }
AG_FP16_T bool __hneu(T a, T b) { return emu::fp16::value(a) != emu::fp16::value(b); }
AG_FP16_T bool __hltu(T a, T b) { return emu::fp16::unordered(a, b) || __hlt<>(a, b); }
AG_FP16_T bool __hleu(T a, T b) { return emu::fp16::unordered(a, b) || __hle<>(a, b); }
AG_FP16_T bool __hgtu(T a, T b) { return emu::fp16::unordered(a, b) || __hgt<>(a, b); }
AG_FP16_T bool __hgeu(T a, T b) { return emu::fp16::unordered(a, b) || __hge<>(a, b); }

// 2-wide: lane by lane; comparisons give 1.0 / 0.0 per lane, `_mask` 0xffff per lane, `hb`
// whether both lanes hold.
#define AG_FP16_LANES2(name2, name) \
  AG_FP16_T2 T2 name2(T2 a, T2 b) { return emu::fp16::lanes(a, b, [](auto x, auto y) { return name<>(x, y); }); }
AG_FP16_LANES2(__hadd2, __hadd)
AG_FP16_LANES2(__hsub2, __hsub)
AG_FP16_LANES2(__hmul2, __hmul)
AG_FP16_LANES2(__h2div, __hdiv)
AG_FP16_LANES2(__hadd2_rn, __hadd)
AG_FP16_LANES2(__hsub2_rn, __hsub)
AG_FP16_LANES2(__hmul2_rn, __hmul)
AG_FP16_LANES2(__hadd2_sat, __hadd_sat)
AG_FP16_LANES2(__hsub2_sat, __hsub_sat)
AG_FP16_LANES2(__hmul2_sat, __hmul_sat)
AG_FP16_LANES2(__hmin2, __hmin)
AG_FP16_LANES2(__hmax2, __hmax)
AG_FP16_LANES2(__hmin2_nan, __hmin_nan)
AG_FP16_LANES2(__hmax2_nan, __hmax_nan)
#undef AG_FP16_LANES2
AG_FP16_T2 T2 __hneg2(T2 a) { return T2(__hneg<>(a.x), __hneg<>(a.y)); }
AG_FP16_T2 T2 __habs2(T2 a) { return T2(__habs<>(a.x), __habs<>(a.y)); }
AG_FP16_T2 T2 __hisnan2(T2 a) { return emu::fp16::truth<T2>(__hisnan<>(a.x), __hisnan<>(a.y)); }
AG_FP16_T2 T2 __lowhigh2highlow(T2 a) { return T2(a.y, a.x); }
AG_FP16_T2 float __low2float(T2 a) { return float(emu::fp16::value(a.x)); }
AG_FP16_T2 float __high2float(T2 a) { return float(emu::fp16::value(a.y)); }

#define AG_FP16_COMPARE2(c)                                                                                 \
  AG_FP16_T2 T2 __h##c##2(T2 a, T2 b) { return emu::fp16::truth<T2>(__h##c<>(a.x, b.x), __h##c<>(a.y, b.y)); } \
  AG_FP16_T2 unsigned __h##c##2_mask(T2 a, T2 b) { return emu::fp16::mask(__h##c<>(a.x, b.x), __h##c<>(a.y, b.y)); } \
  AG_FP16_T2 bool __hb##c##2(T2 a, T2 b) { return __h##c<>(a.x, b.x) && __h##c<>(a.y, b.y); }
AG_FP16_COMPARE2(eq)
AG_FP16_COMPARE2(ne)
AG_FP16_COMPARE2(lt)
AG_FP16_COMPARE2(le)
AG_FP16_COMPARE2(gt)
AG_FP16_COMPARE2(ge)
AG_FP16_COMPARE2(equ)
AG_FP16_COMPARE2(neu)
AG_FP16_COMPARE2(ltu)
AG_FP16_COMPARE2(leu)
AG_FP16_COMPARE2(gtu)
AG_FP16_COMPARE2(geu)
#undef AG_FP16_COMPARE2

// Lanes, floats and bit patterns, per type (half: __low2half, bfloat16: __low2bfloat16, ...).
#define AG_FP16_LANE_CONVERSIONS(T, T2, h, h2)                                                        \
  template <class = void> inline float2 __##h2##2float2(T2 a) { return make_float2(float(emu::fp16::value(a.x)), float(emu::fp16::value(a.y))); } \
  template <class = void> inline T2 __float22##h2##_rn(float2 f) { return T2(emu::fp16::rn<T>(f.x), emu::fp16::rn<T>(f.y)); } \
  template <class = void> inline T2 __##h##2##h2(T a) { return T2(a, a); }                           \
  template <class = void> inline T2 __halves2##h2(T lo, T hi) { return T2(lo, hi); }                  \
  template <class = void> inline T __low2##h(T2 a) { return a.x; }                                     \
  template <class = void> inline T __high2##h(T2 a) { return a.y; }                                    \
  template <class = void> inline T2 __low2##h2(T2 a) { return T2(a.x, a.x); }                          \
  template <class = void> inline T2 __high2##h2(T2 a) { return T2(a.y, a.y); }                         \
  template <class = void> inline T2 __lows2##h2(T2 a, T2 b) { return T2(a.x, b.x); }                   \
  template <class = void> inline T2 __highs2##h2(T2 a, T2 b) { return T2(a.y, b.y); }                  \
  template <class = void> inline short __##h##_as_short(T a) { return static_cast<short>(emu::fp16::bits(a)); } \
  template <class = void> inline unsigned short __##h##_as_ushort(T a) { return emu::fp16::bits(a); }  \
  template <class = void> inline T __short_as_##h(short i) { return emu::fp16::from_bits<T>(static_cast<uint16_t>(i)); } \
  template <class = void> inline T __ushort_as_##h(unsigned short i) { return emu::fp16::from_bits<T>(i); } \
  template <class = void> inline float __##h##2float(T a) { return float(emu::fp16::value(a)); }         \
  template <class = void> inline T __float2##h(float f) { return emu::fp16::rn<T>(f); }                 \
  template <class = void> inline T __float2##h##_rn(float f) { return emu::fp16::rn<T>(f); }            \
  template <class = void> inline T __float2##h##_rz(float f) { return emu::fp16::round<T>(f, emu::fp16::Round::rz); } \
  template <class = void> inline T __float2##h##_rd(float f) { return emu::fp16::round<T>(f, emu::fp16::Round::rd); } \
  template <class = void> inline T __float2##h##_ru(float f) { return emu::fp16::round<T>(f, emu::fp16::Round::ru); } \
  template <class = void> inline T __double2##h(double d) { return emu::fp16::rn<T>(d); }               \
  template <class = void> inline T2 __float2##h2##_rn(float f) { return T2(emu::fp16::rn<T>(f), emu::fp16::rn<T>(f)); } \
  template <class = void> inline T2 __floats2##h2##_rn(float lo, float hi) { return T2(emu::fp16::rn<T>(lo), emu::fp16::rn<T>(hi)); }
AG_FP16_LANE_CONVERSIONS(__half, __half2, half, half2)
AG_FP16_LANE_CONVERSIONS(__nv_bfloat16, __nv_bfloat162, bfloat16, bfloat162)
#undef AG_FP16_LANE_CONVERSIONS

// ------------------------------------------------------------------ fused multiply-add
AG_FP16_T T __hfma(T a, T b, T c) { return emu::fp16::fma(a, b, c); }
AG_FP16_T T __hfma_sat(T a, T b, T c) { return emu::fp16::sat(emu::fp16::fma(a, b, c)); }
AG_FP16_T T __hfma_relu(T a, T b, T c) { return emu::fp16::relu(emu::fp16::fma(a, b, c)); }
AG_FP16_T2 T2 __hfma2(T2 a, T2 b, T2 c) { return T2(__hfma(a.x, b.x, c.x), __hfma(a.y, b.y, c.y)); }
AG_FP16_T2 T2 __hfma2_sat(T2 a, T2 b, T2 c) { return T2(__hfma_sat(a.x, b.x, c.x), __hfma_sat(a.y, b.y, c.y)); }
AG_FP16_T2 T2 __hfma2_relu(T2 a, T2 b, T2 c) { return T2(__hfma_relu(a.x, b.x, c.x), __hfma_relu(a.y, b.y, c.y)); }
// Complex a * b + c as the device computes it: four fused multiply-adds.
AG_FP16_T2 T2 __hcmadd(T2 a, T2 b, T2 c) {
  return T2(__hfma(__hneg(a.y), b.y, __hfma(a.x, b.x, c.x)), __hfma(a.y, b.x, __hfma(a.x, b.y, c.y)));
}

// ------------------------------------------------------------------ math, scalar and 2-wide
#define AG_FP16_MATH(name, name2, expr)                                                       \
  AG_FP16_T T name(T a) { return emu::fp16::map(a, [](double x) { return expr; }); }         \
  AG_FP16_T2 T2 name2(T2 a) { return T2(name(a.x), name(a.y)); }

AG_FP16_MATH(hrint, h2rint, emu::fp16::integral(x, emu::fp16::Round::rn))
AG_FP16_MATH(htrunc, h2trunc, emu::fp16::integral(x, emu::fp16::Round::rz))
AG_FP16_MATH(hfloor, h2floor, emu::fp16::integral(x, emu::fp16::Round::rd))
AG_FP16_MATH(hceil, h2ceil, emu::fp16::integral(x, emu::fp16::Round::ru))
AG_FP16_MATH(hsqrt, h2sqrt, std::sqrt(x))
AG_FP16_MATH(hrsqrt, h2rsqrt, 1.0 / std::sqrt(x))
AG_FP16_MATH(hrcp, h2rcp, 1.0 / x)
AG_FP16_MATH(hexp, h2exp, std::exp(x))
AG_FP16_MATH(hexp2, h2exp2, std::exp2(x))
AG_FP16_MATH(hexp10, h2exp10, std::pow(10.0, x))
AG_FP16_MATH(hlog, h2log, std::log(x))
AG_FP16_MATH(hlog2, h2log2, std::log2(x))
AG_FP16_MATH(hlog10, h2log10, std::log10(x))
AG_FP16_MATH(hsin, h2sin, std::sin(x))
AG_FP16_MATH(hcos, h2cos, std::cos(x))
AG_FP16_MATH(htanh, h2tanh, std::tanh(x))
AG_FP16_MATH(htanh_approx, h2tanh_approx, std::tanh(x))

#undef AG_FP16_MATH

// ------------------------------------------------------------------ to and from integers
// Missing on the host: to integers _rn / _rd / _ru, from integers to bfloat16 _rz / _rd / _ru;
// the others only before CUDA 12.2.
#define AG_FP16_TO_INT(T, h, to, I)                                                                   \
  template <class = void> inline I __##h##2##to##_rn(T x) { return emu::fp16::to_int<I>(x, emu::fp16::Round::rn); } \
  template <class = void> inline I __##h##2##to##_rz(T x) { return emu::fp16::to_int<I>(x, emu::fp16::Round::rz); } \
  template <class = void> inline I __##h##2##to##_rd(T x) { return emu::fp16::to_int<I>(x, emu::fp16::Round::rd); } \
  template <class = void> inline I __##h##2##to##_ru(T x) { return emu::fp16::to_int<I>(x, emu::fp16::Round::ru); }
#define AG_FP16_FROM_INT(T, h, from, I)                                                               \
  template <class = void> inline T __##from##2##h##_rn(I i) { return emu::fp16::from_int<T>(i, emu::fp16::Round::rn); } \
  template <class = void> inline T __##from##2##h##_rz(I i) { return emu::fp16::from_int<T>(i, emu::fp16::Round::rz); } \
  template <class = void> inline T __##from##2##h##_rd(I i) { return emu::fp16::from_int<T>(i, emu::fp16::Round::rd); } \
  template <class = void> inline T __##from##2##h##_ru(I i) { return emu::fp16::from_int<T>(i, emu::fp16::Round::ru); }
#define AG_FP16_INTEGERS(T, h)                                                                        \
  AG_FP16_TO_INT(T, h, short, short)                                                                  \
  AG_FP16_TO_INT(T, h, ushort, unsigned short)                                                        \
  AG_FP16_TO_INT(T, h, int, int)                                                                      \
  AG_FP16_TO_INT(T, h, uint, unsigned int)                                                            \
  AG_FP16_TO_INT(T, h, ll, long long)                                                                 \
  AG_FP16_TO_INT(T, h, ull, unsigned long long)                                                       \
  AG_FP16_FROM_INT(T, h, short, short)                                                                \
  AG_FP16_FROM_INT(T, h, ushort, unsigned short)                                                      \
  AG_FP16_FROM_INT(T, h, int, int)                                                                    \
  AG_FP16_FROM_INT(T, h, uint, unsigned int)                                                          \
  AG_FP16_FROM_INT(T, h, ll, long long)                                                               \
  AG_FP16_FROM_INT(T, h, ull, unsigned long long)

AG_FP16_INTEGERS(__half, half)
AG_FP16_INTEGERS(__nv_bfloat16, bfloat16)

#undef AG_FP16_INTEGERS
#undef AG_FP16_FROM_INT
#undef AG_FP16_TO_INT

// ------------------------------------------------------------------ shuffles of __half2 / __nv_bfloat162
// The pair types have a user-provided assignment operator, so they are not trivially copyable
// and the emulator's generic shuffles refuse them; these move the 32-bit pattern instead.
namespace emu::fp16 {
template <pair T2> inline uint32_t pair_bits(T2 v) { uint32_t b; std::memcpy(&b, &v, sizeof b); return b; }
template <pair T2> inline T2 pair_from_bits(uint32_t b) { T2 v; std::memcpy(&v, &b, sizeof b); return v; }
}  // namespace emu::fp16

#define AG_FP16_SHUFFLES(T2)                                                                           \
  inline T2 __shfl_sync(unsigned mask, T2 v, int src, int width = 32, emu::Loc loc = emu::Loc::current()) { \
    return emu::fp16::pair_from_bits<T2>(__shfl_sync(mask, emu::fp16::pair_bits(v), src, width, loc)); } \
  inline T2 __shfl_up_sync(unsigned mask, T2 v, unsigned delta, int width = 32, emu::Loc loc = emu::Loc::current()) { \
    return emu::fp16::pair_from_bits<T2>(__shfl_up_sync(mask, emu::fp16::pair_bits(v), delta, width, loc)); } \
  inline T2 __shfl_down_sync(unsigned mask, T2 v, unsigned delta, int width = 32, emu::Loc loc = emu::Loc::current()) { \
    return emu::fp16::pair_from_bits<T2>(__shfl_down_sync(mask, emu::fp16::pair_bits(v), delta, width, loc)); } \
  inline T2 __shfl_xor_sync(unsigned mask, T2 v, int lane_mask, int width = 32, emu::Loc loc = emu::Loc::current()) { \
    return emu::fp16::pair_from_bits<T2>(__shfl_xor_sync(mask, emu::fp16::pair_bits(v), lane_mask, width, loc)); }

AG_FP16_SHUFFLES(__half2)
AG_FP16_SHUFFLES(__nv_bfloat162)

#undef AG_FP16_SHUFFLES

#undef AG_FP16_T2
#undef AG_FP16_T
