"""Readers of a lazy DWF factor gradient that need only dL/dw and dL/dsumsq, so the gradient stays
lazy and FusedSGD's step fused: GradScaler's unscale and inf check, and clip_grad_norm_'s 2-norm
and scaling (docs/fused-sgd.md). The factor gradient is linear in (dL/dw, dL/dsumsq): scaling both
by c scales it by c, and its norm comes from one read-only fused pass (dwf_grad_sumsq).

LazyFactorGrad.__torch_dispatch__ (_lazy_grad.py) looks each op up in LAZY_READERS; a reader returns
(True, result) when it handled the call, (False, None) to have the gradient formed and the op run.
"""

from __future__ import annotations

import torch

from ._lazy_grad import (
    _LAZY,
    _ZERO,
    LazyFactorGrad,
    _grad_w_or_zeros,
    _run_materialized,
    _State,
    dense_of,
    reference_without_autograd,
)
from ._validate import acc_dtype
from .backends.reference import dwf_backward_differentiable
from .ops import dwf_grad_sumsq

aten = torch.ops.aten


def _pending(t) -> bool:
    """A lazy (or lazy zero) gradient that can still be read."""
    return isinstance(t, LazyFactorGrad) and t._state.kind in (_LAZY, _ZERO) and not t._state.is_stale()


def _scaled_parts(state: _State, factor: torch.Tensor | float) -> None:
    """dL/dw and dL/dsumsq times `factor`, in the factors' precision, as new tensors (dL/dw may be
    shared with another gradient of the same backward, so it is never changed in place)."""
    factors = state.factors()
    if state.grad_w is not None:
        state.grad_w = state.grad_w.to(factors.dtype) * factor
    if state.grad_sumsq is not None:
        state.grad_sumsq = state.grad_sumsq * factor


def _unscale_lazily(args, kwargs):
    """torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale), as
    GradScaler.unscale_ calls it: a lazy gradient is unscaled by unscaling dL/dw and dL/dsumsq (in
    the factors' precision, as the dense fp32 gradient would be), and found_inf is set when either
    holds an Inf or NaN, which is when the factor gradient holds one (Inf times a factor is Inf or,
    times 0, NaN; finite parts give a finite gradient unless the products pass fp32's range)."""
    tensors, found_inf, inv_scale = args
    lazy = [t for t in tensors if _pending(t)]
    if not lazy:
        return False, None
    parts = []
    for t in lazy:
        state = t._state
        if state.kind == _LAZY:
            _scaled_parts(state, 1.0)  # copies of its own, in the factors' precision, unscaled in place below
            parts += [p for p in (state.grad_w, state.grad_sumsq) if p is not None]
    if parts:
        torch._amp_foreach_non_finite_check_and_unscale_(parts, found_inf, inv_scale)
    rest = [t for t in tensors if not _pending(t)]
    if rest:
        _run_materialized(aten._amp_foreach_non_finite_check_and_unscale_.default, (rest, found_inf, inv_scale), kwargs)
    return True, None


def _norm_of(t: LazyFactorGrad) -> torch.Tensor:
    """||t||_2 from one read-only fused pass over the factors and dL/dw (dwf_grad_sumsq)."""
    state = t._state
    if state.kind == _ZERO:
        return torch.zeros((), dtype=t.dtype, device=t.device)
    factors = state.factors()
    grad_w = _grad_w_or_zeros(state.grad_w, factors)
    if reference_without_autograd(state, factors):  # in the accumulation dtype, as the kernels
        acc = acc_dtype(factors.dtype)
        grad = dwf_backward_differentiable(factors.detach().to(acc), grad_w.to(acc), state.grad_sumsq)
        sumsq = (grad * grad).sum()
    else:
        sumsq = dwf_grad_sumsq(factors, grad_w, state.grad_sumsq, backend=state.backend)
    return sumsq.sqrt().to(t.dtype)


def _is_two(ord) -> bool:
    return not isinstance(ord, bool) and isinstance(ord, (int, float)) and ord == 2


def _vector_norm_lazily(args, kwargs):
    """torch.linalg.vector_norm(grad) with the default ord=2 over all elements (clip_grad_norm_'s
    per-tensor path, which it takes for tensor subclasses)."""
    t, *rest = args
    ord = rest[0] if rest else kwargs.get("ord", 2)
    dim = rest[1] if len(rest) > 1 else kwargs.get("dim")
    keepdim = rest[2] if len(rest) > 2 else kwargs.get("keepdim", False)
    dtype = kwargs.get("dtype")
    if not _pending(t) or not _is_two(ord) or dim not in (None, []) or keepdim or dtype is not None:
        return False, None
    return True, _norm_of(t)


def _foreach_norm_lazily(args, kwargs):
    tensors, *rest = args
    ord = rest[0] if rest else kwargs.get("ord", 2)
    if not any(_pending(t) for t in tensors) or not _is_two(ord) or (len(rest) > 1 and rest[1] is not None):
        return False, None
    if kwargs.get("dtype") is not None:
        return False, None
    norms = [_norm_of(t) if _pending(t) else torch.linalg.vector_norm(dense_of(t)) for t in tensors]
    return True, norms


def _as_scale(other):
    """The scale of a multiplication by a number or a one-element tensor, else None."""
    if isinstance(other, torch.Tensor):
        return other.reshape(()) if other.numel() == 1 and not isinstance(other, LazyFactorGrad) else None
    if not isinstance(other, bool) and isinstance(other, (int, float)):
        return other
    return None


def _scale_lazily(t, other) -> bool:
    factor = _as_scale(other)
    if not _pending(t) or factor is None:
        return False
    if t._state.kind == _LAZY:
        if isinstance(factor, torch.Tensor):
            factor = factor.to(t.device)
        _scaled_parts(t._state, factor)
    return True


def _mul_lazily(args, kwargs):
    """grad.mul_(c) for a number or one-element tensor c (clip_grad_norm_'s per-tensor scaling)."""
    t, other = args
    return (True, t) if _scale_lazily(t, other) else (False, None)


def _foreach_mul_lazily(args, kwargs):
    tensors, other = args
    if not any(_pending(t) for t in tensors) or _as_scale(other) is None:
        return False, None
    for t in tensors:
        if not _scale_lazily(t, other):
            _run_materialized(aten.mul_.Tensor if isinstance(other, torch.Tensor) else aten.mul_.Scalar, (t, other), {})
    return True, None


LAZY_READERS = {
    aten._amp_foreach_non_finite_check_and_unscale_.default: _unscale_lazily,
    aten.linalg_vector_norm.default: _vector_norm_lazily,
    aten._foreach_norm.Scalar: _foreach_norm_lazily,
    aten.mul_.Tensor: _mul_lazily,
    aten.mul_.Scalar: _mul_lazily,
    aten._foreach_mul_.Tensor: _foreach_mul_lazily,
    aten._foreach_mul_.Scalar: _foreach_mul_lazily,
}
