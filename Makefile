# `make demo` and `make test` work from a fresh clone: each creates .venv and installs
# what it needs. Installs are recorded by stamp files, so a second run installs nothing
# (in particular torch-scatter, which builds from source, is built once).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

# torch: the default build on a machine with an NVIDIA driver; elsewhere a pinned release,
# which a machine with a local CPU wheel of that release takes from disk instead of
# downloading a multi-GB CUDA build. Override with `make test TORCH_SPEC=...`.
HAVE_GPU   := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_SPEC ?= $(if $(HAVE_GPU),torch>=2.4,torch==2.13.0)

.PHONY: demo test bench clean

$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q "$(TORCH_SPEC)"
	touch $@

# torch-scatter compiles against the installed torch, so it needs no build isolation.
$(VENV)/.scatter: $(VENV)/.torch
	$(PIP) install -q --no-build-isolation torch-scatter
	touch $@

$(VENV)/.base: $(VENV)/.torch pyproject.toml
	$(PIP) install -q -e ".[viz]"
	touch $@

$(VENV)/.test: $(VENV)/.base $(VENV)/.scatter pyproject.toml
	$(PIP) install -q -e ".[viz,test]"
	touch $@

demo: $(VENV)/.base
	$(VENV)/bin/attngraph demo

test: $(VENV)/.test
	$(PY) -m pytest -q

bench: $(VENV)/.test
	$(PY) -m benchmarks --preset cpu

clean:
	rm -rf $(VENV) build *.egg-info attngraph-demo
