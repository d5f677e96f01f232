"""The backward pass of the tile template: ``_lse_bwd_kernel`` and the recomputed tile it shares
with the gemm backward's H kernel (``gemm_h.py``).

Each program recomputes its tiles, forms G_ij from the saved statistics and dL/dstats (math.md
1.2), and accumulates either dq (row-parallel, ``TRANS`` false) or dk (column-parallel, ``TRANS``
true) for one chunk of D, in fp32 registers; for SigLIP its dq pass is also the forward
(``FWD_STATS``).
"""

import triton
import triton.language as tl

from .tile import (
    NEG_INF,
    _autotuned,
    _heuristics,
    _softplus_sum,
    _sum_mask,
    _tile_logits,
    _tile_masks,
    _tile_weights,
)


@triton.jit
def _load_lse_g(st_ptr, g_ptr, o, m_o):
    """Saved lse and its upstream g; an empty accumulator (lse = -inf) gets g = 0, lse = 0."""
    b_lse = tl.load(st_ptr + o, mask=m_o, other=0.0)
    b_g = tl.load(g_ptr + o, mask=m_o, other=0.0)
    m_empty = b_lse == NEG_INF
    return tl.where(m_empty, 0.0, b_lse), tl.where(m_empty, 0.0, b_g)


@triton.jit
def _load_col_stats(colst_ptr, gc_ptr, o_n, m_n, BN: tl.constexpr, COL_LSE: tl.constexpr):
    if COL_LSE:
        b_lsec, b_gc = _load_lse_g(colst_ptr, gc_ptr, o_n, m_n)
    else:
        b_lsec = tl.zeros([BN], dtype=tl.float32)
        b_gc = tl.zeros([BN], dtype=tl.float32)
    return b_lsec, b_gc


@triton.jit
def _load_row_stats(st_ptr, g_ptr, s_st, o_m, m_m, BM: tl.constexpr, N_SUMS: tl.constexpr,
                    LIN: tl.constexpr, SIG: tl.constexpr):
    b_zero = tl.zeros([BM], dtype=tl.float32)
    b_lse0, b_g0, b_lse1, b_g1, b_glin, b_gsig = b_zero, b_zero, b_zero, b_zero, b_zero, b_zero
    if N_SUMS >= 1:
        b_lse0, b_g0 = _load_lse_g(st_ptr, g_ptr, o_m, m_m)
    if N_SUMS >= 2:
        b_lse1, b_g1 = _load_lse_g(st_ptr + s_st, g_ptr + s_st, o_m, m_m)
    if LIN:
        b_glin = tl.load(g_ptr + N_SUMS * s_st + o_m, mask=m_m, other=0.0)
    if SIG:
        b_gsig = tl.load(g_ptr + (N_SUMS + 2 * LIN) * s_st + o_m, mask=m_m, other=0.0)
    return b_lse0, b_g0, b_lse1, b_g1, b_glin, b_gsig


@triton.jit
def _tile_grad(b_x, m_allowed, m_y, b_w, b_lse0, b_g0, b_lse1, b_g1, b_glin, b_gsig, b_lsec, b_gc,
               N_SUMS: tl.constexpr, C0: tl.constexpr, B0: tl.constexpr, W0: tl.constexpr,
               C1: tl.constexpr, B1: tl.constexpr, W1: tl.constexpr, LIN: tl.constexpr,
               SIG: tl.constexpr, COL_LSE: tl.constexpr):
    """G_ij = sum_k g^k_i beta_k pi^k_ij + g^lin_i Y_ij + g^sig_i (sigmoid(x_ij) - Y_ij)
    + g^c_j exp(x_ij - lse^c_j), pi^k_ij = [cols^k] w_ij exp(beta_k x_ij - lse^k_i) (math.md 1.2,
    2.1, 2.2); exactly tilecl._torch_tiled._tile_grad."""
    b_G = tl.zeros_like(b_x)
    if N_SUMS >= 1:
        m_s = _sum_mask(m_allowed, m_y, b_w, C0, W0)
        b_p = tl.exp(tl.where(m_s, b_x * B0 - b_lse0[:, None], NEG_INF))
        if W0:
            b_p = b_p * b_w
        b_G += b_p * (b_g0 * B0)[:, None]
    if N_SUMS >= 2:
        m_s = _sum_mask(m_allowed, m_y, b_w, C1, W1)
        b_p = tl.exp(tl.where(m_s, b_x * B1 - b_lse1[:, None], NEG_INF))
        if W1:
            b_p = b_p * b_w
        b_G += b_p * (b_g1 * B1)[:, None]
    if LIN:
        b_G += tl.where(m_y, b_glin[:, None], 0.0)
    if SIG:
        b_s = tl.sigmoid(b_x) - m_y.to(tl.float32)
        b_G += tl.where(m_allowed, b_s, 0.0) * b_gsig[:, None]
    if COL_LSE:
        b_G += tl.exp(tl.where(m_allowed, b_x - b_lsec[None, :], NEG_INF)) * b_gc[None, :]
    return b_G


@triton.jit
def _tile_h(b_G, b_inner, a_i, DIST: tl.constexpr, GAMMA: tl.constexpr):
    """H = dL/d<q_i, k_j> = alpha_i G (dot), or the distance factor of math.md 1.4:
    x = -a d2^(g/2) => H = a g d2^(g/2 - 1) G, dq_i = sum_j H_ij (k_j - q_i); a duplicate (d2 = 0,
    DIST2_EPS) gets the subgradient 0."""
    if DIST:
        if GAMMA == 2.0:
            b_h = b_G * (2.0 * a_i)[:, None]
        else:
            m_zero = b_inner == 0.0
            b_f = tl.exp2(tl.log2(tl.where(m_zero, 1.0, b_inner)) * (GAMMA * 0.5 - 1.0))
            b_h = b_G * (a_i[:, None] * GAMMA) * tl.where(m_zero, 0.0, b_f)
    else:
        b_h = b_G * a_i[:, None]
    return b_h


@triton.jit
def _tile_backward(q_ptr, k_ptr, excl_ptr, pos_ptr, labq_ptr, labk_ptr, thr_ptr, w_ptr, wa_ptr,
                   wb_ptr, s_qn, s_qd, s_kn, s_kd, s_wn, s_ww, s_an, s_ar, s_bn, s_br, D, MW, R,
                   col_offset, o_m, m_m, o_n, m_n, a_i, bias, b_lse0, b_g0, b_lse1, b_g1, b_glin,
                   b_gsig, b_lsec, b_gc, DIST: tl.constexpr, GAMMA: tl.constexpr,
                   HAS_BIAS: tl.constexpr, HAS_EXCL: tl.constexpr, HAS_THRESH: tl.constexpr,
                   POSITIVE: tl.constexpr, WEIGHT: tl.constexpr, CLIP: tl.constexpr,
                   N_SUMS: tl.constexpr, C0: tl.constexpr, B0: tl.constexpr, W0: tl.constexpr,
                   C1: tl.constexpr, B1: tl.constexpr, W1: tl.constexpr,
                   LIN: tl.constexpr, SIG: tl.constexpr, COL_LSE: tl.constexpr,
                   PRECISION: tl.constexpr, UPCAST: tl.constexpr, BM: tl.constexpr,
                   BN: tl.constexpr, BK: tl.constexpr):
    """One recomputed [BM, BN] tile of the backward, shared by the dq and dk passes: the logits
    x, G = dL/dx from the saved statistics (math.md 1.2), H = dL/d<q_i, k_j> (1.3, 1.4) and
    the tile's masks (allowed, positive)."""
    b_x, b_inner = _tile_logits(q_ptr, k_ptr, s_qn, s_qd, s_kn, s_kd, o_m, m_m, o_n, m_n,
                                a_i, bias, D, BM, BN, BK, DIST, GAMMA, HAS_BIAS, UPCAST,
                                PRECISION)
    m_allowed, m_y = _tile_masks(excl_ptr, pos_ptr, labq_ptr, labk_ptr, thr_ptr, col_offset,
                                 o_m, m_m, o_n, m_n, b_x, HAS_EXCL, POSITIVE, HAS_THRESH)
    b_w = _tile_weights(w_ptr, s_wn, s_ww, MW, wa_ptr, s_an, s_ar, wb_ptr, s_bn, s_br, R,
                        col_offset, o_m, m_m, o_n, m_n, BM, BN, WEIGHT, CLIP)
    b_G = _tile_grad(b_x, m_allowed, m_y, b_w, b_lse0, b_g0, b_lse1, b_g1, b_glin,
                     b_gsig, b_lsec, b_gc, N_SUMS, C0, B0, W0, C1, B1, W1, LIN, SIG,
                     COL_LSE)
    return b_x, b_G, _tile_h(b_G, b_inner, a_i, DIST, GAMMA), m_allowed, m_y


@triton.jit
def _grad_dot(b_h, b_v, b_acc, H16: tl.constexpr, HSCALE: tl.constexpr, PRECISION2: tl.constexpr):
    """b_acc + b_h @ b_v with fp32 accumulation: [A, B] @ [B, BD].

    fp32 inputs: fp32 operands at PRECISION2. bf16: G cast to bf16 (FlashAttention's choice; same
    exponent range as fp32). fp16: c * P * alpha underflows fp16 (math.md 9.12), so the tile is
    scaled by a power of two (exact) that brings its largest |H| to [2^14, 2^15), split into
    hi + lo fp16 parts (22-bit significand, as accurate as fp32 H against fp16 k) and multiplied in
    two tensor-core dots; the product is scaled back in fp32. The second dot (fp16 only) is what
    the loss-level fp16 parity tests need: with H in fp16 alone, CCL-K's low-rank case exceeded
    2x PyTorch's own fp16 error.
    """
    if H16:
        if HSCALE:
            b_amax = tl.max(tl.max(tl.abs(b_h), axis=1), axis=0)
            b_e = tl.where(b_amax > 0.0, tl.floor(tl.log2(tl.where(b_amax > 0.0, b_amax, 1.0))),
                           0.0)
            b_sc = tl.exp2(14.0 - b_e)
            b_hs = b_h * b_sc
            b_hi = b_hs.to(b_v.dtype)
            b_lo = (b_hs - b_hi.to(tl.float32)).to(b_v.dtype)
            b_p = tl.dot(b_hi, b_v)  # [A, B] @ [B, BD]
            b_p = tl.dot(b_lo, b_v, b_p)  # [A, B] @ [B, BD]
            b_acc += b_p * (1.0 / b_sc)
        else:
            b_acc = tl.dot(b_h.to(b_v.dtype), b_v, b_acc)  # [A, B] @ [B, BD]
    else:
        b_acc = tl.dot(b_h, b_v.to(tl.float32), b_acc, input_precision=PRECISION2)  # [A, B] @ [B, BD]
    return b_acc


@_autotuned(True)
@_heuristics(True)
@triton.jit
def _lse_bwd_kernel(
    q_ptr, k_ptr, a_ptr, bias_ptr, excl_ptr, pos_ptr, labq_ptr, labk_ptr, thr_ptr, w_ptr, wa_ptr,
    wb_ptr, st_ptr, g_ptr, colst_ptr, gc_ptr, out_ptr, gsum_ptr, gx_ptr,
    N, M, D, MW, R, col_offset,
    s_qn, s_qd, s_kn, s_kd, s_a, s_wn, s_ww, s_an, s_ar, s_bn, s_br, s_st, s_on, s_od,
    DIST: tl.constexpr, GAMMA: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_EXCL: tl.constexpr,
    HAS_THRESH: tl.constexpr,
    POSITIVE: tl.constexpr, WEIGHT: tl.constexpr, CLIP: tl.constexpr, N_SUMS: tl.constexpr,
    C0: tl.constexpr, B0: tl.constexpr, W0: tl.constexpr,
    C1: tl.constexpr, B1: tl.constexpr, W1: tl.constexpr,
    LIN: tl.constexpr, SIG: tl.constexpr, COL_LSE: tl.constexpr, TRANS: tl.constexpr,
    FWD_STATS: tl.constexpr,
    PRECISION: tl.constexpr, PRECISION2: tl.constexpr, UPCAST: tl.constexpr, H16: tl.constexpr,
    HSCALE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr,
):
    """dq[:, chunk] (TRANS false, grid rows x D-chunks) or dk[:, chunk] (TRANS true, grid
    columns x D-chunks), fp32, written once. Row pass also writes sum_j G_ij x_ij (gx, distance
    logits' scale gradient) and sum_j G_ij (gsum, SigLIP bias) from its first D chunk.

    FWD_STATS (row pass, SigLIP only: G_ij = g_i (sigmoid(x_ij) - Y_ij) needs no statistic): the
    forward and the dq pass in one sweep (math.md 1.6). Run with g = 1, it also writes the row's
    softplus sum, the loss statistic, into st (from its first D chunk); the autograd Function
    scales dq, gsum by the upstream g later, and only the dk pass is left for the backward."""
    i_p = tl.program_id(0).to(tl.int64)
    i_d = tl.program_id(1).to(tl.int64)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    if HAS_BIAS:
        bias = tl.load(bias_ptr).to(tl.float32)
    else:
        bias = 0.0
    if TRANS:
        o_n = i_p * BN + tl.arange(0, BN)
        m_n = o_n < M
        b_lsec, b_gc = _load_col_stats(colst_ptr, gc_ptr, o_n, m_n, BN, COL_LSE)
        b_acc = tl.zeros([BN, BD], dtype=tl.float32)
        b_hs = tl.zeros([BN], dtype=tl.float32)
        for i0 in range(0, N, BM):
            o_m = i0 + tl.arange(0, BM).to(tl.int64)
            m_m = o_m < N
            a_i = tl.load(a_ptr + o_m * s_a, mask=m_m, other=1.0).to(tl.float32)
            b_lse0, b_g0, b_lse1, b_g1, b_glin, b_gsig = _load_row_stats(
                st_ptr, g_ptr, s_st, o_m, m_m, BM, N_SUMS, LIN, SIG)
            b_x, b_G, b_h, m_allowed, m_y = _tile_backward(
                q_ptr, k_ptr, excl_ptr, pos_ptr, labq_ptr, labk_ptr, thr_ptr, w_ptr, wa_ptr,
                wb_ptr, s_qn, s_qd, s_kn, s_kd, s_wn, s_ww, s_an, s_ar, s_bn, s_br, D, MW, R,
                col_offset, o_m, m_m, o_n, m_n, a_i, bias, b_lse0, b_g0, b_lse1, b_g1, b_glin,
                b_gsig, b_lsec, b_gc, DIST, GAMMA, HAS_BIAS, HAS_EXCL, HAS_THRESH, POSITIVE,
                WEIGHT, CLIP, N_SUMS, C0, B0, W0, C1, B1, W1, LIN, SIG, COL_LSE, PRECISION,
                UPCAST, BM, BN, BK)
            p_q = q_ptr + o_m[:, None] * s_qn + o_d[None, :] * s_qd
            b_q = tl.load(p_q, mask=m_m[:, None] & m_d[None, :], other=0.0)
            b_acc = _grad_dot(tl.trans(b_h), b_q, b_acc, H16, HSCALE, PRECISION2)  # [BN, BM] @ [BM, BD]
            if DIST:
                b_hs += tl.sum(b_h, axis=0)
        if DIST:  # dk_j = sum_i H_ij q_i - (sum_i H_ij) k_j
            p_k = k_ptr + o_n[:, None] * s_kn + o_d[None, :] * s_kd
            b_k = tl.load(p_k, mask=m_n[:, None] & m_d[None, :], other=0.0).to(tl.float32)
            b_acc -= b_hs[:, None] * b_k
        p_o = out_ptr + o_n[:, None] * s_on + o_d[None, :] * s_od
        tl.store(p_o, b_acc, mask=m_n[:, None] & m_d[None, :])
    else:
        o_m = i_p * BM + tl.arange(0, BM)
        m_m = o_m < N
        a_i = tl.load(a_ptr + o_m * s_a, mask=m_m, other=1.0).to(tl.float32)
        b_lse0, b_g0, b_lse1, b_g1, b_glin, b_gsig = _load_row_stats(
            st_ptr, g_ptr, s_st, o_m, m_m, BM, N_SUMS, LIN, SIG)
        b_acc = tl.zeros([BM, BD], dtype=tl.float32)
        b_hs = tl.zeros([BM], dtype=tl.float32)
        b_gx = tl.zeros([BM], dtype=tl.float32)
        b_gs = tl.zeros([BM], dtype=tl.float32)
        b_sig = tl.zeros([BM], dtype=tl.float32)
        for j0 in range(0, M, BN):
            o_n = j0 + tl.arange(0, BN).to(tl.int64)
            m_n = o_n < M
            b_lsec, b_gc = _load_col_stats(colst_ptr, gc_ptr, o_n, m_n, BN, COL_LSE)
            b_x, b_G, b_h, m_allowed, m_y = _tile_backward(
                q_ptr, k_ptr, excl_ptr, pos_ptr, labq_ptr, labk_ptr, thr_ptr, w_ptr, wa_ptr,
                wb_ptr, s_qn, s_qd, s_kn, s_kd, s_wn, s_ww, s_an, s_ar, s_bn, s_br, D, MW, R,
                col_offset, o_m, m_m, o_n, m_n, a_i, bias, b_lse0, b_g0, b_lse1, b_g1, b_glin,
                b_gsig, b_lsec, b_gc, DIST, GAMMA, HAS_BIAS, HAS_EXCL, HAS_THRESH, POSITIVE,
                WEIGHT, CLIP, N_SUMS, C0, B0, W0, C1, B1, W1, LIN, SIG, COL_LSE, PRECISION,
                UPCAST, BM, BN, BK)
            p_k = k_ptr + o_n[:, None] * s_kn + o_d[None, :] * s_kd
            b_k = tl.load(p_k, mask=m_n[:, None] & m_d[None, :], other=0.0)
            b_acc = _grad_dot(b_h, b_k, b_acc, H16, HSCALE, PRECISION2)  # [BM, BN] @ [BN, BD]
            if DIST:
                b_hs += tl.sum(b_h, axis=1)
                b_gx += tl.sum(b_G * b_x, axis=1)
            if SIG and HAS_BIAS:
                b_gs += tl.sum(b_G, axis=1)
            if FWD_STATS:  # the loss statistic once per tile: in the first D chunk, which stores it
                if i_d == 0:
                    b_sig += _softplus_sum(b_x, m_allowed, m_y)
        p_q = q_ptr + o_m[:, None] * s_qn + o_d[None, :] * s_qd
        if DIST:  # dq_i = sum_j H_ij k_j - (sum_j H_ij) q_i
            b_q = tl.load(p_q, mask=m_m[:, None] & m_d[None, :], other=0.0).to(tl.float32)
            b_acc -= b_hs[:, None] * b_q
        p_o = out_ptr + o_m[:, None] * s_on + o_d[None, :] * s_od
        tl.store(p_o, b_acc, mask=m_m[:, None] & m_d[None, :])
        m_first = m_m & (i_d == 0)
        if DIST:
            tl.store(gx_ptr + o_m, b_gx, mask=m_first)
        if SIG and HAS_BIAS:
            tl.store(gsum_ptr + o_m, b_gs, mask=m_first)
        if FWD_STATS:
            tl.store(st_ptr + (N_SUMS + 2 * LIN) * s_st + o_m, b_sig, mask=m_first)
