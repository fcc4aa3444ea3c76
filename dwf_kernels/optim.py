"""FusedSGD: torch.optim.SGD whose DWF factor updates run fused with the DWF backward.

    optimizer = dwf_kernels.optim.FusedSGD(model.parameters(), lr=0.1, momentum=0.9)
    for x, y in loader:
        optimizer.zero_grad()
        loss = criterion(model(x), y) + dwf_kernels.penalty(model, lam)
        loss.backward()
        optimizer.step()

A drop-in for torch.optim.SGD, with the same hyper-parameters, state_dict (a checkpoint loads into
either class) and, for fp32/fp64 factors, the same results: equal to torch.optim.SGD's bit for bit
on CPU builds with FMA (AVX2/AVX-512), for one backward pass per step (gradients accumulated over
several passes are summed as dL/dw before the factor gradient is formed: equal to rounding). What
changes is how the DWF layers' factor gradient is formed. While the optimizer lives, the layers it
updates give their factors a lazy gradient: the backward pass stores dL/dw and dL/dsumsq in
`factors.grad` (a `LazyFactorGrad`) instead of forming the D x N factor gradient. `step()` applies
it with a fused kernel that forms the D factor gradients in registers and updates factors and
momentum buffer in place (`dwf_kernels.dwf_sgd_step`), for all layers of a group in one op call
(`dwf_kernels.dwf_sgd_step_multi`): the backward plus optimizer move 4D+1 elements per weight
instead of 7D+1 (10D+1 with torch's per-tensor SGD, its default on CPU), and no factor-gradient
tensor exists.

`factors.grad` is an ordinary gradient otherwise: zero_grad (the optimizer's or the model's),
accumulation over backward passes, `backward(inputs=...)`, `torch.autograd.grad`, other optimizers,
gradient clipping, torch.amp.GradScaler and DistributedDataParallel all work as with
torch.optim.SGD. clip_grad_norm_ (2-norm) and GradScaler keep the step fused: they scale dL/dw,
and the norm comes from a read-only fused pass (`dwf_kernels.dwf_grad_sumsq`). Anything else that
reads it forms the dense gradient first (the fused backward, once), and then step() applies that
dense gradient with torch's own SGD: correct, only the fusion's saving is lost for that step.

Refused, with an error saying why: reading or accumulating into a factor gradient after the
factors changed in place (it was computed from the old factors: clear gradients after each step),
including calling step() twice on one backward pass (torch.optim.SGD would apply the same
gradient twice; FusedSGD has applied and released it), and NaN hyper-parameters (torch.optim.SGD
accepts them), when the param group is added. A step refused for these changes nothing in any param group.

The fusion applies to eager and compiled forwards alike: under torch.compile (fullgraph too) the
layer's product is one opaque op whose backward leaves the same lazy gradient. The other
parameters (biases, norms) get torch.optim.SGD's update: on CPU with FMA (AVX2, AVX-512), for
plain float32/float64 tensors, with one op call for all of them (`torch.ops.dwf_kernels.sgd_step_multi`, the same
arithmetic, bit for bit, where torch runs several ops per tensor); otherwise with torch's own code.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable

import torch

from . import _fusion
from ._group_step import sort_group, step_group
from ._lazy_grad import LazyFactorGrad
from ._validate import check_sgd_hyper
from .backends import BACKENDS

__all__ = ["FusedSGD", "LazyFactorGrad"]


class FusedSGD(torch.optim.SGD):
    """torch.optim.SGD with the DWF layers' backward and update fused into one kernel.

    Arguments are torch.optim.SGD's (`foreach` applies to the parameters torch.optim.SGD updates; `lr` may be a
    one-element tensor, as there; `differentiable=True` and `fused=True` are refused, saying why);
    `backend` picks the dwf_kernels backend of the fused step (None: the fastest for the factors'
    device). `multi_tensor` (default True) steps the layers of a param group that share device and
    buffer state (on a GPU also dtypes and depth) with one `dwf_sgd_step_multi` call, and the group's plain
    float32/float64 CPU parameters with one `sgd_step_multi` call; False steps the layers one
    `dwf_sgd_step` call each and the other parameters with torch.optim.SGD's code (the same
    results, bitwise on CPU).
    """

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        backend: str | None = None,
        multi_tensor: bool = True,
    ) -> None:
        if differentiable:
            raise ValueError(
                "FusedSGD does not support differentiable=True: its step runs outside autograd; "
                "use torch.optim.SGD(differentiable=True) for a differentiable update"
            )
        if fused:
            raise ValueError(
                "fused=True selects torch.optim.SGD's own fused kernel; FusedSGD fuses the DWF layers' step "
                "itself (and applies torch's SGD to the other parameters): leave fused unset"
            )
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"backend must be one of {list(BACKENDS)} or None (automatic); got {backend!r}")
        if not isinstance(multi_tensor, bool):
            raise TypeError(f"multi_tensor must be True or False; got {multi_tensor!r}")
        self._backend = backend
        self._multi_tensor = multi_tensor
        super().__init__(
            params,
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            foreach=foreach,
        )

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_backend"] = self._backend
        state["_multi_tensor"] = self._multi_tensor
        return state

    def __setstate__(self, state: dict) -> None:
        # A copy (deepcopy, pickling) puts the DWF layers that hold its parameters in fused mode:
        # with a model copied alongside, that model's layers.
        super().__setstate__(state)
        self.__dict__.setdefault("_backend", None)
        self.__dict__.setdefault("_multi_tensor", True)
        for group in self.param_groups:
            _fusion.bind(self, group["params"])

    def add_param_group(self, param_group: dict) -> None:
        """torch.optim.SGD's; the DWF layers holding the group's factors enter fused mode, through
        the link on each factors Parameter (dwf_kernels._fusion). A layer stays in fused mode while
        any FusedSGD that updates it lives: its factor gradient is then lazy, which every consumer
        reads correctly; only FusedSGD.step() saves the work."""
        params = param_group.get("params") if isinstance(param_group, dict) else None
        if params is not None and not isinstance(params, (torch.Tensor, set)):  # torch refuses sets itself
            params = param_group["params"] = list(params)  # as torch does; an iterator is read once
            # Before torch's add_param_group, which only warns; entries may be (name, param) pairs,
            # unpacked as torch unpacks them.
            _refuse_duplicates([p[1] if isinstance(p, tuple) else p for p in params])
        super().add_param_group(param_group)
        try:
            # Hyper-parameters torch.optim.SGD accepts but the step would refuse (NaN) fail here.
            _group_hyper(self.param_groups[-1], len(self.param_groups) - 1)
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise
        _fusion.bind(self, self.param_groups[-1]["params"])

    @torch.compiler.disable(
        reason="FusedSGD.step() runs eagerly: it reads each layer's lazy gradient in Python and makes one op call "
        "per set of layers (compile the model, whose backward it fuses with)"
    )
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Every group's hyper-parameters and gradients are checked before any group is updated (a
        # group edited after construction may hold bad ones; a DWF factor gradient may be stale or
        # already applied): a step refused for these changes nothing. How a group's parameters
        # become op calls: dwf_kernels._group_step.
        hypers = [_group_hyper(group, i) for i, group in enumerate(self.param_groups)]
        backend, multi, state = self._backend, self._multi_tensor, self.state
        sorted_groups = [
            sort_group(group, hyper, state, backend, multi) for group, (hyper, _) in zip(self.param_groups, hypers)
        ]
        for group, (hyper, op_hyper), sets in zip(self.param_groups, hypers, sorted_groups, strict=True):
            step_group(group, hyper, op_hyper, sets, state, multi)
        return loss


def _refuse_duplicates(params) -> None:
    # torch only warns; stepping one parameter twice per step in one multi-layer launch would race
    # (the per-parameter loop steps it twice in turn).
    if len({id(p) for p in params}) != len(params):
        raise ValueError(
            "FusedSGD: a parameter group holds the same parameter more than once; list each parameter once"
        )


def _group_hyper(group: dict, index: int) -> tuple[dict, dict]:
    """Param group `index`'s SGD hyper-parameters, checked: as torch's SGD takes them, and as the ops
    take them (Python floats and bools; lr may be a one-element tensor, momentum a NumPy scalar, as
    torch.optim.SGD allows)."""
    hyper = {
        "lr": group["lr"],
        "momentum": group["momentum"],
        "dampening": group["dampening"],
        "weight_decay": group["weight_decay"],
        "nesterov": group["nesterov"],
        "maximize": group["maximize"],
    }
    op_hyper = hyper.copy()
    try:
        for name in _FLOAT_HYPER:
            if type(hyper[name]) is not float:  # (the common case costs a type check)
                op_hyper[name] = _as_float(name, hyper[name])
        op_hyper["nesterov"], op_hyper["maximize"] = bool(hyper["nesterov"]), bool(hyper["maximize"])
        check_sgd_hyper(
            op_hyper["lr"], op_hyper["momentum"], op_hyper["dampening"], op_hyper["weight_decay"], op_hyper["nesterov"]
        )
    except (TypeError, ValueError) as e:
        raise type(e)(f"FusedSGD param group {index}: {e}") from None
    return hyper, op_hyper


def _as_float(name: str, value) -> float:
    """A hyper-parameter as the ops take it: any real number (int, bool, NumPy scalar), or for lr a
    one-element tensor, as a Python float."""
    if isinstance(value, torch.Tensor) and name == "lr":
        if value.numel() != 1:
            raise ValueError(f"lr must be a number or a one-element tensor; got a tensor of shape {tuple(value.shape)}")
        return float(value.item())
    if not isinstance(value, numbers.Real):
        kind = type(value)
        kind = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
        raise TypeError(f"{name} must be a real number; got {kind}")
    return float(value)


_FLOAT_HYPER = ("lr", "momentum", "dampening", "weight_decay")  # the ops take them as Python floats
