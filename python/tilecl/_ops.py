"""The template's custom ops, declared once for every backend that registers one.

Each kernel backend exposes its forward / backward as ``torch.ops.tilecl.<name>`` so torch.compile
sees one opaque op with a fake (shape-only) implementation instead of tracing into a launcher.
Every op takes the same prefix, the problem of ``_spec.py`` in its one encoding::

    q, k, alpha, bias?, excl?, pos?, labels_q?, labels_k?, weight?, wa?, wb?, thresh?,
    col_offset: int, spec: str (TileSpec.key())

then its own arguments. Absent outputs are empty tensors inside an op (a schema cannot return None)
and become None again in the backend's wrapper. The ops are declared with a schema string on a
torch.library.Library: unlike ``torch.library.custom_op`` (which imports torch's compiler stack on
first use) this costs nothing at import or at the first call; ``register_fake`` only records a
function, run by FakeTensor when torch.compile traces.
"""

from __future__ import annotations

from typing import Callable

import torch

from ._spec import AUX_FIELDS, TileAux, TileSpec, spec_from_key

_LIB = torch.library.Library("tilecl", "FRAGMENT")  # kept alive: the registrations live with it

PREFIX = ("Tensor q, Tensor k, Tensor alpha, Tensor? bias, "
          + ", ".join(f"Tensor? {name}" for name in AUX_FIELDS) + ", int col_offset, str spec")
_N_AUX = len(AUX_FIELDS)


def prefix_args(spec: TileSpec, q, k, alpha, bias, aux: TileAux) -> tuple:
    """The values of :data:`PREFIX` for one problem."""
    return (q, k, alpha, bias, *aux.tensors(), int(aux.col_offset), spec.key())


def _unpacked(fn: Callable) -> Callable:
    """An op body ``fn(spec, q, k, alpha, bias, aux, *own_args)`` as the schema calls it."""

    def op(q, k, alpha, bias, *rest):
        aux = TileAux.from_tensors(rest[:_N_AUX], rest[_N_AUX])
        return fn(spec_from_key(rest[_N_AUX + 1]), q, k, alpha, bias, aux, *rest[_N_AUX + 2:])

    op.__name__ = getattr(fn, "__name__", "op")
    return op


class TileOp:
    """One declared op: ``op(spec, q, k, alpha, bias, aux, *own)`` calls ``torch.ops.tilecl.name``
    (``overload``), or its implementation directly while :data:`DIRECT` is set (tests that count
    the tensors an implementation allocates: a dispatch mode sees only an op's outputs)."""

    def __init__(self, name: str, impl: Callable):
        self.name, self.impl = name, impl
        self.overload = getattr(torch.ops.tilecl, name).default

    def __call__(self, spec: TileSpec, q, k, alpha, bias, aux: TileAux, *own):
        if DIRECT:
            return self.impl(spec, q, k, alpha, bias, aux, *own)
        return self.overload(*prefix_args(spec, q, k, alpha, bias, aux), *own)


DIRECT = False


def define(name: str, own_args: str, returns: str, impl: Callable, fake: Callable,
           dispatch_keys=("CPU", "CUDA")) -> TileOp:
    """Declare ``tilecl::name(PREFIX, own_args) -> returns``.

    ``impl`` and ``fake`` take ``(spec: TileSpec, q, k, alpha, bias, aux: TileAux, *own)``.
    """
    _LIB.define(f"{name}({PREFIX}{', ' + own_args if own_args else ''}) -> {returns}")
    for key in dispatch_keys:
        _LIB.impl(name, _unpacked(impl), key)
    torch.library.register_fake(f"tilecl::{name}", _unpacked(fake), lib=_LIB)
    return TileOp(name, impl)


# the outputs every tile op returns: four tensors, empty where absent
OUT4 = "(Tensor, Tensor, Tensor, Tensor)"
# the backward's own arguments after the prefix
BWD_ARGS = "Tensor stats, Tensor? col, Tensor g_stats, Tensor? g_col, bool[] needs"
