"""The template-level cases: one named flag set (TileSpec + side data) each, run by the kernel
backends' test files against the torch backend in float64 (tests/test_native_backend.py,
tests/test_triton_backend.py), as flash-linear-attention runs every implementation against its
naive one. One name per flag set; a variant of a flag set has its own name.

``make_case(name, n, d, dtype, gen)`` -> (spec, q [N, D], k [M, D], alpha, bias, aux), CPU
tensors, side data in float64; for the names in ``SINGLE`` (z against itself, the self column
excluded) k is a copy of q, which a caller may replace by q itself (one set: dz = dq + dk).
"""

import torch

from tilecl._spec import SumSpec, TileAux, TileSpec

ALL, POS = SumSpec("all"), SumSpec("pos")
GAMMAS = {"2": 2.0, "1": 1.0, "15": 1.5, "3": 3.0}

# z against itself: the self column excluded, k equal to q
SINGLE = {"nt_xent_self", "supcon_out", "supcon_in", "hcl"} | {
    f"dist_gamma{g}{p}" for g in GAMMAS for p in ("", "_pos")}

NAMES = ["infonce", "clip_symmetric", "nt_xent_self", "supcon_out", "supcon_in", "hcl",
         "cclk_dense", "lowrank", "lowrank_clip", "siglip", "row_alpha", "row_alpha_label",
         "col_offset", "col_offset_dense"] + [f"dist_gamma{g}{p}" for p in ("", "_pos")
                                              for g in GAMMAS]


def _labels(n, gen, classes):
    return torch.randint(0, classes, (n,), generator=gen)


def _unit(n, d, gen):
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    return x / x.norm(dim=1, keepdim=True)


def make_case(name, n, d, dtype, gen):
    m = n
    alpha = torch.tensor(7.0, dtype=torch.float64)
    bias = None
    ar = torch.arange(n)
    q = _unit(n, d, gen)
    if name == "infonce":  # one-directional InfoNCE / MoCo queue: M > N, positive index
        m = 2 * n + 3
        spec = TileSpec(positive="index", sums=(ALL,))
        aux = TileAux(pos=torch.randint(0, m, (n,), generator=gen))
    elif name == "clip_symmetric":
        spec = TileSpec(positive="index", sums=(ALL,), col_lse=True)
        aux = TileAux(pos=ar.clone())
        alpha = torch.tensor(30.0, dtype=torch.float64)
    elif name == "nt_xent_self":
        spec = TileSpec(positive="index", sums=(ALL,))
        aux = TileAux(excl=ar.clone(), pos=(ar + n // 2) % n)
    elif name == "supcon_out":
        spec = TileSpec(positive="label", sums=(ALL,), lin=True)
        lab = _labels(n, gen, max(1, n // 3))
        aux = TileAux(excl=ar.clone(), labels_q=lab, labels_k=lab)
    elif name == "supcon_in":  # anchors without positives: lse+ = -inf rows
        spec = TileSpec(positive="label", sums=(ALL, POS))
        lab = _labels(n, gen, max(1, n // 2))
        aux = TileAux(excl=ar.clone(), labels_q=lab, labels_k=lab)
    elif name == "hcl":  # HCL: (1 + beta) x and beta x over the negatives
        spec = TileSpec(positive="index", sums=(SumSpec("neg", beta=2.0), SumSpec("neg", beta=1.0)))
        aux = TileAux(excl=ar.clone(), pos=(ar + n // 2) % n)
    elif name == "cclk_dense":  # weights [N, M/2] read at column j mod M/2, clipped below 1e-6
        spec = TileSpec(positive="index", weight="dense", weight_clip=1e-6,
                        sums=(SumSpec("all", weighted=True), SumSpec("all")))
        mw = max(1, m // 2)
        w = torch.rand(n, mw, generator=gen, dtype=torch.float64)
        w[w < 0.2] = 1e-8  # clipped to 0
        aux = TileAux(excl=ar.clone(), pos=(ar + n // 2) % n, weight=w)
    elif name in ("lowrank", "lowrank_clip"):  # w_ij = <wa_i, wb_j> (and clipped below 0.05)
        clip = name == "lowrank_clip"
        m = n + 5 if clip else n
        spec = TileSpec(positive="index", weight="lowrank", weight_clip=0.05 if clip else 0.0,
                        sums=(SumSpec("neg", weighted=True),))
        aux = TileAux(excl=None if clip else ar.clone(), pos=ar.clone() if clip else (ar + n // 2) % n,
                      wa=torch.rand(n, 3, generator=gen, dtype=torch.float64),
                      wb=torch.rand(m, 3, generator=gen, dtype=torch.float64))
    elif name.startswith("dist_gamma"):  # distance logits, with or without a positive column
        with_pos = name.endswith("_pos")
        gamma = GAMMAS[name[len("dist_gamma"):len(name) - (4 if with_pos else 0)]]
        spec = TileSpec(logit="dist", gamma=gamma, sums=(ALL,),
                        positive="index" if with_pos else "none")
        aux = TileAux(excl=ar.clone(), pos=(ar + n // 2) % n if with_pos else None)
        alpha = torch.tensor(2.0, dtype=torch.float64)
    elif name == "siglip":
        m = n + 2
        spec = TileSpec(positive="label", sigmoid=True)
        aux = TileAux(labels_q=_labels(n, gen, 4), labels_k=_labels(m, gen, 4))
        alpha = torch.tensor(10.0, dtype=torch.float64)
        bias = torch.tensor(-3.0, dtype=torch.float64)
    elif name == "row_alpha":  # per-row scale, symmetric
        m = n + 5
        spec = TileSpec(positive="index", sums=(ALL,), col_lse=True)
        aux = TileAux(pos=torch.randint(0, m, (n,), generator=gen))
        alpha = 1.0 + 9.0 * torch.rand(n, generator=gen, dtype=torch.float64)
    elif name == "row_alpha_label":  # per-row scale, label positives, L_out statistics, a bias
        m = n + 7
        spec = TileSpec(positive="label", sums=(ALL,), lin=True)
        aux = TileAux(labels_q=_labels(n, gen, 3), labels_k=_labels(m, gen, 3))
        alpha = 5.0 + 10.0 * torch.rand(n, generator=gen, dtype=torch.float64)
        bias = torch.tensor(0.3, dtype=torch.float64)  # shifts every logit; no gradient but SigLIP's
    elif name == "col_offset":  # a visiting column block of the ring: global excl / label sums
        off = 11
        spec = TileSpec(positive="label", sums=(ALL, SumSpec("neg", beta=0.5)), lin=True,
                        col_lse=True)
        m = n + 4
        aux = TileAux(excl=ar + off + 1, labels_q=_labels(n, gen, 3), labels_k=_labels(m, gen, 3),
                      col_offset=off)
    elif name == "col_offset_dense":  # a visiting block: global columns 7 .. 7 + M, dense weights
        m, off = n + 9, 7
        spec = TileSpec(positive="index", sums=(SumSpec(weighted=True),), weight="dense")
        aux = TileAux(excl=ar + off, pos=(ar * 3) % (m + off), col_offset=off,
                      weight=torch.rand(n, m + off, generator=gen, dtype=torch.float64) + 0.1)
    else:
        raise KeyError(name)
    k = q.clone() if m == n and name != "siglip" else _unit(m, d, gen)
    q, k = q.to(dtype), k.to(dtype)
    adt = torch.float64 if dtype == torch.float64 else torch.float32
    alpha = alpha.to(adt)
    bias = bias.to(adt) if bias is not None else None
    return spec, q, k, alpha, bias, aux
