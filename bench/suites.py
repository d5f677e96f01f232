"""The suites: which (loss, mode, dtype, D) series over which batch sizes, in priority order, under
a wall-clock budget (points past the budget are recorded as skipped, never dropped silently).

- ``cpu``: the CPU headline (symmetric CLIP fp32 fwd+bwd, N = M = 8192, D = 256: tiled torch
  backend at several tile sizes vs dense materialized logits), then a small grid; < 5 min on 2
  cores.
- ``gpu``: D in {128, 512, 1024}, fp32 and bf16, N doubling from 1024 until OOM (or the per-call
  time cap), fwd/bwd/fwd_bwd; < 8 min on one H100.
- ``smoke``: a few seconds, for checking the harness itself.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from . import harness as H
from . import providers as P


@dataclass
class Series:
    loss: str
    mode: str
    dtype: str
    d: int


@dataclass
class Suite:
    name: str
    device: str
    series: list
    sizes: list
    cfg: H.Config
    time_cap_s: float
    budget_s: float
    target: dict = field(default_factory=dict)  # the CPU headline measurement (cpu only)


def cpu_suite(budget_s=260.0):
    fb = "fwd_bwd"
    series = [Series("clip", fb, "fp32", 128), Series("siglip", fb, "fp32", 128),
              Series("supcon", fb, "fp32", 128), Series("ntxent", fb, "fp32", 128),
              Series("clip", "fwd", "fp32", 128), Series("clip", "bwd", "fp32", 128),
              Series("clip", fb, "bf16", 128), Series("clip", fb, "fp32", 512),
              Series("matryoshka", fb, "fp32", 512)]
    target = {"n": 8192, "d": 256, "tiles": [(512, 1024), (1024, 1024), (2048, 2048)]}
    return Suite("cpu", "cpu", series, H.doubling(256, 2048),
                 H.Config(warmup=1, min_reps=3, max_reps=7, target_s=0.3), time_cap_s=3.0,
                 budget_s=budget_s, target=target)


def gpu_suite(budget_s=400.0):
    fb = "fwd_bwd"
    series = [Series("clip", fb, "bf16", 512), Series("siglip", fb, "bf16", 512),
              Series("supcon", fb, "bf16", 128), Series("clip", fb, "fp32", 512),
              Series("clip", "fwd", "bf16", 512), Series("clip", "bwd", "bf16", 512)]
    series += [Series("clip", fb, dt, d) for dt in ("bf16", "fp32") for d in (128, 1024)]
    series += [Series("siglip", fb, "fp32", 512)]
    series += [Series("siglip", fb, dt, d) for dt in ("bf16", "fp32") for d in (128, 1024)]
    series += [Series("ntxent", fb, "bf16", 128), Series("supcon", fb, "fp32", 128),
               Series("supcon", fb, "bf16", 512), Series("siglip", "fwd", "bf16", 512),
               Series("siglip", "bwd", "bf16", 512), Series("matryoshka", fb, "bf16", 1024)]
    # the GPU targets first: CLIP <= 55 ms, SigLIP <= 40 ms, < 64 MiB beyond the gradients
    target = {"kind": "gpu", "n": 65536, "d": 768, "dtype": "bf16", "losses": ("clip", "siglip"),
              "ms": {"clip": 55.0, "siglip": 40.0}, "mib": 64.0}
    return Suite("gpu", "cuda", series, H.doubling(1024, 2**20),
                 H.Config(warmup=2, min_reps=3, max_reps=25, target_s=0.25), time_cap_s=0.6,
                 budget_s=budget_s, target=target)


def smoke_suite(device="cpu"):
    series = [Series(loss, "fwd_bwd", "fp32", 32) for loss in P.LOSSES]
    series.append(Series("clip", "bwd", "fp32", 32))
    return Suite("smoke", device, series, [64, 128], H.Config(warmup=1, min_reps=2, max_reps=2),
                 time_cap_s=5.0, budget_s=120.0)


SUITES = {"cpu": cpu_suite, "gpu": gpu_suite, "smoke": smoke_suite}


# ---- the CPU headline: N = M = 8192, D = 256, fp32 CLIP fwd+bwd -------------------------------

def run_gpu_target(suite: Suite, log=print):
    """The GPU targets on one GPU: every provider of CLIP and SigLIP (the triton backend's
    variants included) at N = M = 65536, D = 768, bf16, forward + backward, with the measured
    bf16 matmul rate as the roofline."""
    t = suite.target
    dt = H.DTYPES[t["dtype"]]
    rate = P.matmul_tflops(dt)
    log(f"{t['dtype']} matmul 8192^3: {rate:.0f} TFLOP/s")
    recs = []
    for loss in t["losses"]:
        for prov in P.providers(loss, suite.device, t["d"], variants=True):
            case = H.Case(loss, prov, t["n"], t["d"], t["dtype"], "fwd_bwd", suite.device)
            extra = {"group": "target", "matmul_tflops": rate, "target_ms": t["ms"][loss],
                     "target_mib": t["mib"]}
            with P.variant_env(loss, prov):
                recs.append(H.measure(case, H.Config(**{**suite.cfg.__dict__, "extra": extra})))
            log(H.format_record(recs[-1]))
    return recs


def gpu_target_markdown(recs):
    t0 = recs[0]
    lines = [f"## GPU targets: N = M = {t0['n']}, D = {t0['d']}, {t0['dtype']}, forward + "
             f"backward (8 N M D flops; {t0['dtype']} matmul measured at "
             f"{t0['matmul_tflops']:.0f} TFLOP/s)", "",
             "| loss | provider | time (ms) | target (ms) | TFLOP/s | of matmul rate | "
             "extra peak (MiB) | beyond gradients (MiB) |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in recs:
        if r["status"] != "ok":
            lines.append(f"| {r['loss']} | {r['provider']} | {r['status']} | {r['target_ms']:.0f}"
                         " | | | | |")
            continue
        beyond = r["mem_mib"] - r["input_mib"] if "mem_mib" in r else float("nan")
        lines.append(f"| {r['loss']} | {r['provider']} | {r['time_ms']:.1f} | "
                     f"{r['target_ms']:.0f} | {r['tflops']:.0f} | "
                     f"{r['tflops'] / r['matmul_tflops']:.0%} | {r.get('mem_mib', float('nan')):.0f}"
                     f" | {beyond:.0f} (target < {r['target_mib']:.0f}) |")
    lines += ["", "Beyond gradients: extra peak minus the inputs' size (their gradients have it)."]
    return "\n".join(lines) + "\n"


def run_target(suite: Suite, log=print):
    """tilecl-torch at each tile size and dense at one size: records with group 'target' and the
    tile used (CPU); the GPU suite's target is ``run_gpu_target``."""
    from tilecl import _torch_tiled

    t = suite.target
    if t.get("kind") == "gpu":
        return run_gpu_target(suite, log)
    # seconds per call at this size on CPU: no warm-up (nothing to compile; the first call's page
    # faults are a real cost), two timed calls and one memory call per point
    reps = t.get("reps", 2)
    cfg = H.Config(warmup=0, min_reps=reps, max_reps=reps, target_s=0.0)
    recs = []
    for prov in ("dense",):
        case = H.Case("clip", prov, t["n"], t["d"], "fp32", "fwd_bwd", suite.device)
        cfg.extra = {"group": "target", "tile": None}
        recs.append(H.measure(case, cfg))
        log(H.format_record(recs[-1]))
    old = tuple(_torch_tiled.TILE)
    try:
        for rows, cols in t["tiles"]:
            _torch_tiled.set_tile_size(rows, cols)
            case = H.Case("clip", "tilecl-torch", t["n"], t["d"], "fp32", "fwd_bwd", suite.device)
            cfg.extra = {"group": "target", "tile": f"{rows}x{cols}"}
            recs.append(H.measure(case, cfg))
            log(H.format_record(recs[-1]) + f"  tile {rows}x{cols}")
    finally:
        _torch_tiled.set_tile_size(*old)
    return recs


def target_markdown(recs):
    if recs and "matmul_tflops" in recs[0]:
        return gpu_target_markdown(recs)
    dense = next((r for r in recs if r["provider"] == "dense" and r["status"] == "ok"), None)
    lines = ["## CPU headline: symmetric CLIP, fp32, forward + backward, N = M = 8192, D = 256",
             "", "| provider | torch tile (rows x cols) | time (ms) | extra peak (MiB) | "
             "time vs dense | memory vs dense |", "|---|---|---:|---:|---:|---:|"]
    for r in recs:
        if r["status"] != "ok":
            lines.append(f"| {r['provider']} | {r.get('tile') or ''} | {r['status']} | | | |")
            continue
        rt = f"{r['time_ms'] / dense['time_ms']:.2f}x" if dense else ""
        rm = f"{r['mem_mib'] / dense['mem_mib']:.3f}x" if dense and r.get("mem_mib") else ""
        lines.append(f"| {r['provider']} | {r.get('tile') or ''} | {r['time_ms']:.0f} | "
                     f"{r.get('mem_mib', float('nan')):.1f} | {rt} | {rm} |")
    tiled = [r for r in recs if r.get("tile") and r["status"] == "ok"]
    if tiled:
        best = min(tiled, key=lambda r: r["time_ms"])
        lines += ["", f"Fastest torch-backend tile in this run: {best['tile']} "
                  f"({best['time_ms']:.0f} ms, {best['mem_mib']:.1f} MiB extra); one run of a few "
                  "calls per tile: compare tiles with the interleaved `python -m bench.tiles`."]
    return "\n".join(lines) + "\n"


# ---- running a suite ---------------------------------------------------------------------------

def run(suite: Suite, log=print, only_losses=None):
    """All records of a suite (target first on CPU, then the grid in priority order)."""
    t0 = time.monotonic()
    deadline = t0 + suite.budget_s
    records = []
    if suite.target:
        records += run_target(suite, log)
    for s in suite.series:
        if only_losses and s.loss not in only_losses:
            continue
        names = list(P.providers(s.loss, suite.device, s.d))
        for prov in names:
            cfg = H.Config(**{**suite.cfg.__dict__, "extra": {"group": "grid"}})
            cap = P.MAX_N.get((s.loss, prov), {}).get(suite.device)
            sizes = [n for n in suite.sizes if cap is None or n <= cap]
            records += H.sweep(s.loss, prov, s.d, s.dtype, s.mode, suite.device, sizes,
                               cfg, time_cap_s=suite.time_cap_s, deadline=deadline, log=log)
    log(f"suite {suite.name}: {len(records)} records in {time.monotonic() - t0:.0f} s")
    return records
