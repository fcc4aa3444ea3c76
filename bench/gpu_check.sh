#!/usr/bin/env bash
# The GPU check, one command for a machine with a GPU (it may have an older torch, e.g. 2.11):
#   bench/gpu_check.sh OUTDIR [STAGES]
# STAGES (default "build,test,bench,step"), comma-separated:
#   build  compile dwf_kernels._C (CPU + CUDA) against this machine's torch; kernel-resources.txt
#          lists each CUDA kernel's registers and stack (spills)
#   test   the test suite on CUDA: cuda and triton backends vs the reference, opcheck,
#          torch.compile, CUDA graphs (mode="reduce-overhead"), the >2^31-element test
#          (tests/python, the device-independent training programs, run in CI instead)
#   bench  kernel benchmarks (every provider, copy baseline measured in the same run) and the report
#   step   end-to-end training-step benchmark
# Writes env.txt, *.log, *.json and *.md into OUTDIR. Aims to finish within 10 minutes on one H100.
set -uo pipefail
OUT=${1:?usage: bench/gpu_check.sh OUTDIR [STAGES]}
STAGES=${2:-build,test,bench,step}
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
has() { [[ ",$STAGES," == *",$1,"* ]]; }
status=0

{
  date -u +%Y-%m-%dT%H:%MZ
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import sys, torch, triton; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('triton', triton.__version__); print('device', torch.cuda.get_device_name())"
  nvcc --version | tail -1
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if has build; then
  echo "== build"
  if ! MAX_JOBS=${MAX_JOBS:-8} $PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
    tail -40 "$OUT/build.log"; echo "build FAILED"; exit 1
  fi
  $PY -c "import dwf_kernels, dwf_kernels._extension as e; print('kernels for', sorted(e.KERNEL_DEVICES)); assert 'cuda' in e.KERNEL_DEVICES" || exit 1
  # Registers and stack (spills) of every CUDA kernel, to read beside the bandwidth figures.
  cuobjdump=$($PY -c "import os, triton; print(os.path.join(os.path.dirname(triton.__file__), 'backends/nvidia/bin/cuobjdump'))")
  command -v cuobjdump > /dev/null && cuobjdump=cuobjdump
  "$cuobjdump" -res-usage dwf_kernels/_C*.so > "$OUT/kernel-resources.txt" 2>&1 || true
fi

if has test; then
  echo "== test"
  $PY -m pytest tests --ignore=tests/python -q -p no:cacheprovider > "$OUT/tests.log" 2>&1 || status=1
  tail -5 "$OUT/tests.log"
fi

if has bench; then
  echo "== bench"
  $PY -m pytest bench/test_bench_kernels.py -q -p no:warnings -p no:cacheprovider \
    --bench-depths 2,4,8 --bench-sizes 1048576,16777216,67108864 --bench-dtypes float32,bfloat16 \
    --bench-rounds 20 --benchmark-json="$OUT/gpu-kernels.json" > "$OUT/bench.log" 2>&1 || status=1
  $PY bench/report.py "$OUT/gpu-kernels.json" --markdown "$OUT/gpu-kernels.md" > /dev/null || status=1
  head -5 "$OUT/gpu-kernels.md"
fi

if has step; then
  echo "== step"
  $PY bench/train_step.py --json "$OUT/gpu-train-step.json" --markdown "$OUT/gpu-train-step.md" > "$OUT/step.log" 2>&1 || status=1
  cat "$OUT/gpu-train-step.md" 2>/dev/null
fi
exit $status
