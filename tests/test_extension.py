"""Loading of the compiled extension: pure-Python installs work, built kernels are registered."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import dwf_kernels
from dwf_kernels import _extension

PACKAGE_DIR = Path(dwf_kernels.__file__).parent


def test_import_without_compiled_extension_warns_once_and_reference_serves(tmp_path):
    """A copy of the package without _C (a pure-Python install) imports, warns once, and computes."""
    shutil.copytree(PACKAGE_DIR, tmp_path / "dwf_kernels", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    script = textwrap.dedent(
        """
        import sys, warnings
        # An editable install's finder would hand out the source tree's _C for dwf_kernels._C.
        sys.meta_path = [f for f in sys.meta_path if "_EditableFinder" not in repr(f)]
        warnings.simplefilter("always")
        import torch, dwf_kernels
        assert dwf_kernels.__file__.startswith(sys.argv[1]), dwf_kernels.__file__
        assert "cpu" not in dwf_kernels.available_backends("cpu")
        f = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], requires_grad=True)
        w, s = dwf_kernels.dwf_product(f, return_sumsq=True)
        (w.sum() + s).backward()
        dwf_kernels.dwf_product(f)
        print(w.tolist(), s.item(), f.grad.tolist())
        """
    )
    env = dict(os.environ, PYTHONPATH=str(tmp_path), TRITON_INTERPRET="0")
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[4.0, 10.0, 18.0] 91.0 [[6.0, 9.0, 12.0], [9.0, 12.0, 15.0]]"
    assert result.stderr.count("compiled extension dwf_kernels._C is not available") == 1, result.stderr


def test_explicit_compiled_backend_without_extension_says_what_to_do(monkeypatch):
    monkeypatch.setattr(_extension, "LOADED", False)
    monkeypatch.setattr(_extension, "LOAD_ERROR", "ImportError: no _C")
    monkeypatch.setattr(_extension, "KERNEL_DEVICES", frozenset())
    with pytest.raises(RuntimeError, match=r"needs the compiled extension dwf_kernels._C.*use one of \['reference'"):
        dwf_kernels.dwf_product(torch.ones(2, 2), backend="cpu")
    assert dwf_kernels.available_backends("cpu")[0] == "reference"


def test_built_kernels_are_registered():
    """What setup.py compiled (recorded in _build_info) is what the loaded library registers."""
    try:
        from dwf_kernels import _build_info
    except ImportError:
        pytest.skip("running from a source tree that was never built")
    assert _extension.LOADED == _build_info.EXTENSION_BUILT, _extension.LOAD_ERROR
    if _build_info.EXTENSION_BUILT:
        assert "cpu" in _extension.KERNEL_DEVICES
        assert ("cuda" in _extension.KERNEL_DEVICES) == _build_info.CUDA_BUILT
        assert _build_info.BUILT_AGAINST_TORCH == torch.__version__
