"""Dense pure-PyTorch reference of every tilecl loss: the oracle of the tests.

Each function materializes the full similarity matrix and transcribes the official code's formula
(math.md section in brackets); autograd differentiates it, float64 works. No argument checking:
call the public functions in ``tilecl`` for that. Signatures match the public ones minus
``backend`` / ``group``. ``alpha`` below is the logit scale (1 / temperature).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def reduce(rows: torch.Tensor, reduction: str, denom=None):
    """'none' -> rows; 'sum' -> sum; 'mean' -> sum / denom (default: number of rows)."""
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    return total / (rows.numel() if denom is None else denom)


def scale_of(temperature=None, logit_scale=None):
    """alpha = logit_scale, or 1 / temperature."""
    return logit_scale if logit_scale is not None else 1.0 / temperature


def info_nce(query, key, *, temperature=None, logit_scale=None, positive_index=None,
             symmetric=False, label_smoothing=0.0, key_ids=None, hard_negatives=None,
             query_negatives=False, key_negatives=False, false_negative_margin=None,
             false_negative_ratio=None, reduction="mean", topk_negatives=0):
    """[2.1] CE(alpha Q K^T, pos); symmetric: (CE rows + CE columns) / 2 (open_clip ClipLoss).
    alpha may be [N] (one per anchor); label_smoothing as in F.cross_entropy; key_ids [M]: a key
    with the same id as the row's positive (a duplicate document) is not a negative;
    hard_negatives [N, K, D]: row i's own extra negatives, appended as K more columns;
    query_negatives: the other queries q_j (j != i) are negatives too; key_negatives: so are the
    keys against the row's positive key, s(k_pos(i), k_j), j != pos(i) (Qwen3-Embedding);
    false_negative_margin m / ratio r: a key scoring above s_pos + alpha m (or r s_pos) is not a
    negative (thresholds detached), nor is such a query under query_negatives (key-key terms
    stay unmasked, as in Qwen3-Embedding); topk_negatives k: also return (similarity [N, k], index
    [N, k]) of each row's k hardest shared keys that are still negatives, padded with -inf / -1."""
    alpha = scale_of(temperature, logit_scale)
    if isinstance(alpha, torch.Tensor) and alpha.dim() == 1:
        alpha = alpha[:, None]
    logits = alpha * (query @ key.T)  # [N, M]
    n = query.shape[0]
    pos = torch.arange(n, device=query.device) if positive_index is None else positive_index
    if false_negative_margin is not None or false_negative_ratio is not None:
        s_pos = logits.gather(1, pos[:, None]).detach()
        a = alpha.detach() if isinstance(alpha, torch.Tensor) else alpha
        thr = (s_pos + a * false_negative_margin if false_negative_margin is not None
               else false_negative_ratio * s_pos)
        not_pos = torch.arange(key.shape[0], device=key.device)[None, :] != pos[:, None]
        logits = logits.masked_fill((logits > thr) & not_pos, float("-inf"))
    if key_ids is not None:
        dup = (key_ids[pos][:, None] == key_ids[None, :]) & (
            torch.arange(key.shape[0], device=key.device)[None, :] != pos[:, None])
        logits = logits.masked_fill(dup, float("-inf"))
    top = _hardest(logits, pos, alpha, topk_negatives) if topk_negatives else None
    if hard_negatives is not None:
        logits = torch.cat([logits, alpha * torch.einsum("nd,nkd->nk", query, hard_negatives)], 1)
    if query_negatives:  # masked like the keys under a false-negative threshold (Qwen3-Embedding)
        qq = alpha * (query @ query.T)
        drop = torch.eye(n, dtype=torch.bool, device=qq.device)
        if false_negative_margin is not None or false_negative_ratio is not None:
            drop = drop | (qq > thr)
        logits = torch.cat([logits, qq.masked_fill(drop, float("-inf"))], 1)
    if key_negatives:
        dd = alpha * (key[pos] @ key.T)
        self_col = torch.arange(key.shape[0], device=key.device)[None, :] == pos[:, None]
        logits = torch.cat([logits, dd.masked_fill(self_col, float("-inf"))], 1)
    rows = F.cross_entropy(logits, pos, reduction="none", label_smoothing=label_smoothing)
    if symmetric:
        rows = (rows + F.cross_entropy(logits.T, pos, reduction="none",
                                       label_smoothing=label_smoothing)) / 2
    return reduce(rows, reduction) if top is None else (reduce(rows, reduction), top)


def _hardest(logits, pos, alpha, k):
    """Top-k similarities of the shared keys that are negatives (positive and masked out)."""
    with torch.no_grad():
        neg = logits.detach().scatter(1, pos[:, None], float("-inf"))
        if neg.shape[1] < k:
            neg = F.pad(neg, (0, k - neg.shape[1]), value=float("-inf"))
        vals, idx = neg.topk(k, dim=1)
        a = alpha.detach() if isinstance(alpha, torch.Tensor) else alpha
        return vals / a, idx.masked_fill(torch.isneginf(vals), -1)


def clip_loss(image_features, text_features, logit_scale, *, reduction="mean"):
    """[2.1] open_clip ClipLoss; logit_scale is already exponentiated."""
    return info_nce(image_features, text_features, logit_scale=logit_scale, symmetric=True,
                    reduction=reduction)


def siglip_loss(image_features, text_features, logit_scale, logit_bias, *, labels=None,
                text_labels=None, reduction="mean"):
    """[2.2] -sum_j log sigmoid(y_ij s_ij) / N, y = +1 on positives (diagonal or equal labels)."""
    logits = logit_scale * image_features @ text_features.T + logit_bias  # [N, M]
    n, m = logits.shape
    if labels is None:
        y = torch.eye(n, m, dtype=torch.bool, device=logits.device)
    else:
        tl = labels if text_labels is None else text_labels
        y = labels[:, None] == tl[None, :]
    rows = -F.logsigmoid(torch.where(y, logits, -logits)).sum(1)
    return reduce(rows, reduction)


def nt_xent(z1, z2, *, temperature=0.5, convention="pytorch", reduction="mean"):
    """[3] SimCLR over 2N anchors, self excluded, positive i <-> i + N.

    convention "pytorch": mean over the 2N anchors (lightly, SupContrast, PML);
    "simclr_tf": loss_a + loss_b (google-research/simclr), twice the mean.
    """
    z = torch.cat([z1, z2])
    n2 = z.shape[0]
    logits = z @ z.T / temperature
    logits = logits.masked_fill(torch.eye(n2, dtype=torch.bool, device=z.device), float("-inf"))
    pos = torch.arange(n2, device=z.device).roll(n2 // 2)
    rows = F.cross_entropy(logits, pos, reduction="none")
    return reduce(rows, reduction, n2 // 2 if convention == "simclr_tf" else n2)


def _supcon_layout(features, labels, contrast_mode):
    bsz, views = features.shape[:2]
    z = torch.cat(torch.unbind(features, 1))  # [V*B, D], view-major
    lab = torch.arange(bsz, device=z.device) if labels is None else labels
    lab = lab.repeat(views)
    anchors = bsz if contrast_mode == "one" else bsz * views
    return z, lab, anchors


def supcon(features, labels=None, *, temperature=0.07, base_temperature=0.07,
           contrast_mode="all", variant="out", scale=None, reduction="mean"):
    """[4.1, 4.2] SupCon. features [B, V, D] (not normalized here), labels [B] or None (SimCLR).

    variant "out": HobbitLong L_out; an anchor without positives contributes 0 and counts in the
    mean. variant "in": google-research L_in (denominator ALL). scale: "base" multiplies by
    temperature / base_temperature (HobbitLong), "tau" by temperature (google-research), "none"
    by 1 (PML); None picks "base" for "out" and "tau" for "in".
    """
    z, lab, a = _supcon_layout(features, labels, contrast_mode)
    s = z[:a] @ z.T / temperature  # [A, V*B]
    self_mask = torch.eye(a, z.shape[0], dtype=torch.bool, device=z.device)
    s = s.masked_fill(self_mask, float("-inf"))
    pos = (lab[:a, None] == lab[None, :]) & ~self_mask
    n_pos = pos.sum(1)
    lse = torch.logsumexp(s, 1)
    if variant == "out":
        s_pos = torch.where(pos, s, torch.zeros_like(s)).sum(1)
        rows = lse - s_pos / n_pos.clamp_min(1)
    else:
        lse_pos = torch.logsumexp(s.masked_fill(~pos, float("-inf")), 1)
        rows = lse - lse_pos + torch.log(n_pos.clamp_min(1).to(s.dtype))
    rows = torch.where(n_pos > 0, rows, torch.zeros_like(rows))
    kind = scale or ("base" if variant == "out" else "tau")
    factor = {"base": temperature / base_temperature, "tau": temperature, "none": 1.0}[kind]
    return reduce(factor * rows, reduction)


def _two_view(z1, z2, temperature):
    """2B x 2B logits of [z1; z2] and the index of each row's positive."""
    z = torch.cat([z1, z2])
    b2 = z.shape[0]
    return z @ z.T / temperature, torch.arange(b2, device=z.device).roll(b2 // 2), z


def dcl_loss(z1, z2, *, temperature=0.1, weighted=False, sigma=0.5, reduction="mean"):
    """[8.1] DCL / DCLW, lightly >= 1.5.21 on the given embeddings (lightly normalizes them
    first; the public function's ``normalize=True`` does that): positive out of the denominator,
    one LSE over the other 2B - 2 samples, mean of both directions; DCLW weight
    w_i = 2 - B softmax_k(<z_k, z'_k> / sigma)_i (detached)."""
    s, pos, z = _two_view(z1, z2, temperature)
    b2 = s.shape[0]
    eye = torch.eye(b2, dtype=torch.bool, device=s.device)
    is_pos = F.one_hot(pos, b2).bool()
    lse = torch.logsumexp(s.masked_fill(eye | is_pos, float("-inf")), 1)
    s_pos = s.gather(1, pos[:, None])[:, 0]
    w = torch.ones_like(s_pos)
    if weighted:
        b = b2 // 2
        u = (z[:b] * z[b:]).sum(1).detach() / sigma
        w = (2 - b * torch.softmax(u, 0)).repeat(2)
    return reduce(lse - w * s_pos, reduction)


def _hard_negative_family(z1, z2, temperature, tau_plus, beta, reduction):
    """[8.2, 8.3] HCL (beta > 0) / debiased (beta = 0): -log(pos / (pos + Ng)), mean over 2B."""
    s, pos, _ = _two_view(z1, z2, temperature)
    b2 = s.shape[0]
    eye = torch.eye(b2, dtype=torch.bool, device=s.device)
    neg_mask = ~(eye | F.one_hot(pos, b2).bool())
    n_neg = b2 - 2
    neg = torch.where(neg_mask, torch.exp(s), torch.zeros_like(s))
    pos_e = torch.exp(s.gather(1, pos[:, None])[:, 0])
    if beta > 0:
        imp = torch.where(neg_mask, torch.exp(beta * s), torch.zeros_like(s))
        reweight = (imp * neg).sum(1) / (imp.sum(1) / n_neg)
    else:
        reweight = neg.sum(1)
    ng = (-tau_plus * n_neg * pos_e + reweight) / (1 - tau_plus)
    ng = torch.clamp(ng, min=n_neg * math.e ** (-1 / temperature))
    return reduce(-torch.log(pos_e / (pos_e + ng)), reduction)


def hcl_loss(z1, z2, *, temperature=0.5, tau_plus=0.1, beta=1.0, reduction="mean"):
    """[8.2] joshr17/HCL; inputs used as given (the official model normalizes them)."""
    return _hard_negative_family(z1, z2, temperature, tau_plus, beta, reduction)


def debiased_loss(z1, z2, *, temperature=0.5, tau_plus=0.1, reduction="mean"):
    """[8.3] chingyaoc/DCL debiased contrastive loss; inputs used as given."""
    return _hard_negative_family(z1, z2, temperature, tau_plus, 0.0, reduction)


def cclk_weights(conditions, *, lam=0.1, kernel="cosine", temp_z=1.0):
    """[5.1] W = (K_Z + lam I)^-1 K_Z (diag of K_Z forced to 1), W_ii = 0, W < 1e-6 -> 0."""
    c = conditions.double()
    if kernel == "cosine":
        cn = F.normalize(c, dim=1)
        k = cn @ cn.T
    elif kernel == "rbf":
        k = torch.exp(-torch.cdist(c, c).square() / temp_z)
    else:
        raise ValueError(f"kernel must be 'cosine' or 'rbf', got {kernel!r}")
    k.fill_diagonal_(1.0)
    w = torch.linalg.solve(k + lam * torch.eye(k.shape[0], dtype=k.dtype, device=k.device), k)
    w.fill_diagonal_(0.0)
    return torch.where(w < 1e-6, torch.zeros_like(w), w).to(conditions.dtype)


def cclk_loss(z1, z2, weight_x, weight_y, *, temperature=0.5, mode="hardneg", reduction="mean"):
    """[5.1] CCL-K (Crazy-Jack/CCLK-release) on the given embeddings (its cosine critic normalizes
    them first: the public ``normalize=True``); weights W^x, W^y given densely.

    mode "hardneg" (also Fair-CCLK): D_i = e^{S12_ii} + (B-1) sum_j W_ji (e^{S12_ij} + e^{S11_ij});
    mode "weaklysup": Pn_i = sum_j W_ji (...), D_i = Pn_i + sum_j e^{S12_ij} + e^{S11_ij};
    clamps [1e-7, 1e20]; L = (L_x + L_y) / 2. reduction "none" gives [2B] (x rows then y rows).
    """
    b = z1.shape[0]
    a1, a2 = z1, z2
    eye = torch.eye(b, dtype=torch.bool, device=z1.device)

    def direction(za, zb, w):
        s_ab = za @ zb.T / temperature
        e_ab = torch.exp(s_ab)
        e_aa = torch.exp(za @ za.T / temperature).masked_fill(eye, 0.0)
        weighted = (w.T * (e_ab + e_aa)).sum(1)
        if mode == "hardneg":
            d = torch.clamp(torch.diagonal(e_ab) + (b - 1) * weighted, 1e-7, 1e20)
            return torch.log(d) - torch.diagonal(s_ab)
        pn = torch.clamp(weighted, 1e-7, 1e20)
        d = torch.clamp(pn + e_ab.sum(1) + e_aa.sum(1), 1e-7, 1e20)
        return torch.log(d) - torch.log(pn)

    rows = torch.cat([direction(a1, a2, weight_x), direction(a2, a1, weight_y)])
    return reduce(rows, reduction)


def kernel_info_nce(z1, z2, *, temperature=0.5, gamma=2.0, eps=1e-6, reduction="mean"):
    """[7.1] Kernel-InfoNCE gamma_loss: logits -||x_i - x_j||^gamma / T, positive in the
    denominator, neg = clamp(sum_{j != i} e^x, min=eps), -log(pos / (neg + eps)), mean over 2B.

    Distances from the differences (cdist's exact mode; its default switches to the Gram
    expansion above 25 rows): a duplicate pair is at distance exactly 0, where cdist's gradient
    is the subgradient 0, for every gamma."""
    out = torch.cat([z1, z2])
    b2 = out.shape[0]
    dist = torch.cdist(out, out, compute_mode="donot_use_mm_for_euclid_dist")
    sim = torch.exp(-dist.pow(gamma) / temperature)
    neg = torch.clamp(sim.sum(1) - torch.diagonal(sim), min=eps)
    pos = torch.exp(-(z1 - z2).norm(dim=1).pow(gamma) / temperature).repeat(2)
    rows = -torch.log(pos / (neg + eps))
    return reduce(rows, reduction, b2)


def uniformity_loss(x, *, t=2.0):
    """[6.2] log mean_{i<j} exp(-t ||x_i - x_j||^2) (Wang & Isola)."""
    return torch.pdist(x).pow(2).mul(-t).exp().mean().log()


def prior_weights(prior, *, kernel="rbf", sigma=1.0, lam=0.01):
    """[6.1] alpha = (K + lam I)^-1 K over the prior vectors (no gradient)."""
    p = prior.detach().double()
    if kernel == "rbf":
        k = torch.exp(-torch.cdist(p, p).square() / (2 * sigma**2))
    elif kernel == "cosine":
        pn = F.normalize(p, dim=1)
        k = pn @ pn.T
    else:
        raise ValueError(f"kernel must be 'rbf' or 'cosine', got {kernel!r}")
    eye = torch.eye(k.shape[0], dtype=k.dtype, device=k.device)
    return torch.linalg.solve(k + lam * eye, k)


def decoupled_uniformity(z, prior=None, *, t=2.0, kernel="rbf", sigma=1.0, lam=0.01):
    """[6.1] Dufumier et al.: mu_i = mean_v normalize(z_iv); mu <- alpha mu with a prior;
    log mean_{i<j} exp(-t ||mu_i - mu_j||^2). z: [B, V, D]."""
    mu = F.normalize(z, dim=2).mean(1)
    if prior is not None:
        mu = prior_weights(prior, kernel=kernel, sigma=sigma, lam=lam).to(mu.dtype) @ mu
    return uniformity_loss(mu, t=t)
