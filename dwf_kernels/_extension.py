"""Loads the compiled extension dwf_kernels._C, or explains once why it is not there.

Importing `_C` runs its static TORCH_LIBRARY registrations (the `torch.ops.dwf_kernels` ops and
their CPU/CUDA kernels). A pure-Python install has no `_C`, and one built against another torch
fails to load with undefined symbols; in both cases the package still imports, warns once, and
the reference (and Triton) backends serve.
"""

from __future__ import annotations

import warnings

import torch

LOADED: bool = False
LOAD_ERROR: str | None = None
# Device types ("cpu", "cuda") the compiled ops have kernels for. Plain Python data, computed once,
# so backend selection stays traceable by torch.compile.
KERNEL_DEVICES: frozenset[str] = frozenset()

try:
    from . import _C  # noqa: F401
except (ImportError, OSError) as exc:  # missing file, or built against another torch
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"
else:
    LOADED = True
    KERNEL_DEVICES = frozenset(
        device
        for device, key in (("cpu", "CPU"), ("cuda", "CUDA"))
        if torch._C._dispatch_has_kernel_for_dispatch_key("dwf_kernels::dwf_forward", key)
    )

if not LOADED:
    warnings.warn(
        "dwf_kernels: the compiled extension dwf_kernels._C is not available "
        f"({LOAD_ERROR}); the 'reference' backend (and 'triton' for CUDA tensors) will serve. "
        "Build it with `pip install --no-build-isolation -e .` against the installed torch.",
        RuntimeWarning,
        stacklevel=2,
    )
