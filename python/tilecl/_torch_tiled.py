"""The ``torch`` backend: the tile template of ``_spec.py`` in plain PyTorch, any device.

Forward sweeps [BR, BC] tiles and keeps only the per-row statistics (plus the [M] column LSE of
symmetric CLIP); backward recomputes each tile from q, k and the saved statistics, forms G_ij
(math.md 1.2) and accumulates dq / dk in fp32 (math.md 1.3, 1.4). Extra memory is
O((N + M) * D) for the fp32 gradient accumulators plus a handful of [BR, BC] fp32 tiles.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ._spec import TileAux, TileSpec, compute_dtype, empty_stats, empty_topk, merge_topk


def _default_tile():
    raw = os.environ.get("TILECL_TORCH_TILE", "512x1024")
    rows, cols = raw.lower().split("x")
    return int(rows), int(cols)


TILE = list(_default_tile())
# True once the user chose the tile (set_tile_size or TILECL_TORCH_TILE): every device uses TILE.
# Otherwise tile_plan chooses: TILE on CPU, a memory budget on CUDA.
_PINNED = [bool(os.environ.get("TILECL_TORCH_TILE", "").strip())]
# CUDA: one [BR, BC] tile of logits plus its [BR, D] and [BC, D] operand blocks, in the compute
# dtype, within this many bytes (the backward keeps a handful of such tiles alive). Small tiles
# make the GPU wait on kernel launches: 512 x 1024 tiles are 8192 tiles per pass at N = M = 65536,
# about 30 launches each.
CUDA_TILE_BYTES = 256 * 2**20


def set_tile_size(rows: int, cols: int) -> tuple:
    """Set the [rows, cols] tile of the torch backend on every device; returns the previous one."""
    if rows < 1 or cols < 1:
        raise ValueError(f"tile sizes must be positive, got {rows}x{cols}")
    old = tuple(TILE)
    TILE[:] = [int(rows), int(cols)]
    _PINNED[0] = True
    return old


def reset_tile_size() -> None:
    """Back to the default choice: TILECL_TORCH_TILE if set, else ``tile_plan``'s per device."""
    TILE[:] = list(_default_tile())
    _PINNED[0] = bool(os.environ.get("TILECL_TORCH_TILE", "").strip())


def tile_plan(n: int, m: int, d: int, dtype: torch.dtype, device_type: str, tile=None) -> tuple:
    """The [BR, BC] tile for q [n, d] against k [m, d] with tiles in ``dtype`` on ``device_type``.

    ``tile`` (a chosen [rows, cols]) wins. CPU: 512 x 1024 (the measured default). CUDA: the
    largest tile with BR BC + (BR + BC) D elements of ``dtype`` within ``CUDA_TILE_BYTES``,
    powers of two halved from a square (rows first), then widened to fill the budget where n or m
    is smaller than the tile: fp32 at D = 768 gives 4096 x 8192, 128 tiles per pass at
    N = M = 65536."""
    if tile is not None:
        br, bc = tile
    elif device_type != "cuda":
        br, bc = 512, 1024
    else:
        elems = CUDA_TILE_BYTES // torch.empty((), dtype=dtype).element_size()
        side = 1 << (max(int(elems ** 0.5), 1).bit_length() - 1)
        br = bc = side
        while br * bc + (br + bc) * d > elems and max(br, bc) > 1:
            if br >= bc:
                br //= 2
            else:
                bc //= 2
        if n < br:  # short q: give the rows' share of the budget to the columns
            br = n
            bc = max(bc, (elems - br * d) // (br + d))
        elif m < bc:
            bc = m
            br = max(br, (elems - bc * d) // (bc + d))
    return max(1, min(int(br), n)), max(1, min(int(bc), m))


def tiles_per_pass(n: int, m: int, d: int, dtype: torch.dtype, device_type: str, tile=None) -> int:
    """How many tiles one forward (or backward) sweep visits: ceil(n / BR) ceil(m / BC)."""
    br, bc = tile_plan(n, m, d, dtype, device_type, tile)
    return -(-n // br) * -(-m // bc)


def _plan(q, k, cdt) -> tuple:
    """The tile of this call (``tile_plan`` for q's device, the pinned TILE if any)."""
    return tile_plan(q.shape[0], k.shape[0], q.shape[1], cdt, q.device.type,
                     tuple(TILE) if _PINNED[0] else None)


def _norms(spec, t):
    return t.square().sum(1) if spec.logit == "dist" else None


def _rows(spec, q, i0, i1, a, cdt):
    """The row block in the compute dtype; for dot logits pre-scaled, a_i q_i, so that the tile
    needs no elementwise scaling: x_ij = <a_i q_i, k_j> (the compute dtype is fp32 or fp64,
    so this is the same rounding as scaling the fp32 dot afterwards)."""
    qI = q[i0:i1].to(cdt)
    return qI, (qI * a[i0:i1, None] if spec.logit == "dot" else qI)


# A squared distance below 64 unit roundoffs of |q|^2 + |k|^2 is rounding noise of the Gram
# expansion: the pair is a duplicate, d2 = 0, and the gradient of D^gamma there is its
# subgradient 0 (csrc/tile_math.h dist2 has the derivation; every backend uses these values)
DIST2_EPS = {torch.float32: 2.0**-18, torch.float64: 2.0**-47}


def _logits(spec, qaI, kJ, aI, bias, nqI, nkJ):
    """x [BR, BC] in the compute dtype and, for distance logits, the squared distance."""
    if spec.logit == "dot":
        x = qaI @ kJ.T  # [BR, D] @ [D, BC]
        if bias is not None:
            x += bias
        return x, None
    dot = qaI @ kJ.T  # [BR, D] @ [D, BC]
    scale = nqI[:, None] + nkJ[None, :]
    d2 = scale - 2.0 * dot
    d2 = d2.masked_fill_(d2 <= scale.mul_(DIST2_EPS[d2.dtype]), 0.0)  # NaN stays NaN
    base = d2 if spec.gamma == 2.0 else d2.pow(spec.gamma / 2.0)
    return base * (-aI[:, None]), d2


def _tracing() -> bool:
    """True under torch.compile: the shortcuts below that read a tensor's values are skipped
    (they only save work), so the trace has no data-dependent branch."""
    return torch.compiler.is_compiling()


def _masks(spec: TileSpec, aux: TileAux, i0, i1, j0, j1, device, x):
    """allowed [BR, BC] bool (None: every column allowed) and Y [BR, BC] bool (None: no positive)."""
    allowed = None
    if aux.excl is not None or spec.positive == "index":  # global indices of the tile's columns
        cols = torch.arange(j0 + aux.col_offset, j1 + aux.col_offset, device=device)
    if aux.excl is not None:
        e = aux.excl[i0:i1]
        lo, hi = j0 + aux.col_offset, j1 + aux.col_offset
        if _tracing() or bool(((e >= lo) & (e < hi)).any()):
            allowed = e[:, None] != cols[None, :]
    y = None
    if spec.positive == "index":
        y = aux.pos[i0:i1, None] == cols[None, :]
    elif spec.positive == "label":
        y = aux.labels_q[i0:i1, None] == aux.labels_k[None, j0:j1]
    if y is not None and allowed is not None:
        y = y & allowed
    if spec.threshold:  # a negative scoring above the row's threshold is a false negative
        drop = (x > aux.thresh[i0:i1, None].to(x.dtype)) & ~y
        allowed = ~drop if allowed is None else allowed & ~drop
    return allowed, y


def _weights(spec: TileSpec, aux: TileAux, i0, i1, j0, j1, dtype):
    """w [BR, BC] in the compute dtype (clipped) or None."""
    if spec.weight == "dense":
        mw = aux.weight.shape[1]
        cols = torch.arange(j0 + aux.col_offset, j1 + aux.col_offset, device=aux.weight.device) % mw
        w = aux.weight[i0:i1].index_select(1, cols).to(dtype)
    elif spec.weight == "lowrank":
        w = aux.wa[i0:i1].to(dtype) @ aux.wb[j0:j1].to(dtype).T  # [BR, r] @ [r, BC]
    else:
        return None
    if spec.weight_clip > 0:
        w = torch.where(w < spec.weight_clip, torch.zeros_like(w), w)
    return w


def _sum_mask(s, allowed, y):
    """Mask of one accumulator's columns (None = all)."""
    if s.cols == "all":
        return allowed
    m = y if s.cols == "pos" else ~y
    return m if allowed is None or s.cols == "pos" else m & allowed


def _sum_logits(s, x, mask, w):
    """beta x + log w on the accumulator's columns, -inf elsewhere."""
    z = x * s.beta if s.beta != 1.0 else x
    if s.weighted:
        z = z + torch.log(w)  # log 0 = -inf drops the column
    if mask is not None:
        z = z.masked_fill(~mask, float("-inf"))
    return z


def _softplus_terms(x, allowed, y):
    """softplus(-(2Y - 1) x) = softplus(x) - Y x, summed over allowed columns (math.md 2.2)."""
    t = F.softplus(x)
    if y is not None:
        t = t - torch.where(y, x, torch.zeros_like(x))
    if allowed is not None:
        t = t.masked_fill(~allowed, 0.0)
    return t


def _row_tiles(n, br=None):
    br = br or TILE[0]
    return [(i0, min(i0 + br, n)) for i0 in range(0, n, br)]


def _col_tiles(m, bc=None):
    bc = bc or TILE[1]
    return [(j0, min(j0 + bc, m)) for j0 in range(0, m, bc)]


def forward(spec: TileSpec, q, k, alpha, bias, aux: TileAux):
    """Per-row statistics [S, N] (fp32) and column LSE [M] (or None) of q against k; with
    ``spec.topk`` also the rows' hardest negatives (vals [N, topk], global idx [N, topk])."""
    n, m = q.shape[0], k.shape[0]
    dev = q.device
    cdt = compute_dtype(q)
    stats = empty_stats(spec, n, dev, cdt)
    col = torch.full((m,), float("-inf"), device=dev, dtype=cdt) if spec.col_lse else None
    a = alpha.to(cdt).expand(n) if alpha.dim() == 0 else alpha.to(cdt)
    nq, nk = _norms(spec, q.to(cdt)), _norms(spec, k.to(cdt))
    top = empty_topk(n, spec.topk, dev, cdt) if spec.topk else None
    br, bc = _plan(q, k, cdt)
    for i0, i1 in _row_tiles(n, br):
        _, qaI = _rows(spec, q, i0, i1, a, cdt)
        for j0, j1 in _col_tiles(m, bc):
            x, _ = _logits(spec, qaI, k[j0:j1].to(cdt), a[i0:i1], bias,
                           nq[i0:i1] if nq is not None else None,
                           nk[j0:j1] if nk is not None else None)
            tile_forward(spec, aux, x, (i0, i1, j0, j1), stats, col, top)
    return (stats, col) if top is None else (stats, col, top)


def tile_forward(spec: TileSpec, aux: TileAux, x, box, stats, col, top=None):
    """Fold one tile of logits x [BR, BC] (rows i0:i1, columns j0:j1 of the block) into the
    running statistics [S, N], column LSE [M] (or None) and top-k list (or None), in place."""
    i0, i1, j0, j1 = box
    allowed, y = _masks(spec, aux, i0, i1, j0, j1, x.device, x)
    w = _weights(spec, aux, i0, i1, j0, j1, x.dtype)
    shared = None  # exp(x - m_i) of an unmasked-by-weight beta = 1 sum, reused by col
    for r, s in enumerate(spec.sums):
        z = _sum_logits(s, x, _sum_mask(s, allowed, y), w)
        lse, e, rmax = _row_lse(z)
        stats[r, i0:i1] = torch.logaddexp(stats[r, i0:i1], lse)
        if r == 0 and s.cols == "all" and s.beta == 1.0 and not s.weighted:
            shared = (e, rmax)
    if spec.lin:
        stats[spec.i_lin, i0:i1] += torch.where(y, x, torch.zeros_like(x)).sum(1)
        stats[spec.i_cnt, i0:i1] += y.sum(1)
    if spec.sigmoid:
        stats[spec.i_sig, i0:i1] += _softplus_terms(x, allowed, y).sum(1)
    if col is not None:
        col[j0:j1] = torch.logaddexp(col[j0:j1], _col_lse(x, allowed, shared))
    if top is not None:
        t = merge_topk((top[0][i0:i1], top[1][i0:i1]),
                       _tile_topk(spec.topk, x, allowed, y, j0 + aux.col_offset))
        top[0][i0:i1], top[1][i0:i1] = t


def _tile_topk(kk, x, allowed, y, first_col):
    """The tile's kk largest logits over allowed non-positive columns, global indices."""
    neg = allowed if y is None else (~y if allowed is None else allowed & ~y)
    xc = x if neg is None else x.masked_fill(~neg, float("-inf"))
    kt = min(kk, x.shape[1])
    vals, where = xc.topk(kt, dim=1)
    idx = (where + first_col).masked_fill(torch.isneginf(vals), -1)
    if kt < kk:  # a tile narrower than k: pad
        pad = empty_topk(x.shape[0], kk - kt, x.device, x.dtype)
        vals, idx = torch.cat([vals, pad[0]], 1), torch.cat([idx, pad[1]], 1)
    return vals, idx


def _row_lse(z):
    """Row LSE of a [BR, BC] tile (-inf rows stay -inf), and e = exp(z - m), m the row max."""
    m = z.amax(1)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # guard -inf - -inf (math.md 9.1)
    e = torch.sub(z, m[:, None]).exp_()
    return e.sum(1).log_().add_(m), e, m


# column sums from the row-shifted exponentials are trusted when they are at least 2^-80: every
# term then carries full fp32 precision relative to the sum (smaller terms are < 2^-36 of it)
_COL_FLOOR = 2.0**-80


def _col_lse(x, allowed, shared):
    """Column LSE of a tile. With e_ij = exp(x_ij - m_i) from the row pass, sum_i exp(x_ij) =
    e^C sum_i e_ij exp(m_i - C) with C = max_i m_i: one GEMV instead of four more passes over
    the tile. A column whose shifted sum falls below 2^-80 (all its entries far below the
    tile's largest row max) is recomputed exactly."""
    xc = x if allowed is None else x.masked_fill(~allowed, float("-inf"))
    if shared is None:
        return torch.logsumexp(xc, 0)
    e, m = shared
    c = m.max()
    s = torch.exp(m - c) @ e  # [BR] @ [BR, BC]
    lse = s.log().add_(c)
    bad = s < _COL_FLOOR
    if _tracing() or bool(bad.any()):
        lse = torch.where(bad, torch.logsumexp(xc, 0), lse)
    return lse


def _safe_lse(lse, g):
    """Rows whose accumulator is empty (lse = -inf) have no gradient: zero g, finite lse."""
    empty = torch.isneginf(lse)
    return torch.where(empty, torch.zeros_like(lse), lse), torch.where(empty, torch.zeros_like(g), g)


def tile_grad(spec: TileSpec, aux: TileAux, x, box, stats_I, g_I, colg):
    """G [BR, BC] = dL/dx_ij for one tile of logits x (rows i0:i1, columns j0:j1), from the
    row block's (lse, g) pairs, its dL/dstats g_I and the whole column (lse, g) or None."""
    i0, i1, j0, j1 = box
    allowed, y = _masks(spec, aux, i0, i1, j0, j1, x.device, x)
    w = _weights(spec, aux, i0, i1, j0, j1, x.dtype)
    colstat_J = (colg[0][j0:j1], colg[1][j0:j1]) if colg is not None else None
    return _tile_grad(spec, x, allowed, y, w, stats_I, g_I, colstat_J)


def _tile_grad(spec, x, allowed, y, w, stats_I, g_I, colstat_J):
    """G [BR, BC] = dL/dx_ij for one tile (math.md 1.2, 2.1, 2.2)."""
    G = None
    for r, s in enumerate(spec.sums):
        lse, g = stats_I[r]
        if not _tracing() and not bool(g.any()):
            continue
        z = _sum_logits(s, x, _sum_mask(s, allowed, y), w)
        term = torch.sub(z, lse[:, None]).exp_().mul_((g * s.beta)[:, None])  # beta g pi^k
        G = term if G is None else G.add_(term)
    if G is None:
        G = torch.zeros_like(x)
    if spec.lin:
        G += torch.where(y, g_I[spec.i_lin][:, None], torch.zeros_like(x))
    if spec.sigmoid:
        p = torch.sigmoid(x)
        if y is not None:
            p = p - y.to(p.dtype)
        if allowed is not None:
            p = p.masked_fill(~allowed, 0.0)
        G += p * g_I[spec.i_sig][:, None]
    if colstat_J is not None:
        lse_c, g_c = colstat_J
        xc = x if allowed is None else x.masked_fill(~allowed, float("-inf"))
        G += torch.exp(xc - lse_c[None, :]) * g_c[None, :]
    return G


def backward(spec: TileSpec, q, k, alpha, bias, aux: TileAux, stats, col, g_stats, g_col,
             needs=(True, True, True, True)):
    """(dq, dk, dalpha, dbias) from dL/dstats [S, N] and dL/dcol [M] (math.md 1.2-1.5)."""
    n, m = q.shape[0], k.shape[0]
    dev = q.device
    cdt = compute_dtype(q)
    a = alpha.to(cdt).expand(n) if alpha.dim() == 0 else alpha.to(cdt)
    nq, nk = _norms(spec, q.to(cdt)), _norms(spec, k.to(cdt))
    lse_g = [_safe_lse(stats[r], g_stats[r]) for r in range(len(spec.sums))]
    colg = _safe_lse(col, g_col) if spec.col_lse else None
    # dq (the row side) also serves the scale gradient of dot logits (math.md 1.5)
    want_q, want_k = bool(needs[0] or needs[2]), bool(needs[1])
    dq = torch.zeros(n, q.shape[1], dtype=cdt, device=dev)
    dk = torch.zeros(m, k.shape[1], dtype=cdt, device=dev)
    gx = torch.zeros(n, dtype=cdt, device=dev)  # dot: <q_i, sum_j G_ij k_j>; dist: sum_j G_ij x_ij
    db = torch.zeros((), dtype=cdt, device=dev)
    br, bc = _plan(q, k, cdt)
    for i0, i1 in _row_tiles(n, br):
        qI, qaI = _rows(spec, q, i0, i1, a, cdt)
        stats_I = [(lse[i0:i1], g[i0:i1]) for lse, g in lse_g]
        g_I = g_stats[:, i0:i1]
        for j0, j1 in _col_tiles(m, bc):
            kJ = k[j0:j1].to(cdt)
            aI = a[i0:i1]
            x, inner = _logits(spec, qaI, kJ, aI, bias,
                               nq[i0:i1] if nq is not None else None,
                               nk[j0:j1] if nk is not None else None)
            G = tile_grad(spec, aux, x, (i0, i1, j0, j1), stats_I, g_I, colg)
            if spec.sigmoid and bias is not None:
                db += G.sum()
            if spec.logit == "dot":
                # dq_i = a_i sum_j G_ij k_j (a_i applied after the loop), dk_j = sum_i G_ij a_i q_i;
                # a side nobody asked for (a locked tower) costs no matmul
                if want_q:
                    dq[i0:i1] += G @ kJ  # [BR, BC] @ [BC, D]
                if want_k:
                    dk[j0:j1] += G.T @ qaI  # [BC, BR] @ [BR, D]
            else:
                # x = -a d2^(g/2): dL/dd2 = -a (g/2) d2^(g/2-1) G ; H = -2 dL/dd2 (math.md 1.4)
                gx[i0:i1] += (G * x).sum(1)
                # gamma != 2: a duplicate (d2 = 0, see DIST2_EPS) gets the subgradient 0
                fac = 2.0 * aI[:, None] if spec.gamma == 2.0 else (
                    aI[:, None] * spec.gamma * torch.where(
                        inner == 0, 0.0, inner.pow(spec.gamma / 2.0 - 1.0)))
                H = G * fac
                dq[i0:i1] += H @ kJ - H.sum(1)[:, None] * qI  # [BR, BC] @ [BC, D]
                dk[j0:j1] += H.T @ qI - H.sum(0)[:, None] * kJ  # [BC, BR] @ [BR, D]
        if spec.logit == "dot" and want_q:  # the row block's dq is complete
            # dL/da_i = sum_j G_ij <q_i, k_j> = <q_i, sum_j G_ij k_j>  (math.md 1.5)
            gx[i0:i1] = (qI * dq[i0:i1]).sum(1)
            dq[i0:i1] *= a[i0:i1, None]
    da = gx if spec.logit == "dot" else gx / a  # distance logits: dx/da = x / a
    da = da.sum() if alpha.dim() == 0 else da
    return dq, dk, da, (db if bias is not None else None)


def unavailable(device) -> None:
    """The torch backend runs wherever PyTorch does."""
    return None


# the rest of the backend protocol (_backends.Backend)
backward_final = None  # the Function finishes the fp32 gradients
forward_with_dq = finish_dq = None
upcast_inputs = True  # every tile is computed in fp32: the loss layer casts fp16 / bf16 once
prefix_sweep = True  # _matryoshka.py
