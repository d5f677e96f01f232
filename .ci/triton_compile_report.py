"""Compile the tilecl Triton kernels for sm_80 and sm_90 without a GPU and report their resources.

    .venv/bin/python .ci/triton_compile_report.py [--flags clip|supcon|hcl|kernel|siglip|
                                                   fneg|topk8|topk32 ...]

For each kernel pass (forward rows, forward columns = symmetric CLIP's column LSE, backward dq,
backward dk, and the H tiles of the gemm backward) at its default config (tritonops/configs.py
DEFAULT_FWD / DEFAULT_BWD), each target (sm_80, sm_90a) and each input dtype (bf16, fp16; fp32
with tf32 dots on request), prints:
registers per thread, spill stores / loads (bytes, from ptxas -v), shared memory (bytes,
Triton's dynamic allocation) and whether the compiled code uses tensor cores (PTX mma.sync /
wgmma; SASS HMMA / HGMMA). A static check of speed: no spills, tensor cores present. Needs
triton.compile with a GPUTarget and an ASTSource (Triton >= 3.0) and the ptxas Triton ships;
exits 0 with a clear message when this Triton cannot do it.
Exit status 1 only when a kernel fails to compile. The opt-in top-k flag sets (topk8, topk32:
info_nce's hardest negatives streamed by the forward row pass) compile only that pass (the
backward does not see TOPK); by default the report runs clip (column sums by atomics in the row
pass), siglip (the forward fused into the dq pass), fneg (the false-negative threshold of
symmetric CLIP, all four passes) and topk32.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # compile the real kernels, not the interpreter's

FLAG_SETS = {  # the constexpr flags of a few losses (see tilecl._triton.common._flags)
    "clip": dict(POSITIVE=1, N_SUMS=1, COL_LSE=True, COL_ATOMIC=True),
    "supcon": dict(HAS_EXCL=True, POSITIVE=2, N_SUMS=2, C0=1),
    "hcl": dict(HAS_EXCL=True, POSITIVE=1, N_SUMS=2, C0=2, B0=1.5, C1=2, B1=0.5),
    "kernel": dict(DIST=True, GAMMA=1.0, HAS_EXCL=True, POSITIVE=1, N_SUMS=1),
    # SigLIP as the triton backend runs it: the "bwd dq" pass is the fused forward (FWD_STATS)
    "siglip": dict(HAS_BIAS=True, POSITIVE=2, SIG=True, FWD_STATS=True),
    "fneg": dict(POSITIVE=1, N_SUMS=1, COL_LSE=True, HAS_THRESH=True, COL_ATOMIC=True),
    "topk8": dict(POSITIVE=1, N_SUMS=1, HAS_THRESH=True, TOPK=8, TOPK_P2=8),
    "topk32": dict(POSITIVE=1, N_SUMS=1, HAS_THRESH=True, TOPK=32, TOPK_P2=32),
}
BASE = dict(DIST=False, GAMMA=2.0, HAS_BIAS=False, HAS_EXCL=False, HAS_THRESH=False, POSITIVE=0,
            WEIGHT=0, CLIP=0.0, N_SUMS=0, C0=0, B0=1.0, W0=False, C1=0, B1=1.0, W1=False,
            LIN=False, SIG=False, COL_LSE=False, COL_ATOMIC=False, COL_GATHER=False, TOPK=0,
            TOPK_P2=1, PRECISION="ieee", UPCAST=False, FWD_STATS=False,
            HAS_GPOS=True, PART=True)  # the last two: the H kernel (gemm backward), fullest
INT_PTRS = ("excl_ptr", "pos_ptr", "labq_ptr", "labk_ptr", "ti_ptr", "cidx_ptr", "spos_ptr")
# the sizes of the problem the kernels are specialised for: N and M not multiples of 16 (any
# batch), D = 768 (contiguous inputs; Triton specialises unit strides and multiples of 16)
N_ROWS, M_COLS, D_FEAT = 1000, 1000, 768


def _say_unsupported(why):
    print(f"triton_compile_report: compiling without a GPU is not possible here: {why}")
    sys.exit(0)


try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except Exception as exc:  # old or missing Triton
    _say_unsupported(f"{type(exc).__name__}: {exc}")

try:
    from tilecl.tritonops import configs, lse
except Exception as exc:
    _say_unsupported(f"cannot import tilecl.tritonops ({exc})")


def _jit_fn(kernel):
    f = kernel
    while not isinstance(f, triton.runtime.jit.JITFunction):
        f = f.fn
    return f


def _tool(name):
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else shutil.which(name)


def _launch_args(fn, dtype, constexprs):
    """The arguments a launcher passes (``tilecl._triton.common._inputs`` and each kernel's
    outputs), as CPU tensors of the right dtypes and sizes: what Triton's binder specialises."""
    import torch

    from tilecl.tritonops.tile import Head, Saved, Shape, Side, Spec, Strides

    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    n, m, d = N_ROWS, M_COLS, D_FEAT

    def ptr(name, size=1):
        return torch.zeros(size, dtype=torch.int64 if name in INT_PTRS else torch.float32)

    spec = Spec(**{f: constexprs[f] for f in Spec._fields})
    side = Side(*(ptr(f) for f in Side._fields))
    head = Head(torch.zeros(n, d, dtype=dt), torch.zeros(m, d, dtype=dt), side,
                Shape(n, m, 1, 1, 0), Strides(d, 1, d, 1, 1, 1, 1, 1, 1, 1, 1), d, spec)
    values = dict(zip(Head._fields, head))
    values.update(saved=Saved(ptr("st"), ptr("g"), ptr("colst"), ptr("gc"), n), h_ptr=ptr("h").to(dt),
                  s_st=n, s_on=d, s_od=1, s_hn=m, s_pn=m, spos_offset=m)
    kwargs = {k: v for k, v in constexprs.items() if k in fn.arg_names}
    args = [values[name] if name in values else ptr(name) for name in fn.arg_names
            if name not in kwargs]
    return args, kwargs


def _specialise(fn, args, kwargs, target):
    """(signature, constexprs, attrs) as Triton's own launch path computes them for ``args``."""
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    _, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization,
                                                     options)
    return signature, constexprs, attrs


def _ptxas_stats(ptx, arch, name):
    ptxas = _tool("ptxas")
    if ptxas is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run([ptxas, f"-arch={arch}", "-v", src, "-o", os.path.join(tmp, "k.o")],
                             capture_output=True, text=True)
    text = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return dict(regs=int(regs.group(1)) if regs else -1,
                spill_st=int(spill.group(1)) if spill else -1,
                spill_ld=int(spill.group(2)) if spill else -1)


def _sass(cubin):
    tool = _tool("nvdisasm") or _tool("cuobjdump")
    if tool is None or cubin is None:
        return ""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        args = [tool, path] if tool.endswith("nvdisasm") else [tool, "-sass", path]
        return subprocess.run(args, capture_output=True, text=True).stdout


def compile_one(kernel, backward, trans, dtype, cc, flags, config=None):
    fn = _jit_fn(kernel)
    cfg = dict(config or (configs.DEFAULT_BWD if backward else configs.DEFAULT_FWD))
    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    constexprs = dict(BASE, **flags, TRANS=trans, **cfg)
    if dtype == "fp32":  # fp32 inputs at TILECL_TRITON_PRECISION=tf32 (ieee has no mma)
        constexprs["PRECISION"] = "tf32"
    if backward:
        constexprs.update(H16=dtype != "fp32", HSCALE=dtype == "fp16",
                          PRECISION2=constexprs["PRECISION"])
    target = GPUTarget("cuda", cc, 32)
    args, kwargs = _launch_args(fn, dtype, constexprs)
    sig, consts, attrs = _specialise(fn, args, kwargs, target)
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    ck = triton.compile(src, target=target, options=dict(num_warps=warps, num_stages=stages))
    ptx = ck.asm.get("ptx", "")
    arch = "sm_90a" if cc == 90 else f"sm_{cc}"
    st = _ptxas_stats(ptx, arch, fn.__name__) or dict(regs=-1, spill_st=-1, spill_ld=-1)
    sass = _sass(ck.asm.get("cubin"))
    return dict(st, shared=ck.metadata.shared, ptx_mma="mma.sync" in ptx,
                ptx_wgmma="wgmma" in ptx, sass_hmma="HMMA" in sass, sass_hgmma="HGMMA" in sass,
                cfg=f"{cfg} w{warps} s{stages}")


def _config(text):
    v = [int(x) for x in text.split(",")]
    names = ["BM", "BN", "BK", "BD", "num_warps", "num_stages"] if len(v) == 6 else [
        "BM", "BN", "BK", "num_warps", "num_stages"]
    if len(v) != len(names):
        raise argparse.ArgumentTypeError("expected BM,BN,BK[,BD],WARPS,STAGES")
    return dict(zip(names, v))


PASSES = [("fwd rows", lse._lse_fwd_kernel, False, False),
          ("fwd cols", lse._lse_fwd_kernel, False, True),
          ("bwd dq", lse._lse_bwd_kernel, True, False),
          ("bwd dk", lse._lse_bwd_kernel, True, True),
          ("gemm H", lse._lse_h_kernel, False, False)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flags", nargs="+", default=["clip", "siglip", "fneg", "topk32"],
                    choices=sorted(FLAG_SETS))
    ap.add_argument("--cc", nargs="+", type=int, default=[80, 90])
    ap.add_argument("--dtype", nargs="+", default=["bf16", "fp16"], choices=["bf16", "fp16", "fp32"],
                    help="fp32 means fp32 inputs with tf32 dots")
    ap.add_argument("--fwd", type=_config, default=None, metavar="BM,BN,BK,WARPS,STAGES",
                    help="compile this forward config instead of the default")
    ap.add_argument("--bwd", type=_config, default=None, metavar="BM,BN,BK,BD,WARPS,STAGES",
                    help="compile this backward config instead of the default")
    ap.add_argument("--all-configs", type=int, default=None, metavar="D",
                    help="compile every autotune candidate the prune keeps at this D (sm_90 "
                         "shared memory) instead of the default configs: what the register "
                         "budgets of tritonops/configs.py were read from")
    args = ap.parse_args()
    print(f"triton {triton.__version__}; ptxas {_tool('ptxas')}")
    if args.all_configs:
        return all_configs(args)
    hdr = (f"{'flags':7} {'pass':9} {'sm':>3} {'dtype':5} {'regs':>4} {'spill st/ld':>11} "
           f"{'smem':>6}  tensor cores")
    print(hdr)
    print("-" * len(hdr))
    failed, warn = 0, 0
    for fname in args.flags:
        for pname, kernel, backward, trans in PASSES:
            if pname == "fwd cols" and not FLAG_SETS[fname].get("COL_LSE"):
                continue
            if FLAG_SETS[fname].get("TOPK") and pname != "fwd rows":
                continue
            for cc in args.cc:
                for dtype in args.dtype:
                    try:
                        r = compile_one(kernel, backward, trans, dtype, cc, FLAG_SETS[fname],
                                        args.bwd if backward else args.fwd)
                    except Exception as exc:
                        if isinstance(exc, (ImportError, RuntimeError)) and "driver" in str(exc):
                            _say_unsupported(f"{type(exc).__name__}: {exc}")
                        failed += 1
                        print(f"{fname:7} {pname:9} {cc:>3} {dtype:5} COMPILE FAILED: "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
                        continue
                    tc = [n for n, k in (("mma.sync", "ptx_mma"), ("wgmma", "ptx_wgmma"),
                                         ("HMMA", "sass_hmma"), ("HGMMA", "sass_hgmma")) if r[k]]
                    ok_tc = bool(tc)
                    spills = r["spill_st"] + r["spill_ld"]
                    warn += (not ok_tc) + (spills > 0)
                    print(f"{fname:7} {pname:9} {cc:>3} {dtype:5} {r['regs']:>4} "
                          f"{r['spill_st']:>5}/{r['spill_ld']:<5} {r['shared']:>6}  "
                          f"{' '.join(tc) or 'NONE'}{'  <- SPILLS' if spills > 0 else ''}")
    print(f"configs: fwd {args.fwd or configs.DEFAULT_FWD}; bwd {args.bwd or configs.DEFAULT_BWD}")
    print(f"{failed} failed, {warn} warnings (spills or no tensor-core instructions)")
    return 1 if failed else 0


class _Elt:  # what the prune reads of q: its element size (16-bit inputs)
    @staticmethod
    def element_size():
        return 2


def all_configs(args):
    """One line per (flag set, pass, candidate config): registers, spills, tensor cores."""
    configs._smem_limit = lambda *a: configs._SMEM[90]
    spilled = 0
    for fname in args.flags:
        flags = FLAG_SETS[fname]
        for pname, kernel, backward, trans in PASSES:
            if (pname == "fwd cols" and not flags.get("COL_LSE")) or (
                    flags.get("TOPK") and pname != "fwd rows"):
                continue
            cands = configs.bwd_configs() if backward else configs.fwd_configs()
            kept = configs._prune(backward)(cands, {"D": args.all_configs, "q_ptr": _Elt()},
                                            TRANS=trans, **flags)
            for c in kept:
                cfg = dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
                for cc in args.cc:
                    r = compile_one(kernel, backward, trans, args.dtype[0], cc, flags, cfg)
                    spills = r["spill_st"] + r["spill_ld"]
                    spilled += spills > 0
                    tc = "wgmma" if r["ptx_wgmma"] else ("mma" if r["ptx_mma"] else "NONE")
                    print(f"{fname:7} {pname:9} {cc:>3} {r['cfg']:58} {r['regs']:>4} "
                          f"{r['spill_st']:>5}/{r['spill_ld']:<5} {tc}", flush=True)
    print(f"{spilled} candidate compilations spill")
    return 0


if __name__ == "__main__":
    sys.exit(main())
