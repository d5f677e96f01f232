"""The backward pass of the tile template: ``_lse_bwd_kernel`` and the recomputed tile it shares
with the gemm backward's H kernel (``gemm_h.py``).

``saved`` (a ``tile.Saved``): the forward's statistics and their upstream gradients.
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
    _load_alpha,
    _load_bias,
    _softplus_sum,
    _sum_mask,
    _tile,
)


@triton.jit
def _load_lse_g(st_ptr, g_ptr, o, m_o):
    """Saved lse and its upstream g; an empty accumulator (lse = -inf) gets g = 0, lse = 0."""
    b_lse = tl.load(st_ptr + o, mask=m_o, other=0.0)
    b_g = tl.load(g_ptr + o, mask=m_o, other=0.0)
    m_empty = b_lse == NEG_INF
    return tl.where(m_empty, 0.0, b_lse), tl.where(m_empty, 0.0, b_g)


@triton.jit
def _load_col_stats(saved, o_n, m_n, SPEC: tl.constexpr, BN: tl.constexpr):
    """(column LSE, its upstream g) of columns o_n: zeros without COL_LSE."""
    if SPEC.COL_LSE:
        b_lsec, b_gc = _load_lse_g(saved.colst_ptr, saved.gc_ptr, o_n, m_n)
    else:
        b_lsec = tl.zeros([BN], dtype=tl.float32)
        b_gc = tl.zeros([BN], dtype=tl.float32)
    return b_lsec, b_gc


@triton.jit
def _load_row_stats(saved, o_m, m_m, SPEC: tl.constexpr, BM: tl.constexpr):
    """What G reads of rows o_m (a tuple, ``_tile_grad``'s ``rows``): (lse^1, g^1, lse^2, g^2,
    g^lin, g^sig), zeros for the statistics the spec has not."""
    st_ptr, g_ptr, s_st = saved.st_ptr, saved.g_ptr, saved.s_st
    b_zero = tl.zeros([BM], dtype=tl.float32)
    b_lse0, b_g0, b_lse1, b_g1, b_glin, b_gsig = b_zero, b_zero, b_zero, b_zero, b_zero, b_zero
    if SPEC.N_SUMS >= 1:
        b_lse0, b_g0 = _load_lse_g(st_ptr, g_ptr, o_m, m_m)
    if SPEC.N_SUMS >= 2:
        b_lse1, b_g1 = _load_lse_g(st_ptr + s_st, g_ptr + s_st, o_m, m_m)
    if SPEC.LIN:
        b_glin = tl.load(g_ptr + SPEC.N_SUMS * s_st + o_m, mask=m_m, other=0.0)
    if SPEC.SIG:
        b_gsig = tl.load(g_ptr + (SPEC.N_SUMS + 2 * SPEC.LIN) * s_st + o_m, mask=m_m, other=0.0)
    return b_lse0, b_g0, b_lse1, b_g1, b_glin, b_gsig


@triton.jit
def _sum_grad(b_x, m_allowed, m_y, b_w, b_lse, b_g, C: tl.constexpr, B: tl.constexpr,
              W: tl.constexpr):
    """One accumulator's share of G: g_i beta pi_ij, pi_ij = [cols] w_ij exp(beta x_ij - lse_i)
    (math.md 1.2)."""
    m_s = _sum_mask(m_allowed, m_y, b_w, C, W)
    b_p = tl.exp(tl.where(m_s, b_x * B - b_lse[:, None], NEG_INF))
    if W:
        b_p = b_p * b_w
    return b_p * (b_g * B)[:, None]


@triton.jit
def _tile_grad(b_x, m_allowed, m_y, b_w, rows, cols, SPEC: tl.constexpr):
    """G_ij = sum_k g^k_i beta_k pi^k_ij + g^lin_i Y_ij + g^sig_i (sigmoid(x_ij) - Y_ij)
    + g^c_j exp(x_ij - lse^c_j), pi^k_ij = [cols^k] w_ij exp(beta_k x_ij - lse^k_i) (math.md 1.2,
    2.1, 2.2); exactly tilecl._torch_tiled._tile_grad."""
    b_lse0, b_g0, b_lse1, b_g1, b_glin, b_gsig = rows
    b_lsec, b_gc = cols
    b_G = tl.zeros_like(b_x)
    if SPEC.N_SUMS >= 1:
        b_G += _sum_grad(b_x, m_allowed, m_y, b_w, b_lse0, b_g0, SPEC.C0, SPEC.B0, SPEC.W0)
    if SPEC.N_SUMS >= 2:
        b_G += _sum_grad(b_x, m_allowed, m_y, b_w, b_lse1, b_g1, SPEC.C1, SPEC.B1, SPEC.W1)
    if SPEC.LIN:
        b_G += tl.where(m_y, b_glin[:, None], 0.0)
    if SPEC.SIG:
        b_s = tl.sigmoid(b_x) - m_y.to(tl.float32)
        b_G += tl.where(m_allowed, b_s, 0.0) * b_gsig[:, None]
    if SPEC.COL_LSE:
        b_G += tl.exp(tl.where(m_allowed, b_x - b_lsec[None, :], NEG_INF)) * b_gc[None, :]
    return b_G


@triton.jit
def _tile_h(b_G, b_inner, a_i, SPEC: tl.constexpr):
    """H = dL/d<q_i, k_j> = alpha_i G (dot), or the distance factor of math.md 1.4:
    x = -a d2^(g/2) => H = a g d2^(g/2 - 1) G, dq_i = sum_j H_ij (k_j - q_i); a duplicate (d2 = 0,
    DIST2_EPS) gets the subgradient 0."""
    if SPEC.DIST:
        if SPEC.GAMMA == 2.0:
            b_h = b_G * (2.0 * a_i)[:, None]
        else:
            m_zero = b_inner == 0.0
            b_f = tl.exp2(tl.log2(tl.where(m_zero, 1.0, b_inner)) * (SPEC.GAMMA * 0.5 - 1.0))
            b_h = b_G * (a_i[:, None] * SPEC.GAMMA) * tl.where(m_zero, 0.0, b_f)
    else:
        b_h = b_G * a_i[:, None]
    return b_h


@triton.jit
def _tile_backward(q_ptr, k_ptr, side, shape, strides, D, o_m, m_m, o_n, m_n, a_i, bias, rows,
                   cols, SPEC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """One recomputed [BM, BN] tile of the backward, shared by the dq and dk passes and the H
    kernel: the logits x, G = dL/dx from the saved statistics (math.md 1.2; ``rows`` and
    ``cols`` as loaded by ``_load_row_stats`` / ``_load_col_stats``), H = dL/d<q_i, k_j> (1.3,
    1.4) and the tile's masks (allowed, positive)."""
    b_x, b_inner, m_allowed, m_y, b_w = _tile(q_ptr, k_ptr, side, shape, strides, D, o_m, m_m,
                                              o_n, m_n, a_i, bias, SPEC, PRECISION, UPCAST, BM,
                                              BN, BK)
    b_G = _tile_grad(b_x, m_allowed, m_y, b_w, rows, cols, SPEC)
    return b_x, b_G, _tile_h(b_G, b_inner, a_i, SPEC), m_allowed, m_y


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


@triton.jit
def _load_chunk(x_ptr, o_r, m_r, s_r, s_d, o_d, m_d):
    """Rows o_r of x [R, D] at the D chunk o_d: [len(o_r), BD] in x's dtype, 0 outside."""
    return tl.load(x_ptr + o_r[:, None] * s_r + o_d[None, :] * s_d,
                   mask=m_r[:, None] & m_d[None, :], other=0.0)


@triton.jit
def _dk_pass(q_ptr, k_ptr, side, shape, strides, D, SPEC: tl.constexpr, saved, out_ptr, s_on,
             s_od, i_p, o_d, m_d, bias, PRECISION: tl.constexpr,
             PRECISION2: tl.constexpr, UPCAST: tl.constexpr, H16: tl.constexpr,
             HSCALE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
             BD: tl.constexpr):
    """dk[columns of block i_p, chunk o_d] = sum_i H_ij q_i (math.md 1.3; distance logits:
    minus (sum_i H_ij) k_j, 1.4), sweeping every row tile."""
    o_n = i_p * BN + tl.arange(0, BN)
    m_n = o_n < shape.M
    cols = _load_col_stats(saved, o_n, m_n, SPEC, BN)
    b_acc = tl.zeros([BN, BD], dtype=tl.float32)
    b_hs = tl.zeros([BN], dtype=tl.float32)
    for i0 in range(0, shape.N, BM):
        o_m = i0 + tl.arange(0, BM).to(tl.int64)
        m_m = o_m < shape.N
        a_i = _load_alpha(side, strides, o_m, m_m)
        rows = _load_row_stats(saved, o_m, m_m, SPEC, BM)
        b_x, b_G, b_h, m_allowed, m_y = _tile_backward(
            q_ptr, k_ptr, side, shape, strides, D, o_m, m_m, o_n, m_n, a_i, bias, rows, cols,
            SPEC, PRECISION, UPCAST, BM, BN, BK)
        b_q = _load_chunk(q_ptr, o_m, m_m, strides.qn, strides.qd, o_d, m_d)
        b_acc = _grad_dot(tl.trans(b_h), b_q, b_acc, H16, HSCALE, PRECISION2)  # [BN, BM] @ [BM, BD]
        if SPEC.DIST:
            b_hs += tl.sum(b_h, axis=0)
    if SPEC.DIST:  # dk_j = sum_i H_ij q_i - (sum_i H_ij) k_j
        b_k = _load_chunk(k_ptr, o_n, m_n, strides.kn, strides.kd, o_d, m_d).to(tl.float32)
        b_acc -= b_hs[:, None] * b_k
    p_o = out_ptr + o_n[:, None] * s_on + o_d[None, :] * s_od
    tl.store(p_o, b_acc, mask=m_n[:, None] & m_d[None, :])


@triton.jit
def _dq_pass(q_ptr, k_ptr, side, shape, strides, D, SPEC: tl.constexpr, saved, out_ptr,
             gsum_ptr, gx_ptr, s_on, s_od, i_p, i_d, o_d, m_d, bias,
             FWD_STATS: tl.constexpr, PRECISION: tl.constexpr, PRECISION2: tl.constexpr,
             UPCAST: tl.constexpr, H16: tl.constexpr, HSCALE: tl.constexpr, BM: tl.constexpr,
             BN: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr):
    """dq[rows of block i_p, chunk o_d] = sum_j H_ij k_j (math.md 1.3; distance logits: minus
    (sum_j H_ij) q_i, 1.4), sweeping every column tile; the first D chunk also writes the rows'
    sum_j G_ij x_ij (gx), sum_j G_ij (gsum) and, with FWD_STATS, the softplus sums."""
    o_m = i_p * BM + tl.arange(0, BM)
    m_m = o_m < shape.N
    a_i = _load_alpha(side, strides, o_m, m_m)
    rows = _load_row_stats(saved, o_m, m_m, SPEC, BM)
    b_acc = tl.zeros([BM, BD], dtype=tl.float32)
    b_hs = tl.zeros([BM], dtype=tl.float32)
    b_gx = tl.zeros([BM], dtype=tl.float32)
    b_gs = tl.zeros([BM], dtype=tl.float32)
    b_sig = tl.zeros([BM], dtype=tl.float32)
    for j0 in range(0, shape.M, BN):
        o_n = j0 + tl.arange(0, BN).to(tl.int64)
        m_n = o_n < shape.M
        cols = _load_col_stats(saved, o_n, m_n, SPEC, BN)
        b_x, b_G, b_h, m_allowed, m_y = _tile_backward(
            q_ptr, k_ptr, side, shape, strides, D, o_m, m_m, o_n, m_n, a_i, bias, rows, cols,
            SPEC, PRECISION, UPCAST, BM, BN, BK)
        b_k = _load_chunk(k_ptr, o_n, m_n, strides.kn, strides.kd, o_d, m_d)
        b_acc = _grad_dot(b_h, b_k, b_acc, H16, HSCALE, PRECISION2)  # [BM, BN] @ [BN, BD]
        if SPEC.DIST:
            b_hs += tl.sum(b_h, axis=1)
            b_gx += tl.sum(b_G * b_x, axis=1)
        if SPEC.SIG and SPEC.HAS_BIAS:
            b_gs += tl.sum(b_G, axis=1)
        if FWD_STATS:  # the loss statistic once per tile: in the first D chunk, which stores it
            if i_d == 0:
                b_sig += _softplus_sum(b_x, m_allowed, m_y)
    if SPEC.DIST:  # dq_i = sum_j H_ij k_j - (sum_j H_ij) q_i
        b_q = _load_chunk(q_ptr, o_m, m_m, strides.qn, strides.qd, o_d, m_d).to(tl.float32)
        b_acc -= b_hs[:, None] * b_q
    p_o = out_ptr + o_m[:, None] * s_on + o_d[None, :] * s_od
    tl.store(p_o, b_acc, mask=m_m[:, None] & m_d[None, :])
    m_first = m_m & (i_d == 0)
    if SPEC.DIST:
        tl.store(gx_ptr + o_m, b_gx, mask=m_first)
    if SPEC.SIG and SPEC.HAS_BIAS:
        tl.store(gsum_ptr + o_m, b_gs, mask=m_first)
    if FWD_STATS:
        p_sig = saved.st_ptr + (SPEC.N_SUMS + 2 * SPEC.LIN) * saved.s_st
        tl.store(p_sig + o_m, b_sig, mask=m_first)


@_autotuned(True)
@_heuristics(True)
@triton.jit
def _lse_bwd_kernel(
    q_ptr, k_ptr, side, shape, strides, D, SPEC: tl.constexpr,
    saved, out_ptr, gsum_ptr, gx_ptr, s_on, s_od,
    TRANS: tl.constexpr, FWD_STATS: tl.constexpr,
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
    bias = _load_bias(side, SPEC)
    if TRANS:
        _dk_pass(q_ptr, k_ptr, side, shape, strides, D, SPEC, saved, out_ptr, s_on, s_od, i_p,
                 o_d, m_d, bias, PRECISION, PRECISION2, UPCAST, H16, HSCALE, BM, BN, BK, BD)
    else:
        _dq_pass(q_ptr, k_ptr, side, shape, strides, D, SPEC, saved, out_ptr, gsum_ptr, gx_ptr,
                 s_on, s_od, i_p, i_d, o_d, m_d, bias, FWD_STATS, PRECISION, PRECISION2, UPCAST,
                 H16, HSCALE, BM, BN, BK, BD)
