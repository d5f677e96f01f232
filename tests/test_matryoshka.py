"""Fused Matryoshka InfoNCE: loss and gradients are covered by the parity
cases ("matryoshka", "matryoshka_clip" in cases.py); here: the fusion itself (one sweep of the
matmul work of the largest prefix, counted exactly), the memory bound, and argument checks."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import tilecl
import tilecl._torch_tiled as torch_tiled
from tilecl.memtrack import PeakTensorBytes

DIMS = (64, 32, 16, 8)


def _mm_flops(fn):
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def test_fused_costs_the_largest_prefix_only():
    """Forward + backward matmul FLOPs: the fused sweep does 2 N M d_max (forward) +
    6 N M d_max (backward: recompute, dq, dk), up to O((N + M) d) terms; one tiled InfoNCE per
    prefix would do 8 N M sum(d_p)."""
    n = m = 96
    torch_tiled.set_tile_size(48, 64)  # (conftest restores its tiles)
    q = torch.randn(n, DIMS[0], requires_grad=True)
    k = torch.randn(m, DIMS[0], requires_grad=True)

    def fused():
        tilecl.matryoshka_info_nce(q, k, DIMS, temperature=0.05, backend="torch").backward()

    def per_prefix():
        sum(tilecl.info_nce(F.normalize(q[:, :d], dim=1), F.normalize(k[:, :d], dim=1),
                            temperature=0.05, backend="torch") for d in DIMS).backward()

    big = 8 * n * m
    f, p = _mm_flops(fused), _mm_flops(per_prefix)
    assert big * DIMS[0] <= f < big * DIMS[0] * 1.05, f
    assert p >= big * sum(DIMS), p
    # and the same numbers
    q2, k2 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    a = tilecl.matryoshka_info_nce(q2, k2, DIMS, temperature=0.05, backend="torch")
    b = tilecl.matryoshka_info_nce(q2, k2, DIMS, temperature=0.05, backend="reference")
    assert torch.allclose(a, b, rtol=1e-12)


def test_fused_memory_is_tiles_not_n_by_m():
    """Peak live tensor bytes of forward + backward: no [N, M] buffer per prefix."""
    n, d = 2048, 64
    torch_tiled.set_tile_size(128, 256)  # (conftest restores its tiles)
    q = torch.randn(n, d, requires_grad=True)
    k = torch.randn(n, d, requires_grad=True)
    with PeakTensorBytes() as probe:
        tilecl.matryoshka_info_nce(q, k, DIMS, temperature=0.05, backend="torch").backward()
    assert probe.peak < n * n * 2, probe.peak  # less than half of ONE fp32 N x N matrix


def test_weights_follow_their_dims_in_any_order():
    q, k = torch.randn(9, 12, dtype=torch.float64), torch.randn(9, 12, dtype=torch.float64)
    a = tilecl.matryoshka_info_nce(q, k, [4, 12, 8], weights=[3.0, 1.0, 2.0], temperature=0.1,
                                   backend="torch")
    parts = {d: tilecl.info_nce(F.normalize(q[:, :d], dim=1), F.normalize(k[:, :d], dim=1),
                                temperature=0.1, backend="reference") for d in (4, 8, 12)}
    assert torch.allclose(a, 3 * parts[4] + 2 * parts[8] + parts[12], rtol=1e-12)


def test_reduction_none_rows():
    q, k = torch.randn(7, 10, dtype=torch.float64), torch.randn(7, 10, dtype=torch.float64)
    rows = tilecl.matryoshka_info_nce(q, k, (10, 5), temperature=0.1, reduction="none",
                                      backend="torch")
    assert rows.shape == (7,)
    mean = tilecl.matryoshka_info_nce(q, k, (10, 5), temperature=0.1, backend="torch")
    assert torch.allclose(rows.mean(), mean, rtol=1e-12)


@pytest.mark.parametrize("kw,err,match", [
    (dict(dims=(0, 4)), ValueError, "dims"),
    (dict(dims=(4, 4)), ValueError, "dims"),
    (dict(dims=(9,)), ValueError, "dims"),
    (dict(dims=()), TypeError, "dims"),
    (dict(dims=4), TypeError, "dims"),
    (dict(dims=(4.0,)), TypeError, "dims"),
    (dict(dims=(8, 4), weights=[1.0]), ValueError, "weights"),
    (dict(dims=(8, 4), temperature=-1.0), ValueError, "temperature"),
    (dict(dims=(8, 4), symmetric=True, positive_index=torch.arange(5)), ValueError, "symmetric"),
])
def test_bad_arguments(kw, err, match):
    q, k = torch.randn(5, 8), torch.randn(5, 8)
    kw = dict(dict(temperature=0.1), **kw)
    with pytest.raises(err, match=match):
        tilecl.matryoshka_info_nce(q, k, **kw)
