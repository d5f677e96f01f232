"""Autograd wrapper of the tile template: one Function for the whole loss family.

``tile_stats`` returns the per-row statistics [S, N] and the column LSE [M] of q against k; its
backward asks the chosen backend to recompute the tiles (math.md 1.2). The loss-specific
epilogue (``_family.py``) is O(N) PyTorch code on top, differentiated by autograd, so the
Function only ever sees dL/d(statistics).
"""

from __future__ import annotations

import torch

from . import _backends
from ._spec import TileAux, TileSpec


class TileStatsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, alpha, bias, spec: TileSpec, aux: TileAux, backend: str):
        impl = _backends.get(backend)
        stats, col = impl.forward(spec, q, k, alpha, bias, aux)
        if col is None:
            col = stats.new_zeros(0)
        ctx.spec, ctx.aux, ctx.backend = spec, aux, backend
        ctx.single_set = q is k  # z against itself: dz = dq + dk, summed before rounding
        ctx.has_bias = bias is not None
        if any(ctx.needs_input_grad[:4]):
            ctx.save_for_backward(q, k, alpha, bias if bias is not None else alpha.new_zeros(()),
                                  stats, col)
        ctx.mark_non_differentiable(*(() if spec.col_lse else (col,)))
        return stats, col

    @staticmethod
    def backward(ctx, g_stats, g_col):
        q, k, alpha, bias, stats, col = ctx.saved_tensors
        spec = ctx.spec
        if g_stats is None:
            g_stats = torch.zeros_like(stats)
        if spec.col_lse and g_col is None:
            g_col = torch.zeros_like(col)
        impl = _backends.get(ctx.backend)
        needs = ctx.needs_input_grad[:4]
        dq, dk, da, db = impl.backward(
            spec, q, k, alpha, bias if ctx.has_bias else None, ctx.aux,
            stats, col if spec.col_lse else None, g_stats.to(stats.dtype),
            g_col.to(col.dtype) if spec.col_lse else None, needs)
        if ctx.single_set:  # z against itself: dz = dq + dk, rounded to the input dtype once
            dq, dk = dq + dk, None
        return (_cast(dq, q, needs[0]), _cast(dk, k, needs[1]), _cast(da, alpha, needs[2]),
                _cast(db, bias, needs[3]), None, None, None)


def _cast(grad, like, needed):
    return grad.to(like.dtype) if (needed and grad is not None) else None


def tile_stats(spec: TileSpec, q, k, alpha, bias=None, aux: TileAux = None, backend="torch"):
    """Statistics of rows q [N, D] against columns k [M, D] (see ``_spec.py``).

    alpha: 0-dim or [N] float tensor (the logit scale; 1 / temperature), bias: 0-dim or None.
    Returns (stats [S, N] fp32, col_lse [M] fp32, empty unless ``spec.col_lse``).
    """
    return TileStatsFunction.apply(q, k, alpha, bias, spec, aux or TileAux(), backend)
