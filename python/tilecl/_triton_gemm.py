"""The triton backend's backward through library GEMMs (``TILECL_TRITON_BWD=gemm``).

The default backward (``_triton_backward``) accumulates G k and G^T q in registers, one chunk of
D per program, and recomputes the logits once per chunk. Here ``tritonops.lse._lse_h_kernel``
writes H = a G (math.md 1.3, the positive pair's term included) for a group of rows, then of
columns, into a buffer of at most ``workspace_bytes()``, and ``torch.matmul`` multiplies it by
the embeddings: dq rows = H k, dk rows = H^T q, each rounded once to the input dtype.
"""

from __future__ import annotations

import os

import torch

from . import _triton_backend as tb
from ._spec import TileAux, TileSpec
from ._triton_backward import _cols_aux, _Passes, _rows_aux, _spans, workspace_bytes


def bwd_mode() -> str:
    """How the backward multiplies G by the embeddings (``TILECL_TRITON_BWD``):

    * "fused" (default): the dq and dk kernels recompute each tile and accumulate G k / G^T q in
      fp32 registers, one chunk of D per program (D / BD recomputes of the logits);
    * "gemm": ``_lse_h_kernel`` writes H = a G for a group of rows (columns) into an fp32 / bf16
      buffer of at most ``workspace_bytes()`` and a library GEMM multiplies it: no recompute per
      D chunk, for N M elements of H written and read again per pass (in L2 when a group fits).
      Dot logits, fp32 and bf16 inputs (fp16's H would underflow); otherwise "fused".
    """
    raw = os.environ.get("TILECL_TRITON_BWD", "fused").strip().lower()
    if raw not in ("fused", "gemm"):
        raise ValueError(f"TILECL_TRITON_BWD must be fused or gemm, got {raw!r}")
    return raw


def flags_bias(spec: TileSpec, bias) -> bool:
    """Whether the kernels add the bias to the logits (``HAS_BIAS``: dot logits only)."""
    return bias is not None and spec.logit == "dot"


def applies(spec: TileSpec, q) -> bool:
    return (bwd_mode() == "gemm" and spec.logit == "dot"
            and q.dtype in (torch.float32, torch.bfloat16))


def backward(spec: TileSpec, q, k, alpha, bias, aux: TileAux, stats, col, g_stats, g_col,
             needs, pos, g_pos, single_set: bool):
    """``_triton_backward._final_impl``'s result through H groups and library GEMMs (``bwd_mode`` "gemm").

    Rows r0:r1 of H [R, M] give dq rows = H k and, from the kernel's partial sums, dalpha and
    the SigLIP bias; columns c0:c1 of H [N, C] give dk rows = H^T q. The positive pair's term is
    inside H (fp32, before the cast), so each gradient row is rounded once (one set: dq and dk
    rows rounded each, then summed in fp32 and rounded).
    """
    tb._check(q, k)
    p = _Passes.of(spec, q, k, alpha, bias, needs)
    n, m, af, need_q, need_k, rows, cols = p.n, p.m, p.af, p.need_q, p.need_k, p.rows, p.cols
    dev, f32, hdt = q.device, torch.float32, q.dtype
    dq = torch.zeros(q.shape, device=dev, dtype=q.dtype) if need_q else None
    dk = torch.zeros(k.shape, device=dev, dtype=k.dtype) if need_k and not single_set else None
    da = torch.zeros(n, device=dev, dtype=f32)
    gsum = torch.zeros(n, device=dev, dtype=f32)
    has_gpos = pos is not None and g_pos is not None
    if rows or cols:
        flags = tb._flags(spec, aux, bias)
        st, gst, cst, gc = tb._bwd_stats(spec, stats, col, g_stats, g_col, n, dev)
        spos = pos.to(device=dev, dtype=torch.int64) if has_gpos else tb._dummy(dev, torch.int64)
        gpos = g_pos.detach().to(device=dev, dtype=f32) if has_gpos else tb._dummy(dev, f32)
    # x_ij = a_i <q_i, k_j> + b: dalpha_i = sum_j G_ij (x_ij - b) / a_i
    b = bias.detach().to(device=dev, dtype=f32) if flags_bias(spec, bias) else None
    elt = q.element_size()

    def h_of(qs, ks, al, aux_s, st_s, gst_s, cst_s, gc_s, spos_s, gpos_s, p_off, part):
        """H [rows of qs, rows of ks] in q.dtype (and the partial sums when ``part`` is given)."""
        h = torch.empty(qs.shape[0], ks.shape[0], device=dev, dtype=hdt)
        ptrs, sizes, strides = tb._inputs(spec, qs, ks, al, bias, aux_s)
        p = part if part is not None else tb._dummy(dev, f32).view(1, 1, 1)

        def grid(meta):
            return (-(-qs.shape[0] // meta["BM"]), -(-ks.shape[0] // meta["BN"]))
        tb._lse._lse_h_kernel[grid](*ptrs, st_s, gst_s, cst_s, gc_s, spos_s, gpos_s, h, p,
                                    *sizes, p_off, *strides, st_s.stride(0), h.stride(0),
                                    p.stride(1), TRANS=False, HAS_GPOS=has_gpos,
                                    PART=part is not None, **flags)
        return h

    if rows:
        step = max(1, workspace_bytes() // (m * elt))
        ncb = -(-m // 16)  # room for the partials of any BN >= 16
        for r0, r1 in _spans(n, step):
            part = torch.zeros(2, r1 - r0, ncb, device=dev, dtype=f32)
            al = alpha if alpha.dim() == 0 else alpha[r0:r1]
            h = h_of(q[r0:r1], k, al, _rows_aux(aux, r0, r1), st[:, r0:r1], gst[:, r0:r1], cst,
                     gc, spos[r0:r1] if has_gpos else spos, gpos[r0:r1] if has_gpos else gpos,
                     0, part)
            if need_q:
                dq[r0:r1] = torch.matmul(h, k.detach())  # [R, M] @ [M, D]
            g1, gx = part[0].sum(1), part[1].sum(1)
            gsum[r0:r1] = g1
            da[r0:r1] = (gx if b is None else gx - b * g1) / af[r0:r1]
            del h
    if cols:
        step = max(1, workspace_bytes() // (n * elt))
        for c0, c1 in _spans(m, step):
            c_st, c_g = (cst[c0:c1], gc[c0:c1]) if spec.col_lse else (cst, gc)
            h = h_of(q, k[c0:c1], alpha, _cols_aux(aux, c0, c1), st, gst, c_st, c_g, spos, gpos,
                     c0, None)
            blk = torch.matmul(h.t(), q.detach())  # [C, N] @ [N, D]
            if single_set:
                if dq is not None:
                    dq[c0:c1] = (dq[c0:c1].to(f32) + blk.to(f32)).to(dq.dtype)
            else:
                dk[c0:c1] = blk
            del h
    return (dq, dk) + tb.scalar_grads(spec, da, gsum, alpha, bias)
