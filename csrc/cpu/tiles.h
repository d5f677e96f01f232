// tiles.h: loading and scratch buffers of the CPU tile sweep (tile_cpu.cpp): strided inputs of
// any supported dtype converted to the compute type tile by tile, zero padded for the GEMM.
#pragma once

#include <stdint.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../tile_math.h"
#include "gemm.h"

namespace tilecl {
namespace cpu {

constexpr int64_t BR = 64;   // rows per block (multiple of MR)
constexpr int64_t BC = 128;  // columns per block (multiple of NR)

// Value of element (r, c) of a strided [*, D] input of dtype code `dt`, as T.
template <typename T>
inline T load(const void* base, int dt, int64_t off) {
  switch (dt) {
    case DT_F32: return static_cast<T>(static_cast<const float*>(base)[off]);
    case DT_F64: return static_cast<T>(static_cast<const double*>(base)[off]);
    case DT_F16: return static_cast<T>(f16_bits_to_float(static_cast<const uint16_t*>(base)[off]));
    default: return static_cast<T>(bf16_bits_to_float(static_cast<const uint16_t*>(base)[off]));
  }
}

// rows [r0, r0 + nr) of x (strides s0, s1) -> out[rows_pad, ld] row-major, zero padded.
template <typename T>
void load_rows(const void* x, int dt, int64_t s0, int64_t s1, int64_t r0, int64_t nr, int64_t d,
               T* out, int64_t ld, int64_t rows_pad) {
  for (int64_t r = 0; r < rows_pad; ++r) {
    T* o = out + r * ld;
    if (r < nr) {
      const int64_t base = (r0 + r) * s0;
      if (dt == DT_F32 && s1 == 1 && sizeof(T) == 4) {
        std::memcpy(o, static_cast<const float*>(x) + base, d * sizeof(float));
      } else {
        for (int64_t c = 0; c < d; ++c) o[c] = load<T>(x, dt, base + c * s1);
      }
      for (int64_t c = d; c < ld; ++c) o[c] = T(0);
    } else {
      std::fill(o, o + ld, T(0));
    }
  }
}

// out[d, cols_pad] = rows_buf[0:nr, 0:d]^T, zero padded (B operand of the logits GEMM).
template <typename T>
void transpose_into(const T* in, int64_t ld_in, int64_t nr, int64_t d, T* out, int64_t cols_pad) {
  for (int64_t p = 0; p < d; ++p) {
    T* o = out + p * cols_pad;
    for (int64_t c = 0; c < nr; ++c) o[c] = in[c * ld_in + p];
    for (int64_t c = nr; c < cols_pad; ++c) o[c] = T(0);
  }
}

template <typename T>
void row_norms(const T* rows, int64_t ld, int64_t nr, int64_t d, T* out) {
  for (int64_t r = 0; r < nr; ++r) {
    T s = T(0);
    for (int64_t c = 0; c < d; ++c) s += rows[r * ld + c] * rows[r * ld + c];
    out[r] = s;
  }
}

// Per-thread scratch: one row block (Q), one column block (K row-major and transposed), the
// tile of logits and its weights.
template <typename T>
struct Scratch {
  int64_t dp, bc;
  std::vector<T> qr, x, w, inner, ht, tmp, nq, dq, rowh, colh;
  const T* kr = nullptr;  // current column block in the packed K (PackedK): [bc, dp]
  const T* kt = nullptr;  // its transpose [d, bc]
  const T* nk = nullptr;  // its squared norms [bc] (distance logits)
  std::vector<T> ma, my, z, g, tmax, ref, lc, gc;  // row / column vectors of the array epilogue
  std::vector<int64_t> ex;
  Scratch(int64_t d, int64_t bc_, bool bwd) : dp(round_up(d, NR)), bc(bc_) {
    qr.assign(BR * dp, T(0));
    x.assign(BR * bc, T(0));
    w.assign(BR * bc, T(1));
    nq.assign(BR, T(0));
    for (auto* v : {&ma, &my, &z, &g, &tmax, &ref, &lc, &gc}) v->assign(bc, T(0));
    ex.assign(BR, -1);
    if (bwd) {
      inner.assign(BR * bc, T(0));
      ht.assign(bc * BR, T(0));
      tmp.assign(bc * dp, T(0));
      dq.assign(BR * dp, T(0));
      rowh.assign(BR, T(0));
      colh.assign(bc, T(0));
    }
  }
};

// K converted to the compute type once per call, in both layouts the GEMMs want, column block by
// column block (zero padded to bc columns / dp depth): O(M D) memory, like dk itself.
template <typename T>
struct PackedK {
  std::vector<T> kr, kt, nk;
  int64_t bc = 0, dp = 0, d = 0;
  void build(const void* k, int dt, int64_t s0, int64_t s1, int64_t m, int64_t d_, int64_t bc_,
             bool norms, int threads) {
    bc = bc_;
    d = d_;
    dp = round_up(d, NR);
    const int64_t ncb = (m + bc - 1) / bc;
    kr.assign(ncb * bc * dp, T(0));
    kt.assign(ncb * d * bc, T(0));
    nk.assign(norms ? ncb * bc : 0, T(0));
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t cb = 0; cb < ncb; ++cb) {
      const int64_t j0 = cb * bc, nb = std::min(bc, m - j0);
      load_rows<T>(k, dt, s0, s1, j0, nb, d, kr.data() + j0 * dp, dp, bc);
      transpose_into<T>(kr.data() + j0 * dp, dp, nb, d, kt.data() + cb * d * bc, bc);
      if (norms) row_norms<T>(kr.data() + j0 * dp, dp, nb, d, nk.data() + j0);
    }
  }
  void select(int64_t j0, const T** r, const T** t, const T** n) const {
    *r = kr.data() + j0 * dp;
    *t = kt.data() + (j0 / bc) * d * bc;
    *n = nk.empty() ? nullptr : nk.data() + j0;
  }
};

}  // namespace cpu
}  // namespace tilecl
