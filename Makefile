# Two commands for a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DS_BUILD_OPS := 0
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: env env-dev demo test toyworld clean

$(BIN)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .
	touch $@

$(BIN)/.installed-dev: $(BIN)/.installed
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

env: $(BIN)/.installed
env-dev: $(BIN)/.installed-dev

demo: env
	$(BIN)/python launchers/train.py --recipe recipes/toy_sdxl_4.yaml --demo

test: env-dev
	$(BIN)/python -m pytest -q

toyworld: env
	$(BIN)/python -m dmm.toyworld.build --out assets/toyworld

clean:
	rm -rf runs .cache
