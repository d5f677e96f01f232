"""Argument checks of the public API: every error names the argument and what was expected."""

from __future__ import annotations

import contextlib
import functools
import math

import torch

from ._spec import compute_dtype  # noqa: F401  (losses.py uses C.compute_dtype)

REDUCTIONS = ("mean", "sum", "none")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# > 0 while a public loss runs that was called under torch.autocast (autocast itself is off
# inside): feature tensors of different float dtypes are then computed in the widest of them.
# A module-level count rather than a ContextVar: torch.compile traces a global's update.
_UNDER_AUTOCAST = 0


def autocast_on(device) -> bool:
    """Whether torch.autocast is enabled for ``device``'s type."""
    try:
        return bool(torch.is_autocast_enabled(device.type))
    except TypeError:  # torch < 2.4: no device argument
        return bool(torch.is_autocast_cpu_enabled() if device.type == "cpu"
                    else torch.is_autocast_enabled())


def autocast_rule(fn):
    """Decorator of the public losses. Under ``torch.autocast`` a loss runs with autocast off,
    at the precision of its inputs (fp32 accumulation, as for F.cross_entropy, which autocast
    runs in fp32), and features of different float dtypes (bf16 image features against cached
    fp32 text features) are computed in the wider dtype instead of being refused."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        dev = next((a.device for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)),
                   None)
        if dev is None or not autocast_on(dev):
            return fn(*args, **kwargs)
        global _UNDER_AUTOCAST
        _UNDER_AUTOCAST += 1
        try:
            with torch.autocast(dev.type, enabled=False):
                return fn(*args, **kwargs)
        finally:
            _UNDER_AUTOCAST -= 1

    return run


def autocast_off(device):
    """A context with autocast off for ``device`` (a no-op where it is off already): the tile
    backward recomputes logits at the forward's precision whatever context it is called in."""
    if not autocast_on(device):
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


def widest(*ts):
    """The tensors (None passes) in the widest float dtype among them: called by a loss under
    torch.autocast only, where ``features`` let different dtypes through."""
    dts = [t.dtype for t in ts if t is not None]
    dt = functools.reduce(torch.promote_types, dts)
    out = tuple(t if t is None or t.dtype == dt else t.to(dt) for t in ts)
    return out


def features(t, name, *, dim=2, like=None, like_name=None, same_rows=False, same_cols=True,
             allow_empty=False, shape=None):
    """A floating [rows, D] (or [B, V, D] for dim=3) tensor, matching ``like``; non-empty unless
    ``allow_empty`` (a rank's shard under the ring may hold no rows)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if t.dim() != dim:
        shape = shape or ("[N, D]" if dim == 2 else "[B, V, D]")
        raise ValueError(f"{name} must be {dim}-D {shape}, got shape {tuple(t.shape)}")
    if (t.shape[0] == 0 and not allow_empty) or t.shape[-1] == 0 or (dim == 3 and t.shape[1] == 0):
        raise ValueError(f"{name} must be non-empty, got shape {tuple(t.shape)}")
    if like is not None:
        if t.device != like.device:
            raise ValueError(f"{name} is on {t.device} but {like_name} is on {like.device}")
        if t.dtype != like.dtype and not _UNDER_AUTOCAST:
            raise TypeError(f"{name} has dtype {t.dtype} but {like_name} has {like.dtype}: cast "
                            f"one of them (under torch.autocast the wider dtype is used)")
        if same_cols and t.shape[-1] != like.shape[-1]:
            raise ValueError(f"{name} has feature dimension {t.shape[-1]} but {like_name} has "
                             f"{like.shape[-1]}")
        if same_rows and t.shape[0] != like.shape[0]:
            raise ValueError(f"{name} must have as many rows as {like_name} ({like.shape[0]}), "
                             f"got {t.shape[0]}")
    return t


def positive_scalar(value, name, like):
    """A float or 0-dim tensor > 0, as a 0-dim tensor in the compute dtype (grad preserved)."""
    if isinstance(value, bool) or value is None:
        raise TypeError(f"{name} must be a float or a 0-dim tensor, got {value!r}")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dim() > 1:
            raise ValueError(f"{name} must be a scalar (0-dim tensor), got shape {tuple(value.shape)}")
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {value.dtype}")
        if value.device != like.device and value.device.type != "cpu":
            raise ValueError(f"{name} is on {value.device} but the features are on {like.device}")
        t = value.reshape(()).to(device=like.device, dtype=compute_dtype(like))
        if torch.compiler.is_compiling():  # its value is not known while tracing
            return t
        v = float(value.detach())
    elif isinstance(value, (int, float)):
        v = float(value)
        t = torch.tensor(v, dtype=compute_dtype(like), device=like.device)
    else:
        raise TypeError(f"{name} must be a float or a 0-dim tensor, got {type(value).__name__}")
    if not (v > 0 and math.isfinite(v)):
        raise ValueError(f"{name} must be positive and finite, got {v}")
    return t


def real_scalar(value, name, like):
    """A float or 0-dim tensor (any sign), as a 0-dim tensor in the compute dtype."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dim() > 1:
            raise ValueError(f"{name} must be a scalar (0-dim tensor), got shape {tuple(value.shape)}")
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {value.dtype}")
        return value.reshape(()).to(device=like.device, dtype=compute_dtype(like))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
        return torch.tensor(float(value), dtype=compute_dtype(like), device=like.device)
    raise TypeError(f"{name} must be a float or a 0-dim tensor, got {type(value).__name__}")


def plain_positive(value, name):
    """A positive finite Python number (hyper-parameters without gradient)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be positive and finite, got {value}")
    return float(value)


def per_row(value, name, n, like):
    """A positive finite float tensor [n] (one value per anchor) in the compute dtype."""
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {value.dtype}")
    if value.dim() != 1 or value.shape[0] != n:
        raise ValueError(f"{name} must be a scalar or have shape [{n}] (one per anchor), got "
                         f"{tuple(value.shape)}")
    if value.device != like.device:
        raise ValueError(f"{name} is on {value.device} but the features are on {like.device}")
    v = value.detach()
    if n and not bool(((v > 0) & torch.isfinite(v)).all()):
        raise ValueError(f"{name} must be positive and finite everywhere")
    return value.to(compute_dtype(like))


def _is_vector(value):
    return isinstance(value, torch.Tensor) and value.dim() == 1 and value.numel() != 1


def scale(temperature, logit_scale, like, *, default_temperature=None, rows=None):
    """alpha from exactly one of temperature (alpha = 1 / temperature) and logit_scale;
    with ``rows`` given, either may also be a tensor [rows] (one value per anchor)."""
    if temperature is not None and logit_scale is not None:
        raise ValueError("give exactly one of temperature and logit_scale, not both")
    if rows is not None:
        if _is_vector(logit_scale):
            return per_row(logit_scale, "logit_scale", rows, like)
        if _is_vector(temperature):
            return 1.0 / per_row(temperature, "temperature", rows, like)
    if logit_scale is not None:
        return positive_scalar(logit_scale, "logit_scale", like)
    if temperature is None:
        if default_temperature is None:
            raise ValueError("give exactly one of temperature and logit_scale")
        temperature = default_temperature
    return 1.0 / positive_scalar(temperature, "temperature", like)


def labels(t, name, n, like):
    """An integer [n] tensor on the features' device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integers, got {type(t).__name__}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must have shape [{n}], got {tuple(t.shape)}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but the features are on {like.device}")
    return t.long()


def index(t, name, n, upper, like):
    """An integer [n] tensor with values in [0, upper)."""
    t = labels(t, name, n, like)
    if n and (int(t.min()) < 0 or int(t.max()) >= upper):
        raise ValueError(f"{name} values must lie in [0, {upper}), got [{int(t.min())}, "
                         f"{int(t.max())}]")
    return t


def choice(value, name, options):
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value


def reduction(value):
    return choice(value, "reduction", REDUCTIONS)
