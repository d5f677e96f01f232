"""torch.compile(fullgraph=True) traces a model using a tilecl loss on the CPU tile backends with
no graph break: dynamo decides graph breaks, so the cheap "aot_eager" backend checks the same
property as inductor (it also runs the traced forward and backward graphs, compared here with
eager)."""

import os
import subprocess
import sys

import pytest
import torch

import tilecl
from tilecl import _backends

BACKENDS = ["torch", "native"]


class _Towers(torch.nn.Module):
    def __init__(self, loss, backend):
        super().__init__()
        self.img = torch.nn.Linear(6, 5)
        self.txt = torch.nn.Linear(6, 5)
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.3))
        self.loss, self.backend = loss, backend

    def forward(self, x, y):
        a, b = self.img(x), self.txt(y)
        if self.loss == "clip":  # symmetric InfoNCE: row and column log-sum-exp
            return tilecl.clip_loss(a, b, self.logit_scale.exp(), backend=self.backend)
        # NT-Xent: one set against itself, the self-similarity excluded
        return tilecl.nt_xent(a, b, temperature=0.5, backend=self.backend)


def _grads(model, loss):
    model.zero_grad()
    loss.backward()
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("loss", ["clip", "nt_xent"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_no_graph_break(backend, loss):
    why = _backends.unavailable_reason(backend, torch.device("cpu"))
    if why is not None:
        assert os.environ.get("CI", "").lower() != "true", f"{backend} unavailable under CI: {why}"
        pytest.skip(f"backend {backend!r} is not available: {why}")
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(5)
    model = _Towers(loss, backend)
    x, y = torch.randn(9, 6, generator=gen), torch.randn(9, 6, generator=gen)  # 9: not a tile size
    eager = model(x, y)
    g_eager = _grads(model, eager)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # a break raises here
    out = compiled(x, y)
    g_out = _grads(model, out)
    assert len(g_out) == len(g_eager) >= 4
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    for g, ge in zip(g_out, g_eager):
        torch.testing.assert_close(g, ge, rtol=1e-5, atol=1e-6)


def test_native_first_call_does_not_import_the_compiler_stack():
    """The native ops are registered without torch.library.custom_op, which imports torch's
    compiler stack (dynamo, sympy: about a second) on the first call of a process."""
    if _backends.unavailable_reason("native", torch.device("cpu")) is not None:
        assert os.environ.get("CI", "").lower() != "true", "native unavailable under CI"
        pytest.skip("the native backend is not built")
    code = ("import sys, torch, tilecl\n"
            "q = torch.randn(5, 3, requires_grad=True)\n"
            "tilecl.info_nce(q, torch.randn(5, 3), temperature=0.1, backend='native').backward()\n"
            "print(sorted(m for m in ('sympy', 'torch._dynamo', 'torch._inductor') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
