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
parametrization, whose forward runs the same fused product (`converter_for(module, name)`).
dwf_kernels.factorize and collapse are these, over a whole model.
"""

from __future__ import annotations

import functools
import math
import numbers

import torch
from torch import nn
from torch.nn.utils import parametrize

from . import _fusion
from . import init as dwf_init
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
        used = [False]  # set by the backward; the hook holds only this flag, so no reference cycle
        if sumsq is not None and not torch.compiler.is_compiling() and sumsq.grad_fn is not None:

            def mark_used(grad_outputs, used=used):
                used[0] = True

            sumsq.grad_fn.register_prehook(mark_used)
        self.__dict__["_last_sumsq"] = None if sumsq is None else (sumsq, used)

    def product_of(self, factors: torch.Tensor) -> torch.Tensor:
        """The weight for this forward from `factors` (this holder's), and records their sum of squares
        for the penalty: one fused op, in fused mode when a live FusedSGD updates them."""
        out_dtype = None
        device_type = factors.device.type
        if (
            factors.dtype == torch.float32
            and (torch.compiler.is_compiling() or _autocast_available(device_type))
            and torch.is_autocast_enabled(device_type)
        ):
            autocast_dtype = torch.get_autocast_dtype(device_type)
            if autocast_dtype in (torch.bfloat16, torch.float16):
                out_dtype = autocast_dtype
        w, sumsq = _product_and_sumsq(factors, out_dtype)
        self.last_sumsq = sumsq
        return w

    def fresh_sumsq(self, factors: torch.Tensor) -> torch.Tensor:
        """The factors' sum of squares computed now (for `penalty`, where no usable forward recorded
        one), differentiable as a forward's: with a lazy factor gradient in fused mode."""
        return _product_and_sumsq(factors, None)[1]

    def __getstate__(self) -> dict:
        # The recorded sum of squares belongs to one forward's autograd graph: a non-leaf tensor,
        # which deepcopy refuses and pickling must not carry. A copy starts without one.
        state = self.__dict__.copy()
        state["_last_sumsq"] = None
        return state


def _product_and_sumsq(factors: torch.Tensor, out_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    if torch.compiler.is_compiling() and torch.is_grad_enabled() and factors.requires_grad:
        # One opaque op whose backward decides as it runs whether the gradient is lazy (below).
        return compiled_dwf_product(factors, out_dtype)
    if (
        torch.is_grad_enabled()
        and factors.requires_grad
        and _fusion.is_fused(factors)  # never tensors swapped in by torch.func.functional_call
    ):
        # Fused mode: the factors' gradient is lazy; FusedSGD.step() applies it without forming it.
        return fused_dwf_product(factors, out_dtype)
    return dwf_product(factors, return_sumsq=True, out_dtype=out_dtype)


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
