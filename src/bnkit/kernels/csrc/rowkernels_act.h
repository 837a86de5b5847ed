// bnkit: the row kernels of BN fused with its activation (ReLU, ReLU6,
// Hardtanh, Hardswish, SiLU; FusedAct and ActKind in rowkernels.h).  Part of
// rowkernels_impl.h, included there inside its namespace, so compiled once
// per instruction set like the rest: no #include here on purpose.
//
// The forward and the backward compute the pre-activation with one function
// (act_pre), from the same per-channel values, so that the backward's mask is
// the forward's clamp exactly.  Each kernel is a template over the activation
// (ActClamp, ActHardswish, ActSilu), one instance per ActKind.  The fused
// backward reads g and x twice and writes dx once, as the plain BN backward
// does: the activation's own forward (a read and a write of y) and backward
// (g and y read, a gradient written) are gone.

// The centred value and the pre-activation from it, as BN's output would be
// stored in T (torch applies the activation to that).
template <typename A>
inline A act_xc(A v, A h, A l) {
  return (v - h) - l;
}
template <typename T, typename A>
inline A act_pre(A xc, A a, A b) {
  return cv<A>(st<T>(xc * a + b));
}

// e^x without a libm call, so that the loops vectorize: Cody-Waite range
// reduction and a degree-6 polynomial (Cephes' expf, relative error about
// 1e-7); x clamped to [lo, hi] (layer.cpp gives SiLU [-87.3, 88.3]: e^x
// stays a normal float); NaN stays NaN.  The bounds arrive as run-time
// values: as compile-time constants GCC makes the clamp a branch, which keeps
// the loop scalar.
inline float act_exp(float x, float lo, float hi) {
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  // k = round(x / ln 2): adding and removing 1.5 * 2^23 rounds to an integer (vectorizes, unlike floorf)
  const float k = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (x - k * 0.693359375f) - k * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = (p * r) * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  return e * scale;
}
inline double act_exp(double x, double, double) {
  return __builtin_exp(x);
}

// The activations (ActKind): value(v) and the gradient g * act'(v), torch's
// formulas and rules at the boundaries.
struct ActClamp { // ReLU, ReLU6, Hardtanh; a NaN bound compares false: no bound
  template <typename A>
  static A value(A v, A lo, A hi) {
    v = v < lo ? lo : v;
    return v > hi ? hi : v;
  }
  template <typename A>
  static A grad(A g, A v, A lo, A hi) {
    return (v <= lo || v >= hi) ? A(0) : g;
  }
};
// g where c holds, else +0, with bit operations: GCC keeps a loop scalar
// when a select picks between two computed values under -ftrapping-math (it
// sinks the arithmetic into a branch), not when an integer mask does.
inline float keep_if(bool c, float g) {
  uint32_t b;
  __builtin_memcpy(&b, &g, sizeof(b));
  b &= 0u - static_cast<uint32_t>(c);
  __builtin_memcpy(&g, &b, sizeof(b));
  return g;
}
inline double keep_if(bool c, double g) {
  uint64_t b;
  __builtin_memcpy(&b, &g, sizeof(b));
  b &= uint64_t(0) - static_cast<uint64_t>(c);
  __builtin_memcpy(&g, &b, sizeof(b));
  return g;
}

struct ActHardswish { // v * clamp(v + 3, 0, 6) / 6; (lo, hi) = (-3, 3), given at run time (act_exp says why)
  template <typename A>
  static A value(A v, A lo, A hi) {
    A t = v < lo ? lo : v;
    t = t > hi ? hi : t;
    return v * (t + A(3)) / A(6);
  }
  // torch's rule: 0 below -3, g * (v / 3 + 1/2) up to 3, g above (a NaN v, in a channel whose
  // statistics are NaN anyway, gives NaN)
  template <typename A>
  static A grad(A g, A v, A lo, A hi) {
    const A t = v > hi ? hi : v;
    const A mid = keep_if(!(v > hi), g * (t / A(3) + A(0.5)));
    return keep_if(!(v < lo), keep_if(v > hi, g) + mid);
  }
};
struct ActSilu { // v * sigmoid(v); d/dv = s * (1 + v * (1 - s)); (lo, hi): act_exp's range
  template <typename A>
  static A value(A v, A lo, A hi) {
    return v / (A(1) + act_exp(-v, lo, hi));
  }
  template <typename A>
  static A grad(A g, A v, A lo, A hi) {
    const A s = A(1) / (A(1) + act_exp(-v, lo, hi));
    return g * s * (A(1) + v * (A(1) - s));
  }
};

template <typename F, typename T, typename A>
void k_normalize_act(const T* __restrict p, T* __restrict o, int64_t nch, int64_t n, const FusedAct<A>& ca) {
  const A lo = ca.lo, hi = ca.hi;
  for (int64_t c = 0; c < nch; ++c) {
    const T* __restrict pr = p + c * n;
    T* __restrict orow = o + c * n;
    const A h = ca.mhi[c], l = ca.mlo[c], a = ca.sc[c], b = ca.sh[c];
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) orow[i] = st<T>(F::value(act_pre<T>(act_xc(cv<A>(pr[i]), h, l), a, b), lo, hi));
  }
}

template <typename F, typename T, typename A>
void k_bwd_sums_act(
    const T* __restrict g, const T* __restrict p, int64_t nch, int64_t n, const FusedAct<A>& ca, double* sg,
    double* sx) {
  const A lo = ca.lo, hi = ca.hi;
  int64_t c0 = 0;
  if (n < kShortRow) { // two rows at a time: their end-of-row reductions overlap
    for (; c0 + 2 <= nch; c0 += 2) {
      const T* __restrict g0 = g + c0 * n;
      const T* __restrict g1 = g0 + n;
      const T* __restrict p0 = p + c0 * n;
      const T* __restrict p1 = p0 + n;
      const A h0 = ca.mhi[c0], l0 = ca.mlo[c0], a0 = ca.sc[c0], b0 = ca.sh[c0];
      const A h1 = ca.mhi[c0 + 1], l1 = ca.mlo[c0 + 1], a1 = ca.sc[c0 + 1], b1 = ca.sh[c0 + 1];
      A s0 = 0, s1 = 0, q0 = 0, q1 = 0;
#pragma omp simd reduction(+ : s0, s1, q0, q1)
      for (int64_t i = 0; i < n; ++i) {
        const A x0 = act_xc(cv<A>(p0[i]), h0, l0), x1 = act_xc(cv<A>(p1[i]), h1, l1);
        const A e0 = F::grad(cv<A>(g0[i]), act_pre<T>(x0, a0, b0), lo, hi);
        const A e1 = F::grad(cv<A>(g1[i]), act_pre<T>(x1, a1, b1), lo, hi);
        s0 += e0;
        s1 += e1;
        q0 += e0 * x0;
        q1 += e1 * x1;
      }
      sg[c0] += s0;
      sg[c0 + 1] += s1;
      sx[c0] += q0;
      sx[c0 + 1] += q1;
    }
  }
  for (int64_t c = c0; c < nch; ++c) {
    const T* __restrict gr = g + c * n;
    const T* __restrict pr = p + c * n;
    const A h = ca.mhi[c], l = ca.mlo[c], a = ca.sc[c], b = ca.sh[c];
    double tg = 0, tx = 0;
    for (int64_t i0 = 0; i0 < n; i0 += kBlk) {
      const int64_t i1 = (n - i0 < kBlk) ? n : i0 + kBlk;
      A bg = 0, bx = 0;
#pragma omp simd reduction(+ : bg, bx)
      for (int64_t i = i0; i < i1; ++i) {
        const A xc = act_xc(cv<A>(pr[i]), h, l);
        const A gi = F::grad(cv<A>(gr[i]), act_pre<T>(xc, a, b), lo, hi);
        bg += gi;
        bx += gi * xc;
      }
      tg += bg;
      tx += bx;
    }
    sg[c] += tg;
    sx[c] += tx;
  }
}

template <typename F, typename T, typename A>
void k_bwd_apply_act(
    const T* __restrict g, const T* __restrict p, T* __restrict dx, int64_t nch, int64_t n, const FusedAct<A>& ca,
    const A* __restrict k1, const A* __restrict k2, const A* __restrict k3) {
  const A lo = ca.lo, hi = ca.hi;
  for (int64_t c = 0; c < nch; ++c) {
    const T* __restrict gr = g + c * n;
    const T* __restrict pr = p + c * n;
    T* __restrict dr = dx + c * n;
    const A h = ca.mhi[c], l = ca.mlo[c], a = ca.sc[c], b = ca.sh[c], a1 = k1[c], a2 = k2[c], a3 = k3[c];
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const A xc = act_xc(cv<A>(pr[i]), h, l);
      const A gi = F::grad(cv<A>(gr[i]), act_pre<T>(xc, a, b), lo, hi);
      dr[i] = st<T>(gi * a1 - xc * a2 - a3);
    }
  }
}

// Channels-last: rows of C values, the loops along C.
template <typename F, typename T, typename A>
void k_cl_normalize_act(const T* __restrict x, T* __restrict y, int64_t rows, int64_t C, const FusedAct<A>& ca) {
  const A* __restrict mhi = ca.mhi;
  const A* __restrict mlo = ca.mlo;
  const A* __restrict sc = ca.sc;
  const A* __restrict sh = ca.sh;
  const A lo = ca.lo, hi = ca.hi;
  for (int64_t r = 0; r < rows; ++r) {
    const T* __restrict xr = x + r * C;
    T* __restrict yr = y + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c)
      yr[c] = st<T>(F::value(act_pre<T>(act_xc(cv<A>(xr[c]), mhi[c], mlo[c]), sc[c], sh[c]), lo, hi));
  }
}

template <typename F, typename T, typename A>
void k_cl_bwd_sums_act(
    const T* __restrict g, const T* __restrict x, int64_t rows, int64_t C, const FusedAct<A>& ca, A* __restrict sa,
    A* __restrict sb) {
  const A* __restrict mhi = ca.mhi;
  const A* __restrict mlo = ca.mlo;
  const A* __restrict sc = ca.sc;
  const A* __restrict sh = ca.sh;
  const A lo = ca.lo, hi = ca.hi;
  int64_t r = 0;
  for (; r + 2 <= rows; r += 2) { // two rows per load and store of the accumulators
    const T* __restrict g0 = g + r * C;
    const T* __restrict g1 = g0 + C;
    const T* __restrict x0 = x + r * C;
    const T* __restrict x1 = x0 + C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const A h = mhi[c], l = mlo[c], a = sc[c], b = sh[c];
      const A xc0 = act_xc(cv<A>(x0[c]), h, l), xc1 = act_xc(cv<A>(x1[c]), h, l);
      const A e0 = F::grad(cv<A>(g0[c]), act_pre<T>(xc0, a, b), lo, hi);
      const A e1 = F::grad(cv<A>(g1[c]), act_pre<T>(xc1, a, b), lo, hi);
      sa[c] += e0 + e1;
      sb[c] += e0 * xc0 + e1 * xc1;
    }
  }
  for (; r < rows; ++r) {
    const T* __restrict gr = g + r * C;
    const T* __restrict xr = x + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const A xc = act_xc(cv<A>(xr[c]), mhi[c], mlo[c]);
      const A e = F::grad(cv<A>(gr[c]), act_pre<T>(xc, sc[c], sh[c]), lo, hi);
      sa[c] += e;
      sb[c] += e * xc;
    }
  }
}

template <typename F, typename T, typename A>
void k_cl_bwd_apply_act(
    const T* __restrict g, const T* __restrict x, T* __restrict dx, int64_t rows, int64_t C, const FusedAct<A>& ca,
    const A* __restrict k1, const A* __restrict k2, const A* __restrict k3) {
  const A* __restrict mhi = ca.mhi;
  const A* __restrict mlo = ca.mlo;
  const A* __restrict sc = ca.sc;
  const A* __restrict sh = ca.sh;
  const A lo = ca.lo, hi = ca.hi;
  for (int64_t r = 0; r < rows; ++r) {
    const T* __restrict gr = g + r * C;
    const T* __restrict xr = x + r * C;
    T* __restrict dr = dx + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const A xc = act_xc(cv<A>(xr[c]), mhi[c], mlo[c]);
      const A e = F::grad(cv<A>(gr[c]), act_pre<T>(xc, sc[c], sh[c]), lo, hi);
      dr[c] = st<T>(e * k1[c] - xc * k2[c] - k3[c]);
    }
  }
}

// BN alone (the eval-mode backward's slot kActKinds): the gradient passes.
struct ActNone {
  template <typename A>
  static A grad(A g, A, A, A) {
    return g;
  }
};

// The eval-mode backward in one pass (RowKernels::infer_bwd): pre from the
// inference forward's FusedAct, the sums centred on the running mean; dx
// written only with WriteDx (the kernels below pick the instance once per call).
template <bool WriteDx, typename F, typename T, typename A>
void infer_bwd_spans(
    const T* __restrict g, const T* __restrict p, T* __restrict dx, int64_t nch, int64_t n, const FusedAct<A>& ca,
    const A* __restrict mh, const A* __restrict ml, double* sg, double* sx) {
  const A lo = ca.lo, hi = ca.hi;
  for (int64_t c = 0; c < nch; ++c) {
    const T* __restrict gr = g + c * n;
    const T* __restrict pr = p + c * n;
    T* __restrict dr = WriteDx ? dx + c * n : nullptr;
    const A h = ca.mhi[c], l = ca.mlo[c], a = ca.sc[c], b = ca.sh[c], m1 = mh[c], m2 = ml[c];
    double tg = 0, tx = 0;
    for (int64_t i0 = 0; i0 < n; i0 += kBlk) {
      const int64_t i1 = (n - i0 < kBlk) ? n : i0 + kBlk;
      A bg = 0, bx = 0;
#pragma omp simd reduction(+ : bg, bx)
      for (int64_t i = i0; i < i1; ++i) {
        const A v = cv<A>(pr[i]);
        const A e = F::grad(cv<A>(gr[i]), act_pre<T>(act_xc(v, h, l), a, b), lo, hi);
        bg += e;
        bx += e * act_xc(v, m1, m2);
        if constexpr (WriteDx) dr[i] = st<T>(e * a);
      }
      tg += bg;
      tx += bx;
    }
    sg[c] += tg;
    sx[c] += tx;
  }
}

template <typename F, typename T, typename A>
void k_infer_bwd(
    const T* g, const T* p, T* dx, int64_t nch, int64_t n, const FusedAct<A>& ca, const A* mh, const A* ml,
    double* sg, double* sx) {
  if (dx != nullptr)
    infer_bwd_spans<true, F>(g, p, dx, nch, n, ca, mh, ml, sg, sx);
  else
    infer_bwd_spans<false, F>(g, p, dx, nch, n, ca, mh, ml, sg, sx);
}

template <bool WriteDx, typename F, typename T, typename A>
void infer_bwd_rows(
    const T* __restrict g, const T* __restrict x, T* __restrict dx, int64_t rows, int64_t C, const FusedAct<A>& ca,
    const A* __restrict mh, const A* __restrict ml, A* __restrict sa, A* __restrict sb) {
  const A* __restrict mhi = ca.mhi;
  const A* __restrict mlo = ca.mlo;
  const A* __restrict sc = ca.sc;
  const A* __restrict sh = ca.sh;
  const A lo = ca.lo, hi = ca.hi;
  for (int64_t r = 0; r < rows; ++r) {
    const T* __restrict gr = g + r * C;
    const T* __restrict xr = x + r * C;
    T* __restrict dr = WriteDx ? dx + r * C : nullptr;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const A v = cv<A>(xr[c]);
      const A e = F::grad(cv<A>(gr[c]), act_pre<T>(act_xc(v, mhi[c], mlo[c]), sc[c], sh[c]), lo, hi);
      sa[c] += e;
      sb[c] += e * act_xc(v, mh[c], ml[c]);
      if constexpr (WriteDx) dr[c] = st<T>(e * sc[c]);
    }
  }
}

template <typename F, typename T, typename A>
void k_cl_infer_bwd(
    const T* g, const T* x, T* dx, int64_t rows, int64_t C, const FusedAct<A>& ca, const A* mh, const A* ml, A* sa,
    A* sb) {
  if (dx != nullptr)
    infer_bwd_rows<true, F>(g, x, dx, rows, C, ca, mh, ml, sa, sb);
  else
    infer_bwd_rows<false, F>(g, x, dx, rows, C, ca, mh, ml, sa, sb);
}

template <typename F, typename T>
void fill_act_kind(RowKernels<T>& k, int kind) {
  using A = typename AccT<T>::type;
  k.normalize_act[kind] = &k_normalize_act<F, T, A>;
  k.cl_normalize_act[kind] = &k_cl_normalize_act<F, T, A>;
  k.bwd_sums_act[kind] = &k_bwd_sums_act<F, T, A>;
  k.cl_bwd_sums_act[kind] = &k_cl_bwd_sums_act<F, T, A>;
  k.bwd_apply_act[kind] = &k_bwd_apply_act<F, T, A>;
  k.cl_bwd_apply_act[kind] = &k_cl_bwd_apply_act<F, T, A>;
  k.infer_bwd[kind] = &k_infer_bwd<F, T, A>;
  k.cl_infer_bwd[kind] = &k_cl_infer_bwd<F, T, A>;
}

template <typename T>
void fill_act(RowKernels<T>& k) {
  fill_act_kind<ActClamp>(k, kActClamp);
  fill_act_kind<ActHardswish>(k, kActHardswish);
  fill_act_kind<ActSilu>(k, kActSilu);
  using A = typename AccT<T>::type;
  k.infer_bwd[kActKinds] = &k_infer_bwd<ActNone, T, A>;
  k.cl_infer_bwd[kActKinds] = &k_cl_infer_bwd<ActNone, T, A>;
}
