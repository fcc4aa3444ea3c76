"""A short demonstration of the fused DWF op on this machine's devices.

For a 300 x 784 weight (LeNet-300-100's first layer) held as D=4 factors it computes w and the
factor penalty with every available backend, checks them against the plain-PyTorch reference,
and times forward + backward + penalty against the eager chain a user would write.
"""

from __future__ import annotations

import time

import torch

import dwf_kernels


def _median_ms(fn, repeats: int = 50) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[len(times) // 2]


def main() -> None:
    torch.manual_seed(0)
    depth, lam = 4, 1e-3
    device = "cuda" if torch.cuda.is_available() else "cpu"
    factors = (0.5 + torch.rand(depth, 300, 784, device=device)).requires_grad_(True)
    print(f"factors {tuple(factors.shape)} on {device}; backends: {dwf_kernels.available_backends(device)}")

    w_ref, sumsq_ref = dwf_kernels.dwf_product(factors, return_sumsq=True, backend="reference")
    grad_ref = torch.autograd.grad(w_ref.sum() + lam / depth * sumsq_ref, factors)[0]

    def step(backend: str) -> torch.Tensor:
        w, sumsq = dwf_kernels.dwf_product(factors, return_sumsq=True, backend=backend)
        return torch.autograd.grad(w.sum() + lam / depth * sumsq, factors)[0]

    for backend in dwf_kernels.available_backends(device):
        if backend == "triton" and device == "cpu":
            continue  # Triton's CPU interpreter is for tests only
        grad = step(backend)
        err = (grad - grad_ref).abs().max().item()
        print(f"  {backend:>9}: forward+backward+penalty {_median_ms(lambda b=backend: step(b)):7.3f} ms, "
              f"max |grad - reference| = {err:.2e}")


if __name__ == "__main__":
    main()
