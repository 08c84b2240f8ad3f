# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck-view install bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fssc demo

# Static checks: ruff (lint + format) and mypy. mypy sees the package as installed (fssc.compiler -> compiler/,
# ...) through .typecheck/fssc, a generated view of symlinks; the top-level layout stays as it is.
TYPECHECK := .typecheck/fssc

typecheck-view:
	rm -rf .typecheck
	mkdir -p $(TYPECHECK)
	for f in fssc/*; do ln -s ../../$$f $(TYPECHECK)/$$(basename $$f); done
	for d in compiler passes runtime models benchmarks; do ln -s ../../$$d $(TYPECHECK)/$$d; done

lint: $(STAMP) typecheck-view
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

test: lint
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m pip install -e '.[test,bench]'
	$(VENV)/bin/fssc bench dcf

clean:
	rm -rf $(VENV) build *.egg-info demo-out test-artifacts .typecheck .mypy_cache .ruff_cache
