"""Backend registry and ``backend="auto"`` selection (docs/architecture.md, Backends).

A tile backend is a module that provides every name of :class:`Backend` (a capability it lacks
is None / False, declared, never probed). ``reference`` is not a tile backend: ``losses.py``
routes it to the dense oracle.
"""

from __future__ import annotations

import importlib
import os
import warnings
from typing import Callable, Optional, Protocol

import torch


class Backend(Protocol):
    """What a tile backend module provides (``_torch_tiled.py`` is the readable one)."""

    def unavailable(self, device: torch.device) -> Optional[str]:
        """None when the backend can run on ``device``, else a sentence saying why not."""

    def forward(self, spec, q, k, alpha, bias, aux) -> tuple:
        """(stats [S, N], col_lse [M] or None[, (top vals, top idx)]) of ``_spec.py``."""

    def backward(self, spec, q, k, alpha, bias, aux, stats, col, g_stats, g_col,
                 needs) -> tuple:
        """(dq, dk, dalpha, dbias) in fp32 (float64 for float64), None where not needed."""

    # The gradients finished in the inputs' dtypes within bounded memory, the positive pair and
    # dz = dq + dk of one set included: ``backward_final(spec, q, k, alpha, bias, aux, stats,
    # col, g_stats, g_col, needs, pos, g_pos, single_set, acc=None)``; with ``acc`` (fp32 dq,
    # dk) it adds into them (a block of the ring). None to decline (float64). Or None.
    backward_final: Optional[Callable]
    # A forward that also runs the dq pass (SigLIP: G needs no row statistic), and the step
    # that finishes dq once the upstream gradient is known. Or None.
    forward_with_dq: Optional[Callable]
    finish_dq: Optional[Callable]
    # The backend computes every tile in fp32: the loss layer casts fp16 / bf16 inputs once.
    upcast_inputs: bool
    # The backend runs Matryoshka's nested prefixes in one fused sweep (``_matryoshka.py``).
    prefix_sweep: bool


_PROTOCOL = ("unavailable", "forward", "backward", "backward_final", "forward_with_dq",
             "finish_dq", "upcast_inputs", "prefix_sweep")

NAMES = ("auto", "reference", "torch", "triton", "native")

# tile backends and the module that implements each
_MODULES = {
    "torch": "tilecl._torch_tiled",
    "triton": "tilecl._triton",
    "native": "tilecl._native_backend",
}

# Backends whose GPU path has a recorded passing GPU test run (bench/results/). "auto" never
# picks a GPU path that is not listed here (a kernel path is unverified on GPU until then).
VERIFIED_ON_GPU: frozenset = frozenset()

_cache: dict = {}


def _load(name):
    if name not in _cache:
        try:
            mod = importlib.import_module(_MODULES[name])
        except ImportError as exc:  # the backend's dependencies are missing
            mod = exc
        else:
            missing = [a for a in _PROTOCOL if not hasattr(mod, a)]
            if missing:
                raise TypeError(f"tilecl backend module {_MODULES[name]} lacks {missing} of "
                                f"_backends.Backend")
        _cache[name] = mod
    return _cache[name]


def get(name: str) -> Backend:
    """The module of tile backend ``name`` (raises RuntimeError when it cannot be loaded)."""
    mod = _load(name)
    if isinstance(mod, Exception):
        raise RuntimeError(f"tilecl backend {name!r} is not available: {mod}")
    return mod


def unavailable_reason(name: str, device: torch.device):
    """None if backend ``name`` can run on ``device``, else a sentence saying why not."""
    if name == "reference":
        return None
    mod = _load(name)
    if isinstance(mod, Exception):
        return f"it could not be imported ({mod})"
    return mod.unavailable(device)


def available_backends(device=None) -> list:
    """Names of the backends that can run on ``device`` (default: cpu, plus cuda if present)."""
    devices = [torch.device(device)] if device is not None else [torch.device("cpu")] + (
        [torch.device("cuda")] if torch.cuda.is_available() else [])
    names = ["reference"]
    for name in _MODULES:
        if any(unavailable_reason(name, d) is None for d in devices):
            names.append(name)
    return names


def resolve(backend: str, device: torch.device) -> str:
    """Turn the user's ``backend`` argument into a runnable backend name, or raise."""
    if not isinstance(backend, str) or backend not in NAMES:
        raise ValueError(f"backend must be one of {NAMES}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get("TILECL_BACKEND", "").strip()
        if env:
            if env not in NAMES or env == "auto":
                raise ValueError(f"TILECL_BACKEND must be one of {NAMES[1:]}, got {env!r}")
            backend = env
        else:
            return _auto(device)
    why = unavailable_reason(backend, device)
    if why is not None:
        raise RuntimeError(f"tilecl backend {backend!r} cannot run on {device}: {why}; "
                           f"available here: {available_backends(device)}")
    return backend


# torch.compile runs resolve() eagerly and uses its result as a constant (it imports modules,
# which dynamo does not trace). This is what torch._dynamo.assume_constant_result sets; setting
# it directly keeps `import tilecl` from importing torch._dynamo (and through it triton).
resolve._dynamo_marked_constant = True


_warned_auto_gpu = [False]


def _auto(device: torch.device) -> str:
    if device.type == "cuda":
        kernels = ("triton", "native")
        for name in kernels:
            if name in VERIFIED_ON_GPU and unavailable_reason(name, device) is None:
                return name
        if not _warned_auto_gpu[0]:
            _warned_auto_gpu[0] = True
            verified = [n for n in kernels if n in VERIFIED_ON_GPU]
            why = (f"the GPU-verified kernel backends {verified} cannot run here" if verified else
                   "no kernel backend (triton, native) has a recorded passing GPU run yet")
            warnings.warn(
                f"tilecl: backend='auto' on CUDA uses the 'torch' backend (tiled PyTorch): {why}. "
                "Choose a backend with backend='triton' | 'native' | 'torch' or the environment "
                "variable TILECL_BACKEND.", RuntimeWarning, stacklevel=2)
    return "torch"
