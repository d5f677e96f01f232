"""The first GPU call, checked on the CPU: the torch backend's tile plan (launches per pass), the
``auto`` choice on CUDA, the GPU script's cost model, and ``bash bench/gpu_first.sh --dry-run``
(every step, the Triton interpreter, small sizes)."""

import json
import math
import os
import pathlib
import re
import subprocess
import sys
import warnings

import pytest
import torch

import tilecl
import tilecl._backends as backends
import tilecl._torch_tiled as torch_tiled

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import first  # noqa: E402

# ---- the torch backend's tile plan ---------------------------------------------------------------


def test_cuda_tile_plan_is_not_launch_bound_at_the_target():
    """N = M = 65536, D = 768, bf16 inputs (fp32 tiles): the CPU tile (512 x 1024) visits 8192
    tiles per pass, about 30 launches each; the CUDA plan visits 128 of 4096 x 8192."""
    n, d = 65536, 768
    assert torch_tiled.tiles_per_pass(n, n, d, torch.float32, "cpu") == 8192
    assert torch_tiled.tile_plan(n, n, d, torch.float32, "cuda") == (4096, 8192)
    assert torch_tiled.tiles_per_pass(n, n, d, torch.float32, "cuda") == 128
    assert torch_tiled.tiles_per_pass(n, n, d, torch.float64, "cuda") == 256


@pytest.mark.parametrize("n,m,d", [(65536, 65536, 768), (65536, 65536, 4096), (100, 65536, 768),
                                   (65536, 100, 128), (7, 9, 4), (3000, 5000, 17)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_tile_plan_within_budget(n, m, d, dtype):
    br, bc = torch_tiled.tile_plan(n, m, d, dtype, "cuda")
    size = torch.empty((), dtype=dtype).element_size()
    assert 1 <= br <= n and 1 <= bc <= m
    assert (br * bc + (br + bc) * d) * size <= torch_tiled.CUDA_TILE_BYTES
    # the budget is used: a tile smaller than the problem is at least a quarter of the budget
    if (br, bc) != (n, m):
        assert (br * bc + (br + bc) * d) * size > torch_tiled.CUDA_TILE_BYTES // 4


def test_pinned_tile_wins_everywhere():
    assert torch_tiled.tile_plan(65536, 65536, 768, torch.float32, "cuda", (512, 1024)) == (512, 1024)
    assert torch_tiled.tile_plan(10, 20, 8, torch.float32, "cpu", (16, 24)) == (10, 20)


@pytest.mark.parametrize("n,m", [(63, 65), (7, 130)])
def test_tiled_loops_visit_the_planned_tiles(monkeypatch, n, m):
    """Every sweep (forward, backward) asks tile_plan for its tile and visits ceil(n/BR) ceil(m/BC)
    tiles (conftest pins 16 x 24 tiles)."""
    asked, visits = [], [0]
    plan, logits = torch_tiled.tile_plan, torch_tiled._logits

    def spy_plan(*args):
        asked.append(args[:5])
        return plan(*args)

    def spy_logits(*args):
        visits[0] += 1
        return logits(*args)

    want = torch_tiled.tiles_per_pass(n, m, 12, torch.float32, "cpu", (16, 24))
    assert want == math.ceil(n / 16) * math.ceil(m / 24)
    monkeypatch.setattr(torch_tiled, "tile_plan", spy_plan)
    monkeypatch.setattr(torch_tiled, "_logits", spy_logits)
    a = torch.randn(n, 12, requires_grad=True)
    b = torch.randn(m, 12, requires_grad=True)
    tilecl.info_nce(a, b, temperature=0.3, backend="torch").backward()
    # one forward sweep and one backward sweep at least, each over every planned tile
    assert len(asked) >= 2 and set(asked) == {(n, m, 12, torch.float32, "cpu")}
    assert visits[0] == len(asked) * want


# ---- backend="auto" on CUDA -----------------------------------------------------------------------


def test_auto_on_cuda_picks_torch_and_says_so_once(monkeypatch):
    monkeypatch.delenv("TILECL_BACKEND", raising=False)
    monkeypatch.setattr(backends, "_warned_auto_gpu", [False])
    monkeypatch.setattr(backends, "VERIFIED_ON_GPU", frozenset())
    with pytest.warns(RuntimeWarning) as rec:
        assert backends.resolve("auto", torch.device("cuda")) == "torch"
    assert len(rec) == 1
    msg = str(rec[0].message)
    assert "no kernel backend" in msg and "backend='triton'" in msg and "TILECL_BACKEND" in msg
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.resolve("auto", torch.device("cuda")) == "torch"  # once only
        assert backends.resolve("auto", torch.device("cpu")) == "torch"


def test_auto_on_cuda_takes_a_verified_kernel_backend(monkeypatch):
    monkeypatch.delenv("TILECL_BACKEND", raising=False)
    monkeypatch.setattr(backends, "_warned_auto_gpu", [False])
    monkeypatch.setattr(backends, "VERIFIED_ON_GPU", frozenset({"triton"}))
    monkeypatch.setattr(backends, "unavailable_reason", lambda name, device: None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.resolve("auto", torch.device("cuda")) == "triton"
    monkeypatch.setattr(backends, "unavailable_reason", lambda name, device: "not here")
    with pytest.warns(RuntimeWarning, match=r"verified kernel backends \['triton'\] cannot run"):
        assert backends._auto(torch.device("cuda")) == "torch"


# ---- the GPU script's cost model ----------------------------------------------------------------


def test_cost_model_at_the_targets():
    n, d, cap, mem = 65536, 768, 40.0, 120 * 2**30
    calls = first.GPU_CALLS
    # the triton paths: 8 N^2 D = 26 TFLOP per call at an assumed 100 TFLOP/s, five calls, a
    # compile allowance of 30 s and 5 s of process start
    n_run, s, _ = first.plan_point("clip", "tilecl-triton", n, d, "bf16", "cuda", cap, mem, calls)
    assert n_run == n and 35 < s < 38
    # dense: 6 bf16 N x N matrices = 48 GiB, more than a 40 GiB device has
    n_run, _, b = first.plan_point("clip", "dense", n, d, "bf16", "cuda", cap, 40 * 2**30, calls)
    assert n_run == n // 2 and b < 40 * 2**30
    # the native kernels (assumed 2 TFLOP/s): 13 s per call at the target, three calls
    n_run, s, _ = first.plan_point("clip", "tilecl-native", n, d, "bf16", "cuda", cap, mem, calls)
    assert n_run == n // 2 and s <= cap
    assert first.plan_point("clip", "tilecl-native", n, d, "bf16", "cuda", 1.0, mem, calls)[0] is None


@pytest.mark.parametrize("cap", [3.0, 40.0, 400.0])
@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_no_provider_planned_beyond_its_cap(cap, device):
    mem = 60 * 2**30
    provs = set(first.COSTS["cuda"]) | {p for _, p in first.TARGET_ORDER}
    for prov in sorted(provs):
        for loss in ("clip", "siglip"):
            n_run, s, b = first.plan_point(loss, prov, 65536, 768, "bf16", device, cap, mem,
                                           first.GPU_CALLS, n_min=1024)
            if n_run is not None:
                assert n_run <= 65536 and s <= cap and b <= mem, (prov, loss, n_run, s, b)
                assert (s, b) == first.estimate(loss, prov, n_run, 768, "bf16", device,
                                                first.GPU_CALLS)


# ---- bash bench/gpu_first.sh --dry-run ------------------------------------------------------------


def test_gpu_first_dry_run(tmp_path):
    """The whole script on the CPU: every step runs (installs and the build printed, the GPU tests
    collected), the selected points are measured, every target point has a line, at most 8 files
    come back."""
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    env.pop("TILECL_BACKEND", None)
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu_first.sh"), "--dry-run"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(["log.txt", "env.json", "points.jsonl", "tests_triton.txt",
                            "native_build.txt", "tests_native.txt", "sanitizer.txt", "results.md"])
    log = (out / "log.txt").read_text()
    for step in ("versions", "pure-Python install", "native CUDA build", "Triton GPU tests",
                 "targets", "native GPU tests", "native timing", "compute-sanitizer", "summary"):
        assert re.search(r"== \[\d+ s\] " + re.escape(step), log), step
    assert "-DCMAKE_INTERPROCEDURAL_OPTIMIZATION=OFF" in (out / "native_build.txt").read_text()
    assert "-DTILECL_CUDA_ARCHS=90" in (out / "native_build.txt").read_text()
    for name in ("tests_triton.txt", "tests_native.txt"):
        assert re.search(r"\d+/\d+ tests collected", (out / name).read_text()), name
    assert "reference ok" in (out / "sanitizer.txt").read_text()
    envj = json.loads((out / "env.json").read_text())
    for key in ("date_utc", "device", "torch", "triton", "python", "results_dir"):
        assert envj.get(key), key
    assert envj["tilecl_env"]["TILECL_TRITON_AUTOTUNE"] == "off"
    points = [json.loads(line) for line in (out / "points.jsonl").read_text().splitlines()]
    by = {}
    for p in points:
        by.setdefault((p["group"], p["loss"], p["provider"]), []).append(p)
    for loss, prov in first.TARGET_ORDER:
        assert ("target", loss, prov) in by, (loss, prov)
    for key in (("target", "clip", "tilecl-triton"), ("target", "siglip", "tilecl-triton-gemm"),
                ("target", "clip", "dense"), ("native", "clip", "tilecl-native")):
        (p,) = by[key]
        assert p["status"] == "ok" and p["time_ms"] > 0 and p["n"] in (64, 48), p
    assert by[("target", "siglip", "tilecl-triton-gemm")][0]["env"]["TILECL_TRITON_BWD"] == "gemm"
    md = (out / "results.md").read_text()
    assert "| clip | tilecl-triton | 64 |" in md and "| clip | tilecl-native | 48 |" in md
