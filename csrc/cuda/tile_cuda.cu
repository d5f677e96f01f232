// tile_cuda.cu: host launchers of the CUDA tile template (tile_kernels.cuh). Launch on the
// caller's stream with the grid of plan_launch (tile_launch.h, the plan tilecl._C.launch_plan
// reports), check every launch; the kernels write (forward) or accumulate (backward) into
// buffers the caller allocated. fp32 compute for fp32 / fp16 / bf16 inputs.
// TILECL_CUDA_SYNC_CHECK=1: synchronize the device after every launch and raise an error naming
// the kernel that faulted (otherwise an execution fault surfaces at a later, unrelated sync).
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "../tile_api.h"
#include "tile_kernels.cuh"

namespace tilecl {
namespace {

void check(cudaError_t err, const std::string& what) {
  if (err != cudaSuccess)
    throw std::runtime_error("tilecl CUDA " + what + ": " + cudaGetErrorString(err));
}

template <typename Tin>
const char* type_name();
template <>
const char* type_name<float>() { return "float32"; }
template <>
const char* type_name<__half>() { return "float16"; }
template <>
const char* type_name<__nv_bfloat16>() { return "bfloat16"; }

const char* mode_name(int mode) {
  static const char* names[] = {"fwd_rows", "fwd_cols", "bwd_dq", "bwd_dk"};
  return names[mode];
}


template <typename Tin, int MODE, bool DIST>
void launch(const KParams& kp, bool grad_out, cudaStream_t stream) {
  const LaunchPlan pl = plan_launch(MODE, kp.n, kp.m, kp.d, sizeof(Tin), DIST, grad_out);
  if (pl.grid_x <= 0 || pl.grid_y <= 0) return;
  if (pl.grid_x > 0x7fffffffLL || pl.grid_y > 0xffffLL)
    throw std::runtime_error("tilecl CUDA: too many blocks");
  const std::string name = std::string("kernel tile_kernel<") + type_name<Tin>() + ", " +
                           mode_name(MODE) + (DIST ? ", dist>" : ", dot>") + " (grid " +
                           std::to_string(pl.grid_x) + " x " + std::to_string(pl.grid_y) + ")";
  const bool sync = sync_check_enabled();  // read first: a malformed value launches nothing
  tile_kernel<Tin, MODE, DIST><<<dim3(static_cast<unsigned>(pl.grid_x), static_cast<unsigned>(pl.grid_y)),
                                 dim3(pl.threads), 0, stream>>>(kp);
  check(cudaGetLastError(), name + " launch");
  if (sync) {
    check(cudaDeviceSynchronize(), name + " failed (TILECL_CUDA_SYNC_CHECK)");
    check(cudaGetLastError(), name + " failed (TILECL_CUDA_SYNC_CHECK)");
  }
}

// dtype code and logit kind -> template parameters (the BOOL_SWITCH of the CUDA side)
template <int MODE>
void run_mode(const KParams& kp, bool grad_out, cudaStream_t stream) {
  const bool dist = kp.spec.logit == LOGIT_DIST;
  switch (kp.dtype) {
    case DT_F32:
      return dist ? launch<float, MODE, true>(kp, grad_out, stream)
                  : launch<float, MODE, false>(kp, grad_out, stream);
    case DT_F16:
      return dist ? launch<__half, MODE, true>(kp, grad_out, stream)
                  : launch<__half, MODE, false>(kp, grad_out, stream);
    case DT_BF16:
      return dist ? launch<__nv_bfloat16, MODE, true>(kp, grad_out, stream)
                  : launch<__nv_bfloat16, MODE, false>(kp, grad_out, stream);
    default:
      throw std::invalid_argument("tilecl CUDA: float32, float16 and bfloat16 inputs only");
  }
}

}  // namespace

void cuda_forward(const Problem& p, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const KParams kp = typed<float>(p);
  run_mode<MODE_FWD_ROWS>(kp, false, s);
  if (p.spec.col_lse) run_mode<MODE_FWD_COLS>(kp, false, s);
}

void cuda_backward(const Problem& p, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const KParams kp = typed<float>(p);
  if (kp.dq || kp.gx || kp.gsum) run_mode<MODE_BWD_DQ>(kp, kp.dq != nullptr, s);
  if (kp.dk) run_mode<MODE_BWD_DK>(kp, true, s);
}

}  // namespace tilecl
