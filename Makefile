# dtr-compile: the README's two commands are `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
TORCH   := torch==2.13.0
BUILD   := build/bbc_news
export HF_HUB_OFFLINE := 1

.PHONY: demo test test-all lint venv clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# the CPU wheel first: an unpinned torch would pull a multi-GB CUDA build
	$(BIN)/pip install -q $(TORCH)

$(VENV)/.examples: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e '.[examples]'
	touch $@

$(VENV)/.dev: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.dev

$(BUILD)/model.pt: $(VENV)/.examples examples/bbc_news/prepare.py
	$(BIN)/python examples/bbc_news/prepare.py --out $(BUILD)

demo: $(VENV)/.examples $(BUILD)/model.pt
	cd $(BUILD) && ../../$(BIN)/dtr-compile model.pt --budget 0.5% --data val.pt -o hybrid.onnx --export-original; \
	  rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 3 ] || exit $$rc
	$(BIN)/python examples/bbc_news/evaluate.py --dir $(BUILD)

test: $(VENV)/.dev
	$(BIN)/python -m pytest -q

test-all: $(VENV)/.dev
	$(BIN)/python -m pytest -q -m "" 

lint: $(VENV)/.dev
	$(BIN)/ruff check dtr_compile tests examples benchmarks
	$(BIN)/mypy dtr_compile

clean:
	rm -rf build
