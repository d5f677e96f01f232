#!/usr/bin/env bash
# The whole GPU benchmark in one call on a GPU machine (no network there): device and versions,
# baseline wheels from .whl/ (carry it), tilecl editable install, the GPU suite (< 8 min on one
# H100, budgeted inside), results copied to $OUT when set. Extra arguments go to `python -m bench`.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# first-call autotuning of every kernel key in seconds, not minutes (TILECL_TRITON_AUTOTUNE=full
# for the whole candidate list when the run has the time)
export TILECL_TRITON_AUTOTUNE=${TILECL_TRITON_AUTOTUNE:-small}
nvidia-smi --query-gpu=name,driver_version --format=csv
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps .whl/*.whl || echo "baseline wheels: install failed"
fi
$PY -m pip install -q --no-build-isolation --no-deps -e . || echo "tilecl: editable install failed"
$PY -m bench --suite gpu "$@"
rc=$?
if [ -n "${OUT:-}" ]; then
    latest=$(ls -td bench/results/*/ | head -1)
    cp -r "$latest" "$OUT"/ && echo "copied $latest to $OUT"
fi
exit $rc
