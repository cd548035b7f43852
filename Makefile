# One command per job; each installs what it needs into .venv first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo docs-figure test lint bench clean

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

# The README's figure: the demo's, copied into docs/ (commit it after checking it).
docs-figure: demo
	cp runs/demo/sort_digits/training_curves.png docs/demo_training_curves.png

test: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 tests

lint: install
	$(BIN)/ruff check trl_gspo examples benchmarks scripts tests

bench: install
	$(BIN)/python scripts/benchmark.py

clean:
	rm -rf $(VENV) runs .cache
