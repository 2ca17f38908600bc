"""The half / bfloat16 intrinsics of cuda_fp16.h and cuda_bf16.h under the CPU emulator.

Each intrinsic runs elementwise in a kernel (one module holds them all, so the file builds
once) and is compared bit for bit (NaN-aware, zeros by sign) with torch float16 / bfloat16
arithmetic, which computes in fp32 and rounds to nearest even, or, where torch has no such
operation (fused multiply-add, directed roundings, math functions), with an exact reference
rounding in numpy. Inputs: every half / bfloat16 bit pattern for the one-operand intrinsics,
and for the others random values plus the awkward ones (subnormals, near overflow, ties,
signed zeros, infinities, NaN).
"""
import functools
import shutil

import numpy as np
import pytest
import torch

from attngraph.ops.cuda.loader import cuda_include_dirs
from attngraph.ops.cuda.emulator import RawModule

pytestmark = pytest.mark.skipif(
    shutil.which("g++") is None or not cuda_include_dirs(),
    reason="the CUDA emulator needs g++ and the CUDA headers (cuda_fp16.h)")

FORMATS = {torch.float16: (10, 5), torch.bfloat16: (7, 8)}   # significand, exponent bits
CTYPE = {torch.float16: "__half", torch.bfloat16: "__nv_bfloat16"}
CTYPE2 = {torch.float16: "__half2", torch.bfloat16: "__nv_bfloat162"}
PREFIX = {torch.float16: "half", torch.bfloat16: "bfloat16"}     # __float2half_rn, ...
DTYPES = [pytest.param(torch.float16, id="half"), pytest.param(torch.bfloat16, id="bf16")]


# ----------------------------------------------------------------------------- references
def round_to(x, dtype, mode="rn", err=None):
    """float64 ``x`` rounded once to ``dtype`` (returned as float64). ``err``: the part of an
    exact value that ``x`` lost (x + err exact; rounding to nearest only)."""
    man, exp = FORMATS[dtype]
    bias = 2 ** (exp - 1) - 1
    x = np.asarray(x, dtype=np.float64)
    err = np.zeros_like(x) if err is None else np.asarray(err, dtype=np.float64)
    a = np.abs(x)
    neg = np.signbit(x)
    with np.errstate(all="ignore"):
        e = np.maximum(np.frexp(a)[1] - 1, 1 - bias)
        m = np.ldexp(a, man - e)
        n = np.floor(m)
        frac = m - n
        rel = np.where(neg, -err, err)                  # lost part, in the direction of |x|
        up = {"rn": (frac > 0.5) | ((frac == 0.5) & ((rel > 0) | ((rel == 0) & (n % 2 == 1)))),
              "rz": np.zeros_like(neg),
              "rd": neg & (frac > 0),
              "ru": ~neg & (frac > 0)}[mode]
        r = np.ldexp(n + up, e - man)
        big = np.ldexp(2.0 - 2.0 ** -man, bias)         # the largest finite value
        to_inf = {"rn": np.ones_like(neg), "rz": np.zeros_like(neg), "rd": neg, "ru": ~neg}[mode]
        r = np.where(r > big, np.where(to_inf, np.inf, big), r)
        r = np.where(np.isinf(a), np.inf, r)
        r = np.where(neg, -r, r)
    return np.where(np.isnan(x), np.nan, r)


def exact_fma(a, b, c, dtype):
    """a * b + c rounded once: the product is exact in float64, the sum's rounding error is
    carried (TwoSum) into the rounding."""
    with np.errstate(all="ignore"):
        p = a * b
        s = p + c
        bb = s - p
        err = (p - (s - bb)) + (c - bb)
    err = np.where(np.isfinite(s), err, 0.0)
    return round_to(s, dtype, "rn", err)


def half_ops(dtype, fn, *xs):
    """``fn`` on torch tensors of ``dtype`` (fp32 compute, round to nearest even)."""
    return fn(*[torch.from_numpy(x).to(dtype) for x in xs]).double().numpy()


def assert_same(got, want, what="", *, zero_sign=True):
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    sign = (np.signbit(got) == np.signbit(want)) if zero_sign else True
    same = ((got == want) & sign) | (np.isnan(got) & np.isnan(want))
    if not same.all():
        bad = np.flatnonzero(~same)[:8]
        raise AssertionError(f"{what}: {(~same).sum()} of {same.size} differ, e.g. at {bad.tolist()}: "
                             f"got {got[bad].tolist()} want {want[bad].tolist()}")


# ----------------------------------------------------------------------------- inputs
def every_value(dtype):
    """All 65536 bit patterns of ``dtype``, as float64."""
    return _every_value(dtype).copy()


@functools.lru_cache(maxsize=None)
def _every_value(dtype):
    return torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype).double().numpy()


def awkward(dtype):
    """Values where rounding goes wrong: zeros, subnormals, the largest finite, ties."""
    info = torch.finfo(dtype)
    man = FORMATS[dtype][0]
    tiny = info.smallest_normal * 2.0 ** -man
    v = [0.0, -0.0, 1.0, -1.0, 0.5, 1.5, 2.5, -2.5, 3.0, 1 + 2.0 ** -man, 1 + 2.0 ** -(man + 1),
         1 + 3 * 2.0 ** -(man + 1), tiny, -tiny, 3 * tiny, info.smallest_normal,
         info.smallest_normal - tiny, info.max, -info.max, info.max / 2, 0.99 * info.max,
         np.inf, -np.inf, np.nan, 1e-3, 7.0, -65.0, 300.0, 0.1]
    return torch.tensor(v, dtype=torch.float64).to(dtype).double().numpy()


def operands(dtype, count, n, seed):
    """``count`` arrays of ``n`` values: random magnitudes over the whole range mixed with the
    awkward values."""
    g = np.random.default_rng(seed)
    info = torch.finfo(dtype)
    lo, hi = np.log2(info.smallest_normal) - FORMATS[dtype][0], np.log2(info.max)
    out = []
    for _ in range(count):
        mag = np.exp2(g.uniform(lo, hi, n)) if dtype == torch.bfloat16 else np.exp2(g.uniform(-26, 16, n))
        x = np.where(g.random(n) < 0.5, -mag, mag)
        x[: n // 2] = g.normal(0, 4, n // 2)
        pick = g.random(n) < 0.2
        x[pick] = g.choice(awkward(dtype), pick.sum())
        out.append(torch.from_numpy(x).to(dtype).double().numpy())
    return out


# ----------------------------------------------------------------------------- the intrinsics
# name, C++ expression (x, y, z: the operands), reference on float64 numpy arrays of dtype values
def _min(x, y, nan):
    with np.errstate(invalid="ignore"):
        r = np.where(np.isnan(x), y, np.where(np.isnan(y), x, np.where(x < y, x, y)))
        zeros = (x == 0) & (y == 0)
        r = np.where(zeros, np.where(np.signbit(x) | np.signbit(y), -0.0, 0.0), r)
    return np.where(np.isnan(x) | np.isnan(y), np.nan, r) if nan else r


def _max(x, y, nan):
    return -_min(-x, -y, nan)


def _sat(r):
    return np.where(np.isnan(r), 0.0, np.clip(r, 0.0, 1.0)) + 0.0


def _relu(r):
    return np.where(r > 0, r, np.where(np.isnan(r), r, 0.0))


def _cmp(fn, unordered):
    def ref(dtype, x, y):
        with np.errstate(invalid="ignore"):
            r = fn(x, y)
        nan = np.isnan(x) | np.isnan(y)
        return (np.where(nan, unordered, r)).astype(np.float64)
    return ref


ARITH = {
    "hadd": ("__hadd(x, y)", lambda d, x, y: half_ops(d, torch.add, x, y)),
    "hsub": ("__hsub(x, y)", lambda d, x, y: half_ops(d, torch.sub, x, y)),
    "hmul": ("__hmul(x, y)", lambda d, x, y: half_ops(d, torch.mul, x, y)),
    "hdiv": ("__hdiv(x, y)", lambda d, x, y: half_ops(d, torch.div, x, y)),
    "hadd_rn": ("__hadd_rn(x, y)", lambda d, x, y: half_ops(d, torch.add, x, y)),
    "hsub_rn": ("__hsub_rn(x, y)", lambda d, x, y: half_ops(d, torch.sub, x, y)),
    "hmul_rn": ("__hmul_rn(x, y)", lambda d, x, y: half_ops(d, torch.mul, x, y)),
    "hadd_sat": ("__hadd_sat(x, y)", lambda d, x, y: _sat(half_ops(d, torch.add, x, y))),
    "hsub_sat": ("__hsub_sat(x, y)", lambda d, x, y: _sat(half_ops(d, torch.sub, x, y))),
    "hmul_sat": ("__hmul_sat(x, y)", lambda d, x, y: _sat(half_ops(d, torch.mul, x, y))),
    "hmin": ("__hmin(x, y)", lambda d, x, y: _min(x, y, nan=False)),
    "hmax": ("__hmax(x, y)", lambda d, x, y: _max(x, y, nan=False)),
    "hmin_nan": ("__hmin_nan(x, y)", lambda d, x, y: _min(x, y, nan=True)),
    "hmax_nan": ("__hmax_nan(x, y)", lambda d, x, y: _max(x, y, nan=True)),
    "heq": ("__heq(x, y)", _cmp(np.equal, 0)), "hne": ("__hne(x, y)", _cmp(np.not_equal, 0)),
    "hlt": ("__hlt(x, y)", _cmp(np.less, 0)), "hle": ("__hle(x, y)", _cmp(np.less_equal, 0)),
    "hgt": ("__hgt(x, y)", _cmp(np.greater, 0)), "hge": ("__hge(x, y)", _cmp(np.greater_equal, 0)),
    "hequ": ("__hequ(x, y)", _cmp(np.equal, 1)), "hneu": ("__hneu(x, y)", _cmp(np.not_equal, 1)),
    "hltu": ("__hltu(x, y)", _cmp(np.less, 1)), "hleu": ("__hleu(x, y)", _cmp(np.less_equal, 1)),
    "hgtu": ("__hgtu(x, y)", _cmp(np.greater, 1)), "hgeu": ("__hgeu(x, y)", _cmp(np.greater_equal, 1)),
}

FMA = {
    "hfma": ("__hfma(x, y, z)", lambda d, x, y, z: exact_fma(x, y, z, d)),
    "hfma_sat": ("__hfma_sat(x, y, z)", lambda d, x, y, z: _sat(exact_fma(x, y, z, d))),
    "hfma_relu": ("__hfma_relu(x, y, z)", lambda d, x, y, z: _relu(exact_fma(x, y, z, d))),
}


def _integral(mode):
    return {"rn": np.rint, "rz": np.trunc, "rd": np.floor, "ru": np.ceil}[mode]


MATH = {   # name -> float64 function; results are the float64 value rounded to the dtype
    "hrint": np.rint, "htrunc": np.trunc, "hfloor": np.floor, "hceil": np.ceil,
    "hsqrt": np.sqrt, "hrsqrt": lambda x: 1.0 / np.sqrt(x), "hrcp": lambda x: 1.0 / x,
    "hexp": np.exp, "hexp2": np.exp2, "hexp10": lambda x: np.power(10.0, x),
    "hlog": np.log, "hlog2": np.log2, "hlog10": np.log10,
    "hsin": np.sin, "hcos": np.cos, "htanh": np.tanh, "htanh_approx": np.tanh,
}
UNARY = {
    "hneg": ("__hneg(x)", lambda d, x: -x),
    "habs": ("__habs(x)", lambda d, x: np.abs(x)),
    "hisnan": ("__hisnan(x)", lambda d, x: np.isnan(x).astype(np.float64)),
    "hisinf": ("__hisinf(x)", lambda d, x: np.where(np.isinf(x), np.sign(x), 0.0)),
    **{name: (f"{name}(x)", lambda d, x, f=f: round_to(f(x), d)) for name, f in MATH.items()},
}
UNARY2 = {  # 2-wide forms: the same reference per lane
    "hneg2": ("__hneg2(x)", UNARY["hneg"][1]), "habs2": ("__habs2(x)", UNARY["habs"][1]),
    "hisnan2": ("__hisnan2(x)", UNARY["hisnan"][1]),
    **{"h2" + name[1:]: (f"h2{name[1:]}(x)", UNARY[name][1]) for name in MATH},
}
ARITH2 = {
    "hadd2": ("__hadd2(x, y)", ARITH["hadd"][1]), "hsub2": ("__hsub2(x, y)", ARITH["hsub"][1]),
    "hmul2": ("__hmul2(x, y)", ARITH["hmul"][1]), "h2div": ("__h2div(x, y)", ARITH["hdiv"][1]),
    "hadd2_rn": ("__hadd2_rn(x, y)", ARITH["hadd"][1]), "hsub2_rn": ("__hsub2_rn(x, y)", ARITH["hsub"][1]),
    "hmul2_rn": ("__hmul2_rn(x, y)", ARITH["hmul"][1]),
    "hadd2_sat": ("__hadd2_sat(x, y)", ARITH["hadd_sat"][1]),
    "hsub2_sat": ("__hsub2_sat(x, y)", ARITH["hsub_sat"][1]),
    "hmul2_sat": ("__hmul2_sat(x, y)", ARITH["hmul_sat"][1]),
    "hmin2": ("__hmin2(x, y)", ARITH["hmin"][1]), "hmax2": ("__hmax2(x, y)", ARITH["hmax"][1]),
    "hmin2_nan": ("__hmin2_nan(x, y)", ARITH["hmin_nan"][1]),
    "hmax2_nan": ("__hmax2_nan(x, y)", ARITH["hmax_nan"][1]),
    **{f"h{c}2": (f"__h{c}2(x, y)", ARITH[f"h{c}"][1])
       for c in ("eq", "ne", "lt", "le", "gt", "ge", "equ", "neu", "ltu", "leu", "gtu", "geu")},
    **{f"h{c}2_mask": (f"__h{c}2_mask(x, y)", lambda d, x, y, c=c: 65535.0 * ARITH[f"h{c}"][1](d, x, y))
       for c in ("eq", "ne", "lt", "le", "gt", "ge", "equ", "neu", "ltu", "leu", "gtu", "geu")},
}
BOOL2 = {f"hb{c}2": f"__hb{c}2(x, y)"
         for c in ("eq", "ne", "lt", "le", "gt", "ge", "equ", "neu", "ltu", "leu", "gtu", "geu")}
FMA2 = {"hfma2": ("__hfma2(x, y, z)", FMA["hfma"][1]),
        "hfma2_sat": ("__hfma2_sat(x, y, z)", FMA["hfma_sat"][1]),
        "hfma2_relu": ("__hfma2_relu(x, y, z)", FMA["hfma_relu"][1])}

INTS = {"short": np.int16, "ushort": np.uint16, "int": np.int32, "uint": np.uint32,
        "ll": np.int64, "ull": np.uint64}
MODES = ("rn", "rz", "rd", "ru")


def explicit(expr):
    """``__hadd(x, y)`` -> ``__hadd<>(x, y)``: only the definitions of attngraph_emu_fp16.h
    (templates) are candidates, not the header's host function of the same name."""
    return expr.replace("(", "<>(", 1)


def _switch(ops, store):
    """Case i: the intrinsic called by name; case len(ops) + i: its fallback, explicitly."""
    ops = list(ops) + [explicit(e) for e in ops]
    return "\n".join(f"      case {i}: {store.format(expr=e)}; break;" for i, e in enumerate(ops))


def op_index(table, name, form):
    return list(table).index(name) + (len(table) if form == "fallback" else 0)


FROM_INT = (("short", "short"), ("ushort", "unsigned short"), ("int", "int"), ("uint", "unsigned"),
            ("ll", "long long"), ("ull", "unsigned long long"))


def lanes_body(p, e):
    """Moving lanes, floats and bit patterns (e: "" or "<>")."""
    h, h2 = p, p + "2"
    return f"""
      o[0] = as_float(__low2{h}{e}(x)); o[1] = as_float(__high2{h}{e}(x));
      put2(o + 2, __halves2{h2}{e}(__low2{h}{e}(x), __high2{h}{e}(y)));
      put2(o + 4, __{h}2{h2}{e}(__high2{h}{e}(x)));
      put2(o + 6, __low2{h2}{e}(x)); put2(o + 8, __high2{h2}{e}(x));
      put2(o + 10, __lows2{h2}{e}(x, y)); put2(o + 12, __highs2{h2}{e}(x, y));
      put2(o + 14, __lowhigh2highlow{e}(x));
      const float2 f = __{h2}2float2{e}(x); o[16] = f.x; o[17] = f.y;
      put2(o + 18, __float22{h2}_rn{e}(make_float2(as_float(y.x) * 3.3f, as_float(y.y) / 7.1f)));
      o[20] = float(__{h}_as_ushort{e}(x.x)); o[21] = as_float(__ushort_as_{h}{e}(__{h}_as_ushort{e}(x.y)));"""


def kernel_source():
    u = [e for e, _ in UNARY.values()]
    a = [e for e, _ in ARITH.values()]
    f = [e for e, _ in FMA.values()]
    u2 = [e for e, _ in UNARY2.values()]
    a2 = [e for e, _ in ARITH2.values()] + list(BOOL2.values())
    f2 = [e for e, _ in FMA2.values()] + ["__hcmadd(x, y, z)"]
    conv = []
    for dtype in FORMATS:
        t, t2, p = CTYPE[dtype], CTYPE2[dtype], PREFIX[dtype]
        to_int = [f"__{p}2{i}_{m}(x)" for i in INTS for m in MODES]
        from_int = [f"__{i}2{p}_{m}(({c}) v)" for i, c in FROM_INT for m in MODES]
        from_float = [f"__float2{p}_{m}(f)" for m in MODES]
        conv.append(f"""
__global__ void to_int_{p}(int op, const {t}* a, long long* out, int n) {{
  GRID_LOOP(i, n) {{
    const {t} x = a[i];
    switch (op) {{
{_switch(to_int, "out[i] = (long long)({expr})")}
    }}
  }}
}}
__global__ void from_int_{p}(int op, const long long* a, float* out, int n) {{
  GRID_LOOP(i, n) {{
    const long long v = a[i];
    switch (op) {{
{_switch(from_int, "out[i] = as_float({expr})")}
    }}
  }}
}}
__global__ void lanes_{p}(int form, const {t2}* a, const {t2}* b, float* out, int n) {{
  GRID_LOOP(i, n) {{
    float* o = out + 22 * i;
    const {t2} x = a[i], y = b[i];
    if (form == 0) {{{lanes_body(p, "")}
    }} else {{{lanes_body(p, "<>")}
    }}
  }}
}}
__global__ void from_float_{p}(int op, const float* a, float* out, int n) {{
  GRID_LOOP(i, n) {{
    const float f = a[i];
    switch (op) {{
{_switch(from_float, "out[i] = as_float({expr})")}
    }}
  }}
}}""")
    return HEADER + f"""
template <class T> __global__ void unary(int op, const T* a, float* out, int n) {{
  GRID_LOOP(i, n) {{
    const T x = a[i];
    switch (op) {{
{_switch(u, "out[i] = as_float({expr})")}
    }}
  }}
}}
template <class T> __global__ void binary(int op, const T* a, const T* b, float* out, int n) {{
  GRID_LOOP(i, n) {{
    const T x = a[i], y = b[i];
    switch (op) {{
{_switch(a, "out[i] = as_float({expr})")}
    }}
  }}
}}
template <class T> __global__ void ternary(int op, const T* a, const T* b, const T* c, float* out, int n) {{
  GRID_LOOP(i, n) {{
    const T x = a[i], y = b[i], z = c[i];
    switch (op) {{
{_switch(f, "out[i] = as_float({expr})")}
    }}
  }}
}}
template <class T2> __global__ void unary2(int op, const T2* a, float* out, int n) {{
  GRID_LOOP(i, n) {{
    const T2 x = a[i];
    switch (op) {{
{_switch(u2, "put2(out + 2 * i, {expr})")}
    }}
  }}
}}
template <class T2> __global__ void binary2(int op, const T2* a, const T2* b, float* out, int n) {{
  GRID_LOOP(i, n) {{
    const T2 x = a[i], y = b[i];
    switch (op) {{
{_switch(a2, "put2(out + 2 * i, {expr})")}
    }}
  }}
}}
template <class T2> __global__ void ternary2(int op, const T2* a, const T2* b, const T2* c, float* out, int n) {{
  GRID_LOOP(i, n) {{
    const T2 x = a[i], y = b[i], z = c[i];
    switch (op) {{
{_switch(f2, "put2(out + 2 * i, {expr})")}
    }}
  }}
}}
{"".join(conv)}
""" + SCALAR_PRODUCT


HEADER = r"""
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#define GRID_LOOP(i, n) for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)

__device__ inline float as_float(__half h) { return __half2float(h); }
__device__ inline float as_float(__nv_bfloat16 h) { return __bfloat162float(h); }
__device__ inline float as_float(bool b) { return b ? 1.0f : 0.0f; }
__device__ inline float as_float(int i) { return float(i); }
__device__ inline void put2(float* o, __half2 r) { const float2 f = __half22float2(r); o[0] = f.x; o[1] = f.y; }
__device__ inline void put2(float* o, __nv_bfloat162 r) { const float2 f = __bfloat1622float2(r); o[0] = f.x; o[1] = f.y; }
__device__ inline void put2(float* o, bool b) { o[0] = o[1] = as_float(b); }
__device__ inline void put2(float* o, unsigned m) { o[0] = float(m & 0xffffu); o[1] = float(m >> 16); }
"""

# The idea of NVIDIA's fp16ScalarProduct sample: each thread accumulates half2 products with
# __hfma2, a warp reduces with shuffles and __hadd2, the block through shared memory.
SCALAR_PRODUCT = r"""
__global__ void scalar_product(const half2* a, const half2* b, float* results, int n) {
  __shared__ half2 partial[32];
  const int stride = gridDim.x * blockDim.x;
  half2 value = __float2half2_rn(0.f);
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
    value = __hfma2(a[i], b[i], value);
  for (int offset = 16; offset > 0; offset /= 2)
    value = __hadd2(value, __shfl_down_sync(0xffffffffu, value, offset));
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) partial[warp] = value;
  __syncthreads();
  if (warp == 0) {
    value = lane < blockDim.x / 32 ? partial[lane] : __float2half2_rn(0.f);
    for (int offset = 16; offset > 0; offset /= 2)
      value = __hadd2(value, __shfl_down_sync(0xffffffffu, value, offset));
    if (lane == 0) results[blockIdx.x] = __low2float(value) + __high2float(value);
  }
}
"""

KERNELS = tuple(f"{k}<{t}>" for k in ("unary", "binary", "ternary") for t in CTYPE.values()) + \
    tuple(f"{k}<{t}>" for k in ("unary2", "binary2", "ternary2") for t in CTYPE2.values()) + \
    tuple(f"{k}_{p}" for p in PREFIX.values() for k in ("to_int", "from_int", "from_float", "lanes")) + \
    ("scalar_product",)


@pytest.fixture(scope="module")
def mod():
    return RawModule(code=kernel_source(), name_expressions=KERNELS, name="fp16_intrinsics.cu")


def with_forms(names, fallback=None):
    """(name, form) parameters: every name called by name; the names in ``fallback`` (default
    all) also through the fallback definition, explicitly."""
    fallback = names if fallback is None else fallback
    return [pytest.param(n, "name", id=n) for n in names] + \
        [pytest.param(n, "fallback", id=f"{n}-fallback") for n in names if n in fallback]


# The headers of CUDA 12.2+ declare these for the host, 12.0 / 12.1 do not: the fallbacks are
# checked explicitly (the others are the fallbacks whatever the form).
HOST_SINCE_12_2 = {"hneg", "habs", "hisnan", "hisinf", "hneg2", "habs2", "hisnan2"}


def launch(mod, name, op, inputs, out_dtype=torch.float32, width=1):
    n = len(inputs[0]) // width
    out = torch.zeros(n * width, dtype=out_dtype)
    mod.get_function(name)((8,), (128,), (np.int32(op), *inputs, out, np.int32(n)))
    return out


def as_tensor(x, dtype):
    return torch.from_numpy(np.ascontiguousarray(x)).to(dtype)


# ----------------------------------------------------------------------------- the tests
def test_reference_rounding_matches_numpy_half():
    x = np.random.default_rng(0).standard_normal(20000) * np.exp2(np.random.default_rng(1).uniform(-30, 18, 20000))
    x = np.concatenate([x, awkward(torch.float16) * (1 + 2.0 ** -30), [65520.0, 65519.99, -65520.0]])
    with np.errstate(over="ignore"):
        numpy_half = x.astype(np.float16).astype(np.float64)
    assert_same(round_to(x, torch.float16), numpy_half, "round_to vs numpy")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,form", with_forms(list(UNARY), HOST_SINCE_12_2))
def test_unary(mod, dtype, name, form):
    x = every_value(dtype)
    got = launch(mod, f"unary<{CTYPE[dtype]}>", op_index(UNARY, name, form), [as_tensor(x, dtype)])
    with np.errstate(all="ignore"):
        assert_same(got, UNARY[name][1](dtype, x), name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,form", with_forms(list(UNARY2), HOST_SINCE_12_2))
def test_unary_2wide(mod, dtype, name, form):
    x = np.roll(every_value(dtype), 7)
    got = launch(mod, f"unary2<{CTYPE2[dtype]}>", op_index(UNARY2, name, form), [as_tensor(x, dtype)], width=2)
    with np.errstate(all="ignore"):
        assert_same(got, UNARY2[name][1](dtype, x), name)


HEADER_HOST_ZEROS = ("the bfloat16 __hmin_nan / __hmax_nan of cuda_bf16.h's host path (CUDA 12.2+) "
                     "return the second operand for +0 vs -0; the half ones and the device order "
                     "-0 below +0")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,form", with_forms(list(ARITH)))
def test_binary(mod, dtype, name, form):
    # HEADER_HOST_ZEROS: there only the sign of a zero result may differ
    header_zeros = dtype == torch.bfloat16 and name in ("hmin_nan", "hmax_nan") and form == "name"
    x, y = operands(dtype, 2, 4096, seed=1)
    s = awkward(dtype)
    x, y = np.concatenate([x, np.repeat(s, len(s))]), np.concatenate([y, np.tile(s, len(s))])
    got = launch(mod, f"binary<{CTYPE[dtype]}>", op_index(ARITH, name, form), [as_tensor(x, dtype), as_tensor(y, dtype)])
    assert_same(got, ARITH[name][1](dtype, x, y), name, zero_sign=not header_zeros)


BINARY2 = {**ARITH2, **BOOL2}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,form", with_forms(list(ARITH2)))
def test_binary_2wide(mod, dtype, name, form):
    x, y = operands(dtype, 2, 4096, seed=2)
    got = launch(mod, f"binary2<{CTYPE2[dtype]}>", op_index(BINARY2, name, form),
                 [as_tensor(x, dtype), as_tensor(y, dtype)], width=2)
    assert_same(got, ARITH2[name][1](dtype, x, y), name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,form", with_forms(list(BOOL2)))
def test_both_lanes_compare(mod, dtype, name, form):
    x, y = operands(dtype, 2, 4096, seed=3)
    y[::3] = x[::3]                                    # some pairs equal in both lanes
    y[1::2][::5] = x[1::2][::5]
    got = launch(mod, f"binary2<{CTYPE2[dtype]}>", op_index(BINARY2, name, form),
                 [as_tensor(x, dtype), as_tensor(y, dtype)], width=2)
    lane = ARITH[name.replace("hb", "h")[:-1]][1](dtype, x, y).reshape(-1, 2)
    assert_same(got, np.repeat(lane.min(axis=1), 2), name)


def fma_operands(dtype, seed):
    """Random triples, awkward triples, and triples where rounding a*b+c twice (through fp32)
    gives another answer than rounding it once."""
    x, y, z = operands(dtype, 3, 4096, seed)
    s = awkward(dtype)[:16]
    g = np.random.default_rng(seed)
    a, b = (torch.from_numpy(g.uniform(1, 2, 200000)).to(dtype).double().numpy() for _ in range(2))
    man = FORMATS[dtype][0]
    c = torch.from_numpy(g.choice([-1, 1], 200000) * np.exp2(g.integers(-2 * man - 12, -man - 2, 200000))
                         ).to(dtype).double().numpy()
    twice = round_to((a * b + c).astype(np.float32).astype(np.float64), dtype)
    trap = twice != exact_fma(a, b, c, dtype)
    assert trap.any()
    return [np.concatenate(p) for p in ((x, np.repeat(s, 256), a[trap]),
                                        (y, np.tile(np.repeat(s, 16), 16), b[trap]),
                                        (z, np.tile(s, 256), c[trap]))]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(FMA))
def test_fused_multiply_add(mod, dtype, name):
    x, y, z = fma_operands(dtype, seed=4)
    got = launch(mod, f"ternary<{CTYPE[dtype]}>", list(FMA).index(name), [as_tensor(v, dtype) for v in (x, y, z)])
    assert_same(got, FMA[name][1](dtype, x, y, z), name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(FMA2) + ["hcmadd"])
def test_fused_multiply_add_2wide(mod, dtype, name):
    x, y, z = (v[: len(v) // 2 * 2] for v in fma_operands(dtype, seed=5))
    got = launch(mod, f"ternary2<{CTYPE2[dtype]}>", (list(FMA2) + ["hcmadd"]).index(name),
                 [as_tensor(v, dtype) for v in (x, y, z)], width=2)
    if name == "hcmadd":   # (re, im) lanes: re = (c.re + a.re b.re) - a.im b.im, im = (c.im + a.re b.im) + a.im b.re
        (ar, ai), (br, bi), (cr, ci) = (v.reshape(-1, 2).T for v in (x, y, z))
        re = exact_fma(-ai, bi, exact_fma(ar, br, cr, dtype), dtype)
        im = exact_fma(ai, br, exact_fma(ar, bi, ci, dtype), dtype)
        want = np.stack([re, im], axis=1).ravel()
    else:
        want = FMA2[name][1](dtype, x, y, z)
    assert_same(got, want, name)


def _to_int_ref(x, kind, mode):
    """Saturating conversion as stored through long long; NaN gives 0, or 0x8000000000000000
    for the 64-bit types."""
    info = np.iinfo(INTS[kind])
    r = _integral(mode)(x)
    with np.errstate(invalid="ignore"):
        low, high = r <= float(info.min), r >= float(info.max)
        inside = np.where(np.isnan(r) | low | high, 0.0, r)
    wide = np.uint64 if info.min == 0 else np.int64
    out = inside.astype(wide)
    out = np.where(low, wide(info.min), np.where(high, wide(info.max), out))
    nan = (np.uint64(1 << 63) if info.min == 0 else np.int64(-(1 << 63))) if info.bits == 64 else wide(0)
    out = np.where(np.isnan(r), nan, out)
    return torch.from_numpy(out.astype(wide).view(np.int64).copy())


CONVERSION_FORMS = [pytest.param(m, "name", id=m) for m in MODES] + \
    [pytest.param(m, "fallback", id=f"{m}-fallback") for m in MODES]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode,form", CONVERSION_FORMS)
@pytest.mark.parametrize("kind", list(INTS))
def test_to_integer(mod, dtype, kind, mode, form):
    x = every_value(dtype)
    op = list(INTS).index(kind) * len(MODES) + MODES.index(mode) + (len(INTS) * len(MODES) if form == "fallback" else 0)
    got = launch(mod, f"to_int_{PREFIX[dtype]}", op, [as_tensor(x, dtype)], out_dtype=torch.int64)
    want = _to_int_ref(x, kind, mode)
    assert torch.equal(got, want), f"{kind}_{mode}: {(got != want).sum()} differ"


def round_int(x, dtype, mode):
    """The integer ``x`` rounded once to ``dtype``, in exact integer arithmetic."""
    man, exp = FORMATS[dtype]
    a = abs(x)
    shift = max(a.bit_length() - (man + 1), 0)
    q, r = divmod(a, 1 << shift)
    half = (1 << shift) >> 1
    up = {"rn": shift > 0 and (r > half or (r == half and q % 2 == 1)), "rz": False,
          "rd": x < 0 and r > 0, "ru": x > 0 and r > 0}[mode]
    v = float((q + up) << shift)
    big = torch.finfo(dtype).max
    if v > big:
        to_inf = mode == "rn" or (mode == "ru" and x > 0) or (mode == "rd" and x < 0)
        v = np.inf if to_inf else big
    return -v if x < 0 else v


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode,form", CONVERSION_FORMS)
@pytest.mark.parametrize("kind", list(INTS))
def test_from_integer(mod, dtype, kind, mode, form):
    info = np.iinfo(INTS[kind])
    g = np.random.default_rng(6)
    v = [int(info.min), int(info.max), 0, 1, -1, 255, 257, 2049, 2051, 4097, 65504, 65519, 65520,
         65536, 2 ** 24 + 1, 2 ** 53 + 1, 2 ** 60 + 2 ** 52 + 1, 2 ** 63 - 2 ** 40]
    v += [int(x) for x in g.integers(-2 ** 20, 2 ** 20, 2000)]
    v += [int(x) >> int(s) for x, s in zip(g.integers(-2 ** 62, 2 ** 62, 2000), g.integers(0, 62, 2000))]
    v = [x for x in v if info.min <= x <= info.max]
    stored = torch.tensor([x - (1 << 64) if x >= 1 << 63 else x for x in v], dtype=torch.int64)
    op = list(INTS).index(kind) * len(MODES) + MODES.index(mode) + (len(INTS) * len(MODES) if form == "fallback" else 0)
    got = launch(mod, f"from_int_{PREFIX[dtype]}", op, [stored])
    assert_same(got, [round_int(x, dtype, mode) for x in v], f"{kind}2{PREFIX[dtype]}_{mode}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode,form", CONVERSION_FORMS)
def test_from_float(mod, dtype, mode, form):
    g = np.random.default_rng(7)
    with np.errstate(over="ignore"):
        f = (g.standard_normal(20000) * np.exp2(g.uniform(-140, 130, 20000))).astype(np.float32)
    edges = np.concatenate([awkward(dtype), awkward(dtype) * (1 + 2.0 ** -20), awkward(dtype) * (1 - 2.0 ** -20),
                            [65519.996, 65520.0, 3.4e38, 1e-8, -1e-8, 2.0 ** -25, 2.0 ** -24 * 1.5]])
    f = np.concatenate([f, edges.astype(np.float32)])
    op = MODES.index(mode) + (len(MODES) if form == "fallback" else 0)
    got = launch(mod, f"from_float_{PREFIX[dtype]}", op, [torch.from_numpy(f)])
    want = round_to(f.astype(np.float64), dtype, mode)
    assert_same(got, want, f"__float2{PREFIX[dtype]}_{mode}")
    if mode == "rn":
        assert_same(got, torch.from_numpy(f).to(dtype).double().numpy(), "torch")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", ["name", "fallback"])
def test_lanes_floats_and_bits(mod, dtype, form):
    x, y = (v[:4096] for v in operands(dtype, 2, 4096, seed=9))
    xt, yt = as_tensor(x, dtype), as_tensor(y, dtype)
    n = len(x) // 2
    out = torch.zeros(n * 22)
    mod.get_function(f"lanes_{PREFIX[dtype]}")((8,), (128,), (np.int32(form == "fallback"), xt, yt, out, np.int32(n)))
    ax, ay, bx, by = x[0::2], x[1::2], y[0::2], y[1::2]
    f32 = np.float32
    with np.errstate(all="ignore"):
        scaled = [round_to((bx.astype(f32) * f32(3.3)).astype(np.float64), dtype),
                  round_to((by.astype(f32) / f32(7.1)).astype(np.float64), dtype)]
    raw = xt.view(torch.int16).numpy().astype(np.uint16).astype(np.float64)
    want = np.stack([ax, ay, ax, by, ay, ay, ax, ax, ay, ay, ax, bx, ay, by, ay, ax, ax, ay,
                     *scaled, raw[0::2], ay], axis=1)
    assert_same(out.numpy(), want.ravel(), f"lanes ({form})")


def test_fallbacks_called_by_name_and_explicitly():
    """The host definitions are templates: `name(...)` finds them where the header declares
    nothing for the host, and `name<>(...)` names them explicitly."""
    src = r"""
#include <cuda_fp16.h>
__global__ void k(const __half* a, float* out) {
  out[0] = __half2float(__hfma(a[0], a[1], a[2]));
  out[1] = __half2float(__hfma<>(a[0], a[1], a[2]));
  out[2] = __half2float(hexp(a[0]));
  out[3] = (float)__half2int_rn(a[3]);
}
"""
    m = RawModule(code=src, name_expressions=("k",), name="fp16_overloads.cu")
    a = torch.tensor([1.5, 3.0, 0.25, 2.5], dtype=torch.float16)
    out = torch.zeros(4)
    m.get_function("k")((1,), (1,), (a, out))
    assert out.tolist() == [4.75, 4.75, float(round_to(np.exp(1.5), torch.float16)), 2.0]


def test_fp16_scalar_product(mod):
    """NVIDIA's fp16ScalarProduct idea, bit for bit: __hfma2 per thread, shuffle tree."""
    blocks, threads, per_thread = 2, 128, 6
    n = blocks * threads * per_thread
    g = torch.Generator().manual_seed(8)
    a = torch.rand(n, 2, generator=g).half()
    b = torch.rand(n, 2, generator=g).half()
    results = torch.zeros(blocks)
    mod.get_function("scalar_product")((blocks,), (threads,), (a, b, results, np.int32(n)))

    dtype = torch.float16
    acc = np.zeros((blocks * threads, 2))
    av, bv = a.double().numpy(), b.double().numpy()
    for k in range(per_thread):
        idx = np.arange(blocks * threads) + k * blocks * threads
        acc = exact_fma(av[idx], bv[idx], acc, dtype)
    acc = acc.reshape(blocks, threads // 32, 32, 2)

    def tree(v):             # __shfl_down_sync + __hadd2 over the last lane axis
        v = v.copy()
        for off in (16, 8, 4, 2, 1):
            shifted = np.concatenate([v[..., off:, :], v[..., -off:, :]], axis=-2)
            v = half_ops(dtype, torch.add, v, shifted)
        return v[..., 0, :]
    warps = tree(acc)                                              # [blocks, warps, 2]
    pad = np.zeros((blocks, 32 - warps.shape[1], 2))
    total = tree(np.concatenate([warps, pad], axis=1))             # [blocks, 2]
    want = (total[:, 0].astype(np.float32) + total[:, 1].astype(np.float32)).astype(np.float64)
    assert_same(results.double().numpy(), want, "scalar product")
    assert abs(results.sum().item() / (a.double() * b.double()).sum().item() - 1) < 1e-2
