"""First-call cost of each backend: what a process pays on its first loss call (lazy imports, op
registration, kernel compilation), measured in a fresh interpreter per backend.

``python -m bench.first_call [--device cpu] [--backend native ...]`` prints one line per backend;
``python -m bench`` records the same numbers in results.json (``first_call_s``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

_CODE = """
import json, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import tilecl
t2 = time.perf_counter()
backend, device = sys.argv[1], sys.argv[2]
gen = torch.Generator().manual_seed(0)
q = torch.randn(256, 64, generator=gen).to(device).requires_grad_()
k = torch.randn(256, 64, generator=gen).to(device).requires_grad_()

def call():
    t = time.perf_counter()
    tilecl.info_nce(q, k, temperature=0.1, backend=backend).backward()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t

first = call()
second = min(call() for _ in range(3))
print(json.dumps({"import_torch_s": t1 - t0, "import_tilecl_s": t2 - t1, "first_call_s": first,
                  "later_call_s": second, "modules": len(sys.modules),
                  "sympy_imported": "sympy" in sys.modules}))
"""


def measure(backend: str, device: str = "cpu", timeout: float = 300.0) -> dict:
    """Times (s) of a fresh process: import torch, import tilecl, the first info_nce forward +
    backward (N = 256, D = 64) and the fastest of three later calls; or {"error": ...}."""
    run = subprocess.run([sys.executable, "-c", _CODE, backend, device], capture_output=True,
                         text=True, timeout=timeout)
    if run.returncode != 0:
        return {"error": (run.stderr.strip().splitlines() or ["failed"])[-1]}
    out = json.loads(run.stdout.strip().splitlines()[-1])
    return {key: round(v, 4) if isinstance(v, float) else v for key, v in out.items()}


def default_backends(device: str) -> list:
    """The tile backends available on ``device`` (triton only on CUDA: on the CPU it runs in the
    interpreter, whose first call says nothing about a real one)."""
    import torch

    import tilecl

    names = tilecl.available_backends(torch.device(device))
    return [b for b in ("torch", "native", "triton") if b in names and (b != "triton" or
                                                                        device == "cuda")]


def record(device: str, log=print) -> dict:
    """``measure`` for every default backend of ``device``, logged one line each."""
    out = {}
    for backend in default_backends(device):
        r = out[backend] = measure(backend, device)
        log(f"first call ({backend}): " + (f"error {r['error']}" if "error" in r else
                                           f"{1e3 * r['first_call_s']:.1f} ms, later calls "
                                           f"{1e3 * r['later_call_s']:.2f} ms"))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.first_call", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--backend", action="append", default=None,
                    help="backend to measure (repeatable; default: every available tile backend)")
    args = ap.parse_args(argv)
    for backend in args.backend or default_backends(args.device):
        r = measure(backend, args.device)
        if "error" in r:
            print(f"{backend:7s} error: {r['error']}")
            continue
        print(f"{backend:7s} first call {1e3 * r['first_call_s']:8.1f} ms, later calls "
              f"{1e3 * r['later_call_s']:7.2f} ms (import torch {r['import_torch_s']:.2f} s, "
              f"tilecl {r['import_tilecl_s']:.2f} s; {r['modules']} modules, sympy "
              f"{'imported' if r['sympy_imported'] else 'not imported'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
