"""Every public loss as a test case: how to make its inputs and how to call it.

``make(n, d, dtype)`` returns (diff, const): ``diff`` are the tensors to differentiate (float
embeddings and scalar temperature / scale / bias), ``const`` the rest (labels, weights, ...).
``call(backend, reduction, *diff, **const)`` returns the loss. ``rows`` says whether
reduction="none" is supported. ``min_n`` is the smallest batch the loss accepts.
"""

import dataclasses

import torch
import torch.nn.functional as F

import tilecl
from tilecl import reference


@dataclasses.dataclass
class Case:
    name: str
    make: object
    call: object
    rows: bool = True
    min_n: int = 1
    detached: bool = False  # part of the loss is detached on purpose: gradcheck does not apply
    backends: tuple = ()  # tile backends that support it (empty: all)


def unit(*shape, dtype):
    return F.normalize(torch.randn(*shape, dtype=torch.float64), dim=-1).to(dtype)


def scalar(v, dtype):
    return torch.tensor(v, dtype=torch.float64 if dtype == torch.float64 else torch.float32)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _cclk_dense(n, dtype):
    return tuple(reference.cclk_weights(torch.randn(n, 3, dtype=torch.float64, generator=_gen(s)),
                                        kernel="rbf", temp_z=2.0, lam=0.1).to(dtype) for s in (1, 2))


def _conds(n, dtype):
    return tuple(torch.randn(n, 3, dtype=torch.float64, generator=_gen(s)).to(dtype) for s in (3, 4))


def _prefixes(d):
    """Matryoshka prefix dims of a D-wide embedding: D, D/2, D/4 (those >= 4: the gradient
    through the re-normalization of a 1-3 dim prefix cancels catastrophically in fp32)."""
    return sorted({d} | {p for p in (d // 2, d // 4) if p >= 4}, reverse=True)


def _spread(n, d, dt, away, seed):
    """Unit vectors in a cluster around e_1 (cosine ~0.99), except those with ``away`` set (the
    first three quarters, whole tiles of every backend at N = 130, and every fifth), which
    point the other way: at logit scale 100 their row (or column) maxima sit ~195 below the
    cluster's, inside one tile and from one tile to the next, far past fp32's exp range (~88).
    A stale running max turns that into NaN or a wrong loss."""
    x = torch.randn(n, d, dtype=torch.float64, generator=_gen(seed)) * 0.1
    x[:, 0] += 1.0
    if away:
        i = torch.arange(n)
        x[(i < 3 * n // 4) | (i % 5 == 2), 0] -= 2.0
    return F.normalize(x, dim=1).to(dt)


CASES = [
    Case("info_nce",
         lambda n, d, dt: ((unit(n, d, dtype=dt), unit(n + 3, d, dtype=dt), scalar(0.2, dt)), {}),
         lambda b, r, q, k, t: tilecl.info_nce(q, k, temperature=t, reduction=r, backend=b)),
    Case("info_nce_perm",
         lambda n, d, dt: ((unit(n, d, dtype=dt), unit(2 * n, d, dtype=dt), scalar(12.0, dt)),
                           {"pos": torch.randperm(2 * n, generator=_gen(5))[:n]}),
         lambda b, r, q, k, s, pos: tilecl.info_nce(q, k, logit_scale=s, positive_index=pos,
                                                    reduction=r, backend=b)),
    Case("info_nce_smooth_per_anchor",  # per-anchor temperature [N] and label smoothing
         lambda n, d, dt: ((unit(n, d, dtype=dt), unit(n + 5, d, dtype=dt),
                            (torch.rand(n, dtype=torch.float64, generator=_gen(8)) * 0.3 + 0.05).to(
                                scalar(0, dt).dtype)), {}),
         lambda b, r, q, k, t: tilecl.info_nce(q, k, temperature=t, label_smoothing=0.1,
                                               reduction=r, backend=b)),
    Case("info_nce_duplicate_ids",  # the same document twice: its copy is not a negative
         lambda n, d, dt: ((unit(n, d, dtype=dt), unit(n + 4, d, dtype=dt), scalar(0.1, dt)),
                           {"ids": torch.arange(n + 4) % max(1, (n + 4) // 2)}),
         lambda b, r, q, k, t, ids: tilecl.info_nce(q, k, temperature=t, key_ids=ids, reduction=r,
                                                    backend=b)),
    Case("info_nce_hard_negatives",  # own [N, K, D] negatives + smoothing + per-anchor temperature
         lambda n, d, dt: ((unit(n, d, dtype=dt), unit(n + 2, d, dtype=dt), unit(n, 3, d, dtype=dt),
                            (torch.rand(n, dtype=torch.float64, generator=_gen(9)) * 0.3 + 0.05).to(
                                scalar(0, dt).dtype)), {}),
         lambda b, r, q, k, h, t: tilecl.info_nce(q, k, temperature=t, hard_negatives=h,
                                                  label_smoothing=0.1, reduction=r, backend=b)),
    Case("info_nce_dup_hard",
         lambda n, d, dt: ((unit(n, d, dtype=dt), unit(n + 4, d, dtype=dt), unit(n, 2, d, dtype=dt)),
                           {"ids": torch.arange(n + 4) % max(1, (n + 4) // 2)}),
         lambda b, r, q, k, h, ids: tilecl.info_nce(q, k, temperature=0.1, key_ids=ids,
                                                    hard_negatives=h, reduction=r, backend=b)),
    Case("info_nce_qq_dd",  # Qwen3-Embedding: query-query and document-document negatives
         lambda n, d, dt: ((unit(n, d, dtype=dt), unit(n + 3, d, dtype=dt), unit(n, 2, d, dtype=dt),
                            scalar(0.1, dt)),
                           {"pos": torch.randperm(n + 3, generator=_gen(10))[:n]}),
         lambda b, r, q, k, h, t, pos: tilecl.info_nce(
             q, k, temperature=t, positive_index=pos, hard_negatives=h, query_negatives=True,
             key_negatives=True, reduction=r, backend=b)),
    Case("info_nce_false_negative_margin",  # Qwen3-Embedding: drop keys above s_pos + 0.05
         lambda n, d, dt: ((unit(n, d, dtype=dt), unit(2 * n, d, dtype=dt), scalar(0.1, dt)), {}),
         lambda b, r, q, k, t: tilecl.info_nce(q, k, temperature=t, false_negative_margin=0.05,
                                               reduction=r, backend=b),
         # N = 1 leaves one negative and a loss of ~0.09 that cancels from two ~8.5 terms: the
         # scale gradient is then at fp32's limit (1.7e-5), as for plain InfoNCE on that data
         min_n=2),
    Case("info_nce_false_negative_ratio",  # NV-Retriever: drop keys above 0.9 s_pos
         lambda n, d, dt: ((unit(n, d, dtype=dt), unit(n + 6, d, dtype=dt), unit(n, 2, d, dtype=dt)),
                           {"ids": torch.arange(n + 6) % max(1, (n + 6) // 2)}),
         lambda b, r, q, k, h, ids: tilecl.info_nce(q, k, temperature=0.1, key_ids=ids,
                                                    hard_negatives=h, false_negative_ratio=0.9,
                                                    reduction=r, backend=b)),
    Case("matryoshka",  # prefixes d, d/2, d/4 (re-normalized), weighted; extra keys; raw inputs
         lambda n, d, dt: ((torch.randn(n, d, dtype=torch.float64).to(dt),
                            torch.randn(n + 3, d, dtype=torch.float64).to(dt), scalar(0.1, dt)), {}),
         lambda b, r, q, k, t: tilecl.matryoshka_info_nce(
             q, k, _prefixes(q.shape[1]), weights=[1.0, 0.5, 0.25][:len(_prefixes(q.shape[1]))],
             temperature=t, reduction=r, backend=b)),
    Case("matryoshka_clip",  # symmetric, a permuted positive order is not allowed: diagonal
         lambda n, d, dt: ((torch.randn(n, d, dtype=torch.float64).to(dt),
                            torch.randn(n, d, dtype=torch.float64).to(dt), scalar(20.0, dt)), {}),
         lambda b, r, q, k, s: tilecl.matryoshka_info_nce(q, k, _prefixes(q.shape[1])[::-1],
                                                          logit_scale=s, symmetric=True,
                                                          reduction=r, backend=b)),
    Case("clip_smooth",
         lambda n, d, dt: ((unit(n, d, dtype=dt), unit(n, d, dtype=dt), scalar(30.0, dt)), {}),
         lambda b, r, i, t, s: tilecl.info_nce(i, t, logit_scale=s, symmetric=True,
                                               label_smoothing=0.2, reduction=r, backend=b)),
    Case("clip",
         lambda n, d, dt: ((unit(n, d, dtype=dt), unit(n, d, dtype=dt), scalar(14.3, dt)), {}),
         lambda b, r, i, t, s: tilecl.clip_loss(i, t, s, reduction=r, backend=b)),
    Case("clip_scale100",
         lambda n, d, dt: ((unit(n, d, dtype=dt), unit(n, d, dtype=dt), scalar(100.0, dt)), {}),
         lambda b, r, i, t, s: tilecl.clip_loss(i, t, s, reduction=r, backend=b)),
    Case("clip_spread_rows",  # image rows far apart in their row maxima (the column LSE)
         lambda n, d, dt: ((_spread(n, d, dt, True, 21), _spread(n, d, dt, False, 22),
                            scalar(100.0, dt)), {}),
         lambda b, r, i, t, s: tilecl.clip_loss(i, t, s, reduction=r, backend=b)),
    Case("clip_spread_cols",  # text columns far apart in their column maxima (the row LSE)
         lambda n, d, dt: ((_spread(n, d, dt, False, 23), _spread(n, d, dt, True, 24),
                            scalar(100.0, dt)), {}),
         lambda b, r, i, t, s: tilecl.clip_loss(i, t, s, reduction=r, backend=b)),
    Case("siglip",
         lambda n, d, dt: ((unit(n, d, dtype=dt), unit(n, d, dtype=dt), scalar(10.0, dt),
                            scalar(-10.0, dt)), {}),
         lambda b, r, i, t, s, bias: tilecl.siglip_loss(i, t, s, bias, reduction=r, backend=b)),
    Case("siglip_groups",
         lambda n, d, dt: ((unit(n, d, dtype=dt), unit(n + 2, d, dtype=dt), scalar(5.0, dt),
                            scalar(-2.0, dt)),
                           {"lab": torch.arange(n) % 3, "tlab": torch.arange(n + 2) % 4}),
         lambda b, r, i, t, s, bias, lab, tlab: tilecl.siglip_loss(
             i, t, s, bias, labels=lab, text_labels=tlab, reduction=r, backend=b)),
    Case("nt_xent",
         lambda n, d, dt: ((unit(n, d, dtype=dt), unit(n, d, dtype=dt), scalar(0.5, dt)), {}),
         lambda b, r, z1, z2, t: tilecl.nt_xent(z1, z2, temperature=t, reduction=r, backend=b)),
    Case("nt_xent_tf",
         lambda n, d, dt: ((unit(n, d, dtype=dt), unit(n, d, dtype=dt)), {}),
         lambda b, r, z1, z2: tilecl.nt_xent(z1, z2, temperature=0.1, convention="simclr_tf",
                                             reduction=r, backend=b)),
    Case("supcon_out",
         lambda n, d, dt: ((unit(n, 2, d, dtype=dt), scalar(0.1, dt)), {"lab": torch.arange(n) % 5}),
         lambda b, r, f, t, lab: tilecl.supcon(f, lab, temperature=t, reduction=r, backend=b)),
    Case("supcon_out_one",
         lambda n, d, dt: ((unit(n, 3, d, dtype=dt),), {"lab": torch.arange(n) % 4}),
         lambda b, r, f, lab: tilecl.supcon(f, lab, temperature=0.2, contrast_mode="one",
                                            reduction=r, backend=b)),
    Case("supcon_nolabels",
         lambda n, d, dt: ((unit(n, 2, d, dtype=dt),), {}),
         lambda b, r, f: tilecl.supcon(f, temperature=0.1, reduction=r, backend=b)),
    Case("supcon_in",
         lambda n, d, dt: ((unit(n, 2, d, dtype=dt), scalar(0.1, dt)),
                           {"lab": torch.arange(n) % 3}),
         lambda b, r, f, t, lab: tilecl.supcon(f, lab, temperature=t, variant="in", reduction=r,
                                               backend=b)),
    Case("dcl",
         lambda n, d, dt: ((unit(n, d, dtype=dt), unit(n, d, dtype=dt), scalar(0.1, dt)), {}),
         lambda b, r, z1, z2, t: tilecl.dcl_loss(z1, z2, temperature=t, reduction=r, backend=b),
         min_n=2),
    Case("dclw",
         lambda n, d, dt: ((unit(n, d, dtype=dt), unit(n, d, dtype=dt)), {}),
         lambda b, r, z1, z2: tilecl.dcl_loss(z1, z2, weighted=True, reduction=r, backend=b),
         min_n=2, detached=True),
    Case("hcl",
         lambda n, d, dt: ((unit(n, d, dtype=dt), unit(n, d, dtype=dt), scalar(0.5, dt)), {}),
         lambda b, r, z1, z2, t: tilecl.hcl_loss(z1, z2, temperature=t, reduction=r, backend=b),
         min_n=2),
    Case("debiased",
         lambda n, d, dt: ((unit(n, d, dtype=dt), unit(n, d, dtype=dt), scalar(0.5, dt)), {}),
         lambda b, r, z1, z2, t: tilecl.debiased_loss(z1, z2, temperature=t, reduction=r,
                                                      backend=b),
         min_n=2),
    Case("cclk_hardneg_dense",
         lambda n, d, dt: ((unit(n, d, dtype=dt), unit(n, d, dtype=dt), scalar(0.5, dt)),
                           {"w": _cclk_dense(n, dt)}),
         lambda b, r, z1, z2, t, w: tilecl.cclk_loss(z1, z2, *w, temperature=t, reduction=r,
                                                     backend=b)),
    Case("cclk_weaklysup_lowrank",
         lambda n, d, dt: ((unit(n, d, dtype=dt), unit(n, d, dtype=dt)), {"c": _conds(n, dt)}),
         lambda b, r, z1, z2, c: tilecl.cclk_loss(z1, z2, conditions=c, mode="weaklysup",
                                                  reduction=r, backend=b)),
    Case("kernel_info_nce_g2",
         lambda n, d, dt: ((unit(n, d, dtype=dt), unit(n, d, dtype=dt), scalar(0.5, dt)), {}),
         lambda b, r, z1, z2, t: tilecl.kernel_info_nce(z1, z2, temperature=t, reduction=r,
                                                        backend=b),
         min_n=2),  # one pair: the loss and its gradient cancel to ~eps, nothing to compare
    Case("kernel_info_nce_g1",
         lambda n, d, dt: ((unit(n, d, dtype=dt), unit(n, d, dtype=dt)), {}),
         lambda b, r, z1, z2: tilecl.kernel_info_nce(z1, z2, gamma=1.0, reduction=r, backend=b),
         min_n=2),
    Case("kernel_info_nce_g15",  # gamma 1.5 and 3: the factor gamma d2^(gamma/2 - 1) matters
         lambda n, d, dt: ((unit(n, d, dtype=dt), unit(n, d, dtype=dt), scalar(0.4, dt)), {}),
         lambda b, r, z1, z2, t: tilecl.kernel_info_nce(z1, z2, temperature=t, gamma=1.5,
                                                        reduction=r, backend=b),
         min_n=2),
    Case("kernel_info_nce_g3",
         lambda n, d, dt: ((unit(n, d, dtype=dt), unit(n, d, dtype=dt), scalar(0.7, dt)), {}),
         lambda b, r, z1, z2, t: tilecl.kernel_info_nce(z1, z2, temperature=t, gamma=3.0,
                                                        reduction=r, backend=b),
         min_n=2),
    Case("uniformity",
         lambda n, d, dt: ((unit(n, d, dtype=dt), scalar(2.0, dt)), {}),
         lambda b, r, x, t: tilecl.uniformity_loss(x, t=t, backend=b), rows=False, min_n=2),
    Case("decoupled_uniformity",
         lambda n, d, dt: ((torch.randn(n, 2, d, dtype=torch.float64).to(dt),), {}),
         lambda b, r, z: tilecl.decoupled_uniformity(z, backend=b), rows=False, min_n=2),
    Case("decoupled_uniformity_prior",
         lambda n, d, dt: ((torch.randn(n, 2, d, dtype=torch.float64).to(dt),),
                           {"p": torch.randn(n, 3, dtype=torch.float64, generator=_gen(6)).to(dt)}),
         lambda b, r, z, p: tilecl.decoupled_uniformity(z, p, sigma=1.5, backend=b), rows=False,
         min_n=2),
]

BY_NAME = {c.name: c for c in CASES}


def run(case, backend, reduction, diff, const):
    """Loss and gradients of every differentiable input; for reduction='none' the vector loss
    is contracted with a random upstream gradient (the same for every run of that shape)."""
    leaves = [x.detach().clone().requires_grad_(True) for x in diff]
    loss = case.call(backend, reduction, *leaves, **const)
    target = loss
    if loss.dim():
        up = torch.rand(loss.shape, generator=_gen(1234), dtype=torch.float64) + 0.5
        target = (loss * up.to(loss.dtype)).sum()
    grads = torch.autograd.grad(target, leaves, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]
    return loss, grads
