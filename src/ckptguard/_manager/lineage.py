"""Runs: which checkpoints of a root belong to this training run.

Every checkpoint a manager saves carries its run id (``metadata["ckptguard"]["run"]``).
A run's id is kept across resumes: a manager adopts the run of the newest checkpoint of
its root, so a resumed run continues the lineage it resumed from. Retention never deletes
another run's checkpoints, and ``latest()``/``restore()`` never return another run's state.

Two jobs on one root (a restarted experiment beside the old one still running, two sweeps
pointed at one folder) are told apart by a live run's holder files: each process of a run
holds ``ROOT/.ckptguard/runs/<run>/<host>-<pid>`` with an flock while its manager is open,
and records its process group there. The choice, when a manager starts:

- ``run_id=`` (or ``CKPTGUARD_RUN_ID``): that run, new or resumed, whatever else is there;
- the newest checkpoint's run is held by a live process of another process group (another
  job): refused with :class:`ForeignRun`, which names that run and the ways forward (stop
  it and resume it, another root, or ``new_lineage=True`` to start a run beside it);
- ``new_lineage=True``: a new run, beside whatever is there;
- otherwise the newest checkpoint's run (resume), or a new run on an empty root.

Checkpoints written before run ids (none recorded) belong to the run that adopts them.
Partial: processes of one job are recognised by their process group (torchrun's workers,
multiprocessing children and a shell job share it; every rank but 0 follows rank 0's
choice); on object stores, which have no locks, a live run cannot be seen and the newest
run is adopted.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import secrets
import socket
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ckptguard._errors import CheckpointError, ForeignRun
from ckptguard._format.layout import META_DIR, RUNS_DIR
from ckptguard._format.manifest import run_of

if TYPE_CHECKING:
    from ckptguard._format.manifest import Manifest
    from ckptguard._manager.catalog import Catalog
    from ckptguard._protocol.backend import Backend

__all__ = [
    "RUN_ENV",
    "Lineage",
    "RunHold",
    "choose_run",
    "foreign_holders",
    "new_run_id",
    "reading_run",
]

_log = logging.getLogger("ckptguard.manager")
RUN_ENV = "CKPTGUARD_RUN_ID"


def new_run_id() -> str:
    """A fresh run id: short, unique."""
    return f"run-{secrets.token_hex(6)}"


@dataclass(frozen=True)
class Lineage:
    """This manager's run, and whether it also owns checkpoints without a run id."""

    run: str
    legacy: bool = False

    def owns(self, manifest: Manifest | None) -> bool:
        return self.owns_run(run_of(manifest))

    def owns_run(self, run: str | None) -> bool:
        return run == self.run or (run is None and self.legacy)


def choose_run(
    backend: Backend, catalog: Catalog, *, run_id: str | None, new_lineage: bool
) -> Lineage:
    """Decide this manager's run (see the module docstring); the coordinator's rank 0.

    Checkpoints without a run id (written before run ids, or by ``atomic_checkpoint``)
    belong to every run that is not explicitly a new lineage.
    """
    explicit = run_id or os.environ.get(RUN_ENV) or None
    if explicit is not None:
        return Lineage(explicit, legacy=True)
    if new_lineage:
        return Lineage(new_run_id())
    if not backend.remote and (ours := _held_by_this_job(backend)) is not None:
        return Lineage(ours, legacy=True)  # another process of this job chose it already
    newest, name = _newest_run(catalog)
    if newest is None:
        return Lineage(new_run_id(), legacy=True)
    if not backend.remote and (holders := foreign_holders(backend, newest)):
        raise ForeignRun(
            f"{backend.root} holds the checkpoints of run {newest} (newest: {name}), which "
            f"is running now in another job ({', '.join(holders)})",
            path=backend.root,
            hint="stop that job and start again to resume it; or give this run another "
            "root; or pass new_lineage=True to start a new run beside it (each run then "
            "keeps and restores only its own checkpoints)",
        )
    _log.info("resuming run %s (its newest checkpoint: %s)", newest, name)
    return Lineage(newest, legacy=True)


def reading_run(catalog: Catalog, *, run_id: str | None) -> Lineage:
    """A read-only manager's run: the newest (or ``run_id``), never refused, never held.

    Reading a run that is live in another job is safe (an evaluation job beside the
    training): a reader neither deletes nor replaces anything.
    """
    explicit = run_id or os.environ.get(RUN_ENV) or None
    if explicit is not None:
        return Lineage(explicit, legacy=True)
    newest, _name = _newest_run(catalog)
    return Lineage(newest or new_run_id(), legacy=True)


def _newest_run(catalog: Catalog) -> tuple[str | None, str]:
    """(run, name) of the newest valid checkpoint that has a run, of the root or mirror."""
    best: tuple[int, str, str] | None = None
    for source in filter(None, (catalog.backend, catalog.mirror)):
        try:
            committed = catalog.committed(source)
        except (CheckpointError, OSError) as exc:  # an unreachable mirror: the root decides
            _log.warning("choosing the run without %s (%s)", source.root, exc)
            continue
        for step, path in committed:
            if best is not None and step <= best[0]:
                break
            report = catalog.check(path, checksums=False, backend=source)
            run = run_of(report.manifest) if report.ok else None
            if run is not None:
                best = (step, run, path.rstrip("/").rsplit("/", 1)[-1])
                break
    return (None, "") if best is None else (best[1], best[2])


def _held_by_this_job(backend: Backend) -> str | None:
    """A run that a live process of this job (host and process group) holds on the root."""
    base = os.path.join(backend.root, META_DIR, RUNS_DIR)
    try:
        runs = os.listdir(base)
    except OSError:
        return None
    for run in sorted(runs):
        for holder in _live_holders(backend, run):
            if (holder.get("host"), holder.get("pgid")) == _this_job():
                return run
    return None


def _this_job() -> tuple[str, int]:
    return socket.gethostname(), os.getpgid(0)


# -- holder files ---------------------------------------------------------------------------
def _runs_dir(backend: Backend, run: str) -> str:
    return os.path.join(backend.root, META_DIR, RUNS_DIR, run)


def foreign_holders(backend: Backend, run: str) -> list[str]:
    """Live processes of another job (host and process group) that hold ``run``."""
    return [
        f"{h.get('host', '?')} pid {h.get('pid', '?')}"
        for h in _live_holders(backend, run)
        if (h.get("host"), h.get("pgid")) != _this_job()
    ]


def _live_holders(backend: Backend, run: str) -> list[dict[str, Any]]:
    """What each live holder of ``run`` recorded; holder files of dead processes go."""
    found = []
    directory = _runs_dir(backend, run)
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    for name in names:
        if name.endswith(".tmp"):
            continue  # a holder still being written (it is locked before its rename)
        path = os.path.join(directory, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # held: a live process of that run
                found.append(_read_holder(fd))
            else:  # its holder is gone
                with contextlib.suppress(OSError):
                    os.unlink(path)
        finally:
            os.close(fd)
    return found


def _read_holder(fd: int) -> dict[str, Any]:
    with contextlib.suppress(OSError, ValueError):
        data = os.pread(fd, 4096, 0)
        info = json.loads(data)
        if isinstance(info, dict):
            return info
    return {}


# (root, run) -> [fd, path, managers holding it] in this process: one holder file each.
_HELD: dict[tuple[str, str], list[Any]] = {}
_HELD_LOCK = threading.Lock()


class RunHold:
    """This process's hold on its run while its manager is open (see the module docstring).

    The holder file appears under its final name only once locked (written under a temp
    name, then renamed), so a probe never takes a starting holder for a dead one.
    """

    def __init__(self, backend: Backend, run: str) -> None:
        self._key: tuple[str, str] | None = None
        if backend.remote:
            return  # object stores have no locks: a live run cannot be seen there
        key = (backend.root, run)
        with _HELD_LOCK:
            if key in _HELD:
                _HELD[key][2] += 1
                self._key = key
                return
            directory = _runs_dir(backend, run)
            path = os.path.join(directory, f"{socket.gethostname()}-{os.getpid()}")
            tmp = f"{path}.{secrets.token_hex(4)}.tmp"
            try:
                os.makedirs(directory, mode=0o700, exist_ok=True)
                fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                             0o600)  # fmt: skip
                fcntl.flock(fd, fcntl.LOCK_EX)  # our own new file: never contended
                host, pgid = _this_job()
                info = {"host": host, "pid": os.getpid(), "pgid": pgid}
                os.write(fd, json.dumps(info).encode())
                os.rename(tmp, path)
            except OSError as exc:
                if exc.errno not in {errno.EROFS, errno.EACCES, errno.EPERM}:
                    raise
                _log.warning("cannot mark run %s as live in %s (%s)", run, directory, exc)
                return
            _HELD[key] = [fd, path, 1]
            self._key = key

    def release(self) -> None:
        key, self._key = self._key, None
        if key is None:
            return
        with _HELD_LOCK:
            held = _HELD.get(key)
            if held is None:
                return
            held[2] -= 1
            if held[2] > 0:
                return
            del _HELD[key]
            with contextlib.suppress(OSError):
                os.unlink(held[1])
            os.close(held[0])


def choose_and_hold(
    backend: Backend,
    catalog: Catalog,
    *,
    run_id: str | None,
    new_lineage: bool,
    lock_timeout: float,
) -> tuple[Lineage, RunHold]:
    """:func:`choose_run`, then hold the run, in one step under the root's lock.

    Processes of one job that start at once (independent savers sharing a root) then
    agree: the second sees the first one's hold. A root whose lock cannot be taken (a
    read-only mount) is read without it.
    """
    with contextlib.ExitStack() as stack:
        if not backend.remote:
            try:
                os.makedirs(os.path.join(backend.root, META_DIR), mode=0o700, exist_ok=True)
                stack.enter_context(backend.lock(lock_timeout))
            except OSError as exc:  # StorageError included: EROFS, EACCES
                _log.debug("choosing the run of %s without its lock (%s)", backend.root, exc)
        lineage = choose_run(backend, catalog, run_id=run_id, new_lineage=new_lineage)
        return lineage, RunHold(backend, lineage.run)
    raise AssertionError("unreachable")  # pragma: no cover - mypy: ExitStack may swallow
