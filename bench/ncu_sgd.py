"""The fused SGD step's kernels, for Nsight Compute: each backend's `dwf_sgd_step` on one layer
(D=4, N=2^24 by default, momentum), a few calls each, nothing else launched between them.

    ncu --clock-control none --kernel-name regex:sgd_step --section SpeedOfLight --section Occupancy \\
        --section LaunchStats --section MemoryWorkloadAnalysis python bench/ncu_sgd.py

bench/gpu_check.sh runs it so (stage ncu) to tell why one backend's step moves less of the copy
bandwidth than the other's: achieved DRAM throughput, occupancy, registers, waves. Without a GPU it
runs the CPU backend once (the script is checked, nothing is profiled).
"""

from __future__ import annotations

import argparse
import sys

import torch

import dwf_kernels


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--n", type=int, default=1 << 24)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--calls", type=int, default=3)
    a = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, a.dtype)
    for backend in dwf_kernels.available_backends(device):
        if backend == "reference":
            continue
        gen = torch.Generator(device=device).manual_seed(0)
        factors = (0.5 + torch.rand(a.depth, a.n, generator=gen, device=device)).to(dtype)
        grad_w = torch.randn(a.n, generator=gen, device=device).to(dtype)
        grad_sumsq = torch.tensor(1e-4, device=device)
        buffer = dwf_kernels.dwf_sgd_step(factors, grad_w, grad_sumsq, None, lr=1e-6, momentum=0.9, backend=backend)
        for _ in range(a.calls):
            dwf_kernels.dwf_sgd_step(factors, grad_w, grad_sumsq, buffer, lr=1e-6, momentum=0.9, backend=backend)
        if device == "cuda":
            torch.cuda.synchronize()
        print(f"{backend}: {a.calls + 1} steps, D={a.depth}, N={a.n}, {a.dtype}, {device}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
