"""The triton backend's backward through library GEMMs (``bwd_mode`` "gemm", the automatic choice
for dot logits at large D).

The fused backward (``bounded``) accumulates G k and G^T q in registers, one chunk of
D per program, and recomputes the logits once per chunk. Here ``tritonops.lse._lse_h_kernel``
writes H = a G (math.md 1.3, the positive pair's term included) for a group of rows, then of
columns, into a buffer of at most ``workspace_bytes()``, and ``torch.matmul`` multiplies it by
the embeddings: dq rows = H k, dk rows = H^T q, each rounded once to the input dtype. SigLIP's
forward runs in the row H pass (``forward_dq``), so SigLIP costs 8 N M D here as well.
"""

from __future__ import annotations

import os

import torch

from .._spec import TileAux, TileSpec
from . import common
from .common import _cols_aux, _Passes, _rows_aux, _spans, fwd_dq_outputs, workspace_bytes

# The automatic choice, from the work of one backward pass (dq or dk) per (i, j) pair:
#   fused: the logits once per D chunk of the register gradient block, c = ceil(D / BD_TC)
#          chunks (BD_TC = 256, the widest BD of the tensor-core tiles, tritonops/configs.py),
#          plus the gradient matmul: 2 D (c + 1) flops and no N x M bytes;
#   gemm:  the logits once (H kernel) and the library GEMM: 4 D flops, plus H written and
#          read back, 2 h bytes of HBM traffic (h: one H element, the input's size) when the
#          group does not stay in L2.
# gemm costs less when 2 D (c - 1) / R > 2 h / B, i.e. D (c - 1) > h R / B, with R / B the
# matmul rate at 65 % of peak over the HBM bandwidth of an H100 SXM (989 TFLOP/s bf16, 495
# tf32, 67 fp32 without tensor cores; 3.35 TB/s; an H200's 4.8 TB/s only lowers the ratio):
# bf16 D (c - 1) > 2 * 192 = 384, i.e. gemm for D > 384; fp32 with tf32 dots the same;
# fp32 ieee (no tensor cores) 4 * 13 = 52, gemm for D > 256. fp16 stays fused (its H would
# underflow, math.md 9.12), and so do distance logits (the gemm path has dot logits only).
BD_TC = 256
FLOP_PER_BYTE = {"bf16": 192.0, "tf32": 96.0, "tf32x3": 32.0, "ieee": 13.0}


def pass_work(mode: str, d: int, elt: int):
    """(flops, HBM bytes) of one backward pass per (i, j) pair under ``mode`` (see above)."""
    if mode == "fused":
        return 2 * d * (-(-d // BD_TC) + 1), 0
    return 4 * d, 2 * elt


def auto_mode(d: int, dtype, precision: str = "ieee") -> str:
    """The backward the cost rule above picks for dot logits of width ``d`` in ``dtype``."""
    if dtype == torch.bfloat16:
        ratio = FLOP_PER_BYTE["bf16"]
    elif dtype == torch.float32:
        ratio = FLOP_PER_BYTE[precision]
    else:
        return "fused"
    elt = torch.tensor([], dtype=dtype).element_size()
    cost = {}
    for mode in ("fused", "gemm"):
        flops, nbytes = pass_work(mode, d, elt)
        cost[mode] = flops + ratio * nbytes
    return "gemm" if cost["gemm"] < cost["fused"] else "fused"


def bwd_mode() -> str:
    """How the backward multiplies G by the embeddings (``TILECL_TRITON_BWD``):

    * "auto" (default): "gemm" where the cost rule above says it pays (``auto_mode``: dot
      logits, bf16 or fp32, D > 384 in bf16), else "fused";
    * "fused": the dq and dk kernels recompute each tile and accumulate G k / G^T q in fp32
      registers, one chunk of D per program (D / BD recomputes of the logits);
    * "gemm": ``_lse_h_kernel`` writes H = a G for a group of rows (columns) into an fp32 / bf16
      buffer of at most ``workspace_bytes()`` and a library GEMM multiplies it: no recompute per
      D chunk, for N M elements of H written and read again per pass (in L2 when a group fits).
      Dot logits, fp32 and bf16 inputs (fp16's H would underflow); otherwise "fused".
    """
    raw = os.environ.get("TILECL_TRITON_BWD", "auto").strip().lower()
    if raw not in ("auto", "fused", "gemm"):
        raise ValueError(f"TILECL_TRITON_BWD must be auto, fused or gemm, got {raw!r}")
    return raw


def flags_bias(spec: TileSpec, bias) -> bool:
    """Whether the kernels add the bias to the logits (``HAS_BIAS``: dot logits only)."""
    return bias is not None and spec.logit == "dot"


def applies(spec: TileSpec, q) -> bool:
    """Whether the backward of ``spec`` on q [N, D] goes through H and library GEMMs."""
    if spec.logit != "dot" or q.dtype not in (torch.float32, torch.bfloat16):
        return False
    mode = bwd_mode()
    if mode == "auto":
        mode = auto_mode(q.shape[1], q.dtype, common._configs.dot_precision())
    return mode == "gemm"


def _h_block(spec, flags, bias, qs, ks, al, aux_s, stats4, spos_s, gpos_s, p_off, part,
             has_gpos, fwd_stats=False):
    """H [rows of qs, rows of ks] in q.dtype (and the partial sums when ``part`` is given);
    stats4 = (row stats, their upstream, column LSE, its upstream) of this block."""
    st_s, gst_s, cst_s, gc_s = stats4
    dev = qs.device
    h = torch.empty(qs.shape[0], ks.shape[0], device=dev, dtype=qs.dtype)
    head = common._inputs(spec, qs, ks, al, bias, aux_s)
    saved = common.Saved(st_s, gst_s, cst_s, gc_s, st_s.stride(0))
    p = part if part is not None else common._dummy(dev, torch.float32).view(1, 1, 1)

    def grid(meta):
        return (-(-qs.shape[0] // meta["BM"]), -(-ks.shape[0] // meta["BN"]))
    common._lse._lse_h_kernel[grid](*head, saved, spos_s, gpos_s, h, p, p_off, h.stride(0),
                                p.stride(1), TRANS=False, HAS_GPOS=has_gpos,
                                PART=part is not None, FWD_STATS=fwd_stats, **flags)
    return h


def backward(spec: TileSpec, q, k, alpha, bias, aux: TileAux, stats, col, g_stats, g_col,
             needs, pos, g_pos, single_set: bool, acc=None):
    """``bounded._final_impl``'s result through H groups and library GEMMs (``bwd_mode`` "gemm").

    Rows r0:r1 of H [R, M] give dq rows = H k and, from the kernel's partial sums, dalpha and
    the SigLIP bias; columns c0:c1 of H [N, C] give dk rows = H^T q. The positive pair's term is
    inside H (fp32, before the cast), so each gradient row is rounded once (one set: dq and dk
    rows rounded each, then summed in fp32 and rounded). ``acc``: fp32 accumulators to add the
    products into (a block of the ring; two sets only), then dq and dk come back as None.
    """
    common._check(q, k)
    p = _Passes.of(spec, q, k, alpha, bias, needs)
    n, m, af, need_q, need_k, rows, cols = p.n, p.m, p.af, p.need_q, p.need_k, p.rows, p.cols
    dev, f32 = q.device, torch.float32
    if acc is not None:
        dq, dk = acc[0] if need_q else None, acc[1] if need_k else None
    else:
        dq = torch.zeros(q.shape, device=dev, dtype=q.dtype) if need_q else None
        dk = torch.zeros(k.shape, device=dev, dtype=k.dtype) if need_k and not single_set else None
    da = torch.zeros(n, device=dev, dtype=f32)
    gsum = torch.zeros(n, device=dev, dtype=f32)
    has_gpos = pos is not None and g_pos is not None
    if rows or cols:
        flags = common._flags()
        st, gst, cst, gc = common._bwd_stats(spec, stats, col, g_stats, g_col, n, dev)
        spos = pos.to(device=dev, dtype=torch.int64) if has_gpos else common._dummy(dev, torch.int64)
        gpos = g_pos.detach().to(device=dev, dtype=f32) if has_gpos else common._dummy(dev, f32)
    # x_ij = a_i <q_i, k_j> + b: dalpha_i = sum_j G_ij (x_ij - b) / a_i
    b = bias.detach().to(device=dev, dtype=f32) if flags_bias(spec, bias) else None
    elt = q.element_size()

    def h_of(qs, ks, al, aux_s, st_s, gst_s, cst_s, gc_s, spos_s, gpos_s, p_off, part):
        return _h_block(spec, flags, bias, qs, ks, al, aux_s, (st_s, gst_s, cst_s, gc_s),
                        spos_s, gpos_s, p_off, part, has_gpos)

    if rows:
        step = max(1, workspace_bytes() // (m * elt))
        ncb = -(-m // 16)  # room for the partials of any BN >= 16
        for r0, r1 in _spans(n, step):
            part = torch.zeros(2, r1 - r0, ncb, device=dev, dtype=f32)
            al = alpha if alpha.dim() == 0 else alpha[r0:r1]
            h = h_of(q[r0:r1], k, al, _rows_aux(aux, r0, r1), st[:, r0:r1], gst[:, r0:r1], cst,
                     gc, spos[r0:r1] if has_gpos else spos, gpos[r0:r1] if has_gpos else gpos,
                     0, part)
            if need_q and acc is not None:
                dq[r0:r1] += torch.matmul(h, k.detach())  # [R, M] @ [M, D]
            elif need_q:
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
            elif acc is not None:
                dk[c0:c1] += blk
            else:
                dk[c0:c1] = blk
            del h
    if acc is not None:
        dq = dk = None
    return (dq, dk) + common.scalar_grads(spec, da, gsum, alpha, bias)


def forward_dq(spec: TileSpec, q, k, alpha, bias, aux: TileAux):
    """SigLIP's forward fused into the row H pass (``FWD_STATS``): what
    ``bounded._forward_dq_impl`` returns, (stats [1, N] fp32, u [N, D] in q.dtype =
    dq(g = 1) / N, qdot [N] = <q_i, dq_i(g = 1)>, gsum [N] = sum_j G_ij(g = 1)), for the logits
    once and one GEMM (4 N M D; the backward's column pass makes it 8). The kernel runs with
    g_i = 1 / N, so H is already at u's scale and u = H k is rounded once; its partial sums are
    scaled back by N. qdot = sum_j G_ij (x_ij - b) (math.md 1.5, 2.2)."""
    common._check(q, k)
    n, m = q.shape[0], k.shape[0]
    dev, f32 = q.device, torch.float32
    stats, u, qdot, gsum = fwd_dq_outputs(spec, q)
    if n == 0 or m == 0:
        return stats, u, qdot, gsum
    flags = common._flags()
    g = torch.full((spec.n_stats, n), 1.0 / n, device=dev, dtype=f32)
    none, inone = common._dummy(dev, f32), common._dummy(dev, torch.int64)
    b = bias.detach().to(device=dev, dtype=f32) if flags_bias(spec, bias) else None
    ncb = -(-m // 16)  # room for the partials of any BN >= 16
    for r0, r1 in _spans(n, max(1, workspace_bytes() // (m * q.element_size()))):
        part = torch.zeros(3, r1 - r0, ncb, device=dev, dtype=f32)
        al = alpha if alpha.dim() == 0 else alpha[r0:r1]
        h = _h_block(spec, flags, bias, q[r0:r1], k, al, _rows_aux(aux, r0, r1),
                     (stats[:, r0:r1], g[:, r0:r1], none, none), inone, none, 0, part, False,
                     fwd_stats=True)
        u[r0:r1] = torch.matmul(h, k.detach())  # [R, M] @ [M, D]
        del h
        g1, gx = part[0].sum(1) * n, part[1].sum(1) * n
        stats[spec.i_sig, r0:r1] = part[2].sum(1)
        gsum[r0:r1] = g1
        qdot[r0:r1] = gx if b is None else gx - b * g1
    return stats, u, qdot, gsum
