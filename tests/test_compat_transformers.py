"""tilecl.compat.transformers against the installed transformers' own CLIPModel / SiglipModel, on
tiny randomly initialised configurations (offline, no weights): the same loss and parameter
gradients as the unpatched model with return_loss=True, the output contract, and the N x N logits
no longer allocated (counted by tilecl.memtrack). Under CI=true a missing transformers fails."""

import os

import pytest
import torch

try:
    import transformers
except ImportError:
    if os.environ.get("CI", "").lower() == "true":
        raise
    pytest.skip("transformers is not installed", allow_module_level=True)

import tilecl._torch_tiled as torch_tiled
from tilecl.compat import transformers as tt
from tilecl.memtrack import PeakTensorBytes

TOWER = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2)
SEQ, VOCAB, IMAGE = 5, 40, 8


def _model(kind, seed=0):
    torch.manual_seed(seed)
    text = dict(TOWER, vocab_size=VOCAB, max_position_embeddings=SEQ, bos_token_id=0,
                pad_token_id=1, eos_token_id=VOCAB - 1)
    vision = dict(TOWER, image_size=IMAGE, patch_size=4)
    if kind == "clip":
        cfg = transformers.CLIPConfig(text_config=dict(text, projection_dim=8),
                                      vision_config=dict(vision, projection_dim=8),
                                      projection_dim=8)
        model = transformers.CLIPModel(cfg)
        with torch.no_grad():
            model.logit_scale.fill_(2.1)           # not the init value 2.6592
    else:
        model = transformers.SiglipModel(transformers.SiglipConfig(text_config=text,
                                                                   vision_config=vision))
        with torch.no_grad():
            model.logit_scale.fill_(1.7)
            model.logit_bias.fill_(-3.1)
    return model.double().train()


def _batch(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(input_ids=torch.randint(0, VOCAB, (n, SEQ), generator=g),
                pixel_values=torch.randn(n, 3, IMAGE, IMAGE, generator=g, dtype=torch.float64))


def _loss_and_grads(model, batch):
    params = [p for p in model.parameters() if p.requires_grad]
    out = model(**batch, return_loss=True)
    grads = torch.autograd.grad(out.loss * 0.9, params, allow_unused=True)
    return out, dict(zip([n for n, p in model.named_parameters() if p.requires_grad], grads))


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_same_loss_and_parameter_grads(kind):
    model = _model(kind)
    batch = _batch(13)
    ref_out, ref_grads = _loss_and_grads(model, batch)
    assert tt.apply_to(model, backend="torch") is model and tt.is_applied(model)
    out, grads = _loss_and_grads(model, batch)
    torch.testing.assert_close(out.loss, ref_out.loss, rtol=1e-10, atol=0)
    assert ref_grads.keys() == grads.keys()
    for name, g in grads.items():
        assert (g is None) == (ref_grads[name] is None), name
        if g is not None:
            torch.testing.assert_close(g, ref_grads[name], rtol=1e-8, atol=1e-12, msg=name)
    assert grads["logit_scale"].abs().item() > 1e-6            # scale gradient is checked
    # contract: embeddings and tower outputs as before, logits None unless kept
    torch.testing.assert_close(out.image_embeds, ref_out.image_embeds, rtol=1e-12, atol=0)
    torch.testing.assert_close(out.text_embeds, ref_out.text_embeds, rtol=1e-12, atol=0)
    assert out.logits_per_image is None and out.logits_per_text is None
    assert type(out) is type(ref_out)
    tup = model(**batch, return_loss=True, return_dict=False)
    assert isinstance(tup, tuple) and torch.equal(tup[0], out.loss)
    tt.apply_to(model, backend="torch", keep_logits=True)
    kept = model(**batch, return_loss=True)
    torch.testing.assert_close(kept.logits_per_image, ref_out.logits_per_image, rtol=1e-12,
                               atol=1e-12)
    torch.testing.assert_close(kept.logits_per_text, ref_out.logits_per_text, rtol=1e-12,
                               atol=1e-12)
    # without return_loss: transformers' own forward
    plain = model(**batch)
    assert plain.loss is None and plain.logits_per_image is not None
    tt.remove(model)
    assert not tt.is_applied(model) and "forward" not in vars(model)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_no_n_by_n_logits(kind):
    n = 700
    old = torch_tiled.set_tile_size(64, 128)
    try:
        model = _model(kind).float()
        batch = _batch(n)
        batch["pixel_values"] = batch["pixel_values"].float()

        def peak():
            mode = PeakTensorBytes()
            with mode:
                model(**batch, return_loss=True).loss.backward()
            model.zero_grad(set_to_none=True)
            return mode

        dense = peak()
        tt.apply_to(model, backend="torch")
        tiled = peak()
    finally:
        torch_tiled.set_tile_size(*old)
    nn_bytes = n * n * 4
    assert dense.largest >= nn_bytes                   # transformers holds [N, N] fp32 logits
    assert tiled.largest < nn_bytes / 4, (tiled.largest, nn_bytes)
    assert tiled.peak < dense.peak - 2 * nn_bytes, (tiled.peak, dense.peak)


def test_rejects_other_models():
    with pytest.raises(TypeError, match="CLIPModel, SiglipModel"):
        tt.apply_to(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="keep_logits"):
        tt.apply_to(_model("clip"), keep_logits="yes")


def test_keeps_a_forward_set_on_the_instance():
    """A forward wrapped by someone else first (as accelerate's hooks do) still runs without
    return_loss and comes back after remove()."""
    model = _model("clip")
    calls = []
    inner = model.forward

    def hooked(*args, **kwargs):
        calls.append(kwargs.get("return_loss"))
        return inner(*args, **kwargs)

    model.forward = hooked
    tt.apply_to(model, backend="torch")
    tt.apply_to(model, backend="reference")                # re-applied: options updated
    batch = _batch(4)
    assert model(**batch).loss is None and calls == [None]
    assert model(**batch, return_loss=True).loss is not None and calls == [None]
    tt.remove(model)
    assert model.forward is hooked
