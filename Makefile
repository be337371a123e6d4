# Everyday commands. `make demo` and `make test` create .venv and install the project when missing.
VENV  := .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: install demo test lint format docs bench gpu-check lock clean

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
gpu-check:  ## the GPU check (benchmarks/gpu_check.py) into out/gpu_check; toy sizes without CUDA
	$(if $(wildcard $(PY)),$(PY),python3) -m benchmarks.gpu_check --out out/gpu_check

lock:  ## re-pin requirements.lock from the current .venv
	$(PY) -m pip freeze --exclude-editable | grep -v '^imf-pipeline' > requirements.lock

clean:
	rm -rf $(VENV) artifacts .pytest_cache .ruff_cache
