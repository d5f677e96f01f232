"""Release packaging: the sdist holds everything a wheel build needs, and a wheel built from it
installs as pure Python, with one warning, on a machine where the C++ compiler is missing (the
native backend then says it is unavailable, and why). Offline: `python -m build --no-isolation`
with the build tools of this environment; the native part of the build is what `make install`
checks."""

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_IGNORE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__",
                                 "*.so", "results", ".pytest_cache", ".ruff_cache", ".hypothesis",
                                 "_native_skipped.txt")


def _need_build():
    try:
        import build  # noqa: F401
    except ImportError:
        assert os.environ.get("CI", "").lower() != "true", "`build` is missing under CI"
        pytest.skip("the `build` package is not installed (pip install build)")


def test_sdist_to_wheel_without_a_compiler(tmp_path):
    _need_build()
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=_IGNORE)  # the build writes egg-info next to the sources
    env = dict(os.environ, CXX=str(tmp_path / "no-such-c++"))
    for key in ("TILECL_SKIP_NATIVE", "TILECL_REQUIRE_NATIVE"):
        env.pop(key, None)
    dist = tmp_path / "dist"
    # no --sdist / --wheel: `build` makes the sdist, then the wheel from the unpacked sdist
    run = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "-o", str(dist), str(src)],
                         env=env, capture_output=True, text=True)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]

    (sdist,) = dist.glob("tilecl-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for need in ("CMakeLists.txt", "LICENSE", "README.md", "setup.py", "pyproject.toml",
                 "csrc/bindings.cpp", "csrc/tile_math.h", "csrc/cpu/tile_cpu.cpp",
                 "csrc/cpu/kernels_avx2.cpp", "csrc/cuda/tile_kernels.cuh", "tests/cases.py",
                 "tests/conftest.py", "tritonops/lse.py", "python/tilecl/__init__.py"):
        assert need in names, f"{need} is not in the sdist"
    assert not any(n.endswith(".so") for n in names)

    warnings = [line for line in log.splitlines()
                if "WARNING: the native module tilecl._C is not built" in line]
    assert len(warnings) == 1 and "no-such-c++" in warnings[0], log[-4000:]

    (wheel,) = dist.glob("tilecl-*.whl")
    target = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        zf.extractall(target)
    assert "tilecl/tritonops/lse.py" in names and "tilecl/_native_skipped.txt" in names
    assert not any(n.startswith("tilecl/_C") for n in names)
    assert any(n.endswith("licenses/LICENSE") for n in names)

    # the checkout's editable install finds tilecl's submodules through a meta path finder
    # (it would import the checkout's tilecl._C): leave only the unpacked wheel importable
    code = ("import sys\n"
            "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
            "import tilecl, torch\n"
            "from tilecl import _backends\n"
            "print(tilecl.__file__)\n"
            "print(tilecl.available_backends('cpu'))\n"
            "print(_backends.unavailable_reason('native', torch.device('cpu')))\n"
            "q = torch.randn(6, 4)\n"
            "print(float(tilecl.info_nce(q, q.flip(0), temperature=0.5, backend='torch')))\n")
    env = dict(os.environ, PYTHONPATH=str(target))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, cwd=tmp_path).stdout.splitlines()
    assert out[0].startswith(str(target)), out  # the installed wheel, not the checkout
    assert "native" not in out[1] and "torch" in out[1], out
    assert "C++ compiler" in out[2] and "no-such-c++" in out[2], out
