"""Whole-model DWF: factorize a model in place, its penalty, collapse it back (the sparsity report:
report.py)."""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from . import init as dwf_init
from .coverage import NOTES, WeightCoverage, weight_kind
from .nn import (
    DEFAULT_THRESHOLD,
    FACTORIZABLE,
    DWFLayer,
    DWFWeight,
    FactorHolder,
    FactorsParametrizationList,
    check_depth,
    check_init,
    check_threshold,
    converter_for,
    dwf_parametrization,
)


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
    *,
    report: list[WeightCoverage] | None = None,
) -> nn.Module:
    """Holds the weights of `model` as `depth` factors each, in place; returns `model`.

    Exact torch.nn Linear/Conv1d/2d/3d layers are replaced by DWF layers; every other weight gets
    a DWFWeight parametrization (its module keeps its class and forward, which runs on the
    product): Linear/Conv subclasses, MultiheadAttention's projections, Hugging Face's Conv1D,
    embeddings, any named parameter. Both compute the weight with the same fused op.

    Default: every "matrix" weight (dwf_kernels.coverage): the weight of every Linear-like and
    Conv-like module and attention's projections. Embeddings and weight-standardizing convs are
    opt-in (the coverage module says why).
    init="dwf": the paper's DWF initialization (product std = torch.nn's default init std for
    Linear/Conv weights, the weight's own std for others). init="dense": exact balanced factors of
    the existing weights (|f_d| = |w|^(1/D), the sign on the first factor), so the model's outputs do
    not change and a pretrained model can be sparsified from where it is. Exactly-zero weights get
    all-zero factors and stay zero.
    include / exclude: module names or parameter names (fnmatch patterns, e.g. "classifier.*",
    "*.in_proj_weight") or module types. With include, a weight of 2+ dimensions is converted when
    its module matches (embeddings and weight-standardizing convs included: include=["*"] converts
    every one) or its own name does; a parameter of fewer dimensions (a bias) when include names it
    exactly ("head.bias"); exclude wins.
    report: a list that receives one WeightCoverage per weight of 2+ dimensions (and per included
    parameter): converted or left dense, how, and why (dwf_kernels.coverage.coverage_summary
    tabulates it).
    Biases are kept (the same parameters).

    Sharing is kept: a module reachable under several names is converted once (it matches
    include/exclude under any of its names; exclude wins), and weights shared by several modules
    (tied weights) get one shared factor parameter. A tie with an embedding follows the embedding:
    both are factorized when the embedding is (GPT-2's lm_head and wte), else both stay dense.
    Any other tie of a converted weight with one that is not converted is refused.
    A model that already holds DWF factors of another depth is refused: collapse it first.
    """
    check_depth(depth)
    check_init(init)
    if isinstance(model, DWFLayer) or isinstance(model, FACTORIZABLE):
        raise TypeError("factorize converts the layers inside a model; wrap a single layer in nn.Sequential")
    include = None if include is None else list(include)
    exclude = list(exclude)
    names: dict[int, list[str]] = {}  # every name of every module, shared ones included
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    entries = _plan(model, depth, names, include, exclude)
    _tie(entries, names)
    made: dict[int, nn.Parameter] = {}  # id(dense weight) -> the factors made for it (tied weights share them)
    twins: dict[int, DWFLayer] = {}  # id(dense module) -> its DWF layer
    for entry in entries:
        if not entry.selected:
            continue
        module, pname, weight = entry.module, entry.pname, entry.weight
        converter = converter_for(module, pname)
        factors = made.get(id(weight))
        if converter is DWFWeight:
            DWFWeight.from_dense(module, depth, init, name=pname, eps=eps, upper=upper, factors=factors)
            made[id(weight)] = module.parametrizations[pname].original
        else:
            twins[id(module)] = converter.from_dense(module, depth, init, eps=eps, upper=upper, factors=factors)
            made[id(weight)] = twins[id(module)].factors
        entry.coverage.converted, entry.coverage.how = True, converter.__name__
    _replace_children(model, twins)
    if report is not None:
        report.extend(entry.coverage for entry in entries)
    return model


@dataclass
class _Entry:
    """One candidate weight of factorize: where it is, whether it is converted, and its report line."""

    module: nn.Module
    pname: str
    weight: nn.Parameter | None  # None: already held as factors
    selected: bool
    coverage: WeightCoverage


def _plan(
    model: nn.Module, depth: int, names: dict[int, list[str]], include: list | None, exclude: list
) -> list[_Entry]:
    """The candidate weights of `model` in order, each selected by the default or include/exclude."""

    def named(n: str, pname: str) -> str:
        return f"{n}.{pname}" if n else pname

    def param_match(full_names: list[str], selectors: list) -> bool:
        return any(isinstance(s, str) and fnmatch.fnmatchcase(f, s) for f in full_names for s in selectors)

    entries = []
    for module in model.modules():
        mnames = names[id(module)]
        for pname, holder in _dwf_holders(module):
            if holder.depth != depth:
                raise ValueError(
                    f"model already holds DWF layers of depth {holder.depth} ({named(mnames[0], pname or '')!r}); "
                    f"factorize(model, depth={depth}) would leave them at depth {holder.depth}. To change the depth, "
                    f"factorize dwf_kernels.collapse(model) with init='dense' (or start again from the dense model)"
                )
        if isinstance(module, DWFLayer) or isinstance(module, FactorsParametrizationList):
            continue
        exact = converter_for(module) is not None
        for pname, weight in module._parameters.items():
            if weight is None:
                continue
            full = [named(n, pname) for n in mnames]
            if weight.dim() < 2:  # a bias, a norm's scale: only when include names it exactly
                if include is None or not any(f == s for f in full for s in include):
                    continue
                explicit = True
            else:
                explicit = include is not None and param_match(full, include)
            cls = parametrize.type_before_parametrizations(module).__name__
            if exact and pname != "weight":  # the DWF layer that replaces the module holds its bias as it is
                note = f"a torch.nn.{cls}'s {pname} stays a plain parameter of its DWF layer"
                coverage = WeightCoverage(full[0], cls, tuple(weight.shape), "other", False, "", note)
                entries.append(_Entry(module, pname, weight, False, coverage))
                continue
            kind = weight_kind(module, pname, weight)
            if include is None:
                selected = kind == "matrix"
            else:
                selected = explicit or any(_matches(n, module, include) for n in mnames)
            excluded = any(_matches(n, module, exclude) for n in mnames) or param_match(full, exclude)
            if selected and not excluded and kind == "embedding" and module.sparse:
                raise ValueError(
                    f"{full[0]!r}: an {cls} with sparse=True has sparse gradients, which the DWF product's "
                    f"backward does not take; build it with sparse=False to factorize it, or exclude it"
                )
            note = "excluded" if selected and excluded else "" if selected else NOTES.get(kind, "not included")
            if kind == "standardized" and selected and not excluded:
                note = "weight-standardizing: sparsity_report counts the effective weight"
            coverage = WeightCoverage(full[0], cls, tuple(weight.shape), kind, False, "", note)
            entries.append(_Entry(module, pname, weight, selected and not excluded, coverage))
    return entries


def _tie(entries: list[_Entry], names: dict[int, list[str]]) -> None:
    """Makes the weights shared by several modules (tied) convert together or not at all: a tie with
    an embedding follows the embedding; any other disagreement is refused, before anything changed."""
    groups: dict[int, list[_Entry]] = {}
    for entry in entries:
        groups.setdefault(id(entry.weight), []).append(entry)
    for group in groups.values():
        for e in group[1:]:
            e.coverage.tied_to = group[0].coverage.name
        if len(group) < 2 or len({e.selected for e in group}) == 1:
            continue
        embeddings = [e for e in group if e.coverage.kind == "embedding"]
        if embeddings:
            lead = embeddings[0]
            for e in group:
                if e is not lead:
                    e.coverage.kind = "embedding"  # the same parameter: it counts as the embedding it is
                if e.selected != lead.selected:
                    e.selected = lead.selected
                    state = "factorized" if lead.selected else "left dense"
                    e.coverage.note = f"tied to {lead.coverage.name}, {state} (a tie follows the embedding)"
            continue
        done = next(e for e in group if e.selected)
        other = next(e for e in group if not e.selected)
        first, second = names[id(done.module)][0], names[id(other.module)][0]
        raise ValueError(
            f"the weight of {first!r} is also a parameter of {second!r} ({type(other.module).__name__}), which "
            f"factorize does not convert, so the tie cannot be kept: exclude {first!r}, or convert both"
        )


def _dwf_holders(module: nn.Module) -> list[tuple[str | None, FactorHolder]]:
    """The DWF factor holders of `module` itself: (None, module) for a DWF layer, (name, its DWFWeight)
    for each DWF-parametrized tensor."""
    if isinstance(module, DWFLayer):
        return [(None, module)]
    if not parametrize.is_parametrized(module):
        return []
    return [(pname, holder) for pname in module.parametrizations if (holder := dwf_parametrization(module, pname))]


def _replace_children(model: nn.Module, replacement: dict[int, nn.Module]) -> None:
    """Puts replacement[id(m)] in every place where module m is a child (shared modules included)."""
    for parent in list(model.modules()):
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in replacement:
                setattr(parent, child_name, replacement[id(child)])


def factor_holders(model: nn.Module) -> list[tuple[str, nn.Module, str | None, FactorHolder, nn.Parameter]]:
    """Every holder of DWF factors in `model`, in module order: (module name, module, parameter name,
    holder, factors), with parameter name None for a DWF layer (the holder is the layer) and the
    parametrized tensor's name for a DWFWeight."""
    found = []
    for name, module in model.named_modules():
        for pname, holder in _dwf_holders(module):
            factors = module.factors if pname is None else module.parametrizations[pname].original
            found.append((name, module, pname, holder, factors))
    return found


def dwf_layers(model: nn.Module) -> list[tuple[str, DWFLayer]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, DWFLayer)]


def penalty(model: nn.Module, lam: float) -> torch.Tensor:
    """(lam / D) * sum of squared factors over the model's DWF layers and DWF-parametrized weights, differentiable.

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
        if isinstance(module, DWFLayer):
            holder, factors = module, module.factors
        elif isinstance(module, FactorsParametrizationList):  # a DWFWeight's, first in its list
            holder, factors = module[0], module.original
        else:
            continue
        if id(factors) not in seen:
            seen.add(id(factors))
            sumsq = holder.last_sumsq
            if sumsq is None or (not sumsq.requires_grad and factors.requires_grad and torch.is_grad_enabled()):
                # No forward yet, a backward has used the last one, or it ran without grad (the
                # first pass of torch.utils.checkpoint with use_reentrant=True): a fresh sum, so
                # that the penalty has its value and its gradient.
                sumsq = holder.fresh_sumsq(factors)
            by_depth.setdefault(holder.depth, []).append(sumsq)
    if not by_depth:
        return torch.zeros(())
    terms = [
        (lam / depth) * (sums[0] if len(sums) == 1 else torch.stack(sums).sum()) for depth, sums in by_depth.items()
    ]
    return terms[0] if len(terms) == 1 else torch.stack(terms).sum()


def collapse(model: nn.Module, threshold: float = DEFAULT_THRESHOLD) -> nn.Module:
    """A new ordinary torch.nn model: each DWF layer becomes its torch.nn layer holding the product,
    and each DWF-parametrized weight that product as a plain parameter again (its module gets its own
    class back), with weights of magnitude below `threshold` set to exactly 0. `model` is left untouched."""
    if isinstance(model, DWFLayer):
        raise TypeError("collapse takes a model containing DWF layers; wrap a single layer in nn.Sequential")
    check_threshold(threshold)
    collapsed = copy.deepcopy(model)  # keeps shared layers and parameters shared
    twins: dict[int, nn.Module] = {}
    weights: dict[int, nn.Parameter] = {}  # id(factors) -> collapsed weight (tied layers share it)
    for _, module, pname, _, factors in factor_holders(collapsed):
        if pname is None:
            dense = module.to_dense(threshold, weight=weights.get(id(factors)))
            weights[id(factors)] = dense.weight
            twins[id(module)] = dense
        else:
            weights[id(factors)] = DWFWeight.to_dense(module, pname, threshold, weight=weights.get(id(factors)))
    _replace_children(collapsed, twins)
    return collapsed
