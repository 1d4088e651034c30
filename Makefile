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

.PHONY: setup demo test test-slow test-all bench detect ablate report train-tiny docs lint setup-browser clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: setup
	$(PY) -m retrieval_heads.demo --out demo-out

test: setup
	$(PY) -m pytest -q -m "not slow"

test-slow: setup
	$(PY) -m pytest -q -m slow

test-all: setup
	$(PY) -m pytest -q -m ""

bench: setup
	$(PY) -m retrieval_heads.bench --out docs/benchmarks.md

detect: setup
	$(PY) -m retrieval_heads detect --model $(MODEL) --out $(OUT)/detect

ablate: setup
	$(PY) -m retrieval_heads ablate --model $(MODEL) --scores $(OUT)/detect --top-k $(K) --out $(OUT)/ablate

report: setup
	$(PY) -m retrieval_heads report $(OUT)/* --out $(OUT)/report.html

train-tiny: setup
	$(PY) -m retrieval_heads.tiny.train --out retrieval_heads/tiny/weights

docs: setup
	$(PY) -m mkdocs build --strict

lint: setup
	$(PY) -m ruff check retrieval_heads tests experiments
	$(PY) -m ruff format --check retrieval_heads tests experiments

setup-browser:
	command -v chromium >/dev/null || (apt-get update -q && apt-get install -y -q chromium)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache demo-out bench-out
