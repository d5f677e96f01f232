"""The public API's shape: one version source, the py.typed marker, type hints and docstrings on
every public function, info_nce's named top-k result, and the one-time warning about a logit
scale that is a temperature or a log scale."""

import inspect
import math
import re
import warnings
from importlib import metadata, resources
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import tilecl
from tilecl import losses

ROOT = Path(__file__).resolve().parents[1]
FUNCTIONS = ["info_nce", "clip_loss", "siglip_loss", "nt_xent", "supcon", "dcl_loss", "hcl_loss",
             "debiased_loss", "cclk_loss", "kernel_info_nce", "uniformity_loss",
             "decoupled_uniformity", "matryoshka_info_nce"]
MODULES = ["InfoNCELoss", "ClipLoss", "NTXentLoss", "SupConLoss", "SigLipLoss"]


def test_version_has_one_source():
    text = (ROOT / "pyproject.toml").read_text()
    m = re.search(r'^version\s*=\s*"([^"]+)"', text, re.M)
    assert m, "pyproject.toml must state the version"
    assert tilecl.__version__ == metadata.version("tilecl") == m.group(1)
    assert "__version__ =" not in (ROOT / "python/tilecl/__init__.py").read_text().replace(
        "__version__: str = _version()", "")


def test_py_typed_is_shipped():
    assert resources.files("tilecl").joinpath("py.typed").is_file()
    files = [ROOT / f for f in ("setup.py", "pyproject.toml", "MANIFEST.in") if (ROOT / f).is_file()]
    build = "".join(f.read_text() for f in files)
    # setuptools ships only the listed package data; scikit-build-core ships the package folder
    assert "py.typed" in build or "scikit_build_core" in build, \
        "the build must list py.typed as package data"


@pytest.mark.parametrize("name", FUNCTIONS)
def test_public_functions_are_typed_and_documented(name):
    fn = getattr(tilecl, name)
    sig = inspect.signature(fn)
    missing = [p for p in sig.parameters.values() if p.annotation is inspect.Parameter.empty]
    assert not missing and sig.return_annotation is not inspect.Signature.empty, name
    doc = inspect.getdoc(fn)
    for part in ("Args:", "Returns:", "Example::"):
        assert part in doc, f"{name}'s docstring lacks {part}"
    assert name in tilecl.__all__


@pytest.mark.parametrize("name", MODULES)
def test_public_modules_are_typed_and_documented(name):
    cls = getattr(tilecl, name)
    for meth in (cls.__init__, cls.forward):
        sig = inspect.signature(meth)
        assert all(p.annotation is not inspect.Parameter.empty
                   for p in list(sig.parameters.values())[1:]), (name, meth.__name__)
    doc = inspect.getdoc(cls)
    assert "Args:" in doc and "Example::" in doc, name
    assert inspect.getdoc(tilecl) and "Example::" in inspect.getdoc(tilecl)


def test_info_nce_topk_returns_a_named_tuple_that_still_unpacks():
    g = torch.Generator().manual_seed(3)
    q = F.normalize(torch.randn(37, 16, generator=g), dim=1)
    k = F.normalize(torch.randn(41, 16, generator=g), dim=1)
    plain = tilecl.info_nce(q, k, temperature=0.1, backend="torch")
    assert isinstance(plain, torch.Tensor)
    out = tilecl.info_nce(q, k, temperature=0.1, topk_negatives=3, backend="torch")
    assert isinstance(out, tilecl.InfoNCEOutput) and isinstance(out, tuple) and len(out) == 2
    loss, hard = out  # the old tuple form keeps working
    assert loss is out.loss and hard is out.hard and out[0] is loss and out[1] is hard
    assert isinstance(hard, tilecl.HardNegatives)
    assert hard.similarity.shape == hard.index.shape == (37, 3)
    torch.testing.assert_close(loss, plain, rtol=1e-6, atol=0)


# ---- the logit-scale warning --------------------------------------------------------------------

@pytest.fixture
def fresh_warning_state():
    losses._SCALE_WARNED.clear()
    yield
    losses._SCALE_WARNED.clear()


def _pair(n=64, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, d, generator=g), dim=1),
            F.normalize(torch.randn(n, d, generator=g), dim=1))


def _scale_warnings(record):
    return [w for w in record if issubclass(w.category, UserWarning)
            and "logit_scale" in str(w.message)]


def test_temperature_as_logit_scale_warns_once(fresh_warning_state):
    a, b = _pair()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        loss = tilecl.clip_loss(a, b, 0.07, backend="torch")
        tilecl.clip_loss(a, b, 0.05, backend="torch")  # once per process: silent now
        tilecl.clip_loss(a, b, torch.tensor(0.07), backend="reference")
    got = _scale_warnings(rec)
    assert len(got) == 1, [str(w.message) for w in rec]
    msg = str(got[0].message)
    assert "logit_scale=0.07 < 1" in msg and "logit_scale.exp()" in msg and "temperature" in msg
    assert got[0].filename == __file__  # points at the caller's line
    assert abs(loss.item() - math.log(64)) < 0.1  # what the user silently got: about log N


def test_siglip_and_modules_warn(fresh_warning_state):
    a, b = _pair()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        tilecl.siglip_loss(a, b, torch.tensor(0.5), -10.0, backend="torch")
        tilecl.siglip_loss(a, b, 0.5, -10.0, backend="torch")
    assert len(_scale_warnings(rec)) == 1 and "siglip_loss" in str(rec[0].message)
    losses._SCALE_WARNED.clear()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        tilecl.ClipLoss(temperature=14.3, learnable=False)(a, b)  # a scale passed as temperature
    assert len(_scale_warnings(rec)) == 1


def test_un_exponentiated_log_scale_parameter_warns(fresh_warning_state):
    a, b = _pair()
    log_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # open_clip's stored t
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        tilecl.clip_loss(a, b, log_scale.exp(), backend="torch")  # right: silent
        assert not _scale_warnings(rec)
        tilecl.clip_loss(a, b, log_scale, backend="torch")  # the parameter itself
    got = _scale_warnings(rec)
    assert len(got) == 1 and "nn.Parameter" in str(got[0].message)
    assert "14.29" in str(got[0].message)


@pytest.mark.parametrize("scale", [1.0, 14.3, 100.0, "tensor", "learnable"])
def test_normal_scales_do_not_warn(fresh_warning_state, scale):
    a, b = _pair()
    if scale == "tensor":
        scale = torch.tensor(1 / 0.07, requires_grad=True)
    elif scale == "learnable":
        scale = torch.nn.Parameter(torch.tensor(20.0))  # a parameter that is the scale itself
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        tilecl.clip_loss(a, b, scale, backend="torch")
        tilecl.siglip_loss(a, b, 10.0 if isinstance(scale, float) else scale, -10.0,
                           backend="torch")
        tilecl.ClipLoss()(a, b)
        tilecl.SigLipLoss()(a, b)
        tilecl.info_nce(a, b, temperature=0.07, symmetric=True)
    assert not _scale_warnings(rec)


def test_scale_check_is_skipped_under_torch_compile(fresh_warning_state):
    # fullgraph=True fails on any graph break: the check (a Python branch on the value, a
    # float() of a tensor) must not run while dynamo traces
    @torch.compile(backend="eager", fullgraph=True)
    def f(x, s):
        losses._check_logit_scale(s, "clip_loss")
        losses._check_logit_scale(0.07, "siglip_loss")
        return x * s

    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = f(torch.ones(3), torch.tensor(0.07))
    torch.testing.assert_close(out, torch.full((3,), 0.07))
    assert not _scale_warnings(rec) and not losses._SCALE_WARNED
