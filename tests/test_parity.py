"""Every CPU tile backend against the dense reference: the loss and every gradient (embeddings,
temperature / logit scale, SigLIP bias), on odd shapes that the test tiles (16 x 24) do not
divide, with reduction "mean" and "none" (backprop of a random upstream gradient).

fp32: relative error <= 1e-5 against the float64 reference on the same inputs.
fp16 / bf16: error no worse than 2x PyTorch's own (the reference run in that dtype) against the
float64 reference, plus a quarter of the dtype's epsilon as a floor.
"""

import pytest
import torch

from cases import CASES, run
from conftest import assert_rel, cpu_backends, rel_err

SHAPES = [(1, 3), (7, 64), (63, 100), (65, 5), (130, 17)]
LOW = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def _params():
    for backend in cpu_backends():
        for case in CASES:
            if case.backends and backend not in case.backends:
                continue
            for n, d in SHAPES:
                if n < case.min_n:
                    continue
                for red in (["mean", "none"] if case.rows else ["mean"]):
                    yield pytest.param(backend, case, n, d, red, id=f"{backend}-{case.name}-N{n}-D{d}-{red}")


@pytest.mark.parametrize("backend,case,n,d,reduction", list(_params()))
def test_fp32_matches_reference(backend, case, n, d, reduction):
    diff, const = case.make(n, d, torch.float32)
    ref_loss, ref_grads = run(case, "reference", reduction, [x.double() for x in diff],
                              {k: _as(v, torch.float64) for k, v in const.items()})
    loss, grads = run(case, backend, reduction, diff, const)
    assert loss.dtype == torch.float32
    # a loss is an O(1) quantity: its error is measured against max(|loss|, 1), so that a loss
    # that cancels to ~1e-6 (Kernel-InfoNCE with one pair) is held to fp32's absolute precision
    assert_rel(loss, ref_loss, 1e-5 * max(1.0, 1.0 / max(abs(ref_loss).max().item(), 1e-30)),
               f"{case.name} loss")
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert g.dtype == diff[i].dtype
        assert_rel(g, r, 1e-5, f"{case.name} grad of input {i}")


def _as(v, dtype):
    """A case's constant (tensor, tuple of tensors or other) with float tensors cast to dtype."""
    if isinstance(v, torch.Tensor) and v.is_floating_point():
        return v.to(dtype)
    if isinstance(v, tuple):
        return tuple(_as(x, dtype) for x in v)
    return v


def _low_params():
    for backend in cpu_backends():
        for case in CASES:
            if case.backends and backend not in case.backends:
                continue
            for dtype in LOW:
                for n, d in [(7, 64), (65, 33)]:
                    yield pytest.param(backend, case, dtype, n, d,
                                       id=f"{backend}-{case.name}-{str(dtype)[6:]}-N{n}-D{d}")


@pytest.mark.parametrize("backend,case,dtype,n,d", list(_low_params()))
def test_low_precision_no_worse_than_pytorch(backend, case, dtype, n, d):
    diff, const = case.make(n, d, dtype)
    truth = run(case, "reference", "mean", [x.double() for x in diff],
                {k: _as(v, torch.float64) for k, v in const.items()})
    try:
        own = run(case, "reference", "mean", diff, const)
    except RuntimeError:  # cdist / pdist have no CPU kernel in this dtype, or a scalar overflows:
        # PyTorch's own answer is then its fp32 computation on the rounded inputs
        own = run(case, "reference", "mean", [x.float() for x in diff],
                  {k: _as(v, torch.float32) for k, v in const.items()})
        own = (own[0], [g.to(x.dtype) for g, x in zip(own[1], diff)])
    ours = run(case, backend, "mean", diff, const)
    floor = LOW[dtype] / 4
    for what, a, o, t in [("loss", ours[0], own[0], truth[0])] + [
            (f"grad {i}", a, o, t) for i, (a, o, t) in enumerate(zip(ours[1], own[1], truth[1]))]:
        assert torch.isfinite(a).all(), f"{case.name} {what}: not finite"
        mine, theirs = rel_err(a, t), rel_err(o, t)
        assert mine <= 2 * theirs + floor, (
            f"{case.name} {what}: error {mine:.2e} vs PyTorch's own {theirs:.2e} in {dtype}")
