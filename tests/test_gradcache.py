"""tilecl.grad_cache_step: parameter gradients (towers and the loss's logit scale) equal one
backward through the whole batch, float64, dropout on; shared towers, dict / tuple inputs, chunk
sizes that do not divide N; the ring (group=, gloo, 2 processes); bounded activation memory."""

import contextlib
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tilecl
from tilecl.gradcache import grad_cache_step
from tilecl.memtrack import PeakTensorBytes


class Tower(nn.Module):
    def __init__(self, d_in, d_hidden=16, d_out=5, p=0.3):
        super().__init__()
        self.inp = nn.Linear(d_in, d_hidden)
        self.drop = nn.Dropout(p)
        self.out = nn.Linear(d_hidden, d_out)

    def forward(self, x, shift=0.0):
        return self.out(self.drop(torch.tanh(self.inp(x) + shift)))


def _setup(seed=0, p=0.3):
    torch.manual_seed(seed)
    img_tower, txt_tower = Tower(7, p=p).double(), Tower(9, p=p).double()
    log_scale = nn.Parameter(torch.tensor(1.3, dtype=torch.float64))
    return img_tower, txt_tower, log_scale


def _clip(log_scale, **kw):
    def loss_fn(a, b, **extra):
        return tilecl.clip_loss(F.normalize(a, dim=1), F.normalize(b, dim=1), log_scale.exp(),
                                backend="torch", **kw, **extra)
    return loss_fn


def _grads(params):
    out = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return out


def _chunked_full_backward(towers, inputs, loss_fn, chunk):
    """The reference: the same chunked forward, with its graph, and one backward over it all."""
    embs = []
    for tower, batch in zip(towers, inputs):
        n = next(iter(batch.values())).shape[0] if isinstance(batch, dict) else batch.shape[0]
        parts = []
        for i0 in range(0, n, chunk):
            if isinstance(batch, dict):
                parts.append(tower(**{k: v[i0:i0 + chunk] if torch.is_tensor(v) and v.dim()
                                      else v for k, v in batch.items()}))
            else:
                parts.append(tower(batch[i0:i0 + chunk]))
        embs.append(torch.cat(parts))
    loss = loss_fn(*embs)
    loss.backward()
    return loss.detach()


def test_matches_full_backward_with_dropout():
    img_tower, txt_tower, log_scale = _setup()
    params = [*img_tower.parameters(), *txt_tower.parameters(), log_scale]
    g = torch.Generator().manual_seed(1)
    n, chunk = 29, 8                                   # 4 chunks, the last one of 5 rows
    images = torch.randn(n, 7, generator=g, dtype=torch.float64)
    texts = {"x": torch.randn(n, 9, generator=g, dtype=torch.float64), "shift": 0.25}
    loss_fn = _clip(log_scale)

    torch.manual_seed(123)
    ref_loss = _chunked_full_backward((img_tower, txt_tower), (images, texts), loss_fn, chunk)
    ref = _grads(params)
    torch.manual_seed(123)
    loss = grad_cache_step((img_tower, txt_tower), (images, texts), loss_fn, chunk_size=chunk)
    got = _grads(params)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    # dropout is on and matters: another draw of the masks gives other gradients
    torch.manual_seed(124)
    _chunked_full_backward((img_tower, txt_tower), (images, texts), loss_fn, chunk)
    other = _grads(params)
    assert max((a - b).abs().max().item() for a, b in zip(other, ref)) > 1e-3


def test_matches_single_forward_without_dropout_shared_tower():
    """No dropout: equal to one forward of the whole batch. One tower shared by both views
    (SimCLR-style), tuple inputs, a chunk size per view."""
    tower, _, _ = _setup(seed=2, p=0.0)
    params = list(tower.parameters())
    g = torch.Generator().manual_seed(3)
    v1 = torch.randn(23, 7, generator=g, dtype=torch.float64)
    v2 = torch.randn(23, 7, generator=g, dtype=torch.float64)

    def loss_fn(a, b):
        return tilecl.nt_xent(F.normalize(a, dim=1), F.normalize(b, dim=1), backend="torch")

    ref_loss = loss_fn(tower(v1), tower(v2))
    ref_loss.backward()
    ref = _grads(params)
    loss = grad_cache_step(tower, ((v1,), [v2]), loss_fn, chunk_size=(6, 10))
    got = _grads(params)
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-12, atol=0)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_siglip_towers_of_different_sizes():
    img_tower, txt_tower, log_scale = _setup(seed=4, p=0.0)
    bias = nn.Parameter(torch.tensor(-2.0, dtype=torch.float64))
    params = [*img_tower.parameters(), *txt_tower.parameters(), log_scale, bias]
    g = torch.Generator().manual_seed(5)
    images = torch.randn(17, 7, generator=g, dtype=torch.float64)
    texts = torch.randn(12, 9, generator=g, dtype=torch.float64)

    def loss_fn(a, b):
        return tilecl.siglip_loss(a, b, log_scale.exp(), bias, backend="torch")

    loss_fn(img_tower(images), txt_tower(texts)).backward()
    ref = _grads(params)
    grad_cache_step([img_tower, txt_tower], [images, texts], loss_fn, chunk_size=5)
    for a, b in zip(_grads(params), ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_activation_memory_bounded_by_a_chunk():
    torch.manual_seed(0)
    wide = nn.Sequential(nn.Linear(8, 512), nn.GELU(), nn.Linear(512, 512), nn.GELU(),
                         nn.Linear(512, 8))
    x1, x2 = torch.randn(256, 8), torch.randn(256, 8)

    def loss_fn(a, b):
        return tilecl.clip_loss(a, b, 10.0, backend="torch")

    full, cached = PeakTensorBytes(), PeakTensorBytes()
    with full:
        loss_fn(wide(x1), wide(x2)).backward()
    with cached:
        grad_cache_step(wide, (x1, x2), loss_fn, chunk_size=32)
    grads = sum(p.numel() * 4 for p in wide.parameters())   # the .grad buffers, in both
    activations = 2 * 256 * 512 * 4 * 3                 # rows x width x fp32 x stored layers
    assert full.peak > grads + activations
    # 8 chunks of 32 rows: the activations of one, plus O(N D) embeddings and loss statistics
    assert cached.peak - grads < (full.peak - grads) / 6, (cached.peak, full.peak, grads)


class _FakeDDP(nn.Module):
    """Records which backward passes ran outside no_sync() (where DDP would all-reduce)."""

    def __init__(self, module):
        super().__init__()
        self.module, self.synced, self._in_no_sync = module, [], False

    @contextlib.contextmanager
    def no_sync(self):
        self._in_no_sync = True
        try:
            yield
        finally:
            self._in_no_sync = False

    def forward(self, x):
        out = self.module(x)
        if torch.is_grad_enabled():
            self.synced.append(not self._in_no_sync)
        return out


def test_ddp_towers_sync_once_after_their_last_chunk():
    tower = _FakeDDP(nn.Linear(3, 4))
    x = torch.randn(10, 3)
    grad_cache_step(tower, (x, x + 1), lambda a, b: tilecl.clip_loss(a, b, 2.0), chunk_size=4)
    assert tower.synced == [False] * 5 + [True]          # 3 + 3 chunks, one shared tower
    a, b = _FakeDDP(nn.Linear(3, 4)), _FakeDDP(nn.Linear(3, 4))
    grad_cache_step((a, b), (x, x), lambda u, v: tilecl.clip_loss(u, v, 2.0), chunk_size=4)
    assert a.synced == b.synced == [False, False, True]


def test_bad_arguments():
    tower = nn.Linear(3, 4)
    x = torch.randn(6, 3)

    def loss(a, b):
        return tilecl.clip_loss(a, b, 2.0)

    with pytest.raises(ValueError, match="chunk_size"):
        grad_cache_step(tower, (x, x), loss, chunk_size=0)
    with pytest.raises(ValueError, match="chunk_size"):
        grad_cache_step(tower, (x, x), loss, chunk_size=2.5)
    with pytest.raises(ValueError, match="chunk_size"):
        grad_cache_step(tower, (x, x), loss, chunk_size=(2, 3, 4))
    with pytest.raises(ValueError, match="towers"):
        grad_cache_step([tower] * 3, (x, x), loss, chunk_size=2)
    with pytest.raises(TypeError, match="inputs"):
        grad_cache_step(tower, x, loss, chunk_size=2)
    with pytest.raises(TypeError, match="must return a tensor"):
        grad_cache_step(lambda t: (t,), (x, x), loss, chunk_size=2)
    with pytest.raises(ValueError, match="0-dim"):
        grad_cache_step(tower, (x, x), lambda a, b: (a * b).sum(1), chunk_size=2)
    with pytest.raises(ValueError, match="same number of rows"):
        grad_cache_step(lambda a, b: a + b, ((x, x[:5]), (x, x)), loss, chunk_size=2)


# ---- the ring: each rank its shard, group= passed to the loss ----------------------------------

def _ring_worker(rank, world, rdv, sizes):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdv}", rank=rank, world_size=world)
    try:
        img_tower, txt_tower, log_scale = _setup(seed=6, p=0.0)
        params = [*img_tower.parameters(), *txt_tower.parameters(), log_scale]
        g = torch.Generator().manual_seed(7)
        images = torch.randn(sum(sizes), 7, generator=g, dtype=torch.float64)
        texts = torch.randn(sum(sizes), 9, generator=g, dtype=torch.float64)
        ref_loss = _clip(log_scale)(img_tower(images), txt_tower(texts))
        ref_loss.backward()
        ref = _grads(params)
        lo = sum(sizes[:rank])
        sl = slice(lo, lo + sizes[rank])
        loss = grad_cache_step((img_tower, txt_tower), (images[sl], texts[sl]), _clip(log_scale),
                               chunk_size=3, group=dist.group.WORLD)
        torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-12, atol=0)
        for p, r in zip(params, ref):               # DDP's average over ranks = one process
            dist.all_reduce(p.grad)
            torch.testing.assert_close(p.grad / world, r, rtol=1e-9, atol=1e-13)
    finally:
        dist.destroy_process_group()


def test_ring_group_matches_single_process(tmp_path):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    ctx = mp.spawn(_ring_worker, args=(2, str(tmp_path / "rdv"), [7, 10]), nprocs=2, join=False)
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError("the gloo workers did not finish in 120 s")


def test_readme_example_runs():
    import pathlib
    import re

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S)
              if "grad_cache_step(" in b]
    assert len(blocks) == 1
    namespace = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)  # noqa: S102
    assert namespace["scale"].grad is not None
    assert all(p.grad is not None for t in namespace["towers"] for p in t.parameters())
