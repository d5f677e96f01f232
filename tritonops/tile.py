"""Shared @triton.jit pieces of the tile template: the kernels' argument tuples, one tile's logits,
masks and weights, the online log-sum-exp, SigLIP's softplus sums, and the decorators every
kernel wears (heuristics, autotuning keyed on its flags). The kernels: ``forward.py``,
``backward.py``, ``gemm_h.py``.

Every kernel takes the same leading arguments: q, k, ``Side`` (pointers to alpha, bias and the
side data), ``Shape`` (sizes), ``Strides``, D (the autotuner's key) and ``SPEC`` (a ``Spec``: the
template's flags, one constexpr tuple), then its own outputs and pass flags. Helpers receive the
tuples whole and read the fields they need (``side.excl_ptr``, ``SPEC.DIST``).

Template flags (``Spec``): DIST (distance logits -alpha d2^(GAMMA/2), math.md 1.4), HAS_BIAS,
HAS_EXCL (self column), HAS_THRESH (false negatives: a non-positive column with x_ij > thresh_i
leaves the row's every sum and the column LSE, in all four passes), POSITIVE (0 none, 1 index,
2 label), WEIGHT (0 none, 1 dense [N, MW], 2 low rank <wa_i, wb_j>), CLIP (weights below it
count as 0), N_SUMS and per sum Ck (0 all, 1 pos, 2 neg allowed columns), Bk (logit multiplier
beta), Wk (weighted), LIN, SIG, COL_LSE. Pass flags (kernel constexprs): TRANS, PRECISION (fp32
dot input precision), UPCAST (fp32 dots under the interpreter for bf16), in the forward
COL_ATOMIC / COL_GATHER (column sums by atomics in the row pass / a column pass over listed
columns) and TOPK / TOPK_P2 (stream each row's TOPK largest logits over its allowed
non-positive columns, see topk.py; 0 = off) and in the backward PRECISION2 / H16 / HSCALE
(operand types of the gradient matmul, see _grad_dot) and FWD_STATS (SigLIP's forward fused
into the dq pass, or into the gemm backward's row H pass).
"""

from collections import namedtuple

import triton
import triton.language as tl

from .configs import autotune_kwargs, code_flags, interpreting

# The template's flags, one constexpr argument (one compiled specialisation per distinct value);
# built from a TileSpec by tilecl._triton.common.kernel_spec.
Spec = namedtuple("Spec", "DIST GAMMA HAS_BIAS HAS_EXCL HAS_THRESH POSITIVE WEIGHT CLIP N_SUMS "
                          "C0 B0 W0 C1 B1 W1 LIN SIG COL_LSE")
# alpha [N] (stride Strides.a: 0 for a scalar), bias [1], excluded column [N], positive column
# [N], labels of q [N] and of k [M], false-negative threshold [N], dense weight [N, MW],
# low-rank weight factors [N, R] and [M, R]; a flag that is off leaves a 1-element dummy
Side = namedtuple("Side", "a_ptr bias_ptr excl_ptr pos_ptr labq_ptr labk_ptr thr_ptr w_ptr "
                          "wa_ptr wb_ptr")
# rows of q, columns of k, columns of the dense weight, rank of the low-rank one, and the global
# index of column 0 of k (a block of the ring, a chunk of the bounded backward)
Shape = namedtuple("Shape", "N M MW R col_offset")
Strides = namedtuple("Strides", "qn qd kn kd a wn ww an ar bn br")
# what the backward reads of the forward (math.md 1.2): the row statistics [S, N] (row stride
# s_st) and their upstream gradient dL/dstats [S, N] (same layout), the column LSE [M] and its
# upstream gradient [M]
Saved = namedtuple("Saved", "st_ptr g_ptr colst_ptr gc_ptr s_st")
# the leading arguments of every kernel, in order (a launcher passes ``*head``)
Head = namedtuple("Head", "q_ptr k_ptr side shape strides D SPEC")

NEG_INF = tl.constexpr(float("-inf"))
# d2 below 2^-18 (64 fp32 unit roundoffs) of |q|^2 + |k|^2 is rounding noise: a duplicate, d2 = 0
# (derivation at dist2 in csrc/tile_math.h; the same threshold on every backend)
DIST2_EPS = tl.constexpr(2.0**-18)


@triton.jit
def _tile_logits(q_ptr, k_ptr, strides, D, o_m, m_m, o_n, m_n, a_i, bias, SPEC: tl.constexpr,
                 PRECISION: tl.constexpr, UPCAST: tl.constexpr, BM: tl.constexpr,
                 BN: tl.constexpr, BK: tl.constexpr):
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
        p_q = q_ptr + o_m[:, None] * strides.qn + o_k[None, :] * strides.qd
        p_k = k_ptr + o_n[None, :] * strides.kn + o_k[:, None] * strides.kd
        b_q = tl.load(p_q, mask=m_m[:, None] & m_k[None, :], other=0.0)
        b_k = tl.load(p_k, mask=m_k[:, None] & m_n[None, :], other=0.0)
        if UPCAST:
            b_q = b_q.to(tl.float32)
            b_k = b_k.to(tl.float32)
        b_acc = tl.dot(b_q, b_k, b_acc, input_precision=PRECISION)  # [BM, BK] @ [BK, BN]
        if SPEC.DIST:
            f_q = b_q.to(tl.float32)
            f_k = b_k.to(tl.float32)
            b_nq += tl.sum(f_q * f_q, axis=1)
            b_nk += tl.sum(f_k * f_k, axis=0)
    if SPEC.DIST:
        b_scale = b_nq[:, None] + b_nk[None, :]
        b_inner = b_scale - 2.0 * b_acc
        b_inner = tl.where(b_inner <= b_scale * DIST2_EPS, 0.0, b_inner)
        if SPEC.GAMMA == 2.0:
            b_base = b_inner
        else:  # d2^(g/2) = exp2(log2(d2) g/2), and 0 at d2 = 0
            m_zero = b_inner == 0.0
            b_base = tl.exp2(tl.log2(tl.where(m_zero, 1.0, b_inner)) * (SPEC.GAMMA * 0.5))
            b_base = tl.where(m_zero, 0.0, b_base)
        b_x = -a_i[:, None] * b_base
    else:
        b_inner = b_acc
        b_x = a_i[:, None] * b_acc
        if SPEC.HAS_BIAS:
            b_x = b_x + bias
    return b_x, b_inner


@triton.jit
def _tile_masks(side, col_offset, o_m, m_m, o_n, m_n, b_x, SPEC: tl.constexpr):
    """allowed [BM, BN] (in range, not the excluded column, not a false negative) and Y [BM, BN]
    (positive & allowed).

    Excluded / positive columns are global indices: column j of the block is col_offset + j.
    HAS_THRESH: a column with x_ij > thresh_i that is not a positive leaves ``allowed`` (and with
    it every sum, SupCon/SigLIP statistic and the column LSE); exactly tilecl._torch_tiled._masks.
    Every pass (forward rows and columns, backward dq and dk) recomputes the same x and mask.
    """
    g_n = o_n + col_offset
    m_allowed = m_m[:, None] & m_n[None, :]
    if SPEC.HAS_EXCL:
        b_ex = tl.load(side.excl_ptr + o_m, mask=m_m, other=-1)
        m_allowed = m_allowed & (b_ex[:, None] != g_n[None, :])
    if SPEC.POSITIVE == 1:
        b_pos = tl.load(side.pos_ptr + o_m, mask=m_m, other=-1)
        m_y = m_allowed & (b_pos[:, None] == g_n[None, :])
    elif SPEC.POSITIVE == 2:
        b_lq = tl.load(side.labq_ptr + o_m, mask=m_m, other=0)
        b_lk = tl.load(side.labk_ptr + o_n, mask=m_n, other=0)
        m_y = m_allowed & (b_lq[:, None] == b_lk[None, :])
    else:
        m_y = m_allowed & (g_n[None, :] < 0)
    if SPEC.HAS_THRESH:
        b_th = tl.load(side.thr_ptr + o_m, mask=m_m, other=0.0).to(tl.float32)
        m_allowed = m_allowed & ~((b_x > b_th[:, None]) & ~m_y)
    return m_allowed, m_y


@triton.jit
def _tile_weights(side, shape, strides, o_m, m_m, o_n, m_n, SPEC: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr):
    """w [BM, BN] fp32: weight[i, (col_offset + j) % MW] or <wa_i, wb_j>, 0 below CLIP."""
    if SPEC.WEIGHT == 1:
        g_n = (o_n + shape.col_offset) % shape.MW
        p_w = side.w_ptr + o_m[:, None] * strides.wn + g_n[None, :] * strides.ww
        b_w = tl.load(p_w, mask=m_m[:, None] & m_n[None, :], other=0.0).to(tl.float32)
    elif SPEC.WEIGHT == 2:
        b_w = tl.zeros([BM, BN], dtype=tl.float32)
        for r in range(0, shape.R):  # low rank r is small: outer products, exact fp32
            b_a = tl.load(side.wa_ptr + o_m * strides.an + r * strides.ar, mask=m_m,
                          other=0.0).to(tl.float32)
            b_b = tl.load(side.wb_ptr + o_n * strides.bn + r * strides.br, mask=m_n,
                          other=0.0).to(tl.float32)
            b_w += b_a[:, None] * b_b[None, :]
    else:
        b_w = tl.full([BM, BN], 1.0, dtype=tl.float32)
    if SPEC.CLIP > 0.0:
        b_w = tl.where(b_w < SPEC.CLIP, 0.0, b_w)
    return b_w


@triton.jit
def _tile(q_ptr, k_ptr, side, shape, strides, D, o_m, m_m, o_n, m_n, a_i, bias,
          SPEC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, BM: tl.constexpr,
          BN: tl.constexpr, BK: tl.constexpr):
    """Everything of one [BM, BN] tile that the statistics and their gradients read: the logits
    x, the inner quantity (<q_i, k_j> or d2_ij), the masks (allowed, positive) and the weights.
    Every pass (forward rows and columns, backward dq and dk, the H tiles) recomputes it the same
    way. A pass that reads no weight leaves them to dead-code elimination: the forward's column
    pass compiles to the same TTGIR for every WEIGHT (checked for sm_90, bf16)."""
    b_x, b_inner = _tile_logits(q_ptr, k_ptr, strides, D, o_m, m_m, o_n, m_n, a_i, bias, SPEC,
                                PRECISION, UPCAST, BM, BN, BK)
    m_allowed, m_y = _tile_masks(side, shape.col_offset, o_m, m_m, o_n, m_n, b_x, SPEC)
    b_w = _tile_weights(side, shape, strides, o_m, m_m, o_n, m_n, SPEC, BM, BN)
    return b_x, b_inner, m_allowed, m_y, b_w


@triton.jit
def _load_alpha(side, strides, o_m, m_m):
    """alpha_i of rows o_m, fp32 (1 past the end)."""
    return tl.load(side.a_ptr + o_m * strides.a, mask=m_m, other=1.0).to(tl.float32)


@triton.jit
def _load_bias(side, SPEC: tl.constexpr):
    """The logits' bias b (fp32), 0 without HAS_BIAS."""
    if SPEC.HAS_BIAS:
        bias = tl.load(side.bias_ptr).to(tl.float32)
    else:
        bias = 0.0
    return bias


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
