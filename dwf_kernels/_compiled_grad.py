"""DWF layers under torch.compile: the fused product as custom ops the compiler keeps opaque, and
the lazy factor gradient (`_lazy_grad`) carried past the compiled backward.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch

from . import _fusion
from ._lazy_grad import _LAZY, LazyFactorGrad, _grad_w_or_zeros, _State
from .backends import resolve_backend
from .backends.reference import dwf_backward_differentiable
from .backends.registration import fake_forward
from .ops import dwf_product, dwf_product_backward

# Under torch.compile. Dynamo cannot trace FusedDWFProduct, whose backward builds a tensor subclass
# from Python state, so a compiled forward runs the product as a custom op the compiler keeps
# opaque (no graph break): dwf_fused::forward, whose backward is dwf_fused::factor_grad. A compiled
# backward is generated code that may read any tensor it holds and reuse any buffer it thinks dead,
# so that op hands the compiled graph an ordinary tensor, and dL/dw reaches autograd beside it:
#   - the op files a copy of dL/dw and dL/dsumsq for the factors, under the running backward pass,
#     and returns a zero of the factors' shape, expanded from one element (nothing written per
#     weight), as the factors' gradient;
#   - a hook on the factors (registered by the op the first time) takes that zero and the filed
#     parts before autograd accumulates: when the compiled graph returned the zero as it was (the
#     factors feed this layer only), the gradient is the lazy one where a live FusedSGD updates the
#     layer, else the fused backward's; when the graph added other gradients to it (the layer used
#     twice, tied weights, other ops reading the factors), it is that sum plus the fused
#     backward of each filed part.
# The copy of dL/dw (N elements, where the factor gradient has D x N) is the price of handing it
# past code that does not know it is kept.

# id(factors) -> (weak reference to them, {backward pass id: [(zero, grad_w, grad_sumsq)]}), kept
# here, not on the tensor, so that copies and pickles of the factors carry none of it.
_COMPILED_PARTS: dict[int, tuple[weakref.ref, dict]] = {}


@torch.library.custom_op("dwf_fused::forward", mutates_args=())
def _compiled_forward(factors: torch.Tensor, out_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    return dwf_product(factors, return_sumsq=True, out_dtype=out_dtype)


@_compiled_forward.register_fake
def _(factors: torch.Tensor, out_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    return fake_forward(factors, out_dtype, True)


def _expanded_zero(factors: torch.Tensor) -> torch.Tensor:
    return factors.new_zeros(()).expand(factors.shape)


@torch.library.custom_op("dwf_fused::factor_grad", mutates_args=())
def _compiled_factor_grad(
    factors: torch.Tensor, grad_w: torch.Tensor | None, grad_sumsq: torch.Tensor | None
) -> torch.Tensor:
    zero = _expanded_zero(factors)
    entry = _COMPILED_PARTS.get(id(factors))
    if entry is None or entry[0]() is not factors:
        entry = _COMPILED_PARTS[id(factors)] = (weakref.ref(factors), {})
        weakref.finalize(factors, _COMPILED_PARTS.pop, id(factors), None)
        factors.register_hook(_take_compiled_parts(entry[0]))
    parts = entry[1]
    parts.setdefault(torch._C._current_graph_task_id(), []).append((zero, _copy(grad_w), _copy(grad_sumsq)))
    return zero


def _copy(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.clone()


@_compiled_factor_grad.register_fake
def _(factors: torch.Tensor, grad_w: torch.Tensor | None, grad_sumsq: torch.Tensor | None) -> torch.Tensor:
    return _expanded_zero(factors)


def _take_compiled_parts(factors_ref: weakref.ref) -> Callable:
    def hook(grad: torch.Tensor) -> torch.Tensor | None:
        factors = factors_ref()
        if factors is None:
            return None
        # Parts filed under another pass belong to one whose gradient never reached these factors
        # (backward(inputs=...) without them): dropped.
        entry = _COMPILED_PARTS.get(id(factors))
        if entry is None or entry[0]() is not factors:
            return None
        parts = entry[1]
        mine = parts.pop(torch._C._current_graph_task_id(), [])
        parts.clear()
        if not mine:
            return None
        if len(mine) == 1 and _is_view_of(grad, mine[0][0]):
            _, grad_w, grad_sumsq = mine[0]
            if factors.is_leaf and _fusion.is_fused(factors):
                state = _State(_LAZY)
                state.set_lazy(
                    weakref.ref(factors), factors._version, grad_w, grad_sumsq, resolve_backend(factors.device.type)
                )
                return LazyFactorGrad(state, factors)
            return dwf_product_backward(factors, _grad_w_or_zeros(grad_w, factors), grad_sumsq)
        total = grad.clone(memory_format=torch.contiguous_format)  # our zeros plus the graph's other parts
        for _, grad_w, grad_sumsq in mine:
            total += dwf_product_backward(factors, _grad_w_or_zeros(grad_w, factors), grad_sumsq)
        return total

    return hook


def _is_view_of(grad: torch.Tensor, zero: torch.Tensor) -> bool:
    return (
        grad.untyped_storage().data_ptr() == zero.untyped_storage().data_ptr()
        and grad.stride() == zero.stride()
        and grad.shape == zero.shape
    )


def _compiled_setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0])
    ctx.set_materialize_grads(False)


def _compiled_backward(ctx, grad_w: torch.Tensor | None, grad_sumsq: torch.Tensor | None):
    (factors,) = ctx.saved_tensors
    if grad_w is None and grad_sumsq is None:
        return None, None
    if torch.is_grad_enabled():  # create_graph=True: the ordinary, differentiable gradient
        return dwf_backward_differentiable(factors, _grad_w_or_zeros(grad_w, factors), grad_sumsq), None
    return _compiled_factor_grad(factors, grad_w, grad_sumsq), None


_compiled_forward.register_autograd(_compiled_backward, setup_context=_compiled_setup_context)


def compiled_dwf_product(factors: torch.Tensor, out_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The layers' forward under torch.compile, when the factors need a gradient: (w, sumsq), with a
    lazy factor gradient in the backward when the layer is in fused mode as it runs."""
    return _compiled_forward(factors, out_dtype)
