// tile_kernels.cuh: the CUDA tile template (device code only; compiled by nvcc through
// tile_cuda.cu, or at run time by NVRTC from tilecl._C.rtc_source(): no host headers here).
//
// One body, four modes (template parameter MODE), one flag set (Spec, tile_math.h):
//   MODE_FWD_ROWS  grid over row blocks, loop over column blocks: per-row statistics
//   MODE_FWD_COLS  grid over column blocks, loop over row blocks: column LSE (symmetric CLIP)
//   MODE_BWD_DQ    grid over row blocks x D chunks: G (math.md 1.2), dq += H K_J, row sums gx / gsum
//   MODE_BWD_DK    grid over column blocks x D chunks: G, dk += H^T Q_I
// Every block owns its rows (or columns): no atomics, deterministic (math.md 1.3, option 2).
// The logits tile S = Q_I K_J^T [64 x 64] is the shared piece: tensor cores (WMMA 16x16x16,
// fp32 accumulation) for fp16 / bf16 inputs, an fp32 register-blocked SIMT loop for fp32 inputs.
// The backward blocks also own a chunk of kDC columns of D: they keep their [64, kDC] gradient
// block in fp32 registers across the whole loop and add it to global memory once, recomputing
// the logits (all of D) once per chunk; tile_launch.h counts the flops and bytes of that choice.
// The second GEMMs (H K, H^T Q) run in fp32 (G holds the -Y terms: no 16-bit rounding of G).
// Template parameters: Tin (float / __half / __nv_bfloat16), MODE, DIST (distance logits);
// positive / weight modes and the sums are warp-uniform runtime flags of Spec.
#pragma once

#ifndef TILECL_RTC_CONCAT
#include "../tile_math.h"
#include "tile_launch.h"
#endif
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

namespace tilecl {

// Mode, kThreads, kBM, kBN, kBK, kDC, kSub: tile_launch.h
constexpr int kLDX = kBN + 4;  // leading dim of the fp32 tile (multiple of 4 for WMMA stores)
constexpr int kLDO = kSub;     // leading dim of the fp32 operand sub-chunk of the second GEMMs

// Kernel arguments: KParams (tile_math.h), by value for nvcc launches, through a device
// pointer for NVRTC ones (its bytes from tilecl._C.kparams).

template <typename Tin>
__device__ __forceinline__ float to_f(Tin v);
template <>
__device__ __forceinline__ float to_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename Tin>
__device__ __forceinline__ Tin zero_in();
template <>
__device__ __forceinline__ float zero_in<float>() { return 0.f; }
template <>
__device__ __forceinline__ __half zero_in<__half>() { return __float2half(0.f); }
template <>
__device__ __forceinline__ __nv_bfloat16 zero_in<__nv_bfloat16>() { return __float2bfloat16(0.f); }

template <typename Tin>
struct Staging {
  static constexpr int kLDS = sizeof(Tin) == 4 ? kBK + 1 : kBK + 8;  // WMMA: ldm % 8 == 0
  static constexpr int kIn = 2 * kBM * kLDS * (int)sizeof(Tin);
  static constexpr int kOp = kBN * kLDO * 4;                 // backward: fp32 operand sub-chunk
  static constexpr int kBwd = kIn > kOp ? kIn : kOp;          // the two never live together
};

// rows [r0, r0 + 64) x depth [k0, k0 + kBK) of a strided [nrows, d] input -> s[64][kLDS], zero padded
template <typename Tin, int LDS>
__device__ __forceinline__ void stage_chunk(const Tin* x, int64_t s0, int64_t s1, int64_t r0,
                                            int64_t nrows, int64_t k0, int64_t d, Tin* s) {
  for (int idx = threadIdx.x; idx < kBM * kBK; idx += kThreads) {
    const int r = idx / kBK, kk = idx % kBK;
    const int64_t gr = r0 + r, gk = k0 + kk;
    s[r * LDS + kk] = (gr < nrows && gk < d) ? x[gr * s0 + gk * s1] : zero_in<Tin>();
  }
}

// fp32 operand sub-chunk of the second GEMMs: rows [r0, r0 + 64), depth [k0, k0 + kSub)
template <typename Tin>
__device__ __forceinline__ void stage_op_f32(const Tin* x, int64_t s0, int64_t s1, int64_t r0,
                                             int64_t nrows, int64_t k0, int64_t d, float* s) {
  for (int idx = threadIdx.x; idx < kBN * kSub; idx += kThreads) {
    const int r = idx / kSub, kk = idx % kSub;
    const int64_t gr = r0 + r, gk = k0 + kk;
    s[r * kLDO + kk] = (gr < nrows && gk < d) ? to_f(x[gr * s0 + gk * s1]) : 0.f;
  }
}

// S[64][kLDX] = Q[i0:i0+64] K[j0:j0+64]^T (raw dot products, fp32); norms of both sides (DIST)
// into s_nq / s_nk; alpha of the rows into s_al, their thresh (threshold flag) into s_th and
// the local column of their positive (POS_INDEX; -1 outside the tile) into s_pc.
template <typename Tin, bool DIST>
__device__ void dot_tile(const KParams& p, int64_t i0, int64_t j0, float* s_x, unsigned char* raw,
                         float* s_nq, float* s_nk, float* s_al, float* s_th, int* s_pc) {
  constexpr int LDS = Staging<Tin>::kLDS;
  Tin* s_q = reinterpret_cast<Tin*>(raw);
  Tin* s_k = s_q + kBM * LDS;
  const Tin* q = static_cast<const Tin*>(p.q);
  const Tin* k = static_cast<const Tin*>(p.k);
  const int tid = threadIdx.x;
  if (tid < kBM) s_al[tid] = i0 + tid < p.n ? p.alpha[i0 + tid] : 0.f;
  if (p.aux.thresh && tid < kBM) s_th[tid] = i0 + tid < p.n ? p.aux.thresh[i0 + tid] : 0.f;
  if (p.spec.positive == POS_INDEX && tid < kBM) {
    const int64_t pc = i0 + tid < p.n ? p.aux.pos[i0 + tid] - p.aux.col_offset - j0 : -1;
    s_pc[tid] = pc >= 0 && pc < kBN ? static_cast<int>(pc) : -1;
  }
  float nrm = 0.f;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  constexpr bool kTensor = sizeof(Tin) == 2;
#else
  constexpr bool kTensor = false;
#endif
  // fp32 SIMT: thread (ty, tx) computes rows ty*8 .. ty*8+7, columns tx + 16 c (c < 4)
  const int ty = tid / 16, tx = tid % 16;
  float acc[8][4];
  for (int r = 0; r < 8; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = 0.f;
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> frag_c[4];
  if constexpr (kTensor)
    for (int cf = 0; cf < 4; ++cf) nvcuda::wmma::fill_fragment(frag_c[cf], 0.f);
  for (int64_t k0 = 0; k0 < p.d; k0 += kBK) {
    stage_chunk<Tin, LDS>(q, p.sq0, p.sq1, i0, p.n, k0, p.d, s_q);
    stage_chunk<Tin, LDS>(k, p.sk0, p.sk1, j0, p.m, k0, p.d, s_k);
    __syncthreads();
    if (DIST) {  // threads 0..63: rows of q, 64..127: rows of k
      const Tin* row = tid < kBM ? s_q + tid * LDS : s_k + (tid - kBM) * LDS;
      for (int kk = 0; kk < kBK; ++kk) {
        const float v = to_f(row[kk]);
        nrm += v * v;
      }
    }
    if constexpr (kTensor) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
      const int w = tid / 32;
      for (int kk = 0; kk < kBK; kk += 16) {
        nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, Tin, nvcuda::wmma::row_major> fa;
        nvcuda::wmma::load_matrix_sync(fa, s_q + (w * 16) * LDS + kk, LDS);
        for (int cf = 0; cf < 4; ++cf) {
          nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, Tin, nvcuda::wmma::col_major> fb;
          nvcuda::wmma::load_matrix_sync(fb, s_k + (cf * 16) * LDS + kk, LDS);
          nvcuda::wmma::mma_sync(frag_c[cf], fa, fb, frag_c[cf]);  // [16, 16] @ [16, 16]
        }
      }
#endif
    } else {
      for (int kk = 0; kk < kBK; ++kk) {
        float a[8], b[4];
        for (int r = 0; r < 8; ++r) a[r] = to_f(s_q[(ty * 8 + r) * LDS + kk]);
        for (int c = 0; c < 4; ++c) b[c] = to_f(s_k[(tx + 16 * c) * LDS + kk]);
        for (int r = 0; r < 8; ++r)
          for (int c = 0; c < 4; ++c) acc[r][c] += a[r] * b[c];  // [8] x [4] outer product
      }
    }
    __syncthreads();
  }
  if constexpr (kTensor) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    const int w = tid / 32;
    for (int cf = 0; cf < 4; ++cf)
      nvcuda::wmma::store_matrix_sync(s_x + (w * 16) * kLDX + cf * 16, frag_c[cf], kLDX,
                                      nvcuda::wmma::mem_row_major);
#endif
  } else {
    for (int r = 0; r < 8; ++r)
      for (int c = 0; c < 4; ++c) s_x[(ty * 8 + r) * kLDX + tx + 16 * c] = acc[r][c];
  }
  if (DIST) {
    if (tid < kBM) s_nq[tid] = nrm;
    else s_nk[tid - kBM] = nrm;
  }
  __syncthreads();
}

// Element (r, c) of the current tile: logit, masks, weight (tile_math.h semantics).
template <bool DIST>
__device__ __forceinline__ Elem<float> elem_dev(const KParams& p, const float* s_x, const float* s_nq,
                                                const float* s_nk, const float* s_al,
                                                const float* s_th, const int* s_pc, float bias,
                                                int r, int c, int64_t i, int64_t j, float* inner_out) {
  const float dot = s_x[r * kLDX + c];
  const float inner = DIST ? dist2(dot, s_nq[r], s_nk[c]) : dot;
  if (inner_out) *inner_out = inner;
  const float clip = static_cast<float>(p.spec.weight_clip);
  Elem<float> e;
  e.x = logit_of<DIST>(inner, s_al[r], bias, static_cast<float>(p.spec.gamma));
  const int64_t col = p.aux.col_offset + j;
  e.allowed = p.aux.excl == nullptr || p.aux.excl[i] != col;
  bool y = false;
  if (p.spec.positive == POS_INDEX) y = s_pc[r] == c;  // pos[i] == col
  else if (p.spec.positive == POS_LABEL) y = is_positive<POS_LABEL>(p.aux, i, j, col);
  e.y = e.allowed && y;
  if (p.aux.thresh && !e.y && e.x > s_th[r]) e.allowed = false;  // drops_false_negative
  if (p.spec.weight == W_DENSE) e.w = weight_of<W_DENSE>(p.aux, clip, i, j, col);
  else if (p.spec.weight == W_LOWRANK) e.w = weight_of<W_LOWRANK>(p.aux, clip, i, j, col);
  else e.w = 1.f;
  return e;
}

__device__ __forceinline__ float pair_max(float v) {
  return t_max(v, __shfl_xor_sync(0xffffffffu, v, 1));
}
__device__ __forceinline__ float pair_sum(float v) { return v + __shfl_xor_sync(0xffffffffu, v, 1); }

template <typename Tin, int MODE, bool DIST>
__device__ void tile_body(const KParams& p) {
  constexpr bool kOwnRows = MODE == MODE_FWD_ROWS || MODE == MODE_BWD_DQ;
  constexpr bool kBwd = MODE == MODE_BWD_DQ || MODE == MODE_BWD_DK;
  __shared__ __align__(32) float s_x[kBM * kLDX];
  __shared__ __align__(32) unsigned char s_raw[kBwd ? Staging<Tin>::kBwd : Staging<Tin>::kIn];
  __shared__ float s_nq[kBM], s_nk[kBN], s_al[kBM], s_th[kBM];
  __shared__ int s_pc[kBM];
  __shared__ float s_rl[2][kBM], s_rg[2][kBM], s_rlin[kBM], s_rsig[kBM];  // MODE_BWD_DK row grads
  __shared__ float s_sumh[kBM];  // backward, distance logits: sum of H over the owned row
  float* s_op = reinterpret_cast<float*>(s_raw);

  const Spec& sp = p.spec;
  const int tid = threadIdx.x, L = tid >> 1, half = tid & 1;
  const int64_t own0 = static_cast<int64_t>(blockIdx.x) * kBM;  // first owned row / column
  const int64_t n_other = kOwnRows ? p.m : p.n;
  const float bias = p.bias ? *p.bias : 0.f;
  const float gamma = static_cast<float>(sp.gamma);
  const int64_t me = own0 + L;  // the row (or column) this thread pair works on
  const bool me_valid = me < (kOwnRows ? p.n : p.m);

  // per-thread state (the pair L shares the running maxima through shuffles)
  float run_m[2] = {neg_inf<float>(), neg_inf<float>()}, run_l[2] = {0.f, 0.f};
  float lin = 0.f, cnt = 0.f, sig = 0.f, sum_gx = 0.f, sum_g = 0.f, sum_h = 0.f;
  RowGrad<float> rg{};
  float my_lse_c = 0.f, my_g_c = 0.f;  // MODE_BWD_DK: statistic of the owned column
  if (MODE == MODE_BWD_DQ && me_valid) rg = make_row_grad(sp, p.stats_in, p.g_stats, p.n, me);
  if (MODE == MODE_BWD_DK && me_valid && sp.col_lse && p.col_in && p.g_col &&
      p.col_in[me] != neg_inf<float>()) {
    my_lse_c = p.col_in[me];
    my_g_c = p.g_col[me];
  }
  const bool has_col = sp.col_lse && p.col_in != nullptr && p.g_col != nullptr;
  // backward: this block's gradient block, rows own0 + ty + 8 r (r < 8) of the owned side and D
  // columns dc0 + 64 (c / 4) + 16 (c % 4) + tx (c < kAccC): fp32 registers across the whole loop
  const int ty = tid / 16, tx = tid % 16;
  const int64_t dc0 = static_cast<int64_t>(blockIdx.y) * kDC;
  float* const out = MODE == MODE_BWD_DQ ? p.dq : p.dk;
  constexpr int kAccC = kDC / kSub * 4;  // columns of the gradient block per thread
  float acc[8][kAccC];
  static_assert(kDC % kSub == 0 && kSub == 64 && kThreads == 128 && kBM == 64 && kBN == 64,
                "the gradient block mapping assumes 128 threads, 64 x 64 tiles, 64-wide sub-chunks");
#pragma unroll
  for (int r = 0; r < 8; ++r)
#pragma unroll
    for (int c = 0; c < kAccC; ++c) acc[r][c] = 0.f;

  for (int64_t o0 = 0; o0 < n_other; o0 += kBN) {
    const int64_t i0 = kOwnRows ? own0 : o0, j0 = kOwnRows ? o0 : own0;
    __syncthreads();  // the previous step is done with the shared tiles
    dot_tile<Tin, DIST>(p, i0, j0, s_x, s_raw, s_nq, s_nk, s_al, s_th, s_pc);
    if (MODE == MODE_BWD_DK && tid < kBM) {
      RowGrad<float> r = {};
      if (i0 + tid < p.n) r = make_row_grad(sp, p.stats_in, p.g_stats, p.n, i0 + tid);
      s_rl[0][tid] = r.lse[0]; s_rl[1][tid] = r.lse[1];
      s_rg[0][tid] = r.g[0]; s_rg[1][tid] = r.g[1];
      s_rlin[tid] = r.g_lin; s_rsig[tid] = r.g_sig;
      __syncwarp();
    }
    if (MODE == MODE_BWD_DK) __syncthreads();

    if (MODE == MODE_FWD_ROWS) {  // ---- online accumulators of row me (math.md 1.1)
      for (int k = 0; k < sp.n_sums; ++k) {
        const float beta = static_cast<float>(sp.beta[k]);
        float tmax = neg_inf<float>();
        for (int c = half * 32; c < half * 32 + 32; ++c) {
          const int64_t j = j0 + c;
          if (!me_valid || j >= p.m) break;
          const Elem<float> e = elem_dev<DIST>(p, s_x, s_nq, s_nk, s_al, s_th, s_pc, bias,
                                               L, c, me, j, nullptr);
          if (sum_sees(sp, k, e)) tmax = t_max(tmax, beta * e.x);
        }
        tmax = pair_max(tmax);
        const float mnew = t_max(run_m[k], tmax);
        float l = lse_rescale(run_l[k], run_m[k], mnew);
        for (int c = half * 32; c < half * 32 + 32; ++c) {
          const int64_t j = j0 + c;
          if (!me_valid || j >= p.m || tmax == neg_inf<float>()) break;
          l += sum_term(sp, k, elem_dev<DIST>(p, s_x, s_nq, s_nk, s_al, s_th, s_pc, bias,
                                              L, c, me, j, nullptr), mnew);
        }
        run_m[k] = mnew;
        run_l[k] = l;
      }
      if (sp.lin || sp.sigmoid) {
        for (int c = half * 32; c < half * 32 + 32; ++c) {
          const int64_t j = j0 + c;
          if (!me_valid || j >= p.m) break;
          const Elem<float> e = elem_dev<DIST>(p, s_x, s_nq, s_nk, s_al, s_th, s_pc, bias,
                                               L, c, me, j, nullptr);
          if (e.y) { lin += e.x; cnt += 1.f; }
          if (sp.sigmoid) sig += sig_term(e);
        }
      }
    } else if (MODE == MODE_FWD_COLS) {  // ---- column LSE of column me over allowed rows
      float tmax = neg_inf<float>();
#pragma unroll 1
      for (int r = half * 32; r < half * 32 + 32; ++r) {
        const int64_t i = i0 + r;
        if (!me_valid || i >= p.n) break;
        const Elem<float> e = elem_dev<DIST>(p, s_x, s_nq, s_nk, s_al, s_th, s_pc, bias,
                                             r, L, i, me, nullptr);
        if (e.allowed) tmax = t_max(tmax, e.x);
      }
      tmax = pair_max(tmax);
      const float mnew = t_max(run_m[0], tmax), ref = lse_ref(mnew);
      float l = lse_rescale(run_l[0], run_m[0], mnew);
#pragma unroll 1
      for (int r = half * 32; r < half * 32 + 32; ++r) {
        const int64_t i = i0 + r;
        if (!me_valid || i >= p.n || tmax == neg_inf<float>()) break;
        const Elem<float> e = elem_dev<DIST>(p, s_x, s_nq, s_nk, s_al, s_th, s_pc, bias,
                                             r, L, i, me, nullptr);
        if (e.allowed) l += t_exp(e.x - ref);
      }
      run_m[0] = mnew;
      run_l[0] = l;
    } else {  // ---- backward: G and H in place of the dot products (math.md 1.2-1.4)
      // each element of the tile is read and rewritten by one thread only: no sync needed here
      for (int u = 0; u < 32; ++u) {
        const int c = kOwnRows ? half * 32 + u : L;
        const int r = kOwnRows ? L : half * 32 + u;
        const int64_t i = i0 + r, j = j0 + c;
        float H = 0.f;
        if (me_valid && i < p.n && j < p.m) {
          float inner;
          const Elem<float> e = elem_dev<DIST>(p, s_x, s_nq, s_nk, s_al, s_th, s_pc, bias,
                                               r, c, i, j, &inner);
          float lse_c = 0.f, g_c = 0.f;
          RowGrad<float> rr;
          if (MODE == MODE_BWD_DQ) {
            rr = rg;
            if (has_col && p.col_in[j] != neg_inf<float>()) { lse_c = p.col_in[j]; g_c = p.g_col[j]; }
          } else {
            rr.lse[0] = s_rl[0][r]; rr.lse[1] = s_rl[1][r];
            rr.g[0] = s_rg[0][r]; rr.g[1] = s_rg[1][r];
            rr.g_lin = s_rlin[r]; rr.g_sig = s_rsig[r];
            lse_c = my_lse_c;
            g_c = my_g_c;
          }
          const float G = grad_coef(sp, e, rr, has_col, lse_c, g_c);
          H = G * h_factor<DIST>(inner, s_al[r], gamma);
          sum_g += G;
          sum_gx += G * e.x;
          sum_h += H;
        }
        s_x[r * kLDX + c] = H;
      }
      if (out != nullptr) {  // acc += H K_J (dq) or H^T Q_I (dk) over this block's D chunk
        const Tin* src = static_cast<const Tin*>(MODE == MODE_BWD_DQ ? p.k : p.q);
        const int64_t s0 = MODE == MODE_BWD_DQ ? p.sk0 : p.sq0, s1 = MODE == MODE_BWD_DQ ? p.sk1 : p.sq1;
        const int64_t src0 = MODE == MODE_BWD_DQ ? j0 : i0, nsrc = MODE == MODE_BWD_DQ ? p.m : p.n;
#pragma unroll
        for (int sc = 0; sc < kDC / kSub; ++sc) {
          const int64_t d0 = dc0 + sc * kSub;
          if (d0 >= p.d) break;  // block-uniform
          __syncthreads();  // H written / previous sub-chunk consumed
          stage_op_f32<Tin>(src, s0, s1, src0, nsrc, d0, p.d, s_op);
          __syncthreads();
#pragma unroll 4
          for (int t = 0; t < kBN; ++t) {  // [8] x [4] outer product: [64, 64] @ [64, kSub] per block
            float h[8], o[4];
#pragma unroll
            for (int r = 0; r < 8; ++r)
              h[r] = MODE == MODE_BWD_DQ ? s_x[(ty + 8 * r) * kLDX + t] : s_x[t * kLDX + ty + 8 * r];
#pragma unroll
            for (int c = 0; c < 4; ++c) o[c] = s_op[t * kLDO + tx + 16 * c];
#pragma unroll
            for (int r = 0; r < 8; ++r)
#pragma unroll
              for (int c = 0; c < 4; ++c) acc[r][sc * 4 + c] += h[r] * o[c];
          }
        }
      }
    }
  }

  // ---- epilogues: combine the thread pair, write what this block owns
  if (MODE == MODE_FWD_ROWS) {
    for (int k = 0; k < sp.n_sums; ++k) run_l[k] = pair_sum(run_l[k]);
    lin = pair_sum(lin);
    cnt = pair_sum(cnt);
    sig = pair_sum(sig);
    if (me_valid && half == 0) {
      for (int k = 0; k < sp.n_sums; ++k) p.stats[k * p.n + me] = lse_finish(run_m[k], run_l[k]);
      if (sp.lin) {
        p.stats[sp.i_lin() * p.n + me] = lin;
        p.stats[sp.i_cnt() * p.n + me] = cnt;
      }
      if (sp.sigmoid) p.stats[sp.i_sig() * p.n + me] = sig;
    }
  } else if (MODE == MODE_FWD_COLS) {
    run_l[0] = pair_sum(run_l[0]);
    if (me_valid && half == 0) p.col[me] = lse_finish(run_m[0], run_l[0]);
  } else {
    sum_g = pair_sum(sum_g);
    sum_gx = pair_sum(sum_gx);
    sum_h = pair_sum(sum_h);
    if (MODE == MODE_BWD_DQ && me_valid && half == 0 && blockIdx.y == 0) {  // once per row
      if (p.gx) p.gx[me] += sum_gx;
      if (p.gsum) p.gsum[me] += sum_g;
    }
    if (out != nullptr) {  // the gradient block, added once
      if (DIST) {  // dq_i -= (sum_j H_ij) q_i ; dk_j -= (sum_i H_ij) k_j
        if (half == 0) s_sumh[L] = sum_h;
        __syncthreads();
      }
      const Tin* x = static_cast<const Tin*>(MODE == MODE_BWD_DQ ? p.q : p.k);
      const int64_t s0 = MODE == MODE_BWD_DQ ? p.sq0 : p.sk0, s1 = MODE == MODE_BWD_DQ ? p.sq1 : p.sk1;
      const int64_t n_own = MODE == MODE_BWD_DQ ? p.n : p.m;
#pragma unroll
      for (int r = 0; r < 8; ++r) {
        const int64_t row = own0 + ty + 8 * r;
        if (row >= n_own) break;
#pragma unroll
        for (int c = 0; c < kAccC; ++c) {
          const int64_t e = dc0 + (c / 4) * kSub + (c % 4) * 16 + tx;
          if (e >= p.d) continue;
          float v = acc[r][c];
          if (DIST) v -= s_sumh[ty + 8 * r] * to_f(x[row * s0 + e * s1]);
          out[row * p.d + e] += v;
        }
      }
    }
  }
}

// Blocks per SM the register budget aims at: the backward holds a 128-register gradient block
// next to the logits tile, which fits without spills in 255 registers (2 blocks per SM), not in
// ptxas's own choice of 168; the forward fits in 128 (4 blocks), where ptxas's own choice for
// the NVRTC entries (72 or 96 registers) spills.
template <int MODE>
constexpr int kMinBlocks = MODE == MODE_BWD_DQ || MODE == MODE_BWD_DK ? 2 : 4;

template <typename Tin, int MODE, bool DIST>
__global__ void __launch_bounds__(kThreads, kMinBlocks<MODE>) tile_kernel(const KParams p) {
  tile_body<Tin, MODE, DIST>(p);
}

// NVRTC entry (CuPy RawModule): the arguments through a device buffer holding a KParams.
template <typename Tin, int MODE, bool DIST>
__global__ void __launch_bounds__(kThreads, kMinBlocks<MODE>) tile_kernel_rtc(const KParams* p) {
  tile_body<Tin, MODE, DIST>(*p);
}

}  // namespace tilecl
