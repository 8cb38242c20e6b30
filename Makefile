# make test   : create .venv if missing, install torch (CPU build) + test deps + the package, run tests
# make bench  : same set-up, then the benchmarks against the baselines (QUICK=1 for a ~4-minute run)
# make demo   : same set-up, then train on Fashion-MNIST and print Recall@K / NMI (DEMO_ARGS="--plot x.png")
# make compat TORCH=2.14.1 : the whole suite against another torch, in its own venv .venv-torch-2.14.1
# make wheel  : a wheel built against the torch of .venv, in dist/torch-<version>/ (metadata: torch==X.Y.*)
# make wheel-test : that wheel in a fresh venv next to that torch, exercised from outside the checkout
# make triton-compat : the Triton tests on every other triton a CUDA torch >= 2.11 pins (one venv each)
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
PIP     := $(VPY) -m pip
TEST_TORCH := 2.13.0
TORCH_PIN := torch==$(TEST_TORCH)
# triton 3.7.1 is the one the CUDA wheel of torch 2.13.0 pins: the CPU test venv runs the Triton kernels
# (under the interpreter) on the triton a GPU user of the same torch gets. The others that a CUDA torch
# >= 2.11 pins are checked by make triton-compat (docs/triton.md "Triton versions").
TRITON  := triton==3.7.1
DEPS    := numpy ninja pytest pytest-benchmark pytorch-metric-learning==2.9.0 scikit-learn tqdm matplotlib $(TRITON) ruff==0.17.6
STAMP   := $(VENV)/.deps-stamp
BUILD   := $(VENV)/.build-stamp
BENCHDEPS := $(VENV)/.bench-stamp
SRCS    := $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.cuh) setup.py

.PHONY: test bench build gpu-check device-check torch-headers demo clean env lint compat wheel wheel-test

$(VPY):
	$(PY) -m venv $(VENV)

$(STAMP): $(VPY) Makefile
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q $(DEPS) "$(TORCH_PIN)"
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

# torch-headers: the C++ headers of the GPU machine's torch (2.11.0) for the compile checks of
# tests/test_cuda_compile.py: fetched once (a 530 MB wheel, ~15 s; 39 MB of headers kept in
# ~/.cache/rll_kernels/torch-headers, the wheel deleted). TORCH_HEADERS= (empty) skips it.
TORCH_HEADERS ?= 2.11.0
torch-headers: $(STAMP)
	$(if $(TORCH_HEADERS),$(VPY) tests/torch_headers.py $(TORCH_HEADERS),@echo "TORCH_HEADERS is empty: the compile checks against other torch headers are skipped")

test: lint $(BUILD) torch-headers
	$(VPY) -m rll_kernels.env_report
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(VPY) -m pytest -q tests $(PYTEST_ARGS)

# pykeops is optional: the benchmark reports "pykeops not installed" when this fails
$(BENCHDEPS): $(STAMP)
	$(PIP) install -q pykeops==2.3 || echo "pykeops did not install; the benchmark will say so"
	touch $@

bench: $(BUILD) $(BENCHDEPS)
	$(VPY) -m rll_kernels.env_report
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(VPY) bench/run.py $(if $(QUICK),--quick,) $(BENCH_ARGS)

# device-check: the GPU check on a bare GPU machine, with the python3 and torch already there; no venv,
# nothing from a registry (bench/device_check.sh, docs/device_check.md). DEVICE_CHECK_ARGS="--only parity,goal",
# "--dry-run" (every part on this CPU), PYTHON=... to pick the interpreter.
device-check:
	bash bench/device_check.sh $(DEVICE_CHECK_ARGS)

# gpu-check: the same parts with this venv's (CUDA) torch and its own build of the extension
gpu-check: $(BUILD)
	PYTHON=$(VPY) bash bench/device_check.sh --only env,tests,parity,goal,sync,sanitize,timings,roofline $(GPU_CHECK_ARGS)

demo: $(BUILD)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(VPY) examples/train_fashion_mnist.py $(DEMO_ARGS)

clean:
	rm -rf build dist *.egg-info rll_kernels/*.so rll_kernels/_build_info.json $(BUILD) $(WTVENV)

# ---- packaging: the torch range, the wheel ------------------------------------------------------
# compat: build against torch $(TORCH) in .venv-torch-$(TORCH) and run the whole suite there. The
# package is installed (not editable) into that venv, so the checkout's rll_kernels/ keeps the .venv
# build; the suite runs with PYTHONSAFEPATH=1 (no checkout on sys.path: rll_kernels comes from the
# venv) and the tests folder importable as "tests" through a link in the venv.
CVENV := .venv-torch-$(TORCH)
CPY   := $(CVENV)/bin/python

.venv-torch-%/.deps-stamp: Makefile
	$(PY) -m venv .venv-torch-$*
	.venv-torch-$*/bin/python -m pip install -q --upgrade pip
	.venv-torch-$*/bin/python -m pip install -q torch==$*
	.venv-torch-$*/bin/python -m pip install -q $(DEPS) torch==$*
	touch $@

compat:
	@test -n "$(TORCH)" || { echo "usage: make compat TORCH=2.14.1"; exit 2; }
	$(MAKE) --no-print-directory $(CVENV)/.deps-stamp
	MAX_JOBS=$${MAX_JOBS:-2} $(CPY) -m pip install -q --no-build-isolation --no-deps --force-reinstall .
	mkdir -p $(CVENV)/testpath && ln -sfn $(CURDIR)/tests $(CVENV)/testpath/tests
	cd $(CVENV) && bin/python -m rll_kernels.env_report
	PYTHONSAFEPATH=1 PYTHONPATH=$(CVENV)/testpath OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} \
	  $(CPY) -m pytest -q -p no:cacheprovider tests $(PYTEST_ARGS)

# WHEEL_INFO dir requires|torch: the wheel in dir, its Requires-Dist lines, or the torch it was built with
define WHEEL_INFO
import glob, json, sys, zipfile
(path,) = glob.glob(sys.argv[1] + "/rll_kernels-*.whl")
whl = zipfile.ZipFile(path)
if sys.argv[2] == "torch":
    print(json.loads(whl.read("rll_kernels/_build_info.json"))["torch"])
else:
    meta = next(n for n in whl.namelist() if n.endswith(".dist-info/METADATA"))
    print(path, *[ln for ln in whl.read(meta).decode().splitlines() if ln.startswith("Requires-Dist")], sep="\n  ")
endef
export WHEEL_INFO

# wheel: built by the .venv torch, reusing the objects of `make build` (build/torch-<version>-<tag>/)
WHEEL_DIR = dist/torch-$(TEST_TORCH)
WTVENV    := .venv-wheel-test

wheel: $(STAMP)
	rm -rf $(WHEEL_DIR)
	MAX_JOBS=$${MAX_JOBS:-2} $(PIP) wheel -q --no-build-isolation --no-deps -w $(WHEEL_DIR) .
	@$(PY) -c "$$WHEEL_INFO" $(WHEEL_DIR) requires

# wheel-test: a fresh venv with the exact torch the wheel was built against, then the wheel; from a
# temporary folder: import, env_report, and tests/wheel_smoke.py (forward + backward per CPU backend)
wheel-test: wheel
	rm -rf $(WTVENV) && $(PY) -m venv $(WTVENV)
	$(WTVENV)/bin/python -m pip install -q \
	  "torch==$$($(PY) -c "$$WHEEL_INFO" $(WHEEL_DIR) torch)"
	$(WTVENV)/bin/python -m pip install -q $(WHEEL_DIR)/rll_kernels-*.whl
	$(WTVENV)/bin/python -m pip check
	tmp=$$(mktemp -d) && cp tests/wheel_smoke.py $$tmp/ && cd $$tmp && \
	  $(CURDIR)/$(WTVENV)/bin/python -m rll_kernels.env_report && \
	  OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(CURDIR)/$(WTVENV)/bin/python wheel_smoke.py; \
	  rc=$$?; rm -rf $$tmp; exit $$rc

# SoftTriple: fused C++ vs PML at SOP scale (N=256, C=11318, K=10, D=512, fp32, 2 threads)
.PHONY: bench-softtriple
bench-softtriple: $(BUILD)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(VPY) bench/bench_softtriple.py $(BENCH_ARGS)

# CUDA backend without a GPU: nvcc compile checks (skipped without nvcc) + the kernels run on the CPU
.PHONY: cuda-check
cuda-check: $(BUILD) torch-headers
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
	  $$venv/bin/python -m pip install -q $(TORCH_PIN) triton==$$v $(COMPAT_DEPS) && \
	  RLL_SKIP_EXT=1 $$venv/bin/python -m pip install -q --no-build-isolation --no-deps -e . || exit 1; \
	  echo "== triton $$v ($$venv)"; t0=$$(date +%s); \
	  OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $$venv/bin/python -m pytest -q -m interpreter tests $(PYTEST_ARGS) \
	    || fail="$$fail $$v"; \
	  echo "== triton $$v: $$(( $$(date +%s) - t0 )) s"; \
	done; \
	test -z "$$fail" || { echo "triton-compat FAILED for:$$fail"; exit 1; }
