"""Lazy DWF factor gradients: the ordinary `factors.grad`, computed only when something reads it.

A DWF layer updated by a live `dwf_kernels.optim.FusedSGD` runs its forward through
`FusedDWFProduct` (under torch.compile through the custom ops of `_compiled_grad`, to the same
end). Its backward does not form the D x N factor gradient; it hands autograd a `LazyFactorGrad`: a
tensor of the factors' shape, dtype and device that holds dL/dw, dL/dsumsq and the factors' version
at the time of the backward. Autograd stores it as `factors.grad` like any gradient, so `zero_grad`
(the optimizer's or the model's), accumulation over backward passes, `backward(inputs=...)` and
`torch.autograd.grad` treat it as they treat any gradient.

`FusedSGD.step()` applies it with one fused kernel (`dwf_sgd_step`) and never materializes it.
Any other reader (torch.optim.SGD, clip_grad_norm_, GradScaler, DistributedDataParallel, user
code) runs an ordinary op on it; that op first materializes the gradient with the fused backward
(`dwf_product_backward`, once: the tensor then holds the dense gradient, which in-place ops
mutate), so every reader sees the exact gradient.

A lazy gradient can only be materialized from the factors it was computed from: once the factors
change in place (an optimizer step), or once FusedSGD has applied it (then it is "consumed"),
reading or accumulating into it raises an error saying so, where torch would silently use a
stale gradient.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch.utils._pytree import tree_map

from . import _fusion
from .backends import resolve_backend, select
from .backends.base import Backend
from .backends.reference import dwf_backward_differentiable
from .ops import dwf_product, dwf_product_backward, forward_on

aten = torch.ops.aten

# consumed: applied by FusedSGD.step(); stale: holds a part computed from factors since changed.
_LAZY, _ZERO, _DENSE, _CONSUMED, _STALE = "lazy", "zero", "dense", "consumed", "stale"


class _State:
    """What a lazy gradient (and every alias of it, e.g. the result of detach) holds."""

    __slots__ = ("backend", "dense", "factors", "grad_sumsq", "grad_w", "kind", "version")

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.factors: weakref.ref | None = None
        self.version = -1
        self.grad_w: torch.Tensor | None = None
        self.grad_sumsq: torch.Tensor | None = None
        self.backend: str | None = None
        self.dense: torch.Tensor | None = None

    def set_lazy(self, factors_ref, version, grad_w, grad_sumsq, backend) -> None:
        self.kind, self.factors, self.version, self.backend = _LAZY, factors_ref, version, backend
        self.grad_w, self.grad_sumsq, self.dense = grad_w, grad_sumsq, None

    def set_zero(self) -> None:
        self.kind, self.factors, self.grad_w, self.grad_sumsq, self.dense = _ZERO, None, None, None, None

    def set_dense(self, dense: torch.Tensor) -> None:
        self.kind, self.factors, self.grad_w, self.grad_sumsq, self.dense = _DENSE, None, None, None, dense

    def copy(self) -> _State:
        twin = _State(self.kind)
        for slot in self.__slots__:
            setattr(twin, slot, getattr(self, slot))
        return twin

    def consume(self, kind: str = _CONSUMED) -> None:
        self.kind, self.factors, self.grad_w, self.grad_sumsq, self.dense = kind, None, None, None, None

    def is_stale(self) -> bool:
        if self.kind != _LAZY:
            return self.kind in (_CONSUMED, _STALE)
        factors = self.factors()
        return factors is None or factors._version != self.version


class LazyFactorGrad(torch.Tensor):
    """The gradient of a DWF layer's factors, formed only when read (see the module docstring)."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, state: _State, like: torch.Tensor) -> LazyFactorGrad:
        t = torch.Tensor._make_wrapper_subclass(cls, like.shape, dtype=like.dtype, device=like.device)
        t._state = state
        return t

    def __init__(self, state: _State, like: torch.Tensor) -> None:
        pass

    @property
    def status(self) -> str:
        """The gradient's state: "lazy" (dL/dw held), "zero", "dense" (formed: something read it),
        "consumed" (applied by FusedSGD.step() without being formed) or "stale" (holds a part
        computed from factors that have changed since)."""
        return self._state.kind

    def __repr__(self) -> str:
        state = self._state
        if state.kind in (_CONSUMED, _STALE):
            return f"LazyFactorGrad({state.kind}, shape={tuple(self.shape)})"
        return f"LazyFactorGrad({materialize(self)!r})"

    def __deepcopy__(self, memo):
        return materialize(self).clone()

    def __reduce_ex__(self, protocol):
        return materialize(self).clone().__reduce_ex__(protocol)

    def numpy(self, *, force: bool = False):
        return materialize(self).numpy(force=force)

    def tolist(self):
        return materialize(self).tolist()

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten.detach.default or func is aten.alias.default:
            (self,) = args
            return LazyFactorGrad(self._state, self)
        if func is aten.zero_.default and _kind(args[0]) not in (None, _DENSE):
            args[0]._state.set_zero()
            return args[0]
        if func is aten._foreach_zero_.default:
            (tensors,) = args
            for t in tensors:
                if _kind(t) not in (None, _DENSE):
                    t._state.set_zero()
            rest = [t for t in tensors if _kind(t) in (None, _DENSE)]
            return _run_materialized(func, (rest,), kwargs) if rest else None
        if func is aten.add_.Tensor and kwargs.get("alpha", 1) == 1 and _add_lazily(*args):
            return args[0]
        if func is aten.add.Tensor and kwargs.get("alpha", 1) == 1 and (_disjoint(*args) or _summable(*args)):
            # autograd's out-of-place accumulation of two parts that need no arithmetic to join: a
            # weight read twice in one forward, once for the output and once for the penalty (a
            # module that reads its parametrized weight again, e.g. for its shape); or, where the
            # factors' holders ask for it (_fusion.sums_lazily), any two parts, as dL/dw + dL/dw
            total = LazyFactorGrad(args[0]._state.copy(), args[0])
            _add_lazily(total, args[1])
            return total
        lazily = _LAZY_READERS.get(func)
        if lazily is not None:
            done, result = lazily(args, kwargs)
            if done:
                return result
        return _run_materialized(func, args, kwargs)


def _kind(t) -> str | None:
    return t._state.kind if isinstance(t, LazyFactorGrad) else None


def _add_lazily(self, other) -> bool:
    """self += other without materializing, where both are lazy gradients of the same factors."""
    if not (isinstance(self, LazyFactorGrad) and isinstance(other, LazyFactorGrad)):
        return False
    a, b = self._state, other._state
    if a.is_stale():
        # torch would add to a gradient of the factors before they changed (a backward pass after
        # step() without zero_grad(), as in an input-gradient pass that clears afterwards). The
        # sum cannot be formed: keep the tensor refused when read, until it is cleared.
        a.consume(_STALE if a.kind == _LAZY else a.kind)
        return True
    if b.kind == _ZERO and a.kind in (_LAZY, _ZERO):
        return True
    if a.kind == _ZERO and b.kind == _LAZY:
        a.set_lazy(b.factors, b.version, b.grad_w, b.grad_sumsq, b.backend)
        return True
    if a.kind != _LAZY or b.kind != _LAZY or a.factors() is not b.factors() or a.version != b.version:
        return False
    a.grad_w = _sum_grad_w(a.grad_w, b.grad_w, a.factors())
    if a.grad_sumsq is None or b.grad_sumsq is None:
        a.grad_sumsq = a.grad_sumsq if b.grad_sumsq is None else b.grad_sumsq
    else:
        a.grad_sumsq = a.grad_sumsq + b.grad_sumsq
    return True


def _live_pair(a, b) -> tuple[_State, _State] | None:
    """The states of a and b when both are lazy gradients of the same factors, as they are now."""
    if not (isinstance(a, LazyFactorGrad) and isinstance(b, LazyFactorGrad)):
        return None
    x, y = a._state, b._state
    if x.kind != _LAZY or y.kind != _LAZY or x.is_stale() or y.is_stale() or x.factors() is not y.factors():
        return None
    return (x, y) if x.version == y.version else None


def _disjoint(a, b) -> bool:
    """Whether lazy gradients a and b of the same factors, at their current version, hold one part
    each (dL/dw in one, dL/dsumsq in the other, or neither in one): their sum is exact without forming
    it, as one backward would give. Other sums are formed densely, rounding as torch's."""
    pair = _live_pair(a, b)
    if pair is None:
        return False
    x, y = pair
    return (x.grad_w is None or y.grad_w is None) and (x.grad_sumsq is None or y.grad_sumsq is None)


def _summable(a, b) -> bool:
    """Whether lazy gradients a and b of the same factors, at their current version, are summed
    lazily although both hold a dL/dw (or a dL/dsumsq): where their holders ask (_fusion.sums_lazily)."""
    pair = _live_pair(a, b)
    return pair is not None and _fusion.sums_lazily(pair[0].factors())


def _sum_grad_w(x: torch.Tensor | None, y: torch.Tensor | None, factors: torch.Tensor) -> torch.Tensor | None:
    if x is None or y is None:
        return x if y is None else y
    if x.dtype != factors.dtype or y.dtype != factors.dtype:
        # bf16/fp16 dL/dw of fp32 factors (autocast): sum in the factors' precision, as the
        # per-backward fp32 factor gradients would be.
        return x.to(factors.dtype) + y.to(factors.dtype)
    return x + y


def _run_materialized(func, args, kwargs):
    """Runs `func` on the dense gradients; in-place results keep their lazy-gradient wrapper."""
    wrapper_of: dict[int, LazyFactorGrad] = {}

    def unwrap(t):
        if isinstance(t, LazyFactorGrad):
            dense = materialize(t)
            wrapper_of[id(dense)] = t
            return dense
        return t

    out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
    return tree_map(lambda t: wrapper_of.get(id(t), t) if isinstance(t, torch.Tensor) else t, out)


def stale_gradient_error(what: str) -> RuntimeError:
    return RuntimeError(
        f"This DWF factor gradient {what}. FusedSGD keeps the factor gradient as dL/dw and forms it only "
        "when read, from the factors of the backward pass, so it cannot be read or accumulated into once "
        "they changed. Clear the gradients after each step (optimizer.zero_grad() or model.zero_grad()) "
        "and read them before step(), or train with torch.optim.SGD where a gradient must outlive a step"
    )


def _autograd_excluded() -> bool:
    # Asked of autograd itself: the dispatch key sets report the exclusion differently across torch
    # versions (torch 2.14 excludes the Autograd functionality, which no per-device key reports).
    with torch.enable_grad():
        return (torch.ones((), requires_grad=True) * 1).grad_fn is None


def reference_without_autograd(state: _State, factors: torch.Tensor) -> bool:
    """Whether the gradient is to be formed by the reference backend where autograd is off (inside
    __torch_dispatch__): its backward differentiates its forward, so the readers take its explicit
    formula (dwf_backward_differentiable, plain tensor ops) instead."""
    return resolve_backend(factors.device.type, state.backend) == "reference" and _autograd_excluded()


def materialize(grad: LazyFactorGrad) -> torch.Tensor:
    """The dense gradient behind `grad` (computed once, then kept: the gradient is now dense)."""
    state = grad._state
    if state.kind == _DENSE:
        return state.dense
    if state.kind == _CONSUMED:
        raise stale_gradient_error("was already applied by FusedSGD.step() (and released)")
    if state.kind == _STALE:
        raise stale_gradient_error("was computed by a backward pass before its factors were changed in place")
    if state.kind == _ZERO:
        state.set_dense(torch.zeros(grad.shape, dtype=grad.dtype, device=grad.device))
        return state.dense
    factors = state.factors()
    if factors is None:
        raise RuntimeError("This DWF factor gradient belongs to factors that no longer exist")
    if factors._version != state.version:
        raise stale_gradient_error("was computed by a backward pass before its factors were changed in place")
    grad_w = _grad_w_or_zeros(state.grad_w, factors)
    with torch.no_grad():
        if reference_without_autograd(state, factors):
            dense = dwf_backward_differentiable(factors.detach(), grad_w, state.grad_sumsq)
        else:
            dense = dwf_product_backward(factors, grad_w, state.grad_sumsq, backend=state.backend)
    state.set_dense(dense)
    return dense


def take_for_fused_step(grad: LazyFactorGrad, factors: torch.Tensor) -> _State | None:
    """For FusedSGD.step(): the state of `grad`, a lazy gradient, when it holds dL/dw (or None when
    only the penalty reached the layer: dL/dw is zero) and dL/dsumsq of `factors` as they are now, to
    be applied fused and then consumed; else None (apply `dense_of(grad)` unfused)."""
    state = grad._state
    if state.kind != _LAZY:
        if state.kind == _CONSUMED:
            raise RuntimeError(
                "FusedSGD.step() found a DWF factor gradient it already applied and released: step() was called "
                "again on the same backward pass, or a backward pass ran after step() without the gradients being "
                "cleared (it accumulated onto the applied gradient; torch.optim.SGD would apply that one again). "
                "Call optimizer.zero_grad() after each step and run a backward pass before the next"
            )
        return None
    if state.factors() is not factors or not factors.is_contiguous():
        return None
    if factors._version != state.version:
        raise stale_gradient_error("was computed by a backward pass before its factors were changed in place")
    return state


def _grad_w_or_zeros(grad_w: torch.Tensor | None, factors: torch.Tensor) -> torch.Tensor:
    # Only the penalty reached the layer (its output went unused): dL/dw is zero.
    return grad_w if grad_w is not None else factors.new_zeros(factors.shape[1:])


def convertible(grad: torch.Tensor) -> tuple[torch.Tensor | None, Callable[[torch.Tensor], torch.Tensor] | None]:
    """For module conversions (`Module._apply`: devices, dtypes, memory formats), which convert
    parameter gradients too: (the tensor to convert in place of `grad`, or None; a function that
    makes the converted parameter's gradient, or None).

    A lazy gradient is converted as the dense gradient it stands for. One that can no longer be read
    (applied by FusedSGD, or of factors changed since) has no value: the parameter gets an equally
    unreadable gradient of its new dtype and device.
    """
    if type(grad) is not LazyFactorGrad:
        return grad, None
    state = grad._state
    if not state.is_stale():
        return materialize(grad), None
    kind = _STALE if state.kind == _LAZY else state.kind

    def unreadable_like(factors: torch.Tensor) -> LazyFactorGrad:
        marker = _State(kind)
        marker.consume(kind)
        return LazyFactorGrad(marker, factors)

    return None, unreadable_like


def dense_of(grad: torch.Tensor) -> torch.Tensor:
    return materialize(grad) if type(grad) is LazyFactorGrad else grad


class FusedDWFProduct(torch.autograd.Function):
    """(w, sumsq) = dwf_product(factors, return_sumsq=True) whose backward yields a LazyFactorGrad."""

    @staticmethod
    def forward(ctx, factors: torch.Tensor, out_dtype: torch.dtype | None, backend: Backend, used: list[bool]):
        # dwf_product's work on the backend fused_dwf_product selected, dispatched below autograd as
        # torch's own autograd.Functions around ops do: this Function is the product's autograd (the
        # extension's ops would otherwise enter their C++ autograd kernel, which builds a node and
        # wraps the outputs even with grad mode off).
        with torch._C._AutoDispatchBelowAutograd():
            w, sumsq = forward_on(factors, out_dtype, True, backend)
        # The leaf parameter itself (not a saved copy, which torch.utils.checkpoint would hand back
        # as another tensor object): the lazy gradient refers to it. Its version is checked by hand.
        # All in one attribute: each one set on the node costs about a microsecond per layer and step.
        ctx.forward_state = (factors, factors._version, out_dtype, backend.name, used)
        ctx.set_materialize_grads(False)
        return w, sumsq

    @staticmethod
    def backward(ctx, grad_w: torch.Tensor | None, grad_sumsq: torch.Tensor | None):
        factors, version, out_dtype, backend, used = ctx.forward_state
        used[0] = True  # a backward pass has run through this forward (see FactorHolder.last_sumsq)
        if factors._version != version:
            raise RuntimeError(
                "one of the variables needed for gradient computation has been modified by an inplace "
                f"operation: the factors of a DWF layer are at version {factors._version}; expected version "
                f"{version} (the forward's). Step the optimizer after the backward pass, not between"
            )
        if grad_w is None and grad_sumsq is None:
            return None, None, None, None
        if torch.is_grad_enabled():
            # create_graph=True: the ordinary, differentiable backward of the product.
            with torch.enable_grad():
                w, sumsq = dwf_product(factors, return_sumsq=True, out_dtype=out_dtype, backend=backend)
            pairs = [(o, g) for o, g in ((w, grad_w), (sumsq, grad_sumsq)) if g is not None]
            (grad,) = torch.autograd.grad(
                [o for o, _ in pairs], [factors], [g for _, g in pairs], create_graph=True, allow_unused=True
            )
            return grad, None, None, None
        if not factors.is_leaf:
            # Not a parameter (e.g. factors computed by other ops): its backward reads the gradient now.
            grad = dwf_product_backward(factors, _grad_w_or_zeros(grad_w, factors), grad_sumsq, backend=backend)
            return grad, None, None, None
        state = _State(_LAZY)
        state.set_lazy(weakref.ref(factors), version, grad_w, grad_sumsq, backend)
        return LazyFactorGrad(state, factors), None, None, None


def fused_dwf_product(
    factors: torch.Tensor, out_dtype: torch.dtype | None, used: list[bool]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The layers' forward in fused mode: (w, sumsq), with a lazy factor gradient in the backward,
    which sets used[0] when it runs."""
    return FusedDWFProduct.apply(factors, out_dtype, select(factors.device.type), used)


# The readers that act on dL/dw and dL/dsumsq themselves (clipping, GradScaler): imported last, as
# they build on everything above.
from ._lazy_readers import LAZY_READERS as _LAZY_READERS  # noqa: E402
