"""The front door: `dwf_product`, one autograd-aware function over every backend.

    w = factors[0] * factors[1] * ... * factors[D-1]        (elementwise)
    sumsq = sum(factors ** 2)                                (with return_sumsq=True)

Forward and backward are each one fused pass over memory in the C++ and Triton backends;
the choice of backend never changes results beyond rounding. Each entry point validates its
arguments once, here, then calls the backend the registry selects (docs/design.md, Backends).
"""

from __future__ import annotations

import torch

from ._validate import (
    check_backward,
    check_flag,
    check_forward,
    check_layers_apart,
    check_sgd_hyper,
    check_sgd_step,
)
from .backends import reference, select
from .backends.base import Backend


def dwf_product(
    factors: torch.Tensor,
    *,
    return_sumsq: bool = False,
    out_dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The DWF weight w = prod_d factors[d], and optionally sumsq = sum(factors**2), fused.

    Args:
        factors: tensor of shape (D, *S), 1 <= D <= 16; float16, bfloat16, float32 or float64.
            Non-contiguous input works (it is copied once).
        return_sumsq: also return sumsq, a 0-d fp32 tensor (fp64 for fp64 factors), computed in
            the same pass. Its gradient is the L2 penalty's: d sumsq / d factors = 2 factors.
        out_dtype: dtype of w; default the factors' dtype. float32 factors may write bfloat16 or
            float16 directly (mixed precision). The math is fp32 (fp64 for fp64) either way.
        backend: "cuda", "cpu", "triton", "reference", or None for the one forced by
            `use_backend`, else the fastest available for the factors' device.

    Returns:
        w of shape S, or (w, sumsq) when return_sumsq is True.
    """
    check_flag("return_sumsq", return_sumsq)
    w, sumsq = forward_on(factors, out_dtype, return_sumsq, backend)
    return (w, sumsq) if return_sumsq else w


def forward_on(factors: torch.Tensor, out_dtype: torch.dtype | None, with_sumsq: bool, backend: str | Backend | None):
    """dwf_product's work, (w, sumsq): the arguments checked, then the forward of `backend` (a
    Backend selected already, or a name or None for backends.select). Also the fused-mode
    forward's (dwf_kernels._lazy_grad)."""
    out = check_forward(factors, out_dtype)
    chosen = backend if isinstance(backend, Backend) else select(factors.device.type, backend)
    return chosen.forward(factors, out, with_sumsq)


def dwf_product_backward(
    factors: torch.Tensor,
    grad_w: torch.Tensor,
    grad_sumsq: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """The fused backward on its own: d/dfactors of <grad_w, w> + grad_sumsq * sumsq.

    grad_sumsq=None leaves the penalty term out. This is what autograd runs for `dwf_product`;
    it is public for fused optimizers and for testing. When grad mode is on and an input requires
    grad, the result is computed by differentiable torch ops instead, so it can be differentiated
    again (as dwf_product's gradient is under backward(create_graph=True)).
    """
    check_backward(factors, grad_w, grad_sumsq)
    chosen = select(factors.device.type, backend)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (factors, grad_w, grad_sumsq)):
        # Differentiable, like the gradient of dwf_product under create_graph=True.
        return reference.dwf_backward_differentiable(factors, grad_w, grad_sumsq)
    return chosen.backward(factors, grad_w, grad_sumsq)


def dwf_grad_sumsq(
    factors: torch.Tensor,
    grad_w: torch.Tensor,
    grad_sumsq: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """The squared L2 norm of `dwf_product_backward(factors, grad_w, grad_sumsq)`, read-only: one
    pass over the factors and grad_w that forms each factor gradient in registers and adds its
    square, storing nothing. For clipping by the global gradient norm without forming the gradient.

    Returns a 0-d tensor, fp32 (fp64 for fp64 factors), on the factors' device. Not differentiable.
    """
    check_backward(factors, grad_w, grad_sumsq)
    chosen = select(factors.device.type, backend)
    with torch.no_grad():
        return chosen.grad_sumsq(factors, grad_w, grad_sumsq)


def dwf_sgd_step(
    factors: torch.Tensor,
    grad_w: torch.Tensor,
    grad_sumsq: torch.Tensor | None = None,
    momentum_buffer: torch.Tensor | None = None,
    *,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    backend: str | None = None,
) -> torch.Tensor | None:
    """The fused backward + SGD step (docs/design.md, The fused SGD step): one pass, no factor-gradient tensor.

    Updates `factors` in place exactly as torch.optim.SGD (same hyper-parameters, same order of
    operations) would with the gradient `dwf_product_backward(factors, grad_w, grad_sumsq)`; that
    gradient is formed per element in registers and never written. It moves 4D+1 elements per
    weight (read D factors, grad_w and D buffers; write D factors and D buffers) where the backward
    followed by the optimizer moves 7D+1 or more.

    momentum_buffer: the buffer of earlier steps (updated in place), or None on the first step, as
    torch.optim.SGD keeps it. Returns the buffer (new on the first step) when momentum != 0, else None.
    """
    check_sgd_step(factors, grad_w, grad_sumsq, momentum_buffer, lr, momentum, dampening, weight_decay, nesterov)
    chosen = select(factors.device.type, backend)
    init_buffer = momentum != 0 and momentum_buffer is None
    if init_buffer:
        momentum_buffer = torch.empty_like(factors, memory_format=torch.contiguous_format)
    args = (
        factors,
        momentum_buffer if momentum != 0 else None,
        grad_w,
        grad_sumsq,
        float(lr),
        float(momentum),
        float(dampening),
        float(weight_decay),
        bool(nesterov),
        bool(maximize),
        init_buffer,
    )
    with torch.no_grad():
        chosen.sgd_step(*args)
    return momentum_buffer if momentum != 0 else None


def dwf_sgd_step_multi(
    factors: list[torch.Tensor],
    grad_w: list[torch.Tensor],
    grad_sumsq: list[torch.Tensor | None],
    momentum_buffers: list[torch.Tensor] | None = None,
    *,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    backend: str | None = None,
) -> list[torch.Tensor] | None:
    """`dwf_sgd_step` on many layers with the same hyper-parameters, in one call.

    factors, grad_w, grad_sumsq: one entry per layer (a grad_sumsq entry may be None), all on one
    device. momentum_buffers: the layers' buffers, or None on the first step (new buffers are made,
    as dwf_sgd_step makes one). Each layer is updated exactly as dwf_sgd_step would update it (on the
    CPU bitwise). The C++ backends take the whole list in one op call and check each layer there;
    other backends step the layers one by one, each checked first. Returns the buffers when
    momentum != 0, else None.
    """
    lists = {"factors": factors, "grad_w": grad_w, "grad_sumsq": grad_sumsq}
    if momentum_buffers is not None:
        lists["momentum_buffers"] = momentum_buffers
    for name, value in lists.items():
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{name} must be a list of tensors (one per layer); got {type(value).__name__}")
        if len(value) != len(factors):
            raise ValueError(f"{name} must have one entry per factors tensor ({len(factors)}); got {len(value)}")
    check_sgd_hyper(lr, momentum, dampening, weight_decay, nesterov)
    if not factors:
        return [] if momentum != 0 else None
    if not all(isinstance(f, torch.Tensor) for f in factors):
        raise TypeError("factors must be a list of torch.Tensor")
    device = factors[0].device
    if any(f.device != device for f in factors):
        raise ValueError(f"factors must all be on one device; got {sorted({str(f.device) for f in factors})}")
    return _run_sgd_step_multi(
        select(device.type, backend),
        list(factors),
        list(grad_w),
        list(grad_sumsq),
        None if momentum_buffers is None else list(momentum_buffers),
        lr=lr,
        momentum=momentum,
        dampening=dampening,
        weight_decay=weight_decay,
        nesterov=nesterov,
        maximize=maximize,
        check_apart=True,
    )


def _run_sgd_step_multi(
    chosen,
    factors,
    grad_w,
    grad_sumsq,
    momentum_buffers,
    *,
    lr,
    momentum,
    dampening,
    weight_decay,
    nesterov,
    maximize,
    check_apart: bool,
):
    """dwf_sgd_step_multi on the backend `chosen`, given lists of one entry per layer (buffers: None
    or a list), factors on one device, and valid hyper-parameters; each layer is checked here.
    check_apart=False skips the check that the layers share no memory, for FusedSGD, whose layers
    are distinct parameters with their own buffers and gradients."""
    if not chosen.multi_native or (momentum == 0 and momentum_buffers is not None):
        # Backends that step layer by layer check here; so does every backend for the buffers it is
        # not passed (momentum 0), which must still be valid ones, as dwf_sgd_step requires.
        for i, f in enumerate(factors):
            buffer = None if momentum_buffers is None else momentum_buffers[i]
            check_sgd_step(f, grad_w[i], grad_sumsq[i], buffer, lr, momentum, dampening, weight_decay, nesterov)
    if check_apart:
        check_layers_apart(factors, momentum_buffers if momentum != 0 else None, grad_w, grad_sumsq)
    init_buffer = momentum != 0 and momentum_buffers is None
    if init_buffer:
        momentum_buffers = [torch.empty_like(f, memory_format=torch.contiguous_format) for f in factors]
    with torch.no_grad():
        chosen.sgd_step_multi(
            factors,
            momentum_buffers if momentum != 0 else [],
            grad_w,
            grad_sumsq,
            float(lr),
            float(momentum),
            float(dampening),
            float(weight_decay),
            bool(nesterov),
            bool(maximize),
            init_buffer,
        )
    return momentum_buffers if momentum != 0 else None
