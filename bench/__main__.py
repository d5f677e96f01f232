"""``python -m bench --suite {cpu,gpu,smoke}``: run a suite, write JSON + markdown + PNG plots.

Examples::

    python -m bench --suite cpu                  # < 5 min on 2 cores -> bench/results/<date>-cpu/
    python -m bench --suite gpu                  # < 8 min on one H100 -> bench/results/<date>-h100.../
    python -m bench --suite smoke                # seconds: checks the harness (-> a temp folder)
    python -m bench --suite scaling              # = python -m bench.scaling (tiled vs dense vs N)
    python -m bench --suite gpu --dry-run        # print the plan only
    python -m bench.report bench/results/<dir>/results.json   # re-render table and plots
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

from . import first_call, report, suites


def main(argv=None):
    rest = list(sys.argv[1:] if argv is None else argv)
    if rest[:2] == ["--suite", "scaling"] or rest[:1] == ["--suite=scaling"]:
        from . import scaling  # tiled vs dense up to past the memory limit: its own options

        return scaling.main(rest[2:] if rest[0] == "--suite" else rest[1:])
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=sorted(suites.SUITES), default=None,
                    help="cpu / gpu / smoke (default: gpu when CUDA is present, else cpu)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None,
                    help="shorthand: --device cpu = --suite cpu, --device cuda = --suite gpu")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="wall-clock budget of the grid (points past it are recorded as skipped)")
    ap.add_argument("--loss", action="append", default=None,
                    help="only these losses (repeatable): clip, siglip, supcon, ntxent, matryoshka")
    ap.add_argument("--no-target", action="store_true",
                    help="skip the target (cpu: CLIP at N = 8192; gpu: CLIP / SigLIP at N = 65536)")
    ap.add_argument("--target-only", action="store_true",
                    help="only the target (cpu: CLIP at N = 8192; gpu: CLIP / SigLIP at N = 65536)")
    ap.add_argument("--tiles", default=None,
                    help="cpu target: torch-backend tiles to try, e.g. 512x1024,2048x2048")
    ap.add_argument("--target-reps", type=int, default=None, help="cpu target: timed calls")
    ap.add_argument("--out", default=None,
                    help="results folder (default bench/results/<date>-<dev>; smoke: a new "
                         "temporary folder, never next to real results)")
    ap.add_argument("--no-first-call", action="store_true",
                    help="skip the first-call times (a fresh process per backend, a few seconds)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (CPU); default: torch's (one per core)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    args = ap.parse_args(argv)

    name = args.suite or {"cpu": "cpu", "cuda": "gpu", None: None}[args.device] or (
        "gpu" if torch.cuda.is_available() else "cpu")
    suite = suites.SUITES[name](**({"budget_s": args.budget_s}
                                   if args.budget_s and name != "smoke" else {}))
    if args.device and name == "smoke":
        suite.device = args.device
    if args.no_target:
        suite.target = {}
    if suite.target and args.tiles:
        suite.target["tiles"] = [tuple(int(v) for v in t.lower().split("x"))
                                 for t in args.tiles.split(",")]
    if suite.target and args.target_reps:
        suite.target["reps"] = args.target_reps
    if args.target_only:
        suite.series = []
    if args.dry_run:
        runnable = suite.device == "cpu" or torch.cuda.is_available()
        for s in suite.series:
            print(s, sorted(suites.P.providers(s.loss, suite.device, s.d)) if runnable else "")
        print("sizes", suite.sizes, "budget", suite.budget_s, "s; target", suite.target)
        return 0
    if suite.device == "cuda" and not torch.cuda.is_available():
        sys.exit("the gpu suite needs CUDA; use --suite cpu")

    if args.threads:
        torch.set_num_threads(args.threads)
    env = report.environment(suite.device)
    print(f"# {env['device']} | torch {env['torch']} | backends {env['tilecl_backends']} | "
          f"{env['date_utc']}", flush=True)
    if not args.no_first_call and not args.target_only:
        env["first_call_s"] = first_call.record(suite.device, log=lambda s: print(s, flush=True))
    records = suites.run(suite, log=lambda s: print(s, flush=True), only_losses=args.loss)
    env["loadavg_after"] = report.loadavg()
    loaded = report.load_warning(env)
    if loaded:
        print(f"WARNING: {loaded}", flush=True)
    out = args.out or (tempfile.mkdtemp(prefix="tilecl-bench-smoke-") if suite.name == "smoke"
                       else report.out_dir(env))
    os.makedirs(out, exist_ok=True)
    target = [r for r in records if r.get("group") == "target"]
    summary = suites.target_markdown(target) if target else ""
    notes = [f"suite {suite.name}: N doubling over {suite.sizes[0]}..{suite.sizes[-1]}, a series "
             f"stops after an OOM or a call slower than {suite.time_cap_s} s; timing: "
             + ("CUDA events, median after warm-up, rotating inputs > 2x L2"
                if suite.device == "cuda" else "perf_counter, median after warm-up")
             + "; memory: " + ("torch.cuda.max_memory_allocated minus the memory before the call"
                               if suite.device == "cuda" else
                               "peak live tensor bytes during the call (TorchDispatchMode probe)"),
             "TFLOP/s in the JSON count 8 N^2 D per fwd+bwd (2 fwd, 6 bwd) for every provider "
             "(bench/providers.py: flops)"]
    path = os.path.join(out, "results.json")
    report.write_json(path, env, records, {"summary_md": summary, "notes": notes,
                                           "suite": suite.name})
    pngs = report.render(path)
    print(f"wrote {path}, {os.path.join(out, 'results.md')}, " + ", ".join(pngs))
    print(report.short_summary(records))
    if loaded:
        print(f"WARNING: {loaded}")
    if summary:
        print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
