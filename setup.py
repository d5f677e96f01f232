"""Build of tilecl: the Python package (python/tilecl), the Triton kernels (tritonops/ installed as
tilecl.tritonops) and the compiled module tilecl._C, built by CMakeLists.txt (the one build
description) through CMake + pybind11 + ninja.

Environment (STYLE.md 8):
  TILECL_BUILD_CUDA=1    also compile the CUDA kernels into tilecl._C (needs nvcc); off by default
                         so that a plain `pip install` stays a fast CPU build
  TILECL_SKIP_CUDA=1     never compile CUDA (wins over TILECL_BUILD_CUDA)
  TILECL_CUDA_ARCHS      CUDA architectures, default "80;90"
  TILECL_SKIP_NATIVE=1   do not build tilecl._C at all (pure Python install)
  DEBUG=1                debug build (-O0 -g)
  MAX_JOBS               parallel compile jobs
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _nvcc():
    for cand in (os.environ.get("CUDACXX"), shutil.which("nvcc")):
        if cand and os.path.exists(cand):
            return cand
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return None


def _tool(name, module):
    """The executable `name` from PATH, else from the pip package `module` (build requirement)."""
    found = shutil.which(name)
    if found:
        return found
    try:
        mod = __import__(module)
        bin_dir = getattr(mod, "BIN_DIR", None) or getattr(mod, "CMAKE_BIN_DIR", None)
        if bin_dir and os.path.exists(os.path.join(bin_dir, name)):
            return os.path.join(bin_dir, name)
    except ImportError:
        pass
    return None


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import pybind11

        cmake = _tool("cmake", "cmake")
        if cmake is None:
            raise RuntimeError("tilecl: cmake >= 3.18 is needed to build tilecl._C")
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        cfg = "Debug" if _flag("DEBUG") else "Release"
        args = [
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DTILECL_OUTPUT_DIR={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
        ]
        ninja = _tool("ninja", "ninja")
        if ninja:
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        nvcc = _nvcc()
        if _flag("TILECL_SKIP_CUDA"):
            why = "TILECL_SKIP_CUDA is set"
        elif not _flag("TILECL_BUILD_CUDA"):
            why = "TILECL_BUILD_CUDA=1 is not set (the default CPU-only build)"
        elif nvcc is None:
            why = "nvcc was not found (CUDA_HOME, PATH)"
        else:
            why = None
        if why is None:
            archs = os.environ.get("TILECL_CUDA_ARCHS", "80;90").replace(",", ";")
            args += ["-DTILECL_WITH_CUDA=ON", f"-DCMAKE_CUDA_COMPILER={nvcc}",
                     f"-DTILECL_CUDA_ARCHS={archs}"]
            print(f"tilecl: building tilecl._C with CUDA ({nvcc}, archs {archs})", flush=True)
        else:
            args += ["-DTILECL_WITH_CUDA=OFF"]
            print(f"tilecl: building tilecl._C for CPU only: {why}. CUDA tensors will use the "
                  "NVRTC (CuPy) path of the native backend if available.", flush=True)
        build = ["--build", str(build_dir), "--config", cfg]
        jobs = os.environ.get("MAX_JOBS")
        if jobs:
            build += ["--parallel", jobs]
        subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_dir)] + args, check=True)
        subprocess.run([cmake] + build, check=True)


ext_modules = [] if _flag("TILECL_SKIP_NATIVE") else [CMakeExtension("tilecl._C")]

setup(
    package_dir={"tilecl": "python/tilecl", "tilecl.tritonops": "tritonops"},
    packages=["tilecl", "tilecl.tritonops", "tilecl.compat"],
    package_data={"tilecl": ["py.typed"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": CMakeBuild},
)
