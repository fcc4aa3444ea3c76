"""FusedSGD: torch.optim.SGD whose DWF factor updates run fused with the DWF backward.

    optimizer = dwf_kernels.optim.FusedSGD(model.parameters(), lr=0.1, momentum=0.9)
    for x, y in loader:
        optimizer.zero_grad()
        loss = criterion(model(x), y) + dwf_kernels.penalty(model, lam)
        loss.backward()
        optimizer.step()

A drop-in for torch.optim.SGD, with the same hyper-parameters, state_dict (a checkpoint loads into
either class) and, for fp32/fp64 factors, the same results: equal to torch.optim.SGD's bit for bit
on CPU builds with FMA (AVX2/AVX-512). What changes is how the DWF layers' factor gradient is
formed. While the optimizer lives, the layers it updates give their factors a lazy gradient: the
backward pass stores dL/dw and dL/dsumsq in `factors.grad` (a `LazyFactorGrad`) instead of forming
the D x N factor gradient. `step()` applies it with a fused kernel that forms the D factor gradients
in registers and updates factors and momentum buffer in place (`dwf_kernels.dwf_sgd_step`), for all
layers of a group in one op call (`dwf_kernels.dwf_sgd_step_multi`): the backward plus optimizer
move 4D+1 elements per weight instead of 7D+1 (10D+1 with torch's per-tensor SGD, its default on
CPU), and no factor-gradient tensor exists.

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
gradient twice; FusedSGD has applied and released it).

The fusion applies to eager forwards. Under torch.compile the factors receive ordinary dense
gradients, which step() applies unfused. Everything else, the bias and any non-DWF parameter, is
updated by torch.optim.SGD's own code.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.optim.sgd import sgd as _torch_sgd

from . import _fusion
from ._lazy_grad import LazyFactorGrad, dense_of, take_for_fused_step
from .backends import BACKENDS
from .ops import _sgd_step_multi, dwf_sgd_step

__all__ = ["FusedSGD", "LazyFactorGrad"]


class FusedSGD(torch.optim.SGD):
    """torch.optim.SGD with the DWF layers' backward and update fused into one kernel.

    Arguments are torch.optim.SGD's (`foreach` applies to the non-DWF parameters; `lr` may be a
    one-element tensor, as there; `differentiable=True` and `fused=True` are refused, saying why);
    `backend` picks the dwf_kernels backend of the fused step (None: the fastest for the factors'
    device). `multi_tensor` (default True) steps the layers of a param group that share device,
    dtypes, depth and buffer state with one `dwf_sgd_step_multi` call; False steps them one
    `dwf_sgd_step` call each (the same results, bitwise on CPU).
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
        super().add_param_group(param_group)
        params = self.param_groups[-1]["params"]
        if len({id(p) for p in params}) != len(params):
            # torch only warns; stepping one parameter twice per step in one multi-layer launch
            # would race (the per-parameter loop steps it twice in turn).
            self.param_groups.pop()
            raise ValueError(
                "FusedSGD: a parameter group holds the same parameter more than once; list each parameter once"
            )
        _fusion.bind(self, params)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _step_group(self, group: dict) -> None:
        hyper = {
            "lr": group["lr"],
            "momentum": group["momentum"],
            "dampening": group["dampening"],
            "weight_decay": group["weight_decay"],
            "nesterov": group["nesterov"],
            "maximize": group["maximize"],
        }
        params, grads = [], []
        fused = []  # (factors, grad_w, grad_sumsq, lazy gradient state)
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            taken = take_for_fused_step(grad, p)
            if taken is None:
                # A dense gradient, or a lazy one already formed (read by other code, e.g. an
                # element-wise read or DDP): torch's own update.
                params.append(p)
                grads.append(dense_of(grad))
                continue
            fused.append((p, *taken))
        if fused:
            lr = hyper["lr"]
            fused_hyper = dict(hyper, lr=lr.item() if isinstance(lr, torch.Tensor) else lr)
            if self._multi_tensor:
                self._step_fused_together(fused, fused_hyper)
            else:
                for p, grad_w, grad_sumsq, lazy in fused:
                    state = self.state[p]
                    buffer = dwf_sgd_step(
                        p, grad_w, grad_sumsq, state.get("momentum_buffer"), backend=self._backend, **fused_hyper
                    )
                    if buffer is not None:
                        state["momentum_buffer"] = buffer
                    lazy.consume()  # applied: releases dL/dw; reading it later is refused
        if not params:
            return
        buffers = [self.state[p].get("momentum_buffer") for p in params]
        # foreach=None (the default): torch's multi-tensor update, one C++ call for all these
        # parameters where the per-tensor loop would make a few Python calls each. On the CPU it
        # runs the per-tensor update's ops on each tensor: the same results.
        foreach = group["foreach"]
        if foreach is None:
            foreach = all(type(t) in (torch.Tensor, torch.nn.Parameter) for t in (*params, *grads))
        _torch_sgd(params, grads, buffers, foreach=foreach, **hyper)
        if group["momentum"] != 0:
            for p, buffer in zip(params, buffers, strict=True):
                self.state[p]["momentum_buffer"] = buffer

    def _step_fused_together(self, fused: list, hyper: dict) -> None:
        """One dwf_sgd_step_multi call per set of layers that one kernel launch can serve: same
        device, factor dtype, dL/dw dtype, depth, and whether the momentum buffer exists yet."""
        sets: dict[tuple, list] = {}
        for item in fused:
            p, grad_w = item[0], item[1]
            key = (p.device, p.dtype, grad_w.dtype, p.shape[0], "momentum_buffer" in self.state[p])
            sets.setdefault(key, []).append(item)
        for key, items in sets.items():
            params = [item[0] for item in items]
            buffers = [self.state[p]["momentum_buffer"] for p in params] if key[-1] else None
            # Without the check that the layers share no memory: they are distinct parameters (a
            # group holds each once, see add_param_group) with their own buffers and gradients.
            buffers = _sgd_step_multi(
                params,
                [item[1] for item in items],
                [item[2] for item in items],
                buffers,
                backend=self._backend,
                check_apart=False,
                **hyper,
            )
            for i, p in enumerate(params):
                if buffers is not None:
                    self.state[p]["momentum_buffer"] = buffers[i]
                items[i][3].consume()  # applied: releases dL/dw; reading it later is refused
