"""FusedSGD: torch.optim.SGD whose DWF factor updates run fused with the DWF backward.

    optimizer = dwf_kernels.optim.FusedSGD(model.parameters(), lr=0.1, momentum=0.9)
    for x, y in loader:
        optimizer.zero_grad()
        loss = criterion(model(x), y) + dwf_kernels.penalty(model, lam)
        loss.backward()
        optimizer.step()

A drop-in for torch.optim.SGD, with the same hyper-parameters, state_dict (a checkpoint loads into
either class) and, for fp32/fp64 factors, the same results: equal to torch.optim.SGD's bit for bit
on CPU builds with FMA (AVX2/AVX-512). What changes is the DWF layers' factors. While the optimizer
lives, the layers it updates hand autograd their weight w (and sum of squares) as leaves, so the
backward pass stops at dL/dw; `step()` then runs one fused kernel per layer that forms the D factor
gradients in registers and applies the SGD update to factors and momentum buffer in place
(`dwf_kernels.dwf_sgd_step`, DESIGN.md §7b). No factor-gradient tensor is ever allocated, and the
backward plus optimizer move 4D+1 elements per weight instead of 7D+1 (10D+1 with torch's
per-tensor SGD, its default on CPU).

The collected dL/dw are consumed by step(): model.zero_grad() or optimizer.zero_grad() before the
backward both work; stepping twice on one backward applies it once (torch.optim.SGD would reuse it).

Consequences of never materializing the factor gradients (use torch.optim.SGD where they matter):
  * factors.grad stays None, so code that reads parameter gradients does not see the factors:
    gradient clipping, gradient logging, DistributedDataParallel (refused: it would not all-reduce
    them) and torch.amp.GradScaler (refused at step: fp16 loss scaling; bf16 autocast needs none).
  * The fusion applies to eager forwards. Under torch.compile, or when the code differentiates
    `layer.weight`, the factors receive ordinary gradients, which step() applies unfused: results
    stay correct, only the saving is lost.
Everything else, the bias and any non-DWF parameter, is updated by torch.optim.SGD's own code.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch.optim.sgd import sgd as _torch_sgd

from .nn import DWFLayer
from .ops import dwf_product_backward, dwf_sgd_step


class PendingGrads:
    """dL/dw and dL/dsumsq of one DWF layer, collected for a FusedSGD until its next step.

    Filled by post-accumulate-grad hooks on the leaves the layer's forward creates; summed when
    several forwards backpropagate before a step (gradient accumulation, a layer used twice). The
    step consumes them, so a loop that clears gradients with model.zero_grad(), which cannot see
    them, still steps on exactly this iteration's gradients.
    """

    __slots__ = ("__weakref__", "grad_sumsq", "grad_w", "optimizer", "zero_filled")

    def __init__(self, optimizer: FusedSGD) -> None:
        self.optimizer = weakref.ref(optimizer)
        self.grad_w: torch.Tensor | None = None
        self.grad_sumsq: torch.Tensor | None = None
        self.zero_filled = False  # zero_grad(set_to_none=False): the gradient is zero, not absent

    def active(self) -> bool:
        return self.optimizer() is not None

    def take_grad_w(self, leaf: torch.Tensor) -> None:
        grad, leaf.grad = leaf.grad, None
        self.grad_w = grad if self.grad_w is None else self.grad_w + grad

    def take_grad_sumsq(self, leaf: torch.Tensor) -> None:
        grad, leaf.grad = leaf.grad, None
        self.grad_sumsq = grad if self.grad_sumsq is None else self.grad_sumsq + grad

    def clear(self, set_to_none: bool) -> None:
        self.grad_w = self.grad_sumsq = None
        self.zero_filled = not set_to_none

    def consume(self) -> tuple[torch.Tensor | None, torch.Tensor | None, bool]:
        taken = (self.grad_w, self.grad_sumsq, self.zero_filled)
        self.clear(set_to_none=True)
        return taken


class FusedSGD(torch.optim.SGD):
    """torch.optim.SGD with the DWF layers' backward and update fused into one kernel per layer.

    Arguments are torch.optim.SGD's (`foreach` applies to the non-DWF parameters); `backend` picks
    the dwf_kernels backend of the fused step (None: the fastest for the factors' device).
    """

    _step_supports_amp_scaling = True  # so that GradScaler reaches step(), which refuses it loudly

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        backend: str | None = None,
    ) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_world_size() > 1:
                raise RuntimeError(
                    "FusedSGD never materializes the DWF factor gradients, so DistributedDataParallel "
                    "cannot all-reduce them; use torch.optim.SGD for distributed training"
                )
        self._backend = backend
        self._layers: dict[int, DWFLayer] = {}
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
        return state

    def __setstate__(self, state: dict) -> None:
        # A copy (deepcopy, pickling) binds the DWF layers that own its parameters: with a model
        # copied alongside, that model's layers.
        super().__setstate__(state)
        self.__dict__.setdefault("_backend", None)
        self._layers = {}
        self._bind_layers()

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self._bind_layers()

    def _bind_layers(self) -> None:
        """Puts every live DWF layer whose factors this optimizer updates into fused mode."""
        owned = {id(p) for group in self.param_groups for p in group["params"]}
        for layer in DWFLayer.live_layers():
            if id(layer.factors) in owned:
                if layer.pending_grads is None or layer.pending_grads.optimizer() is not self:
                    layer.pending_grads = PendingGrads(self)
                self._layers[id(layer.factors)] = layer

    def _pending_for(self, p: torch.Tensor) -> PendingGrads | None:
        layer = self._layers.get(id(p))
        if layer is None or layer.factors is not p:
            return None
        pending = layer.pending_grads
        return pending if pending is not None and pending.optimizer() is self else None

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for layer in self._layers.values():
            pending = layer.pending_grads
            if pending is not None and pending.optimizer() is self:
                pending.clear(set_to_none)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        if getattr(self, "grad_scale", None) is not None or getattr(self, "found_inf", None) is not None:
            raise RuntimeError(
                "FusedSGD does not support torch.amp.GradScaler (fp16 loss scaling): the scaled DWF weight "
                "gradients would be applied unscaled. Use bf16 autocast (no scaler needed) or torch.optim.SGD"
            )
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
        params, grads, buffers = [], [], []
        for p in group["params"]:
            pending = self._pending_for(p)
            grad_w, grad_sumsq, zero_filled = pending.consume() if pending is not None else (None, None, False)
            if grad_w is None and grad_sumsq is None and not zero_filled:
                if p.grad is not None:
                    params.append(p)
                    grads.append(p.grad)
            elif p.grad is None and grad_w is not None:
                state = self.state[p]
                buffer = dwf_sgd_step(
                    p, grad_w, grad_sumsq, state.get("momentum_buffer"), backend=self._backend, **hyper
                )
                if buffer is not None:
                    state["momentum_buffer"] = buffer
            else:
                # Ordinary factor gradients too (layer.weight or a compiled forward), only the
                # penalty's, or zeros: the sum of all of them, applied unfused.
                if grad_w is None:
                    grad_w = p.new_zeros(p.shape[1:])
                grad = dwf_product_backward(p, grad_w, grad_sumsq, backend=self._backend)
                params.append(p)
                grads.append(grad if p.grad is None else grad + p.grad)
        if not params:
            return
        for p in params:
            buffers.append(self.state[p].get("momentum_buffer"))
        _torch_sgd(params, grads, buffers, foreach=group["foreach"], **hyper)
        if group["momentum"] != 0:
            for p, buffer in zip(params, buffers, strict=True):
                self.state[p]["momentum_buffer"] = buffer
