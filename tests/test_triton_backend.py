"""Parity of the ``triton`` tile backend with ``_torch_tiled`` for every flag set the losses use.

How to run (CPU, no GPU needed; about 1-2 minutes on 2 cores):

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
"""

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

from tilecl import _torch_tiled  # noqa: E402
from tilecl._autograd import tile_stats  # noqa: E402
from tilecl._spec import SumSpec, TileAux, TileSpec  # noqa: E402

tb = pytest.importorskip("tilecl._triton_backend")


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
    """(spec, q, k, alpha, bias, aux) of one loss family member, inputs on DEV."""
    gen = torch.Generator().manual_seed(seed)
    m = n
    alpha = torch.tensor(1 / 0.07)
    bias = None
    single = kind in ("ntxent", "supcon_out", "supcon_in", "hcl", "kernel_g2", "kernel_g1")
    ar = torch.arange(n)
    aux = TileAux()
    if kind == "infonce":  # one direction, M > N candidates (MoCo-like queue)
        m = 2 * n + 3
        spec = TileSpec(positive="index", sums=(SumSpec(),))
        aux = TileAux(pos=torch.randint(0, m, (n,), generator=gen))
    elif kind == "clip_sym":
        spec = TileSpec(positive="index", sums=(SumSpec(),), col_lse=True)
        aux = TileAux(pos=ar)
    elif kind == "ntxent":
        spec = TileSpec(positive="index", sums=(SumSpec(),))
        aux = TileAux(excl=ar, pos=(ar + n // 2) % n)
    elif kind in ("supcon_out", "supcon_in"):
        labels = torch.randint(0, 4, (n,), generator=gen)
        sums = (SumSpec(),) if kind == "supcon_out" else (SumSpec("pos"), SumSpec("all"))
        spec = TileSpec(positive="label", sums=sums, lin=kind == "supcon_out")
        aux = TileAux(excl=ar, labels_q=labels, labels_k=labels)
    elif kind == "hcl":
        b = 0.5
        spec = TileSpec(positive="index", sums=(SumSpec("neg", 1 + b), SumSpec("neg", b)))
        aux = TileAux(excl=ar, pos=(ar + n // 2) % n)
    elif kind == "cclk_dense":  # weights [N, M/2] read at column j mod M/2, clipped below 1e-6
        m = 2 * n
        w = torch.rand(n, n, generator=gen)
        w = torch.where(w < 0.2, torch.full_like(w, 1e-7), w)
        spec = TileSpec(positive="index", sums=(SumSpec(weighted=True), SumSpec()),
                        weight="dense", weight_clip=1e-6)
        aux = TileAux(pos=ar, weight=w)
    elif kind == "lowrank":
        m = n + 5
        spec = TileSpec(positive="index", sums=(SumSpec("neg", weighted=True),),
                        weight="lowrank", weight_clip=0.05)
        aux = TileAux(pos=ar, wa=torch.rand(n, 3, generator=gen), wb=torch.rand(m, 3, generator=gen))
    elif kind in ("kernel_g2", "kernel_g1"):
        spec = TileSpec(logit="dist", gamma=2.0 if kind == "kernel_g2" else 1.0,
                        positive="index", sums=(SumSpec(),))
        aux = TileAux(excl=ar, pos=(ar + n // 2) % n)
        alpha = torch.tensor(2.0)
    elif kind == "siglip":
        labels = torch.randint(0, 5, (n,), generator=gen)
        spec = TileSpec(positive="label", sigmoid=True)
        aux = TileAux(labels_q=labels, labels_k=labels)
        alpha, bias = torch.tensor(10.0), torch.tensor(-10.0)
    elif kind == "row_alpha":  # per-row scale with label positives and the L_out statistics
        labels = torch.randint(0, 3, (n,), generator=gen)
        m = n + 7
        spec = TileSpec(positive="label", sums=(SumSpec(),), lin=True)
        aux = TileAux(labels_q=labels, labels_k=torch.randint(0, 3, (m,), generator=gen))
        alpha = 5.0 + 10.0 * torch.rand(n, generator=gen)
        bias = torch.tensor(0.3)  # shifts every logit; no bias gradient outside SigLIP
    elif kind == "col_offset":  # a visiting column block: global columns 7 .. 7 + M
        m, off = n + 9, 7
        spec = TileSpec(positive="index", sums=(SumSpec(weighted=True),), weight="dense")
        aux = TileAux(excl=ar + off, pos=(ar * 3) % (m + off), col_offset=off,
                      weight=torch.rand(n, m + off, generator=gen) + 0.1)
    else:
        raise KeyError(kind)
    q = _unit(n, d, gen, dtype)
    k = q if single else _unit(m, d, gen, dtype)
    aux = TileAux(**{f: (v.to(DEV) if isinstance(v, torch.Tensor) else v)
                     for f, v in vars(aux).items()})
    bias = bias.to(DEV) if bias is not None else None
    return spec, q, k, alpha.to(DEV), bias, aux


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
    "clip_sym": [(17, 64), (130, 100)],
    "ntxent": [(63, 100)],
    "supcon_out": [(65, 64)],
    "supcon_in": [(1, 64), (63, 3)],
    "hcl": [(65, 100)],
    "cclk_dense": [(17, 100)],
    "lowrank": [(63, 64)],
    "kernel_g2": [(65, 100)],
    "kernel_g1": [(63, 3)],
    "siglip": [(17, 3), (130, 64)],
    "row_alpha": [(65, 100)],
    "col_offset": [(63, 100)],
}
FP16 = {"infonce": (63, 64), "clip_sym": (65, 100), "supcon_in": (17, 100),
        "cclk_dense": (63, 64), "kernel_g1": (65, 64), "siglip": (65, 100)}

CASES = [pytest.param(kind, n, d, torch.float32, id=f"{kind}-N{n}-D{d}-fp32")
         for kind, shapes in SHAPES.items() for n, d in shapes]
CASES += [pytest.param(kind, n, d, torch.float16, id=f"{kind}-N{n}-D{d}-fp16")
          for kind, (n, d) in FP16.items()]
# bf16 under the interpreter runs the UPCAST path (fp32 dots); the bf16 tensor-core path is GPU-only
CASES += [pytest.param(kind, n, d, torch.bfloat16, id=f"{kind}-N{n}-D{d}-bf16",
                       marks=() if INTERPRET else pytest.mark.gpu)
          for kind, n, d in (("clip_sym", 65, 100), ("hcl", 17, 64))]


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
    spec, q, k, alpha, bias, aux = make_case("clip_sym", 17, 64, torch.float32)
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
    assert tb.unavailable(DEV) is None
    if INTERPRET:
        assert tb.unavailable(torch.device("meta")) is not None


@pytest.mark.skipif(not hasattr(torch.library, "opcheck"), reason="torch < 2.4")
def test_custom_ops_opcheck():
    """The kernels' torch.library ops: schema, fake (meta) implementations, dispatch."""
    spec, q, k, alpha, bias, aux = make_case("clip_sym", 17, 64, torch.float32)
    torch.library.opcheck(torch.ops.tilecl.triton_tile_fwd.default,
                          (q, k, alpha, bias, *tb._aux_args(aux), tb.spec_to_str(spec)))
    stats, col = tb.forward(spec, q, k, alpha, bias, aux)
    g, gc = torch.randn_like(stats), torch.randn_like(col)
    torch.library.opcheck(torch.ops.tilecl.triton_tile_bwd.default,
                          (q, k, alpha, bias, *tb._aux_args(aux), stats, col, g, gc,
                           tb.spec_to_str(spec), [True, True, True, True]))


def test_spec_string_roundtrip():
    for kind in SHAPES:
        spec = make_case(kind, 2, 3, torch.float32)[0]
        assert tb.spec_from_str(tb.spec_to_str(spec)) == spec


@pytest.mark.skipif(not hasattr(torch.library, "custom_op"), reason="torch < 2.4")
def test_torch_compile_fullgraph():
    """torch.compile traces tile_stats on the triton backend without graph breaks."""
    from tilecl import _backends

    _backends.get("triton")  # load the module outside the traced region
    spec, q, k, alpha, bias, aux = make_case("clip_sym", 17, 64, torch.float32)

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


gpu = pytest.mark.skipif(not _CUDA or INTERPRET, reason="needs CUDA (and no TRITON_INTERPRET)")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("kind", ["clip_sym", "supcon_in", "hcl", "kernel_g2", "siglip"])
def test_gpu_bf16_large(kind):
    """bf16 at N = 2048, D = 768 (several D chunks, autotuned configs) against fp32 torch on the
    same bf16-rounded inputs."""
    check_case(kind, 2048, 768, torch.bfloat16)


@pytest.mark.gpu
@gpu
def test_gpu_tf32(monkeypatch):
    monkeypatch.setenv("TILECL_TRITON_PRECISION", "tf32")
    spec, q, k, alpha, bias, aux = make_case("clip_sym", 1024, 256, torch.float32)
    stats, col = tb.forward(spec, q, k, alpha, bias, aux)
    rstats, rcol = _torch_tiled.forward(spec, q, k, alpha, bias, aux)
    assert_close("stats", stats, rstats, 1e-3)
    assert_close("col", col, rcol, 1e-3)


@pytest.mark.parametrize("name", ["clip", "nt_xent", "siglip", "supcon"])
def test_torch_compile_traces_public_loss_without_graph_breaks(name):
    """Issue 3 item 6: a public loss on the triton backend compiles with fullgraph=True (custom
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
