"""Host time of one Triton-backend call, front door to return: what a small layer pays per forward.

    pytest bench/test_bench_launch.py --benchmark-json=OUT.json

Without a GPU the Triton launch itself is stubbed out (JITFunction.run does nothing) and the
triton backend is made to accept CPU tensors, so the figure is everything dwf_kernels and torch
add around the launch: argument checks, backend choice, the custom-op dispatch, autograd, the
output allocations and the launcher's Python. On a GPU nothing is stubbed: calls on tiny tensors
run back to back, so the host is the bottleneck and the time per call is the host's; an empty
Triton kernel is timed the same way, and on the device with CUDA events, for comparison.
The goal is at most 30 us per forward call.
"""

from __future__ import annotations

import pytest
import torch
import triton

import dwf_kernels
from dwf_kernels import backends

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
CALLS = 200


@triton.jit
def _empty_kernel(x):
    pass


@pytest.fixture
def triton_backend(monkeypatch):
    if not GPU:
        from triton.runtime.jit import JITFunction

        monkeypatch.setattr(JITFunction, "run", lambda self, *args, **kwargs: None)
        monkeypatch.setattr(backends.REGISTRY["triton"], "serves", lambda device_type: True)
    return "triton"


def _info(benchmark, what: str) -> None:
    benchmark.extra_info.update(
        kind="host", what=what, device=DEVICE, launch="real" if GPU else "stubbed", calls_per_round=CALLS
    )


def _per_call(benchmark, fn) -> None:
    for _ in range(5):
        fn()
    benchmark.pedantic(fn, rounds=20, iterations=CALLS, warmup_rounds=1)  # pytest-benchmark reports per call
    if GPU:
        torch.cuda.synchronize()


@pytest.mark.parametrize("requires_grad", [False, True], ids=["inference", "training"])
def test_forward_host_time(benchmark, triton_backend, requires_grad):
    factors = torch.rand(4, 64, 64, device=DEVICE).requires_grad_(requires_grad)
    _info(benchmark, f"dwf_product(return_sumsq=True), {'training' if requires_grad else 'inference'}")
    _per_call(benchmark, lambda: dwf_kernels.dwf_product(factors, return_sumsq=True, backend=triton_backend))


def test_sgd_step_host_time(benchmark, triton_backend):
    factors = torch.rand(4, 64, 64, device=DEVICE)
    grad_w = torch.rand(64, 64, device=DEVICE)
    buffer = torch.zeros_like(factors)
    s = torch.tensor(1e-4, device=DEVICE)
    _info(benchmark, "dwf_sgd_step(momentum=0.9)")
    _per_call(
        benchmark,
        lambda: dwf_kernels.dwf_sgd_step(factors, grad_w, s, buffer, lr=1e-9, momentum=0.9, backend=triton_backend),
    )


@pytest.mark.skipif(not GPU, reason="launches a real kernel")
def test_empty_kernel_launch(benchmark):
    x = torch.empty(1, device=DEVICE)
    _info(benchmark, "empty Triton kernel, kernel[grid](x)")
    _per_call(benchmark, lambda: _empty_kernel[(1,)](x))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(CALLS):
        _empty_kernel[(1,)](x)
    end.record()
    end.synchronize()
    benchmark.extra_info["device_us_per_launch"] = 1e3 * start.elapsed_time(end) / CALLS
