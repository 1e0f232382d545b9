# Two entry points for users: `make demo` and `make test`. Both create .venv if missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: demo test lint types pytest install bench clean-venv

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
	$(VENV)/bin/ruff check src tests examples benchmarks
	$(VENV)/bin/ruff format --check src tests examples benchmarks

types: install
	$(VENV)/bin/mypy

pytest: install
	$(PY) -m pytest -q

test: lint types pytest

# Speed is measured here, never in tests: ratios within one interleaved run.
bench: install
	$(PY) benchmarks/bench_save.py --mib 512 --rounds 9

clean-venv:
	rm -rf $(VENV)
