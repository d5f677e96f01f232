"""The ``native`` backend: the compiled module ``tilecl._C`` (csrc/), same contract as
``_torch_tiled`` (``forward`` / ``backward`` / ``unavailable``).

* CPU tensors: C++ with OpenMP (csrc/cpu), fp32 / float64 compute, fp16 / bf16 inputs converted
  tile by tile; deterministic. fp32 runs AVX2 + FMA kernels when the CPU has them (chosen at run
  time; TILECL_CPU_ISA=generic forces the portable build). Streams the top-k hardest negatives
  (TileSpec.topk) on CPU only.
* CUDA tensors: the CUDA kernels of csrc/cuda when ``tilecl._C`` was built with nvcc
  (``TILECL_BUILD_CUDA=1``), else the same device code compiled at run time by NVRTC through
  CuPy (``cupy.RawModule``), when CuPy is installed. fp32 compute; fp16 / bf16 use tensor cores.
  Both launchers take their grid from ``launch_plan`` (csrc/cuda/tile_launch.h): the backward
  blocks each own 64 gradient rows x 256 columns of D, held in registers across the whole loop.
  ``TILECL_CUDA_SYNC_CHECK=1`` synchronizes after every launch and raises an error naming the
  kernel that faulted (the GPU tests set it); otherwise a fault surfaces at a later sync.

csrc/ knows no torch: this module passes ``data_ptr()``, sizes, strides (in elements), dtype
codes, the flags of the TileSpec as ints, and ``torch.cuda.current_stream().cuda_stream``.
Outputs are allocated here (statistics [S, N] and column LSE [M] in the compute dtype, gradients
zeroed because the kernels accumulate into them).
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import _ops
from ._spec import TileAux, TileSpec, compute_dtype, empty_topk

try:
    from . import _C
except ImportError as exc:  # not built (TILECL_SKIP_NATIVE, or a pure-Python install)
    _C = None
    _IMPORT_ERROR = exc
else:
    _IMPORT_ERROR = None

_DTYPES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


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
        if spec.threshold and aux.thresh is None:
            raise ValueError("TileSpec.threshold needs TileAux.thresh [N]")
        self.thresh = flt(aux.thresh) if spec.threshold else None
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
            "col_offset": int(aux.col_offset), "thresh": _ptr(self.thresh),
            "threads": torch.get_num_threads() if q.device.type == "cpu" else 0,
        }
        self.spec = spec.key()  # the one encoding, parsed by tilecl._C
        self.dist = spec.logit == "dist"


def _device_args(t):
    """(device code, stream handle) of the kernels' launch."""
    if t.device.type == "cpu":
        return 0, 0
    return 1, torch.cuda.current_stream(t.device).cuda_stream


def _forward_impl(spec: TileSpec, q, k, alpha, bias, aux: TileAux):
    p = _Prepared(spec, q, k, alpha, bias, aux)
    stats = torch.empty(spec.n_stats, p.n, dtype=p.cdt, device=q.device)
    col = torch.empty(p.m, dtype=p.cdt, device=q.device) if spec.col_lse else None
    top = None
    if spec.topk:
        if q.device.type != "cpu":
            raise ValueError("the native CUDA kernels do not stream top-k negatives (TileSpec.topk): "
                             "use backend='triton' or 'torch' on GPU")
        top = empty_topk(p.n, spec.topk, q.device, p.cdt)
    if p.n == 0:  # no rows: nothing to launch
        stats.fill_(0.0)
        stats[: len(spec.sums)] = float("-inf")
        if col is not None:
            col.fill_(float("-inf"))
        return stats, col, top
    device, stream = _device_args(q)
    if device == 1 and not _C.has_cuda():
        _rtc_launch(p, ("fwd_rows", "fwd_cols") if spec.col_lse else ("fwd_rows",),
                    {"stats": stats.data_ptr(), "col": _ptr(col)}, q.device, stream)
    else:
        _C.forward(p.spec, p.prob, stats.data_ptr(), _ptr(col), device, stream,
                   *((top[0].data_ptr(), top[1].data_ptr(), spec.topk) if top else ()))
    return stats, col, top


def _backward_impl(spec: TileSpec, q, k, alpha, bias, aux: TileAux, stats, col, g_stats, g_col,
                   needs=(True, True, True, True)):
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
            modes = (("bwd_dq",) if (dq is not None or gx is not None or gsum is not None) else ()) + (
                ("bwd_dk",) if dk is not None else ())
            rtc_io = {("stats_in" if key == "stats" else "col_in" if key == "col" else key): v
                      for key, v in io.items()}
            _rtc_launch(p, modes, rtc_io, q.device, stream)
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


# ---- operator registration (torch.compile sees one opaque op with a fake implementation) ----
# The schemas are the template's one prefix (_ops.py) plus each op's own arguments.


def _fwd_kernel(spec: TileSpec, q, k, alpha, bias, aux: TileAux):
    stats, col, top = _forward_impl(spec, q, k, alpha, bias, aux)
    if top is None:
        top = (stats.new_empty(0), torch.empty(0, dtype=torch.int64, device=stats.device))
    return stats, (col if col is not None else stats.new_empty(0)), top[0], top[1]


def _fwd_fake(spec: TileSpec, q, k, alpha, bias, aux: TileAux):
    cdt = compute_dtype(q)
    top = (q.shape[0], spec.topk) if spec.topk else (0,)
    return (q.new_empty((spec.n_stats, q.shape[0]), dtype=cdt),
            q.new_empty((k.shape[0] if spec.col_lse else 0,), dtype=cdt),
            q.new_empty(top, dtype=cdt), q.new_empty(top, dtype=torch.int64))


def _bwd_kernel(spec: TileSpec, q, k, alpha, bias, aux: TileAux, stats, col, g_stats, g_col, needs):
    out = _backward_impl(spec, q, k, alpha, bias, aux, stats, col, g_stats, g_col, tuple(needs))
    return tuple(t if t is not None else stats.new_empty(0) for t in out)  # no aliased returns


def _bwd_fake(spec: TileSpec, q, k, alpha, bias, aux: TileAux, stats, col, g_stats, g_col, needs):
    cdt = compute_dtype(q)
    shapes = (q.shape if needs[0] else (0,), k.shape if needs[1] else (0,),
              alpha.shape if needs[2] else (0,), () if (needs[3] and bias is not None) else (0,))
    return tuple(q.new_empty(shape, dtype=cdt) for shape in shapes)


_fwd_op = _ops.define("native_tile_fwd", "", _ops.OUT4, _fwd_kernel, _fwd_fake)
_bwd_op = _ops.define("native_tile_bwd", _ops.BWD_ARGS, _ops.OUT4, _bwd_kernel, _bwd_fake)


def forward(spec: TileSpec, q, k, alpha, bias, aux: TileAux):
    """Per-row statistics [S, N] and column LSE [M] (or None), and with ``spec.topk`` the rows'
    hardest negatives (vals [N, topk], global idx [N, topk], CPU only); see ``_torch_tiled``."""
    stats, col, top_vals, top_idx = _fwd_op(spec, q, k, alpha, bias, aux)
    col = col if spec.col_lse else None
    return (stats, col, (top_vals, top_idx)) if spec.topk else (stats, col)


def backward(spec: TileSpec, q, k, alpha, bias, aux: TileAux, stats, col, g_stats, g_col,
             needs=(True, True, True, True)):
    """(dq, dk, dalpha, dbias) from dL/dstats [S, N] and dL/dcol [M]; see ``_torch_tiled``.

    Gradients nobody asked for (``needs``) are not computed and returned as None.
    """
    needs = [bool(x) for x in needs]
    out = _bwd_op(spec, q, k, alpha, bias, aux, stats,
                  col if spec.col_lse else None, g_stats, g_col if spec.col_lse else None, needs)
    keep = (needs[0], needs[1], needs[2], needs[3] and bias is not None)
    return tuple(t if w else None for t, w in zip(out, keep))


# ---- NVRTC fallback: the same device code (tilecl._C.rtc_source()) through CuPy's RawModule ----
# Used for CUDA tensors when tilecl._C was built without nvcc. The kernels take a pointer to a
# Problem (csrc/tile_math.h, the KParams view) in device memory, whose bytes tilecl._C.kparams
# builds from the same struct the nvcc launches pass by value (one layout, host and device).

_RTC_MODES = {"fwd_rows": 0, "fwd_cols": 1, "bwd_dq": 2, "bwd_dk": 3}
_RTC_TYPES = {0: "float", 2: "__half", 3: "__nv_bfloat16"}
_rtc_cache: dict = {}


def launch_plan(mode: str, n: int, m: int, d: int, dtype: torch.dtype, dist: bool,
                grad_out: bool = True) -> dict:
    """Grid, threads, D chunk and global bytes / flops of one launch of the CUDA kernel ``mode``
    ("fwd_rows", "fwd_cols", "bwd_dq", "bwd_dk") on q [n, d], k [m, d] of ``dtype``: the plan the
    nvcc launcher (csrc/cuda/tile_cuda.cu) and the NVRTC one (``_rtc_launch``) both run.
    ``grad_out``: the backward writes dq (dk); False when dq only feeds the row sums."""
    if mode not in _RTC_MODES:
        raise ValueError(f"mode must be one of {sorted(_RTC_MODES)}, got {mode!r}")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"dtype must be float32, float16 or bfloat16 (the CUDA kernels), got {dtype}")
    return _C.launch_plan(_RTC_MODES[mode], int(n), int(m), int(d), dtype.itemsize, bool(dist),
                          bool(grad_out))


def _sync_checked(name: str, grid, device):
    """TILECL_CUDA_SYNC_CHECK: wait for the kernel just launched and name it if it faulted."""
    try:
        torch.cuda.synchronize(device)
    except RuntimeError as exc:
        raise RuntimeError(f"tilecl CUDA kernel {name} (grid {grid[0]} x {grid[1]}) failed "
                           f"(TILECL_CUDA_SYNC_CHECK): {exc}") from exc


def _rtc_module():
    if "module" not in _rtc_cache:
        import cupy

        names = [f"tilecl::tile_kernel_rtc<{t},{mode},{dist}>" for t in _RTC_TYPES.values()
                 for mode in range(4) for dist in ("false", "true")]
        mod = cupy.RawModule(code=_C.rtc_source(), options=("-std=c++17", "-DTILECL_RTC_CONCAT"),
                             name_expressions=names)
        _rtc_cache["module"] = mod
    return _rtc_cache["module"]


def _rtc_launch(p: "_Prepared", modes, outs: dict, device, stream):
    """Launch the NVRTC-compiled kernels ``modes`` on ``stream`` with the grids of ``launch_plan``
    (CuPy; the launches are checked on the CPU with a stand-in module, the kernels only on a GPU)."""
    import cupy
    import numpy as np

    if p.prob["dtype"] not in _RTC_TYPES:
        raise RuntimeError("the native CUDA kernels take float32, float16 or bfloat16 inputs")
    mod = _rtc_module()
    pr = p.prob
    raw = _C.kparams(p.spec, pr, {key: int(v or 0) for key, v in outs.items()})
    buf = torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(device, non_blocking=False)
    t = _RTC_TYPES[pr["dtype"]]
    dist = "true" if p.dist else "false"
    sync = _C.sync_check()
    with cupy.cuda.Device(device.index), cupy.cuda.ExternalStream(stream):
        for mode in modes:
            grad_out = mode == "bwd_dk" or (mode == "bwd_dq" and bool(outs.get("dq")))
            plan = _C.launch_plan(_RTC_MODES[mode], pr["n"], pr["m"], pr["d"],
                                  4 if t == "float" else 2, dist == "true", grad_out)
            grid = plan["grid"]
            if grid[0] == 0 or grid[1] == 0:
                continue
            name = f"tilecl::tile_kernel_rtc<{t},{_RTC_MODES[mode]},{dist}>"
            mod.get_function(name)(grid, (plan["threads"],), (np.uint64(buf.data_ptr()),))
            if sync:
                _sync_checked(name, grid, device)
    # buf may be freed now: the caching allocator reuses it only in the order of this stream


def _not_built():
    """Why tilecl._C cannot be imported: the install's own note when it skipped the build."""
    try:
        note = Path(__file__).with_name("_native_skipped.txt").read_text().strip()
    except OSError:
        note = ""
    if note:
        return f"tilecl._C was not built at install ({note}); the other backends work"
    return (f"tilecl._C is not built ({_IMPORT_ERROR}); reinstall with a C++ compiler, CMake and "
            "pybind11 (pip install -v . shows the build)")


def unavailable(device):
    """None when the native backend can run on ``device``, else the reason."""
    device = torch.device(device)
    if _C is None:
        return _not_built()
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


# the rest of the backend protocol (_backends.Backend)
backward_final = None  # the Function finishes the fp32 gradients
forward_with_dq = finish_dq = None
upcast_inputs = False  # the kernels upcast in registers
prefix_sweep = False
