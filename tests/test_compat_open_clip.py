"""tilecl.compat.open_clip against the installed open_clip package (open_clip_torch 3.3.0).

How open_clip is imported: its wheel needs torchvision, whose PyPI wheels pin one torch build each
(torchvision 0.28.0 pins torch==2.13.0 but is built against the CUDA torch, so its compiled ops do
not load next to the CPU torch 2.13.0 wheel this project tests with: ``import torchvision`` raises
"operator torchvision::nms does not exist"). open_clip uses torchvision only for image transforms
(open_clip/transform.py) and FrozenBatchNorm2d (open_clip/utils.py), none of which the losses, the
text/vision towers or ``create_loss`` touch. When torchvision does not import, ``_import_open_clip``
puts placeholder modules for those torchvision names into ``sys.modules`` for the duration of
``import open_clip`` (any use of a placeholder raises), then removes them again; everything else
(open_clip.loss, open_clip.factory.create_loss, open_clip.model.CLIP) is open_clip's own code as
installed. With a working torchvision the real one is used.

Under CI=true a missing open_clip fails instead of skipping.
"""

import importlib
import importlib.util
import os
import sys
import types
from types import SimpleNamespace

import pytest
import torch

from tilecl.compat import open_clip as ours

_TV_NAMES = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional",
             "torchvision.ops", "torchvision.ops.misc")


class _PlaceholderMeta(type):
    def __getattr__(cls, name):           # InterpolationMode.BICUBIC and the like
        if name.startswith("__"):
            raise AttributeError(name)
        return f"{cls.__name__}.{name}"


def _placeholder(qualname):
    def __init__(self, *args, **kwargs):
        raise RuntimeError(f"{qualname} is a test placeholder (torchvision did not import)")

    return _PlaceholderMeta(qualname.rsplit(".", 1)[-1], (), {"__init__": __init__})


class _PlaceholderModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _placeholder(f"{self.__name__}.{name}")


def _import_open_clip():
    if "open_clip" in sys.modules:
        return sys.modules["open_clip"]
    try:
        importlib.import_module("torchvision")
        return importlib.import_module("open_clip")
    except ImportError:
        if importlib.util.find_spec("open_clip") is None:
            raise
    except (RuntimeError, OSError):
        pass
    # transformers' own imports first: open_clip.hf_model imports it, and it must not see the
    # placeholders while it probes for torchvision
    if importlib.util.find_spec("transformers") is not None:
        importlib.import_module("transformers.modeling_outputs")
    saved = {n: sys.modules.pop(n) for n in list(sys.modules) if n.split(".")[0] == "torchvision"}
    sys.modules.update({n: _PlaceholderModule(n) for n in _TV_NAMES})
    try:
        return importlib.import_module("open_clip")
    finally:
        for n in _TV_NAMES:
            sys.modules.pop(n, None)
        sys.modules.update(saved)


try:
    oc = _import_open_clip()
except ImportError:
    if os.environ.get("CI", "").lower() == "true":
        raise
    pytest.skip("open_clip_torch is not installed", allow_module_level=True)


@pytest.fixture(autouse=True)
def _restore():
    yield
    ours.unpatch()


def _features(n=37, d=19, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1)
    return img.requires_grad_(), txt.requires_grad_()


def _loss_and_grads(fn, inputs):
    loss = fn(*inputs)
    upstream = 0.7                              # a non-unit upstream gradient
    grads = torch.autograd.grad(loss * upstream, [t for t in inputs if t.requires_grad])
    return loss.detach(), grads


def _assert_same(a, b, rtol=1e-10):
    la, ga = a
    lb, gb = b
    torch.testing.assert_close(la, lb, rtol=rtol, atol=0)
    assert len(ga) == len(gb)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=rtol, atol=1e-12)


def _args(**kw):
    base = dict(distill=False, model="ViT-B-32", siglip=False, local_loss=False,
                gather_with_grad=False, rank=0, world_size=1, horovod=False,
                loss_dist_impl=None)
    base.update(kw)
    return SimpleNamespace(**base)


# ---- drop-in signatures -------------------------------------------------------------------------

def test_clip_loss_logit_bias_matches_open_clip():
    img, txt = _features()
    scale = torch.tensor(13.7, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-2.3, dtype=torch.float64, requires_grad=True)
    ref = _loss_and_grads(lambda i, t, s, b: oc.loss.ClipLoss()(i, t, s, b), [img, txt, scale, bias])
    got = _loss_and_grads(lambda i, t, s, b: ours.ClipLoss(backend="torch")(i, t, s, b),
                          [img, txt, scale, bias])
    _assert_same(got, ref)
    assert got[1][3].abs().item() < 1e-12             # d loss / d bias = 0, and not None
    # keyword, as open_clip's training loop calls it: loss(**model_out, output_dict=True)
    out = ours.ClipLoss()(image_features=img, text_features=txt, logit_scale=scale,
                          logit_bias=bias, output_dict=True)
    assert set(out) == {"contrastive_loss"}
    # a positional bias is the bias, not output_dict
    assert isinstance(ours.ClipLoss()(img, txt, scale, bias), torch.Tensor)
    nan_bias = torch.tensor(float("nan"), dtype=torch.float64)
    assert torch.isnan(ours.ClipLoss()(img, txt, scale, nan_bias))
    with pytest.raises(ValueError, match="logit_bias"):
        ours.ClipLoss()(img, txt, scale, torch.zeros(3, dtype=torch.float64))


def test_signatures_accept_open_clip_arguments():
    ours.SigLipLoss(cache_labels=True, rank=0, world_size=1, dist_impl="shift", chunk_size=256)
    ours.SigLipLoss(False, 0, 1, None, 0)
    with pytest.raises(ValueError, match="dist_impl"):
        ours.SigLipLoss(dist_impl="ring")
    with pytest.raises(ValueError, match="chunk_size"):
        ours.SigLipLoss(chunk_size=-1)
    # every parameter open_clip's installed classes take, ours take under the same name and order
    import inspect
    for name in ("ClipLoss", "SigLipLoss"):
        for meth in ("__init__", "forward"):
            theirs = list(inspect.signature(getattr(getattr(oc.loss, name), meth)).parameters)
            mine = list(inspect.signature(getattr(getattr(ours, name), meth)).parameters)
            assert mine[:len(theirs)] == theirs, (name, meth, mine, theirs)


# ---- patch() ------------------------------------------------------------------------------------

def test_patch_create_loss_same_loss_and_grads():
    img, txt = _features(n=41, d=23, seed=1)
    scale = torch.tensor(9.1, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-4.2, dtype=torch.float64, requires_grad=True)
    clip_ref = oc.create_loss(_args())
    sig_ref = oc.create_loss(_args(siglip=True))
    assert type(clip_ref) is oc.loss.ClipLoss
    ref_c = _loss_and_grads(lambda *a: clip_ref(*a), [img, txt, scale])
    ref_s = _loss_and_grads(lambda *a: sig_ref(*a), [img, txt, scale, bias])

    handle = ours.patch(backend="torch")
    assert ours.is_patched()
    clip_new = oc.create_loss(_args())
    sig_new = oc.create_loss(_args(siglip=True))
    assert isinstance(clip_new, ours.ClipLoss) and clip_new.backend == "torch"
    assert isinstance(sig_new, ours.SigLipLoss)
    assert oc.ClipLoss is oc.loss.ClipLoss is oc.factory.ClipLoss
    assert issubclass(oc.loss.SigLipLoss, ours.SigLipLoss)
    _assert_same(_loss_and_grads(lambda *a: clip_new(*a), [img, txt, scale]), ref_c)
    _assert_same(_loss_and_grads(lambda *a: sig_new(*a), [img, txt, scale, bias]), ref_s)
    # CoCa / distillation losses need the logits: untouched
    assert type(oc.create_loss(_args(distill=True))) is oc.loss.DistillClipLoss
    assert issubclass(oc.loss.DistillClipLoss, type(clip_ref))

    handle.unpatch()
    assert not ours.is_patched()
    assert type(oc.create_loss(_args())) is type(clip_ref) is oc.loss.ClipLoss
    assert oc.factory.SigLipLoss is type(sig_ref)


def test_patch_context_manager_and_repatch():
    orig = oc.loss.ClipLoss
    with ours.patch():
        assert oc.loss.ClipLoss is not orig
        ours.patch(backend="reference")                 # re-install with another backend
        assert oc.create_loss(_args()).backend == "reference"
    assert oc.loss.ClipLoss is orig and oc.ClipLoss is orig and oc.factory.ClipLoss is orig


@pytest.mark.parametrize("with_bias", [False, True], ids=["clip", "clip-with-bias"])
def test_patch_training_step_on_open_clip_model(with_bias):
    """A tiny randomly initialised open_clip CLIP, the training loop's call
    ``loss(**model(images, texts), output_dict=True)``: same loss and parameter gradients as the
    unpatched open_clip loss."""
    torch.manual_seed(0)
    vision = oc.CLIPVisionCfg(layers=1, width=16, head_width=8, patch_size=4, image_size=8)
    text = oc.CLIPTextCfg(context_length=6, vocab_size=40, width=16, heads=2, layers=1)
    model = oc.CLIP(embed_dim=8, vision_cfg=vision, text_cfg=text, output_dict=True,
                    init_logit_bias=-1.5 if with_bias else None).double()
    images = torch.randn(11, 3, 8, 8, dtype=torch.float64)
    texts = torch.randint(0, 40, (11, 6))
    params = [p for p in model.parameters() if p.requires_grad]

    def step(loss_fn):
        out = loss_fn(**model(images, texts), output_dict=True)["contrastive_loss"]
        return out.detach(), torch.autograd.grad(out, params, allow_unused=True)

    model_out = model(images, texts)
    assert ("logit_bias" in model_out) == with_bias
    ref_loss, ref_grads = step(oc.create_loss(_args()))
    with ours.patch(backend="torch"):
        got_loss, got_grads = step(oc.create_loss(_args()))
    torch.testing.assert_close(got_loss, ref_loss, rtol=1e-10, atol=0)
    for g, r in zip(got_grads, ref_grads):
        assert (g is None) == (r is None)
        if g is not None:
            torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-12)
