"""tilecl: tiled, fused contrastive losses that never materialize the N x M similarity matrix.

Functional losses (``tilecl.info_nce``, ``clip_loss``, ``siglip_loss``, ``nt_xent``, ``supcon``,
``dcl_loss``, ``hcl_loss``, ``debiased_loss``, ``cclk_loss``, ``kernel_info_nce``,
``uniformity_loss``, ``decoupled_uniformity``), nn.Module wrappers, the dense oracle
``tilecl.reference`` and ``available_backends()``.

Example::

    import torch, torch.nn.functional as F, tilecl

    img = F.normalize(torch.randn(8192, 256), dim=1).requires_grad_()
    txt = F.normalize(torch.randn(8192, 256), dim=1).requires_grad_()
    loss = tilecl.clip_loss(img, txt, logit_scale=1 / 0.07)   # 0-dim, never holds 8192 x 8192
    loss.backward()
"""

from . import reference
from ._backends import available_backends
from .gradcache import grad_cache_step
from .losses import (
    HardNegatives,
    InfoNCEOutput,
    cclk_loss,
    clip_loss,
    dcl_loss,
    debiased_loss,
    decoupled_uniformity,
    hcl_loss,
    info_nce,
    kernel_info_nce,
    matryoshka_info_nce,
    nt_xent,
    siglip_loss,
    supcon,
    uniformity_loss,
)
from .modules import ClipLoss, InfoNCELoss, NTXentLoss, SigLipLoss, SupConLoss

__all__ = [
    "available_backends", "reference", "info_nce", "clip_loss", "siglip_loss", "nt_xent",
    "supcon", "dcl_loss", "hcl_loss", "debiased_loss", "cclk_loss", "kernel_info_nce",
    "uniformity_loss", "decoupled_uniformity", "InfoNCELoss", "ClipLoss", "NTXentLoss",
    "SupConLoss", "SigLipLoss", "HardNegatives", "matryoshka_info_nce",
    "grad_cache_step",
    "InfoNCEOutput",
]


def _version() -> str:
    """The installed distribution's version (pyproject.toml is its one source)."""
    from importlib import metadata

    try:
        return metadata.version("tilecl")
    except metadata.PackageNotFoundError:  # imported from a source tree that is not installed
        return "0+unknown"


__version__: str = _version()
