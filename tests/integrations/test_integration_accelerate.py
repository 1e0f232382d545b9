"""Accelerate through ``protect()``: real training runs, SIGKILLed mid-save, then resumed.

Every run is a subprocess of ``accel_driver.py`` (30 steps, ``save_state()`` every 10,
automatic naming: ``checkpoints/checkpoint_<i>``), alone or under torchrun (2 ranks,
gloo). A run killed inside ckptguard's commit protocol and run again must end with the
same weights, byte for byte, as a run never interrupted. The control shows the comparison
can fail: upstream Accelerate resumes from a torn checkpoint folder.

This file is also the child of the explicit-paths test: ``python THIS_FILE ROOT``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

import ckptguard
import driver_jobs
from ckptguard._errors import CheckpointError
from ckptguard._format.layout import MANIFEST_NAME, RootLayout
from driver_jobs import CHILD_ENV, RUN_TIMEOUT, Done, assert_killed

if TYPE_CHECKING:
    from collections.abc import Iterator

DRIVER = Path(__file__).with_name("accel_driver.py")


class Job(driver_jobs.Job):
    driver = DRIVER


def _run(out: Path, *args: str, nproc: int = 1) -> Done:
    return driver_jobs.finish(Job(out, *args, nproc=nproc))


def _checkpoints(out: Path) -> Path:
    return out / "checkpoints"


def _names(root: Path) -> list[str]:
    """The checkpoints (and anything else) in ``root``, without ckptguard's own folder."""
    return sorted(p.name for p in root.iterdir() if p.name != ".ckptguard")


def _entries(meta_dir: str) -> list[str]:
    return sorted(os.listdir(meta_dir))


def _assert_verifies(path: Path) -> ckptguard.VerifyReport:
    report = ckptguard.verify(path)
    assert report.ok, report.problems
    return report


def _assert_clean(root: Path) -> None:
    """No save in progress or left by a crash, no replaced or deleted checkpoint pending."""
    layout = RootLayout(str(root))
    assert _entries(layout.staging) == []
    assert _entries(layout.trash) == []


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate_half(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Job]:
    """One protected, uninterrupted run; started once, in the background.

    It keeps two checkpoints (``--limit 2``): that changes nothing in training and also
    serves the ``total_limit`` test.
    """
    job = Job(tmp_path_factory.mktemp("accelerate") / "reference", "--limit", "2")
    yield job
    job.stop()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kill_at", "committed", "left_staging"),
    [
        # (fault point:hit, checkpoints committed when the process died, staging dirs left)
        ("seal.files_synced:2", ["checkpoint_0"], 1),  # 2nd save sealed, never committed
        ("publish.root_synced:2", ["checkpoint_0", "checkpoint_1"], 0),  # committed, durable
    ],
    ids=["uncommitted", "committed"],
)
def test_killed_mid_save_resumes_identically(
    tmp_path: Path, reference: Job, kill_at: str, committed: list[str], left_staging: int
) -> None:
    out = tmp_path / "run"
    ckpts = _checkpoints(out)
    assert_killed(_run(out, "--kill-at", kill_at), nproc=1)
    assert _names(ckpts) == committed
    for name in committed:
        _assert_verifies(ckpts / name)
    assert len(_entries(RootLayout(str(ckpts)).staging)) == left_staging

    resumed = _run(out).ok()
    assert resumed.resumed_from == str(len(committed) - 1)
    assert resumed.final == reference.wait().ok().final
    _assert_clean(ckpts)
    assert _names(ckpts) == ["checkpoint_0", "checkpoint_1", "checkpoint_2"]
    for i in range(3):
        assert _assert_verifies(ckpts / f"checkpoint_{i}").step == i


@pytest.mark.slow
def test_two_ranks_killed_mid_save_resume_identically(tmp_path: Path) -> None:
    out = tmp_path / "run"
    ckpts = _checkpoints(out)
    reference = Job(tmp_path / "reference", nproc=2)
    try:
        assert_killed(_run(out, "--kill-at", "seal.files_synced:2", nproc=2), nproc=2)
        assert _names(ckpts) == ["checkpoint_0"]
        _assert_verifies(ckpts / "checkpoint_0")

        resumed = _run(out, nproc=2).ok()
        assert resumed.resumed_from == "0"
        assert resumed.final == reference.wait().ok().final
    finally:
        reference.stop()
    _assert_clean(ckpts)
    for i in range(3):
        report = _assert_verifies(ckpts / f"checkpoint_{i}")
        assert report.manifest is not None
        assert report.manifest.writer.world_size == 2
    # One commit holds every rank's files.
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= set(os.listdir(ckpts / "checkpoint_2"))


@pytest.mark.slow
def test_total_limit_keeps_the_newest_and_numbering_survives_a_resume(
    tmp_path: Path, reference: Job
) -> None:
    ref = reference.wait().ok()
    ref_ckpts = _checkpoints(ref.out)
    assert _names(ref_ckpts) == ["checkpoint_1", "checkpoint_2"]
    _assert_clean(ref_ckpts)
    for name in ("checkpoint_1", "checkpoint_2"):
        _assert_verifies(ref_ckpts / name)

    # Killed during the third save, just before its rename: checkpoint_0 and _1 remain.
    out = tmp_path / "run"
    ckpts = _checkpoints(out)
    assert_killed(_run(out, "--limit", "2", "--kill-at", "commit.before_rename:3"), nproc=1)
    assert _names(ckpts) == ["checkpoint_0", "checkpoint_1"]
    # Upstream Accelerate leaves `iteration` at 0 after load_state(), so the next automatic
    # save would be named checkpoint_0 again; ckptguard sets it past the one loaded.
    resumed = _run(out, "--limit", "2").ok()
    assert resumed.resumed_from == "1"
    assert _names(ckpts) == ["checkpoint_1", "checkpoint_2"]
    assert _assert_verifies(ckpts / "checkpoint_2").step == 2
    _assert_clean(ckpts)
    assert resumed.final == ref.final


@pytest.mark.slow
def test_a_corrupt_newest_checkpoint_is_skipped(tmp_path: Path, reference: Job) -> None:
    out = tmp_path / "run"
    shutil.copytree(reference.wait().ok().out, out)
    ckpts = _checkpoints(out)
    _flip_byte(ckpts / "checkpoint_2" / "model.safetensors")
    assert not ckptguard.verify(ckpts / "checkpoint_2").ok

    resumed = _run(out, "--steps", "40").ok()
    assert resumed.resumed_from == "1"
    assert json.loads(resumed.final)["step"] == 40
    # The corrupt folder stood where the new checkpoint_2 goes: quarantined, not deleted.
    quarantine = RootLayout(str(ckpts)).quarantine
    assert [n for n in _entries(quarantine) if n.startswith("checkpoint_2.")] != []
    assert _names(ckpts) == ["checkpoint_1", "checkpoint_2", "checkpoint_3"]
    for i in (1, 2, 3):
        assert _assert_verifies(ckpts / f"checkpoint_{i}").step == i
    _assert_clean(ckpts)


@pytest.mark.slow
def test_control_a_torn_checkpoint_breaks_unprotected_resume_only(
    tmp_path: Path, reference: Job
) -> None:
    """Unprotected runs cannot stop at a fault point: tear the newest checkpoint by hand.

    A crash while Accelerate writes straight into ``checkpoint_2`` leaves it half-written;
    truncating one file of a finished run is that state.
    """
    ref = reference.wait().ok()
    bare = _run(tmp_path / "bare", "--unprotected").ok()
    assert bare.final == ref.final  # ckptguard does not change what is trained
    guarded = tmp_path / "guarded"
    shutil.copytree(ref.out, guarded)
    for out in (bare.out, guarded):
        _truncate_half(_checkpoints(out) / "checkpoint_2" / "model.safetensors")
        (out / "final.json").unlink()

    # Adoption: the same torn run, written without ckptguard, resumed with protect().
    adopted = tmp_path / "adopted"
    shutil.copytree(bare.out, adopted)

    bare_job, guarded_job = Job(bare.out, "--unprotected"), Job(guarded)
    try:
        bare_again, guarded_again = bare_job.wait(), guarded_job.wait()
    finally:
        bare_job.stop()
        guarded_job.stop()
    adopted_again = _run(adopted).ok()
    assert adopted_again.resumed_from == "1"  # checkpoint_2 fails the structural check
    assert adopted_again.final == ref.final
    assert "checkpoint_2 (written without ckptguard)" in adopted_again.stderr
    assert "checkpoint_1 was written without ckptguard" in adopted_again.stderr
    # Upstream loads the highest-numbered folder, torn or not.
    final = bare.out / "final.json"
    assert bare_again.returncode != 0 or final.read_bytes() != ref.final, bare_again.stdout
    guarded_again.ok()
    assert guarded_again.resumed_from == "1"
    assert guarded_again.final == ref.final


def _explicit_paths(root: Path) -> dict[str, Any]:
    """Child: ``save_state(dir)`` / ``load_state(dir)`` through ``protect()``."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    from ckptguard.integrations.accelerate import protect

    acc = protect(
        Accelerator(cpu=True, project_config=ProjectConfiguration(project_dir=str(root / "p")))
    )
    model = acc.prepare(torch.nn.Linear(4, 2))

    def fill(value: float) -> None:
        with torch.no_grad():
            for param in model.parameters():
                param.fill_(value)

    def weight() -> float:
        return float(model.weight[0, 0])

    def save_id(path: Path) -> str:
        manifest = ckptguard.verify(path).manifest
        return "" if manifest is None else manifest.save_id

    manual = root / "manual"
    report: dict[str, Any] = {}
    fill(1.0)
    report["first"] = acc.save_state(str(manual))
    report["first_save_id"] = save_id(manual)
    fill(2.0)
    report["second"] = acc.save_state(str(manual))
    report["second_save_id"] = save_id(manual)
    fill(3.0)
    acc.load_state(str(manual))
    report["loaded"] = weight()

    bad = root / "bad"
    shutil.copytree(manual, bad)
    _flip_byte(bad / "model.safetensors")
    try:
        acc.load_state(str(bad))
    except CheckpointError as exc:
        report["bad"] = type(exc).__name__
    report["after_bad"] = weight()  # refused before any tensor was touched

    auto = protect(
        Accelerator(
            cpu=True,
            project_config=ProjectConfiguration(
                project_dir=str(root / "auto"), automatic_checkpoint_naming=True
            ),
        )
    )
    try:
        auto.load_state()
    except CheckpointError as exc:
        report["empty"] = type(exc).__name__
    return report


@pytest.mark.slow
def test_explicit_paths(tmp_path: Path) -> None:
    root = tmp_path / "work"
    root.mkdir()
    proc = subprocess.run(
        [sys.executable, __file__, str(root)],
        capture_output=True,
        text=True,
        env=CHILD_ENV,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((root / "report.json").read_text())
    manual = root / "manual"
    assert report["first"] == report["second"] == str(manual)
    assert report["first_save_id"] != report["second_save_id"]
    # The second save replaced the first: one folder, the second save's, nothing aside.
    assert [n for n in _names(root) if n.startswith("manual")] == ["manual"]
    verified = _assert_verifies(manual)
    assert verified.manifest is not None
    assert verified.manifest.save_id == report["second_save_id"]
    assert MANIFEST_NAME in os.listdir(manual)
    _assert_clean(root)
    assert report["loaded"] == 2.0
    assert report["bad"] == "CorruptCheckpoint"
    assert report["after_bad"] == 2.0
    assert report["empty"] == "NoValidCheckpoint"


if __name__ == "__main__":
    _root = Path(sys.argv[1])
    (_root / "report.json").write_text(json.dumps(_explicit_paths(_root)))
