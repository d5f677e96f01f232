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
* SigLIP (``_triton_backward.forward_with_dq``): G needs no statistic, so when q needs a
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
  ``backward_final`` (``_triton_backward.py``, what ``_autograd`` calls) runs the same launches
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

from . import _ops, _torch_tiled
from ._spec import (
    COLUMNS,
    POSITIVES,
    WEIGHTS,
    SumSpec,
    TileAux,
    TileSpec,
    compute_dtype,
    empty_stats,
    empty_topk,
)

try:
    import triton

    from .tritonops import configs as _configs
    from .tritonops import lse as _lse

    _IMPORT_ERROR = None
except ImportError as exc:  # pragma: no cover - depends on the environment
    _IMPORT_ERROR = exc


def unavailable(device) -> "str | None":
    """None if the kernels can run on ``device``, else why not."""
    if _IMPORT_ERROR is not None:
        return f"triton cannot be imported ({_IMPORT_ERROR})"
    device = torch.device(device)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return None if device.type == "cpu" else (
            "TRITON_INTERPRET=1 runs the Triton kernels on CPU tensors only")
    if device.type != "cuda":
        return f"Triton kernels need a CUDA device (or TRITON_INTERPRET=1 on CPU), got {device}"
    return None


def _dummy(device, dtype):
    return torch.zeros(1, device=device, dtype=dtype)


def _flags(spec: TileSpec, aux: TileAux, bias):
    """The kernels' constexpr flags for one spec (one compiled specialisation per distinct set)."""
    sums = list(spec.sums) + [SumSpec()] * (2 - len(spec.sums))
    dist = spec.logit == "dist"
    return dict(
        DIST=dist, GAMMA=float(spec.gamma) if dist else 2.0,
        HAS_BIAS=(bias is not None) and not dist, HAS_EXCL=aux.excl is not None,
        HAS_THRESH=bool(spec.threshold),
        POSITIVE=POSITIVES.index(spec.positive), WEIGHT=WEIGHTS.index(spec.weight),
        CLIP=float(spec.weight_clip),
        N_SUMS=len(spec.sums),
        C0=COLUMNS.index(sums[0].cols), B0=float(sums[0].beta), W0=bool(sums[0].weighted),
        C1=COLUMNS.index(sums[1].cols), B1=float(sums[1].beta), W1=bool(sums[1].weighted),
        LIN=bool(spec.lin), SIG=bool(spec.sigmoid), COL_LSE=bool(spec.col_lse),
        PRECISION=_configs.dot_precision(),
    )


def _inputs(spec: TileSpec, q, k, alpha, bias, aux: TileAux):
    """Pointer arguments shared by both kernels, and their strides (inputs stay strided)."""
    dev = q.device
    i64 = torch.int64
    a = alpha.detach().to(device=dev, dtype=torch.float32).reshape(-1)
    s_a = 0 if alpha.dim() == 0 else 1
    b = bias.detach().to(device=dev, dtype=torch.float32).reshape(1) if bias is not None else (
        _dummy(dev, torch.float32))

    def idx(t):
        return t.to(device=dev, dtype=i64).contiguous() if t is not None else _dummy(dev, i64)

    excl, pos, labq = idx(aux.excl), idx(aux.pos), idx(aux.labels_q)
    labk = idx(aux.labels_k)
    if spec.threshold:
        if aux.thresh is None:
            raise ValueError("TileSpec.threshold needs TileAux.thresh [N]")
        thr = aux.thresh.detach().to(device=dev, dtype=torch.float32).contiguous()
    else:
        thr = _dummy(dev, torch.float32)
    w = aux.weight if spec.weight == "dense" else _dummy(dev, torch.float32).view(1, 1)
    wa = aux.wa if spec.weight == "lowrank" else _dummy(dev, torch.float32).view(1, 1)
    wb = aux.wb if spec.weight == "lowrank" else _dummy(dev, torch.float32).view(1, 1)
    ptrs = (q, k, a, b, excl, pos, labq, labk, thr, w, wa, wb)
    sizes = (q.shape[0], k.shape[0], q.shape[1], w.shape[1], wa.shape[1], int(aux.col_offset))
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), s_a,
               w.stride(0), w.stride(1), wa.stride(0), wa.stride(1), wb.stride(0), wb.stride(1))
    return ptrs, sizes, strides


def _output(shape, dev, written):
    if not written:
        return torch.zeros(shape, device=dev, dtype=torch.float32)
    if _configs.interpreting():
        return torch.full(shape, float("nan"), device=dev, dtype=torch.float32)
    return torch.empty(shape, device=dev, dtype=torch.float32)


def _check(q, k):
    if q.dim() != 2 or k.dim() != 2 or q.shape[1] != k.shape[1]:
        raise ValueError(f"q [N, D] and k [M, D] expected, got {tuple(q.shape)}, {tuple(k.shape)}")
    if q.dtype != k.dtype or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"q and k must share a dtype among fp32/fp16/bf16, got {q.dtype}, {k.dtype}")


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
    ptrs, sizes, strides = _inputs(spec, q, k, alpha, bias, aux)
    flags = _flags(spec, aux, bias)
    flags.update(TOPK=int(spec.topk), TOPK_P2=triton.next_power_of_2(max(int(spec.topk), 1)))
    out_col = col if col is not None else _dummy(dev, torch.float32)
    # the kernel writes every kept entry; NaN-poisoned under the interpreter (a miss fails loudly)
    tv = _output((n, spec.topk), dev, True) if top is not None else _dummy(dev, torch.float32)
    ti = torch.full((n, spec.topk), -2 if _configs.interpreting() else 0, device=dev,
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
        _lse._lse_fwd_kernel[lambda meta: (triton.cdiv(n, meta["BM"]),)](
            *ptrs, *outs, *sizes, *strides, stats.stride(0), TRANS=False, **flags)
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
            gsizes = (sizes[0], redo.numel(), *sizes[2:])
            outs = (stats, out_col, tv, ti, cref, cacc, redo)
            _lse._lse_fwd_kernel[lambda meta: (triton.cdiv(redo.numel(), meta["BN"]),)](
                *ptrs, *outs, *gsizes, *strides, stats.stride(0), TRANS=True, **flags)
    elif spec.col_lse:
        _lse._lse_fwd_kernel[lambda meta: (triton.cdiv(m, meta["BN"]),)](
            *ptrs, *outs, *sizes, *strides, stats.stride(0), TRANS=True, **flags)
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


def _bwd_stats(spec: TileSpec, stats, col, g_stats, g_col, n, dev):
    """The backward kernels' statistics operands: row stats / dL/dstats [S, N] and the column
    LSE / dL/dcol [M] (dummies where the spec has none), fp32 and contiguous."""
    f32 = torch.float32
    st = stats.detach().to(f32).contiguous()
    gst = g_stats.detach().to(f32).contiguous()
    if spec.col_lse:
        cst = col.detach().to(f32).contiguous()
        gc = g_col.detach().to(f32).contiguous()
    else:
        cst = gc = _dummy(dev, f32)
    if st.shape[0] == 0:  # a spec with no row statistic (column LSE only)
        st = gst = torch.zeros(1, n, device=dev, dtype=f32)
    return st, gst, cst, gc


def _launch_bwd(spec, flags, q, k, alpha, bias, aux, st, gst, cst, gc, out, gsum, gx, trans):
    """One backward pass into ``out`` (fp32 [N, D] rows of q, or [M, D] columns of k with
    ``trans``); q, k, alpha, aux, the statistics and gsum / gx are the slices this launch sees."""
    ptrs, sizes, strides = _inputs(spec, q, k, alpha, bias, aux)
    d = q.shape[1]
    if trans:
        def grid(meta):
            return (triton.cdiv(k.shape[0], meta["BN"]), triton.cdiv(d, meta["BD"]))
    else:
        def grid(meta):
            return (triton.cdiv(q.shape[0], meta["BM"]), triton.cdiv(d, meta["BD"]))
    _lse._lse_bwd_kernel[grid](*ptrs, st, gst, cst, gc, out, gsum, gx, *sizes, *strides,
                               st.stride(0), out.stride(0), out.stride(1), TRANS=trans, **flags)


def _bwd_flags(spec, aux, bias):
    flags = _flags(spec, aux, bias)
    # gradient matmul of fp32 inputs at the same precision (16-bit: see tritonops.lse._grad_dot)
    flags["PRECISION2"] = flags["PRECISION"]
    flags["FWD_STATS"] = False
    return flags


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
        flags = _bwd_flags(spec, aux, bias)
        st, gst, cst, gc = _bwd_stats(spec, stats, col, g_stats, g_col, n, dev)
        if rows:
            _launch_bwd(spec, flags, q, k, alpha, bias, aux, st, gst, cst, gc, dq, gsum, gx, False)
        if cols:
            _launch_bwd(spec, flags, q, k, alpha, bias, aux, st, gst, cst, gc, dk, gsum, gx, True)
    af = a.expand(n) if a.dim() == 0 else a
    if spec.logit == "dot":
        # dL/da_i = sum_j G_ij <q_i, k_j> = <q_i, dq_i> / a_i  (math.md 1.5)
        da = (q.detach().to(f32) * dq).sum(1) / af
    else:
        da = gx / af  # dx/da = x / a
    return (dq, dk) + scalar_grads(spec, da, gsum, alpha, bias)


def scalar_grads(spec: TileSpec, da, gsum, alpha, bias):
    """(dalpha like alpha: the rows' da summed for a 0-dim alpha, dbias 0-dim or None: the rows'
    sum_j G_ij for SigLIP, 0 for the softmax losses, whose bias has no gradient; math.md 1.5)."""
    da = da.sum() if alpha.dim() == 0 else da
    if bias is None:
        return da, None
    return da, gsum.sum() if spec.sigmoid else torch.zeros((), device=da.device, dtype=da.dtype)


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
