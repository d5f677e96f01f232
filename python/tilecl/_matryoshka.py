"""Matryoshka InfoNCE fused: the losses of several prefix dimensions from one sweep of tiles.

Matryoshka representation learning (Kusupati et al. 2022; sentence-transformers'
MatryoshkaLoss) trains the prefixes ``e[:d_1] ⊂ e[:d_2] ⊂ ... ⊂ e[:d_P]`` of one embedding,
each re-normalized, with a weighted sum of one loss per prefix. Run naively that is P tile
sweeps costing sum_p d_p per logit. Here the feature axis is cut at the prefix boundaries into
segments S_1 | S_2 | ... | S_P; one tile sweep computes the segment dots and their running sums

    c_p(i, j) = <q_i[:d_p], k_j[:d_p]> = sum_{s <= p} <q_i[S_s], k_j[S_s]>      (d_P / D work)

and the prefix logits x^p_ij = r_p(i) c_p(i, j) u_p(j), with r_p = alpha / |q[:d_p]| and
u_p = 1 / |k[:d_p]| (the re-normalization, O(N D) code outside differentiated by autograd).
Each prefix's tile then goes through the template's per-tile step (``_torch_tiled``: row LSE,
column LSE, ...). Backward recomputes the tile once, forms G^p (math.md 1.2) per prefix and
H^p = r_p G^p u_p = dL/dc_p; since segment s enters every c_p with p >= s,

    dq_i[S_s] = sum_j (sum_{p >= s} H^p_ij) k_j[S_s],   dk_j[S_s] = sum_i (sum_{p >= s} H^p_ij) q_i[S_s]

(suffix sums of H: one matmul per segment, d_P / D of a full-width matmul per side), and
dL/dr_p(i) = sum_j G^p_ij c_p u_p(j), dL/du_p(j) = sum_i G^p_ij c_p r_p(i) for autograd.
Torch backend, one process; other backends and the ring run the prefixes one by one.
"""

from __future__ import annotations

import torch

from . import _torch_tiled as T
from ._spec import SumSpec, TileAux, TileSpec, compute_dtype, empty_stats


def _segments(dims):
    """[(start, end)] of the feature segments between consecutive (sorted) prefix dims."""
    bounds = [0, *dims]
    return [(bounds[s], bounds[s + 1]) for s in range(len(dims))]


def _prefix_dots(qI, kJ, segs):
    """c_p [BR, BC] for every prefix p: running sums of the segment dots."""
    out, c = [], None
    for a, b in segs:
        d = qI[:, a:b] @ kJ[:, a:b].T  # [BR, d_s] @ [d_s, BC]
        c = d if c is None else c + d
        out.append(c)
    return out


class _PrefixStats(torch.autograd.Function):
    """(stats [P, S, N], col [P, M]) of q against k for every prefix; q, k in the compute dtype,
    r [P, N] and u [P, M] the per-prefix row and column scales."""

    @staticmethod
    def forward(ctx, q, k, r, u, spec: TileSpec, aux: TileAux, dims):
        n, m, P = q.shape[0], k.shape[0], len(dims)
        segs = _segments(dims)
        stats = torch.stack([empty_stats(spec, n, q.device, q.dtype) for _ in range(P)])
        col = torch.full((P, m), float("-inf"), dtype=q.dtype, device=q.device)
        for i0, i1 in T._row_tiles(n):
            for j0, j1 in T._col_tiles(m):
                cs = _prefix_dots(q[i0:i1], k[j0:j1], segs)
                for p in range(P):
                    x = cs[p] * r[p, i0:i1, None] * u[p, None, j0:j1]  # x^p [BR, BC]
                    T.tile_forward(spec, aux, x, (i0, i1, j0, j1), stats[p],
                                   col[p] if spec.col_lse else None)
        ctx.spec, ctx.aux, ctx.dims = spec, aux, dims
        ctx.save_for_backward(q, k, r, u, stats, col)
        return stats, col

    @staticmethod
    def backward(ctx, g_stats, g_col):
        q, k, r, u, stats, col = ctx.saved_tensors
        spec, aux, dims = ctx.spec, ctx.aux, ctx.dims
        n, m, P = q.shape[0], k.shape[0], len(dims)
        segs = _segments(dims)
        g_stats = torch.zeros_like(stats) if g_stats is None else g_stats
        g_col = torch.zeros_like(col) if g_col is None else g_col
        lse_g = [[T._safe_lse(stats[p, s], g_stats[p, s]) for s in range(len(spec.sums))]
                 for p in range(P)]
        colg = [T._safe_lse(col[p], g_col[p]) if spec.col_lse else None for p in range(P)]
        dq, dk = torch.zeros_like(q), torch.zeros_like(k)
        dr, du = torch.zeros_like(r), torch.zeros_like(u)
        for i0, i1 in T._row_tiles(n):
            qI = q[i0:i1]
            for j0, j1 in T._col_tiles(m):
                kJ = k[j0:j1]
                cs = _prefix_dots(qI, kJ, segs)
                H = None  # suffix sum over p >= s of dL/dc_p, built from the last prefix down
                for p in reversed(range(P)):
                    rI, uJ = r[p, i0:i1, None], u[p, None, j0:j1]
                    x = cs[p] * rI * uJ
                    st = [(lse[i0:i1], g[i0:i1]) for lse, g in lse_g[p]]
                    G = T.tile_grad(spec, aux, x, (i0, i1, j0, j1), st, g_stats[p, :, i0:i1],
                                    colg[p])
                    Gc = G * cs[p]
                    dr[p, i0:i1] += (Gc * uJ).sum(1)
                    du[p, j0:j1] += (Gc * rI).sum(0)
                    Hp = G * rI * uJ
                    H = Hp if H is None else H.add_(Hp)
                    a, b = segs[p]
                    dq[i0:i1, a:b] += H @ kJ[:, a:b]  # [BR, BC] @ [BC, d_s]
                    dk[j0:j1, a:b] += H.T @ qI[:, a:b]  # [BC, BR] @ [BR, d_s]
        return dq, dk, dr, du, None, None, None


def matryoshka_info_nce(query, key, alpha, dims, weights, positive_index, symmetric, reduction):
    """sum_p w_p InfoNCE(normalize(q[:d_p]), normalize(k[:d_p])) with one fused tile sweep.

    alpha: 0-dim tensor; dims: sorted distinct ints; weights: floats. Returns the weighted sum
    of the reduced per-prefix losses ([N] rows for reduction "none")."""
    cdt = compute_dtype(query)
    q, k = query.to(cdt), key.to(cdt)
    n = q.shape[0]
    pos = torch.arange(n, device=q.device) if positive_index is None else positive_index
    qn = torch.stack([q[:, :d].norm(dim=1) for d in dims])  # [P, N]
    kn = torch.stack([k[:, :d].norm(dim=1) for d in dims])  # [P, M]
    r = alpha.to(cdt) / qn.clamp_min(1e-12)  # F.normalize's eps
    u = 1.0 / kn.clamp_min(1e-12)
    spec = TileSpec(sums=(SumSpec("all"),), col_lse=symmetric)
    stats, col = _PrefixStats.apply(q, k, r, u, spec, TileAux(), tuple(dims))
    prod = torch.cumsum(torch.stack([(q[:, a:b] * k[pos, a:b]).sum(1)
                                     for a, b in _segments(dims)]), 0)  # [P, N] c_p(i, pos_i)
    s_pos = r * prod * u[:, pos]
    total = 0.0
    for p, w in enumerate(weights):
        rows = stats[p, 0] - s_pos[p]
        if symmetric:
            rows = (rows + col[p] - s_pos[p]) / 2
        red = rows if reduction == "none" else (rows.sum() if reduction == "sum" else rows.mean())
        total = total + w * red
    return total
