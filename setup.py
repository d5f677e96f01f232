"""Build of tilecl: the Python package (python/tilecl), the Triton kernels (tritonops/ installed as
tilecl.tritonops) and the compiled module tilecl._C, built by CMakeLists.txt (the one build
description) through CMake + pybind11 + ninja.

setuptools with a MANIFEST.in rather than scikit-build-core: the compiled module is optional. When
the C++ compiler, CMake or pybind11 is missing, or CMake fails, the install goes on as pure Python
with one warning (the native backend then says it is unavailable, and why); scikit-build-core
makes the CMake build the wheel itself, so it cannot fall back. This also keeps the offline
developer install (`pip install --no-build-isolation -e .`) and adds no build dependency.
MANIFEST.in puts CMakeLists.txt, csrc/, the tests and the license into the sdist, so
sdist -> wheel builds the same thing as a checkout (tests/test_packaging.py).

Environment:
  TILECL_BUILD_CUDA=1    also compile the CUDA kernels into tilecl._C (needs nvcc); off by default
                         so that a plain `pip install` stays a fast CPU build
  TILECL_SKIP_CUDA=1     never compile CUDA (wins over TILECL_BUILD_CUDA)
  TILECL_CUDA_ARCHS      CUDA architectures, default "80;90"
  TILECL_SKIP_NATIVE=1   do not build tilecl._C at all (pure Python install)
  TILECL_REQUIRE_NATIVE=1  fail instead of falling back to pure Python (`make install` sets it)
  TILECL_LTO=1           link-time optimisation of tilecl._C. Off by default: it moves the code
                         generation of all kernels into one serial link step (measured on 2 busy
                         cores: the same 112-114 s of CPU time, but a 496 s link, where without
                         LTO the kernel files compile in parallel and link in 1 s), and the CPU
                         kernels ran no faster (clip_loss fwd + bwd, fp32, N = 2048, D = 128, one
                         thread, both builds alternated in one process: median 64.2 ms without,
                         65.3 ms with)
  CXX                    the C++ compiler (else c++, g++ or clang++ from PATH)
  DEBUG=1                debug build (-O0 -g)
  MAX_JOBS               parallel compile jobs
"""

import os
import shutil
import subprocess
import sys
import time
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


def _cxx():
    """The C++ compiler CMake will use (CXX, else the usual names on PATH), or None."""
    cxx = os.environ.get("CXX", "").strip()
    if cxx:
        return shutil.which(cxx.split()[0])
    for name in ("c++", "g++", "clang++"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def _missing():
    """What the native build needs and is not there (empty when it can be attempted)."""
    missing = []
    if _cxx() is None:
        cxx = os.environ.get("CXX", "").strip()
        missing.append(f"the C++ compiler CXX={cxx!r} was not found" if cxx else
                       "no C++ compiler (c++, g++ or clang++ on PATH, or CXX)")
    if _tool("cmake", "cmake") is None:
        missing.append("cmake >= 3.18 (pip install cmake)")
    try:
        import pybind11  # noqa: F401
    except ImportError:
        missing.append("pybind11 (pip install pybind11)")
    return missing


# Written next to the package when the native build is skipped; the native backend reads it to
# say why it is unavailable.
SKIPPED_NOTE = "_native_skipped.txt"


class CMakeBuild(build_ext):
    def run(self):
        if not self.extensions:
            return
        missing = _missing()
        if missing:
            self._skip("; ".join(missing))
            return
        try:
            super().run()
        except (subprocess.CalledProcessError, OSError) as exc:
            self._skip(f"the CMake build failed ({exc}); `pip install -v .` shows its output")
            return
        self._note(None)

    def _note(self, text):
        """Write (or with None remove) the note saying why tilecl._C was not built, where the
        module would have gone (the build tree, or the source tree for an editable install)."""
        note = Path(self.get_ext_fullpath("tilecl._C")).resolve().parent / SKIPPED_NOTE
        if text is None:
            note.unlink(missing_ok=True)
        else:
            note.parent.mkdir(parents=True, exist_ok=True)
            note.write_text(text + "\n")

    def _skip(self, why):
        if _flag("TILECL_REQUIRE_NATIVE"):
            raise RuntimeError(f"tilecl: cannot build the native module tilecl._C: {why} "
                               "(TILECL_REQUIRE_NATIVE is set)")
        message = (f"tilecl: WARNING: the native module tilecl._C is not built: {why}. tilecl is "
                   "installed as pure Python: the reference, torch and triton backends work, the "
                   "native backend is unavailable. Set TILECL_SKIP_NATIVE=1 to skip it quietly.")
        print(message, file=sys.stderr, flush=True)
        self._note(why)
        self.extensions = []

    def get_outputs(self):
        return super().get_outputs() if self.extensions else []

    def build_extension(self, ext):
        import pybind11

        cmake = _tool("cmake", "cmake")
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        cfg = "Debug" if _flag("DEBUG") else "Release"
        lto = _flag("TILECL_LTO")
        args = [
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DTILECL_OUTPUT_DIR={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DTILECL_LTO={'ON' if lto else 'OFF'}",
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
            what = f"the C++ CPU kernels and the CUDA kernels ({nvcc}, archs {archs})"
        else:
            args += ["-DTILECL_WITH_CUDA=OFF"]
            what = (f"the C++ CPU kernels only ({why}; CUDA tensors will use the NVRTC (CuPy) "
                    "path of the native backend if available)")
        print(f"tilecl: building the native module tilecl._C: {what}, {cfg}, LTO "
              f"{'on' if lto else 'off (TILECL_LTO=1 turns it on)'}, compiler {_cxx()}, "
              f"into {out_dir}", flush=True)
        build = ["--build", str(build_dir), "--config", cfg]
        jobs = os.environ.get("MAX_JOBS")
        if jobs:
            build += ["--parallel", jobs]
        start = time.perf_counter()
        subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_dir)] + args, check=True)
        subprocess.run([cmake] + build, check=True)
        print(f"tilecl: built tilecl._C in {time.perf_counter() - start:.0f} s", flush=True)


ext_modules = [] if _flag("TILECL_SKIP_NATIVE") else [CMakeExtension("tilecl._C")]

setup(
    package_dir={"tilecl": "python/tilecl", "tilecl.tritonops": "tritonops"},
    packages=["tilecl", "tilecl._triton", "tilecl.tritonops", "tilecl.compat"],
    package_data={"tilecl": ["py.typed"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": CMakeBuild},
)
