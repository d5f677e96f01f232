// gemm.h: the small blocked GEMM micro-kernel of the CPU path.
//   C[m, n] (+)= A[m, k] @ B[k, n], all row-major with leading dimensions lda / ldb / ldc.
// m must be a multiple of MR and n a multiple of NR (the callers pad their tile buffers with
// zeros); k is free. A register block of MR x NR accumulators per step of k (8 AVX2 registers
// for fp32), vectorized over n by the compiler; an AVX2+FMA clone is picked at run time on x86.
#pragma once

#include <stdint.h>

namespace tilecl {
namespace cpu {

constexpr int MR = 4;   // rows of the register block
constexpr int NR = 16;  // columns of the register block (two AVX2 vectors of fp32)

void gemm(int64_t m, int64_t n, int64_t k, const float* A, int64_t lda, const float* B,
          int64_t ldb, float* C, int64_t ldc, bool accumulate);
void gemm(int64_t m, int64_t n, int64_t k, const double* A, int64_t lda, const double* B,
          int64_t ldb, double* C, int64_t ldc, bool accumulate);

inline int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

}  // namespace cpu
}  // namespace tilecl
