"""sentence-transformers losses computed by tilecl: ``MultipleNegativesRankingLoss`` (MNRL) and
``CachedMultipleNegativesRankingLoss``, with the constructor and forward signatures of
sentence-transformers' own classes (checked against 6.2.0), usable in ``SentenceTransformerTrainer``
and in ``model.fit`` / ``model.old_fit``.

Migration::

    # from sentence_transformers.losses import MultipleNegativesRankingLoss
    from tilecl.compat.sentence_transformers import MultipleNegativesRankingLoss

    loss = MultipleNegativesRankingLoss(model, scale=20.0)   # then SentenceTransformerTrainer(..., loss=loss)

What is computed. forward(sentence_features, labels) embeds the columns (anchor, positive,
negative_1, ..., negative_n) exactly as sentence-transformers does, then calls ``tilecl.info_nce``
with the anchors as queries and ``cat(positives, negatives_1, ..., negatives_n)`` as keys: every
anchor against every candidate of the batch, its own positive at key i (math.md 2.1), logits
``scale * sim``. ``similarity_fct=cos_sim`` (the default, or ``model.similarity`` of a cosine
model) L2-normalizes the embeddings first; ``dot_score`` uses them as they are. The loss and its
gradients are those of sentence-transformers' MNRL (tests/test_compat_sentence_transformers.py),
without its [B, B * (1 + n)] score matrix: tilecl's extra memory is O(B) per loss. Both classes
take ``backend=`` (a tilecl backend name, default "auto").

The newer constructor options (sentence-transformers >= 5.x):

- ``directions`` / ``partition_mode``: every combination sentence-transformers accepts runs, except
  ``"doc_to_doc"`` in ``"joint"`` mode WITHOUT ``"doc_to_query"`` when the batch has negative
  columns (``NotImplementedError``: tilecl's key-key term cannot spare a document's own hard
  negatives). ``("query_to_doc", "doc_to_query")`` with ``"per_direction"`` is the symmetric
  InfoNCE (one tilecl sweep for pairs, two with negatives); ``"query_to_query"`` is
  ``info_nce(query_negatives=True)``; ``"doc_to_doc"`` without negatives ``key_negatives=True``;
  with ``"doc_to_query"`` in ``"joint"`` mode a second tiled call (each positive document against
  the queries, and the other queries' documents, by ``key_ids``) joins the first one's per-row
  log-sum-exp through ``logaddexp`` (exact: no terms are subtracted).
- ``hardness_mode`` with ``hardness_strength > 0`` adds a stop-gradient term to some logits, which
  the tiled template does not express: ``NotImplementedError``.
- ``gather_across_devices=True`` with torch.distributed initialized (world size > 1): tilecl's ring
  exchange over ``group.WORLD`` replaces the all-gather (no rank holds the global embeddings); the
  value and, under DDP's gradient mean, the parameter gradients are those of sentence-transformers
  (each rank's loss is the mean over its own anchors against the global candidates).
- ``similarity_fct``: ``cos_sim`` or ``dot_score`` (or ``model.similarity`` resolving to either);
  anything else raises ``NotImplementedError`` when the loss is called.

``CachedMultipleNegativesRankingLoss(model, mini_batch_size=32, ...)`` is sentence-transformers'
own GradCache class (its ``CachedLossMixin``: embed mini-batches without graph, loss and backward
to the embeddings, re-embed each mini-batch with graph and push the cached gradients through), with
the loss stage replaced by the tiled MNRL above over the whole batch at once: the encoder's
activations are bounded by ``mini_batch_size`` as in sentence-transformers, and the loss stage
holds O(B) extra memory instead of sentence-transformers' [mini_batch_size, B * (1 + n)] score
chunks. Same value and gradients as ``MultipleNegativesRankingLoss`` (up to dropout replay, as in
sentence-transformers).

Importing ``tilecl`` or ``tilecl.compat`` does not import this module (nor sentence-transformers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import losses

try:
    import sentence_transformers as _st
except ImportError as _err:  # pragma: no cover - exercised only without the package
    raise ImportError(
        "tilecl.compat.sentence_transformers needs the sentence-transformers package "
        f"(pip install sentence-transformers; tested with 6.2.0): {_err}. The rest of tilecl "
        "works without it.") from _err

try:  # sentence-transformers >= 5.4 layout
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss as _STCachedMNRL,
    )
    from sentence_transformers.sentence_transformer.losses import (
        MultipleNegativesRankingLoss as _STMNRL,
    )
except ImportError:  # older releases
    from sentence_transformers.losses import CachedMultipleNegativesRankingLoss as _STCachedMNRL
    from sentence_transformers.losses import MultipleNegativesRankingLoss as _STMNRL

try:
    from sentence_transformers.util import cos_sim as _cos_sim
except ImportError:  # pragma: no cover
    from sentence_transformers.util.similarity import cos_sim as _cos_sim

_DIRECTIONS = ("query_to_doc",)
_NEWER = {"gather_across_devices": False, "directions": _DIRECTIONS, "partition_mode": "joint",
          "hardness_mode": None, "hardness_strength": 0.0}


def _newer_kwargs(values):
    """The sentence-transformers >= 5 options, passed on only where they differ from the defaults
    (so that an older sentence-transformers, without them, still takes the default call)."""
    return {k: v for k, v in values.items() if (tuple(v) if k == "directions" else v) != _NEWER[k]}


def _similarity_kind(fct):
    """"cos" or "dot" for sentence-transformers' cos_sim / dot_score (or a bound
    ``model.similarity`` resolving to one of them); anything else is refused."""
    try:
        from sentence_transformers.util import similarity_fct_name

        name = similarity_fct_name(fct)
    except ImportError:  # pragma: no cover - older sentence-transformers
        name = getattr(fct, "__name__", type(fct).__name__)
    name = name.rsplit(".", 1)[-1]
    if fct is _cos_sim or name in ("cos_sim", "cosine"):
        return "cos"
    if name in ("dot_score", "dot"):
        return "dot"
    raise NotImplementedError(
        f"tilecl.compat.sentence_transformers: similarity_fct={name!r} is not supported; use "
        "sentence_transformers.util.cos_sim (the default) or dot_score")


def _group(gather):
    if not gather:
        return None
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() <= 1:
        return None  # sentence-transformers' gather is then the identity too
    return dist.group.WORLD


def _row_offset(n, like, group):
    """Global index of this rank's first anchor (ranks concatenated in order, as the ring does)."""
    if group is None:
        return 0
    import torch.distributed as dist

    sizes = [torch.zeros(1, dtype=torch.int64, device=like.device)
             for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, torch.tensor([n], dtype=torch.int64, device=like.device), group=group)
    return int(sum(int(s) for s in sizes[:dist.get_rank(group)]))


def _embed(model, sentence_features):
    try:  # sentence-transformers >= 6: one merged forward for the like-shaped candidate columns
        from sentence_transformers.base.losses.merged_forward import embed_columns
    except ImportError:
        return [model(features)["sentence_embedding"] for features in sentence_features]
    return embed_columns(model, sentence_features)


class MultipleNegativesRankingLoss(_STMNRL):
    """sentence-transformers ``MultipleNegativesRankingLoss(model, scale=20.0,
    similarity_fct=cos_sim, gather_across_devices=False, directions=("query_to_doc",),
    partition_mode="joint", hardness_mode=None, hardness_strength=0.0)``, computed by
    ``tilecl.info_nce`` (see the module docstring for what each option maps to).
    ``backend``: a tilecl backend name.

    A subclass of sentence-transformers' class (``isinstance`` checks, ``get_config_dict``,
    ``citation``, ``temperature`` and the argument checks are its own); ``forward`` and
    ``compute_loss_from_embeddings`` are tilecl's.
    """

    def __init__(self, model, scale=20.0, similarity_fct=_cos_sim, gather_across_devices=False,
                 directions=_DIRECTIONS, partition_mode="joint", hardness_mode=None,
                 hardness_strength=0.0, *, backend="auto"):
        super().__init__(model, scale=scale, similarity_fct=similarity_fct,
                         **_newer_kwargs(dict(gather_across_devices=gather_across_devices,
                                              directions=directions, partition_mode=partition_mode,
                                              hardness_mode=hardness_mode,
                                              hardness_strength=hardness_strength)))
        # older sentence-transformers do not set these: the defaults then
        for k, v in _NEWER.items():
            if not hasattr(self, k):
                setattr(self, k, v)
        self.backend = backend
        self._check_supported()

    def _check_supported(self):
        if self.hardness_mode is not None and self.hardness_strength > 0:
            raise NotImplementedError(
                f"tilecl.compat.sentence_transformers: hardness_mode={self.hardness_mode!r} adds "
                "hardness_strength * stop_grad(sim) to some logits, which the tiled loss does not "
                "express; use sentence_transformers' MultipleNegativesRankingLoss for it")
        _similarity_kind(self.similarity_fct)

    def forward(self, sentence_features, labels=None):
        return self.compute_loss_from_embeddings(_embed(self.model, list(sentence_features)), labels)

    def compute_loss_from_embeddings(self, embeddings, labels=None):
        """The loss from the column embeddings [anchors, positives, negatives_1, ...], each [B, D]."""
        if len(embeddings) < 2:
            raise ValueError(f"Expected at least 2 embeddings, got {len(embeddings)}")
        self._check_supported()
        if _similarity_kind(self.similarity_fct) == "cos":
            embeddings = [F.normalize(e, p=2, dim=-1) for e in embeddings]
        queries, docs = embeddings[0], list(embeddings[1:])
        b = queries.shape[0]
        for i, d in enumerate(docs, 1):
            if d.shape != queries.shape:
                raise ValueError(f"column {i} has embeddings of shape {tuple(d.shape)}, the anchors "
                                 f"{tuple(queries.shape)}")
        dirs = set(self.directions)
        has_negs = len(docs) > 1
        group = _group(self.gather_across_devices)
        kw = dict(logit_scale=float(self.scale), reduction="none", backend=self.backend,
                  group=group)
        docs_all = torch.cat(docs) if has_negs else docs[0]

        if self.partition_mode == "per_direction":  # sentence-transformers allows q2d, d2q only
            if dirs == {"query_to_doc", "doc_to_query"}:
                if not has_negs:  # CLIP: rows and columns in one sweep
                    return losses.info_nce(queries, docs[0], symmetric=True, **kw).mean()
                rows = (losses.info_nce(queries, docs_all, **kw)
                        + losses.info_nce(docs[0], queries, **kw)) / 2
                return rows.mean()
            return losses.info_nce(queries, docs_all, **kw).mean()

        # "joint": one log-sum-exp per anchor over the union of the selected terms
        d2q, d2d = "doc_to_query" in dirs, "doc_to_doc" in dirs
        if d2d and has_negs and not d2q:
            raise NotImplementedError(
                "tilecl.compat.sentence_transformers: directions with 'doc_to_doc' but without "
                "'doc_to_query' in partition_mode='joint' are supported for (anchor, positive) "
                "pairs only: with negative columns, tilecl's key-key term cannot leave out a "
                "document's own hard negatives. Add 'doc_to_query' (the GTE loss), or drop the "
                "negative columns")
        rows = losses.info_nce(queries, docs_all, query_negatives="query_to_query" in dirs,
                               key_negatives=d2d and not d2q, **kw)
        if d2q:
            # row i: positive document d_i against every query (its positive q_i included once, as
            # in sentence-transformers) and, with doc_to_doc, against the documents of the other
            # anchors: key ids = the anchor a key belongs to; keys with d_i's id leave the row
            off = _row_offset(b, queries, group)
            if d2d:
                keys = torch.cat([queries, docs_all])
                ids = torch.cat([torch.arange(b, device=queries.device),
                                 torch.arange(b, device=queries.device).repeat(len(docs))]) + off
                rows_b = losses.info_nce(docs[0], keys, key_ids=ids, **kw)
            else:
                rows_b = losses.info_nce(docs[0], queries, **kw)
            # both rows are LSE - s(q_i, d_i) with the same positive logit: the joint row is their
            # logaddexp
            rows = torch.logaddexp(rows, rows_b)
        return rows.mean()

    def get_config_dict(self):
        config = super().get_config_dict()
        config["backend"] = self.backend
        return config


class CachedMultipleNegativesRankingLoss(_STCachedMNRL):
    """sentence-transformers ``CachedMultipleNegativesRankingLoss(model, scale=20.0,
    similarity_fct=cos_sim, mini_batch_size=32, mini_batch_num_tokens=None,
    gather_across_devices=False, directions=..., partition_mode="joint",
    show_progress_bar=False, hardness_mode=None, hardness_strength=0.0)``: sentence-transformers'
    GradCache class with its loss stage computed by the tiled ``MultipleNegativesRankingLoss``
    above over the whole batch (no score chunks). ``backend``: a tilecl backend name.
    """

    def __init__(self, model, scale=20.0, similarity_fct=_cos_sim, mini_batch_size=32,
                 mini_batch_num_tokens=None, gather_across_devices=False, directions=_DIRECTIONS,
                 partition_mode="joint", show_progress_bar=False, hardness_mode=None,
                 hardness_strength=0.0, *, backend="auto"):
        if not hasattr(_STCachedMNRL, "forward_cached"):
            raise NotImplementedError(
                "tilecl.compat.sentence_transformers.CachedMultipleNegativesRankingLoss builds on "
                "sentence-transformers' CachedLossMixin (sentence-transformers >= 6); installed: "
                f"{_st.__version__}")
        newer = _newer_kwargs(dict(gather_across_devices=gather_across_devices,
                                   directions=directions, partition_mode=partition_mode,
                                   hardness_mode=hardness_mode,
                                   hardness_strength=hardness_strength))
        if mini_batch_num_tokens is not None:
            newer["mini_batch_num_tokens"] = mini_batch_num_tokens
        super().__init__(model, scale=scale, similarity_fct=similarity_fct,
                         mini_batch_size=mini_batch_size, show_progress_bar=show_progress_bar,
                         **newer)
        # the wrapped loss owns the hyperparameters (sentence-transformers delegates to it)
        self.loss = MultipleNegativesRankingLoss(
            model, scale=scale, similarity_fct=similarity_fct,
            gather_across_devices=gather_across_devices, directions=directions,
            partition_mode=partition_mode, hardness_mode=hardness_mode,
            hardness_strength=hardness_strength, backend=backend)

    @property
    def backend(self):
        return self.loss.backend

    def calculate_loss(self, reps, labels=None, *, with_backward=False):
        """The loss over the whole batch from the per-mini-batch embeddings ``reps[column][mb]``
        (leaves of GradCache's first pass); with ``with_backward`` it back-propagates to them and
        returns the detached value."""
        loss = self.loss.compute_loss_from_embeddings([torch.cat(r) for r in reps], labels)
        if with_backward:
            loss.backward()
            loss = loss.detach()
        return loss

    def get_config_dict(self):
        config = super().get_config_dict()
        config["backend"] = self.backend
        return config


try:
    from sentence_transformers.sentence_transformer.losses import MatryoshkaLoss as _STMatryoshka
except ImportError:  # older releases
    from sentence_transformers.losses import MatryoshkaLoss as _STMatryoshka


class MatryoshkaLoss(_STMatryoshka):
    """sentence-transformers ``MatryoshkaLoss(model, loss, matryoshka_dims,
    matryoshka_weights=None, n_dims_per_step=-1)``. Around tilecl's (non-cached)
    ``MultipleNegativesRankingLoss`` with the default direction it embeds the batch once and
    computes every prefix's loss from ONE sweep of tiles (``tilecl.matryoshka_info_nce``: the
    matmul work of the largest prefix, not of the sum of all prefixes); around any other loss it
    is sentence-transformers' own MatryoshkaLoss (one call of the inner loss per prefix).
    sentence-transformers re-normalizes each truncated prefix, so ``cos_sim`` and ``dot_score``
    give the same prefix logits, as here.
    """

    def _fusable(self):
        inner = self.loss
        return (type(inner) is MultipleNegativesRankingLoss
                and tuple(inner.directions) == _DIRECTIONS and inner.partition_mode == "joint"
                and _group(inner.gather_across_devices) is None
                and not (inner.hardness_mode is not None and inner.hardness_strength > 0))

    def forward(self, sentence_features, labels=None):
        if not self._fusable():
            return super().forward(sentence_features, labels)
        import random

        idx = list(range(len(self.matryoshka_dims)))
        if 0 < self.n_dims_per_step < len(idx):  # the same sampling as sentence-transformers
            idx = sorted(random.sample(idx, self.n_dims_per_step))
        embeddings = _embed(self.model, list(sentence_features))
        if len(embeddings) < 2:
            raise ValueError(f"Expected at least 2 embeddings, got {len(embeddings)}")
        queries, docs = embeddings[0], torch.cat(list(embeddings[1:]))
        return losses.matryoshka_info_nce(
            queries, docs, [self.matryoshka_dims[i] for i in idx],
            weights=[float(self.matryoshka_weights[i]) for i in idx],
            logit_scale=float(self.loss.scale), backend=self.loss.backend)


__all__ = ["MultipleNegativesRankingLoss", "CachedMultipleNegativesRankingLoss", "MatryoshkaLoss"]
