"""Benchmark options: which sizes, depths, modes and providers to time (defaults: the CPU set)."""

from __future__ import annotations

MODES = ("forward", "backward", "full", "sgd")


def pytest_addoption(parser):
    parser.addoption("--bench-depths", default="2,4,8", help="comma-separated depths D")
    parser.addoption("--bench-sizes", default="65536,1572864,4194304", help="comma-separated weight sizes N (elements)")
    parser.addoption("--bench-dtypes", default="float32", help="comma-separated dtypes (float32,bfloat16)")
    parser.addoption("--bench-modes", default=",".join(MODES), help="comma-separated modes")
    parser.addoption(
        "--bench-providers",
        default="",
        help="comma-separated providers (default: every kernel backend of the device, eager and compile; "
        "in sgd mode also <backend>-unfused)",
    )
    parser.addoption(
        "--bench-compile-modes",
        default=",".join(MODES),
        help="modes in which the torch.compile provider runs (its cold compiles are slow)",
    )
    parser.addoption("--bench-rounds", default=30, type=int, help="timed rounds per case")


def _ints(text):
    return [int(x) for x in text.split(",") if x]


def _names(text):
    return [x for x in text.split(",") if x]


def pytest_generate_tests(metafunc):
    import torch

    import dwf_kernels

    opts = metafunc.config.option
    if "depth" in metafunc.fixturenames:
        metafunc.parametrize("depth", _ints(opts.bench_depths), ids=lambda d: f"D{d}")
    if "n" in metafunc.fixturenames:
        metafunc.parametrize("n", _ints(opts.bench_sizes), ids=lambda n: f"N{n}")
    if "dtype" in metafunc.fixturenames:
        metafunc.parametrize("dtype", [getattr(torch, d) for d in _names(opts.bench_dtypes)], ids=str)
    if "provider" in metafunc.fixturenames and "mode" in metafunc.fixturenames:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        backends = [b for b in dwf_kernels.available_backends(device) if b != "reference"]
        compile_modes = set(_names(opts.bench_compile_modes))
        pairs = []
        for mode in _names(opts.bench_modes):
            if opts.bench_providers:
                providers = _names(opts.bench_providers)
            else:
                providers = [*backends, "eager"] + (["compile"] if mode in compile_modes else [])
                if mode == "sgd":  # the pair the fused step replaces: fused backward + torch.optim.SGD
                    providers += [f"{b}-unfused" for b in backends]
            pairs += [(mode, p) for p in providers if not (p.endswith("-unfused") and mode != "sgd")]
        metafunc.parametrize("mode,provider", pairs, ids=[f"{m}-{p}" for m, p in pairs])
