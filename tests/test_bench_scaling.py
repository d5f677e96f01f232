"""The scaling benchmark's planning: a dense point over the memory budget is recorded as OOM
without being attempted, a point over the time cap is skipped, and the report renders."""

import argparse
import json

import pytest

pytest.importorskip("matplotlib")

from bench import scaling  # noqa: E402


def test_scaling_plans_oom_and_time_cap_without_running(tmp_path, monkeypatch):
    monkeypatch.setattr(scaling, "available_bytes", lambda: 64 * 64 * 16 * 2)  # 2 dense N = 64
    args = argparse.Namespace(d=8, min_n=64, max_n=256, time_cap_s=1e-9, mem_fraction=1.0)
    saved = []
    recs = scaling.run(args, log=lambda s: None, save=lambda r: saved.append(len(r)))
    by = {(r["provider"], r["n"]): r for r in recs}
    for prov in ("tilecl-torch", "dense"):
        assert by[(prov, 64)]["status"] == "ok" and by[(prov, 64)]["mem_mib"] > 0
    assert by[("tilecl-torch", 128)]["status"] == "skipped" and by[("tilecl-torch", 128)]["planned_s"] > 0
    # dense: the measured bytes per N^2 at N = 64 exceed the budget at N = 128 -> OOM, not run
    assert by[("dense", 128)]["status"] == "oom" and by[("dense", 128)]["planned"]
    assert by[("dense", 128)]["planned_mib"] > 0 and "time_ms" not in by[("dense", 128)]
    assert saved and saved[-1] <= len(recs)
    data = {"d": 8, "time_cap_s": 1e-9, "mem_fraction": 1.0, "total_gib": 24.0,
            "available_gib_start": 20.0, "command": "python -m bench.scaling", "records": recs,
            "environment": {"device": "CPU", "torch_threads": 1, "cpu_count": 2,
                            "date_utc": "2026-12-03 09:00 UTC", "torch": "x", "tilecl": "x",
                            "loadavg_before": 0.1, "loadavg_after": 0.2}}
    paths = scaling.write(data, str(tmp_path))
    md = (tmp_path / "scaling.md").read_text()
    assert "OOM (needs" in md and "skipped" in md and "load average before/after: 0.1/0.2" in md
    assert json.loads((tmp_path / "scaling.json").read_text())["records"] == recs
    assert (tmp_path / "scaling.png").stat().st_size > 1000 and len(paths) == 3
