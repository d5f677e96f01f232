// gemm.h: the three GEMMs of the CPU tile sweep (math.md 1.3), BLIS-style, no BLAS:
//
//   C[m, n] (+)= A[m, k] @ B[k, n]
//   A strided: A(r, p) = a[r * rs + p * cs]. A row-major tile is (rs = ld, cs = 1), its transpose
//     (rs = 1, cs = ld): the backward reads H^T straight from the H tile, no copy.
//   B packed in strips of NR columns: strip s holds B[0:k, s*NR : s*NR + NR] as [k][NR],
//     contiguous, zero padded past n (pack_b / pack_bt build them once per operand).
//
// Register block MR x NR = 6 x 16: 12 ymm accumulators of fp32 in the AVX2 + FMA kernel, 2 loads
// of B and 6 broadcasts of A per step of k. The B strip of one call (k x 64 bytes, 16 KiB at
// k = 256) stays in L1 while the MR-row panels of A stream past it from L2.
//
// ISA section: included by csrc/cpu/kernels_*.cpp inside namespace TCL_ISA, after cpu_common.h.
#pragma once

namespace tilecl {
namespace cpu {
namespace TCL_ISA {

constexpr int MR = 6;   // rows of the register block
constexpr int NR = 16;  // columns of the register block (two AVX2 vectors of fp32)

inline int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

// Store (or add) the first mr x nr entries of a register block t[MR][NR] into C.
template <typename T>
inline void store_block(const T (&t)[MR][NR], T* c, int64_t ldc, int mr, int nr, bool acc) {
  for (int r = 0; r < mr; ++r) {
    T* cr = c + r * ldc;
    if (acc) {
      for (int j = 0; j < nr; ++j) cr[j] += t[r][j];
    } else {
      for (int j = 0; j < nr; ++j) cr[j] = t[r][j];
    }
  }
}

// Portable micro-kernel: C[mr, nr] (+)= A(0:mr, 0:kc) @ Bstrip[kc][NR]. Rows r >= mr of A are
// not read (their pointers alias row mr - 1), columns past nr of the strip are zeros.
template <typename T>
inline void micro_kernel(int64_t kc, const T* a, int64_t rs, int64_t cs, const T* b, T* c,
                         int64_t ldc, int mr, int nr, bool acc) {
  const T* ar[MR];
  for (int r = 0; r < MR; ++r) ar[r] = a + (r < mr ? r : mr - 1) * rs;
  T t[MR][NR] = {};
  for (int64_t p = 0; p < kc; ++p, b += NR) {
    for (int r = 0; r < MR; ++r) {
      const T av = ar[r][p * cs];
#pragma omp simd
      for (int j = 0; j < NR; ++j) t[r][j] += av * b[j];
    }
  }
  store_block(t, c, ldc, mr, nr, acc);
}

#ifdef TCL_AVX2
// AVX2 + FMA micro-kernel for fp32 (overload chosen over the template): 6 x 16 accumulators.
inline void micro_kernel(int64_t kc, const float* a, int64_t rs, int64_t cs, const float* b,
                         float* c, int64_t ldc, int mr, int nr, bool acc) {
  const float* a0 = a;
  const float* a1 = a + (mr > 1 ? 1 : 0) * rs;
  const float* a2 = a + (mr > 2 ? 2 : mr - 1) * rs;
  const float* a3 = a + (mr > 3 ? 3 : mr - 1) * rs;
  const float* a4 = a + (mr > 4 ? 4 : mr - 1) * rs;
  const float* a5 = a + (mr > 5 ? 5 : mr - 1) * rs;
  if (acc)
    for (int r = 0; r < mr; ++r) _mm_prefetch(reinterpret_cast<const char*>(c + r * ldc), _MM_HINT_T0);
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
  __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  int64_t o = 0;
  for (int64_t p = 0; p < kc; ++p, o += cs, b += NR) {
    const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
    __m256 x = _mm256_broadcast_ss(a0 + o);
    c00 = _mm256_fmadd_ps(x, b0, c00);
    c01 = _mm256_fmadd_ps(x, b1, c01);
    x = _mm256_broadcast_ss(a1 + o);
    c10 = _mm256_fmadd_ps(x, b0, c10);
    c11 = _mm256_fmadd_ps(x, b1, c11);
    x = _mm256_broadcast_ss(a2 + o);
    c20 = _mm256_fmadd_ps(x, b0, c20);
    c21 = _mm256_fmadd_ps(x, b1, c21);
    x = _mm256_broadcast_ss(a3 + o);
    c30 = _mm256_fmadd_ps(x, b0, c30);
    c31 = _mm256_fmadd_ps(x, b1, c31);
    x = _mm256_broadcast_ss(a4 + o);
    c40 = _mm256_fmadd_ps(x, b0, c40);
    c41 = _mm256_fmadd_ps(x, b1, c41);
    x = _mm256_broadcast_ss(a5 + o);
    c50 = _mm256_fmadd_ps(x, b0, c50);
    c51 = _mm256_fmadd_ps(x, b1, c51);
  }
  const __m256 rows[MR][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  if (nr == NR) {  // full-width block: vector stores
    for (int r = 0; r < mr; ++r) {
      float* cr = c + r * ldc;
      __m256 v0 = rows[r][0], v1 = rows[r][1];
      if (acc) {
        v0 = _mm256_add_ps(v0, _mm256_loadu_ps(cr));
        v1 = _mm256_add_ps(v1, _mm256_loadu_ps(cr + 8));
      }
      _mm256_storeu_ps(cr, v0);
      _mm256_storeu_ps(cr + 8, v1);
    }
    return;
  }
  alignas(32) float t[MR][NR];
  for (int r = 0; r < MR; ++r) {
    _mm256_store_ps(t[r], rows[r][0]);
    _mm256_store_ps(t[r] + 8, rows[r][1]);
  }
  store_block(t, c, ldc, mr, nr, acc);
}
#endif

// C[m, n] (+)= A[m, k] @ B[k, n]: A strided (rs, cs); B packed, strip s at bp + s * kp * NR
// (kp >= k: rows per strip in the pack). Loop order: k in chunks of KC (so that a B strip chunk,
// KC x 64 bytes, stays in L1 at any depth), jr (strips), ir (row panels); rows_outer swaps jr
// and ir (C written row panel by row panel: better when C is a large strided output in memory).
constexpr int64_t KC = 256;

template <typename T>
void gemm(int64_t m, int64_t n, int64_t k, const T* a, int64_t rs, int64_t cs, const T* bp,
          int64_t kp, T* c, int64_t ldc, bool acc, bool rows_outer = false) {
  if (m <= 0 || n <= 0) return;
  if (k <= 0) {  // empty sum: C = 0 (or unchanged)
    if (!acc)
      for (int64_t i = 0; i < m; ++i) std::fill(c + i * ldc, c + i * ldc + n, T(0));
    return;
  }
  for (int64_t p0 = 0; p0 < k; p0 += KC) {
    const int64_t kc = std::min(KC, k - p0);
    const bool add = acc || p0 > 0;
    auto block = [&](int64_t i, int64_t j) {
      micro_kernel(kc, a + i * rs + p0 * cs, rs, cs, bp + (j / NR) * kp * NR + p0 * NR,
                   c + i * ldc + j, ldc, static_cast<int>(std::min<int64_t>(MR, m - i)),
                   static_cast<int>(std::min<int64_t>(NR, n - j)), add);
    };
    if (rows_outer) {
      for (int64_t i = 0; i < m; i += MR)
        for (int64_t j = 0; j < n; j += NR) block(i, j);
    } else {
      for (int64_t j = 0; j < n; j += NR)
        for (int64_t i = 0; i < m; i += MR) block(i, j);
    }
  }
}

// B = src [rows, d] (row-major, leading dimension ld) packed in strips of NR columns of d:
// out[s][r][e] = src[r][s * NR + e], kp rows per strip (rows..kp and e >= d zero padded).
template <typename T>
void pack_b(const T* src, int64_t ld, int64_t rows, int64_t d, T* out, int64_t kp) {
  for (int64_t s = 0; s * NR < d; ++s) {
    T* o = out + s * kp * NR;
    const int64_t e0 = s * NR, ne = std::min<int64_t>(NR, d - e0);
    for (int64_t r = 0; r < kp; ++r, o += NR) {
      int64_t e = 0;
      if (r < rows)
        for (; e < ne; ++e) o[e] = src[r * ld + e0 + e];
      for (; e < NR; ++e) o[e] = T(0);
    }
  }
}

// B = src^T [d, rows] packed in strips of NR columns (= NR rows of src):
// out[s][p][c] = src[s * NR + c][p], p < d (c >= rows zero padded).
template <typename T>
void pack_bt(const T* src, int64_t ld, int64_t rows, int64_t d, T* out) {
  for (int64_t s = 0; s * NR < rows; ++s) {
    T* o = out + s * d * NR;
    const int64_t c0 = s * NR, nc = std::min<int64_t>(NR, rows - c0);
    for (int64_t p = 0; p < d; ++p, o += NR) {
      int64_t c = 0;
      for (; c < nc; ++c) o[c] = src[(c0 + c) * ld + p];
      for (; c < NR; ++c) o[c] = T(0);
    }
  }
}

}  // namespace TCL_ISA
}  // namespace cpu
}  // namespace tilecl
