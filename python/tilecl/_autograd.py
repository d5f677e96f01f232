"""Autograd wrapper of the tile template: one Function for the whole loss family.

``tile_stats`` returns the per-row statistics [S, N] and the column LSE [M] of q against k, and
optionally the positive logits s_pos_i = alpha_i <q_i, k_pos(i)>; its backward asks the chosen
backend to recompute the tiles (math.md 1.2). The positive pair is an O(N d) gather outside the
tile loop, but inside the Function (math.md 1.3): its gradient b_i k_pos(i) is added to the
backend's fp32 dq / dk before they are rounded to the input dtype, so the near-cancellation of
P_pos - 1 late in training never happens in fp16 / bf16 (a backend with ``backward_final``
does the same chunk by chunk, in bounded memory). The loss-specific epilogue
(``_family.py``) is O(N) PyTorch code on top, differentiated by autograd.
"""

from __future__ import annotations

import torch

from . import _backends
from ._checks import autocast_off
from ._ring import Local
from ._spec import TileAux, TileSpec, compute_dtype, empty_stats, empty_topk, merge_stats, merge_topk


class TileStatsFunction(torch.autograd.Function):
    """The one Function of the family: rows q against the column blocks of ``columns`` (one
    process: ``_ring.Local``, its own k; ``group=``: ``_ring.RingColumns``, every rank's)."""

    @staticmethod
    def forward(ctx, q, k, alpha, bias, spec: TileSpec, aux: TileAux, backend: str, pos, columns):
        ctx.single_set = k is None  # z against itself: dz = dq + dk, summed before rounding
        k = q if k is None else k  # (one tensor input: torch.compile traces no duplicate inputs)
        impl = _backends.get(backend)
        n, cdt = q.shape[0], compute_dtype(q)
        fused = None  # SigLIP on triton, one process: the forward runs the dq pass as well
        with_dq = impl.forward_with_dq
        if (with_dq is not None and columns.world == 1 and pos is None and not ctx.single_set
                and ctx.needs_input_grad[0]):
            fused = with_dq(spec, q, k, alpha, bias, aux)
        top = None
        if fused is not None:
            stats, saved_dq = fused
            col = None
        else:
            seen = {}

            def visit(kb, aux_b, local):
                part, part_col, *ptop = impl.forward(spec, q, kb, alpha, bias, aux_b)
                if spec.topk and not ptop:
                    raise ValueError(f"backend {backend!r} does not stream top-k negatives "
                                     f"(spec.topk)")
                old = seen.get("stats")
                seen["stats"] = part if old is None else merge_stats(spec, old, part.to(cdt))
                if spec.topk:
                    seen["top"] = ptop[0] if "top" not in seen else merge_topk(seen["top"], ptop[0])
                return part_col

            col = columns.forward(spec, k, aux, n, cdt, visit)
            stats = seen.get("stats")
            if stats is None:  # no column block met these rows (an empty shard under the ring)
                stats = empty_stats(spec, n, q.device, cdt)
            top = seen.get("top") if spec.topk else None
            if spec.topk and top is None:
                top = empty_topk(n, spec.topk, q.device, cdt)
        ctx.fused_dq = fused is not None
        if col is None:
            col = stats.new_zeros(0)
        top_vals, top_idx = top if top is not None else (stats.new_zeros(0),
                                                         col.new_zeros(0).long())
        ctx.pos = pos
        s_pos = stats.new_zeros(0)
        if pos is not None:  # alpha_i <q_i, k_pos(i)> (or -alpha_i |q_i - k_pos(i)|^gamma)
            s_pos = _positive_logits(q, k, pos, stats.dtype, spec) * alpha.to(stats.dtype)
        ctx.spec, ctx.aux, ctx.backend, ctx.columns = spec, aux, backend, columns
        ctx.has_bias = bias is not None
        if any(ctx.needs_input_grad[:4]):
            ctx.save_for_backward(q, None if ctx.single_set else k, alpha,
                                  bias if bias is not None else alpha.new_zeros(()), stats, col,
                                  *(saved_dq if fused is not None else ()))
        ctx.mark_non_differentiable(*(() if spec.col_lse else (col,)),
                                    *(() if pos is not None else (s_pos,)), top_vals, top_idx)
        return stats, col, s_pos, top_vals, top_idx

    @staticmethod
    def backward(ctx, g_stats, g_col, g_pos, _g_top_vals, _g_top_idx):
        # before ctx.saved_tensors, whose version check would hide the reason
        if ctx.fused_dq and getattr(ctx, "dq_taken", False):
            raise RuntimeError(
                "tilecl: this SigLIP loss ran the triton backend's fused forward, whose saved "
                "buffer becomes dq in place, so its backward runs once; set "
                "TILECL_TRITON_SIGLIP_FUSED=0 to backpropagate twice (retain_graph=True)")
        refuse_double_backward(ctx.backend, ctx.saved_tensors, (g_stats, g_col, g_pos),
                               ring=ctx.columns.world > 1)
        with autocast_off(ctx.saved_tensors[0].device):  # a backward called under autocast
            grads = TileStatsFunction._backward(ctx, g_stats, g_col, g_pos)
        return grads + (None,) * 5

    @staticmethod
    def _backward(ctx, g_stats, g_col, g_pos):
        q, k, alpha, bias, stats, col, *saved_dq = ctx.saved_tensors
        k = q if ctx.single_set else k
        spec = ctx.spec
        if g_stats is None:
            g_stats = torch.zeros_like(stats)
        if spec.col_lse and g_col is None:
            g_col = torch.zeros_like(col)
        g_stats = g_stats.to(stats.dtype)
        g_col = g_col.to(col.dtype) if spec.col_lse else None
        col = col if spec.col_lse else None
        impl = _backends.get(ctx.backend)
        needs = ctx.needs_input_grad[:4]
        if ctx.single_set:  # the backend computes both sides of z against itself
            needs = (needs[0], needs[0]) + tuple(needs[2:])
        bias = bias if ctx.has_bias else None
        pos = ctx.pos if g_pos is not None else None
        if ctx.fused_dq:  # dq came with the forward; only dk is left (SigLIP, triton)
            return _backward_fused_dq(ctx, impl, q, k, alpha, bias, stats, g_stats, saved_dq,
                                      needs)
        # a backend that finishes the gradients itself, chunk by chunk in a bounded workspace
        final = impl.backward_final if q.dtype != torch.float64 else None
        if spec.logit == "dist" and pos is not None:
            final = None  # its in-kernel positive pair is the dot-logit one
        if ctx.columns.world == 1:
            return _backward_one_block(ctx, impl, final, q, k, alpha, bias, stats, col, g_stats,
                                       g_col, pos, g_pos, needs)
        return _backward_blocks(ctx, impl, final, q, k, alpha, bias, stats, col, g_stats, g_col,
                                pos, g_pos, needs)


def _block_grads(ctx, impl, final, q, kb, alpha, bias, aux_b, stats, colb, g_stats, gcolb, needs,
                 pos, g_pos, single_set, acc=None):
    """(dq, dk, dalpha, dbias) of rows q against one column block kb: the backend's
    memory-bounded backward (``final``: the positive pair inside, and with ``acc`` its products
    added into those fp32 accumulators), else its plain backward plus the positive pair's term
    here (math.md 1.3). ``pos`` is None for a block without the positive column."""
    if final is not None:
        extra = {} if acc is None else {"acc": acc}
        return final(ctx.spec, q, kb, alpha, bias, aux_b, stats, colb, g_stats, gcolb, needs, pos,
                     g_pos, single_set, **extra)
    dq, dk, da, db = impl.backward(ctx.spec, q, kb, alpha, bias, aux_b, stats, colb, g_stats,
                                   gcolb, needs)
    if pos is not None:
        dq, dk, da = _add_positive(q, kb, alpha, pos, g_pos, dq, dk, da, needs, stats.dtype,
                                   ctx.spec)
    return dq, dk, da, db


def _one_set(dq, dk):
    """z against itself: dz = dq + dk of the same rows (summed before the one rounding)."""
    return (dq + dk if (dq is not None and dk is not None) else dq), None


def _backward_one_block(ctx, impl, final, q, k, alpha, bias, stats, col, g_stats, g_col, pos,
                        g_pos, needs):
    """One block (one process): the gradients rounded to the input dtypes straight from the
    backend's fp32 accumulators (by ``final`` chunk by chunk, which also sums one set's dq and
    dk; else here)."""
    dq, dk, da, db = _block_grads(ctx, impl, final, q, k, alpha, bias, ctx.aux, stats, col,
                                  g_stats, g_col, needs, pos, g_pos, ctx.single_set)
    if ctx.single_set:
        dq, dk = (dq, None) if final is not None else _one_set(dq, dk)
    return (_cast(dq, q, needs[0]), _cast(dk, k, needs[1]), _cast(da, alpha, needs[2]),
            _cast(db, bias, needs[3]))


def _backward_blocks(ctx, impl, final, q, k, alpha, bias, stats, col, g_stats, g_col, pos, g_pos,
                     needs):
    """The blocks of ``ctx.columns`` one after the other (the ring): the same backend calls as
    one block, into fp32 accumulators (dq and dalpha / dbias here, each block's dk travelling
    home with it), rounded once at the end. The positive pair is added at the local block."""
    cdt = stats.dtype
    n, d = q.shape
    dq = torch.zeros(n, d, dtype=cdt, device=q.device) if needs[0] else None
    da = torch.zeros(alpha.shape, dtype=cdt, device=q.device)
    db = torch.zeros((), dtype=cdt, device=q.device)

    def visit(kb, aux_b, colb, gcolb, local):
        p, gp = (pos, g_pos) if local else (None, None)
        acc = None
        if final is not None:  # the backend adds its chunks into dq and the block's dk
            dk_b = torch.zeros(kb.shape[0], d, dtype=cdt, device=q.device) if needs[1] else None
            acc = (dq, dk_b)
        dq_b, dk_b, da_b, db_b = _block_grads(ctx, impl, final, q, kb, alpha, bias, aux_b, stats,
                                              colb, g_stats, gcolb, needs, p, gp, False, acc)
        if final is not None:
            dk_b = acc[1]
        elif dq is not None and dq_b is not None:
            dq.add_(dq_b)
        # a backend returns None for a gradient nobody asked for (``needs``): a float or a
        # 0-dim temperature without grad gives no dalpha partial
        for total, part in ((da, da_b), (db, db_b)):
            if part is not None:
                total.add_(part)
        return dk_b

    dk = ctx.columns.backward(ctx.spec, k, ctx.aux, col, g_col, n, bool(needs[1]), cdt, visit)
    if ctx.single_set:  # summed in fp32, rounded once
        dq, dk = _one_set(dq, dk)
    return (_cast(dq, q, needs[0]), _cast(dk, k, needs[1] and not ctx.single_set),
            _cast(da, alpha, needs[2]), _cast(db, bias, needs[3] and bias is not None))


def refuse_double_backward(backend, saved, grads, ring=False):
    """A clear error instead of a wrong or obscure one when the gradient itself is to be
    differentiated (``create_graph=True``: grad mode on in backward, with an input or an
    upstream gradient that requires grad). The tile backends recompute the tiles outside
    autograd (custom ops, in-place tile updates), so their gradients carry no graph; the dense
    ``reference`` backend is plain autograd and is differentiable twice (but for its
    cdist / pdist losses)."""
    if not torch.is_grad_enabled():
        return
    if not any(t is not None and t.requires_grad for t in (*saved, *grads)):
        return
    where = "under the ring (group=)" if ring else f"by the {backend!r} backend"
    raise RuntimeError(
        f"tilecl: double backward (a gradient of a gradient, create_graph=True) is not supported "
        f"{where}: its backward recomputes the tiles outside autograd. Use backend='reference' "
        f"(dense PyTorch, N x M memory) in a single process for higher-order gradients (every "
        f"loss but kernel_info_nce, uniformity_loss and decoupled_uniformity, whose PyTorch "
        f"cdist / pdist is differentiable once)")


def _backward_fused_dq(ctx, impl, q, k, alpha, bias, stats, g_stats, saved_dq, needs):
    """Gradients when the forward ran the dq pass (``impl.forward_with_dq``): dq, dalpha and
    dbias from the saved (u, qdot, gsum) scaled by g; dk from the backend's dk pass alone."""
    spec = ctx.spec
    b = bias if ctx.has_bias else None
    ctx.dq_taken = bool(needs[0])
    dq, da, db = impl.finish_dq(*saved_dq, g_stats[spec.i_sig], alpha, b, needs)
    dk = None
    if needs[1]:
        _, dk, _, _ = impl.backward_final(spec, q, k, alpha, b, ctx.aux, stats, None,
                                          g_stats.to(stats.dtype), None,
                                          (False, True, False, False))
    return dq if needs[0] else None, dk, _cast(da, alpha, needs[2]), _cast(db, bias, needs[3])


def _add_positive(q, k, alpha, pos, g_pos, dq, dk, da, needs, cdt, spec=None):
    """s_pos_i = a_i <q_i, k_p(i)>: dq_i += a_i g_i k_p(i), dk_p(i) += a_i g_i q_i,
    da_i += g_i <q_i, k_p(i)>, all in the backend's fp32 (fp64) accumulators. Distance logits
    (math.md 1.4, 7.2): s_pos_i = -a_i D_i^gamma with D_i = |q_i - k_p(i)| from the difference."""
    a = alpha.to(cdt)
    g = g_pos.to(cdt)
    kp = k[pos].to(cdt)
    qc = q.to(cdt)
    if spec is not None and spec.logit == "dist":
        return _add_positive_dist(qc, kp, a, g, pos, dq, dk, da, needs, alpha.dim(), spec.gamma)
    coef = g * a  # [N]
    if needs[0]:
        dq = dq + coef[:, None] * kp
    if needs[1]:
        dk = dk.index_add(0, pos, coef[:, None] * qc)
    if needs[2] and da is not None:
        dot = g * (qc * kp).sum(1)
        da = da + (dot.sum() if alpha.dim() == 0 else dot)
    return dq, dk, da


def _add_positive_dist(qc, kp, a, g, pos, dq, dk, da, needs, alpha_dim, gamma):
    """dD^gamma / dq_i = gamma D^(gamma - 2) (q_i - k_p(i)), and the subgradient 0 at D = 0."""
    diff = qc - kp  # [N, d]
    d2 = diff.square().sum(1)
    zero = d2 == 0
    fac = gamma * torch.where(zero, 1.0, d2).pow(gamma / 2.0 - 1.0).masked_fill(zero, 0.0)
    coef = (g * a * fac)[:, None] * diff  # -ds_pos_i / dq_i, times g_i
    if needs[0]:
        dq = dq - coef
    if needs[1]:
        dk = dk.index_add(0, pos, coef)
    if needs[2] and da is not None:
        # g_i ds_pos_i / da_i = -g_i D_i^gamma, in float64: it nearly cancels the tiles'
        # sum_j G_ij x_ij / a_i (by 1e3..1e4 on unit vectors at high D), so its own rounding
        # must stay far below the fp32 result's
        d64 = (qc.double() - kp.double()).square().sum(1)
        xs = -g.double() * d64.pow(gamma / 2.0)
        da = (da.double() + (xs.sum() if alpha_dim == 0 else xs)).to(da.dtype)
    return dq, dk, da


_GATHER_BYTES = 4 << 20  # one fp32 temporary of the positive-logit gather


def _positive_logits(q, k, pos, dtype, spec=None):
    """<q_i, k_pos(i)> [N] in ``dtype`` (distance logits: -|q_i - k_pos(i)|^gamma, from the
    difference), gathered in row slices of at most 4 MiB per temporary (O(N) memory beyond
    the inputs, not O(N d))."""
    n, d = q.shape[0], q.shape[1]
    dist = spec is not None and spec.logit == "dist"
    step = max(1, _GATHER_BYTES // (max(d, 1) * 8))
    out = torch.empty(n, device=q.device, dtype=dtype)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        qs, ks = q[r0:r1].to(dtype), k[pos[r0:r1]].to(dtype)
        if dist:
            out[r0:r1] = (qs - ks).square().sum(1).pow(spec.gamma / 2.0).neg()  # [S, d] -> [S]
        else:
            out[r0:r1] = (qs * ks).sum(1)  # [S, d] -> [S]
    return out


def _cast(grad, like, needed):
    return grad.to(like.dtype) if (needed and grad is not None) else None


def tile_stats(spec: TileSpec, q, k, alpha, bias=None, aux: TileAux = None, backend="torch",
               pos=None, columns=None):
    """Statistics of rows q [N, D] against columns k [M, D] (see ``_spec.py``).

    alpha: 0-dim or [N] float tensor (the logit scale; 1 / temperature), bias: 0-dim or None,
    pos: [N] int64 local column of each row's positive, or None.
    Returns (stats [S, N] fp32, col_lse [M] fp32, empty unless ``spec.col_lse``,
    s_pos [N] = alpha_i <q_i, k_pos(i)> fp32 (distance logits: -alpha_i |q_i - k_pos(i)|^gamma),
    empty unless ``pos`` is given), and with
    ``spec.topk`` a fourth element (vals [N, topk], global idx [N, topk]) without gradient.
    columns: where the column blocks come from (``_ring``): None is this process's k alone; a
    ``RingColumns`` sweeps every rank's (then the statistics are over all global columns).
    """
    stats, col, s_pos, top_vals, top_idx = TileStatsFunction.apply(
        q, None if k is q else k, alpha, bias, spec, aux or TileAux(), backend, pos,
        columns if columns is not None else Local())
    return (stats, col, s_pos) if not spec.topk else (stats, col, s_pos, (top_vals, top_idx))
