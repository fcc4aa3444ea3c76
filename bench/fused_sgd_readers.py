"""FusedSGD's training step under gradient clipping and GradScaler, interleaved step by step, CPU.

    PYTHONPATH=python python bench/fused_sgd_readers.py --markdown bench/results/cpu-fused-sgd-readers.md

One step = forward + backward + reader + optimizer step at batch 128, D=4, DWF penalty, momentum
0.9, where the reader is clip_grad_norm_(1.0), or GradScaler (scale, unscale_, step, update), or
both. Variants, alternating step by step in one process so all see the same machine state:
- fused: FusedSGD; the readers scale dL/dw and take the norm from dwf_grad_sumsq, the step is fused;
- formed: FusedSGD with every factor gradient formed before the reader (as any element-wise read
  does, and as every reader did before they were answered from dL/dw): the step is torch's;
- torch: the same DWF model (fused forward and backward) with torch.optim.SGD.
Models: LeNet-300-100 and LeNet-5 (MNIST shapes), and an MLP of four 1024x1024 layers (memory-bound
factor traffic). Reports the median step time of each variant and its ratio to torch.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import torch
from _table import emit  # bench/ is the script's folder, first on sys.path
from torch import nn

import dwf_kernels
from dwf_kernels.optim import FusedSGD

try:
    from paper.models import build_model
except ImportError:
    sys.exit("fused_sgd_readers.py: run it with python/ on PYTHONPATH (PYTHONPATH=python python bench/...)")

READERS = ("clip", "scaler", "scaler+clip")


def make_model(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    if name == "mlp4x1024":
        layers = [m for _ in range(4) for m in (nn.Linear(1024, 1024), nn.ReLU())]
        return nn.Sequential(*layers, nn.Linear(1024, 10)), (1024,)
    return build_model(name, (1, 28, 28), 10), (1, 28, 28)


def make_step(name: str, variant: str, reader: str, batch: int):
    model, in_shape = make_model(name)
    dwf_kernels.factorize(model, 4)
    sgd = torch.optim.SGD if variant == "torch" else FusedSGD
    optimizer = sgd(model.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if "scaler" in reader else None
    x, y = torch.randn(batch, *in_shape), torch.randint(0, 10, (batch,))
    factors = [p for n, p in model.named_parameters() if n.endswith("factors")]

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y) + dwf_kernels.penalty(model, 1e-4)
        (scaler.scale(loss) if scaler else loss).backward()
        if variant == "formed":
            for p in factors:
                p.grad.add_(0.0)  # an element-wise read: forms the dense factor gradient
        if scaler:
            scaler.unscale_(optimizer)
        if "clip" in reader:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()

    return step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="lenet300,lenet5,mlp4x1024")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--markdown", default=None)
    a = p.parse_args(argv)
    rows = []
    for name in a.models.split(","):
        for reader in READERS:
            steps = {v: make_step(name, v, reader, a.batch) for v in ("fused", "formed", "torch")}
            times = {v: [] for v in steps}
            for _ in range(3):
                for fn in steps.values():
                    fn()
            for _ in range(a.rounds):
                for v, fn in steps.items():
                    start = time.perf_counter()
                    fn()
                    times[v].append(time.perf_counter() - start)
            med = {v: statistics.median(t) for v, t in times.items()}
            rows.append(
                f"| {name} | {reader} | "
                + " | ".join(f"{1e3 * med[v]:.2f} ({med['torch'] / med[v]:.2f}x)" for v in ("fused", "formed"))
                + f" | {1e3 * med['torch']:.2f} |"
            )
            print(rows[-1], flush=True)
    head = [
        f"FusedSGD under gradient clipping and GradScaler: training step, ms (median of {a.rounds}, interleaved), "
        f"speed-up over torch.optim.SGD in brackets. Batch {a.batch}, D=4. cpu {platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}.",
        "",
        "| model | reader | FusedSGD, fused readers | FusedSGD, gradient formed first | torch.optim.SGD |",
        "|---|---|---|---|---|",
    ]
    emit(head, rows, a.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
