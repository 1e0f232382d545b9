"""Child of test_distributed.py, run by torchrun (gloo on CPU): one JSON report per rank.

Usage: torchrun ... dist_child.py MODE ROOT ROUNDS OUT_DIR
  naive    each rank stages into its own tmp dir and renames it onto checkpoint-R
           (the original bug); reports the errors it hit
  guarded  every rank writes its own files inside ckptguard.atomic_checkpoint
  raising  like guarded, but rank 1 raises while writing in round 1
  async    CheckpointManager(async_save=True): the training thread runs gloo all_reduces
           and changes its tensors while each save commits in the background
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path

import torch.distributed as dist

import ckptguard


def naive(root: Path, rounds: int, rank: int) -> dict[str, object]:
    errors: list[str] = []
    for r in range(rounds):
        tmp = root / f"tmp-checkpoint-{r}-rank{rank}"
        tmp.mkdir(parents=True)
        (tmp / f"rank{rank}.bin").write_bytes(os.urandom(1024))
        dist.barrier()
        try:
            os.rename(tmp, root / f"checkpoint-{r}")
        except OSError as exc:
            errors.append(f"errno {exc.errno}: {exc.strerror}")
        dist.barrier()
    return {"errors": errors}


def _fail_while_writing() -> None:
    raise RuntimeError("simulated failure while writing on rank 1")


def guarded(root: Path, rounds: int, rank: int, *, raise_at: int | None) -> dict[str, object]:
    errors: list[str] = []
    outcomes: list[str] = []
    aborted: list[dict[str, object]] = []
    for r in range(rounds):
        expect = os.environ.get("CKPT_EXPECT_SHARED")
        tx = ckptguard.atomic_checkpoint(
            root / f"checkpoint-{r}", shared_storage=None if expect is None else expect == "1"
        )
        try:
            with tx as staging:
                (staging / f"rank{rank}.bin").write_bytes(bytes([rank]) * 4096)
                (staging / f"rank{rank}").mkdir()
                (staging / f"rank{rank}" / "state.json").write_text(json.dumps({"rank": rank}))
                if raise_at == r and rank == 1:
                    _fail_while_writing()
        except ckptguard.SaveAborted as exc:
            aborted.append({"round": r, "failures": {str(k): v for k, v in exc.failures.items()}})
            continue
        except Exception:
            errors.append(traceback.format_exc())
            continue
        assert tx.result is not None
        outcomes.append(tx.result.outcome.value)
    return {"errors": errors, "outcomes": outcomes, "aborted": aborted}


def manager(root: Path, rounds: int, rank: int) -> dict[str, object]:
    import torch

    options = json.loads(os.environ.get("CKPT_STORAGE_OPTIONS", "null"))
    url = os.environ.get("CKPT_ROOT_URL")  # an object-store root instead of ROOT
    mgr = ckptguard.CheckpointManager(url or root, keep_last=2, storage_options=options)
    infos = []
    for step in range(1, rounds + 1):
        torch.manual_seed(step)  # replicated state: identical on every rank
        info = mgr.save(
            step, {"w": torch.randn(64), "step": step}, metrics={"loss": 1 / step}
        ).result()
        infos.append({"step": info.step, "valid": info.valid, "path": info.path})
    restored = mgr.restore()
    torch.manual_seed(rounds)
    same = bool(torch.equal(restored["w"], torch.randn(64))) and restored["step"] == rounds
    aborted: list[dict[str, str]] = []
    try:  # rank 0 cannot store a lambda: every rank must get the same error
        mgr.save(rounds + 1, {"bad": (lambda: None) if rank == 0 else 0})
    except ckptguard.SaveAborted as exc:
        aborted.append({str(k): v for k, v in exc.failures.items()})
    return {"errors": [], "infos": infos, "restored_equal": same, "aborted": aborted}


def async_saves(root: Path, rounds: int, writer: str = "thread") -> dict[str, object]:
    """Async saves while the training thread keeps using the process group."""
    import torch

    mgr = ckptguard.CheckpointManager(
        root,
        keep_last=None,
        async_save=True,
        async_writer="process" if writer == "process" else "thread",
    )
    w = torch.zeros(1 << 16)
    errors: list[str] = []
    stalls = []
    for step in range(1, rounds + 1):
        w.fill_(float(step))  # replicated: the same on every rank
        job = mgr.save(step, {"w": w, "step": step}, metrics={"loss": 1 / step}, blocking=False)
        stalls.append(job.stall_seconds)
        # Training goes on at once: a collective on the training's group, and the tensor
        # the save is writing changes under it (the snapshot must not see this).
        total = torch.ones(1)
        dist.all_reduce(total)
        if total.item() != dist.get_world_size():
            errors.append(f"all_reduce gave {total.item()}")
        w.fill_(-1.0)
    last = mgr.wait()
    if last is None or last.step != rounds or not last.valid:
        errors.append(f"last save: {last}")
    capacity = mgr.saver._buffers.capacity if mgr.saver._buffers is not None else 0
    writer_pid = mgr.saver.writer.pid if mgr.saver.writer is not None else None
    for step in range(1, rounds + 1):
        got = mgr.restore(step)
        if got["step"] != step or not bool(torch.all(got["w"] == float(step))):
            errors.append(f"checkpoint-{step} does not hold the state at its save")
    mgr.close()
    return {
        "errors": errors,
        "buffer_bytes": capacity,
        "stalls": stalls,
        "pid": os.getpid(),
        "writer_pid": writer_pid,
    }


def doctor(root: Path) -> dict[str, object]:
    """The distributed checks of ckptguard.doctor, with this job's process group."""
    from ckptguard._coordination.base import default_coordinator

    expect = os.environ.get("CKPT_EXPECT_SHARED")
    report = ckptguard.doctor(
        root,
        coordinator=default_coordinator(),
        versions=False,
        expect_shared=None if expect is None else expect == "1",
    )
    dist_checks = {
        c.name: [c.status, c.message] for c in report.checks if c.name.startswith("dist.")
    }
    return {"errors": [], "doctor": dist_checks}


def killed(root: Path, rounds: int, rank: int) -> dict[str, object]:
    """Rank 1 is SIGKILLed while writing in the last round; torchrun ends the job."""
    import signal

    for r in range(rounds):
        with ckptguard.atomic_checkpoint(root / f"checkpoint-{r}") as staging:
            (staging / f"rank{rank}.bin").write_bytes(bytes([rank]) * 4096)
            if r == rounds - 1 and rank == 1:
                os.kill(os.getpid(), signal.SIGKILL)
    return {"errors": ["rank survived the last round"]}


def sharded(root: Path, rounds: int) -> dict[str, object]:
    """DTensor shards through torch.distributed.checkpoint, committed once by ckptguard."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    mgr = ckptguard.CheckpointManager(root, keep_last=2)
    full = torch.arange(64.0).reshape(8, 8)
    for step in range(1, rounds + 1):
        state = {"w": distribute_tensor(full * step, mesh, [Shard(0)]), "b": torch.ones(3) * step}
        mgr.save(step, state, sharded=True, metrics={"loss": 1 / step})
    w = distribute_tensor(torch.zeros(8, 8), mesh, [Shard(0)])
    b = torch.zeros(3)
    mgr.restore(target={"w": w, "b": b})
    ok = bool(torch.equal(w.full_tensor(), full * rounds)) and bool(
        torch.equal(b, torch.ones(3) * rounds)
    )
    errors = [] if ok else ["restored values differ"]
    return {"errors": errors, "local_shard": w.to_local().shape[0]}


def sharded_refused(root: Path) -> dict[str, object]:
    """A sharded save on node-local roots must be refused on every rank."""
    import torch

    mgr = ckptguard.CheckpointManager(root)
    try:
        mgr.save(1, {"w": torch.zeros(4)}, sharded=True)
    except ckptguard.SaveAborted as exc:
        return {"errors": [], "aborted": [str(exc)]}
    return {"errors": ["a sharded save on node-local roots was committed"], "aborted": []}


def main() -> None:
    mode, rounds, out = sys.argv[1], int(sys.argv[3]), Path(sys.argv[4])
    warnings: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:
                warnings.append(record.getMessage())

    logging.getLogger("ckptguard").addHandler(Collect())
    # "{node}" in ROOT: a separate (node-local) root per simulated node
    root = Path(sys.argv[2].replace("{node}", os.environ.get("GROUP_RANK", "0")))
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    start = time.perf_counter()
    if mode == "naive":
        report = naive(root, rounds, rank)
    elif mode == "manager":
        report = manager(root, rounds, rank)
    elif mode == "sharded_refused":
        report = sharded_refused(root)
    elif mode == "sharded":
        report = sharded(root, rounds)
    elif mode == "doctor":
        report = doctor(root)
    elif mode in {"async", "async_process"}:
        report = async_saves(root, rounds, writer=mode.removeprefix("async_"))
    elif mode == "killed":
        report = killed(root, rounds, rank)
    else:
        report = guarded(root, rounds, rank, raise_at=1 if mode == "raising" else None)
    report |= {
        "warnings": warnings,
        "rank": rank,
        "world_size": dist.get_world_size(),
        "seconds": time.perf_counter() - start,
    }
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
