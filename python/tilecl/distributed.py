"""Ring exchange: the loss family across ranks without ever gathering the global batch.

Each rank passes its local shard (any size, zero included) to a public loss with ``group=``;
``_family.py`` calls the hooks below, which are only used when the group has more than one rank.

Ring (math.md 1.1-1.5, 2.1, 11)
    Rank r keeps its rows q_r and at step s = 0..W-1 holds the column block k_b of rank
    b = (r - s) mod W, together with what travels with it (labels_k, low-rank weight factors
    wb, the block's column offset). While the tile backend merges its rows' statistics with
    block b, the block is already on its way to rank r+1 and block b-1 on its way in from r-1
    (``Ring.send_recv`` over ``batch_isend_irecv``: double buffering). Forward of symmetric
    CLIP also needs the LSE of every local column over ALL global rows: a partial column LSE
    [m_b] (fp32) travels with block b, each rank merges its rows' contribution, and one last
    hop brings it home complete. Backward passes the blocks again (with their column LSE and
    its upstream gradient for CLIP) plus an fp32 dk accumulator that follows the same path
    and arrives home complete; dq and dalpha / dbias are local sums over the W blocks. The
    accumulator hops are posted after a block's compute and waited after the next block's
    compute, so they overlap too. Blocks travel in the input dtype (bf16 stays bf16);
    statistics and gradient accumulators are fp32 (float64 for float64 inputs). Peak memory
    per rank: the local shard plus two visiting blocks and two accumulators, independent of W.

    Before the ring, every rank all-gathers a small int64 header (rows, columns, D, dtypes, a
    CRC of the TileSpec, which side data is present, requires_grad flags, column offset, and
    every scalar option of the call: the 0-dim logit scale, the bias and the loss's own options,
    numbers as float64 bit patterns, names and strings as a CRC) and every rank raises the same
    RuntimeError if the calls do not match (numbers: beyond a relative 1e-6), naming the fields
    and each rank's value: no hang, no silent wrong result. A rank that dies makes the others
    fail at the process group's timeout.

Global batch and ordering
    Columns (and rows) are concatenated rank by rank: global column ``column_offset(m_r) + j``
    is column j of rank r. Single-set losses build ``[z1; z2]`` per rank (``supcon``: the
    rank's view-major ``[V*B_r]``), so the global sample set is the concatenation over ranks of
    each rank's local set, positives stay on their rank. These losses are invariant under a
    permutation of the samples, so this equals one process calling the loss on
    ``(cat_r z1_r, cat_r z2_r)`` (``supcon``: ``cat_r features_r`` along B). ``info_nce``
    (M > N extra keys) pairs query i of rank r with its LOCAL key i (or ``positive_index``,
    an index into the rank's local keys); the global positive is key ``offset_r + i``.
    ``symmetric`` / ``clip_loss`` and diagonal SigLIP need the same row count for images and
    texts on each rank. ``reduction="none"`` returns the rank's own rows.

Losses with global knowledge beyond these hooks
    Global counts (NT-Xent / SupCon / HCL denominators, HCL's N_neg), SupCon L_in positive
    counts (``all_gather_1d`` of the labels) and the uniformity LSE are global. DCLW's
    positive weights ``2 - B softmax_k(<z1_k, z2_k> / sigma)`` stay LOCAL to the rank (B = its
    own batch), lightly's convention: DCLW under the ring is not the single-process DCLW of
    the global batch (unweighted DCL is). CCL-K (``cclk_loss``) and ``decoupled_uniformity``
    with a prior need the whole batch (dense B x B solves) and stay single-process.

Gradient contract
    Under DDP, which averages parameter gradients over the W ranks, every parameter gradient
    (the learnable temperature / logit scale and the SigLIP bias included) equals that of one
    process training on the concatenated global batch, and the returned loss (``"mean"`` /
    ``"sum"``, and ``uniformity``) is the global loss on every rank. How: the global loss is
    L = sum over ranks of the local rows' terms. ``reduce_rows`` / ``logsumexp_all`` return L
    on every rank and their backward hands each rank W x dL/d(its rows), assuming the upstream
    gradient of L is the same on every rank (``loss.backward()``, AMP loss scaling). From
    there every rank's backward is W x its share of the global gradient: dq of its rows is
    complete (every block visits); dk of its columns sums the contributions of all ranks' rows
    (the accumulator comes home); dalpha / dbias and the O(N) epilogue terms (positive logits,
    SupCon prefactor) cover its rows only, and the shares add up over ranks. So every rank's
    input gradient is W x dL/d(local inputs), each replicated parameter gets W x its share,
    and DDP's mean gives exactly dL/dtheta. With ``reduction="none"`` there is no factor: the
    gradient is that of sum_r (rank r's objective of its rows), which DDP then averages.
    Every rank must call the loss and its backward (the backward is a ring, too).

Scaling plan for 8 and 64 GPUs
    Notation: W ranks, B rows per rank (CLIP: B images and B texts), D features, e bytes per
    element (bf16: 2), F sustained tile-kernel throughput (H100 bf16, fused kernel: about
    400 TFLOP/s), BW per-GPU point-to-point bandwidth (NVLink 4 about 350 GB/s; InfiniBand
    NDR, one 400 Gb/s NIC per GPU, about 45 GB/s).
    Bytes sent per rank per training step:
      forward   (W-1) B D e            (+ 8 B labels, + 4 W B column-LSE partials for CLIP)
      backward  (W-1) B D e + W B D 4  (blocks again + fp32 dk accumulator, + 8 W B for CLIP)
      total    ~ W B D (2e + 4) = 8 W B D bytes for bf16.
    Compute per ring step: forward 2 B^2 D flops, backward 6 B^2 D (recompute, dq, dk).
    Communication of a step is hidden when 2 B^2 D / F >= B D e / BW (forward) and
    6 B^2 D / F >= B D (e + 4) / BW (backward): for bf16 both read B >= F / BW, independent
    of D. NVLink: B >= ~1.1k rows per GPU; InfiniBand: B >= ~9k. Below that, and below the
    per-step latency floor (~20 us of launch and p2p handshake: 2 B^2 D / F >= 20 us, i.e.
    B >= ~2k at D = 1024), the ring stops hiding communication; the exposed time grows with W
    because there are W steps.
    8 GPUs, one NVLink node, B = 4096, D = 1024, bf16: a block is 8.4 MB, the fp32
    accumulator 16.8 MB; per rank 59 MB forward + 193 MB backward = 252 MB per step. Per ring
    step compute 86 us forward / 258 us backward vs transfer 24 us / 72 us: fully hidden
    (about 3.5x headroom); loss cost ~ 8 x 86 + 8 x 258 us = 2.8 ms per step.
    64 GPUs, 8 nodes x 8, flat ring in node-major order, same B and D: per rank 0.53 GB
    forward + 1.6 GB backward per step. The ring runs in lock step, so every step waits for
    the 8 hops that cross InfiniBand: 186 us forward / 560 us backward per step vs 86 / 258 us
    of compute, i.e. about 48 ms of communication vs 22 ms of compute: exposed. The flat ring
    hides it again only from B ~ 9k rows per GPU (compute grows as B^2, traffic as B).
    Versus the Inf-CL paper (Cheng et al. 2024, "Breaking the Memory Barrier", abstract and
    Fig. 3 caption): its multi-level tiling is a ring across GPUs at the coarse level, with
    computation overlapped with the column-block communication (what this module does), plus
    fused tiles on the CUDA cores inside each GPU (the tile backends here). A flat ring over
    64 GPUs drives one NIC per node and puts 63 lock-step IB transfers on the critical path.
    The node-aware two-level ring is the fix: an inner ring over the 8 GPUs of a node
    (NVLink) inside an outer ring over nodes, each GPU forwarding its block to the same local
    rank of the next node through its own NIC. One outer hop (one block per GPU over IB, all
    8 NICs busy) then hides behind 8 inner steps of compute: 16 B^2 D / F >= B D e / BW_IB,
    i.e. B >= ~1.1k, an 8x lower threshold; the bytes per rank are unchanged, but only 7 IB
    transfers instead of 63 sit on the critical path. Not implemented here; ``Ring`` takes
    any process group, so the inner and outer rings can be built from ``dist.new_group``.
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.distributed as dist

from ._autograd import tile_stats
from ._ring import Ring, RingColumns
from ._spec import TileAux, TileSpec

_DTYPES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4, torch.int64: 5}


def _group(group):
    return dist.group.WORLD if group is None else group


def _comm_device(group):
    """Device for small control tensors: CUDA under NCCL, CPU otherwise."""
    if "nccl" in str(dist.get_backend(_group(group))).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---- size / header exchange ----------------------------------------------------------------------

def _gather_ints(values, group, device=None):
    """All-gather a short list of ints from every rank: [W, len(values)] int64 (CPU)."""
    group = _group(group)
    device = device if device is not None else _comm_device(group)
    mine = torch.tensor(values, dtype=torch.int64, device=device)
    out = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, mine, group=group)
    return torch.stack(out).cpu()


def column_offset(m_local: int, group) -> int:
    """Global index of this rank's first column (columns are concatenated rank by rank)."""
    sizes = _gather_ints([m_local], group)[:, 0]
    return int(sizes[: dist.get_rank(_group(group))].sum())


def global_count(n_local: int, group) -> int:
    """Sum of ``n_local`` over the ranks of ``group``."""
    return int(_gather_ints([n_local], group)[:, 0].sum())


def all_gather_1d(t: torch.Tensor, group) -> torch.Tensor:
    """Concatenation over ranks of a 1-D tensor of any length (labels); no gradient."""
    group = _group(group)
    sizes = _gather_ints([t.numel()], group)[:, 0].tolist()
    buf = torch.zeros(max(sizes), dtype=t.dtype, device=_comm_device(group))
    buf[: t.numel()] = t.detach().reshape(-1)
    out = [torch.empty_like(buf) for _ in sizes]
    dist.all_gather(out, buf, group=group)
    return torch.cat([o[:s] for o, s in zip(out, sizes)]).to(t.device)


_FIELDS = ("rows", "columns", "D (key)", "D (query)", "query dtype", "key dtype", "loss spec",
           "alpha dims", "bias", "labels_k", "wb columns", "wb dtype",
           "requires_grad bits (q, k, alpha, bias)",
           "row side data", "column offset", "options")
_MUST_MATCH = (2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 15)
_N_VALUES = 12  # header slots for the numeric options of one call (float64 bits, zero padded)
_RTOL = 1e-6  # relative tolerance of numeric options across ranks (float noise)
_SCALE_NAME = "logit scale (logit_scale, t, or 1 / temperature)"


def _code(dtype):
    return _DTYPES.get(dtype, zlib.crc32(str(dtype).encode()))


def _is_number(v):
    return isinstance(v, (bool, int, float))


def _call_options(alpha, bias, options):
    """Every scalar that defines the loss of this call: the logit scale (unless per anchor: one
    per row legitimately differs across ranks), the bias, and the loss's own options
    (name -> number, bool, str, tuple or None)."""
    opts = dict(options or {})
    if alpha.dim() == 0:
        opts[_SCALE_NAME] = float(alpha.detach())
    if bias is not None:
        opts["logit_bias"] = float(bias.detach())
    return opts


def _pack_options(opts):
    """(CRC of the names and of the non-numeric values, the numeric values as int64 bit
    patterns, padded to _N_VALUES), numeric values in name order."""
    items = sorted(opts.items())
    nums = [float(v) for _, v in items if _is_number(v)]
    if len(nums) > _N_VALUES:
        raise ValueError(f"tilecl ring: at most {_N_VALUES} numeric options per call, got "
                         f"{len(nums)}")
    key = repr([(k, "<number>" if _is_number(v) else v) for k, v in items])
    bits = torch.tensor(nums + [0.0] * (_N_VALUES - len(nums)), dtype=torch.float64)
    return zlib.crc32(key.encode()), bits.view(torch.int64).tolist()


def _close(a, b):
    return a == b or (math.isnan(a) and math.isnan(b)) or abs(a - b) <= _RTOL * max(abs(a), abs(b))


def _option_mismatch(ring: Ring, opts):
    """Names and per-rank values of the options that differ. Every rank calls this at the
    same point (the decision comes from the gathered header), so the object all-gather that
    fetches readable values of every rank cannot hang; it only runs on the error path."""
    every = [None] * ring.world
    dist.all_gather_object(every, opts, group=ring.group)
    parts = []
    for name in sorted(set().union(*every)):
        if all(name in o for o in every):
            vals = [o[name] for o in every]
            v0 = vals[0]
            if all(_close(float(v), float(v0)) if _is_number(v) and _is_number(v0) else v == v0
                   for v in vals):
                continue
        shown = [repr(o[name]) if name in o else "(not given)" for o in every]
        parts.append(f"{name}: " + ", ".join(f"rank {r}={v}" for r, v in enumerate(shown)))
    return parts or ["options: the ranks disagree"]


def _handshake(ring: Ring, spec: TileSpec, q, k, alpha, bias, aux: TileAux, options=None):
    """Exchange sizes, a header and the call's scalar options in ONE all-gather; raise the same
    clear error on every rank on a mismatch (numeric options: relative tolerance 1e-6).

    Returns (columns per rank, column offsets per rank)."""
    grad = torch.is_grad_enabled()
    flags = sum(int(grad and t is not None and t.requires_grad) << i
                for i, t in enumerate((q, k, alpha, bias)))
    rowside = sum(int(t is not None) << i
                  for i, t in enumerate((aux.excl, aux.pos, aux.labels_q, aux.weight, aux.wa)))
    opts = _call_options(alpha, bias, options)
    names_crc, values = _pack_options(opts)
    header = [q.shape[0], k.shape[0], k.shape[1], q.shape[1], _code(q.dtype), _code(k.dtype),
              zlib.crc32(spec.key().encode()), alpha.dim(), int(bias is not None),
              int(aux.labels_k is not None), -1 if aux.wb is None else aux.wb.shape[1],
              0 if aux.wb is None else _code(aux.wb.dtype), flags, rowside, aux.col_offset,
              names_crc] + values
    table = _gather_ints(header, ring.group)
    nf = len(_FIELDS)
    bad = [f for f in _MUST_MATCH if bool((table[:, f] != table[0, f]).any())]
    sizes = table[:, 1].tolist()
    offsets = [sum(sizes[:b]) for b in range(ring.world)]
    if not bad and table[:, 14].tolist() != offsets:
        bad = [14]
    vals = table[:, nf:].contiguous().view(torch.float64).tolist()
    values_differ = any(not _close(v, v0) for row in vals for v, v0 in zip(row, vals[0]))
    if bad or values_differ:
        what = [f"{_FIELDS[f]}: " + ", ".join(f"rank {r}={int(table[r, f])}"
                                              for r in range(ring.world))
                for f in bad if f != 15]
        if values_differ or 15 in bad:
            what += _option_mismatch(ring, opts)
        raise RuntimeError("tilecl ring: mismatched loss call across ranks (every rank must call "
                           f"the same loss with the same D, dtype, options and requires_grad "
                           f"pattern, and the column offsets of column_offset()): "
                           f"{'; '.join(what)}")
    if q.shape[1] != k.shape[1]:
        raise RuntimeError(f"tilecl ring: query D={q.shape[1]} differs from key D={k.shape[1]}")
    return sizes, offsets


# ---- the ring through the tile Function ---------------------------------------------------------

def ring_tile_stats(spec: TileSpec, q, k, alpha, bias=None, aux: TileAux = None, backend="torch",
                    group=None, options=None, pos=None):
    """Statistics of the local rows q [N_r, D] against ALL columns (every rank's k [M_r, D]).

    aux: row-side fields for the local rows (excl / pos as GLOBAL column indices); labels_k /
    wb for the local columns, which travel with them; ``aux.col_offset`` must be
    ``column_offset(M_r, group)``. alpha: 0-dim or [N_r]; bias: 0-dim or None.
    Returns (stats [S, N_r] fp32, col_lse [M_r] of the local columns over all global rows when
    ``spec.col_lse``, else an empty tensor, s_pos [N_r] (empty without ``pos``)) and, with
    ``spec.topk``, the rows' hardest negatives
    over all ranks' columns (vals, global idx; see ``_spec.py``). Differentiable in q, k, alpha
    and bias; every rank must call it (and its backward) with matching arguments.
    options: the loss's scalar options outside the TileSpec (name -> number, bool, str, tuple
    or None; the public argument names), checked across ranks with a 0-dim alpha and the bias.
    pos: [N_r] LOCAL column of each row's positive (or None): then the third element is s_pos_i =
    alpha_i <q_i, k_pos(i)>, differentiable, its gradient added inside the Function (as in one
    process); the tuple is that of ``_autograd.tile_stats``.
    """
    aux = aux or TileAux()
    ring = Ring(group)
    sizes, offsets = _handshake(ring, spec, q, k, alpha, bias, aux, options)
    return tile_stats(spec, q, k, alpha, bias, aux, backend, pos, RingColumns(ring, sizes, offsets))


# ---- O(N) global epilogues ---------------------------------------------------------------------

class _ReduceRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, scale, group):
        total = rows.sum().detach().to(_comm_device(group))
        dist.all_reduce(total, group=group)
        total = total.to(rows.device)
        ctx.factor = dist.get_world_size(group) * scale  # W x (gradient contract)
        ctx.shape = rows.shape
        return total * scale

    @staticmethod
    def backward(ctx, g):
        return (g * ctx.factor).expand(ctx.shape).clone(), None, None


def reduce_rows(rows: torch.Tensor, reduction: str, denom, group) -> torch.Tensor:
    """Global "sum" of the per-row terms of every rank (divided by the GLOBAL ``denom`` for
    "mean"), the same 0-dim value on every rank. Backward: W x the local share (module doc)."""
    group = _group(group)
    scale = 1.0 if reduction == "sum" else 1.0 / denom
    return _ReduceRows.apply(rows, scale, group)


class _LogSumExpAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, lse, group):
        world = dist.get_world_size(group)
        local = torch.logsumexp(lse.detach(), 0).reshape(1).to(_comm_device(group))  # -inf if empty
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local, group=group)
        total = torch.logsumexp(torch.cat(parts), 0).to(lse.device)
        ctx.save_for_backward(lse, total)
        ctx.world = world
        return total

    @staticmethod
    def backward(ctx, g):
        lse, total = ctx.saved_tensors
        if torch.isneginf(total):
            return torch.zeros_like(lse), None
        return g * ctx.world * torch.exp(lse - total), None


def logsumexp_all(lse: torch.Tensor, group) -> torch.Tensor:
    """log sum over ALL ranks' entries of exp(lse) (lse [N_r], N_r may be 0), 0-dim, on every
    rank; backward gives W x the local share (module doc)."""
    return _LogSumExpAll.apply(lse, _group(group))
