"""How FusedSGD.step() updates one param group: it sorts the group's parameters into sets, each a
few parallel lists that one op call takes as they are, and then makes those calls.

Sorting only reads (a refused step changes nothing: every group is sorted before any is updated).
The sets of a group:

- `fused`: DWF layers whose lazy gradient the fused step applies, as (backend, lists, has_buffers)
  per set one `dwf_sgd_step_multi` call serves (lists: factors, dL/dw, dL/dsumsq, momentum
  buffers, lazy gradient states);
- `plain`: plain float32/float64 CPU parameters for the one-call update `sgd_step_multi` (torch's
  SGD arithmetic, one pass), keyed by whether their momentum buffers exist (lists: params, grads,
  buffers);
- `params`, `grads`, `buffers`: the rest, for torch.optim.SGD's own update;
- `fresh`: the params about to get their first momentum buffer (their state entries are made in
  parameter order, so state_dict's keys come as torch.optim.SGD's).

A CPU group trained with momentum in its steady state (the common case) is sorted with a few list
passes (`_sort_steady_cpu`); any other group parameter by parameter (`_sort_each`), to the same
sets.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.optim.sgd import sgd as _torch_sgd

from . import _extension
from ._lazy_grad import _LAZY, LazyFactorGrad, _grad_w_or_zeros, dense_of, take_for_fused_step
from .backends import select
from .backends import extension as _extension_backend
from .ops import _run_sgd_step_multi, dwf_sgd_step


class StepSets(NamedTuple):
    """One group's parameters sorted into op calls (see the module's docstring)."""

    fused: list
    plain: dict
    params: list
    grads: list
    buffers: list
    fresh: list


def sort_group(group: dict, hyper: dict, state, backend: str | None, multi: bool) -> StepSets:
    """The sets of param group `group` (hyper: its hyper-parameters; state: the optimizer's; backend:
    the fused step's backend, None for automatic; multi: whether plain parameters go to one call)."""
    params = group["params"]
    if (
        multi
        and hyper["momentum"] != 0
        and _PLAIN_SGD_STEP_MULTI is not None
        and params
        and params[0].is_cpu  # (a GPU model's group goes straight to the loop)
    ):
        sets = _sort_steady_cpu(params, state, backend)
        if sets is not None:
            return sets
    return _sort_each(params, hyper, state, backend, multi)


def _sort_each(params, hyper: dict, state, backend: str | None, multi: bool) -> StepSets:
    """sort_group's loop, parameter by parameter: any group."""
    # As torch.optim.SGD: no per-parameter state without momentum.
    with_state = hyper["momentum"] != 0
    plain_in_one_call = multi and _PLAIN_SGD_STEP_MULTI is not None
    sets = StepSets([], {}, [], [], [], [])
    fused = {}  # set key -> the set's lists
    for p in params:
        grad = p.grad
        if grad is None:
            continue
        buffer = None
        if with_state:  # (state.get: a refused step adds no entry)
            buffer = state.get(p, _NO_STATE).get("momentum_buffer")
            if buffer is None:
                sets.fresh.append(p)
        if type(grad) is LazyFactorGrad:
            lazy = take_for_fused_step(grad, p)
            if lazy is not None and buffer is not None and not buffer_fits(buffer, p):
                # A momentum buffer the fused step cannot update along with these factors (made
                # before the model was converted to another dtype, say): torch.optim.SGD's own
                # update applies the dense gradient to it, as torch.optim.SGD would.
                lazy = None
            if lazy is not None:
                grad_w = _grad_w_or_zeros(lazy.grad_w, p)
                # What one op call serves: one device, and whether the momentum buffers exist yet;
                # on a GPU also one factor dtype, dL/dw dtype and depth (one launch). On CPU every
                # backend takes any mix of dtypes and depths in one call.
                if p.is_cpu:
                    key = _CPU_KEYS[buffer is not None]
                else:
                    key = (p.device, p.dtype, grad_w.dtype, p.shape[0], buffer is not None)
                lists = fused.get(key)
                if lists is None:
                    lists = fused[key] = ([], [], [], [], [])
                lists[0].append(p)
                lists[1].append(grad_w)
                lists[2].append(lazy.grad_sumsq)
                lists[3].append(buffer)
                lists[4].append(lazy)
                continue
            # Formed already (read by other code, e.g. an element-wise read or DDP): applied as a
            # dense gradient.
            grad = dense_of(grad)
        if plain_in_one_call and plain_step_takes(p, grad):
            has_buffers = buffer is not None
            lists = sets.plain.get(has_buffers)
            if lists is None:
                lists = sets.plain[has_buffers] = ([], [], [])
            lists[0].append(p)
            lists[1].append(grad)
            lists[2].append(buffer)
            continue
        sets.params.append(p)
        sets.grads.append(grad)
        sets.buffers.append(buffer)
    # The backends chosen here, where a refusal (e.g. a backend that cannot run these tensors) still
    # changes nothing.
    sets.fused.extend((select(key[0].type, backend), lists, key[-1]) for key, lists in fused.items())
    return sets


def _sort_steady_cpu(params, state, backend: str | None) -> StepSets | None:
    """sort_group's result for the steady state of a CPU model trained with momentum, sorted with a
    few list passes instead of one branchy loop: every parameter with a gradient either a DWF layer
    whose lazy gradient the fused step applies, or a plain parameter for the one-call update, and
    all with their momentum buffer (for the layers, one the fused step can update). The same sets,
    in the same order, as _sort_each makes; None wherever the group holds anything else (the loop
    sorts it then, and refuses what it refuses)."""
    layers, lazies, plain_params, plain_grads = [], [], [], []
    for p in params:
        grad = p.grad
        if type(grad) is LazyFactorGrad:
            layers.append(p)
            lazies.append(grad._state)
        elif grad is not None:
            plain_params.append(p)
            plain_grads.append(grad)
    # (all() of a list: each check runs as one comprehension, or one map, over the set)
    if not all(
        [
            lazy.kind == _LAZY and lazy.factors() is p and p._version == lazy.version and lazy.grad_w is not None
            for p, lazy in zip(layers, lazies)
        ]
    ) or not all([p.is_cpu and p.is_contiguous() for p in layers]):
        return None
    if not all(map(plain_step_takes, plain_params, plain_grads)):
        return None
    state_get = state.get
    layer_buffers = [state_get(p, _NO_STATE).get("momentum_buffer") for p in layers]
    plain_buffers = [state_get(p, _NO_STATE).get("momentum_buffer") for p in plain_params]
    if not all([b is not None for b in layer_buffers]) or not all([b is not None for b in plain_buffers]):
        return None
    if not all(map(buffer_fits, layer_buffers, layers)):
        return None
    fused = []
    if layers:
        lists = (layers, [s.grad_w for s in lazies], [s.grad_sumsq for s in lazies], layer_buffers, lazies)
        fused.append((select("cpu", backend), lists, True))
    plain = {True: (plain_params, plain_grads, plain_buffers)} if plain_params else {}
    return StepSets(fused, plain, [], [], [], [])


def step_group(group: dict, hyper: dict, op_hyper: dict, sets: StepSets, state, multi: bool) -> None:
    """Updates one group's parameters as sort_group sorted them (hyper: as torch's SGD takes the
    hyper-parameters; op_hyper: as the ops take them)."""
    for p in sets.fresh:  # their entries, in parameter order
        state[p]  # noqa: B018 (state is a defaultdict: the lookup makes the entry)
    for chosen, lists, has_buffers in sets.fused:
        _step_fused_together(chosen, lists, has_buffers, op_hyper, not multi, state)
    params, grads, buffers = sets.params, sets.grads, sets.buffers
    for has_buffers, lists in sets.plain.items():
        for i in _step_plain_together(lists, has_buffers, op_hyper, state):  # those it left to torch's update
            params.append(lists[0][i])
            grads.append(lists[1][i])
            buffers.append(lists[2][i])
    if not params:
        return
    # foreach=None (the default) lets torch choose as torch.optim.SGD would: its foreach and
    # per-tensor updates round bfloat16 differently.
    _torch_sgd(params, grads, buffers, foreach=group["foreach"], **hyper)
    if hyper["momentum"] != 0:
        for p, buffer in zip(params, buffers, strict=True):
            state[p]["momentum_buffer"] = buffer


def _step_fused_together(chosen, lists, has_buffers: bool, hyper: dict, per_layer: bool, state) -> None:
    """The fused step of a set of layers that one kernel launch can serve on the backend `chosen`:
    one dwf_sgd_step_multi call, or with per_layer one dwf_sgd_step call per layer
    (multi_tensor=False). A first step's new buffers go to `state`."""
    factors, grad_w, grad_sumsq, buffers, lazies = lists
    if per_layer:
        new = [
            dwf_sgd_step(f, g, s, b, backend=chosen.name, **hyper)
            for f, g, s, b in zip(factors, grad_w, grad_sumsq, buffers, strict=True)
        ]
    else:
        # Without the check that the layers share no memory: they are distinct parameters (a group
        # holds each once, see FusedSGD.add_param_group) with their own buffers and gradients.
        new = _run_sgd_step_multi(
            chosen, factors, grad_w, grad_sumsq, buffers if has_buffers else None, check_apart=False, **hyper
        )
    if hyper["momentum"] != 0 and not has_buffers:  # the first step made them
        for p, buffer in zip(factors, new, strict=True):
            state[p]["momentum_buffer"] = buffer
    for lazy in lazies:
        lazy.consume()  # applied: releases dL/dw; reading it later is refused


def _step_plain_together(lists, has_buffers: bool, hyper: dict, state) -> list[int]:
    """torch.optim.SGD's update of plain CPU parameters (biases, norms), one op call for the set (a
    first step's new buffers go to `state`). Returns the indices of those it left alone."""
    params, grads, buffers = lists
    momentum = hyper["momentum"]
    init_buffer = momentum != 0 and not has_buffers
    if momentum == 0:
        buffers = []
    elif init_buffer:
        buffers = [torch.empty_like(p, memory_format=torch.contiguous_format) for p in params]
    left = _PLAIN_SGD_STEP_MULTI(
        params,
        buffers,
        grads,
        float(hyper["lr"]),
        float(momentum),
        float(hyper["dampening"]),
        float(hyper["weight_decay"]),
        bool(hyper["nesterov"]),
        bool(hyper["maximize"]),
        init_buffer,
    )
    left = left.tolist() if left.numel() else []
    if init_buffer:
        skip = set(left)
        for i, (p, buffer) in enumerate(zip(params, buffers, strict=True)):
            if i not in skip:  # a buffer of a param left alone was never written
                state[p]["momentum_buffer"] = buffer
    return left


def buffer_fits(buffer: torch.Tensor, factors: torch.Tensor) -> bool:
    """Whether the fused step can update `buffer` as the momentum buffer of `factors` (as the ops
    require: their shape, dtype and device, contiguous)."""
    return (
        buffer.dtype == factors.dtype
        and buffer.shape == factors.shape
        and buffer.is_contiguous()
        # (is_cpu: the step of a CPU model asks without making two torch.device objects per layer)
        and (buffer.is_cpu if factors.is_cpu else buffer.device == factors.device)
    )


def plain_step_takes(p: torch.Tensor, grad: torch.Tensor) -> bool:
    """Whether p goes to the one-call update of plain parameters (sgd_step_multi): a plain float32
    or float64 CPU tensor with a dense CPU gradient, which the op's CPU kernel receives (torch
    rounds each op of a half-precision update separately, which the one-pass update does not). The
    op updates those it can update as torch.optim.SGD does, bit for bit (contiguous, with a
    gradient and buffer of its shape and dtype), and returns the others for torch's own update."""
    return (
        type(grad) is torch.Tensor
        and type(p) in _PLAIN_TYPES
        and p.dtype in _PLAIN_DTYPES
        and p.is_cpu
        and grad.is_cpu
        and p.layout is _STRIDED
        and grad.layout is _STRIDED
    )


_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)
_PLAIN_DTYPES = (torch.float32, torch.float64)
_STRIDED = torch.strided
_CPU_KEYS = ((torch.device("cpu"), False), (torch.device("cpu"), True))  # indexed by: has buffers
_NO_STATE: dict = {}  # the state of a parameter without an entry (read, never written)
# The one-call update of plain parameters: the C++ extension's CPU op, where it is loaded and rounds
# as torch does, i.e. where ATen's CPU kernels run with FMA (AVX2, AVX-512): its a + x * b is one
# rounding there, two in ATen's baseline kernels.
_PLAIN_SGD_STEP_MULTI = (
    _extension_backend.plain_sgd_step_multi
    if "cpu" in _extension.KERNEL_DEVICES and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    else None
)
