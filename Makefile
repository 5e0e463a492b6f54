# `make demo` and `make test` do all set-up on a fresh machine: they create .venv and install
# the package (editable) with the versions pinned in constraints.txt.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALL := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: demo test lint rehearse clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-base: $(PY) pyproject.toml constraints.txt
	$(INSTALL) -e .
	touch $@

$(VENV)/.installed-dev: $(PY) pyproject.toml constraints.txt
	$(INSTALL) -e '.[dev]'
	touch $@ $(VENV)/.installed-base

demo: $(VENV)/.installed-base
	$(PY) examples/demo.py

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest

# A GPU session's benchmark scripts on the CPU, under Triton's interpreter (benchmarks/rehearsal.py)
rehearse: $(VENV)/.installed-dev
	$(PY) benchmarks/rehearsal.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
