"""The `reference` backend: DWF in plain PyTorch, the ground truth of every test and the fallback.

Correct on any device, dtype and depth. It follows the kernel contract of docs/design.md literally: upcast to the
accumulation dtype, multiply the factors left to right, sum the squares; autograd provides the
backward. Nothing here is fused; it moves several times the memory of the kernels.
"""

from __future__ import annotations

import torch
from torch.optim.sgd import sgd as _torch_sgd

from .._validate import acc_dtype
from .base import Backend


def dwf_forward_reference(
    factors: torch.Tensor, out_dtype: torch.dtype, with_sumsq: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Returns (w in out_dtype, sumsq in the accumulation dtype or None)."""
    f = factors.to(acc_dtype(factors.dtype))
    w = f[0].clone() if factors.shape[0] == 1 else f[0] * f[1]
    for d in range(2, factors.shape[0]):
        w = w * f[d]
    sumsq = (f * f).sum() if with_sumsq else None
    return w.to(out_dtype), sumsq


def dwf_backward_reference(
    factors: torch.Tensor, grad_w: torch.Tensor, grad_sumsq: torch.Tensor | None
) -> torch.Tensor:
    """d/dfactors of <grad_w, w> + grad_sumsq * sumsq, by autograd through the reference forward."""
    with torch.enable_grad():
        f = factors.detach().requires_grad_(True)
        w, sumsq = dwf_forward_reference(f, grad_w.dtype, with_sumsq=grad_sumsq is not None)
        outputs, grads = [w], [grad_w]
        if grad_sumsq is not None:
            outputs.append(sumsq)
            grads.append(grad_sumsq.reshape(()).to(sumsq.dtype))
        (grad,) = torch.autograd.grad(outputs, [f], grads)
    return grad


def dwf_backward_differentiable(
    factors: torch.Tensor, grad_w: torch.Tensor, grad_sumsq: torch.Tensor | None
) -> torch.Tensor:
    """The backward as differentiable torch ops: what autograd runs for a backward with create_graph=True.

    The factor gradients are products of the factors and grad_w, d/df_d = grad_w * prod_{k != d} f_k
    (+ 2 grad_sumsq f_d), so their derivatives exist: double backward, gradgradcheck and
    meta-gradients differentiate through this formula, with respect to the factors, grad_w and
    grad_sumsq. The products are taken in the reference chain's order (prefix f_0*...*f_{d-1}
    times the suffix grad_w*f_{D-1}*...*f_{d+1}), so the values match the fused backward's.
    """
    acc = acc_dtype(factors.dtype)
    f = factors.to(acc)
    g = grad_w.to(acc)
    depth = f.shape[0]
    if depth == 1:
        grads = [g]
    else:
        prefix = [None, f[0]]  # prefix[d] = f_0 * ... * f_{d-1}
        for d in range(2, depth):
            prefix.append(prefix[-1] * f[d - 1])
        grads = [None] * depth
        suffix = g  # grad_w * f_{D-1} * ... * f_{d+1}
        for d in range(depth - 1, 0, -1):
            grads[d] = suffix * prefix[d]
            if d > 1:
                suffix = suffix * f[d]
        grads[0] = suffix * f[1]
    grad = torch.stack(grads)
    if grad_sumsq is not None:
        twice = grad_sumsq.reshape(()).to(acc) * f
        grad = grad + (twice + twice)
    return grad.to(factors.dtype)


def dwf_sgd_step_reference(
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
    """The factor gradients of dwf_backward_reference, then torch.optim.SGD's own update, in place.

    The arithmetic is the kernels': fp32 (fp64 for fp64) from the values as loaded, rounded once
    when stored, so bf16/fp16 factors and buffers are updated through fp32 copies.
    """
    acc = acc_dtype(factors.dtype)
    grad = dwf_backward_reference(factors.to(acc), grad_w if factors.dtype == acc else grad_w.to(acc), grad_sumsq)
    params = [factors if factors.dtype == acc else factors.to(acc)]
    buffers = [None if init_buffer or momentum == 0 else momentum_buffer.to(acc)]
    with torch.no_grad():
        _torch_sgd(
            params,
            [grad],
            buffers,
            foreach=False,
            weight_decay=weight_decay,
            momentum=momentum,
            lr=lr,
            dampening=dampening,
            nesterov=nesterov,
            maximize=maximize,
        )
        if params[0] is not factors:
            factors.copy_(params[0])
        if momentum != 0 and buffers[0] is not momentum_buffer:
            momentum_buffer.copy_(buffers[0])


def dwf_grad_sumsq_reference(
    factors: torch.Tensor, grad_w: torch.Tensor, grad_sumsq: torch.Tensor | None
) -> torch.Tensor:
    """The squared L2 norm of dwf_backward_reference's result as computed, in the accumulation dtype
    (for bf16/fp16 factors: before the gradient would be rounded to their dtype), as the kernels."""
    acc = acc_dtype(factors.dtype)
    grad = dwf_backward_reference(factors.to(acc), grad_w.to(acc), grad_sumsq)
    return (grad * grad).sum()


def _serves(device_type: str) -> bool:
    return True  # plain torch: any device


def _why_not(device_type: str, instead: str) -> str:
    return f"backend 'reference' cannot serve {device_type} tensors; {instead}"


BACKEND = Backend(
    "reference",
    forward=dwf_forward_reference,
    backward=dwf_backward_reference,
    sgd_step=dwf_sgd_step_reference,
    grad_sumsq=dwf_grad_sumsq_reference,
    serves=_serves,
    why_not=_why_not,
)
