// epilogue_vec.h: the per-row tile math of the CPU path in array form, so that the compiler
// vectorizes it (one row of a tile at a time: masks as 0/1 arrays, a polynomial exp, selects
// instead of branches). Same semantics as the element functions of tile_math.h (sum_term,
// grad_coef, ...), which the CUDA kernels use and which the CPU runs instead when
// TILECL_CPU_SCALAR=1 (the tests run both). math.md 1.1, 1.2, 2.1, 2.2, 9.
#pragma once

#include <stdint.h>
#include <string.h>

#include "../tile_math.h"

namespace tilecl {
namespace cpu {

// exp for fp32: Cody-Waite reduction to r in [-ln2/2, ln2/2], degree-6 Taylor polynomial
// (relative error ~2e-7), scaled by 2^n through the exponent bits. x < -87.3 gives 0 (and so
// does -inf: masked terms), x > 88.37 gives inf, NaN stays NaN. Branch-free.
inline float vexp(float x) {
  const float hi = 88.3762626647949f, lo = -87.3365478515625f;
  float xc = x < lo ? lo : x;  // minps / maxps
  xc = xc > hi ? hi : xc;
  const float big = 12582912.f;  // 1.5 * 2^23: round to nearest integer
  const float n = (xc * 1.44269504088896341f + big) - big;
  const float r = (xc - n * 0.693145751953125f) - n * 1.42860682030941723212e-6f;
  const float p = 1.f + r * (1.f + r * (0.5f + r * (1.f / 6 + r * (1.f / 24 + r * (1.f / 120 + r * (1.f / 720))))));
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  memcpy(&scale, &bits, sizeof(scale));
  float v = p * scale;  // blends, not branches
  v = x < lo ? 0.f : v;
  v = x > hi ? __builtin_huge_valf() : v;
  return v;
}
inline double vexp(double x) { return exp(x); }  // float64 is the parity path: libm

// allowed (0/1) and positive (0/1, within allowed) for row i against columns [j0, j0 + bc)
template <int POS, typename T>
inline void row_masks(const Aux<T>& aux, int64_t i, int64_t j0, int64_t bc, T* ma, T* my) {
  const int64_t g0 = aux.col_offset + j0;
  for (int64_t c = 0; c < bc; ++c) ma[c] = T(1);
  if (aux.excl) {
    const int64_t e = aux.excl[i] - g0;
    if (e >= 0 && e < bc) ma[e] = T(0);
  }
  if (POS == POS_LABEL) {
    const int64_t lq = aux.labels_q[i];
    const int64_t* lk = aux.labels_k + j0;
    for (int64_t c = 0; c < bc; ++c) my[c] = lk[c] == lq ? ma[c] : T(0);
  } else {
    for (int64_t c = 0; c < bc; ++c) my[c] = T(0);
    if (POS == POS_INDEX) {
      const int64_t pc = aux.pos[i] - g0;
      if (pc >= 0 && pc < bc) my[pc] = ma[pc];
    }
  }
}

// z[c] = beta x[c] where accumulator k sees column c (mask, non-zero weight), -inf elsewhere
template <typename T>
inline void sum_logits(const Spec& s, int k, const T* x, const T* ma, const T* my, const T* w,
                       int64_t bc, T* z) {
  const T beta = static_cast<T>(s.beta[k]), ninf = neg_inf<T>();
  const int cols = s.cols[k];
  const bool weighted = s.weighted[k] && w;
#pragma omp simd
  for (int64_t c = 0; c < bc; ++c) {
    T sees = cols == COLS_ALL ? ma[c] : (cols == COLS_POS ? my[c] : ma[c] - my[c]);
    if (weighted) sees = w[c] > T(0) ? sees : T(0);
    z[c] = sees > T(0) ? beta * x[c] : ninf;
  }
}

// forward: merge the columns of one row into the running (m, l) of accumulator k (math.md 1.1)
template <typename T>
inline void fwd_row_sum(const Spec& s, int k, const T* x, const T* ma, const T* my, const T* w,
                        int64_t bc, T& m, T& l, T* z) {
  sum_logits(s, k, x, ma, my, w, bc, z);
  T tmax = neg_inf<T>();
#pragma omp simd reduction(max : tmax)
  for (int64_t c = 0; c < bc; ++c) tmax = z[c] > tmax ? z[c] : tmax;
  if (tmax == neg_inf<T>()) return;
  const T mnew = t_max(m, tmax), ref = lse_ref(mnew);
  T acc = T(0);
  if (s.weighted[k] && w) {
#pragma omp simd reduction(+ : acc)
    for (int64_t c = 0; c < bc; ++c) acc += w[c] * vexp(z[c] - ref);
  } else {
#pragma omp simd reduction(+ : acc)
    for (int64_t c = 0; c < bc; ++c) acc += vexp(z[c] - ref);
  }
  l = lse_rescale(l, m, mnew) + acc;
  m = mnew;
}

// forward: lin += sum Y x, cnt += sum Y, sig += sum_allowed softplus(x) - Y x  (math.md 4.1, 2.2)
template <typename T>
inline void fwd_row_linear(const Spec& s, const T* x, const T* ma, const T* my, int64_t bc, T& lin,
                           T& cnt, T& sig) {
  T a = T(0), b = T(0), g = T(0);
  for (int64_t c = 0; c < bc; ++c) {
    a += my[c] * x[c];
    b += my[c];
  }
  if (s.sigmoid)
    for (int64_t c = 0; c < bc; ++c)
      if (ma[c] > T(0)) g += softplus(x[c]) - my[c] * x[c];
  lin += a;
  cnt += b;
  sig += g;
}

// forward, column LSE: merge rows [0, br) of the tile (row stride ldx) into the running column
// (cm, cl) of columns [0, bc); ex[r] = the excluded local column of row r (or -1), set to -inf
// in x (the row sums are done with the tile). tmax, ref: [bc]
template <typename T>
inline void fwd_col_tile(T* x, int64_t ldx, int64_t br, int64_t bc, const int64_t* ex,
                         T* cm, T* cl, T* tmax, T* ref) {
  const T ninf = neg_inf<T>();
  for (int64_t c = 0; c < bc; ++c) tmax[c] = ninf;
  for (int64_t r = 0; r < br; ++r) {
    T* xr = x + r * ldx;
    if (ex[r] >= 0) xr[ex[r]] = ninf;  // the excluded column of row r leaves the column sums
#pragma omp simd
    for (int64_t c = 0; c < bc; ++c) tmax[c] = xr[c] > tmax[c] ? xr[c] : tmax[c];
  }
  for (int64_t c = 0; c < bc; ++c) {  // rescale the running sums to the new maxima
    const T mnew = t_max(cm[c], tmax[c]);
    cl[c] = tmax[c] == ninf ? cl[c] : lse_rescale(cl[c], cm[c], mnew);
    cm[c] = mnew;
    ref[c] = lse_ref(mnew);
  }
  for (int64_t r = 0; r < br; ++r) {
    const T* xr = x + r * ldx;
#pragma omp simd
    for (int64_t c = 0; c < bc; ++c) cl[c] += vexp(xr[c] - ref[c]);
  }
}

// backward: G[c] = dL/dx of row (math.md 1.2, 2.1, 2.2; grad_coef of tile_math.h in array form).
// lse_c / g_c: the safe column statistics of the tile's columns (null without column LSE).
template <typename T>
inline void bwd_row_grad(const Spec& s, const RowGrad<T>& rg, const T* x, const T* ma, const T* my,
                         const T* w, const T* lse_c, const T* g_c, int64_t bc, T* G, T* z) {
  for (int64_t c = 0; c < bc; ++c) G[c] = T(0);
  for (int k = 0; k < s.n_sums; ++k) {
    if (rg.g[k] == T(0)) continue;
    sum_logits(s, k, x, ma, my, w, bc, z);
    const T coef = rg.g[k] * static_cast<T>(s.beta[k]), lse = rg.lse[k];
    if (s.weighted[k] && w) {
#pragma omp simd
      for (int64_t c = 0; c < bc; ++c) G[c] += coef * w[c] * vexp(z[c] - lse);
    } else {
#pragma omp simd
      for (int64_t c = 0; c < bc; ++c) G[c] += coef * vexp(z[c] - lse);
    }
  }
  if (s.lin)
    for (int64_t c = 0; c < bc; ++c) G[c] += rg.g_lin * my[c];
  if (s.sigmoid)
    for (int64_t c = 0; c < bc; ++c)
      if (ma[c] > T(0)) G[c] += rg.g_sig * (sigmoid(x[c]) - my[c]);
  if (lse_c) {
    const T ninf = neg_inf<T>();
#pragma omp simd
    for (int64_t c = 0; c < bc; ++c) {
      const T t = x[c] - lse_c[c];
      G[c] += g_c[c] * vexp(ma[c] > T(0) ? t : ninf);
    }
  }
}

}  // namespace cpu
}  // namespace tilecl
