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
from torch.optim.sgd import sgd as _torch_sgd

from . import _extension, _fusion
from ._lazy_grad import _LAZY, LazyFactorGrad, _grad_w_or_zeros, dense_of, take_for_fused_step
from ._validate import check_sgd_hyper
from .backends import BACKENDS, select
from .backends import extension as _extension_backend
from .ops import _run_sgd_step_multi, dwf_sgd_step

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
        # already applied): a step refused for these changes nothing.
        hypers = [_group_hyper(group, i) for i, group in enumerate(self.param_groups)]
        sorted_groups = [self._sort_group(group, hyper) for group, (hyper, _) in zip(self.param_groups, hypers)]
        for group, (hyper, op_hyper), sets in zip(self.param_groups, hypers, sorted_groups, strict=True):
            self._step_group(group, hyper, op_hyper, *sets)
        return loss

    def _sort_group(self, group: dict, hyper: dict) -> tuple[list, dict, list, list, list, list]:
        """One pass over a group's parameters, reading only, sorts them into sets, each a few parallel
        lists that go to one op call as they are (the step's per-parameter Python is a handful of
        attribute reads): (DWF layer sets with the backend each runs on, plain parameter sets, the
        params, gradients and momentum buffers for torch's own update, and the params about to get
        their first momentum buffer)."""
        params = group["params"]
        steady_cpu_candidate = (
            self._multi_tensor
            and hyper["momentum"] != 0
            and _PLAIN_SGD_STEP_MULTI is not None
            and params
            and params[0].is_cpu  # (a GPU model's group goes straight to the loop)
        )
        if steady_cpu_candidate:
            sets = self._sort_cpu_group(group)
            if sets is not None:
                return sets
        return self._sort_each(group, hyper)

    def _sort_each(self, group: dict, hyper: dict) -> tuple[list, dict, list, list, list, list]:
        """_sort_group's loop, parameter by parameter: any group."""
        multi = self._multi_tensor
        # As torch.optim.SGD: no per-parameter state without momentum.
        with_state = hyper["momentum"] != 0
        plain_in_one_call = multi and _PLAIN_SGD_STEP_MULTI is not None
        state = self.state
        params, grads, buffers = [], [], []  # for torch's own update
        fresh = []  # without a momentum buffer yet: their state entries are made when the step applies
        # set key -> [factors, dL/dw, dL/dsumsq, momentum buffers, lazy gradient states]
        fused = {}
        plain = {}  # has buffers -> [params, grads, momentum buffers]
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            buffer = None
            if with_state:  # (state.get: a refused step adds no entry)
                buffer = state.get(p, _NO_STATE).get("momentum_buffer")
                if buffer is None:
                    fresh.append(p)
            if type(grad) is LazyFactorGrad:
                lazy = take_for_fused_step(grad, p)
                if lazy is not None and buffer is not None and not _buffer_fits(buffer, p):
                    # A momentum buffer the fused step cannot update along with these factors
                    # (made before the model was converted to another dtype, say): torch.optim.SGD's
                    # own update applies the dense gradient to it, as torch.optim.SGD would.
                    lazy = None
                if lazy is not None:
                    grad_w = _grad_w_or_zeros(lazy.grad_w, p)
                    # What one op call serves: one device, and whether the momentum buffers exist
                    # yet; on a GPU also one factor dtype, dL/dw dtype and depth (one launch). On
                    # CPU every backend takes any mix of dtypes and depths in one call.
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
                # Formed already (read by other code, e.g. an element-wise read or DDP): applied
                # as a dense gradient.
                grad = dense_of(grad)
            if plain_in_one_call and _plain_step_takes(p, grad):
                has_buffers = buffer is not None
                lists = plain.get(has_buffers)
                if lists is None:
                    lists = plain[has_buffers] = ([], [], [])
                lists[0].append(p)
                lists[1].append(grad)
                lists[2].append(buffer)
                continue
            params.append(p)
            grads.append(grad)
            buffers.append(buffer)
        # The backends chosen here, where a refusal (e.g. a backend that cannot run these tensors)
        # still changes nothing.
        fused = [(select(key[0].type, self._backend), lists, key[-1]) for key, lists in fused.items()]
        return fused, plain, params, grads, buffers, fresh

    def _sort_cpu_group(self, group: dict) -> tuple[list, dict, list, list, list, list] | None:
        """_sort_group's result for the steady state of a CPU model trained with momentum, the
        common case, sorted with a few list passes instead of one branchy loop: every parameter with
        a gradient either a DWF layer whose lazy gradient the fused step applies, or a plain
        float32/float64 tensor with a dense gradient, and all with their momentum buffer (for the
        layers, one the fused step can update). The same sets, in the same order, as the general
        loop sorts them; None wherever the group holds anything else (the general loop sorts it
        then, and refuses what it refuses)."""
        layers, lazies, plain_params, plain_grads = [], [], [], []
        for p in group["params"]:
            grad = p.grad
            if type(grad) is LazyFactorGrad:
                layers.append(p)
                lazies.append(grad._state)
            elif grad is not None:
                plain_params.append(p)
                plain_grads.append(grad)
        # (all() of a list: each check runs as one comprehension)
        if not all(
            [
                lazy.kind == _LAZY and lazy.factors() is p and p._version == lazy.version and lazy.grad_w is not None
                for p, lazy in zip(layers, lazies)
            ]
        ) or not all([p.is_cpu and p.is_contiguous() for p in layers]):
            return None
        if not all(
            [
                type(g) is torch.Tensor
                and type(p) in _PLAIN_TYPES
                and p.is_cpu
                and p.dtype in _PLAIN_DTYPES
                and p.layout is _STRIDED
                and g.layout is _STRIDED
                for p, g in zip(plain_params, plain_grads)
            ]
        ):
            return None
        state_get = self.state.get
        layer_buffers = [state_get(p, _NO_STATE).get("momentum_buffer") for p in layers]
        plain_buffers = [state_get(p, _NO_STATE).get("momentum_buffer") for p in plain_params]
        if not all([b is not None for b in layer_buffers]) or not all([b is not None for b in plain_buffers]):
            return None
        if not all(
            [
                b.dtype == p.dtype and b.is_cpu and b.shape == p.shape and b.is_contiguous()
                for p, b in zip(layers, layer_buffers)
            ]
        ):
            return None
        fused = []
        if layers:
            lists = (layers, [s.grad_w for s in lazies], [s.grad_sumsq for s in lazies], layer_buffers, lazies)
            fused.append((select("cpu", self._backend), lists, True))
        plain = {True: (plain_params, plain_grads, plain_buffers)} if plain_params else {}
        return fused, plain, [], [], [], []

    def _step_group(self, group, hyper, op_hyper, fused, plain, params, grads, buffers, fresh) -> None:
        """Updates one group's parameters as _sort_group sorted them."""
        multi = self._multi_tensor
        state = self.state
        for p in fresh:  # their entries, in parameter order (state_dict's keys come in torch.optim.SGD's)
            state[p]  # noqa: B018 (state is a defaultdict: the lookup makes the entry)
        for chosen, lists, has_buffers in fused:
            _step_fused_together(chosen, lists, has_buffers, op_hyper, not multi, state)
        for has_buffers, lists in plain.items():
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
    """The fused step of a set of layers that one kernel launch can serve (lists as _sort_group
    sorts them) on the backend `chosen`: one dwf_sgd_step_multi call, or with per_layer one
    dwf_sgd_step call per layer (multi_tensor=False). A first step's new buffers go to `state`."""
    factors, grad_w, grad_sumsq, buffers, lazies = lists
    if per_layer:
        new = [
            dwf_sgd_step(f, g, s, b, backend=chosen.name, **hyper)
            for f, g, s, b in zip(factors, grad_w, grad_sumsq, buffers, strict=True)
        ]
    else:
        # Without the check that the layers share no memory: they are distinct parameters (a
        # group holds each once, see FusedSGD.add_param_group) with their own buffers and gradients.
        new = _run_sgd_step_multi(
            chosen, factors, grad_w, grad_sumsq, buffers if has_buffers else None, check_apart=False, **hyper
        )
    if hyper["momentum"] != 0 and not has_buffers:  # the first step made them
        for p, buffer in zip(factors, new, strict=True):
            state[p]["momentum_buffer"] = buffer
    for lazy in lazies:
        lazy.consume()  # applied: releases dL/dw; reading it later is refused


def _buffer_fits(buffer: torch.Tensor, factors: torch.Tensor) -> bool:
    """Whether the fused step can update `buffer` as the momentum buffer of `factors` (as the ops
    require: their shape, dtype and device, contiguous)."""
    return (
        buffer.dtype == factors.dtype
        and buffer.shape == factors.shape
        and buffer.device == factors.device
        and buffer.is_contiguous()
    )


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


def _plain_step_takes(p: torch.Tensor, grad: torch.Tensor) -> bool:
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


def _step_plain_together(lists, has_buffers: bool, hyper: dict, state) -> list[int]:
    """torch.optim.SGD's update of plain CPU parameters (biases, norms), one op call for the set
    (lists as _sort_group sorts them; a first step's new buffers go to `state`). Returns the
    indices of those it left alone."""
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


_FLOAT_HYPER = ("lr", "momentum", "dampening", "weight_decay")  # the ops take them as Python floats
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
