"""Data-parallel DWF training that communicates dL/dw, not the D factor gradients.

    from dwf_kernels.parallel import DistributedDataParallel   # the one changed line
    model = DistributedDataParallel(dwf_kernels.factorize(net, 4).to(device), device_ids=[rank])
    optimizer = dwf_kernels.optim.FusedSGD(model.parameters(), lr=0.1, momentum=0.9)

Every rank holds the same factors, so a DWF layer's factor gradient is a function of the factors
(known everywhere) and of dL/dw and dL/dsumsq (which differ per rank). Averaging the factor
gradients over the ranks, as torch's DistributedDataParallel does (D x N elements per weight), is
the same as averaging dL/dw (N elements) and dL/dsumsq (one number) and forming the factor gradient
afterwards: it is linear in them. This wrapper does that. It is torch's DistributedDataParallel
(same arguments, `no_sync()`, `module`, state_dict keys), whose reducer handles every parameter
that is not DWF factors (biases, norms, unfactorized weights) exactly as there; the DWF layers'
factors are left to a second reducer here, which:

- keeps the layers' factor gradient lazy (dwf_kernels._lazy_grad: the backward leaves dL/dw and
  dL/dsumsq in `factors.grad`), as a live FusedSGD does, parts of one backward pass (a layer used
  twice, tied factors, several forwards) summed as dL/dw;
- packs each layer's dL/dw, once its gradient is accumulated, into fixed buckets of float32 (float64
  for float64 factors) whatever the autocast dtype, and starts an asynchronous all-reduce of a bucket
  as soon as all its layers are in, in a fixed bucket order on a process group of its own (the same
  collectives in the same order on every rank, whatever torch's reducer does), while the backward
  pass goes on;
- at the end of the backward pass starts one small all-reduce of a header (per layer: dL/dsumsq and
  how many ranks had a gradient, a dL/dw, a dL/dsumsq), waits for all of them and gives every layer
  the averaged dL/dw and dL/dsumsq as its (lazy) gradient.

`FusedSGD.step()` then applies that gradient with the fused kernel; any other reader
(torch.optim.SGD, clipping, GradScaler) forms the factor gradient from it. The average is the mean
over ranks as in torch's DDP, so a K-rank run with per-rank batch B (mean loss) equals one process
with batch K*B to rounding, and every rank gets bitwise the same reduced values, hence the same
factors after the step. A layer without a gradient on some ranks (unused in their forward, and not
penalized) counts as zero there, as with find_unused_parameters=True; on no rank, it keeps no
gradient. Uneven inputs: `with model.join():` as with torch's DDP.

Refused, with the same error on every rank (never a hang or a silently wrong average): a factor
gradient that is already dense when it is reduced (a backward with create_graph=True, a gradient
read and then accumulated into during `no_sync()`, another DistributedDataParallel around this
one), or one FusedSGD already applied and was not cleared; a backward pass with no forward through
the wrapper since the last reduction. At construction: a module already wrapped, and a module whose
only trainable parameters are DWF factors (torch's DistributedDataParallel refuses a module with
nothing for its reducer). docs/data-parallel.md says more.
"""

from __future__ import annotations

import functools
import weakref

import torch
import torch.distributed as dist
from torch.autograd import Variable
from torch.distributed.algorithms.join import JoinHook
from torch.nn.parallel import DistributedDataParallel as _TorchDDP
from torch.utils._pytree import tree_flatten

from . import _fusion
from ._lazy_grad import _DENSE, _LAZY, _ZERO, LazyFactorGrad, _State
from .backends import resolve_backend

__all__ = ["DistributedDataParallel"]

_DEFAULT_BUCKET_MB = 25.0
_PER_LAYER = 4  # header entries per layer
_REDUCER = "_dwf_data_parallel"  # on a factors Parameter: a weak reference to the reducer that reduces it


class DistributedDataParallel(_TorchDDP):
    """torch.nn.parallel.DistributedDataParallel whose DWF layers all-reduce dL/dw (N elements per
    weight) instead of the D factor gradients (D x N); see the module docstring.

    Takes torch's arguments. `bucket_cap_mb` sizes the DWF buckets too (25 MB when None). After each
    synchronized backward pass, `dwf_reduced` says what the DWF reducer moved: `{"grad_w_elements",
    "header_elements", "bytes", "buckets"}`.
    """

    # Gradient parts of one backward pass (a layer used twice, tied factors, several forwards) are
    # summed as dL/dw, so that the gradient stays lazy until it is reduced (_fusion.sums_lazily).
    dwf_sums_lazily = True

    def __init__(self, module: torch.nn.Module, *args, **kwargs) -> None:
        if isinstance(module, _TorchDDP):
            raise ValueError(
                "dwf_kernels.parallel.DistributedDataParallel: module is already wrapped in a "
                f"DistributedDataParallel ({type(module).__name__}); wrap the model itself, once"
            )
        factors = [(name, p) for name, p in module.named_parameters() if _fusion.link_of(p) is not None]
        names = [name for name, _ in factors]
        others = [p for name, p in module.named_parameters() if _fusion.link_of(p) is None]
        if not any(p.requires_grad for p in others):
            raise ValueError(
                "dwf_kernels.parallel.DistributedDataParallel needs a trainable parameter besides the DWF "
                "factors (torch's DistributedDataParallel refuses a module with none for its reducer); give a "
                "layer a bias, or use torch.nn.parallel.DistributedDataParallel"
            )
        previous = module.__dict__.get("_ddp_params_and_buffers_to_ignore")
        _TorchDDP._set_params_and_buffers_to_ignore_for_model(module, [*(previous or []), *names])
        try:
            super().__init__(module, *args, **kwargs)
        finally:
            # The list is this wrapper's: the module wrapped again by torch's DDP reduces its factors.
            if previous is None:
                module.__dict__.pop("_ddp_params_and_buffers_to_ignore", None)
            else:
                module._ddp_params_and_buffers_to_ignore = previous
        trainable = [p for _, p in factors if p.requires_grad]
        bucket_mb = kwargs.get("bucket_cap_mb")
        self._dwf = _FactorReducer(
            trainable, self.process_group, _DEFAULT_BUCKET_MB if bucket_mb is None else bucket_mb
        )
        self._dwf.broadcast_from_first_rank([p for _, p in factors])
        # The layers' gradient is lazy while this wrapper lives (as while a FusedSGD does).
        _fusion.bind(self, trainable)

    @property
    def dwf_reduced(self) -> dict:
        return dict(self._dwf.last)

    def join_hook(self, **kwargs):
        """torch's join hook (uneven inputs, `with model.join():`), whose joined ranks also shadow the
        DWF reducer's all-reduces and, at the end, receive the last joiner's factors."""
        if not kwargs.get("divide_by_initial_world_size", True):
            raise ValueError(
                "dwf_kernels.parallel.DistributedDataParallel averages the DWF layers' dL/dw over the initial "
                "world size: join with divide_by_initial_world_size=True (the default)"
            )
        return _JoinHook(super().join_hook(**kwargs), self)

    def forward(self, *inputs, **kwargs):
        # As torch's reducer: whether this forward's backward all-reduces is decided now (no_sync()).
        sync = torch.is_grad_enabled() and self.require_backward_grad_sync
        self._dwf.arm(sync)
        out = super().forward(*inputs, **kwargs)
        if sync:
            # The reduction ends with the backward pass even where no DWF layer of this rank gets a
            # gradient (the other ranks wait for its collectives): the backward's first steps queue it.
            reducer = weakref.ref(self._dwf)
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    t.register_hook(lambda grad, reducer=reducer: _queue_finish(reducer))
        return out


class _FactorReducer:
    """All-reduces the lazy gradients of DWF factors as dL/dw buckets plus a header (module docstring)."""

    def __init__(self, factors: list[torch.Tensor], group, bucket_mb: float) -> None:
        # A process group of its own (the same ranks): the order of its collectives is fixed, while
        # torch's reducer starts its own buckets as they fill, in an order that can differ per rank.
        device = factors[0].device if factors else torch.device("cpu")
        self.group = dist.new_group(
            dist.get_process_group_ranks(group),
            timeout=_timeout_of(group, device),  # a rank that stops is noticed as soon as torch's reducer notices
            backend=dist.get_backend(group),
            use_local_synchronization=True,
        )
        self.world = dist.get_world_size(self.group)
        # Reverse order of registration, as torch's reducer: the last layers' gradients come first.
        self.factors = list(reversed(factors))
        self.index = {id(p): i for i, p in enumerate(self.factors)}
        self.cap = max(int(bucket_mb * 2**20), 1)
        self.layout = None
        self.check_layout()
        self.last: dict = {}
        self.mode: str | None = None  # "sync", "local" (no_sync()) or None (no forward since the last reduction)
        self.queued = False
        self.handles = []
        me = weakref.ref(self)
        for p in self.factors:
            # The factors' current reducer: one that a later wrapper of the same layers replaced stands aside.
            p.__dict__[_REDUCER] = me
            self.handles.append(p.register_post_accumulate_grad_hook(lambda p, me=me: _on_grad(me, p)))
        weakref.finalize(self, _remove, self.handles)

    def check_layout(self) -> None:
        """(Re)builds the buckets and the header for the factors' dtypes and devices (the model may have
        been converted since, e.g. model.double(): every rank converts alike)."""
        layout = [(p.dtype, p.device) for p in self.factors]
        if layout == self.layout:
            return
        self.layout = layout
        self.buckets: list[_Bucket] = []
        for i, p in enumerate(self.factors):
            dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
            n = p[0].numel()
            last = self.buckets[-1] if self.buckets else None
            if (
                last is None
                or last.dtype != dtype
                or last.device != p.device
                or (last.numel + n) * last.itemsize > self.cap
            ):
                last = _Bucket(dtype, p.device)
                self.buckets.append(last)
            last.add(i, n)
        self.bucket_of = [0] * len(self.factors)
        for b, bucket in enumerate(self.buckets):
            bucket.allocate()
            for i in bucket.layers:
                self.bucket_of[i] = b
        device = self.factors[0].device if self.factors else torch.device("cpu")
        # Per layer: dL/dsumsq / world, then whether the rank had a gradient, a dL/dw, a dL/dsumsq;
        # last: how many ranks could not reduce a gradient. float64: the average of equal dL/dsumsq
        # values comes back equal.
        self.header = torch.zeros(len(self.factors) * _PER_LAYER + 1, dtype=torch.float64, device=device)

    def broadcast_from_first_rank(self, factors: list[torch.Tensor]) -> None:
        """Every rank starts from rank 0's factors (torch's DDP does this for the parameters it reduces)."""
        with torch.no_grad():
            for p in factors:
                dist.broadcast(p.data, src=dist.get_global_rank(self.group, 0), group=self.group)

    def arm(self, sync: bool) -> None:
        if self.queued:
            return  # a forward inside the backward pass (checkpointing): the reduction is under way
        self.mode = "sync" if sync else "local"
        if sync:
            self.check_layout()
            self.fired = [False] * len(self.factors)
            self.ready = [len(b.layers) for b in self.buckets]
            self.launched = 0
            self.works: list = []
            self.flags: list = [None] * len(self.factors)
            self.sumsq: list = [None] * len(self.factors)
            self.bad: str | None = None

    def queue_finish(self) -> None:
        if self.mode == "sync" and not self.queued:
            self.queued = True
            Variable._execution_engine.queue_callback(self.finish)

    def on_grad(self, p: torch.Tensor) -> None:
        current = p.__dict__.get(_REDUCER)
        if current is None or current() is not self:
            return  # a later wrapper of these layers reduces them
        if self.mode == "local":
            return  # no_sync(): the gradient accumulates locally, lazily
        if self.mode is None:
            raise RuntimeError(
                "dwf_kernels.parallel.DistributedDataParallel: a backward pass reached the DWF layers with no "
                "forward through the wrapper since the last reduction (a second backward pass on one forward, "
                "or a forward of .module): run the forward through the wrapper before each backward pass, as "
                "torch's DistributedDataParallel requires"
            )
        self.queue_finish()
        i = self.index[id(p)]
        if self.fired[i]:
            return
        self.fired[i] = True
        self.ready[self.bucket_of[i]] -= 1
        # Buckets start in a fixed order, the same on every rank: the collectives must match.
        while self.launched < len(self.buckets) and self.ready[self.launched] == 0:
            self.launch(self.launched)

    def launch(self, b: int) -> None:
        bucket = self.buckets[b]
        for i in bucket.layers:
            self.pack(i, bucket.slot(i))
        bucket.buffer.div_(self.world)
        self.works.append(dist.all_reduce(bucket.buffer, group=self.group, async_op=True))
        self.launched = b + 1

    def pack(self, i: int, slot: torch.Tensor) -> None:
        """Layer i's dL/dw into its bucket slot (zeros where it has none), its flags and dL/dsumsq aside."""
        p = self.factors[i]
        grad = p.grad
        state = grad._state if type(grad) is LazyFactorGrad else None
        if grad is None or (state is not None and state.kind == _ZERO):
            slot.zero_()
            self.flags[i] = (0.0 if grad is None else 1.0, 0.0, 0.0)
            return
        if state is None or state.kind != _LAZY or state.factors() is not p or state.version != p._version:
            self.bad = self.bad or _why_not_reducible(state)
            slot.zero_()
            self.flags[i] = (0.0, 0.0, 0.0)
            return
        if state.grad_w is None:
            slot.zero_()
        else:
            slot.copy_(state.grad_w.reshape(-1))
        self.sumsq[i] = state.grad_sumsq
        self.flags[i] = (1.0, float(state.grad_w is not None), float(state.grad_sumsq is not None))

    def finish(self) -> None:
        """End of the backward pass: the remaining buckets and the header all-reduced, waited for, and
        every layer given the averaged gradient."""
        self.queued = False
        self.mode = None
        try:
            while self.launched < len(self.buckets):
                self.launch(self.launched)
            if self.factors:
                head = self.header[:-1].view(-1, _PER_LAYER)
                head[:, 1:] = torch.tensor(self.flags, dtype=torch.float64)
                zero = self.header.new_zeros(())
                head[:, 0] = torch.stack([zero if s is None else s.reshape(()).to(torch.float64) for s in self.sumsq])
                head[:, 0].div_(self.world)
            self.header[-1] = 1.0 if self.bad else 0.0
            self.works.append(dist.all_reduce(self.header, group=self.group, async_op=True))
            for work in self.works:
                work.wait()
        finally:
            self.works = []
        bad = self.bad
        header = self.header.tolist()
        ranks_bad = int(header[-1])
        if ranks_bad:
            error = RuntimeError(
                f"dwf_kernels.parallel.DistributedDataParallel: on {ranks_bad} of {self.world} ranks a DWF factor "
                f"gradient could not be all-reduced as dL/dw (this rank: {bad or 'none'}). No DWF layer got an "
                "averaged gradient: clear the gradients (optimizer.zero_grad()) and run the backward pass again, "
                "without create_graph=True and without reading the factors' gradients inside no_sync()"
            )
            # Raised by a callback queued now, which runs after torch's reducer has finished its own
            # reduction (queued earlier): the wrapper stays usable for the next iteration.
            Variable._execution_engine.queue_callback(functools.partial(_raise, error))
            return
        self.unpack(header)
        self.last = {
            "grad_w_elements": sum(b.numel for b in self.buckets),
            "header_elements": self.header.numel(),
            "bytes": sum(b.numel * b.itemsize for b in self.buckets) + self.header.numel() * self.header.element_size(),
            "buckets": len(self.buckets),
        }

    def shadow(self) -> None:
        """On a rank that has joined (run out of inputs): the all-reduces of one synchronized backward
        pass, with nothing to add, so that the ranks still training can complete theirs."""
        self.check_layout()
        works = []
        for bucket in self.buckets:
            bucket.buffer.zero_()
            works.append(dist.all_reduce(bucket.buffer, group=self.group, async_op=True))
        self.header.zero_()
        works.append(dist.all_reduce(self.header, group=self.group, async_op=True))
        for work in works:
            work.wait()

    def unpack(self, header: list[float]) -> None:
        for i, p in enumerate(self.factors):
            gs, has_grad, has_gw, has_gs = header[i * _PER_LAYER : (i + 1) * _PER_LAYER]
            if not has_grad:
                continue  # no rank had a gradient: none here either, as torch's DDP leaves it
            bucket = self.buckets[self.bucket_of[i]]
            grad_w = bucket.slot(i).view(p.shape[1:]) if has_gw else None
            grad_sumsq = self.header[i * _PER_LAYER].to(bucket.dtype) if has_gs else None
            grad = p.grad
            if type(grad) is LazyFactorGrad:
                state = grad._state
                state.set_lazy(weakref.ref(p), p._version, grad_w, grad_sumsq, state.backend)
            else:
                state = _State(_LAZY)
                state.set_lazy(weakref.ref(p), p._version, grad_w, grad_sumsq, resolve_backend(p.device.type))
                p.grad = LazyFactorGrad(state, p)


class _Bucket:
    """A flat buffer holding the dL/dw of consecutive layers."""

    def __init__(self, dtype: torch.dtype, device: torch.device) -> None:
        self.dtype, self.device = dtype, device
        self.itemsize = dtype.itemsize
        self.layers: list[int] = []
        self.offsets: dict[int, tuple[int, int]] = {}
        self.numel = 0

    def add(self, i: int, n: int) -> None:
        self.layers.append(i)
        self.offsets[i] = (self.numel, n)
        self.numel += n

    def allocate(self) -> None:
        self.buffer = torch.zeros(self.numel, dtype=self.dtype, device=self.device)

    def slot(self, i: int) -> torch.Tensor:
        start, n = self.offsets[i]
        return self.buffer[start : start + n]


class _JoinHook(JoinHook):
    """torch's DDP join hook, plus the DWF reducer's part: shadowing its all-reduces while other ranks
    train, and the last joiner's factors for every rank at the end."""

    def __init__(self, inner: JoinHook, ddp: DistributedDataParallel) -> None:
        self.inner, self.ddp = inner, ddp

    def main_hook(self) -> None:
        self.inner.main_hook()
        # torch's hook has just agreed with the ranks still training whether this iteration syncs.
        if self.ddp.require_forward_param_sync:
            self.ddp._dwf.shadow()

    def post_hook(self, is_last_joiner: bool) -> None:
        self.inner.post_hook(is_last_joiner)
        reducer = self.ddp._dwf
        src = dist.get_global_rank(reducer.group, self.ddp._authoritative_rank)
        with torch.no_grad():
            for p in reducer.factors:
                dist.broadcast(p.data, src=src, group=reducer.group)


def _why_not_reducible(state: _State | None) -> str:
    if state is None:
        return (
            "a dense factor gradient: the backward ran with create_graph=True, outside the layers' fused mode "
            "(torch.func, an unwrapped copy), or another DistributedDataParallel wraps this one"
        )
    if state.kind == _DENSE:
        return (
            "a factor gradient formed before it was reduced: read (e.g. inside no_sync()), or all-reduced by "
            "another DistributedDataParallel wrapping this one"
        )
    return "a factor gradient FusedSGD already applied, or one computed before the factors changed, was not cleared"


def _timeout_of(group, device: torch.device):
    """The collectives' timeout of `group` (torch keeps it with the group's backend; None where this
    torch does not say: the default)."""
    try:
        return group._get_backend(device).options._timeout
    except (AttributeError, RuntimeError):
        return None


def _on_grad(reducer_ref, p: torch.Tensor) -> None:
    reducer = reducer_ref()
    if reducer is not None:
        reducer.on_grad(p)


def _queue_finish(reducer_ref) -> None:
    reducer = reducer_ref()
    if reducer is not None:
        reducer.queue_finish()


def _raise(error: Exception) -> None:
    raise error


def _remove(handles) -> None:
    for handle in handles:
        handle.remove()
