"""What every module holding DWF factors shares (the DWF layers of nn.py and the DWFWeight
parametrization of parametrization.py): the argument checks of depth, init and threshold, the
fused product of a forward (fused mode when a live FusedSGD updates the factors, the compiled path
under torch.compile) with the sum of squares it records for `penalty`, and conversions (`.to`,
`.half`, channels_last) that keep the factors' layout and FusedSGD link."""

from __future__ import annotations

import functools
import math
import numbers

import torch
from torch import nn

from . import _fusion
from ._compiled_grad import compiled_dwf_product
from ._lazy_grad import convertible, fused_dwf_product
from ._validate import MAX_DEPTH
from .ops import dwf_product

DEFAULT_THRESHOLD = 1.19e-7  # float32 machine epsilon: |w| below it counts as exactly zero
INITS = ("dwf", "dense")


def check_depth(depth: object) -> None:
    """The number of factors per weight: an int in [1, MAX_DEPTH] (not a bool, a float or a string)."""
    if isinstance(depth, bool) or not isinstance(depth, int):
        raise TypeError(f"depth must be an int in [1, {MAX_DEPTH}]; got {depth!r} ({type(depth).__name__})")
    if not 1 <= depth <= MAX_DEPTH:
        raise ValueError(f"depth must be an int in [1, {MAX_DEPTH}]; got {depth!r}")


def _check_real(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {value!r} ({type(value).__name__})")


def check_threshold(threshold: object) -> None:
    _check_real("threshold", threshold)
    if not 0 <= threshold < math.inf:
        raise ValueError(f"threshold must be a finite number >= 0 (|w| < threshold counts as zero); got {threshold}")


def check_init(init: object) -> None:
    if init not in INITS:
        raise ValueError(f"init must be 'dwf' or 'dense'; got {init!r}")


@functools.cache
def _autocast_available(device_type: str) -> bool:
    # torch.is_autocast_enabled raises for device types without autocast (meta, for one). Not
    # asked while compiling: torch 2.11's dynamo cannot trace it (and compiles no meta modules).
    return torch.amp.is_autocast_available(device_type)


class FactorHolder:
    """What every module holding DWF factors shares (DWF layers and the DWFWeight parametrization):
    the fused product of this forward, and the sum of squares it recorded for `penalty`."""

    depth: int

    @property
    def last_sumsq(self) -> torch.Tensor | None:
        """The factors' sum of squares recorded by the last forward, for `dwf_kernels.penalty`; None
        before the first forward and once a backward pass has run through that forward's graph
        (which frees it: the penalty then takes a fresh sum)."""
        record = self.__dict__.get("_last_sumsq")
        return None if record is None or record[1][0] else record[0]

    @last_sumsq.setter
    def last_sumsq(self, sumsq: torch.Tensor | None) -> None:
        _record_sumsq(self, sumsq)

    def product_of(self, factors: torch.Tensor) -> torch.Tensor:
        """The weight for this forward from `factors` (this holder's), and records their sum of squares
        for the penalty: one fused op, in fused mode when a live FusedSGD updates them."""
        out_dtype = None
        compiling = torch.compiler.is_compiling()
        if factors.dtype == torch.float32:
            device_type = factors.device.type
            if (compiling or _autocast_available(device_type)) and torch.is_autocast_enabled(device_type):
                autocast_dtype = torch.get_autocast_dtype(device_type)
                if autocast_dtype in (torch.bfloat16, torch.float16):
                    out_dtype = autocast_dtype
        w, sumsq, used = _product_and_sumsq(factors, out_dtype, compiling)
        if compiling:
            self.last_sumsq = sumsq
        else:  # the record itself, without nn.Module.__setattr__'s lookups on every layer's forward
            _record_sumsq(self, sumsq, used)
        return w

    def fresh_sumsq(self, factors: torch.Tensor) -> torch.Tensor:
        """The factors' sum of squares computed now (for `penalty`, where no usable forward recorded
        one), differentiable as a forward's: with a lazy factor gradient in fused mode."""
        return _product_and_sumsq(factors, None, torch.compiler.is_compiling())[1]

    def __getstate__(self) -> dict:
        # The recorded sum of squares belongs to one forward's autograd graph: a non-leaf tensor,
        # which deepcopy refuses and pickling must not carry. A copy starts without one.
        state = self.__dict__.copy()
        state["_last_sumsq"] = None
        return state


def _record_sumsq(holder: FactorHolder, sumsq: torch.Tensor | None, used: list[bool] | None = None) -> None:
    """Records `sumsq` as the holder's last sum of squares, with the flag a backward through its
    graph sets: `used` where the product's own backward sets it (fused mode), else a new one that a
    hook on sumsq's node sets."""
    if used is None:
        used = [False]  # the hook holds only this flag, so no reference cycle
        if sumsq is not None and not torch.compiler.is_compiling() and sumsq.grad_fn is not None:

            def mark_used(grad_outputs, used=used):
                used[0] = True

            sumsq.grad_fn.register_prehook(mark_used)
    holder.__dict__["_last_sumsq"] = None if sumsq is None else (sumsq, used)


def _product_and_sumsq(
    factors: torch.Tensor, out_dtype: torch.dtype | None, compiling: bool
) -> tuple[torch.Tensor, torch.Tensor, list[bool] | None]:
    """(w, sumsq, used): used is the flag the product's backward sets when it runs (fused mode), or
    None (the caller's record then hooks sumsq's node)."""
    if compiling and torch.is_grad_enabled() and factors.requires_grad:
        # One opaque op whose backward decides as it runs whether the gradient is lazy (below).
        return (*compiled_dwf_product(factors, out_dtype), None)
    if (
        torch.is_grad_enabled()
        and factors.requires_grad
        and _fusion.is_fused(factors)  # never tensors swapped in by torch.func.functional_call
    ):
        # Fused mode: the factors' gradient is lazy; FusedSGD.step() applies it without forming it.
        used = [False]
        return (*fused_dwf_product(factors, out_dtype, used), used)
    return (*dwf_product(factors, return_sumsq=True, out_dtype=out_dtype), None)


def convert_holding_factors(module: nn.Module, name: str, fn, recurse: bool, apply):
    """`module._apply(fn)` (through `apply`, the base class's) for a module holding DWF factors as its
    parameter `name`: keeps the factors' layout and their FusedSGD link, and converts a lazy gradient."""
    factors = getattr(module, name)
    link = _fusion.link_of(factors)
    factors.grad, unreadable_like = convertible(factors.grad)  # a lazy gradient: see _lazy_grad

    def keep_factor_layout(t: torch.Tensor) -> torch.Tensor:
        if t is factors or t is factors.grad:
            # (D, *weight_shape) is not an image batch: memory-format conversions such as
            # model.to(memory_format=torch.channels_last) must not touch it (a 2d conv's
            # factors are 5-d and would be refused). Convert a flat 2-d view, which they skip.
            return fn(t.view(t.shape[0], -1)).view(t.shape)
        return fn(t)

    module = apply(keep_factor_layout, recurse)
    # Conversions that swap the parameter's contents or replace it (torch.__future__ switches)
    # leave it without the link: the layer stays in the mode it was in.
    _fusion.attach(getattr(module, name), link)
    if unreadable_like is not None:
        getattr(module, name).grad = unreadable_like(getattr(module, name))
    return module
