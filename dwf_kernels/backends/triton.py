"""The `triton` backend: the Triton kernels (_triton_kernels.py, _triton_sgd.py, _triton_multi_step.py), as custom ops
dwf_triton::dwf_forward/backward/sgd_step/grad_sumsq and as direct launches.

Registered with torch.library.custom_op + register_fake, so torch.compile(fullgraph=True) sees one
opaque node and opcheck passes, on a GPU and under TRITON_INTERPRET=1 alike (torch.library.triton_op,
which lets Inductor trace into the kernel, fails both under the interpreter). Being opaque, the op
bodies launch their kernels directly (`kernel[grid](...)`): a few microseconds of host time per
launch and no per-call state in torch's Triton side tables.

The front door validates every argument before it calls this backend, so the op bodies check
nothing again, except what a traced call cannot check while it is traced: that the SGD step's
in-place outputs do not overlap its inputs (traced tensors have no addresses).

AVAILABLE is False when triton is not installed; INTERPRETED tells whether the kernels run in
Triton's CPU interpreter (TRITON_INTERPRET=1 at import time), which serves CPU tensors only.
"""

from __future__ import annotations

import os

import torch

from .._validate import check_no_overlap, check_sgd_step
from . import registration
from .base import Backend, OpFamily

INTERPRETED: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"
IMPORT_ERROR: str | None = None

try:
    from . import _triton_kernels, _triton_multi_step, _triton_sgd
except ImportError as exc:
    AVAILABLE = False
    IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
    OPS = None

    def _not_installed(*args, **kwargs):
        raise RuntimeError(f"backend 'triton' needs the triton package ({IMPORT_ERROR})")

    forward = backward = sgd_step = grad_sumsq = _not_installed
else:
    AVAILABLE = True

    @torch.library.custom_op("dwf_triton::dwf_forward", mutates_args=())
    def _dwf_forward(
        factors: torch.Tensor, out_dtype: torch.dtype | None, with_sumsq: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return _triton_kernels.forward(factors, out_dtype or factors.dtype, with_sumsq)

    @torch.library.custom_op("dwf_triton::dwf_backward", mutates_args=())
    def _dwf_backward(factors: torch.Tensor, grad_w: torch.Tensor, grad_sumsq: torch.Tensor | None) -> torch.Tensor:
        return _triton_kernels.backward(factors, grad_w, grad_sumsq)

    @torch.library.custom_op("dwf_triton::dwf_grad_sumsq", mutates_args=())
    def _dwf_grad_sumsq(factors: torch.Tensor, grad_w: torch.Tensor, grad_sumsq: torch.Tensor | None) -> torch.Tensor:
        return _triton_kernels.grad_sumsq(factors, grad_w, grad_sumsq)

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
        check_no_overlap(
            (("factors", factors), ("momentum_buffer", momentum_buffer)),
            (("grad_w", grad_w), ("grad_sumsq", grad_sumsq)),
        )
        _triton_sgd.sgd_step(
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

    registration.register("dwf_triton", torch.ops.dwf_triton.dwf_backward)
    OPS = OpFamily.of("dwf_triton")
    _forward_op, _backward_op, _sgd_step_op, _grad_sumsq_op = OPS.forward, OPS.backward, OPS.sgd_step, OPS.grad_sumsq

    # Direct calls. A custom op costs tens of microseconds of Python dispatch per call (its
    # autograd wrapper more), against a few for the launch itself, and a small layer's whole
    # forward is a few microseconds of GPU time. So an eager call on plain tensors, which needs
    # none of what the op registration is for (tracing, fake tensors, functionalization), calls
    # the launchers directly, through the same autograd formula; everything else goes through
    # the ops above.

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

    def backward(factors: torch.Tensor, grad_w: torch.Tensor, grad_sumsq: torch.Tensor | None) -> torch.Tensor:
        # With grad mode on (create_graph) the backward must itself be recorded: the op, with its autograd.
        if torch.is_grad_enabled() or not direct_call_ok(factors, grad_w, grad_sumsq):
            return _backward_op(factors, grad_w, grad_sumsq)
        return _triton_kernels.backward(factors, grad_w, grad_sumsq)

    def grad_sumsq(factors: torch.Tensor, grad_w: torch.Tensor, grad_sumsq: torch.Tensor | None) -> torch.Tensor:
        if not direct_call_ok(factors, grad_w, grad_sumsq):
            return _grad_sumsq_op(factors, grad_w, grad_sumsq)
        return _triton_kernels.grad_sumsq(factors, grad_w, grad_sumsq)

    class _Product(torch.autograd.Function):
        """dwf_forward with the op's autograd formula, launched without the custom-op dispatch.

        A forward(ctx, ...) Function: the setup_context form costs ~30 us more per call."""

        @staticmethod
        def forward(ctx, factors, out_dtype, with_sumsq):
            registration.setup_context(ctx, (factors, out_dtype, with_sumsq), None)
            return _triton_kernels.forward(factors, out_dtype, with_sumsq)

        backward = staticmethod(registration.backward_formula(backward))

    def forward(factors: torch.Tensor, out_dtype: torch.dtype, with_sumsq: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if not direct_call_ok(factors):
            return _forward_op(factors, out_dtype, with_sumsq)
        if torch.is_grad_enabled() and factors.requires_grad:
            return _Product.apply(factors, out_dtype, with_sumsq)
        return _triton_kernels.forward(factors, out_dtype, with_sumsq)

    def sgd_step(factors, momentum_buffer, grad_w, grad_sumsq, *hyper) -> None:
        if not direct_call_ok(factors, momentum_buffer, grad_w, grad_sumsq):
            _sgd_step_op(factors, momentum_buffer, grad_w, grad_sumsq, *hyper)  # mutates_args bumps versions
            return
        _triton_sgd.sgd_step(factors, momentum_buffer, grad_w, grad_sumsq, *hyper)
        # What the op's mutates_args does: autograd must see that these tensors changed.
        torch.autograd.graph.increment_version(factors if momentum_buffer is None else (factors, momentum_buffer))

    def sgd_step_multi(factors, momentum_buffers, grad_w, grad_sumsq, *hyper) -> None:
        # A native multi-layer step checks its layers itself (the front door leaves that to it).
        lr, momentum, dampening, weight_decay, nesterov, _, init_buffer = hyper
        for i, f in enumerate(factors):
            buffer = momentum_buffers[i] if momentum != 0 and not init_buffer else None
            check_sgd_step(f, grad_w[i], grad_sumsq[i], buffer, lr, momentum, dampening, weight_decay, nesterov)
        if not direct_call_ok(*factors, *momentum_buffers, *grad_w, *grad_sumsq):
            for i, f in enumerate(factors):  # the op per layer: what tracing and tensor subclasses need
                sgd_step(f, momentum_buffers[i] if momentum_buffers else None, grad_w[i], grad_sumsq[i], *hyper)
            return
        _triton_multi_step.sgd_step_multi(factors, momentum_buffers, grad_w, grad_sumsq, *hyper)
        torch.autograd.graph.increment_version((*factors, *momentum_buffers))


def _serves(device_type: str) -> bool:
    return AVAILABLE and device_type == ("cpu" if INTERPRETED else "cuda")


def _why_not(device_type: str, instead: str) -> str:
    if not AVAILABLE:
        return f"backend 'triton' needs the triton package ({IMPORT_ERROR}); {instead}"
    return (
        f"backend 'triton' runs CUDA tensors (and CPU tensors only under TRITON_INTERPRET=1), "
        f"got a {device_type} tensor; {instead}"
    )


BACKEND = Backend(
    "triton",
    forward=forward,
    backward=backward,
    sgd_step=sgd_step,
    grad_sumsq=grad_sumsq,
    sgd_step_multi=sgd_step_multi if AVAILABLE else None,
    serves=_serves,
    why_not=_why_not,
    emulated=INTERPRETED,
    ops=OPS,
)
