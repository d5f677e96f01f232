"""Triton kernels of tilecl (installed as tilecl.tritonops)."""
