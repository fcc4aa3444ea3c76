"""Sparse inference against dense, interleaved call by call: end-to-end and per layer, CPU.

    PYTHONPATH=python python bench/sparse_inference.py --file runs/train/model.dwfz \
        --markdown bench/results/cpu-sparse-inference.md        # the main job's own model
    PYTHONPATH=python python bench/sparse_inference.py            # LeNet-300-100 magnitude-pruned

(python/ on PYTHONPATH: the paper's model definitions, so the main job's file loads into them.)

Models: LeNet-300-100 (the main job's compressed file when --file is given, else magnitude-pruned
to --compression), LeNet-5 (magnitude-pruned to --compression; its convolutions stay dense). For
batch 1 and 128 it times, alternating call by call in one process (no gradients, eval mode): the
dense model, the model with every Linear as torch.sparse CSR (`weight.to_sparse_csr()`, the library
routine), and the model with every Linear as dwf_kernels' SparseLinear. Per layer it times the
Linear alone the same way. Every sparse model's output is checked against the dense one first.
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import time

import torch
from torch import nn

import dwf_kernels
from dwf_kernels.sparse import SparseLinear
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


def swap_linears(model: nn.Module, make) -> nn.Module:
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, make(module))
    return model


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
    variants = {
        "dense": model,
        "torch CSR": swap_linears(model, CsrLinear),
        "SparseLinear": swap_linears(model, SparseLinear.from_dense),
    }
    linears = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear]
    nnz = sum(int((m.weight != 0).sum()) for _, m in linears)
    total = sum(m.weight.numel() for _, m in linears)
    rows = []
    with torch.no_grad():
        for batch in (1, 128):
            x = torch.randn(batch, *in_shape)
            expected = model(x)
            for name, variant in variants.items():
                torch.testing.assert_close(variant(x), expected, rtol=1e-4, atol=1e-5, msg=f"{label} {name}")
            t = interleaved({name: (lambda v=v, x=x: v(x)) for name, v in variants.items()}, rounds)
            rows.append(
                f"| {label} | {batch} | {nnz} / {total} | {1e6 * t['dense']:.1f} | {1e6 * t['torch CSR']:.1f} "
                f"({t['dense'] / t['torch CSR']:.2f}x) | {1e6 * t['SparseLinear']:.1f} "
                f"({t['dense'] / t['SparseLinear']:.2f}x) |"
            )
            # Per layer: the Linear alone on its own input.
            inputs = {}
            hooks = [
                m.register_forward_pre_hook(lambda _m, a, n=n, inputs=inputs: inputs.setdefault(n, a[0]))
                for n, m in linears
            ]
            model(x)
            for h in hooks:
                h.remove()
            for n, m in linears:
                xi = inputs[n]
                csr, sparse = CsrLinear(m), SparseLinear.from_dense(m)
                calls = {"dense": lambda m=m, xi=xi: m(xi), "csr": lambda c=csr, xi=xi: c(xi)}
                t = interleaved({**calls, "sparse": lambda s=sparse, xi=xi: s(xi)}, rounds)
                rows.append(
                    f"| &nbsp;&nbsp;layer {n} ({m.out_features}x{m.in_features}) | {batch} | "
                    f"{sparse.nnz} / {m.weight.numel()} | "
                    f"{1e6 * t['dense']:.1f} | {1e6 * t['csr']:.1f} ({t['dense'] / t['csr']:.2f}x) | "
                    f"{1e6 * t['sparse']:.1f} ({t['dense'] / t['sparse']:.2f}x) |"
                )
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--file", default=None, help="the main job's model.dwfz (LeNet-300-100); default: pruned")
    p.add_argument("--compression", type=float, default=300.0, help="compression of the pruned models")
    p.add_argument("--rounds", type=int, default=300)
    p.add_argument("--markdown", default=None)
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
    rows += measure(f"LeNet-5 (pruned {a.compression:g}x, convs dense)", lenet5, (1, 28, 28), a.rounds)
    head = [
        f"Sparse inference on CPU, us per call (median of {a.rounds}, interleaved), speed-up over dense in brackets. "
        f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}.",
        "",
        "| model / layer | batch | nonzeros / weights (Linear) | dense | torch CSR | SparseLinear |",
        "|---|---|---|---|---|---|",
    ]
    text = "\n".join(head + rows) + "\n"
    print(text)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
