// gemm.cpp: register-blocked micro-kernel (see gemm.h). No BLAS dependency: the tiles are small
// (a few hundred rows/columns) and live in L1/L2, so a register-blocked loop gets close to the
// FMA peak without packing beyond what the tile loaders already do.
#include "gemm.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(TILECL_NO_CLONES)
// One clone for AVX2 + FMA (Haswell and later, Zen), one generic; resolved once at load time.
#define TILECL_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define TILECL_CLONES
#endif

namespace tilecl {
namespace cpu {
namespace {

// 4 rows x 2 vectors of 32 bytes (16 fp32 / 8 fp64 columns) of accumulators: 8 registers,
// plus 2 loads of B and one broadcast of A per step of k. GCC vector extensions: AVX ymm in the
// haswell clone, pairs of SSE registers in the generic one.
template <typename T>
__attribute__((always_inline)) inline void gemm_body(int64_t m, int64_t n, int64_t k, const T* A,
                                                     int64_t lda, const T* B, int64_t ldb, T* C,
                                                     int64_t ldc, bool accumulate) {
  typedef T V __attribute__((vector_size(32)));
  constexpr int W = 32 / sizeof(T);  // lanes per vector
  constexpr int NC = 2 * W;          // columns per register block
  static_assert(NR % NC == 0, "NR must be a multiple of the register block width");
  for (int64_t i = 0; i < m; i += MR) {
    const T* a0 = A + i * lda;
    for (int64_t j = 0; j < n; j += NC) {
      V acc[MR][2];
      for (int r = 0; r < MR; ++r)
        for (int v = 0; v < 2; ++v) {
          if (accumulate) {
            __builtin_memcpy(&acc[r][v], C + (i + r) * ldc + j + v * W, sizeof(V));
          } else {
            acc[r][v] = V{} ;
          }
        }
      const T* b = B + j;
      for (int64_t p = 0; p < k; ++p, b += ldb) {
        V b0, b1;
        __builtin_memcpy(&b0, b, sizeof(V));
        __builtin_memcpy(&b1, b + W, sizeof(V));
        for (int r = 0; r < MR; ++r) {
          const T a = a0[r * lda + p];
          acc[r][0] += a * b0;
          acc[r][1] += a * b1;
        }
      }
      for (int r = 0; r < MR; ++r)
        for (int v = 0; v < 2; ++v) __builtin_memcpy(C + (i + r) * ldc + j + v * W, &acc[r][v], sizeof(V));
    }
  }
}

}  // namespace

TILECL_CLONES void gemm(int64_t m, int64_t n, int64_t k, const float* A, int64_t lda,
                        const float* B, int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  gemm_body<float>(m, n, k, A, lda, B, ldb, C, ldc, accumulate);
}

TILECL_CLONES void gemm(int64_t m, int64_t n, int64_t k, const double* A, int64_t lda,
                        const double* B, int64_t ldb, double* C, int64_t ldc, bool accumulate) {
  gemm_body<double>(m, n, k, A, lda, B, ldb, C, ldc, accumulate);
}

}  // namespace cpu
}  // namespace tilecl
