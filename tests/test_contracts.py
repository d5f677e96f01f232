"""Contracts a user relies on beyond the value of one loss: mixed dtypes under torch.autocast,
the Qwen3-Embedding false-negative mask on the query-query terms, and SupCon's one-view L_in
convention against google-research's."""

import pytest
import torch
import torch.nn.functional as F

import tilecl

from conftest import assert_rel, cpu_backends

BACKENDS = ["reference"] + cpu_backends()


# ---- mixed dtypes under torch.autocast -----------------------------------------------------------

def _unit(n, d, dtype):
    return F.normalize(torch.randn(n, d, dtype=torch.float64), dim=1).to(dtype)


MIXED = {  # (bf16 features, fp32 features) -> loss: image features against cached text features
    "clip": lambda b, x, y: tilecl.clip_loss(x, y, torch.tensor(14.0), backend=b),
    "siglip": lambda b, x, y: tilecl.siglip_loss(x, y, 10.0, -4.0, backend=b),
    "nt_xent": lambda b, x, y: tilecl.nt_xent(x, y, temperature=0.3, backend=b),
}


@pytest.mark.parametrize("name", sorted(MIXED))
@pytest.mark.parametrize("backend,backward_inside", [
    pytest.param(b, inside, id=f"{b}-bwd-{'inside' if inside else 'outside'}")
    for b in BACKENDS for inside in (False, True) if not (inside and b == "reference")])
def test_autocast_mixed_dtypes_use_the_wider_dtype(backend, name, backward_inside):
    """bf16 against fp32 under CPU autocast (bf16): computed in fp32, so the loss and the fp32
    gradient hold fp32's 1e-5 against float64 on the same (bf16-rounded) values, and the bf16
    gradient is that fp32 gradient rounded once (2x bf16's own rounding error). A backward
    called inside the autocast region stays at that precision on the tile backends (the dense
    reference's matmul backward follows autocast, as any PyTorch loss's does)."""
    x = _unit(37, 20, torch.bfloat16).requires_grad_()
    y = _unit(37, 20, torch.float32).requires_grad_()
    x64, y64 = (t.detach().double().requires_grad_() for t in (x, y))
    want = MIXED[name]("reference", x64, y64)
    gx64, gy64 = torch.autograd.grad(want, (x64, y64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = MIXED[name](backend, x, y)
        if backward_inside:
            gx, gy = torch.autograd.grad(loss, (x, y))
    if not backward_inside:
        gx, gy = torch.autograd.grad(loss, (x, y))
    assert loss.dtype == torch.float32 and gx.dtype == torch.bfloat16 and gy.dtype == torch.float32
    assert_rel(loss, want.float(), 1e-5, f"{name} loss")
    assert_rel(gy, gy64.float(), 1e-5, f"{name} d/dy (fp32)")
    rounding = (gx64.to(torch.bfloat16).double() - gx64).abs().max() / gx64.abs().max()
    assert_rel(gx, gx64.to(torch.bfloat16), max(2 * float(rounding), 1e-5), f"{name} d/dx (bf16)")


def test_autocast_same_dtype_keeps_fp32_precision():
    """fp32 features under CPU autocast: the tiles are not recomputed in bf16 (autocast is off
    inside the loss), so fp32's 1e-5 holds."""
    q, k = _unit(50, 24, torch.float32), _unit(50, 24, torch.float32)
    want = tilecl.info_nce(q.double(), k.double(), temperature=0.05, backend="reference")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for b in BACKENDS:
            assert_rel(tilecl.info_nce(q, k, temperature=0.05, backend=b), want.float(), 1e-5, b)


def test_autocast_rule_compiles_without_graph_breaks():
    """The autocast rule (autocast off inside, mixed dtypes promoted) traces with
    torch.compile(fullgraph=True) on the triton backend, and matches eager."""
    from tilecl._backends import unavailable_reason

    from conftest import skip_or_fail

    why = unavailable_reason("triton", torch.device("cpu"))
    if why is not None:
        skip_or_fail(f"triton cannot run here: {why}")
    x, y = _unit(9, 4, torch.bfloat16), _unit(9, 4, torch.float32)

    def fn(a, b):
        return tilecl.clip_loss(a, b, 10.0, backend="triton")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert_rel(compiled(x, y), fn(x, y), 1e-6, "compiled vs eager")


def test_mixed_dtypes_outside_autocast_is_a_clear_type_error():
    x, y = _unit(5, 4, torch.bfloat16), _unit(5, 4, torch.float32)
    with pytest.raises(TypeError, match=r"text_features has dtype torch.float32 but "
                                        r"image_features has torch.bfloat16"):
        tilecl.clip_loss(x, y, 10.0)
    with pytest.raises(TypeError, match=r"key has dtype torch.bfloat16 but query has torch.float32"):
        tilecl.info_nce(y, x, temperature=0.1)


# ---- query_negatives with false-negative masking (Qwen3-Embedding) -------------------------------

def _qwen3_dense(q, d, tau, margin=None, ratio=None):
    """Dense transcription of the Qwen3-Embedding InfoNCE, written from its convention: row i's
    positive is d_i (d may have extra rows), s = cosine similarity (unit inputs), and
    Z_i = e^{s(q_i, d_i)/tau} + sum_{j != i} m_ij e^{s(q_i, d_j)/tau}
          + sum_{j != i} m'_ij e^{s(q_i, q_j)/tau} + sum_{j != i} e^{s(d_i, d_j)/tau},
    with m_ij = 0 (m'_ij = 0) where s(q_i, d_j) (s(q_i, q_j)) > s(q_i, d_i) + margin (or
    > ratio * s(q_i, d_i), NV-Retriever's variant), the threshold without gradient, the
    doc-doc terms unmasked; loss = mean_i -log(e^{s(q_i, d_i)/tau} / Z_i)."""
    n, m = q.shape[0], d.shape[0]
    s_qd, s_qq, s_dd = q @ d.T, q @ q.T, d[:n] @ d.T  # [N, M], [N, N], [N, M]
    s_pos = s_qd.diagonal()
    thr = (s_pos + margin if margin is not None else ratio * s_pos).detach()[:, None]
    other_d = ~torch.eye(n, m, dtype=torch.bool)
    other_q = ~torch.eye(n, dtype=torch.bool)
    terms = [s_pos[:, None] / tau,
             (s_qd / tau).masked_fill(~other_d | (s_qd > thr), float("-inf")),
             (s_qq / tau).masked_fill(~other_q | (s_qq > thr), float("-inf")),
             (s_dd / tau).masked_fill(~other_d, float("-inf"))]
    log_z = torch.logsumexp(torch.cat(terms, 1), 1)
    return (log_z - s_pos / tau).mean()


def _threshold_backends():
    from tilecl._backends import unavailable_reason

    names = cpu_backends()
    if "triton" not in names and unavailable_reason("triton", torch.device("cpu")) is None:
        names.append("triton")  # small shapes: a few seconds under the interpreter
    return ["reference"] + names


def _clustered(n, m, d, gen):
    """Queries in 4 tight clusters (query-query similarities above the positive's + margin
    happen), each query's positive document near it, extra documents beyond N."""
    centers = torch.randn(4, d, generator=gen, dtype=torch.float64)
    q = F.normalize(centers[torch.arange(n) % 4] + 0.35 * torch.randn(n, d, generator=gen,
                                                                       dtype=torch.float64), dim=1)
    docs = torch.cat([q + 0.45 * torch.randn(n, d, generator=gen, dtype=torch.float64),
                      torch.randn(m - n, d, generator=gen, dtype=torch.float64)])
    return q, F.normalize(docs, dim=1)


@pytest.mark.parametrize("rule", ["margin", "ratio"])
@pytest.mark.parametrize("backend", _threshold_backends())
def test_query_negatives_are_masked_like_keys(backend, rule):
    """info_nce(query_negatives=True, key_negatives=True, false_negative_margin / ratio) against
    the dense transcription: loss and the gradients of q, d and the temperature (float64)."""
    q, d = _clustered(37, 45, 16, torch.Generator().manual_seed(3))
    kw = {"margin": 0.1} if rule == "margin" else {"ratio": 0.95}
    tau = torch.tensor(0.05, dtype=torch.float64)
    # not vacuous: the query-query mask changes the loss, and some masked terms exist
    s_pos = (q * d[:37]).sum(1, keepdim=True)
    thr = s_pos + 0.1 if rule == "margin" else 0.95 * s_pos
    assert int(((q @ q.T) > thr).fill_diagonal_(False).sum()) >= 10

    def ours(q, d, tau):
        return tilecl.info_nce(q, d, temperature=tau, query_negatives=True, key_negatives=True,
                               false_negative_margin=kw.get("margin"),
                               false_negative_ratio=kw.get("ratio"), backend=backend)

    leaves = [t.clone().requires_grad_() for t in (q, d, tau)]
    want = _qwen3_dense(*leaves, **kw)
    gw = torch.autograd.grad(want, leaves)
    unmasked_qq = tilecl.info_nce(q, d, temperature=tau, key_negatives=True, query_negatives=True,
                                  backend="reference")
    assert abs(float(want.detach()) - float(unmasked_qq)) > 0.05
    got = ours(*leaves)
    gg = torch.autograd.grad(got, leaves)
    assert_rel(got, want, 1e-10, f"{backend} {rule} loss")
    for name, a, b in zip(("q", "d", "temperature"), gg, gw):
        assert_rel(a, b, 1e-9, f"{backend} {rule} d/d{name}")


# ---- SupCon L_in with one view: tilecl vs google-research -----------------------------------------

def _google_supcon_in_one_view(features, labels, tau):
    """google-research supcon ``contrastive_loss`` (summation INSIDE, denominator ALL,
    scale_by_temperature, ALL_VIEWS) for num_views = 1, transcribed: per anchor
    l_i = -tau log(sum_{p in P(i)} e^{s_ip} / D_i / |P(i)|), D_i = sum_{j != i} e^{s_ij}, and
    then, for V = 1 only, l_i / |P(i)| once more (divide_no_nan: 0 without positives);
    the per-sample losses are averaged over the batch (Keras SUM_OVER_BATCH_SIZE)."""
    z = features[:, 0]
    s = z @ z.T / tau  # [B, B]
    b = z.shape[0]
    self_mask = torch.eye(b, dtype=torch.bool)
    pos = (labels[:, None] == labels[None, :]) & ~self_mask
    n_pos = pos.sum(1).to(s.dtype)
    log_den = torch.logsumexp(s.masked_fill(self_mask, float("-inf")), 1)
    log_pos = torch.logsumexp(s.masked_fill(~pos, float("-inf")), 1)
    has = n_pos > 0
    rows = -tau * (log_pos - log_den - torch.log(n_pos.clamp_min(1)))
    rows = torch.where(has, rows / n_pos.clamp_min(1), torch.zeros_like(rows))
    return rows.mean(), rows


def test_supcon_in_one_view_keeps_one_division_by_the_positives():
    """tilecl's L_in averages the positives inside the log once for every V; google-research's
    code divides the V = 1 loss of each anchor by |P(i)| a second time. tilecl keeps its
    convention (README conventions table): its rows are google-research's times |P(i)|."""
    gen = torch.Generator().manual_seed(5)
    feats = F.normalize(torch.randn(23, 1, 8, generator=gen, dtype=torch.float64), dim=2)
    labels = torch.randint(0, 5, (23,), generator=gen)
    labels[-1] = 99  # one anchor without positives: 0 in both
    tau = 0.1
    ours_rows = tilecl.supcon(feats, labels, temperature=tau, variant="in", reduction="none")
    ours = tilecl.supcon(feats, labels, temperature=tau, variant="in")
    g_mean, g_rows = _google_supcon_in_one_view(feats, labels, tau)
    n_pos = ((labels[:, None] == labels[None, :]).sum(1) - 1).double()
    assert int((n_pos > 1).sum()) >= 10  # the second division matters for most anchors
    assert_rel(ours_rows, g_rows * n_pos.clamp_min(1), 1e-12, "tilecl rows = google rows x |P|")
    assert_rel(ours, ours_rows.mean(), 1e-12, "mean over anchors")
    assert float(ours) > 1.5 * float(g_mean)  # the two conventions really differ


# ---- CI=true: nothing skips for a missing build ---------------------------------------------------

def test_ci_fails_instead_of_dropping_the_native_backend(monkeypatch):
    """conftest.cpu_backends drops a native backend that cannot run when testing locally, and
    raises under CI=true; skip_or_fail skips locally and fails under CI=true."""
    import tilecl._backends as backends

    import conftest

    real = backends.unavailable_reason
    monkeypatch.setattr(backends, "unavailable_reason",
                        lambda name, dev: "tilecl._C is not built" if name == "native"
                        else real(name, dev))
    monkeypatch.setenv("CI", "false")
    assert "native" not in conftest.cpu_backends()
    with pytest.raises(pytest.skip.Exception):
        conftest.skip_or_fail("no native module")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(RuntimeError, match="CI=true, but the native backend cannot run"):
        conftest.cpu_backends()
    with pytest.raises(pytest.fail.Exception, match="CI=true, but no native module"):
        conftest.skip_or_fail("no native module")


def test_golden_cases_live_in_the_repository():
    """The golden cases and their generator are in tests/golden (a clone can check them)."""
    import pathlib

    golden = pathlib.Path(__file__).resolve().parent / "golden"
    assert (golden / "generate.py").is_file()
    assert len(list(golden.glob("*.json"))) >= 20
