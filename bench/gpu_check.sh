#!/usr/bin/env bash
# The first call of a GPU session (the benchmark is bench/run_gpu.sh, the
# second): device and versions, the native CUDA build, the GPU-marked tests (bf16 at large
# shapes, tf32, both column-LSE forwards, SigLIP's fused forward, the chunked backward),
# compute-sanitizer memcheck on one small case per GPU backend. Budgeted under 8 minutes;
# everything it prints also lands in $OUT (the device tool brings that folder back).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# first-call autotuning of every kernel key in seconds, not minutes (TILECL_TRITON_AUTOTUNE=full
# for the whole candidate list when the run has the time)
export TILECL_TRITON_AUTOTUNE=${TILECL_TRITON_AUTOTUNE:-small}
OUT=${OUT:-/tmp/tilecl-gpu-check}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.txt") 2>&1
date -u
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
command -v nvcc >/dev/null && nvcc --version | tail -1
git rev-parse --short HEAD 2>/dev/null
echo "== native CUDA build (sm_90 only, to save time)"
TILECL_BUILD_CUDA=1 TILECL_CUDA_ARCHS=90 MAX_JOBS=${MAX_JOBS:-16} \
    timeout 240 $PY -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -5
$PY -c "import tilecl._C as c; print('tilecl._C has CUDA:', c.has_cuda())"
echo "== pytest -m gpu"
timeout 300 $PY -m pytest -q -m gpu tests --junitxml="$OUT/gpu_tests.xml" -p no:cacheprovider \
    2>&1 | tail -40
echo "== compute-sanitizer memcheck, symmetric CLIP and SigLIP, N = 300, D = 100, bf16"
cat > "$OUT/sanitize_case.py" <<'PY'
import sys, torch, tilecl
backend = sys.argv[1]
g = torch.Generator(device="cuda").manual_seed(0)
a, b = (torch.nn.functional.normalize(torch.randn(300, 100, device="cuda", generator=g), dim=1)
        .bfloat16().requires_grad_() for _ in range(2))
(tilecl.clip_loss(a, b, 20.0, backend=backend)
 + tilecl.siglip_loss(a, b, 10.0, -10.0, backend=backend)).backward()
torch.cuda.synchronize()
print(backend, "ok", float(a.grad.float().norm()))
PY
for backend in triton native; do
    if command -v compute-sanitizer >/dev/null; then
        timeout 120 compute-sanitizer --tool memcheck --error-exitcode 9 \
            $PY "$OUT/sanitize_case.py" "$backend" 2>&1 | tail -4
    else
        echo "compute-sanitizer not found"
    fi
done
