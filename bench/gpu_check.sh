#!/usr/bin/env bash
# The GPU check, one command for a machine with a GPU (it may have an older torch, e.g. 2.11):
#   bench/gpu_check.sh OUTDIR [STAGES]
# STAGES (default "build,test,bench,step"), comma-separated, each timed in OUTDIR/stages.txt:
#   build       compile dwf_kernels._C (CPU + CUDA) against this machine's torch; kernel-resources.txt
#               lists each CUDA kernel's registers and stack (spills)
#   test        the test suite on CUDA: cuda and triton backends vs the reference, opcheck,
#               torch.compile, CUDA graphs (mode="reduce-overhead"), the >2^31-element test
#               (tests/python, the device-independent training programs, run in CI instead);
#               in parallel with pytest-xdist when it is installed (Triton compiles dominate)
#   bench       kernel benchmarks of the issues' goals: D=4, N=2^24 and 2^26, fp32 and bf16, every
#               provider and mode, one pytest run (with its own copy baseline) per mode, so a run cut
#               short keeps the modes it finished
#   bench-more  the same over D=2 and D=8 and N=2^20 (context for the tables and the plot)
#   step        end-to-end training-step benchmark
# Writes env.txt, *.log, gpu-kernels-*.json, gpu-kernels.{md,png} (every gpu-kernels-*.json in
# OUTDIR, merged), gpu-goals.md (the issues' GPU goals, measured, met or not) and
# gpu-train-step.{json,md} into OUTDIR. Aims to finish within 10 minutes on one H100.
#
# Through the device tool (at most 8 files come back, 10 minutes per call), e.g.:
#   bench/gpu_check.sh /tmp/gc build,test; tar -czf $OUT/gc-1.tgz -C /tmp gc
#   bench/gpu_check.sh /tmp/gc build,bench,step; tar -czf $OUT/gc-2.tgz -C /tmp gc
# (each call starts from a bare machine unless it is still warm: repeat build when in doubt).
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

stage_start=0
begin() { echo "== $1"; stage_start=$SECONDS; }
end() { echo "$1 $((SECONDS - stage_start)) s" | tee -a "$OUT/stages.txt"; }

if has build; then
  begin build
  if ! MAX_JOBS=${MAX_JOBS:-8} $PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
    tail -40 "$OUT/build.log"; echo "build FAILED"; exit 1
  fi
  $PY -c "import dwf_kernels, dwf_kernels._extension as e; print('kernels for', sorted(e.KERNEL_DEVICES)); assert 'cuda' in e.KERNEL_DEVICES" || exit 1
  # Registers and stack (spills) of every CUDA kernel, to read beside the bandwidth figures.
  cuobjdump=$($PY -c "import os, triton; print(os.path.join(os.path.dirname(triton.__file__), 'backends/nvidia/bin/cuobjdump'))")
  command -v cuobjdump > /dev/null && cuobjdump=cuobjdump
  "$cuobjdump" -res-usage dwf_kernels/_C*.so > "$OUT/kernel-resources.txt" 2>&1 || true
  end build
fi

if has test; then
  begin test
  # loadfile: one worker takes a file's tests in turn (test_gpu.py's two >2^31-element tests each
  # need ~32 GiB and must not run side by side).
  xdist=()
  $PY -c "import xdist" 2> /dev/null && xdist=(-n "${TEST_WORKERS:-8}" --dist loadfile)
  $PY -m pytest tests --ignore=tests/python -q -p no:cacheprovider "${xdist[@]}" --durations=15 \
    > "$OUT/tests.log" 2>&1 || status=1
  tail -5 "$OUT/tests.log"
  end test
fi

BENCH=(bench/test_bench_kernels.py -q -p no:warnings -p no:cacheprovider --bench-dtypes float32,bfloat16 --bench-rounds 20)
bench_modes() {  # $1: file tag; the rest: --bench-* options
  local tag=$1 mode
  shift
  for mode in forward backward full sgd; do
    $PY -m pytest "${BENCH[@]}" "$@" -k "copy or $mode" --benchmark-json="$OUT/gpu-kernels-$tag-$mode.json" \
      >> "$OUT/bench.log" 2>&1 || status=1
  done
}
if has bench; then
  begin bench
  bench_modes goal --bench-depths 4 --bench-sizes 16777216,67108864
  end bench
fi
if has bench-more; then
  begin bench-more
  bench_modes more --bench-depths 2,8 --bench-sizes 1048576,16777216
  end bench-more
fi
if has bench || has bench-more; then
  $PY bench/report.py "$OUT"/gpu-kernels-*.json --markdown "$OUT/gpu-kernels.md" --plot "$OUT/gpu-kernels.png" \
    --goals "$OUT/gpu-goals.md" > /dev/null || status=1
  head -2 "$OUT/gpu-kernels.md"
  cat "$OUT/gpu-goals.md"
fi

if has step; then
  begin step
  $PY bench/train_step.py --json "$OUT/gpu-train-step.json" --markdown "$OUT/gpu-train-step.md" > "$OUT/step.log" 2>&1 || status=1
  cat "$OUT/gpu-train-step.md" 2>/dev/null
  end step
fi
exit $status
