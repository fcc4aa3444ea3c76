"""FusedSGD.step() alone: all layers of a set in one op call (multi_tensor=True) against one op call
per layer (multi_tensor=False), interleaved step by step in one process, CPU (or the current GPU).

    PYTHONPATH=python python bench/fused_sgd_step.py --markdown bench/results/cpu-fused-sgd-step.md

Models: 64 DWF layers of 64x64 (D=4; a stack of Linear layers), and ResNet-18 (CIFAR shapes, D=4).
Each round runs forward and backward on both twins (not timed), then times each one's
optimizer.step() (momentum 0.9) in turn: on CPU by the host clock, on a GPU by CUDA events around the
step, read after the run (its span on the device, which includes the host's launch gaps wherever
the device waits for them). Reports the median step time with its 20th-80th percentile spread,
the speed-up, and the dwf_kernels op calls per step that torch.profiler records for each
(dwf_sgd_step_multi, and on CPU sgd_step_multi for the biases, against one dwf_sgd_step per layer:
O(sets of layers) against O(layers)).
"""

from __future__ import annotations

import argparse
import copy
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
    sys.exit("fused_sgd_step.py: run it with python/ on PYTHONPATH (PYTHONPATH=python python bench/...)")


def make(name: str, device: str):
    torch.manual_seed(0)
    if name == "64x(64x64)":
        model, shape = nn.Sequential(*[nn.Linear(64, 64) for _ in range(64)]), (64,)
    else:
        model, shape = build_model("resnet18", (3, 32, 32), 10), (3, 32, 32)
    return dwf_kernels.factorize(model, 4).to(device), shape


def op_calls(model, optimizer, batch) -> dict[str, int]:
    loss(model, batch).backward()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        optimizer.step()
    optimizer.zero_grad()
    counts = {e.key: e.count for e in prof.key_averages() if e.key.startswith("dwf_kernels::")}
    return counts


def loss(model, batch):
    x, y = batch
    out = model(x)
    return nn.functional.cross_entropy(out.reshape(out.shape[0], -1)[:, :10], y) + dwf_kernels.penalty(model, 1e-4)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="64x(64x64),resnet18")
    p.add_argument("--batch", type=int, default=16, help="the batch of the (untimed) forward and backward")
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--markdown", default=None)
    a = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows = []
    for name in a.models.split(","):
        model, shape = make(name, device)
        twins = {"multi": model, "per-layer": copy.deepcopy(model)}
        optimizers = {
            k: FusedSGD(m.parameters(), lr=0.01, momentum=0.9, multi_tensor=(k == "multi")) for k, m in twins.items()
        }
        gen = torch.Generator().manual_seed(1)
        batch = (
            torch.randn(a.batch, *shape, generator=gen).to(device),
            torch.randint(0, 10, (a.batch,), generator=gen).to(device),
        )
        calls = {k: op_calls(twins[k], optimizers[k], batch) for k in twins}
        times = {k: [] for k in twins}
        events = {k: [] for k in twins}
        for r in range(a.rounds + 3):
            for k in twins:
                optimizers[k].zero_grad()
                loss(twins[k], batch).backward()
                if device == "cuda":  # device time from the step's first launch to its last, no sync per step
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    optimizers[k].step()
                    end.record()
                    if r >= 3:
                        events[k].append((start, end))
                    continue
                start = time.perf_counter()
                optimizers[k].step()
                if r >= 3:
                    times[k].append(time.perf_counter() - start)
        sync()
        for k, pairs in events.items():
            times[k] += [1e-3 * s.elapsed_time(e) for s, e in pairs]
        for pa, qa in zip(twins["multi"].parameters(), twins["per-layer"].parameters(), strict=True):
            assert torch.equal(pa, qa), "the two step paths must give the same parameters"
        med = {k: statistics.median(t) for k, t in times.items()}
        spread = {k: statistics.quantiles(t, n=5) for k, t in times.items()}  # p20, p40, p60, p80
        layers = len(dwf_kernels.model.dwf_layers(model))

        def fmt(counts):
            return ", ".join(f"{n.split('::')[1]} {c}" for n, c in sorted(counts.items())) or "none"

        cells = {
            k: f"{1e3 * med[k]:.3f} ({1e3 * spread[k][0]:.3f}-{1e3 * spread[k][3]:.3f}; {fmt(calls[k])})" for k in twins
        }
        rows.append(
            f"| {name} | {layers} | {cells['multi']} | {cells['per-layer']} | {med['per-layer'] / med['multi']:.2f}x |"
        )
        print(rows[-1], flush=True)
    where = (
        torch.cuda.get_device_name()
        if device == "cuda"
        else f"cpu {platform.machine()}, {torch.get_num_threads()} threads"
    )
    head = [
        f"FusedSGD.step() (momentum 0.9, D=4), ms per step (median of {a.rounds}, interleaved; p20-p80) with "
        f"the dwf_kernels op calls of one step; {where}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}. "
        "The two paths' parameters are checked equal after the run.",
        "",
        "| model | DWF layers | multi_tensor=True | multi_tensor=False | speed-up |",
        "|---|---|---|---|---|",
    ]
    emit(head, rows, a.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
