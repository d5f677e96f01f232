"""The autotune candidates of the Triton kernels (tritonops/configs.py), checked on the CPU: the
prune leaves a non-empty set for every D and flag combination, and what it keeps fits the shared
memory of sm_80 / sm_90 and the register budgets read off ptxas (no spills at D = 768)."""

import pytest

triton = pytest.importorskip("triton")

from tilecl.tritonops import configs as C  # noqa: E402


class _Q:  # the prune reads the element size of q
    def __init__(self, size):
        self.size = size

    def element_size(self):
        return self.size


@pytest.fixture(autouse=True)
def compiled(monkeypatch):
    monkeypatch.setattr(C, "interpreting", lambda: False)  # the GPU candidate lists


def _kept(backward, d, cc, elt=2, **flags):
    cands = C.bwd_configs() if backward else C.fwd_configs()
    C_smem = C._SMEM[cc]
    old = C._smem_limit
    C._smem_limit = lambda *a: C_smem
    try:
        return cands, C._prune(backward)(cands, {"D": d, "q_ptr": _Q(elt)}, **flags)
    finally:
        C._smem_limit = old


def _regs(cfg, backward, trans):
    threads = 32 * cfg.num_warps
    tile = cfg.kwargs["BM"] * cfg.kwargs["BN"] / threads
    if not backward:
        return tile
    rows = cfg.kwargs["BN"] if trans else cfg.kwargs["BM"]
    return rows * cfg.kwargs["BD"] / threads + 2 * tile


@pytest.mark.parametrize("cc", [80, 90])
@pytest.mark.parametrize("d", [3, 64, 100, 768, 1024, 2048])
@pytest.mark.parametrize("backward,flags", [
    (False, dict(TRANS=False)), (False, dict(TRANS=True)), (False, dict(TRANS=False, TOPK=32)),
    (True, dict(TRANS=False)), (True, dict(TRANS=True)), (True, dict(TRANS=False, FWD_STATS=True)),
])
def test_prune_keeps_candidates_that_fit(cc, d, backward, flags):
    for elt in (2, 4):
        cands, kept = _kept(backward, d, cc, elt, **flags)
        assert kept, "the prune must leave a candidate"
        if kept == cands[:1] and len(cands) > 1:
            pytest.fail(f"nothing fits at D={d}, sm_{cc}, {flags}: the fallback was used")
        budget = C.REG_BUDGET_FUSED if flags.get("FWD_STATS") else C.REG_BUDGET
        for c in kept:
            kw = dict(c.kwargs, num_stages=c.num_stages)
            assert C.smem_bytes(kw, elt, backward, flags["TRANS"]) <= C._SMEM[cc]
            assert kw["BK"] <= max(triton.next_power_of_2(max(d, 16)), 64 if backward else 32)
            regs = _regs(c, backward, flags["TRANS"])
            assert regs <= (budget if backward else 64), (kw, c.num_warps, regs)


def test_budgets_drop_the_configs_that_spilled():
    """Two that ptxas showed spilling at D = 768 (sm_90, bf16) are gone, two clean ones stay."""
    _, fwd = _kept(False, 768, 90, TRANS=False)
    _, bwd = _kept(True, 768, 90, TRANS=False)
    shapes = {(c.kwargs["BM"], c.kwargs["BN"], c.kwargs.get("BD"), c.num_warps) for c in fwd + bwd}
    assert (128, 128, None, 4) not in shapes  # forward, 112-144 bytes of spills
    assert (64, 128, 256, 4) not in shapes  # dq pass, 1068 bytes
    assert (128, 64, None, 8) in shapes and (64, 64, 128, 8) in shapes


def test_default_configs_within_budget():
    fwd = C.triton.Config({k: v for k, v in C.DEFAULT_FWD.items() if k.isupper()},
                          num_warps=C.DEFAULT_FWD["num_warps"])
    bwd = C.triton.Config({k: v for k, v in C.DEFAULT_BWD.items() if k.isupper()},
                          num_warps=C.DEFAULT_BWD["num_warps"])
    assert _regs(fwd, False, False) <= 64
    for trans in (False, True):
        assert _regs(bwd, True, trans) <= C.REG_BUDGET_FUSED


@pytest.mark.parametrize("mode,count", [("small", 5), ("off", 1)])
def test_time_boxed_tuning(monkeypatch, mode, count):
    """TILECL_TRITON_AUTOTUNE=small / off: the default config first, every one kept by the prune
    at D = 768 on sm_90 (no candidate wasted), no spills by the budgets."""
    monkeypatch.setenv("TILECL_TRITON_AUTOTUNE", mode)
    for backward in (False, True):
        cands, kept = _kept(backward, 768, 90, TRANS=False)
        assert len(cands) == count and len(kept) == count
        default = C.DEFAULT_BWD if backward else C.DEFAULT_FWD
        assert dict(cands[0].kwargs, num_warps=cands[0].num_warps,
                    num_stages=cands[0].num_stages) == default
    monkeypatch.setenv("TILECL_TRITON_AUTOTUNE", "most")
    with pytest.raises(ValueError, match="TILECL_TRITON_AUTOTUNE"):
        C.fwd_configs()
