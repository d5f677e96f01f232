// epilogue_vec.h: the per-row tile math of the CPU path in array form, so that the compiler
// vectorizes it (one row of a tile at a time: masks as 0/1 arrays, a polynomial exp, selects
// instead of branches). Same semantics as the element functions of tile_math.h (sum_term,
// grad_coef, ...), which the CUDA kernels use and which the CPU runs instead when
// TILECL_CPU_SCALAR=1 (the tests run both). math.md 1.1, 1.2, 2.1, 2.2, 9.
//
// ISA section: included by csrc/cpu/kernels.h inside namespace TCL_ISA (AVX2 vectors there).
#pragma once

namespace tilecl {
namespace cpu {
namespace TCL_ISA {

// exp for fp32: Cody-Waite reduction to r in [-ln2/2, ln2/2], degree-6 Taylor polynomial
// (relative error ~2e-7), scaled by 2^n through the exponent bits. x < -87.3 gives 0 (and so
// does -inf: masked terms), x > 88.37 gives inf, NaN gives NaN. Branch-free: min / max / blends.
__attribute__((always_inline)) inline float vexp(float x) {
  const float hi = 88.3762626647949f, lo = -87.3365478515625f;
  float xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const float big = 12582912.f;  // 1.5 * 2^23: round to nearest integer
  const float n = (xc * 1.44269504088896341f + big) - big;
  const float r = (xc - n * 0.693145751953125f) - n * 1.42860682030941723212e-6f;
  const float p = 1.f + r * (1.f + r * (0.5f + r * (1.f / 6 + r * (1.f / 24 + r * (1.f / 120 + r * (1.f / 720))))));
  const float scale = __builtin_bit_cast(float, (static_cast<int32_t>(n) + 127) << 23);
  const float v = x < lo ? 0.f : p * scale;
  return x > hi ? __builtin_huge_valf() : v;
}
inline double vexp(double x) { return exp(x); }  // float64 is the parity path: libm

// log(1 + e) for e in [0, 1], fp32: 2 atanh(t) with t = e / (2 + e) in [0, 1/3], odd series to
// t^15 (relative error ~1e-7, no cancellation as e -> 0). Branch-free.
__attribute__((always_inline)) inline float vlog1p_unit(float e) {
  const float t = e / (2.f + e), t2 = t * t;
  float p = 1.f / 13 + t2 * (1.f / 15);
  p = 1.f / 9 + t2 * (1.f / 11 + t2 * p);
  p = 1.f / 5 + t2 * (1.f / 7 + t2 * p);
  p = 1.f + t2 * (1.f / 3 + t2 * p);
  return 2.f * t * p;
}
inline double vlog1p_unit(double e) { return log1p(e); }

// stable SigLIP forms (math.md 2.2), branch-free: softplus(x) = max(x, 0) + log1p(e^-|x|),
// sigmoid(x) = 1 / (1 + e^-|x|) for x >= 0, e^-|x| / (1 + e^-|x|) below
template <typename T>
inline T vsoftplus(T x) {
  const T ax = x < T(0) ? -x : x;
  return (x > T(0) ? x : T(0)) + vlog1p_unit(vexp(-ax));
}
template <typename T>
inline T vsigmoid(T x) {
  const T e = vexp(x < T(0) ? x : -x);
  return (x >= T(0) ? T(1) : e) / (T(1) + e);
}

// allowed (0/1) and positive (0/1, within allowed) for row i against columns [j0, j0 + bc);
// x: the row's logits (threshold flag: a non-positive column above thresh_i is not allowed)
template <int POS, typename T>
inline void row_masks(const Aux<T>& aux, int64_t i, int64_t j0, int64_t bc, const T* x, T* ma,
                      T* my) {
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
  if (aux.thresh) {  // drops_false_negative of tile_math.h, after Y
    const T th = aux.thresh[i];
#pragma omp simd
    for (int64_t c = 0; c < bc; ++c) ma[c] = (x[c] > th && my[c] == T(0)) ? T(0) : ma[c];
  }
}

// x[c] = -inf where column c is not allowed (the column LSE reads the masked tile)
template <typename T>
inline void mask_row(T* x, const T* ma, int64_t bc) {
  const T ninf = neg_inf<T>();
#pragma omp simd
  for (int64_t c = 0; c < bc; ++c) x[c] = ma[c] > T(0) ? x[c] : ninf;
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
    if (weighted) sees = w[c] <= T(0) ? T(0) : sees;  // a NaN weight is seen (sum_sees)
    z[c] = sees > T(0) ? beta * x[c] : ninf;
  }
}

// forward: merge the columns of one row into the running (m, l) of accumulator k (math.md 1.1).
// The tile's terms are taken relative to the tile's own row max tm, e_c = w_c exp(z_c - tm), and
// rescaled once: l = l exp(m - m_new) + exp(tm - m_new) sum_c e_c. `e` (null: not kept) receives
// e_c for the column LSE (fwd_col_from_rows). Returns tm (-inf: no column of the tile is seen).
template <typename T>
inline T fwd_row_sum(const Spec& s, int k, const T* x, const T* ma, const T* my, const T* w,
                     int64_t bc, T& m, T& l, T* z, T* e) {
  sum_logits(s, k, x, ma, my, w, bc, z);
  T tmax = neg_inf<T>();
#pragma omp simd reduction(max : tmax)
  for (int64_t c = 0; c < bc; ++c) tmax = z[c] > tmax ? z[c] : tmax;
  if (tmax == neg_inf<T>()) {  // nothing seen, or only NaN (the max skips NaN): NaN in, NaN out
    bool nan = false;
    for (int64_t c = 0; c < bc; ++c) nan = nan || z[c] != z[c];
    if (e) std::fill(e, e + bc, nan ? T(NAN) : T(0));
    if (nan) {
      l = T(NAN);
      return T(NAN);
    }
    return tmax;
  }
  T* out = e ? e : z;
  T acc = T(0);
  if (s.weighted[k] && w) {
#pragma omp simd reduction(+ : acc)
    for (int64_t c = 0; c < bc; ++c) {
      out[c] = w[c] * vexp(z[c] - tmax);
      acc += out[c];
    }
  } else {
#pragma omp simd reduction(+ : acc)
    for (int64_t c = 0; c < bc; ++c) {
      out[c] = vexp(z[c] - tmax);
      acc += out[c];
    }
  }
  const T mnew = t_max(m, tmax);
  l = lse_rescale(l, m, mnew) + acc * t_exp(tmax - mnew);
  m = mnew;
  return tmax;
}

// forward: lin += sum Y x, cnt += sum Y, sig += sum_allowed softplus(x) - Y x  (math.md 4.1, 2.2)
template <typename T>
inline void fwd_row_linear(const Spec& s, const T* x, const T* ma, const T* my, int64_t bc, T& lin,
                           T& cnt, T& sig) {
  T a = T(0), b = T(0), g = T(0);
#pragma omp simd reduction(+ : a, b)
  for (int64_t c = 0; c < bc; ++c) {
    a += my[c] > T(0) ? x[c] : T(0);
    b += my[c];
  }
  if (s.sigmoid) {
#pragma omp simd reduction(+ : g)
    for (int64_t c = 0; c < bc; ++c) g += ma[c] > T(0) ? vsoftplus(x[c]) - my[c] * x[c] : T(0);
  }
  lin += a;
  cnt += b;
  sig += g;
}

// ---- column LSE (math.md 2.1) ----

// column sums below 2^-80 of the tile's reference are recomputed exactly: above it every term
// keeps full fp32 precision relative to the sum (smaller ones are < 2^-36 of it); _torch_tiled
template <typename T>
constexpr T col_floor() { return T(8.271806125530277e-25); }  // 2^-80

// Column sums from the row pass: with e_rc = exp(x_rc - tm_r) (0 where masked),
//   sum_r exp(x_rc) = e^C sum_r e_rc exp(tm_r - C),  C = max_r tm_r   ([BR] @ [BR, BC] GEMV).
// cs[c] <- the shifted sums; returns C (-inf: no allowed entry in the tile).
template <typename T>
inline T fwd_col_from_rows(const T* e, int64_t lde, const T* tm, int64_t br, int64_t bc, T* cs) {
  T C = neg_inf<T>();
  for (int64_t r = 0; r < br; ++r) C = t_max(C, tm[r]);
  std::fill(cs, cs + bc, T(0));
  if (C == neg_inf<T>()) return C;
  for (int64_t r = 0; r < br; ++r) {
    if (tm[r] == neg_inf<T>()) continue;
    const T wr = t_exp(tm[r] - C);
    const T* er = e + r * lde;
#pragma omp simd
    for (int64_t c = 0; c < bc; ++c) cs[c] += wr * er[c];
  }
  return C;
}

// Exact (max, sum) of column c of a masked tile (x = -inf where not allowed): the fallback of
// fwd_col_from_rows and the path of column LSEs whose row pass cannot be shared.
template <typename T>
inline void col_exact(const T* x, int64_t ldx, int64_t br, int64_t c, T& m, T& l) {
  m = neg_inf<T>();
  l = T(0);
  for (int64_t r = 0; r < br; ++r) m = t_max(m, x[r * ldx + c]);
  if (m == neg_inf<T>()) return;
  for (int64_t r = 0; r < br; ++r) l += t_exp(x[r * ldx + c] - m);
}

// Merge the tile's column statistics into the running (cm, cl): column c contributes (C, cs[c])
// when cs[c] >= 2^-80, else its exact (max, sum) over the masked tile x.
template <typename T>
inline void fwd_col_merge(const T* x, int64_t ldx, int64_t br, int64_t bc, T C, const T* cs,
                          T* cm, T* cl, std::vector<int64_t>& bad) {
  bad.clear();
  if (C != neg_inf<T>()) {
    const T floor = col_floor<T>();
    for (int64_t c = 0; c < bc; ++c)
      if (cs[c] < floor) bad.push_back(c);
#pragma omp simd
    for (int64_t c = 0; c < bc; ++c) {
      const bool ok = !(cs[c] < floor);  // NaN (a NaN logit in the column) is kept, not redone
      const T mnew = ok ? t_max(cm[c], C) : cm[c];
      const T lold = cl[c] == T(0) ? T(0) : cl[c] * vexp(cm[c] - mnew);
      cl[c] = ok ? lold + cs[c] * vexp(C - mnew) : cl[c];
      cm[c] = mnew;
    }
  }
  for (const int64_t c : bad) {
    T mt, lt;
    col_exact(x, ldx, br, c, mt, lt);
    if (lt == T(0)) continue;
    const T mnew = t_max(cm[c], mt);
    cl[c] = lse_rescale(cl[c], cm[c], mnew) + lse_rescale(lt, mt, mnew);
    cm[c] = mnew;
  }
}

// Column LSE straight from a masked tile (two passes over its rows), when no row sum can be
// shared (the first accumulator is not "all columns, beta 1, unweighted"). tmax, ref: [bc]
template <typename T>
inline void fwd_col_tile(const T* x, int64_t ldx, int64_t br, int64_t bc, T* cm, T* cl, T* tmax,
                         T* ref) {
  const T ninf = neg_inf<T>();
  for (int64_t c = 0; c < bc; ++c) tmax[c] = ninf;
  for (int64_t r = 0; r < br; ++r) {
    const T* xr = x + r * ldx;
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

// ---- streaming top-k hardest negatives (TileSpec.topk) ----

// z[c] = x[c] on allowed non-positive columns, -inf elsewhere (the top-k candidates)
template <typename T>
inline void negative_logits(const T* x, const T* ma, const T* my, int64_t bc, T* z) {
  const T ninf = neg_inf<T>();
#pragma omp simd
  for (int64_t c = 0; c < bc; ++c) z[c] = (ma[c] > T(0) && my[c] == T(0)) ? x[c] : ninf;
}

// Merge candidates z [bc] (global columns g0 + c; -inf: none) into a row's running top-k list
// (vals descending, idx, count <= k). A column enters when it beats the current k-th value; the
// row is swept in column order and ties keep the earlier column. After the first tiles of a row
// few columns beat the k-th value: one vector max usually settles the whole tile.
template <typename T>
inline void topk_row(const T* z, int64_t bc, int64_t g0, int k, T* vals, int64_t* idx, int& count) {
  const T ninf = neg_inf<T>();
  T zmax = ninf;
#pragma omp simd reduction(max : zmax)
  for (int64_t c = 0; c < bc; ++c) zmax = z[c] > zmax ? z[c] : zmax;
  T kth = count < k ? ninf : vals[k - 1];
  if (!(zmax > kth)) return;
  for (int64_t c = 0; c < bc; ++c) {
    if (!(z[c] > kth)) continue;
    int p = count < k ? count++ : k - 1;  // the slot that frees up
    for (; p > 0 && vals[p - 1] < z[c]; --p) {
      vals[p] = vals[p - 1];
      idx[p] = idx[p - 1];
    }
    vals[p] = z[c];
    idx[p] = g0 + c;
    kth = count < k ? ninf : vals[k - 1];
  }
}

// ---- backward ----

// G[c] = dL/dx of one row (math.md 1.2, 2.1, 2.2; grad_coef of tile_math.h in array form).
// lse_c / g_c: the safe column statistics of the tile's columns (null without column LSE).
template <typename T>
inline void bwd_row_grad(const Spec& s, const RowGrad<T>& rg, const T* x, const T* ma, const T* my,
                         const T* w, const T* lse_c, const T* g_c, int64_t bc, T* G, T* z) {
  std::fill(G, G + bc, T(0));
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
  if (s.lin) {
#pragma omp simd
    for (int64_t c = 0; c < bc; ++c) G[c] += rg.g_lin * my[c];
  }
  if (s.sigmoid) {
#pragma omp simd
    for (int64_t c = 0; c < bc; ++c)
      G[c] += ma[c] > T(0) ? rg.g_sig * (vsigmoid(x[c]) - my[c]) : T(0);
  }
  if (lse_c) {
    const T ninf = neg_inf<T>();
#pragma omp simd
    for (int64_t c = 0; c < bc; ++c) {
      const T t = ma[c] > T(0) ? x[c] - lse_c[c] : ninf;
      G[c] += g_c[c] * vexp(t);
    }
  }
}

}  // namespace TCL_ISA
}  // namespace cpu
}  // namespace tilecl
