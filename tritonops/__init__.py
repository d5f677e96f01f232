"""Triton kernels of tilecl (installed as tilecl.tritonops).

* ``lse``: the tile template, ``_lse_fwd_kernel`` (row statistics / column LSE) and
  ``_lse_bwd_kernel`` (dq / dk), one body for the whole loss family (math.md 1, 12);
* ``configs``: the autotune candidates, their pruning and the fixed interpreter config.

Launchers live in ``tilecl._triton_backend``; nothing here is imported eagerly, so importing the
package does not need Triton.
"""
