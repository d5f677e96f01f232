// tile_api.h: the host-side entry points of the native backend (CPU always, CUDA when built).
// They take the one parameter struct, Problem (tile_math.h): raw pointers, sizes, strides (in
// elements), dtype code and the pass's buffers; no torch. The Python side
// (python/tilecl/_native_backend.py) fills it through bindings.cpp.
#pragma once

#include <stdint.h>

#include "tile_math.h"

namespace tilecl {

// Forward: writes stats, col and (topk > 0) top_vals / top_idx of p.
void cpu_forward(const Problem& p);
// Backward: accumulates dq, dk, gx, gsum of p from stats_in, col_in, g_stats, g_col.
void cpu_backward(const Problem& p);

#ifdef TILECL_WITH_CUDA
// Launch on `stream` (a cudaStream_t as an integer); throws std::runtime_error on a CUDA error.
void cuda_forward(const Problem& p, void* stream);
void cuda_backward(const Problem& p, void* stream);
#endif

}  // namespace tilecl
