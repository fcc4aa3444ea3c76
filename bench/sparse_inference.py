"""Sparse inference against dense, interleaved call by call: end-to-end, per layer, and the
break-even density per layer type and batch size, CPU.

    PYTHONPATH=python python bench/sparse_inference.py --file runs/train/model.dwfz \
        --markdown bench/results/cpu-sparse-inference.md \
        --break-even-markdown bench/results/cpu-sparse-break-even.md   # the main job's own model
    PYTHONPATH=python python bench/sparse_inference.py            # LeNet-300-100 magnitude-pruned

(python/ on PYTHONPATH: the paper's model definitions, so the main job's file loads into them.)

Models: LeNet-300-100 (the main job's compressed file when --file is given, else magnitude-pruned
to --compression), LeNet-5 (magnitude-pruned to --compression). For batch 1 and 128 it times,
alternating call by call in one process (no gradients, eval mode): the dense model; every Linear
as torch.sparse CSR (`weight.to_sparse_csr()`, the library routine; torch has no sparse
convolution, so convolutions stay dense there); every Linear and Conv2d as dwf_kernels' sparse
modules; and the model `sparsify` makes for that batch (each layer sparse only where measured
faster). Per layer it times the layer alone the same way. Every sparse model's output is checked
against the dense one first.

Break-even: single layers of the shapes these models and a VGG-style network use, random weights
at densities from 50% down to 0.1%, dense against sparse: the speed-up at each density, and the
density below which sparse wins (interpolated in log density between the measured neighbours).
"""

from __future__ import annotations

import argparse
import copy
import math
import platform
import sys
import time

import torch
from torch import nn

import dwf_kernels
from dwf_kernels.sparse import SparseConv2d, SparseLinear, sparsify
from dwf_kernels.sparse import interleaved_medians as interleaved

try:
    from paper.models import build_model
except ImportError:
    sys.exit(
        "sparse_inference.py: run it with python/ on PYTHONPATH (PYTHONPATH=python python bench/sparse_inference.py)"
    )


class CsrLinear(nn.Module):
    """torch.sparse's CSR matmul, the library routine sparse inference is measured against."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight = linear.weight.detach().to_sparse_csr()
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (self.weight @ x.reshape(-1, x.shape[-1]).t()).t()
        return (y if self.bias is None else y + self.bias).reshape(*x.shape[:-1], -1)


def swap(model: nn.Module, makers: dict) -> nn.Module:
    """A copy of `model` with each module of an exact class in `makers` replaced by makers[class](module)."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if type(module) in makers:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, makers[type(module)](module))
    return model


SPARSE_MAKERS = {nn.Linear: SparseLinear.from_dense, nn.Conv2d: SparseConv2d.from_dense}


def shape_of(m: nn.Module) -> str:
    if isinstance(m, nn.Linear):
        return f"{m.out_features}x{m.in_features}"
    return f"{m.out_channels}x{m.in_channels}x{'x'.join(map(str, m.kernel_size))}"


def magnitude_pruned(model: nn.Module, compression: float) -> nn.Module:
    """Each weight matrix and kernel pruned by magnitude to 1/compression of its weights (at least
    one): a global threshold would empty the widest layer of a freshly initialized network."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                w = m.weight
                keep = max(1, round(w.numel() / compression))
                threshold = w.abs().reshape(-1).kthvalue(w.numel() - keep + 1).values
                w.copy_(torch.where(w.abs() >= threshold, w, torch.zeros(())))
    return model


def measure(label: str, model: nn.Module, in_shape, rounds: int) -> list[str]:
    model.eval()
    layers = [(n, m) for n, m in model.named_modules() if type(m) in SPARSE_MAKERS]
    nnz = sum(int((m.weight != 0).sum()) for _, m in layers)
    total = sum(m.weight.numel() for _, m in layers)
    rows = []
    with torch.no_grad():
        for batch in (1, 128):
            x = torch.randn(batch, *in_shape)
            variants = {
                "dense": model,
                "torch CSR": swap(model, {nn.Linear: CsrLinear}),
                "sparse": swap(model, SPARSE_MAKERS),
                "sparsify": sparsify(copy.deepcopy(model), x),
            }
            expected = model(x)
            for name, variant in variants.items():
                torch.testing.assert_close(variant(x), expected, rtol=1e-4, atol=1e-5, msg=f"{label} {name}")
            t = interleaved({name: (lambda v=v, x=x: v(x)) for name, v in variants.items()}, rounds)
            chosen = sum(type(m) in (SparseLinear, SparseConv2d) for m in variants["sparsify"].modules())
            rows.append(
                f"| {label} | {batch} | {nnz} / {total} | {1e6 * t['dense']:.1f} | "
                + " | ".join(f"{1e6 * t[k]:.1f} ({t['dense'] / t[k]:.2f}x)" for k in ("torch CSR", "sparse"))
                + f" | {1e6 * t['sparsify']:.1f} ({t['dense'] / t['sparsify']:.2f}x, "
                + f"{chosen} of {len(layers)} sparse) |"
            )
            # Per layer: the layer alone on its own input.
            inputs = {}
            hooks = [
                m.register_forward_pre_hook(lambda _m, a, n=n, inputs=inputs: inputs.setdefault(n, a[0]))
                for n, m in layers
            ]
            model(x)
            for h in hooks:
                h.remove()
            for n, m in layers:
                xi = inputs[n]
                sparse = SPARSE_MAKERS[type(m)](m)
                calls = {"dense": lambda m=m, xi=xi: m(xi), "sparse": lambda s=sparse, xi=xi: s(xi)}
                if isinstance(m, nn.Linear):
                    csr_layer = CsrLinear(m)
                    calls["csr"] = lambda c=csr_layer, xi=xi: c(xi)
                t = interleaved(calls, rounds)
                csr = f"{1e6 * t['csr']:.1f} ({t['dense'] / t['csr']:.2f}x)" if "csr" in t else "-"
                rows.append(
                    f"| &nbsp;&nbsp;layer {n} ({type(m).__name__} {shape_of(m)}) | {batch} | "
                    f"{sparse.nnz} / {m.weight.numel()} | "
                    f"{1e6 * t['dense']:.1f} | {csr} | "
                    f"{1e6 * t['sparse']:.1f} ({t['dense'] / t['sparse']:.2f}x) | |"
                )
    return rows


DENSITIES = (0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001)
# (label, layer, input shape without the batch, batches)
BREAK_EVEN_LAYERS = (
    ("Linear 300x784 (LeNet-300-100 layer 1)", lambda: nn.Linear(784, 300), (784,), (1, 128)),
    ("Linear 100x300 (LeNet-300-100 layer 2)", lambda: nn.Linear(300, 100), (300,), (1, 128)),
    ("Conv2d 20x1x5x5 on 28x28 (LeNet-5 conv 1)", lambda: nn.Conv2d(1, 20, 5), (1, 28, 28), (1, 128)),
    ("Conv2d 50x20x5x5 on 12x12 (LeNet-5 conv 2)", lambda: nn.Conv2d(20, 50, 5), (20, 12, 12), (1, 128)),
    ("Conv2d 64x64x3x3 pad 1 on 32x32 (VGG-style)", lambda: nn.Conv2d(64, 64, 3, padding=1), (64, 32, 32), (1, 16)),
)


def break_even(rounds: int) -> list[str]:
    """Speed-up of the sparse module over the dense layer at each density, and the break-even."""
    rows = []
    with torch.no_grad():
        for label, make, in_shape, batches in BREAK_EVEN_LAYERS:
            torch.manual_seed(0)
            layer = make().eval()
            weight = layer.weight.detach().clone()
            for batch in batches:
                x = torch.randn(batch, *in_shape)
                speedups = []
                for density in DENSITIES:
                    layer.weight.copy_(weight * (torch.rand(weight.shape) < density))
                    sparse = SPARSE_MAKERS[type(layer)](layer)
                    torch.testing.assert_close(sparse(x), layer(x), rtol=1e-4, atol=1e-5)
                    calls = {"dense": lambda d=layer, x=x: d(x), "sparse": lambda s=sparse, x=x: s(x)}
                    t = interleaved(calls, rounds)
                    speedups.append(t["dense"] / t["sparse"])
                rows.append(
                    f"| {label} | {batch} | " + " | ".join(f"{s:.2f}" for s in speedups) + f" | {crossing(speedups)} |"
                )
    return rows


def crossing(speedups: list[float]) -> str:
    """The density at which the speed-up crosses 1 (densities falling, log-linear between the
    measured points), or where it lies outside the measured range."""
    if speedups[0] >= 1:
        return f">= {100 * DENSITIES[0]:g}%"
    for i in range(1, len(DENSITIES)):
        if speedups[i] >= 1:
            hi, lo = math.log(DENSITIES[i - 1]), math.log(DENSITIES[i])
            s_hi, s_lo = math.log(speedups[i - 1]), math.log(speedups[i])
            d = math.exp(lo + (hi - lo) * (0 - s_lo) / (s_hi - s_lo)) if s_hi != s_lo else DENSITIES[i]
            return f"{100 * d:.2g}%"
    return f"< {100 * DENSITIES[-1]:g}%"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--file", default=None, help="the main job's model.dwfz (LeNet-300-100); default: pruned")
    p.add_argument("--compression", type=float, default=300.0, help="compression of the pruned models")
    p.add_argument("--rounds", type=int, default=300)
    p.add_argument("--markdown", default=None)
    p.add_argument("--break-even-markdown", default=None, help="also measure the break-even densities, into this file")
    p.add_argument("--break-even-rounds", type=int, default=30)
    a = p.parse_args(argv)
    torch.manual_seed(0)
    lenet300 = build_model("lenet300", (1, 28, 28), 10)
    if a.file:
        dwf_kernels.load_compressed_into(lenet300, a.file)
        label300 = "LeNet-300-100 (main job)"
    else:
        magnitude_pruned(lenet300, a.compression)
        label300 = f"LeNet-300-100 (pruned {a.compression:g}x)"
    lenet5 = magnitude_pruned(build_model("lenet5", (1, 28, 28), 10), a.compression)
    rows = measure(label300, lenet300, (1, 28, 28), a.rounds)
    rows += measure(f"LeNet-5 (pruned {a.compression:g}x)", lenet5, (1, 28, 28), a.rounds)
    machine = (
        f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}"
    )
    head = [
        f"Sparse inference on CPU, us per call (median of {a.rounds}, interleaved), speed-up over dense in brackets. "
        f"{machine}. torch CSR: every Linear as torch.sparse CSR (convolutions dense); sparse: every Linear and "
        "Conv2d as dwf_kernels' SparseLinear / SparseConv2d; sparsify: sparse where measured faster at that batch.",
        "",
        "| model / layer | batch | nonzeros / weights | dense | torch CSR | sparse | sparsify |",
        "|---|---|---|---|---|---|---|",
    ]
    write(head + rows, a.markdown)
    if a.break_even_markdown:
        head = [
            f"Break-even density of sparse inference on CPU: speed-up of dwf_kernels' sparse module over the dense "
            f"layer (median of {a.break_even_rounds} interleaved calls each) at each weight density, random "
            f"weights. {machine}.",
            "",
            "| layer | batch | " + " | ".join(f"{100 * d:g}%" for d in DENSITIES) + " | sparse faster below |",
            "|---|---|" + "---|" * len(DENSITIES) + "---|",
        ]
        write(head + break_even(a.break_even_rounds), a.break_even_markdown)
    return 0


def write(lines: list[str], path: str | None) -> None:
    text = "\n".join(lines) + "\n"
    print(text)
    if path:
        with open(path, "w") as f:
            f.write(text)


if __name__ == "__main__":
    sys.exit(main())
