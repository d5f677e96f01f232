"""Tile-size sweep of the torch backend, interleaved so load drift on a shared machine hits every
tile alike: ``python -m bench.tiles --n 8192 --d 256 --rounds 3 --tiles 512x1024,2048x2048``.

Each round runs one fp32 symmetric-CLIP forward + backward per tile (order rotated every round);
the report gives each tile's median and minimum over the rounds and its extra peak memory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from tilecl import _torch_tiled

from . import harness as H
from .report import environment


def sweep(n, d, tiles, rounds, dtype="fp32", log=print):
    case = H.Case("clip", "tilecl-torch", n, d, dtype, "fwd_bwd", "cpu")
    s = H.Setup(case)
    times = {t: [] for t in tiles}
    mem = {}
    old = tuple(_torch_tiled.TILE)
    try:
        for r in range(rounds):
            order = tiles[r % len(tiles):] + tiles[:r % len(tiles)]
            for t in order:
                _torch_tiled.set_tile_size(*t)
                s.zero_grad()
                t0 = time.perf_counter()
                s.step(0)
                times[t].append(time.perf_counter() - t0)
                log(f"round {r} tile {t[0]}x{t[1]}: {times[t][-1] * 1e3:.0f} ms")
        for t in tiles:
            _torch_tiled.set_tile_size(*t)
            mem[t] = H._peak_cpu(s) / H.MiB
    finally:
        _torch_tiled.set_tile_size(*old)
    return [{"tile": f"{t[0]}x{t[1]}", "median_ms": 1e3 * statistics.median(times[t]),
             "min_ms": 1e3 * min(times[t]), "times_ms": [1e3 * x for x in times[t]],
             "mem_mib": mem[t]} for t in tiles]


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.tiles", description=__doc__)
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--tiles", default="256x1024,512x1024,1024x1024,2048x2048,1024x4096")
    ap.add_argument("--json", default=None, help="write the rows and the environment here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tiles = [tuple(int(v) for v in t.split("x")) for t in args.tiles.split(",")]
    env = environment("cpu")
    rows = sweep(args.n, args.d, tiles, args.rounds)
    print(f"\n{env['device']}, load {env['loadavg_before']}, N = M = {args.n}, D = {args.d}, fp32 "
          "CLIP fwd+bwd\n\n| tile | median (ms) | min (ms) | extra peak (MiB) |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['tile']} | {r['median_ms']:.0f} | {r['min_ms']:.0f} | {r['mem_mib']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
