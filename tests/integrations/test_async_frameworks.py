"""Async framework saves (``protect(trainer, async_save=True)``) with real training runs.

Each run is a child process of a training driver (``hf_driver.py``: a tiny GPT-2 Trainer
that resumes by itself and writes ``OUT/final.json``, a digest of every weight). What is
shown, for the Trainer:

- an async run ends with the same weights as a synchronous one, and its checkpoints hold
  the very files the synchronous run wrote (the Trainer's own formats, byte for byte);
- killed while the background thread writes a save, the run resumes from the last commit
  and ends bit-exact with an uninterrupted run;
- the training step changes the weights and Adam moments in place right after ``save``
  returns, while the background write is held back: the checkpoint holds the values of
  the moment of the save (control: without the snapshot it holds the changed ones);
- a background failure surfaces (the run fails at its next save) and commits nothing;
- ``load_best_model_at_end``; ``on_save`` callbacks that add files to the checkpoint.
  Two ranks under torchrun with async saves: test_frameworks_objectstore.py's two-rank
  S3 run (each rank's files uploaded from its background thread, committed once).

The same for Accelerate's ``save_state`` (``accel_driver.py``: automatic naming, and
explicit directories), and for Lightning's ``AtomicCheckpointIO(async_save=True)``.

The runs start at once, three at a time, in a module fixture; each test waits for its own.
"""

from __future__ import annotations

import json
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import safetensors.torch
import torch
import xxhash

import ckptguard
import driver_jobs
from ckptguard._protocol.filecommit import verify_file
from driver_jobs import Done, assert_killed

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
HF = Path(__file__).with_name("hf_driver.py")
ACCEL = Path(__file__).with_name("accel_driver.py")
LIGHTNING = Path(__file__).with_name("lightning_driver.py")
ACCEL_WIDE = ["--width", "4096"]  # tensors above the size that is worth deferring
# load_best_model_at_end with the highest loss "best" (an old checkpoint), and a callback
# that adds merged/ to each checkpoint in on_save, in one run.
BEST_AND_LATE_WRITES = ["--best", "max", "--limit", "1", "--steps", "20", "--late-writes"]
CHECKPOINTS = ["checkpoint-10", "checkpoint-20", "checkpoint-30"]
# The 2nd save's first deferred write (each save defers the weights and the optimizer).
SECOND_SAVE_WRITING = "deferred.write:3"
# Files compared byte for byte between a sync and an async run's checkpoints.
SAME_BYTES = ["model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"]


class HFJob(driver_jobs.Job):
    driver = HF


class AccelJob(driver_jobs.Job):
    driver = ACCEL


class LightningJob(driver_jobs.Job):
    driver = LIGHTNING


def _lightning(out: Path, *args: str) -> Done:
    return driver_jobs.finish(LightningJob(out, *args))


def _lightning_kill_then_resume(out: Path, *args: str) -> tuple[Done, list[str], Done]:
    killed = _lightning(out, *args, "--kill-at", "file.written:2")
    after = sorted(p.name for p in (out / "ckpts").glob("*.ckpt") if verify_file(str(p)).ok)
    return killed, after, _lightning(out, *args)


def _run(out: Path, *args: str, nproc: int = 1) -> Done:
    return driver_jobs.finish(HFJob(out, *args, nproc=nproc))


def _accel(out: Path, *args: str, nproc: int = 1) -> Done:
    return driver_jobs.finish(AccelJob(out, *args, nproc=nproc))


def _kill_then_resume(out: Path, *args: str) -> tuple[Done, dict[str, bool], Done]:
    killed = _run(out, *args, "--kill-at", SECOND_SAVE_WRITING)
    after = _checkpoints(out)
    return killed, after, _run(out, *args)


def _accel_kill_then_resume(out: Path, *args: str) -> tuple[Done, dict[str, bool], Done]:
    killed = _accel(out, *args, "--kill-at", SECOND_SAVE_WRITING)
    after = _checkpoints(out / "checkpoints", "checkpoint_*")
    return killed, after, _accel(out, *args)


def _checkpoints(out: Path, pattern: str = "checkpoint-*") -> dict[str, bool]:
    """Each checkpoint of ``out`` and whether it verifies."""
    return {p.name: ckptguard.verify(p).ok for p in sorted(out.glob(pattern))}


def _staging(out: Path) -> list[str]:
    staging = out / ".ckptguard" / "staging"
    return sorted(p.name for p in staging.iterdir()) if staging.is_dir() else []


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Future[Any]]]:
    base = tmp_path_factory.mktemp("async")
    pool = ThreadPoolExecutor(max_workers=3, thread_name_prefix="async-job")
    jobs: dict[str, Future[Any]] = {
        "sync": pool.submit(_run, base / "sync"),
        "async": pool.submit(_run, base / "async", "--async"),
        "kill": pool.submit(_kill_then_resume, base / "kill", "--async"),
        "scramble": pool.submit(_run, base / "scramble", "--async", "--scramble", "--steps", "20"),
        "fail": pool.submit(_run, base / "fail", "--async", "--fail-at", SECOND_SAVE_WRITING),
        "best": pool.submit(_run, base / "best", "--async", *BEST_AND_LATE_WRITES),
        "accel-sync": pool.submit(_accel, base / "accel-sync", *ACCEL_WIDE),
        "accel-async": pool.submit(_accel, base / "accel-async", "--async", *ACCEL_WIDE),
        "accel-kill": pool.submit(
            _accel_kill_then_resume, base / "accel-kill", "--async", *ACCEL_WIDE
        ),
        "accel-explicit": pool.submit(
            _accel, base / "accel-explicit", "--async", "--explicit", "--scramble", *ACCEL_WIDE
        ),
        "pl-sync": pool.submit(_lightning, base / "pl-sync"),
        "pl-async": pool.submit(_lightning, base / "pl-async", "--async"),
        "pl-kill": pool.submit(_lightning_kill_then_resume, base / "pl-kill", "--async"),
        "pl-scramble": pool.submit(_lightning, base / "pl-scramble", "--async", "--scramble"),
        "pl-top-async": pool.submit(_lightning, base / "pl-top-async", "--top-k", "1", "--async"),
        "accel-two-async": pool.submit(
            _accel, base / "accel-two-async", "--async", *ACCEL_WIDE, nproc=2
        ),
    }
    yield jobs
    pool.shutdown(wait=True, cancel_futures=True)


def test_async_run_writes_the_trainers_own_files_and_ends_like_a_sync_run(
    runs: dict[str, Future[Any]],
) -> None:
    sync, done = runs["sync"].result().ok(), runs["async"].result().ok()
    assert done.final == sync.final  # same weights at the end
    assert _checkpoints(done.out) == dict.fromkeys(CHECKPOINTS, True)
    for name in CHECKPOINTS:
        for file in SAME_BYTES:
            a, b = done.out / name / file, sync.out / name / file
            assert a.read_bytes() == b.read_bytes(), f"{name}/{file} differs from the sync save's"
    assert _staging(done.out) == []


def test_killed_during_the_background_write_resumes_exactly(
    runs: dict[str, Future[Any]],
) -> None:
    killed, after, resumed = runs["kill"].result()
    assert_killed(killed, 1)
    assert after == {"checkpoint-10": True}  # the save cut in the background is invisible
    resumed.ok()
    assert resumed.resumed_from == "10"
    assert resumed.final == runs["sync"].result().final
    assert _checkpoints(resumed.out) == dict.fromkeys(CHECKPOINTS, True)
    assert _staging(resumed.out) == []  # the cut save's staging was cleaned at start


def _digest(tensor: torch.Tensor) -> str:
    return xxhash.xxh3_64_hexdigest(tensor.contiguous().numpy().tobytes())


def test_the_checkpoint_holds_the_state_of_the_moment_of_the_save(
    runs: dict[str, Future[Any]],
) -> None:
    """The next step changes every weight and Adam moment in place while the background
    write waits; the checkpoint still holds what they were when save returned."""
    done = runs["scramble"].result().ok()
    record = json.loads((done.out / "scrambled.json").read_text())
    checkpoint = done.out / f"checkpoint-{record['step']}"
    assert ckptguard.verify(checkpoint).ok
    weights = safetensors.torch.load_file(checkpoint / "model.safetensors")
    saved = {k: _digest(v) for k, v in weights.items()}
    assert saved == {k: v for k, v in record["weights"].items() if k in saved}
    assert len(saved) >= 10
    optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    moments = {str(k): _digest(v["exp_avg"]) for k, v in optimizer["state"].items()}
    assert moments == record["moments"]


def test_a_background_failure_raises_at_the_next_save_and_commits_nothing(
    runs: dict[str, Future[Any]],
) -> None:
    done = runs["fail"].result()
    assert done.returncode != 0
    assert "No space left on device (injected)" in done.stderr, done.stderr[-4000:]
    assert _checkpoints(done.out) == {"checkpoint-10": True}
    assert _staging(done.out) == []  # the failed save cleaned up after itself
    assert not (done.out / "final.json").exists()


def test_load_best_model_at_end_waits_for_the_save_in_flight(
    runs: dict[str, Future[Any]],
) -> None:
    """--best max: the highest eval loss is "best", an old checkpoint; the final weights are
    loaded from it, and retention (save_total_limit=1) keeps it and the newest."""
    done = runs["best"].result().ok()
    assert _checkpoints(done.out) == {"checkpoint-10": True, "checkpoint-20": True}
    state = json.loads((done.out / "checkpoint-20" / "trainer_state.json").read_text())
    best = Path(state["best_model_checkpoint"]).name
    weights = safetensors.torch.load_file(done.out / best / "model.safetensors")
    final = json.loads(done.final)["weights"]
    assert {k: _digest(v) for k, v in weights.items()} == {k: final[k] for k in weights}


def test_files_that_on_save_callbacks_add_are_committed(runs: dict[str, Future[Any]]) -> None:
    """The same run as the test above: its callback adds merged/ in on_save."""
    done = runs["best"].result().ok()
    for name in ("checkpoint-10", "checkpoint-20"):
        report = ckptguard.verify(done.out / name)
        assert report.ok, report.problems
        assert report.manifest is not None
        assert "merged/extra.bin" in {f.path for f in report.manifest.files}


# --- Accelerate ------------------------------------------------------------------------------
ACCEL_CHECKPOINTS = ["checkpoint_0", "checkpoint_1", "checkpoint_2"]
ACCEL_SAME_BYTES = ["model.safetensors", "optimizer.bin", "scheduler.bin"]


def test_accelerate_async_saves_the_same_files_and_ends_like_a_sync_run(
    runs: dict[str, Future[Any]],
) -> None:
    sync, done = runs["accel-sync"].result().ok(), runs["accel-async"].result().ok()
    assert done.final == sync.final
    root = done.out / "checkpoints"
    assert _checkpoints(root, "checkpoint_*") == dict.fromkeys(ACCEL_CHECKPOINTS, True)
    for name in ACCEL_CHECKPOINTS:
        for file in ACCEL_SAME_BYTES:
            got = (root / name / file).read_bytes()
            assert got == (sync.out / "checkpoints" / name / file).read_bytes(), f"{name}/{file}"


def test_accelerate_killed_during_the_background_write_resumes_exactly(
    runs: dict[str, Future[Any]],
) -> None:
    killed, after, resumed = runs["accel-kill"].result()
    assert_killed(killed, 1)
    assert after == {"checkpoint_0": True}
    resumed.ok()
    assert resumed.resumed_from == "0"
    assert resumed.final == runs["accel-sync"].result().final


def test_accelerate_explicit_directories_hold_the_state_of_the_moment_of_the_save(
    runs: dict[str, Future[Any]],
) -> None:
    done = runs["accel-explicit"].result().ok()
    saves = sorted((done.out / "explicit").glob("step_*"))
    assert [p.name for p in saves] == ["step_10", "step_20", "step_30"]
    assert all(ckptguard.verify(p).ok for p in saves)
    record = json.loads((done.out / "scrambled.json").read_text())
    weights = safetensors.torch.load_file(saves[0] / "model.safetensors")
    assert {k: _digest(v) for k, v in weights.items()} == record["weights"]
    final = json.loads(done.final)["weights"]
    weights = safetensors.torch.load_file(saves[-1] / "model.safetensors")
    assert {k: _digest(v) for k, v in weights.items()} == final


def test_accelerate_two_ranks_under_torchrun(runs: dict[str, Future[Any]]) -> None:
    done = runs["accel-two-async"].result().ok()
    assert json.loads(done.final)["step"] == 30
    root = done.out / "checkpoints"
    assert _checkpoints(root, "checkpoint_*") == dict.fromkeys(ACCEL_CHECKPOINTS, True)
    report = ckptguard.verify(root / "checkpoint_2")
    assert report.manifest is not None
    files = {f.path for f in report.manifest.files}
    assert {"model.safetensors", "random_states_0.pkl", "random_states_1.pkl"} <= files


# --- Lightning -------------------------------------------------------------------------------
PL_CHECKPOINTS = ["step=10.ckpt", "step=20.ckpt", "step=30.ckpt"]


def _ckpts(out: Path) -> dict[str, bool]:
    return {p.name: verify_file(str(p)).ok for p in sorted((out / "ckpts").glob("*.ckpt"))}


def test_lightning_async_saves_the_same_files_and_ends_like_a_sync_run(
    runs: dict[str, Future[Any]],
) -> None:
    sync, done = runs["pl-sync"].result().ok(), runs["pl-async"].result().ok()
    assert done.final == sync.final
    assert _ckpts(done.out) == dict.fromkeys(PL_CHECKPOINTS, True)
    for name in PL_CHECKPOINTS:
        got = torch.load(done.out / "ckpts" / name, weights_only=False)
        want = torch.load(sync.out / "ckpts" / name, weights_only=False)
        assert got.keys() == want.keys()
        for key in ("state_dict", "optimizer_states", "global_step", "epoch", "loops"):
            assert repr(got[key]) == repr(want[key]), f"{name}: {key}"


def test_lightning_killed_during_the_background_write_resumes_exactly(
    runs: dict[str, Future[Any]],
) -> None:
    killed, after, resumed = runs["pl-kill"].result()
    assert_killed(killed, 1)
    assert after == ["step=10.ckpt"]
    resumed.ok()
    assert resumed.resumed_from == "10"
    assert resumed.final == runs["pl-sync"].result().final
    assert _ckpts(resumed.out) == dict.fromkeys(PL_CHECKPOINTS, True)


def test_lightning_checkpoint_holds_the_state_of_the_moment_of_the_save(
    runs: dict[str, Future[Any]],
) -> None:
    done = runs["pl-scramble"].result().ok()
    record = json.loads((done.out / "scrambled.json").read_text())
    checkpoint = torch.load(done.out / "ckpts" / f"step={record['step']}.ckpt", weights_only=False)
    assert {k: _digest(v) for k, v in checkpoint["state_dict"].items()} == record["weights"]


def test_lightning_top_k_rotation_with_async_saves(runs: dict[str, Future[Any]]) -> None:
    """Top-k deletes through the plugin while a save may be in flight: one checkpoint
    left, verifying, with its sidecar and no other."""
    done = runs["pl-top-async"].result().ok()
    (name,) = _ckpts(done.out)
    assert _ckpts(done.out) == {name: True}
    files = sorted(p.name for p in (done.out / "ckpts").iterdir())
    assert files == [f".{name}.ckptguard.json", name]
