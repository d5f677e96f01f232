"""The forward pass of the tile template: ``_lse_fwd_kernel``.

A program sweeps a block of rows q [N, D] against every column tile of k [M, D] and writes the
per-row statistics of ``tilecl._spec.TileSpec`` ([S, N] fp32: lse^1, lse^2, lin, cnt, sig) and,
with ``COL_ATOMIC``, the column sums of symmetric CLIP in the same sweep; with ``TRANS`` it sweeps
a block of columns against every row tile and writes the column LSE (math.md 2.1) instead: the
exact pass, for the columns whose atomic sum is unusable or on request. Nothing N x M ever
reaches global memory.
"""

import triton
import triton.language as tl

from .tile import (
    NEG_INF,
    _autotuned,
    _finish_lse,
    _heuristics,
    _load_alpha,
    _load_bias,
    _online_lse,
    _softplus_sum,
    _sum_mask,
    _tile,
)
from .topk import _KEY_NONE, _topk_init, _topk_merge, _topk_unpack


# cacc_ptr: the column sums of symmetric CLIP, cacc_j += sum_i exp(x_ij - cref_j) (COL_ATOMIC)
@_autotuned(False, reset_to_zero=["cacc_ptr"])
@_heuristics(False)
@triton.jit
def _lse_fwd_kernel(
    q_ptr, k_ptr, side, shape, strides, D, SPEC: tl.constexpr,
    st_ptr, col_ptr, tv_ptr, ti_ptr, cref_ptr, cacc_ptr, cidx_ptr, s_st,
    TRANS: tl.constexpr, COL_ATOMIC: tl.constexpr, COL_GATHER: tl.constexpr,
    TOPK: tl.constexpr, TOPK_P2: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """Row statistics [S, N] (TRANS false) or the column LSE [M] (TRANS true) of q against k.

    Row pass with TOPK > 0: also each row's TOPK largest logits over its allowed non-positive
    columns, descending (tv [N, TOPK] fp32), and their global columns (ti [N, TOPK] int64),
    padded with -inf / -1. TOPK_P2 = next power of two >= TOPK (the register list's width).
    Row pass with COL_ATOMIC: also the column sums of symmetric CLIP against fixed per-column
    references, cacc_j += sum_i exp(x_ij - cref_j) (fp32 atomics; the launcher turns them into
    the column LSE and recomputes the few columns whose sum under- or overflowed).
    Column pass with COL_GATHER: only the M columns listed in cidx (int64), for that fallback.
    """
    i_p = tl.program_id(0).to(tl.int64)
    N, M = shape.N, shape.M
    bias = _load_bias(side, SPEC)
    if TRANS:
        # column LSE of symmetric CLIP (math.md 2.1): this program owns BN columns, sweeps rows
        o_c = i_p * BN + tl.arange(0, BN)
        m_n = o_c < M
        if COL_GATHER:
            o_n = tl.load(cidx_ptr + o_c, mask=m_n, other=0)
        else:
            o_n = o_c
        b_mc = tl.full([BN], NEG_INF, dtype=tl.float32)
        b_lc = tl.zeros([BN], dtype=tl.float32)
        for i0 in range(0, N, BM):
            o_m = i0 + tl.arange(0, BM).to(tl.int64)
            m_m = o_m < N
            a_i = _load_alpha(side, strides, o_m, m_m)
            b_x, b_inner, m_allowed, m_y, b_w = _tile(q_ptr, k_ptr, side, shape, strides, D, o_m,
                                                      m_m, o_n, m_n, a_i, bias, SPEC, PRECISION,
                                                      UPCAST, BM, BN, BK)
            b_mc, b_lc = _online_lse(b_x, m_allowed, b_x, b_mc, b_lc, False, 0)
        tl.store(col_ptr + o_n, _finish_lse(b_mc, b_lc), mask=m_n)
    else:
        o_m = i_p * BM + tl.arange(0, BM)
        m_m = o_m < N
        a_i = _load_alpha(side, strides, o_m, m_m)
        b_m0 = tl.full([BM], NEG_INF, dtype=tl.float32)
        b_l0 = tl.zeros([BM], dtype=tl.float32)
        b_m1 = tl.full([BM], NEG_INF, dtype=tl.float32)
        b_l1 = tl.zeros([BM], dtype=tl.float32)
        b_lin = tl.zeros([BM], dtype=tl.float32)
        b_cnt = tl.zeros([BM], dtype=tl.float32)
        b_sig = tl.zeros([BM], dtype=tl.float32)
        if TOPK > 0:
            b_top = _topk_init(BM, TOPK_P2, TOPK)
        for j0 in range(0, M, BN):
            o_n = j0 + tl.arange(0, BN).to(tl.int64)
            m_n = o_n < M
            b_x, b_inner, m_allowed, m_y, b_w = _tile(q_ptr, k_ptr, side, shape, strides, D, o_m,
                                                      m_m, o_n, m_n, a_i, bias, SPEC, PRECISION,
                                                      UPCAST, BM, BN, BK)
            # lse^k = log sum_j [cols^k] w_ij exp(beta_k x_ij), own running max each (math.md 1.1)
            if SPEC.N_SUMS >= 1:
                m_s = _sum_mask(m_allowed, m_y, b_w, SPEC.C0, SPEC.W0)
                b_m0, b_l0 = _online_lse(b_x * SPEC.B0, m_s, b_w, b_m0, b_l0, SPEC.W0, 1)
            if SPEC.N_SUMS >= 2:
                m_s = _sum_mask(m_allowed, m_y, b_w, SPEC.C1, SPEC.W1)
                b_m1, b_l1 = _online_lse(b_x * SPEC.B1, m_s, b_w, b_m1, b_l1, SPEC.W1, 1)
            if SPEC.LIN:  # SupCon L_out: sum of positive logits and their count (math.md 4.1)
                b_lin += tl.sum(tl.where(m_y, b_x, 0.0), axis=1)
                b_cnt += tl.sum(m_y.to(tl.float32), axis=1)
            if SPEC.SIG:
                b_sig += _softplus_sum(b_x, m_allowed, m_y)
            if COL_ATOMIC:  # column sums against cref_j >= max_i x_ij - 64 (no overflow)
                b_ref = tl.load(cref_ptr + o_n, mask=m_n, other=0.0)
                b_pc = tl.exp(tl.where(m_allowed, b_x - b_ref[None, :], NEG_INF))
                tl.atomic_add(cacc_ptr + o_n, tl.sum(b_pc, axis=0), mask=m_n, sem="relaxed")
            if TOPK > 0:  # hardest negatives: allowed (not excluded, not dropped), not positive
                b_top = _topk_merge(b_top, b_x, m_allowed & ~m_y, o_n)
        p_st = st_ptr + o_m
        if SPEC.N_SUMS >= 1:
            tl.store(p_st, _finish_lse(b_m0, b_l0), mask=m_m)
        if SPEC.N_SUMS >= 2:
            tl.store(p_st + s_st, _finish_lse(b_m1, b_l1), mask=m_m)
        if SPEC.LIN:
            tl.store(p_st + SPEC.N_SUMS * s_st, b_lin, mask=m_m)
            tl.store(p_st + (SPEC.N_SUMS + 1) * s_st, b_cnt, mask=m_m)
        if SPEC.SIG:
            tl.store(p_st + (SPEC.N_SUMS + 2 * SPEC.LIN) * s_st, b_sig, mask=m_m)
        if TOPK > 0:  # sorted, local column -> global, empty slot (-inf) -> -1
            o_t = tl.arange(0, TOPK_P2)
            b_top = tl.sort(tl.where(o_t[None, :] < TOPK, b_top, _KEY_NONE), 1, descending=True)
            b_tv, b_tc = _topk_unpack(b_top)
            b_ti = tl.where(b_tv == NEG_INF, -1, b_tc + shape.col_offset)
            p_t = o_m[:, None] * TOPK + o_t[None, :]
            m_t = m_m[:, None] & (o_t[None, :] < TOPK)
            tl.store(tv_ptr + p_t, b_tv, mask=m_t)
            tl.store(ti_ptr + p_t, b_ti, mask=m_t)
