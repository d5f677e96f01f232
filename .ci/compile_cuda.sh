#!/usr/bin/env bash
# Compile-only check of the native CUDA kernels (no GPU needed):
#   1. every csrc/cuda/*.cu with nvcc for each architecture (default sm_80 and sm_90), -Xptxas -v,
#      then a table of registers / spills / shared memory per kernel;
#   2. the NVRTC path: the device source that tilecl._C.rtc_source() embeds (tile_math.h +
#      tile_launch.h + tile_kernels.cuh) compiled by libnvrtc for the same architectures, with the NVRTC entry
#      points (tile_kernel_rtc<...>) instantiated by name, as CuPy's RawModule does it. When no
#      libnvrtc is found, the same source is compiled by nvcc in NVRTC-like form instead (-ptx,
#      concatenated source, only the rtc entries) and the report says so.
# Exit 0 with a message when nvcc is absent; non-zero on any compile error.
# Env: NVCC, CUDA_HOME, TILECL_CI_CUDA_ARCHS ("80 90"), TILECL_NVRTC_LIB (path to libnvrtc.so*).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ARCHS="${TILECL_CI_CUDA_ARCHS:-80 90}"

NVCC="${NVCC:-}"
if [ -z "$NVCC" ]; then
  for cand in "${CUDA_HOME:-}/bin/nvcc" "$(command -v nvcc 2>/dev/null)" /usr/local/cuda/bin/nvcc; do
    if [ -n "$cand" ] && [ -x "$cand" ]; then NVCC="$cand"; break; fi
  done
fi
if [ -z "$NVCC" ]; then
  echo "compile_cuda: nvcc not found (set NVCC or CUDA_HOME): CUDA compile check skipped"
  exit 0
fi
CUDA_ROOT="${CUDA_HOME:-${CUDA_PATH:-}}"  # the toolkit (headers, libs); nvcc may be a wrapper
if [ -z "$CUDA_ROOT" ] || [ ! -f "$CUDA_ROOT/include/cuda_runtime.h" ]; then
  CUDA_ROOT="$(cd "$(dirname "$(readlink -f "$NVCC")")/.." && pwd)"
  [ -f "$CUDA_ROOT/include/cuda_runtime.h" ] || CUDA_ROOT=/usr/local/cuda
fi
echo "compile_cuda: $("$NVCC" --version | tail -1) ; archs: $ARCHS"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
START=$(date +%s)
status=0

# ---- 1. nvcc, one background job per architecture (the machine has few cores) ----------------
pids=()
for arch in $ARCHS; do
  (
    for cu in "$ROOT"/csrc/cuda/*.cu; do
      "$NVCC" -std=c++17 -O3 -lineinfo --expt-relaxed-constexpr -DTILECL_WITH_CUDA \
        -I"$ROOT/csrc" -gencode "arch=compute_${arch},code=sm_${arch}" -Xptxas -v \
        -c "$cu" -o "$WORK/$(basename "$cu" .cu).sm_${arch}.o" || exit 1
    done
  ) >"$WORK/nvcc_sm_${arch}.log" 2>&1 &
  pids+=("$!")
done
i=0
for arch in $ARCHS; do
  if ! wait "${pids[$i]}"; then
    echo "compile_cuda: nvcc FAILED for sm_${arch}:"
    grep -v "^ptxas info" "$WORK/nvcc_sm_${arch}.log" | head -60
    status=1
  fi
  i=$((i + 1))
done

demangle() { if command -v cu++filt >/dev/null 2>&1; then cu++filt; elif [ -x "$CUDA_ROOT/bin/cu++filt" ]; then "$CUDA_ROOT/bin/cu++filt"; elif command -v c++filt >/dev/null; then c++filt; else cat; fi; }

echo
printf '%-6s %-44s %5s %7s %7s %7s\n' arch kernel regs spill_st spill_ld smem
for arch in $ARCHS; do
  log="$WORK/nvcc_sm_${arch}.log"
  [ -f "$log" ] || continue
  awk -v arch="sm_${arch}" '
    /Compiling entry function/ { match($0, /function '\''[^'\'']+'\''/); name = substr($0, RSTART + 10, RLENGTH - 11); st = 0; ld = 0 }
    /bytes spill stores/ { for (i = 1; i <= NF; i++) { if ($(i+1) == "bytes" && $(i+2) == "spill" && $(i+3) == "stores,") st = $i; if ($(i+1) == "bytes" && $(i+2) == "spill" && $(i+3) == "loads") ld = $i } }
    /Used [0-9]+ registers/ { regs = ""; smem = 0; for (i = 1; i <= NF; i++) { if ($i == "Used") regs = $(i+1); if ($(i+1) == "bytes" && $(i+2) ~ /^smem/) smem = $i }
                             if (name != "") print arch "\t" name "\t" regs "\t" st "\t" ld "\t" smem; name = "" }
  ' "$log"
done | while IFS=$'\t' read -r arch name regs st ld smem; do
  pretty="$(echo "$name" | demangle | sed -e 's/tilecl:://g' -e 's/(KParams)//' -e 's/(KParams const\*)//' -e 's/__nv_bfloat16/bf16/' -e 's/__half/fp16/')"
  printf '%-6s %-44s %5s %7s %7s %7s\n' "$arch" "$pretty" "$regs" "$st" "$ld" "$smem"
done
echo "(MODE 0 fwd rows, 1 fwd cols (column LSE), 2 bwd dq, 3 bwd dk; bool = distance logits)"
# every kernel must fit its registers: a spill is an error
spills() { grep -h "bytes spill stores" "$@" 2>/dev/null | grep -v ", 0 bytes spill stores, 0 bytes spill loads" | wc -l; }
n_spill=$(spills "$WORK"/nvcc_sm_*.log)
if [ "$n_spill" -ne 0 ]; then echo "compile_cuda: $n_spill kernel(s) SPILL registers (see the table)"; status=1; fi
echo

# ---- 2. NVRTC path -----------------------------------------------------------------------------
cat "$ROOT/csrc/tile_math.h" "$ROOT/csrc/cuda/tile_launch.h" "$ROOT/csrc/cuda/tile_kernels.cuh" >"$WORK/rtc_source.cu"
NVRTC_LIB="${TILECL_NVRTC_LIB:-}"
if [ -z "$NVRTC_LIB" ]; then
  for cand in "$CUDA_ROOT"/lib64/libnvrtc.so* "$CUDA_ROOT"/targets/*/lib/libnvrtc.so*; do
    [ -e "$cand" ] && case "$cand" in *builtins*|*alt*) ;; *) NVRTC_LIB="$cand"; break;; esac
  done
fi
if [ -z "$NVRTC_LIB" ]; then  # the pip wheel nvidia-cuda-nvrtc, if the Python env has it
  for py in "$ROOT/.venv/bin/python" python3; do
    command -v "$py" >/dev/null 2>&1 || continue
    NVRTC_LIB="$("$py" - <<'EOF' 2>/dev/null
import glob, os, site
for d in site.getsitepackages():
    for f in sorted(glob.glob(os.path.join(d, "nvidia", "*", "lib", "libnvrtc.so*"))):
        if "builtins" not in f and ".alt." not in f:
            print(f); raise SystemExit
EOF
)"
    [ -n "$NVRTC_LIB" ] && break
  done
fi

KERNELS=""
for t in float __half __nv_bfloat16; do for mode in 0 1 2 3; do for dist in false true; do
  KERNELS="$KERNELS tilecl::tile_kernel_rtc<$t,$mode,$dist>"
done; done; done

if [ -n "$NVRTC_LIB" ] && command -v python3 >/dev/null 2>&1; then
  echo "compile_cuda: NVRTC check with $NVRTC_LIB"
  if ! python3 - "$NVRTC_LIB" "$WORK/rtc_source.cu" "$CUDA_ROOT/include" "$ARCHS" "$KERNELS" <<'EOF'
import ctypes, sys, time
lib, src_path, inc, archs, kernels = sys.argv[1:6]
import glob, os
for b in sorted(glob.glob(os.path.join(os.path.dirname(lib), "libnvrtc-builtins.so*"))):
    if ".alt." not in b:  # libnvrtc dlopens it by name: load it from beside libnvrtc first
        ctypes.CDLL(b, mode=ctypes.RTLD_GLOBAL)
        break
nv = ctypes.CDLL(lib)
src = open(src_path, "rb").read()
names = kernels.split()
ok = True
for arch in archs.split():
    t0 = time.time()
    prog = ctypes.c_void_p()
    assert nv.nvrtcCreateProgram(ctypes.byref(prog), src, b"tilecl_rtc.cu", 0, None, None) == 0
    for nm in names:
        assert nv.nvrtcAddNameExpression(prog, nm.encode()) == 0
    opts = [f"--gpu-architecture=compute_{arch}".encode(), b"-std=c++17", b"-DTILECL_RTC_CONCAT",
            f"-I{inc}".encode()]
    arr = (ctypes.c_char_p * len(opts))(*opts)
    rc = nv.nvrtcCompileProgram(prog, len(opts), arr)
    size = ctypes.c_size_t()
    nv.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nv.nvrtcGetProgramLog(prog, log)
    ptx = ctypes.c_size_t()
    if rc == 0:
        nv.nvrtcGetPTXSize(prog, ctypes.byref(ptx))
        buf = ctypes.create_string_buffer(ptx.value)
        nv.nvrtcGetPTX(prog, buf)
        with open(os.path.join(os.path.dirname(src_path), f"rtc_{arch}.ptx"), "wb") as f:
            f.write(buf.value)  # for ptxas below: what the driver JIT of CuPy assembles
        lowered = ctypes.c_char_p()
        nv.nvrtcGetLoweredName(prog, names[0].encode(), ctypes.byref(lowered))
        print(f"  compute_{arch}: OK, {len(names)} entry points, PTX {ptx.value} bytes, "
              f"{time.time() - t0:.1f} s (e.g. {names[0]} -> {lowered.value.decode()})")
    else:
        ok = False
        print(f"  compute_{arch}: NVRTC FAILED (rc {rc}):\n{log.value.decode(errors='replace')[:4000]}")
    nv.nvrtcDestroyProgram(ctypes.byref(prog))
sys.exit(0 if ok else 1)
EOF
  then status=1; fi
else
  echo "compile_cuda: libnvrtc not found (no CUDA lib64/libnvrtc.so, no nvidia-cuda-nvrtc wheel):"
  echo "  checking the NVRTC source with nvcc instead (concatenated, -DTILECL_RTC_CONCAT, -ptx)"
  {
    cat "$WORK/rtc_source.cu"
    for k in $KERNELS; do
      echo "template __global__ void ${k}(const tilecl::KParams*);"
    done
  } >"$WORK/rtc_inst.cu"
  for arch in $ARCHS; do
    if "$NVCC" -std=c++17 -DTILECL_RTC_CONCAT -arch="compute_${arch}" -ptx "$WORK/rtc_inst.cu" \
         -o "$WORK/rtc_${arch}.ptx" >"$WORK/rtc_${arch}.log" 2>&1; then
      echo "  compute_${arch}: OK (nvcc -ptx of the NVRTC source, $(grep -c '\.entry' "$WORK/rtc_${arch}.ptx") entries)"
    else
      echo "  compute_${arch}: FAILED"; head -40 "$WORK/rtc_${arch}.log"; status=1
    fi
  done
fi

# the NVRTC PTX through ptxas, as the driver assembles it at load time: registers must fit there too
PTXAS="$CUDA_ROOT/bin/ptxas"
if [ -x "$PTXAS" ]; then
  for arch in $ARCHS; do  # one background job per architecture
    [ -f "$WORK/rtc_${arch}.ptx" ] || continue
    ( "$PTXAS" -arch="sm_${arch}" -v "$WORK/rtc_${arch}.ptx" -o "$WORK/rtc_${arch}.cubin" \
        >"$WORK/ptxas_rtc_${arch}.log" 2>&1; echo $? >"$WORK/ptxas_rtc_${arch}.rc" ) &
  done
  wait
  for arch in $ARCHS; do
    [ -f "$WORK/ptxas_rtc_${arch}.rc" ] || continue
    if [ "$(cat "$WORK/ptxas_rtc_${arch}.rc")" = 0 ]; then
      n=$(grep -c "bytes spill stores" "$WORK/ptxas_rtc_${arch}.log"); k=$(spills "$WORK/ptxas_rtc_${arch}.log")
      echo "  sm_${arch}: ptxas of the NVRTC PTX: $n kernels, $k with spills"
      [ "$k" -eq 0 ] || status=1
    else
      echo "  sm_${arch}: ptxas of the NVRTC PTX FAILED"; head -20 "$WORK/ptxas_rtc_${arch}.log"; status=1
    fi
  done
fi

echo "compile_cuda: $( [ $status -eq 0 ] && echo OK || echo FAILED ) in $(( $(date +%s) - START )) s"
exit $status
