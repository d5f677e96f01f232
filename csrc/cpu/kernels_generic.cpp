// kernels_generic.cpp: the CPU kernels for the baseline ISA of the build (any x86-64, aarch64,
// ...): the fallback of kernels_avx2.cpp, and the float64 path everywhere.
#include "cpu_common.h"

#define TCL_ISA generic
#include "kernels.h"

namespace tilecl {
namespace cpu {
namespace generic {

void forward_f32(const Problem& p) { forward_typed<float>(p); }
void backward_f32(const Problem& p) { backward_typed<float>(p); }
void forward_f64(const Problem& p) { forward_typed<double>(p); }
void backward_f64(const Problem& p) { backward_typed<double>(p); }

}  // namespace generic
}  // namespace cpu
}  // namespace tilecl
