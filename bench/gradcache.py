"""The largest contrastive batch whose training step fits a fixed memory budget, with and without
the gradient cache (``tilecl.grad_cache_step``), on the CPU.

Memory is counted as the test suite and the demo count it: ``tilecl.memtrack.PeakTensorBytes``,
the peak of the live bytes of every tensor the step creates (activations, the loss's buffers,
embedding and parameter gradients); the inputs and the parameters, which exist before the step,
are not counted. The model: two MLP towers (image: 64 -> 1024 -> 1024 -> 128, text: 48 -> ...),
GELU, dropout 0.1, a learnable logit scale, the CLIP loss on L2-normalised embeddings. Modes:

- ``dense``: one backward through the whole batch, the loss from the full logits (``reference``)
- ``tiled``: one backward through the whole batch, the tiled loss (``torch`` backend)
- ``tiled+gradcache``: ``grad_cache_step`` with chunks of ``--chunk`` rows, the tiled loss

For each mode the batch N doubles until the step exceeds the budget, then bisects to within
1/32. Usage::

    python -m bench.gradcache                       # 64 MiB budget -> bench/results/<date>-cpu/
    python -m bench.gradcache --budget-mib 32 --chunk 128 --out /tmp/gc
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

import tilecl
from tilecl.memtrack import PeakTensorBytes

from . import report

D_IMG, D_TXT, HIDDEN, D_EMB = 64, 48, 1024, 128


def _tower(d_in):
    return nn.Sequential(nn.Linear(d_in, HIDDEN), nn.GELU(), nn.Dropout(0.1),
                         nn.Linear(HIDDEN, HIDDEN), nn.GELU(), nn.Dropout(0.1),
                         nn.Linear(HIDDEN, D_EMB))


def _model():
    torch.manual_seed(0)
    return _tower(D_IMG), _tower(D_TXT), nn.Parameter(torch.tensor(2.6))


def step_peak(mode, n, model, chunk):
    """Peak counted bytes of one training step (forward, loss, backward) on a batch of n."""
    img_tower, txt_tower, log_scale = model
    g = torch.Generator().manual_seed(n)
    images = torch.randn(n, D_IMG, generator=g)
    texts = torch.randn(n, D_TXT, generator=g)
    backend = "reference" if mode == "dense" else "torch"

    def loss_fn(a, b):
        return tilecl.clip_loss(F.normalize(a, dim=1), F.normalize(b, dim=1), log_scale.exp(),
                                backend=backend)

    params = [*img_tower.parameters(), *txt_tower.parameters(), log_scale]
    for p in params:
        p.grad = None
    probe = PeakTensorBytes()
    with probe:
        if mode == "tiled+gradcache":
            tilecl.grad_cache_step((img_tower, txt_tower), (images, texts), loss_fn,
                                   chunk_size=chunk)
        else:
            loss_fn(img_tower(images), txt_tower(texts)).backward()
    for p in params:
        p.grad = None
    return probe.peak


def largest_batch(mode, budget, model, chunk, n0=256):
    """(largest n that fits, probes [(n, peak bytes)])."""
    probes = []

    def fits(n):
        peak = step_peak(mode, n, model, chunk)
        probes.append((n, peak))
        return peak <= budget

    lo, hi = 0, n0
    while fits(hi):
        lo, hi = hi, 2 * hi
    if lo == 0:
        lo = 1
        if not fits(lo):
            return 0, probes
    while hi - lo > max(1, lo // 32):
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo, probes


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.gradcache", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-mib", type=float, default=64.0, help="memory budget (MiB)")
    ap.add_argument("--chunk", type=int, default=256, help="gradient-cache chunk rows")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--out", default=None, help="folder (default bench/results/<date>-cpu)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    budget = int(args.budget_mib * 2**20)
    env = report.environment("cpu")
    model = _model()
    rows = []
    for mode in ("dense", "tiled", "tiled+gradcache"):
        t0 = time.perf_counter()
        n, probes = largest_batch(mode, budget, model, args.chunk)
        rows.append({"mode": mode, "largest_n": n, "probes": probes,
                     "seconds": round(time.perf_counter() - t0, 1)})
        print(f"{mode:>16}: largest N = {n:6d}  ({len(probes)} probes, "
              f"{rows[-1]['seconds']} s)", flush=True)
    env["loadavg_after"] = report.loadavg()
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   _dt.date.today().isoformat() + "-cpu")
    os.makedirs(out, exist_ok=True)
    setup = {"budget_mib": args.budget_mib, "chunk": args.chunk,
             "model": f"two MLP towers {D_IMG}/{D_TXT} -> {HIDDEN} -> {HIDDEN} -> {D_EMB}, "
                      "GELU, dropout 0.1, fp32; CLIP loss on normalised embeddings",
             "memory": "tilecl.memtrack.PeakTensorBytes over one step"}
    with open(os.path.join(out, "gradcache.json"), "w") as f:
        json.dump({"environment": env, "setup": setup, "results": rows}, f, indent=1)
    base = {r["mode"]: r["largest_n"] for r in rows}["tiled"]
    lines = ["# Largest batch in a fixed memory budget: gradient cache", "",
             f"Budget {args.budget_mib:g} MiB of counted tensor bytes per training step "
             f"({setup['memory']}); {setup['model']}; gradient-cache chunks of {args.chunk} rows.",
             f"{env['date_utc']}, torch {env['torch']}, {env['torch_threads']} threads, "
             f"load {env['loadavg_before']} -> {env['loadavg_after']}.", "",
             "| mode | largest N | vs tiled | peak at that N (MiB) |", "|---|---:|---:|---:|"]
    for r in rows:
        peak = dict(r["probes"]).get(r["largest_n"], 0) / 2**20
        lines.append(f"| {r['mode']} | {r['largest_n']} | {r['largest_n'] / max(base, 1):.2f}x "
                     f"| {peak:.1f} |")
    with open(os.path.join(out, "gradcache.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[-len(rows) - 2:]))
    print(f"wrote {out}/gradcache.json, gradcache.md")


if __name__ == "__main__":
    main()
