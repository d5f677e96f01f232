"""The tile template of tilecl in Triton: the three kernels, one body each for the whole family.

* ``_lse_fwd_kernel`` (``forward.py``): the per-row statistics, or the column LSE;
* ``_lse_bwd_kernel`` (``backward.py``): dq or dk for one chunk of D, recomputing the tiles;
* ``_lse_h_kernel`` (``gemm_h.py``): H = dL/d<q_i, k_j> tiles for the gemm backward.

Shared @triton.jit pieces live in ``tile.py`` (the argument tuples, logits, masks, weights,
online LSE, decorators) and ``topk.py``. This module is the one handle through which the
launchers (``tilecl._triton``, through ``common._lse``) reach the kernels (tests replace it with
stubs).
"""

from .backward import _lse_bwd_kernel
from .forward import _lse_fwd_kernel
from .gemm_h import _lse_h_kernel

__all__ = ["_lse_fwd_kernel", "_lse_bwd_kernel", "_lse_h_kernel"]
