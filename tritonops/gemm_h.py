"""The H kernel of the gemm backward: ``_lse_h_kernel`` writes H = dL/d<q_i, k_j> for a group of
rows (columns) so that library GEMMs form dq = H k and dk = H^T q (``tilecl._triton.gemm``)."""

import triton
import triton.language as tl

from .backward import _load_col_stats, _load_row_stats, _tile_backward
from .tile import _autotuned, _heuristics, _load_alpha, _load_bias, _softplus_sum


@_autotuned(False)
@_heuristics(False)
@triton.jit
def _lse_h_kernel(
    q_ptr, k_ptr, side, shape, strides, D, SPEC: tl.constexpr,
    saved, spos_ptr, gpos_ptr, h_ptr, part_ptr, spos_offset, s_hn, s_pn,
    TRANS: tl.constexpr, HAS_GPOS: tl.constexpr, PART: tl.constexpr, FWD_STATS: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """H = dL/d<q_i, k_j> [N, M] of dot logits, one [BM, BN] tile per program, stored in h's
    dtype: the backward as two library GEMMs (dq = H k, dk = H^T q) on row / column groups of H
    that the launcher keeps L2-sized, instead of a D-chunked gradient in registers.

    H_ij = a_i (G_ij + gpos_i [j == spos_i - spos_offset]) with G of _tile_grad (math.md 1.2)
    and, with HAS_GPOS, the positive pair's term that _autograd otherwise adds outside (math.md
    1.3), in fp32 before the cast. PART: per row and column block, sum_j G'_ij and
    sum_j G'_ij x_ij (G' with the positive term) into part [2, N, M / BN] (row stride s_pn): the
    SigLIP bias gradient and dalpha_i = (sum_j G'_ij x_ij - b sum_j G'_ij) / a_i (math.md 1.5).
    FWD_STATS (with PART, SigLIP): also the block's softplus sums, the loss statistic (math.md
    2.2), into part[2]: SigLIP's forward fused into the row H pass of the gemm backward.
    TRANS must be false.
    """
    i_m = tl.program_id(0).to(tl.int64)
    i_n = tl.program_id(1).to(tl.int64)
    N = shape.N
    o_m = i_m * BM + tl.arange(0, BM)
    m_m = o_m < N
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < shape.M
    a_i = _load_alpha(side, strides, o_m, m_m)
    rows = _load_row_stats(saved, o_m, m_m, SPEC, BM)
    cols = _load_col_stats(saved, o_n, m_n, SPEC, BN)
    b_x, b_G, b_h, m_allowed, m_y = _tile_backward(
        q_ptr, k_ptr, side, shape, strides, D, o_m, m_m, o_n, m_n, a_i, _load_bias(side, SPEC),
        rows, cols, SPEC, PRECISION, UPCAST, BM, BN, BK)
    m_in = m_m[:, None] & m_n[None, :]
    if HAS_GPOS:
        b_sp = tl.load(spos_ptr + o_m, mask=m_m, other=-1) - spos_offset
        b_gp = tl.load(gpos_ptr + o_m, mask=m_m, other=0.0).to(tl.float32)
        b_G += tl.where((b_sp[:, None] == o_n[None, :]) & m_in, b_gp[:, None], 0.0)
        b_h = b_G * a_i[:, None]
    p_h = h_ptr + o_m[:, None] * s_hn + o_n[None, :]
    tl.store(p_h, b_h.to(h_ptr.dtype.element_ty), mask=m_in)
    if PART:
        p_p = part_ptr + o_m * s_pn + i_n
        tl.store(p_p, tl.sum(b_G, axis=1), mask=m_m)
        tl.store(p_p + N * s_pn, tl.sum(tl.where(m_in, b_G * b_x, 0.0), axis=1), mask=m_m)
        if FWD_STATS:
            tl.store(p_p + 2 * N * s_pn, _softplus_sum(b_x, m_allowed, m_y), mask=m_m)
