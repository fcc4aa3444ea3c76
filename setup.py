"""Build dwf_kernels and its compiled extension dwf_kernels._C.

Install with `pip install --no-build-isolation -e .` (or build a wheel with `pip wheel
--no-build-isolation .`) after torch: the extension is built against the torch you run, which a
build-isolated copy would not be. Package metadata (and the version, dwf_kernels.__version__) are
in pyproject.toml; this file decides what is compiled.

What gets built (environment switches, all optional):

  DWF_KERNELS_BUILD_EXT=0   pure-Python install: no compiled extension; the reference (and, on
                            CUDA, Triton) backends serve.
  DWF_KERNELS_CUDA=1 / 0    force the CUDA kernels on / off. Default: built whenever the installed
                            torch is a CUDA build and nvcc exists, whether or not a GPU is visible.
  DWF_KERNELS_CPU_ISA       the widest SIMD variant of the CPU kernels to build: avx512 (default:
                            all three variants), avx2 (baseline + AVX2) or default (baseline only).
  CUDA_HOME                 default: /usr/local/cuda when it holds nvcc, else nvcc's parent.
  TORCH_CUDA_ARCH_LIST      default: the visible GPUs' architectures, or "8.0;9.0" (A100, H100/H200)
                            when no GPU is visible.

The CPU kernels (csrc/cpu/dwf_cpu_kernels.cpp) are compiled once per SIMD variant, each object with
its own flags, as ATen compiles its own CPU kernels: the baseline (x86-64, no flags), AVX2 (-mavx2
-mfma -mf16c) and AVX-512 (and -mavx512f/bw/vl/dq). Everything else, the op registration and the
CUDA host code included, gets the baseline flags only. At run time the ops call the widest built
variant at or below ATen's CPU capability (at::get_cpu_capability(): the CPU's best, lowered by
ATEN_CPU_CAPABILITY=avx2|default), so one binary runs on any x86-64 CPU. On other architectures
only the baseline is built. The variants' objects are linked after the baseline code, baseline
first, so where two objects emit the same inline function the linker keeps the baseline copy.
Cost: the two extra variants are two more compiles of that one file. Compiling the CPU code took
54 CPU-seconds with one AVX-512 object and 145 with the host file and three variants (12 + 50 +
44 + 40), about 45 s more wall time at MAX_JOBS=2 on 2 cores. The whole build (CPU + CUDA, whose
compile dominates), MAX_JOBS=2 on a 2-core machine shared with other builds: 684 s -> 888 s wall.

After a successful build, dwf_kernels/_build_info.py records what was built: CPU_VARIANTS, and
SOURCE_HASH (dwf_kernels/_source_hash.py: setup.py and csrc/); in a source tree
dwf_kernels/_extension.py refuses to load a _C whose stamp does not match the sources present.

The extension uses only Python's stable ABI (a plain PyInit and one function, compiled with
Py_LIMITED_API; the C++ code uses torch's C++ API only), so one binary, dwf_kernels/_C.abi3.so,
serves every CPython from 3.10 on; wheels are tagged cp310-abi3.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import platform
import shutil
from concurrent.futures import ThreadPoolExecutor

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CPU_KERNELS_SOURCE = os.path.join("csrc", "cpu", "dwf_cpu_kernels.cpp")
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


# The SIMD variants of the CPU kernels, narrowest first (the link order), with their compiler flags.
# The CPU_CAPABILITY macros select at::vec's implementation and its inline namespace, as in ATen's
# own per-capability builds. Each variant's flags include the narrower ones'.
_AVX2_FLAGS = ["-mavx2", "-mfma", "-mf16c"]
CPU_VARIANTS = {
    "default": ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"],
    "avx2": [*_AVX2_FLAGS, "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "avx512": [
        *_AVX2_FLAGS,
        "-mavx512f",
        "-mavx512bw",
        "-mavx512vl",
        "-mavx512dq",
        "-DCPU_CAPABILITY=AVX512",
        "-DCPU_CAPABILITY_AVX512",
    ],
}


def _cpu_variants() -> list[str]:
    """The CPU kernel variants to build: every one up to DWF_KERNELS_CPU_ISA (x86-64 only)."""
    widest = os.environ.get("DWF_KERNELS_CPU_ISA", "").strip().lower() or "avx512"
    names = list(CPU_VARIANTS)
    if widest not in names:
        raise SystemExit(f"setup.py: DWF_KERNELS_CPU_ISA must be avx512, avx2 or default; got {widest!r}")
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ["default"]
    return names[: names.index(widest) + 1]


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


def _build_ext_class(cpp_extension, info: dict, cpu_variants: list[str]) -> type:
    class BuildExt(cpp_extension.BuildExtension.with_options(use_ninja=True)):
        """torch's BuildExtension, with the CPU kernel variants compiled first, then the build stamp,
        written only once the build succeeded (a failed build leaves the previous _C beside its own
        stamp)."""

        def build_extension(self, ext) -> None:
            # torch's build_extensions has added its flags to ext.extra_compile_args and routed
            # self.compiler.compile through ninja. Each variant is its own ninja build (its own
            # flags), in its own directory; up to MAX_JOBS of them at once.
            def compile_variant(name: str) -> list[str]:
                return self.compiler.compile(
                    [CPU_KERNELS_SOURCE],
                    output_dir=os.path.join(self.build_temp, f"cpu-{name}"),
                    macros=ext.define_macros,
                    include_dirs=ext.include_dirs,
                    debug=self.debug,
                    extra_postargs={
                        **ext.extra_compile_args,
                        "cxx": [*ext.extra_compile_args["cxx"], *CPU_VARIANTS[name]],
                    },
                    depends=ext.depends,
                )

            workers = max(1, min(len(cpu_variants), int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1)))
            with ThreadPoolExecutor(workers) as pool:
                variant_objects = [obj for objs in pool.map(compile_variant, cpu_variants) for obj in objs]
            # Linked after the baseline objects, narrowest variant first (see the header).
            ext.extra_objects = [*variant_objects, *ext.extra_objects]
            super().build_extension(ext)

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
        info = {"EXTENSION_BUILT": False, "CUDA_BUILT": False, "CPU_VARIANTS": (), "BUILT_AGAINST_TORCH": None}
        _write_build_info(os.path.join(ROOT, "dwf_kernels"), info)
        return [], {}, {}
    _default_cuda_home()
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        raise SystemExit(
            f"setup.py: torch is needed to build dwf_kernels._C ({exc}). Install torch first, then build "
            "with `pip install --no-build-isolation ...` (an isolated build environment has no torch), "
            "or set DWF_KERNELS_BUILD_EXT=0 for a pure-Python install."
        ) from exc

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

    # The baseline-compiled sources; the CPU kernel variants (CPU_KERNELS_SOURCE) are compiled by BuildExt.
    host = (
        "dwf_ops.cpp",
        "dwf_autograd.cpp",
        os.path.join("cpu", "dwf_cpu.cpp"),
        os.path.join("cpu", "dwf_sparse.cpp"),
    )
    sources = [os.path.join("csrc", name) for name in host]
    # No FMA contraction: a*b + c rounds like the reference PyTorch (separate mul and add kernels).
    # The silenced warnings come from torch's and GCC's headers: CUDA/clang pragmas, and GCC 12's
    # false "may be used uninitialized" inside AVX-512 intrinsics (their undefined-register idiom).
    cpu_variants = _cpu_variants()
    abi3_tag, limited_api = _limited_api(cpp_extension)
    cxx_flags = ["-O3", "-ffp-contract=off", "-fopenmp", "-Wno-unknown-pragmas", "-Wno-maybe-uninitialized"]
    # The host code calls the variants built (csrc/cpu/dwf_cpu.cpp).
    variant_macros = [f"-DDWF_CPU_{name.upper()}" for name in cpu_variants if name != "default"]
    extra = {"cxx": [*cxx_flags, *variant_macros, *limited_api]}
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
        "CPU_VARIANTS": tuple(cpu_variants),
        "BUILT_AGAINST_TORCH": torch.__version__,
        "CUDA_ARCH_LIST": _cuda_arch_list() if with_cuda else "",
        "PY_LIMITED_API": abi3_tag,
        "SOURCE_HASH": _source_hash(),
    }
    print(
        f"setup.py: building dwf_kernels._C (CPU{' + CUDA' if with_cuda else ''}), "
        f"CPU kernel variants {', '.join(cpu_variants)}"
    )
    ext = ext_cls(
        name="dwf_kernels._C",
        sources=sources,
        include_dirs=include_dirs,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
        py_limited_api=True,
    )
    # bdist_wheel: tag the wheel <abi3_tag>-abi3 (the .so is named _C.abi3.so by py_limited_api).
    return (
        [ext],
        {"build_ext": _build_ext_class(cpp_extension, info, cpu_variants)},
        {"bdist_wheel": {"py_limited_api": abi3_tag}},
    )


ext_modules, cmdclass, options = _extensions()

# Name, version, dependencies: pyproject.toml.
setup(
    packages=find_packages(include=["dwf_kernels", "dwf_kernels.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options=options,
)
