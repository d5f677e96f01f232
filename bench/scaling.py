"""Scaling of tiled vs dense CLIP on the CPU: time and extra peak memory vs N, from small N up to
where the dense N x N logits no longer fit in this machine's memory, and beyond for the tiled
backends (log-log plot, OOM marked).

    python -m bench.scaling                         # -> bench/results/<date>-cpu/scaling.{json,md,png}
    python -m bench.scaling --max-n 8192 --out /tmp/s   # a quick check of the script
    python -m bench.scaling --replot bench/results/<dir>/scaling.json

Symmetric CLIP, fp32, forward + backward, D = 128, N = M doubling from 1024. Nothing is allocated
to find the limits:

- memory: a dense point is recorded as OOM (``status "oom"``, ``planned`` in the record) when its
  planned extra bytes, c N^2 (c measured at the largest dense point that ran; 16 bytes = four
  fp32 N x N buffers, logits and log-softmax of both directions and their gradients, before any
  point ran), exceed ``--mem-fraction`` of the memory available when the point starts
  (MemAvailable in /proc/meminfo). Trying would swap or get the process killed, not raise.
- time: a point is skipped (``status "skipped"``) when its planned time, 8 N^2 D flops divided by
  the best rate the same provider reached at the smaller sizes, exceeds ``--time-cap-s``.

Time: median of the repeats (one call, no warm-up, once a call takes over 2 s); memory: peak live
tensor bytes during one call beyond the inputs, gradients included (the benchmark harness's
probe). The 1-minute load average before and after is recorded: CPU timings on a loaded machine
are slower, memory is not affected.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from . import harness as H
from . import providers as P
from . import report

MiB, GiB = 2**20, 2**30
LOSS, MODE, DTYPE = "clip", "fwd_bwd", "fp32"
DENSE_BYTES_PER_N2 = 16.0  # before any dense point ran: 4 fp32 N x N buffers
# tiled first: were the dense loss to exhaust the memory after all, the tiled points are on disk
PROVIDERS = ("tilecl-torch", "tilecl-native", "dense")


def available_bytes():
    """Memory the kernel could hand out now without swapping (MemAvailable), else psutil."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def total_bytes():
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _config(planned_s):
    if planned_s is not None and planned_s > 2.0:  # one call: the measurement costs 2 calls
        return H.Config(warmup=0, min_reps=1, max_reps=1, target_s=0.0)
    return H.Config(warmup=1, min_reps=3, max_reps=7, target_s=1.0)


def run(args, log=print, save=None):
    """Every (provider, N) record; ``save(records)`` after each point (a run killed by the kernel
    for memory keeps what it measured: re-render with --replot)."""
    records = []
    names = [p for p in PROVIDERS if p in P.providers(LOSS, "cpu", args.d)]
    for prov in names:
        rate = None  # the best flops per second of this provider so far
        dense_c = DENSE_BYTES_PER_N2
        for n in H.doubling(args.min_n, args.max_n):
            case = H.Case(LOSS, prov, n, args.d, DTYPE, MODE, "cpu")
            flops = P.flops(LOSS, MODE, n, d=args.d)
            planned_s = flops / rate if rate else None
            rec = {**case.__dict__, "flops": flops, "group": "scaling"}
            if planned_s is not None:
                rec["planned_s"] = round(planned_s, 3)
            if prov == "dense":
                need, avail = dense_c * n * n, available_bytes()
                rec.update(planned_mib=need / MiB, available_mib=avail / MiB)
                if need > args.mem_fraction * avail:
                    rec.update(status="oom", planned=True,
                               error=f"planned {need / GiB:.3g} GiB > {args.mem_fraction:.0%} of "
                                     f"{avail / GiB:.3g} GiB available (not attempted)")
                    records.append(rec)
                    log(H.format_record(rec))
                    continue
            if save is not None:
                save(records)
            if planned_s is not None and planned_s > args.time_cap_s:
                rec.update(status="skipped",
                           error=f"planned {planned_s:.3g} s per call > cap {args.time_cap_s:g} s")
                records.append(rec)
                log(H.format_record(rec))
                continue
            t0 = time.monotonic()
            rec = {**rec, **H.measure(case, _config(planned_s))}
            rec["wall_s"] = round(time.monotonic() - t0, 2)
            records.append(rec)
            log(H.format_record(rec) + f"  ({rec['wall_s']:.0f} s)")
            if save is not None:
                save(records)
            if rec["status"] != "ok":
                break
            rate = max(rate or 0.0, flops / (rec["time_ms"] / 1e3))  # the best: load only slows
            if prov == "dense" and rec.get("mem_mib"):
                dense_c = rec["mem_mib"] * MiB / n**2  # the largest point: O(N) terms smallest
    return records


def markdown(data):
    env, recs = data["environment"], data["records"]
    provs = list(dict.fromkeys(r["provider"] for r in recs))
    ns = sorted({r["n"] for r in recs})
    by = {(r["provider"], r["n"]): r for r in recs}

    def cell(r):
        if r is None:
            return ""
        if r["status"] == "oom":
            return f"OOM (needs {r['planned_mib'] / 1024:.0f} GiB)" if r.get("planned") else "OOM"
        if r["status"] != "ok":
            return f"skipped (~{r['planned_s']:.0f} s)" if "planned_s" in r else r["status"]
        t = r["time_ms"]
        ts = f"{t / 1e3:.2f} s" if t >= 1e3 else f"{t:.1f} ms"
        m = r.get("mem_mib", float("nan"))
        ms = f"{m / 1024:.2f} GiB" if m >= 1024 else f"{m:.1f} MiB"
        return f"{ts} / {ms}"

    lines = [
        f"# Scaling: symmetric CLIP, {DTYPE}, forward + backward, D = {data['d']}", "",
        f"- device: {env['device']}, "
        f"{data['total_gib']:.1f} GiB RAM ({data['available_gib_start']:.1f} GiB available at start)",
        f"- date: {env['date_utc']}; torch {env['torch']}, tilecl {env['tilecl']}"
        + (f", commit {env['git_commit']}" if env.get("git_commit") else ""),
        f"- 1-min load average before/after: {env.get('loadavg_before')}/"
        f"{env.get('loadavg_after')} on {env['cpu_count']} cores"
        + (" (LOADED machine: times are slower than on a quiet one; memory is exact)"
           if (env.get("loadavg_before") or 0) > 0.5 * env["cpu_count"] else ""),
        f"- cells: time per call / extra peak memory (beyond the inputs, gradients included). "
        f"OOM: the dense point's planned memory exceeds {data['mem_fraction']:.0%} of the "
        f"available memory (not attempted); skipped: planned time > {data['time_cap_s']:g} s "
        "per call (extrapolated from the provider's best rate at smaller N)",
        f"- reproduce: `{data['command']}`", "",
        "| N | " + " | ".join(provs) + " |", "|---:|" + "---:|" * len(provs)]
    for n in ns:
        lines.append(f"| {n} | " + " | ".join(cell(by.get((p, n))) for p in provs) + " |")
    return "\n".join(lines) + "\n"


def plot(data, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.transforms import blended_transform_factory

    recs = data["records"]
    fig, axes = plt.subplots(1, 2, figsize=(11.5, 4.4))
    ram = data["total_gib"] * 1024
    limit = data["mem_fraction"] * data["available_gib_start"] * 1024
    top = blended_transform_factory(axes[0].transData, axes[0].transAxes)
    styles = {"dense": ("--", "tab:red"), "tilecl-torch": ("-", "tab:blue"),
              "tilecl-native": ("-", "tab:green")}
    for prov in dict.fromkeys(r["provider"] for r in recs):
        ls, color = styles.get(prov, ("-", None))
        pts = sorted((r for r in recs if r["provider"] == prov), key=lambda r: r["n"])
        ok = [r for r in pts if r["status"] == "ok"]
        oom = [r for r in pts if r["status"] == "oom"]
        slow = [r for r in pts if r["status"] == "skipped" and "planned_s" in r]
        for ax, key in ((axes[0], "time_ms"), (axes[1], "mem_mib")):
            xs = [r["n"] for r in ok if key in r]
            ys = [r[key] / (1e3 if key == "time_ms" else 1.0) for r in ok if key in r]
            ax.plot(xs, ys, ls, marker="o", ms=4, color=color, label=prov)
        if slow and ok:  # not run (time cap): the planned time, hollow markers
            xs = [ok[-1]["n"]] + [r["n"] for r in slow]
            ys = [ok[-1]["time_ms"] / 1e3] + [r["planned_s"] for r in slow]
            axes[0].plot(xs, ys, ":", color=color)
            axes[0].plot(xs[1:], ys[1:], "o", ms=5, mfc="none", color=color,
                         label=f"{prov}: planned (over the time cap, not run)")
        if oom and ok:
            # memory: the planned bytes, dotted, X = not attempted; time: X on the top edge
            xs = [ok[-1]["n"]] + [r["n"] for r in oom]
            ys = [ok[-1].get("mem_mib", 0)] + [r["planned_mib"] for r in oom]
            axes[1].plot(xs, ys, ":", color=color)
            axes[1].plot(xs[1:], ys[1:], "x", ms=10, mew=2, color=color,
                         label=f"{prov}: out of memory (planned bytes)")
            axes[0].plot([r["n"] for r in oom], [0.96] * len(oom), "x", ms=10, mew=2, color=color,
                         transform=top, clip_on=False, label=f"{prov}: out of memory")
    n0 = min(r["n"] for r in recs)
    axes[1].axhline(ram, color="gray", lw=1)
    axes[1].text(n0, ram * 1.15, f"machine RAM {data['total_gib']:.0f} GiB", fontsize=8,
                 color="gray")
    axes[1].axhline(limit, color="gray", lw=1, ls="--")
    axes[1].text(n0, limit / 1.6, f"OOM threshold: {data['mem_fraction']:.0%} of the "
                 f"{data['available_gib_start']:.1f} GiB available", fontsize=8, color="gray")
    for ax, ylabel in ((axes[0], "time per forward + backward (s)"),
                       (axes[1], "extra peak memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("N (batch size: N x N similarities)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    env = data["environment"]
    threads = env["torch_threads"]
    fig.suptitle(f"Symmetric CLIP, fp32, forward + backward, D = {data['d']}: tiled vs dense. "
                 f"CPU, {threads} thread{'s' if threads != 1 else ''}, load average "
                 f"{env.get('loadavg_before')}/{env.get('loadavg_after')} on {env['cpu_count']} "
                 f"cores, {env['date_utc'][:10]} (x = out of memory)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write(data, out):
    os.makedirs(out, exist_ok=True)
    base = os.path.join(out, "scaling")
    report.write_json(base + ".json", data["environment"], data["records"],
                      {k: v for k, v in data.items() if k not in ("environment", "records")})
    with open(base + ".md", "w") as f:
        f.write(markdown(data))
    return [base + ".json", base + ".md", plot(data, base + ".png")]


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.scaling", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=128, help="embedding width D (default 128)")
    ap.add_argument("--min-n", type=int, default=1024)
    ap.add_argument("--max-n", type=int, default=131072)
    ap.add_argument("--time-cap-s", type=float, default=60.0,
                    help="skip a point whose planned time per call exceeds this (default 60)")
    ap.add_argument("--mem-fraction", type=float, default=0.8,
                    help="dense is OOM when its planned bytes exceed this fraction of the "
                         "available memory (default 0.8)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--out", default=None, help="folder (default bench/results/<date>-cpu)")
    ap.add_argument("--replot", default=None, help="re-render markdown + PNG from a scaling.json")
    args = ap.parse_args(argv)
    if args.replot:
        raw = report.load_json(args.replot)
        data = {**raw, "environment": raw["environment"], "records": raw["records"]}
        print("\n".join(write(data, os.path.dirname(os.path.abspath(args.replot)))))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    env = report.environment("cpu")
    data = {"d": args.d, "time_cap_s": args.time_cap_s, "mem_fraction": args.mem_fraction,
            "total_gib": total_bytes() / GiB, "available_gib_start": available_bytes() / GiB,
            "command": "python -m bench.scaling " + " ".join(argv if argv is not None
                                                              else sys.argv[1:])}
    print(f"# {env['device']} | torch {env['torch']} | {data['total_gib']:.1f} GiB RAM, "
          f"{data['available_gib_start']:.1f} available | load {env['loadavg_before']} | "
          f"{env['date_utc']}", flush=True)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"{env['date_utc'][:10]}-cpu")
    os.makedirs(out, exist_ok=True)
    data["environment"] = env

    def save(records):  # partial results, in case the run does not finish
        report.write_json(os.path.join(out, "scaling.json"), env, records,
                          {k: v for k, v in data.items() if k not in ("environment", "records")})

    data["records"] = run(args, log=lambda s: print(s, flush=True), save=save)
    env["loadavg_after"] = report.loadavg()
    print("\n".join(write(data, out)))
    print(markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
