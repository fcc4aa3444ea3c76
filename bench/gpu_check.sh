#!/usr/bin/env bash
# The GPU check: everything a GPU machine must tell about dwf_kernels, in one call of at most
# GPU_CHECK_BUDGET seconds (default 570), each stage under its own timeout, in this order:
#
#   preflight  tools, headers and versions (env.txt); nothing else runs blind
#   extension  dwf_kernels._C for this machine: the prebuilt one if it is there and current
#              (prebuilt/gpu/, see below), else built here (CUDA kernels compile for minutes)
#   bench      the goal kernel benchmarks: D=4, N=2^26, float32 and bfloat16; the cuda and triton
#              backends and the eager chain in every mode, torch.compile in `full`, and in `sgd`
#              each backend's fused backward followed by torch.optim.SGD(fused=True); every case is
#              checked against the reference once, then timed on the device (CUDA events around
#              back-to-back calls); one pytest run, with its own copy baseline, per mode
#   variants   bench/cuda_backward_variants.cu (nvcc): the backward's and the SGD step's loop in
#              several launch shapes against the copy bandwidth (cuda-backward-variants.md)
#   tests      the CUDA and the Triton tests, two pytest processes side by side (-k cuda and
#              -k triton over the suite, the GPU-only file tests/test_gpu.py included)
#   step       training steps: dense + torch.optim.SGD(fused=True) against DWF D=4 + FusedSGD,
#              LeNet-300-100, VGG-16, ResNet-18 (results written case by case), run eagerly and
#              replayed as one CUDA graph per step
#   launch     host time per call of the triton backend, and an empty Triton kernel's launch; the
#              host time a DWF layer adds to a training step (bench/layer_host_time.py)
#   fusedsgd   FusedSGD.step() alone, all layers in one op call against one per layer
#              (bench/fused_sgd_step.py: 64 layers of 64x64, ResNet-18)
#   ncu        Nsight Compute on the fused SGD step's kernels of both backends (bench/ncu_sgd.py)
#   more       more kernel benchmarks (D=2 and 8, N=2^20 and 2^24) while time is left
#
# A stage that fails or times out is recorded and the next one runs. After every stage the whole
# working folder (logs, benchmark JSON, reports) is archived into OUTDIR/gpu-check.tgz, atomically,
# so a call that is cut off still returns everything finished until then. OUTDIR holds at most
# eight files: gpu-check.tgz, summary.md (stages, goals, test results), env.txt, gpu-goals.md,
# gpu-kernels.md, gpu-train-step.md, gpu-kernels.png and kernel-resources.txt (registers, stack,
# shared and local memory of every CUDA kernel in the extension and every Triton kernel compiled,
# read by cuobjdump -res-usage).
#
# On a remote GPU machine without network: copy the repository (tracked files) and the prebuilt
# extension folder prebuilt/gpu/ (made beforehand on any machine by `make gpu-prebuilt`, for the
# GPU machine's Python, torch and CUDA; a few MB) along, then run from the repository root
#     bench/gpu_check.sh /path/to/OUTDIR
# and bring OUTDIR back. The GPU machine needs python3 with torch (CUDA), triton, pytest and
# pytest-benchmark (pytest-xdist optional); nvcc only when the extension must be built there.
#
#     bench/gpu_check.sh --dry-run OUTDIR
# runs the same script on a machine without a GPU in about a minute: small CPU sizes, the CUDA
# stages skipped with a note, the same archive and summaries (the test suite runs it).
set -uo pipefail

DRY=0
if [[ ${1:-} == --dry-run ]]; then
  DRY=1
  shift
fi
OUTDIR=${1:?usage: bench/gpu_check.sh [--dry-run] OUTDIR}
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-$([[ $DRY == 1 ]] && echo 60 || echo 570)}
PREBUILT=${DWF_PREBUILT:-prebuilt/gpu}
T0=$SECONDS
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/dwf-gpu-check.XXXXXX")
STAGES="$WORK/stages.tsv"
printf 'stage\tstatus\tseconds\tnote\n' > "$STAGES"
export PYTHONUNBUFFERED=1
# The scripts under bench/ import dwf_kernels from this checkout (nothing is installed on a GPU machine).
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
# Run from inside a pytest-xdist worker (the dry-run test), pytest-benchmark would see these and
# silently disable every benchmark.
unset PYTEST_XDIST_WORKER PYTEST_XDIST_WORKER_COUNT PYTEST_XDIST_TESTRUNUID PYTEST_ADDOPTS
unset TRITON_INTERPRET  # compiled Triton (on CPU only the launch-overhead stage, its launch stubbed)

left() { echo $((BUDGET - (SECONDS - T0))); }

archive() {  # the working folder into OUTDIR, atomically; the summaries beside it
  summarize
  for f in env.txt gpu-goals.md gpu-kernels.md gpu-train-step.md gpu-kernels.png kernel-resources.txt; do
    [[ -f $WORK/$f ]] && cp "$WORK/$f" "$OUTDIR/$f.tmp" && mv "$OUTDIR/$f.tmp" "$OUTDIR/$f"
  done
  cp "$WORK/summary.md" "$OUTDIR/summary.md.tmp" && mv "$OUTDIR/summary.md.tmp" "$OUTDIR/summary.md"
  tar -czf "$OUTDIR/gpu-check.tgz.tmp" -C "$WORK" . && mv "$OUTDIR/gpu-check.tgz.tmp" "$OUTDIR/gpu-check.tgz"
}

summarize() {
  {
    echo "# GPU check$([[ $DRY == 1 ]] && echo ' (dry run on CPU)')"
    echo
    head -3 "$WORK/env.txt" 2> /dev/null | sed 's/^/    /'
    echo
    echo "| stage | status | seconds | note |"
    echo "|---|---|---|---|"
    tail -n +2 "$STAGES" | awk -F'\t' '{printf "| %s | %s | %s | %s |\n", $1, $2, $3, $4}'
    for f in gpu-goals.md cuda-backward-variants.md tests-cuda.summary tests-triton.summary launch.summary \
      layer-host-time.md gpu-fused-sgd-step.md; do
      [[ -s $WORK/$f ]] && { echo; echo "## $f"; echo; cat "$WORK/$f"; }
    done
  } > "$WORK/summary.md"
}

# stage NAME MAX_SECONDS MIN_SECONDS FUNCTION: runs FUNCTION (logging to NAME.log) under a timeout
# of MAX_SECONDS or what is left of the budget (keeping 15 s for the archive), skipped when less
# than MIN_SECONDS is left; records the outcome and archives.
stage() {
  local name=$1 max=$2 min=$3 fn=$4 limit start status note
  limit=$(($(left) - 15))
  ((limit > max)) && limit=$max
  if ((limit < min)); then
    printf '%s\tskipped\t0\tonly %s s of the budget left\n' "$name" "$(left)" >> "$STAGES"
    echo "== $name: skipped (only $(left) s left)"
    return
  fi
  echo "== $name (at most $limit s)"
  start=$SECONDS
  export STAGE_END=$(($(date +%s) + limit))
  rm -f "$WORK/stage.note"
  # The stage runs in a child shell under its timeout (the functions and settings are exported).
  timeout -k 10 "$limit" bash -c "$fn" > "$WORK/$name.log" 2>&1
  status=$?
  note=$(cat "$WORK/stage.note" 2> /dev/null)
  case $status in
    0) status=ok ;;
    124 | 137) status="TIMED OUT" ;;
    *) status="FAILED ($status)" ;;
  esac
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" $((SECONDS - start)) "$note" >> "$STAGES"
  echo "   $status, $((SECONDS - start)) s${note:+; $note}"
  tail -3 "$WORK/$name.log" | sed 's/^/   | /'
  archive
}

note() { echo "$*" > "$WORK/stage.note"; }

# Runs a command under what is left of the current stage's time (SIGTERM, then SIGKILL 10 s later).
bounded() {
  local rest=$((STAGE_END - $(date +%s)))
  ((rest < 1)) && return 124
  timeout -k 10 "$rest" "$@"
}

preflight() {
  {
    date -u +%Y-%m-%dT%H:%M:%SZ
    "$PY" - << 'EOF'
import importlib, os, sys, sysconfig
import torch
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none (cpu)"
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda, "| device", gpu)
headers = sysconfig.get_paths()["include"]
print("python headers", headers, "present" if os.path.exists(os.path.join(headers, "Python.h")) else "MISSING")
for name in ("triton", "pytest", "pytest_benchmark", "xdist", "matplotlib", "numpy"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "installed"))
    except ImportError:
        print(name, "MISSING")
print("cpu cores", os.cpu_count())
EOF
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 | head -2
    if command -v nvcc > /dev/null; then nvcc --version | tail -1; else echo "nvcc: not found (the extension cannot be built here)"; fi
  } > "$WORK/env.txt" 2>&1
  cat "$WORK/env.txt"
  if grep -qE "^(pytest|pytest_benchmark) MISSING|Traceback" "$WORK/env.txt"; then
    return 1
  fi
  if [[ $DRY == 0 ]] && grep -q "| device none" "$WORK/env.txt"; then
    echo "no CUDA device visible"
    return 1
  fi
}

extension_ok() {
  "$PY" - << 'EOF'
import sys
import dwf_kernels._extension as e
want = {"cpu", "cuda"} if "--cuda" in sys.argv else {"cpu"}
print("dwf_kernels._C:", "loaded" if e.LOADED else f"not loaded ({e.LOAD_ERROR})", "| kernels for", sorted(e.KERNEL_DEVICES))
sys.exit(0 if e.LOADED and want <= e.KERNEL_DEVICES else 1)
EOF
}

# Registers, stack, shared and local memory per kernel (cuobjdump -res-usage): the extension's CUDA
# kernels and every Triton kernel compiled so far (their cubins in TRITON_CACHE_DIR), one line each.
resources() {
  local cuobjdump f demangle=cat
  cuobjdump=$(command -v cuobjdump || echo "$("$PY" -c "import os, triton; print(os.path.dirname(triton.__file__))")/backends/nvidia/bin/cuobjdump")
  [[ -x $cuobjdump ]] || { echo "cuobjdump: not found" > "$WORK/kernel-resources.txt"; return 0; }
  command -v c++filt > /dev/null && demangle=c++filt
  # "Function NAME:" then its usage on the next line: one line per kernel, the name last.
  one_line() { awk '/^ *arch =/ {print $0; next} /^ *Function / {name = $2; sub(/:$/, "", name); next}
                    name != "" && /REG:/ {print $1, $2, $3, $4, name; name = ""}' | sed 's/^ *//'; }
  {
    echo "# cuobjdump -res-usage: registers, stack frame, shared and local memory (bytes) per kernel"
    echo "## dwf_kernels._C (CUDA kernels)"
    for f in dwf_kernels/_C*.so; do
      [[ -f $f ]] && "$cuobjdump" -res-usage "$f" 2>&1 | one_line | $demangle
    done
    echo "## Triton kernels compiled in this run (cache entry, usage, kernel)"
    while IFS= read -r f; do
      "$cuobjdump" -res-usage "$f" 2>&1 | one_line | grep -v "arch =" | sed "s|^|$(basename "$(dirname "$f")" | cut -c1-8) |"
    done < <(find "$TRITON_CACHE_DIR" -name '*.cubin' 2> /dev/null | sort)
  } > "$WORK/kernel-resources.txt" 2>&1
}

extension() {
  local want=--cuda
  [[ $DRY == 1 ]] && want=--cpu
  if [[ $DRY == 1 ]]; then
    note "dry run: the extension already built here is used (no copy, no CUDA build)"
    extension_ok $want
    return
  fi
  if compgen -G "$PREBUILT/_C*.so" > /dev/null; then
    rm -f dwf_kernels/_C*.so  # a build for another Python would be imported first
    cp "$PREBUILT"/_C*.so "$PREBUILT"/_build_info.py dwf_kernels/
    if extension_ok $want; then
      note "prebuilt extension from $PREBUILT"
      resources
      return 0
    fi
    echo "the prebuilt extension does not load here (above); building it"
  else
    echo "no prebuilt extension in $PREBUILT; building it"
  fi
  rm -f dwf_kernels/_C*.so
  note "built here"
  MAX_JOBS=${MAX_JOBS:-$(nproc)} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} \
    bounded "$PY" -m pip install --no-build-isolation --no-deps -e . || return 1
  extension_ok $want || return 1
  resources
}

# Kernel benchmarks, one pytest run per mode (each with its own copy baseline): a run cut short
# keeps the modes finished before it. $1: file tag; the rest: --bench-* options.
bench_modes() {
  local tag=$1 mode status=0
  shift
  for mode in forward backward full sgd; do
    bench_run "$WORK/gpu-kernels-$tag-$mode.json" --bench-modes "$mode" "$@" || status=1
  done
  report || status=1
  return $status
}

# One pytest run of the kernel benchmarks into $1 (JSON); the rest: its options. Fails when the run
# fails or leaves no results (pytest-benchmark disables itself rather than failing).
bench_run() {
  local json=$1
  shift
  bounded "$PY" -m pytest bench/test_bench_kernels.py -q -p no:warnings -p no:cacheprovider "$@" \
    --benchmark-json="$json" || return 1
  "$PY" -c "import json, sys; sys.exit(0 if json.load(open(sys.argv[1]))['benchmarks'] else 1)" "$json" ||
    { echo "no benchmark results in $json"; return 1; }
}

# The reports of every benchmark result so far; fails when report.py fails.
report() {
  compgen -G "$WORK/gpu-kernels-*.json" > /dev/null || return 0
  local step=() f
  for f in "$WORK"/gpu-train-step.jsonl "$WORK"/gpu-train-step-graph.jsonl; do
    [[ -s $f ]] && step+=(--train-step "$f")
  done
  if [[ $DRY == 0 ]]; then  # a dry run only collects the tests
    for f in "$WORK"/tests-cuda.summary "$WORK"/tests-triton.summary; do
      [[ -f $f ]] && step+=(--tests "$f")
    done
  fi
  "$PY" bench/report.py "$WORK"/gpu-kernels-*.json --markdown "$WORK/gpu-kernels.md" --plot "$WORK/gpu-kernels.png" \
    --goals "$WORK/gpu-goals.md" "${step[@]}" > /dev/null || { echo "bench/report.py failed"; return 1; }
}

bench() {
  if [[ $DRY == 1 ]]; then
    note "dry run: N=4096, float32, 3 rounds, all modes in one pytest run, no torch.compile (a cold CPU compile takes 20 s)"
    bench_run "$WORK/gpu-kernels-goal-all.json" --bench-depths 4 --bench-sizes 4096 --bench-dtypes float32 \
      --bench-rounds 3 --bench-compile-modes ""
    local status=$?
    report || status=1
    return $status
  else
    bench_modes goal --bench-depths 4 --bench-sizes 67108864 --bench-dtypes float32,bfloat16 --bench-rounds 20 \
      --bench-compile-modes full
    local status=$?
    resources
    return $status
  fi
}

# Standalone launch-shape variants of the CUDA backward and SGD step (CUDA toolkit only). A dry run
# compiles them and runs nothing.
variants() {
  local nvcc
  nvcc=$(command -v nvcc || ls /usr/local/cuda/bin/nvcc 2> /dev/null | head -1)
  [[ -n $nvcc ]] || { note "nvcc not found"; return 0; }
  bounded "$nvcc" -O3 -arch=sm_90 -std=c++17 -o "$WORK/variants" bench/cuda_backward_variants.cu || return 1
  if [[ $DRY == 1 ]]; then
    note "dry run: compiled, not run (no GPU)"
    return 0
  fi
  bounded "$WORK/variants" 26 > "$WORK/cuda-backward-variants.md" 2>&1
  local status=$?
  rm -f "$WORK/variants"
  cat "$WORK/cuda-backward-variants.md"
  return $status
}

launch() {
  [[ $DRY == 1 ]] && note "dry run: the launch is stubbed (no GPU)"
  bounded "$PY" -m pytest bench/test_bench_launch.py -q -p no:warnings -p no:cacheprovider \
    --benchmark-json="$WORK/launch.json" || return 1
  "$PY" - "$WORK/launch.json" > "$WORK/launch.summary" << 'EOF'
import json, sys
doc = json.load(open(sys.argv[1]))
print("| call | launch | host us per call (median) | device us per launch |")
print("|---|---|---|---|")
for b in doc["benchmarks"]:
    e = b["extra_info"]
    device = e.get("device_us_per_launch")
    print(f"| {e['what']} | {e['launch']} | {1e6 * b['stats']['median']:.1f} | {'' if device is None else f'{device:.1f}'} |")
EOF
  cat "$WORK/launch.summary"
  # The host time a DWF layer adds to a training step (forward, backward, FusedSGD step) over a dense
  # one with torch.optim.SGD: what decides whether the eager step keeps the GPU busy.
  local host=(--device cuda --threads 0 --steps 300 --warmup 50)
  [[ $DRY == 1 ]] && host=(--steps 20 --warmup 5)
  bounded "$PY" bench/layer_host_time.py "${host[@]}" > "$WORK/layer-host-time.md" || return 1
  cat "$WORK/layer-host-time.md"
}

# One pytest process per backend family, side by side; each writes its own log and summary line.
tests() {
  local ignore=(--ignore=tests/python --ignore=tests/bench --ignore=tests/test_cuda_emulated.py
    --ignore=tests/test_triton_codegen.py --ignore=tests/test_gpu_check.py)
  local common=(tests -q -p no:cacheprovider -rfE "${ignore[@]}")
  local xdist=()
  # --dist load, not loadfile: tests/test_ops.py alone holds more than half of the Triton tests, and
  # one worker running them in turn outlasted the stage (240 s on an H200, 2026-11-28).
  "$PY" -c "import xdist" 2> /dev/null && xdist=(-n "${TEST_WORKERS:-12}" --dist load)
  # The two pytest runs end 10 s before the stage's timeout, so a run cut off still gets its summary.
  local STAGE_END=$((STAGE_END - 10))
  if [[ $DRY == 1 ]]; then
    note "dry run: no GPU, the two selections are only collected"
    common+=(--collect-only)
    xdist=()
  fi
  bounded "$PY" -m pytest "${common[@]}" -k "cuda and not triton" > "$WORK/tests-cuda.log" 2>&1 &
  local cuda=$!
  bounded "$PY" -m pytest "${common[@]}" "${xdist[@]}" -k triton > "$WORK/tests-triton.log" 2>&1 &
  local triton=$!
  wait $cuda
  local cuda_status=$?
  wait $triton
  local triton_status=$?
  local -A family_status=([cuda]=$cuda_status [triton]=$triton_status)
  for family in cuda triton; do
    if [[ ${family_status[$family]} == 124 || ${family_status[$family]} == 137 ]]; then
      # No final line: count the progress characters (. passed, F failed, E error, s skipped).
      awk '/^[.FEsxX]+( +\[ *[0-9]+%\])?$/ {s = s $1} END {
             n = length(s); passed = gsub(/\./, "", s); failed = gsub(/F/, "", s); errors = gsub(/E/, "", s)
             printf "cut off by the stage'"'"'s time limit after %d tests (%d passed, %d failed, %d with errors)\n",
               n, passed, failed, errors}' \
        "$WORK/tests-$family.log" > "$WORK/tests-$family.summary"
    else
      grep -E "passed|failed|error|no tests ran|collected|tests? collected|[0-9]+ tests?" "$WORK/tests-$family.log" | tail -1 > "$WORK/tests-$family.summary"
    fi
    grep -E "^(FAILED|ERROR) " "$WORK/tests-$family.log" | head -30 >> "$WORK/tests-$family.summary"
    echo "$family: $(head -1 "$WORK/tests-$family.summary")"
  done
  report
  ((cuda_status == 0 && triton_status == 0))
}

step() {
  # The goal's two variants: each case is a fresh process (CUDA and cuDNN start-up included), and
  # the three variants eager plus two as graphs took 197 s on an H200 machine.
  local args=(--models lenet300,vgg16,resnet18 --variants dense,dwf-fused-sgd)
  if [[ $DRY == 1 ]]; then
    args=(--models lenet300 --variants dense,dwf-fused-sgd --rounds 3 --warmup 1)
    note "dry run: LeNet-300-100 only, 3 rounds"
  fi
  bounded "$PY" bench/train_step.py "${args[@]}" --jsonl "$WORK/gpu-train-step.jsonl" \
    --json "$WORK/gpu-train-step.json" --markdown "$WORK/gpu-train-step.md"
  local status=$?
  if [[ $DRY == 0 ]]; then  # the same steps replayed as one CUDA graph each: device time, no launch cost
    bounded "$PY" bench/train_step.py "${args[@]}" --variants dense,dwf-fused-sgd --graph --rounds 100 \
      --jsonl "$WORK/gpu-train-step-graph.jsonl" --markdown "$WORK/gpu-train-step-graph.md" || status=1
    { echo; cat "$WORK/gpu-train-step-graph.md"; } >> "$WORK/gpu-train-step.md" 2> /dev/null
  fi
  report || status=1
  return $status
}

fusedsgd() {
  local args=()
  if [[ $DRY == 1 ]]; then
    args=(--models "64x(64x64)" --rounds 3)
    note "dry run: 64 small layers only, 3 rounds"
  fi
  PYTHONPATH=python${PYTHONPATH:+:$PYTHONPATH} bounded "$PY" bench/fused_sgd_step.py "${args[@]}" \
    --markdown "$WORK/gpu-fused-sgd-step.md"
}

# Nsight Compute on the fused SGD step's kernels (cuda and triton backends, D=4, N=2^24, fp32):
# achieved DRAM throughput, occupancy, registers and waves, at the card's own clocks.
ncu_sgd() {
  if [[ $DRY == 1 ]]; then
    note "dry run: no GPU; the profiled script runs once on CPU"
    bounded "$PY" bench/ncu_sgd.py --n 4096
    return
  fi
  local ncu
  ncu=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2> /dev/null | head -1)
  [[ -n $ncu ]] || { note "ncu not found"; return 0; }
  bounded "$ncu" --clock-control none --kernel-name regex:sgd_step --launch-count 8 --section SpeedOfLight \
    --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis \
    "$PY" bench/ncu_sgd.py > "$WORK/ncu-sgd.txt" 2>&1
  local status=$?
  grep -E "sgd_step|DRAM Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Waves Per SM|Duration" \
    "$WORK/ncu-sgd.txt" | head -80
  return $status
}

more() {
  if [[ $DRY == 1 ]]; then
    note "dry run: D=2, N=4096, forward only"
    bench_run "$WORK/gpu-kernels-more-forward.json" --bench-modes forward --bench-depths 2 --bench-sizes 4096 \
      --bench-rounds 3 && report
  else
    bench_modes more --bench-depths 2,8 --bench-sizes 1048576,16777216 --bench-dtypes float32,bfloat16 \
      --bench-rounds 20 --bench-compile-modes full
  fi
}

# Triton's compiled kernels in a folder of this run's own (kept out of the archive): their cubins are
# what the resource report reads.
TRITON_CACHE_DIR=$(mktemp -d "${TMPDIR:-/tmp}/dwf-triton-cache.XXXXXX")
export DRY PY PREBUILT WORK TRITON_CACHE_DIR
export -f note bounded extension_ok resources preflight extension bench_modes bench_run report bench variants launch tests step fusedsgd ncu_sgd more
stage preflight 60 5 preflight
stage extension 300 20 extension
stage bench 240 30 bench
stage variants 45 15 variants
stage tests 240 15 tests
stage step 240 20 step
stage launch 45 10 launch
stage fusedsgd 60 20 fusedsgd
stage ncu 90 20 ncu_sgd
stage more 600 15 more
resources
archive
echo "== done in $((SECONDS - T0)) s of $BUDGET; $OUTDIR:"
ls -l "$OUTDIR"
grep -q $'\tok\t' "$STAGES" && ! grep -qE $'\t(FAILED|TIMED OUT)' "$STAGES"
