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
TORCH_SPEC ?= $(if $(HAVE_GPU),torch>=2.5,torch==2.13.0)

.PHONY: demo test bench sanitize clean

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

# The emulated kernel suites under every sanitizer check, then under the reverse and two
# random schedules (README: "Checking kernels without a GPU"). CI runs a subset of this in
# tests/test_cuda_sanitizer.py.
SANITIZE_TESTS := tests/test_cuda_emulator.py tests/test_cuda_emulator_fp16.py \
	tests/test_cuda_sanitizer.py tests/test_cuda_stages.py tests/test_cuda_fused.py \
	tests/test_implicit.py::test_fused_kernels_compute_keys_from_the_rule \
	tests/test_implicit.py::test_int32_graphs_on_the_emulated_kernels \
	tests/test_implicit.py::test_dispatch_reasons
sanitize: $(VENV)/.test
	ATTNGRAPH_EMU_CHECK=all $(PY) -m pytest -q $(SANITIZE_TESTS)
	ATTNGRAPH_EMU_SCHEDULE=reverse $(PY) -m pytest -q $(SANITIZE_TESTS)
	ATTNGRAPH_EMU_SCHEDULE=random:1 $(PY) -m pytest -q $(SANITIZE_TESTS)
	ATTNGRAPH_EMU_SCHEDULE=random:2 $(PY) -m pytest -q $(SANITIZE_TESTS)

clean:
	rm -rf $(VENV) build *.egg-info attngraph-demo
