"""Staging directories: who owns each one, and removing those whose owner is gone.

Only entries of ``ROOT/.ckptguard/staging`` whose names match our staging pattern are
ever considered; anything else there is left alone. Removal happens only under the
root's lock (the caller holds it), and only when :func:`staging_state` says stale: the
owner provably died on this machine, or nothing in the staging dir changed for longer
than ``stale_after`` seconds (see ``owner.py`` for what "provably" covers).
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import stat
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ckptguard._errors import CheckpointError, UnsupportedFile
from ckptguard._format.layout import (
    OWNER_NAME,
    RETIRED_SUFFIX,
    RootLayout,
    host_hash,
    new_save_id,
    parse_staging_name,
    save_id_writer,
)
from ckptguard._format.owner import WriterInfo, is_alive_here
from ckptguard._protocol.verify import read_manifest_local as read_manifest
from ckptguard._protocol.verify import verify_local as verify
from ckptguard._storage.retry import (
    DEFAULT_RETRY,
    NFS_LAG_ERRNOS,
    RetryPolicy,
    call_fsync,
    call_with_retry,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from ckptguard._storage.base import Storage

__all__ = [
    "DEFAULT_STALE_AFTER",
    "StagingState",
    "check_meta_dirs",
    "read_owner",
    "remove_retrying",
    "remove_stale_staging",
    "repair_trash",
    "retire_checkpoint",
    "staging_state",
    "write_owner",
]

_log = logging.getLogger("ckptguard.cleanup")

# A staging dir of a writer on another host (or one we cannot identify) is stale after
# this long without any change. Long enough for a slow multi-GB save to add files.
DEFAULT_STALE_AFTER = 6 * 3600.0
_MAX_OWNER_BYTES = 64 * 1024


@dataclass(frozen=True)
class StagingState:
    """A staging entry and the verdict on it."""

    path: str
    name: str
    save_id: str
    live: bool
    reason: str
    owner: WriterInfo | None


class _AlreadyGone(Exception):
    """The checkpoint to retire no longer exists: nothing to retry."""


def retire_checkpoint(
    layout: RootLayout,
    name: str,
    *,
    storage: Storage,
    retry: RetryPolicy = DEFAULT_RETRY,
    later: Callable[[Callable[[], None]], None] | None = None,
) -> bool:
    """Delete a committed checkpoint: rename it into trash (one atomic step), then remove it.

    A crash mid-way leaves either the whole checkpoint or a trash entry that recovery
    removes; never a half-deleted checkpoint under its name. Returns whether it is gone;
    failures are logged, not raised (deleting old checkpoints must not fail a save).

    ``later``: runs the rest (fsync of the root, then the removal of the trash entry)
    elsewhere, e.g. on a background thread; the name is gone when this returns.
    """
    source = os.path.join(layout.root, name)
    target = os.path.join(layout.trash, f"{name}.{new_save_id()}{RETIRED_SUFFIX}")

    def rename() -> None:
        try:
            storage.rename_noreplace(source, target)
        except FileNotFoundError:
            if not os.path.lexists(source):  # gone already (another process retired it):
                raise _AlreadyGone from None  # nothing to wait for
            raise  # the name is there: NFS lag, retried

    try:
        storage.make_dir(layout.meta, mode=0o700, exist_ok=True)
        storage.make_dir(layout.trash, mode=0o700, exist_ok=True)
        call_with_retry(
            rename,
            what="retire checkpoint",
            path=source,
            policy=retry,
            also_transient=NFS_LAG_ERRNOS,
        )
        if later is not None:
            later(functools.partial(_remove_retired, layout, storage, target, retry))
            return True
        _remove_retired(layout, storage, target, retry)
    except _AlreadyGone:
        return True
    except (OSError, CheckpointError) as exc:
        if isinstance(exc, OSError) and exc.errno == errno.ENOENT and not os.path.lexists(source):
            return True
        _log.warning("could not delete %s: %s", source, exc)
        return False
    _log.info("deleted %s", source)
    return True


def _remove_retired(layout: RootLayout, storage: Storage, target: str, retry: RetryPolicy) -> None:
    """Make the name's removal durable (fsync the root), then remove the trash entry.

    In that order: a power cut can then bring back the whole checkpoint under its name (the
    next retention retires it again), never a half-removed one.
    """
    storage.fsync_dir(layout.root)
    remove_retrying(storage, target, what="remove retired checkpoint", policy=retry)


def remove_retrying(
    storage: Storage, path: str, *, what: str, policy: RetryPolicy = DEFAULT_RETRY
) -> None:
    """Remove a tree, retrying the transient failures NFS gives rmdir (silly-renamed files)."""
    call_with_retry(
        functools.partial(storage.remove_tree, path),
        what=what,
        path=path,
        policy=policy,
        also_transient=NFS_LAG_ERRNOS,
    )


def write_owner(storage: Storage, staging_path: str, writer: WriterInfo, save_id: str) -> None:
    """Record the owner inside a new staging dir (not durable on purpose: losing it is safe)."""
    data = json.dumps({"save_id": save_id, "writer": writer.to_dict()}).encode()
    storage.write_bytes(os.path.join(staging_path, OWNER_NAME), data, fsync=False)


def _writer_from(obj: Any) -> WriterInfo | None:
    if not isinstance(obj, dict):
        return None
    try:
        return WriterInfo(
            host=str(obj["host"]),
            pid=int(obj["pid"]),
            pid_start=None if obj.get("pid_start") is None else int(obj["pid_start"]),
            boot_id=None if obj.get("boot_id") is None else str(obj["boot_id"]),
            pid_namespace=None if obj.get("pid_namespace") is None else str(obj["pid_namespace"]),
        )
    except (KeyError, TypeError, ValueError):
        return None


def read_owner(storage: Storage, staging_path: str) -> WriterInfo | None:
    """The owner of a staging dir: its owner file, or the writer of its sealed manifest."""
    try:
        data = storage.read_bytes(os.path.join(staging_path, OWNER_NAME), limit=_MAX_OWNER_BYTES)
        return _writer_from(json.loads(data).get("writer"))
    except (OSError, ValueError, CheckpointError, AttributeError):
        pass
    try:
        return read_manifest(staging_path).writer
    except (OSError, CheckpointError):
        return None


def _last_change(path: str) -> float:
    newest = os.lstat(path).st_mtime
    try:
        with os.scandir(path) as it:
            for entry in it:
                newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
    except OSError:
        pass
    return newest


# How long a staging dir may lack its owner file before the pid in its save id decides.
OWNERLESS_GRACE = 10.0


def _killed_at_birth(path: str, save_id: str) -> int | None:
    """The pid of the writer, if a staging dir died right after its mkdir (else None).

    It holds nothing, or only a torn owner file, and the writer named by its save id is
    gone from this host (partial: a writer in another pid namespace of a host of the same
    name, stalled for the whole grace between its mkdir and its owner file, would be
    taken for dead).
    """
    origin = save_id_writer(save_id)
    if origin is None or origin[0] != host_hash():
        return None
    try:
        names = os.listdir(path)
        if names not in ([], [OWNER_NAME]):
            return None
        if names:  # an owner file that cannot be parsed: torn by the kill, or unreadable
            with open(os.path.join(path, OWNER_NAME), "rb") as f:
                json.loads(f.read(_MAX_OWNER_BYTES))
            return None  # it parses: read_owner failed for another reason; keep it
    except ValueError:
        pass  # torn
    except OSError:
        return None  # unreadable now (ESTALE, EIO): decide another time
    try:
        os.kill(origin[1], 0)
    except ProcessLookupError:
        return origin[1]
    except (PermissionError, OverflowError, ValueError):
        return None  # it exists as another user's process, or the pid is absurd
    return None


def staging_state(
    storage: Storage, path: str, *, stale_after: float = DEFAULT_STALE_AFTER
) -> StagingState | None:
    """Classify one staging entry; None if its name is not one of ours."""
    parsed = parse_staging_name(os.path.basename(path))
    if parsed is None:
        return None
    name, save_id = parsed
    owner = read_owner(storage, path)
    alive = is_alive_here(owner) if owner is not None else None
    if alive is True and owner is not None:
        return StagingState(
            path, name, save_id, live=True, reason=f"owner pid {owner.pid} is running", owner=owner
        )
    if alive is False and owner is not None:
        return StagingState(
            path, name, save_id, live=False, reason=f"owner pid {owner.pid} has exited", owner=owner
        )
    try:
        # A change time in the future (a clock set back, another host's clock) counts as
        # now: the dir is kept until it has been unchanged for stale_after from here.
        age = max(0.0, time.time() - _last_change(path))
    except FileNotFoundError:
        return StagingState(path, name, save_id, live=False, reason="vanished", owner=owner)
    if owner is None and age >= OWNERLESS_GRACE and (pid := _killed_at_birth(path, save_id)):
        # Killed between creating the dir and writing its owner file: the save id names
        # the writer (host and pid). A live writer writes that file at once, so past the
        # grace an empty dir whose writer is gone from this host is dead.
        reason = f"no owner file (or a torn one), and its writer (pid {pid} here) has exited"
        return StagingState(path, name, save_id, live=False, reason=reason, owner=None)
    who = f"owner {owner.host}:{owner.pid}" if owner else "unknown owner"
    if age < stale_after:
        reason = f"{who}, changed {age:.0f}s ago (stale after {stale_after:.0f}s)"
        return StagingState(path, name, save_id, live=True, reason=reason, owner=owner)
    return StagingState(
        path, name, save_id, live=False, reason=f"{who}, unchanged for {age:.0f}s", owner=owner
    )


def remove_stale_staging(
    storage: Storage, layout: RootLayout, *, stale_after: float = DEFAULT_STALE_AFTER
) -> list[StagingState]:
    """Remove stale staging dirs of ``layout``'s root; the caller holds the root's lock."""
    removed = []
    for entry in storage.list_dir(layout.staging):
        path = os.path.join(layout.staging, entry)
        state = staging_state(storage, path, stale_after=stale_after)
        if state is None or state.live:
            continue
        _log.info("removing stale staging %s (%s)", path, state.reason)
        try:
            remove_retrying(storage, path, what="remove stale staging")
        except CheckpointError as exc:
            # One stuck leftover must not block the cleanup of the others, nor a save.
            _log.warning("could not remove stale staging %s: %s", path, exc)
            continue
        removed.append(state)
    return removed


def repair_trash(
    layout: RootLayout, storage: Storage, *, checksums: bool, retry: RetryPolicy
) -> list[str]:
    """Finish or undo what replaces and retention left in trash; the caller holds the lock.

    A replace cut between its two renames left the old checkpoint in trash and the final
    name empty: the newest trash copy that verifies is renamed back. Trash whose name
    holds a valid checkpoint again is removed, and so are retention's half-done deletions.
    Returns what was done.
    """
    actions = []
    by_name: dict[str, list[str]] = {}
    for entry in storage.list_dir(layout.trash):
        if entry.endswith(RETIRED_SUFFIX) and parse_staging_name(entry[: -len(RETIRED_SUFFIX)]):
            # Deleted by retention, cut before its removal finished: finish it.
            path = os.path.join(layout.trash, entry)
            remove_retrying(storage, path, what="remove retired checkpoint", policy=retry)
            actions.append(f"removed {path} (deleted by retention)")
            continue
        parsed = parse_staging_name(entry)
        if parsed is not None:
            by_name.setdefault(parsed[0], []).append(entry)
    for name, trash_entries in by_name.items():
        final = os.path.join(layout.root, name)
        newest_first = sorted(trash_entries, key=lambda e: parse_staging_name(e) or ("", ""))
        newest_first.reverse()
        if not storage.exists(final):
            for entry in newest_first:
                path = os.path.join(layout.trash, entry)
                if verify(path, checksums=checksums).ok:
                    # A replace was cut between "old -> trash" and "new -> final": roll back.
                    call_with_retry(
                        functools.partial(storage.rename_noreplace, path, final),
                        what="restore from trash",
                        path=final,
                        policy=retry,
                        also_transient=NFS_LAG_ERRNOS,
                    )
                    call_fsync(
                        functools.partial(storage.fsync_dir, layout.root),
                        what="fsync root",
                        path=layout.root,
                    )
                    actions.append(f"restored {final} from {path} (an interrupted replace)")
                    newest_first.remove(entry)
                    break
        if not _valid_final(final, checksums=checksums):
            continue  # keep the old copies while the final name holds nothing valid
        for entry in newest_first:
            path = os.path.join(layout.trash, entry)
            remove_retrying(storage, path, what="remove trash", policy=retry)
            actions.append(f"removed {path} (replaced by a valid {final})")
    return actions


def _valid_final(final: str, *, checksums: bool) -> bool:
    """Whether ``final`` holds a valid checkpoint: a directory, or a file with its sidecar.

    The file: a Lightning ``.ckpt`` that replaced a checkpoint directory of that name.
    """
    if os.path.isfile(final) and not os.path.islink(final):
        from ckptguard._protocol.filecommit import verify_file  # noqa: PLC0415 - a cycle

        return verify_file(final, checksums=checksums).ok
    return verify(final, checksums=checksums).ok


def check_meta_dirs(layout: RootLayout) -> None:
    """Refuse a root whose ``.ckptguard`` or its subdirectories are symlinks or files.

    Recovery deletes entries inside them; following a planted symlink would delete
    someone else's files.
    """
    for path in (layout.meta, layout.staging, layout.trash, layout.quarantine):
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise UnsupportedFile(
                f"{path} is a symlink or not a directory; refusing to work in it",
                path=path,
                hint="move it away by hand; ckptguard recreates its directories",
            )
