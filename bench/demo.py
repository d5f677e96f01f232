"""`make demo`: train a small encoder with a tilecl loss and with the dense loss, on the CPU.

Data: scikit-learn's digits (1797 8x8 images, shipped with the package). Model: an MLP encoder
to 32-d unit vectors, trained with SupCon (2 noisy views per image) twice from the same
initialization and the same batches: once with ``backend="reference"`` (the dense loss, the
whole B x B similarity matrix) and once with tilecl's tiled ``backend="torch"``. It prints
how closely the two loss curves agree, the training time of each, and then one symmetric-CLIP
forward+backward at N = 8192, D = 256 with each: time and peak extra memory (counted tensor by
tensor, tilecl.memtrack).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import tilecl
from tilecl.memtrack import PeakTensorBytes


def encoder():
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 32))


def views(x, gen):
    """Two augmented views: pixel noise and random pixel dropout."""
    out = []
    for _ in range(2):
        noise = 0.1 * torch.randn(x.shape, generator=gen)
        keep = (torch.rand(x.shape, generator=gen) > 0.15).float()
        out.append(x * keep + noise)
    return out


def train(backend, steps, batch, seed=0, check=False):
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    torch.manual_seed(seed)
    model = encoder()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed + 1)
    losses, parity = [], []
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=gen)
        v1, v2 = views(x[idx], gen)
        feats = torch.stack([F.normalize(model(v1), dim=1), F.normalize(model(v2), dim=1)], 1)
        loss = tilecl.supcon(feats, y[idx], temperature=0.1, backend=backend)
        if check:  # the dense loss on the very same features: one-step parity
            with torch.no_grad():
                ref = tilecl.supcon(feats, y[idx], temperature=0.1, backend="reference")
            parity.append(abs(loss.item() - ref.item()) / abs(ref.item()))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    elapsed = time.perf_counter() - t0
    with torch.no_grad():  # nearest-class-mean accuracy of the learned embedding
        z = F.normalize(model(x), dim=1)
        means = F.normalize(torch.stack([z[y == c].mean(0) for c in range(10)]), dim=1)
        acc = ((z @ means.T).argmax(1) == y).float().mean().item()
    return losses, elapsed, acc, parity


def big_clip(backend, n, d):
    """One symmetric-CLIP forward+backward at N x N: (seconds, peak bytes beyond the inputs and
    their gradients)."""
    torch.manual_seed(0)
    img = F.normalize(torch.randn(n, d), dim=1).requires_grad_()
    txt = F.normalize(torch.randn(n, d), dim=1).requires_grad_()
    t0 = time.perf_counter()
    tilecl.clip_loss(img, txt, 14.3, backend=backend).backward()
    seconds = time.perf_counter() - t0
    img.grad = txt.grad = None
    mode = PeakTensorBytes()
    with mode:
        tilecl.clip_loss(img, txt, 14.3, backend=backend).backward()
    grads = (img.numel() + txt.numel()) * 4  # the inputs' gradients are not "extra"
    return seconds, mode.peak - grads


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=384)
    ap.add_argument("--clip-n", type=int, default=8192)
    ap.add_argument("--clip-d", type=int, default=256)
    args = ap.parse_args()
    print(f"tilecl {tilecl.__version__} demo on {torch.get_num_threads()} CPU threads, torch "
          f"{torch.__version__}")
    print(f"SupCon on scikit-learn digits: MLP 64-256-32, 2 views, batch {args.batch} "
          f"({2 * args.batch} anchors), {args.steps} Adam steps, same init and batches\n")
    dense, t_dense, acc_dense, _ = train("reference", args.steps, args.batch)
    tiled, t_tiled, acc_tiled, _ = train("torch", args.steps, args.batch)
    _, _, _, parity = train("torch", args.steps // 4, args.batch, check=True)
    print(f"{'step':>6} {'dense loss':>12} {'tilecl loss':>12} {'|diff|':>10}")
    for s in sorted({0, 1, args.steps // 4, args.steps // 2, 3 * args.steps // 4, args.steps - 1}):
        print(f"{s:>6} {dense[s]:>12.6f} {tiled[s]:>12.6f} {abs(dense[s] - tiled[s]):>10.2e}")
    worst = max(abs(a - b) for a, b in zip(dense, tiled))
    rel = max(abs(a - b) / abs(a) for a, b in zip(dense, tiled))
    print(f"\nsame features, dense vs tilecl loss: max relative difference {max(parity):.1e} "
          f"(checked at each of {len(parity)} steps)")
    print(f"two training runs from the same init: max |diff| {worst:.2e} (relative {rel:.2e}) over "
          f"{args.steps} steps; fp32 rounding differences grow slowly as the runs drift apart")
    print(f"nearest-class-mean accuracy after training: dense {acc_dense:.3f}, tilecl {acc_tiled:.3f}")
    print(f"training time: dense {t_dense:.2f} s, tilecl {t_tiled:.2f} s")

    n, d = args.clip_n, args.clip_d
    print(f"\nsymmetric CLIP loss, forward+backward, N = M = {n}, D = {d}, fp32:")
    print(f"{'loss':>12} {'time (s)':>10} {'peak extra memory':>20}  (beyond inputs and gradients)")
    results = {}
    for label, backend in (("dense", "reference"), ("tilecl", "torch")):
        seconds, peak = big_clip(backend, n, d)
        results[label] = peak
        print(f"{label:>12} {seconds:>10.2f} {peak / 2**20:>16.1f} MiB")
    print(f"tilecl uses {100 * results['tilecl'] / results['dense']:.1f}% of the dense loss's extra "
          f"memory (the N x N fp32 logits alone are {n * n * 4 / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
