"""Results on disk: JSON (every record + the environment), a markdown table, PNG plots.

``python -m bench.report bench/results/<dir>/results.json`` re-renders the table and the plots
from a saved JSON (e.g. after copying GPU results back).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from collections import defaultdict

import torch

LOSS_TITLES = {"clip": "symmetric CLIP (InfoNCE both ways)", "siglip": "SigLIP",
               "supcon": "SupCon (2 views, 'all' anchors)", "ntxent": "NT-Xent (SimCLR)",
               "matryoshka": "Matryoshka InfoNCE (prefixes D, D/2, D/4, D/8)"}


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def loadavg():
    """1-minute load average (other processes on a shared machine make CPU timings noisy)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def load_warning(env) -> str:
    """A sentence when other work shared the machine during the run (timings are then noisy):
    the 1-minute load average above half the cores before the run, or above the benchmark's own
    threads plus half the cores after it; else ""."""
    cores = env.get("cpu_count") or 1
    before, after = env.get("loadavg_before"), env.get("loadavg_after")
    own = env.get("torch_threads") or cores
    if (before is not None and before > 0.5 * cores) or (after is not None and after > own + 0.5 * cores):
        return (f"the machine was loaded: 1-min load average {before} before and {after} after the "
                f"run on {cores} cores (the benchmark itself runs {own} threads); timings are noisy")
    return ""


def first_call_line(env) -> str:
    """The first-call times of ``bench.first_call`` as one markdown line, or ""."""
    fc = env.get("first_call_s") or {}
    parts = [f"{b} {1e3 * r['first_call_s']:.0f} ms (later {1e3 * r['later_call_s']:.1f} ms)"
             for b, r in fc.items() if "error" not in r]
    return ("first loss call of a fresh process (info_nce forward + backward, N = 256, D = 64): "
            + ", ".join(parts)) if parts else ""


def environment(device: str) -> dict:
    """Device, versions, date: what every results table states."""
    env = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "loadavg_before": loadavg(),
    }
    import tilecl

    env["tilecl"] = tilecl.__version__
    env["tilecl_backends"] = tilecl.available_backends(torch.device(device))
    from tilecl import _torch_tiled

    env["torch_backend_tile"] = ("x".join(str(v) for v in _torch_tiled.TILE) if _torch_tiled._PINNED[0]
                                 or device != "cuda" else "tile_plan: CUDA_TILE_BYTES budget")
    for mod in ("triton", "pytorch_metric_learning", "inf_cl", "memeff", "siglip_kernel"):
        try:
            env[mod] = getattr(__import__(mod), "__version__", "installed")
        except Exception:  # noqa: BLE001
            pass
    try:
        env["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = None
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        env["device"] = torch.cuda.get_device_name(0)
        env["device_memory_gib"] = round(p.total_memory / 2**30, 1)
        env["cuda"] = torch.version.cuda
        env["matmul_tflops_bf16"] = matmul_tflops(torch.bfloat16)
        env["matmul_tflops_fp32_default"] = matmul_tflops(torch.float32)
        try:
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    else:
        env["device"] = f"CPU: {env['cpu']} ({torch.get_num_threads()} threads)"
    return env


def matmul_tflops(dtype=torch.bfloat16, n=8192, reps=20):
    """Measured dense matmul rate on the GPU (what achieved TFLOP/s is compared with)."""
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return round(2 * n**3 * reps / (start.elapsed_time(end) / 1e3) / 1e12, 1)


def device_slug(env: dict) -> str:
    if env["device"].startswith("CPU"):
        return "cpu"
    name = env["device"].lower().replace("nvidia", "").strip()
    return "-".join(name.split())[:32] or "gpu"


def out_dir(env, root=None):
    """bench/results/<date>-<device> (or under ``root``)."""
    root = root or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    return os.path.join(root, f"{env['date_utc'][:10]}-{device_slug(env)}")


# ---- JSON ----------------------------------------------------------------------------------------

def write_json(path, env, records, extra=None):
    with open(path, "w") as f:
        json.dump({"environment": env, "records": records, **(extra or {})}, f, indent=1)


def load_json(path):
    with open(path) as f:
        return json.load(f)


# ---- markdown ------------------------------------------------------------------------------------

def _cell(r):
    if r is None:
        return ""
    if r["status"] == "oom":
        return "OOM"
    if r["status"] == "error":
        return "error"
    if r["status"] != "ok":
        return "-"
    mem = f" / {r['mem_mib']:.1f}" if "mem_mib" in r else ""
    return f"{r['time_ms']:.1f}{mem}"


def markdown(env, records, title="tilecl benchmark", notes=()):
    """One table per (loss, mode, dtype, D): rows N, columns providers, cells 'ms / MiB'."""
    lines = [f"# {title}", "",
             f"- device: {env['device']}", f"- date: {env['date_utc']}",
             f"- versions: python {env['python']}, torch {env['torch']}, tilecl {env['tilecl']}"
             + "".join(f", {k} {env[k]}" for k in ("triton", "pytorch_metric_learning", "inf_cl",
                                                     "memeff", "siglip_kernel", "cuda", "driver")
                       if k in env)
             + (f", commit {env['git_commit']}" if env.get("git_commit") else ""),
             f"- tilecl backends here: {', '.join(env['tilecl_backends'])}; torch-backend tile "
             f"{env.get('torch_backend_tile')}",
             *([f"- measured matmul rate (8192^3): bf16 {env['matmul_tflops_bf16']} TFLOP/s, fp32 "
                f"{env['matmul_tflops_fp32_default']} TFLOP/s (TF32 off unless enabled); achieved "
                "TFLOP/s per point are in results.json"] if "matmul_tflops_bf16" in env else []),
             *([f"- CPU threads: {env['torch_threads']} of {env['cpu_count']} cores; 1-min load "
                f"average before/after: {env.get('loadavg_before')}/{env.get('loadavg_after')}"]
               if env["device"].startswith("CPU") else []),
             *([f"- **WARNING: {load_warning(env)}**"] if load_warning(env) else []),
             *([f"- {first_call_line(env)}"] if first_call_line(env) else []),
             "- cells: median time in ms / extra peak memory in MiB (beyond the inputs; "
             "gradients included); OOM = out of memory; - = not run (cap, budget, or after an "
             "OOM/error)", *[f"- {n}" for n in notes], ""]
    groups = defaultdict(list)
    for r in records:
        if r.get("group", "grid") == "grid":
            groups[(r["loss"], r["mode"], r["dtype"], r["d"])].append(r)
    for (loss, mode, dtype, d), recs in groups.items():
        provs = list(dict.fromkeys(r["provider"] for r in recs))
        sizes = sorted({r["n"] for r in recs})
        by = {(r["provider"], r["n"]): r for r in recs}
        lines += [f"## {LOSS_TITLES.get(loss, loss)}: {mode}, {dtype}, D = {d}", "",
                  "| N | " + " | ".join(provs) + " |",
                  "|---:|" + "---:|" * len(provs)]
        for n in sizes:
            lines.append(f"| {n} | " + " | ".join(_cell(by.get((p, n))) for p in provs) + " |")
        lines.append("")
    return "\n".join(lines)


def short_summary(records, limit=12):
    """A few lines for the end of a run: per series and provider, the largest N measured (time,
    memory) and what stopped it."""
    lines = ["| series | provider | largest N | ms | MiB | then |", "|---|---|---:|---:|---:|---|"]
    groups = defaultdict(list)
    for r in records:
        if r.get("group", "grid") == "grid":
            groups[(r["loss"], r["mode"], r["dtype"], r["d"])].append(r)
    for key in list(groups)[:limit]:
        for prov in dict.fromkeys(r["provider"] for r in groups[key]):
            pts = sorted((r for r in groups[key] if r["provider"] == prov), key=lambda r: r["n"])
            ok = [r for r in pts if r["status"] == "ok"]
            nxt = next((r for r in pts if r["status"] != "ok"), None)
            if ok:
                b = ok[-1]
                lines.append(f"| {' '.join(map(str, key))} | {prov} | {b['n']} | {b['time_ms']:.1f} "
                             f"| {b.get('mem_mib', float('nan')):.0f} | "
                             f"{(nxt['status'] + ' at ' + str(nxt['n'])) if nxt else ''} |")
    return "\n".join(lines)


# ---- plots ---------------------------------------------------------------------------------------

def plot(records, out_dir, prefix="", mode="fwd_bwd"):
    """One PNG per loss: a row per (dtype, D), time and memory vs N on log-log axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    grid = [r for r in records if r.get("group", "grid") == "grid" and r["mode"] == mode]
    for loss in dict.fromkeys(r["loss"] for r in grid):
        recs = [r for r in grid if r["loss"] == loss]
        panels = sorted({(r["dtype"], r["d"]) for r in recs if r["status"] == "ok"},
                        key=lambda t: (t[0], t[1]))
        if not panels:  # nothing measured for this loss (budget): no plot
            continue
        fig, axes = plt.subplots(len(panels), 2, figsize=(11, 3.6 * len(panels)), squeeze=False)
        for row, (dtype, d) in enumerate(panels):
            sub = [r for r in recs if (r["dtype"], r["d"]) == (dtype, d)]
            for prov in dict.fromkeys(r["provider"] for r in sub):
                pts = sorted((r for r in sub if r["provider"] == prov), key=lambda r: r["n"])
                ok = [r for r in pts if r["status"] == "ok"]
                style = "-" if prov.startswith("tilecl") else "--"
                for col, key in ((0, "time_ms"), (1, "mem_mib")):
                    xs = [r["n"] for r in ok if key in r]
                    ys = [max(r[key], 1e-3) for r in ok if key in r]
                    (line,) = axes[row][col].plot(xs, ys, style, marker="o", ms=3, label=prov)
                    oom = [r["n"] for r in pts if r["status"] == "oom"]
                    if oom and ys:
                        axes[row][col].plot(oom, [ys[-1]] * len(oom), "x", ms=9,
                                            color=line.get_color())
            for col, ylabel in ((0, "time per call (ms)"), (1, "extra peak memory (MiB)")):
                ax = axes[row][col]
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel("N (rows of the N x N similarity matrix)")
                ax.set_ylabel(ylabel)
                ax.set_title(f"{loss} {mode} {dtype} D={d}", fontsize=9)
                ax.grid(True, which="both", alpha=0.3)
            axes[row][0].legend(fontsize=7)
        fig.suptitle(f"{LOSS_TITLES.get(loss, loss)} (x = out of memory)", fontsize=10)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{prefix}{loss}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def render(json_path):
    data = load_json(json_path)
    out_dir = os.path.dirname(os.path.abspath(json_path))
    md = markdown(data["environment"], data["records"], notes=data.get("notes", ()))
    target = [r for r in data["records"] if r.get("group") == "target"]
    if target:
        from .suites import target_markdown

        tm = target_markdown(target)
        md = md.replace("\n## ", "\n" + tm + "\n## ", 1) if "\n## " in md else md + "\n" + tm
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(md)
    return plot(data["records"], out_dir)


if __name__ == "__main__":
    for p in sys.argv[1:]:
        print("\n".join(render(p)))
