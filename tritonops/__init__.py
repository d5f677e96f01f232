"""Triton kernels of tilecl (installed as tilecl.tritonops).

* ``lse``: the three kernels of the tile template (``forward``, ``backward``, ``gemm_h``;
  shared jit pieces in ``tile`` and ``topk``), one body for the whole loss family (math.md 1, 12);
* ``configs``: the autotune candidates, their pruning and the fixed interpreter config.

Launchers live in ``tilecl._triton`` (``launch``, ``gemm``, ``bounded``); nothing here is
imported eagerly, so importing the package does not need Triton.
"""
