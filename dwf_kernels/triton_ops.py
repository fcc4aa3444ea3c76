"""The `triton` backend: the Triton kernels registered as custom ops dwf_triton::dwf_forward/backward.

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
    forward_op = backward_op = None
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

    _autograd.register("dwf_triton::dwf_forward", "dwf_triton::dwf_backward", torch.ops.dwf_triton.dwf_backward)
    forward_op = torch.ops.dwf_triton.dwf_forward
    backward_op = torch.ops.dwf_triton.dwf_backward
