"""Tile configurations of the tilecl Triton kernels: the one place they are listed and pruned.

Keys: the autotuner is keyed on ``D`` (the feature dimension), every constexpr flag of the kernel
(``code_flags``) and, automatically, on the dtypes of the tensor arguments (Triton appends them
to the key), never on N or M. Candidates are a
comprehension over block sizes, stages and warps, pruned by an estimate of the shared memory the
software pipeline needs (sm_80: 163 KiB, sm_90: 227 KiB per block) and by D (no D chunk wider than
the next power of two of D). Under ``TRITON_INTERPRET=1`` (and for the compile report) one fixed
small config is used instead, so tests run the same code path without benchmarking.

Meta-parameters:
  BM  rows of a tile (row block of q)         BN  columns of a tile (column block of k)
  BK  D chunk of the logit loop (the q.k dot)  BD  D chunk of the gradient output (backward only)
"""

from __future__ import annotations

import inspect
import os

import triton

# shared memory per block (bytes) by compute capability major*10+minor; default for unknown parts
_SMEM = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
_SMEM_DEFAULT = 99 * 1024


def interpreting() -> bool:
    """True under the Triton interpreter (CPU tensors, numpy semantics)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_precision() -> str:
    """input_precision of fp32 ``tl.dot``: "ieee" (default, parity) or "tf32"/"tf32x3" (fast).

    Set by the environment variable ``TILECL_TRITON_PRECISION``; 16-bit inputs ignore it.
    """
    raw = os.environ.get("TILECL_TRITON_PRECISION", "ieee").strip().lower()
    if raw not in ("ieee", "tf32", "tf32x3"):
        raise ValueError(f"TILECL_TRITON_PRECISION must be ieee, tf32 or tf32x3, got {raw!r}")
    return raw


# the fixed configs: interpreter (small, but BK < 100 so D = 100 takes two ragged chunks) and the
# default compiled by .ci/triton_compile_report.py
INTERPRET_FWD = dict(BM=32, BN=32, BK=64)
INTERPRET_BWD = dict(BM=32, BN=32, BK=64, BD=64)
DEFAULT_FWD = dict(BM=128, BN=64, BK=64, num_warps=8, num_stages=3)
DEFAULT_BWD = dict(BM=64, BN=64, BK=64, BD=128, num_warps=8, num_stages=2)


def _smem_limit(device_index=None) -> int:
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(device_index)
            return _SMEM.get(10 * major + minor, _SMEM_DEFAULT)
    except Exception:  # no CUDA runtime: assume the smallest sm_80-class part
        pass
    return _SMEM_DEFAULT


def _elt(named_args) -> int:
    q = named_args.get("q_ptr")
    return q.element_size() if hasattr(q, "element_size") else 2


def smem_bytes(cfg: dict, elt: int, backward: bool, trans: bool = False) -> int:
    """Shared memory of one block: the pipelined q/k chunks of the logit loop and, backward, the
    gradient matmul's operands (G [acc rows, other] and the [other, BD] q or k chunk)."""
    stages = cfg.get("num_stages", 2)
    b = stages * (cfg["BM"] + cfg["BN"]) * cfg["BK"] * elt
    if backward:
        other = cfg["BM"] if trans else cfg["BN"]
        b += other * (cfg["BD"] + cfg["BM"] + cfg["BN"] - other) * elt
    return b


# Register estimates that keep the candidates free of spills, read off ptxas for every candidate
# at D = 768, bf16, sm_90 (`.ci/triton_compile_report.py --all-configs 768`, 2026-12-01; sm_80
# alike): the forward spills once a [BM, BN] fp32 tile needs more than 64 registers per thread
# (128 x 128 on 4 warps); the backward once its fp32 gradient block (acc_rows x BD) plus twice a
# tile (x, G / H live together) exceeds 128 per thread (96 with SigLIP's fused forward, which
# keeps the softplus sums live too). Of the 25 backward candidates this keeps 12 for dq (none
# spills), 12 for dk and 9 for SigLIP's fused dq (two each with small spills, <= 32 bytes), where
# 10-16 spilled (up to 3 KB); it drops 2 that did not spill (narrow tiles without wgmma). Of the
# 28 forward candidates it keeps 24, one with a 24-byte spill in the column pass. At D = 128 and
# D = 1024 the kept candidates of CLIP show 2 and 3 such small spills (<= 24 bytes), no others.
REG_BUDGET = 128
REG_BUDGET_FUSED = 96


def _prune(backward: bool):
    def prune(configs, named_args, **kwargs):
        d = named_args["D"]
        elt = _elt(named_args)
        limit = _smem_limit()
        dpow = triton.next_power_of_2(max(int(d), 16))
        trans = bool(kwargs.get("TRANS", False))
        topk = int(kwargs.get("TOPK", 0)) > 0
        budget = REG_BUDGET_FUSED if kwargs.get("FWD_STATS") else REG_BUDGET
        keep = []
        for c in configs:
            kw = dict(c.kwargs, num_stages=c.num_stages)
            if kw["BK"] > max(dpow, 64 if backward else 32):  # (backward candidates: BK = 64)
                continue
            threads = 32 * c.num_warps
            tile = kw["BM"] * kw["BN"] / threads  # fp32 registers per thread of one tile
            # top-k keeps the tile's packed int64 keys live: at most 32 tile entries per thread
            if topk and tile > 32:
                continue
            if backward:
                acc_rows = kw["BN"] if trans else kw["BM"]
                if kw["BD"] > max(dpow, 64) or acc_rows * kw["BD"] / threads + 2 * tile > budget:
                    continue
                if kw["BD"] >= 512 and kw["BD"] < dpow:  # a wide BD only as the one chunk
                    continue
            elif tile > 64:
                continue
            if smem_bytes(kw, elt, backward, trans) > limit:
                continue
            keep.append(c)
        return keep or configs[:1]

    return prune


def tuning() -> str:
    """How many candidates the autotuner tries (``TILECL_TRITON_AUTOTUNE``, read when the kernels
    are imported): "full" (default), "small" (the default config and four others per kernel:
    first-call tuning in seconds, for a time-boxed GPU run) or "off" (the default configs)."""
    raw = os.environ.get("TILECL_TRITON_AUTOTUNE", "full").strip().lower()
    if raw not in ("full", "small", "off"):
        raise ValueError(f"TILECL_TRITON_AUTOTUNE must be full, small or off, got {raw!r}")
    return raw


def _config(cfg: dict):
    meta = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}
    return triton.Config(meta, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


# "small": the default first, then what the register budgets keep at D = 768 with the widest
# tiles (forward) and the fewest D chunks (backward)
_SMALL_FWD = [DEFAULT_FWD, dict(BM=128, BN=128, BK=64, num_warps=8, num_stages=3),
              dict(BM=64, BN=128, BK=64, num_warps=4, num_stages=3),
              dict(BM=128, BN=64, BK=32, num_warps=8, num_stages=4),
              dict(BM=64, BN=64, BK=64, num_warps=4, num_stages=4)]
_SMALL_BWD = [DEFAULT_BWD, dict(BM=64, BN=64, BK=64, BD=256, num_warps=8, num_stages=2),
              dict(BM=64, BN=128, BK=64, BD=128, num_warps=8, num_stages=2),
              dict(BM=128, BN=64, BK=64, BD=128, num_warps=8, num_stages=2),
              dict(BM=16, BN=32, BK=64, BD=1024, num_warps=8, num_stages=2)]


def fwd_configs():
    if interpreting():
        return [triton.Config(dict(INTERPRET_FWD), num_warps=1, num_stages=1)]
    mode = tuning()
    if mode != "full":
        return [_config(c) for c in (_SMALL_FWD if mode == "small" else [DEFAULT_FWD])]
    return [
        triton.Config(dict(BM=bm, BN=bn, BK=bk), num_warps=w, num_stages=s)
        for bm in (64, 128)
        for bn in (64, 128)
        for bk in (32, 64)
        for w in (4, 8)
        for s in (3, 4)
        if not (bm == 64 and bn == 64 and w == 8)
    ]


def bwd_configs():
    """Backward tiles. The fp32 gradient block [BM (dq pass) or BN (dk pass), BD] lives in
    registers; D > BD costs one more recompute of the logits per D chunk (grid axis 1). Two
    families: square-ish tiles with BD <= 256 (no recompute for D <= 256), and narrow tiles with
    a wide BD (up to 1024: one chunk for D <= 1024, e.g. 768) that trade tensor-core shape for
    no recompute. The prune keeps the accumulator within 128 fp32 registers per thread."""
    if interpreting():
        return [triton.Config(dict(INTERPRET_BWD), num_warps=1, num_stages=1)]
    mode = tuning()
    if mode != "full":
        return [_config(c) for c in (_SMALL_BWD if mode == "small" else [DEFAULT_BWD])]
    square = [(bm, bn, bd) for bm in (64, 128) for bn in (64, 128) for bd in (64, 128, 256)
              if bm * bn <= 128 * 64]
    narrow = [(a, b, bd) for bd in (512, 1024) for a in (16, 32) for b in (32, 64, 128)]
    narrow += [(b, a, bd) for a, b, bd in narrow]
    return [
        triton.Config(dict(BM=bm, BN=bn, BK=64, BD=bd), num_warps=w, num_stages=2)
        for bm, bn, bd in square + narrow
        for w in (4, 8)
    ]


def code_flags(kernel) -> list:
    """The constexpr parameters of a jit kernel (optionally wrapped by ``triton.heuristics``)
    that its launchers pass: every constexpr of its signature but those a heuristic derives
    (from the dtypes, which the autotuner appends to its key anyway)."""
    derived = set(getattr(kernel, "values", None) or ())
    f = kernel
    while not inspect.isfunction(f):
        f = f.fn
    return [name for name, p in inspect.signature(f).parameters.items()
            if "constexpr" in str(p.annotation) and name not in derived]


def autotune_kwargs(backward: bool, flags=(), reset_to_zero=()) -> dict:
    """Arguments of ``triton.autotune`` for the forward or backward kernel.

    Key: D, the dtypes (added by Triton) and every constexpr in ``flags`` that the candidates do
    not tune (BM, BN, BK, BD): a flag changes the compiled code (row vs column pass, distance
    logits, positives, sums, precision ...), so each specialisation gets its own tuning; never N
    or M. ``reset_to_zero``: the buffers a kernel accumulates into (atomics), zeroed by the
    autotuner before each benchmark run and before the chosen config's launch.
    """
    configs = bwd_configs() if backward else fwd_configs()
    tuned = {name for c in configs for name in c.kwargs}
    return dict(
        configs=configs,
        key=["D", *(f for f in flags if f not in tuned)],
        prune_configs_by={"early_config_prune": _prune(backward)},
        reset_to_zero=list(reset_to_zero) or None,
    )
