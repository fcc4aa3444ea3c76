"""Training-step cost of factorize's general mechanism (the DWFWeight parametrization) against the
exact-class DWF layers, on the same model.

    python bench/general_train_step.py --threads 1 --json bench/results/cpu-general-train-step.json \
        --markdown bench/results/cpu-general-train-step.md

Each model is built twice from one seed: with torch.nn.Linear/Conv2d, which factorize replaces by
DWFLinear/DWFConv2d, and with trivial subclasses of them (no new behaviour), which it parametrizes
instead (their own forward reads `self.weight`, the product). Both compute the same function with
the same fused op from the same factors. One step = forward + penalty + backward +
optimizer step (FusedSGD, or torch.optim.SGD: the unfused path), momentum 0.9. For each optimizer
the two mechanisms take turns step by step in one process (dwf_kernels.sparse.interleaved_medians),
half the rounds in each order, so drift of the machine lands on both alike; the table gives the
mean of the two orders' median step times and the parametrization's overhead.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch
from providers import versions  # beside this file, first on a script's sys.path
from torch import nn

import dwf_kernels
from dwf_kernels.optim import FusedSGD
from dwf_kernels.sparse import interleaved_medians


class SubLinear(nn.Linear):
    """nn.Linear by another class: factorize parametrizes its weight."""


class SubConv2d(nn.Conv2d):
    """nn.Conv2d by another class: factorize parametrizes its weight."""


def lenet300(linear):
    return nn.Sequential(
        nn.Flatten(), linear(784, 300), nn.ReLU(), linear(300, 100), nn.ReLU(), linear(100, 10)
    ), (1, 28, 28)


def mlp1024(linear):
    return nn.Sequential(
        nn.Flatten(), linear(1024, 1024), nn.ReLU(), linear(1024, 1024), nn.ReLU(), linear(1024, 10)
    ), (1024,)


def tiny(linear):
    """Eight 16x16 layers: the step is host time, so the mechanism's per-layer cost shows."""
    layers = [m for _ in range(8) for m in (linear(16, 16), nn.Tanh())]
    return nn.Sequential(*layers[:-1]), (16,)


def cnn(linear, conv=None):
    conv = conv or nn.Conv2d
    return nn.Sequential(
        conv(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), conv(32, 64, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), linear(64 * 8 * 8, 10),
    ), (3, 32, 32)  # fmt: skip


MODELS = {"tiny": tiny, "lenet300": lenet300, "mlp1024": mlp1024, "cnn": cnn}


def build(name: str, general: bool, depth: int):
    """The model factorized with DWF layers, or (general) with parametrizations holding the same factors."""
    models = []
    for sub in (False, True) if general else (False,):
        torch.manual_seed(0)
        make = MODELS[name]
        if name == "cnn":
            model, shape = make(SubLinear if sub else nn.Linear, SubConv2d if sub else nn.Conv2d)
        else:
            model, shape = make(SubLinear if sub else nn.Linear)
        models.append(dwf_kernels.factorize(model, depth))
    if general:  # the DWF layers' factors, so that both compute on the same numbers
        layers = [p for n, p in models[0].named_parameters() if n.endswith(".factors")]
        held = [p for n, p in models[1].named_parameters() if n.endswith(".original")]
        with torch.no_grad():
            for a, b in zip(layers, held, strict=True):
                b.copy_(a)
    return models[-1], shape


def step_fn(model, optimizer, x, y, lam):
    def step():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y) + dwf_kernels.penalty(model, lam)
        loss.backward()
        optimizer.step()

    return step


def measure(name: str, depth: int, batch: int, rounds: int, lam: float = 1e-4) -> list[dict]:
    """Per optimizer, the two mechanisms' steps interleaved: half the rounds in one order, half in the
    other (the step that runs second in a round was seen to gain or lose up to 10% by its place)."""
    rows = []
    for opt_name in ("FusedSGD", "torch.optim.SGD"):
        calls = {}
        for general in (False, True):
            model, shape = build(name, general, depth)
            if opt_name == "FusedSGD":
                optimizer = FusedSGD(model.parameters(), lr=0.01, momentum=0.9)
            else:
                optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            gen = torch.Generator().manual_seed(2)
            x = torch.randn(batch, *shape, generator=gen)
            y = torch.randint(0, 10 if name != "tiny" else 16, (batch,), generator=gen)
            calls["parametrization" if general else "DWF layers"] = step_fn(model, optimizer, x, y, lam)
        first = interleaved_medians(calls, rounds // 2)
        second = interleaved_medians(dict(reversed(list(calls.items()))), rounds - rounds // 2)
        layers, param = ((first[k] + second[k]) / 2 for k in ("DWF layers", "parametrization"))
        rows.append(
            dict(model=name, batch=batch, optimizer=opt_name, layers_ms=1e3 * layers, parametrization_ms=1e3 * param,
                 overhead=param / layers - 1.0)  # fmt: skip
        )
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"Training step (forward + penalty + backward + SGD momentum), D={meta['depth']}, "
        f"{meta['rounds']} interleaved rounds; {meta['machine']}; torch {meta['torch']}; {meta['date']}.",
        "",
        "| model | batch | optimizer | DWF layers ms | parametrization ms | overhead |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['optimizer']} | {r['layers_ms']:.2f} | "
            f"{r['parametrization_ms']:.2f} | {100 * r['overhead']:+.0f}% |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--batches", default="1,128", help="batch sizes (1: host time per step dominates)")
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--markdown", help="write the table here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        for name in args.models.split(","):
            rows += measure(name, args.depth, batch, args.rounds)
    meta = dict(
        depth=args.depth, rounds=args.rounds, date=time.strftime("%Y-%m-%d"),
        machine=f"{platform.machine()} cpu, {torch.get_num_threads()} threads", **versions(),
    )  # fmt: skip
    table = markdown(rows, meta)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
