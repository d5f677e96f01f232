"""The steps of ``bench/gpu_first.sh`` (the first call on a lent GPU), one process each, every
result appended under the output folder as soon as it exists so that a call cut short still
returns what it measured.

    python -m bench.first env   --out DIR --device cuda     # env.json: device, versions, date, rates
    python -m bench.first plan  --out DIR --group target --n 65536 --d 768 --dtype bf16 --cap-s 40
    python -m bench.first point --out DIR --loss clip --provider tilecl-triton --n 65536 ...
    python -m bench.first sanitize --backend triton --n 300 --d 100   # under compute-sanitizer
    python -m bench.first summary --out DIR                 # results.md from env.json + points.jsonl

``plan`` prints one line ``loss provider n cap_s`` per point to run, in priority order, and records
the points it will not run. A provider runs at the target size only when its cost model (``COSTS``:
nominal flops / an assumed rate, times the calls the harness makes, plus a compile allowance; its
largest buffers against the free device memory) fits the cap; otherwise at the largest halved size
that fits, and the target size is recorded as skipped with the estimate. ``point`` measures one
(loss, provider, size) with the harness (``bench.harness.measure``) and appends one JSON line to
``points.jsonl``; the shell kills it at its cap.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass

MiB = 2**20
POINTS = "points.jsonl"
ENV = "env.json"
ITEMSIZE = {"fp32": 4, "bf16": 2, "fp16": 2}
# the targets: CLIP <= 55 ms and SigLIP <= 40 ms forward + backward at N = 65536, D = 768, bf16,
# < 64 MiB beyond the gradients
TARGET_MS = {"clip": 55.0, "siglip": 40.0}
TARGET_MIB = 64.0

# Providers measured in a process of their own with this environment set before tilecl is imported
# (TILECL_TRITON_AUTOTUNE is read when the kernels are imported): name -> (harness provider, env).
PROCESS_VARIANTS = {"tilecl-triton-tuned": ("tilecl-triton", {"TILECL_TRITON_AUTOTUNE": "small"})}

# The points of the targets, most decisive first (each loss's default, the dense baselines, the
# backward variants, the other implementations).
TARGET_ORDER = [
    ("clip", "tilecl-triton"), ("siglip", "tilecl-triton"), ("clip", "dense"),
    ("siglip", "dense"), ("clip", "tilecl-triton-gemm"), ("siglip", "tilecl-triton-gemm"),
    ("clip", "tilecl-triton-fused"), ("siglip", "tilecl-triton-fused"),
    ("clip", "openclip-style"), ("clip", "tilecl-torch"), ("siglip", "tilecl-torch"),
    ("clip", "inf-cl"), ("clip", "memeff"), ("siglip", "siglip-kernel"),
    ("clip", "tilecl-triton-2pass"), ("siglip", "tilecl-triton-unfused"),
    ("clip", "tilecl-triton-tuned"), ("siglip", "tilecl-triton-tuned"),
]
NATIVE_ORDER = [("clip", "tilecl-native"), ("siglip", "tilecl-native")]


@dataclass(frozen=True)
class Cost:
    """A provider's planned cost: ``tflops`` the rate assumed for the nominal flops of
    ``providers.flops`` (set below what is expected, so the plan errs on the safe side),
    ``compile_s`` the first call's compile / autotune allowance, ``nn_copies`` the N x M matrices
    of the input dtype alive at the peak (materialized logits and their gradients), ``fixed_mib``
    the working memory that does not grow with N M."""

    tflops: float
    compile_s: float = 0.0
    nn_copies: float = 0.0
    fixed_mib: float = 64.0


# One H100 / H200 (bf16 matmul measured at 790 TFLOP/s on the H200, fp32 without TF32 about 50):
# the triton paths on paper 250-500 TFLOP/s, assumed 100; the torch backend computes its tiles in
# fp32 (plus about 30 elementwise passes over each tile), assumed 25; the native CUDA kernels are
# unmeasured, assumed 2. Dense baselines hold the logits, a scaled copy, the log-softmax and the
# gradients (twice as many for open_clip's two logit matrices).
_TRITON = Cost(100.0, compile_s=30.0)
COSTS = {
    "cuda": {"tilecl-triton": _TRITON, "tilecl-triton-gemm": _TRITON,
             "tilecl-triton-fused": _TRITON, "tilecl-triton-2pass": _TRITON,
             "tilecl-triton-unfused": _TRITON,
             "tilecl-triton-tuned": Cost(100.0, compile_s=120.0),
             "tilecl-torch": Cost(25.0, compile_s=2.0, fixed_mib=1536.0),
             "tilecl-native": Cost(2.0, compile_s=2.0),
             "tilecl-reference": Cost(20.0, nn_copies=8.0),
             "dense": Cost(150.0, nn_copies=6.0), "openclip-style": Cost(150.0, nn_copies=10.0),
             "inf-cl": Cost(50.0, compile_s=30.0), "memeff": Cost(20.0, compile_s=30.0),
             "siglip-kernel": Cost(50.0, compile_s=30.0)},
    # the dry run: TRITON_INTERPRET=1 runs each kernel program in Python (about a microsecond per
    # element operation), the rest is the 2-core CPU
    "cpu": {"tilecl-triton": Cost(2e-6, compile_s=1.0)},
}
_CPU_DEFAULT = Cost(0.005, compile_s=0.5, nn_copies=10.0)


def cost(provider: str, device: str) -> Cost:
    table = COSTS["cuda" if device == "cuda" else "cpu"]
    if device != "cuda" and provider.startswith("tilecl-triton"):
        return table["tilecl-triton"]
    return table.get(provider, _CPU_DEFAULT if device != "cuda" else Cost(20.0, 30.0, 10.0))


@dataclass(frozen=True)
class Calls:
    """How many calls the harness makes for one point (``harness.Config`` with these values)."""

    warmup: int = 1
    min_reps: int = 3
    max_reps: int = 10
    target_s: float = 0.3
    memory: bool = True

    def count(self, per_call_s: float) -> int:
        reps = max(self.min_reps, min(self.max_reps, math.ceil(self.target_s / max(per_call_s, 1e-9))))
        if self.warmup and per_call_s > 1.0:  # the harness drops to one repeat after a slow warm-up
            reps = 1
        return self.warmup + reps + int(self.memory)


GPU_CALLS = Calls()
DRY_CALLS = Calls(warmup=0, min_reps=1, max_reps=1, target_s=0.0)


def input_bytes(loss: str, n: int, d: int, dtype: str) -> int:
    """Inputs plus their gradients plus the fp32 accumulators of the tiled backward."""
    return 2 * n * d * (2 * ITEMSIZE[dtype] + 4)


# one point's process before its first call: Python, torch, CUDA context, tilecl's imports
PROCESS_S = 5.0


def estimate(loss, provider, n, d, dtype, device, calls: Calls):
    """(seconds for the whole point, peak bytes on the device) by the cost model."""
    from . import providers as P

    c = cost(provider, device)
    per_call = P.flops(loss, "fwd_bwd", n, d=d) / (c.tflops * 1e12)
    seconds = PROCESS_S + c.compile_s + calls.count(per_call) * per_call
    nbytes = c.nn_copies * n * n * ITEMSIZE[dtype] + c.fixed_mib * MiB + input_bytes(loss, n, d, dtype)
    return seconds, nbytes


def plan_point(loss, provider, n, d, dtype, device, cap_s, mem_bytes, calls: Calls, n_min=16):
    """The size to run: n if its estimate fits both ``cap_s`` and ``mem_bytes``, else the largest
    n / 2^k (>= n_min) that does, else None. Returns (n_run or None, seconds, bytes) of n_run
    (of n when None)."""
    size = n
    while size >= n_min:
        s, b = estimate(loss, provider, size, d, dtype, device, calls)
        if s <= cap_s and b <= mem_bytes:
            return size, s, b
        size //= 2
    s, b = estimate(loss, provider, n, d, dtype, device, calls)
    return None, s, b


# ---- output ----------------------------------------------------------------------------------------

def append(out, rec):
    """One JSON line, flushed to disk at once (a call cut short keeps every finished point)."""
    with open(os.path.join(out, POINTS), "a") as f:
        f.write(json.dumps(rec) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_points(out):
    path = os.path.join(out, POINTS)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_env(out):
    path = os.path.join(out, ENV)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _run(cmd):
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        return (r.stdout or r.stderr).strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ---- the steps ---------------------------------------------------------------------------------

def cmd_env(args):
    import torch

    from . import report

    env = report.environment(args.device)
    env["date"] = env["date_utc"][:10]
    env["results_dir"] = f"bench/results/{env['date']}-{report.device_slug(env)}"
    env["nvidia_smi"] = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"])
    nvcc = _run(["nvcc", "--version"])
    env["nvcc"] = nvcc.splitlines()[-1] if nvcc else None
    env["torch_cuda"] = torch.version.cuda
    env["tilecl_env"] = {k: v for k, v in os.environ.items()
                         if k.startswith("TILECL_") or k == "TRITON_INTERPRET"}
    env["script"] = args.note
    with open(os.path.join(args.out, ENV), "w") as f:
        json.dump(env, f, indent=1)
    print(json.dumps({k: env.get(k) for k in ("device", "date_utc", "torch", "triton", "cuda",
                                              "driver", "nvcc", "git_commit", "matmul_tflops_bf16",
                                              "matmul_tflops_fp32_default", "results_dir")}))
    return 0


def _free_bytes(device):
    import torch

    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 8 * 2**30


def _available(loss, provider, device, d):
    from . import providers as P

    base = PROCESS_VARIANTS.get(provider, (provider, {}))[0]
    return base in P.providers(loss, device, d, variants=True)


def cmd_plan(args):
    order = TARGET_ORDER if args.group == "target" else NATIVE_ORDER
    calls = GPU_CALLS if args.device == "cuda" else DRY_CALLS
    mem = 0.9 * _free_bytes(args.device)
    for loss, prov in order:
        base = {"loss": loss, "provider": prov, "n": args.n, "d": args.d, "dtype": args.dtype,
                "mode": "fwd_bwd", "device": args.device, "group": args.group}
        if args.only and f"{loss}:{prov}" not in args.only:
            append(args.out, {**base, "status": "skipped", "error": "not in this run's selection"})
            continue
        if prov in PROCESS_VARIANTS and args.device != "cuda":
            append(args.out, {**base, "status": "skipped",
                              "error": "the interpreter runs one config per kernel"})
            continue
        if not _available(loss, prov, args.device, args.d):
            append(args.out, {**base, "status": "skipped", "error": "not available here"})
            continue
        n_run, est_s, est_b = plan_point(loss, prov, args.n, args.d, args.dtype, args.device,
                                         args.cap_s, mem, calls, n_min=args.n_min)
        if n_run != args.n:
            append(args.out, {**base, "status": "skipped", "plan_s": round(est_s, 1),
                              "plan_mib": round(est_b / MiB), "error":
                              f"plan: {est_s:.0f} s (cap {args.cap_s:.0f} s), "
                              f"{est_b / 2**30:.1f} GiB (free {mem / 2**30:.1f} GiB)"})
        if n_run is not None:
            print(loss, prov, n_run, round(est_s, 1))
    return 0


def cmd_point(args):
    base, env = PROCESS_VARIANTS.get(args.provider, (args.provider, {}))
    os.environ.update(env)  # before tilecl imports its kernels
    from . import harness as H
    from . import providers as P

    t0 = time.monotonic()
    calls = GPU_CALLS if args.device == "cuda" else DRY_CALLS
    rate = read_env(args.out).get("matmul_tflops_bf16" if args.dtype != "fp32"
                                  else "matmul_tflops_fp32_default")
    extra = {"group": args.group, "plan_s": args.plan_s}
    if rate:
        extra["matmul_tflops"] = rate
    if args.group == "target":
        extra.update(target_ms=TARGET_MS.get(args.loss), target_mib=TARGET_MIB)
    cfg = H.Config(warmup=calls.warmup, min_reps=calls.min_reps, max_reps=calls.max_reps,
                   target_s=calls.target_s, memory=calls.memory, extra=extra)
    case = H.Case(args.loss, base, args.n, args.d, args.dtype, "fwd_bwd", args.device)
    with P.variant_env(args.loss, base):
        rec = H.measure(case, cfg)
        rec["env"] = {k: v for k, v in os.environ.items() if k.startswith("TILECL_")}
    rec["provider"] = args.provider
    rec["wall_s"] = round(time.monotonic() - t0, 1)
    append(args.out, rec)
    print(H.format_record(rec), f"({rec['wall_s']} s)", flush=True)
    return 0


def cmd_sanitize(args):
    """Symmetric CLIP and SigLIP forward + backward on one small bf16 case (run under
    compute-sanitizer by the script): any invalid access aborts with the sanitizer's report."""
    import torch

    import tilecl

    dev = torch.device(args.device)
    g = torch.Generator(device=dev).manual_seed(0)
    a, b = (torch.nn.functional.normalize(torch.randn(args.n, args.d, device=dev, generator=g),
                                          dim=1).to(torch.bfloat16).requires_grad_()
            for _ in range(2))
    (tilecl.clip_loss(a, b, 20.0, backend=args.backend)
     + tilecl.siglip_loss(a, b, 10.0, -10.0, backend=args.backend)).backward()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    print(args.backend, "ok: |grad a| =", float(a.grad.float().norm()), flush=True)
    return 0


def _row(r):
    if r.get("status") != "ok":
        return (f"| {r['loss']} | {r['provider']} | {r['n']} | {r.get('status')} | | | | "
                f"{r.get('plan_s', '')} | {r.get('error', '')} |")
    rate = r.get("matmul_tflops")
    of = f"{r['tflops'] / rate:.0%}" if rate else ""
    tgt = r.get("target_ms")
    note = f"target {tgt:.0f} ms" if tgt and r["n"] >= 65536 else ""
    return (f"| {r['loss']} | {r['provider']} | {r['n']} | {r['time_ms']:.1f} | {r['tflops']:.1f} "
            f"| {of} | {r.get('mem_mib', float('nan')):.0f} | {r.get('plan_s', '')} | {note} |")


def summary_markdown(env, points, tests=(), device="cuda"):
    lines = ["# First GPU call: targets, native timing, tests", "",
             f"- device: {env.get('device')} ({env.get('nvidia_smi')}), date {env.get('date_utc')}",
             f"- versions: torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), triton "
             f"{env.get('triton')}, nvcc {env.get('nvcc')}, python {env.get('python')}, tilecl "
             f"{env.get('tilecl')}, commit {env.get('git_commit')}",
             f"- measured matmul rate (8192^3): bf16 {env.get('matmul_tflops_bf16')} TFLOP/s, fp32 "
             f"{env.get('matmul_tflops_fp32_default')} TFLOP/s",
             f"- environment: {env.get('tilecl_env')}; script: {env.get('script')}",
             "- forward + backward, 8 N^2 D nominal flops per call; time = median of "
             + ("CUDA-event timings after warm-up" if device == "cuda" else "perf_counter timings")
             + "; MiB = extra peak beyond the inputs (gradients included); plan s = the cost "
             "model's estimate for the whole point (process start, compile, every call)", ""]
    for group, title in (("target", "Targets: CLIP and SigLIP, bf16, N = M, forward + backward"),
                         ("native", "Native backend at a moderate size")):
        rows = [r for r in points if r.get("group") == group]
        if not rows:
            continue
        lines += [f"## {title}", "", "| loss | provider | N | ms | TFLOP/s | of matmul | MiB | "
                  "plan s | note |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
        lines += [_row(r) for r in rows] + [""]
    if tests:
        lines += ["## Tests", ""] + [f"- {t}" for t in tests] + [""]
    return "\n".join(lines)


def _pytest_line(path):
    """The last summary line of a pytest log ('3 passed, 1 skipped in 12.3s'), if any."""
    if not os.path.exists(path):
        return None
    with open(path, errors="replace") as f:
        lines = [ln.strip() for ln in f if ln.strip()]
    hits = [ln for ln in lines if any(w in ln for w in (" passed", " failed", " error",
                                                         " skipped", "no tests ran",
                                                         " collected", " tests collected"))]
    return hits[-1].strip("= ") if hits else (lines[-1] if lines else "empty log")


def cmd_summary(args):
    tests = []
    for name in ("tests_triton.txt", "tests_native.txt"):
        line = _pytest_line(os.path.join(args.out, name))
        if line:
            tests.append(f"{name}: {line}")
    text = summary_markdown(read_env(args.out), read_points(args.out), tests, args.device)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.first", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("env", "plan", "point", "sanitize", "summary"):
        p = sub.add_parser(name)
        p.add_argument("--out", default=os.environ.get("OUT", "."))
        p.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
        if name == "env":
            p.add_argument("--note", default="", help="what ran (recorded in env.json)")
        if name in ("plan", "point"):
            p.add_argument("--group", choices=("target", "native"), default="target")
            p.add_argument("--n", type=int, default=65536)
            p.add_argument("--d", type=int, default=768)
            p.add_argument("--dtype", choices=sorted(ITEMSIZE), default="bf16")
        if name == "plan":
            p.add_argument("--cap-s", type=float, default=40.0)
            p.add_argument("--n-min", type=int, default=1024)
            p.add_argument("--only", action="append", default=None,
                           help="loss:provider to run (repeatable; the others are recorded as "
                           "skipped); default: every point of the group")
        if name == "point":
            p.add_argument("--loss", required=True)
            p.add_argument("--provider", required=True)
            p.add_argument("--plan-s", type=float, default=None)
        if name == "sanitize":
            p.add_argument("--backend", default="triton")
            p.add_argument("--n", type=int, default=300)
            p.add_argument("--d", type=int, default=100)
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    return {"env": cmd_env, "plan": cmd_plan, "point": cmd_point, "sanitize": cmd_sanitize,
            "summary": cmd_summary}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
