"""nn.Module wrappers of the main losses, with an optional learnable temperature / logit scale.

A learnable scale is stored as its log, t = log(alpha) (CLIP's parametrization: alpha = e^t,
temperature = e^-t), so it stays positive; clamp it after optimizer steps as open_clip does
(``module.clamp_(max_logit_scale)``) if you want CLIP's [0, ln 100] range.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import losses


class _ScaledLoss(nn.Module):
    """Holds alpha = 1 / temperature, as a fixed float or a learnable log-scale parameter."""

    def __init__(self, temperature, learnable, reduction, backend, group):
        super().__init__()
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"temperature must be a positive float, got {temperature!r}")
        self.learnable = bool(learnable)
        if self.learnable:
            self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))
        else:
            self.temperature = float(temperature)
        self.reduction, self.backend, self.group = reduction, backend, group

    def logit_scale(self):
        """alpha (a tensor when learnable, else a float)."""
        return self.log_scale.exp() if self.learnable else 1.0 / self.temperature

    def current_temperature(self):
        return (-self.log_scale).exp() if self.learnable else self.temperature

    @torch.no_grad()
    def clamp_(self, max_logit_scale=100.0):
        """Clamp a learnable scale to [1, max_logit_scale] (open_clip clamps t to [0, ln 100])."""
        if self.learnable:
            self.log_scale.clamp_(0.0, math.log(max_logit_scale))
        return self

    def extra_repr(self):
        t = "learnable" if self.learnable else f"temperature={self.temperature}"
        return f"{t}, reduction={self.reduction!r}, backend={self.backend!r}"


class InfoNCELoss(_ScaledLoss):
    """``tilecl.info_nce`` as a module. forward(query [N, D], key [M, D], positive_index=None)."""

    def __init__(self, temperature=0.07, *, learnable=False, symmetric=False, reduction="mean",
                 backend="auto", group=None):
        super().__init__(temperature, learnable, reduction, backend, group)
        self.symmetric = symmetric

    def forward(self, query, key, positive_index=None):
        return losses.info_nce(query, key, logit_scale=self.logit_scale(),
                               positive_index=positive_index, symmetric=self.symmetric,
                               reduction=self.reduction, backend=self.backend, group=self.group)


class ClipLoss(_ScaledLoss):
    """Symmetric CLIP loss. forward(image [N, D], text [N, D], logit_scale=None): an explicit
    (already exponentiated) logit_scale wins over the module's own (init 1 / 0.07)."""

    def __init__(self, temperature=0.07, *, learnable=True, reduction="mean", backend="auto",
                 group=None):
        super().__init__(temperature, learnable, reduction, backend, group)

    def forward(self, image_features, text_features, logit_scale=None):
        scale = self.logit_scale() if logit_scale is None else logit_scale
        return losses.clip_loss(image_features, text_features, scale, reduction=self.reduction,
                                backend=self.backend, group=self.group)


class NTXentLoss(_ScaledLoss):
    """``tilecl.nt_xent`` as a module. forward(z1 [N, D], z2 [N, D])."""

    def __init__(self, temperature=0.5, *, learnable=False, convention="pytorch",
                 reduction="mean", backend="auto", group=None):
        super().__init__(temperature, learnable, reduction, backend, group)
        self.convention = convention

    def forward(self, z1, z2):
        return losses.nt_xent(z1, z2, temperature=self.current_temperature(),
                              convention=self.convention, reduction=self.reduction,
                              backend=self.backend, group=self.group)


class SupConLoss(_ScaledLoss):
    """``tilecl.supcon`` as a module. forward(features [B, V, D], labels [B] or None)."""

    def __init__(self, temperature=0.07, *, base_temperature=0.07, contrast_mode="all",
                 variant="out", scale=None, learnable=False, reduction="mean", backend="auto",
                 group=None):
        super().__init__(temperature, learnable, reduction, backend, group)
        self.base_temperature, self.contrast_mode = base_temperature, contrast_mode
        self.variant, self.scale = variant, scale

    def forward(self, features, labels=None):
        return losses.supcon(features, labels, temperature=self.current_temperature(),
                             base_temperature=self.base_temperature,
                             contrast_mode=self.contrast_mode, variant=self.variant,
                             scale=self.scale, reduction=self.reduction, backend=self.backend,
                             group=self.group)


class SigLipLoss(nn.Module):
    """SigLIP loss with its own logit scale t' and bias b (big_vision init: t' = ln 10, b = -10),
    learnable by default. forward(image [N, D], text [M, D], logit_scale=None, logit_bias=None,
    labels=None): explicit (exponentiated) scale / bias win over the module's."""

    def __init__(self, init_logit_scale=10.0, init_logit_bias=-10.0, *, learnable=True,
                 reduction="mean", backend="auto", group=None):
        super().__init__()
        t = torch.tensor(math.log(init_logit_scale))
        b = torch.tensor(float(init_logit_bias))
        if learnable:
            self.log_scale, self.bias = nn.Parameter(t), nn.Parameter(b)
        else:
            self.register_buffer("log_scale", t)
            self.register_buffer("bias", b)
        self.reduction, self.backend, self.group = reduction, backend, group

    def forward(self, image_features, text_features, logit_scale=None, logit_bias=None,
                labels=None):
        scale = self.log_scale.exp() if logit_scale is None else logit_scale
        bias = self.bias if logit_bias is None else logit_bias
        return losses.siglip_loss(image_features, text_features, scale, bias, labels=labels,
                                  reduction=self.reduction, backend=self.backend,
                                  group=self.group)
