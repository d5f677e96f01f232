#!/usr/bin/env bash
# The first call on a lent GPU, in one command that fits 8 minutes on one H100 / H200:
#
#   versions -> pure-Python install (seconds) -> native CUDA build in the background (sm_90, no
#   LTO, -j cores, its own build folder) while the Triton GPU tests run (autotuning off) -> the
#   targets (CLIP and SigLIP, bf16, N = 65536, D = 768: every provider, a time cap each, sized by
#   its cost model) -> native tests, native timing at N = 16384, compute-sanitizer if time remains
#   -> results.md.
#
# Every step writes under $OUT as it goes (one JSON line per finished point in points.jsonl), so
# a call cut short still returns what it measured. At most 8 files: log.txt, env.json,
# points.jsonl, tests_triton.txt, native_build.txt, tests_native.txt, sanitizer.txt, results.md.
# Commit them as bench/results/<date>-<gpu>/ (env.json names the folder).
#
#   OUT=/some/dir bash bench/gpu_first.sh          # on the GPU machine, from the repo root
#   bash bench/gpu_first.sh --dry-run              # the same steps on the CPU in under a minute:
#                                                  # TRITON_INTERPRET=1, N = 64, D = 32, one point
#                                                  # per code path (each Triton process pays
#                                                  # seconds of imports), OUT a temporary folder
#                                                  # unless set, nothing installed or built (the
#                                                  # commands are printed), tests only collected
#
# Environment: PYTHON (default python3), GPU_FIRST_BUDGET_S (whole run, default 470),
# GPU_FIRST_CAP_S (one provider's point, default 40), TILECL_CUDA_ARCHS (default 90).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
case "${1:-}" in
    --dry-run) DRY=1 ;;
    "") ;;
    *) echo "usage: bash bench/gpu_first.sh [--dry-run]" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export TILECL_TRITON_AUTOTUNE=${TILECL_TRITON_AUTOTUNE:-off}
WORK=$(mktemp -d /tmp/tilecl-gpu-first.XXXXXX)
if [ $DRY = 1 ]; then
    OUT=${OUT:-$(mktemp -d /tmp/tilecl-gpu-first-dry.XXXXXX)}
    export TRITON_INTERPRET=1
    DEVICE=cpu; N=64; D=32; N_MIN=16; NATIVE_N=48; SAN="--n 20 --d 8"; SAN_BACKENDS="reference"
    # safety limits only (a loaded machine must not cut steps): the dry run itself takes about
    # 40 s of one core, most of it imports
    BUDGET=${GPU_FIRST_BUDGET_S:-900}; CAP=${GPU_FIRST_CAP_S:-120}
    TESTS_CAP=120; NATIVE_RESERVE=300; NATIVE_CAP=120; SAN_CAP=120
    ONLY=(--only clip:tilecl-triton --only siglip:tilecl-triton-gemm --only clip:dense)
    ONLY_NATIVE=(--only clip:tilecl-native)
else
    OUT=${OUT:-/tmp/tilecl-gpu-first}
    DEVICE=cuda; N=65536; D=768; N_MIN=1024; NATIVE_N=16384; SAN="--n 300 --d 100"
    SAN_BACKENDS="triton native"
    BUDGET=${GPU_FIRST_BUDGET_S:-470}; CAP=${GPU_FIRST_CAP_S:-40}
    TESTS_CAP=120; NATIVE_RESERVE=100; NATIVE_CAP=30; SAN_CAP=60
    ONLY=(); ONLY_NATIVE=()
fi
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1

T0=$SECONDS
elapsed() { echo $((SECONDS - T0)); }
# cap WANT RESERVE: WANT seconds, or what is left of the budget once RESERVE is kept back
cap() {
    local left=$((BUDGET - (SECONDS - T0) - $2))
    if [ "$left" -lt "$1" ]; then echo $((left > 0 ? left : 0)); else echo "$1"; fi
}
step() { echo; echo "== [$(elapsed) s] $*"; }
lines() { cat "$OUT/points.jsonl" 2>/dev/null | wc -l; }
# a JSON line for a point the shell had to stop (the point's own process never wrote one)
stopped() {
    printf '{"loss": "%s", "provider": "%s", "n": %s, "d": %s, "dtype": "bf16", "mode": "fwd_bwd", "device": "%s", "group": "%s", "status": "%s", "error": "%s"}\n' \
        "$1" "$2" "$3" "$D" "$DEVICE" "$4" "$5" "$6" >>"$OUT/points.jsonl"
}

step "versions ($([ $DRY = 1 ] && echo 'dry run, ')budget ${BUDGET} s, cap ${CAP} s per provider)"
date -u
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null \
    || echo "nvidia-smi: not available"
NVCC=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
"$NVCC" --version 2>/dev/null | tail -2 || echo "nvcc: not available"
$PY -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', \
torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__)"
echo "commit $(git rev-parse --short HEAD 2>/dev/null) ($(git status --porcelain 2>/dev/null | wc -l) paths changed)"

step "pure-Python install (TILECL_SKIP_NATIVE=1) and the peers' wheels in .whl/"
INSTALL=(env TILECL_SKIP_NATIVE=1 "$PY" -m pip install -q --no-build-isolation --no-deps -e .)
WHEELS=$(ls .whl/*.whl 2>/dev/null | tr '\n' ' ')
if [ $DRY = 1 ]; then
    echo "dry run, not run: ${INSTALL[*]}"
    [ -n "$WHEELS" ] && echo "dry run, not run: $PY -m pip install -q --no-index --no-deps $WHEELS"
else
    timeout 120 "${INSTALL[@]}" || echo "tilecl: pure-Python install failed (rc $?)"
    if [ -n "$WHEELS" ]; then
        # shellcheck disable=SC2086
        timeout 60 $PY -m pip install -q --no-index --no-deps $WHEELS \
            || echo "peers' wheels: install failed (rc $?)"
    fi
fi

step "environment -> env.json (device, versions, date, measured matmul rates)"
timeout 90 $PY -m bench.first env --out "$OUT" --device $DEVICE \
    --note "bench/gpu_first.sh$([ $DRY = 1 ] && echo ' --dry-run') budget ${BUDGET} s cap ${CAP} s N ${N} D ${D}" \
    || echo "env: failed (rc $?)"

# The native CUDA module, built by CMake directly into its own folder (setup.py would add
# pybind11's -flto: it sets no CMAKE_INTERPROCEDURAL_OPTIMIZATION), copied into the package
# once the Triton work is done. The same options as setup.py's TILECL_BUILD_CUDA=1 build.
NPROC=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # (nproc obeys OMP_NUM_THREADS)
step "native CUDA build in the background (sm_${TILECL_CUDA_ARCHS:-90}, no LTO, -j $NPROC) -> native_build.txt"
BUILD=$WORK/native
GEN=(); command -v ninja >/dev/null && GEN=(-G Ninja)
CONFIGURE=(cmake -S . -B "$BUILD" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release
    -DCMAKE_INTERPROCEDURAL_OPTIMIZATION=OFF -DTILECL_WITH_CUDA=ON
    "-DTILECL_CUDA_ARCHS=${TILECL_CUDA_ARCHS:-90}" "-DCMAKE_CUDA_COMPILER=$NVCC"
    "-DTILECL_OUTPUT_DIR=$BUILD/out" "-DPython_EXECUTABLE=$($PY -c 'import sys; print(sys.executable)')"
    "-Dpybind11_DIR=$($PY -m pybind11 --cmakedir 2>/dev/null)")
COMPILE=(cmake --build "$BUILD" --parallel "$NPROC")
if [ $DRY = 1 ]; then
    (echo "dry run, not run: ${CONFIGURE[*]}"; echo "dry run, not run: ${COMPILE[*]}") \
        >"$OUT/native_build.txt" 2>&1 &
else
    # done by the time the native step starts (BUILD_END seconds into the run), or killed then
    BUILD_END=$((BUDGET - NATIVE_RESERVE + 20))
    (t=$SECONDS; left() { local l=$((BUILD_END - (SECONDS - T0))); echo $((l > 1 ? l : 1)); }
     timeout "$(left)" "${CONFIGURE[@]}" && timeout "$(left)" "${COMPILE[@]}";
     rc=$?; echo "native build: rc $rc after $((SECONDS - t)) s") >"$OUT/native_build.txt" 2>&1 &
fi
BUILD_PID=$!

step "Triton GPU tests (pytest -m gpu, TILECL_TRITON_AUTOTUNE=off) -> tests_triton.txt"
TESTS=("$PY" -m pytest -q -m gpu tests/test_triton_backend.py -p no:cacheprovider -rfEs)
[ $DRY = 1 ] && TESTS+=(--collect-only)
c=$(cap $TESTS_CAP $((NATIVE_RESERVE + 60)))
if [ "$c" -ge 10 ]; then
    TILECL_TRITON_AUTOTUNE=off timeout -k 5 "$c" "${TESTS[@]}" >"$OUT/tests_triton.txt" 2>&1
    echo "rc $? (cap $c s)"; tail -3 "$OUT/tests_triton.txt"
else
    echo "no time left" | tee "$OUT/tests_triton.txt"
fi

step "targets: CLIP and SigLIP, bf16, N = $N, D = $D, forward + backward -> points.jsonl"
TARGETS_END=$((BUDGET - NATIVE_RESERVE))
timeout 60 $PY -m bench.first plan --out "$OUT" --device $DEVICE --group target --n $N --d $D \
    --dtype bf16 --cap-s "$CAP" --n-min $N_MIN "${ONLY[@]}" >"$WORK/plan.txt" \
    || echo "plan: failed (rc $?)"
# point GROUP LOSS PROVIDER N EST CAP: one process, killed at CAP; a line in points.jsonl either way
point() {
    local before rc
    before=$(lines)
    timeout -k 5 "$6" $PY -m bench.first point --out "$OUT" --device $DEVICE --group "$1" \
        --loss "$2" --provider "$3" --n "$4" --d $D --dtype bf16 --plan-s "$5" </dev/null
    rc=$?
    [ "$(lines)" -gt "$before" ] && return  # its record is written (a kill while exiting is harmless)
    if [ $rc = 124 ] || [ $rc = 137 ]; then
        echo "$2 $3 N=$4: killed at its cap of $6 s (plan $5 s)"
        stopped "$2" "$3" "$4" "$1" timeout "killed at the cap of $6 s (plan $5 s)"
    else
        stopped "$2" "$3" "$4" "$1" error "process exit status $rc"
    fi
}
while read -r loss prov n est; do
    c=$(cap "$CAP" "$NATIVE_RESERVE")
    if [ "$c" -lt 5 ] || [ "$(elapsed)" -ge "$TARGETS_END" ]; then
        stopped "$loss" "$prov" "$n" target skipped "time budget: ${BUDGET} s run"
        continue
    fi
    point target "$loss" "$prov" "$n" "$est" "$c"
done <"$WORK/plan.txt"

step "native: wait for the build"
wait $BUILD_PID
tail -3 "$OUT/native_build.txt"
if [ $DRY = 0 ]; then
    if ls "$BUILD"/out/_C*.so >/dev/null 2>&1; then
        cp "$BUILD"/out/_C*.so python/tilecl/
    else
        echo "native build: no module produced"
    fi
fi
$PY -c "import tilecl._C as c; print('tilecl._C has CUDA:', c.has_cuda())" 2>&1 | tail -1

step "native GPU tests (CUDA_LAUNCH_BLOCKING=1: a fault surfaces at its launch) -> tests_native.txt"
TESTS=("$PY" -m pytest -q -m gpu tests/test_native_backend.py -p no:cacheprovider -rfEs)
[ $DRY = 1 ] && TESTS+=(--collect-only)
c=$(cap $((NATIVE_CAP * 2)) $((NATIVE_RESERVE * 2 / 5)))
if [ "$c" -ge 10 ]; then
    CUDA_LAUNCH_BLOCKING=1 timeout -k 5 "$c" "${TESTS[@]}" >"$OUT/tests_native.txt" 2>&1
    echo "rc $? (cap $c s)"; tail -3 "$OUT/tests_native.txt"
else
    echo "no time left" | tee "$OUT/tests_native.txt"
fi

step "native timing: CLIP and SigLIP, bf16, N = $NATIVE_N, D = $D -> points.jsonl"
c=$(cap $NATIVE_CAP $((NATIVE_RESERVE / 4)))
timeout 60 $PY -m bench.first plan --out "$OUT" --device $DEVICE --group native --n $NATIVE_N \
    --d $D --dtype bf16 --cap-s "$c" --n-min $N_MIN "${ONLY_NATIVE[@]}" >"$WORK/plan_native.txt" \
    || echo "plan: failed (rc $?)"
while read -r loss prov n est; do
    c=$(cap $NATIVE_CAP $((NATIVE_RESERVE / 4)))
    if [ "$c" -lt 5 ]; then stopped "$loss" "$prov" "$n" native skipped "time budget"; continue; fi
    point native "$loss" "$prov" "$n" "$est" "$c"
done <"$WORK/plan_native.txt"

step "compute-sanitizer memcheck, CLIP + SigLIP bf16 ($SAN) -> sanitizer.txt"
for backend in $SAN_BACKENDS; do
    c=$(cap $SAN_CAP 5)
    if [ "$c" -lt 20 ]; then echo "$backend: no time left" | tee -a "$OUT/sanitizer.txt"; continue; fi
    # shellcheck disable=SC2086
    if [ $DRY = 1 ]; then  # no sanitizer on the CPU: the case itself
        timeout "$c" $PY -m bench.first sanitize --device cpu --backend $backend $SAN
    elif command -v compute-sanitizer >/dev/null; then
        timeout -k 5 "$c" compute-sanitizer --tool memcheck --error-exitcode 9 \
            $PY -m bench.first sanitize --device cuda --backend $backend $SAN
    else
        echo "compute-sanitizer: not found"
    fi >>"$OUT/sanitizer.txt" 2>&1
    echo "$backend: rc $?" | tee -a "$OUT/sanitizer.txt"
done

step "summary -> results.md"
timeout 30 $PY -m bench.first summary --out "$OUT" --device $DEVICE
echo "== done in $(elapsed) s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
rm -rf "$WORK"
