"""The commit protocol: stage → write → seal → commit → publish.

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

``abort`` removes a staging dir; it runs on any failure before the commit. A crash at
any point leaves either the old state or the new one; ``recovery.recover`` repairs the
in-between states a crash can leave (stale staging, a replace cut between its renames).
"""

from __future__ import annotations

import contextlib
import enum
import errno
import functools
import logging
import os
import shutil
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ckptguard._coordination.base import Coordinator, SingleProcess, default_coordinator
from ckptguard._errors import (
    CheckpointError,
    CommitConflict,
    SaveAborted,
    StorageError,
    StorageFull,
    UnsafeManifest,
    UnsupportedFile,
    storage_error_from_os,
)
from ckptguard._format.layout import (
    MANIFEST_NAME,
    MANIFEST_TMP_NAME,
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
    remove_retrying,
    remove_stale_staging,
    repair_trash,
    write_owner,
)
from ckptguard._protocol.locking import DEFAULT_LOCK_TIMEOUT, root_lock
from ckptguard._protocol.verify import verify
from ckptguard._storage.faults import fault_point
from ckptguard._storage.local import PARALLEL_FSYNC_MIN, FileDigest, LocalStorage, Storage
from ckptguard._storage.retry import (
    DEFAULT_RETRY,
    NFS_LAG_ERRNOS,
    PERMANENT_ERRNOS,
    RetryPolicy,
    call_fsync,
    call_with_retry,
    with_retries,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

__all__ = [
    "AtomicCheckpoint",
    "CommitResult",
    "IfExists",
    "Outcome",
    "Staging",
    "abort",
    "atomic_checkpoint",
    "commit",
    "publish",
    "seal",
    "stage",
]

_log = logging.getLogger("ckptguard.commit")

IfExists = Literal["keep", "replace", "error"]
_IF_EXISTS = ("keep", "replace", "error")


class Outcome(enum.StrEnum):
    """What a commit did."""

    COMMITTED = "committed"  # our staging dir is now the checkpoint
    REPLACED = "replaced"  # ... and an older valid checkpoint of that name went to trash
    ALREADY_COMMITTED = "already_committed"  # a peer committed this very save (same save id)
    KEPT_EXISTING = "kept_existing"  # a valid checkpoint of that name exists; ours discarded


@dataclass(frozen=True)
class Staging:
    """A save in progress: where it is written and by whom."""

    layout: RootLayout
    name: str
    save_id: str
    path: str
    storage: Storage
    retry: RetryPolicy = DEFAULT_RETRY
    writer: WriterInfo = field(default_factory=current_writer)

    @property
    def final(self) -> str:
        return self.layout.final(self.name)


@dataclass(frozen=True)
class CommitResult:
    """The checkpoint that is visible under the final name after a commit, and how."""

    path: str
    outcome: Outcome
    manifest: Manifest
    replaced: str | None = None  # trash path of the checkpoint we replaced
    quarantined: str | None = None  # where a foreign entry in the way was moved


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
                f"{os.path.join(path, rel)}: {exc.message}", path=os.path.join(path, rel)
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
        explain_full(err, staging, _tree_size(path) + len(data))
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
            mode = stat.S_IMODE(os.stat(sub, follow_symlinks=False).st_mode)
        except OSError as exc:
            raise storage_error_from_os(exc, "read the mode of", sub) from exc
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
    workers = max(1, min(_FSYNC_THREADS, len(large)))
    with ThreadPoolExecutor(workers, thread_name_prefix="ckptguard-fsync") as pool:
        syncs = [(rel, pool.submit(storage.fsync_file, os.path.join(root, rel))) for rel in large]
        try:
            for rel in rels:
                file_path = os.path.join(root, rel)
                run = functools.partial(
                    _hash_into, storage, file_path, digests, rel, sizes[rel] < PARALLEL_FSYNC_MIN
                )
                call_fsync(run, what="read and fsync file", path=file_path)
        except BaseException:
            for _, future in syncs:
                future.cancel()
            raise
        for rel, future in syncs:
            call_fsync(future.result, what="fsync file", path=os.path.join(root, rel))
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
    if if_exists not in _IF_EXISTS:
        raise ValueError(f"if_exists must be one of {_IF_EXISTS}, got {if_exists!r}")
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


# -- the whole sequence, as a context manager ----------------------------------------------
def _tree_size(path: str) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            if dirpath == path and f == OWNER_NAME:
                continue
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, f)).st_size
    return total


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
        err.message += f"; {_tree_size(staging.path)} bytes were written to its staging dir"
    return err


def explain_full(err: StorageFull, staging: Staging, expected_bytes: int | None) -> None:
    """Add to a StorageFull what was written, what is free and what the save needs."""
    written = _tree_size(staging.path)
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


_warned_multi_rank = False


def warn_multi_rank_without_group() -> None:
    """Warn once: WORLD_SIZE > 1 but no process group to coordinate the ranks' saves."""
    # Without a coordinator every process stages and commits its own save; the first
    # commit wins and files that only other ranks wrote are not in it.
    global _warned_multi_rank  # noqa: PLW0603 - warn once per process, not once per save
    if not _warned_multi_rank:
        _warned_multi_rank = True
        _log.warning(
            "WORLD_SIZE=%s but torch.distributed is not initialised: each process commits its "
            "own save and the first commit wins, so files written only by other ranks are "
            "dropped. Initialise the process group before saving (or save from one rank)",
            os.environ.get("WORLD_SIZE"),
        )


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
        retry: RetryPolicy = DEFAULT_RETRY,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
        stale_after: float = DEFAULT_STALE_AFTER,
        dir_mode: int | None = None,
        coordinator: Coordinator | None = None,
        shared_storage: bool | None = None,
        prepare: Callable[[Path], None] | None = None,
    ) -> None:
        if if_exists not in _IF_EXISTS:
            raise ValueError(f"if_exists must be one of {_IF_EXISTS}, got {if_exists!r}")
        final = os.path.abspath(os.fspath(final_path))
        self.root, self.name = os.path.dirname(final), validate_name(os.path.basename(final))
        self.final = final
        self.step, self.metrics, self.metadata = step, metrics, metadata
        self.if_exists: IfExists = if_exists
        self.storage = with_retries(storage or LocalStorage(), retry)
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
        # Storage.open_write): seal trusts them instead of reading those files again.
        self.known: dict[str, FileDigest] = {}

    def __enter__(self) -> Path:
        self._coord = self.coordinator or default_coordinator()
        if self._coord.world_size == 1:
            self.staging = stage(self.root, self.name, storage=self.storage, retry=self.retry)
        else:
            self.staging = self._stage_for_all()
        return Path(self.staging.path)

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
            abort(staging)
            if typed is not None:
                raise typed from exc
            return  # the original exception propagates
        self.result = self._seal_and_commit(staging)

    def _prepare_and_seal(self, staging: Staging) -> Manifest:
        """The committer's steps once every rank has written: prepare, then seal."""
        if self.prepare is not None:
            self.prepare(Path(staging.path))
        return seal(
            staging,
            step=self.step,
            metrics=self.metrics,
            metadata=self.metadata,
            known=self.known,
            others_may_write=self.dir_mode is not None and bool(self.dir_mode & _OTHERS_WRITE),
        )

    def _commit_and_publish(self, staging: Staging, manifest: Manifest) -> CommitResult:
        """Rename the sealed save into place and publish it, under the root's lock."""
        with root_lock(staging.layout, self.lock_timeout):
            result = commit(
                staging,
                manifest,
                if_exists=self.if_exists,
                dir_mode=self.dir_mode,
                supersedes=self.supersedes,
            )
            publish(staging, result, stale_after=self.stale_after)
        return result

    def _seal_and_commit(self, staging: Staging) -> CommitResult:
        try:
            result = self._commit_and_publish(staging, self._prepare_and_seal(staging))
        except BaseException:
            abort(staging)  # a no-op if the rename already happened
            raise
        return result

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
        layout = RootLayout(self.root)
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
                staging = stage(
                    self.root, self.name, storage=self.storage, retry=self.retry, writer=writer
                )
                message = {"ok": True, "save_id": staging.save_id}
            except Exception as exc:  # every rank must hear of it, or the others hang
                message = {"ok": False, "error": _describe(exc)}
        messages = coord.all_gather(message)
        failures = {r: str(m["error"]) for r, m in enumerate(messages) if m and not m["ok"]}
        if failures:
            if staging is not None:
                abort(staging)
            raise SaveAborted(
                f"{self.final}: could not create the staging dir on rank(s) {sorted(failures)}",
                path=self.final,
                failures=failures,
            )
        if staging is None:
            layout = RootLayout(self.root)
            save_id = str(messages[mine]["save_id"])
            path = layout.staging_dir(self.name, save_id)
            staging = Staging(layout, self.name, save_id, path, self.storage, self.retry, writer)
        return staging

    def _finish_for_all(self, staging: Staging, exc: BaseException | None) -> None:
        coord = self._coord
        committer = coord.rank == self._committers[coord.rank]
        if exc is not None and self.fail_fast:
            if committer:
                abort(staging)
            return  # the exception propagates; no collective is entered
        local_error: BaseException | None = exc

        # Phase 1: did every rank's writes succeed? Then every committer seals.
        mine = {"ok": exc is None, "error": None if exc is None else _describe(exc)}
        reports = coord.all_gather(mine)
        failures = {r: str(rep["error"]) for r, rep in enumerate(reports) if not rep["ok"]}
        manifest: Manifest | None = None
        sealed: dict[str, Any] | None = None
        if committer and not failures:
            try:
                manifest = self._prepare_and_seal(staging)
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
                abort(staging)
                outcome = {"ok": False, "failures": failures}
            else:
                try:
                    result = self._commit_and_publish(staging, manifest)
                    self.result = result
                    outcome = {
                        "ok": True,
                        "outcome": result.outcome.value,
                        "path": result.path,
                        "manifest": result.manifest.to_json().decode("utf-8"),
                    }
                except BaseException as err:  # tell the others before raising
                    abort(staging)
                    local_error = err
                    outcome = {"ok": False, "failures": {coord.rank: _describe(err)}}
        outcomes = coord.all_gather(outcome)
        merged: dict[int, str] = {}
        for o in outcomes:
            if o is not None and not o["ok"]:
                merged |= {int(r): str(m) for r, m in o["failures"].items()}
        if merged:
            raise SaveAborted(
                f"{self.final} was not committed: rank(s) {sorted(merged)} failed",
                path=self.final,
                failures=merged,
            ) from local_error
        if self.result is None:
            mine_outcome = outcomes[self._committers[coord.rank]]
            committed = Manifest.from_json(str(mine_outcome["manifest"]).encode("utf-8"))
            self.result = CommitResult(
                mine_outcome["path"], Outcome(mine_outcome["outcome"]), committed
            )

    @property
    def staging_dir(self) -> Path:
        """Where this save's files go (after ``__enter__``)."""
        if self.staging is None:
            raise RuntimeError("the transaction has not started: use it in a with statement")
        return Path(self.staging.path)

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
