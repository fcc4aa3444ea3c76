"""The sparsity report: weights, nonzeros, sparsity and compression per layer of any model (DWF,
ordinary, or sparsify's sparse modules), with the file size and per-layer latency when asked."""

from __future__ import annotations

import io
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from ._validate import check_flag
from .compressed import compressed_bytes
from .coverage import effective_weight, weight_kind
from .model import collapse
from .nn import (
    DEFAULT_THRESHOLD,
    FACTORIZABLE,
    DWFLayer,
    DWFWeight,
    FactorsParametrizationList,
    check_threshold,
    dwf_parametrization,
)
from .ops import dwf_product
from .sparse import SPARSE_CLASS_FOR, sparsify

SPARSE_MODULES = tuple(SPARSE_CLASS_FOR.values())


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
        kinds = max(10, *(len(r.kind) for r in rows))
        lines = [
            f"{'layer':<{width}}  {'type':<{kinds}} {'weights':>10} {'nonzeros':>10} {'sparsity':>9} "
            f"{'compression':>12}"
        ]
        timed = any(r.dense_seconds is not None for r in self.layers)
        if timed:
            lines[0] += f" {'dense us':>9} {'sparse us':>9}"
        for r in rows:
            line = (
                f"{r.name:<{width}}  {r.kind:<{kinds}} {r.weights:>10} {r.nonzeros:>10} {100 * r.sparsity:>8.2f}% "
                f"{r.compression:>11.1f}x"
            )
            if timed and r.dense_seconds is not None:
                line += f" {1e6 * r.dense_seconds:>9.1f} {1e6 * r.sparse_seconds:>9.1f}"
            lines.append(line)
        text = "\n".join(lines) + f"\n(|w| < {self.threshold:g} counts as zero)"
        if any(r.kind.endswith("*") for r in self.layers):
            text += "\n* weight-standardizing conv: the effective (standardized) weight it convolves with is counted"
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
            weights = [(name, id(module.factors), None)]
        elif isinstance(module, SPARSE_MODULES):  # sparsify's: counted by their dense weight
            weights = [(name, id(module.values), ("values", module.weight()))]
        elif isinstance(module, FactorsParametrizationList | DWFWeight):
            continue
        else:
            weights = [
                (name if pname == "weight" else f"{name}.{pname}" if name else pname, key, (pname, w))
                for pname, key, w in _reported_weights(module)
            ]
        for row_name, key, found in weights:
            if key in seen:
                continue
            seen.add(key)
            kind = type(module).__name__
            if found is None:
                w = dwf_product(module.factors)
            else:
                pname, w = found
                kind = parametrize.type_before_parametrizations(module).__name__
                effective = effective_weight(module) if pname == "weight" else None
                if effective is not None:  # weight-standardizing: the zeros that count are the effective weight's
                    w, kind = effective, kind + "*"
            # NaN and Inf are not zeros: only |w| < threshold is (NaN compares false).
            zeros = int((w.abs() < threshold).sum())
            nonfinite = w.numel() - int(torch.isfinite(w).sum())
            rows.append(LayerSparsity(row_name or "(model)", kind, w.numel(), w.numel() - zeros, nonfinite))
    return rows


def _reported_weights(module: nn.Module) -> list[tuple[str, int, torch.Tensor]]:
    """The weights of `module` itself that sparsity_report counts, (name, identity, weight): those of
    kind matrix, embedding or standardized (dwf_kernels.coverage), DWF-parametrized or not; the identity
    of a DWF-parametrized one is its factors'."""
    found = []
    if parametrize.is_parametrized(module):
        for pname, plist in module.parametrizations.items():
            if dwf_parametrization(module, pname) is not None:
                found.append((pname, id(plist.original), dwf_product(plist.original)))
    for pname, w in module._parameters.items():
        if w is not None and w.dim() >= 2 and weight_kind(module, pname, w) != "other":
            found.append((pname, id(w), w))
    return found
