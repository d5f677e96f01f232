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
