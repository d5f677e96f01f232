"""Deterministic memory: the torch backend never allocates an N x M buffer and its peak extra
memory is O((N + M) D + tile), far below the dense loss. Counted by a TorchDispatchMode over
every tensor the forward and backward create (tests/memtrack.py), not by timing or RSS."""

import pytest
import torch
import torch.nn.functional as F

import tilecl
import tilecl._torch_tiled as torch_tiled
from tilecl.memtrack import PeakTensorBytes

N = M = 2048
D = 32
TILE = (128, 256)


def _measure(fn, backend):
    q = F.normalize(torch.randn(N, D), dim=1).requires_grad_()
    k = F.normalize(torch.randn(M, D), dim=1).requires_grad_()
    mode = PeakTensorBytes()
    with mode:
        fn(q, k, backend).backward()
    return mode


LOSSES = {
    "clip": lambda q, k, b: tilecl.clip_loss(q, k, 50.0, backend=b),
    "siglip": lambda q, k, b: tilecl.siglip_loss(q, k, 10.0, -10.0, backend=b),
    "nt_xent": lambda q, k, b: tilecl.nt_xent(q, k, backend=b),
    "supcon": lambda q, k, b: tilecl.supcon(torch.stack([q, k], 1), torch.arange(N) % 10, backend=b),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_torch_backend_peak_memory_is_linear(name):
    torch_tiled.set_tile_size(*TILE)
    fn = LOSSES[name]
    rows = 2 * N if name in ("nt_xent", "supcon") else N  # single-set losses see [2N, D]
    dense = _measure(fn, "reference")
    tiled = _measure(fn, "torch")
    nm_bytes = rows * rows * 4
    assert dense.largest >= nm_bytes  # the dense loss does hold the N x M logits
    assert tiled.largest < nm_bytes / 16, f"largest buffer {tiled.largest} vs N x M {nm_bytes}"
    budget = 8 * (rows + rows) * D * 4 + 12 * TILE[0] * TILE[1] * 4
    assert tiled.peak <= budget, f"peak {tiled.peak} > O((N+M) D + tile) budget {budget}"
    assert tiled.peak < 0.05 * dense.peak, f"tiled {tiled.peak} vs dense {dense.peak}"
