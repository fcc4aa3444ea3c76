"""One rank of the DistributedDataParallel tests (spawned by test_ddp.py)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dwf_kernels import factorize, penalty
from dwf_kernels.nn import DWFLinear
from dwf_kernels.optim import FusedSGD

LAM, DEPTH, BATCH, STEPS, LR, MOMENTUM = 1e-2, 3, 16, 3, 0.1, 0.9


class WithSpareLayer(nn.Module):
    """The model plus a DWF layer its forward never uses (for find_unused_parameters=True)."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.spare = DWFLinear(3, 3, depth=DEPTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class SubclassedConv(nn.Conv2d):
    """A Conv2d subclass (factorize gives it a DWFWeight parametrization, not a DWF layer)."""


class Attending(nn.Module):
    """MultiheadAttention over the rows of the conv's output: parametrized projection weights."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(6, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.flatten(1, 2)  # (batch, channels * rows, columns)
        return self.attention(rows, rows, rows, need_weights=False)[0]


def make_model_and_data(spare: bool = False, general: bool = False) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """general: a model whose weights factorize holds in DWFWeight parametrizations (a Conv2d subclass,
    attention) beside a DWF layer."""
    torch.manual_seed(0)
    if general:
        body = [SubclassedConv(1, 4, 3), nn.ReLU(), Attending(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10)]
        model = nn.Sequential(*body)
    else:
        model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    factorize(model, depth=DEPTH)
    if spare:
        model = WithSpareLayer(model)
    x = torch.randn(BATCH, 1, 8, 8)
    y = torch.randint(0, 10, (BATCH,))
    return model, x, y


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor, penalized: nn.Module | None = None) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), y) + penalty(model if penalized is None else penalized, LAM)


def _init(rank: int, world: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)


def run(rank: int, world: int, init_file: str, out_file: str) -> None:
    _init(rank, world, init_file)
    try:
        model, x, y = make_model_and_data()
        ddp = DistributedDataParallel(model)
        shard = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        loss_of(ddp, x[shard], y[shard]).backward()
        if rank == 0:
            torch.save({name: p.grad for name, p in model.named_parameters()}, out_file)
        dist.barrier()  # no rank tears the group down while another still talks to it
    finally:
        dist.destroy_process_group()


def train(
    rank: int, world: int, init_file: str, out_file: str, fused_first: bool, find_unused: bool, general: bool = False
) -> None:
    """STEPS steps of FusedSGD on this rank's shard under DDP; saves the parameters to out_file.rank.

    fused_first: the optimizer exists before the process group does (and so before DDP).
    """
    model, x, y = make_model_and_data(spare=find_unused, general=general)
    body = model.body if find_unused else model
    if fused_first:
        optimizer = FusedSGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    _init(rank, world, init_file)
    try:
        if not fused_first:
            optimizer = FusedSGD(model.parameters(), lr=LR, momentum=MOMENTUM)
        ddp = DistributedDataParallel(model, find_unused_parameters=find_unused)
        shard = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        for _ in range(STEPS):
            optimizer.zero_grad()
            loss_of(ddp, x[shard], y[shard], penalized=body).backward()
            optimizer.step()
        torch.save({name: p.detach().clone() for name, p in model.named_parameters()}, f"{out_file}.{rank}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def train_single_process(find_unused: bool, general: bool = False) -> nn.Module:
    """The reference: torch.optim.SGD on the whole batch in one process."""
    model, x, y = make_model_and_data(spare=find_unused, general=general)
    body = model.body if find_unused else model
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss_of(model, x, y, penalized=body).backward()
        optimizer.step()
    return model
