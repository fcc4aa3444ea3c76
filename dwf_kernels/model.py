"""Whole-model DWF: factorize a model in place, its penalty, collapse it back, report sparsity."""

from __future__ import annotations

import copy
import fnmatch
import io
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from . import init as dwf_init
from ._validate import check_flag
from .compressed import compressed_bytes
from .nn import DEFAULT_THRESHOLD, FACTORIZABLE, DWFLayer, check_depth, check_init, check_threshold, converter_for
from .ops import dwf_product
from .sparse import SPARSE_CLASS_FOR, sparsify

SPARSE_MODULES = tuple(SPARSE_CLASS_FOR.values())


def _matches(name: str, module: nn.Module, selectors: Iterable[str | type]) -> bool:
    return any(
        (isinstance(s, type) and isinstance(module, s)) or (isinstance(s, str) and fnmatch.fnmatchcase(name, s))
        for s in selectors
    )


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
    Biases are kept (the same parameters).

    Sharing is kept: a layer reachable under several names becomes one DWF layer in all those
    places (a layer matches include/exclude under any of its names; exclude wins), and layers
    that share one weight parameter (tied weights) get one shared factor parameter. A weight
    shared with a module that is not converted is refused, as the tie could not be kept.
    A model that already holds DWF layers of another depth is refused: collapse it first.
    """
    check_depth(depth)
    check_init(init)
    if isinstance(model, DWFLayer) or isinstance(model, FACTORIZABLE):
        raise TypeError("factorize converts the layers inside a model; wrap a single layer in nn.Sequential")
    names: dict[int, list[str]] = {}  # every name of every module, shared ones included
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
        if isinstance(module, DWFLayer) and module.depth != depth:
            raise ValueError(
                f"model already holds DWF layers of depth {module.depth} ({name!r}); factorize(model, "
                f"depth={depth}) would leave them at depth {module.depth}. To change the depth, factorize "
                f"dwf_kernels.collapse(model) with init='dense' (or start again from the dense model)"
            )
    targets = [
        module
        for module in model.modules()
        if converter_for(module) is not None
        and (include is None or any(_matches(n, module, include) for n in names[id(module)]))
        and not any(_matches(n, module, exclude) for n in names[id(module)])
    ]
    tied = _tied_groups(model, targets, names)
    twins: dict[int, DWFLayer] = {}  # id(dense) -> its DWF layer
    shared_factors: dict[int, nn.Parameter] = {}  # id(dense weight) -> the factors made for it
    for dense in targets:
        factors = shared_factors.get(id(dense.weight))
        dwf = converter_for(dense).from_dense(dense, depth, init, eps=eps, upper=upper, factors=factors)
        if id(dense.weight) in tied:
            shared_factors[id(dense.weight)] = dwf.factors
        twins[id(dense)] = dwf
    _replace_children(model, twins)
    return model


def _tied_groups(model: nn.Module, targets: list[nn.Module], names: dict[int, list[str]]) -> set[int]:
    """The ids of target weights that several modules share, after checking that every module
    sharing a target's weight is converted too (otherwise the tie could not be kept)."""
    converted = {id(m) for m in targets}
    owners: dict[int, list[nn.Module]] = {}  # id(parameter) -> modules holding it directly
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), []).append(module)
    tied = set()
    for dense in targets:
        holders = owners.get(id(dense.weight), [])
        for other in holders:
            if id(other) not in converted:
                raise ValueError(
                    f"the weight of {names[id(dense)][0]!r} is also a parameter of {names[id(other)][0]!r} "
                    f"({type(other).__name__}), which factorize does not convert, so the tie cannot be kept: "
                    f"exclude {names[id(dense)][0]!r}, or convert both"
                )
        if len(holders) > 1:
            tied.add(id(dense.weight))
    return tied


def _replace_children(model: nn.Module, replacement: dict[int, nn.Module]) -> None:
    """Puts replacement[id(m)] in every place where module m is a child (shared modules included)."""
    for parent in list(model.modules()):
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in replacement:
                setattr(parent, child_name, replacement[id(child)])


def dwf_layers(model: nn.Module) -> list[tuple[str, DWFLayer]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, DWFLayer)]


def penalty(model: nn.Module, lam: float) -> torch.Tensor:
    """(lam / D) * sum of squared factors over the model's DWF layers, differentiable.

    Taken from each layer's last forward (the fused op computed it in the same pass as the
    weight), so call it after the forward whose loss it joins. The sum is computed here instead
    (one more pass over the factors) for a layer that has not run a forward yet, whose last
    forward's graph a backward pass has already used, or whose last forward ran without grad
    while grad is needed now (torch.utils.checkpoint with use_reentrant=True). Factors shared by
    several layers count once. Equivalent objective: weight_decay = 2 * lam / D on the factors
    (and none elsewhere) with a mean loss.
    """
    by_depth: dict[int, list[torch.Tensor]] = {}  # one multiply per depth, not per layer
    seen: set[int] = set()  # factors shared by several layers (tied weights) are penalized once
    for module in model.modules():
        if isinstance(module, DWFLayer) and id(module.factors) not in seen:
            seen.add(id(module.factors))
            sumsq = module.last_sumsq
            if sumsq is None or (not sumsq.requires_grad and module.factors.requires_grad and torch.is_grad_enabled()):
                # No forward yet, a backward has used the last one, or it ran without grad (the
                # first pass of torch.utils.checkpoint with use_reentrant=True): a fresh sum, so
                # that the penalty has its value and its gradient.
                sumsq = dwf_product(module.factors, return_sumsq=True)[1]
            by_depth.setdefault(module.depth, []).append(sumsq)
    if not by_depth:
        return torch.zeros(())
    terms = [
        (lam / depth) * (sums[0] if len(sums) == 1 else torch.stack(sums).sum()) for depth, sums in by_depth.items()
    ]
    return terms[0] if len(terms) == 1 else torch.stack(terms).sum()


def collapse(model: nn.Module, threshold: float = DEFAULT_THRESHOLD) -> nn.Module:
    """A new ordinary torch.nn model: each DWF layer becomes its torch.nn layer holding the product,
    with weights of magnitude below `threshold` set to exactly 0. `model` is left untouched."""
    if isinstance(model, DWFLayer):
        raise TypeError("collapse takes a model containing DWF layers; wrap a single layer in nn.Sequential")
    check_threshold(threshold)
    collapsed = copy.deepcopy(model)  # keeps shared layers and parameters shared
    twins: dict[int, nn.Module] = {}
    weights: dict[int, nn.Parameter] = {}  # id(factors) -> collapsed weight (tied layers share it)
    for _, layer in dwf_layers(collapsed):
        dense = layer.to_dense(threshold, weight=weights.get(id(layer.factors)))
        weights[id(layer.factors)] = dense.weight
        twins[id(layer)] = dense
    _replace_children(collapsed, twins)
    return collapsed


@dataclass
class LayerSparsity:
    name: str
    kind: str
    weights: int
    nonzeros: int  # |w| >= threshold, NaN and Inf included
    nonfinite: int = 0  # NaN or Inf: a diverged model
    # With sparsity_report(latency_input=...), the layers sparsify times (Linear, Conv1d, Conv2d):
    # median seconds per call of the collapsed layer dense and as its sparse module, on its own input.
    dense_seconds: float | None = None
    sparse_seconds: float | None = None

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
    # With sparsity_report(file_size=True): bytes of the collapsed model's compressed file
    # (save_compressed) and of torch.save of its state_dict.
    file_bytes: int | None = None
    torch_save_bytes: int | None = None

    @property
    def total(self) -> LayerSparsity:
        return LayerSparsity(
            "total",
            "",
            sum(r.weights for r in self.layers),
            sum(r.nonzeros for r in self.layers),
            sum(r.nonfinite for r in self.layers),
        )

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
                    nonfinite=r.nonfinite,
                    sparsity=r.sparsity,
                    compression=r.compression,
                    dense_seconds=r.dense_seconds,
                    sparse_seconds=r.sparse_seconds,
                )
                for r in rows
            ],
            "file_bytes": self.file_bytes,
            "torch_save_bytes": self.torch_save_bytes,
        }

    def __str__(self) -> str:
        rows = [*self.layers, self.total]
        width = max(len(r.name) for r in rows)
        lines = [
            f"{'layer':<{width}}  {'type':<10} {'weights':>10} {'nonzeros':>10} {'sparsity':>9} {'compression':>12}"
        ]
        timed = any(r.dense_seconds is not None for r in self.layers)
        if timed:
            lines[0] += f" {'dense us':>9} {'sparse us':>9}"
        for r in rows:
            line = (
                f"{r.name:<{width}}  {r.kind:<10} {r.weights:>10} {r.nonzeros:>10} {100 * r.sparsity:>8.2f}% "
                f"{r.compression:>11.1f}x"
            )
            if timed and r.dense_seconds is not None:
                line += f" {1e6 * r.dense_seconds:>9.1f} {1e6 * r.sparse_seconds:>9.1f}"
            lines.append(line)
        text = "\n".join(lines) + f"\n(|w| < {self.threshold:g} counts as zero)"
        if self.file_bytes is not None:
            text += (
                f"\ncompressed file: {self.file_bytes:,} bytes; torch.save of the collapsed state_dict: "
                f"{self.torch_save_bytes:,} bytes ({self.torch_save_bytes / self.file_bytes:.1f}x larger)"
            )
        nonfinite = self.total.nonfinite
        if nonfinite:
            text += f"\n{nonfinite} weights are NaN or Inf (counted as nonzeros): the model has diverged"
        return text


@torch.no_grad()
def sparsity_report(
    model: nn.Module,
    threshold: float = DEFAULT_THRESHOLD,
    *,
    file_size: bool = False,
    latency_input=None,
) -> SparsityReport:
    """Weights, nonzeros (|w| >= threshold), sparsity and compression ratio per Linear/Conv layer
    (DWF, ordinary, or sparsify's sparse modules) and in total. NaN and Inf weights count as
    nonzeros, never as zeros, and are counted in `nonfinite` (a diverged model). A weight shared by
    several layers counts once.

    file_size: also the size of the model collapsed at `threshold` as a compressed file
        (`save_compressed`) and as torch.save of its state_dict (file_bytes, torch_save_bytes).
    latency_input: what the model is called with (a tensor or a tuple of arguments); also measures
        each Linear, Conv1d and Conv2d of the collapsed model dense and as its sparse module
        (SparseLinear, SparseConv1d, SparseConv2d) on its own input (interleaved, median), as
        `sparsify` decides (dense_seconds, sparse_seconds).
    """
    check_threshold(threshold)
    check_flag("file_size", file_size)
    report = SparsityReport(_sparsity_rows(model, threshold), threshold)
    if file_size or latency_input is not None:
        plain = _thresholded(collapse(model, threshold), threshold)
        if file_size:
            buffer = io.BytesIO()
            torch.save(plain.state_dict(), buffer)
            report.file_bytes = len(compressed_bytes(plain))
            report.torch_save_bytes = buffer.tell()
        if latency_input is not None:
            decisions = []
            sparsify(plain, latency_input, report=decisions)
            by_name = {d.name: d for d in decisions}
            for row in report.layers:
                if row.name in by_name:
                    row.dense_seconds = by_name[row.name].dense_seconds
                    row.sparse_seconds = by_name[row.name].sparse_seconds
    return report


def _thresholded(model: nn.Module, threshold: float) -> nn.Module:
    """The plain Linear/Conv weights of `model` (a collapsed copy) with |w| < threshold set to 0."""
    for module in model.modules():
        if isinstance(module, FACTORIZABLE):
            module.weight.masked_fill_(module.weight.abs() < threshold, 0.0)
    return model


def _sparsity_rows(model: nn.Module, threshold: float) -> list[LayerSparsity]:
    rows = []
    seen: set[int] = set()  # a weight shared by several layers (tied) is stored, and counted, once
    for name, module in model.named_modules():
        if isinstance(module, DWFLayer):
            key, w = id(module.factors), None
        elif isinstance(module, FACTORIZABLE):
            key, w = id(module.weight), module.weight
        elif isinstance(module, SPARSE_MODULES):  # sparsify's: counted by their dense weight
            key, w = id(module.values), module.weight()
        else:
            continue
        if key in seen:
            continue
        seen.add(key)
        if w is None:
            w = dwf_product(module.factors)
        # NaN and Inf are not zeros: only |w| < threshold is (NaN compares false).
        zeros = int((w.abs() < threshold).sum())
        nonfinite = w.numel() - int(torch.isfinite(w).sum())
        rows.append(LayerSparsity(name or "(model)", type(module).__name__, w.numel(), w.numel() - zeros, nonfinite))
    return rows
