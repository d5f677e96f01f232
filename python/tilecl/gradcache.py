"""Gradient cache: the encoders' activation memory of a contrastive step bounded by one chunk.

A tiled loss removes the N x M logits from a large-batch step; what remains grows with N through
the encoders' activations. The gradient cache (Gao et al., "Scaling Deep Contrastive Learning
Batch Size under Memory Limited Setup", 2021) splits that too, for any towers:

1. embed every chunk of every tower without a graph, keeping only the embeddings e_t [N, D];
2. one loss over all embeddings (a tiled tilecl loss: O(N D) memory), backward to the embedding
   gradients g_t = d loss / d e_t [N, D] (and to the loss's own parameters, e.g. a logit scale);
3. re-embed chunk by chunk with a graph and backpropagate each chunk's cached g_t rows:
   d loss / d theta = sum_chunks (d e_chunk / d theta)^T g_chunk, the chain rule split by rows.

Peak memory: one chunk's activations + O(N D), instead of N rows of activations. Cost: one extra
forward of every tower (step 3 repeats step 1). The random state (CPU and the inputs' accelerator)
is recorded before each chunk of step 1 and replayed in step 3, so dropout draws the same masks in
both passes. The result equals one backward through the graph of the same chunked forward (the
towers run tower by tower, chunk by chunk, in that order); a model whose forward mixes rows of a
batch (batch norm) sees chunk statistics, as with any micro-batching.

With ``group=`` each rank passes its local shard; the loss call gets ``group=group`` (tilecl's ring
computes the global-batch loss and each rank's local embedding gradients), and step 3 stays local.
A tower wrapped in DistributedDataParallel re-embeds all but its last chunk under ``no_sync()``, so
its gradients are all-reduced once, after the last chunk.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import torch


class _RandomState:
    """The CPU generator's state and that of each accelerator device an input lives on."""

    def __init__(self, devices):
        self.cpu = torch.get_rng_state()
        self.devices = devices
        self.accel = [getattr(torch, d.type).get_rng_state(d) for d in devices]

    @contextlib.contextmanager
    def replay(self):
        by_type = {}
        for d in self.devices:
            by_type.setdefault(d.type, []).append(d.index)
        with contextlib.ExitStack() as stack:
            if not by_type:
                stack.enter_context(torch.random.fork_rng(devices=[]))
            for i, (kind, idx) in enumerate(by_type.items()):
                # the CPU state is forked once, with the first device type
                stack.enter_context(torch.random.fork_rng(devices=idx, device_type=kind)
                                    if i == 0 else _fork_device(kind, idx))
            torch.set_rng_state(self.cpu)
            for d, s in zip(self.devices, self.accel):
                getattr(torch, d.type).set_rng_state(s, d)
            yield


@contextlib.contextmanager
def _fork_device(kind, indices):
    mod = getattr(torch, kind)
    saved = [mod.get_rng_state(i) for i in indices]
    try:
        yield
    finally:
        for i, s in zip(indices, saved):
            mod.set_rng_state(s, i)


def _tensors(x):
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict):
        return [v for v in x.values() if isinstance(v, torch.Tensor)]
    if isinstance(x, (list, tuple)):
        return [v for v in x if isinstance(v, torch.Tensor)]
    return []


def _rows(batch, name):
    ts = [t for t in _tensors(batch) if t.dim() > 0]
    if not ts:
        raise TypeError(f"{name} must be a tensor, or a dict / list / tuple holding tensors, got "
                        f"{type(batch).__name__}")
    n = ts[0].shape[0]
    for t in ts[1:]:
        if t.shape[0] != n:
            raise ValueError(f"{name}: every tensor must have the same number of rows (dim 0), "
                             f"got {n} and {t.shape[0]}")
    return n


def _slice(batch, i0, i1):
    def cut(v):
        return v[i0:i1] if isinstance(v, torch.Tensor) and v.dim() > 0 else v

    if isinstance(batch, torch.Tensor):
        return cut(batch)
    if isinstance(batch, dict):
        return {k: cut(v) for k, v in batch.items()}
    return type(batch)(cut(v) for v in batch)


def _call(tower, chunk):
    if isinstance(chunk, dict):
        return tower(**chunk)
    if isinstance(chunk, (list, tuple)):
        return tower(*chunk)
    return tower(chunk)


def _check_embedding(e, name, rows):
    if not isinstance(e, torch.Tensor):
        raise TypeError(f"{name} must return a tensor [rows, D], got {type(e).__name__} "
                        "(wrap the tower, e.g. lambda x: model(x).pooler_output)")
    if e.dim() < 1 or e.shape[0] != rows:
        raise ValueError(f"{name} returned shape {tuple(e.shape)} for {rows} rows; expected "
                         f"[{rows}, ...]")
    return e


def grad_cache_step(towers: Callable | Sequence[Callable], inputs: Sequence[Any],
                    loss_fn: Callable[..., torch.Tensor], *, chunk_size: int | Sequence[int],
                    group=None) -> torch.Tensor:
    """One training step's forward and backward through a gradient cache; returns the loss.

    towers: one callable per entry of ``inputs`` (e.g. ``(image_encoder, text_encoder)``), or one
        callable shared by all (a siamese encoder). A tower maps a chunk of its input to
        embeddings [rows, D].
    inputs: one batch per tower: a tensor [N, ...], or a dict (passed as keyword arguments) /
        tuple or list (passed as positional arguments) of tensors with N rows; non-tensor values
        and 0-dim tensors are passed to every chunk unchanged. The towers' N may differ.
    loss_fn: ``loss_fn(*embeddings)`` -> 0-dim loss over the whole batch, e.g.
        ``lambda img, txt: tilecl.clip_loss(img, txt, model.logit_scale.exp())``; called with
        ``group=group`` as well when a group is given. Parameters it uses (a logit scale) get
        their gradients in step 2.
    chunk_size: rows per chunk (one int, or one per tower).
    group: a torch.distributed process group: each rank passes its local shard.

    Gradients accumulate into ``.grad`` as ``loss.backward()`` would; call the optimizer after.
    Returns the loss, detached.

    Example::

        loss = tilecl.grad_cache_step(
            (model.encode_image, model.encode_text), (images, texts),
            lambda i, t: tilecl.clip_loss(i, t, model.logit_scale.exp()), chunk_size=64)
        optimizer.step(); optimizer.zero_grad()
    """
    if not isinstance(inputs, (list, tuple)) or not inputs:
        raise TypeError("inputs must be a non-empty list or tuple of per-tower batches, got "
                        f"{type(inputs).__name__}")
    k = len(inputs)
    if callable(towers):
        towers = [towers] * k
    towers = list(towers)
    if len(towers) != k:
        raise ValueError(f"towers: got {len(towers)} for {k} inputs (one per input, or one "
                         "callable for all)")
    for t in towers:
        if not callable(t):
            raise TypeError(f"towers must be callables, got {type(t).__name__}")
    sizes = ([chunk_size] * k if not isinstance(chunk_size, (list, tuple))
             else list(chunk_size))
    if len(sizes) != k or any(isinstance(c, bool) or not isinstance(c, int) or c < 1
                              for c in sizes):
        raise ValueError(f"chunk_size must be an int >= 1 or one per tower, got {chunk_size!r}")
    rows = [_rows(b, f"inputs[{i}]") for i, b in enumerate(inputs)]
    if min(rows) < 1:
        raise ValueError(f"inputs: every batch needs at least one row, got {rows}")
    bounds = [[(i0, min(i0 + c, n)) for i0 in range(0, n, c)] for n, c in zip(rows, sizes)]

    # 1. embed every chunk without a graph; record the random state before each
    embeddings, states = [], []
    for t, (tower, batch) in enumerate(zip(towers, inputs)):
        parts, st = [], []
        for i0, i1 in bounds[t]:
            chunk = _slice(batch, i0, i1)
            devices = sorted({x.device for x in _tensors(chunk) if x.device.type != "cpu"},
                             key=str)
            st.append(_RandomState(devices))
            with torch.no_grad():
                parts.append(_check_embedding(_call(tower, chunk), f"towers[{t}]", i1 - i0))
        embeddings.append(torch.cat(parts) if len(parts) > 1 else parts[0])
        states.append(st)

    # 2. one loss over all embeddings; its backward gives g_t = d loss / d e_t
    leaves = [e.detach().requires_grad_() for e in embeddings]
    del embeddings, parts
    with torch.enable_grad():
        loss = loss_fn(*leaves) if group is None else loss_fn(*leaves, group=group)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise ValueError("loss_fn must return a 0-dim tensor, got "
                             f"{getattr(loss, 'shape', type(loss).__name__)}")
        loss.backward()
    grads = [leaf.grad for leaf in leaves]
    del leaves

    # 3. re-embed chunk by chunk with the same random state; backpropagate the cached rows.
    # A DDP tower syncs on the last backward it takes part in (a shared tower: its last input's).
    last_use = {id(tower): t for t, tower in enumerate(towers) if grads[t] is not None}
    for t, (tower, batch) in enumerate(zip(towers, inputs)):
        if grads[t] is None:            # the loss did not use this tower's embeddings
            continue
        no_sync = getattr(tower, "no_sync", None)
        for c, (i0, i1) in enumerate(bounds[t]):
            final = last_use[id(tower)] == t and c == len(bounds[t]) - 1
            sync = contextlib.nullcontext() if no_sync is None or final else no_sync()
            with sync, states[t][c].replay(), torch.enable_grad():
                e = _call(tower, _slice(batch, i0, i1))
                if e.requires_grad:     # a frozen tower has nothing to backpropagate
                    e.backward(grads[t][i0:i1])
    return loss.detach()


__all__ = ["grad_cache_step"]
