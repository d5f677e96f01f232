"""Streaming top-k of a row's logits in registers (hard-negative mining from the forward pass):
a sortable int64 key per (logit, column), merged tile by tile into the row's running list."""

import triton
import triton.language as tl

from .tile import NEG_INF

_KEY_NONE = tl.constexpr(-(2**63))  # below every _topk_pack key: no candidate


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
