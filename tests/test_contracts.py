"""Contracts a user relies on beyond the value of one loss: mixed dtypes under torch.autocast,
the Qwen3-Embedding false-negative mask on the query-query terms, and SupCon's one-view L_in
convention against google-research's."""

import pytest
import torch
import torch.nn.functional as F

import tilecl

from conftest import assert_rel, cpu_backends

BACKENDS = ["reference"] + cpu_backends()


# ---- mixed dtypes under torch.autocast -----------------------------------------------------------

def _unit(n, d, dtype):
    return F.normalize(torch.randn(n, d, dtype=torch.float64), dim=1).to(dtype)


MIXED = {  # (bf16 features, fp32 features) -> loss: image features against cached text features
    "clip": lambda b, x, y: tilecl.clip_loss(x, y, torch.tensor(14.0), backend=b),
    "siglip": lambda b, x, y: tilecl.siglip_loss(x, y, 10.0, -4.0, backend=b),
    "nt_xent": lambda b, x, y: tilecl.nt_xent(x, y, temperature=0.3, backend=b),
}


@pytest.mark.parametrize("name", sorted(MIXED))
@pytest.mark.parametrize("backend,backward_inside", [
    pytest.param(b, inside, id=f"{b}-bwd-{'inside' if inside else 'outside'}")
    for b in BACKENDS for inside in (False, True) if not (inside and b == "reference")])
def test_autocast_mixed_dtypes_use_the_wider_dtype(backend, name, backward_inside):
    """bf16 against fp32 under CPU autocast (bf16): computed in fp32, so the loss and the fp32
    gradient hold fp32's 1e-5 against float64 on the same (bf16-rounded) values, and the bf16
    gradient is that fp32 gradient rounded once (2x bf16's own rounding error). A backward
    called inside the autocast region stays at that precision on the tile backends (the dense
    reference's matmul backward follows autocast, as any PyTorch loss's does)."""
    x = _unit(37, 20, torch.bfloat16).requires_grad_()
    y = _unit(37, 20, torch.float32).requires_grad_()
    x64, y64 = (t.detach().double().requires_grad_() for t in (x, y))
    want = MIXED[name]("reference", x64, y64)
    gx64, gy64 = torch.autograd.grad(want, (x64, y64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = MIXED[name](backend, x, y)
        if backward_inside:
            gx, gy = torch.autograd.grad(loss, (x, y))
    if not backward_inside:
        gx, gy = torch.autograd.grad(loss, (x, y))
    assert loss.dtype == torch.float32 and gx.dtype == torch.bfloat16 and gy.dtype == torch.float32
    assert_rel(loss, want.float(), 1e-5, f"{name} loss")
    assert_rel(gy, gy64.float(), 1e-5, f"{name} d/dy (fp32)")
    rounding = (gx64.to(torch.bfloat16).double() - gx64).abs().max() / gx64.abs().max()
    assert_rel(gx, gx64.to(torch.bfloat16), max(2 * float(rounding), 1e-5), f"{name} d/dx (bf16)")


def test_autocast_same_dtype_keeps_fp32_precision():
    """fp32 features under CPU autocast: the tiles are not recomputed in bf16 (autocast is off
    inside the loss), so fp32's 1e-5 holds."""
    q, k = _unit(50, 24, torch.float32), _unit(50, 24, torch.float32)
    want = tilecl.info_nce(q.double(), k.double(), temperature=0.05, backend="reference")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for b in BACKENDS:
            assert_rel(tilecl.info_nce(q, k, temperature=0.05, backend=b), want.float(), 1e-5, b)


def test_mixed_dtypes_outside_autocast_is_a_clear_type_error():
    x, y = _unit(5, 4, torch.bfloat16), _unit(5, 4, torch.float32)
    with pytest.raises(TypeError, match=r"text_features has dtype torch.float32 but "
                                        r"image_features has torch.bfloat16"):
        tilecl.clip_loss(x, y, 10.0)
    with pytest.raises(TypeError, match=r"key has dtype torch.bfloat16 but query has torch.float32"):
        tilecl.info_nce(y, x, temperature=0.1)
