"""Data-parallel DWF training: dwf_kernels.parallel.DistributedDataParallel + FusedSGD against torch's
DistributedDataParallel + torch.optim.SGD, on 2 gloo processes of this machine (CPU).

    PYTHONPATH=python python bench/data_parallel.py --markdown bench/results/cpu-data-parallel.md

For each model (LeNet-300-100 on MNIST shapes, ResNet-18 on CIFAR shapes; D=4) and per-rank batch,
every rank holds both twins (the same factorized model) and times a whole training step of each
(zero_grad, forward, backward with its all-reduces, optimizer step; momentum 0.9) in turn, the order
alternating per round, the ranks aligned by a barrier before each timed step. Reports the median
step time of rank 0 with its 20th-80th percentile spread, the speed-up, and the bytes all-reduced per
step: all of them (torch's reducer, counted by a comm hook, plus the DWF reducer's buckets and header)
and those of the DWF weights alone (torch's DDP: the D x N factor gradients; the DWF reducer: dL/dw,
N per weight, and its header of 4 numbers per layer + 1). After the run, the largest difference
between the twins' parameters.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _table import emit  # bench/ is the script's folder, first on sys.path
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel as TorchDDP

import dwf_kernels
from dwf_kernels.optim import FusedSGD
from dwf_kernels.parallel import DistributedDataParallel as DWFDDP

try:
    from paper.models import build_model
except ImportError:
    sys.exit("data_parallel.py: run it with python/ on PYTHONPATH (PYTHONPATH=python python bench/...)")

SHAPES = {"lenet300": (1, 28, 28), "resnet18": (3, 32, 32)}
DEPTH, LAM, LR, MOMENTUM = 4, 1e-4, 0.01, 0.9


def counted(model, counter: list[int]):
    def hook(state, bucket):
        counter[0] += bucket.buffer().numel() * bucket.buffer().element_size()
        return allreduce_hook(state, bucket)

    model.register_comm_hook(None, hook)
    return model


def step(model, optimizer, x, y) -> None:
    optimizer.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y) + dwf_kernels.penalty(model, LAM)
    loss.backward()
    optimizer.step()


def measure(rank: int, world: int, name: str, batch: int, rounds: int) -> dict | None:
    torch.manual_seed(0)
    base = dwf_kernels.factorize(build_model(name, SHAPES[name], 10), DEPTH)
    counters = {"dwf": [0], "ddp": [0]}
    models = {
        "dwf": counted(DWFDDP(copy.deepcopy(base)), counters["dwf"]),
        "ddp": counted(TorchDDP(copy.deepcopy(base)), counters["ddp"]),
    }
    optimizers = {
        "dwf": FusedSGD(models["dwf"].parameters(), lr=LR, momentum=MOMENTUM),
        "ddp": torch.optim.SGD(models["ddp"].parameters(), lr=LR, momentum=MOMENTUM),
    }
    gen = torch.Generator().manual_seed(1 + rank)
    x = torch.randn(batch, *SHAPES[name], generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    for k in models:  # warm-up, and one step's bytes
        counters[k][0] = 0
        step(models[k], optimizers[k], x, y)
    reducer_bytes = {k: c[0] for k, c in counters.items()}
    times = {k: [] for k in models}
    for r in range(rounds):
        for k in ("dwf", "ddp") if r % 2 == 0 else ("ddp", "dwf"):
            dist.barrier()
            start = time.perf_counter()
            step(models[k], optimizers[k], x, y)
            times[k].append(time.perf_counter() - start)
    factors = [p for n, p in base.named_parameters() if dwf_kernels._fusion.link_of(p) is not None]
    reduced = models["dwf"].dwf_reduced
    diff = max(
        (a - b).abs().max().item()
        for a, b in zip(models["dwf"].module.parameters(), models["ddp"].module.parameters(), strict=True)
    )
    if rank != 0:
        return None
    return {
        "times": times,
        "bytes": {"dwf": reducer_bytes["dwf"] + reduced["bytes"], "ddp": reducer_bytes["ddp"]},
        "dwf_weight_bytes": {
            "ddp": sum(p.numel() * p.element_size() for p in factors),
            "dwf": reduced["grad_w_elements"] * 4,
            "header": reduced["header_elements"] * 8,
        },
        "diff": diff,
    }


def run(rank: int, world: int, init_file: str, plan: list, out_file: str, threads: int) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = [measure(rank, world, name, batch, rounds) for name, batch, rounds in plan]
        if rank == 0:
            torch.save(results, out_file)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="lenet300,resnet18")
    p.add_argument("--batches", default="16,128", help="per-rank batch sizes")
    p.add_argument("--rounds", default="lenet300=40,resnet18=8", help="timed steps per twin, per model")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--markdown", default=None)
    a = p.parse_args(argv)
    rounds = dict(item.split("=") for item in a.rounds.split(","))
    plan = [(m, int(b), int(rounds[m])) for m in a.models.split(",") for b in a.batches.split(",")]
    threads = max(1, (os.cpu_count() or 1) // a.world)
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "results.pt")
        mp.spawn(run, args=(a.world, os.path.join(tmp, "init"), plan, out_file, threads), nprocs=a.world, join=True)
        results = torch.load(out_file)
    rows = []
    for (name, batch, _), res in zip(plan, results, strict=True):
        med = {k: statistics.median(t) for k, t in res["times"].items()}
        spread = {k: statistics.quantiles(t, n=5) for k, t in res["times"].items()}
        w = res["dwf_weight_bytes"]
        cells = {k: f"{1e3 * med[k]:.1f} ({1e3 * spread[k][0]:.1f}-{1e3 * spread[k][3]:.1f})" for k in med}
        rows.append(
            f"| {name} | {batch} | {cells['dwf']} | {cells['ddp']} | {med['ddp'] / med['dwf']:.2f}x "
            f"| {res['bytes']['dwf']:,} | {res['bytes']['ddp']:,} "
            f"| {w['dwf']:,} + {w['header']:,} | {w['ddp']:,} | {w['ddp'] / w['dwf']:.3f} | {res['diff']:.1e} |"
        )
        print(rows[-1], flush=True)
    head = [
        f"One training step (forward, backward, all-reduce, SGD step with momentum {MOMENTUM}; D={DEPTH}), "
        f"{a.world} gloo processes of {threads} thread(s) on cpu {platform.machine()} ({os.cpu_count()} cores), "
        f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}. ms per step on rank 0 (median, p20-p80; "
        "interleaved), bytes all-reduced per step, and the DWF weights' share of them.",
        "",
        "| model | batch per rank | dwf_kernels DDP + FusedSGD | torch DDP + SGD | speed-up "
        "| bytes (dwf_kernels) | bytes (torch) | DWF weights: dL/dw + header | DWF weights: factor gradients "
        "| ratio | max param diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    emit(head, rows, a.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
