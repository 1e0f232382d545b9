"""The original race, with real processes: several savers commit the same checkpoint at once.

The incident: every rank of a distributed job wrote ``tmp-checkpoint-*`` and renamed it
onto ``checkpoint-100``; the first rename won and every later one crashed the job with
``OSError: [Errno 39] Directory not empty``. Here N spawned processes, released together
by a Barrier each round, race on one ``checkpoint-R`` per round:

- control: the naive protocol (own temp dir, then ``os.rename``) must hit ENOTEMPTY/EEXIST,
  which shows that this harness really makes the processes race;
- fix: ``ckptguard.atomic_checkpoint`` must give exactly one commit per round, no error,
  one complete writer's files in each checkpoint, and nothing left behind.
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ckptguard
from ckptguard import Outcome
from ckptguard._format.layout import MANIFEST_NAME, META_DIR, RootLayout

if TYPE_CHECKING:
    from collections.abc import Callable
    from multiprocessing.synchronize import Barrier

WRITERS = 8
CONTROL_ROUNDS = 10
FIX_ROUNDS = 200
# Generous: a barrier wait only times out when a peer died or hung, and then the test fails.
BARRIER_TIMEOUT = 120.0
JOIN_TIMEOUT = 240.0
CONFLICT_ERRNOS = frozenset({errno.ENOTEMPTY, errno.EEXIST})
USER_FILES = frozenset({"model.bin", "writer.json"})


def _payload(wid: int, rnd: int) -> bytes:
    """Bytes that only writer ``wid`` writes in round ``rnd`` (a mix would not match)."""
    return f"writer {wid} round {rnd};".encode() * 300


def _write_files(directory: Path, wid: int, rnd: int) -> None:
    (directory / "model.bin").write_bytes(_payload(wid, rnd))
    (directory / "writer.json").write_text(json.dumps({"writer": wid, "round": rnd}))


def _error_record(exc: BaseException) -> dict[str, Any]:
    return {
        "type": type(exc).__name__,
        "errno": getattr(exc, "errno", None),
        "text": "".join(traceback.format_exception(exc)),
    }


def _run_rounds(wid: int, rounds: int, result_path: str, save: Callable[[int], str]) -> None:
    """Run ``save(round)`` once per round, in step with the peers; record every outcome."""
    records: list[dict[str, Any]] = []
    fatal: str | None = None
    try:
        for rnd in range(rounds):
            try:
                records.append({"round": rnd, "outcome": save(rnd), "error": None})
            except Exception as exc:
                records.append({"round": rnd, "outcome": None, "error": _error_record(exc)})
    except BaseException as exc:  # a broken barrier or worse: report it, never die silently
        fatal = "".join(traceback.format_exception(exc))
        raise
    finally:
        report = {"wid": wid, "pid": os.getpid(), "records": records, "fatal": fatal}
        Path(result_path).write_text(json.dumps(report))


def _naive_worker(wid: int, root: str, rounds: int, barrier: Barrier, result_path: str) -> None:
    """The protocol of the incident: own temp dir, barrier, rename onto the shared name."""

    def save(rnd: int) -> str:
        tmp = Path(root) / f"tmp-checkpoint-{wid}-{rnd}"
        tmp.mkdir()
        _write_files(tmp, wid, rnd)
        barrier.wait()
        os.rename(tmp, Path(root) / f"checkpoint-{rnd}")
        return "renamed"

    _run_rounds(wid, rounds, result_path, save)


def _guarded_worker(wid: int, root: str, rounds: int, barrier: Barrier, result_path: str) -> None:
    """Every writer saves every round through atomic_checkpoint; the commits race."""

    def save(rnd: int) -> str:
        saver = ckptguard.atomic_checkpoint(Path(root) / f"checkpoint-{rnd}")
        synced = False
        try:
            with saver as staging_dir:
                _write_files(staging_dir, wid, rnd)
                synced = True
                barrier.wait()  # all seal and commit at the same moment
        except Exception:
            if not synced:
                barrier.wait()  # keep the peers in step; the error is still reported
            raise
        assert saver.result is not None
        return saver.result.outcome.value

    _run_rounds(wid, rounds, result_path, save)


@dataclass(frozen=True)
class WorkerReport:
    wid: int
    pid: int
    records: list[dict[str, Any]]

    def errors(self) -> list[dict[str, Any]]:
        return [r["error"] for r in self.records if r["error"] is not None]


def _run_workers(
    worker: Callable[[int, str, int, Barrier, str], None], root: Path, rounds: int, out: Path
) -> list[WorkerReport]:
    """Start WRITERS spawned processes running ``worker``; every one must report and exit 0."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(WRITERS, timeout=BARRIER_TIMEOUT)
    out.mkdir()
    result_paths = [out / f"writer-{wid}.json" for wid in range(WRITERS)]
    procs = [
        ctx.Process(target=worker, args=(wid, str(root), rounds, barrier, str(result_paths[wid])))
        for wid in range(WRITERS)
    ]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + JOIN_TIMEOUT
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    hung = [proc.pid for proc in procs if proc.is_alive()]
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join()
    codes = [proc.exitcode for proc in procs]
    for proc in procs:
        proc.close()
    assert not hung, f"writers still running after {JOIN_TIMEOUT}s: pids {hung}"
    reports = []
    for wid, path in enumerate(result_paths):
        assert path.exists(), f"writer {wid} died without a report (exit code {codes[wid]})"
        data = json.loads(path.read_text())
        assert data["fatal"] is None, f"writer {wid} failed:\n{data['fatal']}"
        assert codes[wid] == 0, f"writer {wid} exited with {codes[wid]}"
        assert len(data["records"]) == rounds
        reports.append(WorkerReport(wid, data["pid"], data["records"]))
    return reports


def test_control_naive_rename_races_fail_with_directory_not_empty(tmp_path: Path) -> None:
    root = tmp_path / "run"
    root.mkdir()
    start = time.monotonic()
    reports = _run_workers(_naive_worker, root, CONTROL_ROUNDS, tmp_path / "results")
    seconds = time.monotonic() - start

    errors = [e for r in reports for e in r.errors()]
    conflicts = [e for e in errors if e["type"] == "OSError" and e["errno"] in CONFLICT_ERRNOS]
    renamed = sum(1 for r in reports for rec in r.records if rec["outcome"] == "renamed")
    print(
        f"naive: {WRITERS} writers x {CONTROL_ROUNDS} rounds, {renamed} renames succeeded, "
        f"{len(conflicts)} ENOTEMPTY/EEXIST errors, {len(errors)} errors in all, {seconds:.1f}s"
    )
    assert conflicts, "the naive protocol never collided: the harness does not make writers race"
    assert all(e in conflicts for e in errors), errors  # no other kind of failure
    assert "Directory not empty" in conflicts[0]["text"] or "File exists" in conflicts[0]["text"]


def test_atomic_checkpoint_commits_exactly_once_per_round(tmp_path: Path) -> None:
    root = tmp_path / "run"
    start = time.monotonic()
    reports = _run_workers(_guarded_worker, root, FIX_ROUNDS, tmp_path / "results")
    seconds = time.monotonic() - start

    errors = [e for r in reports for e in r.errors()]
    commits = sum(1 for r in reports for rec in r.records if rec["outcome"] == Outcome.COMMITTED)
    print(
        f"atomic_checkpoint: {WRITERS} writers x {FIX_ROUNDS} rounds, {commits} commits, "
        f"{len(errors)} errors, {seconds:.1f}s"
    )
    assert not errors, "\n".join(e["text"] for e in errors[:3])

    layout = RootLayout(str(root))
    names = {f"checkpoint-{rnd}" for rnd in range(FIX_ROUNDS)}
    assert set(os.listdir(root)) == names | {META_DIR}
    assert os.listdir(layout.staging) == []
    assert os.listdir(layout.trash) == []
    assert os.listdir(layout.quarantine) == []

    pid_of = {r.wid: r.pid for r in reports}
    for rnd in range(FIX_ROUNDS):
        outcomes = {r.wid: r.records[rnd]["outcome"] for r in reports}
        committers = [wid for wid, o in outcomes.items() if o == Outcome.COMMITTED]
        kept = [wid for wid, o in outcomes.items() if o == Outcome.KEPT_EXISTING]
        assert len(committers) == 1, f"round {rnd}: {outcomes}"
        assert len(kept) == WRITERS - 1, f"round {rnd}: {outcomes}"

        final = root / f"checkpoint-{rnd}"
        report = ckptguard.verify(final)
        assert report.ok, f"{final}: {report.problems}"
        assert report.manifest is not None
        assert {f.path for f in report.manifest.files} == USER_FILES
        assert set(os.listdir(final)) == USER_FILES | {MANIFEST_NAME}
        # One writer's complete file set, and that writer is the one that reported the commit.
        winner = json.loads((final / "writer.json").read_text())
        assert winner == {"writer": committers[0], "round": rnd}
        assert (final / "model.bin").read_bytes() == _payload(committers[0], rnd)
        assert report.manifest.writer.pid == pid_of[committers[0]]
