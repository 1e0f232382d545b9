"""The rename commit (POSIX filesystems): stage → write → seal → commit → publish.

Why: a trainer that let several processes ``rename(tmp, "checkpoint-100")`` crashed every
process but the first with ``OSError: [Errno 39] Directory not empty``, and one that
writes straight into ``checkpoint-100`` resumes from half-written folders after a crash.
Here a checkpoint's final name appears in one atomic step, exactly once, after every
byte and the manifest are durable.

1. ``stage``   create ``ROOT/.ckptguard/staging/<name>.<save_id>`` (0700) with an owner file.
2. write       the caller writes files into the staging dir (any code, any rank).
3. ``seal``    hash and fsync every file, fsync subdirectories, write the manifest under
               a temp name, fsync it, rename it to ``ckptguard.json``, fsync the staging dir.
4. ``commit``  under the root's lock: rename(2) the staging dir onto the final name with
               RENAME_NOREPLACE. If the name is taken: our own save committed by a peer
               is success; a valid checkpoint is kept, replaced (rename to trash, then
               rename in) or reported, per ``if_exists``; anything else is quarantined.
5. ``publish`` fsync ROOT (the commit is now durable), drop the replaced checkpoint from
               trash, remove stale staging dirs of dead savers.

Retention (after ``publish``) renames each retired checkpoint into trash under the lock;
with ``retire(..., background=True)`` the fsync of ROOT and the unlinking of its files
(0.15 to 0.3 s per GiB on an ext4 disk mounted with ``discard``, most of it waiting, not
CPU) run on a background thread (:class:`Removals`), which the next ``commit`` and
``drain`` wait for. A crash there leaves a ``*.retired`` trash entry, removed by the next
publish or start-up (``cleanup.repair_trash``).

``abort`` removes a staging dir; it runs on any failure before the commit. A crash at
any point leaves either the old state or the new one; ``recovery.recover`` repairs the
in-between states a crash can leave (stale staging, a replace cut between its renames).

What :class:`RenameCommit` guarantees:
- a checkpoint's name never exists before every file, the manifest and the staging dir
  are fsynced; after ``commit`` returns, the rename is durable (ROOT fsynced);
- exactly one save commits a name per ``if_exists="keep"`` among processes that take the
  root's lock (every ckptguard process does); a name is never replaced by an older save;
- nothing that is not a valid checkpoint is ever deleted: it is quarantined with a note;
- a crash between the two renames of a replace is rolled back by recovery;
- partial: the durability of the final rename relies on the filesystem honouring a
  directory fsync (NFS: the server's commit semantics).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import shutil
import stat
import threading
from typing import TYPE_CHECKING, Any

from ckptguard._errors import (
    CheckpointError,
    CommitConflict,
    StorageError,
    StorageFull,
    UnsafeManifest,
    UnsupportedFile,
    storage_error_from_os,
)
from ckptguard._format.layout import (
    MANIFEST_NAME,
    MANIFEST_TMP_NAME,
    META_DIR,
    OWNER_NAME,
    RootLayout,
    new_save_id,
    step_from_name,
    validate_name,
)
from ckptguard._format.manifest import FileEntry, Manifest, validate_relpath
from ckptguard._format.owner import WriterInfo, current_writer
from ckptguard._protocol.cleanup import (
    DEFAULT_STALE_AFTER,
    check_meta_dirs,
    remove_retrying,
    remove_stale_staging,
    repair_trash,
    retire_checkpoint,
    write_owner,
)
from ckptguard._protocol.locking import root_lock
from ckptguard._protocol.strategy import (
    IF_EXISTS,
    CommitResult,
    IfExists,
    Outcome,
    Staging,
    cross_run_conflict,
)
from ckptguard._protocol.verify import verify_local as verify
from ckptguard._storage.faults import fault_point
from ckptguard._storage.local import PARALLEL_FSYNC_MIN, LocalStorage, tree_size
from ckptguard._storage.retry import (
    DEFAULT_RETRY,
    NFS_LAG_ERRNOS,
    BackgroundFsyncs,
    RetryPolicy,
    call_fsync,
    call_with_retry,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from contextlib import AbstractContextManager

    from ckptguard._storage.base import FileDigest, Storage

__all__ = [
    "Removals",
    "RenameCommit",
    "abort",
    "commit",
    "publish",
    "seal",
    "stage",
]

_log = logging.getLogger("ckptguard.commit")

_OTHERS_WRITE = 0o022  # group and world write bits


def _default_dir_mode() -> int:
    """0o777 minus the process umask, and never writable by group or others.

    The umask is read without changing it (os.umask is racy). A checkpoint must not be
    altered behind its writer's back, whatever the umask.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o777 & ~int(line.split()[1], 8) & ~_OTHERS_WRITE
    except (OSError, ValueError):
        pass
    return 0o755


def _rename(staging: Staging, src: str, dst: str, *, enoent_is_transient: bool = True) -> None:
    lag = NFS_LAG_ERRNOS if enoent_is_transient else NFS_LAG_ERRNOS - {errno.ENOENT}
    call_with_retry(
        functools.partial(staging.storage.rename_noreplace, src, dst),
        what=f"rename {src} -> {dst}",
        path=dst,
        policy=staging.retry,
        also_transient=lag,
        passthrough=frozenset({errno.EEXIST}),
    )


# -- 1. stage ------------------------------------------------------------------------------
def ensure_root(layout: RootLayout, storage: Storage, retry: RetryPolicy = DEFAULT_RETRY) -> None:
    """Create ROOT (like mkdir -p) and its 0700 meta directories."""

    def make() -> None:
        os.makedirs(layout.root, exist_ok=True)
        for path in (layout.meta, layout.staging, layout.trash, layout.quarantine):
            storage.make_dir(path, mode=0o700, exist_ok=True)

    call_with_retry(make, what="create checkpoint root", path=layout.root, policy=retry)


def stage(
    root: str | os.PathLike[str],
    name: str,
    *,
    storage: Storage | None = None,
    save_id: str | None = None,
    retry: RetryPolicy = DEFAULT_RETRY,
    writer: WriterInfo | None = None,
) -> Staging:
    """Create a fresh staging directory for checkpoint ``name`` under ``root``."""
    storage = storage or LocalStorage()
    layout = RootLayout(os.path.abspath(os.fspath(root)))
    validate_name(name)
    save_id = save_id or new_save_id()
    writer = writer or current_writer()
    ensure_root(layout, storage, retry)
    path = layout.staging_dir(name, save_id)
    call_with_retry(
        functools.partial(storage.make_dir, path, mode=0o700),
        what="create staging dir",
        path=path,
        policy=retry,
    )
    staging = Staging(layout, name, save_id, path, storage, retry, writer)
    try:
        call_with_retry(
            functools.partial(write_owner, storage, path, writer, save_id),
            what="record staging owner",
            path=path,
            policy=retry,
        )
        fault_point("stage.created")
    except BaseException:
        # Nobody else will ever get this staging (an ownerless one would even look live
        # for hours): remove it before the error, or a Ctrl-C, propagates.
        abort(staging)
        raise
    return staging


# -- 3. seal -------------------------------------------------------------------------------
def seal(
    staging: Staging,
    *,
    step: int | None = None,
    metrics: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
    known: Mapping[str, FileDigest] | None = None,
    others_may_write: bool = False,
) -> Manifest:
    """Make every file durable and write the manifest; the save stays invisible.

    ``known`` holds digests of files that were checksummed and fsynced while written
    (through ``Storage.open_write``); every other file is hashed and fsynced here.
    Group and world write bits are removed from every file and directory, unless
    ``others_may_write``.
    """
    storage, path = staging.storage, staging.path
    known = known or {}
    files, dirs = call_with_retry(
        functools.partial(storage.walk_files, path), what="list staging dir", path=path
    )
    listed: list[str] = []
    unknown: list[str] = []  # hashed and fsynced here
    for rel in files:
        if rel == OWNER_NAME:
            continue
        listed.append(rel)
        if rel in {MANIFEST_NAME, MANIFEST_TMP_NAME}:
            raise UnsupportedFile(
                f"{os.path.join(path, rel)}: {rel!r} is reserved for ckptguard's manifest",
                path=os.path.join(path, rel),
                hint="rename the file",
            )
        try:
            validate_relpath(rel)
        except UnsafeManifest as exc:
            raise UnsupportedFile(
                f"{os.path.join(path, rel)}: {exc.message}",
                path=os.path.join(path, rel),
                hint="rename the file: names in a checkpoint are relative paths of valid "
                "UTF-8 without control characters (a manifest must be able to list them)",
            ) from None
        if rel not in known:
            unknown.append(rel)
    if not others_may_write:  # files written through the storage have its own mode
        _remove_others_write(storage, path, [*unknown, *dirs])
    digests = {**_hash_and_fsync(storage, path, unknown), **known}
    entries = [FileEntry(rel, digests[rel].size, digests[rel].checksum) for rel in listed]
    for rel in reversed(dirs):  # deepest first, so each parent is synced after its children
        sub = os.path.join(path, rel)
        call_fsync(functools.partial(storage.fsync_dir, sub), what="fsync directory", path=sub)
    fault_point("seal.files_synced")

    manifest = Manifest.create(
        name=staging.name,
        save_id=staging.save_id,
        step=step_from_name(staging.name) if step is None else step,
        files=entries,
        writer=staging.writer,
        metrics=metrics,
        metadata=metadata,
    )
    tmp = os.path.join(path, MANIFEST_TMP_NAME)
    data = manifest.to_json()

    def write_manifest() -> None:
        storage.write_bytes(tmp, data, fsync=True)

    try:
        call_fsync(write_manifest, what="write manifest", path=tmp)
    except StorageFull as err:
        explain_full(err, staging, tree_size(path, skip=OWNER_NAME) + len(data))
        raise
    fault_point("seal.manifest_tmp_written")
    _rename(staging, tmp, os.path.join(path, MANIFEST_NAME))
    fault_point("seal.manifest_written")
    owner = os.path.join(path, OWNER_NAME)
    call_with_retry(
        functools.partial(storage.remove_file, owner), what="remove owner file", path=owner
    )
    call_fsync(functools.partial(storage.fsync_dir, path), what="fsync staging dir", path=path)
    fault_point("seal.done")
    return manifest


def _remove_others_write(storage: Storage, root: str, rels: list[str]) -> None:
    for rel in rels:
        sub = os.path.join(root, rel)
        try:
            st = os.stat(sub, follow_symlinks=False)
        except OSError as exc:
            raise storage_error_from_os(exc, "read the mode of", sub) from exc
        mode = stat.S_IMODE(st.st_mode)
        if mode & _OTHERS_WRITE and stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            # A hard link to a file outside the checkpoint: a chmod would change the
            # other name's file too (issue 15). Left as it is, and said.
            _log.warning(
                "%s is hard-linked from elsewhere (%d links) and writable by group or "
                "others: its mode is left as it is; copy the file into the checkpoint "
                "instead of linking it",
                sub, st.st_nlink,
            )  # fmt: skip
            continue
        if mode & _OTHERS_WRITE:
            call_with_retry(
                functools.partial(storage.set_mode, sub, mode & ~_OTHERS_WRITE),
                what="remove group and world write permission",
                path=sub,
            )


_FSYNC_THREADS = 4


def _hash_and_fsync(storage: Storage, root: str, rels: list[str]) -> dict[str, FileDigest]:
    """Hash every file and fsync it; large files are fsynced by other threads.

    Files of ``PARALLEL_FSYNC_MIN`` bytes or more are fsynced by other threads while the
    next ones are hashed; smaller ones inline, after their hash (their writeback is short,
    and the syscall order of a small save stays that of one thread, which fault injection
    by syscall count relies on).

    The disk writes back while the CPU hashes: for large files the cost is about the
    larger of the two, not their sum.
    """
    if not rels:
        return {}
    digests: dict[str, FileDigest] = {}
    sizes = {rel: _size(os.path.join(root, rel)) for rel in rels}
    large = [rel for rel in rels if sizes[rel] >= PARALLEL_FSYNC_MIN]
    with BackgroundFsyncs(storage, workers=min(_FSYNC_THREADS, len(large))) as syncs:
        for rel in large:
            syncs.submit(os.path.join(root, rel))
        for rel in rels:
            file_path = os.path.join(root, rel)
            run = functools.partial(
                _hash_into, storage, file_path, digests, rel, sizes[rel] < PARALLEL_FSYNC_MIN
            )
            call_fsync(run, what="read and fsync file", path=file_path)
    return digests


def _hash_into(
    storage: Storage,
    path: str,
    out: dict[str, FileDigest],
    rel: str,
    fsync: bool,  # noqa: FBT001
) -> None:
    out[rel] = storage.hash_file(path, fsync=fsync)


def _size(path: str) -> int:
    """A file's size, or 0 where it cannot be told (then it is handled inline)."""
    try:
        return os.stat(path, follow_symlinks=False).st_size
    except (OSError, ValueError):
        return 0


# -- 4. commit -----------------------------------------------------------------------------
def commit(
    staging: Staging,
    manifest: Manifest,
    *,
    if_exists: IfExists = "keep",
    dir_mode: int | None = None,
    supersedes: str | None = None,
) -> CommitResult:
    """Make the sealed save visible under its final name. The caller holds the root's lock.

    ``supersedes``: the save id of a checkpoint that this save knowingly replaces even if
    it no longer verifies (files added to it after its commit by the same job).
    """
    if if_exists not in IF_EXISTS:
        raise ValueError(f"if_exists must be one of {IF_EXISTS}, got {if_exists!r}")
    storage, final = staging.storage, staging.final
    if not storage.exists(staging.path):
        # Peers of one save share its staging dir; the first of them renamed it already.
        return _committed_by_peer(staging, final)
    mode = _default_dir_mode() if dir_mode is None else dir_mode
    call_with_retry(
        functools.partial(storage.set_mode, staging.path, mode),
        what="set checkpoint dir mode",
        path=staging.path,
        policy=staging.retry,
    )
    fault_point("commit.before_rename")
    for _attempt in range(3):
        try:
            _rename(staging, staging.path, final, enoent_is_transient=False)
        except FileExistsError:
            pass
        except StorageError as exc:
            if exc.errno == errno.ENOENT and not storage.exists(staging.path):
                return _committed_by_peer(staging, final)
            raise
        else:
            _refuse_a_link(staging, final)
            fault_point("commit.renamed")
            return CommitResult(final, Outcome.COMMITTED, manifest)

        existing = verify(final, checksums=False)  # sizes first: cheap
        if not existing.ok and not storage.exists(final):
            continue  # it vanished between our rename and the look; try again
        if (
            supersedes is not None
            and existing.manifest is not None
            and existing.manifest.save_id == supersedes
        ):
            return _replace(staging, manifest)
        if existing.ok and existing.manifest is not None:
            if existing.manifest.save_id == staging.save_id:
                abort(staging)
                return CommitResult(final, Outcome.ALREADY_COMMITTED, existing.manifest)
            # Another save: before keeping it instead of ours (or reporting it), make sure
            # its content is intact, not just its sizes; bit rot gets quarantined.
            existing = verify(final, checksums=True)
        if existing.ok and existing.manifest is not None:
            return _resolve_conflict(staging, manifest, existing.manifest, if_exists)

        # Not a valid ckptguard checkpoint (a half-written folder, a foreign directory):
        # never deleted, never loaded; moved aside with the reason, then we commit.
        quarantined = quarantine(staging, final, reason="; ".join(existing.problems))
        fault_point("commit.quarantined")
        _rename(staging, staging.path, final)
        _refuse_a_link(staging, final)
        fault_point("commit.renamed")
        return CommitResult(final, Outcome.COMMITTED, manifest, quarantined=quarantined)
    raise StorageError(
        f"{final} kept appearing and disappearing while committing; another process is "
        "modifying the root without ckptguard's lock",
        path=final,
    )


def _refuse_a_link(staging: Staging, final: str) -> None:
    """Check that the rename published a directory, not a symlink.

    A staging dir swapped for a symlink after its mode was set (the last check through a
    descriptor) would be renamed as the link itself: the link goes to quarantine.
    """
    if not os.path.islink(final):
        return
    target = quarantine(staging, final, reason="the staging dir was replaced by a symlink")
    raise UnsupportedFile(
        f"{staging.path} was replaced by a symlink before its commit; nothing is committed "
        f"and the link was moved to {target}",
        path=final,
        hint="another process replaced the staging dir; find out which, and save again",
    )


def _committed_by_peer(staging: Staging, final: str) -> CommitResult:
    existing = verify(final, checksums=False)
    if existing.ok and existing.manifest and existing.manifest.save_id == staging.save_id:
        return CommitResult(final, Outcome.ALREADY_COMMITTED, existing.manifest)
    raise StorageError(
        f"the staging dir {staging.path} vanished before its commit, and {final} does not "
        "hold this save; another process removed it",
        path=staging.path,
        hint="check for a cleanup job or a second process using the same save id",
    )


def _resolve_conflict(
    staging: Staging, ours: Manifest, theirs: Manifest, if_exists: IfExists
) -> CommitResult:
    """The final name holds another valid save: keep it, replace it, or report it."""
    final = staging.final
    if if_exists == "replace" and (conflict := cross_run_conflict(final, theirs, ours)):
        abort(staging)
        raise conflict
    newer = theirs.created_at > ours.created_at  # never replace a newer save by an older
    if if_exists == "keep" or (if_exists == "replace" and newer):
        log = _log.warning if newer and if_exists == "replace" else _log.info
        log(
            "%s already holds a valid %s checkpoint (save %s, written by %s:%d); kept it and "
            "discarded this save",
            final, "newer" if newer else "", theirs.save_id, theirs.writer.host,
            theirs.writer.pid,
        )  # fmt: skip
        abort(staging)
        return CommitResult(final, Outcome.KEPT_EXISTING, theirs)
    if if_exists == "error":
        abort(staging)
        raise CommitConflict(
            f"{final} already holds a valid checkpoint (save {theirs.save_id})", path=final
        )
    return _replace(staging, ours)


def _replace(staging: Staging, ours: Manifest) -> CommitResult:
    """Rename the final name's checkpoint into trash, then ours into place.

    Recovery puts the old one back if a crash comes between the two renames.
    """
    final = staging.final
    trash = os.path.join(staging.layout.trash, f"{staging.name}.{new_save_id()}")
    _rename(staging, final, trash)
    try:
        fault_point("commit.moved_to_trash")
        _rename(staging, staging.path, final)
    except BaseException:
        # The last good checkpoint must not stay hidden in trash: put it back at once.
        # (After a SIGKILL here, recover() and the next publish do the same.)
        try:
            staging.storage.rename_noreplace(trash, final)
        except OSError as exc:
            _log.error("could not restore %s from %s (%s); recover() will", final, trash, exc)
        raise
    _refuse_a_link(staging, final)
    fault_point("commit.renamed")
    return CommitResult(final, Outcome.REPLACED, ours, replaced=trash)


def quarantine(staging: Staging, path: str, *, reason: str) -> str:
    """Move ``path`` into ROOT/.ckptguard/quarantine, with a JSON note saying why."""
    name = os.path.basename(path)
    target = os.path.join(staging.layout.quarantine, f"{name}.{new_save_id()}")
    note = {"original": path, "reason": reason, "by_save": staging.save_id}
    _log.warning("moving %s to quarantine %s: %s", path, target, reason)
    data = _json_bytes(note)

    def write_note() -> None:
        staging.storage.write_bytes(target + ".json", data, fsync=True)

    call_fsync(write_note, what="write quarantine note", path=target + ".json")
    _rename(staging, path, target)
    return target


def _json_bytes(obj: Any) -> bytes:
    import json  # noqa: PLC0415 - only needed on the rare quarantine path

    return json.dumps(obj, indent=1).encode()


# -- 5. publish ----------------------------------------------------------------------------
def publish(
    staging: Staging, result: CommitResult, *, stale_after: float = DEFAULT_STALE_AFTER
) -> None:
    """Make the commit durable, then clean up. The caller holds the root's lock.

    Once the root is fsynced the save has succeeded: a failure to clean up afterwards is
    logged, not raised (the next save or ``recover`` finishes the cleanup).
    """
    storage, layout = staging.storage, staging.layout
    what = "fsync of the root after the commit"
    try:
        # A failed writeback (EIO, ENOSPC, EDQUOT...) is never retried: a second fsync
        # could report success for entries the kernel has dropped ("fsyncgate"). Retried:
        # the transient answers (EBUSY, EAGAIN, ESTALE, ETIMEDOUT), which a local
        # filesystem never gives for a writeback, and which on NFS concern no unwritten
        # data: its namespace operations (our rename) are stable on the server before they
        # return, so a directory fsync there has nothing of ours left to lose.
        call_with_retry(
            functools.partial(storage.fsync_dir, layout.root),
            what=what,
            path=layout.root,
            policy=staging.retry,
            map_permanent=False,
        )
    except OSError as exc:
        # Every file, the manifest and the staging dir were fsynced before the rename, so
        # the checkpoint is complete; only its name may not survive a power loss (it would
        # come back as a stale staging dir, which recovery removes).
        err = (
            exc if isinstance(exc, StorageError) else storage_error_from_os(exc, what, layout.root)
        )
        err.message += f"; {result.path} is complete and visible, but its durability is unknown"
        err.hint = (
            "the filesystem reported an error; check the disk (dmesg) before relying on it. "
            "Earlier checkpoints are intact"
        )
        raise err from exc
    fault_point("publish.root_synced")
    try:
        if result.replaced is not None:
            remove_retrying(
                storage, result.replaced, what="remove replaced checkpoint", policy=staging.retry
            )
        if storage.list_dir(layout.trash):
            # What a crashed replace or deletion (of any process) left in trash: nobody's
            # last good checkpoint may stay hidden. Rare, so checksums are affordable.
            for action in repair_trash(layout, storage, checksums=True, retry=staging.retry):
                _log.info("%s", action)
        remove_stale_staging(storage, layout, stale_after=stale_after)
    except (OSError, CheckpointError) as exc:
        _log.warning("%s committed; cleanup after it failed (%s)", result.path, exc)
    fault_point("publish.done")


# -- abort ---------------------------------------------------------------------------------
def abort(staging: Staging) -> None:
    """Remove a staging dir; never raises (a leftover is cleaned by the next save)."""
    try:
        remove_retrying(
            staging.storage,
            staging.path,
            what="remove staging",
            policy=RetryPolicy(deadline=min(staging.retry.deadline, 5.0)),
        )
    except (OSError, CheckpointError) as exc:
        _log.warning("could not remove staging %s (%s); the next save will", staging.path, exc)


def typed_write_error(
    exc: OSError, staging: Staging, expected_bytes: int | None = None
) -> StorageError:
    """Turn a permanent OSError from the writes into our typed error, with sizes.

    ``expected_bytes``: what the whole save writes, where the writer knows it (a manager
    save does); otherwise the space needed is only known to exceed what was written.
    """
    err = storage_error_from_os(exc, f"writing checkpoint {staging.name}", staging.final)
    if isinstance(err, StorageFull):
        explain_full(err, staging, expected_bytes)
    else:
        err.message += (
            f"; {tree_size(staging.path, skip=OWNER_NAME)} bytes were written to its staging dir"
        )
    return err


def explain_full(err: StorageFull, staging: Staging, expected_bytes: int | None) -> None:
    """Add to a StorageFull what was written, what is free and what the save needs."""
    written = tree_size(staging.path, skip=OWNER_NAME)
    try:
        free: int | str = shutil.disk_usage(staging.layout.root).free
    except OSError:
        free = "an unknown number of"
    if expected_bytes is not None and expected_bytes > written:
        need, what = expected_bytes, f"about {expected_bytes} bytes"
    else:
        need, what = written, f"more than {written} bytes"
    err.message += (
        f"; {written} bytes were written to its staging dir before that; {free} bytes are "
        f"free on {staging.layout.root}, and this save needs {what}"
    )
    err.bytes_needed = need


class Removals:
    """What retention hands over after renaming a checkpoint into trash, run on threads.

    Each job (fsync the root, then remove the trash entry) gets a thread of its own; ``wait``
    joins them. A storage failure is logged, never raised: the name is gone already, and
    what is left in trash is removed by the next publish or start-up. Anything else (a
    bug, an interrupt, a test's simulated power cut) is raised again by ``wait``. The
    threads are not daemons: a normal exit lets them finish.
    """

    def __init__(self) -> None:
        self._threads: list[threading.Thread] = []
        self._errors: list[BaseException] = []
        self._lock = threading.Lock()

    def submit(self, job: Callable[[], None]) -> None:
        thread = threading.Thread(target=self._run, args=(job,), name="ckptguard-remove")
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _run(self, job: Callable[[], None]) -> None:
        try:
            job()
        except (OSError, CheckpointError) as exc:
            _log.warning("could not remove a retired checkpoint from trash (%s); the next "
                         "save or start-up will", exc)  # fmt: skip
        except BaseException as exc:  # handed to the thread that waits
            with self._lock:
                self._errors.append(exc)

    def wait(self) -> None:
        """Until every job submitted so far has finished; raises what one of them raised."""
        with self._lock:
            threads, self._threads = self._threads, []
        for thread in threads:
            thread.join()
        with self._lock:
            errors, self._errors = self._errors, []
        if errors:
            raise errors[0]


class RenameCommit:
    """The commit strategy of POSIX filesystems: a staging dir renamed into place."""

    kind = "rename"
    shared = False  # node-local roots exist: the transaction probes who sees what

    def __init__(self) -> None:
        self.removals = Removals()

    def prepare_root(self, layout: RootLayout, storage: Storage, *, retry: RetryPolicy) -> None:
        """The root itself (like mkdir -p); its meta dirs come with the first save."""
        del storage
        call_with_retry(
            functools.partial(os.makedirs, layout.root, exist_ok=True),
            what="create checkpoint root",
            path=layout.root,
            policy=retry,
        )

    def stage(
        self,
        layout: RootLayout,
        storage: Storage,
        name: str,
        *,
        retry: RetryPolicy,
        writer: WriterInfo,
    ) -> Staging:
        return stage(layout.root, name, storage=storage, retry=retry, writer=writer)

    def attach(
        self,
        layout: RootLayout,
        storage: Storage,
        name: str,
        save_id: str,
        *,
        retry: RetryPolicy,
        writer: WriterInfo,
    ) -> Staging:
        path = layout.staging_dir(name, save_id)
        return Staging(layout, name, save_id, path, storage, retry, writer)

    def workdir(self, staging: Staging) -> str:
        return staging.path  # every rank of a node writes into the one staging dir

    def flush(self, staging: Staging) -> dict[str, FileDigest]:
        del staging  # the files are in the staging dir already; seal hashes them
        return {}

    def seal(
        self,
        staging: Staging,
        *,
        known: Mapping[str, FileDigest],
        step: int | None,
        metrics: Mapping[str, Any] | None,
        metadata: Mapping[str, Any] | None,
        others_may_write: bool,
    ) -> Manifest:
        return seal(
            staging,
            step=step,
            metrics=metrics,
            metadata=metadata,
            known=known,
            others_may_write=others_may_write,
        )

    def commit(
        self,
        staging: Staging,
        manifest: Manifest,
        *,
        if_exists: IfExists,
        dir_mode: int | None,
        supersedes: str | None,
        lock_timeout: float,
        stale_after: float,
    ) -> CommitResult:
        # The previous retention's removals first: publish then finds trash empty, and
        # never removes what one of our threads is removing.
        self.removals.wait()
        with root_lock(staging.layout, lock_timeout):
            result = commit(
                staging, manifest, if_exists=if_exists, dir_mode=dir_mode, supersedes=supersedes
            )
            publish(staging, result, stale_after=stale_after)
        return result

    def abort(self, staging: Staging) -> None:
        abort(staging)

    def visible_names(self, layout: RootLayout, storage: Storage) -> list[str]:
        return [n for n in storage.list_dir(layout.root) if n != META_DIR]

    def content_prefix(self, manifest: Manifest) -> str:
        del manifest
        return ""

    def retire(
        self,
        layout: RootLayout,
        storage: Storage,
        name: str,
        *,
        retry: RetryPolicy,
        background: bool = False,
    ) -> bool:
        later = self.removals.submit if background else None
        return retire_checkpoint(layout, name, storage=storage, retry=retry, later=later)

    def drain(self) -> None:
        """Wait for the removals that ``retire(..., background=True)`` started."""
        self.removals.wait()

    def repair(
        self, layout: RootLayout, storage: Storage, *, stale_after: float, lock_timeout: float
    ) -> list[str]:
        """Roll back a replace cut between its renames, drop stale staging (under the lock)."""
        check_meta_dirs(layout)
        if not storage.exists(layout.meta):
            return []
        with root_lock(layout, lock_timeout):
            actions = repair_trash(layout, storage, checksums=False, retry=DEFAULT_RETRY)
            for state in remove_stale_staging(storage, layout, stale_after=stale_after):
                actions.append(f"removed stale staging {state.path} ({state.reason})")
        return actions

    def lock(self, layout: RootLayout, timeout: float) -> AbstractContextManager[None]:
        return root_lock(layout, timeout)
