# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Each sets up .venv in the repo root first (pip only; nothing but the package registry).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast docs-links venv clean

venv: $(STAMP)

# --no-compile: pip would byte-compile all ~20,000 .py files of the dependencies (about 45 s of CPU); Python
# compiles and caches the ones that are imported, on first import, instead. That needs bytecode writing on:
# an environment with PYTHONDONTWRITEBYTECODE set (some containers set it) would have every process of the
# suite compile jax, torch and tensorflow from source again (about 10 s of CPU each), so the targets below
# run without it.
unexport PYTHONDONTWRITEBYTECODE
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --no-compile -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m parity.tools.demo

# The tests run on WORKERS processes (pytest-xdist), one test file at a time each, the longest files first
# (tests/conftest.py): two, as CI's two cores; `make test WORKERS=0` runs them in one process.
WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(WORKERS) --dist loadfile --no-loadscope-reorder

# Everything, as CI runs it: the linter first (pyproject.toml [tool.ruff]), then every test; the 15 slowest
# tests are listed at the end.
test: $(STAMP)
	$(PY) -m ruff check .
	$(PYTEST) --durations=15

# The edit loop: everything but the tests marked slow (training runs, many subprocesses).
test-fast: $(STAMP)
	$(PY) -m ruff check .
	$(PYTEST) -m 'not slow' --durations=10

# Re-point the line anchors of the code citations in docs/*.md at the lines their quotes are on now.
docs-links:
	$(PYTHON) docs/citations.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
