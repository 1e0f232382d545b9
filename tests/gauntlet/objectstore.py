"""The gauntlet on object stores: the manifest-marker commit under faults, kills and damage.

Every save here goes to an object-store root (fsspec's ``memory://``, or moto's standalone
S3 server from ``tests/s3_servers.py`` where a root must outlive a process), through
``FaultyStorage(FsspecStorage(url))`` where faults are injected. "Orphans" are objects that
no manifest refers to: ``clean_store(storage, root, grace=0, dry_run=True)`` must find none
once a manager started with ``stale_after=0`` (its startup clean-up).

Rows:
- transient EBUSY/ESTALE/EAGAIN at p = 0.01, 0.02, 0.05 on every storage operation
  (memory://): 100% of saves succeed and restore exactly, a pinned earlier checkpoint
  keeps restoring, no orphans are left by the aborted attempts;
- persistent EIO on each operation a save makes (enumerated from ``FaultyStorage.log``:
  from the first and the last call of each operation on each kind of object; full: from
  each call on): the save raises a typed StorageError or returns with its checkpoint
  restorable; every listed checkpoint verifies and restores exactly (the previous one
  included); no orphans after the next start;
- SIGKILL at the remote protocol steps (``remote.uploading`` mid multipart upload,
  ``remote.data_uploaded``, ``remote.manifest_written``; the nth occurrence in a child's
  save sequence, which holds a 17 MiB multipart save, new names and a replace): the root
  lists only the checkpoints committed (each verifies and restores exactly), resume takes
  the newest committed state, a start with ``stale_after=0`` leaves no orphans, the next
  save works, and no incomplete multipart upload is left (the clean-up start aborts the
  ones that kills mid-upload leave: not objects, no object listing shows them, yet billed).
  Sample: two kills; full: every remote step at several occurrences;
- corruption: a bit flip, truncation, append or deletion of an object of the newest
  checkpoint (manifest included), rewritten through the fsspec filesystem: ``verify``
  reports it, ``restore(step)`` of it raises typed, ``latest()``/``restore()`` fall back to
  the previous checkpoint exactly (memory://, and a few trials on moto);
- controls (must fail): the transient row with retries off; size-only
  ``verify(checksums=False)`` on same-size flips of data objects.

Children run as ``python -m gauntlet.objectstore kill URL OPTIONS POINT NTH``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import random
import signal
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import ckptguard
from ckptguard._errors import CheckpointError, StorageError
from ckptguard._format.layout import MANIFEST_NAME
from ckptguard._protocol.backend import backend_for
from ckptguard._protocol.marker import clean_store
from ckptguard._storage.objectstore import FsspecStorage
from ckptguard._storage.retry import RetryPolicy
from ckptguard.testing import Fault, FaultyStorage, kill_at
from gauntlet import Row, same
from s3_servers import S3Server, start_moto

if TYPE_CHECKING:
    from collections.abc import Callable

SCENARIO = "objectstore"
TESTS = Path(__file__).resolve().parents[1]
TRANSIENT = (errno.EBUSY, errno.ESTALE, errno.EAGAIN)
# Short waits: the faults are injected, not a real server that needs time to recover.
FAST = RetryPolicy(deadline=10.0, initial_wait=0.001, max_wait=0.02)
NO_RETRY = RetryPolicy(deadline=0.0, initial_wait=0.0, max_wait=0.0)
SEED = 4_2025
REMOTE_POINTS = ("remote.uploading", "remote.data_uploaded", "remote.manifest_written")
# The child's saves, (step, version), after the parent's step 1: step 2 is 17 MiB (a
# multipart upload of two 16 MiB-or-less parts), step 3 is then replaced (version 1).
CHILD_SAVES = ((2, 0), (3, 0), (3, 1), (4, 0))
CHILD_KEEP = 2
BIG = (17 << 20) // 4  # float32 elements of step 2's large array
DAMAGE = ("bit_flip", "truncation", "append", "delete")
DAMAGE_WEIGHTS = (5, 2, 1, 2)


def _state(step: int, version: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(1000 * step + version)
    return {
        "w": rng.standard_normal(300).astype(np.float32),
        "opt": {"m": np.full(7, step, dtype=np.int64), "v": version},
        "step": step,
    }


def _kill_state(step: int, version: int = 0) -> dict[str, Any]:
    """The states of the kill row: the child's first save holds a 17 MiB array too."""
    state = _state(step, version)
    if (step, version) == CHILD_SAVES[0]:
        state["big"] = np.arange(BIG, dtype=np.float32) * np.float32(0.5)
    return state


def _memory_root(tag: str) -> str:
    return f"memory://gauntlet-{uuid.uuid4().hex[:10]}/{tag}"


def _manager(
    url: str, options: dict[str, Any] | None = None, **kwargs: Any
) -> ckptguard.CheckpointManager:
    return ckptguard.CheckpointManager(
        url, storage_options=options, check_environment=False, **kwargs
    )


def _orphans(url: str, options: dict[str, Any] | None = None) -> list[str]:
    """What no manifest refers to, whatever its age (nothing is removed)."""
    return clean_store(FsspecStorage(url, options), url, grace=0, dry_run=True)


def _drop(url: str, options: dict[str, Any] | None = None) -> None:
    """Delete everything under ``url`` (memory:// lives as long as this process)."""
    store = FsspecStorage(url, options)
    with contextlib.suppress(FileNotFoundError):
        store.fs.rm(store.key(url), recursive=True)


def _listed_problems(
    mgr: ckptguard.CheckpointManager,
    want: dict[int, int],
    state_of: Callable[[int, int], dict[str, Any]] = _state,
) -> list[str]:
    """Problems of the root's listing: exactly the steps of ``want`` (step -> version),
    each valid with checksums and restoring to ``state_of(step, version)``; the newest is
    what latest() and restore() take."""
    problems = []
    infos = mgr.list(checksums=True)
    steps = [i.step for i in infos]
    if sorted(steps) != sorted(want):
        problems.append(f"listed {steps}, expected {sorted(want)}")
    for info in infos:
        if not info.valid:
            problems.append(f"checkpoint-{info.step} does not verify: {info.problems}")
        elif info.step in want and not same(
            mgr.restore(info.step), state_of(info.step, want[info.step])
        ):
            problems.append(f"checkpoint-{info.step} does not restore exactly")
    if want:
        newest = max(want)
        latest = mgr.latest()
        if latest is None or latest.step != newest:
            problems.append(f"latest() is {latest and latest.step}, expected {newest}")
        elif not same(mgr.restore(), state_of(newest, want[newest])):
            problems.append(f"restore() does not give checkpoint-{newest} exactly")
    return problems


# -- row 1: transient errors ------------------------------------------------------------------
def _flaky_saves(
    row: Row, p: float, saves: int, *, policy: RetryPolicy, must_succeed: bool
) -> None:
    """``saves`` saves at fault probability ``p`` on memory://; each one is a trial."""
    url = _memory_root(f"flaky-{p}")
    first = _manager(url, keep_last=3)
    first.save(0, _state(0))  # a good checkpoint to keep intact (pinned: never retired)
    first.pin(0)
    first.close()
    ok = 0
    orphans: set[str] = set()
    storage = FaultyStorage(FsspecStorage(url, retry=policy), seed=int(p * 1000), record=False)
    mgr = _manager(url, keep_last=3, storage=storage, retry=policy)
    for step in range(1, saves + 1):
        problem = None
        storage.add(Fault.flaky(TRANSIENT, p))  # faults during the save only
        try:
            mgr.save(step, _state(step))
            ok += 1
        except StorageError as exc:
            if must_succeed:
                problem = f"p={p}: save {step} failed: {type(exc).__name__}: {exc}"
        except Exception as exc:
            problem = f"p={p}: save {step} raised {type(exc).__name__} (untyped): {exc}"
        finally:
            storage.clear()
        try:
            listed = {i.step for i in mgr.list()}
            if problem is None and step in listed and not same(mgr.restore(step), _state(step)):
                problem = f"p={p}: checkpoint-{step} does not restore to what was saved"
            if problem is None and not same(mgr.restore(0), _state(0)):
                problem = f"p={p}: the pinned checkpoint-0 no longer restores"
            left = set(_orphans(url)) - orphans  # each counted once, by the save that left it
            orphans |= left
            if problem is None and left:
                problem = f"p={p}: orphans left after save {step}: {sorted(left)}"
        except Exception as exc:  # a check that raises fails the trial too
            problem = problem or f"p={p}: checking save {step}: {type(exc).__name__}: {exc}"
        row.trial(problem)
    mgr.close()
    row.figures[f"ok_at_p{p}"] = f"{100 * ok / saves:.0f}%"
    row.figures[f"faults_at_p{p}"] = len(storage.fired)
    row.figures[f"orphans_at_p{p}"] = len(orphans)
    _drop(url)


# -- row 2: persistent EIO on each operation of a save ---------------------------------------
def _kind_of(url: str, path: str) -> str:
    """Which object an operation touches: the manifest, a data object, a pin, a prefix."""
    rel = path.removeprefix(url + "/")
    if "/.ckptguard/" in f"/{rel}":
        return "pin"
    if rel.endswith("/" + MANIFEST_NAME):
        return "manifest"
    return "data" if rel.count("/") >= 2 else "prefix"


def _setup_two(url: str) -> None:
    good = _manager(url, keep_last=2)
    good.save(0, _state(0))
    good.save(1, _state(1))
    good.close()


def _save_calls() -> list[tuple[str, str, int]]:
    """The calls a save makes (it also retires checkpoint-0): (op, kind of object, k-th of
    that op), in order."""
    url = _memory_root("ops")
    _setup_two(url)
    storage = FaultyStorage(FsspecStorage(url, retry=FAST))
    mgr = _manager(url, keep_last=2, storage=storage, retry=FAST)
    start = storage.calls
    mgr.save(2, _state(2))
    mgr.close()
    counts: dict[str, int] = {}
    calls = []
    for op, path in storage.log[start:]:
        counts[op] = counts.get(op, 0) + 1
        calls.append((op, _kind_of(url, path), counts[op]))
    _drop(url)
    return calls


def _persistent_trial(op: str, at: int, name: str) -> tuple[str | None, str]:
    """EIO on ``op`` from its ``at``-th call of save 2 on; (problem, outcome)."""
    url = _memory_root(f"eio-{op}-{at}")
    _setup_two(url)
    storage = FaultyStorage(FsspecStorage(url, retry=FAST), record=False)
    mgr = _manager(url, keep_last=2, storage=storage, retry=FAST)
    storage.add(Fault.fail(op, errno.EIO, at=at, times=None))
    outcome = "returned"
    problems: list[str] = []
    try:
        mgr.save(2, _state(2))
    except StorageError:
        outcome = "raised"
    except Exception as exc:
        outcome = "untyped"
        problems.append(f"raised {type(exc).__name__}, not a StorageError: {exc}")
    finally:
        storage.clear()
        mgr.close()
    if not storage.fired:
        _drop(url)
        return None, "not reached"
    try:
        after = _manager(url, keep_last=None, stale_after=0)  # startup clean-up
        committed = 2 in {i.step for i in after.list()}
        if outcome == "returned" and not committed:
            problems.append("the save returned but checkpoint-2 is not listed")
        if outcome != "returned" and committed:
            outcome += " after its commit"
        want = {1: 0, 2: 0} if committed else {1: 0}
        if 0 in {i.step for i in after.list()}:
            want[0] = 0  # retention did not get to it: it must still be exact
        problems += _listed_problems(after, want)
        if left := _orphans(url):
            problems.append(f"orphans left after the next start: {left}")
        after.close()
    except Exception as exc:  # a check that raises fails the trial too
        problems.append(f"{type(exc).__name__}: {exc}")
    _drop(url)
    return (f"{name} ({outcome}): {'; '.join(problems)}" if problems else None), outcome


def _persistent_row(full: bool) -> Row:
    row = Row(
        SCENARIO,
        "persistent EIO on each operation a save makes (memory://): typed StorageError (or "
        "the save returned, committed); every listed checkpoint verifies and restores "
        "exactly; no orphans after the next start",
    )
    calls = _save_calls()
    if full:  # every call: EIO from there on
        cases = calls
    else:  # the first and the last call of each operation on each kind of object
        first = {(op, kind): (op, kind, k) for op, kind, k in reversed(calls)}
        last = {(op, kind): (op, kind, k) for op, kind, k in calls}
        cases = sorted(set(first.values()) | set(last.values()), key=calls.index)
    outcomes: dict[str, int] = {}
    for op, kind, at in cases:
        problem, outcome = _persistent_trial(op, at, f"EIO on {op} #{at} ({kind})")
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        if outcome != "not reached":
            row.trial(problem)
    ops = sorted({op for op, _, _ in calls})
    row.figures = {"operations": len(ops), "ops": "/".join(ops), "calls": len(calls)}
    row.figures.update({k.replace(" ", "_"): v for k, v in sorted(outcomes.items())})
    return row


# -- row 3: SIGKILL at each remote protocol step (moto) --------------------------------------
def _env() -> dict[str, str]:
    path = [str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path), "OMP_NUM_THREADS": "1"}


def _kill_child(url: str, options: str, point: str, nth: int) -> None:
    """Save CHILD_SAVES (keep 2), SIGKILLed the ``nth`` time the save reaches ``point``."""
    mgr = _manager(url, json.loads(options), keep_last=CHILD_KEEP)
    with kill_at(point, nth=nth):
        for i, (step, version) in enumerate(CHILD_SAVES):
            print(f"saving {i}", flush=True)
            mgr.save(step, _kill_state(step, version))
            print(f"committed {i}", flush=True)
    print(f"no kill happened at {point} #{nth}", file=sys.stderr)
    sys.exit(3)


@dataclass
class _KillStats:
    orphans_seen: int = 0  # kills after which clean_store found uploads without a manifest
    multipart_open: int = 0  # incomplete multipart uploads left after the clean-up start


def _expected(done: int, killed: int, point: str) -> dict[int, int]:
    """Steps (-> version) listed after saves [0, done) committed and save ``killed`` killed."""
    versions = {1: 0}
    for step, version in CHILD_SAVES[:done]:
        versions[step] = version
        versions = {s: versions[s] for s in sorted(versions)[-CHILD_KEEP:]}  # retention
    if point == "remote.manifest_written":  # committed; retention had not run yet
        step, version = CHILD_SAVES[killed]
        versions[step] = version
    return versions


def _open_uploads(server: S3Server, prefix: str) -> int:
    found = server.client().list_multipart_uploads(Bucket=server.bucket, Prefix=prefix)
    return len(found.get("Uploads", []))


def _kill_case(server: S3Server, point: str, nth: int, st: _KillStats) -> str | None:
    prefix = f"kill-{point.split('.')[1]}-{nth}-{uuid.uuid4().hex[:6]}"
    url, options = server.url(prefix), server.storage_options
    where = f"killed at {point} #{nth}"
    setup = _manager(url, options, keep_last=CHILD_KEEP)
    setup.save(1, _state(1))
    setup.close()
    args = ["-m", "gauntlet.objectstore", "kill", url, json.dumps(options), point, str(nth)]
    proc = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=_env(), timeout=180,
        check=False,
    )  # fmt: skip
    if proc.returncode != -signal.SIGKILL:
        return f"{where}: the child exited with {proc.returncode}: {proc.stderr[-400:]}"
    lines = proc.stdout.split()
    saving = [int(n) for w, n in zip(lines[::2], lines[1::2], strict=False) if w == "saving"]
    done = [int(n) for w, n in zip(lines[::2], lines[1::2], strict=False) if w == "committed"]
    if not saving or done != list(range(len(saving) - 1)):
        return f"{where}: the child printed {proc.stdout!r}"
    killed = saving[-1]
    where += f" (save {killed}: checkpoint-{CHILD_SAVES[killed][0]} v{CHILD_SAVES[killed][1]})"
    want = _expected(len(done), killed, point)
    problems = []
    # Before any repair: the listing holds exactly the committed checkpoints, each valid.
    names = backend_for(url, options).names()
    if names != sorted(f"checkpoint-{s}" for s in want):
        problems.append(f"visible {names}, expected steps {sorted(want)}")
    problems += [
        f"{name} is visible and does not verify"
        for name in names
        if not ckptguard.verify(f"{url}/{name}", storage_options=options).ok
    ]
    if _orphans(url, options):
        st.orphans_seen += 1
    # Resume as the next job would (default stale_after: young uploads are left alone).
    resume = _manager(url, options, keep_last=CHILD_KEEP)
    problems += _listed_problems(resume, want, _kill_state)
    # A start that takes every upload as stale: nothing without a manifest is left.
    clean = _manager(url, options, keep_last=CHILD_KEEP, stale_after=0)
    if left := _orphans(url, options):
        problems.append(f"orphans after a start with stale_after=0: {left}")
    if opened := _open_uploads(server, prefix):  # not objects: clean_store aborts them
        st.multipart_open += opened
        problems.append(f"{opened} incomplete multipart uploads left after the clean-up start")
    # The next save works and is exact; still nothing orphaned.
    step = max(want) + 1
    clean.save(step, _state(step))
    latest = clean.latest()
    if latest is None or latest.step != step or not same(clean.restore(), _state(step)):
        problems.append(f"the next save (step {step}) is not what latest()/restore() give")
    if left := _orphans(url, options):
        problems.append(f"orphans after the next save: {left}")
    _drop(url, options)
    return f"{where}: {'; '.join(problems)}" if problems else None


def _kill_row(server: S3Server, full: bool) -> Row:
    row = Row(
        SCENARIO,
        "SIGKILL at each remote protocol step (moto S3; mid multipart upload, data uploaded, "
        "manifest written; new names and a replace): only committed checkpoints listed, each "
        "verifies and restores exactly; resume takes the newest committed; a start with "
        "stale_after=0 leaves no orphans; the next save works",
    )
    if full:
        occurrences = {
            "remote.uploading": (1, 2, 3, 4, 6),
            "remote.data_uploaded": (1, 2, 3, 4),
            "remote.manifest_written": (1, 2, 3, 4),
        }
        kills = [(point, nth) for point, nths in occurrences.items() for nth in nths]
    else:  # mid multipart upload of the 17 MiB save; the commit of the replace
        kills = [("remote.uploading", 2), ("remote.manifest_written", 3)]
    st = _KillStats()
    for point, nth in kills:
        try:
            row.trial(_kill_case(server, point, nth, st))
        except Exception as exc:  # a check that raises fails the trial too
            row.trial(f"killed at {point} #{nth}: {type(exc).__name__}: {exc}")
    row.figures = {
        "kills": len(kills),
        "points": len({p for p, _ in kills}),
        "kills_leaving_uploads_without_manifest": st.orphans_seen,
        "incomplete_multipart_uploads_left": st.multipart_open,
    }
    return row


# -- row 4: corruption of committed objects ---------------------------------------------------
def _damage(data: bytes, kind: str, rng: random.Random) -> tuple[bytes | None, str]:
    """``data`` damaged (None: the object deleted), and what was done."""
    if kind == "delete":
        return None, "deleted"
    if kind == "truncation":
        n = rng.randrange(len(data))
        return data[:n], f"truncated to {n} of {len(data)} bytes"
    if kind == "append":
        extra = rng.randbytes(rng.randint(1, 16))
        return data + extra, f"{len(extra)} bytes appended"
    out = bytearray(data)
    pos, bit = rng.randrange(len(data)), rng.randrange(8)
    out[pos] ^= 1 << bit
    return bytes(out), f"bit {bit} of byte {pos} flipped"


def _corrupt_trials(
    row: Row,
    control: Row,
    url: str,
    options: dict[str, Any] | None,
    *,
    trials: int,
    controls: int,
    seed: int,
) -> dict[str, int]:
    """Damage objects of checkpoint-3 of a root holding checkpoints 1, 2, 3."""
    mgr = _manager(url, options, keep_last=None)
    for step in (1, 2, 3):
        mgr.save(step, _state(step))
    store = FsspecStorage(url, options)
    newest = f"{url}/checkpoint-3"
    objects = {key: bytes(store.fs.cat_file(key)) for key in sorted(store.find(newest))}
    data_keys = [k for k in objects if not k.endswith("/" + MANIFEST_NAME)]
    rng = random.Random(seed)  # noqa: S311 - reproducible damage, not secrets
    counts = dict.fromkeys(DAMAGE, 0)
    for i in range(trials + controls):
        is_control = i >= trials
        key = rng.choice(data_keys if is_control else sorted(objects))
        kind = "bit_flip" if is_control else rng.choices(DAMAGE, DAMAGE_WEIGHTS)[0]
        damaged, what = _damage(objects[key], kind, rng)
        what = f"{key.rsplit('/', 1)[-1]}: {what}"
        if damaged is None:
            store.fs.rm_file(key)
        else:
            store.fs.pipe_file(key, damaged)
        try:
            if is_control:
                missed = ckptguard.verify(newest, checksums=False, storage_options=options).ok
                control.trial(f"{what}: size-only verify said ok" if missed else None)
                continue
            counts[kind] += 1
            row.trial(_corrupt_problem(url, options, newest, what))
        finally:
            store.fs.pipe_file(key, objects[key])
    if not ckptguard.verify(newest, storage_options=options).ok:
        row.fail(f"{newest} does not verify after the trials: originals not put back")
    _drop(url, options)
    return counts


def _corrupt_problem(
    url: str, options: dict[str, Any] | None, newest: str, what: str
) -> str | None:
    try:
        report = ckptguard.verify(newest, storage_options=options)
        if report.ok:
            return f"{what}: verify() said ok"
    except CheckpointError:
        pass  # reported, typed (the checkpoint is gone: its manifest was deleted)
    try:
        mgr = _manager(url, options, keep_last=None)
        latest = mgr.latest()
        if latest is None or latest.step != 2:
            return f"{what}: latest() is {latest and latest.step}, not 2"
        if not same(mgr.restore(), _state(2)):
            return f"{what}: restore() does not give checkpoint-2 exactly"
        try:
            mgr.restore(3)
        except CheckpointError:
            return None
    except Exception as exc:  # any exception is the finding, reported with its type
        return f"{what}: resume raised {type(exc).__name__}: {exc}"
    return f"{what}: restore(3) returned a state"


def _corruption_rows(server: S3Server, full: bool) -> list[Row]:
    row = Row(
        SCENARIO,
        "a bit flip, truncation, append or deletion of an object of the newest checkpoint "
        "(manifest included; memory:// and moto S3): verify reports it, restore(step) of it "
        "raises typed, latest()/restore() fall back to the previous checkpoint exactly",
    )
    control = Row(
        SCENARIO,
        "control: size-only verify(checksums=False) notices every same-size bit flip of a "
        "data object",
        control=True,
    )
    on_memory = _corrupt_trials(
        row, control, _memory_root("corrupt"), None,
        trials=1000 if full else 60, controls=200 if full else 20, seed=SEED,
    )  # fmt: skip
    before = row.trials
    on_moto = _corrupt_trials(
        row, control, server.url(f"corrupt-{uuid.uuid4().hex[:6]}"), server.storage_options,
        trials=40 if full else 3, controls=8 if full else 1, seed=SEED + 1,
    )  # fmt: skip
    row.figures = {"seed": SEED, "on_memory": before, "on_moto": row.trials - before}
    row.figures.update({f"{k}s": on_memory[k] + on_moto[k] for k in DAMAGE})
    control.figures = {"bit_flips": control.trials, "missed": control.failures}
    return [row, control]


def run(full: bool, work: Path) -> list[Row]:
    """The rows of the object-store scenario (see the module docstring)."""
    logger = logging.getLogger("ckptguard")
    level = logger.level
    logger.setLevel(logging.CRITICAL)  # retries and skipped checkpoints log a warning each
    try:
        saves = 200 if full else 15
        low = Row(
            SCENARIO,
            "transient EBUSY/ESTALE/EAGAIN at p <= 0.05 on every operation (memory://): 100% "
            "of saves succeed and restore exactly; no orphans",
        )
        for p in (0.01, 0.02, 0.05):
            _flaky_saves(low, p, saves, policy=FAST, must_succeed=True)
        control = Row(SCENARIO, low.claim + " (retries off)", control=True)
        _flaky_saves(control, 0.05, saves, policy=NO_RETRY, must_succeed=True)
        persistent = _persistent_row(full)
        server = start_moto(work)
        try:
            kills = _kill_row(server, full)
            corruption = _corruption_rows(server, full)
        finally:
            server.stop()
    finally:
        logger.setLevel(level)
    return [low, persistent, kills, *corruption, control]


if __name__ == "__main__":  # the child: kill URL OPTIONS POINT NTH
    _kill_child(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
