# make test   : create .venv if missing, install torch (CPU build) + test deps + the package, run tests
# make bench  : same set-up, then the benchmarks against the baselines (QUICK=1 for a 2-minute run)
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
PIP     := $(VPY) -m pip
TORCH   := torch==2.13.0
DEPS    := numpy ninja pytest pytest-benchmark pytorch-metric-learning==2.9.0 scikit-learn tqdm matplotlib triton
STAMP   := $(VENV)/.deps-stamp
BUILD   := $(VENV)/.build-stamp
SRCS    := $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.cuh) setup.py

.PHONY: test bench build gpu-check demo clean env

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

env: $(BUILD)
	$(VPY) -m rll_kernels.env_report

test: $(BUILD)
	$(VPY) -m rll_kernels.env_report
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(VPY) -m pytest -q tests $(PYTEST_ARGS)

bench: $(BUILD)
	$(VPY) -m rll_kernels.env_report
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(VPY) bench/run.py $(if $(QUICK),--quick,) $(BENCH_ARGS)

clean:
	rm -rf build *.egg-info rll_kernels/*.so $(BUILD)

# SoftTriple (issue 7): fused C++ vs PML at SOP scale (N=256, C=11318, K=10, D=512, fp32, 2 threads)
.PHONY: bench-softtriple
bench-softtriple: $(BUILD)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(VPY) bench/bench_softtriple.py $(BENCH_ARGS)
