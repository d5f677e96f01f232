"""Chunking helpers shared by the triton backend's two backward paths (``_triton_backward``, the
fused passes, and ``_triton_gemm``, the H groups): the bounded fp32 workspace, which passes run,
and the side data of a row or column chunk. Below both, so neither imports the other's helpers.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from . import _triton_backend as tb
from ._spec import TileAux, TileSpec

WORKSPACE_MB = 40.0  # default fp32 workspace; TILECL_TRITON_WORKSPACE_MB overrides it
_GLUE_BYTES = 2 << 20  # one fp32 temporary of a chunk's finishing step


def workspace_bytes() -> int:
    """Bytes of the fp32 gradient workspace (``TILECL_TRITON_WORKSPACE_MB``, default 40 MiB)."""
    raw = os.environ.get("TILECL_TRITON_WORKSPACE_MB")
    if raw is None:
        return int(WORKSPACE_MB * 2**20)
    try:
        mb = float(raw)
    except ValueError:
        mb = float("nan")
    if not mb > 0:
        raise ValueError(f"TILECL_TRITON_WORKSPACE_MB must be a positive number of MiB, got {raw!r}")
    return max(1, int(mb * 2**20))


class _Workspace:
    """``count`` fp32 buffers of at most ``workspace_bytes()`` together, allocated once; ``rows``
    is how many [D] rows one buffer holds (the chunk size)."""

    def __init__(self, d: int, most_rows: int, device, count: int = 1):
        self.d = max(d, 1)
        self.rows = max(1, workspace_bytes() // (4 * self.d * count))
        size = min(self.rows, most_rows) * d
        self.space = [torch.empty(size, device=device, dtype=torch.float32) for _ in range(count)]

    def chunk(self, which: int, size: int, written: bool = True) -> torch.Tensor:
        """[size, D] of buffer ``which``: zeros when no pass writes it, NaN under the interpreter
        (an element the kernel misses fails the tests), else as it is."""
        buf = self.space[which][:size * self.d].view(size, self.d)
        if not written:
            return buf.zero_()
        return buf.fill_(float("nan")) if tb._configs.interpreting() else buf


@dataclasses.dataclass
class _Passes:
    """Which backward passes run, from the sizes and ``needs`` (dq, dk, dalpha, dbias)."""
    n: int
    m: int
    d: int
    af: torch.Tensor  # alpha [N] fp32
    need_q: bool
    need_k: bool
    need_a: bool
    need_bias: bool
    rows: bool  # the dq pass (also for dalpha and the SigLIP bias)
    cols: bool  # the dk pass

    @staticmethod
    def of(spec: TileSpec, q, k, alpha, bias, needs) -> "_Passes":
        n, m, d = q.shape[0], k.shape[0], q.shape[1]
        a = alpha.detach().to(device=q.device, dtype=torch.float32)
        need_q, need_k, need_a = bool(needs[0]), bool(needs[1]), bool(needs[2])
        need_bias = bias is not None and spec.sigmoid and bool(needs[3])
        launch = n > 0 and m > 0 and d > 0
        return _Passes(n, m, d, a.expand(n) if a.dim() == 0 else a, need_q, need_k, need_a,
                       need_bias, launch and (need_q or need_a or need_bias), launch and need_k)


def _spans(n: int, step: int):
    return [(i, min(n, i + step)) for i in range(0, n, step)]


def _rows_aux(aux: TileAux, r0: int, r1: int) -> TileAux:
    """The side data of rows r0:r1 (columns unchanged)."""
    def cut(t):
        return None if t is None else t[r0:r1]
    return dataclasses.replace(aux, excl=cut(aux.excl), pos=cut(aux.pos),
                               labels_q=cut(aux.labels_q), weight=cut(aux.weight),
                               wa=cut(aux.wa), thresh=cut(aux.thresh))


def _cols_aux(aux: TileAux, c0: int, c1: int) -> TileAux:
    """The side data of columns c0:c1: global column indices shift by c0."""
    def cut(t):
        return None if t is None else t[c0:c1]
    return aux.with_columns(labels_k=cut(aux.labels_k), wb=cut(aux.wb),
                            col_offset=int(aux.col_offset) + c0)


def fwd_dq_outputs(spec: TileSpec, q):
    """The zeroed outputs of SigLIP's fused forward + dq pass (both backward paths): stats [S, N]
    fp32, u [N, D] in q.dtype, qdot [N] fp32, gsum [N] fp32."""
    n, dev, f32 = q.shape[0], q.device, torch.float32
    return (torch.zeros(spec.n_stats, n, device=dev, dtype=f32),
            torch.zeros(q.shape, device=dev, dtype=q.dtype),
            torch.zeros(n, device=dev, dtype=f32), torch.zeros(n, device=dev, dtype=f32))
