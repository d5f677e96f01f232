// kernels_avx2.cpp: the fp32 CPU kernels compiled for AVX2 + FMA (Haswell and later, Zen),
// chosen at run time by tile_cpu.cpp when the CPU has them. The shared headers come first
// (cpu_common.h: baseline ISA, one definition for the whole module); only the ISA section after
// the target switch, in namespace tilecl::cpu::avx2, is AVX2 code.
#include "cpu_common.h"

#ifdef TILECL_HAVE_AVX2_TU
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

#define TCL_ISA avx2
#define TCL_AVX2 1
#include "kernels.h"

namespace tilecl {
namespace cpu {
namespace avx2 {

void forward_f32(const Problem& p) { forward_typed<float>(p); }
void backward_f32(const Problem& p) { backward_typed<float>(p); }

}  // namespace avx2
}  // namespace cpu
}  // namespace tilecl

#pragma GCC pop_options
#endif  // TILECL_HAVE_AVX2_TU
