"""Drop-in replacements for open_clip's ``ClipLoss`` and ``SigLipLoss`` (open_clip/loss.py):
the constructor and forward signatures of open_clip 3.3 (and of its development branch, which adds
``SigLipLoss(chunk_size=...)``), computed by tilecl's tiled losses; ``patch()`` installs them into
an installed open_clip so that an unmodified training script uses them.

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

One line for an existing open_clip training script (its ``create_loss`` then builds tilecl's
classes, and ``open_clip.loss.ClipLoss`` / ``SigLipLoss`` are tilecl's)::

    import tilecl.compat.open_clip
    tilecl.compat.open_clip.patch()            # or: with tilecl.compat.open_clip.patch(): ...
"""

from __future__ import annotations

import sys

from torch import nn

from .. import _checks as C
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
    0-dim tensor, e.g. ``model.logit_scale.exp()``), logit_bias=None, output_dict=False) -> 0-dim
    loss (fp32 for fp16/bf16 features), or ``{"contrastive_loss": loss}``. ``backend``: a tilecl
    backend name.

    ``logit_bias`` (a float or a one-element tensor, e.g. the ``logit_bias`` of a SigLIP-initialised
    open_clip model trained with the CLIP loss): open_clip adds it to every logit, which leaves both
    softmax cross-entropies unchanged. The loss ignores its value and returns a zero gradient for it
    (so DDP sees the parameter used, and a NaN bias still gives a NaN loss, as in open_clip).
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

    def forward(self, image_features, text_features, logit_scale, logit_bias=None,
                output_dict=False):
        loss = losses.clip_loss(image_features, text_features, logit_scale, backend=self.backend,
                                group=_group(self.world_size))
        if logit_bias is not None:
            # CE(s + b) = CE(s) for one b on every logit: d loss / d b = 0 (math.md 2.1)
            bias = C.real_scalar(logit_bias, "logit_bias", image_features)
            loss = loss + bias.to(loss.dtype) * 0.0
        return {"contrastive_loss": loss} if output_dict else loss


class SigLipLoss(nn.Module):
    """open_clip ``SigLipLoss``: -sum_ij log sigmoid(y_ij (s <x_i, u_j> + b)) / N, y = 2 I - 1,
    tiled.

    forward(image_features [N, D], text_features [N, D], logit_scale (exponentiated),
    logit_bias (float, 0-dim tensor or None = 0), output_dict=False). ``dist_impl`` is accepted
    (open_clip's exchange strategies all give the same gradients); the ring replaces them.
    ``chunk_size`` (open_clip's row chunking of the logits, 0 = off) is accepted and changes
    nothing: the tiled loss never holds more than a tile of logits.
    """

    _DIST_IMPLS = (None, "bidir", "shift", "reduce", "gather")

    def __init__(self, cache_labels=False, rank=0, world_size=1, dist_impl=None, chunk_size=0, *,
                 backend="auto"):
        super().__init__()
        if dist_impl not in self._DIST_IMPLS:
            raise ValueError(f"dist_impl must be one of {self._DIST_IMPLS}, got {dist_impl!r}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 0:
            raise ValueError(f"chunk_size must be an int >= 0, got {chunk_size!r}")
        self.chunk_size = chunk_size
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


# ---- patch(): install the classes into an imported open_clip -----------------------------------

_PATCHED = []          # (module, attribute name, original object) to restore


def _bind_backend(cls, backend):
    """``cls`` with ``backend`` as the default of its ``backend=`` keyword."""

    def __init__(self, *args, backend=backend, **kwargs):
        cls.__init__(self, *args, backend=backend, **kwargs)

    return type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__,
                                       "__qualname__": cls.__qualname__})


class _Patch:
    """What ``patch()`` returns: ``unpatch()`` it, or use it as a context manager."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        unpatch()
        return False

    def unpatch(self):
        unpatch()


def patch(*, backend="auto"):
    """Make open_clip build and use tilecl's ``ClipLoss`` and ``SigLipLoss``.

    Replaces ``open_clip.loss.ClipLoss`` and ``open_clip.loss.SigLipLoss`` wherever an imported
    ``open_clip`` / ``open_clip_train`` module holds them (the ``open_clip`` namespace,
    ``open_clip.factory`` whose ``create_loss`` builds them, the training package), so an
    unmodified training script (``loss = create_loss(args)``; ``loss(**model_out,
    output_dict=True)``) runs the tiled losses. open_clip's ``CoCaLoss`` and ``DistillClipLoss``
    (which need the logits matrix) are left as they are. Code that bound the classes by name
    before the call (``from open_clip.loss import ClipLoss`` in your own module) keeps open_clip's;
    call ``patch()`` first, or build the loss with ``create_loss``.

    backend: the tilecl backend the installed classes default to. Calling ``patch()`` again
    re-installs with the new backend. Returns a handle: ``handle.unpatch()`` (or ``unpatch()``)
    restores open_clip; ``with patch(): ...`` restores on exit.

    Example::

        import open_clip, tilecl.compat.open_clip
        with tilecl.compat.open_clip.patch():
            loss_fn = open_clip.create_loss(args)        # tilecl's ClipLoss / SigLipLoss
    """
    try:
        import open_clip
        import open_clip.loss as oc_loss
    except ImportError as e:
        raise ImportError("tilecl.compat.open_clip.patch() needs open_clip "
                          "(pip install open_clip_torch)") from e
    del open_clip
    unpatch()
    originals = {}
    for name, ours in (("ClipLoss", ClipLoss), ("SigLipLoss", SigLipLoss)):
        orig = getattr(oc_loss, name, None)
        if orig is not None:
            originals[id(orig)] = (orig, _bind_backend(ours, backend))
    for mod_name, mod in list(sys.modules.items()):
        if mod is None or mod_name.split(".")[0] not in ("open_clip", "open_clip_train"):
            continue
        for attr, value in list(vars(mod).items()):
            hit = originals.get(id(value))
            if hit is not None and hit[0] is value:
                setattr(mod, attr, hit[1])
                _PATCHED.append((mod, attr, value))
    return _Patch()


def unpatch():
    """Restore what ``patch()`` replaced (a no-op when nothing is patched)."""
    while _PATCHED:
        mod, attr, value = _PATCHED.pop()
        setattr(mod, attr, value)


def is_patched():
    """True while ``patch()`` is in effect."""
    return bool(_PATCHED)


__all__ = ["ClipLoss", "SigLipLoss", "patch", "unpatch", "is_patched"]
