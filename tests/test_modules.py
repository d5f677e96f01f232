"""nn.Module wrappers: same value as the functional form, learnable scale gets a gradient."""

import math

import pytest
import torch
import torch.nn.functional as F

import tilecl


def unit(*s):
    return F.normalize(torch.randn(*s), dim=-1)


def test_info_nce_module_matches_functional():
    q, k = unit(9, 4), unit(12, 4)
    mod = tilecl.InfoNCELoss(0.1)
    assert torch.allclose(mod(q, k), tilecl.info_nce(q, k, temperature=0.1), rtol=1e-6)


@pytest.mark.parametrize("cls,args", [
    (tilecl.ClipLoss, lambda: (unit(8, 4), unit(8, 4))),
    (tilecl.NTXentLoss, lambda: (unit(8, 4), unit(8, 4))),
    (tilecl.SupConLoss, lambda: (unit(8, 2, 4), torch.arange(8) % 3)),
    (tilecl.InfoNCELoss, lambda: (unit(8, 4), unit(10, 4))),
])
def test_learnable_temperature_gets_gradient(cls, args):
    mod = cls(0.2, learnable=True)
    loss = mod(*args())
    loss.backward()
    assert mod.log_scale.grad is not None and mod.log_scale.grad.abs().item() > 0
    mod.clamp_(10.0)
    assert mod.log_scale.item() <= math.log(10.0) + 1e-6


def test_clip_module_scale_gradient_matches_reference():
    i, t = unit(11, 5), unit(11, 5)
    grads = []
    for backend in ("reference", "torch"):
        mod = tilecl.ClipLoss(0.07, backend=backend)
        mod(i, t).backward()
        grads.append(mod.log_scale.grad)
    assert torch.allclose(grads[0], grads[1], rtol=1e-5)


def test_siglip_module_learns_scale_and_bias():
    mod = tilecl.SigLipLoss()
    assert mod.log_scale.item() == pytest.approx(math.log(10.0))
    assert mod.bias.item() == -10.0
    mod(unit(6, 3), unit(6, 3)).backward()
    assert mod.log_scale.grad is not None and mod.bias.grad is not None
    fixed = tilecl.SigLipLoss(learnable=False)
    assert not list(fixed.parameters())


def test_module_rejects_bad_temperature():
    with pytest.raises(ValueError, match="temperature"):
        tilecl.InfoNCELoss(0.0)
