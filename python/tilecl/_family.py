"""The loss family on the tile template: one TileSpec + an O(N) epilogue per loss.

Each function builds the flags of the template (``_spec.py``) and the side data, asks
``tile_stats`` for the per-row statistics (tiled, any backend, or the ring across ranks), and
finishes with O(N) PyTorch code that autograd differentiates: positive logits as O(N d)
gathers outside the tile loop (math.md 1.3, "take b_i Y_ij out of the tile loop"), clamps,
reductions. Arguments are already checked by ``losses.py``; alpha is a tensor.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import _backends
from ._group import as_group
from ._spec import SumSpec, TileAux, TileSpec, compute_dtype

ALL, NEG, POS = SumSpec("all"), SumSpec("neg"), SumSpec("pos")


# ---- the group the loss runs over (_group.py: one process, or the ring across ranks) ----------

def _stats(spec, q, k, alpha, bias, aux, backend, group, pos=None, options=None):
    """(stats, col_lse, s_pos) of the local rows against the (global) columns; s_pos_i =
    alpha_i <q_i, k_pos(i)> for a LOCAL positive column pos (None: empty); with spec.topk a
    fourth element, the rows' hardest negatives (vals, global idx). options: the loss's scalar
    options, checked across ranks by the ring's handshake (the first sweep of a loss passes
    them, before any epilogue collective that they would change)."""
    return as_group(group).tile_stats(spec, q, k, alpha, bias, aux, backend, pos, options)


def _col_offset(m_local: int, group) -> int:
    """Global index of this rank's first column (columns are concatenated rank by rank)."""
    return as_group(group).column_offset(m_local)


def _reduce(rows, reduction, denom, group):
    """'none' -> local rows; 'sum' / 'mean' -> the global sum (divided by the global denom)."""
    if reduction == "none":
        return rows
    return as_group(group).reduce(rows, reduction, denom)


def _up(backend, group, *ts):
    """fp16/bf16 operands as fp32 for a backend that computes every tile in fp32 anyway (the
    torch backend, ``upcast_inputs``): one cast instead of one per tile, and every gradient path
    (tile, positive gather, prologue) accumulates in fp32 and is rounded to the input dtype once.
    Kernel backends take the input dtype and upcast in registers. Under the ring, blocks travel
    in the input dtype."""
    if not (_backends.get(backend).upcast_inputs and as_group(group).local):
        return ts if len(ts) > 1 else ts[0]
    out = tuple(t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for t in ts)
    return out if len(out) > 1 else out[0]


def _dot(a, b):
    """Row-wise <a_i, b_i> in fp32 (float64 stays float64): the positive logits."""
    dt = compute_dtype(a)
    return (a.to(dt) * b.to(dt)).sum(1)


def _arange(n, like, offset=0):
    return torch.arange(offset, offset + n, device=like.device)


# ---- InfoNCE / CLIP / SigLIP (math.md 2) -------------------------------------------------------

def _global_mean(t, group):
    """Mean of the rows of t over the global batch (differentiable; all-reduced under the ring)."""
    total = as_group(group).sum(t.sum(0))
    return total / _global_count(t.shape[0], group)


def info_nce(query, key, alpha, positive_index, symmetric, reduction, backend, group,
             label_smoothing=0.0, key_ids=None, hard_negatives=None, query_negatives=False,
             key_negatives=False, fn_margin=None, fn_ratio=None, topk=0, options=None):
    """The loss rows (reduced), and with topk > 0 also (similarity [N, topk], global key
    index [N, topk]) of each row's hardest in-batch negatives, streamed by the same forward.
    options: the public scalar options, checked across ranks under the ring (see _stats)."""
    query, key = _up(backend, group, query, key)
    n = query.shape[0]
    off = _col_offset(key.shape[0], group)
    pos = _arange(n, query) if positive_index is None else positive_index
    # positive_index indexes the rank's LOCAL keys (losses.py checks it against M_local)
    threshold = fn_margin is not None or fn_ratio is not None
    if key_ids is None:  # the positive column is named to the tiles only when they must spare it
        by_index = threshold or topk > 0
        spec = TileSpec(positive="index" if by_index else "none", sums=(ALL,), col_lse=symmetric,
                        threshold=threshold, topk=topk)
        aux = TileAux(pos=pos + off if by_index else None, col_offset=off)
    else:  # duplicates of the positive (same id) leave the denominator: an LSE over the keys
        # with another id (a label "neg" sum); the positive itself is added back below
        spec = TileSpec(positive="label", sums=(NEG,), threshold=threshold, topk=topk)
        aux = TileAux(labels_q=key_ids[pos], labels_k=key_ids, col_offset=off)
    if threshold:  # false negatives: x_ij above the row's (detached) threshold leave the sums
        with torch.no_grad():
            a = alpha.detach()
            sp = a * _dot(query, key[pos])
            aux.thresh = sp + a * fn_margin if fn_margin is not None else fn_ratio * sp
    stats, col, s_pos, *top = _stats(spec, query, key, alpha, None, aux, backend, group, pos,
                                     options)
    dt = stats.dtype
    lse = stats[0] if key_ids is None else torch.logaddexp(stats[0], s_pos)
    extra = None
    if hard_negatives is not None:  # row i's own K negatives: [N, K] logits, O(N K d)
        a = alpha[:, None] if alpha.dim() else alpha
        extra = a * torch.einsum("nd,nkd->nk", query.to(dt), hard_negatives.to(dt))
        lse = torch.logaddexp(lse, torch.logsumexp(extra, 1))
    if query_negatives:  # q_i against the other queries (Qwen3-Embedding), one more tile sweep
        q_off = _col_offset(n, group)
        q_aux = TileAux(excl=_arange(n, query, q_off), col_offset=q_off)
        if threshold:  # Qwen3-Embedding masks query-query terms above the same threshold as the
            # keys (s(q_i, q_j) > s(q_i, d_i+) + m); the flag needs a positive column: none (-1)
            q_aux.pos, q_aux.thresh = torch.full_like(pos, -1), aux.thresh
        qq, _, _ = _stats(TileSpec(positive="index" if threshold else "none", sums=(ALL,),
                                   threshold=threshold), query, query, alpha, None, q_aux,
                          backend, group)
        lse = torch.logaddexp(lse, qq[0])
    if key_negatives:  # the row's positive key against the other keys
        dd, _, _ = _stats(TileSpec(sums=(ALL,)), key[pos], key, alpha, None,
                          TileAux(excl=pos + off, col_offset=off), backend, group)
        lse = torch.logaddexp(lse, dd[0])
    target = s_pos
    if label_smoothing:  # F.cross_entropy: (1 - e) s_pos + e mean over the row's logits
        m_all = _global_count(key.shape[0], group)
        total = alpha * (query.to(dt) @ _global_mean(key.to(dt), group)) * m_all  # a <q, sum k>
        count = m_all
        if extra is not None:
            total, count = total + extra.sum(1), count + extra.shape[1]
        target = (1 - label_smoothing) * s_pos + label_smoothing * total / count
    rows = lse - target
    if symmetric:  # (CE rows + CE columns) / 2 with the diagonal positive (math.md 2.1)
        col_target = s_pos
        if label_smoothing:
            q_bar = _global_mean(query.to(dt), group)
            col_target = (1 - label_smoothing) * s_pos + label_smoothing * alpha * (key.to(dt) @ q_bar)
        rows = (rows + col - col_target) / 2
    loss = _reduce(rows, reduction, _global_count(n, group), group)
    if not topk:
        return loss
    vals, idx = top[0]
    a = alpha.detach().to(vals.dtype)
    return loss, (vals / (a[:, None] if a.dim() else a), idx)  # logits back to similarities


def siglip_loss(image, text, alpha, bias, labels, text_labels, reduction, backend, group,
           options=None):
    image, text = _up(backend, group, image, text)
    n = image.shape[0]
    off = _col_offset(text.shape[0], group)
    if labels is None:
        spec, aux = TileSpec(positive="index", sigmoid=True), TileAux(pos=_arange(n, image, off))
    else:
        tl = labels if text_labels is None else text_labels
        spec, aux = TileSpec(positive="label", sigmoid=True), TileAux(labels_q=labels, labels_k=tl)
    aux.col_offset = off
    stats, _, _ = _stats(spec, image, text, alpha, bias, aux, backend, group, options=options)
    return _reduce(stats[spec.i_sig], reduction, _global_count(n, group), group)


# ---- single-set losses over [z1; z2] (math.md 3, 7, 8) ------------------------------------------

def _partner(z1):
    """Local index of each row's positive in [z1; z2]: i <-> i + B."""
    b = z1.shape[0]
    i = torch.arange(2 * b, device=z1.device)
    return torch.cat([i[b:], i[:b]])


def _two_view(z1, z2, group, backend):
    """z = [z1; z2], the global index of each row (self) and of its positive (i <-> i + B)."""
    z = _up(backend, group, torch.cat([z1, z2]))
    b = z1.shape[0]
    off = _col_offset(2 * b, group)
    self_idx = _arange(2 * b, z, off)
    pos = torch.cat([self_idx[b:], self_idx[:b]])
    return z, self_idx, pos, off


def nt_xent(z1, z2, alpha, convention, reduction, backend, group, options=None):
    z, self_idx, pos, off = _two_view(z1, z2, group, backend)
    spec = TileSpec(sums=(ALL,))
    stats, _, s_pos = _stats(spec, z, z, alpha, None, TileAux(excl=self_idx, col_offset=off),
                             backend, group, _partner(z1), options)
    rows = stats[0] - s_pos
    denom = _global_count(z.shape[0], group)
    return _reduce(rows, reduction, denom // 2 if convention == "simclr_tf" else denom, group)


def _global_count(n_local, group):
    return as_group(group).count(n_local)


def dcl_loss(z1, z2, alpha, weighted, sigma, reduction, backend, group, options=None):
    z, self_idx, pos, off = _two_view(z1, z2, group, backend)
    spec = TileSpec(positive="index", sums=(NEG,))
    aux = TileAux(excl=self_idx, pos=pos, col_offset=off)
    stats, _, s_pos = _stats(spec, z, z, alpha, None, aux, backend, group, _partner(z1), options)
    w = torch.ones_like(s_pos)
    if weighted:  # DCLW: w_i = 2 - B softmax_k(<z_k, z'_k> / sigma)_i, detached (math.md 8.1)
        u = _dot(z1, z2).detach() / sigma
        w = (2 - z1.shape[0] * torch.softmax(u, 0)).repeat(2).to(s_pos.dtype)
    return _reduce(stats[0] - w * s_pos, reduction, _global_count(z.shape[0], group), group)


def hcl_loss(z1, z2, alpha, tau_plus, beta, reduction, backend, group, options=None):
    """HCL (beta > 0, math.md 8.2) and debiased (beta = 0, 8.3), in log space."""
    z, self_idx, pos, off = _two_view(z1, z2, group, backend)
    sums = (SumSpec("neg", 1.0 + beta), SumSpec("neg", beta)) if beta > 0 else (NEG,)
    spec = TileSpec(positive="index", sums=sums)
    aux = TileAux(excl=self_idx, pos=pos, col_offset=off)
    stats, _, s_pos = _stats(spec, z, z, alpha, None, aux, backend, group, _partner(z1), options)
    n2 = _global_count(z.shape[0], group)
    n_neg = n2 - 2
    # log reweight_i = log(sum_j imp_ij neg_ij / mean_j imp_ij) = log N_n + lseA - lseB
    log_rw = math.log(n_neg) + stats[0] - stats[1] if beta > 0 else stats[0]
    # Ng_i = max((reweight_i - tau+ N_n pos_i) / (1 - tau+), N_n e^(-1/T))
    d = math.log(tau_plus * n_neg) + s_pos - log_rw if tau_plus > 0 else torch.full_like(
        s_pos, float("-inf"))
    ok = d < 0
    safe = torch.where(ok, d, torch.full_like(d, -1.0))
    log_diff = torch.where(ok, log_rw + torch.log1p(-torch.exp(safe)), torch.full_like(d, float("-inf")))
    log_floor = (math.log(n_neg) - alpha).to(d.dtype)  # log(N_n e^(-1/T)), alpha = 1/T
    log_ng = torch.maximum(log_diff - math.log(1.0 - tau_plus), log_floor)
    rows = torch.logaddexp(s_pos, log_ng) - s_pos  # -log(pos / (pos + Ng))
    return _reduce(rows, reduction, n2, group)


def kernel_info_nce(z1, z2, alpha, gamma, eps, reduction, backend, group, options=None):
    """math.md 7.2: x_ij = -||z_i - z_j||^gamma / T, self excluded, eps as in gamma_loss."""
    z, self_idx, _, off = _two_view(z1, z2, group, backend)
    spec = TileSpec(logit="dist", gamma=float(gamma), sums=(ALL,))
    # x_pos_i = -|z_i - z_pos(i)|^gamma / T from the difference (math.md 7.2), inside the tile
    # Function: its gradient meets the tiles' in fp32 and is rounded to a 16-bit dtype once
    # (the partner is a local column, under the ring too)
    stats, _, x_pos = _stats(spec, z, z, alpha, None, TileAux(excl=self_idx, col_offset=off),
                             backend, group, _partner(z1), options=options)
    log_eps = math.log(eps)
    # log(clamp(neg, min=eps) + eps)
    log_den = torch.logaddexp(stats[0].clamp_min(log_eps), torch.full_like(stats[0], log_eps))
    return _reduce(log_den - x_pos, reduction, _global_count(z.shape[0], group), group)


# ---- SupCon (math.md 4) ----------------------------------------------------------------------

def supcon(features, labels, alpha, factor, contrast_mode, variant, reduction, backend, group,
           options=None):
    bsz, views = features.shape[:2]
    z = _up(backend, group, torch.cat(torch.unbind(features, 1)))  # [V*B, D], view-major
    off = _col_offset(z.shape[0], group)
    lab = (_arange(bsz, z, off) if labels is None else labels).repeat(views)
    a = bsz if contrast_mode == "one" else bsz * views
    sums = (ALL,) if variant == "out" else (ALL, POS)
    spec = TileSpec(positive="label", sums=sums, lin=variant == "out")
    aux = TileAux(excl=_arange(a, z, off), labels_q=lab[:a], labels_k=lab, col_offset=off)
    stats, _, _ = _stats(spec, z[:a], z, alpha, None, aux, backend, group, options=options)
    if variant == "out":
        cnt = stats[spec.i_cnt].detach()
        rows = stats[0] - stats[spec.i_lin] / cnt.clamp_min(1)
    else:
        cnt = _label_count(lab[:a], lab, group)
        rows = stats[0] - stats[1] + torch.log(cnt.clamp_min(1).to(stats.dtype))
    rows = factor * torch.where(cnt > 0, rows, torch.zeros_like(rows))
    return _reduce(rows, reduction, _global_count(a, group), group)


def _label_count(labels_q, labels_k, group):
    """|P(i)| = number of columns with the anchor's label, minus itself (O(N log N))."""
    labels_k = as_group(group).gather_1d(labels_k)
    uniq, inv = torch.unique(labels_k, return_inverse=True)
    hist = torch.bincount(inv, minlength=uniq.numel())
    idx = torch.searchsorted(uniq, labels_q).clamp_max(uniq.numel() - 1)
    return torch.where(uniq[idx] == labels_q, hist[idx], torch.zeros_like(idx)) - 1


# ---- CCL-K (math.md 5) ----------------------------------------------------------------------

def cclk_loss(z1, z2, alpha, weights, factors, mode, reduction, backend, group, options=None):
    """Per direction: rows z_a vs columns [z_b; z_a], self excluded, weight w_ij = W_{j mod B, i}.

    The positive column carries W_ii = 0, so the weighted sum runs over "neg" columns, which is
    exact for dense W and zeroes the diagonal of a low-rank W in-tile (math.md 5.3). Under the
    ring (low-rank weights only) each rank's columns are its own [z_b; z_a] and the column
    factors travel with them.
    """
    b = z1.shape[0]
    z1, z2 = _up(backend, group, z1, z2)
    wsum = SumSpec("neg", weighted=True)
    sums = (wsum,) if mode == "hardneg" else (wsum, ALL)
    kind = "dense" if weights is not None else "lowrank"
    spec = TileSpec(positive="index", sums=sums, weight=kind, weight_clip=1e-6)
    lo, hi = math.log(1e-7), math.log(1e20)
    off = _col_offset(2 * b, group)
    b_all = _global_count(b, group)
    rows = []
    for d, (za, zb) in enumerate(((z1, z2), (z2, z1))):
        cols = torch.cat([zb, za])
        if weights is not None:
            aux = TileAux(weight=weights[d].T)
        else:
            fa, fb = factors[d]
            aux = TileAux(wa=fa, wb=torch.cat([fb, fb]))
        aux.excl, aux.pos, aux.col_offset = _arange(b, za, off + b), _arange(b, za, off), off
        stats, _, s_pos = _stats(spec, za, cols, alpha, None, aux, backend, group, _arange(b, za),
                                 options if d == 0 else None)
        if mode == "hardneg":
            log_d = torch.logaddexp(s_pos, math.log(b_all - 1) + stats[0] if b_all > 1 else
                                    torch.full_like(s_pos, float("-inf")))
            rows.append(log_d.clamp(lo, hi) - s_pos)
        else:
            log_pn = stats[0].clamp(lo, hi)
            rows.append(torch.logaddexp(log_pn, stats[1]).clamp(lo, hi) - log_pn)
    return _reduce(torch.cat(rows), reduction, 2 * b_all, group)


def _gram_all(u, group):
    """U^T U of the global batch (no gradient: the weights are constants, math.md 5.1)."""
    return as_group(group).sum_(u.T @ u)  # [r, B] @ [B, r]


def cclk_factors(conditions, lam, group=None):
    """Low-rank CCL-K weights for the cosine kernel (math.md 5.3): W_ij = u_i^T C u_j (i != j),
    C = (lam I + U^T U)^-1, U the normalized conditions of the whole (global) batch.
    Returns (row factors U C, column factors U) of the local rows."""
    u = F.normalize(conditions.double(), dim=1)
    c = torch.linalg.inv(lam * torch.eye(u.shape[1], dtype=u.dtype, device=u.device) +
                         _gram_all(u, group))
    return (u @ c).to(conditions.dtype), u.to(conditions.dtype)


# ---- uniformity (math.md 6) ---------------------------------------------------------------

def uniformity_loss(x, alpha, backend, group, options=None):
    """log mean_{i<j} exp(-t |x_i - x_j|^2) = LSE_i(lse_i) - log(N (N - 1))  (math.md 6.3)."""
    n = x.shape[0]
    x = _up(backend, group, x)
    off = _col_offset(n, group)
    spec = TileSpec(logit="dist", gamma=2.0, sums=(ALL,))
    stats, _, _ = _stats(spec, x, x, alpha, None, TileAux(excl=_arange(n, x, off), col_offset=off),
                      backend, group, options=options)
    total = as_group(group).logsumexp(stats[0])
    ng = _global_count(n, group)
    return total - math.log(ng * (ng - 1))


def prior_apply(mu, prior, kernel, sigma, lam, group=None):
    """mu <- alpha mu with alpha = (K + lam I)^-1 K (math.md 6.1, no gradient through alpha).

    cosine: low rank, alpha mu = U (lam I + U^T U)^-1 U^T mu in O(B r d), under the ring with a
    differentiable all-reduce of U^T mu ([r, d]); rbf: a dense B x B solve (single process).
    """
    if kernel == "cosine":
        u = F.normalize(prior.detach().double(), dim=1)
        c = lam * torch.eye(u.shape[1], dtype=u.dtype, device=u.device) + _gram_all(u, group)
        utmu = as_group(group).sum(u.T @ mu.double())  # [r, B] @ [B, d]
        return u.to(mu.dtype) @ torch.linalg.solve(c, utmu).to(mu.dtype)
    from .reference import prior_weights

    return prior_weights(prior, kernel=kernel, sigma=sigma, lam=lam).to(mu.dtype) @ mu
