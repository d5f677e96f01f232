"""The tile template of tilecl in Triton: one forward and one backward kernel for the whole family.

``_lse_fwd_kernel`` sweeps a block of rows q [N, D] against every column tile of k [M, D] and writes
the per-row statistics of ``tilecl._spec.TileSpec`` ([S, N] fp32: lse^1, lse^2, lin, cnt, sig)
and, with ``COL_ATOMIC``, the column sums of symmetric CLIP in the same sweep; with ``TRANS`` it
sweeps a block of columns against every row tile and writes the column LSE (math.md 2.1)
instead: the exact pass, for the columns whose atomic sum is unusable or on request.
``_lse_bwd_kernel`` recomputes each tile, forms G_ij from the saved statistics and dL/dstats
(math.md 1.2), and accumulates either dq (row-parallel, ``TRANS`` false) or dk (column-parallel,
``TRANS`` true) for one chunk of D, in fp32 registers; for SigLIP its dq pass is also the forward
(``FWD_STATS``). Every loss is a set of constexpr flags; nothing N x M ever reaches global
memory. Launchers live in ``tilecl._triton_backend``; these are kernels only.

Flags (constexpr): DIST (distance logits -alpha d2^(GAMMA/2), math.md 1.4), HAS_BIAS, HAS_EXCL
(self column), HAS_THRESH (false negatives: a non-positive column with x_ij > thresh_i leaves the
row's every sum and the column LSE, in all four passes), POSITIVE (0 none, 1 index, 2 label),
WEIGHT (0 none, 1 dense [N, MW], 2 low rank <wa_i, wb_j>), CLIP (weights below it count as 0),
N_SUMS and per sum Ck (0 all, 1 pos, 2 neg allowed columns), Bk (logit multiplier beta), Wk
(weighted), LIN, SIG, COL_LSE, TRANS, PRECISION (fp32 dot input precision), UPCAST (fp32 dots
under the interpreter for bf16), in the forward COL_ATOMIC / COL_GATHER (column sums by atomics
in the row pass / a column pass over listed columns) and TOPK / TOPK_P2 (stream each row's TOPK
largest logits over its allowed non-positive columns, see _topk_merge; 0 = off) and in the
backward PRECISION2 / H16 / HSCALE (operand types of the gradient matmul, see _grad_dot) and
FWD_STATS (SigLIP's forward fused into the dq pass, or into the gemm backward's row H pass).
"""

import triton
import triton.language as tl

from .configs import autotune_kwargs, code_flags, interpreting

NEG_INF = tl.constexpr(float("-inf"))
# d2 below 2^-18 (64 fp32 unit roundoffs) of |q|^2 + |k|^2 is rounding noise: a duplicate, d2 = 0
# (derivation at dist2 in csrc/tile_math.h; the same threshold on every backend)
DIST2_EPS = tl.constexpr(2.0**-18)
_KEY_NONE = tl.constexpr(-(2**63))  # below every _topk_pack key: no candidate


@triton.jit
def _tile_logits(q_ptr, k_ptr, s_qn, s_qd, s_kn, s_kd, o_m, m_m, o_n, m_n, a_i, bias, D,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DIST: tl.constexpr,
                 GAMMA: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
                 PRECISION: tl.constexpr):
    """x [BM, BN] fp32 and the inner quantity (<q_i, k_j>, or d2_ij for distance logits).

    The dot product loops over D in chunks of BK (any D, ragged tail masked to 0); the scale is
    applied in fp32 after it (math.md 9.10). d2 = |q|^2 + |k|^2 - 2 q.k, 0 at or below DIST2_EPS
    (|q|^2 + |k|^2) (math.md 9.13); NaN stays NaN (no max, whose NaN handling differs by target).
    """
    b_acc = tl.zeros([BM, BN], dtype=tl.float32)
    b_nq = tl.zeros([BM], dtype=tl.float32)
    b_nk = tl.zeros([BN], dtype=tl.float32)
    for d0 in range(0, D, BK):
        o_k = d0 + tl.arange(0, BK)
        m_k = o_k < D
        p_q = q_ptr + o_m[:, None] * s_qn + o_k[None, :] * s_qd
        p_k = k_ptr + o_n[None, :] * s_kn + o_k[:, None] * s_kd
        b_q = tl.load(p_q, mask=m_m[:, None] & m_k[None, :], other=0.0)
        b_k = tl.load(p_k, mask=m_k[:, None] & m_n[None, :], other=0.0)
        if UPCAST:
            b_q = b_q.to(tl.float32)
            b_k = b_k.to(tl.float32)
        b_acc = tl.dot(b_q, b_k, b_acc, input_precision=PRECISION)  # [BM, BK] @ [BK, BN]
        if DIST:
            f_q = b_q.to(tl.float32)
            f_k = b_k.to(tl.float32)
            b_nq += tl.sum(f_q * f_q, axis=1)
            b_nk += tl.sum(f_k * f_k, axis=0)
    if DIST:
        b_scale = b_nq[:, None] + b_nk[None, :]
        b_inner = b_scale - 2.0 * b_acc
        b_inner = tl.where(b_inner <= b_scale * DIST2_EPS, 0.0, b_inner)
        if GAMMA == 2.0:
            b_base = b_inner
        else:  # d2^(g/2) = exp2(log2(d2) g/2), and 0 at d2 = 0
            m_zero = b_inner == 0.0
            b_base = tl.exp2(tl.log2(tl.where(m_zero, 1.0, b_inner)) * (GAMMA * 0.5))
            b_base = tl.where(m_zero, 0.0, b_base)
        b_x = -a_i[:, None] * b_base
    else:
        b_inner = b_acc
        b_x = a_i[:, None] * b_acc
        if HAS_BIAS:
            b_x = b_x + bias
    return b_x, b_inner


@triton.jit
def _tile_masks(excl_ptr, pos_ptr, labq_ptr, labk_ptr, thr_ptr, col_offset, o_m, m_m, o_n, m_n,
                b_x, HAS_EXCL: tl.constexpr, POSITIVE: tl.constexpr, HAS_THRESH: tl.constexpr):
    """allowed [BM, BN] (in range, not the excluded column, not a false negative) and Y [BM, BN]
    (positive & allowed).

    Excluded / positive columns are global indices: column j of the block is col_offset + j.
    HAS_THRESH: a column with x_ij > thresh_i that is not a positive leaves ``allowed`` (and with
    it every sum, SupCon/SigLIP statistic and the column LSE); exactly tilecl._torch_tiled._masks.
    Every pass (forward rows and columns, backward dq and dk) recomputes the same x and mask.
    """
    g_n = o_n + col_offset
    m_allowed = m_m[:, None] & m_n[None, :]
    if HAS_EXCL:
        b_ex = tl.load(excl_ptr + o_m, mask=m_m, other=-1)
        m_allowed = m_allowed & (b_ex[:, None] != g_n[None, :])
    if POSITIVE == 1:
        b_pos = tl.load(pos_ptr + o_m, mask=m_m, other=-1)
        m_y = m_allowed & (b_pos[:, None] == g_n[None, :])
    elif POSITIVE == 2:
        b_lq = tl.load(labq_ptr + o_m, mask=m_m, other=0)
        b_lk = tl.load(labk_ptr + o_n, mask=m_n, other=0)
        m_y = m_allowed & (b_lq[:, None] == b_lk[None, :])
    else:
        m_y = m_allowed & (g_n[None, :] < 0)
    if HAS_THRESH:
        b_th = tl.load(thr_ptr + o_m, mask=m_m, other=0.0).to(tl.float32)
        m_allowed = m_allowed & ~((b_x > b_th[:, None]) & ~m_y)
    return m_allowed, m_y


@triton.jit
def _tile_weights(w_ptr, s_wn, s_ww, MW, wa_ptr, s_an, s_ar, wb_ptr, s_bn, s_br, R, col_offset,
                  o_m, m_m, o_n, m_n, BM: tl.constexpr, BN: tl.constexpr, WEIGHT: tl.constexpr,
                  CLIP: tl.constexpr):
    """w [BM, BN] fp32: weight[i, (col_offset + j) % MW] or <wa_i, wb_j>, 0 below CLIP."""
    if WEIGHT == 1:
        g_n = (o_n + col_offset) % MW
        p_w = w_ptr + o_m[:, None] * s_wn + g_n[None, :] * s_ww
        b_w = tl.load(p_w, mask=m_m[:, None] & m_n[None, :], other=0.0).to(tl.float32)
    elif WEIGHT == 2:
        b_w = tl.zeros([BM, BN], dtype=tl.float32)
        for r in range(0, R):  # low rank r is small: outer products, exact fp32
            b_a = tl.load(wa_ptr + o_m * s_an + r * s_ar, mask=m_m, other=0.0).to(tl.float32)
            b_b = tl.load(wb_ptr + o_n * s_bn + r * s_br, mask=m_n, other=0.0).to(tl.float32)
            b_w += b_a[:, None] * b_b[None, :]
    else:
        b_w = tl.full([BM, BN], 1.0, dtype=tl.float32)
    if CLIP > 0.0:
        b_w = tl.where(b_w < CLIP, 0.0, b_w)
    return b_w


@triton.jit
def _sum_mask(m_allowed, m_y, b_w, C: tl.constexpr, W: tl.constexpr):
    """Columns of one accumulator: all allowed (0), positives (1), allowed negatives (2)."""
    if C == 1:
        m_s = m_y
    elif C == 2:
        m_s = m_allowed & ~m_y
    else:
        m_s = m_allowed
    if W:  # w = 0 drops the column (the reference's log 0 = -inf); a NaN weight stays (NaN out)
        m_s = m_s & ~(b_w <= 0.0)
    return m_s


@triton.jit
def _online_lse(b_z, m_s, b_w, b_mx, b_l, W: tl.constexpr, AXIS: tl.constexpr):
    """One online-LSE step along AXIS (math.md 1.1): masked entries are -inf before the max and
    contribute exp(-inf) = 0; m_ref = 0 while everything so far is masked (-inf - -inf guard)."""
    b_zm = tl.where(m_s, b_z, NEG_INF)
    b_mnew = tl.maximum(b_mx, tl.max(b_zm, axis=AXIS))
    b_mref = tl.where(b_mnew == NEG_INF, 0.0, b_mnew)
    if AXIS == 1:
        b_p = tl.exp(b_zm - b_mref[:, None])
    else:
        b_p = tl.exp(b_zm - b_mref[None, :])
    if W:
        b_p = b_p * b_w
    b_l = b_l * tl.exp(b_mx - b_mref) + tl.sum(b_p, axis=AXIS)
    return b_mnew, b_l


@triton.jit
def _finish_lse(b_mx, b_l):
    """m + log l, -inf for an empty sum; NaN (a NaN logit) stays NaN: tested as l == 0."""
    m_none = b_l == 0.0
    return tl.where(m_none, NEG_INF, b_mx + tl.log(tl.where(m_none, 1.0, b_l)))


@triton.jit
def _log1p(b_u):
    """log(1 + u) accurate for small u (u = exp(-|x|) of SigLIP's negatives, ~1e-5)."""
    b_v = 1.0 + b_u
    m_one = b_v == 1.0
    return tl.where(m_one, b_u, tl.log(b_v) * (b_u / tl.where(m_one, 1.0, b_v - 1.0)))


@triton.jit
def _softplus_sum(b_x, m_allowed, m_y):
    """SigLIP's row sums: sum_j [allowed] softplus(-(2Y-1) x) with
    softplus(-(2Y-1)x) = max(x, 0) + log1p(exp(-|x|)) - Y x (math.md 2.2)."""
    b_sp = tl.maximum(b_x, 0.0) + _log1p(tl.exp(-tl.abs(b_x)))
    b_sp = b_sp - tl.where(m_y, b_x, 0.0)
    return tl.sum(tl.where(m_allowed, b_sp, 0.0), axis=1)


@triton.jit
def _topk_pack(b_v, o_c):
    """Sortable int64 key of (fp32 value, column index >= 0): the value's bits, made
    order-preserving as a signed int32 (negative floats flip their 31 magnitude bits), in the high
    half, the column in the low half. Signed int64 order is value order; equal values: larger
    column first (the contract allows any order among ties)."""
    b_b = b_v.to(tl.int32, bitcast=True)
    b_b = b_b ^ ((b_b >> 31) & 0x7FFFFFFF)
    return (b_b.to(tl.int64) << 32) + o_c


@triton.jit
def _topk_unpack(b_key):
    """(value fp32, column int64) of _topk_pack keys (the bit flip is its own inverse)."""
    b_hi = (b_key >> 32).to(tl.int32)
    b_v = (b_hi ^ ((b_hi >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
    return b_v, b_key - ((b_key >> 32) << 32)


@triton.jit
def _topk_init(BM: tl.constexpr, K: tl.constexpr, TOPK: tl.constexpr):
    """The running lists [BM, K] before any column: slot t < TOPK holds the key (-inf, t) (empty,
    and distinct, so a merge round replaces exactly one slot); slots TOPK..K-1 (the width is a
    power of two) hold a key above every logit's, so they are never the minimum."""
    o_t = tl.arange(0, K)
    b_empty = _topk_pack(tl.full([BM, K], NEG_INF, dtype=tl.float32),
                         tl.zeros([BM, K], dtype=tl.int64) + o_t[None, :])
    b_off = tl.full([BM, K], 0x7FFFFFFF, dtype=tl.int32).to(tl.int64) << 32
    return tl.where(o_t[None, :] < TOPK, b_empty, b_off)


@triton.jit
def _topk_best(b_xc, o_n):
    """Key of each row's largest remaining candidate, _KEY_NONE when none is left."""
    b_v = tl.max(b_xc, axis=1)
    b_c = tl.max(tl.where(b_xc == b_v[:, None], o_n[None, :], -1), axis=1)
    return tl.where(b_v == NEG_INF, _KEY_NONE, _topk_pack(b_v, b_c))


@triton.jit
def _topk_merge(b_top, b_x, m_c, o_n):
    """Merge one [BM, BN] tile into the running top-k lists of its rows (unsorted, in registers).

    Candidates are x_ij where m_c (allowed non-positive columns). A round takes each row's best
    remaining candidate (value, then its column: the largest among equal values), puts its key in
    place of the row's list minimum if it beats it, and knocks the column out of the tile. Rounds
    stop when no row of the block has a candidate above its list minimum: at most k rounds (the
    tile's k best), and few once the lists hold large logits. The tile stays fp32 (the packed
    int64 keys of a whole tile would double its registers); only the lists are int64.
    """
    b_xc = tl.where(m_c, b_x, NEG_INF)
    b_min = tl.min(b_top, axis=1)
    b_best = _topk_best(b_xc, o_n)
    while tl.max((b_best > b_min).to(tl.int32), axis=0) > 0:
        m_in = (b_best > b_min)[:, None]
        b_top = tl.where(m_in & (b_top == b_min[:, None]), b_best[:, None], b_top)
        b_xc = tl.where(o_n[None, :] == (b_best - ((b_best >> 32) << 32))[:, None], NEG_INF, b_xc)
        b_min = tl.min(b_top, axis=1)
        b_best = _topk_best(b_xc, o_n)
    return b_top


def _heuristics(backward):
    def upcast(args):
        return interpreting() and "bfloat16" in str(args["q_ptr"].dtype)

    def h16(args):  # G in the input dtype for the gradient matmul (not bf16 when interpreting)
        dt = str(args["q_ptr"].dtype)
        return "float16" in dt and not ("bfloat16" in dt and interpreting())

    h = {"UPCAST": upcast}
    if backward:
        h["H16"] = h16
        h["HSCALE"] = lambda args: str(args["q_ptr"].dtype).endswith(".float16")
    return triton.heuristics(h)


def _autotuned(backward: bool, reset_to_zero=()):
    """``triton.autotune`` of one kernel, keyed on D and every constexpr flag of its signature
    (``configs.code_flags``: one tuning per compiled specialisation, never shared by two flag
    sets). The autotuner runs each candidate several times into the same buffers before the real
    launch: a kernel that accumulates with atomics names those buffers in ``reset_to_zero``, so
    each run starts from zero (a memset of M floats per run; restore_value would copy them, and a
    scratch buffer per launch would cost an allocation per call). Kernels that only store are
    idempotent and need nothing."""
    def wrap(kernel):
        return triton.autotune(**autotune_kwargs(backward, code_flags(kernel), reset_to_zero))(
            kernel)
    return wrap


# cacc_ptr: the column sums of symmetric CLIP, cacc_j += sum_i exp(x_ij - cref_j) (COL_ATOMIC)
@_autotuned(False, reset_to_zero=["cacc_ptr"])
@_heuristics(False)
@triton.jit
def _lse_fwd_kernel(
    q_ptr, k_ptr, a_ptr, bias_ptr, excl_ptr, pos_ptr, labq_ptr, labk_ptr, thr_ptr, w_ptr, wa_ptr,
    wb_ptr, st_ptr, col_ptr, tv_ptr, ti_ptr, cref_ptr, cacc_ptr, cidx_ptr,
    N, M, D, MW, R, col_offset,
    s_qn, s_qd, s_kn, s_kd, s_a, s_wn, s_ww, s_an, s_ar, s_bn, s_br, s_st,
    DIST: tl.constexpr, GAMMA: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_EXCL: tl.constexpr,
    HAS_THRESH: tl.constexpr,
    POSITIVE: tl.constexpr, WEIGHT: tl.constexpr, CLIP: tl.constexpr, N_SUMS: tl.constexpr,
    C0: tl.constexpr, B0: tl.constexpr, W0: tl.constexpr,
    C1: tl.constexpr, B1: tl.constexpr, W1: tl.constexpr,
    LIN: tl.constexpr, SIG: tl.constexpr, COL_LSE: tl.constexpr, TRANS: tl.constexpr,
    COL_ATOMIC: tl.constexpr, COL_GATHER: tl.constexpr,
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
    if HAS_BIAS:
        bias = tl.load(bias_ptr).to(tl.float32)
    else:
        bias = 0.0
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
            a_i = tl.load(a_ptr + o_m * s_a, mask=m_m, other=1.0).to(tl.float32)
            b_x, b_inner = _tile_logits(q_ptr, k_ptr, s_qn, s_qd, s_kn, s_kd, o_m, m_m, o_n, m_n,
                                        a_i, bias, D, BM, BN, BK, DIST, GAMMA, HAS_BIAS, UPCAST,
                                        PRECISION)
            m_allowed, m_y = _tile_masks(excl_ptr, pos_ptr, labq_ptr, labk_ptr, thr_ptr,
                                         col_offset, o_m, m_m, o_n, m_n, b_x, HAS_EXCL, POSITIVE,
                                         HAS_THRESH)
            b_mc, b_lc = _online_lse(b_x, m_allowed, b_x, b_mc, b_lc, False, 0)
        tl.store(col_ptr + o_n, _finish_lse(b_mc, b_lc), mask=m_n)
    else:
        o_m = i_p * BM + tl.arange(0, BM)
        m_m = o_m < N
        a_i = tl.load(a_ptr + o_m * s_a, mask=m_m, other=1.0).to(tl.float32)
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
            b_x, b_inner = _tile_logits(q_ptr, k_ptr, s_qn, s_qd, s_kn, s_kd, o_m, m_m, o_n, m_n,
                                        a_i, bias, D, BM, BN, BK, DIST, GAMMA, HAS_BIAS, UPCAST,
                                        PRECISION)
            m_allowed, m_y = _tile_masks(excl_ptr, pos_ptr, labq_ptr, labk_ptr, thr_ptr,
                                         col_offset, o_m, m_m, o_n, m_n, b_x, HAS_EXCL, POSITIVE,
                                         HAS_THRESH)
            b_w = _tile_weights(w_ptr, s_wn, s_ww, MW, wa_ptr, s_an, s_ar, wb_ptr, s_bn, s_br, R,
                                col_offset, o_m, m_m, o_n, m_n, BM, BN, WEIGHT, CLIP)
            # lse^k = log sum_j [cols^k] w_ij exp(beta_k x_ij), own running max each (math.md 1.1)
            if N_SUMS >= 1:
                m_s = _sum_mask(m_allowed, m_y, b_w, C0, W0)
                b_m0, b_l0 = _online_lse(b_x * B0, m_s, b_w, b_m0, b_l0, W0, 1)
            if N_SUMS >= 2:
                m_s = _sum_mask(m_allowed, m_y, b_w, C1, W1)
                b_m1, b_l1 = _online_lse(b_x * B1, m_s, b_w, b_m1, b_l1, W1, 1)
            if LIN:  # SupCon L_out: sum of positive logits and their count (math.md 4.1)
                b_lin += tl.sum(tl.where(m_y, b_x, 0.0), axis=1)
                b_cnt += tl.sum(m_y.to(tl.float32), axis=1)
            if SIG:
                b_sig += _softplus_sum(b_x, m_allowed, m_y)
            if COL_ATOMIC:  # column sums against cref_j >= max_i x_ij - 64 (no overflow)
                b_ref = tl.load(cref_ptr + o_n, mask=m_n, other=0.0)
                b_pc = tl.exp(tl.where(m_allowed, b_x - b_ref[None, :], NEG_INF))
                tl.atomic_add(cacc_ptr + o_n, tl.sum(b_pc, axis=0), mask=m_n, sem="relaxed")
            if TOPK > 0:  # hardest negatives: allowed (not excluded, not dropped), not positive
                b_top = _topk_merge(b_top, b_x, m_allowed & ~m_y, o_n)
        p_st = st_ptr + o_m
        if N_SUMS >= 1:
            tl.store(p_st, _finish_lse(b_m0, b_l0), mask=m_m)
        if N_SUMS >= 2:
            tl.store(p_st + s_st, _finish_lse(b_m1, b_l1), mask=m_m)
        if LIN:
            tl.store(p_st + N_SUMS * s_st, b_lin, mask=m_m)
            tl.store(p_st + (N_SUMS + 1) * s_st, b_cnt, mask=m_m)
        if SIG:
            tl.store(p_st + (N_SUMS + 2 * LIN) * s_st, b_sig, mask=m_m)
        if TOPK > 0:  # sorted, local column -> global, empty slot (-inf) -> -1
            o_t = tl.arange(0, TOPK_P2)
            b_top = tl.sort(tl.where(o_t[None, :] < TOPK, b_top, _KEY_NONE), 1, descending=True)
            b_tv, b_tc = _topk_unpack(b_top)
            b_ti = tl.where(b_tv == NEG_INF, -1, b_tc + col_offset)
            p_t = o_m[:, None] * TOPK + o_t[None, :]
            m_t = m_m[:, None] & (o_t[None, :] < TOPK)
            tl.store(tv_ptr + p_t, b_tv, mask=m_t)
            tl.store(ti_ptr + p_t, b_ti, mask=m_t)


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


@_autotuned(False)
@_heuristics(False)
@triton.jit
def _lse_h_kernel(
    q_ptr, k_ptr, a_ptr, bias_ptr, excl_ptr, pos_ptr, labq_ptr, labk_ptr, thr_ptr, w_ptr, wa_ptr,
    wb_ptr, st_ptr, g_ptr, colst_ptr, gc_ptr, spos_ptr, gpos_ptr, h_ptr, part_ptr,
    N, M, D, MW, R, col_offset, spos_offset,
    s_qn, s_qd, s_kn, s_kd, s_a, s_wn, s_ww, s_an, s_ar, s_bn, s_br, s_st, s_hn, s_pn,
    DIST: tl.constexpr, GAMMA: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_EXCL: tl.constexpr,
    HAS_THRESH: tl.constexpr,
    POSITIVE: tl.constexpr, WEIGHT: tl.constexpr, CLIP: tl.constexpr, N_SUMS: tl.constexpr,
    C0: tl.constexpr, B0: tl.constexpr, W0: tl.constexpr,
    C1: tl.constexpr, B1: tl.constexpr, W1: tl.constexpr,
    LIN: tl.constexpr, SIG: tl.constexpr, COL_LSE: tl.constexpr, TRANS: tl.constexpr,
    HAS_GPOS: tl.constexpr, PART: tl.constexpr, FWD_STATS: tl.constexpr,
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
    o_m = i_m * BM + tl.arange(0, BM)
    m_m = o_m < N
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < M
    if HAS_BIAS:
        bias = tl.load(bias_ptr).to(tl.float32)
    else:
        bias = 0.0
    a_i = tl.load(a_ptr + o_m * s_a, mask=m_m, other=1.0).to(tl.float32)
    b_lse0, b_g0, b_lse1, b_g1, b_glin, b_gsig = _load_row_stats(
        st_ptr, g_ptr, s_st, o_m, m_m, BM, N_SUMS, LIN, SIG)
    b_lsec, b_gc = _load_col_stats(colst_ptr, gc_ptr, o_n, m_n, BN, COL_LSE)
    b_x, b_G, b_h, m_allowed, m_y = _tile_backward(
        q_ptr, k_ptr, excl_ptr, pos_ptr, labq_ptr, labk_ptr, thr_ptr, w_ptr, wa_ptr,
        wb_ptr, s_qn, s_qd, s_kn, s_kd, s_wn, s_ww, s_an, s_ar, s_bn, s_br, D, MW, R,
        col_offset, o_m, m_m, o_n, m_n, a_i, bias, b_lse0, b_g0, b_lse1, b_g1, b_glin,
        b_gsig, b_lsec, b_gc, DIST, GAMMA, HAS_BIAS, HAS_EXCL, HAS_THRESH, POSITIVE,
        WEIGHT, CLIP, N_SUMS, C0, B0, W0, C1, B1, W1, LIN, SIG, COL_LSE, PRECISION,
        UPCAST, BM, BN, BK)
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
