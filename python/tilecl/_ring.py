"""Column sources of the tile Function: where the column blocks a rank's rows meet come from.

``_autograd.TileStatsFunction`` sweeps its rows against the blocks a source yields, forward and
backward, with the same backend calls whatever the source:

* :class:`Local` (one process): the rows' own columns, one block; W = 1.
* :class:`RingColumns` (``group=`` with W > 1 ranks): at step s = 0..W-1 rank r holds the
  column block of rank b = (r - s) mod W with what travels with it (labels_k, low-rank weight
  factors wb, and backward the block's column LSE and its upstream gradient). While the rows
  meet block b, the block is already on its way to rank r + 1 and block b - 1 on its way in
  from r - 1 (double buffering). What belongs to a block's columns follows it one hop behind
  and arrives home complete after W hops: the partial column LSE [m_b] forward (symmetric CLIP,
  math.md 2.1), the fp32 dk accumulator [m_b, D] backward (math.md 1.3, 11). Step 0 is the
  rank's own block (``local``): the positive pair's columns are there.

A source calls ``visit`` once per non-empty block and does the communication; the Function does
the arithmetic. Peak memory per rank under the ring: the local shard, two visiting blocks and two
accumulators, independent of W (distributed.py, "Ring").
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ._spec import TileAux, TileSpec

_TAG_DATA, _TAG_ACC = 0, 16  # gloo matches point-to-point messages by (peer, tag)


class Ring:
    """Point-to-point ring over any process group: send to rank + 1, receive from rank - 1."""

    def __init__(self, group=None):
        self.group = dist.group.WORLD if group is None else group
        self.rank = dist.get_rank(self.group)
        self.world = dist.get_world_size(self.group)
        self.next = dist.get_global_rank(self.group, (self.rank + 1) % self.world)
        self.prev = dist.get_global_rank(self.group, (self.rank - 1) % self.world)

    def send_recv(self, send, recv, tag=_TAG_DATA):
        """Post ``send`` (list of tensors) to the next rank and receive ``recv`` (pre-allocated,
        same order) from the previous one; returns the pending works. Empty tensors are skipped
        on both sides (both know the sizes). A one-rank ring just copies."""
        if self.world == 1:
            for s, r in zip(send, recv):
                r.copy_(s)
            return []
        ops = [dist.P2POp(dist.isend, t, self.next, self.group, tag + i)
               for i, t in enumerate(send) if t.numel()]
        ops += [dist.P2POp(dist.irecv, t, self.prev, self.group, tag + i)
                for i, t in enumerate(recv) if t.numel()]
        return dist.batch_isend_irecv(ops) if ops else []

    @staticmethod
    def wait(works):
        for w in works:
            w.wait()


class Local:
    """One process: the rows against their own columns, one block (a ring of W = 1)."""

    world = 1

    def forward(self, spec: TileSpec, k, aux: TileAux, n: int, cdt, visit):
        """visit(k, aux, local=True) -> the block's column LSE or None; returns it."""
        return visit(k, aux, True)

    def backward(self, spec: TileSpec, k, aux: TileAux, col, g_col, n: int, send_dk: bool, cdt,
                 visit):
        """visit(k, aux, col, g_col, local=True) -> the block's dk or None; returns it."""
        return visit(k, aux, col, g_col, True)


def _pack(*tensors):
    """The tensors that travel with a column block, in a fixed order (None: absent)."""
    return [t.contiguous() for t in tensors if t is not None]


def _unpack(block, aux: TileAux, col_lse: bool):
    it = iter(block)
    k = next(it)
    labels = next(it) if aux.labels_k is not None else None
    wb = next(it) if aux.wb is not None else None
    col, g_col = (next(it), next(it)) if col_lse else (None, None)
    return k, labels, wb, col, g_col


def _like(block, m):
    """Receive buffers for a block of m columns shaped like ``block``."""
    return [torch.empty((m,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device) for t in block]


class RingColumns:
    """The column blocks of every rank, passed around ``ring`` (see the module doc).

    sizes[b] / offsets[b]: columns and first global column of rank b (from the handshake)."""

    def __init__(self, ring: Ring, sizes, offsets):
        self.ring, self.sizes, self.offsets = ring, list(sizes), list(offsets)
        self.world = ring.world

    def _steps(self, cur):
        """(s, b, the block of rank b, the next block's receive buffers or None, its works)."""
        ring, world = self.ring, self.world
        for s in range(world):
            b = (ring.rank - s) % world
            nxt, work = None, []
            if s < world - 1:  # double buffering: next block in flight during this compute
                nxt = _like(cur, self.sizes[(b - 1) % world])
                work = ring.send_recv(cur, nxt, _TAG_DATA)
            yield s, b, cur
            ring.wait(work)
            if nxt is not None:
                cur = nxt

    def forward(self, spec: TileSpec, k, aux: TileAux, n: int, cdt, visit):
        """Visit every block; with ``spec.col_lse`` return the LSE [M_r] (``cdt``) of the local
        columns over every rank's rows, which came home after W hops."""
        ring, world, dev = self.ring, self.world, k.device
        col_in, col_work = None, []
        for s, b, cur in self._steps(_pack(k, aux.labels_k, aux.wb)):
            kb, labels, wb, _, _ = _unpack(cur, aux, False)
            part_col = None
            if n and kb.shape[0]:
                part_col = visit(kb, aux.with_columns(labels, wb, self.offsets[b]), s == 0)
            if spec.col_lse:  # the block's partial column LSE follows it, one hop behind
                c = (part_col.to(cdt) if part_col is not None
                     else torch.full((kb.shape[0],), float("-inf"), dtype=cdt, device=dev))
                if s > 0:
                    ring.wait(col_work)
                    c = torch.logaddexp(c, col_in)
                col_in = torch.empty(self.sizes[(b - 1) % world], dtype=cdt, device=dev)
                col_out = c  # referenced until its send completes
                col_work = ring.send_recv([col_out], [col_in], _TAG_ACC)
        if not spec.col_lse:
            return None
        ring.wait(col_work)  # after W hops our own columns' LSE is home, complete
        return col_in

    def backward(self, spec: TileSpec, k, aux: TileAux, col, g_col, n: int, send_dk: bool, cdt,
                 visit):
        """Visit every block again (with its column LSE and upstream); visit returns the block's
        dk [m_b, D] in ``cdt`` (or None). Returns the local columns' dk summed over every rank's
        rows, home after W hops (None unless ``send_dk``, which is the same on every rank)."""
        ring, world, dev, d = self.ring, self.world, k.device, k.shape[1]
        acc_in, acc_work = None, []
        for s, b, cur in self._steps(_pack(k, aux.labels_k, aux.wb, col, g_col)):
            kb, labels, wb, colb, gcolb = _unpack(cur, aux, spec.col_lse)
            dk = None
            if n and kb.shape[0]:
                dk = visit(kb, aux.with_columns(labels, wb, self.offsets[b]), colb, gcolb, s == 0)
            if send_dk:  # the block's dk accumulator follows it and comes home complete
                dk = (dk.to(cdt) if dk is not None
                      else torch.zeros(kb.shape[0], d, dtype=cdt, device=dev))
                if s > 0:
                    ring.wait(acc_work)
                    dk.add_(acc_in)
                acc_in = torch.empty(self.sizes[(b - 1) % world], d, dtype=cdt, device=dev)
                acc_out = dk  # referenced until its send completes
                acc_work = ring.send_recv([acc_out], [acc_in], _TAG_ACC)
        if not send_dk:
            return None
        ring.wait(acc_work)
        return acc_in
