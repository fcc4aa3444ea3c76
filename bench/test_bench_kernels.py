"""pytest-benchmark timings of the DWF kernels against the eager chain and its torch.compile.

    pytest bench/test_bench_kernels.py --benchmark-json=bench/results/cpu.json
    python bench/report.py bench/results/cpu.json

Every row records in extra_info the bytes the fused algorithm must move, and the run holds a
copy-bandwidth measurement on the same device, so every row converts to GB/s and to a fraction
of achievable bandwidth. GPU timings synchronize after each call.
"""

from __future__ import annotations

import pytest
import torch
from providers import MODES, make_case, traffic_bytes, versions

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
COPY_BYTES = 256 * 2**20  # large enough to be DRAM bandwidth, preallocated (no page faults)


def _device_name() -> str:
    if DEVICE == "cuda":
        return torch.cuda.get_device_name()
    import platform

    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def _timed(benchmark, fn, rounds: int):
    if DEVICE == "cuda":

        def run():
            fn()
            torch.cuda.synchronize()
    else:
        run = fn
    for _ in range(3):  # warm-up: compile, allocator caches, first-touch of reused buffers
        run()
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=2)


def test_copy_bandwidth(benchmark, request):
    src = torch.ones(COPY_BYTES // 4, device=DEVICE)
    dst = torch.empty_like(src)
    benchmark.group = "copy"
    benchmark.extra_info.update(
        kind="copy", bytes=2 * COPY_BYTES, device=DEVICE, device_name=_device_name(), **versions()
    )
    _timed(benchmark, lambda: dst.copy_(src), request.config.option.bench_rounds)


@pytest.mark.parametrize("mode", MODES)
def test_kernel(benchmark, request, provider, mode, depth, n, dtype):
    factors = (0.5 + torch.rand(depth, n, device=DEVICE)).to(dtype)
    fn = make_case(provider, mode, factors)
    benchmark.group = f"{mode} D={depth} N={n} {str(dtype).replace('torch.', '')}"
    benchmark.extra_info.update(
        kind="kernel",
        provider=provider,
        mode=mode,
        depth=depth,
        n=n,
        dtype=str(dtype).replace("torch.", ""),
        bytes=traffic_bytes(mode, depth, n, factors.element_size()),
        device=DEVICE,
        device_name=_device_name(),
        **versions(),
    )
    _timed(benchmark, fn, request.config.option.bench_rounds)
