# eqv2 — the two quickstart commands are `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU installs pin torch (an unpinned torch pulls a multi-GB CUDA build).
TORCH_SPEC ?= torch==2.13.0

.PHONY: env demo test test-diagnostics clean

# what a user needs: the package and its dependencies (no test tools, no reference implementation)
$(VENV)/.installed: setup.cfg
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e .
	touch $@

# the test extra, then the reference implementation for the parity tests, last and without its
# dependencies (its torch~=2.4 / numpy<2 pins are not wanted; what it imports is in the test extra)
$(VENV)/.test-installed: $(VENV)/.installed setup.cfg
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps fairchem-core==1.10.0
	touch $@

env: $(VENV)/.installed

# builds the EMT demo data (once) and trains a small EquiformerV2 on it with DeepSpeed
demo: env data/demo/train/manifest.json
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" deepspeed eqv2/train.py --ds_config ds_configs/cpu_demo.json \
		--config configs/train/demo.yaml

data/demo/train/manifest.json: | env
	$(PY) -m eqv2 demo-data --out data/demo

test: $(VENV)/.test-installed
	$(PY) -m pytest -q -m "not gpu" --durations=30 tests

# the benchmark and diagnostic scripts' own tests (bench/, diagnostics/): not part of `make test`
test-diagnostics: $(VENV)/.test-installed
	$(PY) -m pytest -q -m "not gpu" bench/tests diagnostics/tests

clean:
	rm -rf $(VENV) runs data/demo
