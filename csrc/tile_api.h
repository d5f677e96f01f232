// tile_api.h: the host-side entry points of the native backend (CPU always, CUDA when built).
// Raw pointers, sizes, strides (in elements), dtype codes and a stream handle; no torch.
// The Python side (python/tilecl/_native_backend.py) fills these structs through bindings.cpp.
#pragma once

#include <stdint.h>

#include "tile_math.h"

namespace tilecl {

// One (row block, column block) problem: q [N, D] against k [M, D] (any strides, dtype code
// `dtype`), per-row scale alpha [N] and optional scalar bias in the COMPUTE type (float64 for
// float64 inputs, float32 otherwise), side data of TileAux (weights/factors/thresholds in the
// compute type, contiguous; index/label vectors int64, contiguous).
struct Problem {
  Spec spec;
  int dtype;  // DType of q and k
  int64_t n, m, d;
  const void* q;
  int64_t sq0, sq1;
  const void* k;
  int64_t sk0, sk1;
  const void* alpha;  // [N]
  const void* bias;   // scalar or null
  const int64_t* excl;
  const int64_t* pos;
  const int64_t* labels_q;
  const int64_t* labels_k;
  const void* weight;  // [N, mw]
  int64_t mw;
  const void* wa;  // [N, rank]
  const void* wb;  // [M, rank]
  int64_t rank;
  int64_t col_offset;
  const void* thresh;  // [N] or null: threshold flag, non-positive columns with x_ij > thresh_i drop
  int threads;  // CPU threads (<= 0: OpenMP default)
};

// Forward outputs (compute type, contiguous, written, not accumulated):
//   stats [S, N] (TileSpec layout), col [M] (column LSE, spec.col_lse only);
//   topk > 0 (TileSpec.topk, CPU only): top_vals [N, topk] the row's largest logits over allowed
//   non-positive columns, descending, top_idx [N, topk] int64 their global columns; -inf / -1
//   past the row's number of such columns.
struct ForwardOut {
  void* stats;
  void* col;
  void* top_vals = nullptr;
  int64_t* top_idx = nullptr;
  int topk = 0;
};

// Backward inputs (compute type, contiguous): saved stats [S, N], col [M], their upstream
// gradients g_stats [S, N], g_col [M]. Outputs are ACCUMULATED into (the caller zeroes them):
//   dq [N, D], dk [M, D]          (null: not needed)
//   gx [N]   = sum_j G_ij x_ij    (distance logits: dL/dalpha_i = gx_i / alpha_i)
//   gsum [N] = sum_j G_ij         (SigLIP bias: dL/db = sum_i gsum_i); null when not needed
struct BackwardIO {
  const void* stats;
  const void* col;
  const void* g_stats;
  const void* g_col;
  void* dq;
  void* dk;
  void* gx;
  void* gsum;
};

// The side data of a problem as the tile code reads it (tile_math.h Aux), in the compute type T.
template <typename T>
Aux<T> make_aux(const Problem& p) {
  Aux<T> a;
  a.excl = p.excl;
  a.pos = p.pos;
  a.labels_q = p.labels_q;
  a.labels_k = p.labels_k;
  a.weight = static_cast<const T*>(p.weight);
  a.mw = p.mw;
  a.wa = static_cast<const T*>(p.wa);
  a.wb = static_cast<const T*>(p.wb);
  a.rank = p.rank;
  a.col_offset = p.col_offset;
  a.thresh = static_cast<const T*>(p.thresh);
  return a;
}

// The kernel arguments of a problem (KParams, tile_math.h),
// then the buffers of a forward or a backward pass. CUDA launches pass it by value; NVRTC
// launches get its bytes from tilecl._C.kparams.
inline KParams make_params(const Problem& p) {
  KParams k{};
  k.spec = p.spec;
  k.n = p.n;
  k.m = p.m;
  k.d = p.d;
  k.q = p.q;
  k.sq0 = p.sq0;
  k.sq1 = p.sq1;
  k.k = p.k;
  k.sk0 = p.sk0;
  k.sk1 = p.sk1;
  k.alpha = static_cast<const float*>(p.alpha);
  k.bias = static_cast<const float*>(p.bias);
  k.aux = make_aux<float>(p);
  return k;
}

inline void set_outputs(KParams& k, const ForwardOut& out) {
  k.stats = static_cast<float*>(out.stats);
  k.col = static_cast<float*>(out.col);
}

inline void set_io(KParams& k, const BackwardIO& io) {
  k.stats_in = static_cast<const float*>(io.stats);
  k.col_in = static_cast<const float*>(io.col);
  k.g_stats = static_cast<const float*>(io.g_stats);
  k.g_col = static_cast<const float*>(io.g_col);
  k.dq = static_cast<float*>(io.dq);
  k.dk = static_cast<float*>(io.dk);
  k.gx = static_cast<float*>(io.gx);
  k.gsum = static_cast<float*>(io.gsum);
}

void cpu_forward(const Problem& p, const ForwardOut& out);
void cpu_backward(const Problem& p, const BackwardIO& io);

#ifdef TILECL_WITH_CUDA
// Launch on `stream` (a cudaStream_t as an integer); throws std::runtime_error on a CUDA error.
void cuda_forward(const Problem& p, const ForwardOut& out, void* stream);
void cuda_backward(const Problem& p, const BackwardIO& io, void* stream);
#endif

}  // namespace tilecl
