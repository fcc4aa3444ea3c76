"""One rank of the dwf_kernels.parallel tests (spawned by test_parallel.py), and the single-process
references they are compared with.

Each scenario trains a small factorized model for a few steps on this rank's shard of one batch and
saves what the test checks to `<out_dir>/<scenario>.<rank>.pt`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from dwf_kernels import factorize, penalty
from dwf_kernels.nn import DWFLinear
from dwf_kernels.optim import FusedSGD
from dwf_kernels.parallel import DistributedDataParallel

DEPTH, BATCH, STEPS, LR, MOMENTUM, LAM = 3, 16, 3, 0.1, 0.9, 1e-2


class Net(nn.Module):
    """A factorized conv + linear body, and (with_extra) a DWF layer `extra` the forward uses only
    when asked."""

    def __init__(self, with_extra: bool) -> None:
        super().__init__()
        self.body = factorize(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10)), DEPTH)
        self.extra = DWFLinear(10, 10, depth=DEPTH) if with_extra else None

    def forward(self, x: torch.Tensor, use_extra: bool = False) -> torch.Tensor:
        out = self.body(x)
        return out + self.extra(out) if use_extra else out


# The scenarios whose model has the layer `extra` (its bias goes unused: torch's reducer inside the
# wrapper then needs find_unused_parameters=True).
WITH_EXTRA = ("partial", "unused")


def make(with_extra: bool = False) -> Net:
    torch.manual_seed(0)
    return Net(with_extra)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 1, 8, 8, generator=gen), torch.randint(0, 10, (BATCH,), generator=gen)


def loss_of(model, net: Net, x, y, use_extra=False, autocast=False) -> torch.Tensor:
    """Mean cross-entropy plus the penalty of the body (`extra` is not penalized)."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x, use_extra)
    return nn.functional.cross_entropy(out.float(), y) + penalty(net.body, LAM)


def optimizer_for(kind: str, params):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)
    return FusedSGD(params, lr=LR, momentum=MOMENTUM)


def snapshot(net: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in net.named_parameters()}


def reference(scenario: str, world: int) -> list[dict[str, torch.Tensor]]:
    """The single-process run a scenario must equal: the whole batch, the same steps (a rank's mean
    loss is over its shard; the ranks' average is the mean over the batch)."""
    net = make(scenario in WITH_EXTRA)
    x, y = batch()
    optimizer = optimizer_for("sgd" if scenario == "sgd" else "fused", net.parameters())
    shards = [slice(r * BATCH // world, (r + 1) * BATCH // world) for r in range(world)]
    steps = []
    for _ in range(STEPS):
        optimizer.zero_grad()
        if scenario == "partial":  # rank 0 alone runs the extra layer
            loss = sum(loss_of(net, net, x[s], y[s], use_extra=r == 0) for r, s in enumerate(shards)) / world
        else:
            loss = loss_of(net, net, x, y, autocast=scenario == "bf16")
        loss.backward()
        optimizer.step()
        steps.append(snapshot(net))
    return steps


def train(scenario: str, rank: int, world: int) -> dict:
    net = make(scenario in WITH_EXTRA)
    x, y = batch()
    shard = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    model = DistributedDataParallel(net, find_unused_parameters=scenario in WITH_EXTRA)
    optimizer = optimizer_for(scenario, model.parameters())
    reducer_elements = []

    def counting_hook(state, bucket):  # what torch's reducer (the other parameters) all-reduces
        reducer_elements.append(bucket.buffer().numel())
        return allreduce_hook(state, bucket)

    model.register_comm_hook(None, counting_hook)
    steps, grads_none = [], []
    for _ in range(STEPS):
        optimizer.zero_grad()
        if scenario == "no_sync":  # two micro-batches per step, the first one's backward local
            half = (shard.stop - shard.start) // 2
            first, second = slice(shard.start, shard.start + half), slice(shard.start + half, shard.stop)
            with model.no_sync():
                (loss_of(model, net, x[first], y[first]) / 2).backward()
            (loss_of(model, net, x[second], y[second]) / 2).backward()
        else:
            use_extra = scenario == "partial" and rank == 0
            loss_of(model, net, x[shard], y[shard], use_extra, autocast=scenario == "bf16").backward()
        if net.extra is not None:
            grads_none.append(net.extra.factors.grad is None)
        optimizer.step()
        steps.append(snapshot(net))
    return {
        "steps": steps,
        "extra_grad_none": grads_none,
        "dwf_reduced": model.dwf_reduced,
        "reducer_elements": sum(reducer_elements) // STEPS,
    }


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
    errors["ignore_list_left"] = str(hasattr(net, "_ddp_params_and_buffers_to_ignore"))
    return errors


def run(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {}
        for scenario in ("fused", "fused_again", "sgd", "bf16", "no_sync", "partial", "unused"):
            results[scenario] = train("fused" if scenario == "fused_again" else scenario, rank, world)
        results["overlap"] = overlap(rank, world)
        results["refusals"] = refusals(rank, world)
        torch.save(results, f"{out_dir}/results.{rank}.pt")
        dist.barrier()  # no rank tears the group down while another still talks to it
    finally:
        dist.destroy_process_group()
