"""`python -m bench --suite smoke` writes to a fresh temporary folder (never next to the real
results in bench/results/) and says when the machine was loaded."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import __main__ as bench_main  # noqa: E402
from bench import report, suites  # noqa: E402


def test_load_warning():
    env = {"cpu_count": 2, "torch_threads": 2, "loadavg_before": 0.3, "loadavg_after": 2.4}
    assert report.load_warning(env) == ""  # the benchmark's own two threads
    assert "loaded" in report.load_warning(dict(env, loadavg_before=1.5))
    assert "loaded" in report.load_warning(dict(env, loadavg_after=3.5))
    assert report.load_warning({"cpu_count": 2}) == ""  # no load average on this system


@pytest.mark.parametrize("load", [0.0, 9.0])
def test_smoke_writes_to_scratch(monkeypatch, capsys, load):
    results = os.path.join(os.path.dirname(os.path.abspath(suites.__file__)), "results")
    before = sorted(os.listdir(results)) if os.path.isdir(results) else []
    record = {"loss": "clip", "provider": "dense", "n": 64, "d": 32, "dtype": "fp32",
              "mode": "fwd_bwd", "device": "cpu", "status": "ok", "flops": 1e6, "input_mib": 0.1,
              "time_ms": 1.0, "reps": 2, "time_ms_min": 1.0, "time_ms_max": 1.0, "tflops": 1e-3,
              "mem_mib": 0.5}
    monkeypatch.setattr(suites, "run", lambda suite, log, only_losses: [record])
    monkeypatch.setattr(report, "loadavg", lambda: load)
    assert bench_main.main(["--suite", "smoke", "--no-first-call"]) == 0
    out = capsys.readouterr().out
    (wrote,) = [line for line in out.splitlines() if line.startswith("wrote ")]
    path = wrote.split()[1].rstrip(",")
    assert os.path.basename(os.path.dirname(path)).startswith("tilecl-bench-smoke-")
    assert not os.path.abspath(path).startswith(results + os.sep)
    assert (sorted(os.listdir(results)) if os.path.isdir(results) else []) == before
    assert ("WARNING: the machine was loaded" in out) == (load > 1)
    md = Path(path).with_name("results.md").read_text()
    assert ("WARNING: the machine was loaded" in md) == (load > 1)
