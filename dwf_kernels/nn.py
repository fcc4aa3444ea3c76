"""DWF layers: drop-ins for torch.nn.Linear and Conv1d/2d/3d whose weight is held as D factors.

The weight is ONE parameter `factors` of shape (D, *weight.shape); every forward computes
w = prod_d factors[d] and the factors' sum of squares with one fused op (dwf_product, whichever
backend serves) and records that sum for `dwf_kernels.penalty`. `.weight` is the current product.
The bias is an ordinary, unfactorized, unpenalized parameter.

Under torch.autocast the fused op writes w directly in the autocast dtype (fp32 factors, bf16/fp16
w), so mixed precision costs no extra cast pass.

A layer whose factors a live `dwf_kernels.optim.FusedSGD` updates is in fused mode (the link
between them is on the factors Parameter: _fusion): its eager training forwards give the factors a
lazy gradient, which holds dL/dw and dL/dsumsq and forms the D x N factor gradient only when
something other than FusedSGD.step() reads it. `factors.grad` is an ordinary gradient for every
other purpose (zero_grad, accumulation, other optimizers, DDP).

Conversion: `DWFLinear.from_dense(linear, depth, init=...)` (and the same on DWFConv1d/2d/3d)
builds the DWF layer of a torch.nn layer, `layer.to_dense(threshold)` the torch.nn layer holding
the product; `converter_for(module)` says which class converts a module. Any other weight (of a
Linear/Conv subclass, attention, an embedding, any module) is held by the DWFWeight
parametrization (parametrization.py), whose forward runs the same fused product
(`converter_for(module, name)`); what both share is in _holder.py. dwf_kernels.factorize and
collapse are these, over a whole model.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import _fusion
from . import init as dwf_init
from ._holder import (
    DEFAULT_THRESHOLD,
    INITS,
    FactorHolder,
    check_depth,
    check_init,
    check_threshold,
    convert_holding_factors,
)
from .ops import dwf_product
from .parametrization import DWFWeight, FactorsParametrizationList, dwf_parametrization, dwf_target_std

__all__ = [  # the DWF layers, and what a user of them needs from _holder.py and parametrization.py
    "DEFAULT_THRESHOLD",
    "DWF_CLASS_FOR",
    "FACTORIZABLE",
    "INITS",
    "DWFConv1d",
    "DWFConv2d",
    "DWFConv3d",
    "DWFLayer",
    "DWFLinear",
    "DWFWeight",
    "FactorHolder",
    "FactorsParametrizationList",
    "check_depth",
    "check_init",
    "check_threshold",
    "converter_for",
    "dwf_parametrization",
    "dwf_target_std",
]


class DWFLayer(FactorHolder, nn.Module):
    """Base of the DWF layers: the factor parameter, its initialization and the fused product."""

    factors: nn.Parameter
    bias: nn.Parameter | None
    dense_cls: type[nn.Module]  # the torch.nn layer this class stands for
    dense_args: tuple[str, ...]  # its constructor arguments (bias, device and dtype aside), as attributes of both

    def _setup_factors(self, weight_shape: torch.Size, depth: int, bias: bool, device, dtype) -> None:
        check_depth(depth)
        self.depth = depth
        self.weight_shape = torch.Size(weight_shape)
        self.factors = nn.Parameter(torch.empty((depth, *weight_shape), device=device, dtype=dtype))
        out_features = weight_shape[0]
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.last_sumsq = None
        self.reset_parameters()  # nothing to draw on the meta device (from_dense builds there)

    def register_parameter(self, name: str, param: nn.Parameter | None) -> None:
        # Every factors Parameter a layer holds (assigned in any way) carries the FusedSGD link.
        super().register_parameter(name, param)
        if name == "factors" and param is not None:
            _fusion.attach(param)

    @classmethod
    def from_dense(
        cls,
        module: nn.Module,
        depth: int,
        init: str = "dwf",
        *,
        eps: float = dwf_init.DEFAULT_EPS,
        upper: float = dwf_init.DEFAULT_UPPER,
        factors: nn.Parameter | None = None,
    ) -> DWFLayer:
        """The DWF layer of the torch.nn layer `module` (of exactly `cls.dense_cls`), on its device and dtype.

        init="dwf": the paper's DWF init (product std = torch.nn's default init std; eps and upper
        as in dwf_kernels.init.dwf_init_). init="dense": exact balanced factors of `module.weight`
        (|f_d| = |w|^(1/D), the sign on the first factor): the layer computes what `module` does.
        The bias is `module.bias` itself (the same Parameter); train/eval mode is kept.
        `factors`: an existing factors Parameter to hold instead (layers tying one weight share it).

        Built on the meta device and then filled: nothing is initialized twice. With init="dwf" it
        draws from the global generator what earlier releases drew (they initialized each layer
        before drawing its factors), so a seeded conversion gives the same factors as they did.
        """
        if type(module) is not cls.dense_cls:
            raise TypeError(
                f"{cls.__name__}.from_dense converts a torch.nn.{cls.dense_cls.__name__} (that class exactly); "
                f"got {type(module).__name__}"
            )
        check_depth(depth)
        check_init(init)
        weight = module.weight
        layer = cls(
            **{name: getattr(module, name) for name in cls.dense_args},
            bias=False,
            device="meta",
            dtype=weight.dtype,
            depth=depth,
        )
        if init == "dwf":
            # The draws of the default init earlier releases ran first (factors, then bias), discarded.
            if weight.numel():
                dwf_init.uniform_draws((depth, *weight.shape))
            if module.bias is not None:
                torch.empty(module.bias.shape, device=weight.device, dtype=weight.dtype).uniform_()
        if factors is None:
            factors = nn.Parameter(torch.empty((depth, *weight.shape), device=weight.device, dtype=weight.dtype))
            with torch.no_grad():
                if init == "dense":
                    factors.copy_(dwf_init.exact_factors(weight, depth))
                else:
                    dwf_init.dwf_init_(factors, dwf_init.default_target_std(weight.shape), eps=eps, upper=upper)
        layer.factors = factors
        layer.bias = module.bias
        layer.train(module.training)
        return layer

    def to_dense(self, threshold: float = DEFAULT_THRESHOLD, *, weight: nn.Parameter | None = None) -> nn.Module:
        """The torch.nn layer (`dense_cls`) holding the product of the factors, with |w| < threshold
        set to exactly 0; its bias is this layer's (the same Parameter), and so is train/eval mode.
        `weight`: an existing weight Parameter to hold instead (layers sharing factors share it)."""
        check_threshold(threshold)
        dense = self.dense_cls(
            **{name: getattr(self, name) for name in self.dense_args},
            bias=False,
            device="meta",
            dtype=self.factors.dtype,
        )
        if weight is None:
            with torch.no_grad():
                w = dwf_product(self.factors)
                weight = nn.Parameter(torch.where(w.abs() < threshold, torch.zeros_like(w), w).contiguous())
        dense.weight = weight
        dense.bias = self.bias
        dense.train(self.training)
        return dense

    def reset_parameters(self) -> None:
        """DWF init of the factors (product std = torch.nn's default weight std); torch.nn's bias init."""
        dwf_init.dwf_init_(self.factors, dwf_init.default_target_std(self.weight_shape))
        if self.bias is not None:
            fan_in, _ = nn.init._calculate_fan_in_and_fan_out(torch.empty(self.weight_shape, device="meta"))
            bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            nn.init.uniform_(self.bias, -bound, bound)

    def dwf_weight(self) -> torch.Tensor:
        """The weight for this forward, and records the factors' sum of squares for the penalty."""
        return self.product_of(self.factors)

    @property
    def weight(self) -> torch.Tensor:
        """The current product of the factors (differentiable)."""
        return dwf_product(self.factors)

    def _apply(self, fn, recurse: bool = True):
        return convert_holding_factors(self, "factors", fn, recurse, super()._apply)

    def __setstate__(self, state: dict) -> None:
        # A deep copy of a Parameter drops its attributes: the copied factors get a new, empty link
        # (a copy is not updated by this layer's FusedSGD, only by an optimizer copied with it).
        super().__setstate__(state)
        _fusion.attach(self.factors)


class DWFLinear(DWFLayer):
    """torch.nn.Linear with its weight held as `depth` factors."""

    dense_cls = nn.Linear
    dense_args = ("in_features", "out_features")

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *, depth: int
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self._setup_factors(torch.Size((out_features, in_features)), depth, bias, device, dtype)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(input, self.dwf_weight(), self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, depth={self.depth}"
        )


# A torch.nn conv's constructor arguments (bias, device and dtype aside), then the other
# attributes it shows; a DWF conv shows them too, read from its torch.nn twin (below).
_CONV_ARGS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode")
_CONV_ATTRIBUTES = (*_CONV_ARGS, "output_padding", "transposed")


class _DWFConvNd(DWFLayer):
    dense_cls: type[nn.modules.conv._ConvNd]
    dense_args = _CONV_ARGS

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        depth: int,
    ) -> None:
        super().__init__()
        # torch.nn validates and normalizes the arguments (padding="same", tuples, padding modes)
        # on a weightless meta-device twin, which then holds the configuration and runs the
        # convolution with our weight: no torch.nn attribute is copied. It is no submodule (no
        # parameters, state_dict entries or conversions).
        twin = self.dense_cls(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            False,
            padding_mode,
            device="meta",
            dtype=dtype,
        )
        weight_shape = twin.weight.shape
        twin.weight = None
        self.__dict__["_conv"] = twin
        self._setup_factors(weight_shape, depth, bias, device, dtype)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._conv._conv_forward(input, self.dwf_weight(), self.bias)

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
            f"bias={self.bias is not None}, padding_mode={self.padding_mode!r}"
        )
        return s + f", depth={self.depth}"


for _name in _CONV_ATTRIBUTES:
    setattr(_DWFConvNd, _name, property(lambda self, name=_name: getattr(self._conv, name)))
del _name


class DWFConv1d(_DWFConvNd):
    """torch.nn.Conv1d with its weight held as `depth` factors."""

    dense_cls = nn.Conv1d


class DWFConv2d(_DWFConvNd):
    """torch.nn.Conv2d with its weight held as `depth` factors."""

    dense_cls = nn.Conv2d


class DWFConv3d(_DWFConvNd):
    """torch.nn.Conv3d with its weight held as `depth` factors."""

    dense_cls = nn.Conv3d


DWF_CLASS_FOR: dict[type[nn.Module], type[DWFLayer]] = {
    cls.dense_cls: cls for cls in (DWFLinear, DWFConv1d, DWFConv2d, DWFConv3d)
}  # the one dense -> DWF class mapping; the other way is each class's dense_cls
FACTORIZABLE = tuple(DWF_CLASS_FOR)  # the torch.nn layers that have a DWF class


def converter_for(module: nn.Module, name: str | None = None) -> type[DWFLayer] | type[DWFWeight] | None:
    """What converts `module` (name=None) or its parameter `name`.

    name=None: the DWF layer class whose from_dense replaces `module`, by its exact class (a
    subclass may change what the weight means), or None. With a parameter name: that class when
    `module` is of an exact class and name == "weight", else DWFWeight (its from_dense registers the
    parametrization in place), or None when `module` has no parameter `name`.
    factorize converts with what this names."""
    layer_cls = DWF_CLASS_FOR.get(type(module))
    if name is None:
        return layer_cls
    if module._parameters.get(name) is None:
        return None
    return layer_cls if layer_cls is not None and name == "weight" else DWFWeight
