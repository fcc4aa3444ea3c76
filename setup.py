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
"""

from __future__ import annotations

import glob
import os
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


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


def _nvidia_wheel_includes() -> list[str]:
    """Include dirs of the nvidia-* wheels (cuBLAS/cuSPARSE headers some torch CUDA headers need)."""
    import torch

    site = os.path.dirname(os.path.dirname(torch.__file__))
    candidates = glob.glob(os.path.join(site, "nvidia", "cu*", "include"))
    candidates += glob.glob(os.path.join(site, "nvidia", "*", "include"))
    return sorted({c for c in candidates if os.path.isdir(c)})


def _write_build_info(extension: bool, cuda: bool, cpu_isa: str, torch_version: str | None) -> None:
    """Records what this build compiled, so tests and error messages can tell what to expect."""
    with open(os.path.join(ROOT, "dwf_kernels", "_build_info.py"), "w") as f:
        f.write(
            '"""Written by setup.py at build time; not tracked by git."""\n'
            f"EXTENSION_BUILT = {extension!r}\nCUDA_BUILT = {cuda!r}\n"
            f"CPU_ISA = {cpu_isa!r}\nBUILT_AGAINST_TORCH = {torch_version!r}\n"
        )


def _extensions() -> tuple[list, dict]:
    if _env_switch("DWF_KERNELS_BUILD_EXT") is False:
        print("setup.py: DWF_KERNELS_BUILD_EXT=0, pure-Python install (no dwf_kernels._C)")
        _write_build_info(False, False, "", None)
        return [], {}
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
        os.path.join("csrc", name) for name in ("dwf_ops.cpp", "dwf_autograd.cpp", os.path.join("cpu", "dwf_cpu.cpp"))
    ]
    # No FMA contraction: a*b + c rounds like the reference PyTorch (separate mul and add kernels).
    # The silenced warnings come from torch's and GCC's headers: CUDA/clang pragmas, and GCC 12's
    # false "may be used uninitialized" inside AVX-512 intrinsics (their undefined-register idiom).
    cpu_isa, isa_flags = _cpu_isa()
    cxx_flags = ["-O3", "-ffp-contract=off", "-fopenmp", "-Wno-unknown-pragmas", "-Wno-maybe-uninitialized", *isa_flags]
    extra = {"cxx": cxx_flags}
    include_dirs = [os.path.join(ROOT, "csrc")]
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # cpp_extension needs an arch list when no GPU is visible (it crashes otherwise).
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        # No fast-math: it flushes denormals and changes NaN/Inf behaviour, which must match the reference.
        extra["nvcc"] = ["-O3", "--fmad=false", "-lineinfo"]
        include_dirs += _nvidia_wheel_includes()
        ext_cls = cpp_extension.CUDAExtension
    else:
        ext_cls = cpp_extension.CppExtension
    _write_build_info(True, with_cuda, cpu_isa, torch.__version__)
    print(f"setup.py: building dwf_kernels._C (CPU{' + CUDA' if with_cuda else ''}), CPU SIMD {cpu_isa}")
    ext = ext_cls(
        name="dwf_kernels._C",
        sources=sources,
        include_dirs=include_dirs,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
        py_limited_api=True,
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

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
    options={"bdist_wheel": {"py_limited_api": "cp39"}} if ext_modules else {},
)
