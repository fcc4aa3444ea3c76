"""One rank of the DistributedDataParallel test (spawned by test_ddp.py)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dwf_kernels import factorize, penalty

LAM, DEPTH, BATCH = 1e-2, 3, 16


def make_model_and_data() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    factorize(model, depth=DEPTH)
    x = torch.randn(BATCH, 1, 8, 8)
    y = torch.randint(0, 10, (BATCH,))
    return model, x, y


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), y) + penalty(model, LAM)


def run(rank: int, world: int, init_file: str, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
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
