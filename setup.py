"""Build dwf_kernels and its compiled extension dwf_kernels._C.

What gets built (environment switches, all optional):

  DWF_KERNELS_BUILD_EXT=0   pure-Python install: no compiled extension; the reference (and, on
                            CUDA, Triton) backends serve.
  DWF_KERNELS_CUDA=1 / 0    force the CUDA kernels on / off. Default: built whenever the installed
                            torch is a CUDA build and nvcc exists, whether or not a GPU is visible.
  DWF_KERNELS_CPU_ISA       SIMD level of the C++ CPU kernels: auto (default: the best of avx512 /
                            avx2 this build machine runs), avx512, avx2 or default (portable).
  CUDA_HOME                 default: /usr/local/cuda when it holds nvcc, else nvcc's parent.
  TORCH_CUDA_ARCH_LIST      default: the visible GPUs' architectures, or "8.0;9.0" (A100, H100/H200)
                            when no GPU is visible.

Install with `pip install --no-build-isolation -e .` after torch, so the extension is built
against the torch you run.

After a successful build, dwf_kernels/_build_info.py records what was built, SOURCE_HASH included
(dwf_kernels/_source_hash.py: setup.py and csrc/); in a source tree dwf_kernels/_extension.py
refuses to load a _C whose stamp does not match the sources present.

The extension uses only Python's stable ABI (a plain PyInit, compiled with Py_LIMITED_API), so one
binary, dwf_kernels/_C.abi3.so, serves every CPython from 3.10 on; wheels are tagged cp310-abi3.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# The stable-ABI floor (= python_requires) when torch does not set Py_LIMITED_API itself.
LIMITED_API_VERSION = (3, 10)


def _env_switch(name: str) -> bool | None:
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise SystemExit(f"setup.py: {name} must be 0 or 1 (or unset); got {os.environ[name]!r}")


def _default_cuda_home() -> None:
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    # torch's own autodetection can pick /usr/local (from a /usr/local/bin/nvcc link); prefer the toolkit.
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    elif shutil.which("nvcc"):
        os.environ["CUDA_HOME"] = os.path.dirname(os.path.dirname(os.path.realpath(shutil.which("nvcc"))))


def _cpu_isa() -> tuple[str, list[str]]:
    """The SIMD level of the CPU kernels and its compiler flags."""
    isa = os.environ.get("DWF_KERNELS_CPU_ISA", "auto").strip().lower()
    flags: set[str] = set()
    if isa == "auto":
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("flags"):
                        flags = set(line.split(":", 1)[1].split())
                        break
        except OSError:
            pass
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c"} <= flags:
            isa = "avx512"
        elif {"avx2", "fma", "f16c"} <= flags:
            isa = "avx2"
        else:
            isa = "default"
    # The CPU_CAPABILITY macros select at::vec's implementation and its inline namespace (so these
    # inline functions never clash with torch's own copies compiled for other ISAs).
    if isa == "avx512":
        return isa, [
            "-mavx512f",
            "-mavx512bw",
            "-mavx512vl",
            "-mavx512dq",
            "-mfma",
            "-mf16c",
            "-DCPU_CAPABILITY_AVX512",
            "-DCPU_CAPABILITY=AVX512",
        ]
    if isa == "avx2":
        return isa, ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    if isa == "default":
        return isa, ["-DCPU_CAPABILITY=DEFAULT"]
    raise SystemExit(f"setup.py: DWF_KERNELS_CPU_ISA must be auto, avx512, avx2 or default; got {isa!r}")


def _nvidia_wheel_includes(toolkit_include: str) -> list[str]:
    """Include dirs of the nvidia-* wheels that supply the cuBLAS/cuSPARSE headers torch's CUDA headers
    (ATen/cuda/CUDAContext.h) include, for a toolkit that lacks them; none when the toolkit has them.

    The caller passes them with -isystem, searched after every -I dir, the toolkit's included: these
    dirs also hold their own version's cuda_runtime.h & co., which must never shadow the toolkit's.
    """
    needed = [h for h in ("cublas_v2.h", "cusparse.h") if not os.path.exists(os.path.join(toolkit_include, h))]
    if not needed:
        return []
    import torch

    site = os.path.dirname(os.path.dirname(torch.__file__))
    dirs = []
    for candidate in sorted(glob.glob(os.path.join(site, "nvidia", "*", "include"))):
        provides = [h for h in needed if os.path.exists(os.path.join(candidate, h))]
        if provides:
            dirs.append(candidate)
            needed = [h for h in needed if h not in provides]
    return dirs


def _limited_api(cpp_extension) -> tuple[str, list[str]]:
    """The stable-ABI version the extension is compiled for, as a wheel tag (cp310), and its flags.

    torch >= 2.6 itself adds -DPy_LIMITED_API=<cpp_extension.min_supported_cpython> to py_limited_api
    extensions, after our flags (of two different -D the later wins): its value, when it has one, is
    the one in force and the tag follows it; older torch gets ours. dwf_ops.cpp checks at compile time
    that the macro in force equals DWF_PY_LIMITED_API, so the tag cannot drift from the binary.
    """
    hexcode = getattr(cpp_extension, "min_supported_cpython", None)
    flags = []
    if hexcode is None:
        hexcode = f"0x{LIMITED_API_VERSION[0]:02X}{LIMITED_API_VERSION[1]:02X}0000"
        flags.append(f"-DPy_LIMITED_API={hexcode}")
    version = int(hexcode, 16)
    return f"cp{version >> 24}{(version >> 16) & 0xFF}", [*flags, f"-DDWF_PY_LIMITED_API={hexcode}"]


def _cuda_arch_list() -> str:
    """The architectures the CUDA kernels are compiled for (what cpp_extension uses)."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    import torch

    caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    return ";".join(f"{major}.{minor}" for major, minor in sorted(caps))


def _write_build_info(directory: str, info: dict) -> None:
    """Records what was built, for the loader (SOURCE_HASH), tests and error messages."""
    with open(os.path.join(directory, "_build_info.py"), "w") as f:
        f.write('"""Written by setup.py after a build; not tracked by git."""\n')
        f.writelines(f"{key} = {value!r}\n" for key, value in info.items())


def _source_hash() -> str:
    """dwf_kernels/_source_hash.py's hash of this tree, the module loaded by path (the package
    itself imports torch and _C)."""
    path = os.path.join(ROOT, "dwf_kernels", "_source_hash.py")
    spec = importlib.util.spec_from_file_location("_dwf_kernels_source_hash", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.source_hash(ROOT)


def _build_ext_class(cpp_extension, info: dict) -> type:
    class BuildExt(cpp_extension.BuildExtension.with_options(use_ninja=True)):
        """torch's BuildExtension, then the build stamp, written only once the build succeeded (a failed
        build leaves the previous _C beside its own stamp)."""

        def run(self) -> None:
            super().run()
            # In place (editable installs, build_ext --inplace): beside the _C just copied into the
            # tree. Otherwise into the build dir a wheel is made from (build_py has already run).
            directory = os.path.join(ROOT if self.inplace else self.build_lib, "dwf_kernels")
            os.makedirs(directory, exist_ok=True)
            _write_build_info(directory, info)

    return BuildExt


def _extensions() -> tuple[list, dict, dict]:
    if _env_switch("DWF_KERNELS_BUILD_EXT") is False:
        print("setup.py: DWF_KERNELS_BUILD_EXT=0, pure-Python install (no dwf_kernels._C)")
        info = {"EXTENSION_BUILT": False, "CUDA_BUILT": False, "CPU_ISA": "", "BUILT_AGAINST_TORCH": None}
        _write_build_info(os.path.join(ROOT, "dwf_kernels"), info)
        return [], {}, {}
    _default_cuda_home()
    import torch
    from torch.utils import cpp_extension

    force_cuda = _env_switch("DWF_KERNELS_CUDA")
    nvcc = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc") if cpp_extension.CUDA_HOME else None
    have_cuda_toolchain = torch.version.cuda is not None and nvcc is not None and os.path.exists(nvcc)
    if force_cuda and not have_cuda_toolchain:
        raise SystemExit(
            "setup.py: DWF_KERNELS_CUDA=1 but CUDA cannot be built: "
            f"torch.version.cuda={torch.version.cuda!r}, nvcc={nvcc!r}. Install a CUDA build of torch and "
            "the CUDA toolkit, or set CUDA_HOME."
        )
    with_cuda = have_cuda_toolchain if force_cuda is None else force_cuda

    sources = [
        os.path.join("csrc", name)
        for name in ("dwf_ops.cpp", "dwf_autograd.cpp", os.path.join("cpu", "dwf_cpu.cpp"), os.path.join("cpu", "dwf_sparse.cpp"))
    ]
    # No FMA contraction: a*b + c rounds like the reference PyTorch (separate mul and add kernels).
    # The silenced warnings come from torch's and GCC's headers: CUDA/clang pragmas, and GCC 12's
    # false "may be used uninitialized" inside AVX-512 intrinsics (their undefined-register idiom).
    cpu_isa, isa_flags = _cpu_isa()
    abi3_tag, limited_api = _limited_api(cpp_extension)
    cxx_flags = ["-O3", "-ffp-contract=off", "-fopenmp", "-Wno-unknown-pragmas", "-Wno-maybe-uninitialized"]
    extra = {"cxx": [*cxx_flags, *isa_flags, *limited_api]}
    include_dirs = [os.path.join(ROOT, "csrc")]
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # cpp_extension needs an arch list when no GPU is visible (it crashes otherwise).
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        # No fast-math: it flushes denormals and changes NaN/Inf behaviour, which must match the reference.
        extra["nvcc"] = ["-O3", "--fmad=false", "-lineinfo", *limited_api]
        for directory in _nvidia_wheel_includes(os.path.join(cpp_extension.CUDA_HOME, "include")):
            for flags in extra.values():
                flags += ["-isystem", directory]
        ext_cls = cpp_extension.CUDAExtension
    else:
        ext_cls = cpp_extension.CppExtension
    info = {
        "EXTENSION_BUILT": True,
        "CUDA_BUILT": with_cuda,
        "CPU_ISA": cpu_isa,
        "BUILT_AGAINST_TORCH": torch.__version__,
        "CUDA_ARCH_LIST": _cuda_arch_list() if with_cuda else "",
        "PY_LIMITED_API": abi3_tag,
        "SOURCE_HASH": _source_hash(),
    }
    print(f"setup.py: building dwf_kernels._C (CPU{' + CUDA' if with_cuda else ''}), CPU SIMD {cpu_isa}")
    ext = ext_cls(
        name="dwf_kernels._C",
        sources=sources,
        include_dirs=include_dirs,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
        py_limited_api=True,
    )
    # bdist_wheel: tag the wheel <abi3_tag>-abi3 (the .so is named _C.abi3.so by py_limited_api).
    return [ext], {"build_ext": _build_ext_class(cpp_extension, info)}, {"bdist_wheel": {"py_limited_api": abi3_tag}}


ext_modules, cmdclass, options = _extensions()

setup(
    name="dwf_kernels",
    version="0.1.0",
    description="Fused kernels for Deep Weight Factorization (DWF) sparse training in PyTorch",
    packages=find_packages(include=["dwf_kernels", "dwf_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "numpy"],
    extras_require={"triton": ["triton>=3.2"], "test": ["pytest", "pytest-benchmark"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options=options,
)
