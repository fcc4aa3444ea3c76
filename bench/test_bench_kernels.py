"""pytest-benchmark timings of the DWF kernels against the eager chain and its torch.compile.

    pytest bench/test_bench_kernels.py --benchmark-json=bench/results/cpu-kernels.json
    python bench/report.py bench/results/cpu-kernels.json

Every row records in extra_info the bytes the fused algorithm must move, and the run holds a
copy-bandwidth measurement on the same device, so every row converts to GB/s and to a fraction
of achievable bandwidth. Before it is timed, every case is run once and checked against the
reference backend on the same inputs.

On CPU each round is one call timed on the host. On a GPU each round is K back-to-back calls
between two CUDA events (K chosen so a round lasts about 2 ms), so the figure is device time per
call without a host synchronization per call; the per-call device seconds go to
extra_info["device_seconds"], which bench/report.py prefers over pytest-benchmark's host times.
"""

from __future__ import annotations

import math

import torch
from providers import check_case, make_case, traffic_bytes, versions

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
COPY_BYTES = 256 * 2**20  # large enough to be DRAM bandwidth, preallocated (no page faults)
ROUND_SECONDS = 2e-3  # GPU: back-to-back calls per timed round add up to about this much device time


def _device_name() -> str:
    if DEVICE == "cuda":
        return torch.cuda.get_device_name()
    import platform

    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def _calls_per_round(fn, start, end) -> int:
    start.record()
    fn()
    end.record()
    end.synchronize()
    seconds = max(start.elapsed_time(end) / 1e3, 1e-7)
    return max(1, min(1000, math.ceil(ROUND_SECONDS / seconds)))


def _timed(benchmark, fn, rounds: int) -> None:
    for _ in range(3):  # warm-up: compile, allocator caches, first-touch of reused buffers
        fn()
    if DEVICE != "cuda":
        benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=2)
        return
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    calls = _calls_per_round(fn, start, end)
    device_seconds: list[float] = []

    def run():
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        device_seconds.append(start.elapsed_time(end) / 1e3 / calls)

    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(timing="cuda-events", calls_per_round=calls, device_seconds=device_seconds[-rounds:])


def test_copy_bandwidth(benchmark, request):
    src = torch.ones(COPY_BYTES // 4, device=DEVICE)
    dst = torch.empty_like(src)
    benchmark.group = "copy"
    benchmark.extra_info.update(
        kind="copy", bytes=2 * COPY_BYTES, device=DEVICE, device_name=_device_name(), **versions()
    )
    _timed(benchmark, lambda: dst.copy_(src), request.config.option.bench_rounds)


def test_kernel(benchmark, request, provider, mode, depth, n, dtype):
    factors = (0.5 + torch.rand(depth, n, device=DEVICE)).to(dtype)
    check_case(provider, mode, factors)
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
