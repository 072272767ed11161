# The two commands of the README: `make demo` and `make test`. Both create or reuse .venv themselves.
VENV ?= .venv
PY := $(VENV)/bin/python
DGM := $(VENV)/bin/dgm
STAMP := $(VENV)/.dgm-installed
DEMO_CONFIG ?= configs/demo.yaml
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
export DS_ACCELERATOR ?= cpu
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: setup demo test lint clean

$(STAMP): pyproject.toml setup.py $(wildcard data_pipeline/codecs/*.c data_pipeline/codecs/*.h)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned, from PyTorch's CPU index: PyPI's Linux torch pulls multi-GB CUDA packages. Where that index
	# cannot be reached (an offline mirror holding the CPU wheel), pip says so once and goes on.
	$(PY) -m pip install -q --retries 0 --extra-index-url $(TORCH_INDEX) torch==2.13.0
	# A kernel built by an earlier layout (per-version name) would shadow the fresh stable-ABI build.
	rm -f data_pipeline/codecs/_dct_kernel.*.so
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(DGM) prepare $(DEMO_CONFIG)
	$(DGM) train $(DEMO_CONFIG)
	$(DGM) export $(DEMO_CONFIG)
	$(DGM) sample runs/demo/export --out runs/demo/samples/export-samples.png --n 36 --top-p 0.9
	@echo "demo results: runs/demo (checkpoints/, export/model.safetensors, samples/*.png, tensorboard/)"

test: lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff check .

clean:
	rm -rf runs .cache
