"""The `cuda` and `cpu` backends: the C++ extension dwf_kernels._C, whose ops are
torch.ops.dwf_kernels.{dwf_forward, dwf_backward, dwf_sgd_step, dwf_grad_sumsq}.

Their schemas, CPU/CUDA kernels, argument checks and autograd formula live in C++ (csrc/); Python
adds what only Python can: the fake implementations (registration.py), for torch.compile and
FakeTensor. Whether the library loaded, and for which devices it has kernels, is _extension.py's.
"""

from __future__ import annotations

import torch

from .. import _extension
from . import registration
from .base import Backend, OpFamily

if _extension.LOADED:
    registration.register_fakes("dwf_kernels")
    OPS: OpFamily | None = OpFamily.of("dwf_kernels")
    forward = OPS.forward
    backward = OPS.backward
    grad_sumsq = OPS.grad_sumsq
    # The in-place ops bump the version counters of what they write in their ADInplaceOrView kernel
    # (csrc/dwf_ops.cpp), as torch's own in-place ops do: the ops themselves serve.
    sgd_step = OPS.sgd_step
    sgd_step_multi = torch.ops.dwf_kernels.dwf_sgd_step_multi
    # torch.optim.SGD's step on plain float32/float64 CPU parameters, one op call for the list (its
    # checks are the op's).
    plain_sgd_step_multi = torch.ops.dwf_kernels.sgd_step_multi
else:
    OPS = None
    forward = backward = grad_sumsq = sgd_step = sgd_step_multi = plain_sgd_step_multi = None


def _backend(device_type: str) -> Backend:
    def serves(requested: str) -> bool:
        return requested == device_type and device_type in _extension.KERNEL_DEVICES

    def why_not(requested: str, instead: str) -> str:
        if not _extension.LOADED:
            return (
                f"backend {device_type!r} needs the C++ extension dwf_kernels._C, which is not loaded "
                f"({_extension.LOAD_ERROR}); {instead}, or build it: pip install --no-build-isolation -e ."
            )
        if requested != device_type:
            return (
                f"backend {device_type!r} runs {device_type.upper()} tensors only, got a {requested} tensor; {instead}"
            )
        return (
            "dwf_kernels was built without CUDA kernels (torch without CUDA or no nvcc at build time), "
            f"so backend 'cuda' cannot serve; {instead}, or rebuild with a CUDA torch and nvcc "
            "(DWF_KERNELS_CUDA=1 pip install --no-build-isolation -e .)"
        )

    # forward and backward are the ops themselves: no Python between the front door and the dispatcher.
    return Backend(
        device_type,
        forward=forward,
        backward=backward,
        sgd_step=sgd_step,
        grad_sumsq=grad_sumsq,
        sgd_step_multi=sgd_step_multi,
        serves=serves,
        why_not=why_not,
        ops=OPS,
    )


CUDA = _backend("cuda")
CPU = _backend("cpu")
