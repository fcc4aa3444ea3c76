"""Whole-model DWF: factorize a model in place, its penalty, collapse it back, report sparsity."""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from . import init as dwf_init
from .nn import DENSE_CLASS_FOR, DWF_CLASS_FOR, DWFLayer
from .ops import dwf_product

DEFAULT_THRESHOLD = 1.19e-7  # float32 machine epsilon: |w| below it counts as exactly zero
FACTORIZABLE = tuple(DWF_CLASS_FOR)


def _matches(name: str, module: nn.Module, selectors: Iterable[str | type]) -> bool:
    return any(
        (isinstance(s, type) and isinstance(module, s)) or (isinstance(s, str) and fnmatch.fnmatchcase(name, s))
        for s in selectors
    )


def _dense_to_factors(weight: torch.Tensor, depth: int) -> torch.Tensor:
    """Balanced exact factors of `weight`: |f_d| = |w|^(1/D) for all d, the sign on the first."""
    w = weight.detach().to(torch.float64)
    root = w.abs().pow(1.0 / depth)
    factors = root.unsqueeze(0).repeat(depth, *([1] * w.dim()))
    factors[0] = torch.where(w < 0, -root, root)
    return factors.to(weight.dtype)


def factorize(
    model: nn.Module,
    depth: int,
    init: str = "dwf",
    include: Iterable[str | type] | None = None,
    exclude: Iterable[str | type] = (),
    eps: float = dwf_init.DEFAULT_EPS,
    upper: float = dwf_init.DEFAULT_UPPER,
) -> nn.Module:
    """Replaces the Linear/Conv1d/2d/3d layers of `model` by DWF layers, in place; returns `model`.

    init="dwf": the paper's DWF initialization (product std = torch.nn's default init std).
    init="dense": exact balanced factors of the existing weights (|f_d| = |w|^(1/D), the sign on
    the first factor), so the model's outputs do not change and a pretrained model can be
    sparsified from where it is. Exactly-zero weights get all-zero factors and stay zero.
    include / exclude: module names (fnmatch patterns, e.g. "classifier.*") or layer types; a
    layer is converted when it matches include (default: every factorizable layer) and not exclude.
    Biases are copied unchanged.
    """
    if init not in ("dwf", "dense"):
        raise ValueError(f"init must be 'dwf' or 'dense'; got {init!r}")
    if isinstance(model, DWFLayer) or isinstance(model, FACTORIZABLE):
        raise TypeError("factorize converts the layers inside a model; wrap a single layer in nn.Sequential")
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) in DWF_CLASS_FOR
        and (include is None or _matches(name, module, include))
        and not _matches(name, module, exclude)
    ]
    for name, dense in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        dwf = _dwf_twin(dense, depth)
        with torch.no_grad():
            if init == "dense":
                dwf.factors.copy_(_dense_to_factors(dense.weight, depth))
            else:
                dwf_init.dwf_init_(dwf.factors, dwf_init.default_target_std(dense.weight.shape), eps=eps, upper=upper)
            if dense.bias is not None:
                dwf.bias.copy_(dense.bias)
        dwf.train(dense.training)
        setattr(parent, child, dwf)
    return model


def _dwf_twin(dense: nn.Module, depth: int) -> DWFLayer:
    kwargs = dict(bias=dense.bias is not None, device=dense.weight.device, dtype=dense.weight.dtype, depth=depth)
    if isinstance(dense, nn.Linear):
        return DWF_CLASS_FOR[nn.Linear](dense.in_features, dense.out_features, **kwargs)
    return DWF_CLASS_FOR[type(dense)](
        dense.in_channels,
        dense.out_channels,
        dense.kernel_size,
        dense.stride,
        dense.padding,
        dense.dilation,
        dense.groups,
        padding_mode=dense.padding_mode,
        **kwargs,
    )


def dwf_layers(model: nn.Module) -> list[tuple[str, DWFLayer]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, DWFLayer)]


def penalty(model: nn.Module, lam: float) -> torch.Tensor:
    """(lam / D) * sum of squared factors over the model's DWF layers, differentiable.

    Taken from each layer's last forward (the fused op computed it in the same pass as the
    weight), so call it after the forward whose loss it joins. A layer that has not run a forward
    yet has its sum computed here. Equivalent objective: weight_decay = 2 * lam / D on the factors
    (and none elsewhere) with a mean loss.
    """
    by_depth: dict[int, list[torch.Tensor]] = {}  # one multiply per depth, not per layer
    for module in model.modules():
        if isinstance(module, DWFLayer):
            sumsq = module.last_sumsq
            if sumsq is None:
                sumsq = dwf_product(module.factors, return_sumsq=True)[1]
            by_depth.setdefault(module.depth, []).append(sumsq)
    if not by_depth:
        return torch.zeros(())
    terms = [
        (lam / depth) * (sums[0] if len(sums) == 1 else torch.stack(sums).sum()) for depth, sums in by_depth.items()
    ]
    return terms[0] if len(terms) == 1 else torch.stack(terms).sum()


@torch.no_grad()
def _collapsed_weight(layer: DWFLayer, threshold: float) -> torch.Tensor:
    w = dwf_product(layer.factors)
    return torch.where(w.abs() < threshold, torch.zeros_like(w), w)


def collapse(model: nn.Module, threshold: float = DEFAULT_THRESHOLD) -> nn.Module:
    """A new ordinary torch.nn model: each DWF layer becomes its torch.nn layer holding the product,
    with weights of magnitude below `threshold` set to exactly 0. `model` is left untouched."""
    if isinstance(model, DWFLayer):
        raise TypeError("collapse takes a model containing DWF layers; wrap a single layer in nn.Sequential")
    collapsed = copy.deepcopy(model)
    for name, layer in dwf_layers(collapsed):
        parent_name, _, child = name.rpartition(".")
        dense = _dense_twin(layer)
        with torch.no_grad():
            dense.weight.copy_(_collapsed_weight(layer, threshold))
            if layer.bias is not None:
                dense.bias.copy_(layer.bias)
        dense.train(layer.training)
        setattr(collapsed.get_submodule(parent_name), child, dense)
    return collapsed


def _dense_twin(layer: DWFLayer) -> nn.Module:
    cls = DENSE_CLASS_FOR[type(layer)]
    kwargs = dict(bias=layer.bias is not None, device=layer.factors.device, dtype=layer.factors.dtype)
    if cls is nn.Linear:
        return nn.Linear(layer.in_features, layer.out_features, **kwargs)
    return cls(
        layer.in_channels,
        layer.out_channels,
        layer.kernel_size,
        layer.stride,
        layer.padding,
        layer.dilation,
        layer.groups,
        padding_mode=layer.padding_mode,
        **kwargs,
    )


@dataclass
class LayerSparsity:
    name: str
    kind: str
    weights: int
    nonzeros: int

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzeros / self.weights if self.weights else 0.0

    @property
    def compression(self) -> float:
        return self.weights / self.nonzeros if self.nonzeros else float("inf")


@dataclass
class SparsityReport:
    """Per-layer and total weight counts; `str(report)` is a table."""

    layers: list[LayerSparsity]
    threshold: float

    @property
    def total(self) -> LayerSparsity:
        return LayerSparsity("total", "", sum(r.weights for r in self.layers), sum(r.nonzeros for r in self.layers))

    def as_dict(self) -> dict:
        rows = [*self.layers, self.total]
        return {
            "threshold": self.threshold,
            "layers": [
                dict(
                    name=r.name,
                    kind=r.kind,
                    weights=r.weights,
                    nonzeros=r.nonzeros,
                    sparsity=r.sparsity,
                    compression=r.compression,
                )
                for r in rows
            ],
        }

    def __str__(self) -> str:
        rows = [*self.layers, self.total]
        width = max(len(r.name) for r in rows)
        lines = [
            f"{'layer':<{width}}  {'type':<10} {'weights':>10} {'nonzeros':>10} {'sparsity':>9} {'compression':>12}"
        ]
        for r in rows:
            lines.append(
                f"{r.name:<{width}}  {r.kind:<10} {r.weights:>10} {r.nonzeros:>10} {100 * r.sparsity:>8.2f}% "
                f"{r.compression:>11.1f}x"
            )
        return "\n".join(lines) + f"\n(|w| < {self.threshold:g} counts as zero)"


@torch.no_grad()
def sparsity_report(model: nn.Module, threshold: float = DEFAULT_THRESHOLD) -> SparsityReport:
    """Weights, nonzeros (|w| >= threshold), sparsity and compression ratio per Linear/Conv layer
    (DWF or ordinary) and in total."""
    rows = []
    for name, module in model.named_modules():
        if isinstance(module, DWFLayer):
            w = dwf_product(module.factors)
        elif isinstance(module, FACTORIZABLE):
            w = module.weight
        else:
            continue
        rows.append(
            LayerSparsity(name or "(model)", type(module).__name__, w.numel(), int((w.abs() >= threshold).sum()))
        )
    return SparsityReport(rows, threshold)
