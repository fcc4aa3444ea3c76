"""Which backend computes the DWF product: discovery, automatic choice, and explicit selection.

Backends (docs/design.md, Kernel contract), all with the same op semantics:
  cuda       C++/CUDA kernels of dwf_kernels._C       CUDA tensors
  cpu        C++ kernels of dwf_kernels._C            CPU tensors
  triton     Triton kernels                           CUDA tensors; CPU tensors only under
                                                      TRITON_INTERPRET=1 (for tests; slowest, never auto)
  reference  plain PyTorch                            any tensor

`backend=None` (auto) takes the first of `available_backends(device)`, which lists them fastest
first. `use_backend(name)` forces one for a block of code; it is process-wide (not per thread),
which is what benchmarks and tests need and what torch.compile can trace.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from . import _extension, triton_ops

BACKENDS = ("cuda", "cpu", "triton", "reference")

_forced: list[str] = []  # stack of use_backend() selections


def available_backends(device: torch.device | str) -> list[str]:
    """Backend names that can serve tensors on `device`, fastest first."""
    device_type = torch.device(device).type
    return list(_available(device_type))


def _available(device_type: str) -> tuple[str, ...]:
    names: list[str] = []
    if device_type in ("cuda", "cpu") and device_type in _extension.KERNEL_DEVICES:
        names.append(device_type)
    if device_type == "cuda" and triton_ops.AVAILABLE and not triton_ops.INTERPRETED:
        names.append("triton")
    names.append("reference")
    if device_type == "cpu" and triton_ops.AVAILABLE and triton_ops.INTERPRETED:
        names.append("triton")
    return tuple(names)


def _check_name(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)} or None (automatic); got {name!r}")


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Within the block, `dwf_product` (and the DWF layers) use backend `name`; None restores auto."""
    if name is not None:
        _check_name(name)
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


def current_backend() -> str | None:
    """The backend forced by the innermost `use_backend`, or None (automatic)."""
    return _forced[-1] if _forced else None


def resolve_backend(device_type: str, requested: str | None = None) -> str:
    """The backend to run for a tensor on `device_type`: `requested`, else the forced one, else auto."""
    name = requested if requested is not None else current_backend()
    available = _available(device_type)
    if name is None:
        return available[0]
    _check_name(name)
    if name not in available:
        raise RuntimeError(_why_unavailable(name, device_type, available))
    return name


def _why_unavailable(name: str, device_type: str, available: tuple[str, ...]) -> str:
    instead = f"use one of {list(available)} for {device_type} tensors"
    if name in ("cpu", "cuda"):
        if not _extension.LOADED:
            return (
                f"backend {name!r} needs the compiled extension dwf_kernels._C, which is not loaded "
                f"({_extension.LOAD_ERROR}); {instead}, or build it: pip install --no-build-isolation -e ."
            )
        if device_type != name:
            return f"backend {name!r} runs {name.upper()} tensors only, got a {device_type} tensor; {instead}"
        return (
            "dwf_kernels was built without CUDA kernels (torch without CUDA or no nvcc at build time), "
            f"so backend 'cuda' cannot serve; {instead}, or rebuild with a CUDA torch and nvcc "
            "(DWF_KERNELS_CUDA=1 pip install --no-build-isolation -e .)"
        )
    if name == "triton":
        if not triton_ops.AVAILABLE:
            return f"backend 'triton' needs the triton package ({triton_ops.IMPORT_ERROR}); {instead}"
        return (
            f"backend 'triton' runs CUDA tensors (and CPU tensors only under TRITON_INTERPRET=1), "
            f"got a {device_type} tensor; {instead}"
        )
    return f"backend {name!r} cannot serve {device_type} tensors; {instead}"
