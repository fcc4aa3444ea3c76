"""What torch.library needs of a DWF op family besides its kernels (docs/design.md, Backends).

The fake (meta) implementations, which let torch.compile, FakeTensor and opcheck run the ops
without data, and the autograd formula. The extension's ops (torch.ops.dwf_kernels) take only the
fakes from here: their autograd formula is in C++ (csrc/dwf_autograd.cpp). The Triton ops
(torch.ops.dwf_triton) take both, and the Triton direct path (backends/triton.py) the same formula.

Both op families have the same signatures:
  dwf_forward(factors, out_dtype, with_sumsq) -> (w, sumsq)
  dwf_backward(factors, grad_w, grad_sumsq) -> grad_factors
  dwf_sgd_step(factors, momentum_buffer, grad_w, grad_sumsq, lr, momentum, dampening,
               weight_decay, nesterov, maximize, init_buffer) -> None      (in place)
  dwf_grad_sumsq(factors, grad_w, grad_sumsq) -> ||grad_factors||^2    (0-d, sumsq's dtype)
Nothing is saved for backward but the factors themselves (docs/design.md, Kernel contract).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .._validate import acc_dtype
from .reference import dwf_backward_differentiable


def fake_forward(
    factors: torch.Tensor, out_dtype: torch.dtype | None, with_sumsq: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    w = factors.new_empty(factors.shape[1:], dtype=out_dtype or factors.dtype)
    return w, factors.new_empty((), dtype=acc_dtype(factors.dtype))


def fake_backward(factors: torch.Tensor, grad_w: torch.Tensor, grad_sumsq: torch.Tensor | None) -> torch.Tensor:
    return factors.new_empty(factors.shape)


def fake_sgd_step(factors, momentum_buffer, grad_w, grad_sumsq, *hyper) -> None:
    return None  # updates its inputs in place; no outputs


def fake_sgd_step_multi(factors, momentum_buffers, *args) -> None:
    return None  # updates its inputs in place; no outputs


def fake_plain_sgd_step_multi(params, momentum_buffers, grads, lr, momentum, *hyper) -> torch.Tensor:
    """The indices (int64) of the params sgd_step_multi leaves alone (csrc/cpu/dwf_cpu.cpp): they
    follow from the metadata alone."""

    def like_param(t, p):
        return (
            t.shape == p.shape
            and t.dtype == p.dtype
            and t.device == p.device
            and t.layout == torch.strided
            and t.is_contiguous()
        )

    left = [
        i
        for i, (p, g) in enumerate(zip(params, grads, strict=True))
        if not (
            p.device.type == "cpu"
            and p.dtype in (torch.float32, torch.float64)
            and p.layout == torch.strided
            and p.is_contiguous()
            and like_param(g, p)
            and (momentum == 0 or like_param(momentum_buffers[i], p))
        )
    ]
    return torch.tensor(left, dtype=torch.int64, device="cpu")  # the op's result is a CPU tensor


def fake_grad_sumsq(factors: torch.Tensor, grad_w: torch.Tensor, grad_sumsq: torch.Tensor | None) -> torch.Tensor:
    return factors.new_empty((), dtype=acc_dtype(factors.dtype))


def register_fakes(namespace: str) -> None:
    """The fakes of the op family namespace::dwf_forward, dwf_backward, dwf_sgd_step, dwf_grad_sumsq."""
    torch.library.register_fake(f"{namespace}::dwf_forward")(fake_forward)
    torch.library.register_fake(f"{namespace}::dwf_backward")(fake_backward)
    torch.library.register_fake(f"{namespace}::dwf_sgd_step")(fake_sgd_step)
    torch.library.register_fake(f"{namespace}::dwf_grad_sumsq")(fake_grad_sumsq)
    if namespace == "dwf_kernels":  # the multi-tensor steps are the C++ family's (docs/design.md, Backends)
        torch.library.register_fake(f"{namespace}::dwf_sgd_step_multi")(fake_sgd_step_multi)
        torch.library.register_fake(f"{namespace}::sgd_step_multi")(fake_plain_sgd_step_multi)


def setup_context(ctx, inputs, output) -> None:
    factors, _out_dtype, with_sumsq = inputs
    ctx.save_for_backward(factors)
    ctx.with_sumsq = with_sumsq


def backward_formula(backward_op: Callable[..., torch.Tensor]) -> Callable:
    """The autograd backward of a forward op (factors, out_dtype, with_sumsq) -> (w, sumsq)."""

    def backward(ctx, grad_w: torch.Tensor, grad_sumsq: torch.Tensor):
        (factors,) = ctx.saved_tensors
        # Autograd hands a zero grad_sumsq when sumsq was not requested; passing None instead keeps
        # the penalty term out entirely, as in the reference (0 * Inf would otherwise make NaN).
        grad_sumsq = grad_sumsq if ctx.with_sumsq else None
        if torch.is_grad_enabled():
            # backward(create_graph=True): the gradient must itself be differentiable (double
            # backward, meta-gradients), so it is formed by differentiable torch ops. A first-order
            # backward runs with grad mode off and keeps the fused kernel.
            return dwf_backward_differentiable(factors, grad_w, grad_sumsq), None, None
        return backward_op(factors, grad_w, grad_sumsq), None, None

    return backward


def register(namespace: str, backward_op: Callable[..., torch.Tensor]) -> None:
    """Registers the fakes of the family's ops and the autograd formula of its forward op."""
    register_fakes(namespace)
    torch.library.register_autograd(
        f"{namespace}::dwf_forward", backward_formula(backward_op), setup_context=setup_context
    )
