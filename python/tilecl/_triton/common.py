"""Shared helpers of the triton backend's launchers, below every launcher module (``launch``: the
plain contract; ``gemm``: the H groups; ``bounded``: the memory-bounded backward): the one handle
on the kernels (``_lse``, ``tritonops/lse.py``), the kernels' flags and pointer arguments, the
dq / dk launch, the scalar gradients, and the bounded fp32 workspace with the side data of a row
or column chunk.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from .._spec import COLUMNS, POSITIVES, WEIGHTS, SumSpec, TileAux, TileSpec

try:
    import triton

    from ..tritonops import configs as _configs
    from ..tritonops import lse as _lse
    from ..tritonops.tile import Head, Saved, Shape, Side, Spec, Strides

    _IMPORT_ERROR = None
except ImportError as exc:  # pragma: no cover - depends on the environment
    _IMPORT_ERROR = exc


def unavailable(device) -> "str | None":
    """None if the kernels can run on ``device``, else why not."""
    if _IMPORT_ERROR is not None:
        return f"triton cannot be imported ({_IMPORT_ERROR})"
    device = torch.device(device)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return None if device.type == "cpu" else (
            "TRITON_INTERPRET=1 runs the Triton kernels on CPU tensors only")
    if device.type != "cuda":
        return f"Triton kernels need a CUDA device (or TRITON_INTERPRET=1 on CPU), got {device}"
    return None


def _dummy(device, dtype):
    return torch.zeros(1, device=device, dtype=dtype)


def kernel_spec(spec: TileSpec, aux: TileAux, bias) -> "Spec":
    """The kernels' template flags for one spec (``tritonops.tile.Spec``, one constexpr: one
    compiled specialisation per distinct value)."""
    sums = list(spec.sums) + [SumSpec()] * (2 - len(spec.sums))
    dist = spec.logit == "dist"
    return Spec(
        DIST=dist, GAMMA=float(spec.gamma) if dist else 2.0,
        HAS_BIAS=(bias is not None) and not dist, HAS_EXCL=aux.excl is not None,
        HAS_THRESH=bool(spec.threshold),
        POSITIVE=POSITIVES.index(spec.positive), WEIGHT=WEIGHTS.index(spec.weight),
        CLIP=float(spec.weight_clip),
        N_SUMS=len(spec.sums),
        C0=COLUMNS.index(sums[0].cols), B0=float(sums[0].beta), W0=bool(sums[0].weighted),
        C1=COLUMNS.index(sums[1].cols), B1=float(sums[1].beta), W1=bool(sums[1].weighted),
        LIN=bool(spec.lin), SIG=bool(spec.sigmoid), COL_LSE=bool(spec.col_lse),
    )


def _flags() -> dict:
    """The pass flags every launch passes (the dots' fp32 input precision)."""
    return dict(PRECISION=_configs.dot_precision())


def _inputs(spec: TileSpec, q, k, alpha, bias, aux: TileAux) -> "Head":
    """The leading arguments of every kernel (``tritonops.tile.Head``): q, k, the side data's
    pointers, the sizes, the strides (inputs stay strided), D and the template flags."""
    dev = q.device
    i64 = torch.int64
    a = alpha.detach().to(device=dev, dtype=torch.float32).reshape(-1)
    s_a = 0 if alpha.dim() == 0 else 1
    b = bias.detach().to(device=dev, dtype=torch.float32).reshape(1) if bias is not None else (
        _dummy(dev, torch.float32))

    def idx(t):
        return t.to(device=dev, dtype=i64).contiguous() if t is not None else _dummy(dev, i64)

    excl, pos, labq = idx(aux.excl), idx(aux.pos), idx(aux.labels_q)
    labk = idx(aux.labels_k)
    if spec.threshold:
        if aux.thresh is None:
            raise ValueError("TileSpec.threshold needs TileAux.thresh [N]")
        thr = aux.thresh.detach().to(device=dev, dtype=torch.float32).contiguous()
    else:
        thr = _dummy(dev, torch.float32)
    w = aux.weight if spec.weight == "dense" else _dummy(dev, torch.float32).view(1, 1)
    wa = aux.wa if spec.weight == "lowrank" else _dummy(dev, torch.float32).view(1, 1)
    wb = aux.wb if spec.weight == "lowrank" else _dummy(dev, torch.float32).view(1, 1)
    side = Side(a, b, excl, pos, labq, labk, thr, w, wa, wb)
    shape = Shape(q.shape[0], k.shape[0], w.shape[1], wa.shape[1], int(aux.col_offset))
    strides = Strides(q.stride(0), q.stride(1), k.stride(0), k.stride(1), s_a, w.stride(0),
                      w.stride(1), wa.stride(0), wa.stride(1), wb.stride(0), wb.stride(1))
    return Head(q, k, side, shape, strides, q.shape[1], kernel_spec(spec, aux, bias))


def _output(shape, dev, written):
    if not written:
        return torch.zeros(shape, device=dev, dtype=torch.float32)
    if _configs.interpreting():
        return torch.full(shape, float("nan"), device=dev, dtype=torch.float32)
    return torch.empty(shape, device=dev, dtype=torch.float32)


def _check(q, k):
    if q.dim() != 2 or k.dim() != 2 or q.shape[1] != k.shape[1]:
        raise ValueError(f"q [N, D] and k [M, D] expected, got {tuple(q.shape)}, {tuple(k.shape)}")
    if q.dtype != k.dtype or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"q and k must share a dtype among fp32/fp16/bf16, got {q.dtype}, {k.dtype}")


def _bwd_stats(spec: TileSpec, stats, col, g_stats, g_col, n, dev):
    """The backward kernels' statistics operands: row stats / dL/dstats [S, N] and the column
    LSE / dL/dcol [M] (dummies where the spec has none), fp32 and contiguous."""
    f32 = torch.float32
    st = stats.detach().to(f32).contiguous()
    gst = g_stats.detach().to(f32).contiguous()
    if spec.col_lse:
        cst = col.detach().to(f32).contiguous()
        gc = g_col.detach().to(f32).contiguous()
    else:
        cst = gc = _dummy(dev, f32)
    if st.shape[0] == 0:  # a spec with no row statistic (column LSE only)
        st = gst = torch.zeros(1, n, device=dev, dtype=f32)
    return st, gst, cst, gc


def _launch_bwd(spec, flags, q, k, alpha, bias, aux, st, gst, cst, gc, out, gsum, gx, trans):
    """One backward pass into ``out`` (fp32 [N, D] rows of q, or [M, D] columns of k with
    ``trans``); q, k, alpha, aux, the statistics and gsum / gx are the slices this launch sees."""
    head = _inputs(spec, q, k, alpha, bias, aux)
    d = q.shape[1]
    if trans:
        def grid(meta):
            return (triton.cdiv(k.shape[0], meta["BN"]), triton.cdiv(d, meta["BD"]))
    else:
        def grid(meta):
            return (triton.cdiv(q.shape[0], meta["BM"]), triton.cdiv(d, meta["BD"]))
    saved = Saved(st, gst, cst, gc, st.stride(0))
    _lse._lse_bwd_kernel[grid](*head, saved, out, gsum, gx, out.stride(0), out.stride(1),
                               TRANS=trans, **flags)


def _bwd_flags():
    flags = _flags()
    # gradient matmul of fp32 inputs at the same precision (16-bit: see tritonops.lse._grad_dot)
    flags["PRECISION2"] = flags["PRECISION"]
    flags["FWD_STATS"] = False
    return flags


def scalar_grads(spec: TileSpec, da, gsum, alpha, bias):
    """(dalpha like alpha: the rows' da summed for a 0-dim alpha, dbias 0-dim or None: the rows'
    sum_j G_ij for SigLIP, 0 for the softmax losses, whose bias has no gradient; math.md 1.5)."""
    da = da.sum() if alpha.dim() == 0 else da
    if bias is None:
        return da, None
    return da, gsum.sum() if spec.sigmoid else torch.zeros((), device=da.device, dtype=da.dtype)


WORKSPACE_MB = 40.0  # default fp32 workspace; TILECL_TRITON_WORKSPACE_MB overrides it
_GLUE_BYTES = 2 << 20  # one fp32 temporary of a chunk's finishing step


def workspace_bytes() -> int:
    """Bytes of the fp32 gradient workspace (``TILECL_TRITON_WORKSPACE_MB``, default 40 MiB)."""
    raw = os.environ.get("TILECL_TRITON_WORKSPACE_MB")
    if raw is None:
        return int(WORKSPACE_MB * 2**20)
    try:
        mb = float(raw)
    except ValueError:
        mb = float("nan")
    if not mb > 0:
        raise ValueError(f"TILECL_TRITON_WORKSPACE_MB must be a positive number of MiB, got {raw!r}")
    return max(1, int(mb * 2**20))


class _Workspace:
    """``count`` fp32 buffers of at most ``workspace_bytes()`` together, allocated once; ``rows``
    is how many [D] rows one buffer holds (the chunk size)."""

    def __init__(self, d: int, most_rows: int, device, count: int = 1):
        self.d = max(d, 1)
        self.rows = max(1, workspace_bytes() // (4 * self.d * count))
        size = min(self.rows, most_rows) * d
        self.space = [torch.empty(size, device=device, dtype=torch.float32) for _ in range(count)]

    def chunk(self, which: int, size: int, written: bool = True) -> torch.Tensor:
        """[size, D] of buffer ``which``: zeros when no pass writes it, NaN under the interpreter
        (an element the kernel misses fails the tests), else as it is."""
        buf = self.space[which][:size * self.d].view(size, self.d)
        if not written:
            return buf.zero_()
        return buf.fill_(float("nan")) if _configs.interpreting() else buf


@dataclasses.dataclass
class _Passes:
    """Which backward passes run, from the sizes and ``needs`` (dq, dk, dalpha, dbias)."""
    n: int
    m: int
    d: int
    af: torch.Tensor  # alpha [N] fp32
    need_q: bool
    need_k: bool
    need_a: bool
    need_bias: bool
    rows: bool  # the dq pass (also for dalpha and the SigLIP bias)
    cols: bool  # the dk pass

    @staticmethod
    def of(spec: TileSpec, q, k, alpha, bias, needs) -> "_Passes":
        n, m, d = q.shape[0], k.shape[0], q.shape[1]
        a = alpha.detach().to(device=q.device, dtype=torch.float32)
        need_q, need_k, need_a = bool(needs[0]), bool(needs[1]), bool(needs[2])
        need_bias = bias is not None and spec.sigmoid and bool(needs[3])
        launch = n > 0 and m > 0 and d > 0
        return _Passes(n, m, d, a.expand(n) if a.dim() == 0 else a, need_q, need_k, need_a,
                       need_bias, launch and (need_q or need_a or need_bias), launch and need_k)


def _spans(n: int, step: int):
    return [(i, min(n, i + step)) for i in range(0, n, step)]


def _rows_aux(aux: TileAux, r0: int, r1: int) -> TileAux:
    """The side data of rows r0:r1 (columns unchanged)."""
    def cut(t):
        return None if t is None else t[r0:r1]
    return dataclasses.replace(aux, excl=cut(aux.excl), pos=cut(aux.pos),
                               labels_q=cut(aux.labels_q), weight=cut(aux.weight),
                               wa=cut(aux.wa), thresh=cut(aux.thresh))


def _cols_aux(aux: TileAux, c0: int, c1: int) -> TileAux:
    """The side data of columns c0:c1: global column indices shift by c0."""
    def cut(t):
        return None if t is None else t[c0:c1]
    return aux.with_columns(labels_k=cut(aux.labels_k), wb=cut(aux.wb),
                            col_offset=int(aux.col_offset) + c0)


def fwd_dq_outputs(spec: TileSpec, q):
    """The zeroed outputs of SigLIP's fused forward + dq pass (both backward paths): stats [S, N]
    fp32, u [N, D] in q.dtype, qdot [N] fp32, gsum [N] fp32."""
    n, dev, f32 = q.shape[0], q.device, torch.float32
    return (torch.zeros(spec.n_stats, n, device=dev, dtype=f32),
            torch.zeros(q.shape, device=dev, dtype=q.dtype),
            torch.zeros(n, device=dev, dtype=f32), torch.zeros(n, device=dev, dtype=f32))
