"""The `triton` backend: the Triton kernels as custom ops dwf_triton::dwf_forward/backward/sgd_step.

Registered with torch.library.custom_op + register_fake, launching through wrap_triton, so
torch.compile(fullgraph=True) sees one node and opcheck passes, on a GPU and under
TRITON_INTERPRET=1 alike (TOOLCHAIN.md: triton_op fails both under the interpreter).

AVAILABLE is False when triton is not installed; INTERPRETED tells whether the kernels run in
Triton's CPU interpreter (TRITON_INTERPRET=1 at import time), which serves CPU tensors only.
"""

from __future__ import annotations

import os

import torch

from . import _autograd, _validate

INTERPRETED: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"
IMPORT_ERROR: str | None = None

try:
    from . import _triton_kernels
except ImportError as exc:
    AVAILABLE = False
    IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
    forward_op = backward_op = sgd_step_op = None
else:
    AVAILABLE = True

    @torch.library.custom_op("dwf_triton::dwf_forward", mutates_args=())
    def _dwf_forward(
        factors: torch.Tensor, out_dtype: torch.dtype | None, with_sumsq: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = _validate.check_forward(factors, out_dtype)
        return _triton_kernels.forward(factors, out, with_sumsq)

    @torch.library.custom_op("dwf_triton::dwf_backward", mutates_args=())
    def _dwf_backward(factors: torch.Tensor, grad_w: torch.Tensor, grad_sumsq: torch.Tensor | None) -> torch.Tensor:
        _validate.check_backward(factors, grad_w, grad_sumsq)
        return _triton_kernels.backward(factors, grad_w, grad_sumsq)

    @torch.library.custom_op("dwf_triton::dwf_sgd_step", mutates_args=("factors", "momentum_buffer"))
    def _dwf_sgd_step(
        factors: torch.Tensor,
        momentum_buffer: torch.Tensor | None,
        grad_w: torch.Tensor,
        grad_sumsq: torch.Tensor | None,
        lr: float,
        momentum: float,
        dampening: float,
        weight_decay: float,
        nesterov: bool,
        maximize: bool,
        init_buffer: bool,
    ) -> None:
        _validate.check_sgd_step(
            factors, grad_w, grad_sumsq, momentum_buffer, lr, momentum, dampening, weight_decay, nesterov
        )
        _triton_kernels.sgd_step(
            factors,
            momentum_buffer,
            grad_w,
            grad_sumsq,
            lr,
            momentum,
            dampening,
            weight_decay,
            nesterov,
            maximize,
            init_buffer,
        )

    _autograd.register(
        "dwf_triton::dwf_forward",
        "dwf_triton::dwf_backward",
        "dwf_triton::dwf_sgd_step",
        torch.ops.dwf_triton.dwf_backward,
    )
    forward_op = torch.ops.dwf_triton.dwf_forward
    backward_op = torch.ops.dwf_triton.dwf_backward
    sgd_step_op = torch.ops.dwf_triton.dwf_sgd_step
