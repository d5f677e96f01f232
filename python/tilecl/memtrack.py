"""Deterministic peak-memory accounting on the CPU (no allocator statistics exist there); used by
the tests, the demo and the benchmarks.

``PeakTensorBytes`` is a TorchDispatchMode that sees every tensor an op produces, counts each
storage once while any tensor on it is alive, and records the peak of the live total and the
largest single storage. Inputs created before the mode are not counted, nor are views of them
or in-place results on them (an op whose output shares an input's untracked storage).
"""

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakTensorBytes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live = {}  # storage data_ptr -> [nbytes, number of live tensors on it]
        self.current = 0
        self.peak = 0
        self.largest = 0

    def _release(self, ptr):
        entry = self.live.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = None
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                st = t.untyped_storage()
                ptr, nbytes = st.data_ptr(), st.nbytes()
                if ptr == 0:
                    continue
                if ptr not in self.live:
                    if inputs is None:
                        inputs = {x.untyped_storage().data_ptr()
                                  for x in tree_flatten((args, kwargs))[0]
                                  if isinstance(x, torch.Tensor) and x.device.type == "cpu"}
                    if ptr in inputs:  # a view of (or in-place op on) a tensor made before
                        continue  # the mode: no allocation
                if ptr in self.live:
                    self.live[ptr][1] += 1
                else:
                    self.live[ptr] = [nbytes, 1]
                    self.current += nbytes
                    self.peak = max(self.peak, self.current)
                    self.largest = max(self.largest, nbytes)
                weakref.finalize(t, self._release, ptr)
        return out
