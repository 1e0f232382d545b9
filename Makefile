# Two entry points for users: `make demo` and `make test`. Both create .venv if missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: demo test lint types pytest install clean-venv

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned by constraints.txt to the CPU build on this machine's disk, so
	# that no later requirement can pull another (multi-GB CUDA) build.
	$(PIP) install -c constraints.txt torch
	$(PIP) install -c constraints.txt -e '.[dev,torch]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) examples/demo.py

lint: install
	$(VENV)/bin/ruff check src tests examples
	$(VENV)/bin/ruff format --check src tests examples

types: install
	$(VENV)/bin/mypy

pytest: install
	$(PY) -m pytest -q

test: lint types pytest

clean-venv:
	rm -rf $(VENV)
