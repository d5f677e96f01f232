"""Edge cases of the loss family on every CPU tile backend, against the reference."""

import math

import pytest
import torch
import torch.nn.functional as F

import tilecl

from conftest import assert_rel, cpu_backends

BACKENDS = cpu_backends()


def unit(*shape):
    return F.normalize(torch.randn(*shape, dtype=torch.float64), dim=-1).requires_grad_()


def both(fn, *xs):
    """(loss, grads) for the reference and for each backend, on copies of xs."""
    out = {}
    for b in ["reference"] + BACKENDS:
        leaves = [x.detach().clone().requires_grad_() for x in xs]
        loss = fn(b, *leaves)
        out[b] = (loss, torch.autograd.grad(loss.sum(), leaves))
    return out


def check(out, tol=1e-10):
    ref_loss, ref_grads = out["reference"]
    for b in BACKENDS:
        loss, grads = out[b]
        assert_rel(loss, ref_loss, tol, f"{b} loss")
        for i, (g, r) in enumerate(zip(grads, ref_grads)):
            assert_rel(g, r, tol, f"{b} grad {i}")


def test_single_row_clip():
    check(both(lambda b, i, t: tilecl.clip_loss(i, t, 20.0, backend=b), unit(1, 8), unit(1, 8)))
    # one pair: both softmaxes are over one entry, the loss is exactly 0
    loss = tilecl.clip_loss(unit(1, 8), unit(1, 8), 20.0, backend="torch")
    assert loss.item() == pytest.approx(0, abs=1e-12)


def test_single_pair_nt_xent():
    out = both(lambda b, a, c: tilecl.nt_xent(a, c, backend=b), unit(1, 5), unit(1, 5))
    check(out)
    assert out["torch"][0].item() == pytest.approx(0.0, abs=1e-12)


def test_extra_keys_m_greater_than_n():
    q, k = unit(9, 6), unit(40, 6)
    check(both(lambda b, q, k: tilecl.info_nce(q, k, temperature=0.05, backend=b), q, k))


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_logit_scale_100_unit_vectors_no_overflow(loss):
    # logits span [-100, 100]: a fixed shift would underflow whole columns (math.md 2.1)
    i, t = unit(70, 4), unit(70, 4)
    if loss == "clip":
        fn = lambda b, i, t: tilecl.clip_loss(i, t, 100.0, backend=b)  # noqa: E731
    else:
        fn = lambda b, i, t: tilecl.siglip_loss(i, t, 100.0, -10.0, backend=b)  # noqa: E731
    out = both(fn, i, t)
    check(out, 1e-9)
    for b in BACKENDS:
        assert torch.isfinite(out[b][0]) and all(torch.isfinite(g).all() for g in out[b][1])


def test_clip_scale_100_fp32_matches_float64():
    i, t = unit(130, 16), unit(130, 16)
    ref = tilecl.clip_loss(i, t, 100.0, backend="reference")
    for b in BACKENDS:
        got = tilecl.clip_loss(i.float(), t.float(), 100.0, backend=b)
        assert_rel(got, ref, 1e-5, b)


def test_supcon_anchors_without_positives_contribute_zero_and_count():
    # labels 0..B-1 with one view: no anchor has a positive -> loss 0, gradient 0
    f = unit(12, 1, 6)
    out = both(lambda b, f: tilecl.supcon(f, torch.arange(12), backend=b), f)
    check(out)
    assert out["torch"][0].item() == 0.0
    assert out["torch"][1][0].abs().max().item() == 0.0
    # half the anchors without positives: they count in the mean (HobbitLong HEAD)
    lab = torch.tensor([0, 0, 1, 2, 3, 4])
    f = unit(6, 1, 6)
    rows = tilecl.supcon(f, lab, reduction="none", backend="torch")
    assert (rows[2:] == 0).all() and (rows[:2] > 0).all()
    assert tilecl.supcon(f, lab, backend="torch").item() == pytest.approx(rows.sum().item() / 6)
    check(both(lambda b, f: tilecl.supcon(f, lab, variant="in", backend=b), f))


def test_all_masked_rows_dcl_two_samples():
    # B = 2: each anchor has exactly 2 negatives; with identical pairs the loss is finite
    z = unit(2, 4)
    check(both(lambda b, a, c: tilecl.dcl_loss(a, c, backend=b), z, z + 0.01))


def test_all_weights_clipped_cclk_weaklysup_row():
    # a zero weight row: Pn is clamped to 1e-7 and its gradient is dropped (math.md 9.7)
    b = 6
    w = torch.rand(b, b, dtype=torch.float64)
    w.fill_diagonal_(0)
    w[:, 0] = 0  # anchor 0 gets w_j0 = 0 for every j
    check(both(lambda bk, z1, z2: tilecl.cclk_loss(z1, z2, w, w, mode="weaklysup", backend=bk),
               unit(b, 5), unit(b, 5)))


def test_hcl_floor_binding():
    # tiny temperature makes the floor N_n e^(-1/T) negligible; huge tau_plus makes it bind
    z1, z2 = unit(5, 4), unit(5, 4)
    check(both(lambda b, a, c: tilecl.hcl_loss(a, c, tau_plus=0.9, backend=b), z1, z2))
    check(both(lambda b, a, c: tilecl.debiased_loss(a, c, tau_plus=0.0, backend=b), z1, z2))


def test_uniformity_two_points_exact():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0]], dtype=torch.float64)
    for b in ["reference"] + BACKENDS:
        assert tilecl.uniformity_loss(x, t=0.1, backend=b).item() == pytest.approx(-2.5)
    assert math.isfinite(tilecl.uniformity_loss(unit(3, 2), backend="torch").item())


def test_clip_column_far_below_the_tile_max_takes_the_exact_path():
    # every image is e1; text 1 is -e1: its column sits 200 below the tile's row maxima, so the
    # shared-exponential column sum underflows and the exact column LSE must be used
    d = 4
    img = torch.zeros(6, d, dtype=torch.float64)
    img[:, 0] = 1.0
    txt = F.normalize(torch.randn(6, d, dtype=torch.float64), dim=1)
    txt[1] = -img[0]
    txt[0] = img[0]
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        i, t = img.to(dtype), txt.to(dtype)
        check_pair = both(lambda b, i, t: tilecl.clip_loss(i, t, 100.0, backend=b), i, t)
        if dtype == torch.float64:
            check(check_pair, tol)
        else:
            ref = tilecl.clip_loss(img, txt, 100.0, backend="reference")
            for b in BACKENDS:
                assert_rel(check_pair[b][0], ref, tol, b)


def test_locked_tower_gets_no_gradient_and_saves_the_matmul():
    # LiT: the text tower is frozen; its gradient is never formed (one matmul per tile less)
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountMM(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.mm = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.mm += func.__name__.startswith("mm")
            return func(*args, **(kwargs or {}))

    img, txt = unit(70, 8), unit(70, 8).detach()
    ref = tilecl.clip_loss(img, txt, 14.0, backend="reference")
    (g_ref,) = torch.autograd.grad(ref, [img])
    counts = {}
    for locked in (True, False):
        t = txt if locked else txt.clone().requires_grad_()
        loss = tilecl.clip_loss(img, t, 14.0, backend="torch")
        with CountMM() as mode:
            grads = torch.autograd.grad(loss, [img] + ([] if locked else [t]))
        counts[locked] = mode.mm
        assert_rel(grads[0], g_ref, 1e-10, "image grad")
    tiles = math.ceil(70 / 16) * math.ceil(70 / 24)
    assert counts[False] - counts[True] == tiles  # no dk matmul for the frozen side


def _triton_here():
    """["triton"] when the triton backend runs in this session (the interpreter on a CPU-only
    machine, set up by conftest), else []: these loss-level checks are cheap at tiny shapes."""
    from tilecl._backends import unavailable_reason

    if torch.cuda.is_available() or unavailable_reason("triton", torch.device("cpu")) is not None:
        return []
    return ["triton"]


ALL_BACKENDS = BACKENDS + [b for b in _triton_here() if b not in BACKENDS]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("dup", ["pair", "all"])
@pytest.mark.parametrize("gamma", [1.0, 1.5])
def test_kernel_info_nce_duplicate_rows(gamma, dup, dtype):
    # duplicates: the Gram expansion leaves d2 at rounding noise (or 0), where D^(gamma - 2)
    # exploded (gradients of 1e6..1e7); a duplicate is at distance 0 with the subgradient 0
    z = F.normalize(torch.randn(8, 16, dtype=torch.float64), dim=1)
    if dup == "pair":
        z[1] = z[0]
    else:
        z[:] = z[0]
    z = z.to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    leaves = [z[:4].double().requires_grad_(), z[4:].double().requires_grad_()]
    ref = tilecl.kernel_info_nce(*leaves, gamma=gamma, backend="reference")
    ref_grads = torch.autograd.grad(ref, leaves)
    for b in ALL_BACKENDS:
        leaves = [z[:4].clone().requires_grad_(), z[4:].clone().requires_grad_()]
        loss = tilecl.kernel_info_nce(*leaves, gamma=gamma, backend=b)
        grads = torch.autograd.grad(loss, leaves)
        assert_rel(loss, ref, tol, f"{b} loss")
        for i, (g, r) in enumerate(zip(grads, ref_grads)):
            assert_rel(g, r, tol, f"{b} grad {i}")  # all identical: exactly 0 (scale 0: absolute)


def _with_nan(x, at):
    x = x.clone().contiguous()
    x.view(-1)[at] = float("nan")
    return x


def test_nan_in_any_input_gives_nan_loss():
    # NaN in, NaN out (as dense PyTorch): one NaN element of the first and of the second
    # embedding input of every loss, and of each float side input (CCL-K weights / conditions,
    # the uniformity prior; off the diagonal, which CCL-K's W never uses), on every backend:
    # max guards, masks, weight tests and clamps must keep it
    from cases import CASES

    bad, checked = [], set()
    for case in CASES:
        diff, const = case.make(max(case.min_n, 5), 4, torch.float32)
        trials = [(f"input {i}", diff[:i] + (_with_nan(x, x.numel() // 2 + 1),) + diff[i + 1:],
                   const) for i, x in enumerate(diff[:2]) if x.dim() >= 2]
        for key, v in const.items():
            first = v[0] if isinstance(v, tuple) else v
            if isinstance(first, torch.Tensor) and first.is_floating_point():
                nan = _with_nan(first, 1)
                trials.append((key, diff, {**const, key: (nan, *v[1:]) if isinstance(v, tuple)
                                           else nan}))
        for what, args, kw in trials:
            for b in ALL_BACKENDS:
                loss = case.call(b, "mean", *args, **kw)
                checked.add((case.name, b))
                if not torch.isnan(loss).all():
                    bad.append(f"{case.name} {what} {b}: {loss.tolist()}")
    assert len(checked) == len(CASES) * len(ALL_BACKENDS), "a loss was left unchecked"
    assert not bad, "finite loss from a NaN input:\n" + "\n".join(bad)


@pytest.mark.parametrize("name,col_pass", [
    ("clip_spread_rows", "atomic"), ("clip_spread_rows", "two"), ("clip_spread_cols", "atomic"),
    ("clip_spread_cols", "two"), ("kernel_info_nce_g15", "atomic"), ("kernel_info_nce_g3", "atomic")])
def test_triton_extreme_spread_and_gamma_against_float64(monkeypatch, name, col_pass):
    # the loss-level sweeps leave triton out unless asked (slow interpreter): these cases (row
    # maxima ~195 apart within and across tiles; the distance factor at gamma 1.5, 3) run here,
    # the column LSE by both of its passes (atomic sums against a bound; the running-max pass)
    from cases import BY_NAME, run

    if "triton" not in ALL_BACKENDS:
        pytest.skip("the triton backend does not run here")
    monkeypatch.setenv("TILECL_TRITON_COL_PASS", col_pass)
    case = BY_NAME[name]
    diff, const = case.make(70 if "spread" in name else 20, 5, torch.float32)
    ref_loss, ref_grads = run(case, "reference", "mean", [x.double() for x in diff], const)
    loss, grads = run(case, "triton", "mean", diff, const)
    assert_rel(loss, ref_loss, 1e-5, f"{name} loss")
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert_rel(g, r, 1e-5, f"{name} grad of input {i}")
