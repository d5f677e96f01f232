// tile_launch.h: tile sizes, launch plan and checked mode of the CUDA tile kernels
// (tile_kernels.cuh). Plain C++ with no CUDA header: the tile sizes are compiled into the kernels
// (nvcc and NVRTC, where this file is part of tilecl._C.rtc_source()), and the host part (the
// plan, the flag parser) into the nvcc launcher (tile_cuda.cu) and the CPU bindings, which hand
// the same plan to the NVRTC launcher (_native_backend.py) and to the tests.
#pragma once

#ifndef __CUDACC_RTC__
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <stdexcept>
#include <string>
#endif

namespace tilecl {

enum Mode { MODE_FWD_ROWS = 0, MODE_FWD_COLS = 1, MODE_BWD_DQ = 2, MODE_BWD_DK = 3 };

constexpr int kThreads = 128;  // 4 warps
constexpr int kBM = 64;        // rows of a tile = rows (columns) a block owns
constexpr int kBN = 64;        // columns of a tile: one step of the loop over the other side
constexpr int kBK = 32;        // depth of one staged chunk of q / k (the logits)
constexpr int kDC = 256;       // backward: columns of D a block owns (its gradient block [64, kDC])
constexpr int kSub = 64;       // backward: D columns of one staged operand sub-chunk (kDC / kSub steps)

// ---- backward cost per pass (a pass = one launch: dq over row blocks, or dk over column blocks) ----
// Each block owns 64 output rows x kDC columns of D and keeps that gradient block in registers
// (fp32, 128 per thread) across its whole loop over the other side, then adds it to global memory
// once. The logits tile needs all of D, so a block recomputes it: every D chunk beyond the first
// costs one more logits GEMM (C = ceil(D / kDC) chunks). Per pass, with B = own / 64 blocks of
// rows, T = other / 64 tiles, s = input bytes per element:
//   logits GEMM   C * 2 own other D flops (tensor cores, WMMA bf16 / fp16; fp32 SIMT for fp32)
//   H GEMM        2 own other D flops (fp32 SIMT, 8 x 4 register tile per thread and sub-chunk)
//   logits inputs C (T own + B other) D s bytes read (each block streams the other side once per
//                 D chunk and restages its own rows each tile; blocks in flight share them in L2)
//   H operand     B other D s bytes read (each block reads its kDC columns of the other side)
//   gradient      own D 4 bytes read + own D 4 bytes written (added once; the caller zeroes)
// N = M = 65536, D = 768 (B = T = 1024, C = 3):
//   bf16: 19.8 TFLOP logits (tensor cores) + 6.6 TFLOP H (fp32); 618 GB logits inputs +
//         103 GB operand read, mostly from L2; 0.4 GB gradient read + written, private
//   fp32: the same flops on SIMT; 1237 GB + 206 GB read, 0.4 GB gradient
// The previous layout (grid over row blocks only, H K added to the [64, D] fp32 gradient slab in
// global memory after every column tile) read and wrote 2 T own D 4 = 412 GB of private traffic
// per pass, none of which the blocks can share through L2, and ran the H GEMM with one shared
// memory load per FMA. Why this layout and kDC = 256 (128 accumulator registers per thread, 238
// to 252 in all with nvcc 13 and no spill, 2 blocks of 4 warps per SM): the whole [64, D] block
// on chip needs 196 KB of shared memory at D = 768 (one block of 4 warps per SM on H100, none on
// A100); kDC = 128 runs at the same 2 blocks per SM (at 3 the fp32 distance kernel spills) with
// twice the recompute; an H tile written to global memory for a library GEMM (the triton "gemm"
// backward) needs cuBLAS, which tilecl._C does not link.
// The price: the logits GEMM 3 times at D = 768 (3 x 2 N M D against 2 N M D for the H GEMM) and
// 3 times its input reads (618 GB against 206 GB in bf16). Those reads are shared: the grid runs
// x (owned blocks) fastest, so the blocks in flight (2 per SM) hold one D chunk and walk the same
// tiles of the other side together, and their own tiles (96 KB each at D = 768, bf16) fit in L2.
// Unmeasured until a GPU run; an H tile with tensor cores for the H GEMM is the next step.

#ifndef __CUDACC_RTC__
// Grid and global traffic of one launch of tile_kernel<Tin, mode, dist> (counts in bytes, flops).
struct LaunchPlan {
  int64_t grid_x = 0;     // blocks over the owned side (rows: fwd rows / bwd dq, columns otherwise)
  int64_t grid_y = 0;     // D chunks of the gradient (backward), 1 for the forward
  int threads = kThreads;
  int d_chunk = 0;        // kDC for the backward with a gradient output, else D
  int64_t tiles = 0;      // column (row) tiles each block loops over
  int64_t logits_read = 0;   // q / k staged for the logits, every chunk, every tile
  int64_t operand_read = 0;  // q / k staged for the H GEMM (backward with a gradient output)
  int64_t own_read = 0;      // own rows of q / k in the distance epilogue (dq_i -= sum_j H_ij q_i)
  int64_t grad_read = 0;     // the gradient block read once (it is accumulated into)
  int64_t grad_written = 0;  // and written once
  int64_t min_bytes = 0;  // every block streams the other side once per D chunk + gradient once
  double flops_logits = 0, flops_h = 0;
  int64_t total_bytes() const {
    return logits_read + operand_read + own_read + grad_read + grad_written;
  }
  int64_t private_bytes() const { return own_read + grad_read + grad_written; }
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// mode: Mode; n, m, d: problem sizes; in_bytes: bytes per q / k element (4, 2); dist: distance
// logits; grad_out: the backward writes dq (dk) (false: only the row sums gx / gsum).
inline LaunchPlan plan_launch(int mode, int64_t n, int64_t m, int64_t d, int in_bytes, bool dist,
                              bool grad_out) {
  LaunchPlan pl;
  const bool own_rows = mode == MODE_FWD_ROWS || mode == MODE_BWD_DQ;
  const bool bwd = mode == MODE_BWD_DQ || mode == MODE_BWD_DK;
  const int64_t own = own_rows ? n : m, other = own_rows ? m : n;
  if (own <= 0 || other < 0 || d < 0) return pl;
  const bool chunked = bwd && grad_out && d > 0;
  pl.grid_x = ceil_div(own, kBM);
  pl.grid_y = chunked ? ceil_div(d, kDC) : 1;
  pl.d_chunk = chunked ? kDC : static_cast<int>(d < 0x7fffffff ? d : 0x7fffffff);
  pl.tiles = ceil_div(other, kBN);
  const int64_t s = in_bytes;
  pl.logits_read = pl.grid_y * (pl.tiles * own + pl.grid_x * other) * d * s;
  pl.flops_logits = 2.0 * pl.grid_y * pl.grid_x * pl.tiles * kBM * kBN * (ceil_div(d, kBK) * kBK);
  pl.min_bytes = pl.grid_y * pl.grid_x * other * d * s;
  if (chunked) {
    pl.operand_read = pl.grid_x * other * d * s;
    pl.flops_h = 2.0 * pl.grid_x * pl.tiles * kBM * kBN * (ceil_div(d, kSub) * kSub);
    pl.own_read = dist ? own * d * s : 0;
    pl.grad_read = own * d * 4;
    pl.grad_written = own * d * 4;
    pl.min_bytes += own * d * 4;
  }
  return pl;
}

// TILECL_CUDA_SYNC_CHECK: 1 (on) for 1 / true / yes / on, 0 (off) for unset, empty, 0 / false /
// no / off, -1 for anything else (the caller raises).
inline int parse_sync_check(const char* v) {
  if (v == nullptr || v[0] == '\0') return 0;
  static const char* on[] = {"1", "true", "yes", "on", "TRUE", "True", "YES", "Yes", "ON", "On"};
  static const char* off[] = {"0", "false", "no", "off", "FALSE", "False", "NO", "No", "OFF", "Off"};
  for (const char* s : on)
    if (strcmp(v, s) == 0) return 1;
  for (const char* s : off)
    if (strcmp(v, s) == 0) return 0;
  return -1;
}

// The checked synchronizing mode, read at every launch (std::invalid_argument when malformed).
inline bool sync_check_enabled() {
  const char* v = getenv("TILECL_CUDA_SYNC_CHECK");
  const int on = parse_sync_check(v);
  if (on < 0)
    throw std::invalid_argument("TILECL_CUDA_SYNC_CHECK must be 1/true/yes/on or 0/false/no/off, got '" +
                                std::string(v) + "'");
  return on == 1;
}
#endif

}  // namespace tilecl
