"""The ``triton`` backend: launchers of ``tilecl.tritonops.lse`` behind the tile contract.

Same signatures and semantics as ``_torch_tiled`` (see ``_spec.py``): ``forward`` returns the
per-row statistics [S, N] fp32 and the column LSE [M] (or None), ``backward`` returns
(dq, dk, dalpha, dbias) in fp32. No autograd here (``_autograd.py`` holds it).

Passes (math.md 1.3, 2.1):

* forward: one row-parallel launch (row statistics, and with ``spec.topk`` each row's hardest
  negatives: a running list in registers, ``tritonops.lse._topk_merge``). Symmetric CLIP's
  column LSE comes from the same sweep by default: fp32 atomic sums against a fixed reference
  per column (``col_pass``: a Cauchy-Schwarz bound minus 64, so no overflow; the columns whose
  sum underflowed, which math.md 2.1 warns a fixed shift can cause, are recomputed exactly by a
  column-parallel launch over just those columns, ``COL_GATHER``). ``TILECL_TRITON_COL_PASS=two``
  (or deterministic algorithms) runs the exact column-parallel launch (``TRANS``) for every
  column instead: 2x the forward matmul, deterministic. Both O(N + M) memory.
* SigLIP (``bounded.forward_with_dq``): G needs no statistic, so when q needs a
  gradient the forward is the dq pass run with g = 1 (``FWD_STATS`` also writes the loss
  statistic); the backward scales it by g and runs the dk pass only: 8 N M D flops, not 10.
* the false-negative threshold (``spec.threshold``, ``aux.thresh``) is a mask recomputed from the
  same logits in every pass, so the forward row and column passes and both backward passes agree.
* backward: a row-parallel launch writes dq (and the per-row sums for the scale and bias
  gradients), a column-parallel launch writes dk; each program owns its output rows and one
  chunk of D, accumulates in fp32 registers and stores once: deterministic, no atomics, no
  read-modify-write of global memory. Each pass recomputes the tiles (the price of determinism:
  4 tile matmuls in the backward instead of 3 with dq atomics), and each D chunk beyond the first
  recomputes the logits once more; the autotuner weighs that against narrow tiles whose gradient
  block spans all of D (BD up to 1024, tritonops/configs.py).
* ``backward`` returns fp32 dq / dk (the contract every backend shares, used by the ring);
  ``backward_final`` (``bounded.py``, what ``_autograd`` calls) runs the same launches
  over row / column chunks into a bounded fp32 workspace and returns the finished gradients in
  the inputs' dtypes: O(workspace + N + M) memory instead of two fp32 [N, D] buffers.
* dalpha = sum_i <q_i, dq_i> / alpha_i (dot logits), sum_j G_ij x_ij / alpha_i (distance logits),
  summed for a 0-dim alpha (math.md 1.5); dbias = sum_ij G_ij for SigLIP (2.2), 0 otherwise
  (exactly what ``_torch_tiled`` returns).

Precision: fp32 dots use ``TILECL_TRITON_PRECISION`` (ieee by default, tf32 optional); fp16/bf16
dots accumulate in fp32. The gradient matmul takes G in bf16 for bf16 inputs (like
FlashAttention), and G scaled by a power of two per tile, then cast to fp16, for fp16 inputs
(c * P underflows fp16, math.md 9.12). float64 inputs (gradcheck) go to ``_torch_tiled``.
"""

from __future__ import annotations

import os

import torch

from .. import _ops, _torch_tiled
from .._spec import (
    TileAux,
    TileSpec,
    compute_dtype,
    empty_stats,
    empty_topk,
)
from . import common
from .common import (
    _bwd_flags,
    _bwd_stats,
    _check,
    _dummy,
    _flags,
    _inputs,
    _output,
    scalar_grads,
)


def _forward_impl(spec: TileSpec, q, k, alpha, bias, aux: TileAux):
    """Per-row statistics [S, N] (fp32) and column LSE [M] (or None) of q against k; with
    ``spec.topk`` also (vals [N, topk] fp32, global idx [N, topk] int64)."""
    if q.dtype == torch.float64:
        return _torch_tiled.forward(spec, q, k, alpha, bias, aux)
    _check(q, k)
    n, m = q.shape[0], k.shape[0]
    dev = q.device
    stats = empty_stats(spec, n, dev, torch.float32)
    col = torch.full((m,), float("-inf"), device=dev, dtype=torch.float32) if spec.col_lse else None
    top = empty_topk(n, spec.topk, dev) if spec.topk else None
    done = (stats, col) if top is None else (stats, col, top)
    if n == 0 or m == 0:
        return done
    head = _inputs(spec, q, k, alpha, bias, aux)
    flags = _flags()
    flags.update(TOPK=int(spec.topk), TOPK_P2=common.triton.next_power_of_2(max(int(spec.topk), 1)))
    out_col = col if col is not None else _dummy(dev, torch.float32)
    # the kernel writes every kept entry; NaN-poisoned under the interpreter (a miss fails loudly)
    tv = _output((n, spec.topk), dev, True) if top is not None else _dummy(dev, torch.float32)
    ti = torch.full((n, spec.topk), -2 if common._configs.interpreting() else 0, device=dev,
                    dtype=torch.int64) if top is not None else _dummy(dev, torch.int64)
    atomic = spec.col_lse and col_pass() == "atomic"
    if atomic:  # column sums in the row pass against fixed references
        cref = _col_references(spec, q, k, alpha, bias)
        cacc = torch.zeros(m, device=dev, dtype=torch.float32)
    else:
        cref = cacc = _dummy(dev, torch.float32)
    cidx = _dummy(dev, torch.int64)
    outs = (stats, out_col, tv, ti, cref, cacc, cidx)
    flags.update(COL_ATOMIC=atomic, COL_GATHER=False)
    if spec.n_stats > 0 or top is not None or atomic:
        common._lse._lse_fwd_kernel[lambda meta: (common.triton.cdiv(n, meta["BM"]),)](
            *head, *outs, stats.stride(0), TRANS=False, **flags)
    if atomic:
        # usable where the sum is finite and above n 2^-100: the terms that exp flushed to zero
        # (each < 2^-126) then weigh < 2^-26 of it; the rest (and empty columns) are recomputed
        ok = torch.isfinite(cacc) & (cacc >= n * 2.0**-100)
        # in float64: log cacc is ~64 + (lse_j - bound_j), its fp32 ulp would be ~8e-6
        f64 = torch.float64
        col.copy_(cref.to(f64) + torch.log(torch.where(ok, cacc, 1.0).to(f64)))
        redo = torch.nonzero(~ok).squeeze(1)  # one host sync
        if redo.numel():
            flags.update(COL_ATOMIC=False, COL_GATHER=True)
            ghead = head._replace(shape=head.shape._replace(M=redo.numel()))
            outs = (stats, out_col, tv, ti, cref, cacc, redo)
            common._lse._lse_fwd_kernel[lambda meta: (common.triton.cdiv(redo.numel(), meta["BN"]),)](
                *ghead, *outs, stats.stride(0), TRANS=True, **flags)
    elif spec.col_lse:
        common._lse._lse_fwd_kernel[lambda meta: (common.triton.cdiv(m, meta["BN"]),)](
            *head, *outs, stats.stride(0), TRANS=True, **flags)
    return done if top is None else (stats, col, (tv, ti))


def col_pass() -> str:
    """How the forward gets symmetric CLIP's column LSE (``TILECL_TRITON_COL_PASS``):

    * "atomic" (default): in the row pass, cacc_j += sum_i exp(x_ij - cref_j) by fp32 atomics
      against a fixed reference per column, cref_j = max_i(a_i |q_i|) |k_j| + b - 64 >= every
      x_ij - 64 (Cauchy-Schwarz; -64 for distance logits, x <= 0), so no term overflows
      (n e^64 < fp32 max for n < 5e10). Columns whose sum underflowed (all their logits more
      than ~120 below the bound: math.md 2.1's caveat of a fixed shift) or is not finite get
      the exact pass below. Forward matmul work 2 N M D instead of 4; the summation order of
      the atomics varies from run to run (within fp32 rounding).
    * "two": a second, column-parallel launch (``TRANS``), exact and deterministic, 2x the
      forward matmul work. Also chosen when torch.use_deterministic_algorithms(True) is set.
    """
    raw = os.environ.get("TILECL_TRITON_COL_PASS", "atomic").strip().lower()
    if raw not in ("atomic", "two"):
        raise ValueError(f"TILECL_TRITON_COL_PASS must be atomic or two, got {raw!r}")
    if torch.are_deterministic_algorithms_enabled():
        return "two"
    return raw


def _row_norms(x) -> torch.Tensor:
    """|x_i| [N] fp32, in row slices of at most 2 MiB of fp32 temporaries."""
    n, d = x.shape
    out = torch.empty(n, device=x.device, dtype=torch.float32)
    step = max(1, (2 << 20) // (4 * max(d, 1)))
    for r0 in range(0, n, step):
        out[r0:r0 + step] = x[r0:r0 + step].detach().to(torch.float32).square().sum(1).sqrt()
    return out


def _col_references(spec: TileSpec, q, k, alpha, bias) -> torch.Tensor:
    """cref [M] fp32 (see ``col_pass``): a bound on every x_ij of column j, minus 64."""
    m = k.shape[0]
    if spec.logit == "dist":  # x = -a d^g <= 0
        return torch.full((m,), -64.0, device=k.device, dtype=torch.float32)
    a = alpha.detach().to(device=q.device, dtype=torch.float32).abs()
    top = (a * _row_norms(q)).max()  # max_i a_i |q_i|
    ref = top * _row_norms(k) - 64.0
    if bias is not None:
        ref = ref + bias.detach().to(ref.device, torch.float32)
    return ref


def _backward_impl(spec: TileSpec, q, k, alpha, bias, aux: TileAux, stats, col, g_stats,
                   g_col, needs=(True, True, True, True)):
    """(dq [N, D], dk [M, D], dalpha (0-dim or [N]), dbias (0-dim or None)), all fp32."""
    if q.dtype == torch.float64:
        return _torch_tiled.backward(spec, q, k, alpha, bias, aux, stats, col, g_stats, g_col,
                                     needs)
    _check(q, k)
    n, m, d = q.shape[0], k.shape[0], q.shape[1]
    dev = q.device
    f32 = torch.float32
    a = alpha.detach().to(device=dev, dtype=f32)
    need_bias = bias is not None and spec.sigmoid and needs[3]
    launch = n > 0 and m > 0 and d > 0
    rows = launch and (needs[0] or needs[2] or need_bias)
    cols = launch and needs[1]
    # the kernels write every element of dq / dk: uninitialised (NaN-poisoned under the
    # interpreter, so a missed element fails the tests loudly) when a pass runs, zeros otherwise
    dq = _output((n, d), dev, rows)
    dk = _output((m, d), dev, cols)
    gx = torch.zeros(n, device=dev, dtype=f32)  # sum_j G_ij x_ij (distance logits)
    gsum = torch.zeros(n, device=dev, dtype=f32)  # sum_j G_ij (SigLIP bias)
    if rows or cols:
        flags = _bwd_flags()
        st, gst, cst, gc = _bwd_stats(spec, stats, col, g_stats, g_col, n, dev)
        if rows:
            common._launch_bwd(spec, flags, q, k, alpha, bias, aux, st, gst, cst, gc, dq, gsum, gx, False)
        if cols:
            common._launch_bwd(spec, flags, q, k, alpha, bias, aux, st, gst, cst, gc, dk, gsum, gx, True)
    af = a.expand(n) if a.dim() == 0 else a
    if spec.logit == "dot":
        # dL/da_i = sum_j G_ij <q_i, k_j> = <q_i, dq_i> / a_i  (math.md 1.5)
        da = (q.detach().to(f32) * dq).sum(1) / af
    else:
        da = gx / af  # dx/da = x / a
    return (dq, dk) + scalar_grads(spec, da, gsum, alpha, bias)


# ---------------------------------------------------------------------------------------------
# The kernels as custom ops (schemas: _ops.py), so torch.compile traces through them without graph
# breaks; a missing column LSE or top-k list is an empty tensor inside the op.


def _fwd_body(spec: TileSpec, q, k, alpha, bias, aux: TileAux):
    """(stats [S, N], col [M] or [0], top vals [N, topk], top idx [N, topk] int64)."""
    stats, col, *top = _forward_impl(spec, q, k, alpha, bias, aux)
    vals, idx = top[0] if top else empty_topk(q.shape[0], 0, q.device, stats.dtype)
    return stats, col if col is not None else stats.new_zeros(0), vals, idx


def _fwd_fake(spec: TileSpec, q, k, alpha, bias, aux: TileAux):
    dt, n = compute_dtype(q), q.shape[0]
    return (q.new_empty((spec.n_stats, n), dtype=dt),
            q.new_empty((k.shape[0] if spec.col_lse else 0,), dtype=dt),
            q.new_empty((n, spec.topk), dtype=dt), q.new_empty((n, spec.topk), dtype=torch.int64))


def _bwd_body(spec: TileSpec, q, k, alpha, bias, aux: TileAux, stats, col, g_stats, g_col, needs):
    dq, dk, da, db = _backward_impl(spec, q, k, alpha, bias, aux, stats,
                                    col if spec.col_lse else None, g_stats,
                                    g_col if spec.col_lse else None, tuple(needs))
    return dq, dk, da, db if db is not None else da.new_zeros(())


def _bwd_fake(spec: TileSpec, q, k, alpha, bias, aux: TileAux, stats, col, g_stats, g_col, needs):
    dt = compute_dtype(q)
    return (q.new_empty(q.shape, dtype=dt), k.new_empty(k.shape, dtype=dt),
            alpha.new_empty(alpha.shape, dtype=dt), q.new_empty((), dtype=dt))


_fwd_op = _ops.define("triton_tile_fwd", "", _ops.OUT4, _fwd_body, _fwd_fake)
_bwd_op = _ops.define("triton_tile_bwd", _ops.BWD_ARGS, _ops.OUT4, _bwd_body, _bwd_fake)


def forward(spec: TileSpec, q, k, alpha, bias, aux: TileAux):
    """Per-row statistics [S, N] (fp32) and column LSE [M] (or None) of q against k, and with
    ``spec.topk`` a third element (vals [N, topk] fp32 descending, global idx [N, topk] int64,
    padded with -inf / -1): each row's largest logits over its allowed non-positive columns.

    q: [N, D], k: [M, D] (fp32/fp16/bf16, any strides), alpha: 0-dim or [N], bias: 0-dim or None.
    """
    stats, col, vals, idx = _fwd_op(spec, q, k, alpha, bias, aux)
    col = col if spec.col_lse else None
    return (stats, col) if not spec.topk else (stats, col, (vals, idx))


def backward(spec: TileSpec, q, k, alpha, bias, aux: TileAux, stats, col, g_stats, g_col,
             needs=(True, True, True, True)):
    """(dq [N, D], dk [M, D], dalpha like alpha, dbias 0-dim or None), fp32 (math.md 1.2-1.5)."""
    dq, dk, da, db = _bwd_op(spec, q, k, alpha, bias, aux, stats, col, g_stats, g_col,
                             [bool(x) for x in needs])
    return dq, dk, da, (db if bias is not None else None)
