"""Benchmark options: which sizes and depths to time (defaults are the CPU set of the issue)."""

from __future__ import annotations


def pytest_addoption(parser):
    parser.addoption("--bench-depths", default="2,4,8", help="comma-separated depths D")
    parser.addoption("--bench-sizes", default="65536,1572864,4194304", help="comma-separated weight sizes N (elements)")
    parser.addoption("--bench-dtypes", default="float32", help="comma-separated dtypes (float32,bfloat16)")
    parser.addoption("--bench-providers", default="", help="comma-separated providers (default: all available)")
    parser.addoption("--bench-rounds", default=30, type=int, help="timed rounds per case")


def _ints(text):
    return [int(x) for x in text.split(",") if x]


def pytest_generate_tests(metafunc):
    import torch

    import dwf_kernels

    opts = metafunc.config.option
    if "depth" in metafunc.fixturenames:
        metafunc.parametrize("depth", _ints(opts.bench_depths), ids=lambda d: f"D{d}")
    if "n" in metafunc.fixturenames:
        metafunc.parametrize("n", _ints(opts.bench_sizes), ids=lambda n: f"N{n}")
    if "dtype" in metafunc.fixturenames:
        metafunc.parametrize("dtype", [getattr(torch, d) for d in opts.bench_dtypes.split(",")], ids=str)
    if "provider" in metafunc.fixturenames:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        default = [b for b in dwf_kernels.available_backends(device) if b != "reference"] + ["eager", "compile"]
        providers = opts.bench_providers.split(",") if opts.bench_providers else default
        metafunc.parametrize("provider", providers)
