"""Every golden case of tests/golden (float64, computed with each official code's convention by
tests/golden/generate.py) against the reference and every CPU tile backend: loss and every
gradient to 1e-10 relative; and the transcriptions of generate.py reproduce the committed files."""

import json
import pathlib

import pytest
import torch

import tilecl
from tilecl import reference

from conftest import assert_rel, cpu_backends

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden"

# name -> how the public API is called with the golden inputs (i) and params (p)
CALLS = {
    "clip": lambda b, i, p: tilecl.clip_loss(i["image"], i["text"], i["logit_scale"], backend=b),
    "clip_scale100": lambda b, i, p: tilecl.clip_loss(i["image"], i["text"], i["logit_scale"],
                                                      backend=b),
    "info_nce_extra_keys": lambda b, i, p: tilecl.info_nce(i["query"], i["key"],
                                                           logit_scale=i["logit_scale"], backend=b),
    "siglip": lambda b, i, p: tilecl.siglip_loss(i["image"], i["text"], i["logit_scale"],
                                                 i["logit_bias"], backend=b),
    "nt_xent": lambda b, i, p: tilecl.nt_xent(i["z1"], i["z2"], temperature=i["temperature"],
                                              backend=b),
    "supcon_out_all": lambda b, i, p: tilecl.supcon(
        i["features"], i["labels"], temperature=p["temperature"],
        base_temperature=p["base_temperature"], backend=b),
    "supcon_out_one": lambda b, i, p: tilecl.supcon(
        i["features"], i["labels"], temperature=p["temperature"],
        base_temperature=p["base_temperature"], contrast_mode="one", backend=b),
    "supcon_out_nolabels": lambda b, i, p: tilecl.supcon(
        i["features"], temperature=p["temperature"], base_temperature=p["base_temperature"],
        backend=b),
    "supcon_in": lambda b, i, p: tilecl.supcon(i["features"], i["labels"],
                                               temperature=p["temperature"], variant="in", backend=b),
    "dcl": lambda b, i, p: tilecl.dcl_loss(i["o0"], i["o1"], temperature=p["temperature"], backend=b),
    "dclw": lambda b, i, p: tilecl.dcl_loss(i["o0"], i["o1"], temperature=p["temperature"],
                                            weighted=True, sigma=p["sigma"], backend=b),
    "hcl": lambda b, i, p: tilecl.hcl_loss(i["o1"], i["o2"], temperature=p["temperature"],
                                           tau_plus=p["tau_plus"], beta=p["beta"], backend=b),
    "debiased": lambda b, i, p: tilecl.debiased_loss(i["o1"], i["o2"], temperature=p["temperature"],
                                                     tau_plus=p["tau_plus"], backend=b),
    "cclk_hardneg": lambda b, i, p: tilecl.cclk_loss(i["z1"], i["z2"], i["Wx"], i["Wy"],
                                                     temperature=p["tau"], mode="hardneg", backend=b),
    "cclk_weaklysup": lambda b, i, p: tilecl.cclk_loss(i["z1"], i["z2"], i["Wx"], i["Wy"],
                                                       temperature=p["tau"], mode="weaklysup",
                                                       backend=b),
    "kernel_infonce_gamma1": lambda b, i, p: tilecl.kernel_info_nce(
        i["o1"], i["o2"], temperature=p["temperature"], gamma=p["gamma"], backend=b),
    "kernel_infonce_gamma2": lambda b, i, p: tilecl.kernel_info_nce(
        i["o1"], i["o2"], temperature=p["temperature"], gamma=p["gamma"], backend=b),
    "uniformity": lambda b, i, p: tilecl.uniformity_loss(i["x"], t=p["t"], backend=b),
    "decoupled_uniformity": lambda b, i, p: tilecl.decoupled_uniformity(i["z"], t=p["t"], backend=b),
    "decoupled_uniformity_prior": lambda b, i, p: tilecl.decoupled_uniformity(
        i["z"], i["prior"], t=p["t"], sigma=p["sigma"], lam=p["lam"], backend=b),
}


def _load(name):
    d = json.loads((GOLDEN / f"{name}.json").read_text())
    ins = {}
    for k, v in d["inputs"].items():
        t = torch.tensor(v, dtype=torch.int64 if d["input_dtypes"][k] == "int64" else torch.float64)
        if d["grads"].get(k) is not None:
            t.requires_grad_(True)
        ins[k] = t
    return d, ins


def test_every_golden_case_is_covered():
    names = {p.stem for p in GOLDEN.glob("*.json")}
    assert names, f"no golden cases found in {GOLDEN}"
    assert names == set(CALLS), f"uncovered: {names - set(CALLS)}, stale: {set(CALLS) - names}"


@pytest.mark.parametrize("backend", ["reference"] + cpu_backends())
@pytest.mark.parametrize("name", sorted(CALLS))
def test_golden(name, backend):
    d, ins = _load(name)
    loss = CALLS[name](backend, ins, d["params"])
    assert loss.dtype == torch.float64
    assert_rel(loss, torch.tensor(d["loss"], dtype=torch.float64), 1e-10, f"{name} loss")
    wanted = [k for k, g in d["grads"].items() if g is not None]
    grads = torch.autograd.grad(loss, [ins[k] for k in wanted])
    for k, g in zip(wanted, grads):
        assert_rel(g, torch.tensor(d["grads"][k], dtype=torch.float64), 1e-10, f"{name} d/d{k}")


def test_generator_reproduces_the_committed_cases():
    """generate.py --check: the dense transcriptions of the official codes give the committed
    losses and gradients (1e-12 relative)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("golden_generate", GOLDEN / "generate.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    paths = sorted(GOLDEN.glob("*.json"))
    assert {p.stem for p in paths} == set(gen.CASES), "a golden case without a transcription"
    assert gen.check(paths) == []


def test_reference_module_has_every_loss():
    for fn in ("info_nce", "clip_loss", "siglip_loss", "nt_xent", "supcon", "dcl_loss", "hcl_loss",
               "debiased_loss", "cclk_loss", "kernel_info_nce", "uniformity_loss",
               "decoupled_uniformity"):
        assert callable(getattr(reference, fn))
