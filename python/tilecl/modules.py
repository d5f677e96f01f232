"""nn.Module wrappers of the main losses, with an optional learnable temperature / logit scale.

A learnable scale is stored as its log, t = log(alpha) (CLIP's parametrization: alpha = e^t,
temperature = e^-t), so it stays positive; clamp it after optimizer steps as open_clip does
(``module.clamp_(max_logit_scale)``) if you want CLIP's [0, ln 100] range.

Example::

    crit = tilecl.ClipLoss(temperature=0.07, learnable=True)   # a parameter log_scale = ln(1/0.07)
    loss = crit(image_features, text_features)                  # [N, D] each -> 0-dim loss
    loss.backward(); optimizer.step(); crit.clamp_(100.0)
"""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from . import losses


class _ScaledLoss(nn.Module):
    """Holds alpha = 1 / temperature, as a fixed float or a learnable log-scale parameter."""

    def __init__(self, temperature: float, learnable: bool, reduction: str, backend: str,
                 group: Any):
        super().__init__()
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"temperature must be a positive float, got {temperature!r}")
        self.learnable = bool(learnable)
        if self.learnable:
            self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))
        else:
            self.temperature = float(temperature)
        self.reduction, self.backend, self.group = reduction, backend, group

    def logit_scale(self) -> Union[Tensor, float]:
        """alpha (a tensor when learnable, else a float)."""
        return self.log_scale.exp() if self.learnable else 1.0 / self.temperature

    def current_temperature(self) -> Union[Tensor, float]:
        """tau = 1 / alpha (a tensor when learnable, else a float)."""
        return (-self.log_scale).exp() if self.learnable else self.temperature

    @torch.no_grad()
    def clamp_(self, max_logit_scale: float = 100.0) -> "_ScaledLoss":
        """Clamp a learnable scale to [1, max_logit_scale] (open_clip clamps t to [0, ln 100])."""
        if self.learnable:
            self.log_scale.clamp_(0.0, math.log(max_logit_scale))
        return self

    def extra_repr(self):
        t = "learnable" if self.learnable else f"temperature={self.temperature}"
        return f"{t}, reduction={self.reduction!r}, backend={self.backend!r}"


class InfoNCELoss(_ScaledLoss):
    """``tilecl.info_nce`` as a module. forward(query [N, D], key [M, D], positive_index=None).

    Args:
        temperature: initial tau > 0 (float).
        learnable: learn alpha = 1 / tau (stored as its log).
        symmetric, reduction, backend, group: as ``tilecl.info_nce``.

    forward returns the loss: 0-dim, or [N] for reduction "none".

    Example::

        crit = tilecl.InfoNCELoss(temperature=0.05)
        loss = crit(q, k)                     # q: [N, D], k: [M, D], row i's positive is k[i]
    """

    def __init__(self, temperature: float = 0.07, *, learnable: bool = False,
                 symmetric: bool = False, reduction: str = "mean", backend: str = "auto",
                 group: Any = None):
        super().__init__(temperature, learnable, reduction, backend, group)
        self.symmetric = symmetric

    def forward(self, query: Tensor, key: Tensor, positive_index: Optional[Tensor] = None) -> Tensor:
        return losses.info_nce(query, key, logit_scale=self.logit_scale(),
                               positive_index=positive_index, symmetric=self.symmetric,
                               reduction=self.reduction, backend=self.backend, group=self.group)


class ClipLoss(_ScaledLoss):
    """Symmetric CLIP loss. forward(image [N, D], text [N, D], logit_scale=None): an explicit
    (already exponentiated) logit_scale wins over the module's own (init 1 / 0.07).

    Args:
        temperature: initial tau > 0 (float); the module's logit scale is 1 / tau.
        learnable: learn the scale (stored as its log, as CLIP does); default True.
        reduction, backend, group: as ``tilecl.clip_loss``.

    forward returns the loss: 0-dim, or [N] for reduction "none".

    Example::

        crit = tilecl.ClipLoss()                      # learnable, init 1 / 0.07
        loss = crit(img, txt)                         # img, txt: [N, D]
        loss = crit(img, txt, model.logit_scale.exp())  # the model's own scale instead
    """

    def __init__(self, temperature: float = 0.07, *, learnable: bool = True,
                 reduction: str = "mean", backend: str = "auto", group: Any = None):
        super().__init__(temperature, learnable, reduction, backend, group)

    def forward(self, image_features: Tensor, text_features: Tensor,
                logit_scale: Optional[Union[Tensor, float]] = None) -> Tensor:
        scale = self.logit_scale() if logit_scale is None else logit_scale
        return losses.clip_loss(image_features, text_features, scale, reduction=self.reduction,
                                backend=self.backend, group=self.group)


class NTXentLoss(_ScaledLoss):
    """``tilecl.nt_xent`` as a module. forward(z1 [N, D], z2 [N, D]).

    Args:
        temperature: initial tau > 0 (float); learnable: learn it (as a log scale).
        convention, reduction, backend, group: as ``tilecl.nt_xent``.

    forward returns the loss: 0-dim, or [2N] for reduction "none".

    Example::

        crit = tilecl.NTXentLoss(temperature=0.5)
        loss = crit(F.normalize(h1, dim=1), F.normalize(h2, dim=1))   # h1, h2: [N, D]
    """

    def __init__(self, temperature: float = 0.5, *, learnable: bool = False,
                 convention: str = "pytorch", reduction: str = "mean", backend: str = "auto",
                 group: Any = None):
        super().__init__(temperature, learnable, reduction, backend, group)
        self.convention = convention

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        return losses.nt_xent(z1, z2, temperature=self.current_temperature(),
                              convention=self.convention, reduction=self.reduction,
                              backend=self.backend, group=self.group)


class SupConLoss(_ScaledLoss):
    """``tilecl.supcon`` as a module. forward(features [B, V, D], labels [B] or None).

    Args:
        temperature: initial tau > 0 (float); learnable: learn it (as a log scale).
        base_temperature, contrast_mode, variant, scale, reduction, backend, group: as
            ``tilecl.supcon``.

    forward returns the loss: 0-dim, or one term per anchor for reduction "none".

    Example::

        crit = tilecl.SupConLoss(temperature=0.1)
        loss = crit(torch.stack([v1, v2], dim=1), y)   # v1, v2: [B, D] normalized, y: [B] int
    """

    def __init__(self, temperature: float = 0.07, *, base_temperature: float = 0.07,
                 contrast_mode: str = "all", variant: str = "out", scale: Optional[str] = None,
                 learnable: bool = False, reduction: str = "mean", backend: str = "auto",
                 group: Any = None):
        super().__init__(temperature, learnable, reduction, backend, group)
        self.base_temperature, self.contrast_mode = base_temperature, contrast_mode
        self.variant, self.scale = variant, scale

    def forward(self, features: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        return losses.supcon(features, labels, temperature=self.current_temperature(),
                             base_temperature=self.base_temperature,
                             contrast_mode=self.contrast_mode, variant=self.variant,
                             scale=self.scale, reduction=self.reduction, backend=self.backend,
                             group=self.group)


class SigLipLoss(nn.Module):
    """SigLIP loss with its own logit scale t' and bias b (big_vision init: t' = ln 10, b = -10),
    learnable by default. forward(image [N, D], text [M, D], logit_scale=None, logit_bias=None,
    labels=None): explicit (exponentiated) scale / bias win over the module's.

    Args:
        init_logit_scale: the initial exponentiated scale exp(t') > 0 (default 10).
        init_logit_bias: the initial bias b (default -10).
        learnable: t' and b are parameters (else buffers).
        reduction, backend, group: as ``tilecl.siglip_loss``.

    forward returns the loss: 0-dim, or [N] for reduction "none".

    Example::

        crit = tilecl.SigLipLoss()
        loss = crit(img, txt)                          # img: [N, D], txt: [M, D] normalized
    """

    def __init__(self, init_logit_scale: float = 10.0, init_logit_bias: float = -10.0, *,
                 learnable: bool = True, reduction: str = "mean", backend: str = "auto",
                 group: Any = None):
        super().__init__()
        t = torch.tensor(math.log(init_logit_scale))
        b = torch.tensor(float(init_logit_bias))
        if learnable:
            self.log_scale, self.bias = nn.Parameter(t), nn.Parameter(b)
        else:
            self.register_buffer("log_scale", t)
            self.register_buffer("bias", b)
        self.reduction, self.backend, self.group = reduction, backend, group

    def forward(self, image_features: Tensor, text_features: Tensor,
                logit_scale: Optional[Union[Tensor, float]] = None,
                logit_bias: Optional[Union[Tensor, float]] = None,
                labels: Optional[Tensor] = None) -> Tensor:
        scale = self.log_scale.exp() if logit_scale is None else logit_scale
        bias = self.bias if logit_bias is None else logit_bias
        return losses.siglip_loss(image_features, text_features, scale, bias, labels=labels,
                                  reduction=self.reduction, backend=self.backend,
                                  group=self.group)
