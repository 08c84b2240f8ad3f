# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-slow lint typecheck-view install bench clean

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

# The fast suite (under 5 minutes on a 2-core machine: two pytest workers, a test file each, one BLAS thread per
# process); `make test-slow` runs the tests marked slow (224x224 models, long matrices, full-size runs; one at a
# time: their key files take GBs of disk). CI runs both.
test: lint
	$(PY) -m pytest -q -rs -m "not slow" -n 2 --dist loadfile

test-slow: $(STAMP)
	$(PY) -m pytest -q -rs -m slow

bench: $(STAMP)
	$(PY) -m pip install -e '.[test,bench]'
	$(VENV)/bin/fssc bench dcf

clean:
	rm -rf $(VENV) build *.egg-info demo-out test-artifacts .typecheck .mypy_cache .ruff_cache
