"""Drop-in replacements for open_clip's ``ClipLoss`` and ``SigLipLoss`` (open_clip/loss.py):
same constructor and forward signatures, computed by tilecl's tiled losses.

Migration::

    # from open_clip.loss import ClipLoss, SigLipLoss
    from tilecl.compat.open_clip import ClipLoss, SigLipLoss

    loss_fn = ClipLoss(rank=rank, world_size=world_size)
    loss = loss_fn(image_features, text_features, model.logit_scale.exp())

Distributed (world_size > 1): torch.distributed must be initialized; the features are the local
shards and tilecl's ring exchange (``group=torch.distributed.group.WORLD``) replaces open_clip's
all-gather / neighbour exchange, so no rank holds the global N x N logits. tilecl's contract: under
DDP (gradients averaged over the W ranks) the parameter gradients, logit scale included, equal
those of one process on the concatenated global batch. That is what open_clip computes with
``local_loss=True, gather_with_grad=True`` (and for ``SigLipLoss``); with
``gather_with_grad=False`` open_clip's parameter gradients are 1/W of that. The returned value is
the global-batch loss on every rank (open_clip's ``local_loss=True`` logs the rank-local mean).
``local_loss``, ``gather_with_grad`` and ``cache_labels`` are accepted for compatibility and change
nothing (no labels or logits are materialized); Horovod is not supported.
"""

from __future__ import annotations

from torch import nn

from .. import losses


def _group(world_size):
    if world_size <= 1:
        return None
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"world_size={world_size} but torch.distributed is not initialized")
    if dist.get_world_size() != world_size:
        raise ValueError(f"world_size={world_size} but torch.distributed has "
                         f"{dist.get_world_size()} ranks")
    return dist.group.WORLD


class ClipLoss(nn.Module):
    """open_clip ``ClipLoss``: (CE(s I T^T, diag) + CE(s T I^T, diag)) / 2, tiled.

    forward(image_features [N, D], text_features [N, D], logit_scale (exponentiated: a float or a
    0-dim tensor, e.g. ``model.logit_scale.exp()``), output_dict=False) -> 0-dim loss (fp32 for
    fp16/bf16 features), or ``{"contrastive_loss": loss}``. ``backend``: a tilecl backend name.
    """

    def __init__(self, local_loss=False, gather_with_grad=False, cache_labels=False, rank=0,
                 world_size=1, use_horovod=False, *, backend="auto"):
        super().__init__()
        if use_horovod:
            raise NotImplementedError("tilecl.compat.ClipLoss: Horovod is not supported; the ring "
                                      "exchange runs on torch.distributed")
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.use_horovod = use_horovod
        self.backend = backend

    def forward(self, image_features, text_features, logit_scale, output_dict=False):
        loss = losses.clip_loss(image_features, text_features, logit_scale, backend=self.backend,
                                group=_group(self.world_size))
        return {"contrastive_loss": loss} if output_dict else loss


class SigLipLoss(nn.Module):
    """open_clip ``SigLipLoss``: -sum_ij log sigmoid(y_ij (s <x_i, u_j> + b)) / N, y = 2 I - 1,
    tiled.

    forward(image_features [N, D], text_features [N, D], logit_scale (exponentiated),
    logit_bias (float, 0-dim tensor or None = 0), output_dict=False). ``dist_impl`` is accepted
    (open_clip's exchange strategies all give the same gradients); the ring replaces them.
    """

    def __init__(self, cache_labels=False, rank=0, world_size=1, dist_impl=None, *,
                 backend="auto"):
        super().__init__()
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.dist_impl = dist_impl
        self.backend = backend

    def forward(self, image_features, text_features, logit_scale, logit_bias, output_dict=False):
        if logit_bias is None:
            logit_bias = 0.0
        loss = losses.siglip_loss(image_features, text_features, logit_scale, logit_bias,
                                  backend=self.backend, group=_group(self.world_size))
        return {"contrastive_loss": loss} if output_dict else loss


__all__ = ["ClipLoss", "SigLipLoss"]
