// cpu_common.h: the headers every CPU kernel translation unit includes FIRST, before it switches
// the target ISA (kernels_avx2.cpp). Their inline functions and templates are then compiled for
// the baseline ISA in every translation unit, so the one copy the linker keeps runs on any x86-64
// CPU; only the code of the ISA sections (namespace tilecl::cpu::<isa>) uses AVX2.
#pragma once

#ifdef _OPENMP
#include <omp.h>
#endif
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <climits>
#include <cstring>
#include <cstdlib>
#include <stdexcept>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include "../tile_api.h"
#include "../tile_math.h"

// The AVX2 + FMA translation unit is built with GCC on x86-64 (#pragma GCC target); elsewhere
// only the portable one (compiled for the baseline ISA) exists.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define TILECL_HAVE_AVX2_TU 1
#endif

namespace tilecl {
namespace cpu {

#ifndef _OPENMP  // built without OpenMP: one thread
inline int omp_get_max_threads() { return 1; }
inline int omp_get_thread_num() { return 0; }
#endif

// Entry points of the ISA sections (csrc/cpu/kernels.h), defined in kernels_<isa>.cpp. float64
// is the parity path (gradcheck, golden tests): only the portable section compiles it.
namespace generic {
void forward_f32(const Problem& p);
void backward_f32(const Problem& p);
void forward_f64(const Problem& p);
void backward_f64(const Problem& p);
}  // namespace generic
namespace avx2 {
void forward_f32(const Problem& p);
void backward_f32(const Problem& p);
}  // namespace avx2

}  // namespace cpu
}  // namespace tilecl
