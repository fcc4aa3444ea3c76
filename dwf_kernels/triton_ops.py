"""The `triton` backend: the Triton kernels as custom ops dwf_triton::dwf_forward/backward/sgd_step.

Registered with torch.library.custom_op + register_fake, so torch.compile(fullgraph=True) sees one
opaque node and opcheck passes, on a GPU and under TRITON_INTERPRET=1 alike (torch.library.triton_op,
which lets Inductor trace into the kernel, fails both under the interpreter). Being opaque, the op
bodies launch their kernels directly (`kernel[grid](...)`): a few microseconds of host time per
launch and no per-call state in torch's Triton side tables.

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

    # Direct calls. A custom op costs tens of microseconds of Python dispatch per call (its
    # autograd wrapper more), against a few for the launch itself, and a small layer's whole
    # forward is a few microseconds of GPU time. So an eager call on plain tensors, which needs
    # none of what the op registration is for (tracing, fake tensors, functionalization), calls
    # the launchers directly, through the same autograd formula; everything else goes through
    # the ops above. Checked by the front door (ops.py), which has validated the arguments.

    _PLAIN = (torch.Tensor, torch.nn.Parameter)

    def direct_call_ok(*tensors: torch.Tensor | None) -> bool:
        """Whether a call on these tensors may launch directly instead of through the custom op."""
        if (
            torch.compiler.is_compiling()
            or torch._C._len_torch_dispatch_stack()  # FakeTensorMode, functionalization, ...
            or torch._C._are_functorch_transforms_active()  # vmap, grad, ...
        ):
            return False
        return all(t is None or type(t) in _PLAIN for t in tensors)

    def _backward_direct(factors, grad_w, grad_sumsq):
        # Under create_graph the backward must itself be recorded: the op, with its autograd.
        if torch.is_grad_enabled() or not direct_call_ok(factors, grad_w, grad_sumsq):
            return backward_op(factors, grad_w, grad_sumsq)
        return _triton_kernels.backward(factors, grad_w, grad_sumsq)

    class _Product(torch.autograd.Function):
        """dwf_forward with the op's autograd formula, launched without the custom-op dispatch.

        A forward(ctx, ...) Function: the setup_context form costs ~30 us more per call."""

        @staticmethod
        def forward(ctx, factors, out_dtype, with_sumsq):
            _autograd.setup_context(ctx, (factors, out_dtype, with_sumsq), None)
            return _triton_kernels.forward(factors, out_dtype, with_sumsq)

        backward = staticmethod(_autograd.backward_formula(_backward_direct))

    def forward_direct(
        factors: torch.Tensor, out_dtype: torch.dtype, with_sumsq: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.is_grad_enabled() and factors.requires_grad:
            return _Product.apply(factors, out_dtype, with_sumsq)
        return _triton_kernels.forward(factors, out_dtype, with_sumsq)

    def backward_direct(factors, grad_w, grad_sumsq) -> torch.Tensor:
        return _triton_kernels.backward(factors, grad_w, grad_sumsq)

    def sgd_step_direct(factors, momentum_buffer, *args) -> None:
        _triton_kernels.sgd_step(factors, momentum_buffer, *args)
        # What the op's mutates_args does: autograd must see that these tensors changed.
        torch.autograd.graph.increment_version(factors if momentum_buffer is None else (factors, momentum_buffer))
