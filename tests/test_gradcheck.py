"""torch.autograd.gradcheck in float64 for the reference and every CPU tile backend, every loss."""

import pytest
import torch

from cases import CASES
from conftest import cpu_backends


@pytest.mark.parametrize("backend", ["reference"] + cpu_backends())
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_gradcheck(case, backend):
    if backend != "reference" and case.backends and backend not in case.backends:
        pytest.skip(f"{case.name} runs on {case.backends} only")
    if case.detached:
        pytest.skip("the DCLW weights are detached by the official code: not a smooth function")
    n = max(case.min_n, 5)
    diff, const = case.make(n, 3, torch.float64)
    leaves = [x.detach().clone().requires_grad_(True) for x in diff]

    def fn(*xs):
        return case.call(backend, "mean", *xs, **const)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


_TWICE = [c for c in CASES if not c.detached and c.name.split("_")[0] not in
          ("kernel", "uniformity", "decoupled")]  # cdist / pdist: differentiable once in PyTorch


@pytest.mark.parametrize("case", _TWICE[::3], ids=[c.name for c in _TWICE[::3]])
def test_reference_double_backward(case):
    """The dense reference is plain autograd: gradgradcheck in float64 (the backend the
    double-backward error of the tile backends points to)."""
    diff, const = case.make(max(case.min_n, 5), 3, torch.float64)
    leaves = [x.detach().clone().requires_grad_(True) for x in diff]
    assert torch.autograd.gradgradcheck(lambda *xs: case.call("reference", "mean", *xs, **const),
                                        leaves, eps=1e-6, atol=1e-6, rtol=1e-4)


def _tile_backends():
    from tilecl._backends import unavailable_reason

    names = cpu_backends()
    if "triton" not in names and unavailable_reason("triton", torch.device("cpu")) is None:
        names.append("triton")  # the error is raised before any kernel runs: cheap here too
    return names


@pytest.mark.parametrize("backend", _tile_backends())
@pytest.mark.parametrize("name", ["clip", "supcon", "uniformity"])
def test_tile_backends_refuse_double_backward(backend, name):
    """create_graph=True through a tile backend: a RuntimeError that names the backend and
    points to backend='reference' (not PyTorch's generic missing-formula error, nor an in-place
    error), while first-order gradients under create_graph=False still work."""
    import tilecl

    q = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    calls = {"clip": lambda: tilecl.clip_loss(q, k, 3.0, backend=backend),
             "supcon": lambda: tilecl.supcon(torch.stack([q, k], 1), torch.tensor([0, 1, 0, 1, 2, 2]),
                                             temperature=0.5, backend=backend),
             "uniformity": lambda: tilecl.uniformity_loss(q, backend=backend)}
    (g,) = torch.autograd.grad(calls[name](), q)
    assert torch.isfinite(g).all()
    with pytest.raises(RuntimeError, match=rf"double backward.*'{backend}' backend.*"
                                           r"backend='reference'"):
        torch.autograd.grad(calls[name](), q, create_graph=True)
