# lcr-lightly: `make demo` (main job) and `make test` both create .venv when missing and install
# the versions pinned in constraints.txt (the ones the suite and RESULTS.md were verified with).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint typecheck pytest mutate clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev,imagenet,onnx]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/lcr-lightly demo --out outputs/demo

lint: $(STAMP)
	$(BIN)/ruff check lcr_lightly tests benchmarks examples
	$(BIN)/ruff format --check lcr_lightly tests benchmarks examples

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/python -m pytest -q

test: lint typecheck pytest

# Mutation testing of the method's core ([tool.mutmut] in pyproject.toml); not part of CI.
# Results are cached in mutants/: a second run re-tests only what changed.
mutate: $(STAMP)
	$(BIN)/mutmut run --max-children 2
	$(BIN)/python benchmarks/mutation_score.py --out docs/mutation.md

clean:
	rm -rf $(VENV) outputs mutants .pytest_cache .mypy_cache .ruff_cache
