"""Parity of the ``triton`` tile backend with ``_torch_tiled`` for every flag set the losses use.

How to run (CPU, no GPU needed; about 2-3 minutes on 2 cores):

    TRITON_INTERPRET=1 .venv/bin/python -m pytest tests/test_triton_backend.py -q

Without CUDA the module sets ``TRITON_INTERPRET=1`` itself before triton is imported, so a plain
``pytest tests/test_triton_backend.py`` works too, unless something imported triton earlier in the
same process without the variable (then the module skips and says so; export TRITON_INTERPRET=1,
which is also what CI should do for the whole test suite on CPU). With CUDA and no
TRITON_INTERPRET the same cases run on the GPU, plus the ``gpu``-marked tests (bf16, large
shapes, tf32 tolerance).

Each case compares, in float32 (normwise relative error <= 1e-5) and float16 (<= 2e-3), the
forward statistics (row stats and column LSE) and every gradient (dq, dk, dalpha, dbias) for a
random upstream gradient of the statistics, against ``tilecl._torch_tiled`` on the same inputs.
The false-negative threshold cases (``test_threshold_*``) place each row's threshold in a gap
between its logits (so fp32 rounding cannot flip a column) and assert that columns are dropped;
the top-k cases (``test_topk_*``) check values, padding, order and that every index is an allowed
non-positive column carrying its value (indices equal to the reference wherever untied).
"""

import dataclasses
import os
import sys

import pytest
import torch
import torch.nn.functional as F

_CUDA = torch.cuda.is_available()
if not _CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

triton = pytest.importorskip("triton")

import template_cases  # noqa: E402

from tilecl import _ops, _torch_tiled  # noqa: E402
from tilecl._autograd import tile_stats  # noqa: E402
from tilecl._spec import SumSpec, TileAux, TileSpec, spec_from_key  # noqa: E402

from conftest import kernel_args  # noqa: E402

tb = pytest.importorskip("tilecl._triton.launch")
tc = pytest.importorskip("tilecl._triton.common")


def _interpreted(kernel) -> bool:
    f = kernel
    while hasattr(f, "fn"):
        if "Interpret" in type(f).__name__:
            return True
        f = f.fn
    return False


if INTERPRET and not _interpreted(sys.modules["tilecl.tritonops.lse"]._lse_fwd_kernel):
    # triton itself must be imported after TRITON_INTERPRET=1 (its own @jit helpers, tl.sigmoid
    # and friends, are fixed at import): nothing to rebuild in-process
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set; run this module with "
                "TRITON_INTERPRET=1 exported", allow_module_level=True)
if not INTERPRET and not _CUDA:
    pytest.skip("no CUDA device and TRITON_INTERPRET != 1", allow_module_level=True)

DEV = torch.device("cpu" if INTERPRET else "cuda")
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _unit(n, d, gen, dtype):
    x = torch.randn(n, d, generator=gen)
    return (x / x.norm(dim=1, keepdim=True)).to(DEV, dtype)


def make_case(kind, n, d, dtype, seed=0):
    """(spec, q, k, alpha, bias, aux) of a template case (tests/template_cases.py) on DEV; one
    set against itself passes q as k; side data in fp32 (what the launchers pass on)."""
    spec, q, k, alpha, bias, aux = template_cases.make_case(
        kind, n, d, dtype, torch.Generator().manual_seed(seed))
    q = q.to(DEV)
    k = q if kind in template_cases.SINGLE else k.to(DEV)

    def side(v):
        if not isinstance(v, torch.Tensor):
            return v
        return v.to(DEV, torch.float32) if v.is_floating_point() else v.to(DEV)

    aux = TileAux(**{f: side(v) for f, v in vars(aux).items()})
    return spec, q, k, alpha.to(DEV), side(bias) if bias is not None else None, aux


def assert_close(name, got, ref, tol):
    """Normwise relative error on finite entries; infinities must coincide."""
    assert got.shape == ref.shape, (name, got.shape, ref.shape)
    got, ref = got.double().cpu(), ref.double().cpu()
    inf = torch.isinf(ref)
    assert torch.equal(inf, torch.isinf(got)) and torch.equal(got[inf], ref[inf]), name
    assert not torch.isnan(got).any(), f"{name}: NaN"
    g, r = got[~inf], ref[~inf]
    err = ((g - r).norm() / r.norm().clamp_min(1e-12)).item()
    worst = (g - r).abs().argmax().item() if g.numel() else -1
    assert err <= tol, f"{name}: rel err {err:.2e} > {tol:.0e} (worst flat index {worst})"


def check_case(kind, n, d, dtype):
    spec, q, k, alpha, bias, aux = make_case(kind, n, d, dtype)
    tol = TOL[dtype]
    stats, col = tb.forward(spec, q, k, alpha, bias, aux)
    rstats, rcol = _torch_tiled.forward(spec, q, k, alpha, bias, aux)
    assert stats.dtype == torch.float32
    assert_close("stats", stats, rstats, tol)
    if spec.col_lse:
        assert_close("col_lse", col, rcol, tol)
    gen = torch.Generator().manual_seed(1)
    g = (torch.randn(rstats.shape, generator=gen) / max(n, 1)).to(DEV)
    gc = (torch.randn(rcol.shape, generator=gen) / max(n, 1)).to(DEV) if spec.col_lse else None
    got = tb.backward(spec, q, k, alpha, bias, aux, rstats, rcol, g, gc)
    ref = _torch_tiled.backward(spec, q, k, alpha, bias, aux, rstats, rcol, g, gc)
    for name, a, b in zip(("dq", "dk", "dalpha", "dbias"), got, ref):
        assert (a is None) == (b is None), name
        if b is not None:
            assert_close(name, a, b, tol)


SHAPES = {  # kind -> (N, D) pairs; together they cover N 1/17/63/65/130 and D 3/64/100
    "infonce": [(1, 3), (65, 100)],
    "clip_symmetric": [(17, 64), (130, 100)],
    "nt_xent_self": [(63, 100)],
    "supcon_out": [(65, 64)],
    "supcon_in": [(1, 64), (63, 3)],
    "hcl": [(65, 100)],
    "cclk_dense": [(17, 100)],
    "lowrank_clip": [(63, 64)],
    "dist_gamma2_pos": [(65, 100)],
    "dist_gamma1_pos": [(63, 3)],
    "dist_gamma15_pos": [(40, 7)],  # a lost factor gamma (or a wrong power of d2) in the gradient
    "dist_gamma3_pos": [(33, 5)],  # hides at gamma 1 and 2: only these two show it
    "siglip": [(17, 3), (130, 64)],
    "row_alpha_label": [(65, 100)],
    "col_offset_dense": [(63, 100)],
    # the rest of the template cases, at small shapes (the interpreter's time)
    "lowrank": [(17, 64)],
    "dist_gamma2": [(17, 5)],
    "dist_gamma1": [(17, 3)],
    "dist_gamma15": [(17, 7)],
    "dist_gamma3": [(17, 5)],
    "row_alpha": [(17, 64)],
    "col_offset": [(17, 100)],
}
assert sorted(SHAPES) == sorted(template_cases.NAMES), "every template case runs here"
FP16 = {"infonce": (63, 64), "clip_symmetric": (65, 100), "supcon_in": (17, 100),
        "cclk_dense": (63, 64), "dist_gamma1_pos": (65, 64), "siglip": (65, 100)}

CASES = [pytest.param(kind, n, d, torch.float32, id=f"{kind}-N{n}-D{d}-fp32")
         for kind, shapes in SHAPES.items() for n, d in shapes]
CASES += [pytest.param(kind, n, d, torch.float16, id=f"{kind}-N{n}-D{d}-fp16")
          for kind, (n, d) in FP16.items()]
# bf16 under the interpreter runs the UPCAST path (fp32 dots); the bf16 tensor-core path is GPU-only
CASES += [pytest.param(kind, n, d, torch.bfloat16, id=f"{kind}-N{n}-D{d}-bf16",
                       marks=() if INTERPRET else pytest.mark.gpu)
          for kind, n, d in (("clip_symmetric", 65, 100), ("hcl", 17, 64))]


@pytest.mark.parametrize("kind,n,d,dtype", CASES)
def test_parity(kind, n, d, dtype):
    torch.manual_seed(0)
    check_case(kind, n, d, dtype)


def test_autograd_end_to_end():
    """Through tile_stats: the Function's dtype handling, needs_input_grad and a bias."""
    spec, q, k, alpha, bias, aux = make_case("siglip", 33, 64, torch.float32)
    grads = []
    for backend in ("triton", "torch"):
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, alpha, bias)]
        stats = tile_stats(spec, *leaves, aux=aux, backend=backend)[0]
        (stats * torch.linspace(-1, 1, stats.numel(), device=DEV).view_as(stats)).sum().backward()
        grads.append([t.grad for t in leaves])
    for name, a, b in zip(("dq", "dk", "dalpha", "dbias"), *grads):
        assert_close(name, a, b, 1e-5)


def test_strided_inputs_and_empty():
    spec, q, k, alpha, bias, aux = make_case("clip_symmetric", 17, 64, torch.float32)
    qs = torch.stack([q, -q], 2)[:, :, 0]  # stride (128, 2)
    kt = k.t().contiguous().t()  # stride (1, 17)
    a = tb.forward(spec, qs, kt, alpha, bias, aux)
    b = _torch_tiled.forward(spec, q, k, alpha, bias, aux)
    assert_close("stats", a[0], b[0], 1e-5)
    assert_close("col", a[1], b[1], 1e-5)
    empty = tb.forward(spec, q, k[:0], alpha, bias, aux)
    assert empty[0].shape == (1, 17) and torch.isneginf(empty[0]).all()


@pytest.mark.parametrize("needs", [(False, True, False, False), (False, False, True, True),
                                   (True, False, False, False)], ids=["dk", "alpha-bias", "dq"])
def test_needs_subsets(needs):
    """Only the asked-for passes run; what runs matches, what does not is zero."""
    spec, q, k, alpha, bias, aux = make_case("siglip", 40, 64, torch.float32)
    stats, col = _torch_tiled.forward(spec, q, k, alpha, bias, aux)
    g = torch.randn_like(stats)
    got = tb.backward(spec, q, k, alpha, bias, aux, stats, col, g, None, needs)
    ref = _torch_tiled.backward(spec, q, k, alpha, bias, aux, stats, col, g, None)
    for name, need, a, b in zip(("dq", "dk", "dalpha", "dbias"), needs, got, ref):
        if need:
            assert_close(name, a, b, 1e-5)
        elif name in ("dq", "dk") and not (name == "dq" and (needs[2] or needs[3])):
            assert not a.any(), name


def test_float64_delegates_to_torch():
    spec, q, k, alpha, bias, aux = make_case("hcl", 9, 5, torch.float64)
    stats, col = tb.forward(spec, q, k, alpha.double(), bias, aux)
    assert stats.dtype == torch.float64
    ref = _torch_tiled.forward(spec, q, k, alpha.double(), bias, aux)[0]
    assert torch.equal(stats, ref)


def test_unavailable():
    assert tc.unavailable(DEV) is None
    if INTERPRET:
        assert tc.unavailable(torch.device("meta")) is not None


@pytest.mark.skipif(not hasattr(torch.library, "opcheck"), reason="torch < 2.4")
def test_custom_ops_opcheck():
    """The kernels' torch.library ops: schema, fake (meta) implementations, dispatch."""
    spec, q, k, alpha, bias, aux = make_case("clip_symmetric", 17, 64, torch.float32)
    torch.library.opcheck(torch.ops.tilecl.triton_tile_fwd.default,
                          _ops.prefix_args(spec, q, k, alpha, bias, aux))
    stats, col = tb.forward(spec, q, k, alpha, bias, aux)
    g, gc = torch.randn_like(stats), torch.randn_like(col)
    torch.library.opcheck(torch.ops.tilecl.triton_tile_bwd.default,
                          (*_ops.prefix_args(spec, q, k, alpha, bias, aux), stats, col, g, gc,
                           [True, True, True, True]))


def test_spec_string_roundtrip():
    for kind in SHAPES:
        spec = make_case(kind, 2, 3, torch.float32)[0]
        assert spec_from_key(spec.key()) == spec


@pytest.mark.skipif(not hasattr(torch.library, "custom_op"), reason="torch < 2.4")
def test_torch_compile_fullgraph():
    """torch.compile traces tile_stats on the triton backend without graph breaks."""
    from tilecl import _backends

    _backends.get("triton")  # load the module outside the traced region
    spec, q, k, alpha, bias, aux = make_case("clip_symmetric", 17, 64, torch.float32)

    def f(q, k, a):
        stats, col, _ = tile_stats(spec, q, k, a, None, aux, backend="triton")
        return stats.sum() + (col * col).sum()

    grads = []
    for fn in (f, torch.compile(f, fullgraph=True, backend="aot_eager")):
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, alpha)]
        fn(*leaves).backward()
        grads.append([t.grad for t in leaves])
    for name, a, b in zip(("dq", "dk", "dalpha"), *grads):
        assert_close(name, a, b, 1e-6)


# ---------------------------------------------------------------------------------------------
# false-negative threshold (TileSpec.threshold) and streamed top-k hardest negatives (TileSpec.topk)


def _gap_thresholds(x, cand, gen):
    """thresh_i between two neighbouring candidate logits of row i (at a random quantile in
    [0.5, 0.95]), at the widest such gap nearby, so no logit lies within fp32 rounding of it."""
    th = torch.empty(x.shape[0], dtype=torch.float64)
    for i in range(x.shape[0]):
        v = x[i][cand[i]].sort().values
        if v.numel() < 2:
            th[i] = (v[0] - 1.0) if v.numel() else 0.0
            continue
        lo = int((0.5 + 0.45 * torch.rand((), generator=gen).item()) * (v.numel() - 1))
        lo = max(0, min(lo, v.numel() - 2))
        js = range(max(0, lo - 2), min(v.numel() - 1, lo + 3))
        j = max(js, key=lambda t: (v[t + 1] - v[t]).item())
        th[i] = (v[j] + v[j + 1]) / 2
    return th


def fn_case(variant, n, d, dtype, symmetric=False, threshold=True, topk=0, m=None, excl=False,
            col_offset=0, seed=0):
    """info_nce's tile problem (positive "index", one ALL sum, col LSE when symmetric) or its
    duplicate-id variant (positive "label", one NEG sum), with thresholds that drop columns.
    Returns (spec, q, k, alpha, aux, dense) with dense = (x fp64 [N, M], candidate mask of the
    top-k: allowed non-positive columns) for the checks."""
    gen = torch.Generator().manual_seed(seed)
    m = m if m is not None else (n if symmetric else 2 * n + 3)
    alpha = torch.tensor(1 / 0.07)
    q = _unit(n, d, gen, dtype)
    k = _unit(m, d, gen, dtype)
    pos = torch.randint(0, m, (n,), generator=gen) if not symmetric else torch.arange(n)
    if symmetric:  # the positives a little closer, like trained CLIP pairs
        k = F.normalize(k.float().cpu() + 0.5 * q.float().cpu(), dim=1).to(DEV, dtype)
    ex = (pos + 1) % m + col_offset if excl else None
    x = alpha.double() * (q.double().cpu() @ k.double().cpu().T)
    cols = torch.arange(m) + col_offset
    allowed = torch.ones(n, m, dtype=torch.bool) if ex is None else ex[:, None] != cols[None, :]
    if variant == "index":
        spec = TileSpec(positive="index", sums=(SumSpec(),), col_lse=symmetric,
                        threshold=threshold, topk=topk)
        aux = TileAux(pos=pos + col_offset)
        y = (pos[:, None] + col_offset) == cols[None, :]
    else:
        key_ids = torch.randint(0, max(m // 3, 3), (m,), generator=gen)
        spec = TileSpec(positive="label", sums=(SumSpec("neg"),), threshold=threshold, topk=topk)
        aux = TileAux(labels_q=key_ids[pos], labels_k=key_ids)
        y = key_ids[pos][:, None] == key_ids[None, :]
    y = y & allowed
    aux.excl, aux.col_offset = ex, col_offset
    if threshold:
        th = _gap_thresholds(x, allowed & ~y, gen)
        aux.thresh = th.float()
        allowed = allowed & ~((x > th[:, None]) & ~y)
    aux = TileAux(**{f: (v.to(DEV) if isinstance(v, torch.Tensor) else v)
                     for f, v in vars(aux).items()})
    return spec, q, k, alpha.to(DEV), aux, (x, allowed & ~y, y)


def _check_fn(spec, q, k, alpha, aux, tol):
    out = tb.forward(spec, q, k, alpha, None, aux)
    ref = _torch_tiled.forward(spec, q, k, alpha, None, aux)
    assert_close("stats", out[0], ref[0], tol)
    if spec.col_lse:
        assert_close("col_lse", out[1], ref[1], tol)
    gen = torch.Generator().manual_seed(1)
    n = q.shape[0]
    g = (torch.randn(ref[0].shape, generator=gen) / n).to(DEV)
    gc = (torch.randn(ref[1].shape, generator=gen) / n).to(DEV) if spec.col_lse else None
    got = tb.backward(spec, q, k, alpha, None, aux, ref[0], ref[1], g, gc)
    want = _torch_tiled.backward(spec, q, k, alpha, None, aux, ref[0], ref[1], g, gc)
    for name, a, b in zip(("dq", "dk", "dalpha"), got, want):
        assert_close(name, a, b, tol)
    return out, ref


FN_CASES = [pytest.param(v, n, d, sym, dt, id=f"{v}{'-sym' if sym else ''}-N{n}-D{d}-{tag}")
            for v, n, d, sym, dt, tag in (
                ("index", 1, 3, False, torch.float32, "fp32"),
                ("index", 17, 64, True, torch.float32, "fp32"),
                ("index", 63, 100, False, torch.float32, "fp32"),
                ("index", 65, 100, True, torch.float32, "fp32"),
                ("index", 130, 64, True, torch.float32, "fp32"),
                ("label", 1, 64, False, torch.float32, "fp32"),
                ("label", 17, 3, False, torch.float32, "fp32"),
                ("label", 130, 100, False, torch.float32, "fp32"),
                ("index", 65, 64, True, torch.float16, "fp16"),
                ("index", 63, 3, False, torch.float16, "fp16"),
                ("label", 65, 100, False, torch.float16, "fp16"))]


@pytest.mark.parametrize("variant,n,d,symmetric,dtype", FN_CASES)
def test_threshold_parity(variant, n, d, symmetric, dtype):
    """Columns above the row's threshold leave the row sums, the column LSE and every gradient
    exactly as in the torch backend; the thresholds do drop columns (and spare positives)."""
    spec, q, k, alpha, aux, (x, cand, y) = fn_case(variant, n, d, dtype, symmetric, excl=n > 1)
    th = aux.thresh.cpu().double()[:, None]
    dropped = (x > th) & ~y
    assert dropped.any(), "the thresholds must drop some columns"
    if n > 1:
        assert ((x > th) & y).any(), "some positive must lie above its threshold (and be spared)"
    out, ref = _check_fn(spec, q, k, alpha, aux, TOL[dtype])
    off = _torch_tiled.forward(dataclasses.replace(spec, threshold=False), q, k, alpha, None, aux)
    assert not torch.allclose(off[0], ref[0]), "dropping columns must change the statistics"


def test_threshold_through_autograd():
    """tile_stats(backend="triton") accepts the threshold flag; gradients match the torch one."""
    spec, q, k, alpha, aux, _ = fn_case("index", 40, 64, torch.float32, symmetric=True)
    grads = []
    for backend in ("triton", "torch"):
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, alpha)]
        stats, col, _ = tile_stats(spec, *leaves, None, aux, backend=backend)
        (stats.sum() + (col * torch.linspace(-1, 1, col.numel(), device=DEV)).sum()).backward()
        grads.append([t.grad for t in leaves])
    for name, a, b in zip(("dq", "dk", "dalpha"), *grads):
        assert_close(name, a, b, 1e-5)


def check_topk(spec, q, k, alpha, aux, dense, tol):
    """vals equal the torch backend's (up to fp32 rounding of the logit) and descend; every
    index is a distinct allowed non-positive column whose logit is its value (ties may come in
    any order); padding is -inf / -1 exactly where the reference pads."""
    x, cand, _ = dense
    (stats, _, (vals, idx)) = tb.forward(spec, q, k, alpha, None, aux)
    (rstats, _, (rvals, ridx)) = _torch_tiled.forward(spec, q, k, alpha, None, aux)
    n, kk = q.shape[0], spec.topk
    assert vals.shape == (n, kk) and idx.shape == (n, kk), (vals.shape, idx.shape)
    assert vals.dtype == torch.float32 and idx.dtype == torch.int64
    if spec.n_stats:
        assert_close("stats", stats, rstats, tol)
    vals, idx, rvals, ridx = vals.cpu().double(), idx.cpu(), rvals.cpu().double(), ridx.cpu()
    pad = torch.isneginf(rvals)
    assert torch.equal(torch.isneginf(vals), pad) and torch.equal(idx == -1, pad), "padding"
    atol = tol * 14  # |x| <= alpha = 1 / 0.07
    assert torch.allclose(vals[~pad], rvals[~pad], rtol=0, atol=atol), "values"
    assert (vals[:, 1:] <= vals[:, :-1]).all(), "descending"
    local = idx - aux.col_offset
    for i in range(n):
        keep = ~pad[i]
        li = local[i][keep]
        assert int(keep.sum()) == min(kk, int(cand[i].sum())), f"row {i}: missed candidates"
        assert li.unique().numel() == li.numel(), f"row {i}: repeated index"
        assert cand[i, li].all(), f"row {i}: an index that is not an allowed negative"
        assert torch.allclose(x[i, li], vals[i][keep], rtol=0, atol=atol), f"row {i}: value"
        # a value with no other candidate within 1e-3 (no tie) has the reference's index
        near = ((x[i][cand[i]][None, :] - rvals[i][keep][:, None]).abs() < 1e-3).sum(1)
        untied = near == 1
        assert torch.equal(idx[i][keep][untied], ridx[i][keep][untied]), f"row {i}: index"


TOPK_CASES = [pytest.param(*c, id=c[-1]) for c in (
    # variant, n, m, d, topk, threshold, excl, col_offset, dtype, id
    ("index", 1, 45, 3, 5, False, False, 0, torch.float32, "index-N1-M45-k5"),
    ("index", 17, 45, 64, 8, False, True, 0, torch.float32, "index-excl-N17-M45-k8"),
    ("index", 65, 100, 100, 32, False, True, 7, torch.float32, "index-excl-off7-N65-M100-k32"),
    ("index", 130, 263, 64, 3, True, False, 0, torch.float32, "index-thresh-N130-M263-k3"),
    ("label", 17, 37, 64, 6, False, True, 0, torch.float32, "label-excl-N17-M37-k6"),
    ("label", 65, 70, 3, 16, True, True, 0, torch.float32, "label-thresh-excl-N65-M70-k16"),
    ("index", 17, 5, 64, 8, False, True, 0, torch.float32, "index-M5<k8-padding"),
    ("label", 17, 6, 64, 4, True, False, 0, torch.float32, "label-thresh-M6-padding"),
    ("index", 63, 70, 100, 1, False, False, 0, torch.float32, "index-N63-k1"),
    ("index", 65, 97, 64, 10, True, True, 0, torch.float16, "index-thresh-excl-N65-k10-fp16"),
)]


@pytest.mark.parametrize("variant,n,m,d,topk,threshold,excl,col_offset,dtype,case", TOPK_CASES)
def test_topk_hardest_negatives(variant, n, m, d, topk, threshold, excl, col_offset, dtype, case):
    spec, q, k, alpha, aux, dense = fn_case(variant, n, d, dtype, threshold=threshold, topk=topk,
                                            m=m, excl=excl, col_offset=col_offset)
    check_topk(spec, q, k, alpha, aux, dense, TOL[dtype])


def test_topk_symmetric_and_single_set():
    """Top-k with the column pass (symmetric CLIP) and with z against itself (self excluded)."""
    spec, q, k, alpha, aux, dense = fn_case("index", 33, 64, torch.float32, symmetric=True,
                                            threshold=True, topk=4)
    check_topk(spec, q, k, alpha, aux, dense, 1e-5)
    out = tb.forward(spec, q, k, alpha, None, aux)
    assert_close("col_lse", out[1], _torch_tiled.forward(spec, q, k, alpha, None, aux)[1], 1e-5)
    z = _unit(40, 16, torch.Generator().manual_seed(3), torch.float32)
    ar = torch.arange(40, device=DEV)
    spec = TileSpec(positive="index", sums=(SumSpec(),), topk=7)
    aux = TileAux(excl=ar, pos=(ar + 20) % 40)
    x = (1 / 0.07) * (z.double().cpu() @ z.double().cpu().T)
    cand = ~torch.eye(40, dtype=torch.bool)
    cand[ar.cpu(), ((ar + 20) % 40).cpu()] = False
    check_topk(spec, z, z, torch.tensor(1 / 0.07, device=DEV), aux, (x, cand, None), 1e-5)


def test_topk_through_autograd_and_no_stats():
    """tile_stats returns the top-k as a 4th element without gradient; a spec with no row
    statistic at all still runs the row pass for it."""
    spec, q, k, alpha, aux, dense = fn_case("index", 20, 64, torch.float32, threshold=True,
                                            topk=5)
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, alpha)]
    stats, col, s_pos, (vals, idx) = tile_stats(spec, *leaves, None, aux, backend="triton")
    assert not vals.requires_grad and idx.dtype == torch.int64
    ref = tile_stats(spec, q, k, alpha, None, aux, backend="torch")[3]
    assert_close("vals", vals, ref[0], 1e-5)
    stats.sum().backward()
    assert leaves[0].grad is not None
    bare = TileSpec(positive="index", topk=5)
    check_topk(bare, q, k, alpha, TileAux(pos=aux.pos), (dense[0], ~dense[2], dense[2]), 1e-5)


@pytest.mark.skipif(not hasattr(torch.library, "opcheck"), reason="torch < 2.4")
def test_custom_ops_opcheck_threshold_topk():
    spec, q, k, alpha, aux, _ = fn_case("index", 17, 64, torch.float32, symmetric=True, topk=4)
    torch.library.opcheck(torch.ops.tilecl.triton_tile_fwd.default,
                          _ops.prefix_args(spec, q, k, alpha, None, aux))
    stats, col, _ = tb.forward(spec, q, k, alpha, None, aux)
    g, gc = torch.randn_like(stats), torch.randn_like(col)
    torch.library.opcheck(torch.ops.tilecl.triton_tile_bwd.default,
                          (*_ops.prefix_args(spec, q, k, alpha, None, aux), stats, col, g, gc,
                           [True, True, True, False]))
    assert spec_from_key(spec.key()) == spec


gpu = pytest.mark.skipif(not _CUDA or INTERPRET, reason="needs CUDA (and no TRITON_INTERPRET)")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("kind", ["clip_symmetric", "supcon_in", "hcl", "dist_gamma2_pos", "siglip"])
def test_gpu_bf16_large(kind):
    """bf16 at N = 2048, D = 768 (several D chunks, autotuned configs) against fp32 torch on the
    same bf16-rounded inputs."""
    check_case(kind, 2048, 768, torch.bfloat16)


@pytest.mark.gpu
@gpu
def test_gpu_threshold_topk_large():
    """Symmetric CLIP with false-negative thresholds and top-16 hardest negatives, bf16, at
    N = 2048, D = 768 (autotuned configs, the compiled while-loop merge)."""
    spec, q, k, alpha, aux, dense = fn_case("index", 2048, 768, torch.bfloat16, symmetric=True,
                                            topk=16)
    _check_fn(spec, q, k, alpha, aux, TOL[torch.bfloat16])
    check_topk(spec, q, k, alpha, aux, dense, TOL[torch.bfloat16])


@pytest.mark.gpu
@gpu
def test_gpu_tf32(monkeypatch):
    monkeypatch.setenv("TILECL_TRITON_PRECISION", "tf32")
    spec, q, k, alpha, bias, aux = make_case("clip_symmetric", 1024, 256, torch.float32)
    stats, col = tb.forward(spec, q, k, alpha, bias, aux)
    rstats, rcol = _torch_tiled.forward(spec, q, k, alpha, bias, aux)
    assert_close("stats", stats, rstats, 1e-3)
    assert_close("col", col, rcol, 1e-3)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_gpu_loss_paths_bf16(monkeypatch, name):
    """clip_loss (column LSE by atomics, and the two-launch forward) and siglip_loss (forward
    fused into the dq pass, and apart), bf16, N = 4096, D = 768, with the chunked fused backward
    (workspace cut to 8 MiB) and with the gemm backward (the automatic choice at this D, SigLIP's
    forward in its row H pass): every output against fp32 torch on the same bf16 inputs."""
    import tilecl

    gen = torch.Generator().manual_seed(11)
    a, b = (_unit(4096, 768, gen, torch.bfloat16) for _ in range(2))
    monkeypatch.setenv("TILECL_TRITON_WORKSPACE_MB", "8")

    def run(backend, dtype):
        x, y = (t.to(dtype).clone().requires_grad_() for t in (a, b))
        s = torch.tensor(20.0, device=DEV, requires_grad=True)
        bias = torch.tensor(-5.0, device=DEV, requires_grad=True)
        loss = (tilecl.clip_loss(x, y, s, backend=backend) if name == "clip" else
                tilecl.siglip_loss(x, y, s, bias, backend=backend))
        loss.backward()
        return [loss, x.grad, y.grad, s.grad] + ([bias.grad] if name == "siglip" else [])

    ref = run("torch", torch.float32)
    choice = "TILECL_TRITON_COL_PASS" if name == "clip" else "TILECL_TRITON_SIGLIP_FUSED"
    for env, value in [(choice, v) for v in (("atomic", "two") if name == "clip" else ("1", "0"))
                       ] + [("TILECL_TRITON_BWD", "gemm")]:
        monkeypatch.delenv(choice, raising=False)
        monkeypatch.setenv("TILECL_TRITON_BWD", "fused")
        monkeypatch.setenv(env, value)
        for i, (g, r) in enumerate(zip(run("triton", torch.bfloat16), ref)):
            assert_close(f"{name} {env}={value} output {i}", g.float(), r, TOL[torch.bfloat16])


@pytest.mark.parametrize("name", ["clip", "nt_xent", "siglip", "supcon"])
def test_torch_compile_traces_public_loss_without_graph_breaks(name):
    """A public loss on the triton backend compiles with fullgraph=True (custom
    ops with fake implementations, backend resolution constant-folded) and matches eager."""
    import tilecl

    fns = {
        "clip": lambda q, k: tilecl.clip_loss(q, k, 14.0, backend="triton"),
        "nt_xent": lambda q, k: tilecl.nt_xent(q, k, temperature=0.5, backend="triton"),
        "siglip": lambda q, k: tilecl.siglip_loss(q, k, 10.0, -5.0, backend="triton"),
        "supcon": lambda q, k: tilecl.supcon(torch.stack([q, k], 1), torch.arange(33) % 4,
                                             temperature=0.1, backend="triton"),
    }
    torch._dynamo.reset()
    q0, k0 = F.normalize(torch.randn(33, 16), dim=1), F.normalize(torch.randn(33, 16), dim=1)
    out = []
    for fn in (fns[name], torch.compile(fns[name], fullgraph=True, backend="aot_eager")):
        q, k = q0.clone().requires_grad_(), k0.clone().requires_grad_()
        loss = fn(q, k)
        loss.backward()
        out.append((loss.detach(), q.grad, k.grad))
    for a, b in zip(out[0], out[1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# symmetric CLIP's column LSE: atomics in the row pass (default) vs the exact column pass


def _col_lse(monkeypatch, mode, spec, q, k, alpha, bias, aux):
    monkeypatch.setenv("TILECL_TRITON_COL_PASS", mode)
    stats, col, *_ = tb._forward_impl(spec, q, k, alpha, bias, aux)
    return stats, col


@pytest.mark.parametrize("n,m,d", [(1, 1, 3), (17, 40, 64), (65, 33, 100)])
@pytest.mark.parametrize("variant", ["plain", "threshold", "excl_offset", "dist"])
def test_col_atomic_matches_column_pass(monkeypatch, n, m, d, variant):
    gen = torch.Generator().manual_seed(n * 7 + m)
    q, k = _unit(n, d, gen, torch.float32), _unit(m, d, gen, torch.float32)
    alpha, aux = torch.tensor(1 / 0.07), TileAux(pos=torch.arange(n) % m)
    spec = TileSpec(positive="index", sums=(SumSpec(),), col_lse=True)
    if variant == "threshold":
        spec = dataclasses.replace(spec, threshold=True)
        aux = dataclasses.replace(aux, thresh=torch.rand(n, generator=gen) * 10.0)
    elif variant == "excl_offset":  # a visiting block: global columns 5 .. 5 + M
        aux = TileAux(pos=torch.arange(n) % m + 5, excl=(torch.arange(n) + 6) % (m + 5),
                      col_offset=5)
    elif variant == "dist":
        spec = dataclasses.replace(spec, logit="dist", gamma=1.0)
        alpha = torch.tensor(3.0)
    got = _col_lse(monkeypatch, "atomic", spec, q, k, alpha, None, aux)
    want = _col_lse(monkeypatch, "two", spec, q, k, alpha, None, aux)
    ref = _torch_tiled.forward(spec, q.double(), k.double(), alpha.double(), None, aux)
    for name, a, b, r in zip(("stats", "col"), got, want, ref):
        assert torch.equal(torch.isinf(a), torch.isinf(b)), name
        assert_close(name, a, r.float(), 1e-5)
        assert_close(name + " vs column pass", a, b, 1e-5)


def test_col_atomic_falls_back_where_the_sum_underflows(monkeypatch):
    """One row of norm 100 along e0 sets every column's bound to 2 x 100 |k_j|; columns
    orthogonal to e0 have logits near 0, ~136 below their reference: their fp32 sums underflow
    and only they (an even-indexed half) go through the gathered column pass, exactly."""
    n, m, d = 9, 12, 8
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(n, d, generator=gen) * 0.1
    q[0] = 0.0
    q[0, 0] = 100.0
    k = torch.nn.functional.normalize(torch.randn(m, d, generator=gen), dim=1)
    k[::2, 0] = 0.0  # columns 0, 2, ...: orthogonal to e0
    k[1::2, 0] = 1.0
    alpha = torch.tensor(2.0)
    spec = TileSpec(positive="index", sums=(SumSpec(),), col_lse=True)
    aux = TileAux(pos=torch.arange(n))
    gathered = []
    real = tc._lse._lse_fwd_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **meta):
                if meta.get("COL_GATHER"):
                    gathered.append(kernel_args(real, args, meta)["cidx_ptr"].clone())
                return real[grid](*args, **meta)
            return launch

    monkeypatch.setattr(tc._lse, "_lse_fwd_kernel", Spy())
    got = _col_lse(monkeypatch, "atomic", spec, q, k, alpha, None, aux)
    assert len(gathered) == 1 and torch.equal(gathered[0], torch.arange(0, m, 2))
    want = _col_lse(monkeypatch, "two", spec, q, k, alpha, None, aux)
    ref = _torch_tiled.forward(spec, q.double(), k.double(), alpha.double(), None, aux)
    assert_close("col", got[1], ref[1].float(), 1e-5)
    assert_close("col vs column pass", got[1], want[1], 1e-5)


def test_col_pass_choice(monkeypatch):
    monkeypatch.delenv("TILECL_TRITON_COL_PASS", raising=False)
    assert tb.col_pass() == "atomic"
    monkeypatch.setenv("TILECL_TRITON_COL_PASS", "sideways")
    with pytest.raises(ValueError, match="TILECL_TRITON_COL_PASS"):
        tb.col_pass()
    monkeypatch.setenv("TILECL_TRITON_COL_PASS", "atomic")
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert tb.col_pass() == "two"  # atomics are not deterministic
    finally:
        torch.use_deterministic_algorithms(prev)
