"""The ``triton`` tile backend as the registry sees it (``_backends.Backend``).

Modules, imports running downwards only (``__init__`` -> ``bounded`` -> ``gemm`` -> ``common``;
``launch`` -> ``common`` -> ``tritonops``):

* ``launch``: the plain contract (``forward`` / ``backward``, fp32 gradients) and its custom ops;
* ``bounded``: the memory-bounded backward (``backward_final``) and SigLIP's forward fused with
  the dq pass (``forward_with_dq`` / ``finish_dq``);
* ``gemm``: the backward through H groups and library GEMMs (``bounded`` picks it at large D);
* ``common``: the shared helpers below all three (the kernel handle, flags and pointer
  arguments, the dq / dk launch, the scalar gradients, the bounded workspace and chunking).
"""

from .bounded import backward_final, finish_dq, forward_with_dq
from .common import unavailable, workspace_bytes
from .launch import backward, forward

upcast_inputs = False  # the kernels take fp16 / bf16 and upcast in registers
prefix_sweep = False

__all__ = ["forward", "backward", "unavailable", "backward_final", "forward_with_dq",
           "finish_dq", "workspace_bytes", "upcast_inputs", "prefix_sweep"]
