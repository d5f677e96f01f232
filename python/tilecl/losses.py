"""Public functional losses: argument checks (``_checks.py``), then the dense reference or the
tiled family (``_family.py``) on the chosen backend.

Shapes: ``[N, D]`` embeddings (``[B, V, D]`` for SupCon and decoupled uniformity); any float
dtype; the loss is fp32 for fp16/bf16 inputs (float64 for float64). ``temperature`` tau and
``logit_scale`` alpha are both accepted where the official code uses one or the other:
logits are ``alpha <q, k>`` with ``alpha = 1 / tau``; either may be a float or a 0-dim tensor,
and gradient flows to a tensor that requires it. ``reduction`` is "mean" (the official
normalization), "sum" or "none" (per-anchor terms). ``backend`` is "auto", "reference",
"torch", "triton" or "native" (``TILECL_BACKEND`` overrides "auto"). ``group`` is a
torch.distributed process group for the ring exchange (None: single process).
Under ``torch.autocast`` a loss runs at its inputs' precision (autocast is off inside), and
features of different dtypes (bf16 against fp32) are computed in the wider one; outside
autocast they are a TypeError.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from typing import Any, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import _backends, _family, _matryoshka, reference
from . import _checks as C
from ._group import as_group
from ._spec import MAX_TOPK

Scale = Union[float, Tensor]  # a Python number or a 0-dim tensor (gradient flows to it)


class HardNegatives(NamedTuple):
    """Each row's hardest in-batch negatives (``info_nce(..., topk_negatives=k)``)."""

    similarity: torch.Tensor  # [N, k] <q_i, k_j> (logit / scale), descending; -inf padding
    index: torch.Tensor  # [N, k] int64 key index (global under a group); -1 padding


class InfoNCEOutput(NamedTuple):
    """``info_nce(..., topk_negatives=k)`` with k > 0: the loss and the mined negatives.

    A tuple: ``loss, hard = tilecl.info_nce(..., topk_negatives=k)`` unpacks it, ``out[0]`` is
    the loss; ``out.loss`` and ``out.hard`` name the two parts.
    """

    loss: torch.Tensor  # what info_nce returns without topk_negatives (0-dim, or [N] for "none")
    hard: HardNegatives  # [N, k] similarities and key indices, no gradient


# ---- a logit scale that is almost surely a temperature or a log scale -------------------------
# With unit-norm embeddings every logit alpha <x_i, y_j> lies in [-alpha, alpha]. For alpha < 1
# the softmax weights of a row differ by less than e^2, so the CLIP loss stays within about 2 of
# log N however good the embeddings are, and SigLIP's logits barely move off the bias: no CLIP or
# SigLIP recipe trains there (alpha < 1 is a temperature > 1). open_clip, big_vision and
# Hugging Face store t = log(alpha) as the parameter, clamped to [0, ln 100]: passing that
# parameter itself instead of t.exp() gives alpha in [1, 4.6], also far too soft.
_MAX_LOG_SCALE = math.log(100.0)
_SCALE_WARNED: set = set()  # the functions that have warned (once per process each)


def _compiling() -> bool:
    fn = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(fn()) if fn is not None else False


def _user_stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside the tilecl package (the user's call), so the
    warning points at the user's line through decorators and the nn.Module wrappers."""
    pkg = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(pkg):
        frame, level = frame.f_back, level + 1
    return level


def _check_logit_scale(value: Any, fn: str) -> None:
    """Warn once per process (per loss function) when ``value`` is not plausibly an exponentiated
    logit scale: < 1, or an ``nn.Parameter`` <= ln 100 (a stored log scale passed as is). Skipped
    while torch.compile traces (no graph break, no read of a tensor's value in the graph)."""
    if fn in _SCALE_WARNED or _compiling():
        return
    raw = False
    if isinstance(value, Tensor):
        if value.numel() != 1 or not value.is_floating_point():
            return  # the argument checks raise
        raw = isinstance(value, torch.nn.Parameter)
        v = float(value.detach())  # eager only; the argument check reads the value as well
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        v = float(value)
    else:
        return
    if not (math.isfinite(v) and v > 0):
        return  # the argument checks raise
    fix = ("pass the exponentiated scale alpha = 1 / temperature (CLIP init: 1 / 0.07 = 14.3; "
           "open_clip / Hugging Face: model.logit_scale.exp())")
    if fn == "clip_loss":
        fix += ", or use tilecl.info_nce(..., symmetric=True, temperature=0.07) for a temperature"
    if v < 1:
        msg = (f"{fn}: logit_scale={v:.4g} < 1: with unit-norm embeddings the logits lie in "
               f"[-{v:.4g}, {v:.4g}], so the loss hardly depends on the embeddings (CLIP: about "
               f"log N). This looks like a temperature or an un-exponentiated log scale: {fix}.")
    elif raw and v <= _MAX_LOG_SCALE + 1e-6:
        msg = (f"{fn}: logit_scale is an nn.Parameter of value {v:.4g} <= ln 100: this looks like "
               f"the stored log scale (open_clip, big_vision and Hugging Face keep "
               f"log(1 / temperature), clamped to [0, ln 100]), which gives far too soft logits: "
               f"{fix} (= {math.exp(v):.4g} here). If the parameter is the scale itself, "
               "ignore this.")
    else:
        return
    _SCALE_WARNED.add(fn)
    warnings.warn(msg + " (Warned once per process.)", UserWarning, stacklevel=_user_stacklevel())


def _route(backend, device, group):
    name = _backends.resolve(backend, device)
    if group is not None:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("group was given but torch.distributed is not initialized")
        if name == "reference" and dist.get_world_size(group) > 1:
            raise ValueError("backend='reference' is single-process: it cannot take group=")
    return name


def _pair(a, a_name, b, b_name, *, same_rows, group=None):
    """The checked pair, in the wider dtype of the two (they differ only under autocast)."""
    C.features(a, a_name, allow_empty=group is not None)
    C.features(b, b_name, like=a, like_name=a_name, same_rows=same_rows, allow_empty=group is not None)
    return C.widest(a, b)


def _positives(positive_index, n, m, query):
    """The checked [N] positive index, or None (key[i] for row i: needs M >= N)."""
    if positive_index is None:
        if m < n:
            raise ValueError(f"key must have at least as many rows as query ({n}) when "
                             f"positive_index is None, got {m}")
        return None
    return C.index(positive_index, "positive_index", n, m, query)


@C.autocast_rule
def info_nce(query: Tensor, key: Tensor, *, temperature: Optional[Scale] = None,
             logit_scale: Optional[Scale] = None, positive_index: Optional[Tensor] = None,
             symmetric: bool = False, label_smoothing: float = 0.0, key_ids: Optional[Tensor] = None,
             hard_negatives: Optional[Tensor] = None, query_negatives: bool = False,
             key_negatives: bool = False, false_negative_margin: Optional[float] = None,
             false_negative_ratio: Optional[float] = None, topk_negatives: int = 0,
             reduction: str = "mean", backend: str = "auto",
             group: Any = None) -> Union[Tensor, InfoNCEOutput]:
    """InfoNCE with one positive per row (math.md 2.1).

    query: [N, D], key: [M, D] with M >= N; row i's positive is key[positive_index[i]]
    (default key[i]); the other keys, extra rows beyond N included, are negatives.
    ``symmetric=True`` (N == M) is the CLIP loss: the mean of both directions.
    ``label_smoothing`` follows ``F.cross_entropy`` (an O(N d) term: the mean logit of a row is
    alpha <q_i, mean_j k_j>). ``temperature`` / ``logit_scale`` may be a tensor [N] (one per
    anchor, with its gradient) when ``symmetric=False``. ``key_ids`` [M] int: keys with the same
    id as a row's positive (the same document twice in a batch) are not negatives for that row.
    ``hard_negatives`` [N, K, D]: each row's own mined negatives, besides the shared keys.
    ``query_negatives`` / ``key_negatives`` (Qwen3-Embedding): the other queries, and the other
    keys seen from the row's positive key, join the denominator (one more tile sweep each).
    ``false_negative_margin`` m (Qwen3-Embedding: 0.1; NV-Retriever's margin variant: -margin) or
    ``false_negative_ratio`` r (NV-Retriever: 0.95): a key whose similarity exceeds the row's
    positive similarity + m (or r times it) is a likely false negative and leaves the
    denominator (thresholds carry no gradient); with ``query_negatives`` so does another query
    above that threshold (Qwen3-Embedding masks the query-query terms too; the key-key terms of
    ``key_negatives`` stay unmasked, as there).
    ``topk_negatives`` k (<= 32): also return each row's k hardest in-batch negatives, streamed
    by the same forward pass (hard-negative mining at no extra pass): the result is
    ``(loss, HardNegatives(similarity [N, k], index [N, k]))``, similarities <q_i, k_j>
    descending over the shared keys that are negatives (not the positive, not a duplicate id,
    not a masked false negative), index into ``key`` (under ``group``: into the concatenation of
    every rank's keys), padded with -inf / -1 when a row has fewer than k negatives. No gradient.

    Args:
        query: [N, D] float16 / bfloat16 / float32 / float64 embeddings (normalize them for
            cosine similarities).
        key: [M, D], same dtype and device, M >= N unless ``positive_index`` is given.
        temperature: tau > 0 (float, 0-dim tensor, or [N] tensor when not symmetric); give
            exactly one of ``temperature`` and ``logit_scale``.
        logit_scale: alpha = 1 / tau > 0, already exponentiated (same forms as temperature).
        positive_index: [N] int tensor of key rows (default: key[i] for row i).
        symmetric: CLIP: both directions, N == M, diagonal positives.
        label_smoothing: in [0, 1), as ``F.cross_entropy``.
        key_ids: [M] int document ids (not with ``symmetric`` / ``label_smoothing``).
        hard_negatives: [N, K, D] per-row extra negatives.
        query_negatives, key_negatives: extra denominator terms (see above).
        false_negative_margin, false_negative_ratio: at most one; float thresholds (see above).
        topk_negatives: k in [0, 32]; k > 0 also returns the mined negatives.
        reduction: "mean", "sum" or "none".
        backend: "auto", "reference", "torch", "triton" or "native".
        group: torch.distributed process group for the ring exchange (None: one process).

    Returns:
        The loss: a 0-dim tensor ("mean" / "sum") or [N] per-row terms ("none"; symmetric: the
        mean of both directions' terms), float32 for half inputs, else the input dtype. With
        ``topk_negatives=k > 0`` an ``InfoNCEOutput(loss, hard)`` named tuple, ``hard`` a
        ``HardNegatives(similarity [N, k], index [N, k])``.

    Example::

        loss = tilecl.info_nce(q, k, temperature=0.07)            # q, k: [N, D]
        loss, hard = tilecl.info_nce(q, k, temperature=0.07, topk_negatives=4)
    """
    query, key = _pair(query, "query", key, "key", same_rows=False, group=group)
    n, m = query.shape[0], key.shape[0]
    alpha = C.scale(temperature, logit_scale, query, rows=None if symmetric else n)
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)) or not (
            0.0 <= label_smoothing < 1.0):
        raise ValueError(f"label_smoothing must be a float in [0, 1), got {label_smoothing!r}")
    if key_ids is not None:
        key_ids = C.labels(key_ids, "key_ids", m, query)
        if symmetric or label_smoothing:
            raise ValueError("key_ids cannot be combined with symmetric=True or label_smoothing")
    if hard_negatives is not None:
        C.features(hard_negatives, "hard_negatives", dim=3, like=query, like_name="query",
                   same_rows=True, allow_empty=group is not None, shape="[N, K, D]")
        if symmetric:
            raise ValueError("hard_negatives cannot be combined with symmetric=True")
        query, key, hard_negatives = C.widest(query, key, hard_negatives)
    if false_negative_margin is not None or false_negative_ratio is not None:
        if false_negative_margin is not None and false_negative_ratio is not None:
            raise ValueError("give at most one of false_negative_margin and false_negative_ratio")
        for v, vn in ((false_negative_margin, "false_negative_margin"),
                      (false_negative_ratio, "false_negative_ratio")):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise TypeError(f"{vn} must be a float, got {type(v).__name__}")
        if symmetric or label_smoothing:
            raise ValueError("false-negative masking cannot be combined with symmetric=True or "
                             "label_smoothing")
    if (query_negatives or key_negatives) and (symmetric or label_smoothing or key_ids is not None):
        raise ValueError("query_negatives / key_negatives cannot be combined with symmetric=True, "
                         "label_smoothing or key_ids")
    positive_index = _positives(positive_index, n, m, query)
    if symmetric:
        if m != n:
            raise ValueError(f"symmetric=True needs key with as many rows as query ({n}), got {m}")
        if positive_index is not None:
            raise ValueError("symmetric=True uses the diagonal positives: positive_index must be None")
    if isinstance(topk_negatives, bool) or not isinstance(topk_negatives, int):
        raise TypeError(f"topk_negatives must be an int, got {type(topk_negatives).__name__}")
    if not 0 <= topk_negatives <= MAX_TOPK:
        raise ValueError(f"topk_negatives must be in [0, {MAX_TOPK}], got {topk_negatives}")
    C.reduction(reduction)
    name = _route(backend, query.device, group)
    if name == "reference":
        out = reference.info_nce(query, key, logit_scale=alpha, positive_index=positive_index,
                                 symmetric=symmetric, label_smoothing=float(label_smoothing),
                                 key_ids=key_ids, hard_negatives=hard_negatives,
                                 query_negatives=bool(query_negatives),
                                 key_negatives=bool(key_negatives),
                                 false_negative_margin=false_negative_margin,
                                 false_negative_ratio=false_negative_ratio, reduction=reduction,
                                 topk_negatives=topk_negatives)
    else:
        opts = dict(symmetric=bool(symmetric), label_smoothing=float(label_smoothing),
                    query_negatives=bool(query_negatives), key_negatives=bool(key_negatives),
                    false_negative_margin=false_negative_margin,
                    false_negative_ratio=false_negative_ratio, topk_negatives=topk_negatives,
                    reduction=reduction)
        out = _family.info_nce(query, key, alpha, positive_index, symmetric, reduction, name, group,
                               float(label_smoothing), key_ids, hard_negatives,
                               bool(query_negatives), bool(key_negatives), false_negative_margin,
                               false_negative_ratio, topk_negatives, opts)
    return out if not topk_negatives else InfoNCEOutput(out[0], HardNegatives(*out[1]))


@C.autocast_rule
def matryoshka_info_nce(query: Tensor, key: Tensor, dims: Sequence[int], *,
                        weights: Optional[Sequence[float]] = None,
                        temperature: Optional[Scale] = None, logit_scale: Optional[Scale] = None,
                        positive_index: Optional[Tensor] = None, symmetric: bool = False,
                        reduction: str = "mean", backend: str = "auto",
                        group: Any = None) -> Tensor:
    """Matryoshka InfoNCE (Kusupati et al. 2022; sentence-transformers' ``MatryoshkaLoss``
    around ``MultipleNegativesRankingLoss``): ``sum_p weights[p] * info_nce(normalize(q[:, :d_p]),
    normalize(k[:, :d_p]))`` over the prefix dimensions ``dims`` (each prefix re-normalized:
    cosine similarities). On the torch backend in one process the prefixes share ONE sweep of
    tiles (segment dots and their running sums, ``_matryoshka.py``): the matmul work of the
    largest prefix instead of the sum of all of them; other backends and ``group`` run one
    tiled InfoNCE per prefix. ``weights`` default to 1 each; ``temperature`` / ``logit_scale``
    is a scalar shared by all prefixes. Reduction applies per prefix before the weighted sum.

    Args:
        query, key: [N, D] and [M, D] embeddings (any scale: each prefix is re-normalized).
        dims: distinct prefix widths in [1, D].
        weights: one float per entry of ``dims`` (default 1 each).
        temperature, logit_scale: exactly one, a float or 0-dim tensor shared by all prefixes.
        positive_index, symmetric, reduction, backend, group: as ``info_nce``.

    Returns:
        The weighted sum over prefixes: 0-dim ("mean" / "sum") or [N] ("none").

    Example::

        loss = tilecl.matryoshka_info_nce(q, k, dims=(768, 512, 256, 128, 64), temperature=0.05)
    """
    query, key = _pair(query, "query", key, "key", same_rows=False, group=group)
    n, m, d = query.shape[0], key.shape[0], query.shape[1]
    alpha = C.scale(temperature, logit_scale, query)
    if isinstance(dims, int) or not hasattr(dims, "__iter__"):
        raise TypeError(f"dims must be a sequence of ints, got {type(dims).__name__}")
    dims = list(dims)
    if not dims or any(isinstance(x, bool) or not isinstance(x, int) for x in dims):
        raise TypeError(f"dims must be a non-empty sequence of ints, got {dims!r}")
    if any(not 1 <= x <= d for x in dims) or len(set(dims)) != len(dims):
        raise ValueError(f"dims must be distinct ints in [1, D={d}], got {dims!r}")
    if weights is None:
        weights = [1.0] * len(dims)
    weights = list(weights)
    if len(weights) != len(dims) or any(isinstance(w, bool) or not isinstance(w, (int, float))
                                        for w in weights):
        raise ValueError(f"weights must be {len(dims)} floats (one per dim), got {weights!r}")
    order = sorted(range(len(dims)), key=dims.__getitem__)
    dims, weights = [dims[i] for i in order], [float(weights[i]) for i in order]
    positive_index = _positives(positive_index, n, m, query)
    if symmetric and (m != n or positive_index is not None):
        raise ValueError("symmetric=True needs key with as many rows as query and no positive_index")
    C.reduction(reduction)
    name = _route(backend, query.device, group)
    if name != "reference" and _backends.get(name).prefix_sweep and as_group(group).local:
        return _matryoshka.matryoshka_info_nce(query, key, alpha, dims, weights, positive_index, symmetric,
                                    reduction)
    import torch.nn.functional as F

    total = 0.0
    for i, (dp, w) in enumerate(zip(dims, weights)):
        qp, kp = F.normalize(query[:, :dp], dim=1), F.normalize(key[:, :dp], dim=1)
        if name == "reference":
            part = info_nce(qp, kp, logit_scale=alpha, positive_index=positive_index,
                            symmetric=symmetric, reduction=reduction, backend=name, group=group)
        else:  # the first prefix's sweep checks every option across ranks
            opts = dict(dims=tuple(dims), weights=tuple(weights), symmetric=bool(symmetric),
                        reduction=reduction) if i == 0 else None
            part = _family.info_nce(qp, kp, alpha, positive_index, symmetric, reduction, name,
                                    group, options=opts)
        total = total + w * part
    return total


@C.autocast_rule
def clip_loss(image_features: Tensor, text_features: Tensor, logit_scale: Scale, *,
              reduction: str = "mean", backend: str = "auto", group: Any = None) -> Tensor:
    """open_clip ``ClipLoss``: (CE(alpha I T^T) + CE(alpha T I^T)) / 2 with the diagonal as
    labels. ``logit_scale`` is already exponentiated (``model.logit_scale.exp()``); a value < 1
    (a temperature, or a log scale) warns once per process.

    Args:
        image_features: [N, D] float embeddings (L2-normalized, as CLIP does).
        text_features: [N, D], same dtype and device.
        logit_scale: alpha > 0, a float or a 0-dim tensor (gradient flows to it); CLIP's init
            is 1 / 0.07 = 14.3.
        reduction: "mean" (open_clip), "sum" or "none" ([N]: the mean of row i's and column
            i's terms).
        backend, group: as ``info_nce``.

    Returns:
        The loss, 0-dim ([N] for "none"), float32 for half inputs, else the input dtype.

    Example::

        loss = tilecl.clip_loss(img, txt, model.logit_scale.exp())   # img, txt: [N, D]
    """
    image_features, text_features = _pair(image_features, "image_features", text_features,
                                          "text_features", same_rows=True, group=group)
    _check_logit_scale(logit_scale, "clip_loss")
    return info_nce(image_features, text_features, logit_scale=logit_scale, symmetric=True,
                    reduction=reduction, backend=backend, group=group)


@C.autocast_rule
def siglip_loss(image_features: Tensor, text_features: Tensor, logit_scale: Scale,
                logit_bias: Scale, *, labels: Optional[Tensor] = None,
                text_labels: Optional[Tensor] = None, reduction: str = "mean",
                backend: str = "auto", group: Any = None) -> Tensor:
    """SigLIP (big_vision / open_clip ``SigLipLoss``): -sum_j log sigmoid(y_ij s_ij) / N with
    s = logit_scale <x_i, u_j> + logit_bias, y = +1 on positives, -1 elsewhere (math.md 2.2).

    image_features [N, D], text_features [M, D]. Positives: the diagonal j == i by default, or
    equal group ids ``labels`` [N] vs ``text_labels`` [M] (default: ``labels``, N == M).
    logit_scale is exponentiated (big_vision's exp(t')); logit_bias is b. A logit_scale < 1
    warns once per process.

    Args:
        image_features: [N, D] float embeddings (L2-normalized).
        text_features: [M, D], same dtype and device.
        logit_scale: exp(t') > 0, float or 0-dim tensor (big_vision init 10).
        logit_bias: b, float or 0-dim tensor (big_vision init -10).
        labels: [N] int group ids (optional); text_labels: [M] int (default ``labels``).
        reduction: "mean" (sum over texts, mean over images), "sum" or "none" ([N] per image).
        backend, group: as ``info_nce``.

    Returns:
        The loss, 0-dim ([N] for "none"), float32 for half inputs, else the input dtype.

    Example::

        loss = tilecl.siglip_loss(img, txt, t_prime.exp(), bias)
    """
    image_features, text_features = _pair(image_features, "image_features", text_features,
                                          "text_features", same_rows=False, group=group)
    _check_logit_scale(logit_scale, "siglip_loss")
    n, m = image_features.shape[0], text_features.shape[0]
    alpha = C.positive_scalar(logit_scale, "logit_scale", image_features)
    bias = C.real_scalar(logit_bias, "logit_bias", image_features)
    if labels is not None:
        labels = C.labels(labels, "labels", n, image_features)
        if text_labels is None and m != n:
            raise ValueError(f"text_labels [{m}] are needed when text_features has {m} rows and "
                             f"image_features {n}")
    if text_labels is not None:
        if labels is None:
            raise ValueError("text_labels needs labels as well")
        text_labels = C.labels(text_labels, "text_labels", m, image_features)
    C.reduction(reduction)
    name = _route(backend, image_features.device, group)
    if name == "reference":
        return reference.siglip_loss(image_features, text_features, alpha, bias, labels=labels,
                                     text_labels=text_labels, reduction=reduction)
    return _family.siglip_loss(image_features, text_features, alpha, bias, labels, text_labels,
                          reduction, name, group, dict(reduction=reduction))


def _two_views(z1, z2, min_rows=1, group=None):
    z1, z2 = _pair(z1, "z1", z2, "z2", same_rows=True, group=group)
    if group is None and z1.shape[0] < min_rows:
        raise ValueError(f"this loss needs at least {min_rows} samples per view (negatives), "
                         f"got {z1.shape[0]}")
    return z1, z2


@C.autocast_rule
def nt_xent(z1: Tensor, z2: Tensor, *, temperature: Scale = 0.5, convention: str = "pytorch",
            reduction: str = "mean", backend: str = "auto", group: Any = None) -> Tensor:
    """SimCLR NT-Xent over the 2N anchors of [z1; z2], self excluded, positive i <-> i + N
    (math.md 3). convention "pytorch": mean over 2N anchors (lightly, SupContrast, PML);
    "simclr_tf": loss_a + loss_b (google-research/simclr), twice that.

    Args:
        z1, z2: [N, D] float embeddings of the two views (normalize them for cosine similarity).
        temperature: tau > 0, float or 0-dim tensor.
        convention: "pytorch" or "simclr_tf".
        reduction: "mean", "sum" or "none" ([2N]: z1's anchors, then z2's).
        backend, group: as ``info_nce``.

    Returns:
        The loss, 0-dim ([2N] for "none"), float32 for half inputs, else the input dtype.

    Example::

        loss = tilecl.nt_xent(F.normalize(h1, dim=1), F.normalize(h2, dim=1), temperature=0.5)
    """
    z1, z2 = _two_views(z1, z2, group=group)
    alpha = C.scale(temperature, None, z1)
    C.choice(convention, "convention", ("pytorch", "simclr_tf"))
    C.reduction(reduction)
    name = _route(backend, z1.device, group)
    if name == "reference":
        return reference.nt_xent(z1, z2, temperature=1 / alpha, convention=convention,
                                 reduction=reduction)
    return _family.nt_xent(z1, z2, alpha, convention, reduction, name, group,
                           dict(convention=convention, reduction=reduction))


@C.autocast_rule
def supcon(features: Tensor, labels: Optional[Tensor] = None, *, temperature: Scale = 0.07,
           base_temperature: float = 0.07, contrast_mode: str = "all", variant: str = "out",
           scale: Optional[str] = None, reduction: str = "mean", backend: str = "auto",
           group: Any = None) -> Tensor:
    """Supervised contrastive loss (Khosla et al.), SupContrast layout (math.md 4).

    features: [B, V, D] (normalize them yourself, as SupContrast expects); labels: [B] int or
    None (then each sample is its own class: SimCLR). contrast_mode "all" (every view anchors)
    or "one" (view 0 anchors). variant "out" = L_out (HobbitLong; an anchor without positives
    contributes 0 and counts in the mean), "in" = L_in (google-research, denominator ALL).
    scale: "base" -> x temperature / base_temperature (HobbitLong), "tau" -> x temperature
    (google-research), "none"; None = "base" for "out", "tau" for "in".

    Args:
        features: [B, V, D] float, V views of B samples.
        labels: [B] int class labels, or None.
        temperature: tau > 0, float or 0-dim tensor; base_temperature: float > 0.
        contrast_mode: "all" or "one"; variant: "out" or "in"; scale: "base", "tau", "none", None.
        reduction: "mean", "sum" or "none" (one term per anchor: [V B] for "all", view-major as
            SupContrast's ``torch.cat(torch.unbind(features, 1))``; [B] for "one").
        backend, group: as ``info_nce``.

    Returns:
        The loss, 0-dim (per anchor for "none"), float32 for half inputs, else the input dtype.

    Example::

        loss = tilecl.supcon(torch.stack([v1, v2], 1), y, temperature=0.1)
    """
    C.features(features, "features", dim=3, allow_empty=group is not None)
    bsz = features.shape[0]
    if labels is not None:
        labels = C.labels(labels, "labels", bsz, features)
    tau = C.positive_scalar(temperature, "temperature", features)
    base = C.plain_positive(base_temperature, "base_temperature")
    C.choice(contrast_mode, "contrast_mode", ("all", "one"))
    C.choice(variant, "variant", ("out", "in"))
    kind = C.choice(scale, "scale", (None, "base", "tau", "none")) or (
        "base" if variant == "out" else "tau")
    C.reduction(reduction)
    name = _route(backend, features.device, group)
    if name == "reference":
        return reference.supcon(features, labels, temperature=tau, base_temperature=base,
                                contrast_mode=contrast_mode, variant=variant, scale=kind,
                                reduction=reduction)
    factor = {"base": tau / base, "tau": tau, "none": 1.0}[kind]
    opts = dict(contrast_mode=contrast_mode, variant=variant, scale=kind, reduction=reduction)
    if kind == "base":
        opts.update(base_temperature=base)
    return _family.supcon(features, labels, 1.0 / tau, factor, contrast_mode, variant, reduction,
                          name, group, opts)


def _normalized(z1, z2, normalize):
    if not normalize:
        return z1, z2
    import torch.nn.functional as F

    return F.normalize(z1, dim=1), F.normalize(z2, dim=1)


@C.autocast_rule
def dcl_loss(z1: Tensor, z2: Tensor, *, temperature: Scale = 0.1, weighted: bool = False,
             sigma: float = 0.5, normalize: bool = False, reduction: str = "mean",
             backend: str = "auto", group: Any = None) -> Tensor:
    """Decoupled contrastive loss DCL / DCLW (Yeh et al.; lightly >= 1.5.21 convention):
    the positive is removed from the denominator, mean over the 2B anchors of both views
    (math.md 8.1). weighted=True: DCLW, positive weight 2 - B softmax(<z1_k, z2_k> / sigma).
    normalize=True L2-normalizes the inputs first, as lightly's DCLLoss does.

    Args:
        z1, z2: [B, D] float embeddings of the two views, B >= 2.
        temperature: tau > 0, float or 0-dim tensor.
        weighted: DCLW; sigma: its width (float > 0).
        normalize: L2-normalize z1, z2 first.
        reduction: "mean", "sum" or "none" ([2B]: z1's anchors, then z2's).
        backend, group: as ``info_nce``.

    Returns:
        The loss, 0-dim ([2B] for "none"), float32 for half inputs, else the input dtype.

    Example::

        loss = tilecl.dcl_loss(z1, z2, temperature=0.1, weighted=True)
    """
    z1, z2 = _two_views(z1, z2, min_rows=2, group=group)
    alpha = C.scale(temperature, None, z1)
    sigma = C.plain_positive(sigma, "sigma")
    C.reduction(reduction)
    z1, z2 = _normalized(z1, z2, normalize)
    name = _route(backend, z1.device, group)
    if name == "reference":
        return reference.dcl_loss(z1, z2, temperature=1 / alpha, weighted=weighted, sigma=sigma,
                                  reduction=reduction)
    opts = dict(weighted=bool(weighted), normalize=bool(normalize), reduction=reduction)
    if weighted:
        opts.update(sigma=sigma)
    return _family.dcl_loss(z1, z2, alpha, weighted, sigma, reduction, name, group, opts)


def _tau_plus(tau_plus):
    if isinstance(tau_plus, bool) or not isinstance(tau_plus, (int, float)) or not (
            0 <= tau_plus < 1):
        raise ValueError(f"tau_plus must be a float in [0, 1), got {tau_plus!r}")
    return float(tau_plus)


@C.autocast_rule
def hcl_loss(z1: Tensor, z2: Tensor, *, temperature: Scale = 0.5, tau_plus: float = 0.1,
             beta: float = 1.0, reduction: str = "mean", backend: str = "auto",
             group: Any = None) -> Tensor:
    """Hard-negative contrastive loss (Robinson et al., joshr17/HCL): importance weights
    exp(beta s) on the negatives (not detached), debiasing with class prior tau_plus, floor
    N_n e^(-1/T); mean over the 2B anchors (math.md 8.2). Pass normalized embeddings.

    Args:
        z1, z2: [B, D] float, L2-normalized embeddings of the two views, B >= 2.
        temperature: T > 0, float or 0-dim tensor.
        tau_plus: class prior in [0, 1); beta: hardness >= 0 (0: the debiased loss).
        reduction: "mean", "sum" or "none" ([2B]: z1's anchors, then z2's).
        backend, group: as ``info_nce``.

    Returns:
        The loss, 0-dim ([2B] for "none"), float32 for half inputs, else the input dtype.

    Example::

        loss = tilecl.hcl_loss(F.normalize(z1, dim=1), F.normalize(z2, dim=1), beta=1.0)
    """
    z1, z2 = _two_views(z1, z2, min_rows=2, group=group)
    alpha = C.scale(temperature, None, z1)
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or beta < 0:
        raise ValueError(f"beta must be a float >= 0, got {beta!r}")
    return _hcl(z1, z2, alpha, _tau_plus(tau_plus), float(beta), reduction, backend, group)


@C.autocast_rule
def debiased_loss(z1: Tensor, z2: Tensor, *, temperature: Scale = 0.5, tau_plus: float = 0.1,
                  reduction: str = "mean", backend: str = "auto", group: Any = None) -> Tensor:
    """Debiased contrastive loss (Chuang et al., chingyaoc/DCL): HCL with beta = 0
    (math.md 8.3). Pass normalized embeddings.

    Args:
        z1, z2: [B, D] float, L2-normalized embeddings of the two views, B >= 2.
        temperature: T > 0, float or 0-dim tensor; tau_plus: class prior in [0, 1).
        reduction: "mean", "sum" or "none" ([2B]); backend, group: as ``info_nce``.

    Returns:
        The loss, 0-dim ([2B] for "none"), float32 for half inputs, else the input dtype.

    Example::

        loss = tilecl.debiased_loss(F.normalize(z1, dim=1), F.normalize(z2, dim=1), tau_plus=0.1)
    """
    _two_views(z1, z2, min_rows=2, group=group)
    alpha = C.scale(temperature, None, z1)
    return _hcl(z1, z2, alpha, _tau_plus(tau_plus), 0.0, reduction, backend, group)


def _hcl(z1, z2, alpha, tau_plus, beta, reduction, backend, group):
    C.reduction(reduction)
    name = _route(backend, z1.device, group)
    if name == "reference":
        if beta > 0:
            return reference.hcl_loss(z1, z2, temperature=1 / alpha, tau_plus=tau_plus, beta=beta,
                                      reduction=reduction)
        return reference.debiased_loss(z1, z2, temperature=1 / alpha, tau_plus=tau_plus,
                                       reduction=reduction)
    return _family.hcl_loss(z1, z2, alpha, tau_plus, beta, reduction, name, group,
                                 dict(tau_plus=tau_plus, beta=beta, reduction=reduction))


@C.autocast_rule
def kernel_info_nce(z1: Tensor, z2: Tensor, *, temperature: Scale = 0.5, gamma: float = 2.0,
                    eps: float = 1e-6, reduction: str = "mean", backend: str = "auto",
                    group: Any = None) -> Tensor:
    """Kernel-InfoNCE (Tan et al., yifanzhang-pro/Kernel-InfoNCE ``gamma_loss``): logits
    -||z_i - z_j||^gamma / T over [z1; z2], self excluded, positive kept in the denominator,
    -log(pos / (clamp(neg, eps) + eps)), mean over 2B (math.md 7).

    Args:
        z1, z2: [B, D] float embeddings of the two views.
        temperature: T > 0, float or 0-dim tensor; gamma: distance exponent > 0; eps: > 0.
        reduction: "mean", "sum" or "none" ([2B]); backend, group: as ``info_nce``.

    Returns:
        The loss, 0-dim ([2B] for "none"), float32 for half inputs, else the input dtype.

    Example::

        loss = tilecl.kernel_info_nce(z1, z2, temperature=0.5, gamma=1.0)
    """
    _two_views(z1, z2, group=group)
    alpha = C.scale(temperature, None, z1)
    gamma = C.plain_positive(gamma, "gamma")
    eps = C.plain_positive(eps, "eps")
    C.reduction(reduction)
    name = _route(backend, z1.device, group)
    if name == "reference":
        return reference.kernel_info_nce(z1, z2, temperature=1 / alpha, gamma=gamma, eps=eps,
                                         reduction=reduction)
    return _family.kernel_info_nce(z1, z2, alpha, gamma, eps, reduction, name, group,
                                   dict(gamma=gamma, eps=eps, reduction=reduction))


@C.autocast_rule
def cclk_loss(z1: Tensor, z2: Tensor, weight_x: Optional[Tensor] = None,
              weight_y: Optional[Tensor] = None, *,
              conditions: Optional[Tuple[Tensor, Tensor]] = None, lam: float = 0.1,
              temperature: Scale = 0.5, mode: str = "hardneg", normalize: bool = False,
              reduction: str = "mean", backend: str = "auto", group: Any = None) -> Tensor:
    """Conditional contrastive learning with kernel, CCL-K (Tsai et al., Crazy-Jack/CCLK-release),
    math.md 5: a cosine critic over [z2 | z1] columns with conditional weights W.

    Weights, either way: ``weight_x`` / ``weight_y`` [B, B] dense W = clip((K_Z + lam I)^-1 K_Z)
    for each view (any kernel; see ``tilecl.reference.cclk_weights``; B^2 memory), or
    ``conditions`` = (c_x [B, r], c_y [B, r]) for the cosine kernel, whose W is low rank and
    formed in-tile from factors (O(B r) memory). mode "hardneg" (Hard-negative / Fair CCL-K) or
    "weaklysup". normalize=True L2-normalizes z1, z2 first, as the official critic does.
    reduction "none" gives [2B] terms: view-1 anchors, then view-2 anchors. Under the ring
    (``group=``) only ``conditions`` work: a dense W is a global B x B matrix.

    Args:
        z1, z2: [B, D] float embeddings of the two views.
        weight_x, weight_y: [B, B] dense conditional weights (both or neither; no gradient).
        conditions: (c_x [B, r], c_y [B, r]) instead of the weights; lam: ridge > 0 for them.
        temperature: > 0, float or 0-dim tensor; mode: "hardneg" or "weaklysup".
        normalize: L2-normalize z1, z2 first.
        reduction: "mean", "sum" or "none" ([2B]); backend, group: as ``info_nce``.

    Returns:
        The loss, 0-dim ([2B] for "none"), float32 for half inputs, else the input dtype.

    Example::

        w = tilecl.reference.cclk_weights(c, lam=0.1)              # c: [B, r] conditions
        loss = tilecl.cclk_loss(z1, z2, w, w, temperature=0.5)
        loss = tilecl.cclk_loss(z1, z2, conditions=(c, c), temperature=0.5)
    """
    z1, z2 = _two_views(z1, z2, group=group)
    b = z1.shape[0]
    alpha = C.scale(temperature, None, z1)
    C.choice(mode, "mode", ("hardneg", "weaklysup"))
    C.reduction(reduction)
    if (weight_x is None) != (weight_y is None):
        raise ValueError("give both weight_x and weight_y, or neither")
    if (weight_x is None) == (conditions is None):
        raise ValueError("give exactly one of (weight_x, weight_y) and conditions")
    z1, z2 = _normalized(z1, z2, normalize)
    name = _route(backend, z1.device, group)
    if weight_x is not None and group is not None:
        raise ValueError("weight_x / weight_y are global B x B matrices: under group= give "
                         "conditions (low-rank cosine weights, streamed with the columns)")
    if weight_x is not None:
        for w, wn in ((weight_x, "weight_x"), (weight_y, "weight_y")):
            C.features(w, wn)
            if tuple(w.shape) != (b, b):
                raise ValueError(f"{wn} must have shape [{b}, {b}], got {tuple(w.shape)}")
            if w.device != z1.device:
                raise ValueError(f"{wn} is on {w.device} but z1 is on {z1.device}")
        weights = (weight_x.detach().to(z1.dtype), weight_y.detach().to(z1.dtype))
        if name == "reference":
            return reference.cclk_loss(z1, z2, *weights, temperature=1 / alpha, mode=mode,
                                       reduction=reduction)
        return _family.cclk_loss(z1, z2, alpha, weights, None, mode, reduction, name, None)
    if not isinstance(conditions, (tuple, list)) or len(conditions) != 2:
        raise TypeError("conditions must be a pair (c_x [B, r], c_y [B, r])")
    for c, cn in zip(conditions, ("conditions[0]", "conditions[1]")):
        C.features(c, cn, allow_empty=group is not None)
        if c.shape[0] != b or c.device != z1.device:
            raise ValueError(f"{cn} must be [{b}, r] on {z1.device}, got {tuple(c.shape)} on "
                             f"{c.device}")
    lam = C.plain_positive(lam, "lam")
    if name == "reference":
        wx, wy = (reference.cclk_weights(c.detach(), lam=lam) for c in conditions)
        return reference.cclk_loss(z1, z2, wx.to(z1.dtype), wy.to(z1.dtype),
                                   temperature=1 / alpha, mode=mode, reduction=reduction)
    factors = [_family.cclk_factors(c.detach().to(z1.dtype), lam, group) for c in conditions]
    opts = dict(mode=mode, lam=lam, normalize=bool(normalize), reduction=reduction)
    return _family.cclk_loss(z1, z2, alpha, None, factors, mode, reduction, name, group, opts)


@C.autocast_rule
def uniformity_loss(x: Tensor, *, t: Scale = 2.0, backend: str = "auto",
                    group: Any = None) -> Tensor:
    """Uniformity (Wang & Isola, ssnl/align_uniform): log mean_{i<j} exp(-t ||x_i - x_j||^2)
    over the rows of x [N, D] (N >= 2), math.md 6.2. t: float or 0-dim tensor > 0.

    Args:
        x: [N, D] float embeddings (L2-normalized, as align_uniform expects), N >= 2.
        t: > 0, float or 0-dim tensor.
        backend, group: as ``info_nce`` (under a group: all pairs of the global batch).

    Returns:
        0-dim loss (<= 0), float32 for half inputs, else the input dtype.

    Example::

        loss = tilecl.uniformity_loss(F.normalize(x, dim=1), t=2.0)
    """
    C.features(x, "x", allow_empty=group is not None)
    if group is None and x.shape[0] < 2:
        raise ValueError(f"x needs at least 2 rows (pairs), got {x.shape[0]}")
    alpha = C.positive_scalar(t, "t", x)
    name = _route(backend, x.device, group)
    if name == "reference":
        return reference.uniformity_loss(x, t=alpha)
    return _family.uniformity_loss(x, alpha, name, group, dict(loss="uniformity_loss"))


@C.autocast_rule
def decoupled_uniformity(z: Tensor, prior: Optional[Tensor] = None, *, t: Scale = 2.0,
                         kernel: str = "rbf", sigma: float = 1.0, lam: float = 0.01,
                         backend: str = "auto", group: Any = None) -> Tensor:
    """Decoupled uniformity (Dufumier et al., Duplums/contrastive-decoupled-uniformity), math.md 6.1:
    centroids mu_i = mean_v normalize(z_iv) of z [B, V, D]; with ``prior`` [B, p] the centroids
    become alpha mu, alpha = (K + lam I)^-1 K (kernel "rbf" with sigma: dense B x B solve;
    "cosine": low rank, O(B p), also under the ring); then uniformity with t.

    Args:
        z: [B, V, D] float, V views of B samples (B >= 2); normalized inside.
        prior: [B, p] float prior features, or None.
        t: > 0, float or 0-dim tensor; kernel: "rbf" or "cosine"; sigma, lam: floats > 0.
        backend, group: as ``info_nce``.

    Returns:
        0-dim loss, float32 for half inputs, else the input dtype.

    Example::

        loss = tilecl.decoupled_uniformity(torch.stack([v1, v2], 1), prior=p, kernel="cosine")
    """
    import torch.nn.functional as F

    C.features(z, "z", dim=3, allow_empty=group is not None)
    if group is None and z.shape[0] < 2:
        raise ValueError(f"z needs at least 2 samples, got {z.shape[0]}")
    alpha = C.positive_scalar(t, "t", z)
    C.choice(kernel, "kernel", ("rbf", "cosine"))
    sigma = C.plain_positive(sigma, "sigma")
    lam = C.plain_positive(lam, "lam")
    if prior is not None:
        C.features(prior, "prior", allow_empty=group is not None)
        if prior.shape[0] != z.shape[0] or prior.device != z.device:
            raise ValueError(f"prior must be [{z.shape[0]}, p] on {z.device}, got "
                             f"{tuple(prior.shape)} on {prior.device}")
    name = _route(backend, z.device, group)
    if name == "reference":
        return reference.decoupled_uniformity(z, prior, t=alpha, kernel=kernel, sigma=sigma,
                                              lam=lam)
    cdt = C.compute_dtype(z)
    mu = F.normalize(z.to(cdt), dim=2).mean(1)  # O(B V D) prologue in fp32
    if prior is not None:
        if group is not None and kernel != "cosine":
            raise ValueError("decoupled_uniformity with an rbf prior needs the whole B x B "
                             "kernel: under group= use kernel='cosine' (low rank)")
        mu = _family.prior_apply(mu, prior, kernel, sigma, lam, group)
    opts = dict(loss="decoupled_uniformity", prior=prior is not None)
    if prior is not None:
        opts.update(kernel=kernel, lam=lam)
    return _family.uniformity_loss(mu, alpha, name, group, opts)
