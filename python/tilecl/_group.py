"""The ranks a loss runs over, as one object: the loss layer calls its methods and never asks
how many ranks there are.

``as_group(group)`` is :class:`Local` for ``group=None`` (and for a one-rank process group):
every method is the plain single-process operation. Otherwise it is :class:`Ranks`, whose
methods are the ring's and the global epilogues' of ``distributed.py`` (math.md 11): the tile
statistics over every rank's columns, global counts and reductions with the gradient contract
described there.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import distributed
from ._autograd import tile_stats


class Local:
    """One process (W = 1)."""

    world = 1
    local = True  # the columns never leave this process (inputs may be cast once up front)

    def tile_stats(self, spec, q, k, alpha, bias, aux, backend, pos=None, options=None):
        """(stats, col_lse, s_pos[, top]) of ``_autograd.tile_stats``."""
        return tile_stats(spec, q, k, alpha, bias, aux, backend, pos)

    def column_offset(self, m_local: int) -> int:
        """Global index of this rank's first column."""
        return 0

    def count(self, n_local: int) -> int:
        """The global number of rows."""
        return n_local

    def reduce(self, rows, reduction: str, denom):
        """'sum' / 'mean' (over the global ``denom``) of the rows of every rank."""
        total = rows.sum()
        return total if reduction == "sum" else total / denom

    def sum(self, t):
        """Differentiable sum of ``t`` over the ranks."""
        return t

    def sum_(self, t):
        """In-place sum of ``t`` over the ranks, without gradient."""
        return t

    def gather_1d(self, t):
        """The concatenation over ranks of a 1-D tensor (no gradient)."""
        return t

    def logsumexp(self, lse):
        """log sum over every rank's entries of exp(lse), 0-dim."""
        return torch.logsumexp(lse, 0)


class Ranks:
    """The W > 1 ranks of a torch.distributed process group (the ring exchange)."""

    local = False  # column blocks travel between ranks in the input dtype

    def __init__(self, group):
        self.group = group
        self.world = dist.get_world_size(group)

    def tile_stats(self, spec, q, k, alpha, bias, aux, backend, pos=None, options=None):
        return distributed.ring_tile_stats(spec, q, k, alpha, bias, aux, backend, self.group,
                                           options, pos)

    def column_offset(self, m_local: int) -> int:
        return distributed.column_offset(m_local, self.group)

    def count(self, n_local: int) -> int:
        return distributed.global_count(n_local, self.group)

    def reduce(self, rows, reduction: str, denom):
        return distributed.reduce_rows(rows, reduction, denom, self.group)

    def sum(self, t):
        from torch.distributed.nn.functional import all_reduce  # imports torch's autograd ops

        return all_reduce(t, group=self.group)

    def sum_(self, t):
        dist.all_reduce(t, group=self.group)
        return t

    def gather_1d(self, t):
        return distributed.all_gather_1d(t, self.group)

    def logsumexp(self, lse):
        return distributed.logsumexp_all(lse, self.group)


def as_group(group):
    """The group object of a loss's ``group`` argument (None: this process alone)."""
    if isinstance(group, (Local, Ranks)):
        return group
    if group is None or dist.get_world_size(group) == 1:
        return Local()
    return Ranks(group)
