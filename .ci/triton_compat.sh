#!/usr/bin/env bash
# Compile the Triton kernels with the Triton of the GPU machine (3.6.0) too:
# the pinned 3.7.1 runs the tests, but a GPU run uses whatever Triton its torch was built with.
# The wheel is unpacked beside the venv's own Triton (PYTHONPATH first), once per venv.
# (Triton 3.6's interpreter cannot run under NumPy >= 2.3, so this is a compile check only.)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
VER=${TILECL_TRITON_COMPAT:-3.6.0}
DIR=.venv/triton-$VER
if [ ! -f "$DIR/.installed" ]; then
  rm -rf "$DIR"
  "$PY" -m pip install -q --no-deps --target "$DIR" "triton==$VER"
  touch "$DIR/.installed"
fi
PYTHONPATH="$DIR" "$PY" -c "import triton, sys; sys.exit(triton.__version__ != '$VER')" || {
  echo "triton_compat: $DIR does not hold triton $VER" >&2; exit 1; }
# every pass of the two main flag sets in bf16 (the full report runs with the pinned Triton)
PYTHONPATH="$DIR" "$PY" .ci/triton_compile_report.py --flags clip siglip topk32 --dtype bf16
