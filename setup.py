"""Build of tilecl: the Python package (python/tilecl), the Triton kernels (tritonops/ installed as
tilecl.tritonops) and, when the native backend lands, the compiled module tilecl._C."""

from setuptools import setup

setup(
    package_dir={"tilecl": "python/tilecl", "tilecl.tritonops": "tritonops"},
    packages=["tilecl", "tilecl.tritonops", "tilecl.compat"],
)
