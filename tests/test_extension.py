"""Loading of the C++ extension: pure-Python installs work, built kernels are registered, and a
_C built from other sources than the tree's (a stale build) is refused before it is imported."""

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
from dwf_kernels import _extension, _source_hash

PACKAGE_DIR = Path(dwf_kernels.__file__).parent
ROOT = PACKAGE_DIR.parent


def test_import_without_the_extension_warns_once_and_reference_serves(tmp_path):
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
    assert result.stderr.count("C++ extension dwf_kernels._C is not available") == 1, result.stderr


def test_explicit_extension_backend_without_the_extension_says_what_to_do(monkeypatch):
    monkeypatch.setattr(_extension, "LOADED", False)
    monkeypatch.setattr(_extension, "LOAD_ERROR", "ImportError: no _C")
    monkeypatch.setattr(_extension, "KERNEL_DEVICES", frozenset())
    with pytest.raises(RuntimeError, match=r"needs the C\+\+ extension dwf_kernels._C.*use one of \['reference'"):
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
        # Built for the stable ABI (py_limited_api): one binary for every CPython >= 3.10.
        assert Path(sys.modules["dwf_kernels._C"].__file__).name == "_C.abi3.so"
        assert _build_info.PY_LIMITED_API == "cp310"
        assert _extension.CPU_VARIANT in _build_info.CPU_VARIANTS and "default" in _build_info.CPU_VARIANTS
        if _source_hash.is_source_tree(str(ROOT)):
            assert _build_info.SOURCE_HASH == _source_hash.source_hash(str(ROOT))


def test_extension_calls_only_the_stable_abi():
    """_C.abi3.so imports from Python only what dwf_ops.cpp calls, all of it in the stable ABI (the
    C++ code uses torch's C++ API, no Python C API), so the abi3 tag is true."""
    if not _extension.LOADED:
        pytest.skip(f"needs the compiled extension ({_extension.LOAD_ERROR})")
    nm = shutil.which("nm")
    if nm is None:
        pytest.fail("nm (binutils, which the build itself needs) is missing")
    library = sys.modules["dwf_kernels._C"].__file__
    undefined = subprocess.run([nm, "-D", "--undefined-only", library], capture_output=True, text=True, check=True)
    symbols = [line.split()[-1] for line in undefined.stdout.splitlines()]
    python_symbols = {name for name in symbols if name.startswith(("Py", "_Py"))}
    assert python_symbols == {"PyModule_Create2", "PyUnicode_FromString"}, python_symbols


def test_source_hash_covers_setup_py_and_the_csrc_sources(tmp_path):
    """Any change to setup.py or a C++/CUDA file under csrc/ (edit, new file, rename) changes the
    hash; files that do not go into the binary do not."""
    for rel, text in [
        ("setup.py", "setup()\n"),
        ("csrc/dwf_ops.cpp", "// ops\n"),
        ("csrc/cuda/k.cuh", "// kernels\n"),
        ("csrc/README.txt", "notes\n"),
        ("tests/test_x.py", "pass\n"),
    ]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    root = str(tmp_path)
    assert _source_hash.is_source_tree(root) and not _source_hash.is_source_tree(str(tmp_path / "csrc"))
    assert _source_hash.source_files(root) == ["csrc/cuda/k.cuh", "csrc/dwf_ops.cpp", "setup.py"]
    seen = {_source_hash.source_hash(root)}

    def changed() -> bool:
        digest = _source_hash.source_hash(root)
        new = digest not in seen
        seen.add(digest)
        return new

    (tmp_path / "csrc/README.txt").write_text("more notes\n")
    (tmp_path / "tests/test_x.py").write_text("assert True\n")
    assert not changed()
    (tmp_path / "csrc/cuda/k.cuh").write_text("// kernels, retuned\n")
    assert changed()
    (tmp_path / "setup.py").write_text("setup(name='x')\n")
    assert changed()
    (tmp_path / "csrc/cpu").mkdir()
    (tmp_path / "csrc/cpu/new.cpp").write_text("")
    assert changed()
    (tmp_path / "csrc/cpu/new.cpp").rename(tmp_path / "csrc/cpu/renamed.cpp")
    assert changed()


_LOAD_IN_COPY = textwrap.dedent(
    """
    import sys, warnings
    sys.meta_path = [f for f in sys.meta_path if "_EditableFinder" not in repr(f)]
    warnings.simplefilter("always")
    import torch, dwf_kernels
    from dwf_kernels import _extension
    assert dwf_kernels.__file__.startswith(sys.argv[1]), dwf_kernels.__file__
    print("LOADED", _extension.LOADED, "dwf_kernels._C" in sys.modules, sorted(_extension.KERNEL_DEVICES))
    print("ERROR", _extension.LOAD_ERROR)
    try:
        print(dwf_kernels.dwf_product(torch.tensor([[2.0, 3.0], [5.0, 7.0]]), backend="cpu").tolist())
    except RuntimeError as exc:
        print("REFUSED", exc)
    """
)


def _load_in_copy(tree: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(tree), TRITON_INTERPRET="0")
    result = subprocess.run(
        [sys.executable, "-c", _LOAD_IN_COPY, str(tree)], capture_output=True, text=True, env=env, cwd=tree
    )
    assert result.returncode == 0, result.stderr
    return result


def test_stale_build_is_refused_before_import(tmp_path):
    """A source tree whose setup.py/csrc no longer hash to the stamp in _build_info.py does not import
    its _C (no stale kernels registered), says so once with the rebuild command, and the extension
    backends refuse to serve; the unchanged copy loads it."""
    if not _extension.LOADED or not _source_hash.is_source_tree(str(ROOT)):
        pytest.skip(f"needs a source tree with a current build of _C ({_extension.LOAD_ERROR})")
    tree = tmp_path / "tree"
    shutil.copytree(PACKAGE_DIR, tree / "dwf_kernels", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "csrc", tree / "csrc")
    shutil.copy(ROOT / "setup.py", tree / "setup.py")

    fresh = _load_in_copy(tree)
    assert "LOADED True True ['cpu'" in fresh.stdout and "[10.0, 21.0]" in fresh.stdout, fresh.stdout + fresh.stderr
    assert "not available" not in fresh.stderr, fresh.stderr

    with open(tree / "csrc" / "dwf_math.h", "a") as f:
        f.write("// an edit after the build\n")
    stale = _load_in_copy(tree)
    assert "LOADED False False []" in stale.stdout, stale.stdout
    assert "StaleBuild: dwf_kernels._C was not loaded, it is stale" in stale.stdout, stale.stdout
    assert "pip install --no-build-isolation -e ." in stale.stdout, stale.stdout
    assert "REFUSED backend 'cpu' needs the C++ extension" in stale.stdout, stale.stdout
    assert stale.stderr.count("C++ extension dwf_kernels._C is not available (StaleBuild") == 1, stale.stderr

    (tree / "dwf_kernels" / "_build_info.py").unlink()
    unstamped = _load_in_copy(tree)
    assert "LOADED False False []" in unstamped.stdout, unstamped.stdout
    assert "it has no build stamp" in unstamped.stdout, unstamped.stdout
