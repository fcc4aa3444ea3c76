"""Loads the C++ extension dwf_kernels._C, or explains once why it is not there.

Importing `_C` runs its static TORCH_LIBRARY registrations (the `torch.ops.dwf_kernels` ops and
their CPU/CUDA kernels). A pure-Python install has no `_C`, and one built against another torch
fails to load with undefined symbols; in both cases the package still imports, warns once, and
the reference (and Triton) backends serve.

In a source tree (a checkout or an editable install: setup.py and csrc/ beside the package), `_C`
is loaded only if the source hash stamped into _build_info.py at build time equals the hash of the
sources present now (_source_hash.py); a stale binary is never imported, so its registrations
never run. An installed wheel has no sources and skips the check.
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import torch

from . import _source_hash

LOADED: bool = False
LOAD_ERROR: str | None = None
# Device types ("cpu", "cuda") the C++ ops have kernels for. Plain Python data, computed once,
# so backend selection stays traceable by torch.compile.
KERNEL_DEVICES: frozenset[str] = frozenset()
# The SIMD variant of the CPU kernels this process runs: "default", "avx2" or "avx512", the widest
# one built (_build_info.CPU_VARIANTS) at or below ATen's CPU capability (ATEN_CPU_CAPABILITY
# lowers both together); None without _C.
CPU_VARIANT: str | None = None

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
REBUILD_HINT = "rebuild it with `pip install --no-build-isolation -e .` (or `make install`) in"


def stale_reason(root: str) -> str | None:
    """Why a _C next to the source tree `root` must not be loaded; None when it matches its sources
    or when `root` is not a source tree."""
    if not _source_hash.is_source_tree(root):
        return None
    try:
        from . import _build_info
    except ImportError:
        return "it has no build stamp (dwf_kernels/_build_info.py is missing)"
    built = getattr(_build_info, "SOURCE_HASH", None)
    if built is None:
        return "its build stamp dwf_kernels/_build_info.py records no source hash"
    current = _source_hash.source_hash(root)
    if built != current:
        return (
            f"it is stale: it was built from sources hashing to {built[:12]}, "
            f"but setup.py and csrc/ now hash to {current[:12]}"
        )
    return None


_root = os.path.dirname(PACKAGE_DIR)
_stale = stale_reason(_root)
if _stale is not None and importlib.util.find_spec(f"{__package__}._C") is not None:
    LOAD_ERROR = f"StaleBuild: dwf_kernels._C was not loaded, {_stale}; {REBUILD_HINT} {_root}"
else:
    try:
        from . import _C
    except (ImportError, OSError) as exc:  # missing file, or built against another torch
        LOAD_ERROR = f"{type(exc).__name__}: {exc}"
    else:
        LOADED = True
        CPU_VARIANT = _C.cpu_variant()
        KERNEL_DEVICES = frozenset(
            device
            for device, key in (("cpu", "CPU"), ("cuda", "CUDA"))
            if torch._C._dispatch_has_kernel_for_dispatch_key("dwf_kernels::dwf_forward", key)
        )

if not LOADED:
    warnings.warn(
        "dwf_kernels: the C++ extension dwf_kernels._C is not available "
        f"({LOAD_ERROR}); the 'reference' backend (and 'triton' for CUDA tensors) will serve. "
        "Build it with `pip install --no-build-isolation -e .` against the installed torch.",
        RuntimeWarning,
        stacklevel=2,
    )
