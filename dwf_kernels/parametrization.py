"""The DWFWeight parametrization (torch.nn.utils.parametrize): any named weight of any module held as
D factors, whose product the module's own forward reads (docs/design.md, Layers and conversion)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from . import _fusion
from . import init as dwf_init
from ._holder import DEFAULT_THRESHOLD, FactorHolder, check_depth, check_init, check_threshold, convert_holding_factors
from .ops import dwf_product


def dwf_target_std(module: nn.Module, name: str, weight: torch.Tensor) -> float:
    """The product's std for init="dwf" of the DWFWeight of `module.<name>`: torch.nn's default
    Linear/Conv init std for the weight of a Linear or Conv (subclasses included, as for the DWF
    layers); for any other weight the std it has now (its model's own initialization: attention's
    Xavier init, an embedding's N(0, 1), a Hugging Face model's N(0, 0.02), ...)."""
    if name == "weight" and isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
        return dwf_init.default_target_std(weight.shape)
    std = float(weight.detach().double().std()) if weight.numel() > 1 else math.nan
    return std if math.isfinite(std) and std > 0 else dwf_init.default_target_std(weight.shape)


class DWFWeight(FactorHolder, nn.Module):
    """A parametrization (torch.nn.utils.parametrize) of one named weight of any module, held as
    `depth` factors: `module.<name>` is the product of `module.parametrizations.<name>.original`
    (shape (depth, *weight.shape)), computed by the same fused op as the DWF layers' (recording the
    sum of squares for `penalty`, FusedSGD's lazy gradient in fused mode), so the module's own
    forward runs on it. factorize uses it for every weight that is not the weight of an exact
    torch.nn.Linear/Conv1d/2d/3d: Linear and Conv subclasses, MultiheadAttention's projections,
    Hugging Face's Conv1D, embeddings, any named parameter.

    Each access of `module.<name>` runs the product once; a module that reads its weight several
    times per forward runs it several times (MultiheadAttention reads in_proj_weight three times
    per training forward, twice in its fast-path checks), unless under
    torch.nn.utils.parametrize.cached(). Parametrized modules are copied by deepcopy and saved
    through their state_dict (torch refuses to pickle them whole).
    """

    def __init__(self, weight_shape: torch.Size, depth: int) -> None:
        super().__init__()
        check_depth(depth)
        self.depth = depth
        self.weight_shape = torch.Size(weight_shape)
        self.last_sumsq = None

    def forward(self, factors: torch.Tensor) -> torch.Tensor:
        return self.product_of(factors)

    def extra_repr(self) -> str:
        return f"weight_shape={tuple(self.weight_shape)}, depth={self.depth}"

    @classmethod
    def from_dense(
        cls,
        module: nn.Module,
        depth: int,
        init: str = "dwf",
        *,
        name: str = "weight",
        eps: float = dwf_init.DEFAULT_EPS,
        upper: float = dwf_init.DEFAULT_UPPER,
        factors: nn.Parameter | None = None,
    ) -> nn.Module:
        """Registers the DWF parametrization of the parameter `module.<name>`, in place; returns `module`.

        init="dense": exact balanced factors of the weight (the module computes what it did);
        init="dwf": the paper's DWF init with the std of `dwf_target_std`. `factors`: an existing
        factors Parameter to hold instead (a weight tied with another converted one).
        """
        check_depth(depth)
        check_init(init)
        weight = module._parameters.get(name) if isinstance(name, str) else None
        if weight is None:
            raise ValueError(
                f"name must name a parameter of the {type(module).__name__} (not a buffer, not a parametrized "
                f"tensor); got {name!r}"
            )
        if factors is None:
            factors = nn.Parameter(
                torch.empty((depth, *weight.shape), device=weight.device, dtype=weight.dtype),
                requires_grad=weight.requires_grad,
            )
            with torch.no_grad():
                if init == "dense":
                    factors.copy_(dwf_init.exact_factors(weight, depth))
                else:
                    target = dwf_target_std(module, name, weight)
                    dwf_init.dwf_init_(factors, target, eps=eps, upper=upper)
        elif factors.shape != (depth, *weight.shape):
            raise ValueError(
                f"factors must have shape {(depth, *weight.shape)} for {name!r}; got {tuple(factors.shape)}"
            )
        module._parameters[name] = factors  # registered as the parametrization's `original`, unchanged
        parametrize.register_parametrization(module, name, cls(weight.shape, depth), unsafe=True)
        holder = module.parametrizations[name]
        holder.__class__ = FactorsParametrizationList
        _fusion.attach(holder.original)
        return module

    @staticmethod
    def to_dense(
        module: nn.Module, name: str = "weight", threshold: float = DEFAULT_THRESHOLD, *, weight=None
    ) -> nn.Parameter:
        """Removes the DWF parametrization of `module.<name>`, in place, leaving as that parameter the
        product of the factors with |w| < threshold set to exactly 0 (or the given shared `weight`);
        when it was the module's last parametrization the module gets its own class back."""
        check_threshold(threshold)
        factors = module.parametrizations[name].original
        if weight is None:
            with torch.no_grad():
                w = dwf_product(factors)
                w = torch.where(w.abs() < threshold, torch.zeros_like(w), w).contiguous()
            weight = nn.Parameter(w, requires_grad=factors.requires_grad)
        # A deep copy of a parametrized module shares torch's parametrized class with the original,
        # and removing a parametrization edits that class: the module gets a class of its own first.
        cls = type(module)
        body = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
        module.__class__ = type(cls.__name__, cls.__bases__, body)
        parametrize.remove_parametrizations(module, name, leave_parametrized=False)
        setattr(module, name, weight)
        return weight


class FactorsParametrizationList(parametrize.ParametrizationList):
    """torch's ParametrizationList holding a DWFWeight's factors (`original`): like a DWF layer, it
    keeps their FusedSGD link through conversions and gives a copy's factors a link of their own."""

    def forward(self) -> torch.Tensor:
        # torch's, with the DWFWeight's forward called directly (no module call, whose hooks it has
        # none of) and no attribute probing for further parametrizations: this runs at every read.
        modules = self._modules
        x = modules["0"].product_of(self._parameters["original"])
        for i in range(1, len(modules)):
            x = modules[str(i)](x)
        return x

    def _apply(self, fn, recurse: bool = True):
        return convert_holding_factors(self, "original", fn, recurse, super()._apply)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        _fusion.attach(self.original)


def dwf_parametrization(module: nn.Module, name: str) -> DWFWeight | None:
    """The DWFWeight of `module.<name>`, or None when that tensor is not DWF-parametrized."""
    if not parametrize.is_parametrized(module, name):
        return None
    first = module.parametrizations[name][0]
    return first if isinstance(first, DWFWeight) else None
