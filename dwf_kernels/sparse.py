"""Sparse inference: a collapsed model's Linear layers computing with their nonzeros only.

    fast = dwf_kernels.sparsify(collapse(model), example_input)   # measured, layer by layer

`SparseLinear` holds its weight in CSR (one row per output feature) and computes
y = x W^T + b on the CPU with dwf_kernels._C's `sparse_linear` kernel (eight input rows per pass
over a CSR row, the batch split between threads), elsewhere with torch.sparse's CSR matmul.
`sparsify` replaces a Linear only where the sparse module is measured faster than the dense one
on the layer's own input (from `example_input`), so a model never gets slower by it; convolutions
stay dense. Inference only: the sparse modules hold buffers, not parameters, and refuse inputs
that require grad.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from . import _extension

# The op's overload itself: calling it skips the overload resolution of torch.ops.<ns>.<op>(...),
# a few microseconds that count at batch 1. None without the extension's CPU kernels.
_SPARSE_LINEAR = None
if "cpu" in _extension.KERNEL_DEVICES:
    _SPARSE_LINEAR = torch.ops.dwf_kernels.sparse_linear.default

    @torch.library.register_fake("dwf_kernels::sparse_linear")
    def _sparse_linear_fake(input, row_ptr, col, values, bias):
        return input.new_empty(input.shape[0], row_ptr.shape[0] - 1)


class SparseLinear(nn.Module):
    """A Linear for inference whose weight is stored and used as its nonzeros (CSR)."""

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
        weight = linear.weight.detach()
        out_features, in_features = weight.shape
        csr = weight.to_sparse_csr()
        index = torch.int32 if in_features < 2**31 else torch.int64
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(
            in_features,
            out_features,
            csr.crow_indices().to(torch.int64),
            csr.col_indices().to(index),
            csr.values().clone(),
            bias,
        )

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
        values = self.values
        if x.requires_grad and torch.is_grad_enabled():
            raise RuntimeError("SparseLinear is for inference: run it under torch.no_grad() or on inputs without grad")
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"input's last dimension must be in_features={self.in_features}; got shape {tuple(x.shape)}"
            )
        if x.dtype != values.dtype or x.device != values.device:
            raise ValueError(
                f"input must be {values.dtype} on {values.device} like the layer; got {x.dtype} on {x.device}"
            )
        rows = x if x.dim() == 2 and x.is_contiguous() else x.reshape(-1, self.in_features).contiguous()
        if _SPARSE_LINEAR is not None and rows.device.type == "cpu":
            y = _SPARSE_LINEAR(rows, self.row_ptr, self.col, values, self.bias)
            return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)
        y = (self._csr() @ rows.t()).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def _csr(self) -> torch.Tensor:
        shape = (self.out_features, self.in_features)
        return torch.sparse_csr_tensor(self.row_ptr, self.col.to(torch.int64), self.values, shape)

    def extra_repr(self) -> str:
        total = self.in_features * self.out_features
        return f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.nnz} of {total}"


@dataclass
class SparsifyDecision:
    """What `sparsify` measured for one Linear layer (seconds per call, median)."""

    name: str
    nnz: int
    numel: int
    dense_seconds: float
    sparse_seconds: float
    replaced: bool

    @property
    def speedup(self) -> float:
        return self.dense_seconds / self.sparse_seconds


def sparsify(
    model: nn.Module,
    example_input,
    *,
    min_speedup: float = 1.1,
    rounds: int = 30,
    report: list[SparsifyDecision] | None = None,
) -> nn.Module:
    """Replace, in place, each nn.Linear of `model` by a `SparseLinear` where that is measured at
    least `min_speedup` times faster on the layer's input when `model(example_input)` runs.

    example_input: what the model is called with (a tensor, or a tuple of positional arguments),
        at the batch size to optimize for: the break-even sparsity depends on it.
    report: a list that receives one SparsifyDecision per Linear layer.
    Returns the model. Run under torch.no_grad() (inference only).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
    if isinstance(min_speedup, bool) or not isinstance(min_speedup, (int, float)) or min_speedup <= 0:
        raise ValueError(f"min_speedup must be a positive number; got {min_speedup!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a positive int; got {rounds!r}")
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    inputs: dict[str, torch.Tensor] = {}
    linears = {name: m for name, m in model.named_modules() if type(m) is nn.Linear}
    hooks = [
        m.register_forward_pre_hook(lambda _m, a, name=name: inputs.setdefault(name, a[0].detach()))
        for name, m in linears.items()
    ]
    try:
        with torch.no_grad():
            model(*args)
    finally:
        for hook in hooks:
            hook.remove()
    replacements = {}
    with torch.no_grad():
        for name, linear in linears.items():
            if name not in inputs:
                continue  # not run by this input
            x = inputs[name]
            sparse = SparseLinear.from_dense(linear)
            t = interleaved_medians(
                {"dense": lambda linear=linear, x=x: linear(x), "sparse": lambda sparse=sparse, x=x: sparse(x)}, rounds
            )
            dense_s, sparse_s = t["dense"], t["sparse"]
            decision = SparsifyDecision(name, sparse.nnz, linear.weight.numel(), dense_s, sparse_s, False)
            decision.replaced = dense_s >= min_speedup * sparse_s
            if decision.replaced:
                replacements[name] = sparse
            if report is not None:
                report.append(decision)
    for name, sparse in replacements.items():
        parent_name, _, child = name.rpartition(".")
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
