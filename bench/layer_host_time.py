"""Host time a DWF layer adds to a training step: a stack of small Linear layers, dense with
torch.optim.SGD against DWF (FusedSGD, fused mode) with the penalty, steps alternated in one process.

    python bench/layer_host_time.py                      # 16 layers of 16x16, batch 1, one thread, CPU
    python bench/layer_host_time.py --device cuda --threads 0

The layers are so small that the step is host time: the Python and dispatcher work per layer, which
on a GPU decides whether an eager step keeps the device busy. Each part of a step (forward with the
loss, backward, optimizer step) is timed by the host clock, without a device sync per step (on a GPU
the launches run ahead; the tiny kernels keep the queue short). Prints the median per part of both
models and the DWF model's extra time per layer, over --steps steps after --warmup.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import torch
from torch import nn

import dwf_kernels
from dwf_kernels.optim import FusedSGD

PARTS = ("forward", "backward", "step", "whole")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch's CPU threads (0: leave torch's default)")
    a = p.parse_args(argv)
    for name in ("layers", "width", "batch", "depth", "steps"):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be >= 1; got {getattr(a, name)}")
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    models = {
        "dense": nn.Sequential(*[nn.Linear(a.width, a.width) for _ in range(a.layers)]).to(a.device),
        "dwf": dwf_kernels.factorize(
            nn.Sequential(*[nn.Linear(a.width, a.width) for _ in range(a.layers)]), a.depth
        ).to(a.device),
    }
    # lr small enough that a long run stays finite (the loss is an unbounded sum)
    optimizers = {
        "dense": torch.optim.SGD(models["dense"].parameters(), lr=1e-6, momentum=0.9),
        "dwf": FusedSGD(models["dwf"].parameters(), lr=1e-6, momentum=0.9),
    }
    x = torch.randn(a.batch, a.width, device=a.device)
    times = {k: {part: [] for part in PARTS} for k in models}
    for i in range(a.warmup + a.steps):
        for k in ("dense", "dwf") if i % 2 else ("dwf", "dense"):
            model, optimizer = models[k], optimizers[k]
            optimizer.zero_grad()
            t0 = time.perf_counter()
            loss = model(x).sum()
            if k == "dwf":
                loss = loss + dwf_kernels.penalty(model, 1e-4)
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            optimizer.step()
            t3 = time.perf_counter()
            if i >= a.warmup:
                for part, seconds in zip(PARTS, (t1 - t0, t2 - t1, t3 - t2, t3 - t0), strict=True):
                    times[k][part].append(seconds)
    if a.device == "cuda":
        torch.cuda.synchronize()
    med = {k: {part: 1e6 * statistics.median(v) for part, v in parts.items()} for k, parts in times.items()}
    where = torch.cuda.get_device_name() if a.device == "cuda" else f"cpu {platform.machine()}"
    print(
        f"{a.layers} x Linear({a.width}, {a.width}), batch {a.batch}, D={a.depth}, {where}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}; "
        f"median of {a.steps} alternated steps, us"
    )
    print()
    print("| part | dense + torch.optim.SGD | DWF + FusedSGD | DWF's extra per layer |")
    print("|---|---|---|---|")
    for part in PARTS:
        extra = (med["dwf"][part] - med["dense"][part]) / a.layers
        print(f"| {part} | {med['dense'][part]:.0f} | {med['dwf'][part]:.0f} | {extra:+.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
