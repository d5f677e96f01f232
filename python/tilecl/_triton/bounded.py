"""Memory-bounded backward of the triton backend, with gradients in the inputs' dtypes.

The plain contract (``launch.backward``) returns fp32 dq [N, D] and dk [M, D], which
``_autograd`` finishes (positive pair, rounding). For bf16 / fp16 inputs at N = M = 65536,
D = 768 those two fp32 buffers are 384 MiB beyond the inputs and their gradients, and the
finishing step's temporaries as much again (the target is 64 MiB in all). ``backward_final``
runs the same two kernels over row chunks (dq pass) and column chunks (dk pass) into an fp32
workspace of at most ``workspace_bytes()`` and finishes each chunk in fp32, in slices of at most
2 MiB per temporary:

* the positive pair's gradient (math.md 1.3: taken out of the tile loop, added in fp32 before the
  rounding): dq_i += a_i g_i k_p(i) for the chunk's rows, dk_j += sum_{p(i) = j} a_i g_i q_i for
  the chunk's columns (rows sorted by p once, one host sync);
* dL/da_i = <q_i, dq_i> / a_i (dot logits) or sum_j G_ij x_ij / a_i (distance), math.md 1.5;
* one set against itself (NT-Xent): dz = dq + dk for the same chunk of rows, summed in fp32;

then rounds the chunk once into the gradient (input dtype). Each row's and column's fp32
accumulation is the kernel's, whatever the chunk: the result is the generic path's.
``gemm.applies`` (``TILECL_TRITON_BWD``: auto by a cost rule, fused or gemm) sends dot
logits in fp32 / bf16 at large D to ``gemm`` instead. Also here: SigLIP's forward fused
into the dq pass, or into the gemm backward's row H pass (``forward_with_dq``, ``finish_dq``).
"""

from __future__ import annotations

import os

import torch

from .. import _ops
from .._spec import TileAux, TileSpec
from . import common, gemm
from .common import (  # noqa: F401  (workspace_bytes: part of this module's interface)
    _GLUE_BYTES,
    WORKSPACE_MB,
    _cols_aux,
    _Passes,
    _rows_aux,
    _spans,
    _Workspace,
    fwd_dq_outputs,
    workspace_bytes,
)

# Work per call, estimated (not measured) at N = M = 65536, D = 768, bf16, forward + backward;
# 1 N M D = 3.3e12 flops, 5.1 ms at 65 % of the H100 / H200 bf16 rate (989 TFLOP/s).
# * fused backward, per pass (dq or dk): the logits once per D chunk of the register gradient
#   block plus the gradient matmul, 2 (c + 1) N M D, c = ceil(D / BD): 8 N M D at BD = 256, 14 at
#   the default BD = 128. No N x M buffer. L2 -> SM operand loads (q and k tiles reloaded per
#   tile and chunk, N M D elt (c (1/BM + 1/BN) + 1/BM)): 0.72 TB per pass at 64 x 64 tiles and
#   BD = 256, 1.34 TB at BD = 128. 5 workspace chunks (launches) per pass.
# * gemm backward (gemm.py), per pass: the logits once and a library GEMM, 4 N M D; H
#   written and read back, 2 N M elt = 17.2 GB of HBM traffic if a 320-row group (40 MiB) does
#   not stay in L2; L2 -> SM loads about 0.24 TB (H kernel at 128 x 64, GEMM at 128 x 256).
#   205 groups per pass, each an H launch and a [320, 65536] @ [65536, 768] GEMM.
# * per call: CLIP fused 18 N M D (92 ms; 30 = 154 ms at BD = 128), gemm 10 N M D (51 ms + up
#   to 7 ms of H traffic at 4.8 TB/s); SigLIP fused 16 N M D (82 ms), gemm 8 N M D (41 ms + up
#   to 7 ms). L2 -> SM loads per call: CLIP 1.6 TB fused, 0.64 TB gemm (forward 0.15 TB).
# Unmeasured: the tiles' matmul rate (65 % assumed), whether the L2 loads bound the passes,
# whether H stays in L2, cuBLAS on tall-K [320, 65536] GEMMs, the exp (MUFU) share (26e9 exps
# per fused CLIP pass at c = 3, ~7 ms at 3.9e12/s), which BD the autotuner picks.


def _final_impl(spec: TileSpec, q, k, alpha, bias, aux: TileAux, stats, col, g_stats, g_col,
                needs, pos, g_pos, single_set: bool, acc=None):
    """(dq in q.dtype or None, dk in k.dtype or None, dalpha fp32 like alpha, dbias fp32 0-dim
    or None); pos [N] local column of each row's positive (or None), g_pos [N] its upstream.

    acc = (dq [N, D] fp32 or None, dk [M, D] fp32 or None): add each finished chunk into these
    accumulators instead (a block of the ring, whose gradients are rounded after the last
    block; two sets only); then dq and dk come back as None."""

    if gemm.applies(spec, q):
        return gemm.backward(spec, q, k, alpha, bias, aux, stats, col, g_stats, g_col,
                                     needs, pos, g_pos, single_set, acc)
    common._check(q, k)
    p = _Passes.of(spec, q, k, alpha, bias, needs)
    n, m, d, af, need_q, need_k, need_a = p.n, p.m, p.d, p.af, p.need_q, p.need_k, p.need_a
    rows, cols = p.rows, p.cols
    dev, f32 = q.device, torch.float32
    dot = spec.logit == "dot"
    coef = None  # a_i dL/ds_pos_i of the positive logit s_pos_i = a_i <q_i, k_p(i)>
    if pos is not None and g_pos is not None:
        coef = g_pos.detach().to(f32) * af
    gx = torch.zeros(n, device=dev, dtype=f32)  # sum_j G_ij x_ij (distance logits)
    gsum = torch.zeros(n, device=dev, dtype=f32)  # sum_j G_ij (SigLIP bias)
    da = torch.zeros(n, device=dev, dtype=f32)
    if rows or cols:
        flags = common._bwd_flags()
        st, gst, cst, gc = common._bwd_stats(spec, stats, col, g_stats, g_col, n, dev)
    if acc is not None:
        dq, dk = acc[0] if need_q else None, acc[1] if need_k else None
    else:
        dq = torch.empty(q.shape, device=dev, dtype=q.dtype) if need_q else None
        dk = torch.empty(k.shape, device=dev, dtype=k.dtype) if need_k and not single_set else None
    put = _put_adding if acc is not None else _put
    # buffer 0 for the dq pass, the last one for the dk pass (two only for one set)
    ws = _Workspace(d, max(n, m), dev, 2 if single_set and rows and cols else 1)
    step = ws.rows
    glue = max(1, _GLUE_BYTES // (4 * max(d, 1)))
    col_spans = _spans(m, step)  # for one set (m = n) also its row chunks
    cuts = None
    if cols and coef is not None:  # rows grouped by their positive column, one host sync
        order = torch.argsort(pos)
        starts = torch.tensor([c0 for c0, _ in col_spans] + [m], device=dev, dtype=pos.dtype)
        cuts = torch.searchsorted(pos[order], starts).tolist()

    def row_block(r0, r1):
        """fp32 dq of rows r0:r1 with the positive pair's term; their dalpha, gx and gsum."""
        buf = ws.chunk(0, r1 - r0, rows)
        if rows:
            al = alpha if alpha.dim() == 0 else alpha[r0:r1]
            common._launch_bwd(spec, flags, q[r0:r1], k, al, bias, _rows_aux(aux, r0, r1),
                           st[:, r0:r1], gst[:, r0:r1], cst, gc, buf, gsum[r0:r1], gx[r0:r1],
                           False)
        for s0, s1 in _spans(r1 - r0, glue):
            i0, i1 = r0 + s0, r0 + s1
            kp = k[pos[i0:i1]].detach().to(f32) if coef is not None else None
            if kp is not None:
                buf[s0:s1].add_(coef[i0:i1, None] * kp)  # [S, D]
            if need_a and (dot or kp is not None):
                qf = q[i0:i1].detach().to(f32)
                if dot:  # <q_i, dq_i> / a_i, the positive term included
                    da[i0:i1] = (qf * buf[s0:s1]).sum(1) / af[i0:i1]
                else:
                    da[i0:i1] = g_pos[i0:i1].to(f32) * (qf * kp).sum(1)
        return buf

    def col_block(ci, c0, c1):
        """fp32 dk of columns c0:c1 with the positive pairs that land there."""
        buf = ws.chunk(-1, c1 - c0)
        c_st, c_g = (cst[c0:c1], gc[c0:c1]) if spec.col_lse else (cst, gc)
        common._launch_bwd(spec, flags, q, k[c0:c1], alpha, bias, _cols_aux(aux, c0, c1), st, gst,
                       c_st, c_g, buf, gsum, gx, True)
        if cuts is not None:
            b0, b1 = cuts[ci], cuts[ci + 1]
            for s0, s1 in _spans(b1 - b0, glue):
                idx = order[b0 + s0:b0 + s1]
                buf.index_add_(0, pos[idx] - c0, coef[idx, None] * q[idx].detach().to(f32))
        return buf

    if single_set:  # dz rows r0:r1 = dq rows + dk columns of the same chunk, rounded once
        for ci, (r0, r1) in enumerate(col_spans):
            out = row_block(r0, r1) if rows else None
            if cols:
                cb = col_block(ci, r0, r1)
                out = cb if out is None else out.add_(cb)
            if dq is None:
                continue
            if out is None:
                dq[r0:r1].zero_()
            else:
                dq[r0:r1].copy_(out)
    else:
        for r0, r1 in _spans(n, step) if rows else []:
            buf = row_block(r0, r1)
            if dq is not None:
                put(dq[r0:r1], buf)
        if dq is not None and not rows and acc is None:
            dq.zero_()
        if dk is not None:
            if cols:
                for ci, (c0, c1) in enumerate(col_spans):
                    put(dk[c0:c1], col_block(ci, c0, c1))
            elif acc is None:
                dk.zero_()
    if not dot:
        da = gx / af + da  # dx/da = x / a, plus the positive pair's term
    if acc is not None:
        dq = dk = None
    return (dq, dk) + common.scalar_grads(spec, da, gsum, alpha, bias)


def _put(dst, buf):
    dst.copy_(buf)  # the one rounding into the input dtype


def _put_adding(dst, buf):
    dst.add_(buf)  # fp32 accumulator of the ring


def fuses_dq(spec: TileSpec) -> bool:
    """Whether the forward can also run the dq pass: G_ij = g_i (sigmoid(x_ij) - Y_ij) of SigLIP
    needs no row statistic (math.md 1.6, 2.2), only the upstream g_i, applied afterwards.
    ``TILECL_TRITON_SIGLIP_FUSED=0`` turns it off (a backward run twice, retain_graph=True,
    needs that: the fused path turns its saved buffer into dq in place)."""
    if os.environ.get("TILECL_TRITON_SIGLIP_FUSED", "1").strip() == "0":
        return False
    return (spec.sigmoid and not spec.sums and not spec.lin and not spec.col_lse
            and spec.logit == "dot" and not spec.topk)


def _forward_dq_impl(spec: TileSpec, q, k, alpha, bias, aux: TileAux):
    """SigLIP's forward and dq pass in one sweep (``FWD_STATS``), g = 1:
    (stats [1, N] fp32, u [N, D] in q.dtype = dq(g = 1) / N, qdot [N] = <q_i, dq_i(g = 1)> fp32,
    gsum [N] = sum_j G_ij(g = 1) fp32). u is stored divided by N so that under the mean over rows
    (g_i = 1 / N) dq = u exactly and no 16-bit range is exceeded. Under the gemm backward the
    sweep is the row H pass and a GEMM (``gemm.forward_dq``)."""

    if gemm.applies(spec, q):
        return gemm.forward_dq(spec, q, k, alpha, bias, aux)
    common._check(q, k)
    n, m, d = q.shape[0], k.shape[0], q.shape[1]
    dev, f32 = q.device, torch.float32
    stats, u, qdot, gsum = fwd_dq_outputs(spec, q)
    if n == 0 or m == 0:
        return stats, u, qdot, gsum
    flags = dict(common._bwd_flags(), FWD_STATS=True)
    ones = torch.ones(spec.n_stats, n, device=dev, dtype=f32)
    cst = gc = common._dummy(dev, f32)
    ws = _Workspace(d, n, dev)
    glue = max(1, _GLUE_BYTES // (4 * d))
    for r0, r1 in _spans(n, ws.rows):
        buf = ws.chunk(0, r1 - r0)
        al = alpha if alpha.dim() == 0 else alpha[r0:r1]
        common._launch_bwd(spec, flags, q[r0:r1], k, al, bias, _rows_aux(aux, r0, r1),
                       stats[:, r0:r1], ones[:, r0:r1], cst, gc, buf, gsum[r0:r1], cst, False)
        for s0, s1 in _spans(r1 - r0, glue):
            i0, i1 = r0 + s0, r0 + s1
            qdot[i0:i1] = (q[i0:i1].detach().to(f32) * buf[s0:s1]).sum(1)  # [S, D] -> [S]
            u[i0:i1] = buf[s0:s1] * (1.0 / n)
    return stats, u, qdot, gsum


def finish_dq(u, qdot, gsum, g, alpha, bias, needs):
    """dq, dalpha, dbias of the fused SigLIP path from the upstream g [N] of the softplus sums:
    dq_i = g_i dq_i(g = 1) = (g_i N) u_i, in place on u, in slices of at most 2 MiB of fp32;
    dalpha_i = g_i <q_i, dq_i(1)> / a_i; dbias = sum_i g_i gsum_i (math.md 1.5, 2.2)."""
    n, d = u.shape
    f32 = torch.float32
    g = g.detach().to(f32)
    dq = None
    if needs[0]:
        f = g * n
        glue = max(1, _GLUE_BYTES // (4 * max(d, 1)))
        for r0, r1 in _spans(n, glue):
            u[r0:r1] = u[r0:r1].to(f32) * f[r0:r1, None]
        dq = u
    a = alpha.detach().to(device=u.device, dtype=f32)
    da = g * qdot / (a.expand(n) if a.dim() == 0 else a)
    da = da.sum() if alpha.dim() == 0 else da
    db = (g * gsum).sum() if bias is not None else None
    return dq, da, db


def _final_body(spec: TileSpec, q, k, alpha, bias, aux: TileAux, stats, col, g_stats, g_col, needs,
                pos, g_pos, single_set):
    """(dq [N, D] or [0], dk [M, D] or [0] in the inputs' dtypes, dalpha, dbias fp32)."""
    dq, dk, da, db = _final_impl(spec, q, k, alpha, bias, aux, stats,
                                 col if spec.col_lse else None, g_stats,
                                 g_col if spec.col_lse else None, tuple(needs), pos, g_pos,
                                 single_set)
    return (dq if dq is not None else q.new_empty(0), dk if dk is not None else k.new_empty(0),
            da, db if db is not None else da.new_zeros(()))


def _final_fake(spec: TileSpec, q, k, alpha, bias, aux: TileAux, stats, col, g_stats, g_col, needs,
                pos, g_pos, single_set):
    f32 = torch.float32
    return (q.new_empty(q.shape if needs[0] else (0,)),
            k.new_empty(k.shape if needs[1] and not single_set else (0,)),
            alpha.new_empty(alpha.shape, dtype=f32), q.new_empty((), dtype=f32))


def _fwd_dq_fake(spec: TileSpec, q, k, alpha, bias, aux: TileAux):
    n, f32 = q.shape[0], torch.float32
    return (q.new_empty((spec.n_stats, n), dtype=f32), q.new_empty(q.shape),
            q.new_empty((n,), dtype=f32), q.new_empty((n,), dtype=f32))


_final_op = _ops.define("triton_tile_bwd_final",
                        f"{_ops.BWD_ARGS}, Tensor? pos_col, Tensor? g_pos, bool single_set",
                        _ops.OUT4, _final_body, _final_fake)
# (stats [1, N], u [N, D] q.dtype, qdot [N], gsum [N]) of ``_forward_dq_impl``
_fwd_dq_op = _ops.define("triton_sig_fwd_dq", "", _ops.OUT4, _forward_dq_impl, _fwd_dq_fake)


def backward_final(spec: TileSpec, q, k, alpha, bias, aux: TileAux, stats, col, g_stats, g_col,
                   needs, pos=None, g_pos=None, single_set=False, acc=None):
    """(dq, dk, dalpha, dbias) with dq / dk in the inputs' dtypes (None where not needed; dk is
    None for one set, whose dq is dz), or None for float64 inputs (the generic path).

    Everything ``_autograd.TileStatsFunction.backward`` does after the plain backward (positive
    pair, dz = dq + dk, rounding) happens here, chunk by chunk, in at most
    ``workspace_bytes()`` of fp32 scratch plus 2 MiB temporaries and O(N + M).
    """
    if q.dtype == torch.float64:
        return None
    needs = tuple(bool(x) for x in needs)
    if acc is not None:  # adds into the caller's fp32 accumulators: no op (it would mutate them)
        return _final_impl(spec, q, k, alpha, bias, aux, stats, col, g_stats, g_col, needs, pos,
                           g_pos, False, acc)
    dq, dk, da, db = _final_op(spec, q, k, alpha, bias, aux, stats, col, g_stats, g_col,
                               list(needs), pos, g_pos, bool(single_set))
    return (dq if needs[0] else None, dk if needs[1] and not single_set else None, da,
            db if bias is not None else None)


def forward_with_dq(spec: TileSpec, q, k, alpha, bias, aux: TileAux):
    """(stats, (u, qdot, gsum)) when the forward can run the dq pass too (``fuses_dq``), else
    None; ``finish_dq`` turns the saved triple into dq, dalpha, dbias once g is known."""
    if q.dtype == torch.float64 or q.shape[1] == 0 or not fuses_dq(spec):
        return None
    stats, *saved = _fwd_dq_op(spec, q, k, alpha, bias, aux)
    return stats, tuple(saved)
