"""Streaming top-k hardest negatives: ``info_nce(..., topk_negatives=k)``
returns each row's k most similar keys that are still negatives, from the loss's own forward
pass, and must agree with the dense reference (top-k of the masked similarity matrix)."""

import pytest
import torch
import torch.nn.functional as F

import tilecl
from tilecl._autograd import tile_stats
from tilecl._spec import TileAux, TileSpec

from conftest import assert_rel, cpu_backends

SHAPES = [(1, 1), (7, 7), (17, 40), (65, 65), (130, 130)]  # tiles are 16 x 24 (conftest)


def topk_backends():
    """CPU backends whose forward streams the top-k list."""
    out = []
    for name in cpu_backends():
        try:
            tile_stats(TileSpec(sums=(), topk=1), torch.randn(2, 3), torch.randn(2, 3),
                       torch.tensor(1.0), backend=name)
        except ValueError as err:
            if "top-k" in str(err):
                continue
            raise
        out.append(name)
    return out


def _inputs(n, m, d=8, dtype=torch.float32):
    # distinct similarities (no ties) so that the indices are unique
    q = F.normalize(torch.randn(n, d, dtype=torch.float64), dim=1).to(dtype)
    k = F.normalize(torch.randn(max(m, n), d, dtype=torch.float64), dim=1).to(dtype)
    return q, k


def _check(got, ref, what, tol=1e-5):
    (loss, hard), (rloss, rhard) = got, ref
    assert isinstance(hard, tilecl.HardNegatives)
    assert_rel(loss, rloss, tol, f"{what}: loss")
    assert hard.index.dtype == torch.int64 and hard.index.shape == rhard.index.shape
    assert torch.equal(hard.index, rhard.index), f"{what}: indices {hard.index} != {rhard.index}"
    assert torch.equal(torch.isneginf(hard.similarity), torch.isneginf(rhard.similarity))
    assert_rel(hard.similarity.nan_to_num(neginf=0.0), rhard.similarity.nan_to_num(neginf=0.0),
               tol, f"{what}: similarity")
    assert not hard.similarity.requires_grad


@pytest.mark.parametrize("backend", topk_backends())
@pytest.mark.parametrize("n,m", SHAPES, ids=[f"{n}x{m}" for n, m in SHAPES])
@pytest.mark.parametrize("kk", [1, 5, 32])
@pytest.mark.parametrize("variant", ["plain", "index", "key_ids", "fn_margin", "per_anchor",
                                     "symmetric"])
def test_topk_matches_reference(backend, n, m, kk, variant):
    q, k = _inputs(n, m)
    kw = dict(topk_negatives=kk)
    if variant == "index":
        kw["positive_index"] = torch.randperm(k.shape[0])[:n]
    elif variant == "key_ids":  # duplicates of the positive are not negatives
        kw["key_ids"] = torch.randint(0, max(1, k.shape[0] // 3), (k.shape[0],))
    elif variant == "fn_margin":  # false negatives are not negatives either
        kw["false_negative_margin"] = -0.1
    elif variant == "symmetric":
        if n != k.shape[0]:
            pytest.skip("symmetric needs N == M")
        kw["symmetric"] = True
    tau = torch.rand(n) * 0.1 + 0.05 if variant == "per_anchor" else 0.07
    if variant == "fn_margin" and backend != "torch" and not _fn_supported(backend):
        pytest.skip(f"{backend} does not run the false-negative flag")
    ref = tilecl.info_nce(q.double(), k.double(), temperature=tau, backend="reference", **kw)
    got = tilecl.info_nce(q, k, temperature=tau, backend=backend, **kw)
    _check(got, ref, f"{backend} {variant} {n}x{m} k={kk}")
    # the hardest list holds negatives only
    pos = kw.get("positive_index", torch.arange(n))
    assert not (got[1].index == pos[:, None]).any()
    if kk >= k.shape[0]:  # more slots than negatives: padded
        assert (got[1].index[:, -1] == -1).all()


def _fn_supported(backend):
    try:
        tile_stats(TileSpec(positive="index", sums=(), threshold=True), torch.randn(2, 3),
                   torch.randn(2, 3), torch.tensor(1.0),
                   aux=TileAux(pos=torch.arange(2), thresh=torch.zeros(2)), backend=backend)
    except ValueError:
        return False
    return True


def test_topk_fp16_and_bf16_inputs():
    """Low-precision inputs: the logits are fp32 dots of the rounded embeddings."""
    for dt in (torch.float16, torch.bfloat16):
        q, k = _inputs(33, 33, 16, dt)
        ref = tilecl.info_nce(q.double(), k.double(), temperature=0.1, topk_negatives=4,
                              backend="reference")
        got = tilecl.info_nce(q, k, temperature=0.1, topk_negatives=4, backend="torch")
        _check(got, ref, str(dt))


def test_topk_does_not_change_the_loss_or_gradients():
    q, k = _inputs(65, 70)
    q1, k1 = q.clone().requires_grad_(), k.clone().requires_grad_()
    q2, k2 = q.clone().requires_grad_(), k.clone().requires_grad_()
    plain = tilecl.info_nce(q1, k1, temperature=0.07, backend="torch")
    loss, _ = tilecl.info_nce(q2, k2, temperature=0.07, topk_negatives=8, backend="torch")
    plain.backward()
    loss.backward()
    assert_rel(loss, plain, 1e-6, "loss")
    assert_rel(q2.grad, q1.grad, 1e-6, "dq")
    assert_rel(k2.grad, k1.grad, 1e-6, "dk")


def test_topk_hard_negatives_and_extra_keys():
    """Per-row hard negatives are the row's own: the list covers the shared keys only."""
    q, k = _inputs(9, 30)
    hard = torch.randn(9, 2, 8)
    kw = dict(temperature=0.1, topk_negatives=6, hard_negatives=hard)
    ref = tilecl.info_nce(q.double(), k.double(), backend="reference",
                          **dict(kw, hard_negatives=hard.double()))
    got = tilecl.info_nce(q, k, backend="torch", **kw)
    _check(got, ref, "hard negatives")
    assert int(got[1].index.max()) < k.shape[0]


def test_topk_mining_round_trip():
    """The use case: mine with one forward, then train on the mined keys as hard negatives."""
    q, k = _inputs(40, 40, 16)
    loss, hard = tilecl.info_nce(q, k, temperature=0.05, topk_negatives=3)
    dense = (q @ k.T).fill_diagonal_(float("-inf"))
    assert torch.equal(hard.index, dense.topk(3, dim=1).indices)
    mined = k[hard.index]  # [N, 3, D]
    again = tilecl.info_nce(q, k, temperature=0.05, hard_negatives=mined)
    assert again > loss  # the mined keys count twice: a harder objective


@pytest.mark.parametrize("bad,err", [(-1, ValueError), (33, ValueError), (2.0, TypeError),
                                     (True, TypeError)])
def test_topk_bad_values(bad, err):
    q, k = _inputs(4, 4)
    with pytest.raises(err, match="topk_negatives"):
        tilecl.info_nce(q, k, temperature=0.1, topk_negatives=bad)


def test_topk_spec_bounds():
    with pytest.raises(ValueError, match="topk"):
        TileSpec(sums=(), topk=33)
