"""One rank of the dwf_kernels.parallel tests (spawned by test_parallel.py), and the single-process
references they are compared with.

Each scenario trains a small factorized model for a few steps on this rank's shard of one batch and
saves what the test checks to `<out_dir>/<scenario>.<rank>.pt`.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from dwf_kernels import available_backends, factorize, penalty, use_backend
from dwf_kernels.nn import DWFLinear
from dwf_kernels.optim import FusedSGD
from dwf_kernels.parallel import DistributedDataParallel

DEPTH, BATCH, STEPS, LR, MOMENTUM, LAM = 3, 16, 3, 0.1, 0.9, 1e-2
TIMEOUT_S = 123


class Net(nn.Module):
    """A factorized conv + linear body, and (with_extra) a DWF layer `extra` the forward applies
    when asked, once or twice."""

    def __init__(self, with_extra: bool) -> None:
        super().__init__()
        self.body = factorize(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10)), DEPTH)
        self.extra = DWFLinear(10, 10, depth=DEPTH) if with_extra else None

    def forward(self, x: torch.Tensor, extra_times: int = 0) -> torch.Tensor:
        out = self.body(x)
        for _ in range(extra_times):
            out = out + self.extra(out)
        return out


# What each scenario changes: the optimizer, autocast (bf16; fp16 with torch.amp.GradScaler, whose
# first step overflows and is skipped), torch.compile of the wrapped model, two micro-batches per step
# (the first under no_sync()), the model's `extra` layer and how often each rank applies it, whether
# the penalty covers it, the bucket size (1e-4 MB: one bucket per layer, in both reducers), float64
# factors, the dwf_kernels backend (default: the fastest, the C++ extension's).
SCENARIOS = {
    "fused": {},
    "sgd": {"optimizer": "sgd"},
    "bf16": {"autocast": torch.bfloat16},
    "fp16_grad_scaler": {"autocast": torch.float16, "scaler": True},
    "compiled": {"compile": True},
    "no_sync": {"micro_batches": 2},
    "partial": {"extra_times": (1, 0), "buckets_mb": 1e-4},
    "partial_penalized": {"extra_times": (1, 0), "penalize_extra": True},
    "unused": {"extra_times": (0, 0)},
    "reused": {"extra_times": (2, 2), "penalize_extra": True},
    "fp64": {"dtype": torch.float64},
    "reference_backend": {"backend": "reference"},
    "triton_backend": {"backend": "triton"},  # Triton's interpreter on CPU (TRITON_INTERPRET=1, conftest.py)
}


def runnable(scenario: str) -> bool:
    """Whether this machine runs the scenario on CPU tensors: the triton backend serves them only
    under Triton's interpreter, which conftest.py sets where no GPU is visible."""
    backend = SCENARIOS[scenario].get("backend")
    return backend is None or backend in available_backends("cpu")


def make(with_extra: bool = False, dtype: torch.dtype = torch.float32) -> Net:
    torch.manual_seed(0)
    return Net(with_extra).to(dtype)


def batch(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 1, 8, 8, generator=gen).to(dtype), torch.randint(0, 10, (BATCH,), generator=gen)


def loss_of(model, net: Net, x, y, extra_times=0, autocast=None, penalize_extra=False) -> torch.Tensor:
    """Mean cross-entropy plus the penalty of the body (and of `extra` if asked), the forward under
    autocast to the dtype `autocast` (None: not)."""
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        out = model(x, extra_times)
    return nn.functional.cross_entropy(out.float(), y) + penalty(net if penalize_extra else net.body, LAM)


def optimizer_for(kind: str, params):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)
    return FusedSGD(params, lr=LR, momentum=MOMENTUM)


def scaler_for(spec: dict) -> torch.amp.GradScaler:
    """A GradScaler (a pass-through unless the scenario asks for one) whose first step overflows in
    fp16: skipped, the scale cut to 1/256, the next steps applied."""
    return torch.amp.GradScaler("cpu", init_scale=2.0**20, backoff_factor=2.0**-8, enabled=spec.get("scaler", False))


def snapshot(net: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in net.named_parameters()}


def shards(world: int) -> list[slice]:
    return [slice(r * BATCH // world, (r + 1) * BATCH // world) for r in range(world)]


def reference(scenario: str, world: int) -> tuple[list[dict[str, torch.Tensor]], list[float]]:
    """The single-process run a scenario must equal: the whole batch, the same steps (the parameters
    after each, and the GradScaler's scale). A rank's loss is the mean over its shard; the gradient
    is the ranks' average, that of the ranks' mean loss."""
    spec = SCENARIOS[scenario]
    dtype = spec.get("dtype", torch.float32)
    times = spec.get("extra_times")
    net = make(times is not None, dtype)
    x, y = batch(dtype)
    optimizer = optimizer_for(spec.get("optimizer", "fused"), net.parameters())
    scaler = scaler_for(spec)
    options = dict(autocast=spec.get("autocast"), penalize_extra=spec.get("penalize_extra", False))
    steps, scales = [], []
    with use_backend(spec.get("backend")):
        for _ in range(STEPS):
            optimizer.zero_grad()
            losses = [
                loss_of(net, net, x[s], y[s], times[r] if times else 0, **options) for r, s in enumerate(shards(world))
            ]
            scaler.scale(sum(losses) / world).backward()
            scaler.step(optimizer)
            scaler.update()
            steps.append(snapshot(net))
            scales.append(scaler.get_scale())
    return steps, scales


def train(scenario: str, rank: int, world: int) -> dict:
    spec = SCENARIOS[scenario]
    dtype = spec.get("dtype", torch.float32)
    times = spec.get("extra_times")
    net = make(times is not None, dtype)
    x, y = batch(dtype)
    shard = shards(world)[rank]
    # (A layer unused on a rank leaves its bias to torch's reducer: find_unused_parameters.)
    model = DistributedDataParallel(net, find_unused_parameters=times is not None, bucket_cap_mb=spec.get("buckets_mb"))
    optimizer = optimizer_for(spec.get("optimizer", "fused"), model.parameters())
    reducer_elements = []

    def counting_hook(state, bucket):  # what torch's reducer (the other parameters) all-reduces
        reducer_elements.append(bucket.buffer().numel())
        return allreduce_hook(state, bucket)

    model.register_comm_hook(None, counting_hook)
    ddp = model
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    if spec.get("compile"):
        model = torch.compile(ddp)
    scaler = scaler_for(spec)
    steps, grads_none, scales, statuses = [], [], [], []
    options = dict(autocast=spec.get("autocast"), penalize_extra=spec.get("penalize_extra", False))
    with use_backend(spec.get("backend")):
        for _ in range(STEPS):
            optimizer.zero_grad()
            if spec.get("micro_batches"):  # the first micro-batch's backward local, under no_sync()
                half = (shard.stop - shard.start) // 2
                first, second = slice(shard.start, shard.start + half), slice(shard.start + half, shard.stop)
                with ddp.no_sync():
                    scaler.scale(loss_of(model, net, x[first], y[first], **options) / 2).backward()
                scaler.scale(loss_of(model, net, x[second], y[second], **options) / 2).backward()
            else:
                loss = loss_of(model, net, x[shard], y[shard], times[rank] if times else 0, **options)
                scaler.scale(loss).backward()
            if net.extra is not None:
                grads_none.append(net.extra.factors.grad is None)
            scaler.step(optimizer)
            statuses.append(getattr(net.body[0].factors.grad, "status", "dense"))  # "consumed": stepped fused
            scaler.update()
            steps.append(snapshot(net))
            scales.append(scaler.get_scale())
    return {
        "steps": steps,
        "scales": scales,
        "statuses": statuses,
        "graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before,
        "extra_grad_none": grads_none,
        "dwf_reduced": ddp.dwf_reduced,
        "reducer_elements": sum(reducer_elements) // STEPS,
    }


def joined(rank: int, world: int) -> dict[str, torch.Tensor]:
    """Uneven inputs under `model.join()`: rank r has STEPS - r batches (its shard each time). The
    ranks end with the same parameters, those of one process whose last steps average over the ranks
    still training (divided by the initial world size, as torch's DDP does)."""
    net = make()
    x, y = batch()
    model = DistributedDataParallel(net, bucket_cap_mb=1e-4)
    optimizer = optimizer_for("fused", model.parameters())
    shard = shards(world)[rank]
    with model.join():
        for _ in range(STEPS - rank):
            optimizer.zero_grad()
            loss_of(model, net, x[shard], y[shard]).backward()
            optimizer.step()
    return snapshot(net)


def joined_reference(world: int) -> dict[str, torch.Tensor]:
    net = make()
    x, y = batch()
    optimizer = optimizer_for("fused", net.parameters())
    for step in range(STEPS):
        optimizer.zero_grad()
        training = [s for r, s in enumerate(shards(world)) if step < STEPS - r]
        sum(loss_of(net, net, x[s], y[s]) / world for s in training).backward()
        optimizer.step()
    return snapshot(net)


def overlap(rank: int, world: int) -> list[str]:
    """The order of the DWF reducer's all-reduce launches and the arrival of the first layer's
    gradient (the last of the backward pass), with one bucket per layer."""
    net = make()
    x, y = batch()
    model = DistributedDataParallel(net, bucket_cap_mb=1e-4)
    events = []
    all_reduce = dist.all_reduce

    def recording(tensor, *args, **kwargs):
        events.append(f"all_reduce {tensor.numel()}")
        return all_reduce(tensor, *args, **kwargs)

    # Runs as the gradient reaches the factors, before it is accumulated (and the reducer sees it).
    net.body[0].factors.register_hook(lambda grad: events.append("first layer's gradient"))
    dist.all_reduce = recording
    try:
        loss_of(model, net, x, y).backward()
    finally:
        dist.all_reduce = all_reduce
    return events


def refusals(rank: int, world: int) -> dict[str, str]:
    """The errors of the patterns refused, raised alike on every rank; training goes on after them."""
    errors = {}
    net = make()
    x, y = batch()
    model = DistributedDataParallel(net)
    optimizer = FusedSGD(model.parameters(), lr=LR)
    with model.no_sync():
        loss_of(model, net, x, y).backward()
    if rank == 0:
        net.body[0].factors.grad.sum()  # formed before the reduction: only rank 0 cannot send dL/dw
    try:
        loss_of(model, net, x, y).backward()
    except RuntimeError as e:
        errors["formed"] = str(e)
    optimizer.zero_grad()
    loss_of(model, net, x, y).backward()
    optimizer.step()
    errors["then_trains"] = "yes"
    optimizer.zero_grad()
    loss = loss_of(model, net, x, y)
    loss.backward(retain_graph=True)
    try:
        loss.backward()
    except RuntimeError as e:
        errors["second_backward"] = str(e)
    try:
        DistributedDataParallel(factorize(nn.Sequential(nn.Linear(4, 4, bias=False)), DEPTH))
    except ValueError as e:
        errors["only_factors"] = str(e)
    try:
        DistributedDataParallel(model)
    except ValueError as e:
        errors["nested"] = str(e)
    # Wrapped again while the first wrapper lives: the new one reduces, the old one stands aside.
    again = DistributedDataParallel(net)
    optimizer.zero_grad()
    loss_of(again, net, x, y).backward()
    optimizer.step()
    errors["rewrapped_trains"] = "yes" if model is not None else "no"
    errors["ignore_list_left"] = str(hasattr(net, "_ddp_params_and_buffers_to_ignore"))
    # The DWF reducer's own process group waits as long as torch's does for a rank that stops.
    errors["timeout_s"] = str(model._dwf.group._get_backend(torch.device("cpu")).options._timeout.total_seconds())
    return errors


def run(rank: int, world: int, init_file: str, out_dir: str) -> None:
    timeout = datetime.timedelta(seconds=TIMEOUT_S)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timeout)
    try:
        results = {}
        for scenario in filter(runnable, SCENARIOS):
            results[scenario] = train(scenario, rank, world)
        results["fused_again"] = train("fused", rank, world)
        results["joined"] = joined(rank, world)
        results["overlap"] = overlap(rank, world)
        results["refusals"] = refusals(rank, world)
        torch.save(results, f"{out_dir}/results.{rank}.pt")
        dist.barrier()  # no rank tears the group down while another still talks to it
    finally:
        dist.destroy_process_group()
