"""The harness: one setup factory shared by the speed and the memory measurement, timers for CPU
and CUDA, a peak-memory probe for each, and the batch-size sweep (doubling until OOM, a cap, or the
time budget).

Modes: ``fwd`` = the loss call with autograd recording (what training pays before backward);
``bwd`` = ``loss.backward()`` alone (the forward runs untimed before each repeat);
``fwd_bwd`` = both.

Time. CPU: ``time.perf_counter`` around each call, median of the repeats after warm-up.
CUDA: CUDA events around each call, median of the repeats after warm-up (compiles and autotuning
happen there), rotating through input sets whose total size exceeds twice the L2 cache, so no
repeat finds its inputs in L2 (what ``triton.testing.do_bench`` does with a cache flush).

Memory, "extra peak": the highest amount of tensor memory alive during the call minus what was
alive before it (the inputs, and for ``bwd`` the saved forward state), so it counts the loss's
own working memory plus the gradients it returns. CUDA: ``torch.cuda.max_memory_allocated``
after ``reset_peak_memory_stats``. CPU has no allocator statistics, so a ``TorchDispatchMode``
sees every ATen op's outputs, counts each new storage once, and a ``weakref.finalize`` on the
storage subtracts it when it is freed: a peak of live tensor bytes (kernel-internal scratch that
never becomes a tensor is not seen). Cross-checked against the process VmHWM (peak RSS, reset via
/proc/self/clear_refs, glibc mmap threshold pinned): within 1 MiB for dense CLIP at N = 2048.
"""

from __future__ import annotations

import math
import statistics
import time
import weakref
from dataclasses import asdict, dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from . import providers as P

MODES = ("fwd", "bwd", "fwd_bwd")
MiB = 2**20


@dataclass
class Case:
    loss: str
    provider: str
    n: int
    d: int
    dtype: str  # "fp32" | "bf16" | "fp16"
    mode: str
    device: str


@dataclass
class Config:
    warmup: int = 1
    min_reps: int = 3
    max_reps: int = 10
    target_s: float = 0.4  # repeat until this much measured time (within min/max reps)
    memory: bool = True
    extra: dict = field(default_factory=dict)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---- the setup factory (shared by time and memory) ------------------------------------------------

class Setup:
    """Inputs and the loss callable of one case; ``step(i)`` runs the case's mode on input set i."""

    def __init__(self, case: Case, n_sets: int = 1):
        self.case = case
        dev = torch.device(case.device)
        fns = P.providers(case.loss, dev, case.d, variants=True)
        if case.provider not in fns:
            raise KeyError(f"provider {case.provider!r} is not available for {case.loss} on {dev}; "
                           f"available: {sorted(fns)}")
        self.fn = fns[case.provider]
        dtype = DTYPES[case.dtype]
        self.sets = [P.make_inputs(case.loss, case.n, case.d, dtype, dev, seed=s)
                     for s in range(n_sets)]

    def forward(self, i=0):
        return self.fn(self.sets[i % len(self.sets)])

    def zero_grad(self, i=0):
        for t in P.leaves(self.sets[i % len(self.sets)]):
            t.grad = None

    def step(self, i=0, loss=None):
        """Run the mode once (``loss``: a prepared forward for ``bwd``); returns what it keeps."""
        mode = self.case.mode
        if mode == "fwd":
            return self.forward(i)
        if mode == "bwd":
            loss.backward()
            return None
        self.forward(i).backward()
        return None

    def prepare(self, i=0):
        """Untimed work before a timed step: the forward of ``bwd``; clears gradients."""
        self.zero_grad(i)
        return self.forward(i) if self.case.mode == "bwd" else None


def n_rotating_sets(case: Case, cap=16):
    """How many input sets make the rotation exceed twice the L2 cache (1 on CPU). ``cap`` is the
    number of calls (warm-up + repeats): more sets than calls would never be used."""
    if case.device != "cuda":
        return 1
    one = P.input_bytes(P.make_inputs(case.loss, min(case.n, 64), case.d, DTYPES[case.dtype],
                                      torch.device("cpu")))
    one = one * max(case.n, 64) / min(case.n, 64)
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * MiB)
    return int(min(cap, max(1, math.ceil(2 * l2 / max(one, 1)))))


# ---- timing --------------------------------------------------------------------------------------

def _time_cpu(s: Setup, cfg: Config):
    times = []
    for r in range(cfg.warmup + cfg.max_reps):
        pre = s.prepare(r)
        t0 = time.perf_counter()
        out = s.step(r, pre)
        t1 = time.perf_counter()
        del out, pre
        if r >= cfg.warmup:
            times.append(t1 - t0)
            if len(times) >= cfg.min_reps and sum(times) >= cfg.target_s:
                break
        elif t1 - t0 > 4 * cfg.target_s:  # a slow case: the minimum of repeats (one if > 2 s)
            reps = 1 if t1 - t0 > 2.0 else cfg.min_reps
            cfg = Config(warmup=cfg.warmup, min_reps=reps, max_reps=reps, target_s=0.0,
                         memory=cfg.memory)
    s.zero_grad()
    return times


def _time_cuda(s: Setup, cfg: Config):
    times, pending = [], []
    for r in range(cfg.warmup + cfg.max_reps):
        pre = s.prepare(r)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = s.step(r, pre)
        end.record()
        del out, pre
        if r < cfg.warmup:
            torch.cuda.synchronize()
            # the last warm-up (compiles and autotuning are done) took over 1 s: one repeat
            if r == cfg.warmup - 1 and start.elapsed_time(end) > 1e3:
                cfg = Config(warmup=cfg.warmup, min_reps=1, max_reps=1, target_s=0.0,
                             memory=cfg.memory)
            continue
        pending.append((start, end))
        if len(pending) >= cfg.min_reps:
            torch.cuda.synchronize()
            times += [a.elapsed_time(b) / 1e3 for a, b in pending]
            pending = []
            if sum(times) >= cfg.target_s:
                break
    torch.cuda.synchronize()
    times += [a.elapsed_time(b) / 1e3 for a, b in pending]
    s.zero_grad()
    return times


# ---- memory --------------------------------------------------------------------------------------

class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of CPU tensor storages created while active (each storage counted once)."""

    def __init__(self):
        super().__init__()
        self.current = self.peak = 0
        self._seen = set()

    def _freed(self, key, nbytes):
        self.current -= nbytes
        self._seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            st = t.untyped_storage()
            key, nbytes = st.data_ptr(), st.nbytes()
            if nbytes == 0 or key in self._seen:
                continue
            self._seen.add(key)
            self.current += nbytes
            self.peak = max(self.peak, self.current)
            weakref.finalize(st, self._freed, key, nbytes)
        return out


def _peak_cpu(s: Setup):
    pre = s.prepare(0)
    probe = LiveTensorBytes()
    with probe:
        out = s.step(0, pre)
    del out, pre
    s.zero_grad()
    return probe.peak


def _peak_cuda(s: Setup):
    pre = s.prepare(0)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = s.step(0, pre)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out, pre
    s.zero_grad()
    return peak


# ---- one measurement -----------------------------------------------------------------------------

def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    msg = str(exc).lower()
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        "out of memory" in msg or "can't allocate memory" in msg or "not enough memory" in msg
        or isinstance(exc, MemoryError))


def _cleanup(device):
    import gc

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def measure(case: Case, cfg: Config) -> dict:
    """Time and extra peak memory of one case: a record with status ok / oom / error."""
    rec = asdict(case)
    rec.update(status="ok", flops=P.flops(case.loss, case.mode, case.n, d=case.d))
    s = None
    try:
        s = Setup(case, n_sets=n_rotating_sets(case, cap=cfg.warmup + cfg.max_reps))
        rec["input_mib"] = P.input_bytes(s.sets[0]) / MiB
        times = (_time_cuda if case.device == "cuda" else _time_cpu)(s, cfg)
        rec.update(time_ms=1e3 * statistics.median(times), reps=len(times),
                   time_ms_min=1e3 * min(times), time_ms_max=1e3 * max(times))
        rec["tflops"] = rec["flops"] / (rec["time_ms"] / 1e3) / 1e12
        if cfg.memory:
            s.sets = s.sets[:1]
            _cleanup(case.device)
            peak = (_peak_cuda if case.device == "cuda" else _peak_cpu)(s)
            rec["mem_mib"] = peak / MiB
    except Exception as exc:  # noqa: BLE001 - recorded, never a crash
        rec["status"] = "oom" if is_oom(exc) else "error"
        rec["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    finally:
        del s
        _cleanup(case.device)
    rec.update(cfg.extra)
    return rec


def sweep(loss, provider, d, dtype, mode, device, sizes, cfg: Config, *, time_cap_s, deadline,
          log=print):
    """Records over doubling sizes; stops after an OOM, an error, a call slower than time_cap_s,
    or past the deadline (the remaining sizes are recorded as skipped)."""
    out, stop = [], None
    for n in sizes:
        case = Case(loss, provider, n, d, dtype, mode, device)
        if stop is None and time.monotonic() > deadline:
            stop = "skipped: time budget"
        if stop is not None:
            rec = asdict(case)
            rec.update(status="skipped", error=stop, **cfg.extra)
            out.append(rec)
            continue
        rec = measure(case, cfg)
        out.append(rec)
        log(format_record(rec))
        if rec["status"] != "ok":
            stop = f"skipped: after {rec['status']} at n={n}"
        elif rec["time_ms"] / 1e3 > time_cap_s:
            stop = f"skipped: n={n} took {rec['time_ms'] / 1e3:.2f} s > cap {time_cap_s} s"
    return out


def format_record(r) -> str:
    head = f"{r['loss']:<6} {r['provider']:<16} {r['mode']:<7} {r['dtype']} D={r['d']:<5} " \
           f"N={r['n']:<7}"
    if r["status"] != "ok":
        return f"{head} {r['status'].upper()} {r.get('error', '')}"
    mem = f"{r['mem_mib']:9.1f} MiB" if "mem_mib" in r else ""
    return f"{head} {r['time_ms']:10.2f} ms {r['tflops']:7.3f} TFLOP/s {mem}"


def doubling(lo: int, hi: int) -> list:
    """lo, 2 lo, 4 lo, ... up to hi (the N grid of the suites and of the scaling run)."""
    out, n = [], lo
    while n <= hi:
        out.append(n)
        n *= 2
    return out
