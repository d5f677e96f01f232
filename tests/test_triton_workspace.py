"""The triton backend's memory-bounded backward (``_triton.bounded.backward_final``): every loss
with the fp32 gradient workspace cut to a few rows (many row and column chunks, ragged last
chunk), against the float64 reference; and its peak memory, counted tensor by tensor, against
the workspace bound and against the unchunked fp32 path (which it must beat).

Runs the Triton kernels under TRITON_INTERPRET=1 (set by conftest when no GPU is present).
"""

import pytest
import torch
from test_parity import LOW, _as

from tilecl import _ops, _torch_tiled
from tilecl._autograd import _add_positive
from tilecl._spec import SumSpec, TileAux, TileSpec
from tilecl._triton import bounded as tbw
from tilecl._triton import common as tc
from tilecl._triton import gemm as tbg
from tilecl._triton import launch as tb
from tilecl.memtrack import PeakTensorBytes

from cases import CASES, run
from conftest import assert_rel, kernel_args

pytestmark = pytest.mark.skipif(tc.unavailable("cpu") is not None,
                                reason="the triton backend cannot run on the CPU here")

N, D = 37, 20  # chunks of 6 rows: 7 chunks, the last one ragged; D not a multiple of BK


@pytest.fixture
def tiny_workspace(monkeypatch):
    """A workspace of 6 fp32 rows of width D (3 per buffer for one set against itself)."""
    monkeypatch.setenv("TILECL_TRITON_WORKSPACE_MB", repr(6 * D * 4 / 2**20))
    assert tbw.workspace_bytes() // (4 * D) == 6


ROWS_CASES = {"info_nce_perm", "clip", "siglip", "nt_xent", "supcon_out"}  # also reduction none


def _triton_cases():
    for case in CASES:
        if case.backends and "triton" not in case.backends:
            continue
        if N < case.min_n:
            continue
        for red in (["mean", "none"] if case.rows and case.name in ROWS_CASES else ["mean"]):
            yield pytest.param(case, red, id=f"{case.name}-{red}")


@pytest.mark.parametrize("case,reduction", list(_triton_cases()))
def test_chunked_fp32_matches_reference(tiny_workspace, case, reduction):
    _check_fp32(case, reduction)


def _check_fp32(case, reduction):
    diff, const = case.make(N, D, torch.float32)
    ref_loss, ref_grads = run(case, "reference", reduction, [x.double() for x in diff],
                              {k: _as(v, torch.float64) for k, v in const.items()})
    loss, grads = run(case, "triton", reduction, diff, const)
    assert_rel(loss, ref_loss, 1e-5 * max(1.0, 1.0 / max(abs(ref_loss).max().item(), 1e-30)),
               f"{case.name} loss")
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert g.dtype == diff[i].dtype
        assert_rel(g, r, 1e-5, f"{case.name} grad of input {i}")


@pytest.mark.parametrize("name", ["clip", "info_nce_perm", "nt_xent", "siglip", "supcon_out"])
def test_chunked_fp16_no_worse_than_pytorch(tiny_workspace, name):
    _check_low(name, torch.float16)


def _check_low(name, dtype):
    """Every gradient's error (vs float64) at most twice PyTorch's own in ``dtype``."""
    case = next(c for c in CASES if c.name == name)
    diff, const = case.make(N, D, dtype)
    truth = run(case, "reference", "mean", [x.double() for x in diff],
                {k: _as(v, torch.float64) for k, v in const.items()})
    own = run(case, "reference", "mean", diff, const)
    ours = run(case, "triton", "mean", diff, const)
    for i, (g, o, t) in enumerate(zip(ours[1], own[1], truth[1])):
        assert g.dtype == diff[i].dtype
        scale = t.abs().max().item() + 1e-30
        err = (g.double() - t).abs().max().item() / scale
        own_err = (o.double() - t).abs().max().item() / scale
        assert err <= 2 * own_err + LOW[dtype] / 4, f"{name} grad {i}: {err} vs PyTorch {own_err}"


def _clip_problem(n, d, dtype, seed=0, forward=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).to(dtype)
    k = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).to(dtype)
    spec = TileSpec(positive="index", sums=(SumSpec(),), col_lse=True)
    pos = torch.arange(n)
    aux = TileAux(pos=pos)
    alpha = torch.tensor(10.0)
    stats, col = (forward or tb._forward_impl)(spec, q, k, alpha, None, aux)
    g_stats = torch.full_like(stats, 0.5 / n)
    g_col = torch.full_like(col, 0.5 / n)
    g_pos = torch.full((n,), -1.0 / n)
    return spec, q, k, alpha, aux, stats, col, g_stats, g_col, pos, g_pos


def _generic(spec, q, k, alpha, aux, stats, col, g_stats, g_col, pos, g_pos):
    """What _autograd does with a backend without backward_final: fp32 dq / dk, then finish."""
    needs = (True, True, True, False)
    dq, dk, da, _ = tb._backward_impl(spec, q, k, alpha, None, aux, stats, col, g_stats, g_col,
                                      needs)
    dq, dk, da = _add_positive(q, k, alpha, pos, g_pos, dq, dk, da, needs, torch.float32)
    return dq.to(q.dtype), dk.to(k.dtype), da


def test_chunked_equals_unchunked_clip(monkeypatch):
    """Same gradients as the generic path (fp32 accumulation is per row / column, whatever the
    chunk), for several workspace sizes."""
    args = _clip_problem(70, 24, torch.float32)
    want = _generic(*args)
    for rows in (1, 7, 33, 70, 1000):
        monkeypatch.setenv("TILECL_TRITON_WORKSPACE_MB", repr(rows * 24 * 4 / 2**20))
        dq, dk, da, _ = tbw._final_impl(*args[:4], None, *args[4:9], (True, True, True, False),
                                        args[9], args[10], False)
        for got, ref in zip((dq, dk, da), want):
            assert_rel(got, ref, 2e-6, f"workspace of {rows} rows")


def test_peak_memory_bounded_by_workspace(monkeypatch):
    """fp16 CLIP, N = 256, D = 64: the generic path holds fp32 dq and dk (2 x 64 KiB) and their
    finishing temporaries; backward_final holds one workspace (here 16 rows = 4 KiB), 2 MiB-capped
    temporaries (here smaller than one chunk) and O(N) vectors, beyond its fp16 outputs."""
    n, d = 256, 64
    args = _clip_problem(n, d, torch.float16)
    ws = 16 * d * 4
    monkeypatch.setenv("TILECL_TRITON_WORKSPACE_MB", repr(ws / 2**20))

    def launch(spec, flags, q, k, alpha, bias, aux, st, gst, cst, gc, out, gsum, gx, trans):
        out.fill_(0.25)  # the interpreter copies every argument: count the driver's tensors only

    monkeypatch.setattr(tc, "_launch_bwd", launch)
    with PeakTensorBytes() as final:
        out = tbw._final_impl(*args[:4], None, *args[4:9], (True, True, True, False), args[9],
                              args[10], False)
    with PeakTensorBytes() as generic:
        ref = _generic(*args)
    grads = 2 * n * d * 2  # dq and dk in fp16: the gradients themselves
    o_n = 64 * n * 4  # a generous allowance for [N] fp32 / int64 vectors (stats, sort, coef ...)
    # a chunk's finishing step: the gathered fp16 rows, their fp32 copy, the product, q in fp32
    glue = 4 * 16 * d * 4
    assert final.peak <= grads + ws + glue + o_n, (final.peak, grads, ws)
    assert generic.peak >= grads + 2 * n * d * 4  # fp32 dq and dk: the test can tell them apart
    assert final.peak < generic.peak
    for got, want in zip(out[:3], ref):
        assert_rel(got.float(), want.float(), 1e-3, "the same (stand-in) gradients")


@pytest.mark.skipif(not hasattr(torch.library, "opcheck"), reason="torch < 2.4")
@pytest.mark.parametrize("single_set", [False, True])
def test_final_op_opcheck(single_set):
    """tilecl::triton_tile_bwd_final: schema, fake implementation (output shapes and dtypes for
    every ``needs`` pattern), dispatch."""
    spec, q, k, alpha, aux, stats, col, g_stats, g_col, pos, g_pos = _clip_problem(
        19, 24, torch.float16)
    if single_set:
        k = q
    for needs in ([True, True, True, False], [False, True, False, False], [True, False, True, False]):
        torch.library.opcheck(torch.ops.tilecl.triton_tile_bwd_final.default,
                              (*_ops.prefix_args(spec, q, k, alpha, None, aux), stats, col, g_stats,
                               g_col, needs, pos, g_pos, single_set))


class _StubKernel:
    """Stands in for a Triton kernel: ``kernel[grid](*args, **meta)`` fills its outputs with a
    constant (the interpreter would copy every argument, and take hours at this size)."""

    def __init__(self, name, outputs):
        self.name = name  # the kernel it stands in for (its parameter names)
        self.outputs = outputs  # meta -> names of the output arguments

    def __getitem__(self, grid):
        def launch(*args, **meta):
            named = kernel_args(getattr(_REAL_LSE, self.name), args, meta)
            for name in self.outputs(meta):
                named[name].fill_(0.5)
        return launch


def shape_only_matmul(a, b):
    """Stands in for the gemm backward's library products ([R, M] @ [M, D]): the same output
    tensor, without the flops (tens of seconds on the CPU at N = 65536; the values are the
    stubbed kernels' anyway)."""
    return torch.zeros(a.shape[0], b.shape[1], dtype=a.dtype, device=a.device)


_REAL_LSE = getattr(tc, "_lse", None)  # the kernels (tests replace tc._lse with stubs)


class _StubLse:
    # the forward's row pass writes the stats, its column pass (TRANS) the column LSE
    _lse_fwd_kernel = _StubKernel("_lse_fwd_kernel",
                                  lambda meta: ("col_ptr",) if meta["TRANS"] else ("st_ptr",))
    _lse_bwd_kernel = _StubKernel("_lse_bwd_kernel", lambda meta: ("out_ptr",))
    _lse_h_kernel = _StubKernel("_lse_h_kernel",  # H and its partial sums
                                lambda meta: ("h_ptr", "part_ptr"))


# auto: the gemm backward at this D (SigLIP's forward in its row H pass); fused: the chunked one
@pytest.mark.parametrize("name,bwd", [("clip", "auto"), ("siglip", "auto"), ("nt_xent", "fused")])
def test_extra_memory_at_65536_under_64_mib(monkeypatch, name, bwd):
    """The memory target, on the driver with the kernels stubbed (they allocate nothing):
    symmetric CLIP / SigLIP / NT-Xent, bf16, N = M = 65536, D = 768, forward + backward at the
    default workspace, both backwards: at most 64 MiB beyond the inputs and their gradients."""
    import tilecl

    monkeypatch.delenv("TILECL_TRITON_WORKSPACE_MB", raising=False)
    monkeypatch.setenv("TILECL_TRITON_BWD", bwd)
    assert tbg.applies(TileSpec(), torch.empty(1, 768, dtype=torch.bfloat16)) == (bwd == "auto")
    monkeypatch.setattr(tc, "_lse", _StubLse)
    monkeypatch.setattr(torch, "matmul", shape_only_matmul)
    # call the implementations directly: a dispatch mode sees a custom op's outputs, not the
    # tensors its implementation allocates and frees
    monkeypatch.setattr(_ops, "DIRECT", True)
    n, d = 65536, 768
    rows = n // 2 if name == "nt_xent" else n  # NT-Xent: 2 x 32768 views = 65536 anchors
    q = torch.full((rows, d), 0.03, dtype=torch.bfloat16).requires_grad_()
    k = torch.full((rows, d), 0.03, dtype=torch.bfloat16).requires_grad_()
    call = {
        "clip": lambda: tilecl.clip_loss(q, k, 10.0, backend="triton"),
        "siglip": lambda: tilecl.siglip_loss(q, k, 10.0, -10.0, backend="triton"),
        "nt_xent": lambda: tilecl.nt_xent(q, k, backend="triton"),
    }[name]
    with PeakTensorBytes() as mode:
        call().backward()
    grads = 2 * rows * d * 2
    if name == "nt_xent":  # it concatenates its two views into z [2N, D]: one input-sized copy
        grads += 2 * rows * d * 2
    extra = mode.peak - grads
    print(f"{name} ({bwd}): {extra / 2**20:.1f} MiB beyond inputs and gradients")
    assert q.grad is not None and k.grad is not None
    assert extra <= 64 * 2**20, f"{name}: {extra / 2**20:.1f} MiB beyond inputs and gradients"


def _spy_launches(monkeypatch):
    """Record (kernel, TRANS, FWD_STATS) of every launch of the real kernels; for the H kernel
    of the gemm backward ("h", PART, FWD_STATS)."""
    log = []

    class Spy:
        def __init__(self, name, real):
            self.name, self.real = name, real

        def __getitem__(self, grid):
            def launch(*args, **meta):
                second = meta["PART"] if self.name == "h" else meta.get("TRANS")
                log.append((self.name, second, meta.get("FWD_STATS", False)))
                return self.real[grid](*args, **meta)
            return launch

    class Lse:
        _lse_fwd_kernel = Spy("fwd", tc._lse._lse_fwd_kernel)
        _lse_bwd_kernel = Spy("bwd", tc._lse._lse_bwd_kernel)
        _lse_h_kernel = Spy("h", tc._lse._lse_h_kernel)

    monkeypatch.setattr(tc, "_lse", Lse)
    return log


# the launches of SigLIP's forward + backward: fused into the dq pass (fused backward) or into
# the row H pass (gemm backward), then the dk (column H) pass; and with the fusion turned off
SIGLIP_LAUNCHES = {
    "fused": ([("bwd", False, True), ("bwd", True, False)],
              [("fwd", False, False), ("bwd", False, False), ("bwd", True, False)]),
    "gemm": ([("h", True, True), ("h", False, False)],
             [("fwd", False, False), ("h", True, False), ("h", False, False)]),
}


@pytest.mark.parametrize("bwd", ["fused", "gemm"])
@pytest.mark.parametrize("labels", [False, True])
def test_siglip_forward_runs_the_dq_pass(monkeypatch, labels, bwd):
    """SigLIP on triton: the forward is one sweep that also writes dq (FWD_STATS: the dq pass,
    or under the gemm backward the row H pass and its GEMM), the backward only the dk pass; loss
    and every gradient as with the fused path off and as the float64 reference."""
    import tilecl

    monkeypatch.setenv("TILECL_TRITON_BWD", bwd)
    gen = torch.Generator().manual_seed(5)
    n, m, d = 21, 26, 24
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1)
    t = torch.nn.functional.normalize(torch.randn(m, d, generator=gen), dim=1)
    lab = torch.randint(0, 4, (n,), generator=gen) if labels else None
    tlab = torch.randint(0, 4, (m,), generator=gen) if labels else None
    if not labels:
        t = t[:n]

    def run(backend, dtype=torch.float64):
        leaves = [v.detach().to(dtype).requires_grad_() for v in (x, t)]
        ls = [torch.tensor(v, dtype=dtype, requires_grad=True) for v in (8.0, -3.0)]
        loss = tilecl.siglip_loss(*leaves, *ls, labels=lab, text_labels=tlab, reduction="none",
                                  backend=backend)
        (loss * torch.linspace(0.5, 1.5, loss.shape[0], dtype=dtype)).sum().backward()
        return [loss] + [v.grad for v in leaves + ls]

    ref = run("reference")
    log = _spy_launches(monkeypatch)
    fused = run("triton", torch.float32)
    want_fused, want_plain = SIGLIP_LAUNCHES[bwd]
    assert log == want_fused, log
    monkeypatch.setenv("TILECL_TRITON_SIGLIP_FUSED", "0")
    log.clear()
    plain = run("triton", torch.float32)
    assert log == want_plain, log
    for i, (a, b, r) in enumerate(zip(fused, plain, ref)):
        assert_rel(a, r, 1e-5, f"output {i} (fused) vs reference")
        assert_rel(a, b, 1e-5, f"output {i}: fused vs not")


def test_siglip_softplus_sums_once_per_tile(monkeypatch):
    """The fused dq pass over three D chunks (D = 150, BD = 64 under the interpreter): the loss
    statistic is computed by the first chunk's programs only, once per [BM, BN] tile, and every
    output (softplus sums, dq(g = 1) / N, <q_i, dq_i>, sum_j G_ij) equals its float64 value."""
    monkeypatch.setenv("TILECL_TRITON_BWD", "fused")
    gen = torch.Generator().manual_seed(8)
    n, m, d = 37, 45, 150
    q, k = (torch.nn.functional.normalize(torch.randn(r, d, generator=gen), dim=1) for r in (n, m))
    lq, lk = torch.randint(0, 4, (n,), generator=gen), torch.randint(0, 4, (m,), generator=gen)
    spec = TileSpec(positive="label", sigmoid=True)
    calls = []

    class Count:  # the interpreter calls the jit helper through the module's global
        def __init__(self, real):
            self.real = real

        def __call__(self, *args):
            calls.append(1)
            return self.real(*args)

    import importlib

    kernels = importlib.import_module("tilecl.tritonops.backward")  # the dq pass's module
    monkeypatch.setattr(kernels, "_softplus_sum", Count(kernels._softplus_sum))
    a, b = 7.0, -2.0
    stats, u, qdot, gsum = tbw._forward_dq_impl(spec, q, k, torch.tensor(a), torch.tensor(b),
                                                TileAux(labels_q=lq, labels_k=lk))
    cfg = tc._configs.INTERPRET_BWD
    assert -(-d // cfg["BD"]) == 3
    assert len(calls) == -(-n // cfg["BM"]) * -(-m // cfg["BN"]), len(calls)
    x = a * q.double() @ k.double().T + b
    y = (lq[:, None] == lk[None, :]).double()
    g = torch.sigmoid(x) - y
    dq1 = a * g @ k.double()
    assert_rel(stats[0], (torch.nn.functional.softplus(x) - y * x).sum(1), 1e-5, "softplus sums")
    assert_rel(u, dq1 / n, 1e-5, "u")
    assert_rel(qdot, (q.double() * dq1).sum(1), 1e-5, "<q, dq>")
    assert_rel(gsum, g.sum(1), 1e-5, "sum_j G")


def test_siglip_fused_without_gradients_and_twice(monkeypatch):
    """No gradient wanted: the plain forward. retain_graph: the fused path consumed its buffer,
    a second backward says so and how to avoid it; with TILECL_TRITON_SIGLIP_FUSED=0 it works."""
    import tilecl

    log = _spy_launches(monkeypatch)
    x = torch.nn.functional.normalize(torch.randn(9, 16), dim=1)
    with torch.no_grad():
        tilecl.siglip_loss(x, x.flip(0), 10.0, -10.0, backend="triton")
    assert log == [("fwd", False, False)]
    xr = x.clone().requires_grad_()
    loss = tilecl.siglip_loss(xr, x.flip(0), 10.0, -10.0, backend="triton")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="TILECL_TRITON_SIGLIP_FUSED=0"):
        loss.backward()
    monkeypatch.setenv("TILECL_TRITON_SIGLIP_FUSED", "0")
    xr.grad = None
    loss = tilecl.siglip_loss(xr, x.flip(0), 10.0, -10.0, backend="triton")
    loss.backward(retain_graph=True)
    first = xr.grad.clone()
    loss.backward()
    assert_rel(xr.grad, 2 * first, 1e-6, "second backward")


# ---------------------------------------------------------------------------------------------
# TILECL_TRITON_BWD=gemm: H = a G in L2-sized groups, multiplied by library GEMMs

GEMM_CASES = ["info_nce_perm", "info_nce_smooth_per_anchor", "info_nce_false_negative_margin",
              "clip", "siglip", "nt_xent", "supcon_out", "cclk_weaklysup_lowrank"]


@pytest.mark.parametrize("name", GEMM_CASES)
def test_gemm_backward_fp32_matches_reference(tiny_workspace, monkeypatch, name):
    """Groups of 6 rows / columns of H (7 ragged groups), every gradient vs float64."""
    monkeypatch.setenv("TILECL_TRITON_BWD", "gemm")
    _check_fp32(_case(name), "mean")


def _case(name):
    return next(c for c in CASES if c.name == name)


@pytest.mark.parametrize("name", ["clip", "siglip", "nt_xent", "supcon_out"])
def test_gemm_backward_bf16_no_worse_than_pytorch(tiny_workspace, monkeypatch, name):
    monkeypatch.setenv("TILECL_TRITON_BWD", "gemm")
    _check_low(name, torch.bfloat16)


@pytest.mark.parametrize("d,dtype,precision,want", [
    pytest.param(768, torch.bfloat16, "ieee", "gemm", id="bf16-D768"),
    pytest.param(512, torch.bfloat16, "ieee", "gemm", id="bf16-D512"),
    pytest.param(385, torch.bfloat16, "ieee", "gemm", id="bf16-D385"),
    pytest.param(384, torch.bfloat16, "ieee", "fused", id="bf16-D384"),
    pytest.param(256, torch.bfloat16, "ieee", "fused", id="bf16-D256"),
    pytest.param(64, torch.bfloat16, "ieee", "fused", id="bf16-D64"),
    pytest.param(768, torch.float16, "ieee", "fused", id="fp16-D768"),
    pytest.param(257, torch.float32, "ieee", "gemm", id="fp32-D257"),
    pytest.param(256, torch.float32, "ieee", "fused", id="fp32-D256"),
    pytest.param(384, torch.float32, "tf32", "fused", id="tf32-D384"),
    pytest.param(768, torch.float32, "tf32", "gemm", id="tf32-D768"),
])
def test_auto_backward_rule(monkeypatch, d, dtype, precision, want):
    """The automatic backward: gemm where D (ceil(D / 256) - 1) > h R / B (the logits
    recomputed per extra D chunk cost more than H's round trip through memory), and the
    environment override; distance logits and fp16 always fused."""
    assert tbg.auto_mode(d, dtype, precision) == want
    monkeypatch.setenv("TILECL_TRITON_PRECISION", precision)
    q = torch.empty(3, d, dtype=dtype)
    dot, dist = TileSpec(), TileSpec(logit="dist")
    monkeypatch.delenv("TILECL_TRITON_BWD", raising=False)
    assert tbg.bwd_mode() == "auto" and tbg.applies(dot, q) == (want == "gemm")
    for env in ("fused", "gemm"):
        monkeypatch.setenv("TILECL_TRITON_BWD", env)
        assert tbg.applies(dot, q) == (env == "gemm" and dtype != torch.float16)
        assert not tbg.applies(dist, q)
    # the work per pair of one pass at D = 768, bf16: 8 D vs 4 D flops and H's 4 bytes
    assert tbg.pass_work("fused", 768, 2) == (8 * 768, 0)
    assert tbg.pass_work("gemm", 768, 2) == (4 * 768, 4)


def test_gemm_backward_launches_and_fallbacks(monkeypatch):
    """gemm: the H kernel, no backward kernel; fp16 inputs and distance logits keep "fused"."""
    import tilecl

    monkeypatch.setenv("TILECL_TRITON_BWD", "gemm")
    log = _spy_launches(monkeypatch)
    x = torch.nn.functional.normalize(torch.randn(12, 8), dim=1)
    for dtype, want_h in ((torch.float32, True), (torch.float16, False)):
        log.clear()
        a, b = (t.to(dtype).clone().requires_grad_() for t in (x, x.flip(0)))
        tilecl.clip_loss(a, b, 10.0, backend="triton").backward()
        h = [e for e in log if e[0] == "h"]
        bwd = [e for e in log if e[0] == "bwd"]
        assert (h == [("h", True, False), ("h", False, False)]) == want_h, (dtype, log)
        assert (not bwd) == want_h, (dtype, log)
    log.clear()
    z = x.clone().requires_grad_()
    tilecl.kernel_info_nce(z, x.flip(0), temperature=0.5, backend="triton").backward()
    assert not [e for e in log if e[0] == "h"] and any(e[0] == "bwd" for e in log)
    monkeypatch.setenv("TILECL_TRITON_BWD", "sideways")
    with pytest.raises(ValueError, match="TILECL_TRITON_BWD"):
        tbg.bwd_mode()


def test_gemm_backward_memory_bounded_by_workspace(monkeypatch):
    """gemm mode, fp32 CLIP N = M = 2048, D = 64, workspace 1 MiB (H groups of 128 rows /
    columns), the H kernel stubbed: beyond the gradients, one H group, its partial sums
    [2, 128, M / 16] and O(N) vectors (the generic fp32 path: dq and dk, 1 MiB, plus temporaries)."""
    n, d = 2048, 64
    monkeypatch.setenv("TILECL_TRITON_BWD", "gemm")
    monkeypatch.setenv("TILECL_TRITON_WORKSPACE_MB", "1")

    class Lse:
        _lse_h_kernel = _StubKernel("_lse_h_kernel", lambda meta: ("h_ptr",))

    args = _clip_problem(n, d, torch.float32, forward=_torch_tiled.forward)  # (fast here)
    monkeypatch.setattr(tc, "_lse", Lse)
    with PeakTensorBytes() as mode:
        dq, dk, _, _ = tbw._final_impl(*args[:4], None, *args[4:9], (True, True, True, False),
                                       args[9], args[10], False)
    grads = 2 * n * d * 4
    group = 2**20  # one H group: 128 x 2048 fp32
    parts = 2 * 128 * (n // 16) * 4
    o_n = 64 * n * 4
    assert mode.peak <= grads + group + parts + 128 * d * 4 + o_n, mode.peak - grads
    # H = 0.5 everywhere: dq = 0.5 * column sums of k, dk = 0.5 * column sums of q
    q, k = args[1], args[2]
    assert_rel(dq, 0.5 * k.sum(0).expand(n, d), 1e-5, "dq = H k")
    assert_rel(dk, 0.5 * q.sum(0).expand(n, d), 1e-5, "dk = H^T q")
