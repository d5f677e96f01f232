"""Bad input raises ValueError / TypeError naming the argument and what was expected."""

import pytest
import torch

import tilecl


def x(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


@pytest.mark.parametrize("call,exc,words", [
    (lambda: tilecl.info_nce(x(4, 8), x(4, 7), temperature=0.1), ValueError, ["key", "dimension"]),
    (lambda: tilecl.info_nce(x(4, 8), x(4, 8, dtype=torch.float64), temperature=0.1), TypeError,
     ["key", "dtype"]),
    (lambda: tilecl.info_nce(x(8), x(4, 8), temperature=0.1), ValueError, ["query", "2-D"]),
    (lambda: tilecl.info_nce(x(0, 8), x(4, 8), temperature=0.1), ValueError, ["query", "non-empty"]),
    (lambda: tilecl.info_nce(x(4, 8), x(3, 8), temperature=0.1), ValueError, ["key", "rows"]),
    (lambda: tilecl.info_nce(x(4, 8), x(4, 8)), ValueError, ["temperature", "logit_scale"]),
    (lambda: tilecl.info_nce(x(4, 8), x(4, 8), temperature=0.1, logit_scale=10.0), ValueError,
     ["temperature", "logit_scale"]),
    (lambda: tilecl.info_nce(x(4, 8), x(4, 8), temperature=0.0), ValueError, ["temperature", "positive"]),
    (lambda: tilecl.info_nce(x(4, 8), x(4, 8), temperature=-1.0), ValueError, ["temperature"]),
    (lambda: tilecl.info_nce(x(4, 8), x(4, 8), temperature=torch.tensor([0.1, 0.2])), ValueError,
     ["temperature", "scalar"]),
    (lambda: tilecl.info_nce(x(4, 8), x(4, 8), temperature="0.1"), TypeError, ["temperature"]),
    (lambda: tilecl.info_nce(x(4, 8), x(6, 8), temperature=0.1, positive_index=torch.tensor([0, 1, 2])),
     ValueError, ["positive_index", "[4]"]),
    (lambda: tilecl.info_nce(x(4, 8), x(6, 8), temperature=0.1,
                             positive_index=torch.tensor([0, 1, 2, 6])), ValueError,
     ["positive_index", "[0, 6)"]),
    (lambda: tilecl.info_nce(x(4, 8), x(6, 8), temperature=0.1, positive_index=torch.zeros(4)),
     TypeError, ["positive_index", "integer"]),
    (lambda: tilecl.info_nce(x(4, 8), x(6, 8), temperature=0.1, symmetric=True), ValueError,
     ["symmetric", "rows"]),
    (lambda: tilecl.info_nce(x(4, 8), x(4, 8), temperature=0.1, reduction="avg"), ValueError,
     ["reduction"]),
    (lambda: tilecl.info_nce(x(4, 8), x(4, 8), temperature=0.1, backend="cuda"), ValueError,
     ["backend"]),
    (lambda: tilecl.info_nce(x(4, 8).int(), x(4, 8), temperature=0.1), TypeError, ["query", "float"]),
    (lambda: tilecl.info_nce([[1.0]], x(4, 8), temperature=0.1), TypeError, ["query", "Tensor"]),
    (lambda: tilecl.info_nce(x(4, 8), x(4, 8), temperature=0.1, label_smoothing=1.0), ValueError,
     ["label_smoothing"]),
    (lambda: tilecl.info_nce(x(4, 8), x(4, 8), temperature=torch.rand(3) + 0.1), ValueError,
     ["temperature", "[4]"]),
    (lambda: tilecl.info_nce(x(4, 8), x(4, 8), temperature=-torch.rand(4)), ValueError,
     ["temperature", "positive"]),
    (lambda: tilecl.info_nce(x(4, 8), x(4, 8), temperature=torch.rand(4) + 0.1, symmetric=True),
     ValueError, ["temperature", "scalar"]),
    (lambda: tilecl.info_nce(x(4, 8), x(6, 8), temperature=0.1, key_ids=torch.arange(4)),
     ValueError, ["key_ids", "[6]"]),
    (lambda: tilecl.info_nce(x(4, 8), x(4, 8), temperature=0.1, key_ids=torch.arange(4),
                             symmetric=True), ValueError, ["key_ids", "symmetric"]),
    (lambda: tilecl.info_nce(x(4, 8), x(4, 8), temperature=0.1, hard_negatives=x(3, 2, 8)),
     ValueError, ["hard_negatives", "rows"]),
    (lambda: tilecl.info_nce(x(4, 8), x(4, 8), temperature=0.1, hard_negatives=x(4, 8)),
     ValueError, ["hard_negatives", "[N, K, D]"]),
    (lambda: tilecl.info_nce(x(4, 8), x(4, 8), temperature=0.1, false_negative_margin=0.1,
                             false_negative_ratio=0.9), ValueError, ["false_negative"]),
    (lambda: tilecl.info_nce(x(4, 8), x(4, 8), temperature=0.1, false_negative_ratio="0.9"),
     TypeError, ["false_negative_ratio"]),
    (lambda: tilecl.info_nce(x(4, 8), x(4, 8), temperature=0.1, false_negative_margin=0.1,
                             symmetric=True), ValueError, ["false-negative", "symmetric"]),
    (lambda: tilecl.clip_loss(x(4, 8), x(5, 8), 10.0), ValueError, ["text_features", "rows"]),
    (lambda: tilecl.siglip_loss(x(4, 8), x(4, 8), 10.0, "b"), TypeError, ["logit_bias"]),
    (lambda: tilecl.siglip_loss(x(4, 8), x(4, 8), -1.0, 0.0), ValueError, ["logit_scale"]),
    (lambda: tilecl.siglip_loss(x(4, 8), x(5, 8), 1.0, 0.0, labels=torch.arange(4)), ValueError,
     ["text_labels"]),
    (lambda: tilecl.supcon(x(4, 8)), ValueError, ["features", "[B, V, D]"]),
    (lambda: tilecl.supcon(x(4, 2, 8), torch.arange(5)), ValueError, ["labels", "[4]"]),
    (lambda: tilecl.supcon(x(4, 2, 8), torch.arange(4).float()), TypeError, ["labels", "integer"]),
    (lambda: tilecl.supcon(x(4, 2, 8), contrast_mode="two"), ValueError, ["contrast_mode"]),
    (lambda: tilecl.supcon(x(4, 2, 8), variant="both"), ValueError, ["variant"]),
    (lambda: tilecl.supcon(x(4, 2, 8), base_temperature=0), ValueError, ["base_temperature"]),
    (lambda: tilecl.nt_xent(x(4, 8), x(5, 8)), ValueError, ["z2", "rows"]),
    (lambda: tilecl.nt_xent(x(4, 8), x(4, 8), convention="tf"), ValueError, ["convention"]),
    (lambda: tilecl.dcl_loss(x(1, 8), x(1, 8)), ValueError, ["at least 2"]),
    (lambda: tilecl.hcl_loss(x(4, 8), x(4, 8), tau_plus=1.0), ValueError, ["tau_plus"]),
    (lambda: tilecl.hcl_loss(x(4, 8), x(4, 8), beta=-1.0), ValueError, ["beta"]),
    (lambda: tilecl.kernel_info_nce(x(4, 8), x(4, 8), gamma=0), ValueError, ["gamma"]),
    (lambda: tilecl.cclk_loss(x(4, 8), x(4, 8)), ValueError, ["weight_x", "conditions"]),
    (lambda: tilecl.cclk_loss(x(4, 8), x(4, 8), x(4, 4)), ValueError, ["weight_x", "weight_y"]),
    (lambda: tilecl.cclk_loss(x(4, 8), x(4, 8), x(4, 3), x(4, 4)), ValueError, ["weight_x", "[4, 4]"]),
    (lambda: tilecl.cclk_loss(x(4, 8), x(4, 8), conditions=(x(4, 2), x(3, 2))), ValueError,
     ["conditions[1]"]),
    (lambda: tilecl.cclk_loss(x(4, 8), x(4, 8), x(4, 4), x(4, 4), mode="fair"), ValueError, ["mode"]),
    (lambda: tilecl.uniformity_loss(x(1, 8)), ValueError, ["x", "2 rows"]),
    (lambda: tilecl.uniformity_loss(x(3, 8), t=0), ValueError, ["t"]),
    (lambda: tilecl.decoupled_uniformity(x(4, 2, 8), x(3, 2)), ValueError, ["prior"]),
    (lambda: tilecl.decoupled_uniformity(x(4, 2, 8), kernel="poly"), ValueError, ["kernel"]),
], ids=lambda v: None if callable(v) or isinstance(v, (list, type)) else str(v))
def test_bad_input_names_the_argument(call, exc, words):
    with pytest.raises(exc) as info:
        call()
    msg = str(info.value)
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"


def test_unavailable_backend_is_a_clear_error(monkeypatch):
    from tilecl import _backends

    monkeypatch.setitem(_backends._cache, "native", ImportError("no module tilecl._C"))
    with pytest.raises(RuntimeError, match="native.*cannot run"):
        tilecl.info_nce(x(4, 8), x(4, 8), temperature=0.1, backend="native")
    assert "native" not in tilecl.available_backends("cpu")


def test_env_override_of_auto(monkeypatch):
    from tilecl import reference

    q, k = x(5, 4), x(5, 4)
    calls = []
    real = reference.info_nce
    monkeypatch.setattr(reference, "info_nce", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setenv("TILECL_BACKEND", "reference")
    ref = tilecl.info_nce(q, k, temperature=0.1)
    assert calls == [1]
    tilecl.info_nce(q, k, temperature=0.1, backend="torch")  # an explicit backend wins
    assert calls == [1]
    monkeypatch.setenv("TILECL_BACKEND", "bogus")
    with pytest.raises(ValueError, match="TILECL_BACKEND"):
        tilecl.info_nce(q, k, temperature=0.1)
    monkeypatch.delenv("TILECL_BACKEND")
    assert torch.allclose(tilecl.info_nce(q, k, temperature=0.1), ref, rtol=1e-5)
    assert calls == [1]


def test_available_backends_lists_reference_and_torch():
    names = tilecl.available_backends()
    assert names[:2] == ["reference", "torch"]


def test_group_without_init_is_an_error():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is initialized in this process")
    with pytest.raises(ValueError, match="group"):
        tilecl.info_nce(x(4, 8), x(4, 8), temperature=0.1, group=object())
