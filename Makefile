# Everyday commands. `make demo` and `make test` create .venv and install the project when missing.
VENV  := .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: install demo test lint format docs bench gpu-check gpu-check-xl2 gpu-wheels lock clean

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c requirements.lock -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)  ## the whole pipeline on digits (precompute -> train -> evaluate), then a summary
	$(PY) -m flows.demo

test: $(STAMP) lint  ## lint, then the whole test suite (slow end-to-end tests included)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

docs: $(STAMP)  ## rewrites docs/configuration.md from the config dataclasses (tests/test_docs.py checks it)
	$(PY) -m tasks.config_reference

bench: $(STAMP)  ## the benchmark suite; writes benchmarks/RESULTS.md
	$(PY) -m benchmarks

# On the GPU machine (no venv, no network): plain python3, with the wheels its docstring lists.
GPU_PY   := $(if $(wildcard $(PY)),$(PY),python3)
GPU_OUT  ?= out/gpu_check
GPU_SITE := /tmp/gpu-check-site
# The wheels of .whl/ (make gpu-wheels, where there is network) installed beside, not into, python3
GPU_RUN  := $(if $(wildcard .whl/*.whl),$(GPU_PY) -m pip install -q --no-index --no-deps \
	--target $(GPU_SITE) .whl/*.whl &&) PYTHONPATH=$(GPU_SITE) $(GPU_PY) -m benchmarks.gpu_check
gpu-check:  ## the GPU check's first call (benchmarks/gpu_check.py, <= 540 s) into $(GPU_OUT); toy sizes without CUDA
	$(GPU_RUN) --out $(GPU_OUT) --budget-s 540

gpu-check-xl2:  ## its second call (<= 540 s): XL/2 compiled with the first call's compile cache, added to $(GPU_OUT)
	$(GPU_RUN) --out $(GPU_OUT) --budget-s 540 --parts xl2 --compile-cache $(GPU_OUT)/compile_cache.bin

gpu-wheels:  ## the wheels the GPU check needs on the GPU machine (no network there) into .whl/
	$(GPU_PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux_2_28_x86_64 -d .whl \
		diffusers==0.42.1 torch_fidelity==0.4.0 importlib_metadata

lock:  ## re-pin requirements.lock from the current .venv
	$(PY) -m pip freeze --exclude-editable | grep -v '^imf-pipeline' > requirements.lock

clean:
	rm -rf $(VENV) artifacts .pytest_cache .ruff_cache
