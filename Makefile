PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EXTRAS ?= hf,ray,s3,test

.PHONY: demo test test-deps bench emu-bench venv clean

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

# As root (CI runs as root): install what the emulated-cluster test needs (Debian's fuse3,
# libfuse3, iproute2, ping; mfusepy into the venv) so that it runs instead of skipping.
test-deps: $(STAMP)
	@if [ "$$(id -u)" -eq 0 ]; then sh benchmarks/cluster_emu/setup_deps.sh --required $(BIN)/python; \
	else echo "make: not root: tests/test_cluster_emu.py's emulated load will be skipped (needs root)"; fi

# -rs prints the reason of every skipped test
test: test-deps
	$(BIN)/python -m pytest -q -x -rs --timeout=600 tests

bench: $(STAMP)
	$(BIN)/python -m pip install -q -e ".[bench,$(EXTRAS)]"
	$(BIN)/python -m benchmarks

emu-bench: $(STAMP)
	$(BIN)/python -m pip install -q -e ".[bench,$(EXTRAS)]"
	sh benchmarks/cluster_emu/setup_deps.sh $(BIN)/python
	$(BIN)/python -m benchmarks.cluster_emu.run

clean:
	rm -rf $(VENV) demo_checkpoint bench_data
