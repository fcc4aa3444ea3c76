"""Which backend computes the DWF product: the registry, automatic choice, and explicit selection.

Backends (docs/design.md, Backends), all with the same op semantics:
  cuda       C++/CUDA kernels of dwf_kernels._C       CUDA tensors            backends/extension.py
  cpu        C++ kernels of dwf_kernels._C            CPU tensors             backends/extension.py
  triton     Triton kernels                           CUDA tensors; CPU tensors only under
                                                      TRITON_INTERPRET=1 (for tests; slowest, never auto)
                                                                              backends/triton.py
  reference  plain PyTorch                            any tensor              backends/reference.py

`backend=None` (auto) takes the first of `available_backends(device)`, which lists them fastest
first. `use_backend(name)` forces one for a block of code; it is process-wide (not per thread),
which is what benchmarks and tests need and what torch.compile can trace.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from . import extension, reference, triton
from .base import Backend, OpFamily

# The registry: every backend under its public name, fastest first. A new backend is one module
# that builds a Backend (base.py) and one entry here.
REGISTRY: dict[str, Backend] = {
    "cuda": extension.CUDA,
    "cpu": extension.CPU,
    "triton": triton.BACKEND,
    "reference": reference.BACKEND,
}
BACKENDS = tuple(REGISTRY)
_ORDER = tuple(REGISTRY.values())

_forced: list[str] = []  # stack of use_backend() selections

__all__ = [
    "BACKENDS",
    "REGISTRY",
    "Backend",
    "OpFamily",
    "available_backends",
    "current_backend",
    "resolve_backend",
    "select",
    "use_backend",
]


def available_backends(device: torch.device | str) -> list[str]:
    """Backend names that can serve tensors on `device`, fastest first."""
    return list(_available(torch.device(device).type))


def _available(device_type: str) -> tuple[str, ...]:
    serving = [backend for backend in _ORDER if backend.serves(device_type)]
    return tuple(b.name for b in serving if not b.emulated) + tuple(b.name for b in serving if b.emulated)


def _unknown(name: object) -> ValueError:
    return ValueError(f"backend must be one of {list(BACKENDS)} or None (automatic); got {name!r}")


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Within the block, `dwf_product` (and the DWF layers) use backend `name`; None restores auto."""
    if name is not None and name not in BACKENDS:
        raise _unknown(name)
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


def current_backend() -> str | None:
    """The backend forced by the innermost `use_backend`, or None (automatic)."""
    return _forced[-1] if _forced else None


def select(device_type: str, requested: str | None = None) -> Backend:
    """The backend to run for a tensor on `device_type`: `requested`, else the forced one, else auto."""
    name = requested if requested is not None else (_forced[-1] if _forced else None)
    if name is None:
        for backend in _ORDER:
            if not backend.emulated and backend.serves(device_type):
                return backend
    try:
        backend = REGISTRY[name]
    except (KeyError, TypeError):
        raise _unknown(name) from None
    if not backend.serves(device_type):
        instead = f"use one of {list(_available(device_type))} for {device_type} tensors"
        raise RuntimeError(backend.why_not(device_type, instead))
    return backend


def resolve_backend(device_type: str, requested: str | None = None) -> str:
    """The name of the backend `select` picks."""
    return select(device_type, requested).name
