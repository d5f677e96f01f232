"""pytest-benchmark entries (small sizes): ``pytest bench/ --benchmark-only``.

Not part of ``pytest tests`` (testpaths = tests). The same setup factory as ``python -m bench``
(``harness.Setup``); each benchmark records in ``extra_info`` the extra peak memory, the nominal
flops (``providers.flops``), the device and the versions. Add ``--benchmark-json=out.json`` to keep
the numbers.
"""

from __future__ import annotations

import pytest
import torch

from . import harness as H
from . import providers as P

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
N, D = (4096, 512) if DEVICE == "cuda" else (256, 64)


def _cases():
    out = []
    for loss in P.LOSSES:
        for prov in P.providers(loss, DEVICE, D):
            out.append(pytest.param(loss, prov, "fwd_bwd", id=f"{loss}-{prov}-fwd_bwd"))
    for prov in ("tilecl-torch", "dense"):
        for mode in ("fwd", "bwd"):
            out.append(pytest.param("clip", prov, mode, id=f"clip-{prov}-{mode}"))
    return out


@pytest.mark.parametrize("loss,provider,mode", _cases())
def test_loss(benchmark, loss, provider, mode):
    case = H.Case(loss, provider, N, D, "fp32", mode, DEVICE)
    s = H.Setup(case)
    benchmark.group = f"{loss}-{mode}-N{N}-D{D}"
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)

    def setup():
        return (s.prepare(0),), {}

    def target(pre):
        out = s.step(0, pre)
        sync()
        return out

    benchmark.pedantic(target, setup=setup, rounds=5, warmup_rounds=1)
    peak = (H._peak_cuda if DEVICE == "cuda" else H._peak_cpu)(s)
    flops = P.flops(loss, mode, N, d=D)
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu",
        torch=torch.__version__, n=N, d=D, dtype="fp32", mode=mode, flops=flops,
        extra_peak_mib=round(peak / H.MiB, 3),
        tflops_at_median=flops / benchmark.stats.stats.median / 1e12)
