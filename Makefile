# make test   : create .venv if missing, install torch (CPU build) + test deps + the package, run tests
# make bench  : same set-up, then the benchmarks against the baselines (QUICK=1 for a 2-minute run)
# make demo   : same set-up, then train on Fashion-MNIST and print Recall@K / NMI (DEMO_ARGS="--plot x.png")
# make triton-compat : the Triton tests on every other triton a CUDA torch >= 2.11 pins (one venv each)
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
PIP     := $(VPY) -m pip
TORCH   := torch==2.13.0
# triton 3.7.1 is the one the CUDA wheel of torch 2.13.0 pins: the CPU test venv runs the Triton kernels
# (under the interpreter) on the triton a GPU user of the same torch gets. The others that a CUDA torch
# >= 2.11 pins are checked by make triton-compat (docs/triton.md "Triton versions").
TRITON  := triton==3.7.1
DEPS    := numpy ninja pytest pytest-benchmark pytorch-metric-learning==2.9.0 scikit-learn tqdm matplotlib $(TRITON) ruff==0.17.6
STAMP   := $(VENV)/.deps-stamp
BUILD   := $(VENV)/.build-stamp
BENCHDEPS := $(VENV)/.bench-stamp
SRCS    := $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.cuh) setup.py

.PHONY: test bench build gpu-check demo clean env lint

$(VPY):
	$(PY) -m venv $(VENV)

$(STAMP): $(VPY) Makefile
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q $(DEPS) "$(TORCH)"
	touch $@

$(BUILD): $(STAMP) $(SRCS)
	MAX_JOBS=$${MAX_JOBS:-2} $(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

build: $(BUILD)

# lint: ruff with the rules in pyproject.toml ([tool.ruff]); no build needed
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

env: $(BUILD)
	$(VPY) -m rll_kernels.env_report

test: $(BUILD)
	$(VPY) -m rll_kernels.env_report
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(VPY) -m pytest -q tests $(PYTEST_ARGS)

# pykeops is optional: the benchmark reports "pykeops not installed" when this fails
$(BENCHDEPS): $(STAMP)
	$(PIP) install -q pykeops==2.3 || echo "pykeops did not install; the benchmark will say so"
	touch $@

bench: $(BUILD) $(BENCHDEPS)
	$(VPY) -m rll_kernels.env_report
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(VPY) bench/run.py $(if $(QUICK),--quick,) $(BENCH_ARGS)

# gpu-check: on a CUDA machine (a CUDA build of torch in the venv), the Triton tests on the GPU, parity
# at N up to 16384, timings vs reference / PML / torch.compile and the GPU goal; without CUDA it
# prints the roofline, says so and exits 0. GPU_CHECK_ARGS="--quick" for a shorter run.
gpu-check: $(BUILD)
	$(VPY) -m rll_kernels.env_report
	$(VPY) bench/gpu_check.py --pytest $(GPU_CHECK_ARGS)

demo: $(BUILD)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(VPY) examples/train_fashion_mnist.py $(DEMO_ARGS)

clean:
	rm -rf build *.egg-info rll_kernels/*.so $(BUILD)

# SoftTriple: fused C++ vs PML at SOP scale (N=256, C=11318, K=10, D=512, fp32, 2 threads)
.PHONY: bench-softtriple
bench-softtriple: $(BUILD)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(VPY) bench/bench_softtriple.py $(BENCH_ARGS)

# CUDA backend without a GPU: nvcc compile checks (skipped without nvcc) + the kernels run on the CPU
.PHONY: cuda-check
cuda-check: $(BUILD)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(VPY) -m pytest -q -s tests/test_cuda_compile.py tests/test_cuda_emulated.py

# OSM + CAA weighted contrastive loss: fused vs dense reference vs torch.compile (N = 4096, D = 128, 512)
.PHONY: bench-osm
bench-osm: $(BUILD)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(VPY) bench/bench_osm.py $(BENCH_ARGS)

# triton-compat: the Triton tests (pytest -m interpreter) on every other triton that a CUDA torch >= 2.11
# pins (torch 2.11: 3.6.0, 2.12.0: 3.7.0, 2.14: 3.8.x, 2.15: 3.9.x), each in its own .venv-triton-X beside
# the pinned torch. The package is installed editable without compiling (RLL_SKIP_EXT=1): the C++
# extension that make build left in the source tree serves the same torch. TRITON_COMPAT="3.6.0" for one.
TRITON_COMPAT ?= 3.6.0 3.7.0 3.8.0 3.9.0
COMPAT_DEPS   := numpy pytest pytorch-metric-learning==2.9.0 scikit-learn tqdm
.PHONY: triton-compat
triton-compat: $(BUILD)
	@fail=""; for v in $(TRITON_COMPAT); do \
	  venv=.venv-triton-$$v; \
	  test -x $$venv/bin/python || $(PY) -m venv $$venv || exit 1; \
	  $$venv/bin/python -m pip install -q --upgrade pip && \
	  $$venv/bin/python -m pip install -q $(TORCH) triton==$$v $(COMPAT_DEPS) && \
	  RLL_SKIP_EXT=1 $$venv/bin/python -m pip install -q --no-build-isolation --no-deps -e . || exit 1; \
	  echo "== triton $$v ($$venv)"; t0=$$(date +%s); \
	  OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $$venv/bin/python -m pytest -q -m interpreter tests $(PYTEST_ARGS) \
	    || fail="$$fail $$v"; \
	  echo "== triton $$v: $$(( $$(date +%s) - t0 )) s"; \
	done; \
	test -z "$$fail" || { echo "triton-compat FAILED for:$$fail"; exit 1; }
