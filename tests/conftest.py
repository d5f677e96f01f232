"""Shared fixtures: a fixed seed per test, small odd tiles for the torch backend, and an assert
helper that says where and by how much two tensors differ."""

import glob
import os
import random

# Triton kernels run under the interpreter on a machine without an NVIDIA GPU. The variable must
# be set before anything imports triton (torch's flop counter and inductor helpers do), so it
# is set here, first, for the whole session: tests/test_triton_backend.py then works whatever
# ran before it.
if not glob.glob("/dev/nvidia[0-9]*"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import tilecl._torch_tiled as torch_tiled

# tiles that the test shapes (1, 7, 63, 65, 130) do not divide
TEST_TILE = (16, 24)


def on_ci() -> bool:
    """CI=true: the machine builds everything the suite tests, so nothing may skip for a missing
    build or missing data."""
    return os.environ.get("CI", "").lower() == "true"


def skip_or_fail(reason, *, module=False):
    """pytest.skip locally; under CI=true a missing piece fails the run instead."""
    if on_ci():
        pytest.fail(f"CI=true, but {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=module)


@pytest.fixture(autouse=True)
def _seed_and_tiles():
    torch.manual_seed(0)
    random.seed(0)
    torch_tiled.set_tile_size(*TEST_TILE)
    yield
    torch_tiled.reset_tile_size()  # the default choice again (tile_plan per device)


def rel_err(actual, expected):
    """max |a - e| / max |e| (0 when both are all zero)."""
    a, e = actual.detach().double(), expected.detach().double()
    scale = e.abs().max().item() if e.numel() else 0.0
    diff = (a - e).abs().max().item() if e.numel() else 0.0
    if scale == 0.0:
        return diff
    return diff / scale


def assert_rel(actual, expected, tol, what):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual.detach()).all() == torch.isfinite(expected.detach()).all(), (
        f"{what}: non-finite values differ")
    err = rel_err(actual, expected)
    if not err <= tol:
        d = (actual.detach().double() - expected.detach().double()).abs()
        where = tuple(int(i) for i in torch.nonzero(d == d.max())[0]) if d.dim() else ()
        raise AssertionError(f"{what}: rel. error {err:.3e} > {tol:.1e} (worst at {where}: "
                             f"{actual.detach().reshape(-1)[d.argmax()].item():.6g} vs "
                             f"{expected.detach().reshape(-1)[d.argmax()].item():.6g})")


def kernel_args(kernel, args, meta) -> dict:
    """A Triton kernel launch's arguments by parameter name (positional ``args``, keyword
    ``meta``; ``kernel`` possibly wrapped by autotune / heuristics)."""
    import inspect

    f = kernel
    while not inspect.isfunction(f):
        f = f.fn
    return dict(zip(inspect.signature(f).parameters, args), **meta)


def cpu_backends():
    """Tile backends that can run on this CPU. The triton backend joins the loss-level sweeps
    only on request (TILECL_TEST_TRITON=1, about 10 more minutes under the interpreter);
    tests/test_triton_backend.py covers its kernels in every run. Under CI=true a native
    backend that cannot run (tilecl._C not built or not importable) is an error, not a silently
    shorter list."""
    from tilecl._backends import unavailable_reason

    names = ["torch"]
    for name in ("native", "triton"):
        if name == "triton" and (os.environ.get("TRITON_INTERPRET") != "1"
                                 or os.environ.get("TILECL_TEST_TRITON") != "1"):
            continue
        why = unavailable_reason(name, torch.device("cpu"))
        if why is None:
            names.append(name)
        elif name == "native" and on_ci():
            raise RuntimeError(f"CI=true, but the native backend cannot run on this CPU: {why}")
    return names
