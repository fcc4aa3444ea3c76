"""Which weights of a model `factorize` converts by default, and what it reports about each.

Every parameter of two or more dimensions is a candidate, of one kind:

- "matrix": the weight of a Linear-like or Conv-like module (a module's parameter `weight` of 2+
  dimensions: torch.nn's Linear/Conv layers and their subclasses, Hugging Face's Conv1D, ...) and
  MultiheadAttention's projection weights. Factorized by default.
- "embedding": the weight of an Embedding or EmbeddingBag. Opt-in: a lookup table is not a matrix
  product of the input, so the penalty's pressure applies only to the rows a batch reads, and a
  language model's embedding is often its largest weight, which pruning hurts most.
- "standardized": the weight of a weight-standardizing convolution (timm's StdConv2d,
  ScaledStdConv2d): its forward convolves with the standardized weight, in which the zeros of the
  raw weight are nonzeros, so factorizing the raw weight gives no sparsity. Opt-in; when included,
  `sparsity_report` counts the effective (standardized) weight.
- "other": any other parameter (RNN weights, position embeddings, ...): only when included.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode

from .nn import dwf_parametrization

EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)
ATTENTION_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
_CONVOLUTIONS = {f"conv{n}d" for n in (1, 2, 3)} | {f"conv_transpose{n}d" for n in (1, 2, 3)} | {"convolution"}

NOTES = {
    "embedding": "embedding: opt-in (include= nn.Embedding, or its name)",
    "standardized": (
        "weight-standardizing conv: it convolves with the standardized weight, where the raw weight's zeros "
        "are not zeros; opt-in (include= its type or name; sparsity_report then counts the effective weight)"
    ),
    "other": "not the weight of a Linear-, Conv- or attention module: include= its name to factorize it",
}


def weight_kind(module: nn.Module, name: str, weight: torch.Tensor) -> str:
    """The kind of `module.<name>` (see the module docstring): matrix, embedding, standardized or other."""
    if isinstance(module, EMBEDDINGS):
        return "embedding" if name == "weight" else "other"
    if isinstance(module, nn.MultiheadAttention) and name in ATTENTION_WEIGHTS:
        return "matrix"
    if name == "weight" and weight.dim() >= 2:
        return "standardized" if effective_weight(module) is not None else "matrix"
    return "other"


class _ConvolutionWeight(TorchFunctionMode):
    """Catches the weight of the first convolution a forward runs."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.weight is None and getattr(func, "__name__", "") in _CONVOLUTIONS:
            self.weight = args[1] if len(args) > 1 else kwargs.get("weight")
        return func(*args, **kwargs)


@torch.no_grad()
def effective_weight(module: nn.Module) -> torch.Tensor | None:
    """The weight a Conv subclass convolves with, when that is not its `weight` (a weight-standardizing
    conv), else None. Found by running its forward once on a small zero input and catching the
    convolution's weight; exact torch.nn convs, modules that are no convs and forwards that fail on
    that input give None."""
    if not isinstance(module, nn.modules.conv._ConvNd):
        return None
    cls = parametrize.type_before_parametrizations(module)
    if cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
        return None
    holder = dwf_parametrization(module, "weight")
    record = None if holder is None else holder.__dict__.get("_last_sumsq")  # the probe is no forward of the model
    kernel = [(k - 1) * d + 1 for k, d in zip(module.kernel_size, module.dilation, strict=True)]
    spatial = [max(k, s) for k, s in zip(kernel, module.stride, strict=True)]
    catch = _ConvolutionWeight()
    try:
        with parametrize.cached():
            weight = module.weight
            probe = torch.zeros(1, module.in_channels, *spatial, device=weight.device, dtype=weight.dtype)
            with catch:
                module(probe)
    except Exception:  # a forward that needs other inputs: its weight is taken as it is
        return None
    finally:
        if holder is not None:
            holder.__dict__["_last_sumsq"] = record
    found = catch.weight
    if found is None or found is weight or not isinstance(found, torch.Tensor) or found.shape != weight.shape:
        return None
    return found


@dataclass
class WeightCoverage:
    """What `factorize(..., report=...)` did with one weight of the model."""

    name: str  # the parameter's name in the model, e.g. "layers.0.self_attn.in_proj_weight"
    module: str  # the class of the module holding it
    shape: tuple[int, ...]
    kind: str  # matrix, embedding, standardized or other (dwf_kernels.coverage)
    converted: bool
    how: str = ""  # DWFLinear / DWFConv1d/2d/3d (the layer replaces the module) or DWFWeight (a parametrization)
    note: str = ""  # why it was left dense, or what else holds (tied, effective weight)
    tied_to: str = ""  # the name this parameter has first in the model, when it is shared (tied weights)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def __str__(self) -> str:
        what = f"factorized ({self.how})" if self.converted else "dense"
        return f"{self.name} [{self.module} {tuple(self.shape)}]: {what}" + (f"; {self.note}" if self.note else "")


def coverage_summary(report: list[WeightCoverage]) -> str:
    """A table of `factorize`'s report: factorized and dense elements per kind (a tied weight once)."""
    lines = [f"{'kind':<13} {'factorized':>14} {'dense':>14} {'factorized %':>13}"]
    for kind in ("matrix", "embedding", "standardized", "other"):
        rows = [r for r in report if r.kind == kind and not r.tied_to]
        if not rows:
            continue
        done = sum(r.numel for r in rows if r.converted)
        dense = sum(r.numel for r in rows if not r.converted)
        lines.append(f"{kind:<13} {done:>14,} {dense:>14,} {100 * done / max(done + dense, 1):>12.1f}%")
    return "\n".join(lines)
