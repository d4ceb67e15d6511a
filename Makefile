PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EXTRAS ?= hf,ray,test

.PHONY: demo test bench emu-bench venv clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first, pinned to the local CPU wheel, only when torch is absent;
# the project's own range (torch>=2.4) is then already satisfied.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/weightcast demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -x --timeout=600 tests

bench: $(STAMP)
	$(BIN)/python -m pip install -q -e ".[bench,$(EXTRAS)]"
	$(BIN)/python -m benchmarks

emu-bench: $(STAMP)
	$(BIN)/python -m pip install -q -e ".[bench,$(EXTRAS)]"
	sh benchmarks/cluster_emu/setup_deps.sh $(BIN)/python
	$(BIN)/python -m benchmarks.cluster_emu.run

clean:
	rm -rf $(VENV) demo_checkpoint bench_data
