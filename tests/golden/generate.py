"""Regenerate (or check) the golden cases of this folder from dense float64 transcriptions of each
loss's official code, written independently of tilecl (plain PyTorch autograd, no tilecl import).

Each ``<name>.json`` holds small float64 inputs, the hyper-parameters, and the loss and gradient
of every differentiable input (``grads[name]`` null: not differentiated). The inputs are kept;
the loss and gradients are recomputed by the transcription named by the file's ``name``.

    python tests/golden/generate.py            # rewrite loss and grads of every case
    python tests/golden/generate.py --check    # exit 1 if a committed value differs (> 1e-12)
    python tests/golden/generate.py --new NAME --like CASE --seed S
        # a new case with fresh unit-norm inputs shaped like CASE (same params), then edit
        # its name / source / convention fields and add a transcription below
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys

import torch
import torch.nn.functional as F

HERE = pathlib.Path(__file__).resolve().parent
F64 = torch.float64


def _ce(logits, target):
    """Cross-entropy, mean over rows: F.cross_entropy(logits, target)."""
    return F.cross_entropy(logits, target)


# ---- open_clip ClipLoss, one-directional InfoNCE, SigLIP ---------------------------------------

def clip(i, p):
    logits = i["logit_scale"] * i["image"] @ i["text"].T  # logits_per_image [N, N]
    labels = torch.arange(logits.shape[0])
    return (_ce(logits, labels) + _ce(logits.T, labels)) / 2


def info_nce_extra_keys(i, p):
    logits = i["logit_scale"] * i["query"] @ i["key"].T  # [N, M], M > N
    return _ce(logits, torch.arange(logits.shape[0]))


def siglip(i, p):
    logits = i["logit_scale"] * i["image"] @ i["text"].T + i["logit_bias"]
    n = logits.shape[0]
    labels = 2 * torch.eye(n, logits.shape[1], dtype=F64) - 1  # +1 diagonal, -1 elsewhere
    return -F.logsigmoid(labels * logits).sum() / n


# ---- SimCLR NT-Xent, PyTorch-port convention (mean over the 2N anchors) --------------------------

def nt_xent(i, p):
    z = torch.cat([i["z1"], i["z2"]])
    n2 = z.shape[0]
    logits = z @ z.T / i["temperature"]
    logits = logits.masked_fill(torch.eye(n2, dtype=torch.bool), float("-inf"))  # self excluded
    labels = torch.cat([torch.arange(n2 // 2, n2), torch.arange(n2 // 2)])
    return _ce(logits, labels)


# ---- SupCon: HobbitLong SupConLoss (L_out) and google-research contrastive_loss (L_in) ---------

def _hobbitlong(features, labels, temperature, base_temperature, contrast_mode):
    bsz, views = features.shape[:2]
    if labels is None:
        mask = torch.eye(bsz, dtype=F64)
    else:
        mask = (labels[:, None] == labels[None, :]).to(F64)
    contrast = torch.cat(torch.unbind(features, dim=1), dim=0)  # [V B, D], view-major
    if contrast_mode == "one":
        anchor, anchor_count = features[:, 0], 1
    else:
        anchor, anchor_count = contrast, views
    adc = anchor @ contrast.T / temperature
    logits = adc - adc.max(dim=1, keepdim=True).values.detach()
    mask = mask.repeat(anchor_count, views)
    logits_mask = torch.ones_like(mask)
    rows = torch.arange(bsz * anchor_count)
    logits_mask[rows, rows] = 0
    mask = mask * logits_mask
    exp_logits = torch.exp(logits) * logits_mask
    log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True))
    pos_pairs = mask.sum(1)
    pos_pairs = torch.where(pos_pairs < 1e-6, torch.ones_like(pos_pairs), pos_pairs)
    mean_log_prob_pos = (mask * log_prob).sum(1) / pos_pairs
    loss = -(temperature / base_temperature) * mean_log_prob_pos
    return loss.view(anchor_count, bsz).mean()


def supcon_out_all(i, p):
    return _hobbitlong(i["features"], i["labels"], p["temperature"], p["base_temperature"], "all")


def supcon_out_one(i, p):
    return _hobbitlong(i["features"], i["labels"], p["temperature"], p["base_temperature"], "one")


def supcon_out_nolabels(i, p):
    return _hobbitlong(i["features"], None, p["temperature"], p["base_temperature"], "all")


def supcon_in(i, p):
    """summation INSIDE, denominator ALL, scale_by_temperature, ALL_VIEWS, V > 1."""
    features, labels, tau = i["features"], i["labels"], p["temperature"]
    bsz, views = features.shape[:2]
    mask = (labels[:, None] == labels[None, :]).to(F64)
    allf = features.transpose(0, 1).reshape(views * bsz, -1)  # view-major
    logits = allf @ allf.T / tau
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    exp_logits = torch.exp(logits)
    diag = torch.eye(views * bsz, dtype=F64)
    tiled = mask.repeat(views, views)
    positives = tiled * (1 - diag)
    negatives = 1 - tiled
    n_pos = positives.sum(1)
    denominator = (exp_logits * negatives).sum(1, keepdim=True) + (exp_logits * positives).sum(
        1, keepdim=True)
    log_probs = torch.log((exp_logits / denominator * positives).sum(1) / n_pos)
    loss = (-log_probs * tau).reshape(views, bsz).mean(0)  # mean over anchor views
    return loss.mean()  # Keras SUM_OVER_BATCH_SIZE


# ---- lightly DCLLoss (>= 1.5.21) and DCLW ---------------------------------------------------------

def _dcl_direction(out0, out1, tau, weight):
    b = out0.shape[0]
    diag = torch.eye(b, dtype=torch.bool)
    sim_00 = out0 @ out0.T / tau
    sim_01 = out0 @ out1.T / tau
    positive_loss = -sim_01[diag]
    if weight is not None:
        positive_loss = positive_loss * weight
    negatives = torch.cat([sim_00[~diag].view(b, -1), sim_01[~diag].view(b, -1)], dim=1)
    return (positive_loss + torch.logsumexp(negatives, dim=1)).mean()


def _mises_fisher_weight(out0, out1, sigma):
    similarity = (out0.detach() * out1.detach()).sum(1) / sigma
    return 2 - out0.shape[0] * torch.softmax(similarity, dim=0)


def dcl(i, p):
    o0, o1, tau = i["o0"], i["o1"], p["temperature"]
    return 0.5 * (_dcl_direction(o0, o1, tau, None) + _dcl_direction(o1, o0, tau, None))


def dclw(i, p):
    o0, o1, tau = i["o0"], i["o1"], p["temperature"]
    w01, w10 = _mises_fisher_weight(o0, o1, p["sigma"]), _mises_fisher_weight(o1, o0, p["sigma"])
    return 0.5 * (_dcl_direction(o0, o1, tau, w01) + _dcl_direction(o1, o0, tau, w10))


# ---- joshr17/HCL and chingyaoc/DCL (debiased) -----------------------------------------------------

def _negative_mask(b):
    mask = torch.ones(b, 2 * b, dtype=torch.bool)
    for k in range(b):
        mask[k, k] = False
        mask[k, k + b] = False
    return torch.cat([mask, mask], 0)


def _hcl_criterion(out_1, out_2, tau_plus, beta, temperature, estimator):
    b = out_1.shape[0]
    out = torch.cat([out_1, out_2], dim=0)
    neg = torch.exp(out @ out.T / temperature)
    neg = neg.masked_select(_negative_mask(b)).view(2 * b, -1)
    pos = torch.exp((out_1 * out_2).sum(-1) / temperature)
    pos = torch.cat([pos, pos], dim=0)
    n = 2 * b - 2
    if estimator == "hard":
        imp = (beta * neg.log()).exp()
        reweight_neg = (imp * neg).sum(-1) / imp.mean(-1)
        ng = (-tau_plus * n * pos + reweight_neg) / (1 - tau_plus)
    else:  # debiased
        ng = (-tau_plus * n * pos + neg.sum(-1)) / (1 - tau_plus)
    ng = torch.clamp(ng, min=n * math.e ** (-1 / temperature))
    return (-torch.log(pos / (pos + ng))).mean()


def hcl(i, p):
    return _hcl_criterion(i["o1"], i["o2"], p["tau_plus"], p["beta"], p["temperature"], "hard")


def debiased(i, p):
    return _hcl_criterion(i["o1"], i["o2"], p["tau_plus"], 0.0, p["temperature"], "debiased")


# ---- Crazy-Jack/CCLK-release (weights given, critic on the given embeddings) --------------------

def _cclk(z1, z2, wx, wy, tau, mode):
    s12 = z1 @ z2.T / tau
    eye = torch.eye(z1.shape[0], dtype=torch.bool)
    s11 = (z1 @ z1.T / tau).masked_fill(eye, float("-inf"))
    s22 = (z2 @ z2.T / tau).masked_fill(eye, float("-inf"))
    b = z1.shape[0]
    total = 0.0
    for cross, same, w in ((s12, s11, wx), (s12.T, s22, wy)):
        kxy, kxx = torch.exp(cross), torch.exp(same)
        weighted = ((kxy + kxx) * w.T).sum(1)  # sum_j W_ji (K_ij + K'_ij)
        if mode == "hardneg":
            d = torch.clamp(kxy.diagonal() + (b - 1) * weighted, 1e-7, 1e20)
            total = total + (torch.log(d) - cross.diagonal()).mean()
        else:  # weaklysup
            pn = torch.clamp(weighted, 1e-7, 1e20)
            d = torch.clamp(pn + kxy.sum(1) + kxx.sum(1), 1e-7, 1e20)
            total = total + (torch.log(d) - torch.log(pn)).mean()
    return total / 2


def cclk_hardneg(i, p):
    return _cclk(i["z1"], i["z2"], i["Wx"], i["Wy"], p["tau"], "hardneg")


def cclk_weaklysup(i, p):
    return _cclk(i["z1"], i["z2"], i["Wx"], i["Wy"], p["tau"], "weaklysup")


# ---- yifanzhang-pro/Kernel-InfoNCE gamma_loss ------------------------------------------------------

def _gamma_loss(out_1, out_2, temperature, gamma, eps=1e-6):
    out = torch.cat([out_1, out_2], dim=0)
    n2 = out.shape[0]
    eye = torch.eye(n2, dtype=torch.bool)
    diff2 = ((out[:, None, :] - out[None, :, :]) ** 2).sum(-1)
    dist = torch.sqrt(diff2.masked_fill(eye, 1.0))  # the self pair (distance 0) is dropped below
    sim = torch.exp(-dist.pow(gamma) / temperature).masked_fill(eye, 0.0)
    neg = torch.clamp(sim.sum(-1), min=eps)  # sum_j sim_ij - sim_ii: the positive included
    pos = torch.exp(-torch.norm(out_1 - out_2, dim=-1).pow(gamma) / temperature)
    pos = torch.cat([pos, pos], dim=0)
    return -torch.log(pos / (neg + eps)).mean()


def kernel_infonce_gamma1(i, p):
    return _gamma_loss(i["o1"], i["o2"], p["temperature"], p["gamma"])


def kernel_infonce_gamma2(i, p):
    return _gamma_loss(i["o1"], i["o2"], p["temperature"], p["gamma"])


# ---- ssnl/align_uniform and Duplums/contrastive-decoupled-uniformity -----------------------------

def _uniform(x, t):
    rows, cols = torch.triu_indices(x.shape[0], x.shape[0], offset=1)
    sq = ((x[rows] - x[cols]) ** 2).sum(-1)  # squared pdist over i < j
    return torch.log(torch.exp(-t * sq).mean())


def uniformity(i, p):
    return _uniform(i["x"], p["t"])


def decoupled_uniformity(i, p):
    mu = F.normalize(i["z"], dim=2).mean(1)
    return _uniform(mu, p["t"])


def decoupled_uniformity_prior(i, p):
    mu = F.normalize(i["z"], dim=2).mean(1)
    prior = i["prior"].detach()
    sq = ((prior[:, None, :] - prior[None, :, :]) ** 2).sum(-1)
    k = torch.exp(-sq / (2 * p["sigma"] ** 2))  # rbf, gamma = 1 / (2 sigma^2)
    alpha = torch.linalg.solve(k + p["lam"] * torch.eye(k.shape[0], dtype=F64), k)
    return _uniform(alpha.detach() @ mu, p["t"])


CASES = {f.__name__: f for f in (
    clip, info_nce_extra_keys, siglip, nt_xent, supcon_out_all, supcon_out_one,
    supcon_out_nolabels, supcon_in, dcl, dclw, hcl, debiased, cclk_hardneg, cclk_weaklysup,
    kernel_infonce_gamma1, kernel_infonce_gamma2, uniformity, decoupled_uniformity,
    decoupled_uniformity_prior)}
CASES["clip_scale100"] = clip


# ---- driver -----------------------------------------------------------------------------------

def _inputs(d):
    out = {}
    for k, v in d["inputs"].items():
        t = torch.tensor(v, dtype=torch.int64 if d["input_dtypes"][k] == "int64" else F64)
        if d["grads"].get(k) is not None:
            t.requires_grad_(True)
        out[k] = t
    return out


def compute(d):
    """(loss, {input name: gradient list or None}) of one case by its transcription."""
    ins = _inputs(d)
    loss = CASES[d["name"]](ins, d["params"])
    wanted = [k for k in d["grads"] if d["grads"][k] is not None]
    grads = torch.autograd.grad(loss, [ins[k] for k in wanted])
    out = {k: None for k in d["grads"]}
    out.update({k: g.tolist() for k, g in zip(wanted, grads)})
    return float(loss.detach()), out


def _rel(a, b):
    ta, tb = torch.tensor(a, dtype=F64), torch.tensor(b, dtype=F64)
    scale = float(tb.abs().max()) or 1.0
    return float((ta - tb).abs().max()) / scale


def check(paths, tol=1e-12):
    bad = []
    for path in paths:
        d = json.loads(path.read_text())
        loss, grads = compute(d)
        errs = {"loss": _rel(loss, d["loss"])}
        errs.update({f"d/d{k}": _rel(g, d["grads"][k]) for k, g in grads.items() if g is not None})
        worst = max(errs.values())
        print(f"{d['name']:28s} max rel. difference {worst:.1e}")
        if not worst <= tol:
            bad.append((d["name"], errs))
    return bad


def new_case(name, like, seed):
    d = json.loads((HERE / f"{like}.json").read_text())
    gen = torch.Generator().manual_seed(seed)
    for k, v in d["inputs"].items():
        t = torch.tensor(v)
        if d["input_dtypes"][k] == "int64":
            d["inputs"][k] = t[torch.randperm(t.numel(), generator=gen)].tolist()
        elif t.dim() >= 2:
            d["inputs"][k] = F.normalize(torch.randn(t.shape, generator=gen, dtype=F64),
                                         dim=-1).tolist()
    d["name"] = name
    return d


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare instead of rewriting")
    ap.add_argument("--new", help="name of a new case (needs --like)")
    ap.add_argument("--like", help="existing case whose shapes and params the new one copies")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    paths = sorted(HERE.glob("*.json"))
    if args.check:
        bad = check(paths)
        for name, errs in bad:
            print(f"MISMATCH {name}: {errs}", file=sys.stderr)
        return 1 if bad else 0
    if args.new:
        d = new_case(args.new, args.like, args.seed)
        paths = [HERE / f"{args.new}.json"]
        paths[0].write_text(json.dumps(d))
    for path in paths:
        d = json.loads(path.read_text())
        d["loss"], d["grads"] = compute(d)
        path.write_text(json.dumps(d))
        print(f"wrote {path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
