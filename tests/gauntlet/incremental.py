"""Incremental saves (issue 19) under the gauntlet's faults.

The state: a model with a frozen embedding and backbone (their own file, linked from the
checkpoint before) and a trainable head, plus an optimizer; every value is a function of
the step, so each checkpoint's content is known. Rows:

- SIGKILL at every named protocol step of an incremental save (the third save, which
  links the frozen file), ``reuse.linked`` included, in a child process: committed
  checkpoints lost or corrupt = 0, each restores exactly, resume takes the newest, and
  the next save links again, verifies and leaves no staging or trash;
- the same on an object store (moto), where the link is a server-side copy: a kill at
  ``reuse.linked`` and at the remote commit's steps loses nothing committed, a start
  with ``stale_after=0`` leaves no orphan object, and the next save copies again;
- a power cut at every storage operation of that save (``FaultyStorage(track=...)``,
  the link a name that needs its directory's fsync): after the machine comes back,
  every checkpoint whose save returned is there and exact, and the next save works;
  control: with the staging directories' fsyncs skipped, a save that returned is lost;
- retention that deletes the checkpoint each new save linked from (``keep_last=1``),
  then ``rm -rf`` and ``ckptguard``'s delete of the rest in every order: every kept
  checkpoint verifies and restores exactly;
- a bit flip in a shared file: ``verify`` reports every checkpoint that shares it, and
  ``latest()``/``restore()`` fall back to the newest checkpoint without it;
- control: the same deletions made by overwriting each file in place before removing it
  (which ckptguard never does to a committed file) must damage the checkpoints that
  share those files: the deletion check can fail;
- concurrent savers: K spawned processes save each round's checkpoint on one root at
  the same moment (a barrier at ``seal.done``), ``if_exists="keep"`` and ``keep_last=2``,
  a 1 MiB part the same for all (linked from the third round on) and a part that is the
  writer's: one commit per round, no error, the kept checkpoints verify and restore one
  writer's state exactly, nothing left in staging or trash, and saves did link.

Children run as ``python -m gauntlet.incremental kill ROOT POINT MARKER``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

import ckptguard
from ckptguard._protocol.marker import clean_store
from ckptguard._storage.faults import FAULT_POINTS, REUSE_FAULT_POINTS, set_fault_hook
from ckptguard._storage.objectstore import FsspecStorage
from ckptguard.testing import Fault, FaultyStorage, PowerCut, flip_bit
from gauntlet import Row
from gauntlet.concurrency import _run as run_processes
from s3_servers import S3Server, start_moto

if TYPE_CHECKING:
    from multiprocessing.synchronize import Barrier

SCENARIO = "incremental"
TESTS = Path(__file__).resolve().parents[1]
FROZEN = "model.frozen.safetensors"
AFTER_RENAME = {"commit.renamed", "publish.root_synced", "publish.done"}
# The points an incremental manager save of a new name passes.
POINTS = [
    p for p in (*FAULT_POINTS, *REUSE_FAULT_POINTS)
    if p not in {"commit.moved_to_trash", "commit.quarantined"}
]  # fmt: skip


def _model(step: int) -> torch.nn.Module:
    """A frozen embedding and backbone (the same every step), a head that depends on step."""
    torch.manual_seed(0)
    head = torch.nn.Linear(64, 4)
    frozen = [torch.nn.Embedding(1024, 64), torch.nn.Linear(64, 64)]
    for p in [*frozen[0].parameters(), *frozen[1].parameters()]:
        p.requires_grad_(False)
    with torch.no_grad():
        head.weight.fill_(float(step))
        head.bias.fill_(-float(step))
    return torch.nn.Sequential(*frozen, head)


def _state(step: int) -> dict[str, Any]:
    return {"model": _model(step), "moment": torch.full((4, 64), float(step)), "step": step}


def _exact(mgr: ckptguard.CheckpointManager, step: int) -> str | None:
    """What is wrong with checkpoint-``step``'s content, or None."""
    model = _model(-1)
    got = mgr.restore(step, {"model": model, "moment": None, "step": None})
    if got["step"] != step or not torch.equal(got["moment"], torch.full((4, 64), float(step))):
        return f"checkpoint-{step} restores the wrong moment or step"
    for (name, a), b in zip(
        _model(step).state_dict().items(), model.state_dict().values(), strict=True
    ):
        if not torch.equal(a, b):
            return f"checkpoint-{step}: {name} differs from what was saved"
    return None


def _manager(root: Path | str, **kwargs: Any) -> ckptguard.CheckpointManager:
    kwargs.setdefault("keep_last", None)
    return ckptguard.CheckpointManager(root, check_environment=False, **kwargs)


def _linked(root: Path, step: int) -> list[str]:
    meta = ckptguard.read_manifest(root / f"checkpoint-{step}").metadata["ckptguard"]
    return list(meta.get("incremental", {}).get("linked_files", []))


def _env() -> dict[str, str]:
    path = [str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


# -- row 1: a kill at every named step ------------------------------------------------------
def _kill_child(root: str, point: str, marker: str) -> None:
    def hook(reached: str) -> None:
        if reached == point:
            Path(marker).write_text(reached)
            os.kill(os.getpid(), signal.SIGKILL)

    mgr = _manager(root)
    set_fault_hook(hook)
    mgr.save(3, _state(3))
    print(f"no kill happened at {point}", file=sys.stderr)
    sys.exit(3)


def _killed_problem(proc: subprocess.CompletedProcess[str], marker: Path, where: str) -> str | None:
    """What is wrong with a child that should have been SIGKILLed at its point."""
    if not marker.exists():
        return f"{where}: never reached (exit {proc.returncode}): {proc.stderr[-300:]}"
    if proc.returncode != -signal.SIGKILL:
        return f"{where}: the child exited with {proc.returncode}, not SIGKILL"
    return None


def _committed_problem(
    mgr: ckptguard.CheckpointManager, expected: list[int], where: str
) -> str | None:
    """What is wrong with the committed checkpoints after a kill (``expected``: steps)."""
    infos = mgr.list(checksums=True)
    if [i.step for i in infos] != expected:
        return f"{where}: checkpoints {[i.step for i in infos]}, expected {expected}"
    for info in infos:
        if not info.valid:
            return f"{where}: checkpoint-{info.step} does not verify: {info.problems}"
        if problem := _exact(mgr, info.step):
            return f"{where}: {problem}"
    return None


def _kill_case(work: Path, point: str) -> str | None:
    root, marker = work / "run", work / "reached"
    with _manager(root) as mgr:
        for step in (1, 2):
            mgr.save(step, _state(step))
    cmd = [sys.executable, "-m", "gauntlet.incremental", "kill", str(root), point, str(marker)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=120, check=False)
    where = f"killed at {point}"
    if problem := _killed_problem(proc, marker, where):
        return problem
    expected = [1, 2, 3] if point in AFTER_RENAME else [1, 2]
    with _manager(root) as mgr:
        if problem := _committed_problem(mgr, expected, where):
            return problem
        latest = mgr.latest()
        if latest is None or latest.step != expected[-1]:
            return f"{where}: latest() is {latest and latest.step}, expected {expected[-1]}"
        mgr.save(4, _state(4))
        if FROZEN not in _linked(root, 4) or not mgr.verify(4).ok:
            return f"{where}: the next save did not link and verify: {_linked(root, 4)}"
    left = [e.path for e in ckptguard.scan(root).entries if "/.ckptguard/" in e.path]
    left = [p for p in left if "/staging/" in p or "/trash/" in p]
    return f"{where}: the next save left {left}" if left else None


def _kill_row(full: bool, work: Path) -> Row:
    points = POINTS if full else ["stage.created", "reuse.linked", "commit.renamed"]
    row = Row(
        SCENARIO,
        "SIGKILL at every named step of an incremental save (reuse.linked included): "
        "committed checkpoints lost or corrupt = 0; each restores exactly; the next save "
        "links and verifies",
    )
    for n, point in enumerate(points):
        case = work / "kills" / f"{n:02d}-{point}"
        case.mkdir(parents=True)
        try:
            row.trial(_kill_case(case, point))
        except Exception as exc:  # a check that raises fails too
            row.trial(f"killed at {point}: {type(exc).__name__}: {exc}")
    row.figures = {"points": len(points)}
    return row


# -- row 1b: a kill at every step of an incremental save on an object store (moto) ----------
REMOTE_POINTS = ["reuse.linked", "remote.data_uploaded", "remote.manifest_written"]


def _kill_remote_child(url: str, options: str, point: str, marker: str) -> None:
    def hook(reached: str) -> None:
        if reached == point:
            Path(marker).write_text(reached)
            os.kill(os.getpid(), signal.SIGKILL)

    mgr = _manager(url, storage_options=json.loads(options))
    set_fault_hook(hook)
    mgr.save(3, _state(3))
    print(f"no kill happened at {point}", file=sys.stderr)
    sys.exit(3)


def _kill_remote_case(server: S3Server, work: Path, point: str) -> str | None:
    url, options, marker = server.url(f"kill-{point}"), server.storage_options, work / "reached"
    with _manager(url, storage_options=options) as mgr:
        for step in (1, 2):
            mgr.save(step, _state(step))
    cmd = [sys.executable, "-m", "gauntlet.incremental", "kill-remote", url,
           json.dumps(options), point, str(marker)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=120, check=False)
    where = f"killed at {point} (s3)"
    if problem := _killed_problem(proc, marker, where):
        return problem
    expected = [1, 2, 3] if point == "remote.manifest_written" else [1, 2]
    with _manager(url, storage_options=options, stale_after=0) as mgr:  # cleans up at start
        if problem := _committed_problem(mgr, expected, where):
            return problem
        if left := clean_store(FsspecStorage(url, options), url, grace=0, dry_run=True):
            return f"{where}: orphans after a start with stale_after=0: {left}"
        mgr.save(4, _state(4))
        manifest = ckptguard.read_manifest(f"{url}/checkpoint-4", storage_options=options)
        if FROZEN not in manifest.metadata["ckptguard"]["incremental"]["linked_files"]:
            return f"{where}: the next save did not copy {FROZEN} on the server"
        if not mgr.verify(4).ok:
            return f"{where}: the next save does not verify"
    return None


def _kill_remote_row(full: bool, work: Path) -> Row:
    row = Row(
        SCENARIO,
        "SIGKILL at each step of an incremental save on an object store (moto; reuse.linked "
        "is a server-side copy): committed checkpoints lost or corrupt = 0; no orphans "
        "after a clean-up start; the next save copies and verifies",
    )
    points = REMOTE_POINTS if full else ["reuse.linked", "remote.manifest_written"]
    (work / "moto").mkdir(parents=True, exist_ok=True)
    server = start_moto(work / "moto")
    try:
        for point in points:
            case = work / "kills-s3" / point
            case.mkdir(parents=True)
            try:
                row.trial(_kill_remote_case(server, case, point))
            except Exception as exc:
                row.trial(f"killed at {point} (s3): {type(exc).__name__}: {exc}")
    finally:
        server.stop()
    row.figures = {"points": len(points)}
    return row


# -- row 2: a power cut at every storage operation -------------------------------------------
def _staging_dir(path: str) -> bool:
    """The control's skipped fsyncs: those of staging directories (the names inside)."""
    return os.path.isdir(path) and "/.ckptguard/staging/" in path


def _power_case(work: Path, at: int | None, *, control: bool = False) -> tuple[str | None, int]:
    """Cut the power at the ``at``-th operation of the third save (None: count them).

    ``control``: the staging directories' fsyncs are skipped, and the power is lost right
    after the third save returned: its names (the link's too) must be lost.
    """
    root = work / "run"
    storage = FaultyStorage(track=root, ignore_fsync=_staging_dir if control else False)
    with _manager(root, storage=storage) as mgr:
        for step in (1, 2):
            mgr.save(step, _state(step))
    before = storage.calls
    if at is not None:
        storage.add(Fault.power_cut(at=before + at))
    returned = [1, 2]
    mgr = _manager(root, storage=storage)
    try:
        mgr.save(3, _state(3))
        returned.append(3)
        mgr.close()
    except PowerCut:
        pass
    ops = storage.calls - before
    if at is None and not control:
        return None, ops
    storage.power_loss()
    where = f"power cut at operation {at} of the linking save"
    with _manager(root) as after:
        valid = {i.step for i in after.list(checksums=True) if i.valid}
        if not set(returned) <= valid:
            return f"{where}: saves {returned} returned, valid now {sorted(valid)}", ops
        for step in sorted(valid):
            if problem := _exact(after, step):
                return f"{where}: {problem}", ops
        after.save(5, _state(5))
        if not after.verify(5).ok:
            return f"{where}: the next save does not verify", ops
    return None, ops


def _power_row(full: bool, work: Path) -> Row:
    row = Row(
        SCENARIO,
        "power cut at every storage operation of an incremental save (a link is a name "
        "that needs its directory's fsync): checkpoints whose save returned lost = 0",
    )
    (work / "count").mkdir(parents=True)
    _, ops = _power_case(work / "count", None)
    cuts = range(1, ops + 1) if full else range(1, ops + 1, max(1, ops // 4))
    for at in cuts:
        case = work / "power" / f"{at:03d}"
        case.mkdir(parents=True)
        try:
            row.trial(_power_case(case, at)[0])
        except Exception as exc:
            row.trial(f"power cut at {at}: {type(exc).__name__}: {exc}")
    row.figures = {"operations": ops, "cuts": len(cuts)}
    return row


def _power_control_row(work: Path) -> Row:
    row = Row(
        SCENARIO,
        "control: the same with the staging directories' fsyncs skipped must lose a save "
        "that returned (its names, the link's among them)",
        control=True,
    )
    case = work / "power-control"
    case.mkdir(parents=True)
    try:
        row.trial(_power_case(case, None, control=True)[0])
    except Exception as exc:
        row.trial(f"control: {type(exc).__name__}: {exc}")
    return row


# -- row 3 and its control: deleting the checkpoints others link to --------------------------
def _remove(path: Path, *, in_place: bool) -> None:
    """``rm -rf``; the control first truncates each file (an in-place overwrite)."""
    if in_place:
        for f in path.iterdir():
            with f.open("r+b") as handle:
                handle.truncate(0)
    shutil.rmtree(path)


def _deletion_case(work: Path, order: int, *, in_place: bool) -> str | None:
    root = work / "run"
    with _manager(root, keep_last=1) as mgr:  # each save retires the one it linked from
        for step in range(1, 5):
            mgr.save(step, _state(step))
            if FROZEN not in _linked(root, step) and step > 1:
                return f"save {step} linked nothing: {_linked(root, step)}"
    with _manager(root) as mgr:
        for step in (5, 6, 7):
            mgr.save(step, _state(step))
        kept = [4, 5, 6, 7]
        doomed = [kept[order % 4], kept[(order + 1) % 4]]
        _remove(root / f"checkpoint-{doomed[0]}", in_place=in_place)
        if in_place:
            _remove(root / f"checkpoint-{doomed[1]}", in_place=True)
        else:
            mgr.delete(doomed[1], force=True)
        for step in sorted(set(kept) - set(doomed)):
            report = mgr.verify(step)
            if not report.ok:
                return f"deleted {doomed}: checkpoint-{step} is damaged: {report.problems}"
            if problem := _exact(mgr, step):
                return f"deleted {doomed}: {problem}"
    return None


def _deletion_rows(full: bool, work: Path) -> list[Row]:
    claim = Row(
        SCENARIO,
        "retention, rm -rf and delete of the checkpoints others link to: kept checkpoints "
        "damaged = 0",
    )
    control = Row(
        SCENARIO,
        "control: the same deletions made by overwriting each file in place first (what "
        "ckptguard never does) must damage some",
        control=True,
    )
    orders = range(4) if full else range(2)
    for row in (claim, control):
        for order in orders:
            case = work / ("control" if row.control else "delete") / str(order)
            case.mkdir(parents=True)
            try:
                row.trial(_deletion_case(case, order, in_place=row.control))
            except Exception as exc:
                row.trial(f"order {order}: {type(exc).__name__}: {exc}")
    return [claim, control]


# -- row 4: a bit flip in a shared file ------------------------------------------------------
def _flip_case(work: Path, victim: int) -> str | None:
    root = work / "run"
    with _manager(root, full_every=3) as mgr:
        for step in range(1, 7):  # chains: 1 full, 2-3 linked to it; 4 full, 5-6 linked
            mgr.save(step, _state(step))
        flip_bit(root / f"checkpoint-{victim}" / FROZEN, seed=victim)
        group = [1, 2, 3] if victim <= 3 else [4, 5, 6]
        for step in group:
            report = mgr.verify(step)
            others = [f"checkpoint-{s}" for s in group if s != step]
            if report.ok or not all(o in " ".join(report.problems) for o in others):
                return f"flip in {victim}: verify({step}) does not name {others}: {report.problems}"
        newest = 3 if victim > 3 else 6
        latest = mgr.latest()
        if latest is None or latest.step != newest:
            return f"flip in {victim}: latest() is {latest and latest.step}, expected {newest}"
        return _exact(mgr, newest)


def _flip_row(full: bool, work: Path) -> Row:
    row = Row(
        SCENARIO,
        "a bit flip in a shared file: every checkpoint sharing it reported; resume falls "
        "back to the newest without it",
    )
    victims = range(1, 7) if full else (2, 6)
    for victim in victims:
        case = work / "flip" / str(victim)
        case.mkdir(parents=True)
        try:
            row.trial(_flip_case(case, victim))
        except Exception as exc:
            row.trial(f"flip in {victim}: {type(exc).__name__}: {exc}")
    return row


# -- row 5: concurrent savers on one root ----------------------------------------------------
BASE = "base.safetensors"


def _saver_state(wid: int, rnd: int) -> dict[str, Any]:
    """A 1 MiB part every writer and round shares (linked), and one that is the writer's."""
    return {
        "base": {"x": np.arange(1 << 17, dtype=np.int64)},
        "w": np.full(2048, 1000 * rnd + wid, dtype=np.int64),
        "wid": wid,
        "round": rnd,
    }


def _saver(wid: int, root: str, rounds: int, barrier: Barrier, out: str) -> None:
    """A spawned process: saves ``checkpoint-<round>`` each round, all commits at once."""
    logging.getLogger("ckptguard").setLevel(logging.ERROR)  # "kept the one there" is expected
    seen: set[str] = set()

    def hook(point: str) -> None:
        seen.add(point)
        if point == "seal.done":
            barrier.wait()  # every peer has linked or written, and sealed: all commit at once

    records: list[dict[str, Any]] = []
    fatal = None
    try:
        mgr = _manager(root, keep_last=2, if_exists="keep")
        set_fault_hook(hook)
        for rnd in range(1, rounds + 1):
            seen.clear()
            record: dict[str, Any] = {"round": rnd, "error": None}
            try:
                record["save_id"] = mgr.save(rnd, _saver_state(wid, rnd), blocking=True).save_id
            except Exception as exc:
                if "seal.done" not in seen:
                    barrier.wait()  # keep the peers in step; the error is reported
                record["error"] = f"{type(exc).__name__}: {exc}"
            record["renamed"] = "commit.renamed" in seen
            record["linked"] = "reuse.linked" in seen
            records.append(record)
    except BaseException as exc:
        fatal = "".join(traceback.format_exception(exc))
        raise
    finally:
        Path(out).write_text(json.dumps({"records": records, "fatal": fatal}))


def _concurrent_case(work: Path, k: int, rounds: int) -> tuple[str | None, int]:
    """(what went wrong, how many saves linked the shared file)."""
    root = work / "run"
    reports, problem = run_processes(_saver, k, str(root), rounds, work / "reports")
    if problem is not None:
        return problem, 0
    records = [r for report in reports for r in report["records"]]
    errors = [r["error"] for r in records if r["error"]]
    if errors:
        return f"K={k}: {len(errors)} saves failed: {errors[:2]}", 0
    for rnd in range(1, rounds + 1):
        commits = sum(r["renamed"] for r in records if r["round"] == rnd)
        if commits != 1:
            return f"K={k}: round {rnd} was committed {commits} times", 0
    linked = sum(r["linked"] for r in records)
    with _manager(root) as mgr:
        steps = [i.step for i in mgr.list(checksums=True) if i.valid]
        if steps != [rounds - 1, rounds]:
            return f"K={k}: valid checkpoints {steps}, expected the last two rounds", linked
        for step in steps:
            got = mgr.restore(step)
            wid, base = got["wid"], got["base"]["x"]
            if got["round"] != step or not (got["w"] == 1000 * step + wid).all():
                return f"K={k}: checkpoint-{step} mixes writers (wid {wid})", linked
            if not np.array_equal(base, np.arange(1 << 17, dtype=np.int64)):
                return f"K={k}: checkpoint-{step}'s shared part differs", linked
    left = [e.path for e in ckptguard.scan(root).entries if "/.ckptguard/" in e.path]
    left = [p for p in left if "/staging/" in p or "/trash/" in p]
    if left:
        return f"K={k}: left behind {left}", linked
    return (f"K={k}: no save linked the shared file" if linked == 0 else None), linked


def _concurrent_row(full: bool, work: Path) -> Row:
    row = Row(
        SCENARIO,
        "K processes save each round's checkpoint on one root at once, incremental, with "
        "keep_last=2 retiring what the next round links from: one commit per round, kept "
        "checkpoints whole and one writer's, nothing left over",
    )
    linked = {}
    for k, rounds in ((2, 8), (4, 8)) if full else ((4, 6),):
        case = work / "concurrent" / f"k{k}"
        case.mkdir(parents=True)
        try:
            problem, linked[f"K={k}"] = _concurrent_case(case, k, rounds)
            row.trial(problem)
        except Exception as exc:
            row.trial(f"K={k}: {type(exc).__name__}: {exc}")
    row.figures = {"saves that linked the shared file": linked}
    return row


def run(full: bool, work: Path) -> list[Row]:
    """The rows (see the module docstring)."""
    return [
        _kill_row(full, work),
        _kill_remote_row(full, work),
        _power_row(full, work),
        _power_control_row(work),
        *_deletion_rows(full, work),
        _flip_row(full, work),
        _concurrent_row(full, work),
    ]


if __name__ == "__main__":  # the child: kill ROOT POINT MARKER, kill-remote URL OPTIONS ...
    if sys.argv[1] == "kill":
        _kill_child(sys.argv[2], sys.argv[3], sys.argv[4])
    elif sys.argv[1] == "kill-remote":
        _kill_remote_child(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5])
