"""The hash of the sources that determine the compiled extension dwf_kernels._C.

setup.py records it in _build_info.py (SOURCE_HASH) after a successful build; _extension.py
recomputes it before loading _C from a source tree and refuses a binary built from other sources.
The sources are setup.py and every C/C++/CUDA file under csrc/ (the set `make` also watches).

Standard library only: setup.py loads this file by path, before torch or the package are importable.
"""

from __future__ import annotations

import hashlib
import os

SOURCE_SUFFIXES = (".h", ".hpp", ".c", ".cc", ".cpp", ".cu", ".cuh")


def is_source_tree(root: str) -> bool:
    """Whether `root` holds the sources of _C (a checkout or an editable install, not a wheel)."""
    return os.path.isfile(os.path.join(root, "setup.py")) and os.path.isfile(os.path.join(root, "csrc", "dwf_ops.cpp"))


def source_files(root: str) -> list[str]:
    """setup.py and csrc/**/*.{h,hpp,c,cc,cpp,cu,cuh}, as sorted '/'-separated paths relative to root."""
    files = ["setup.py"]
    csrc = os.path.join(root, "csrc")
    for directory, subdirs, names in os.walk(csrc):
        subdirs.sort()
        rel = os.path.relpath(directory, root).replace(os.sep, "/")
        files += [f"{rel}/{name}" for name in names if name.endswith(SOURCE_SUFFIXES)]
    return sorted(files)


def source_hash(root: str) -> str:
    """SHA-256 over each source file's relative path and bytes (a handful of small files: ~0.1 ms)."""
    digest = hashlib.sha256()
    for rel in source_files(root):
        with open(os.path.join(root, rel), "rb") as f:
            data = f.read()
        digest.update(f"{rel}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()
