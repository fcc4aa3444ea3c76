"""Shared test helpers: devices and backends under test, per-dtype tolerances, input makers."""

from __future__ import annotations

import pytest
import torch

import dwf_kernels

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# (device, backend) for every non-reference backend that can serve this machine's devices.
KERNEL_BACKENDS = [
    pytest.param(device, name, id=f"{device}-{name}")
    for device in DEVICES
    for name in dwf_kernels.available_backends(device)
    if name != "reference"
]


def _op_families() -> list:
    """(the backend's custom ops, the devices they serve here) for each op family of KERNEL_BACKENDS."""
    devices: dict = {}
    for param in KERNEL_BACKENDS:
        device, name = param.values
        devices.setdefault(dwf_kernels.backends.REGISTRY[name].ops, []).append(device)
    return [pytest.param(ops, sorted(set(on)), id=ops.namespace) for ops, on in devices.items()]


# (ops, devices) for every custom-op family of KERNEL_BACKENDS (torch.ops.dwf_kernels, torch.ops.dwf_triton).
OP_FAMILIES = _op_families()

DEPTHS = [1, 2, 3, 4, 5, 8, 16]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]

# The kernels do the reference's arithmetic in the reference's order (fp32, fp64 for fp64), so w
# and the factor gradients match it to rounding: a few ulp in fp32/fp64 and one ulp of the
# narrow output (Triton's interpreter truncates instead of rounding casts to bf16). sumsq differs
# only by summation order.
TOLERANCES = {  # dtype: (atol, rtol)
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-6, 4e-7),
    torch.bfloat16: (1e-5, 2.0**-7),
    torch.float16: (1e-5, 2.0**-10),
}
# The CPU kernels fuse the SGD step's a*b + c (one rounding) in every SIMD variant. torch's own CPU
# kernels (torch.optim.SGD's `add(b, alpha=x)` is one FMA) fuse only at an AVX2/AVX-512 capability:
# there the two steps are bitwise equal; under ATEN_CPU_CAPABILITY=default they agree to rounding.
TORCH_CPU_FMA = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
SUMSQ_RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}


def make_factors(depth: int, shape: tuple[int, ...], dtype: torch.dtype, device: str, seed: int = 0) -> torch.Tensor:
    """Factors with |f| in [0.5, 1.5) and random signs, so products of up to 16 stay in range."""
    gen = torch.Generator().manual_seed(seed)
    magnitude = 0.5 + torch.rand((depth, *shape), generator=gen, dtype=torch.float64)
    sign = torch.where(torch.rand((depth, *shape), generator=gen) < 0.5, -1.0, 1.0).to(torch.float64)
    return (magnitude * sign).to(dtype=dtype, device=device)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    atol, rtol = TOLERANCES[dtype]
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    torch.testing.assert_close(
        actual.cpu(), expected.cpu(), atol=atol, rtol=rtol, equal_nan=True, msg=lambda m: f"{what}: {m}"
    )
