"""Saves on preemption for Lightning: the ``SaveOnPreemption`` callback.

Real runs of ``preempt_lightning_driver.py`` (a tiny module, 30 steps in one epoch, each
step's batch drawn from the step number, ``AtomicCheckpointIO``), real signals:

- one process, SIGTERM sent from this test while ``fit`` runs: the step the run agreed on
  is committed (it verifies) under ``ModelCheckpoint``'s name, the process exits with
  ``PREEMPTED_EXIT_CODE`` and logs the line; that checkpoint's weights equal, bit for bit,
  an uninterrupted run's at that step, and the run resumed from it trains from the next
  step and ends bit-identical to the uninterrupted run;
- two gloo ranks under torchrun (sync and ``async_save=True``): rank 1 alone sends itself
  SIGTERM at the end of step 4: both ranks stop at step 4, one committed checkpoint of
  step 4, both exit 75; with ``async_save=True`` the background write starts 1 s late and
  the file exists when rank 0 logs the line; the same with ``strategy="ddp"`` launched by
  Lightning itself (the launching process, rank 0, exits 75);
- SIGTERM during the sanity-check validation (Lightning's handlers are in place from
  there on; without the callback's takeover Lightning ends ``fit`` there): saved at
  step 1, exit 75;
- the control, Lightning without the callback: SIGTERM ends ``fit`` with Lightning's
  ``SIGTERMException`` and exit code 0, no checkpoint (this is what the callback changes:
  the first test fails on such a run);
- refusals, in this process: no ``AtomicCheckpointIO`` (``ValueError``), a SIGTERM handler
  of the program's own (``RuntimeError``, the handler left in place).
"""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch
import xxhash

import ckptguard
import driver_jobs
from ckptguard.integrations.lightning import AtomicCheckpointIO, SaveOnPreemption, load

if TYPE_CHECKING:
    from collections.abc import Iterator

DRIVER = Path(__file__).with_name("preempt_lightning_driver.py")
STEPS = "30"
LINE = re.compile(
    r"^rank(\d): preempted by (\S+(?: peer's signal)?) at step (\d+): committed (\S+); "
    r"exiting with code 75$",
    re.MULTILINE,
)


class Job(driver_jobs.Job):
    driver = DRIVER


def _steps(out: Path) -> dict[str, Any]:
    steps: dict[str, Any] = json.loads((out / "steps.json").read_text())
    return steps


def _digests(checkpoint: Path) -> dict[str, str]:
    """The weight digests of a Lightning checkpoint, as the driver computes them."""
    state = load(checkpoint, weights_only=True)["state_dict"]
    return {
        k: xxhash.xxh3_64_hexdigest(torch.as_tensor(v).contiguous().numpy().tobytes())
        for k, v in sorted(state.items())
    }


def _wait_for_line(job: Job, line: str, timeout: float = 120.0) -> None:
    path = job.out.with_name(f"{job.out.name}.stdout")
    deadline = time.monotonic() + timeout
    while line not in path.read_text():
        assert job.proc.poll() is None, f"the run ended before printing {line!r}"
        assert time.monotonic() < deadline, f"no {line!r} in {timeout} s"
        time.sleep(0.02)


@pytest.fixture
def jobs() -> Iterator[list[Job]]:
    started: list[Job] = []
    try:
        yield started
    finally:
        for job in started:
            job.stop()


def test_sigterm_during_fit_commits_the_agreed_step_and_exits_75(
    tmp_path: Path, jobs: list[Job]
) -> None:
    reference = Job(tmp_path / "reference", "--steps", STEPS)
    preempted = Job(tmp_path / "run", "--steps", STEPS, "--announce")
    jobs += [reference, preempted]
    _wait_for_line(preempted, "step 3\n")
    preempted.proc.send_signal(signal.SIGTERM)
    done = driver_jobs.finish(preempted)
    assert done.returncode == ckptguard.PREEMPTED_EXIT_CODE == 75, done.stderr[-4000:]
    lines = LINE.findall(done.stderr)
    assert len(lines) == 1, done.stderr[-4000:]
    rank, sig, agreed, path = lines[0]
    step = int(agreed)
    assert (rank, sig) == ("0", "SIGTERM")
    assert 3 <= step < int(STEPS)
    checkpoint = tmp_path / "run" / "ckpts" / f"epoch=0-step={step}.ckpt"
    assert path == str(checkpoint)
    assert [p.name for p in checkpoint.parent.glob("*.ckpt")] == [checkpoint.name]
    report = ckptguard.verify(checkpoint)
    assert report.ok, report.problems
    assert report.manifest is not None
    assert report.manifest.step == step
    assert max(int(s) for s in _steps(tmp_path / "run")["weights"]) == step  # stopped there

    ref = driver_jobs.finish(reference).ok()
    assert "SIGTERM after fit: <Handlers.SIG_DFL: 0>" in ref.stdout  # Lightning restored it
    assert _digests(checkpoint) == _steps(tmp_path / "reference")["weights"][str(step)]

    resumed = driver_jobs.finish(Job(tmp_path / "run", "--steps", STEPS)).ok()
    assert resumed.resumed_from == str(step)
    assert _steps(tmp_path / "run")["first"] == step + 1  # the next step, not a repeat
    assert resumed.final == ref.final


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_sigterm_to_one_rank_stops_both_ranks_at_the_same_step(
    tmp_path: Path, jobs: list[Job], mode: str
) -> None:
    extra = ["--async", "--slow-commit"] if mode == "async" else []
    job = Job(tmp_path / "run", "--signal-at", "4", "--signal-rank", "1", *extra, nproc=2)
    jobs.append(job)
    done = driver_jobs.finish(job)
    codes = re.findall(r"^\s*exitcode\s+:\s*(-?\d+)", done.stderr, re.MULTILINE)
    assert sorted(codes) == ["75", "75"], done.stderr[-4000:]
    checkpoint = tmp_path / "run" / "ckpts" / "epoch=0-step=4.ckpt"
    assert sorted(LINE.findall(done.stderr)) == [
        ("0", "a peer's signal", "4", str(checkpoint)),
        ("1", "SIGTERM", "4", str(checkpoint)),
    ], done.stderr[-4000:]
    assert [p.name for p in checkpoint.parent.glob("*.ckpt")] == [checkpoint.name]
    report = ckptguard.verify(checkpoint)
    assert report.ok, report.problems
    assert report.manifest is not None
    assert report.manifest.step == 4
    assert max(int(s) for s in _steps(tmp_path / "run")["weights"]) == 4
    if mode == "async":  # the background write started 1 s late: both lines waited for it
        assert done.stdout.count("at the line: exists=True") == 2, done.stdout


def test_lightnings_own_ddp_launcher_both_ranks_stop_at_the_same_step(
    tmp_path: Path, jobs: list[Job]
) -> None:
    """``strategy="ddp"`` launched by Lightning (no torchrun): this process is rank 0."""
    job = Job(tmp_path / "run", "--devices", "2", "--signal-at", "4", "--signal-rank", "1")
    jobs.append(job)
    done = driver_jobs.finish(job)
    assert done.returncode == 75, done.stderr[-4000:]
    checkpoint = tmp_path / "run" / "ckpts" / "epoch=0-step=4.ckpt"
    assert sorted(LINE.findall(done.stderr)) == [
        ("0", "a peer's signal", "4", str(checkpoint)),
        ("1", "SIGTERM", "4", str(checkpoint)),
    ], done.stderr[-4000:]
    assert [p.name for p in checkpoint.parent.glob("*.ckpt")] == [checkpoint.name]
    assert ckptguard.verify(checkpoint).ok


def test_sigterm_in_the_sanity_check_is_saved_at_the_first_step(
    tmp_path: Path, jobs: list[Job]
) -> None:
    """The sanity check runs with Lightning's handlers installed: the callback takes over."""
    job = Job(tmp_path / "run", "--signal-in-sanity")
    jobs.append(job)
    done = driver_jobs.finish(job)
    assert done.returncode == 75, done.stderr[-4000:]
    checkpoint = tmp_path / "run" / "ckpts" / "epoch=0-step=1.ckpt"
    assert LINE.findall(done.stderr) == [("0", "SIGTERM", "1", str(checkpoint))]
    assert ckptguard.verify(checkpoint).ok


def test_control_without_the_callback_lightning_ends_fit_with_no_save_and_exit_0(
    tmp_path: Path, jobs: list[Job]
) -> None:
    job = Job(tmp_path / "run", "--signal-at", "5", "--no-callback")
    jobs.append(job)
    done = driver_jobs.finish(job)
    assert done.returncode == 0, done.stderr[-4000:]  # SIGTERMException: a SystemExit()
    assert "Received SIGTERM" in done.stderr
    assert not LINE.findall(done.stderr)
    assert not (tmp_path / "run" / "ckpts").exists()  # no save at all
    assert max(int(s) for s in _steps(tmp_path / "run")["weights"]) == 5
    assert not (tmp_path / "run" / "final.json").exists()  # fit did not return


@pytest.mark.filterwarnings("ignore")  # Lightning's and torch's deprecations: not the subject
def test_refused_without_the_plugin_or_over_the_programs_own_handler(tmp_path: Path) -> None:
    """In this process: clear errors, and the program's handler is left in place."""
    import lightning as L  # noqa: N812 - Lightning's own convention

    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(2, 1)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:  # noqa: ARG002
            loss: torch.Tensor = self.net(batch[0]).sum()
            return loss

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def fit(*plugins: Any) -> None:
        trainer = L.Trainer(
            max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
            enable_checkpointing=False, enable_model_summary=False,
            default_root_dir=str(tmp_path), plugins=list(plugins), callbacks=[SaveOnPreemption()],
        )  # fmt: skip
        data = torch.utils.data.TensorDataset(torch.randn(8, 2))
        trainer.fit(Tiny(), torch.utils.data.DataLoader(data, batch_size=2))

    with pytest.raises(ValueError, match=r"add AtomicCheckpointIO to the Trainer"):
        fit()

    def own(signum: int, frame: Any) -> None:
        del signum, frame

    before = signal.signal(signal.SIGTERM, own)
    try:
        with pytest.raises(RuntimeError, match="the program already handles SIGTERM"):
            fit(AtomicCheckpointIO())
        assert signal.getsignal(signal.SIGTERM) is own
    finally:
        signal.signal(signal.SIGTERM, before)
    assert not list(tmp_path.rglob("*.ckpt"))
