"""The link between a DWF layer's factors and the FusedSGD optimizers that update them (and the
data-parallel wrappers that reduce their gradient, dwf_kernels.parallel).

A DWF layer attaches a `FusedBy` to its factors Parameter (attribute `_dwf_fused_by`) when the
parameter is assigned. `FusedSGD` adds itself to the link of every parameter it updates that
carries one; the link holds the optimizers weakly, so it empties when they are freed. The layer's
forward is in fused mode (lazy factor gradient, see _lazy_grad) while its factors' link holds a
live optimizer. Neither side knows the other's class: both speak only through this module, and
the state lives on the parameter the optimizer updates, so layers sharing one factor parameter
(a layer used in two models, tied weights) share it, and tensors put in place of the factors
(torch.func.functional_call) carry none.

Copies do not keep the link: a deep copy of a Parameter drops its attributes and a pickled link
comes back empty, so a copied layer starts outside fused mode until an optimizer of the copy
(deepcopy or pickling of model and optimizer together) adds itself.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator

import torch

ATTRIBUTE = "_dwf_fused_by"


class FusedBy:
    """The live FusedSGD optimizers that update one factors Parameter, held weakly."""

    __slots__ = ("_optimizers",)

    def __init__(self) -> None:
        self._optimizers: weakref.WeakSet = weakref.WeakSet()

    def add(self, optimizer: torch.optim.Optimizer) -> None:
        self._optimizers.add(optimizer)

    def __bool__(self) -> bool:
        return len(self._optimizers) > 0

    def __iter__(self) -> Iterator[torch.optim.Optimizer]:
        return iter(list(self._optimizers))

    def __reduce__(self):
        return FusedBy, ()  # a copy starts unlinked: its optimizers are the original's


# The parameter's attributes travel with it when pickled; loading with weights_only=True must
# accept the (empty) link.
torch.serialization.add_safe_globals([FusedBy])


def link_of(param: torch.Tensor) -> FusedBy | None:
    """The link a DWF layer attached to `param`, or None for any other tensor."""
    return param.__dict__.get(ATTRIBUTE)


def attach(factors: torch.Tensor, link: FusedBy | None = None) -> None:
    """Gives a layer's factors Parameter its link (`link`, or a new one) unless it has one."""
    if link_of(factors) is None:
        setattr(factors, ATTRIBUTE, FusedBy() if link is None else link)


def bind(optimizer: torch.optim.Optimizer, params) -> None:
    """Records that `optimizer` updates `params`: those that are DWF factors put their layers in fused mode."""
    for param in params:
        link = link_of(param)
        if link is not None:
            link.add(optimizer)


def is_fused(factors: torch.Tensor) -> bool:
    """Whether a live FusedSGD updates `factors` (the layers' forward asks this)."""
    link = link_of(factors)
    return link is not None and bool(link)


def sums_lazily(factors: torch.Tensor) -> bool:
    """Whether gradient parts of `factors` from one backward pass (a layer used twice, tied factors,
    a fresh penalty sum) are summed as dL/dw and dL/dsumsq, equal to rounding, instead of as factor
    gradients, torch's rounding: where a holder needs the gradient lazy to the end of the backward
    (dwf_kernels.parallel reduces dL/dw then)."""
    link = link_of(factors)
    return link is not None and any(getattr(holder, "dwf_sums_lazily", False) for holder in link)


def fused_by(factors: torch.Tensor) -> list[torch.optim.Optimizer]:
    """The live FusedSGD optimizers that update `factors`."""
    link = link_of(factors)
    return [] if link is None else list(link)
