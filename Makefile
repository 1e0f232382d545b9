# Two entry points for users: `make demo` and `make test`. Both create .venv if missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: demo test lint types pytest install bench chaos clean-venv docs device-check

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned by constraints.txt to the CPU build on this machine's disk, so
	# that no later requirement can pull another (multi-GB CUDA) build.
	$(PIP) install -c constraints.txt torch
	$(PIP) install -c constraints.txt -e '.[dev,torch,hf,lightning,s3]'
	touch $@

# The lowest transformers the `hf` extra declares, as an overlay in front of the venv
# (tests/integrations/test_integration_transformers_lowest.py puts it on PYTHONPATH).
$(VENV)/hf-lowest/.installed: constraints-hf-lowest.txt $(VENV)/.installed
	rm -rf $(VENV)/hf-lowest
	$(PIP) install --no-deps --target $(VENV)/hf-lowest -r constraints-hf-lowest.txt
	touch $@

# DeepSpeed (ZeRO tests only), as an overlay too: see constraints-deepspeed.txt.
$(VENV)/deepspeed/.installed: constraints-deepspeed.txt $(VENV)/.installed
	rm -rf $(VENV)/deepspeed
	$(PIP) install --no-deps --no-build-isolation --target $(VENV)/deepspeed \
		-c constraints.txt -r constraints-deepspeed.txt
	touch $@

install: $(VENV)/.installed $(VENV)/hf-lowest/.installed $(VENV)/deepspeed/.installed

demo: install
	$(PY) examples/demo.py

lint: install
	$(VENV)/bin/ruff check src tests examples benchmarks
	$(VENV)/bin/ruff format --check src tests examples benchmarks

types: install
	$(VENV)/bin/mypy

pytest: install
	$(PY) -m pytest -q --durations=40

test: lint types pytest

# The documentation site (mkdocs + mkdocstrings, API reference from the docstrings), built
# offline into site/: --strict fails on a broken link, cross-reference or docstring.
docs: install
	$(VENV)/bin/mkdocs build --strict

# Speed is measured here, never in tests: ratios within one interleaved run.
bench: install
	$(PY) benchmarks/bench_save.py --mib 1024 --rounds 11 --json benchmarks/results/latest.json
	$(PY) benchmarks/bench_s3.py --mib 128 --rounds 5 --json benchmarks/results/s3-latest.json
	$(PY) benchmarks/bench_sharded_s3.py --mib 128 --rounds 3 --json benchmarks/results/sharded-s3-latest.json
	# Object-store requests of start-up, latest() and a save on roots of 10 and 1000
	# checkpoints (counts, not times).
	$(PY) benchmarks/bench_requests.py --counts 10 1000 --json benchmarks/results/requests-latest.json
	# End to end (issue 18): a GPT-2 of ~29M parameters, 40 steps on CPU, a save every 10,
	# plain / sync / async, Trainer and Lightning, each run a fresh process (~6 min).
	$(PY) benchmarks/bench_frameworks.py --rounds 3 --json benchmarks/results/frameworks-latest.json
	# Saves on preemption (issue 18): the per-step cost of the agreement, and the time from
	# the signal to a committed checkpoint of 100 MiB, with 1 and 2 ranks.
	$(PY) benchmarks/bench_preemption.py --mib 100 --rounds 5 --json benchmarks/results/preemption-latest.json
	# Incremental saves (issue 19): a 90%-frozen model saved 10 times (bytes written, disk
	# growth, time against a full save), the worst case where everything changes, and a
	# Trainer fine-tune of a frozen-base GPT-2 against the plain Trainer.
	$(PY) benchmarks/bench_incremental.py --rounds 9 --json benchmarks/results/incremental-latest.json

# ckptguard's CUDA paths on a machine with NVIDIA GPUs (under 5 minutes): async stall
# against a pinned device-to-host copy and dcp.async_save, every device, bf16/fp8, NCCL.
# Without CUDA it says so and exits 0; `--device cpu` runs the same checks on the CPU.
# Not through `install`: the venv's torch is pinned to the CPU build. It runs this
# checkout's ckptguard with the Python whose torch has CUDA (DEVICE_PYTHON; default: the
# venv's if there is one, else python3; it needs torch, numpy and xxhash, filelock,
# tenacity, packaging).
DEVICE_PYTHON ?= $(if $(wildcard $(PY)),$(PY),python3)
device-check:
	PYTHONPATH=src $(DEVICE_PYTHON) benchmarks/device_check.py --json benchmarks/results/device-latest.json

# The reliability and security gauntlet in full (make test runs a sample of each row),
# which prints its table of figures and writes them as JSON; then the full crash sweep
# (make test runs 2 crash points per target): many points in the before, torn and
# unsynced modes, for every framework driver, with 1 and 2 ranks.
CHAOS_POINTS ?= 24
chaos: install
	$(PY) tests/run_gauntlet.py --full --json benchmarks/results/gauntlet-latest.json
	CKPTGUARD_CHAOS=1 CKPTGUARD_CHAOS_POINTS=$(CHAOS_POINTS) CKPTGUARD_CHAOS_MODES=before,torn,unsynced \
		$(PY) -m pytest -q tests/integrations/test_chaos_gate.py
	# The exit-abort loop (issue 16): 50 two-rank protect() resumes, 0 may abort at exit,
	# with 25 control runs without ckptguard's exit handler that must show the abort.
	CKPTGUARD_EXIT_LOOP=50 $(PY) -m pytest -q tests/integrations/test_exit_abort.py
	# Heavier variants of make test's tests (the Trainer's ZeRO-2 checkpoint killed mid-save;
	# the gate's two-rank Accelerate and Lightning runs ran above).
	CKPTGUARD_CHAOS=1 $(PY) -m pytest -q -m chaos --ignore=tests/integrations/test_chaos_gate.py
	# Multi-host kills (issue 17): hosts in network namespaces killed at more points of a
	# save straight to S3 (make test kills one host at one point).
	CKPTGUARD_MULTIHOST_SWEEP=1 $(PY) -m pytest -q tests/multihost

clean-venv:
	rm -rf $(VENV)
