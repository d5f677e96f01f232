"""The autotuner path of the Triton kernels, on the CPU under the interpreter.

On a GPU ``triton.autotune`` benchmarks every candidate by running the kernel several times into
the same buffers, then launches the winner; under the interpreter (one config) it skips all
that. Here each kernel gets two candidates and a benchmark that runs the kernel RUNS times, as
``triton.testing.do_bench`` does: the results must equal a single launch's (a kernel that
accumulates with atomics must have its buffers reset). And the tuning keys: every constexpr
flag of each kernel, so that two flag sets never share a tuning.
"""

import inspect
import math
import re

import pytest
import torch

triton = pytest.importorskip("triton")

from tilecl._spec import SumSpec, TileAux, TileSpec  # noqa: E402
from tilecl._triton import common as tc  # noqa: E402
from tilecl._triton import launch as tb  # noqa: E402

from conftest import assert_rel  # noqa: E402

pytestmark = pytest.mark.skipif(tc.unavailable("cpu") is not None,
                                reason="the triton backend cannot run on the CPU here")

lse, C, Spec = tc._lse, tc._configs, tc.Spec
KERNELS = {"fwd": "_lse_fwd_kernel", "bwd": "_lse_bwd_kernel", "h": "_lse_h_kernel"}
RUNS = 3  # benchmark runs per candidate
TUNED = {"BM", "BN", "BK", "BD"}


@pytest.fixture
def tuning(monkeypatch):
    """Two candidates per kernel (the interpreter's config and one with BM = 16, both kept by
    the prune at D >= 33), an empty tuning cache, and a benchmark that runs the kernel RUNS
    times; returns the names of the kernels benchmarked, one entry per candidate."""
    benched = []
    for name, attr in KERNELS.items():
        ker = getattr(lse, attr)
        base = dict(C.INTERPRET_BWD if name == "bwd" else C.INTERPRET_FWD)
        cands = [triton.Config(c, num_warps=4, num_stages=1) for c in (base, dict(base, BM=16))]
        monkeypatch.setattr(ker, "configs", cands)
        monkeypatch.setattr(ker, "cache", {})

        def bench(call, quantiles, name=name):
            for _ in range(RUNS):
                call()
            benched.append(name)
            return [float(len(benched))] * len(quantiles)  # the first candidate wins

        monkeypatch.setitem(ker.__dict__, "do_bench", bench)
    return benched


def _unit(n, d, gen):
    return torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1)


def test_column_lse_survives_the_benchmark_runs(tuning, monkeypatch):
    """Symmetric CLIP's column LSE from the atomic sums of the row pass, through the tuner:
    without a reset each benchmark run adds its sums again (an error of ln(1 + 2 RUNS))."""
    monkeypatch.setenv("TILECL_TRITON_COL_PASS", "atomic")
    gen = torch.Generator().manual_seed(3)
    n, m, d = 37, 45, 40
    q, k = _unit(n, d, gen), _unit(m, d, gen)
    spec = TileSpec(positive="index", sums=(SumSpec(),), col_lse=True)
    aux = TileAux(pos=torch.arange(n) % m)
    stats, col = tb._forward_impl(spec, q, k, torch.tensor(9.0), None, aux)
    assert tuning == ["fwd", "fwd"], tuning  # both candidates were benchmarked
    x = 9.0 * q.double() @ k.double().T
    assert_rel(col, torch.logsumexp(x, 0), 1e-5, "column LSE")
    assert_rel(stats[0], torch.logsumexp(x, 1), 1e-5, "row LSE")


@pytest.mark.parametrize("bwd", ["fused", "gemm"])
def test_clip_through_the_tuner_matches_reference(tuning, monkeypatch, bwd):
    """The loss and every gradient of symmetric CLIP with every launch tuned (forward, both
    backward passes or both H passes), against float64."""
    import tilecl

    monkeypatch.setenv("TILECL_TRITON_BWD", bwd)
    gen = torch.Generator().manual_seed(4)
    n, d = 35, 40

    def run(backend, dtype):
        a, b = (_unit(n, d, gen).to(dtype).requires_grad_() for _ in range(2))
        t = torch.tensor(0.1, dtype=dtype, requires_grad=True)
        loss = tilecl.clip_loss(a, b, t, backend=backend)
        loss.backward()
        return [loss, a.grad, b.grad, t.grad]

    state = gen.get_state()
    ref = run("reference", torch.float64)
    gen.set_state(state)
    got = run("triton", torch.float32)
    assert set(tuning) == ({"fwd", "bwd"} if bwd == "fused" else {"fwd", "h"}), tuning
    for i, (g, r) in enumerate(zip(got, ref)):
        assert_rel(g, r, 1e-5, f"output {i}")


def _constexprs(kernel):
    """The constexpr parameters of a kernel, read off its source."""
    src = inspect.getsource(kernel.base_fn)
    head = src[src.index("(") + 1:src.index("):")]
    return re.findall(r"(\w+)\s*:\s*tl\.constexpr", head)


@pytest.mark.parametrize("name", list(KERNELS))
def test_tuning_key_holds_every_flag(name):
    ker = getattr(lse, KERNELS[name])
    derived = set(ker.fn.values)  # heuristics: functions of the dtypes, which Triton keys on
    want = ["D"] + [p for p in _constexprs(ker) if p not in TUNED and p not in derived]
    assert ker.keys == want
    assert set(ker.keys) <= set(ker.arg_names)  # (a name the kernel lacks would be dropped)
    assert derived <= {"UPCAST", "H16", "HSCALE"}
    # the template's flags travel as one constexpr, SPEC (tritonops/tile.py Spec), keyed whole
    assert {"LIN", "POSITIVE", "HAS_EXCL", "HAS_BIAS", "DIST", "SIG"} <= set(Spec._fields)
    for flag in ("SPEC", "PRECISION", "TRANS"):
        assert flag in ker.keys
    if name == "fwd":
        assert {"COL_ATOMIC", "COL_GATHER", "TOPK"} <= set(ker.keys)


def test_two_flag_sets_tune_apart(tuning):
    """Two forwards that differ only in the positive flag: two tunings, four benchmarks."""
    gen = torch.Generator().manual_seed(6)
    q, k = _unit(20, 40, gen), _unit(20, 40, gen)
    for positive, aux in (("index", TileAux(pos=torch.arange(20))), ("none", TileAux())):
        spec = TileSpec(positive=positive, sums=(SumSpec(),))
        tb._forward_impl(spec, q, k, torch.tensor(5.0), None, aux)
    assert len(lse._lse_fwd_kernel.cache) == 2 and tuning == ["fwd"] * 4, tuning


def test_every_atomic_target_is_reset():
    """Each buffer a kernel accumulates into with atomics is in its reset_to_zero, and no atomic
    hides in a helper (all of the package's atomics are in the kernels' bodies)."""
    import importlib
    import pathlib

    pkg = pathlib.Path(importlib.import_module("tilecl.tritonops").__file__).parent
    everywhere = "".join(p.read_text() for p in sorted(pkg.glob("*.py")))
    seen = 0
    for attr in KERNELS.values():
        ker = getattr(lse, attr)
        targets = re.findall(r"tl\.atomic_\w+\(\s*(\w+)", inspect.getsource(ker.base_fn))
        seen += len(targets)
        assert set(targets) <= set(ker.reset_to_zero), (attr, targets, ker.reset_to_zero)
    assert seen == len(re.findall(r"tl\.atomic_\w+\(", everywhere)) > 0
    assert lse._lse_fwd_kernel.reset_to_zero == ["cacc_ptr"]


def test_benchmark_runs_would_corrupt_without_reset(tuning, monkeypatch):
    """The test above can tell: with the reset removed, the column LSE is off by ln(1 + 2 RUNS)."""
    monkeypatch.setenv("TILECL_TRITON_COL_PASS", "atomic")
    ker = lse._lse_fwd_kernel
    monkeypatch.setattr(ker, "reset_to_zero", [])
    monkeypatch.setattr(ker, "pre_hook", lambda kwargs, reset_only=False: 0)
    gen = torch.Generator().manual_seed(3)
    q, k = _unit(20, 40, gen), _unit(20, 40, gen)
    spec = TileSpec(positive="index", sums=(SumSpec(),), col_lse=True)
    _, col = tb._forward_impl(spec, q, k, torch.tensor(9.0), None, TileAux(pos=torch.arange(20)))
    want = torch.logsumexp(9.0 * q.double() @ k.double().T, 0)
    assert torch.allclose(col.double() - want, torch.full_like(want, math.log(1 + 2 * RUNS)),
                          atol=1e-5)
