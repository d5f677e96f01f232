"""tilecl.compat against the original formulas (transcribed densely below from open_clip/loss.py,
HobbitLong/SupContrast losses.py and pytorch-metric-learning's SupConLoss / NTXentLoss) and, where it
is installed, against the real pytorch-metric-learning package: loss and every gradient."""

import os
import warnings

import pytest
import torch
import torch.nn.functional as F

from tilecl.compat import open_clip, pml, supcontrast

from conftest import assert_rel, cpu_backends

BACKENDS = ["reference"] + cpu_backends()
# float64 on the backends that take it (formula-exact), fp32 everywhere (accumulation-order tol)
DTYPES = [pytest.param(torch.float64, 1e-10, id="fp64"), pytest.param(torch.float32, 2e-5, id="fp32")]


def _dtype_ok(backend, dtype):
    if dtype == torch.float64 and backend not in ("reference", "torch", "native"):
        pytest.skip(f"{backend} backend: float64 is not a kernel dtype")


def _leaf(*shape, dtype, normalize=True):
    x = torch.randn(*shape, dtype=dtype)
    if normalize:
        x = F.normalize(x, dim=-1)
    return x.requires_grad_(True)


def _grads(loss, tensors):
    return torch.autograd.grad(loss, tensors, allow_unused=True)


def _compare(ours, theirs, inputs, tol, what):
    assert_rel(ours.to(theirs.dtype) if ours.dtype != theirs.dtype else ours, theirs, tol,
               f"{what} loss")
    for i, (g1, g2) in enumerate(zip(_grads(ours, inputs), _grads(theirs, inputs))):
        assert (g1 is None) == (g2 is None), f"{what} grad {i}: one side has no gradient"
        if g1 is not None:
            assert_rel(g1, g2, tol, f"{what} grad {i}")


# ---- the original formulas, transcribed densely ---------------------------------------------------

def ref_open_clip(img, txt, scale):
    logits_per_image = scale * img @ txt.T
    logits_per_text = scale * txt @ img.T
    labels = torch.arange(img.shape[0])
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def ref_siglip(img, txt, scale, bias):
    logits = scale * img @ txt.T
    if bias is not None:
        logits = logits + bias
    n = img.shape[0]
    labels = 2 * torch.eye(n, dtype=img.dtype) - torch.ones(n, n, dtype=img.dtype)
    return -F.logsigmoid(labels * logits).sum() / n


def ref_supcontrast(features, labels=None, mask=None, temperature=0.07, contrast_mode="all",
                    base_temperature=0.07):
    if features.dim() > 3:
        features = features.view(features.shape[0], features.shape[1], -1)
    bsz = features.shape[0]
    if labels is None and mask is None:
        mask = torch.eye(bsz, dtype=torch.float32)
    elif labels is not None:
        labels = labels.contiguous().view(-1, 1)
        mask = torch.eq(labels, labels.T).float()
    else:
        mask = mask.float()
    views = features.shape[1]
    contrast = torch.cat(torch.unbind(features, dim=1), dim=0)
    anchor, anchor_count = (features[:, 0], 1) if contrast_mode == "one" else (contrast, views)
    logits = torch.div(anchor @ contrast.T, temperature)
    logits = logits - logits.max(dim=1, keepdim=True)[0].detach()
    mask = mask.to(logits.dtype).repeat(anchor_count, views)
    logits_mask = torch.scatter(torch.ones_like(mask), 1,
                                torch.arange(bsz * anchor_count).view(-1, 1), 0)
    mask = mask * logits_mask
    exp_logits = torch.exp(logits) * logits_mask
    log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True))
    n_pos = mask.sum(1)
    n_pos = torch.where(n_pos < 1e-6, torch.ones_like(n_pos), n_pos)
    mean_log_prob_pos = (mask * log_prob).sum(1) / n_pos
    loss = -(temperature / base_temperature) * mean_log_prob_pos
    return loss.view(anchor_count, bsz).mean()


def _pml_masks(labels):
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(labels.shape[0], dtype=torch.bool)
    return same & ~eye, ~same


def ref_pml_supcon(emb, labels, temperature=0.1):
    z = F.normalize(emb, p=2, dim=1)
    pos, neg = _pml_masks(labels)
    if not pos.any() or not neg.any():
        return emb.sum() * 0
    mat = z @ z.T / temperature
    mat = mat - mat.max(dim=1, keepdim=True)[0].detach()
    denom = torch.logsumexp(mat.masked_fill(~(pos | neg), float("-inf")), dim=1, keepdim=True)
    log_prob = mat - denom
    # PML divides by |P| + finfo.tiny; clamping to 1 gives the same values (0 for |P| = 0) without
    # PML's 1 / tiny overflow in float64 gradients
    rows = -(pos * log_prob).sum(1) / pos.sum(1).clamp_min(1)
    keep = rows > 0  # AvgNonZeroReducer
    return rows[keep].mean() if keep.any() else rows.sum() * 0


def ref_pml_ntxent(emb, labels, temperature=0.07):
    z = F.normalize(emb, p=2, dim=1)
    pos, neg = _pml_masks(labels)
    a1, p = torch.nonzero(pos, as_tuple=True)
    if a1.numel() == 0 or not neg.any():
        return emb.sum() * 0
    s = z @ z.T / temperature
    terms = []
    for a, b in zip(a1.tolist(), p.tolist()):  # one term per ordered positive pair
        logits = torch.cat([s[a, b].view(1), s[a][neg[a]]])
        terms.append(torch.logsumexp(logits, 0) - s[a, b])
    return torch.stack(terms).mean()


# ---- open_clip ------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("n,d", [(1, 8), (7, 5), (65, 33)], ids=["N1-D8", "N7-D5", "N65-D33"])
def test_clip_loss(backend, dtype, tol, n, d):
    _dtype_ok(backend, dtype)
    img, txt = _leaf(n, d, dtype=dtype), _leaf(n, d, dtype=dtype)
    scale = torch.tensor(14.3, dtype=dtype, requires_grad=True)
    ours = open_clip.ClipLoss(backend=backend)(img, txt, scale)
    _compare(ours, ref_open_clip(img, txt, scale), [img, txt, scale], tol, "ClipLoss")
    out = open_clip.ClipLoss(backend=backend)(img, txt, 14.3, output_dict=True)
    assert set(out) == {"contrastive_loss"}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_siglip_loss(backend, dtype, tol, with_bias):
    _dtype_ok(backend, dtype)
    img, txt = _leaf(63, 17, dtype=dtype), _leaf(63, 17, dtype=dtype)
    scale = torch.tensor(10.0, dtype=dtype, requires_grad=True)
    bias = torch.tensor(-10.0, dtype=dtype, requires_grad=True) if with_bias else None
    ours = open_clip.SigLipLoss(backend=backend)(img, txt, scale, bias)
    inputs = [img, txt, scale] + ([bias] if with_bias else [])
    _compare(ours, ref_siglip(img, txt, scale, bias), inputs, tol, "SigLipLoss")
    out = open_clip.SigLipLoss(backend=backend)(img, txt, scale, bias, output_dict=True)
    assert set(out) == {"contrastive_loss"}


def test_open_clip_unsupported():
    with pytest.raises(NotImplementedError, match="Horovod"):
        open_clip.ClipLoss(use_horovod=True)
    x = _leaf(4, 3, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="not initialized"):
        open_clip.ClipLoss(world_size=2, rank=0)(x, x, 1.0)
    with pytest.raises(RuntimeError, match="not initialized"):
        open_clip.SigLipLoss(world_size=2)(x, x, 1.0, 0.0)


# ---- SupContrast ---------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("mode", ["all", "one"])
@pytest.mark.parametrize("labelled", ["labels", "simclr", "mask"])
def test_supcontrast(backend, dtype, tol, mode, labelled):
    _dtype_ok(backend, dtype)
    feats = _leaf(33, 2, 12, dtype=dtype)
    labels = torch.randint(0, 5, (33,))
    labels[0] = 99  # an anchor whose only positive is its other view
    kw = {"labels": labels} if labelled == "labels" else (
        {"mask": (labels[:, None] == labels[None, :]).float()} if labelled == "mask" else {})
    crit = supcontrast.SupConLoss(temperature=0.1, contrast_mode=mode, base_temperature=0.07,
                                  backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("error", supcontrast.DenseFallbackWarning)  # a label mask stays tiled
        ours = crit(feats, **kw)
    theirs = ref_supcontrast(feats, temperature=0.1, contrast_mode=mode, base_temperature=0.07,
                             **kw)
    _compare(ours, theirs, [feats], tol, "SupContrast SupConLoss")


def test_supcontrast_general_mask_falls_back():
    feats = _leaf(9, 3, 6, dtype=torch.float64)
    mask = torch.rand(9, 9)  # weighted, asymmetric: not a label mask (fp32, as the original casts)
    with pytest.warns(supcontrast.DenseFallbackWarning):
        ours = supcontrast.SupConLoss(temperature=0.2)(feats, mask=mask)
    _compare(ours, ref_supcontrast(feats, mask=mask, temperature=0.2), [feats], 1e-12,
             "SupConLoss fallback")


def test_supcontrast_shapes_and_errors():
    feats = _leaf(6, 2, 2, 3, dtype=torch.float64)  # [B, V, ...] is flattened like the original
    labels = torch.tensor([0.5, 1.5, 0.5, 2.0, 1.5, 0.5], dtype=torch.float64)  # float labels
    ours = supcontrast.SupConLoss()(feats, labels)
    _compare(ours, ref_supcontrast(feats, labels=labels), [feats], 1e-10, "flattened")
    with pytest.raises(ValueError, match="at least 3 dimensions"):
        supcontrast.SupConLoss()(feats[:, 0, 0])
    with pytest.raises(ValueError, match="Cannot define both"):
        supcontrast.SupConLoss()(feats, labels, mask=torch.eye(6))
    with pytest.raises(ValueError, match="Unknown mode"):
        supcontrast.SupConLoss(contrast_mode="any")(feats)
    with pytest.raises(ValueError, match="Num of labels"):
        supcontrast.SupConLoss()(feats, labels[:5])
    assert supcontrast.labels_of_mask(torch.eye(3)) is not None
    assert supcontrast.labels_of_mask(torch.ones(3, 3) - torch.eye(3)) is None


# ---- pytorch-metric-learning ------------------------------------------------------------------------

SUPCON_LABELS = {
    "classes": lambda n: torch.randint(0, 4, (n,)),
    "singletons": lambda n: torch.cat([torch.randint(0, 3, (n - 3,)), torch.tensor([7, 8, 9])]),
    "all-same": lambda n: torch.zeros(n, dtype=torch.long),
    "all-distinct": lambda n: torch.arange(n),
}
NTXENT_LABELS = {
    "two-views": lambda n: torch.arange(n // 2).repeat(2),
    "pairs-and-singletons": lambda n: torch.cat([torch.arange((n - 5) // 2).repeat(2),
                                                 torch.arange(100, 105 + (n - 5) % 2)]),
    "all-distinct": lambda n: torch.arange(n),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("labels", sorted(SUPCON_LABELS))
def test_pml_supcon(backend, dtype, tol, labels):
    _dtype_ok(backend, dtype)
    emb = _leaf(31, 10, dtype=dtype, normalize=False)
    lab = SUPCON_LABELS[labels](31)
    ours = pml.SupConLoss(temperature=0.1, backend=backend)(emb, lab)
    _compare(ours, ref_pml_supcon(emb, lab, 0.1).to(ours.dtype), [emb], tol, "PML SupConLoss")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("labels", sorted(NTXENT_LABELS))
def test_pml_ntxent(backend, dtype, tol, labels):
    _dtype_ok(backend, dtype)
    emb = _leaf(30, 9, dtype=dtype, normalize=False)
    lab = NTXENT_LABELS[labels](30)
    ours = pml.NTXentLoss(temperature=0.07, backend=backend)(emb, lab)
    _compare(ours, ref_pml_ntxent(emb, lab, 0.07).to(ours.dtype), [emb], tol, "PML NTXentLoss")


def test_pml_unsupported():
    emb = _leaf(6, 4, dtype=torch.float32)
    with pytest.raises(NotImplementedError, match="occurs 3 times"):
        pml.NTXentLoss()(emb, torch.tensor([0, 0, 0, 1, 1, 2]))
    with pytest.raises(NotImplementedError, match="indices_tuple"):
        pml.SupConLoss()(emb, torch.arange(6), indices_tuple=(torch.arange(2),) * 4)
    with pytest.raises(NotImplementedError, match="ref_emb"):
        pml.NTXentLoss()(emb, torch.arange(6), ref_emb=emb)
    with pytest.raises(NotImplementedError, match="distance"):
        pml.SupConLoss(distance=object())


def _real_pml():
    """pytorch_metric_learning.losses; a missing install skips locally and fails under CI=true."""
    if os.environ.get("CI", "").lower() == "true":
        import pytorch_metric_learning.losses as pml_losses

        return pml_losses
    return pytest.importorskip("pytorch_metric_learning.losses")


@pytest.mark.parametrize("labels", sorted(SUPCON_LABELS))
def test_against_real_pml_supcon(labels):
    pml_losses = _real_pml()
    emb = _leaf(40, 16, dtype=torch.float32, normalize=False)
    lab = SUPCON_LABELS[labels](40)
    _compare(pml.SupConLoss(temperature=0.1)(emb, lab),
             pml_losses.SupConLoss(temperature=0.1)(emb, lab), [emb], 2e-5,
             "vs pytorch-metric-learning SupConLoss")


@pytest.mark.parametrize("labels", sorted(NTXENT_LABELS))
def test_against_real_pml_ntxent(labels):
    pml_losses = _real_pml()
    emb = _leaf(40, 16, dtype=torch.float32, normalize=False)
    lab = NTXENT_LABELS[labels](40)
    _compare(pml.NTXentLoss(temperature=0.07)(emb, lab),
             pml_losses.NTXentLoss(temperature=0.07)(emb, lab), [emb], 2e-5,
             "vs pytorch-metric-learning NTXentLoss")


@pytest.mark.parametrize("cls", ["SupConLoss", "NTXentLoss"])
def test_pml_without_labels_raises_pml_value_error(cls):
    """PML's GenericPairLoss refuses a call with neither labels nor indices_tuple: the drop-in
    raises the same exception type with the same message."""
    real = getattr(_real_pml(), cls)()
    emb = _leaf(6, 4, dtype=torch.float32)
    with pytest.raises(Exception) as theirs:
        real(emb)
    with pytest.raises(Exception) as ours:
        getattr(pml, cls)()(emb)
    assert theirs.type is ValueError
    assert ours.type is theirs.type and str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64],
                         ids=["fp16", "bf16", "fp32", "fp64"])
@pytest.mark.parametrize("cls", ["SupConLoss", "NTXentLoss"])
def test_pml_loss_comes_back_in_pml_dtype(cls, dtype):
    """The loss (also the zero loss of a batch without positive pairs) has the dtype PML returns,
    and the fp16 / bf16 value is the fp32 computation rounded once (not PML's fp16 arithmetic,
    which can be far off: within 2x the rounding of the float64 truth)."""
    real = getattr(_real_pml(), cls)
    emb = _leaf(12, 8, dtype=dtype, normalize=False)
    for lab in (torch.arange(6).repeat(2), torch.arange(12)):
        theirs = real()(emb, lab)
        ours = getattr(pml, cls)()(emb, lab)
        assert ours.dtype == theirs.dtype == dtype, (ours.dtype, theirs.dtype)
        truth = real()(emb.detach().double(), lab).detach()
        rounding = abs(float(truth.to(dtype)) - float(truth))
        assert abs(float(ours.detach()) - float(truth)) <= max(2 * rounding, 1e-12 * abs(float(truth)))
        (g,) = torch.autograd.grad(ours, emb)
        assert g.dtype == dtype


# ---- distributed: open_clip classes through the ring (gloo, 2 processes) ------------------------

def _ddp_worker(rank, world, rdv, sizes):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{rdv}", rank=rank, world_size=world)
    try:
        n, d = sum(sizes), 6
        g = torch.Generator().manual_seed(0)
        img_all = torch.randn(n, d, generator=g, dtype=torch.float64)
        txt_all = torch.randn(n, d, generator=g, dtype=torch.float64)
        lo = sum(sizes[:rank])
        sl = slice(lo, lo + sizes[rank])
        for name in ("clip", "siglip"):
            scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
            bias = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
            ref_in = [img_all.clone().requires_grad_(), txt_all.clone().requires_grad_()]
            ref_p = [scale.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()]
            img = img_all[sl].clone().requires_grad_()
            txt = txt_all[sl].clone().requires_grad_()
            if name == "clip":
                ours = open_clip.ClipLoss(rank=rank, world_size=world)(img, txt, scale)
                ref = ref_open_clip(*ref_in, ref_p[0])
                params, ref_params = [scale], ref_p[:1]
            else:
                ours = open_clip.SigLipLoss(rank=rank, world_size=world)(img, txt, scale, bias)
                ref = ref_siglip(*ref_in, *ref_p)
                params, ref_params = [scale, bias], ref_p
            ours.backward()
            ref.backward()
            assert_rel(ours, ref, 1e-10, f"rank {rank} {name} loss")
            # the gradient contract: input gradients are W x the single-process ones; replicated
            # parameters' gradients sum over ranks to W x
            assert_rel(img.grad, world * ref_in[0].grad[sl], 1e-9, f"rank {rank} {name} d img")
            assert_rel(txt.grad, world * ref_in[1].grad[sl], 1e-9, f"rank {rank} {name} d txt")
            for p, rp in zip(params, ref_params):
                total = p.grad.clone()
                dist.all_reduce(total)
                assert_rel(total, world * rp.grad, 1e-9, f"rank {rank} {name} d param")
    finally:
        dist.destroy_process_group()


def test_open_clip_distributed_ring(tmp_path):
    pytest.importorskip("tilecl.distributed")
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    ctx = mp.spawn(_ddp_worker, args=(2, str(tmp_path / "rdv"), [3, 5]), nprocs=2, join=False)
    import time

    deadline = time.monotonic() + 120
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.terminate()
            pytest.fail("distributed compat workers did not finish in 120 s")
