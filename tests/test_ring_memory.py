"""The ring's backward on the triton backend runs through the bounded workspace.

One process stands in for a ring of W ranks (a loopback ring: every rank holds the same shard, so
the block a rank receives is a copy of the one it sent), with the kernels stubbed (they allocate
nothing; the interpreter would take hours at this size; the gemm backward's library products
only allocate their outputs) and the implementations called directly
(``_ops.DIRECT``), so every tensor the Function, the ring and the backend allocate is counted.
Per rank the ring holds by design: the dq accumulator [N, D] fp32, the visiting block's dk
accumulator, the one arriving and the one in flight (3 x [M, D] fp32), and two visiting blocks in
the input dtype. Beyond those, the triton backend may use its workspace (``workspace_bytes()``)
and small temporaries only: no fp32 [N, D] / [M, D] gradients per block.
"""

import pytest
import torch
from test_triton_workspace import _StubLse, shape_only_matmul

from tilecl import _ops, _ring
from tilecl._autograd import tile_stats
from tilecl._spec import SumSpec, TileAux, TileSpec
from tilecl._triton import common as tc
from tilecl._triton.common import workspace_bytes
from tilecl.memtrack import PeakTensorBytes


class _Loopback:
    """A ring of ``world`` ranks in one process, seen from rank 0."""

    def __init__(self, world):
        self.world, self.rank = world, 0

    def send_recv(self, send, recv, tag=0):
        for s, r in zip(send, recv):
            r.copy_(s)
        return []

    @staticmethod
    def wait(works):
        pass


@pytest.mark.parametrize("bwd", ["fused", "gemm"])
@pytest.mark.parametrize("world", [2, 4])
def test_ring_triton_backward_in_bounded_workspace(monkeypatch, bwd, world):
    """Symmetric CLIP (column LSE travelling, positive pair at the local block), bf16,
    N = M = 16384 rows per rank, D = 768: peak beyond inputs and gradients <= the ring's own
    buffers + the workspace + 8 MiB."""
    monkeypatch.delenv("TILECL_TRITON_WORKSPACE_MB", raising=False)
    monkeypatch.setenv("TILECL_TRITON_BWD", bwd)
    monkeypatch.setattr(tc, "_lse", _StubLse)
    monkeypatch.setattr(torch, "matmul", shape_only_matmul)
    monkeypatch.setattr(_ops, "DIRECT", True)
    n, d, bf = 16384, 768, torch.bfloat16
    q = torch.full((n, d), 0.03, dtype=bf).requires_grad_()
    k = torch.full((n, d), 0.03, dtype=bf).requires_grad_()
    alpha = torch.tensor(10.0, requires_grad=True)
    spec = TileSpec(sums=(SumSpec("all"),), col_lse=True)
    pos = torch.arange(n)
    columns = _ring.RingColumns(_Loopback(world), [n] * world, [b * n for b in range(world)])
    with PeakTensorBytes() as mode:
        stats, col, s_pos = tile_stats(spec, q, k, alpha, None, TileAux(), "triton", pos, columns)
        ((stats[0] - s_pos).mean() + (col - s_pos).mean()).backward()
    assert q.grad is not None and k.grad is not None and alpha.grad is not None
    grads = 2 * n * d * 2
    ring = 4 * n * d * 4 + 2 * n * d * 2  # accumulators (fp32) and two visiting blocks (bf16)
    extra = mode.peak - grads - ring
    print(f"W={world} ({bwd}): {extra / 2**20:.1f} MiB beyond inputs, gradients and ring buffers")
    assert extra <= workspace_bytes() + 8 * 2**20, f"{extra / 2**20:.1f} MiB"
