"""Saves on preemption for the Trainer: ``protect(trainer)`` (on by default).

Real runs (``preempt_hf_driver.py``: ``hf_driver.py``'s tiny GPT-2, 12 steps), two gloo
ranks under torchrun. Rank 1 alone sends itself SIGTERM at the end of step 5: both ranks
must save step 5 (one committed checkpoint holding both ranks' RNG files), exit with
``PREEMPTED_EXIT_CODE``, and the resumed run must end bit-identical to an uninterrupted
run; checkpoint-5's weights, optimizer, scheduler and RNG files must equal, byte for byte,
those an uninterrupted run saved at step 5. With ``preemption=False`` SIGTERM ends the
run as before: death by SIGTERM, no new checkpoint.

The control (agreement removed, each rank acting on its own signal) is
``preempt_hf_driver.py --local-only``: rank 1 saves alone and the ranks then wait on each
other in different collectives until the run is killed (run by hand; see the report of
issue 18: its cost is the timeout).
"""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

import ckptguard
import driver_jobs

if TYPE_CHECKING:
    from collections.abc import Iterator

DRIVER = Path(__file__).with_name("preempt_hf_driver.py")
SAME_FILES = [
    "model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state_0.pth", "rng_state_1.pth",
]  # fmt: skip
LINE = "preempted by {sig} at step 5: committed {path}; exiting with code 75"


class Job(driver_jobs.Job):
    driver = DRIVER


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Job]]:
    """Every independent run at once (the resume waits for its preempted run)."""
    base = tmp_path_factory.mktemp("preempt-hf")
    jobs = {
        "reference": Job(base / "reference", "--save-steps", "5", nproc=2),
        "preempted": Job(base / "preempted", "--signal-at", "5", "--signal-rank", "1", nproc=2),
        "opted-out": Job(base / "opted-out", "--signal-at", "5", "--no-preemption"),
        "async": Job(base / "async", "--signal-at", "5", "--async"),
    }
    try:
        yield jobs
    finally:
        for job in jobs.values():
            job.stop()


def _exit_codes(stderr: str) -> list[int]:
    """The workers' exit codes in torchrun's failure report."""
    return [int(c) for c in re.findall(r"^\s*exitcode\s+:\s*(-?\d+)", stderr, re.MULTILINE)]


def test_sigterm_to_one_rank_saves_that_step_on_every_rank_and_the_resume_loses_nothing(
    runs: dict[str, Job],
) -> None:
    first = driver_jobs.finish(runs["preempted"])
    out = first.out
    assert first.returncode != 0  # torchrun fails a job whose workers exit non-zero
    assert sorted(_exit_codes(first.stderr)) == [75, 75], first.stderr[-4000:]
    path = out / "checkpoint-5"
    assert "rank1: " + LINE.format(sig="SIGTERM", path=path) in first.stderr, first.stderr[-4000:]
    assert "rank0: " + LINE.format(sig="a peer's signal", path=path) in first.stderr
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-5"]
    report = ckptguard.verify(path)
    assert report.ok, report.problems
    assert report.manifest is not None
    assert set(SAME_FILES) <= {f.path for f in report.manifest.files}  # both ranks saved

    reference = driver_jobs.finish(runs["reference"]).ok()
    for name in SAME_FILES:  # nothing of steps 1-5 lost or changed
        assert (path / name).read_bytes() == (reference.out / "checkpoint-5" / name).read_bytes()

    resumed = driver_jobs.finish(Job(out, nproc=2)).ok()
    assert resumed.resumed_from == "5"
    assert json.loads(resumed.final)["step"] == 12
    assert resumed.final == reference.final, "the resumed run's weights differ"


def test_with_preemption_off_sigterm_ends_the_trainer_as_before(runs: dict[str, Job]) -> None:
    done = driver_jobs.finish(runs["opted-out"])
    assert done.returncode == -signal.SIGTERM, done.stderr[-4000:]
    assert list(done.out.glob("checkpoint-*")) == []
    assert "preempted by" not in done.stderr


def test_with_async_saves_the_preemption_save_is_committed_before_the_exit(
    runs: dict[str, Job],
) -> None:
    """protect(trainer, async_save=True): the save of step 5 runs in the background;
    train() waits for its commit, then exits with the code."""
    done = driver_jobs.finish(runs["async"])
    assert done.returncode == 75, done.stderr[-4000:]
    path = done.out / "checkpoint-5"
    assert "rank0: " + LINE.format(sig="SIGTERM", path=path) in done.stderr
    assert sorted(p.name for p in done.out.glob("checkpoint-*")) == ["checkpoint-5"]
    assert ckptguard.verify(path).ok
