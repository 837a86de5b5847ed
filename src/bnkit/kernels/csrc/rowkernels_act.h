// bnkit: the row kernels of BN fused with a clamp (ReLU, ReLU6, Hardtanh;
// ClampAct in rowkernels.h).  Part of rowkernels_impl.h, included there
// inside its namespace, so compiled once per instruction set like the rest:
// no #include here on purpose.
//
// The forward and the backward compute the pre-activation with one function
// (act_pre), from the same per-channel values, so that the backward's mask is
// the forward's clamp exactly.  The fused backward reads g and x twice and
// writes dx once, as the plain BN backward does: the activation's own forward
// (a read and a write of y) and backward (g and y read, a gradient written)
// are gone.

// The centred value and the pre-activation from it.
template <typename A>
inline A act_xc(A v, A h, A l) {
  return (v - h) - l;
}
template <typename A>
inline A act_pre(A xc, A a, A b) {
  return xc * a + b;
}
// clamp(v, lo, hi); a NaN bound compares false: no bound; a NaN v stays NaN.
template <typename A>
inline A act_clamp(A v, A lo, A hi) {
  v = v < lo ? lo : v;
  return v > hi ? hi : v;
}
// g where the clamp passes its input through (torch's backward rule), else 0;
// the rule is applied to the pre-activation as stored in T, as torch applies
// it to BN's bfloat16/float16 output (a value that rounds onto a bound stops).
template <typename T, typename A>
inline A act_gate(A g, A pre, A lo, A hi) {
  const A v = cv<A>(st<T>(pre));
  return (v <= lo || v >= hi) ? A(0) : g;
}

template <typename T, typename A>
void k_normalize_act(const T* __restrict p, T* __restrict o, int64_t nch, int64_t n, const ClampAct<A>& ca) {
  const A lo = ca.lo, hi = ca.hi;
  for (int64_t c = 0; c < nch; ++c) {
    const T* __restrict pr = p + c * n;
    T* __restrict orow = o + c * n;
    const A h = ca.mhi[c], l = ca.mlo[c], a = ca.sc[c], b = ca.sh[c];
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) orow[i] = st<T>(act_clamp(act_pre(act_xc(cv<A>(pr[i]), h, l), a, b), lo, hi));
  }
}

template <typename T, typename A>
void k_bwd_sums_act(
    const T* __restrict g, const T* __restrict p, int64_t nch, int64_t n, const ClampAct<A>& ca, double* sg,
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
        const A e0 = act_gate<T>(cv<A>(g0[i]), act_pre(x0, a0, b0), lo, hi);
        const A e1 = act_gate<T>(cv<A>(g1[i]), act_pre(x1, a1, b1), lo, hi);
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
        const A gi = act_gate<T>(cv<A>(gr[i]), act_pre(xc, a, b), lo, hi);
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

template <typename T, typename A>
void k_bwd_apply_act(
    const T* __restrict g, const T* __restrict p, T* __restrict dx, int64_t nch, int64_t n, const ClampAct<A>& ca,
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
      const A gi = act_gate<T>(cv<A>(gr[i]), act_pre(xc, a, b), lo, hi);
      dr[i] = st<T>(gi * a1 - xc * a2 - a3);
    }
  }
}

// Channels-last: rows of C values, the loops along C.
template <typename T, typename A>
void k_cl_normalize_act(const T* __restrict x, T* __restrict y, int64_t rows, int64_t C, const ClampAct<A>& ca) {
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
      yr[c] = st<T>(act_clamp(act_pre(act_xc(cv<A>(xr[c]), mhi[c], mlo[c]), sc[c], sh[c]), lo, hi));
  }
}

template <typename T, typename A>
void k_cl_bwd_sums_act(
    const T* __restrict g, const T* __restrict x, int64_t rows, int64_t C, const ClampAct<A>& ca, A* __restrict sa,
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
      const A e0 = act_gate<T>(cv<A>(g0[c]), act_pre(xc0, a, b), lo, hi);
      const A e1 = act_gate<T>(cv<A>(g1[c]), act_pre(xc1, a, b), lo, hi);
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
      const A e = act_gate<T>(cv<A>(gr[c]), act_pre(xc, sc[c], sh[c]), lo, hi);
      sa[c] += e;
      sb[c] += e * xc;
    }
  }
}

template <typename T, typename A>
void k_cl_bwd_apply_act(
    const T* __restrict g, const T* __restrict x, T* __restrict dx, int64_t rows, int64_t C, const ClampAct<A>& ca,
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
      const A e = act_gate<T>(cv<A>(gr[c]), act_pre(xc, sc[c], sh[c]), lo, hi);
      dr[c] = st<T>(e * k1[c] - xc * k2[c] - k3[c]);
    }
  }
}

template <typename T>
void fill_act(RowKernels<T>& k) {
  using A = typename AccT<T>::type;
  k.normalize_act = &k_normalize_act<T, A>;
  k.cl_normalize_act = &k_cl_normalize_act<T, A>;
  k.bwd_sums_act = &k_bwd_sums_act<T, A>;
  k.cl_bwd_sums_act = &k_cl_bwd_sums_act<T, A>;
  k.bwd_apply_act = &k_bwd_apply_act<T, A>;
  k.cl_bwd_apply_act = &k_cl_bwd_apply_act<T, A>;
}
