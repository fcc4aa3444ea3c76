"""The interface every backend implements: what the front door (dwf_kernels/ops.py) calls.

A backend module builds one `Backend` (two for the C++ extension: `cuda` and `cpu`) and the
registry (backends/__init__.py) lists it under its public name (docs/design.md, Backends).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch


class OpFamily(NamedTuple):
    """A backend's custom ops (torch.library), as torch.compile, fake tensors and opcheck see them:
    torch.ops.<namespace>.dwf_forward / dwf_backward / dwf_sgd_step / dwf_grad_sumsq (OpOverloadPackets)."""

    namespace: str
    forward: Any
    backward: Any
    sgd_step: Any
    grad_sumsq: Any

    @classmethod
    def of(cls, namespace: str) -> OpFamily:
        ops = getattr(torch.ops, namespace)
        return cls(namespace, ops.dwf_forward, ops.dwf_backward, ops.dwf_sgd_step, ops.dwf_grad_sumsq)


class Backend:
    """One backend. The front door has validated every argument before it calls one of these
    (out_dtype is resolved to a dtype), so they check nothing the front door checks.

    forward(factors, out_dtype, with_sumsq) -> (w, sumsq): sumsq may be None or 0 without with_sumsq;
        autograd-aware (a factors tensor that requires grad gets w.grad_fn).
    backward(factors, grad_w, grad_sumsq) -> grad_factors: the first-order backward (the front door
        takes create_graph calls to the differentiable formula itself).
    sgd_step(factors, momentum_buffer, grad_w, grad_sumsq, lr, momentum, dampening, weight_decay,
        nesterov, maximize, init_buffer) -> None: the fused step, in place, called under no_grad; it
        leaves the version counters of the tensors it wrote bumped, as any in-place op does.
    grad_sumsq(factors, grad_w, grad_sumsq) -> the squared L2 norm of backward's result, a 0-d
        tensor in sumsq's dtype, without storing that result (read-only; called under no_grad).
    sgd_step_multi(factors, momentum_buffers, grad_w, grad_sumsq, lr, momentum, dampening,
        weight_decay, nesterov, maximize, init_buffer) -> None: sgd_step on each layer of the lists
        (momentum_buffers empty when momentum is 0), in one call. A backend without its own
        (multi_native False) loops over sgd_step; the front door then checks every layer itself,
        where a native one checks them in its op.
    serves(device_type) -> bool: whether it can run tensors of that device type in this process.
    why_not(device_type, instead) -> str: the error message when it cannot (`instead` names the
        backends that can), with what to do about it.
    emulated: serves only by emulation (Triton's CPU interpreter): listed after the reference
        backend, so never chosen automatically.
    ops: its custom ops, or None (the reference backend is plain torch, and a backend that cannot
        load has none).
    """

    def __init__(
        self,
        name: str,
        *,
        forward: Callable,
        backward: Callable,
        sgd_step: Callable,
        grad_sumsq: Callable,
        serves: Callable[[str], bool],
        sgd_step_multi: Callable | None = None,
        why_not: Callable[[str, str], str],
        emulated: bool = False,
        ops: OpFamily | None = None,
    ) -> None:
        self.name = name
        self.forward = forward
        self.backward = backward
        self.sgd_step = sgd_step
        self.grad_sumsq = grad_sumsq
        self.multi_native = sgd_step_multi is not None
        self.sgd_step_multi = sgd_step_multi or self._sgd_step_each
        self.serves = serves
        self.why_not = why_not
        self.emulated = emulated
        self.ops = ops

    def _sgd_step_each(self, factors, momentum_buffers, grad_w, grad_sumsq, *hyper) -> None:
        for i, f in enumerate(factors):
            self.sgd_step(f, momentum_buffers[i] if momentum_buffers else None, grad_w[i], grad_sumsq[i], *hyper)

    def __repr__(self) -> str:
        return f"<dwf_kernels backend {self.name!r}>"
