"""The ``native`` backend: the compiled module ``tilecl._C`` (csrc/), same contract as
``_torch_tiled`` (``forward`` / ``backward`` / ``unavailable``).

* CPU tensors: C++ with OpenMP (csrc/cpu), fp32 / float64 compute, fp16 / bf16 inputs converted
  tile by tile; deterministic.
* CUDA tensors: the CUDA kernels of csrc/cuda when ``tilecl._C`` was built with nvcc
  (``TILECL_BUILD_CUDA=1``), else the same device code compiled at run time by NVRTC through
  CuPy (``cupy.RawModule``), when CuPy is installed. fp32 compute; fp16 / bf16 use tensor cores.

csrc/ knows no torch: this module passes ``data_ptr()``, sizes, strides (in elements), dtype
codes, the flags of the TileSpec as ints, and ``torch.cuda.current_stream().cuda_stream``.
Outputs are allocated here (statistics [S, N] and column LSE [M] in the compute dtype, gradients
zeroed because the kernels accumulate into them).
"""

from __future__ import annotations

import torch

from ._spec import COLUMNS, LOGITS, POSITIVES, WEIGHTS, TileAux, TileSpec

try:
    from . import _C
except ImportError as exc:  # not built (TILECL_SKIP_NATIVE, or a pure-Python install)
    _C = None
    _IMPORT_ERROR = exc
else:
    _IMPORT_ERROR = None

_DTYPES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


def _spec_dict(spec: TileSpec) -> dict:
    return {
        "logit": LOGITS.index(spec.logit),
        "gamma": float(spec.gamma),
        "positive": POSITIVES.index(spec.positive),
        "n_sums": len(spec.sums),
        "cols": [COLUMNS.index(s.cols) for s in spec.sums],
        "beta": [float(s.beta) for s in spec.sums],
        "weighted": [int(s.weighted) for s in spec.sums],
        "lin": int(spec.lin),
        "sigmoid": int(spec.sigmoid),
        "col_lse": int(spec.col_lse),
        "weight": WEIGHTS.index(spec.weight),
        "weight_clip": float(spec.weight_clip),
    }


def compute_dtype(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _ptr(t):
    return 0 if t is None else t.data_ptr()


class _Prepared:
    """Inputs as the kernels want them; holds the converted tensors alive during the call."""

    def __init__(self, spec: TileSpec, q, k, alpha, bias, aux: TileAux):
        self.cdt = compute_dtype(q)
        if q.dtype != k.dtype or q.dtype not in _DTYPES:
            q, k = q.to(self.cdt), k.to(self.cdt)
        if q.device.type == "cuda" and self.cdt == torch.float64:
            raise RuntimeError("the native CUDA kernels compute in fp32: float64 CUDA inputs are "
                               "not supported (use backend='torch')")
        n, m = q.shape[0], k.shape[0]
        self.n, self.m, self.d = n, m, q.shape[1]
        self.q, self.k = q, k
        dev, cdt = q.device, self.cdt
        self.alpha = (alpha.to(dev, cdt).expand(n) if alpha.dim() == 0 else alpha.to(dev, cdt)).contiguous()
        self.bias = None if bias is None else bias.to(dev, cdt).reshape(1).contiguous()

        def idx(t):
            return None if t is None else t.to(dev, torch.int64).contiguous()

        def flt(t):
            return None if t is None else t.to(dev, cdt).contiguous()

        self.excl, self.pos = idx(aux.excl), idx(aux.pos) if spec.positive == "index" else None
        lab = spec.positive == "label"
        self.labels_q = idx(aux.labels_q) if lab else None
        self.labels_k = idx(aux.labels_k) if lab else None
        self.weight = flt(aux.weight) if spec.weight == "dense" else None
        self.wa = flt(aux.wa) if spec.weight == "lowrank" else None
        self.wb = flt(aux.wb) if spec.weight == "lowrank" else None
        self.prob = {
            "dtype": _DTYPES[q.dtype], "n": n, "m": m, "d": self.d,
            "q": _ptr(q), "sq0": q.stride(0), "sq1": q.stride(1),
            "k": _ptr(k), "sk0": k.stride(0), "sk1": k.stride(1),
            "alpha": _ptr(self.alpha), "bias": _ptr(self.bias),
            "excl": _ptr(self.excl), "pos": _ptr(self.pos),
            "labels_q": _ptr(self.labels_q), "labels_k": _ptr(self.labels_k),
            "weight": _ptr(self.weight), "mw": self.weight.shape[1] if self.weight is not None else 0,
            "wa": _ptr(self.wa), "wb": _ptr(self.wb),
            "rank": self.wa.shape[1] if self.wa is not None else 0,
            "col_offset": int(aux.col_offset),
            "threads": torch.get_num_threads() if q.device.type == "cpu" else 0,
        }
        self.spec = _spec_dict(spec)


def _device_args(t):
    """(device code, stream handle) of the kernels' launch."""
    if t.device.type == "cpu":
        return 0, 0
    return 1, torch.cuda.current_stream(t.device).cuda_stream


def forward(spec: TileSpec, q, k, alpha, bias, aux: TileAux):
    """Per-row statistics [S, N] and column LSE [M] (or None); see ``_torch_tiled.forward``."""
    p = _Prepared(spec, q, k, alpha, bias, aux)
    stats = torch.empty(spec.n_stats, p.n, dtype=p.cdt, device=q.device)
    col = torch.empty(p.m, dtype=p.cdt, device=q.device) if spec.col_lse else None
    if p.n == 0:  # no rows: nothing to launch
        stats.fill_(0.0)
        stats[: len(spec.sums)] = float("-inf")
        if col is not None:
            col.fill_(float("-inf"))
        return stats, col
    device, stream = _device_args(q)
    if device == 1 and not _C.has_cuda():
        from . import _native_rtc

        _native_rtc.forward(p, stats, col, stream)
    else:
        _C.forward(p.spec, p.prob, stats.data_ptr(), _ptr(col), device, stream)
    return stats, col


def backward(spec: TileSpec, q, k, alpha, bias, aux: TileAux, stats, col, g_stats, g_col,
             needs=(True, True, True, True)):
    """(dq, dk, dalpha, dbias) from dL/dstats [S, N] and dL/dcol [M]; see ``_torch_tiled``.

    Gradients nobody asked for (``needs``) are not computed and returned as None.
    """
    p = _Prepared(spec, q, k, alpha, bias, aux)
    cdt, dev, n, m, d = p.cdt, q.device, p.n, p.m, p.d
    dot = spec.logit == "dot"
    want_dq = bool(needs[0]) or (bool(needs[2]) and dot)  # dL/dalpha = <q_i, dq_i> / alpha_i
    dq = torch.zeros(n, d, dtype=cdt, device=dev) if want_dq else None
    dk = torch.zeros(m, d, dtype=cdt, device=dev) if needs[1] else None
    gx = torch.zeros(n, dtype=cdt, device=dev) if (needs[2] and not dot) else None
    gsum = (torch.zeros(n, dtype=cdt, device=dev)
            if (needs[3] and bias is not None and spec.sigmoid) else None)
    if n > 0 and m > 0 and (dq is not None or dk is not None or gx is not None or gsum is not None):
        stats_c = stats.to(cdt).contiguous()
        g_c = g_stats.to(cdt).contiguous()
        col_c = col.to(cdt).contiguous() if (spec.col_lse and col is not None) else None
        gcol_c = g_col.to(cdt).contiguous() if (spec.col_lse and g_col is not None) else None
        io = {"stats": _ptr(stats_c), "col": _ptr(col_c), "g_stats": _ptr(g_c), "g_col": _ptr(gcol_c),
              "dq": _ptr(dq), "dk": _ptr(dk), "gx": _ptr(gx), "gsum": _ptr(gsum)}
        device, stream = _device_args(q)
        if device == 1 and not _C.has_cuda():
            from . import _native_rtc

            _native_rtc.backward(p, io, stream)
        else:
            _C.backward(p.spec, p.prob, io, device, stream)
    da = None
    if needs[2]:
        a = p.alpha
        da = (p.q.to(cdt) * dq).sum(1) / a if dot else gx / a
        da = da.sum() if alpha.dim() == 0 else da
    db = None
    if bias is not None and needs[3]:
        db = gsum.sum() if gsum is not None else torch.zeros((), dtype=cdt, device=dev)
    return (dq if needs[0] else None), dk, da, db


def unavailable(device):
    """None when the native backend can run on ``device``, else the reason."""
    device = torch.device(device)
    if _C is None:
        return f"tilecl._C is not built ({_IMPORT_ERROR}); reinstall with pip install -e ."
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        return f"the native backend runs on cpu and cuda tensors, not {device.type}"
    if _C.has_cuda():
        return None
    try:
        import cupy  # noqa: F401
    except ImportError:
        return ("tilecl._C was built without CUDA (set TILECL_BUILD_CUDA=1 with nvcc to build "
                "it) and CuPy is not installed for the NVRTC fallback")
    return None
