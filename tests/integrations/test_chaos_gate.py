"""The crash gate: ckpt-chaos kills protected training runs at their file events and resumes.

ckpt-chaos (an external harness, pinned 0.1.8) runs a driver fault-free, records every file
event under its output dir, then kills a fresh copy at sampled events (``before`` the
event, or after a ``torn`` half-write) and runs it again to resume. Each point is judged:
HARD_FAIL (the resume crashed), SILENT_DIVERGENCE (the result differs from the fault-free
run), LOST_WORK (it resumed from older than the newest complete checkpoint). The gate: 0
of each, for the Hugging Face Trainer, Accelerate and Lightning drivers, with 1 and 2
ranks (two ranks of Accelerate and Lightning in ``make chaos`` only). The control runs
the same Trainer unprotected and must fail: it shows that the gate
can catch what ckptguard prevents.

``CKPTGUARD_CHAOS_POINTS`` and ``CKPTGUARD_CHAOS_MODES`` set the crash points per run and
their kinds (2 torn writes each in ``make test``; ``make chaos`` sweeps many more points in
the before, torn and unsynced modes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
CHAOS = Path(sys.executable).with_name("ckpt-chaos")
POINTS = int(os.environ.get("CKPTGUARD_CHAOS_POINTS", "2"))
# torn: the file is half-written when the process dies, the harshest of the cheap modes.
MODES = os.environ.get("CKPTGUARD_CHAOS_MODES", "torn")
BAD = ("HARD_FAIL", "SILENT_DIVERGENCE", "LOST_WORK", "CONTROL_FAIL")


@dataclass(frozen=True)
class Target:
    """A driver and where ckpt-chaos finds its checkpoints."""

    driver: str
    checkpoint_glob: str
    # The modes when CKPTGUARD_CHAOS_MODES is not set, where the default (torn) finds too
    # few points: Lightning's file commit streams torch.save into an open temp file that it
    # hashes as it writes, which ckpt-chaos cannot tear; it kills before each event instead.
    modes: str | None = None


TARGETS = {
    "trainer": Target("hf_driver.py", "{out}/checkpoint-*"),
    "accelerate": Target("accel_driver.py", "{out}/checkpoints/checkpoint_*"),
    "lightning": Target("lightning_driver.py", "{out}/ckpts/step=*.ckpt", modes="before"),
}


@dataclass(frozen=True)
class Gate:
    """What ckpt-chaos found."""

    verdicts: Counter[str]
    failures: list[str]
    crashed: int
    points: int
    stdout: str


def _run_chaos(work: Path, target: Target, *, ranks: int, points: int, extra: list[str]) -> Gate:
    """Run ckpt-chaos on ``target``; parse its JUnit report and per-point results."""
    junit = work.parent / f"{work.name}.junit.xml"
    cmd = [
        str(CHAOS), "run",
        "--work", str(work),
        "--jobs", "2",
        "--max-points", str(points),
        "--modes", os.environ.get("CKPTGUARD_CHAOS_MODES", target.modes or MODES),
        "--timeout", "240",
        "--ckpt-ignore-size",
        "--checkpoint-glob", target.checkpoint_glob,
        "--step-regex", r"resumed from step (\d+)",
        "--result-file", "{out}/final.json",
        "--fail-on", ",".join(BAD),
        "--junit", str(junit),
        "--ranks", str(ranks),
        "--", sys.executable, str(TESTS / target.driver), "{out}", *extra,
    ]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONWARNINGS": "ignore",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",  # the same kernels in every run: bit-identical results
    }
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, env=env, check=False)
    assert junit.exists(), f"ckpt-chaos wrote no report:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    suite = ET.parse(junit).getroot()  # noqa: S314 - a file ckpt-chaos just wrote
    verdicts: Counter[str] = Counter()
    failures = []
    for case in suite.iter("testcase"):
        failure = case.find("failure")
        error = case.find("error")
        if error is not None:
            verdicts["ERROR"] += 1
            failures.append(f"{case.get('name')}: {error.text}")
        elif failure is not None:
            message = failure.get("message", "")
            verdicts[message.split(":", 1)[0]] += 1
            failures.append(f"{case.get('name')}: {message}")
        else:
            verdicts["PASS"] += 1
    results = [json.loads(p.read_text()) for p in sorted(work.glob("pt_[0-9]*/result.json"))]
    return Gate(
        verdicts=verdicts,
        failures=failures,
        crashed=sum(1 for r in results if r.get("crashed")),
        points=len(results),
        stdout=proc.stdout,
    )


# Two ranks of Accelerate and Lightning run in make chaos only (47 s here): their two-rank
# kills mid-save are in test_integration_accelerate.py and test_integration_lightning.py.
RUNS = [
    pytest.param(name, ranks, id=f"{name}-{ranks}-rank{'s' if ranks > 1 else ''}",
                 marks=[pytest.mark.chaos] if ranks > 1 and name != "trainer" else [])
    for name in sorted(TARGETS)
    for ranks in (1, 2)
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(("name", "ranks"), RUNS)
def test_no_crash_point_breaks_a_protected_run(tmp_path: Path, name: str, ranks: int) -> None:
    gate = _run_chaos(tmp_path / "work", TARGETS[name], ranks=ranks, points=POINTS, extra=[])
    assert gate.points >= min(POINTS, 2), gate.stdout
    # Every sampled point really killed the run (a point that never fires proves nothing).
    assert gate.crashed == gate.points, gate.stdout
    assert gate.failures == [], gate.stdout
    assert gate.verdicts["PASS"] == gate.points + 1, gate.stdout  # the points and the control


@pytest.mark.slow
def test_control_the_unprotected_trainer_fails_the_gate(tmp_path: Path) -> None:
    """The same gate on the Trainer without ckptguard: resume breaks on half-written files."""
    gate = _run_chaos(
        tmp_path / "work", TARGETS["trainer"], ranks=1, points=3, extra=["--unprotected"]
    )
    assert gate.crashed == gate.points == 3, gate.stdout
    bad = sum(gate.verdicts[v] for v in BAD)
    assert bad >= 1, gate.stdout
