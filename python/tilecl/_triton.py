"""The ``triton`` tile backend as the registry sees it (``_backends``): the launchers' contract
(``forward`` / ``backward`` / ``unavailable``, ``_triton_backend``) and the optional hooks of the
memory-bounded backward (``backward_final``, ``forward_with_dq`` / ``finish_dq``,
``_triton_backward``). Imports run downwards only:
_triton -> _triton_backward -> _triton_gemm -> _triton_chunks -> _triton_backend -> tritonops.
"""

from ._triton_backend import backward, forward, unavailable
from ._triton_backward import backward_final, finish_dq, forward_with_dq, workspace_bytes

upcast_inputs = False  # the kernels take fp16 / bf16 and upcast in registers
prefix_sweep = False

__all__ = ["forward", "backward", "unavailable", "backward_final", "forward_with_dq",
           "finish_dq", "workspace_bytes", "upcast_inputs", "prefix_sweep"]
