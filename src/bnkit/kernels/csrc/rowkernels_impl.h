// bnkit: row-kernel bodies, included once per instruction set by
// rowkernels_{default,avx2,avx512}.cpp *after* every header (so that only
// these functions, all with internal linkage, get the ISA's target options).
// Requires BNKIT_ISA_FILL (the fill function's name) and BNKIT_ISA_NAME.
// No #include here on purpose.

namespace bnkit {
namespace {

constexpr int64_t kBlk = 1024; // values per lane accumulated in A before flushing to double

// Loads (T -> A) and stores (A -> T).  bfloat16 is converted with plain bit
// operations that vectorize (c10's own conversion has a NaN branch that
// blocks vectorization); rounding is to nearest-even, NaN stays NaN.
template <typename A, typename T>
inline A cv(T v) {
  return static_cast<A>(v);
}
template <>
inline float cv<float, c10::BFloat16>(c10::BFloat16 v) {
  const uint32_t u = static_cast<uint32_t>(v.x) << 16;
  float f;
  __builtin_memcpy(&f, &u, sizeof(f));
  return f;
}

// float16 is widened with branch-free bit operations too: c10's conversion
// has branches (subnormals, Inf/NaN) that keep GCC from vectorizing the loops,
// and a scalar loop sums each 1024-value block serially in float, which was
// ~40x less accurate than the vectorized (8- or 16-way) sums of float32 data.
// Exact for every half value (zero and subnormals renormalized by one
// subtraction, Inf/NaN kept).
template <>
inline float cv<float, c10::Half>(c10::Half v) {
  uint16_t bits;
  __builtin_memcpy(&bits, &v, sizeof(bits));
  const uint32_t h = bits;
  const uint32_t normal = ((h & 0x7FFFu) << 13) + 0x38000000u; // exponent rebiased by 127 - 15
  const uint32_t exponent = h & 0x7C00u;
  const uint32_t inf_nan = 0u - static_cast<uint32_t>(exponent == 0x7C00u);
  const uint32_t subnormal = 0u - static_cast<uint32_t>(exponent == 0u);
  const uint32_t n_bits = normal + (inf_nan & 0x38000000u); // Inf/NaN: exponent 255
  const uint32_t s_bits = normal + 0x00800000u;
  float sub;
  __builtin_memcpy(&sub, &s_bits, sizeof(sub));
  sub -= 6.103515625e-05f; // 2^-14: exact renormalization of zero and subnormals
  uint32_t sub_u;
  __builtin_memcpy(&sub_u, &sub, sizeof(sub_u));
  const uint32_t u = (n_bits & ~subnormal) | (sub_u & subnormal) | ((h & 0x8000u) << 16);
  float f;
  __builtin_memcpy(&f, &u, sizeof(f));
  return f;
}

template <typename T, typename A>
inline T st(A v) {
  return static_cast<T>(v);
}
template <>
inline c10::BFloat16 st<c10::BFloat16, float>(float v) {
  uint32_t u;
  __builtin_memcpy(&u, &v, sizeof(u));
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const uint16_t bits = (u & 0x7FFFFFFFu) > 0x7F800000u ? uint16_t(0x7FC0) : static_cast<uint16_t>(rounded);
  return c10::BFloat16(bits, c10::BFloat16::from_bits());
}

// NCHW "span" kernels: `nch` consecutive rows of n values (consecutive
// channels of one sample, contiguous in memory), with per-channel parameters
// and outputs indexed by the row.  One call covers many rows, memory is read
// in order (hardware prefetch friendly), and each row's partial sums are
// flushed to double.

// Rows shorter than this are reduced four at a time: the four rows' horizontal
// (end-of-row) reductions then overlap instead of running back to back, which
// is what limits short rows such as 7x7 maps.
constexpr int64_t kShortRow = 256;

template <typename T, typename A>
void k_moments(const T* __restrict p, int64_t nch, int64_t n, const A* __restrict K, double* s, double* q) {
  int64_t c0 = 0;
  if (n < kShortRow) {
    for (; c0 + 4 <= nch; c0 += 4) {
      const T* __restrict p0 = p + c0 * n;
      const T* __restrict p1 = p0 + n;
      const T* __restrict p2 = p1 + n;
      const T* __restrict p3 = p2 + n;
      const A k0 = K[c0], k1 = K[c0 + 1], k2 = K[c0 + 2], k3 = K[c0 + 3];
      A s0 = 0, s1 = 0, s2 = 0, s3 = 0, q0 = 0, q1 = 0, q2 = 0, q3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3, q0, q1, q2, q3)
      for (int64_t i = 0; i < n; ++i) {
        const A d0 = cv<A>(p0[i]) - k0, d1 = cv<A>(p1[i]) - k1, d2 = cv<A>(p2[i]) - k2, d3 = cv<A>(p3[i]) - k3;
        s0 += d0;
        s1 += d1;
        s2 += d2;
        s3 += d3;
        q0 += d0 * d0;
        q1 += d1 * d1;
        q2 += d2 * d2;
        q3 += d3 * d3;
      }
      s[c0] += s0;
      s[c0 + 1] += s1;
      s[c0 + 2] += s2;
      s[c0 + 3] += s3;
      q[c0] += q0;
      q[c0 + 1] += q1;
      q[c0 + 2] += q2;
      q[c0 + 3] += q3;
    }
  }
  for (int64_t c = c0; c < nch; ++c) {
    const T* __restrict pr = p + c * n;
    const A k = K[c];
    double ts = 0, tq = 0;
    for (int64_t i0 = 0; i0 < n; i0 += kBlk) {
      const int64_t i1 = (n - i0 < kBlk) ? n : i0 + kBlk;
      A bs = 0, bq = 0;
#pragma omp simd reduction(+ : bs, bq)
      for (int64_t i = i0; i < i1; ++i) {
        const A d = cv<A>(pr[i]) - k;
        bs += d;
        bq += d * d;
      }
      ts += bs;
      tq += bq;
    }
    s[c] += ts;
    q[c] += tq;
  }
}

template <typename T, typename A>
void k_bwd_sums(
    const T* __restrict g,
    const T* __restrict p,
    int64_t nch,
    int64_t n,
    const A* __restrict mhi,
    const A* __restrict mlo,
    double* sg,
    double* sx) {
  int64_t c0 = 0;
  if (n < kShortRow) {
    for (; c0 + 4 <= nch; c0 += 4) {
      const T* __restrict g0 = g + c0 * n;
      const T* __restrict g1 = g0 + n;
      const T* __restrict g2 = g1 + n;
      const T* __restrict g3 = g2 + n;
      const T* __restrict p0 = p + c0 * n;
      const T* __restrict p1 = p0 + n;
      const T* __restrict p2 = p1 + n;
      const T* __restrict p3 = p2 + n;
      const A h0 = mhi[c0], h1 = mhi[c0 + 1], h2 = mhi[c0 + 2], h3 = mhi[c0 + 3];
      const A l0 = mlo[c0], l1 = mlo[c0 + 1], l2 = mlo[c0 + 2], l3 = mlo[c0 + 3];
      A a0 = 0, a1 = 0, a2 = 0, a3 = 0, b0 = 0, b1 = 0, b2 = 0, b3 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3, b0, b1, b2, b3)
      for (int64_t i = 0; i < n; ++i) {
        const A e0 = cv<A>(g0[i]), e1 = cv<A>(g1[i]), e2 = cv<A>(g2[i]), e3 = cv<A>(g3[i]);
        a0 += e0;
        a1 += e1;
        a2 += e2;
        a3 += e3;
        b0 += e0 * ((cv<A>(p0[i]) - h0) - l0);
        b1 += e1 * ((cv<A>(p1[i]) - h1) - l1);
        b2 += e2 * ((cv<A>(p2[i]) - h2) - l2);
        b3 += e3 * ((cv<A>(p3[i]) - h3) - l3);
      }
      sg[c0] += a0;
      sg[c0 + 1] += a1;
      sg[c0 + 2] += a2;
      sg[c0 + 3] += a3;
      sx[c0] += b0;
      sx[c0 + 1] += b1;
      sx[c0 + 2] += b2;
      sx[c0 + 3] += b3;
    }
  }
  for (int64_t c = c0; c < nch; ++c) {
    const T* __restrict gr = g + c * n;
    const T* __restrict pr = p + c * n;
    const A h = mhi[c], l = mlo[c];
    double tg = 0, tx = 0;
    for (int64_t i0 = 0; i0 < n; i0 += kBlk) {
      const int64_t i1 = (n - i0 < kBlk) ? n : i0 + kBlk;
      A bg = 0, bx = 0;
#pragma omp simd reduction(+ : bg, bx)
      for (int64_t i = i0; i < i1; ++i) {
        const A gi = cv<A>(gr[i]);
        bg += gi;
        bx += gi * ((cv<A>(pr[i]) - h) - l);
      }
      tg += bg;
      tx += bx;
    }
    sg[c] += tg;
    sx[c] += tx;
  }
}

template <typename T, typename A>
void k_normalize(
    const T* __restrict p,
    T* __restrict o,
    int64_t nch,
    int64_t n,
    const A* __restrict mhi,
    const A* __restrict mlo,
    const A* __restrict sc,
    const A* __restrict sh) {
  for (int64_t c = 0; c < nch; ++c) {
    const T* __restrict pr = p + c * n;
    T* __restrict orow = o + c * n;
    const A h = mhi[c], l = mlo[c], a = sc[c], b = sh[c];
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) orow[i] = st<T>(((cv<A>(pr[i]) - h) - l) * a + b);
  }
}

template <typename T, typename A>
void k_scale_shift(
    const T* __restrict p,
    T* __restrict o,
    int64_t nch,
    int64_t n,
    const A* __restrict sc,
    const A* __restrict sh) {
  for (int64_t c = 0; c < nch; ++c) {
    const T* __restrict pr = p + c * n;
    T* __restrict orow = o + c * n;
    const A a = sc[c], b = sh[c];
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) orow[i] = st<T>(cv<A>(pr[i]) * a + b);
  }
}

template <typename T, typename A>
void k_bwd_apply(
    const T* __restrict g,
    const T* __restrict p,
    T* __restrict dx,
    int64_t nch,
    int64_t n,
    const A* __restrict mhi,
    const A* __restrict mlo,
    const A* __restrict k1,
    const A* __restrict k2,
    const A* __restrict k3) {
  for (int64_t c = 0; c < nch; ++c) {
    const T* __restrict gr = g + c * n;
    const T* __restrict pr = p + c * n;
    T* __restrict dr = dx + c * n;
    const A h = mhi[c], l = mlo[c], a1 = k1[c], a2 = k2[c], a3 = k3[c];
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dr[i] = st<T>(cv<A>(gr[i]) * a1 - ((cv<A>(pr[i]) - h) - l) * a2 - a3);
  }
}

template <typename T, typename A>
void k_eval_bwd(
    const T* __restrict g,
    const T* __restrict p,
    T* __restrict dx,
    int64_t nch,
    int64_t n,
    const A* __restrict sc,
    double* sg,
    double* sx) {
  for (int64_t c = 0; c < nch; ++c) {
    const T* __restrict gr = g + c * n;
    const T* __restrict pr = p + c * n;
    T* __restrict dr = dx + c * n;
    const A a = sc[c];
    double tg = 0, tx = 0;
    for (int64_t i0 = 0; i0 < n; i0 += kBlk) {
      const int64_t i1 = (n - i0 < kBlk) ? n : i0 + kBlk;
      A bg = 0, bx = 0;
#pragma omp simd reduction(+ : bg, bx)
      for (int64_t i = i0; i < i1; ++i) {
        const A gi = cv<A>(gr[i]);
        bg += gi;
        bx += gi * cv<A>(pr[i]);
        dr[i] = st<T>(gi * a);
      }
      tg += bg;
      tx += bx;
    }
    sg[c] += tg;
    sx[c] += tx;
  }
}

// ------------------------------------------------------------ channels-last
// Rows of C contiguous values; loops run along C.  Rows are processed four
// (reductions) or two (element-wise) at a time so that the per-channel
// accumulators and parameters are loaded/stored once per group of rows.

template <typename T, typename A>
void k_cl_moments(const T* __restrict x, int64_t rows, int64_t C, const A* __restrict K, A* __restrict sa, A* __restrict sb) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    const T* __restrict x0 = x + r * C;
    const T* __restrict x1 = x0 + C;
    const T* __restrict x2 = x1 + C;
    const T* __restrict x3 = x2 + C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const A k = K[c];
      const A d0 = cv<A>(x0[c]) - k, d1 = cv<A>(x1[c]) - k, d2 = cv<A>(x2[c]) - k, d3 = cv<A>(x3[c]) - k;
      sa[c] += (d0 + d1) + (d2 + d3);
      sb[c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3);
    }
  }
  for (; r < rows; ++r) {
    const T* __restrict xr = x + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const A d = cv<A>(xr[c]) - K[c];
      sa[c] += d;
      sb[c] += d * d;
    }
  }
}

template <typename T, typename A>
void k_cl_bwd_sums(
    const T* __restrict g,
    const T* __restrict x,
    int64_t rows,
    int64_t C,
    const A* __restrict mhi,
    const A* __restrict mlo,
    A* __restrict sa,
    A* __restrict sb) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    const T* __restrict g0 = g + r * C;
    const T* __restrict g1 = g0 + C;
    const T* __restrict g2 = g1 + C;
    const T* __restrict g3 = g2 + C;
    const T* __restrict x0 = x + r * C;
    const T* __restrict x1 = x0 + C;
    const T* __restrict x2 = x1 + C;
    const T* __restrict x3 = x2 + C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const A h = mhi[c], l = mlo[c];
      const A a0 = cv<A>(g0[c]), a1 = cv<A>(g1[c]), a2 = cv<A>(g2[c]), a3 = cv<A>(g3[c]);
      sa[c] += (a0 + a1) + (a2 + a3);
      sb[c] += (a0 * ((cv<A>(x0[c]) - h) - l) + a1 * ((cv<A>(x1[c]) - h) - l)) +
          (a2 * ((cv<A>(x2[c]) - h) - l) + a3 * ((cv<A>(x3[c]) - h) - l));
    }
  }
  for (; r < rows; ++r) {
    const T* __restrict gr = g + r * C;
    const T* __restrict xr = x + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const A gc = cv<A>(gr[c]);
      sa[c] += gc;
      sb[c] += gc * ((cv<A>(xr[c]) - mhi[c]) - mlo[c]);
    }
  }
}

// Channels-last element-wise loops take two rows per iteration only for rows
// of fewer than 128 channels.  With two rows the loop has four streams (two
// loaded, two stored), and whenever a store stream and a later load sit at
// nearby offsets modulo 4 KB, the loads wait on the stores (4K aliasing): on
// the Zen 4 VM, 6 MB of 256-channel rows written through the cache took up to
// 0.91 ms on one core at a bad output-input offset against 0.20 ms at most
// others, which made a 6 MB channels-last eval 0.13 ms in one process and
// 0.6 ms in another.
// One row per iteration has fewer bad offsets and is as fast or faster from
// 128 channels up (median over all 64 offsets modulo 4 KB: 194 against 290 us
// at 256 channels, 91 against 122 us at 2048); below that the pair of short
// rows is 6-15% faster.
constexpr int64_t kPairRowsBelowC = 128;

template <typename T, typename A>
void k_cl_normalize(
    const T* __restrict x,
    T* __restrict y,
    int64_t rows,
    int64_t C,
    const A* __restrict mhi,
    const A* __restrict mlo,
    const A* __restrict sc,
    const A* __restrict sh) {
  int64_t r = 0;
  for (; C < kPairRowsBelowC && r + 2 <= rows; r += 2) {
    const T* __restrict x0 = x + r * C;
    const T* __restrict x1 = x0 + C;
    T* __restrict y0 = y + r * C;
    T* __restrict y1 = y0 + C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const A h = mhi[c], l = mlo[c], a = sc[c], b = sh[c];
      y0[c] = st<T>(((cv<A>(x0[c]) - h) - l) * a + b);
      y1[c] = st<T>(((cv<A>(x1[c]) - h) - l) * a + b);
    }
  }
  for (; r < rows; ++r) {
    const T* __restrict xr = x + r * C;
    T* __restrict yr = y + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) yr[c] = st<T>(((cv<A>(xr[c]) - mhi[c]) - mlo[c]) * sc[c] + sh[c]);
  }
}

template <typename T, typename A>
void k_cl_scale_shift(
    const T* __restrict x,
    T* __restrict y,
    int64_t rows,
    int64_t C,
    const A* __restrict sc,
    const A* __restrict sh) {
  int64_t r = 0;
  for (; C < kPairRowsBelowC && r + 2 <= rows; r += 2) {
    const T* __restrict x0 = x + r * C;
    const T* __restrict x1 = x0 + C;
    T* __restrict y0 = y + r * C;
    T* __restrict y1 = y0 + C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const A a = sc[c], b = sh[c];
      y0[c] = st<T>(cv<A>(x0[c]) * a + b);
      y1[c] = st<T>(cv<A>(x1[c]) * a + b);
    }
  }
  for (; r < rows; ++r) {
    const T* __restrict xr = x + r * C;
    T* __restrict yr = y + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) yr[c] = st<T>(cv<A>(xr[c]) * sc[c] + sh[c]);
  }
}

template <typename T, typename A>
void k_cl_bwd_apply(
    const T* __restrict g,
    const T* __restrict x,
    T* __restrict dx,
    int64_t rows,
    int64_t C,
    const A* __restrict mhi,
    const A* __restrict mlo,
    const A* __restrict k1,
    const A* __restrict k2,
    const A* __restrict k3) {
  int64_t r = 0;
  for (; C < kPairRowsBelowC && r + 2 <= rows; r += 2) {
    const T* __restrict g0 = g + r * C;
    const T* __restrict g1 = g0 + C;
    const T* __restrict x0 = x + r * C;
    const T* __restrict x1 = x0 + C;
    T* __restrict d0 = dx + r * C;
    T* __restrict d1 = d0 + C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const A h = mhi[c], l = mlo[c], a1 = k1[c], a2 = k2[c], a3 = k3[c];
      d0[c] = st<T>(cv<A>(g0[c]) * a1 - ((cv<A>(x0[c]) - h) - l) * a2 - a3);
      d1[c] = st<T>(cv<A>(g1[c]) * a1 - ((cv<A>(x1[c]) - h) - l) * a2 - a3);
    }
  }
  for (; r < rows; ++r) {
    const T* __restrict gr = g + r * C;
    const T* __restrict xr = x + r * C;
    T* __restrict dr = dx + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c)
      dr[c] = st<T>(cv<A>(gr[c]) * k1[c] - ((cv<A>(xr[c]) - mhi[c]) - mlo[c]) * k2[c] - k3[c]);
  }
}

template <typename T, typename A>
void k_cl_eval_bwd(
    const T* __restrict g,
    const T* __restrict x,
    T* __restrict dx,
    int64_t rows,
    int64_t C,
    const A* __restrict sc,
    A* __restrict sa,
    A* __restrict sb) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* __restrict gr = g + r * C;
    const T* __restrict xr = x + r * C;
    T* __restrict dr = dx + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const A gc = cv<A>(gr[c]);
      sa[c] += gc;
      sb[c] += gc * cv<A>(xr[c]);
      dr[c] = st<T>(gc * sc[c]);
    }
  }
}

// -------------------------------------------------- non-temporal stores
// Large outputs are written around the caches: no read-for-ownership of the
// destination lines, so the normalization pass moves 2 bytes per output byte
// instead of 3 (a clone() does the same).

template <typename T>
inline void fill_nt(RowKernels<T>& k) {
  k.cl_normalize_nt = nullptr;
  k.cl_bwd_apply_nt = nullptr;
  k.span_normalize_nt = nullptr;
  k.span_bwd_apply_nt = nullptr;
}

#if defined(BNKIT_ISA_AVX512) || defined(BNKIT_ISA_AVX2)
// The streaming kernels are written over the widest float vector of the
// instruction set: 16 floats (AVX-512) or 8 (AVX2 + FMA).
struct Vec {
#ifdef BNKIT_ISA_AVX512
  using R = __m512;
  static constexpr int kWidth = 16;
  static R load(const float* p) { return _mm512_loadu_ps(p); }
  static R set1(float v) { return _mm512_set1_ps(v); }
  static R sub(R a, R b) { return _mm512_sub_ps(a, b); }
  static R fmadd(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); } // a*b + c
  static R fmsub(R a, R b, R c) { return _mm512_fmsub_ps(a, b, c); } // a*b - c
  static R fnmadd(R a, R b, R c) { return _mm512_fnmadd_ps(a, b, c); } // c - a*b
  static void stream(float* p, R v) { _mm512_stream_ps(p, v); }
#else
  using R = __m256;
  static constexpr int kWidth = 8;
  static R load(const float* p) { return _mm256_loadu_ps(p); }
  static R set1(float v) { return _mm256_set1_ps(v); }
  static R sub(R a, R b) { return _mm256_sub_ps(a, b); }
  static R fmadd(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  static R fmsub(R a, R b, R c) { return _mm256_fmsub_ps(a, b, c); }
  static R fnmadd(R a, R b, R c) { return _mm256_fnmadd_ps(a, b, c); }
  static void stream(float* p, R v) { _mm256_stream_ps(p, v); }
#endif
};

#endif

#ifdef BNKIT_ISA_AVX512
// (Not on AVX2: there, same-process A/B runs on the EPYC VM made NCHW spans
// whose length is not a whole number of cache lines up to 1.4x slower
// streamed, e.g. 32x256x14x14 training forward and backward.)
// o[i] = scalar(i) for i < n, written as a scalar head up to a vector-aligned
// o, a body of vectors vec(i) with streaming stores, and a scalar tail.
template <typename S, typename V>
inline void stream_row(float* o, int64_t n, const S& scalar, const V& vec) {
  constexpr int64_t W = Vec::kWidth;
  int64_t i = 0;
  const int64_t mis = static_cast<int64_t>((reinterpret_cast<uintptr_t>(o) & (W * sizeof(float) - 1)) / sizeof(float));
  const int64_t head = mis == 0 ? 0 : std::min<int64_t>(n, W - mis);
  for (; i < head; ++i) o[i] = scalar(i);
  for (; i + W <= n; i += W) Vec::stream(o + i, vec(i));
  for (; i < n; ++i) o[i] = scalar(i);
}

void k_span_normalize_nt(
    const float* __restrict p,
    float* __restrict o,
    int64_t nch,
    int64_t n,
    const float* __restrict mhi,
    const float* __restrict mlo,
    const float* __restrict sc,
    const float* __restrict sh) {
  for (int64_t c = 0; c < nch; ++c) {
    const float* pr = p + c * n;
    const float hs = mhi[c], ls = mlo[c], as = sc[c], bs = sh[c];
    const Vec::R h = Vec::set1(hs), l = Vec::set1(ls), a = Vec::set1(as), b = Vec::set1(bs);
    stream_row(
        o + c * n,
        n,
        [&](int64_t i) { return ((pr[i] - hs) - ls) * as + bs; },
        [&](int64_t i) { return Vec::fmadd(Vec::sub(Vec::sub(Vec::load(pr + i), h), l), a, b); });
  }
  _mm_sfence();
}
void k_span_bwd_apply_nt(
    const float* __restrict g,
    const float* __restrict p,
    float* __restrict dx,
    int64_t nch,
    int64_t n,
    const float* __restrict mhi,
    const float* __restrict mlo,
    const float* __restrict k1,
    const float* __restrict k2,
    const float* __restrict k3) {
  for (int64_t c = 0; c < nch; ++c) {
    const float* gr = g + c * n;
    const float* pr = p + c * n;
    const float hs = mhi[c], ls = mlo[c], a1s = k1[c], a2s = k2[c], a3s = k3[c];
    const Vec::R h = Vec::set1(hs), l = Vec::set1(ls), a1 = Vec::set1(a1s), a2 = Vec::set1(a2s), a3 = Vec::set1(a3s);
    stream_row(
        dx + c * n,
        n,
        [&](int64_t i) { return gr[i] * a1s - ((pr[i] - hs) - ls) * a2s - a3s; },
        [&](int64_t i) {
          const Vec::R xc = Vec::sub(Vec::sub(Vec::load(pr + i), h), l);
          return Vec::fnmadd(xc, a2, Vec::fmsub(Vec::load(gr + i), a1, a3));
        });
  }
  _mm_sfence();
}
#endif

#ifdef BNKIT_ISA_AVX512
// Channels-last reductions with the per-channel accumulators in registers:
// chunks of up to 4 vectors (64 channels, the last one masked), the rows of
// the block walked inside each chunk.  (The portable loops keep the
// accumulators in memory: a load and a store per vector per group of rows.)
// 16 values as float: loads/stores of float32 or bfloat16 (bfloat16: exact
// widening; narrowing rounds to nearest-even, NaN stays NaN, as st<> does).
inline __m512 ldv(const float* p, __mmask16 m) {
  return _mm512_maskz_loadu_ps(m, p);
}
inline __m512 ldv(const c10::BFloat16* p, __mmask16 m) {
  const __m256i raw = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline __m256i to_bf16(__m512 v) {
#ifdef BNKIT_ISA_AVX512BF16
  // One instruction: round to nearest-even, NaN stays NaN (denormals flush to
  // zero, below bfloat16's resolution of any BN output).
  return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
#else
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7FFFFFFF)), _mm512_set1_epi32(0x7F800000));
  r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
#endif
}
inline void stv(float* p, __mmask16 m, __m512 v) {
  _mm512_mask_storeu_ps(p, m, v);
}
inline void stv(c10::BFloat16* p, __mmask16 m, __m512 v) {
  _mm256_mask_storeu_epi16(p, m, to_bf16(v));
}
inline void stv_nt(float* p, __m512 v) {
  _mm512_stream_ps(p, v);
}
inline void stv_nt(c10::BFloat16* p, __m512 v) {
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p), to_bf16(v));
}

inline __mmask16 tail_mask(int64_t rem) {
  return rem >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << rem) - 1u);
}

// Calls fn(std::integral_constant<int, V>(), c0, lm) for each chunk of up to 64
// channels of a C-channel row: V = 1..4 vectors (a compile-time count, so that
// the chunk kernels keep their accumulators or parameters in registers), lm
// the mask of the chunk's last vector.
template <typename F>
inline void for_chunks(int64_t C, const F& fn) {
  for (int64_t c0 = 0; c0 < C; c0 += 64) {
    const int64_t left = C - c0;
    const int nv = static_cast<int>(std::min<int64_t>(4, (left + 15) / 16));
    const __mmask16 lm = tail_mask(left - 16 * (nv - 1));
    switch (nv) {
      case 4: fn(std::integral_constant<int, 4>(), c0, lm); break;
      case 3: fn(std::integral_constant<int, 3>(), c0, lm); break;
      case 2: fn(std::integral_constant<int, 2>(), c0, lm); break;
      default: fn(std::integral_constant<int, 1>(), c0, lm); break;
    }
  }
}

template <int V, typename T>
inline void cl_moments_chunk(const T* x, int64_t rows, int64_t C, const float* K, float* sa, float* sb, __mmask16 lm) {
  __m512 k[V], s[V], q[V];
  _Pragma("GCC unroll 4") for (int v = 0; v < V; ++v) {
    const __mmask16 m = v == V - 1 ? lm : __mmask16(0xFFFF);
    k[v] = _mm512_maskz_loadu_ps(m, K + 16 * v);
    s[v] = _mm512_maskz_loadu_ps(m, sa + 16 * v);
    q[v] = _mm512_maskz_loadu_ps(m, sb + 16 * v);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * C;
    _Pragma("GCC unroll 4") for (int v = 0; v < V; ++v) {
      const __mmask16 m = v == V - 1 ? lm : __mmask16(0xFFFF);
      const __m512 d = _mm512_sub_ps(ldv(xr + 16 * v, m), k[v]);
      s[v] = _mm512_add_ps(s[v], d);
      q[v] = _mm512_fmadd_ps(d, d, q[v]);
    }
  }
  _Pragma("GCC unroll 4") for (int v = 0; v < V; ++v) {
    const __mmask16 m = v == V - 1 ? lm : __mmask16(0xFFFF);
    _mm512_mask_storeu_ps(sa + 16 * v, m, s[v]);
    _mm512_mask_storeu_ps(sb + 16 * v, m, q[v]);
  }
}

// Rows per sub-block, walked once per 64-channel chunk: about
// tuning().sub_floats values (32 KB by default, a core's L1d) for the forward
// kernels, tuning().sub_floats_grad values over the two inputs of the
// backward kernels (256 KB, within a core's L2).  Measured with same-process
// A/B runs on the channels-last and (N, C) benchmark shapes: the forward and
// eval passes 3-8% faster with 32 KB than with 16 KB and up to 12% faster
// than with 256 KB blocks; the backward 5-8% faster with 256 KB than 16 KB.
inline int64_t sub_rows(int64_t C) {
  const int64_t floats = tuning().sub_floats.load(std::memory_order_relaxed);
  return std::max<int64_t>(4, floats / std::max<int64_t>(1, C));
}
inline int64_t sub_rows_grad(int64_t C) {
  const int64_t floats = tuning().sub_floats_grad.load(std::memory_order_relaxed);
  return std::max<int64_t>(4, floats / 2 / std::max<int64_t>(1, C));
}

template <typename T>
void k_cl_moments_reg(const T* __restrict x, int64_t rows, int64_t C, const float* __restrict K, float* __restrict sa, float* __restrict sb) {
  const int64_t sr = sub_rows(C);
  if (rows > sr) {
    for (int64_t r0 = 0; r0 < rows; r0 += sr) k_cl_moments_reg(x + r0 * C, std::min(sr, rows - r0), C, K, sa, sb);
    return;
  }
  for_chunks(C, [&](auto v, int64_t c0, __mmask16 lm) {
    cl_moments_chunk<decltype(v)::value>(x + c0, rows, C, K + c0, sa + c0, sb + c0, lm);
  });
}

template <int V, typename T>
inline void cl_bwd_sums_chunk(
    const T* g,
    const T* x,
    int64_t rows,
    int64_t C,
    const float* mhi,
    const float* mlo,
    float* sa,
    float* sb,
    __mmask16 lm) {
  __m512 h[V], l[V], s[V], q[V];
  _Pragma("GCC unroll 4") for (int v = 0; v < V; ++v) {
    const __mmask16 m = v == V - 1 ? lm : __mmask16(0xFFFF);
    h[v] = _mm512_maskz_loadu_ps(m, mhi + 16 * v);
    l[v] = _mm512_maskz_loadu_ps(m, mlo + 16 * v);
    s[v] = _mm512_maskz_loadu_ps(m, sa + 16 * v);
    q[v] = _mm512_maskz_loadu_ps(m, sb + 16 * v);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const T* gr = g + r * C;
    const T* xr = x + r * C;
    _Pragma("GCC unroll 4") for (int v = 0; v < V; ++v) {
      const __mmask16 m = v == V - 1 ? lm : __mmask16(0xFFFF);
      const __m512 gv = ldv(gr + 16 * v, m);
      const __m512 xc = _mm512_sub_ps(_mm512_sub_ps(ldv(xr + 16 * v, m), h[v]), l[v]);
      s[v] = _mm512_add_ps(s[v], gv);
      q[v] = _mm512_fmadd_ps(gv, xc, q[v]);
    }
  }
  _Pragma("GCC unroll 4") for (int v = 0; v < V; ++v) {
    const __mmask16 m = v == V - 1 ? lm : __mmask16(0xFFFF);
    _mm512_mask_storeu_ps(sa + 16 * v, m, s[v]);
    _mm512_mask_storeu_ps(sb + 16 * v, m, q[v]);
  }
}

template <typename T>
void k_cl_bwd_sums_reg(
    const T* __restrict g,
    const T* __restrict x,
    int64_t rows,
    int64_t C,
    const float* __restrict mhi,
    const float* __restrict mlo,
    float* __restrict sa,
    float* __restrict sb) {
  const int64_t sr = sub_rows_grad(C);
  if (rows > sr) {
    for (int64_t r0 = 0; r0 < rows; r0 += sr)
      k_cl_bwd_sums_reg(g + r0 * C, x + r0 * C, std::min(sr, rows - r0), C, mhi, mlo, sa, sb);
    return;
  }
  for_chunks(C, [&](auto v, int64_t c0, __mmask16 lm) {
    cl_bwd_sums_chunk<decltype(v)::value>(g + c0, x + c0, rows, C, mhi + c0, mlo + c0, sa + c0, sb + c0, lm);
  });
}

template <int V, bool NT, typename T>
inline void cl_normalize_chunk(
    const T* x,
    T* y,
    int64_t rows,
    int64_t C,
    const float* mhi,
    const float* mlo,
    const float* sc,
    const float* sh,
    __mmask16 lm) {
  __m512 h[V], l[V], a[V], b[V];
  _Pragma("GCC unroll 4") for (int v = 0; v < V; ++v) {
    const __mmask16 m = v == V - 1 ? lm : __mmask16(0xFFFF);
    h[v] = _mm512_maskz_loadu_ps(m, mhi + 16 * v);
    l[v] = _mm512_maskz_loadu_ps(m, mlo + 16 * v);
    a[v] = _mm512_maskz_loadu_ps(m, sc + 16 * v);
    b[v] = _mm512_maskz_loadu_ps(m, sh + 16 * v);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * C;
    T* yr = y + r * C;
    _Pragma("GCC unroll 4") for (int v = 0; v < V; ++v) {
      const __mmask16 m = v == V - 1 ? lm : __mmask16(0xFFFF);
      const __m512 o = _mm512_fmadd_ps(_mm512_sub_ps(_mm512_sub_ps(ldv(xr + 16 * v, m), h[v]), l[v]), a[v], b[v]);
      if (NT)
        stv_nt(yr + 16 * v, o); // NT: C % 16 == 0, rows aligned (checked by the caller)
      else
        stv(yr + 16 * v, m, o);
    }
  }
}

template <bool NT, typename T>
void k_cl_normalize_reg(
    const T* __restrict x,
    T* __restrict y,
    int64_t rows,
    int64_t C,
    const float* __restrict mhi,
    const float* __restrict mlo,
    const float* __restrict sc,
    const float* __restrict sh) {
  const int64_t sr = sub_rows(C);
  for (int64_t r0 = 0; r0 < rows; r0 += sr) {
    const int64_t nr = std::min(sr, rows - r0);
    const T* xb = x + r0 * C;
    T* yb = y + r0 * C;
    for_chunks(C, [&](auto v, int64_t c0, __mmask16 lm) {
      cl_normalize_chunk<decltype(v)::value, NT>(xb + c0, yb + c0, nr, C, mhi + c0, mlo + c0, sc + c0, sh + c0, lm);
    });
  }
  if (NT) _mm_sfence();
}

// dx = g*k1 - ((x - h) - l)*k2 - k3 with the parameters in registers.
template <int V, bool NT, typename T>
inline void cl_bwd_apply_chunk(
    const T* g,
    const T* x,
    T* dx,
    int64_t rows,
    int64_t C,
    const float* mhi,
    const float* mlo,
    const float* k1,
    const float* k2,
    const float* k3,
    __mmask16 lm) {
  __m512 h[V], l[V], a1[V], a2[V], a3[V];
  _Pragma("GCC unroll 4") for (int v = 0; v < V; ++v) {
    const __mmask16 m = v == V - 1 ? lm : __mmask16(0xFFFF);
    h[v] = _mm512_maskz_loadu_ps(m, mhi + 16 * v);
    l[v] = _mm512_maskz_loadu_ps(m, mlo + 16 * v);
    a1[v] = _mm512_maskz_loadu_ps(m, k1 + 16 * v);
    a2[v] = _mm512_maskz_loadu_ps(m, k2 + 16 * v);
    a3[v] = _mm512_maskz_loadu_ps(m, k3 + 16 * v);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const T* gr = g + r * C;
    const T* xr = x + r * C;
    T* dr = dx + r * C;
    _Pragma("GCC unroll 4") for (int v = 0; v < V; ++v) {
      const __mmask16 m = v == V - 1 ? lm : __mmask16(0xFFFF);
      const __m512 xc = _mm512_sub_ps(_mm512_sub_ps(ldv(xr + 16 * v, m), h[v]), l[v]);
      const __m512 t = _mm512_fnmadd_ps(xc, a2[v], _mm512_mul_ps(ldv(gr + 16 * v, m), a1[v]));
      const __m512 o = _mm512_sub_ps(t, a3[v]);
      if (NT)
        stv_nt(dr + 16 * v, o);
      else
        stv(dr + 16 * v, m, o);
    }
  }
}

template <bool NT, typename T>
void k_cl_bwd_apply_reg(
    const T* __restrict g,
    const T* __restrict x,
    T* __restrict dx,
    int64_t rows,
    int64_t C,
    const float* __restrict mhi,
    const float* __restrict mlo,
    const float* __restrict k1,
    const float* __restrict k2,
    const float* __restrict k3) {
  if constexpr (NT && std::is_same_v<T, float>) {
    // float32 with streaming stores (outputs of 3 MB or more): rows longer than one
    // 64-channel chunk are walked in memory order, one row at a time, instead of
    // chunk by chunk down a block of rows.  The chunk walk jumps a row (1 KB or
    // more) per step; with streaming stores it slowed down at some input/output
    // offsets.  In one process, sliding the input over 32 offsets: 6272x256
    // median 546 -> 466 us (worst 970 -> 630), 3136x512 367 -> 361 us (worst
    // 2315 -> 480); the module backward on 32x256x14x14 channels-last was 6-9%
    // faster in two shuffled A/B rounds.  Through the cache and for bfloat16 the
    // chunk walk stays (10-20% faster there).  Same arithmetic in the same order.
    if (C > 64) {
      for (int64_t r = 0; r < rows; ++r) {
        const float* gr = g + r * C;
        const float* xr = x + r * C;
        float* dr = dx + r * C;
        for (int64_t c = 0; c < C; c += 16) { // C % 16 == 0 for streaming stores (checked by the caller)
          const __m512 xc = _mm512_sub_ps(_mm512_sub_ps(_mm512_loadu_ps(xr + c), _mm512_loadu_ps(mhi + c)), _mm512_loadu_ps(mlo + c));
          const __m512 t =
              _mm512_fnmadd_ps(xc, _mm512_loadu_ps(k2 + c), _mm512_mul_ps(_mm512_loadu_ps(gr + c), _mm512_loadu_ps(k1 + c)));
          stv_nt(dr + c, _mm512_sub_ps(t, _mm512_loadu_ps(k3 + c)));
        }
      }
      _mm_sfence();
      return;
    }
  }
  const int64_t sr = sub_rows_grad(C);
  for (int64_t r0 = 0; r0 < rows; r0 += sr) {
    const int64_t nr = std::min(sr, rows - r0);
    const int64_t o = r0 * C;
    for_chunks(C, [&](auto v, int64_t c0, __mmask16 lm) {
      cl_bwd_apply_chunk<decltype(v)::value, NT>(
          g + o + c0, x + o + c0, dx + o + c0, nr, C, mhi + c0, mlo + c0, k1 + c0, k2 + c0, k3 + c0, lm);
    });
  }
  if (NT) _mm_sfence();
}

// NCHW spans of short rows (n < kShortRow, e.g. 7x7 or 14x14 maps): one
// vector accumulator per row, four rows at a time, and one transposing
// horizontal sum per four rows.  (The portable loops' `omp simd` reductions end
// each row with sixteen dependent scalar additions, which cost more than the
// row itself when n is 49.)

// Calls fn(std::integral_constant<int, R>(), c) for the rows c..c+R-1 of nch
// rows, four at a time (R = 4), then the last one to three.
template <typename F>
inline void for_row_quads(int64_t nch, const F& fn) {
  int64_t c = 0;
  for (; c + 4 <= nch; c += 4) fn(std::integral_constant<int, 4>(), c);
  switch (nch - c) {
    case 3: fn(std::integral_constant<int, 3>(), c); break;
    case 2: fn(std::integral_constant<int, 2>(), c); break;
    case 1: fn(std::integral_constant<int, 1>(), c); break;
    default: break;
  }
}

// [sum(v0), sum(v1), sum(v2), sum(v3)].
inline __m128 hsum4(__m512 v0, __m512 v1, __m512 v2, __m512 v3) {
  const __m256 a0 = _mm256_add_ps(_mm512_castps512_ps256(v0), _mm512_extractf32x8_ps(v0, 1));
  const __m256 a1 = _mm256_add_ps(_mm512_castps512_ps256(v1), _mm512_extractf32x8_ps(v1, 1));
  const __m256 a2 = _mm256_add_ps(_mm512_castps512_ps256(v2), _mm512_extractf32x8_ps(v2, 1));
  const __m256 a3 = _mm256_add_ps(_mm512_castps512_ps256(v3), _mm512_extractf32x8_ps(v3, 1));
  const __m256 c = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_add_ps(_mm256_castps256_ps128(c), _mm256_extractf128_ps(c, 1));
}

// Up to four rows r < R of n values starting at p (row stride n):
// s[r] += sum(p_r - K[r]), q[r] += sum((p_r - K[r])^2).
template <int R, typename T>
inline void moments_rows(const T* p, int64_t n, const float* K, double* s, double* q) {
  __m512 k[4], S[4], Q[4];
  for (int r = 0; r < 4; ++r) {
    k[r] = _mm512_set1_ps(r < R ? K[r] : 0.0f);
    S[r] = Q[r] = _mm512_setzero_ps();
  }
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    _Pragma("GCC unroll 4") for (int r = 0; r < R; ++r) {
      const __m512 d = _mm512_sub_ps(ldv(p + r * n + i, __mmask16(0xFFFF)), k[r]);
      S[r] = _mm512_add_ps(S[r], d);
      Q[r] = _mm512_fmadd_ps(d, d, Q[r]);
    }
  }
  if (i < n) {
    const __mmask16 m = tail_mask(n - i);
    _Pragma("GCC unroll 4") for (int r = 0; r < R; ++r) {
      const __m512 d = _mm512_maskz_sub_ps(m, ldv(p + r * n + i, m), k[r]);
      S[r] = _mm512_add_ps(S[r], d);
      Q[r] = _mm512_fmadd_ps(d, d, Q[r]);
    }
  }
  alignas(16) float ts[4], tq[4];
  _mm_store_ps(ts, hsum4(S[0], S[1], S[2], S[3]));
  _mm_store_ps(tq, hsum4(Q[0], Q[1], Q[2], Q[3]));
  for (int r = 0; r < R; ++r) {
    s[r] += ts[r];
    q[r] += tq[r];
  }
}

template <typename T>
void k_moments_avx512(const T* __restrict p, int64_t nch, int64_t n, const float* __restrict K, double* s, double* q) {
  if (n >= kShortRow) return k_moments<T, float>(p, nch, n, K, s, q);
  for_row_quads(nch, [&](auto r, int64_t c) { moments_rows<decltype(r)::value>(p + c * n, n, K + c, s + c, q + c); });
}

// sg[r] += sum(g_r), sx[r] += sum(g_r * ((p_r - mhi[r]) - mlo[r])) for up to four rows.
template <int R, typename T>
inline void bwd_sums_rows(
    const T* g,
    const T* p,
    int64_t n,
    const float* mhi,
    const float* mlo,
    double* sg,
    double* sx) {
  __m512 h[4], l[4], G[4], X[4];
  for (int r = 0; r < 4; ++r) {
    h[r] = _mm512_set1_ps(r < R ? mhi[r] : 0.0f);
    l[r] = _mm512_set1_ps(r < R ? mlo[r] : 0.0f);
    G[r] = X[r] = _mm512_setzero_ps();
  }
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    _Pragma("GCC unroll 4") for (int r = 0; r < R; ++r) {
      const __m512 gv = ldv(g + r * n + i, __mmask16(0xFFFF));
      const __m512 xc = _mm512_sub_ps(_mm512_sub_ps(ldv(p + r * n + i, __mmask16(0xFFFF)), h[r]), l[r]);
      G[r] = _mm512_add_ps(G[r], gv);
      X[r] = _mm512_fmadd_ps(gv, xc, X[r]);
    }
  }
  if (i < n) {
    const __mmask16 m = tail_mask(n - i);
    _Pragma("GCC unroll 4") for (int r = 0; r < R; ++r) {
      const __m512 gv = ldv(g + r * n + i, m);
      const __m512 xc = _mm512_maskz_sub_ps(m, _mm512_sub_ps(ldv(p + r * n + i, m), h[r]), l[r]);
      G[r] = _mm512_add_ps(G[r], gv);
      X[r] = _mm512_fmadd_ps(gv, xc, X[r]);
    }
  }
  alignas(16) float tg[4], tx[4];
  _mm_store_ps(tg, hsum4(G[0], G[1], G[2], G[3]));
  _mm_store_ps(tx, hsum4(X[0], X[1], X[2], X[3]));
  for (int r = 0; r < R; ++r) {
    sg[r] += tg[r];
    sx[r] += tx[r];
  }
}

template <typename T>
void k_bwd_sums_avx512(
    const T* __restrict g,
    const T* __restrict p,
    int64_t nch,
    int64_t n,
    const float* __restrict mhi,
    const float* __restrict mlo,
    double* sg,
    double* sx) {
  if (n >= kShortRow) return k_bwd_sums<T, float>(g, p, nch, n, mhi, mlo, sg, sx);
  for_row_quads(nch, [&](auto r, int64_t c) {
    bwd_sums_rows<decltype(r)::value>(g + c * n, p + c * n, n, mhi + c, mlo + c, sg + c, sx + c);
  });
}

template <>
inline void fill_nt<float>(RowKernels<float>& k) {
  k.moments = &k_moments_avx512<float>;
  k.bwd_sums = &k_bwd_sums_avx512<float>;
  k.cl_bwd_apply = &k_cl_bwd_apply_reg<false, float>;
  // cl_normalize stays the portable row-by-row loop: through the cache it was
  // up to 9% faster than the register-chunk kernel (same-process A/B, 0.8-1 MB
  // channels-last and (N, C)); the chunk kernel is kept for streaming stores.
  k.cl_moments = &k_cl_moments_reg<float>;
  k.cl_bwd_sums = &k_cl_bwd_sums_reg<float>;
  k.cl_normalize_nt = &k_cl_normalize_reg<true, float>;
  k.cl_bwd_apply_nt = &k_cl_bwd_apply_reg<true, float>;
  k.span_normalize_nt = &k_span_normalize_nt;
  k.span_bwd_apply_nt = &k_span_bwd_apply_nt;
}
template <>
inline void fill_nt<c10::BFloat16>(RowKernels<c10::BFloat16>& k) {
  using B = c10::BFloat16;
  k.moments = &k_moments_avx512<B>;
  k.bwd_sums = &k_bwd_sums_avx512<B>;
  k.cl_moments = &k_cl_moments_reg<B>;
  k.cl_bwd_sums = &k_cl_bwd_sums_reg<B>;
  k.cl_normalize = &k_cl_normalize_reg<false, B>;
  k.cl_bwd_apply = &k_cl_bwd_apply_reg<false, B>;
  k.cl_normalize_nt = &k_cl_normalize_reg<true, B>;
  k.cl_bwd_apply_nt = &k_cl_bwd_apply_reg<true, B>;
  k.span_normalize_nt = nullptr;
  k.span_bwd_apply_nt = nullptr;
}
#endif

#ifdef BNKIT_ISA_AVX2
// ------------------------------------ AVX2 channels-last streaming stores
// (AVX-512 has register-chunk kernels for these, above.)  Without them the
// channels-last outputs on AVX2 were always written through the cache: each
// output line is first read (read-for-ownership), so a training forward
// larger than the caches moved 4 bytes per output byte where 3 suffice.
// Rows of C % 16 == 0 values, y/dx 64-byte aligned (cl_nt_ok).
void k_cl_normalize_nt_avx2(
    const float* __restrict x,
    float* __restrict y,
    int64_t rows,
    int64_t C,
    const float* __restrict mhi,
    const float* __restrict mlo,
    const float* __restrict sc,
    const float* __restrict sh) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * C;
    float* yr = y + r * C;
    for (int64_t c = 0; c < C; c += Vec::kWidth) {
      const Vec::R xc = Vec::sub(Vec::sub(Vec::load(xr + c), Vec::load(mhi + c)), Vec::load(mlo + c));
      Vec::stream(yr + c, Vec::fmadd(xc, Vec::load(sc + c), Vec::load(sh + c)));
    }
  }
  _mm_sfence();
}

void k_cl_bwd_apply_nt_avx2(
    const float* __restrict g,
    const float* __restrict x,
    float* __restrict dx,
    int64_t rows,
    int64_t C,
    const float* __restrict mhi,
    const float* __restrict mlo,
    const float* __restrict k1,
    const float* __restrict k2,
    const float* __restrict k3) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* gr = g + r * C;
    const float* xr = x + r * C;
    float* dr = dx + r * C;
    for (int64_t c = 0; c < C; c += Vec::kWidth) {
      const Vec::R xc = Vec::sub(Vec::sub(Vec::load(xr + c), Vec::load(mhi + c)), Vec::load(mlo + c));
      Vec::stream(dr + c, Vec::fnmadd(xc, Vec::load(k2 + c), Vec::fmsub(Vec::load(gr + c), Vec::load(k1 + c), Vec::load(k3 + c))));
    }
  }
  _mm_sfence();
}

template <typename T>
inline void fill_avx2(RowKernels<T>&) {}
template <>
inline void fill_avx2<float>(RowKernels<float>& k) {
  k.cl_normalize_nt = &k_cl_normalize_nt_avx2;
  k.cl_bwd_apply_nt = &k_cl_bwd_apply_nt_avx2;
}
#endif

#include "rowkernels_act.h" // BN + clamp kernels (in this namespace, for this instruction set)

template <typename T>
void fill_one(RowKernels<T>& k) {
  using A = typename AccT<T>::type;
  k.moments = &k_moments<T, A>;
  k.bwd_sums = &k_bwd_sums<T, A>;
  k.normalize = &k_normalize<T, A>;
  k.scale_shift = &k_scale_shift<T, A>;
  k.bwd_apply = &k_bwd_apply<T, A>;
  k.eval_bwd = &k_eval_bwd<T, A>;
  k.cl_moments = &k_cl_moments<T, A>;
  k.cl_bwd_sums = &k_cl_bwd_sums<T, A>;
  k.cl_normalize = &k_cl_normalize<T, A>;
  k.cl_scale_shift = &k_cl_scale_shift<T, A>;
  k.cl_bwd_apply = &k_cl_bwd_apply<T, A>;
  k.cl_eval_bwd = &k_cl_eval_bwd<T, A>;
  fill_nt<T>(k);
  fill_act<T>(k);
#ifdef BNKIT_ISA_AVX2
  fill_avx2<T>(k);
#endif
}

} // namespace

bool BNKIT_ISA_FILL(RowKernelSet& set) {
#ifndef BNKIT_ISA_BF16_ONLY
  fill_one(set.f32);
  fill_one(set.f64);
  fill_one(set.f16);
#endif
  fill_one(set.bf16);
  set.isa = BNKIT_ISA_NAME;
  return true;
}

} // namespace bnkit
