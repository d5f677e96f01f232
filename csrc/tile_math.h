// tile_math.h: the per-element math of the tile template, shared by the CPU (OpenMP) and the CUDA
// kernels so that the CPU tests exercise exactly what the GPU executes (docs/math.md 1, 2, 9).
//
// No torch, no host-only headers under NVRTC: this file compiles with g++/clang++, nvcc and NVRTC.
// Everything here is a pure function of scalars; the kernels own the loops and the memory.
#pragma once

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define TCL_HD __host__ __device__ __forceinline__
#else
#define TCL_HD inline
#endif

#ifndef __CUDACC_RTC__
#include <math.h>
#include <stdint.h>
#include <string.h>
#else
typedef long long int64_t;  // NVRTC has no <stdint.h>
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
#endif

namespace tilecl {

// ---- flags of the template (python/tilecl/_spec.py TileSpec); codes match _native_backend.py ----
enum Logit { LOGIT_DOT = 0, LOGIT_DIST = 1 };
enum Positive { POS_NONE = 0, POS_INDEX = 1, POS_LABEL = 2 };
enum Cols { COLS_ALL = 0, COLS_POS = 1, COLS_NEG = 2 };
enum Weight { W_NONE = 0, W_DENSE = 1, W_LOWRANK = 2 };
enum DType { DT_F32 = 0, DT_F64 = 1, DT_F16 = 2, DT_BF16 = 3 };

// Runtime copy of TileSpec. The kernels also take the structural flags (logit, positive, weight)
// as template parameters; the values here are the ones that stay runtime (betas, gamma, clip).
struct Spec {
  int logit;        // Logit
  double gamma;     // distance exponent, x = -alpha * d2^(gamma/2)
  int positive;     // Positive
  int n_sums;       // 0..2 online log-sum accumulators
  int cols[2];      // Cols of each accumulator
  double beta[2];   // logit multiplier of each accumulator
  int weighted[2];  // multiply the accumulator's terms by w_ij
  int lin;          // SupCon L_out: lin_i = sum_{j in P(i)} x_ij, cnt_i = |P(i)|
  int sigmoid;      // SigLIP: sig_i = sum_{allowed j} softplus(x_ij) - Y_ij x_ij
  int col_lse;      // column LSE over allowed rows
  int weight;       // Weight
  double weight_clip;
  // rows of the [S, N] statistics (TileSpec.layout): lse^1..lse^K, [lin, cnt], [sig]
  TCL_HD int i_lin() const { return n_sums; }
  TCL_HD int i_cnt() const { return n_sums + 1; }
  TCL_HD int i_sig() const { return n_sums + 2 * lin; }
  TCL_HD int n_stats() const { return n_sums + 2 * lin + sigmoid; }
};

// Side data of one (row block, column block) problem (TileAux). Column indices are GLOBAL:
// local column j is global column col_offset + j; excl / pos hold global columns, -1 = none.
// Weights / low-rank factors are contiguous and already in the compute type T.
template <typename T>
struct Aux {
  const int64_t* excl;      // [N] or null
  const int64_t* pos;       // [N] (POS_INDEX)
  const int64_t* labels_q;  // [N] (POS_LABEL)
  const int64_t* labels_k;  // [M] (POS_LABEL)
  const T* weight;          // [N, Mw] (W_DENSE): w_ij = weight[i, (col_offset + j) % Mw]
  int64_t mw;
  const T* wa;              // [N, r] (W_LOWRANK): w_ij = <wa_i, wb_j>
  const T* wb;              // [M, r]
  int64_t rank;
  int64_t col_offset;
  const T* thresh;          // [N] or null (TileSpec.threshold): a non-positive column with
                            // x_ij > thresh_i is a false negative and leaves every sum
};

// One problem and the buffers of its pass: the ONE parameter struct of the native backend. The
// bindings fill it (bindings.cpp make_problem), the CPU path reads it (cpu/), the CUDA kernels
// take it by value (nvcc launches) or through a device pointer (NVRTC; its bytes come from
// tilecl._C.kparams). q [N, D] against k [M, D] (any strides, dtype code `dtype`); alpha [N],
// the bias, the side data and every buffer in the COMPUTE type V (float64 for float64 inputs,
// float32 otherwise, contiguous; index / label vectors int64).
//
// V is the view of those pointers: void on the host (Problem: the bindings and the CPU
// dispatch, which pick the compute type from dtype), the compute type where it is known
// (typed<T>(p): the CPU loops, the CUDA kernels' KParams). The fields do not depend on V, so
// every instantiation has the same bytes.
//
// Forward buffers (written, not accumulated): stats [S, N] (TileSpec layout), col [M] (column
//   LSE, spec.col_lse only); topk > 0 (TileSpec.topk, CPU only): top_vals [N, topk] the row's
//   largest logits over allowed non-positive columns, descending, top_idx [N, topk] int64 their
//   global columns; -inf / -1 past the row's number of such columns.
// Backward buffers: saved stats_in [S, N], col_in [M], their upstream gradients g_stats [S, N],
//   g_col [M]; outputs ACCUMULATED into (the caller zeroes them):
//   dq [N, D], dk [M, D]          (null: not needed)
//   gx [N]   = sum_j G_ij x_ij    (distance logits: dL/dalpha_i = gx_i / alpha_i)
//   gsum [N] = sum_j G_ij         (SigLIP bias: dL/db = sum_i gsum_i); null when not needed
template <typename V>
struct ProblemT {
  Spec spec;
  int dtype;    // DType of q and k
  int threads;  // CPU threads (<= 0: OpenMP default)
  int64_t n, m, d;
  const void* q;
  int64_t sq0, sq1;
  const void* k;
  int64_t sk0, sk1;
  const V* alpha;  // [N]
  const V* bias;   // scalar or null
  Aux<V> aux;
  V* stats;  // forward
  V* col;
  V* top_vals;
  int64_t* top_idx;
  int64_t topk;
  const V* stats_in;  // backward
  const V* col_in;
  const V* g_stats;
  const V* g_col;
  V* dq;
  V* dk;
  V* gx;
  V* gsum;
};

using Problem = ProblemT<void>;
using KParams = ProblemT<float>;  // the CUDA kernels' view (fp32 compute)

#ifndef __CUDACC_RTC__
// The problem with its pointers seen in the compute type T (the same bytes).
template <typename T>
inline ProblemT<T> typed(const Problem& p) {
  static_assert(sizeof(ProblemT<T>) == sizeof(Problem), "one layout for every view");
  ProblemT<T> t;
  memcpy(static_cast<void*>(&t), static_cast<const void*>(&p), sizeof(t));
  return t;
}
#endif

#ifdef __CUDACC_RTC__  // NVRTC: device code only, no __builtin_huge_val
template <typename T>
__device__ __forceinline__ T neg_inf() {
  return static_cast<T>(__longlong_as_double(0xfff0000000000000LL));
}
#else
template <typename T>
TCL_HD T neg_inf() {
  return -static_cast<T>(__builtin_huge_val());
}
#endif

TCL_HD float t_exp(float x) { return expf(x); }
TCL_HD double t_exp(double x) { return exp(x); }
TCL_HD float t_log(float x) { return logf(x); }
TCL_HD double t_log(double x) { return log(x); }
TCL_HD float t_log1p(float x) { return log1pf(x); }
TCL_HD double t_log1p(double x) { return log1p(x); }
TCL_HD float t_pow(float x, float y) { return powf(x, y); }
TCL_HD double t_pow(double x, double y) { return pow(x, y); }
template <typename T>
TCL_HD T t_max(T a, T b) { return a > b ? a : b; }
template <typename T>
TCL_HD T t_abs(T a) { return a < T(0) ? -a : a; }

// ---- fp16 / bf16 <-> fp32 without any header (the CPU path converts each tile on load) ----
TCL_HD float bf16_bits_to_float(uint16_t h) {
  union { uint32_t u; float f; } v;
  v.u = static_cast<uint32_t>(h) << 16;
  return v.f;
}
TCL_HD float f16_bits_to_float(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
  if (exp == 0x1fu) {
    bits = sign | 0x7f800000u | (man << 13);  // inf / nan
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (man << 13);  // normal: rebias 15 -> 127
  } else if (man == 0) {
    bits = sign;  // +-0
  } else {  // subnormal: renormalize
    int e = -1;
    do { man <<= 1; ++e; } while ((man & 0x400u) == 0);
    bits = sign | (static_cast<uint32_t>(112 - e) << 23) | ((man & 0x3ffu) << 13);
  }
  union { uint32_t u; float f; } v;
  v.u = bits;
  return v.f;
}

// ---- online log-sum-exp (math.md 1.1, 9.1) ----
// Reference point of a running max: 0 when nothing was seen yet, so exp(-inf - ref) = 0, never NaN.
template <typename T>
TCL_HD T lse_ref(T m) { return m == neg_inf<T>() ? T(0) : m; }

// (m, l) with lse = m + log(l): rescale the running sum l from max m_old to m_new.
template <typename T>
TCL_HD T lse_rescale(T l, T m_old, T m_new) {
  return l == T(0) ? T(0) : l * t_exp(m_old - lse_ref(m_new));
}

// lse of a finished (m, l) pair; -inf when the accumulator saw no column. A NaN logit makes l
// NaN (exp(NaN - m) = NaN) and so the lse: tested as l == 0, not l > 0, so NaN is not dropped.
template <typename T>
TCL_HD T lse_finish(T m, T l) { return l == T(0) ? neg_inf<T>() : m + t_log(l); }

// logaddexp(a, b), -inf safe (merging statistics of two column blocks); NaN if either is NaN.
template <typename T>
TCL_HD T lse_merge(T a, T b) {
  if (a != a || b != b) return a + b;
  T hi = t_max(a, b), lo = a > b ? b : a;
  if (hi == neg_inf<T>()) return hi;
  return hi + t_log1p(t_exp(lo - hi));
}

// ---- stable elementwise forms (math.md 2.2) ----
template <typename T>
TCL_HD T softplus(T x) { return t_max(x, T(0)) + t_log1p(t_exp(-t_abs(x))); }
template <typename T>
TCL_HD T sigmoid(T x) {
  T e = t_exp(-t_abs(x));
  return x >= T(0) ? T(1) / (T(1) + e) : e / (T(1) + e);
}

// ---- masks (TileAux): allowed = column is not the excluded one; Y = positive AND allowed ----
template <int POS, typename T>
TCL_HD bool is_positive(const Aux<T>& aux, int64_t i, int64_t j_local, int64_t col) {
  if (POS == POS_INDEX) return aux.pos[i] == col;
  if (POS == POS_LABEL) return aux.labels_q[i] == aux.labels_k[j_local];
  return false;
}

TCL_HD bool in_sum(int cols, bool allowed, bool y) {
  return cols == COLS_ALL ? allowed : (cols == COLS_POS ? y : (allowed && !y));
}

// w_ij (clipped below weight_clip to 0), for W_DENSE / W_LOWRANK; 1 otherwise.
template <int WMODE, typename T>
TCL_HD T weight_of(const Aux<T>& aux, T clip, int64_t i, int64_t j_local, int64_t col) {
  T w = T(1);
  if (WMODE == W_DENSE) {
    w = aux.weight[i * aux.mw + col % aux.mw];
  } else if (WMODE == W_LOWRANK) {
    w = T(0);
    const T* a = aux.wa + i * aux.rank;
    const T* b = aux.wb + j_local * aux.rank;
    for (int64_t r = 0; r < aux.rank; ++r) w += a[r] * b[r];
  }
  if (WMODE != W_NONE && clip > T(0) && w < clip) w = T(0);
  return w;
}

// Threshold flag (_torch_tiled._masks): a column that is not a positive of row i and scores above
// the row's threshold is a false negative; it leaves every sum and the column LSE. Y is decided
// first (positives are never dropped), so the caller clears `allowed` only.
template <typename T>
TCL_HD bool drops_false_negative(const Aux<T>& aux, int64_t i, T x, bool y) {
  return aux.thresh != nullptr && !y && x > aux.thresh[i];
}

// Everything the per-element code needs to know about one (i, j) pair.
template <typename T>
struct Elem {
  T x;           // logit
  bool allowed;  // j is not the excluded column of row i (nor a dropped false negative)
  bool y;        // positive (and allowed)
  T w;           // weight (1 when unweighted)
};

template <int POS, int WMODE, typename T>
TCL_HD Elem<T> make_elem(const Aux<T>& aux, T clip, T x, int64_t i, int64_t j_local) {
  Elem<T> e;
  int64_t col = aux.col_offset + j_local;
  e.x = x;
  e.allowed = aux.excl == nullptr || aux.excl[i] != col;
  e.y = e.allowed && is_positive<POS>(aux, i, j_local, col);
  if (drops_false_negative(aux, i, x, e.y)) e.allowed = false;
  e.w = weight_of<WMODE>(aux, clip, i, j_local, col);
  return e;
}

// Does accumulator k see this element (its mask AND a non-zero weight; a NaN weight is seen, so
// that it makes the sum NaN)? math.md 9.3: the mask is applied as a boolean, after the
// exponential, never as an additive constant.
template <typename T>
TCL_HD bool sum_sees(const Spec& s, int k, const Elem<T>& e) {
  return in_sum(s.cols[k], e.allowed, e.y) && (!s.weighted[k] || !(e.w <= T(0)));
}

// Term of accumulator k relative to its running max m (of beta_k x): w exp(beta_k x - m), or 0.
template <typename T>
TCL_HD T sum_term(const Spec& s, int k, const Elem<T>& e, T m) {
  if (!sum_sees(s, k, e)) return T(0);
  T t = t_exp(static_cast<T>(s.beta[k]) * e.x - lse_ref(m));
  return s.weighted[k] ? t * e.w : t;
}

// SigLIP term softplus(-(2Y - 1) x) = softplus(x) - Y x, over allowed columns.
template <typename T>
TCL_HD T sig_term(const Elem<T>& e) {
  if (!e.allowed) return T(0);
  return softplus(e.x) - (e.y ? e.x : T(0));
}

// Per-row upstream coefficients of the backward, already made safe: rows whose accumulator is
// empty (lse = -inf) get g = 0 and lse = 0 (_torch_tiled._safe_lse).
template <typename T>
struct RowGrad {
  T lse[2], g[2];  // accumulators
  T g_lin, g_sig;
};

template <typename T>
TCL_HD RowGrad<T> make_row_grad(const Spec& s, const T* stats, const T* g_stats, int64_t n,
                                int64_t i) {
  RowGrad<T> r;
  for (int k = 0; k < 2; ++k) {
    r.lse[k] = T(0);
    r.g[k] = T(0);
    if (k < s.n_sums) {
      T lse = stats[k * n + i];
      if (lse != neg_inf<T>()) {
        r.lse[k] = lse;
        r.g[k] = g_stats[k * n + i];
      }
    }
  }
  r.g_lin = s.lin ? g_stats[s.i_lin() * n + i] : T(0);
  r.g_sig = s.sigmoid ? g_stats[s.i_sig() * n + i] : T(0);
  return r;
}

// G_ij = dL/dx_ij (math.md 1.2, 2.1, 2.2; _torch_tiled._tile_grad):
//   sum_k g^k_i beta_k pi^k_ij + g^lin_i Y_ij + g^sig_i [allowed] (sigmoid(x_ij) - Y_ij)
//   + g^c_j [allowed] exp(x_ij - lse^c_j),      pi^k_ij = [k sees ij] w_ij exp(beta_k x_ij - lse^k_i)
// lse_c / g_c: the column statistic of j, already made safe (g_c = 0 where lse_c = -inf).
template <typename T>
TCL_HD T grad_coef(const Spec& s, const Elem<T>& e, const RowGrad<T>& r, bool has_col, T lse_c,
                   T g_c) {
  T G = T(0);
  for (int k = 0; k < s.n_sums; ++k) {
    if (r.g[k] != T(0) && sum_sees(s, k, e)) {
      T beta = static_cast<T>(s.beta[k]);
      T p = t_exp(beta * e.x - r.lse[k]);
      if (s.weighted[k]) p *= e.w;
      G += r.g[k] * beta * p;
    }
  }
  if (s.lin && e.y) G += r.g_lin;
  if (s.sigmoid && e.allowed) G += r.g_sig * (sigmoid(e.x) - (e.y ? T(1) : T(0)));
  if (has_col && e.allowed && g_c != T(0)) G += g_c * t_exp(e.x - lse_c);
  return G;
}

// ---- logits (math.md 1.4): x = alpha dot + bias, or x = -alpha d2^(gamma/2) ----
// Squared distance from the dot product and the squared norms (math.md 9.13). The expansion
// d2 = |q|^2 + |k|^2 - 2 <q, k> subtracts numbers of size |q|^2 + |k|^2, each rounded: its absolute
// error is c u (|q|^2 + |k|^2), u the unit roundoff (2^-24 in fp32, 2^-53 in fp64), c a few units
// growing like sqrt(D) with the dot product's length (measured: c <= 14 for D = 3..4096 in fp32).
// A d2 below dist2_eps = 64 u of |q|^2 + |k|^2 is therefore rounding noise, not a distance: the
// pair is a duplicate at working precision and d2 is taken as exactly 0. The logit is then the
// duplicate's exact 0, and the gradient of D^gamma there its subgradient 0 (h_factor; what the
// reference's difference-based cdist gives at D = 0). Without this, gamma < 2 multiplies the
// rounding of H k - H q by d2^(gamma/2 - 1) of noise: gradients of 1e6..1e7 for duplicate rows.
// Above the threshold d2 has a relative error below 1/4 and the pair's gradient H (k - q),
// of size alpha gamma G d^(gamma - 1), has no 1/noise factor left. d2 < 0 (rounding) is snapped
// to 0 too; NaN stays NaN (the comparison is false).
template <typename T>
TCL_HD T dist2_eps();
template <>
TCL_HD float dist2_eps<float>() { return 3.814697265625e-06f; }  // 2^-18 = 64 * 2^-24
template <>
TCL_HD double dist2_eps<double>() { return 7.105427357601002e-15; }  // 2^-47 = 64 * 2^-53

template <typename T>
TCL_HD T dist2(T dot, T nq, T nk) {
  const T d2 = nq + nk - T(2) * dot;
  return d2 <= dist2_eps<T>() * (nq + nk) ? T(0) : d2;
}

// `inner` is the dot product (DIST = false) or the squared distance d2 (DIST = true)
template <bool DIST, typename T>
TCL_HD T logit_of(T inner, T a, T bias, T gamma) {
  if (!DIST) return inner * a + bias;
  return -a * (gamma == T(2) ? inner : t_pow(inner, gamma / T(2)));
}

// Factor turning G into H, the coefficient of the embeddings in their gradients:
//   dot:  H = alpha G;                  dq_i += H_ij k_j,          dk_j += H_ij q_i
//   dist: H = G fac, fac = 2 alpha (gamma = 2) or alpha gamma d2^(gamma/2 - 1), and 0 for a
//         duplicate (d2 = 0 after dist2: the subgradient 0 of D^gamma at D = 0);
//         dq_i += H_ij (k_j - q_i),    dk_j += H_ij (q_i - k_j)   (math.md 1.4, _torch_tiled)
template <bool DIST, typename T>
TCL_HD T h_factor(T inner, T a, T gamma) {
  if (!DIST) return a;
  if (gamma == T(2)) return T(2) * a;
  if (inner == T(0)) return T(0);
  return a * gamma * t_pow(inner, gamma / T(2) - T(1));
}

}  // namespace tilecl
