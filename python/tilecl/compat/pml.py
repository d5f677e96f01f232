"""pytorch-metric-learning call convention: ``SupConLoss(temperature=0.1)`` and
``NTXentLoss(temperature=0.07)`` with ``forward(embeddings [N, D], labels [N])``, computed by
``tilecl.supcon`` on the N embeddings as one view each (math.md 4.2).

PML conventions reproduced: the default ``CosineSimilarity`` distance (embeddings L2-normalized
inside, logits cos / temperature), the positive set (same label, self excluded), the denominators,
the reducers, and a zero loss when the batch has no positive pair or no negative pair.

- ``SupConLoss``: HobbitLong's L_out without the tau / tau_base prefactor, averaged over the
  anchors that have a positive (PML's ``AvgNonZeroReducer`` drops the zero-positive rows, whose
  loss is 0; it would also drop an anchor whose loss is exactly 0 -- one positive and no negative
  at all -- which this class counts).
- ``NTXentLoss``: per positive pair (a, p), -log(e^{s_ap} / (e^{s_ap} + sum_{n: y_n != y_a}
  e^{s_an})), mean over the ordered positive pairs. When every label occurs at most twice, each
  anchor has at most one positive and {p} + negatives is every other sample, so the pair loss is
  SupCon's row (tiled, exact). With a label occurring three or more times the denominator excludes
  the other positives (math.md 4.2, ONE_POSITIVE: two passes), which the tiled API cannot express:
  ``NotImplementedError``.

A call without labels (and without ``indices_tuple``) raises PML's own ``ValueError``. The loss
comes back in the embeddings' dtype, as PML returns it (computed in fp32 for fp16 / bf16
embeddings, rounded once at the end).

Not supported (``NotImplementedError``): ``indices_tuple`` (miners), ``ref_emb`` / ``ref_labels``,
and constructor options other than ``temperature`` (``distance``, ``reducer``,
``embedding_regularizer``, ...).

Migration::

    # from pytorch_metric_learning.losses import SupConLoss, NTXentLoss
    from tilecl.compat.pml import SupConLoss, NTXentLoss

    loss = SupConLoss(temperature=0.1)(embeddings, labels)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import losses


def _check_kwargs(cls, kwargs):
    if kwargs:
        raise NotImplementedError(f"tilecl.compat.pml.{cls}: option(s) {sorted(kwargs)} are not "
                                  "supported (only temperature; the distance is PML's default "
                                  "CosineSimilarity and the reducer is the loss's default)")


def _class_ids(labels, n, device):
    if not isinstance(labels, torch.Tensor):
        labels = torch.as_tensor(labels)
    labels = labels.to(device).reshape(-1)
    if labels.shape[0] != n:
        raise ValueError(f"labels must have {n} entries (one per embedding), got {labels.shape[0]}")
    return torch.unique(labels, return_inverse=True)[1]


def _check_forward(cls, labels, indices_tuple, ref_emb, ref_labels):
    if indices_tuple is not None:
        raise NotImplementedError(f"tilecl.compat.pml.{cls}: indices_tuple (miners) is not "
                                  "supported; pass labels only")
    if ref_emb is not None or ref_labels is not None:
        raise NotImplementedError(f"tilecl.compat.pml.{cls}: ref_emb / ref_labels are not "
                                  "supported")
    if labels is None:  # PML's GenericPairLoss check, type and message
        raise ValueError("labels and indices_tuple cannot both be None")


def _rows(embeddings, ids, temperature, backend):
    """Per-anchor L_out terms (no prefactor) on the normalized embeddings, and the positive counts."""
    z = F.normalize(embeddings, p=2, dim=1)
    rows = losses.supcon(z[:, None, :], ids, temperature=temperature, scale="none",
                         reduction="none", backend=backend)
    n_pos = torch.bincount(ids)[ids] - 1
    return rows, n_pos


def _zero(embeddings):
    return embeddings.sum() * 0  # in the embeddings' dtype, connected to the graph


class SupConLoss(nn.Module):
    """pytorch-metric-learning ``SupConLoss(temperature=0.1)``; forward(embeddings [N, D],
    labels [N]) -> 0-dim loss in the embeddings' dtype. ``backend``: a tilecl backend name."""

    def __init__(self, temperature=0.1, *, backend="auto", **kwargs):
        super().__init__()
        _check_kwargs("SupConLoss", kwargs)
        self.temperature = temperature
        self.backend = backend

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        _check_forward("SupConLoss", labels, indices_tuple, ref_emb, ref_labels)
        ids = _class_ids(labels, embeddings.shape[0], embeddings.device)
        n_classes = int(ids.max()) + 1 if ids.numel() else 0
        rows, n_pos = _rows(embeddings, ids, self.temperature, self.backend)
        has_pos = n_pos > 0
        if n_classes < 2 or not bool(has_pos.any()):  # no negative pair, or no positive pair
            return _zero(embeddings)
        return (rows[has_pos].sum() / has_pos.sum()).to(embeddings.dtype)


class NTXentLoss(nn.Module):
    """pytorch-metric-learning ``NTXentLoss(temperature=0.07)``; forward(embeddings [N, D],
    labels [N]) -> 0-dim loss in the embeddings' dtype, for labels that occur at most twice each
    (SimCLR's two views: ``labels = torch.arange(B).repeat(2)``). ``backend``: a tilecl backend
    name."""

    def __init__(self, temperature=0.07, *, backend="auto", **kwargs):
        super().__init__()
        _check_kwargs("NTXentLoss", kwargs)
        self.temperature = temperature
        self.backend = backend

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        _check_forward("NTXentLoss", labels, indices_tuple, ref_emb, ref_labels)
        ids = _class_ids(labels, embeddings.shape[0], embeddings.device)
        counts = torch.bincount(ids)
        if ids.numel() and int(counts.max()) > 2:
            raise NotImplementedError(
                f"tilecl.compat.pml.NTXentLoss: a label occurs {int(counts.max())} times; with "
                "more than one positive per anchor PML's per-pair denominator (that positive + "
                "the negatives only, math.md 4.2 ONE_POSITIVE) is not expressible by the tiled "
                "API. Supported: every label at most twice (e.g. two views per sample)")
        rows, n_pos = _rows(embeddings, ids, self.temperature, self.backend)
        has_pos = n_pos > 0
        if counts.numel() < 2 or not bool(has_pos.any()):
            return _zero(embeddings)
        return (rows[has_pos].sum() / has_pos.sum()).to(embeddings.dtype)


__all__ = ["SupConLoss", "NTXentLoss"]
