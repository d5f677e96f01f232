// kernels.h: one ISA section of the CPU path, the forward and backward of the tile template for
// every flag combination (math.md 1-2; python/tilecl/_torch_tiled.py is the reference).
//
// Included once per ISA by csrc/cpu/kernels_<isa>.cpp, after cpu_common.h and with TCL_ISA
// naming the namespace (generic, avx2): every function below is distinct per ISA, and the shared
// headers of cpu_common.h were compiled before the ISA switch (see cpu_common.h).
#pragma once

#ifndef TCL_ISA
#error "kernels.h is included by csrc/cpu/kernels_<isa>.cpp, which define TCL_ISA"
#endif

#include "gemm.h"
#include "tiles.h"
#include "epilogue_vec.h"
#include "sweep.h"
#include "forward.h"
#include "backward.h"

namespace tilecl {
namespace cpu {
namespace TCL_ISA {

template <typename T>
void forward_typed(const Problem& p) {
  dispatch(p, [&](auto dist, auto pos, auto wm) {
    forward_impl<T, decltype(dist)::value, decltype(pos)::value, decltype(wm)::value>(p);
  });
}

template <typename T>
void backward_typed(const Problem& p) {
  dispatch(p, [&](auto dist, auto pos, auto wm) {
    backward_impl<T, decltype(dist)::value, decltype(pos)::value, decltype(wm)::value>(p);
  });
}

}  // namespace TCL_ISA
}  // namespace cpu
}  // namespace tilecl
