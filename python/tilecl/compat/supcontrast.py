"""Drop-in replacement for SupContrast's ``SupConLoss`` (HobbitLong/SupContrast losses.py):
same constructor and forward signature, computed by ``tilecl.supcon`` (L_out, math.md 4.1).

Migration::

    # from losses import SupConLoss
    from tilecl.compat.supcontrast import SupConLoss

    criterion = SupConLoss(temperature=0.1)
    loss = criterion(torch.stack([f1, f2], dim=1), labels)   # features [B, V, D], normalized

``mask`` (a [B, B] matrix, mask_ij = 1 when j is a positive of i): a label-equality mask (0/1,
symmetric, ones on the diagonal, transitive) is turned into labels and stays tiled. Any other mask
(asymmetric, weighted, or with zeros on the diagonal, which drops the other views of the sample
itself) cannot be expressed by the tiled template: the loss is then computed densely from the
original formula (B V x B V logits in memory) with a ``DenseFallbackWarning``.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .. import losses


class DenseFallbackWarning(UserWarning):
    """A compat class computed its loss densely (materialized N x N) instead of tiled."""


def labels_of_mask(mask: torch.Tensor):
    """Integer labels [B] whose equality matrix is ``mask``, or None when mask is not one."""
    if mask.dim() != 2 or mask.shape[0] != mask.shape[1]:
        return None
    m = mask.detach()
    if not bool(((m == 0) | (m == 1)).all()):
        return None
    m = m.bool()
    if not bool(m.diagonal().all()) or not bool((m == m.T).all()):
        return None
    ids = m.to(torch.uint8).argmax(1)  # the first positive column of each row: a class id
    if not bool((m == (ids[:, None] == ids[None, :])).all()):
        return None
    return ids.long()


def _as_labels(labels: torch.Tensor, bsz: int):
    labels = labels.contiguous().view(-1)
    if labels.shape[0] != bsz:
        raise ValueError("Num of labels does not match num of features")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        labels = torch.unique(labels, return_inverse=True)[1]
    return labels.long()


def dense_supcon_with_mask(features, mask, temperature, base_temperature, contrast_mode):
    """The original formula with a given [B, B] mask (float weights allowed), densely."""
    bsz, views = features.shape[:2]
    contrast = torch.cat(torch.unbind(features, dim=1), dim=0)  # [V B, D], view-major
    if contrast_mode == "one":
        anchor, anchor_count = features[:, 0], 1
    else:
        anchor, anchor_count = contrast, views
    logits = anchor @ contrast.T / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    mask = mask.to(device=logits.device, dtype=logits.dtype).repeat(anchor_count, views)
    rows = torch.arange(bsz * anchor_count, device=logits.device)
    not_self = torch.ones_like(mask)
    not_self[rows, rows] = 0
    mask = mask * not_self
    log_prob = logits - torch.log((torch.exp(logits) * not_self).sum(1, keepdim=True))
    n_pos = mask.sum(1)
    n_pos = torch.where(n_pos < 1e-6, torch.ones_like(n_pos), n_pos)
    mean_log_prob_pos = (mask * log_prob).sum(1) / n_pos
    return (-(temperature / base_temperature) * mean_log_prob_pos).mean()


class SupConLoss(nn.Module):
    """SupContrast ``SupConLoss(temperature=0.07, contrast_mode='all', base_temperature=0.07)``.

    forward(features [B, V, ...] (flattened to [B, V, D]; normalize them yourself, as the
    original expects), labels [B] or None, mask [B, B] or None) -> 0-dim loss, fp32 for bf16/fp16
    features. labels = mask = None: SimCLR (each sample its own class). The mean runs over all
    anchors; an anchor without positives contributes 0 (SupContrast HEAD). ``backend``: a tilecl
    backend name.
    """

    def __init__(self, temperature=0.07, contrast_mode="all", base_temperature=0.07, *,
                 backend="auto"):
        super().__init__()
        self.temperature = temperature
        self.contrast_mode = contrast_mode
        self.base_temperature = base_temperature
        self.backend = backend

    def forward(self, features, labels=None, mask=None):
        if features.dim() < 3:
            raise ValueError("`features` needs to be [bsz, n_views, ...], at least 3 dimensions "
                             "are required")
        if features.dim() > 3:
            features = features.view(features.shape[0], features.shape[1], -1)
        if self.contrast_mode not in ("all", "one"):
            raise ValueError(f"Unknown mode: {self.contrast_mode}")
        bsz = features.shape[0]
        if labels is not None and mask is not None:
            raise ValueError("Cannot define both `labels` and `mask`")
        if labels is not None:
            labels = _as_labels(labels.to(features.device), bsz)
        elif mask is not None:
            labels = labels_of_mask(mask.to(features.device))
            if labels is None:
                warnings.warn("SupConLoss: this mask is not a label-equality mask; computing the "
                              "loss densely (B V x B V logits in memory)", DenseFallbackWarning,
                              stacklevel=2)
                return dense_supcon_with_mask(features, mask, self.temperature,
                                              self.base_temperature, self.contrast_mode)
        return losses.supcon(features, labels, temperature=self.temperature,
                             base_temperature=self.base_temperature,
                             contrast_mode=self.contrast_mode, variant="out", scale="base",
                             backend=self.backend)


__all__ = ["SupConLoss", "DenseFallbackWarning", "labels_of_mask"]
