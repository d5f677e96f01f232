"""The native backend (tilecl._C) against the torch tiled backend, for every flag combination the
losses use, on odd shapes, through ``tile_stats(..., backend="native")``: statistics, column LSE
and the gradients of q, k, alpha and bias under a random upstream gradient.

CPU: float64 to ~1e-10, float32 to a max-relative error of 1e-5, fp16/bf16 inputs (converted per
tile; same fp32 math as the torch backend); the AVX2 kernels, the portable ones
(TILECL_CPU_ISA=generic) and the element path (TILECL_CPU_SCALAR=1); the threshold flag and the
streaming top-k negatives. GPU-marked tests run the CUDA kernels when present.
"""

from __future__ import annotations

import dataclasses

import pytest
import template_cases
import torch
import torch.nn.functional as F
from template_cases import make_case

from tilecl import _backends, _ops, _torch_tiled
from tilecl._autograd import tile_stats
from tilecl._spec import SumSpec, TileAux, TileSpec

from conftest import skip_or_fail

native = pytest.importorskip("tilecl._native_backend")
if native.unavailable("cpu") is not None:
    skip_or_fail(f"native backend not built: {native.unavailable('cpu')}", module=True)

ALL, POS = SumSpec("all"), SumSpec("pos")


def run(backend, spec, q, k, alpha, bias, aux, gen_seed):
    """Forward + backward of a random linear functional of the statistics."""
    q = q.detach().clone().requires_grad_(True)
    k = k.detach().clone().requires_grad_(True)
    alpha = alpha.detach().clone().requires_grad_(True)
    bias = bias.detach().clone().requires_grad_(True) if bias is not None else None
    out = tile_stats(spec, q, k, alpha, bias, aux, backend=backend)
    stats, col = out[0], out[1]  # (a third output, s_pos, may follow)
    gen = torch.Generator().manual_seed(gen_seed)
    ws = torch.randn(stats.shape, generator=gen, dtype=torch.float64).to(stats.device, stats.dtype)
    loss = torch.where(torch.isfinite(stats), stats, torch.zeros_like(stats)).mul(ws).sum()
    if spec.col_lse:
        wc = torch.randn(col.shape, generator=gen, dtype=torch.float64).to(col.device, col.dtype)
        loss = loss + torch.where(torch.isfinite(col), col, torch.zeros_like(col)).mul(wc).sum()
    inputs = [q, k, alpha] + ([bias] if bias is not None else [])
    grads = torch.autograd.grad(loss, inputs, allow_unused=True) if loss.requires_grad else [None] * 4
    return [stats.detach(), col.detach()] + [g if g is None else g.detach() for g in grads]


NAMES = ["stats", "col", "dq", "dk", "dalpha", "dbias"]


def assert_match(got, want, rtol, where, names=NAMES):
    for name, a, b in zip(names, got, want):
        if a is None or b is None:  # not computed on one side: the other must be all zero
            other = b if a is None else a
            assert other is None or not bool(other.abs().max() > 0), f"{where} {name}: {a} vs {b}"
            continue
        assert a.shape == b.shape and a.dtype == b.dtype, (
            f"{where} {name}: {a.shape}/{a.dtype} vs {b.shape}/{b.dtype}")
        fa, fb = torch.isfinite(a), torch.isfinite(b)
        assert torch.equal(fa, fb), f"{where} {name}: non-finite entries differ"
        assert torch.equal(a[~fa], b[~fb]), f"{where} {name}: infinities differ"
        if fa.any():
            a64, b64 = a[fa].double(), b[fb].double()
            err = (a64 - b64).abs().max().item()
            scale = max(b64.abs().max().item(), 1e-30)
            assert err <= rtol * scale, (f"{where} {name}: max abs err {err:.3e} vs scale {scale:.3e} "
                                         f"(rel {err / scale:.2e} > {rtol:.0e}) at "
                                         f"{int((a64 - b64).abs().argmax())}")


CASES = template_cases.NAMES  # every template case
SHAPES = [(1, 3), (7, 3), (63, 64), (65, 100), (130, 64)]
DTYPES = {"fp64": (torch.float64, 1e-10), "fp32": (torch.float32, 1e-5)}


@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("n,d", [pytest.param(n, d, id=f"N{n}-D{d}") for n, d in SHAPES])
@pytest.mark.parametrize("case", CASES)
def test_native_cpu_matches_torch(case, n, d, dt):
    dtype, rtol = DTYPES[dt]
    seed = 1000 * n + d
    gen = torch.Generator().manual_seed(seed)
    spec, q, k, alpha, bias, aux = make_case(case, n, d, dtype, gen)
    want = run("torch", spec, q, k, alpha, bias, aux, seed)
    got = run("native", spec, q, k, alpha, bias, aux, seed)
    if dtype == torch.float64:
        assert_match(got, want, rtol, f"{case} N{n} D{d} {dt}")
        return
    # fp32: everything to 1e-5 of the torch backend, except dL/dalpha, a sum over N x M terms that
    # cancel (softmax rows): there both fp32 backends are ~1e-5 off the float64 truth, so the
    # criterion is native's error against float64 <= 2x the torch backend's own (the README's tolerance).
    i_da = NAMES.index("dalpha")
    assert_match(got[:i_da] + got[i_da + 1:], want[:i_da] + want[i_da + 1:], rtol, f"{case} N{n} D{d}",
                 NAMES[:i_da] + NAMES[i_da + 1:])
    if got[i_da] is not None:
        spec64, q64, k64, a64, b64, aux64 = make_case(case, n, d, torch.float64,
                                                      torch.Generator().manual_seed(seed))
        truth = run("torch", spec64, q64, k64, a64, b64, aux64, seed)[i_da]
        err_native = (got[i_da].double() - truth).abs().max().item()
        err_torch = (want[i_da].double() - truth).abs().max().item()
        scale = max(truth.abs().max().item(), 1e-30)
        assert err_native <= max(rtol * scale, 2 * err_torch), (
            f"{case} N{n} D{d} dalpha: native err {err_native:.2e}, torch err {err_torch:.2e}, "
            f"scale {scale:.2e}")


@pytest.mark.parametrize("n,d,dt", [pytest.param(65, 100, "fp64", id="N65-D100-fp64"),
                                    pytest.param(130, 64, "fp32", id="N130-D64-fp32")])
@pytest.mark.parametrize("case", CASES)
def test_native_cpu_element_path(monkeypatch, case, n, d, dt):
    """TILECL_CPU_SCALAR=1: the CPU runs the element functions of tile_math.h (sum_term,
    grad_coef, ...), the ones the CUDA kernels execute, instead of its array epilogue."""
    monkeypatch.setenv("TILECL_CPU_SCALAR", "1")
    dtype, rtol = DTYPES[dt]
    gen = torch.Generator().manual_seed(n + d)
    spec, q, k, alpha, bias, aux = make_case(case, n, d, dtype, gen)
    want = run("torch", spec, q, k, alpha, bias, aux, n + d)
    got = run("native", spec, q, k, alpha, bias, aux, n + d)
    i_da = NAMES.index("dalpha")  # dalpha in fp32: see test_native_cpu_matches_torch
    keep = [i for i in range(len(got)) if dtype == torch.float64 or i != i_da]
    assert_match([got[i] for i in keep], [want[i] for i in keep], rtol, f"element path {case}",
                 [NAMES[i] for i in keep])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", ["clip_symmetric", "supcon_in", "siglip", "dist_gamma2"])
def test_native_cpu_half_inputs(case, dtype):
    """16-bit inputs are converted to fp32 per tile: the same fp32 math as the torch backend.
    Compared at the backend level (fp32 outputs), before autograd rounds dq / dk to 16 bits."""
    gen = torch.Generator().manual_seed(7)
    spec, q, k, alpha, bias, aux = make_case(case, 65, 100, dtype, gen)
    ref = _backends.get("torch")
    got_s, got_c = native.forward(spec, q, k, alpha, bias, aux)
    want_s, want_c = ref.forward(spec, q, k, alpha, bias, aux)
    g = torch.randn(want_s.shape, generator=gen)
    gc = torch.randn(want_c.shape, generator=gen) if spec.col_lse else None
    needs = (True, True, True, bias is not None)
    got = native.backward(spec, q, k, alpha, bias, aux, want_s, want_c, g, gc, needs)
    want = ref.backward(spec, q, k, alpha, bias, aux, want_s, want_c, g, gc, needs)
    assert_match([got_s, got_c, got[0], got[1], None, got[3]],
                 [want_s, want_c, want[0], want[1], None, want[3]], 1e-5, f"{case} {dtype}")


def test_native_cpu_strided_and_multi_tile():
    """Non-contiguous inputs and several row/column blocks (BR 96, BC 256) in both directions."""
    gen = torch.Generator().manual_seed(3)
    spec, q, k, alpha, bias, aux = make_case("row_alpha", 200, 40, torch.float64, gen)
    q2 = torch.randn(40, 200, generator=gen, dtype=torch.float64).t()  # strides (1, 200)
    k2 = torch.randn(k.shape[0], 80, generator=gen, dtype=torch.float64)[:, ::2]  # (80, 2)
    want = run("torch", spec, q2, k2, alpha, bias, aux, 3)
    got = run("native", spec, q2, k2, alpha, bias, aux, 3)
    assert_match(got, want, 1e-10, "strided")


@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("case", ["clip_symmetric", "col_offset", "dist_gamma1", "cclk_dense"])
def test_native_cpu_many_blocks(case, dt):
    """Several row blocks (BR 96) AND column blocks (BC 256) with ragged edges on both sides."""
    dtype, rtol = DTYPES[dt]
    gen = torch.Generator().manual_seed(8)
    spec, q, k, alpha, bias, aux = make_case(case, 290, 37, dtype, gen)
    want = run("torch", spec, q, k, alpha, bias, aux, 8)
    got = run("native", spec, q, k, alpha, bias, aux, 8)
    skip = [NAMES.index("dalpha")] if dtype == torch.float32 else []  # see matches_torch
    keep = [i for i in range(len(got)) if i not in skip]
    assert_match([got[i] for i in keep], [want[i] for i in keep], rtol, f"{case} {dt}",
                 [NAMES[i] for i in keep])


@pytest.mark.parametrize("threads", [1, 3])
def test_native_cpu_threads_and_dk_sweep(monkeypatch, threads):
    """dk through per-group partials (default) and through the column sweep (no buffer). The
    problem is large enough that the kernels do use `threads` threads (small ones run on one)."""
    gen = torch.Generator().manual_seed(4)
    spec, q, k, alpha, bias, aux = make_case("col_offset", 600, 33, torch.float64, gen)
    want = run("torch", spec, q, k, alpha, bias, aux, 4)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        got = run("native", spec, q, k, alpha, bias, aux, 4)
        monkeypatch.setenv("TILECL_CPU_DK_BUFFER_MB", "0")
        got_sweep = run("native", spec, q, k, alpha, bias, aux, 4)
    finally:
        torch.set_num_threads(old)
    assert_match(got, want, 1e-10, f"threads={threads}")
    assert_match(got_sweep, want, 1e-10, f"threads={threads} column sweep")


@pytest.mark.parametrize("case", ["clip_symmetric", "supcon_in", "hcl", "cclk_dense", "siglip",
                                  "dist_gamma1", "col_offset"])
def test_native_cpu_portable_isa(monkeypatch, case):
    """TILECL_CPU_ISA=generic: the portable kernels (what a CPU without AVX2 + FMA runs)."""
    monkeypatch.setenv("TILECL_CPU_ISA", "generic")
    gen = torch.Generator().manual_seed(6)
    spec, q, k, alpha, bias, aux = make_case(case, 130, 40, torch.float32, gen)
    want = run("torch", spec, q, k, alpha, bias, aux, 6)
    got = run("native", spec, q, k, alpha, bias, aux, 6)
    i_da = NAMES.index("dalpha")  # dalpha in fp32: see test_native_cpu_matches_torch
    keep = [i for i in range(len(got)) if i != i_da]
    assert_match([got[i] for i in keep], [want[i] for i in keep], 1e-5, f"generic {case}",
                 [NAMES[i] for i in keep])


def test_native_cpu_column_lse_fallback():
    """Symmetric CLIP at logit scale 100 with near-duplicate pairs: in the diagonal tiles every
    other entry of a column is ~e^-60 below the tile's largest row max, so the column LSE taken
    from the row pass's exponentials falls under 2^-80 and is recomputed exactly per column."""
    gen = torch.Generator().manual_seed(12)
    n, d = 300, 64
    q = F.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1)
    k = F.normalize(q + 0.05 * torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1)
    spec = TileSpec(positive="index", sums=(ALL,), col_lse=True)
    aux = TileAux(pos=torch.arange(n))
    alpha = torch.tensor(100.0)
    q32, k32 = q.float(), k.float()
    x = 100.0 * q @ k.T
    truth = torch.logsumexp(x, 0)
    got = run("native", spec, q32, k32, alpha, None, aux, 12)
    want = run("torch", spec, q32, k32, alpha, None, aux, 12)
    assert_match(got, want, 1e-5, "sharp clip")
    torch.testing.assert_close(got[1].double(), truth, rtol=1e-6, atol=1e-5)


# ---- threshold flag (false negatives leave every sum and the column LSE) ----------------------

THRESH_CASES = ["infonce", "clip_symmetric", "supcon_out", "hcl", "col_offset"]


def _dense(spec, q, k, alpha, aux):
    """x [N, M] (float64), allowed and Y of the problem, densely (the tests' oracle)."""
    q64, k64 = q.double(), k.double()
    a = alpha.double()
    x = (q64 @ k64.T) * (a[:, None] if a.dim() else a)
    n, m = x.shape
    cols = torch.arange(m) + aux.col_offset
    allowed = torch.ones(n, m, dtype=torch.bool)
    if aux.excl is not None:
        allowed &= aux.excl[:, None] != cols[None, :]
    if spec.positive == "index":
        y = aux.pos[:, None] == cols[None, :]
    else:
        y = aux.labels_q[:, None] == aux.labels_k[None, :]
    return x, allowed, y & allowed


def _thresholds(spec, q, k, alpha, aux):
    """thresh [N]: per row, the midpoint of the widest gap among the middle non-positive logits,
    so that about half of the negatives are dropped and no logit lies near the threshold (the two
    backends round the logits differently). Returns (thresh, number of dropped entries, number
    of negatives)."""
    x, allowed, y = _dense(spec, q, k, alpha, aux)
    n = x.shape[0]
    thresh = torch.full((n,), float("inf"), dtype=torch.float64)
    for i in range(n):
        v = x[i][allowed[i] & ~y[i]].sort().values
        if v.numel() < 2:
            continue
        lo, hi = v.numel() // 3, max(v.numel() // 3 + 1, 2 * v.numel() // 3)
        gaps = v[lo + 1:hi + 1] - v[lo:hi]
        g = int(gaps.argmax()) + lo
        thresh[i] = (v[g] + v[g + 1]) / 2
    dropped = int(((x > thresh[:, None]) & allowed & ~y).sum())
    return thresh, dropped, int((allowed & ~y).sum())


@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("n", [1, 7, 63, 65, 130])
@pytest.mark.parametrize("case", THRESH_CASES)
def test_native_cpu_threshold(case, n, dt):
    """TileSpec.threshold on native against the torch backend (_torch_tiled._masks): statistics,
    column LSE and all gradients, with thresholds that drop about half of each row's negatives."""
    dtype, rtol = DTYPES[dt]
    d = 64 if n > 7 else 3
    gen = torch.Generator().manual_seed(50 + n)
    spec, q, k, alpha, bias, aux = make_case(case, n, d, dtype, gen)
    spec = dataclasses.replace(spec, threshold=True)
    thresh, dropped, negatives = _thresholds(spec, q, k, alpha, aux)
    if negatives < 2:
        pytest.skip(f"{case} with N={n} has no negatives to drop")
    assert dropped > 0, "the thresholds drop nothing: the test would pass vacuously"
    aux = dataclasses.replace(aux, thresh=thresh.to(alpha.dtype))
    want = run("torch", spec, q, k, alpha, bias, aux, n)
    got = run("native", spec, q, k, alpha, bias, aux, n)
    plain = run("native", dataclasses.replace(spec, threshold=False), q, k, alpha, bias,
                dataclasses.replace(aux, thresh=None), n)
    assert any(a is not None and not torch.equal(a, b) for a, b in zip(got, plain)), (
        "dropping columns changed nothing")
    skip = [NAMES.index("dalpha")] if dtype == torch.float32 else []  # see matches_torch
    keep = [i for i in range(len(got)) if i not in skip]
    assert_match([got[i] for i in keep], [want[i] for i in keep], rtol, f"threshold {case} N{n}",
                 [NAMES[i] for i in keep])


@pytest.mark.parametrize("mode", ["scalar", "generic"])
@pytest.mark.parametrize("case", ["clip_symmetric", "col_offset"])
def test_native_cpu_threshold_other_paths(monkeypatch, case, mode):
    """The threshold flag in the element path (TILECL_CPU_SCALAR=1, the CUDA kernels' functions)
    and in the portable kernels (TILECL_CPU_ISA=generic)."""
    monkeypatch.setenv("TILECL_CPU_SCALAR" if mode == "scalar" else "TILECL_CPU_ISA",
                       "1" if mode == "scalar" else "generic")
    gen = torch.Generator().manual_seed(77)
    spec, q, k, alpha, bias, aux = make_case(case, 130, 64, torch.float64, gen)
    spec = dataclasses.replace(spec, threshold=True)
    thresh, dropped, _ = _thresholds(spec, q, k, alpha, aux)
    assert dropped > 0
    aux = dataclasses.replace(aux, thresh=thresh)
    want = run("torch", spec, q, k, alpha, bias, aux, 77)
    got = run("native", spec, q, k, alpha, bias, aux, 77)
    assert_match(got, want, 1e-10, f"threshold {mode} {case}")


def test_native_threshold_needs_thresholds():
    gen = torch.Generator().manual_seed(1)
    spec, q, k, alpha, bias, aux = make_case("infonce", 7, 3, torch.float32, gen)
    with pytest.raises(ValueError, match="thresh"):
        native.forward(dataclasses.replace(spec, threshold=True), q, k, alpha, bias, aux)


# ---- streaming top-k hardest negatives (TileSpec.topk) --------------------------------------

TOPK_CASES = ["infonce", "clip_symmetric", "nt_xent_self", "supcon_out", "col_offset"]


@pytest.mark.parametrize("kk", [1, 5, 32])
@pytest.mark.parametrize("n", [1, 7, 63, 65, 130, 290])
@pytest.mark.parametrize("case", TOPK_CASES)
def test_native_cpu_topk(case, n, kk):
    """Each row's kk largest logits over allowed non-positive columns (global indices, padded
    with -inf / -1), from the native forward, against the torch backend; the named columns are
    checked against the dense logits."""
    gen = torch.Generator().manual_seed(90 + n)
    spec, q, k, alpha, bias, aux = make_case(case, n, 40, torch.float32, gen)
    spec = dataclasses.replace(spec, topk=kk)
    stats, col, (vals, idx) = native.forward(spec, q, k, alpha, bias, aux)
    want_s, want_c, (want_v, want_i) = _backends.get("torch").forward(spec, q, k, alpha, bias, aux)
    assert vals.shape == idx.shape == (n, kk) and idx.dtype == torch.int64
    assert_match([stats, col], [want_s, want_c], 1e-5, f"topk {case}", ["stats", "col"])
    assert_match([vals], [want_v], 1e-5, f"topk {case}", ["vals"])
    assert torch.equal(idx < 0, want_i < 0) and torch.equal(torch.isneginf(vals), idx < 0)
    # up to near-ties (the backends round the logits differently): the named columns are distinct
    # allowed negatives whose dense logits are the values
    x, allowed, y = _dense(spec, q, k, alpha, aux)
    xneg = x.masked_fill(~(allowed & ~y), float("-inf"))
    at = xneg.gather(1, (idx - aux.col_offset).clamp_min(0))
    torch.testing.assert_close(torch.where(idx >= 0, at, float("-inf")), vals.double(),
                               rtol=1e-5, atol=1e-5)
    for row in idx:
        row = row[row >= 0]
        assert row.unique().numel() == row.numel()
    assert (idx != want_i).sum() <= 2 * n // 50, "more index disagreements than near-ties explain"
    assert n == 1 or bool((idx >= 0).any()), "no negatives: the test would pass vacuously"


@pytest.mark.parametrize("mode", ["scalar", "generic"])
def test_native_cpu_topk_other_paths(monkeypatch, mode):
    """Top-k with the threshold flag, in the element path and in the portable kernels."""
    monkeypatch.setenv("TILECL_CPU_SCALAR" if mode == "scalar" else "TILECL_CPU_ISA",
                       "1" if mode == "scalar" else "generic")
    gen = torch.Generator().manual_seed(91)
    spec, q, k, alpha, bias, aux = make_case("col_offset", 130, 40, torch.float64, gen)
    spec = dataclasses.replace(spec, threshold=True, topk=7)
    thresh, dropped, _ = _thresholds(spec, q, k, alpha, aux)
    assert dropped > 0
    aux = dataclasses.replace(aux, thresh=thresh)
    got = native.forward(spec, q, k, alpha, bias, aux)
    want = _backends.get("torch").forward(spec, q, k, alpha, bias, aux)
    assert torch.equal(got[2][1], want[2][1])
    assert_match([got[0], got[1], got[2][0]], [want[0], want[1], want[2][0]], 1e-10,
                 f"topk {mode}", ["stats", "col", "vals"])


def test_native_cpu_deterministic():
    gen = torch.Generator().manual_seed(5)
    spec, q, k, alpha, bias, aux = make_case("hcl", 130, 64, torch.float32, gen)
    a = run("native", spec, q, k, alpha, bias, aux, 5)
    b = run("native", spec, q, k, alpha, bias, aux, 5)
    for x, y in zip(a, b):
        assert (x is None and y is None) or torch.equal(x, y)


def test_native_cpu_needs_subset():
    """Only dk requested: dq / dalpha are not computed, dk still matches."""
    gen = torch.Generator().manual_seed(9)
    spec, q, k, alpha, bias, aux = make_case("supcon_out", 63, 64, torch.float64, gen)
    stats, col = native.forward(spec, q, k, alpha, bias, aux)
    want_stats, _ = _backends.get("torch").forward(spec, q, k, alpha, bias, aux)
    torch.testing.assert_close(stats, want_stats, rtol=1e-10, atol=1e-10)
    g = torch.randn(stats.shape, generator=gen, dtype=torch.float64)
    needs = (False, True, False, False)
    dq, dk, da, db = native.backward(spec, q, k, alpha, bias, aux, stats, None, g, None, needs)
    _, dk_ref, _, _ = _backends.get("torch").backward(spec, q, k, alpha, bias, aux, stats, None, g,
                                                      None, needs)
    assert dq is None and da is None and db is None
    torch.testing.assert_close(dk, dk_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", ["clip_symmetric", "siglip", "cclk_dense", "dist_gamma1"])
def test_native_custom_ops_opcheck(case):
    """The kernel entries are torch.library custom ops with fake implementations (torch.compile)."""
    gen = torch.Generator().manual_seed(2)
    spec, q, k, alpha, bias, aux = make_case(case, 7, 3, torch.float32, gen)
    fwd_args = _ops.prefix_args(spec, q, k, alpha, bias, aux)
    torch.library.opcheck(native._fwd_op.overload, fwd_args)
    stats, col, _, _ = native._fwd_op.overload(*fwd_args)
    g = torch.randn(stats.shape, generator=gen)
    gc = torch.randn(col.shape, generator=gen) if spec.col_lse else None
    torch.library.opcheck(native._bwd_op.overload, fwd_args + (stats, col if spec.col_lse else None, g, gc,
                                                      [True, True, True, bias is not None]))


def test_native_is_selectable_on_cpu():
    assert "native" in _backends.available_backends("cpu")
    assert _backends.resolve("native", torch.device("cpu")) == "native"


# ---- CUDA launch plan and checked mode (on the CPU: the plan both CUDA launchers run) -------------

def test_cuda_launch_plan_backward_traffic():
    """CLIP-size backward, N = M = 65536, D = 768: each block keeps its [64, 256] gradient block on
    chip, so the gradient is read and written once (the former layout read and wrote its [64, D]
    fp32 slab for every column tile, 412 GB a pass), and all traffic stays within 3x of every
    block streaming the other side once per D chunk."""
    n = m = 65536
    d = 768
    for dtype, size in ((torch.bfloat16, 2), (torch.float32, 4)):
        for mode in ("bwd_dq", "bwd_dk"):
            for dist in (False, True):
                pl = native.launch_plan(mode, n, m, d, dtype, dist)
                assert pl["grid"] == (1024, 3) and pl["threads"] == 128 and pl["d_chunk"] == 256
                assert pl["tiles"] == 1024
                grad = n * d * 4
                assert pl["grad_read"] == grad and pl["grad_written"] == grad
                assert pl["private_bytes"] <= 3 * grad
                old_slab = 2 * pl["tiles"] * n * d * 4
                assert old_slab > 411e9 and pl["private_bytes"] * 500 < old_slab
                assert pl["min_bytes"] == 3 * 1024 * m * d * size + grad
                assert pl["min_bytes"] <= pl["total_bytes"] <= 3 * pl["min_bytes"]
                assert pl["logits_read"] == 3 * (1024 * n + 1024 * m) * d * size
                assert pl["operand_read"] == 1024 * m * d * size
                assert pl["flops_logits"] == 3 * 2 * n * m * d and pl["flops_h"] == 2 * n * m * d
    # the figures tile_launch.h states for bf16 / fp32
    bf, f32 = (native.launch_plan("bwd_dq", n, m, d, t, False) for t in (torch.bfloat16, torch.float32))
    assert round(bf["flops_logits"] / 1e12, 1) == 19.8 and round(bf["flops_h"] / 1e12, 1) == 6.6
    assert round(bf["logits_read"] / 1e9) == 618 and round(bf["operand_read"] / 1e9) == 103
    assert round(f32["logits_read"] / 1e9) == 1237 and round(f32["operand_read"] / 1e9) == 206
    assert round((bf["grad_read"] + bf["grad_written"]) / 1e9, 1) == 0.4


def test_cuda_launch_plan_edges():
    """Shapes that do not divide the tiles, a last D chunk that is partly empty, the forward, the
    dq pass that only feeds the row sums (no D chunks), empty problems and bad arguments."""
    pl = native.launch_plan("bwd_dq", 130, 67, 300, torch.float16, True)
    assert pl["grid"] == (3, 2) and pl["tiles"] == 2 and pl["own_read"] == 130 * 300 * 2
    assert native.launch_plan("bwd_dk", 130, 67, 600, torch.float16, True)["grid"] == (2, 3)
    assert native.launch_plan("bwd_dq", 130, 67, 300, torch.float16, False)["own_read"] == 0
    assert native.launch_plan("bwd_dq", 130, 67, 256, torch.float32, False)["grid"] == (3, 1)
    assert native.launch_plan("bwd_dq", 130, 67, 257, torch.float32, False)["grid"] == (3, 2)
    rows_only = native.launch_plan("bwd_dq", 130, 67, 300, torch.float32, False, grad_out=False)
    assert rows_only["grid"] == (3, 1) and rows_only["grad_written"] == 0
    assert rows_only["operand_read"] == 0 and rows_only["flops_h"] == 0
    for mode, blocks in (("fwd_rows", 3), ("fwd_cols", 2)):
        fwd = native.launch_plan(mode, 130, 67, 300, torch.bfloat16, False)
        assert fwd["grid"] == (blocks, 1) and fwd["d_chunk"] == 300 and fwd["grad_written"] == 0
    assert native.launch_plan("bwd_dq", 0, 67, 300, torch.float32, False)["grid"] == (0, 0)
    with pytest.raises(ValueError, match="mode"):
        native.launch_plan("bwd", 1, 1, 1, torch.float32, False)
    with pytest.raises(TypeError, match="dtype"):
        native.launch_plan("bwd_dq", 1, 1, 1, torch.float64, False)


@pytest.mark.parametrize("value,on", [(None, False), ("", False), ("0", False), ("off", False),
                                      ("false", False), ("1", True), ("true", True), ("yes", True),
                                      ("ON", True)])
def test_cuda_sync_check_flag(monkeypatch, value, on):
    if value is None:
        monkeypatch.delenv("TILECL_CUDA_SYNC_CHECK", raising=False)
    else:
        monkeypatch.setenv("TILECL_CUDA_SYNC_CHECK", value)
    assert native._C.sync_check() is on


@pytest.mark.parametrize("value", ["2", "maybe", " 1"])
def test_cuda_sync_check_flag_malformed(monkeypatch, value):
    monkeypatch.setenv("TILECL_CUDA_SYNC_CHECK", value)
    with pytest.raises(ValueError, match="TILECL_CUDA_SYNC_CHECK must be 1/true/yes/on"):
        native._C.sync_check()


def test_rtc_source_holds_the_launch_header():
    """NVRTC compiles one string: the tile sizes (cuda/tile_launch.h) come after tile_math.h and
    before the kernels that use them."""
    src = native._C.rtc_source()
    assert src.index("struct Spec {") < src.index("constexpr int kDC") < src.index("void tile_body(")


class _FakeRtc:
    """CuPy's RawModule stand-in: records each launch (kernel, grid, block) instead of running it."""

    def __init__(self):
        self.calls = []

    def get_function(self, name):
        return lambda grid, block, args: self.calls.append((name, tuple(grid), tuple(block)))


@pytest.fixture
def fake_rtc(monkeypatch):
    import contextlib
    import sys
    import types

    cuda = types.SimpleNamespace(Device=lambda index: contextlib.nullcontext(),
                                 ExternalStream=lambda stream: contextlib.nullcontext())
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(cuda=cuda))
    fake = _FakeRtc()
    monkeypatch.setitem(native._rtc_cache, "module", fake)
    return fake


def _rtc_problem(case, dtype):
    gen = torch.Generator().manual_seed(3)
    spec, q, k, alpha, bias, aux = make_case(case, 130, 300, dtype, gen)
    return native._Prepared(spec, q, k, alpha, bias, aux)


_RTC_IO = {"stats_in": 16, "col_in": 0, "g_stats": 32, "g_col": 0, "dq": 64, "dk": 128, "gx": 0,
           "gsum": 0}


@pytest.mark.parametrize("case,dtype,tname", [("siglip", torch.bfloat16, "__nv_bfloat16"),
                                              ("dist_gamma1", torch.float32, "float")])
def test_rtc_launcher_runs_the_plan(monkeypatch, fake_rtc, case, dtype, tname):
    """The NVRTC launcher launches each kernel with the plan's grid (no GPU: launches recorded)."""
    monkeypatch.delenv("TILECL_CUDA_SYNC_CHECK", raising=False)
    p = _rtc_problem(case, dtype)
    dist = "true" if case.startswith("dist") else "false"
    native._rtc_launch(p, ("fwd_rows", "bwd_dq", "bwd_dk"), dict(_RTC_IO), torch.device("cpu"), 0)
    want = []
    for mode, code in (("fwd_rows", 0), ("bwd_dq", 2), ("bwd_dk", 3)):
        pl = native.launch_plan(mode, p.n, p.m, p.d, dtype, dist == "true")
        want.append((f"tilecl::tile_kernel_rtc<{tname},{code},{dist}>", pl["grid"], (pl["threads"],)))
    assert fake_rtc.calls == want
    assert [c[1] for c in fake_rtc.calls] == [(3, 1), (3, 2), (3, 2)]
    fake_rtc.calls.clear()  # dq only feeding the row sums: one chunk
    native._rtc_launch(p, ("bwd_dq",), dict(_RTC_IO, dq=0, gx=8), torch.device("cpu"), 0)
    assert [c[1] for c in fake_rtc.calls] == [(3, 1)]


def test_rtc_launcher_sync_check_names_the_kernel(monkeypatch, fake_rtc):
    """TILECL_CUDA_SYNC_CHECK=1: a sync after each launch; a fault raises naming the kernel."""
    p = _rtc_problem("clip_symmetric", torch.bfloat16)
    synced = []

    def sync_ok(device):
        synced.append(len(fake_rtc.calls))

    monkeypatch.setattr(torch.cuda, "synchronize", sync_ok)
    monkeypatch.setenv("TILECL_CUDA_SYNC_CHECK", "0")
    native._rtc_launch(p, ("bwd_dq", "bwd_dk"), dict(_RTC_IO), torch.device("cpu"), 0)
    assert synced == [] and len(fake_rtc.calls) == 2
    fake_rtc.calls.clear()
    monkeypatch.setenv("TILECL_CUDA_SYNC_CHECK", "1")
    native._rtc_launch(p, ("bwd_dq", "bwd_dk"), dict(_RTC_IO), torch.device("cpu"), 0)
    assert synced == [1, 2]  # after each launch

    def sync_fault(device):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torch.cuda, "synchronize", sync_fault)
    fake_rtc.calls.clear()
    with pytest.raises(RuntimeError, match=r"tile_kernel_rtc<__nv_bfloat16,2,false> \(grid 3 x 2\) "
                                           r"failed \(TILECL_CUDA_SYNC_CHECK\): CUDA error: an illegal"):
        native._rtc_launch(p, ("bwd_dq", "bwd_dk"), dict(_RTC_IO), torch.device("cpu"), 0)
    assert len(fake_rtc.calls) == 1  # stopped at the faulting kernel
    monkeypatch.setenv("TILECL_CUDA_SYNC_CHECK", "maybe")
    fake_rtc.calls.clear()
    with pytest.raises(ValueError, match="TILECL_CUDA_SYNC_CHECK"):
        native._rtc_launch(p, ("bwd_dq",), dict(_RTC_IO), torch.device("cpu"), 0)
    assert fake_rtc.calls == []


# ---- GPU (CUDA kernels, or the NVRTC fallback); skipped without CUDA ------------------------------

def _gpu_reason():
    if not torch.cuda.is_available():
        return "no CUDA device"
    return native.unavailable("cuda")


@pytest.fixture(autouse=True)
def _cuda_sync_check(request, monkeypatch):
    """GPU tests run the CUDA kernels in the checked synchronizing mode (TILECL_CUDA_SYNC_CHECK):
    an execution fault fails the test that caused it, naming the kernel."""
    if request.node.get_closest_marker("gpu") is not None:
        monkeypatch.setenv("TILECL_CUDA_SYNC_CHECK", "1")


def _on(dev, spec_case):
    """The (q, k, alpha, bias, aux) of a case on ``dev``."""
    _, q, k, alpha, bias, aux = spec_case
    aux_d = TileAux(**{f: (v.to(dev) if torch.is_tensor(v) else v) for f, v in vars(aux).items()})
    return (q.to(dev), k.to(dev), alpha.to(dev), bias.to(dev) if bias is not None else None, aux_d)


def _max_rel(a, b):
    """max |a - b| / max |b| over the finite entries (inf must coincide)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    fin = torch.isfinite(b)
    assert torch.equal(fin, torch.isfinite(a)) and torch.equal(a[~fin], b[~fin])
    if not fin.any():
        return 0.0
    return (a[fin] - b[fin]).abs().max().item() / max(b[fin].abs().max().item(), 1e-30)


@pytest.fixture
def no_tf32():
    """fp32 matmuls in full fp32 on CUDA (TF32 off), restored afterwards."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _cuda_check(case, dtype, n, d):
    """The native backend on CUDA tensors (its CUDA kernels) against the float64 truth on the
    same rounded inputs, at the README's tolerances: fp32 to 1e-5 relative (TF32 off), except
    where the torch backend itself is further off in fp32 (dL/dalpha sums N x M cancelling
    terms): there 2x its error; fp16 / bf16 to 2x PyTorch's own error in that dtype (the larger
    of the torch backend's error and the rounding of the truth to that dtype)."""
    why = _gpu_reason()
    if why is not None:
        pytest.skip(why)
    assert native._C.sync_check(), "GPU tests run with TILECL_CUDA_SYNC_CHECK=1"
    cuda = torch.device("cuda")
    made = make_case(case, n, d, dtype, torch.Generator().manual_seed(11))
    spec = made[0]
    got = run("native", spec, *_on(cuda, made), 11)
    assert all(t is None or t.device.type == "cuda" for t in got), "native did not run on CUDA"
    want = run("torch", spec, *_on(cuda, made), 11)
    # the truth: float64 on the same (dtype-rounded) inputs, aux in float64 where it is float
    q, k, alpha, bias, aux = _on(cuda, made)
    aux64 = TileAux(**{f: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v)
                       for f, v in vars(aux).items()})
    truth = run("torch", spec, q.double(), k.double(), alpha.double(),
                bias.double() if bias is not None else None, aux64, 11)
    for name, g, w, t in zip(NAMES, got, want, truth):
        assert (g is None) == (t is None), f"{case} {dtype} {name}: computed on one side only"
        if t is None:
            continue
        assert g.dtype == w.dtype, f"{case} {dtype} {name}: {g.dtype} vs torch's {w.dtype}"
        own = _max_rel(w, t)
        if dtype == torch.float32:
            bound = max(1e-5, 2 * own)
        else:
            bound = max(1e-5, 2 * own, 2 * _max_rel(t.to(dtype), t))
        err = _max_rel(g, t)
        assert err <= bound, (f"cuda {case} {dtype} D{d} {name}: rel. error {err:.2e} > "
                              f"{bound:.1e} (torch backend's own: {own:.2e})")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("case", CASES)
def test_native_cuda_matches_torch(case, dtype, no_tf32):
    _cuda_check(case, dtype, 130, 100)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", ["clip_symmetric", "dist_gamma1", "siglip", "col_offset"])
def test_native_cuda_d_chunks(case, dtype, no_tf32):
    """D = 600: three D chunks per gradient block, the last one partly empty."""
    _cuda_check(case, dtype, 130, 600)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["clip_symmetric", "siglip", "cclk_dense", "dist_gamma1"])
def test_native_cuda_custom_ops_opcheck(case):
    """opcheck of the native custom ops on CUDA tensors (the CUDA kernels' entry points)."""
    why = _gpu_reason()
    if why is not None:
        pytest.skip(why)
    if not hasattr(torch.library, "opcheck"):
        pytest.skip("torch < 2.4")
    gen = torch.Generator().manual_seed(2)
    made = make_case(case, 7, 3, torch.float32, gen)
    spec = made[0]
    q, k, alpha, bias, aux = _on(torch.device("cuda"), made)
    fwd_args = _ops.prefix_args(spec, q, k, alpha, bias, aux)
    torch.library.opcheck(native._fwd_op.overload, fwd_args)
    stats, col, _, _ = native._fwd_op.overload(*fwd_args)
    assert stats.device.type == "cuda"
    g = torch.randn(stats.shape, generator=gen).cuda()
    gc = torch.randn(col.shape, generator=gen).cuda() if spec.col_lse else None
    torch.library.opcheck(native._bwd_op.overload, fwd_args + (stats, col if spec.col_lse else None, g, gc,
                                                      [True, True, True, bias is not None]))


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("case", ["infonce", "row_alpha", "col_offset", "siglip", "dist_gamma15"])
def test_native_cpu_row_block_groups(case, dt, threads):
    """N = 777 rows (9 row blocks of 96): 4 row-block groups on one thread, 9 on three, whose
    column-side partials (column LSE, dk) merge in group order; odd M (782 to 1557) and D."""
    dtype, rtol = DTYPES[dt]
    gen = torch.Generator().manual_seed(13)
    spec, q, k, alpha, bias, aux = make_case(case, 777, 19, dtype, gen)
    old_tile = _torch_tiled.set_tile_size(256, 512)  # the reference's tiles: any size, fewer calls
    try:
        want = run("torch", spec, q, k, alpha, bias, aux, 13)
    finally:
        _torch_tiled.set_tile_size(*old_tile)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        got = run("native", spec, q, k, alpha, bias, aux, 13)
    finally:
        torch.set_num_threads(old)
    skip = [NAMES.index("dalpha")] if dtype == torch.float32 else []  # see matches_torch
    keep = [i for i in range(len(got)) if i not in skip]
    assert_match([got[i] for i in keep], [want[i] for i in keep], rtol,
                 f"{case} {dt} threads={threads}", [NAMES[i] for i in keep])


def test_spec_key_parsed_by_the_module():
    """The native dispatch takes TileSpec.key() (the one encoding): every case's key round-trips
    through _C (the loss matches the torch backend in the parity tests); a malformed key is a
    ValueError naming what is wrong, never a default."""
    gen = torch.Generator().manual_seed(5)
    spec, q, k, alpha, bias, aux = make_case("clip_symmetric", 7, 3, torch.float32, gen)
    p = native._Prepared(spec, q, k, alpha, bias, aux)
    assert p.spec == spec.key()
    raw = native._C.kparams(p.spec, p.prob, {"stats": 16, "dq": 32})
    assert isinstance(raw, bytes) and len(raw) > 100
    for bad, what in ((spec.key().replace("logit=dot", "logit=cos"), "logit=cos"),
                      (spec.key().replace(";topk=0", ""), "11 fields"),
                      (spec.key().replace("gamma=2.0", "gamma=2x"), "gamma=2x"),
                      (spec.key() + ";extra=1", "extra")):
        with pytest.raises(ValueError, match=what):
            native._C.kparams(bad, p.prob, {})
    with pytest.raises(ValueError, match="unknown buffer"):
        native._C.kparams(p.spec, p.prob, {"nope": 1})
