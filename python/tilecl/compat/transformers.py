"""Hugging Face transformers: the ``return_loss=True`` loss of ``CLIPModel`` and ``SiglipModel``
computed by tilecl, without the N x N logits.

transformers' ``CLIPModel.forward(..., return_loss=True)`` forms ``logits_per_text = s T I^T``
[N, N] and takes two cross-entropies over it; ``SiglipModel`` forms ``s T I^T + b`` and a
log-sigmoid over all N^2 entries. ``apply_to(model)`` replaces that model instance's ``forward``:
with ``return_loss=True`` it runs the same towers, normalisation and projections, then
``tilecl.clip_loss`` / ``tilecl.siglip_loss`` on the embeddings (same value and gradients, math.md
2.1 and 2.2). Without ``return_loss`` the model's own forward runs unchanged.

Output contract with ``return_loss=True``: a ``CLIPOutput`` / ``SiglipOutput`` with ``loss``,
``text_embeds``, ``image_embeds``, ``text_model_output`` and ``vision_model_output`` as before, and
``logits_per_image = logits_per_text = None``: the loss is all that was asked for, and the logits
are what the tiled loss exists not to allocate (``out.image_embeds @ out.text_embeds.T *
model.logit_scale.exp()`` (+ ``model.logit_bias`` for SigLIP) recovers them). Pass
``keep_logits=True`` to get them as well (then the N x N matrix is allocated again; the loss is
still the tiled one). With ``return_dict=False`` the tuple skips the None fields, as every
transformers output does. The loss is fp32 for bf16 / fp16 embeddings (transformers returns the
embeddings' dtype).

Example::

    from transformers import CLIPModel
    import tilecl.compat.transformers as tt

    model = tt.apply_to(CLIPModel.from_pretrained("openai/clip-vit-base-patch32"))
    loss = model(input_ids=ids, pixel_values=pixels, return_loss=True).loss
    tt.remove(model)                    # back to transformers' forward
"""

from __future__ import annotations

import types

from .. import losses

_SUPPORTED = "CLIPModel, SiglipModel (or subclasses)"


def _kind(model):
    from transformers import CLIPModel, SiglipModel

    if isinstance(model, CLIPModel):
        return "clip"
    if isinstance(model, SiglipModel):
        return "siglip"
    raise TypeError(f"tilecl.compat.transformers.apply_to: model must be a {_SUPPORTED}, got "
                    f"{type(model).__name__}")


def _towers(model, kind, input_ids, pixel_values, attention_mask, position_ids,
            interpolate_pos_encoding, kwargs):
    """(vision outputs, text outputs), pooler_output = the projected embeddings, as the model's
    own forward computes them."""
    if kind == "clip":
        vision = model.get_image_features(pixel_values=pixel_values,
                                          interpolate_pos_encoding=interpolate_pos_encoding,
                                          **kwargs)
        text = model.get_text_features(input_ids=input_ids, attention_mask=attention_mask,
                                       position_ids=position_ids, **kwargs)
    else:
        vision = model.vision_model(pixel_values=pixel_values,
                                    interpolate_pos_encoding=interpolate_pos_encoding, **kwargs)
        text = model.text_model(input_ids=input_ids, attention_mask=attention_mask,
                                position_ids=position_ids, **kwargs)
    return vision, text


def _output_class(kind):
    if kind == "clip":
        from transformers.models.clip.modeling_clip import CLIPOutput
        return CLIPOutput
    from transformers.models.siglip.modeling_siglip import SiglipOutput
    return SiglipOutput


def _tiled_forward(self, input_ids=None, pixel_values=None, attention_mask=None,
                   position_ids=None, return_loss=None, interpolate_pos_encoding=False, **kwargs):
    cfg = self._tilecl
    if not return_loss:
        original = cfg["previous"] or types.MethodType(type(self).forward, self)
        return original(input_ids=input_ids, pixel_values=pixel_values,
                        attention_mask=attention_mask, position_ids=position_ids,
                        return_loss=return_loss,
                        interpolate_pos_encoding=interpolate_pos_encoding, **kwargs)
    return_dict = kwargs.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    kind = cfg["kind"]
    vision, text = _towers(self, kind, input_ids, pixel_values, attention_mask, position_ids,
                           interpolate_pos_encoding, kwargs)
    text_embeds = text.pooler_output
    image_embeds = vision.pooler_output.to(text_embeds.device)
    # unit rows, as the model's forward: x / ||x||_2
    image_embeds = image_embeds / image_embeds.norm(p=2, dim=-1, keepdim=True)
    text_embeds = text_embeds / text_embeds.norm(p=2, dim=-1, keepdim=True)
    scale = self.logit_scale.to(text_embeds.device).exp()
    if kind == "clip":
        # (CE(s T I^T, diag) + CE(s I T^T, diag)) / 2 (math.md 2.1)
        loss = losses.clip_loss(image_embeds, text_embeds, scale, backend=cfg["backend"])
        bias = None
    else:
        # sum_ij -log sigmoid(y_ij (s <t_i, x_j> + b)) / N over text rows (math.md 2.2)
        bias = self.logit_bias.to(text_embeds.device)
        loss = losses.siglip_loss(text_embeds, image_embeds, scale, bias,
                                  backend=cfg["backend"])
    logits_per_text = logits_per_image = None
    if cfg["keep_logits"]:
        logits_per_text = (text_embeds @ image_embeds.t()) * scale    # [N, D] @ [D, N]
        if bias is not None:
            logits_per_text = logits_per_text + bias
        logits_per_image = logits_per_text.t()
    out = _output_class(kind)(loss=loss, logits_per_image=logits_per_image,
                              logits_per_text=logits_per_text, text_embeds=text_embeds,
                              image_embeds=image_embeds, text_model_output=text,
                              vision_model_output=vision)
    return out if return_dict else out.to_tuple()


def apply_to(model, *, backend="auto", keep_logits=False):
    """Compute ``model(..., return_loss=True).loss`` with tilecl's tiled loss.

    model: a transformers ``CLIPModel`` or ``SiglipModel`` (or a subclass); only this instance
    changes (its ``forward`` attribute), so other models and the class stay as they are.
    backend: the tilecl backend (``"auto"``, ``"torch"``, ``"native"``, ...). keep_logits: also
    return ``logits_per_image`` / ``logits_per_text`` when ``return_loss=True`` (allocates the
    N x N matrix the tiled loss avoids). Returns the model. Calling it again updates the options.

    Example::

        model = tilecl.compat.transformers.apply_to(SiglipModel(config))
        out = model(input_ids=ids, pixel_values=pixels, return_loss=True)
        out.loss.backward()             # out.logits_per_image is None (see the module docstring)
    """
    kind = _kind(model)
    if not isinstance(keep_logits, bool):
        raise TypeError(f"keep_logits must be a bool, got {type(keep_logits).__name__}")
    # a forward set on the instance before (e.g. by accelerate's hooks) runs when no loss is asked
    previous = (model._tilecl["previous"] if is_applied(model)
                else vars(model).get("forward"))
    model._tilecl = {"kind": kind, "backend": backend, "keep_logits": keep_logits,
                     "previous": previous}
    model.forward = types.MethodType(_tiled_forward, model)
    return model


def remove(model):
    """Undo ``apply_to(model)`` (a no-op for a model it was not applied to); returns the model."""
    if is_applied(model):
        previous = model._tilecl["previous"]
        del model._tilecl
        vars(model).pop("forward", None)
        if previous is not None:
            model.forward = previous
    return model


def is_applied(model):
    """True when ``apply_to(model)`` is in effect."""
    return "_tilecl" in vars(model)


__all__ = ["apply_to", "remove", "is_applied"]
