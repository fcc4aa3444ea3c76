"""Sparse inference: a collapsed model's Linear and Conv layers computing with their nonzeros only.

    fast = dwf_kernels.sparsify(collapse(model), example_input)   # measured, layer by layer

`SparseLinear` holds its weight in CSR (one row per output feature) and computes
y = x W^T + b on the CPU with dwf_kernels._C's `sparse_linear` kernel (eight input rows per pass
over a CSR row, the batch split between threads), elsewhere with torch.sparse's CSR matmul.
`SparseConv1d` and `SparseConv2d` hold the kernel in CSR (one row per output channel) and run
dwf_kernels._C's `sparse_conv2d` on the CPU: each nonzero adds its value times the shifted input
plane it reads, so the work is nonzeros times output pixels (elsewhere: torch's dense convolution
of the stored weight). `sparsify` replaces a layer only where the sparse module is measured faster
than the dense one on the layer's own input (from `example_input`), so a model never gets slower
by it. Inference only: the sparse modules hold buffers, not parameters, and refuse inputs that
require grad.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import _extension

# The op's overload itself: calling it skips the overload resolution of torch.ops.<ns>.<op>(...),
# a few microseconds that count at batch 1. None without the extension's CPU kernels.
_SPARSE_LINEAR = _SPARSE_CONV2D = None
if "cpu" in _extension.KERNEL_DEVICES:
    _SPARSE_LINEAR = torch.ops.dwf_kernels.sparse_linear.default
    _SPARSE_CONV2D = torch.ops.dwf_kernels.sparse_conv2d.default

    @torch.library.register_fake("dwf_kernels::sparse_linear")
    def _sparse_linear_fake(input, row_ptr, col, values, bias):
        return input.new_empty(input.shape[0], row_ptr.shape[0] - 1)

    @torch.library.register_fake("dwf_kernels::sparse_conv2d")
    def _sparse_conv2d_fake(input, row_ptr, col, values, bias, kernel_size, stride, padding, dilation, groups):
        size = [
            (input.shape[2 + i] + 2 * padding[i] - dilation[i] * (kernel_size[i] - 1) - 1) // stride[i] + 1
            for i in range(2)
        ]
        return input.new_empty(input.shape[0], row_ptr.shape[0] - 1, *size)


def _csr_buffers(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """row_ptr (int64), col (int32 where it fits) and values of a weight's CSR form, one row per
    output (the first dimension), columns the flattened other dimensions."""
    with warnings.catch_warnings():  # torch's "sparse CSR support is in beta" notice, once per layer
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        csr = weight.detach().reshape(weight.shape[0], -1).to_sparse_csr()
    index = torch.int32 if weight[0].numel() < 2**31 else torch.int64
    return csr.crow_indices().to(torch.int64), csr.col_indices().to(index), csr.values().clone()


def _operands(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(input, values, bias) to compute with. Under torch.autocast the layer computes as nn.Linear
    and nn.Conv do there: input, weight and bias in the autocast dtype (fp64 layers stay fp64)."""
    values, bias = layer.values, layer.bias
    if x.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            f"{type(layer).__name__} is for inference: run it under torch.no_grad() or on inputs without grad"
        )
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type) and values.dtype != torch.float64:
        dtype = torch.get_autocast_dtype(device_type)
        if x.dtype != torch.float64:
            x = x.to(dtype)
        if values.dtype != dtype:
            values, bias = values.to(dtype), None if bias is None else bias.to(dtype)
    if x.dtype != values.dtype or x.device != values.device:
        raise ValueError(f"input must be {values.dtype} on {values.device} like the layer; got {x.dtype} on {x.device}")
    return x, values, bias


class SparseLinear(nn.Module):
    """A Linear for inference whose weight is stored and used as its nonzeros (CSR).

    Computing with the nonzeros only, it never multiplies by a zero weight: where a dense layer
    gives NaN for an Inf or NaN input that meets a zero weight (0 * Inf), this gives a finite sum.
    The same holds for SparseConv1d/2d."""

    def __init__(self, in_features: int, out_features: int, row_ptr, col, values, bias) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("row_ptr", row_ptr)
        self.register_buffer("col", col)
        self.register_buffer("values", values)
        self.register_buffer("bias", bias)

    @classmethod
    def from_dense(cls, linear: nn.Linear) -> SparseLinear:
        """The same map as `linear` (nn.Linear or a DWF layer collapsed to one), weight as CSR."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear; got {type(linear).__name__}")
        out_features, in_features = linear.weight.shape
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(in_features, out_features, *_csr_buffers(linear.weight), bias)

    def to_dense(self) -> nn.Linear:
        """The equivalent nn.Linear (same device and dtype)."""
        factory = {"device": self.values.device, "dtype": self.values.dtype}
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, **factory)
        with torch.no_grad():
            linear.weight.copy_(self.weight())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def weight(self) -> torch.Tensor:
        """The dense weight (out_features, in_features)."""
        return self._csr().to_dense()

    @property
    def nnz(self) -> int:
        return self.values.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"input's last dimension must be in_features={self.in_features}; got shape {tuple(x.shape)}"
            )
        x, values, bias = _operands(self, x)
        rows = x if x.dim() == 2 and x.is_contiguous() else x.reshape(-1, self.in_features).contiguous()
        if _SPARSE_LINEAR is not None and rows.device.type == "cpu":
            y = _SPARSE_LINEAR(rows, self.row_ptr, self.col, values, bias)
            return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)
        y = (self._csr(values) @ rows.t()).t()
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def _csr(self, values: torch.Tensor | None = None) -> torch.Tensor:
        shape = (self.out_features, self.in_features)
        values = self.values if values is None else values
        col = self.col.to(torch.int64)
        return torch.sparse_csr_tensor(self.row_ptr, col, values, shape, check_invariants=True)

    def extra_repr(self) -> str:
        total = self.in_features * self.out_features
        return f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.nnz} of {total}"


class _SparseConvNd(nn.Module):
    """A Conv1d/Conv2d for inference whose kernel is stored and used as its nonzeros (CSR: one row
    per output channel, columns the flattened (in_channels / groups, *kernel_size) index)."""

    dense_cls: type[nn.Module]

    def __init__(self, conv: nn.Module, row_ptr, col, values, bias) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.groups = conv.in_channels, conv.out_channels, conv.groups
        self.kernel_size, self.stride, self.dilation = conv.kernel_size, conv.stride, conv.dilation
        self.padding = conv.padding  # as given to the torch.nn layer ("same" and "valid" included)
        self._kernel_args = self._geometry()  # computed once: the call's overhead counts at batch 1
        self.register_buffer("row_ptr", row_ptr)
        self.register_buffer("col", col)
        self.register_buffer("values", values)
        self.register_buffer("bias", bias)

    @classmethod
    def from_dense(cls, conv: nn.Module) -> _SparseConvNd:
        """The same map as `conv` (an nn.ConvNd of this dimension, zero padding), kernel as CSR."""
        name = cls.dense_cls.__name__
        if not isinstance(conv, cls.dense_cls):
            raise TypeError(f"conv must be an nn.{name}; got {type(conv).__name__}")
        if conv.padding_mode != "zeros":
            raise ValueError(
                f"conv must pad with zeros (padding_mode='zeros'); got padding_mode={conv.padding_mode!r}, "
                "which has no sparse kernel: keep the layer dense"
            )
        if conv.padding == "same" and any(
            d * (k - 1) % 2 for k, d in zip(conv.kernel_size, conv.dilation, strict=True)
        ):
            raise ValueError(
                f"conv's padding='same' pads unevenly for kernel_size={conv.kernel_size}, "
                f"dilation={conv.dilation}; the sparse kernel pads both sides alike: keep the layer dense"
            )
        bias = None if conv.bias is None else conv.bias.detach().clone()
        return cls(conv, *_csr_buffers(conv.weight), bias)

    def to_dense(self) -> nn.Module:
        """The equivalent torch.nn convolution (same device and dtype)."""
        factory = {"device": self.values.device, "dtype": self.values.dtype}
        conv = self.dense_cls(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            bias=self.bias is not None,
            **factory,
        )
        with torch.no_grad():
            conv.weight.copy_(self.weight())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def weight(self) -> torch.Tensor:
        """The dense kernel (out_channels, in_channels / groups, *kernel_size)."""
        shape = (self.out_channels, (self.in_channels // self.groups) * math.prod(self.kernel_size))
        col = self.col.to(torch.int64)
        csr = torch.sparse_csr_tensor(self.row_ptr, col, self.values, shape, check_invariants=True)
        return csr.to_dense().reshape(self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    @property
    def nnz(self) -> int:
        return self.values.numel()

    def _geometry(self) -> tuple[list[int], list[int], list[int], list[int], int]:
        """kernel_size, stride, padding, dilation and groups as the 2-d kernel takes them."""
        if self.padding == "valid":
            padding = [0] * len(self.kernel_size)
        elif self.padding == "same":
            padding = [d * (k - 1) // 2 for k, d in zip(self.kernel_size, self.dilation, strict=True)]
        else:
            padding = list(self.padding)
        lead = [1] * (2 - len(self.kernel_size))  # a Conv1d runs as a 2-d convolution of height 1
        return (
            lead + list(self.kernel_size),
            lead + list(self.stride),
            [0] * len(lead) + padding,
            lead + list(self.dilation),
            self.groups,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = len(self.kernel_size)
        if x.dim() not in (dims + 1, dims + 2) or x.shape[-dims - 1] != self.in_channels:
            raise ValueError(
                f"input must be (batch, {self.in_channels}, {'length' if dims == 1 else 'height, width'}) "
                f"or without the batch dimension; got shape {tuple(x.shape)}"
            )
        x, values, bias = _operands(self, x)
        if _SPARSE_CONV2D is None or x.device.type != "cpu":
            return self._conv_forward(x, self.weight().to(values.dtype), bias)
        unbatched = x.dim() == dims + 1
        images = x.unsqueeze(0) if unbatched else x
        if dims == 1:
            images = images.unsqueeze(2)
        y = _SPARSE_CONV2D(images.contiguous(), self.row_ptr, self.col, values, bias, *self._kernel_args)
        if dims == 1:
            y = y.squeeze(2)
        elif not unbatched and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            y = y.contiguous(memory_format=torch.channels_last)  # the layout torch's convolution returns
        return y.squeeze(0) if unbatched else y

    def _conv_forward(self, x, weight, bias):
        conv = F.conv1d if len(self.kernel_size) == 1 else F.conv2d
        return conv(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        total = self.out_channels * (self.in_channels // self.groups) * math.prod(self.kernel_size)
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, nnz={self.nnz} of {total}"
        )


class SparseConv1d(_SparseConvNd):
    """An nn.Conv1d for inference whose kernel is stored and used as its nonzeros."""

    dense_cls = nn.Conv1d


class SparseConv2d(_SparseConvNd):
    """An nn.Conv2d for inference whose kernel is stored and used as its nonzeros."""

    dense_cls = nn.Conv2d


# What sparsify converts: exact classes (a subclass may change what its weight means).
SPARSE_CLASS_FOR: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: SparseLinear,
    nn.Conv1d: SparseConv1d,
    nn.Conv2d: SparseConv2d,
}


@dataclass
class SparsifyDecision:
    """What `sparsify` measured for one Linear or Conv layer (seconds per call, median); a layer
    with no sparse kernel is not timed (seconds None) and says why in `reason`."""

    name: str
    kind: str
    nnz: int
    numel: int
    dense_seconds: float | None
    sparse_seconds: float | None
    replaced: bool
    reason: str = ""

    @property
    def speedup(self) -> float | None:
        if self.dense_seconds is None or self.sparse_seconds is None:
            return None
        return self.dense_seconds / self.sparse_seconds


def sparsify(
    model: nn.Module,
    example_input,
    *,
    min_speedup: float = 1.1,
    rounds: int = 30,
    report: list[SparsifyDecision] | None = None,
) -> nn.Module:
    """Replace, in place, each nn.Linear, nn.Conv1d and nn.Conv2d of `model` by its sparse module
    (SparseLinear, SparseConv1d, SparseConv2d) where that is measured at least `min_speedup` times
    faster on the layer's input when `model(example_input)` runs.

    example_input: what the model is called with (a tensor, or a tuple of positional arguments),
        at the batch size to optimize for: the break-even sparsity depends on it. The model runs
        it once in eval mode (each module's mode is restored), then each layer is timed alone.
    report: a list that receives one SparsifyDecision per Linear/Conv layer the input runs
        (Conv3d included, kept dense: no sparse kernel).
    A module used in several places is replaced in all of them. A model with DWF layers is refused:
    collapse it first. Returns the model. Inference only.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
    if isinstance(min_speedup, bool) or not isinstance(min_speedup, (int, float)) or min_speedup <= 0:
        raise ValueError(f"min_speedup must be a positive number; got {min_speedup!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a positive int; got {rounds!r}")
    from .nn import FactorHolder  # DWF layers and DWF-parametrized weights (nn imports nothing of this module)

    if any(isinstance(m, FactorHolder) for m in model.modules()):
        raise ValueError(
            "model holds DWF layers, whose weights are factors: collapse it first "
            "(sparsify(dwf_kernels.collapse(model, threshold), example_input))"
        )
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    inputs: dict[str, torch.Tensor] = {}
    names: dict[int, list[str]] = {}  # every name of each module (a shared module is replaced everywhere)
    for name, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), []).append(name)
    candidates = (*SPARSE_CLASS_FOR, nn.Conv3d)
    layers = {name: m for name, m in model.named_modules() if type(m) in candidates}
    hooks = [
        m.register_forward_pre_hook(lambda _m, a, name=name: inputs.setdefault(name, a[0].detach()))
        for name, m in layers.items()
    ]
    # The capture runs as inference does: in eval mode (no batch-norm statistics updated, no
    # dropout), each module's mode restored afterwards.
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            model(*args)
    finally:
        for hook in hooks:
            hook.remove()
        for m, training in modes:
            m.training = training
    replacements = {}
    with torch.no_grad():
        for name, layer in layers.items():
            if name not in inputs:
                continue  # not run by this input
            x = inputs[name]
            decision = SparsifyDecision(
                name, type(layer).__name__, int(layer.weight.count_nonzero()), layer.weight.numel(), None, None, False
            )
            try:
                if type(layer) not in SPARSE_CLASS_FOR:
                    raise ValueError(f"no sparse kernel for {type(layer).__name__}: kept dense")
                sparse = SPARSE_CLASS_FOR[type(layer)].from_dense(layer)
            except ValueError as error:  # arguments the sparse kernel does not take (padding mode, ...)
                decision.reason = str(error)
            else:
                t = interleaved_medians(
                    {"dense": lambda layer=layer, x=x: layer(x), "sparse": lambda sparse=sparse, x=x: sparse(x)},
                    rounds,
                )
                decision.dense_seconds, decision.sparse_seconds = t["dense"], t["sparse"]
                decision.replaced = t["dense"] >= min_speedup * t["sparse"]
                if decision.replaced:
                    replacements[name] = sparse
                else:
                    decision.reason = f"not {min_speedup:g}x faster than dense on this input"
            if report is not None:
                report.append(decision)
    for name, sparse in replacements.items():
        for alias in names[id(layers[name])]:
            parent_name, _, child = alias.rpartition(".")
            setattr(model.get_submodule(parent_name), child, sparse)
    return model


def interleaved_medians(calls: dict[str, Callable], rounds: int) -> dict[str, float]:
    """Median seconds per call of each of `calls`, taking turns call by call after a warm-up
    (device time on CUDA through a synchronize per call: these are single layers, not the GPU
    timing method)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(3):
        for fn in calls.values():
            fn()
    for _ in range(rounds):
        for name, fn in calls.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}
