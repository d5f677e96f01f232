// tile_cpu.cpp: entry points of the CPU path. Checks the problem and picks the ISA section at
// run time: AVX2 + FMA (kernels_avx2.cpp) for fp32 when the CPU has it, else the portable one
// (kernels_generic.cpp, also the float64 path). TILECL_CPU_ISA=generic forces the portable one
// (the tests run both).
#include "cpu_common.h"

namespace tilecl {
namespace cpu {
namespace {

bool use_avx2() {
#ifdef TILECL_HAVE_AVX2_TU
  static const bool cpu_has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const char* env = std::getenv("TILECL_CPU_ISA");
  return cpu_has && !(env && std::strcmp(env, "generic") == 0);
#else
  return false;
#endif
}

void check(const Problem& p) {
  if (p.dtype < 0 || p.dtype > 3) throw std::invalid_argument("tilecl._C: unknown dtype code");
  if (p.n < 0 || p.m < 0 || p.d < 0) throw std::invalid_argument("tilecl._C: negative size");
  if (p.spec.n_sums < 0 || p.spec.n_sums > 2) throw std::invalid_argument("tilecl._C: n_sums");
  if (p.spec.weight == W_DENSE && p.aux.mw <= 0)
    throw std::invalid_argument("tilecl._C: dense weights need Mw > 0");
}

void check_topk(const Problem& p) {
  if (p.topk < 0 || (p.topk > 0 && p.n > 0 && (!p.top_vals || !p.top_idx)))
    throw std::invalid_argument("tilecl._C: topk needs top_vals [N, topk] and top_idx [N, topk]");
}

}  // namespace
}  // namespace cpu

void cpu_forward(const Problem& p) {
  cpu::check(p);
  cpu::check_topk(p);
  if (p.dtype == DT_F64) return cpu::generic::forward_f64(p);
#ifdef TILECL_HAVE_AVX2_TU
  if (cpu::use_avx2()) return cpu::avx2::forward_f32(p);
#endif
  cpu::generic::forward_f32(p);
}

void cpu_backward(const Problem& p) {
  cpu::check(p);
  if (p.dtype == DT_F64) return cpu::generic::backward_f64(p);
#ifdef TILECL_HAVE_AVX2_TU
  if (cpu::use_avx2()) return cpu::avx2::backward_f32(p);
#endif
  cpu::generic::backward_f32(p);
}

}  // namespace tilecl
