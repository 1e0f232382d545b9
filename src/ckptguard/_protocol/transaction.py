"""The transaction every save goes through, on every backend and with any number of ranks.

::

    with ckptguard.atomic_checkpoint("runs/exp1/checkpoint-100") as staging_dir:
        model.save_pretrained(staging_dir)

Read top to bottom, a save is: ``stage`` (the committer creates the staging; peers
attach to it) → the block writes → ``flush`` (every rank's files become part of the
save) → ``seal`` (files durable, manifest ready) → ``commit`` (the one atomic step, then
publish) — or ``abort`` on any failure before the commit. The storage-specific steps
are the backend's commit strategy: ``rename.py`` (POSIX: a staging dir renamed into
place) and ``marker.py`` (object stores: the manifest, written last, is the commit).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptguard._coordination.base import Coordinator, SingleProcess, default_coordinator
from ckptguard._errors import CheckpointError, SaveAborted, StorageError
from ckptguard._format.layout import new_save_id, validate_name
from ckptguard._format.manifest import Manifest
from ckptguard._format.owner import current_writer
from ckptguard._protocol.backend import backend_for, parent_of
from ckptguard._protocol.cleanup import DEFAULT_STALE_AFTER
from ckptguard._protocol.locking import DEFAULT_LOCK_TIMEOUT
from ckptguard._protocol.rename import ensure_root, typed_write_error
from ckptguard._protocol.strategy import IF_EXISTS, CommitResult, IfExists, Outcome, Staging
from ckptguard._storage.base import FileDigest, is_url
from ckptguard._storage.retry import DEFAULT_RETRY, PERMANENT_ERRNOS, RetryPolicy

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from ckptguard._storage.base import Storage

__all__ = ["AtomicCheckpoint", "atomic_checkpoint"]

_log = logging.getLogger("ckptguard.commit")
_OTHERS_WRITE = 0o022  # group and world write bits


def _staging_removed(exc: BaseException, staging: Staging) -> bool:
    """Whether a write failed because its (local) staging dir was removed under it."""
    return (
        isinstance(exc, FileNotFoundError)
        and not isinstance(exc, CheckpointError)
        and staging.spool is None
        and not os.path.lexists(staging.path)
    )


def _drop_spool(staging: Staging) -> None:
    """Remove this process's local spool (object-store saves); nothing else has one."""
    if staging.spool is not None:
        shutil.rmtree(staging.spool, ignore_errors=True)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class AtomicCheckpoint:
    """Commit whatever the block writes into the yielded staging dir as ``final_path``.

    ::

        with ckptguard.atomic_checkpoint("runs/exp1/checkpoint-100") as staging_dir:
            model.save_pretrained(staging_dir)

    A normal exit seals and commits; an exception removes the staging dir and propagates
    (a permanent OSError such as ENOSPC becomes a typed :class:`StorageError`). If the
    final name already holds a valid checkpoint, ``if_exists`` decides: ``"keep"`` it
    (default; exactly-once: the first committer wins), ``"replace"`` it (moved to trash
    first), or raise :class:`CommitConflict` (``"error"``). Anything else in the way is
    quarantined, never deleted. After the block, ``.result`` tells what happened.

    Permissions: the staging dir is 0700 while it is written. The committed directory
    gets ``dir_mode`` (default: 0o777 minus the umask), and neither it nor anything in it
    stays writable by group or others, unless ``dir_mode`` itself grants that.

    Under torch.distributed every rank enters the block and gets the same staging dir
    (rank 0 creates it); every rank writes its own files; rank 0 alone seals and commits
    after all ranks finished, and all ranks succeed, or all raise :class:`SaveAborted`
    naming the ranks that failed (see ``coordination.py``).
    """

    def __init__(
        self,
        final_path: str | os.PathLike[str],
        *,
        step: int | None = None,
        metrics: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
        if_exists: IfExists = "keep",
        storage: Storage | None = None,
        storage_options: Mapping[str, Any] | None = None,
        retry: RetryPolicy = DEFAULT_RETRY,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
        stale_after: float = DEFAULT_STALE_AFTER,
        dir_mode: int | None = None,
        coordinator: Coordinator | None = None,
        shared_storage: bool | None = None,
        prepare: Callable[[Path], None] | None = None,
    ) -> None:
        if if_exists not in IF_EXISTS:
            raise ValueError(f"if_exists must be one of {IF_EXISTS}, got {if_exists!r}")
        text = os.fspath(final_path)
        # The one resolver: a URL is committed on its store, never as a local folder.
        self.backend = backend_for(
            parent_of(text), storage_options, storage=storage, retry=retry,
            what="atomic_checkpoint",
        )  # fmt: skip
        name = (
            text.rstrip("/").rsplit("/", 1)[-1]
            if is_url(text)
            else os.path.basename(os.path.abspath(text))
        )
        self.root, self.name = self.backend.root, validate_name(name)
        self.final = self.backend.join(self.name)
        self.step, self.metrics, self.metadata = step, metrics, metadata
        self.if_exists: IfExists = if_exists
        self.storage = self.backend.storage
        self.strategy = self.backend.strategy
        self.retry, self.lock_timeout, self.stale_after = retry, lock_timeout, stale_after
        self.dir_mode = dir_mode
        self.coordinator = coordinator
        self.shared_storage = shared_storage  # what the caller believes; the probe decides
        # Run by each committer on the staging dir after every rank's writes succeeded and
        # before the seal (e.g. moving files that a framework wrote into a subdirectory).
        self.prepare = prepare
        self.supersedes: str | None = None  # see commit()
        # What the block will write, if the caller knows it: a StorageFull names it.
        self.expected_bytes: int | None = None
        # With several ranks, an exception in the block normally reaches every rank as
        # SaveAborted. When the block runs a framework's own collectives (the integrations),
        # the other ranks may be waiting inside one of those instead: then the failing rank
        # raises at once, and the launcher (torchrun) ends the job, rather than all of them
        # waiting for a timeout.
        self.fail_fast = False
        self._coord: Coordinator = SingleProcess()
        self._committers: list[int] = [0]
        self._nodes = 1
        self.staging: Staging | None = None
        self.result: CommitResult | None = None
        # Digests of files that were checksummed and fsynced while written (through
        # Storage.open_write): seal trusts them instead of reading those files again. On
        # an object store every rank may add its own: they reach the committer at flush.
        self.known: dict[str, FileDigest] = {}

    # -- 1. stage ----------------------------------------------------------------------------
    def __enter__(self) -> Path:
        self._coord = self.coordinator or default_coordinator()
        if self._coord.world_size == 1:
            self.staging = self.strategy.stage(
                self.backend.layout, self.storage, self.name, retry=self.retry,
                writer=current_writer(),
            )  # fmt: skip
        else:
            self.staging = self._stage_for_all()
        return Path(self.strategy.workdir(self.staging))

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        staging = self.staging
        if staging is None:
            return
        if self._coord.world_size > 1:
            self._finish_for_all(staging, exc)
            return
        if exc is not None:
            typed = (
                typed_write_error(exc, staging, self.expected_bytes)
                if isinstance(exc, OSError)
                and not isinstance(exc, CheckpointError)
                and exc.errno in PERMANENT_ERRNOS
                else None
            )
            if typed is None and _staging_removed(exc, staging):
                typed = StorageError(
                    f"the staging dir {staging.path} of {self.final} was removed while "
                    "this save wrote into it (another process judged it stale); nothing "
                    "was committed",
                    path=staging.path,
                    errno=errno.ENOENT,
                    hint="a cleanup that cannot see this process (another host, `ckptguard "
                    "clean --stale-after` too short) removed it: raise stale_after, and "
                    "save again",
                )
            self.strategy.abort(staging)
            if typed is not None:
                raise typed from exc
            return  # the original exception propagates
        self.result = self._seal_and_commit(staging)

    # -- 2-4. flush, seal, commit: one process ---------------------------------------------
    def _seal_and_commit(self, staging: Staging) -> CommitResult:
        try:
            if self.prepare is not None:
                self.prepare(Path(self.strategy.workdir(staging)))
            self.known.update(self.strategy.flush(staging))
            result = self._commit(staging, self._seal(staging))
        except BaseException:
            self.strategy.abort(staging)  # a no-op once the commit has happened
            raise
        return result

    def _seal(self, staging: Staging) -> Manifest:
        return self.strategy.seal(
            staging,
            known=self.known,
            step=self.step,
            metrics=self.metrics,
            metadata=self.metadata,
            others_may_write=self.dir_mode is not None and bool(self.dir_mode & _OTHERS_WRITE),
        )

    def _commit(self, staging: Staging, manifest: Manifest) -> CommitResult:
        """The atomic step and publish (under the root's lock where there is one)."""
        return self.strategy.commit(
            staging,
            manifest,
            if_exists=self.if_exists,
            dir_mode=self.dir_mode,
            supersedes=self.supersedes,
            lock_timeout=self.lock_timeout,
            stale_after=self.stale_after,
        )

    # -- several ranks -------------------------------------------------------------------------
    # Six collectives per save, whatever the number of files (see coordination.py).
    def _topology(self) -> list[int]:
        """For every rank, the rank that commits for it (probed, not assumed).

        Rank 0 drops a probe file into its root; every rank looks for it in its own root.
        Ranks that see it share rank 0's storage: rank 0 commits for all of them. The
        others (node-local roots) are grouped by node, and each node's lowest rank
        commits for its node.
        """
        coord = self._coord
        if self.strategy.shared:  # an object store: one copy, seen by every rank
            views = coord.all_gather({"node": coord.node})
            self._nodes = len({str(view["node"]) for view in views})
            return [0] * coord.world_size
        layout = self.backend.layout
        message: dict[str, Any] | None = None
        if coord.rank == 0:
            try:
                ensure_root(layout, self.storage, self.retry)
                name = f"probe-{new_save_id()}"
                self.storage.write_bytes(os.path.join(layout.meta, name), b"", fsync=False)
                message = {"probe": name}
            except Exception as exc:  # every rank must hear of it, or the others hang
                message = {"error": _describe(exc)}
        message = coord.broadcast(message)
        if "error" in message:
            raise SaveAborted(
                f"{self.final}: rank 0 could not probe the checkpoint root: {message['error']}",
                path=self.final,
                failures={0: str(message["error"])},
            )
        probe_name = str(message["probe"])
        sees = os.path.lexists(os.path.join(layout.meta, str(probe_name)))
        views = coord.all_gather({"sees": sees, "node": coord.node})
        self._nodes = len({str(view["node"]) for view in views})
        if coord.rank == 0:
            try:
                self.storage.remove_file(os.path.join(layout.meta, str(probe_name)))
            except OSError as exc:  # never leave the others in the next collective alone
                _log.warning("could not remove the probe %s: %s", probe_name, exc)
        committer: list[int] = []
        first_on_node: dict[str, int] = {}
        for rank, view in enumerate(views):
            if view["sees"]:
                committer.append(0)
            else:
                committer.append(first_on_node.setdefault(view["node"], rank))
        shared = all(c == 0 for c in committer)
        if not shared:
            _log.info("checkpoint roots are node-local: one committer per node, ranks %s",
                      sorted(set(committer)))  # fmt: skip
        if self.shared_storage is not None and self.shared_storage != shared and coord.rank == 0:
            # e.g. Hugging Face's save_on_each_node=True on a shared filesystem, or False on
            # node-local disks (where nodes other than rank 0's would get no checkpoint)
            _log.warning(
                "%s: the configuration says the checkpoint root is %s, but the probe found it "
                "%s; ckptguard commits %s",
                self.root,
                "shared by all nodes" if self.shared_storage else "local to each node",
                "shared by all ranks" if shared else "not visible to every rank",
                "once for all ranks" if shared else "once per node",
            )
        return committer

    def _stage_for_all(self) -> Staging:
        coord = self._coord
        self._committers = self._topology()
        mine = self._committers[coord.rank]
        group = tuple(r for r, c in enumerate(self._committers) if c == mine)
        writer = current_writer(ranks=group, world_size=coord.world_size)
        staging: Staging | None = None
        message: dict[str, Any] | None = None
        if coord.rank == mine:
            try:
                staging = self.strategy.stage(
                    self.backend.layout, self.storage, self.name, retry=self.retry, writer=writer
                )
                message = {"ok": True, "save_id": staging.save_id}
            except Exception as exc:  # every rank must hear of it, or the others hang
                message = {"ok": False, "error": _describe(exc)}
        messages = coord.all_gather(message)
        failures = {r: str(m["error"]) for r, m in enumerate(messages) if m and not m["ok"]}
        if failures:
            if staging is not None:
                self.strategy.abort(staging)
            raise SaveAborted(
                f"{self.final}: could not create the staging dir on rank(s) {sorted(failures)}",
                path=self.final,
                failures=failures,
            )
        if staging is None:
            staging = self.strategy.attach(
                self.backend.layout, self.storage, self.name, str(messages[mine]["save_id"]),
                retry=self.retry, writer=writer,
            )  # fmt: skip
        return staging

    def _finish_for_all(self, staging: Staging, exc: BaseException | None) -> None:
        coord = self._coord
        committer = coord.rank == self._committers[coord.rank]
        if exc is not None and self.fail_fast:
            if committer:
                self.strategy.abort(staging)
            _drop_spool(staging)
            return  # the exception propagates; no collective is entered
        local_error: BaseException | None = exc

        # Phase 1: did every rank's writes succeed? Then every committer seals.
        mine = {"ok": exc is None, "error": None if exc is None else _describe(exc)}
        reports = coord.all_gather(mine)
        failures = {r: str(rep["error"]) for r, rep in enumerate(reports) if not rep["ok"]}
        if self.strategy.shared:  # object stores: every rank uploads its own files
            failures |= self._flush_all(staging, committer=committer, failures=failures)
        manifest: Manifest | None = None
        sealed: dict[str, Any] | None = None
        if committer and not failures:
            try:
                if self.prepare is not None and not self.strategy.shared:
                    self.prepare(Path(self.strategy.workdir(staging)))
                manifest = self._seal(staging)
                sealed = {"ok": True}
            except BaseException as err:  # tell the others before raising
                local_error = err
                sealed = {"ok": False, "error": _describe(err)}
        # Phase 2: only when every committer sealed does any of them rename, so that one
        # node does not commit a save that another node fails (partial: a rename itself
        # can still fail on one node after another renamed).
        seals = coord.all_gather(sealed)
        failures |= {r: str(x["error"]) for r, x in enumerate(seals) if x and not x["ok"]}
        outcome: dict[str, Any] | None = None
        if committer:
            if failures or manifest is None:
                self.strategy.abort(staging)
                outcome = {"ok": False, "failures": failures}
            else:
                try:
                    result = self._commit(staging, manifest)
                    self.result = result
                    outcome = {
                        "ok": True,
                        "outcome": result.outcome.value,
                        "path": result.path,
                        "manifest": result.manifest.to_json().decode("utf-8"),
                    }
                except BaseException as err:  # tell the others before raising
                    self.strategy.abort(staging)
                    local_error = err
                    outcome = {"ok": False, "failures": {coord.rank: _describe(err)}}
        outcomes = coord.all_gather(outcome)
        merged: dict[int, str] = {}
        for o in outcomes:
            if o is not None and not o["ok"]:
                merged |= {int(r): str(m) for r, m in o["failures"].items()}
        if merged:
            _drop_spool(staging)  # this rank's own (the committer removed the rest)
            raise SaveAborted(
                f"{self.final} was not committed: rank(s) {sorted(merged)} failed",
                path=self.final,
                failures=merged,
            ) from local_error
        _drop_spool(staging)
        if self.result is None:
            mine_outcome = outcomes[self._committers[coord.rank]]
            committed = Manifest.from_json(str(mine_outcome["manifest"]).encode("utf-8"))
            self.result = CommitResult(
                mine_outcome["path"], Outcome(mine_outcome["outcome"]), committed
            )

    def _flush_all(
        self, staging: Staging, *, committer: bool, failures: dict[int, str]
    ) -> dict[int, str]:
        """Every rank uploads what it wrote (one more collective); the committer learns all.

        The committer's ``prepare`` runs first, on its own files. Returns new failures.
        """
        coord = self._coord
        mine: dict[str, Any] | None = None
        if not failures:
            try:
                if committer and self.prepare is not None:
                    self.prepare(Path(self.strategy.workdir(staging)))
                # What this rank wrote straight to the store (its ``known``), and its spool.
                files = self.known | self.strategy.flush(staging)
                mine = {"ok": True, "files": {r: [d.size, d.checksum] for r, d in files.items()}}
            except BaseException as err:  # every rank must hear of it
                mine = {"ok": False, "error": _describe(err)}
        gathered = coord.all_gather(mine)
        new = {r: str(m["error"]) for r, m in enumerate(gathered) if m and not m["ok"]}
        writers: dict[str, int] = {}
        for rank, message in enumerate(gathered):
            for rel, (size, checksum) in ((message or {}).get("files") or {}).items():
                if rel in writers:
                    new[rank] = f"rank {writers[rel]} and rank {rank} both wrote {rel}"
                writers[rel] = rank
                self.known[rel] = FileDigest(int(size), str(checksum))
        return new

    def continue_on(self, coordinator: Coordinator) -> None:
        """Finish this save (``__exit__``) over another channel of the same ranks.

        An async save's background thread finishes it beside the training's collectives.
        Every rank then learns of any rank's failure (``fail_fast`` is off: the background
        runs no framework collective).
        """
        if coordinator.world_size != self._coord.world_size or coordinator.rank != self._coord.rank:
            raise ValueError("continue_on() needs a coordinator of the same ranks")
        self._coord = coordinator
        self.fail_fast = False

    @property
    def staging_dir(self) -> Path:
        """Where this process writes the save's files (after ``__enter__``)."""
        if self.staging is None:
            raise RuntimeError("the transaction has not started: use it in a with statement")
        return Path(self.strategy.workdir(self.staging))

    @property
    def write_path(self) -> str:
        """Where the storage writes (``self.storage.open_write``): staging dir or prefix."""
        if self.staging is None:
            raise RuntimeError("the transaction has not started: use it in a with statement")
        return self.staging.path

    @property
    def shared(self) -> bool:
        """Whether one committer commits for every rank (False: node-local roots)."""
        return all(c == 0 for c in self.committers)

    @property
    def nodes(self) -> int:
        """How many nodes the ranks of this save run on (after ``__enter__``)."""
        return self._nodes

    @property
    def committer(self) -> int:
        """The rank that commits for this process (after ``__enter__``)."""
        return self._committers[self._coord.rank] if self._coord.world_size > 1 else 0

    @property
    def committers(self) -> list[int]:
        """Each rank's committer (after ``__enter__``): one value if the root is shared."""
        return list(self._committers) if self._coord.world_size > 1 else [0]


# The public name reads as a function, as in ``with atomic_checkpoint(path) as d:``.
atomic_checkpoint = AtomicCheckpoint
