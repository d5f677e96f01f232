"""The one tile template every backend implements (math.md 1.1-1.5, 2.2, 12).

A loss of the family is, from the kernels' point of view, a row block q [N, D] swept against a
column block k [M, D] with

* a logit per pair, either a scaled dot product ``x_ij = alpha_i <q_i, k_j> (+ bias)`` or a
  distance kernel ``x_ij = -alpha_i * d2_ij ** (gamma / 2)`` with ``d2 = |q_i - k_j|^2``
  (math.md 1.4, Kernel-InfoNCE and uniformity);
* an *allowed* set per row: all columns except the excluded one (the self column of single-set
  losses), further split by the positive relation ``Y_ij`` (an explicit positive index, or label
  equality);
* up to two online log-sum-exp accumulators (:class:`SumSpec`), each over all / positive /
  negative allowed columns, with a logit multiplier ``beta`` and optional weights w_ij > 0:
  ``lse^k_i = log sum_j [allowed^k_ij] w_ij exp(beta_k x_ij)`` (math.md 1.1, with a running max
  per accumulator so a positives-only sum never underflows, math.md 4.2);
* optionally the linear statistics of SupCon L_out: ``lin_i = sum_{j in P(i)} x_ij`` and
  ``cnt_i = |P(i)|`` (math.md 4.1);
* optionally SigLIP's elementwise row sum ``sig_i = sum_j softplus(-(2 Y_ij - 1) x_ij)``
  (math.md 2.2);
* optionally the column log-sum-exp ``lse^c_j = log sum_i exp(x_ij)`` of symmetric CLIP (2.1);
* optionally the row's ``topk`` largest logits over its allowed non-positive columns and their
  global column indices (hard-negative mining from the forward pass; no gradient).

The forward returns these per-row statistics only (``[S, N]`` float32, rows in the order of
:meth:`TileSpec.layout`) and the column LSE (``[M]``), and with ``topk`` a third element
``(vals [N, topk], idx [N, topk])``: logits descending, global column indices, padded with
-inf / -1. Nothing N x M is ever stored. Everything
else (positive logits, clamps, reductions) is O(N) PyTorch code in ``_family.py`` that autograd
differentiates; the backward of the template receives ``g = dL/d(stats)`` and forms, tile by tile,

    G_ij = sum_k g^k_i beta_k pi^k_ij + g^lin_i Y_ij + g^sig_i (sigmoid(x_ij) - Y_ij)
           + g^c_j exp(x_ij - lse^c_j),          pi^k_ij = [allowed^k] w_ij exp(beta_k x_ij - lse^k_i)

(math.md 1.2), then the embedding gradients of math.md 1.3 / 1.4 and the scale gradient of 1.5.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import torch

LOGITS = ("dot", "dist")
COLUMNS = ("all", "pos", "neg")
POSITIVES = ("none", "index", "label")
WEIGHTS = ("none", "dense", "lowrank")
MAX_TOPK = 32  # the kernels keep the running top-k list of a row in registers


@dataclasses.dataclass(frozen=True)
class SumSpec:
    """One online log-sum-exp accumulator: ``log sum_{j in cols} w_ij exp(beta x_ij)``."""

    cols: str = "all"  # "all" allowed columns, only "pos"itives, only "neg"atives
    beta: float = 1.0  # logit multiplier (HCL uses 1 + beta and beta, math.md 8.2)
    weighted: bool = False  # multiply by w_ij (CCL-K, math.md 5.2)

    def __post_init__(self):
        if self.cols not in COLUMNS:
            raise ValueError(f"SumSpec.cols must be one of {COLUMNS}, got {self.cols!r}")


@dataclasses.dataclass(frozen=True)
class TileSpec:
    """Compile-time flags of the template (constexprs in Triton, template parameters in C++)."""

    logit: str = "dot"
    gamma: float = 2.0  # distance exponent (logit == "dist")
    positive: str = "none"  # how Y_ij is defined
    sums: tuple = ()  # tuple[SumSpec, ...], at most 2
    lin: bool = False  # SupCon L_out linear statistics (sum of positive logits, count)
    sigmoid: bool = False  # SigLIP row sums of softplus
    col_lse: bool = False  # column LSE over all allowed rows (symmetric CLIP)
    weight: str = "none"  # where w_ij comes from
    weight_clip: float = 0.0  # w_ij < weight_clip counts as 0 (CCL-K clips below 1e-6)
    threshold: bool = False  # non-positive columns with x_ij > thresh_i leave every sum (false
    #                          negatives, NV-Retriever / Qwen3-Embedding)
    topk: int = 0  # stream the row's topk largest logits over allowed non-positive columns

    def __post_init__(self):
        if self.logit not in LOGITS:
            raise ValueError(f"TileSpec.logit must be one of {LOGITS}")
        if self.positive not in POSITIVES:
            raise ValueError(f"TileSpec.positive must be one of {POSITIVES}")
        if self.weight not in WEIGHTS:
            raise ValueError(f"TileSpec.weight must be one of {WEIGHTS}")
        if len(self.sums) > 2:
            raise ValueError("the template streams at most two log-sum accumulators")
        needs_y = self.lin or self.sigmoid or any(s.cols != "all" for s in self.sums)
        if needs_y and self.positive == "none":
            raise ValueError("positive/negative columns need TileSpec.positive")
        if self.threshold and self.positive == "none":
            raise ValueError("TileSpec.threshold spares the positive: it needs TileSpec.positive")
        if any(s.weighted for s in self.sums) and self.weight == "none":
            raise ValueError("a weighted sum needs TileSpec.weight")
        if not 0 <= self.topk <= MAX_TOPK:
            raise ValueError(f"TileSpec.topk must be in [0, {MAX_TOPK}], got {self.topk}")

    # row layout of the statistics tensor: lse^1..lse^K, [lin, cnt], [sig]
    @property
    def n_stats(self) -> int:
        return len(self.sums) + 2 * self.lin + self.sigmoid

    @property
    def i_lin(self) -> int:
        return len(self.sums)

    @property
    def i_cnt(self) -> int:
        return len(self.sums) + 1

    @property
    def i_sig(self) -> int:
        return len(self.sums) + 2 * self.lin

    def key(self) -> str:
        """The one text encoding of the spec: the custom ops' ``spec`` argument, the native
        dispatch (parsed by csrc/bindings.cpp) and the ring handshake all use it.

        ``name=value`` pairs in field order, ``;``-separated; ``sums`` is a ``,``-separated list of
        ``cols:beta:weighted``; booleans are 0 / 1, floats their ``repr`` (exact round trip). Plain
        string formatting, so torch.compile folds it to a constant. Inverse: :func:`spec_from_key`.
        """
        sums = ",".join([f"{s.cols}:{float(s.beta)!r}:{int(bool(s.weighted))}" for s in self.sums])
        return (f"logit={self.logit};gamma={float(self.gamma)!r};positive={self.positive};"
                f"sums={sums};lin={int(bool(self.lin))};sigmoid={int(bool(self.sigmoid))};"
                f"col_lse={int(bool(self.col_lse))};weight={self.weight};"
                f"weight_clip={float(self.weight_clip)!r};threshold={int(bool(self.threshold))};"
                f"topk={int(self.topk)}")

    def stat_kinds(self) -> list:
        """How each statistic row merges across column blocks: "lse" (logaddexp) or "add"."""
        return ["lse"] * len(self.sums) + ["add", "add"] * self.lin + ["add"] * self.sigmoid


_FLAG_FIELDS = ("lin", "sigmoid", "col_lse", "threshold")


@functools.lru_cache(maxsize=256)
def spec_from_key(key: str) -> TileSpec:
    """The TileSpec of :meth:`TileSpec.key` (validated again by its constructor)."""
    fields = dict(item.split("=", 1) for item in key.split(";"))
    sums = tuple(SumSpec(c, float(b), w == "1")
                 for c, b, w in (x.split(":") for x in fields.pop("sums").split(",") if x))
    return TileSpec(logit=fields["logit"], gamma=float(fields["gamma"]),
                    positive=fields["positive"], sums=sums, weight=fields["weight"],
                    weight_clip=float(fields["weight_clip"]), topk=int(fields["topk"]),
                    **{f: fields[f] == "1" for f in _FLAG_FIELDS})


# The side tensors in the order every custom op takes them (then ``int col_offset``).
AUX_FIELDS = ("excl", "pos", "labels_q", "labels_k", "weight", "wa", "wb", "thresh")


@dataclasses.dataclass
class TileAux:
    """Per-row / per-column side data of one (row block, column block) problem. No gradients.

    Column indices are *global*: column j of the block is global column ``col_offset + j``, and
    ``excl`` / ``pos`` name global columns (-1 = none). This is what lets the ring exchange feed
    the same kernels with a visiting block.
    """

    excl: Optional[torch.Tensor] = None  # [N] int64: column excluded from every sum (self)
    pos: Optional[torch.Tensor] = None  # [N] int64: positive column (positive == "index")
    labels_q: Optional[torch.Tensor] = None  # [N] int64 (positive == "label")
    labels_k: Optional[torch.Tensor] = None  # [M] int64
    weight: Optional[torch.Tensor] = None  # [N, Mw]: w_ij = weight[i, col mod Mw] ("dense")
    wa: Optional[torch.Tensor] = None  # [N, r]: w_ij = <wa_i, wb_j> ("lowrank")
    wb: Optional[torch.Tensor] = None  # [M, r]
    thresh: Optional[torch.Tensor] = None  # [N]: a column with x_ij > thresh_i is dropped ("threshold")
    col_offset: int = 0

    def tensors(self) -> tuple:
        """The side tensors in :data:`AUX_FIELDS` order (the one packing; None where absent)."""
        return (self.excl, self.pos, self.labels_q, self.labels_k, self.weight, self.wa, self.wb,
                self.thresh)

    @classmethod
    def from_tensors(cls, tensors, col_offset: int = 0) -> "TileAux":
        """Inverse of :meth:`tensors`."""
        return cls(*tensors, col_offset=int(col_offset))

    def with_columns(self, labels_k=None, wb=None, col_offset=0) -> "TileAux":
        """The same rows against another column block (used by the ring)."""
        return dataclasses.replace(self, labels_k=labels_k, wb=wb, col_offset=col_offset)


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """Accumulation / statistics dtype of the contract: fp32 for fp32, fp16 and bf16 inputs;
    float64 stays float64 (gradcheck, golden cases)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def merge_stats(spec: TileSpec, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Merge the [S, N] statistics of the same rows against two disjoint column blocks."""
    out = torch.empty_like(a)
    for r, kind in enumerate(spec.stat_kinds()):
        out[r] = torch.logaddexp(a[r], b[r]) if kind == "lse" else a[r] + b[r]
    return out


def empty_stats(spec: TileSpec, n: int, device, dtype=torch.float32) -> torch.Tensor:
    """Statistics of rows against no column at all (lse = -inf, sums = 0)."""
    out = torch.zeros(spec.n_stats, n, dtype=dtype, device=device)
    out[: len(spec.sums)] = float("-inf")
    return out


def empty_topk(n: int, topk: int, device, dtype=torch.float32) -> tuple:
    """The top-k list of rows against no column: logits -inf, indices -1."""
    return (torch.full((n, topk), float("-inf"), dtype=dtype, device=device),
            torch.full((n, topk), -1, dtype=torch.int64, device=device))


def merge_topk(a: tuple, b: tuple) -> tuple:
    """Merge two (vals [N, k], idx [N, k]) top-k lists of the same rows (disjoint columns)."""
    k = a[0].shape[1]
    vals = torch.cat([a[0], b[0].to(a[0].dtype)], 1)
    idx = torch.cat([a[1], b[1]], 1)
    top, where = vals.topk(k, dim=1)
    return top, idx.gather(1, where).masked_fill(torch.isneginf(top), -1)
