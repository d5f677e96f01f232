"""What is measured: the losses, their random inputs, and the providers that compute them.

A *provider* is one implementation of one loss: every available tilecl backend
(``tilecl-reference``, ``tilecl-torch``, ``tilecl-triton``, ``tilecl-native``) and the baselines a
user would otherwise pick, each written here from the official formula (not copied code):

- ``dense``: materialized logits + ``F.cross_entropy`` (both directions for CLIP), the
  open_clip ``SigLipLoss`` formula for SigLIP, the SupContrast (HobbitLong) formula for SupCon;
- ``openclip-style``: open_clip ``ClipLoss`` with world_size 1 (two matmuls, logits per image and
  per text, as open_clip computes them);
- ``dense`` for ``matryoshka``: one materialized [n, n] InfoNCE per prefix dimension, each prefix
  re-normalized (sentence-transformers' MatryoshkaLoss around MNRL);
- ``pml``: pytorch-metric-learning ``SupConLoss`` / ``NTXentLoss`` (when installed);
- CUDA only, when installed: ``inf-cl`` (``inf_cl.cal_flash_loss``, one call per direction),
  ``memeff`` (``MemoryEfficientCLIPLoss``), ``siglip-kernel`` (``fused_siglip_loss``).

Sizes: ``n`` is always the number of embedding rows of the similarity matrix (N = M = n): CLIP and
SigLIP take n image and n text rows; SupCon takes n / 2 samples x 2 views; NT-Xent takes two views
of n / 2 rows each.
"""

from __future__ import annotations

import contextlib
import importlib
import os

import torch
import torch.nn.functional as F

import tilecl

LOSSES = ("clip", "siglip", "supcon", "ntxent", "matryoshka")
CLIP_SCALE = 1 / 0.07  # open_clip's initial logit_scale.exp()
SIGLIP_SCALE, SIGLIP_BIAS = 10.0, -10.0  # big_vision / open_clip SigLIP init
SUPCON_TAU = 0.1
NTXENT_TAU = 0.5
MRL_TAU = 0.05  # sentence-transformers MNRL: scale 20


def mrl_dims(d):
    """Matryoshka prefixes of a D-wide embedding: D, D/2, D/4, D/8 (those >= 8)."""
    return [p for p in (d, d // 2, d // 4, d // 8) if p >= 8] or [d]
# Per-provider size caps where memory grows faster than N^2 and a host OOM would kill the run
# instead of raising: PML's NTXentLoss compares every positive pair with every negative pair
# (an [N, N^2] mask, O(N^3) memory: 272 MiB at N = 256, 2.1 GiB and 10 s per call at N = 512 on
# the 2-core CPU).
MAX_N = {("ntxent", "pml"): {"cpu": 256, "cuda": 2048}}


def _optional(module):
    try:
        return importlib.import_module(module)
    except Exception:  # noqa: BLE001 - any import failure means "not installed here"
        return None


# ---- inputs --------------------------------------------------------------------------------------

def _unit(rows, d, dtype, device, gen):
    x = torch.randn(rows, d, generator=gen, device=device, dtype=torch.float32)
    return F.normalize(x, dim=1).to(dtype).requires_grad_(True)


def _leaf(value, device):
    return torch.tensor(float(value), device=device, dtype=torch.float32, requires_grad=True)


def make_inputs(loss, n, d, dtype, device, seed=0):
    """One set of random (never zero) inputs for ``loss`` at size n x d; leaves require grad."""
    gen = torch.Generator(device=device).manual_seed(seed)
    if loss == "clip":
        return {"a": _unit(n, d, dtype, device, gen), "b": _unit(n, d, dtype, device, gen),
                "scale": _leaf(CLIP_SCALE, device)}
    if loss == "siglip":
        return {"a": _unit(n, d, dtype, device, gen), "b": _unit(n, d, dtype, device, gen),
                "scale": _leaf(SIGLIP_SCALE, device), "bias": _leaf(SIGLIP_BIAS, device)}
    half = max(n // 2, 1)
    if loss == "supcon":
        feats = _unit(2 * half, d, dtype, device, gen).detach().view(half, 2, d)
        labels = torch.randint(0, max(half // 8, 2), (half,), generator=gen, device=device)
        return {"f": feats.requires_grad_(True), "labels": labels}
    if loss == "ntxent":
        return {"a": _unit(half, d, dtype, device, gen), "b": _unit(half, d, dtype, device, gen)}
    if loss == "matryoshka":
        return {"a": _unit(n, d, dtype, device, gen), "b": _unit(n, d, dtype, device, gen)}
    raise ValueError(f"unknown loss {loss!r}; expected one of {LOSSES}")


def input_bytes(inputs):
    return sum(t.numel() * t.element_size() for t in inputs.values() if isinstance(t, torch.Tensor))


def leaves(inputs):
    return [t for t in inputs.values() if isinstance(t, torch.Tensor) and t.requires_grad]


def flops(loss, mode, n, m=None, d=128):
    """Nominal matmul flops of one call (2 per multiply-add), the same for every provider.

    One set of LSE statistics over an N x M similarity matrix costs 2 N M D forward (S = Q K^T)
    and 6 N M D backward (the tiled backends recompute S, then dQ = G K and dK = G^T Q): 8 N M D
    for forward + backward. Symmetric CLIP reads both LSE directions from the same tiles of the
    same S, so it counts once (8 N^2 D); SigLIP, SupCon ('all' anchors, N = B V) and NT-Xent
    (N = 2B) also count one N x N matrix. Dense baselines execute 6 N M D (no recompute):
    TFLOP/s here is the nominal count divided by the time, so it ranks like the time does.
    """
    m = n if m is None else m
    per = {"fwd": 2, "bwd": 6, "fwd_bwd": 8}[mode]
    return per * n * m * d


def matmul_tflops(dtype=torch.bfloat16, n=8192, reps=20):
    """The measured dense matmul rate (TFLOP/s, median of CUDA-event timings): the roofline the
    GPU target is compared with."""
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return 2 * n**3 / times[len(times) // 2] / 1e12


# ---- baselines written from the official formulas -------------------------------------------------

def dense_clip(a, b, scale):
    """Materialized logits, F.cross_entropy over rows and over columns (logits.T), mean of both."""
    logits = scale * a @ b.T
    labels = torch.arange(a.shape[0], device=a.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def openclip_style_clip(a, b, scale):
    """open_clip ClipLoss, world_size 1: logits_per_image and logits_per_text as two matmuls."""
    logits_per_image = scale * a @ b.T
    logits_per_text = scale * b @ a.T
    labels = torch.arange(a.shape[0], device=a.device)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def dense_siglip(a, b, scale, bias):
    """open_clip SigLipLoss, world_size 1: labels 2 I - 1, -sum log sigmoid(labels * logits) / N."""
    logits = scale * a @ b.T + bias
    n = a.shape[0]
    labels = 2 * torch.eye(n, device=a.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / n


def dense_matryoshka(a, b, temperature=MRL_TAU):
    """sum over prefixes d of CE(normalize(a[:, :d]) normalize(b[:, :d])^T / tau, diagonal)."""
    labels = torch.arange(a.shape[0], device=a.device)
    total = 0.0
    for d in mrl_dims(a.shape[1]):
        logits = F.normalize(a[:, :d], dim=1) @ F.normalize(b[:, :d], dim=1).T / temperature
        total = total + F.cross_entropy(logits.float(), labels)
    return total


def dense_supcon(features, labels, temperature=SUPCON_TAU, base_temperature=SUPCON_TAU):
    """SupContrast (HobbitLong) SupConLoss, contrast_mode 'all', transcribed densely (the same
    transcription the compat class falls back to for arbitrary masks)."""
    from tilecl.compat.supcontrast import dense_supcon_with_mask

    mask = (labels[:, None] == labels[None, :]).to(features.dtype)
    return dense_supcon_with_mask(features, mask, temperature, base_temperature, "all")


def dense_ntxent(a, b, temperature=NTXENT_TAU):
    """SimCLR NT-Xent: [a; b] against itself, self masked, positive i <-> i + B, mean over 2B."""
    z = torch.cat([a, b])
    logits = (z @ z.T / temperature).float()
    eye = torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(eye, float("-inf"))
    pos = torch.arange(z.shape[0], device=z.device).roll(a.shape[0])
    return F.cross_entropy(logits, pos)


# ---- the registry ----------------------------------------------------------------------------------

def _tilecl(loss, backend):
    if loss == "clip":
        return lambda x: tilecl.clip_loss(x["a"], x["b"], x["scale"], backend=backend)
    if loss == "siglip":
        return lambda x: tilecl.siglip_loss(x["a"], x["b"], x["scale"], x["bias"], backend=backend)
    if loss == "supcon":
        return lambda x: tilecl.supcon(x["f"], x["labels"], temperature=SUPCON_TAU,
                                       base_temperature=SUPCON_TAU, backend=backend)
    if loss == "matryoshka":
        return lambda x: tilecl.matryoshka_info_nce(x["a"], x["b"], mrl_dims(x["a"].shape[1]),
                                                    temperature=MRL_TAU, backend=backend)
    return lambda x: tilecl.nt_xent(x["a"], x["b"], temperature=NTXENT_TAU, backend=backend)


def _pml(loss):
    losses = _optional("pytorch_metric_learning.losses")
    if losses is None or loss not in ("supcon", "ntxent"):
        return None
    if loss == "supcon":
        fn = losses.SupConLoss(temperature=SUPCON_TAU)

        def run(x):
            f = x["f"]
            return fn(torch.cat(torch.unbind(f, 1)), x["labels"].repeat(f.shape[1]))
        return run
    fn = losses.NTXentLoss(temperature=NTXENT_TAU)

    def run(x):
        b = x["a"].shape[0]
        return fn(torch.cat([x["a"], x["b"]]), torch.arange(b, device=x["a"].device).repeat(2))
    return run


def _inf_cl(d):
    mod = _optional("inf_cl")
    if mod is None:
        return None
    head = 256 if d % 256 == 0 else d  # inf-cl views the rows as [N, D / head_dim, head_dim]

    def run(x):
        a, b, s = x["a"], x["b"], x["scale"]
        return (mod.cal_flash_loss(a, b, scale=s, head_dim=head).mean()
                + mod.cal_flash_loss(b, a, scale=s, head_dim=head).mean()) / 2
    return run


def _memeff():
    mod = _optional("memeff")
    if mod is None:
        return None
    fn = mod.MemoryEfficientCLIPLoss(temperature=1 / CLIP_SCALE)  # fixed temperature: no dscale
    return lambda x: fn(x["a"], x["b"])


def _siglip_kernel():
    mod = _optional("siglip_kernel")
    if mod is None:
        return None
    return lambda x: mod.fused_siglip_loss(x["a"], x["b"], torch.log(x["scale"]), x["bias"])


@contextlib.contextmanager
def variant_env(loss, provider):
    """The environment of a ``VARIANTS`` provider, set for the whole measurement (forward and
    backward: tilecl reads these variables in both); nothing for the other providers."""
    env = VARIANTS.get(loss, {}).get(provider, {})
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# the triton backend with each environment choice set explicitly, for the GPU target's A/B (not the
# grid): whichever of fused / gemm the backend picks by default, both are measured
VARIANTS = {
    "clip": {"tilecl-triton-2pass": dict(TILECL_TRITON_COL_PASS="two"),
             "tilecl-triton-gemm": dict(TILECL_TRITON_BWD="gemm"),
             "tilecl-triton-fused": dict(TILECL_TRITON_BWD="fused")},
    "siglip": {"tilecl-triton-unfused": dict(TILECL_TRITON_SIGLIP_FUSED="0"),
               "tilecl-triton-gemm": dict(TILECL_TRITON_BWD="gemm"),
               "tilecl-triton-fused": dict(TILECL_TRITON_BWD="fused")},
}


def providers(loss, device, d=128, variants=False):
    """{name: fn(inputs) -> 0-dim loss} of every provider that can run ``loss`` on ``device``;
    with ``variants`` also the triton backend's alternatives of ``VARIANTS``."""
    device = torch.device(device)
    names = tilecl.available_backends(device)
    out = {f"tilecl-{name}": _tilecl(loss, name) for name in names}
    if variants and "triton" in names:  # measured inside variant_env(loss, name)
        out.update({k: _tilecl(loss, "triton") for k in VARIANTS.get(loss, {})})
    if loss == "clip":
        out["dense"] = lambda x: dense_clip(x["a"], x["b"], x["scale"])
        out["openclip-style"] = lambda x: openclip_style_clip(x["a"], x["b"], x["scale"])
    elif loss == "siglip":
        out["dense"] = lambda x: dense_siglip(x["a"], x["b"], x["scale"], x["bias"])
    elif loss == "supcon":
        out["dense"] = lambda x: dense_supcon(x["f"], x["labels"])
    elif loss == "matryoshka":
        out["dense"] = lambda x: dense_matryoshka(x["a"], x["b"])
    else:
        out["dense"] = lambda x: dense_ntxent(x["a"], x["b"])
    pml = _pml(loss)
    if pml is not None:
        out["pml"] = pml
    if device.type == "cuda":  # the Triton peers are GPU-only
        extra = {"clip": {"inf-cl": _inf_cl(d), "memeff": _memeff()},
                 "siglip": {"siglip-kernel": _siglip_kernel()}}.get(loss, {})
        out.update({k: v for k, v in extra.items() if v is not None})
    return out

