"""The manifest-marker commit (object stores: s3://, gs://, memory://, ...).

Object stores have no rename, so the commit is an object, not a directory::

    ROOT/<name>/<save id>/<file>       the data objects of one save, written first
    ROOT/<name>/ckptguard.json         the manifest: written last, the commit marker

1. ``stage``   a fresh save id; data goes under ``<name>/<save id>/`` (and code that writes
               plain files gets a local spool directory, 0700).
2. write       the manager streams its files straight to the store; other code writes
               into the spool.
3. ``flush``   every rank uploads its spool, hashing every byte as it goes.
4. ``seal``    the manifest lists every file as ``<save id>/<file>``.
5. ``commit``  the manifest is written (the commit marker); what it replaced or what lost
               is deleted.

What :class:`MarkerCommit` guarantees:
- a prefix without a manifest that parses and verifies is invisible to list, latest and
  restore; so are the objects of a save whose manifest lost or was replaced;
- exactly once per name with ``if_exists="keep"``: the manifest is written with a
  create-only conditional write (``If-None-Match: *``) where the store honours it (probed
  once per root); elsewhere it is written only if absent, then read back and our save id
  compared (partial: the last writer of a race wins, and the loser learns it lost);
- ``"replace"`` overwrites the manifest in one PUT (readers see the old or the new
  checkpoint, never a mix), then deletes the old save's objects;
- partial: a reader that listed a checkpoint just before a replace or retire may find
  its objects gone (restore then takes the next valid checkpoint);
- ``clean``/start-up remove uploads no manifest refers to, once older than a grace period.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
import posixpath
import shutil
import tempfile
from typing import TYPE_CHECKING, Any, cast

from ckptguard._errors import CommitConflict, StorageError, UnsafeManifest
from ckptguard._format.layout import MANIFEST_NAME, META_DIR, new_save_id, validate_name
from ckptguard._format.manifest import (
    MAX_MANIFEST_BYTES,
    FileEntry,
    Manifest,
    validate_relpath,
)
from ckptguard._protocol.strategy import (
    CommitResult,
    IfExists,
    Outcome,
    Staging,
    cross_run_conflict,
)
from ckptguard._storage.base import innermost
from ckptguard._storage.faults import fault_point
from ckptguard._storage.local import LocalStorage

if TYPE_CHECKING:
    from collections.abc import Mapping

    from ckptguard._format.layout import RootLayout
    from ckptguard._format.owner import WriterInfo
    from ckptguard._storage.base import FileDigest, Storage
    from ckptguard._storage.objectstore import FsspecStorage
    from ckptguard._storage.retry import RetryPolicy

__all__ = ["MarkerCommit", "clean_store", "names_with_manifest", "read_marker"]

_log = logging.getLogger("ckptguard.objectstore")
SPOOL_ENV = "CKPTGUARD_SPOOL"  # where object-store saves spool plain files (default: TMPDIR)


def read_marker(storage: Storage, path: str) -> Manifest | None:
    """The manifest of the checkpoint at ``path``, or None if there is none."""
    where = f"{path}/{MANIFEST_NAME}"
    try:
        data = storage.read_bytes(where, limit=MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        return None
    return Manifest.from_json(data, path=where)


def _read_marker_quiet(storage: Storage, path: str) -> Manifest | None:
    try:
        return read_marker(storage, path)
    except (UnsafeManifest, StorageError):
        return None


def _store(storage: Storage) -> FsspecStorage:
    """The fsspec storage under any wrapper (retries, fault injection)."""
    return cast("FsspecStorage", innermost(storage))


def names_with_manifest(storage: Storage, root: str, found: Mapping[str, Any]) -> list[str]:
    """The names under ``root`` that hold a manifest, among the listed keys ``found``."""
    base = _store(storage).key(root)
    names = set()
    for key in found:
        parts = key.removeprefix(base + "/").split("/")
        if len(parts) == 2 and parts[1] == MANIFEST_NAME and parts[0] != META_DIR:
            names.add(parts[0])
    return sorted(names)


class MarkerCommit:
    """The commit strategy of object stores: the manifest, written last, is the commit."""

    kind = "manifest-marker"
    shared = True  # one copy that every process sees

    def prepare_root(self, layout: RootLayout, storage: Storage, *, retry: RetryPolicy) -> None:
        """Prefixes need no creation; the bucket must exist (a typo is not a new run)."""
        del layout, retry
        _store(storage).require_root()

    # -- 1. stage ------------------------------------------------------------------------
    def stage(
        self,
        layout: RootLayout,
        storage: Storage,
        name: str,
        *,
        retry: RetryPolicy,
        writer: WriterInfo,
    ) -> Staging:
        return self.attach(layout, storage, name, new_save_id(), retry=retry, writer=writer)

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
        validate_name(name)
        spool = tempfile.mkdtemp(prefix=f"ckptguard-{name}.", dir=os.environ.get(SPOOL_ENV))
        path = f"{layout.root}/{name}/{save_id}"
        return Staging(layout, name, save_id, path, storage, retry, writer, spool=spool)

    # -- 2. write: into the spool, or straight to the store (the manager) ----------------------
    def workdir(self, staging: Staging) -> str:
        if staging.spool is None:  # pragma: no cover - attach always makes one
            raise RuntimeError("an object-store staging without its spool")
        return staging.spool

    # -- 3. flush: every rank uploads what it wrote into its spool -----------------------------
    def flush(self, staging: Staging) -> dict[str, FileDigest]:
        spool = self.workdir(staging)
        files, _dirs = LocalStorage().walk_files(spool)
        digests: dict[str, FileDigest] = {}
        for rel in files:
            validate_relpath(rel)
            with open(os.path.join(spool, rel), "rb") as src:
                writer = staging.storage.open_write(f"{staging.path}/{rel}")
                try:
                    while chunk := src.read(16 << 20):
                        writer.write(chunk)
                    digests[rel] = writer.close()
                except BaseException:
                    writer.abort()
                    raise
        fault_point("remote.data_uploaded")
        return digests

    # -- 4. seal ----------------------------------------------------------------------------
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
        del others_may_write  # objects have no permission bits
        entries = [
            FileEntry(validate_relpath(f"{staging.save_id}/{rel}"), d.size, d.checksum)
            for rel, d in sorted(known.items())
        ]
        return Manifest.create(
            name=staging.name,
            save_id=staging.save_id,
            step=step,
            files=entries,
            writer=staging.writer,
            metrics=metrics,
            metadata=metadata,
        )

    # -- 5. commit --------------------------------------------------------------------------
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
        del dir_mode, lock_timeout, stale_after  # no modes, no lock: create-only writes
        storage, final = staging.storage, staging.final
        where = f"{final}/{MANIFEST_NAME}"
        data = manifest.to_json()
        self._drop_spool(staging)
        old = _read_marker_quiet(storage, final)
        replace = if_exists == "replace" or (
            supersedes is not None and old is not None and old.save_id == supersedes
        )
        if replace and old is not None and (conflict := cross_run_conflict(final, old, manifest)):
            self.abort(staging)
            raise conflict
        if replace:
            if old is not None and old.created_at > manifest.created_at:
                _log.warning("%s holds a newer save; kept it and discarded this one", final)
                self.abort(staging)
                return CommitResult(final, Outcome.KEPT_EXISTING, old)
            storage.write_bytes(where, data)
            fault_point("remote.manifest_written")
            if old is not None and old.save_id != manifest.save_id:
                _remove_save(storage, final, old.save_id)
                return CommitResult(final, Outcome.REPLACED, manifest)
            return CommitResult(final, Outcome.COMMITTED, manifest)
        if if_exists == "error" and old is not None:
            self.abort(staging)
            raise CommitConflict(f"{final} already exists", path=final)
        store = _store(storage)
        if store.supports_create_only():
            won = store.create_only(where, data)
        else:
            won = not storage.exists(where)
            if won:
                storage.write_bytes(where, data)
                # No conditional write here: read back, the last writer of a race wins.
                back = _read_marker_quiet(storage, final)
                won = back is not None and back.save_id == manifest.save_id
        fault_point("remote.manifest_written")
        if won:
            return CommitResult(final, Outcome.COMMITTED, manifest)
        self.abort(staging)
        if if_exists == "error":
            raise CommitConflict(f"{final} was committed by another save", path=final)
        _log.info("%s was committed by another save; ours is discarded", final)
        theirs = _read_marker_quiet(storage, final)
        if theirs is not None and theirs.save_id == manifest.save_id:
            return CommitResult(final, Outcome.ALREADY_COMMITTED, theirs)
        return CommitResult(final, Outcome.KEPT_EXISTING, theirs or manifest)

    def abort(self, staging: Staging) -> None:
        self._drop_spool(staging)
        try:
            staging.storage.remove_tree(staging.path)
        except (OSError, StorageError) as exc:
            _log.warning("could not remove %s (%s); `ckptguard clean` will", staging.path, exc)

    @staticmethod
    def _drop_spool(staging: Staging) -> None:
        if staging.spool is not None:
            shutil.rmtree(staging.spool, ignore_errors=True)

    # -- finding, retiring, cleaning ------------------------------------------------------------
    def visible_names(self, layout: RootLayout, storage: Storage) -> list[str]:
        """Names under the root that hold a manifest, from one listing.

        Prefixes without one (a save killed mid-upload, an empty prefix a store keeps
        listing) are skipped.
        """
        return names_with_manifest(storage, layout.root, _store(storage).find(layout.root))

    def content_prefix(self, manifest: Manifest) -> str:
        return f"{manifest.save_id}/"

    def retire(
        self,
        layout: RootLayout,
        storage: Storage,
        name: str,
        *,
        retry: RetryPolicy,
        background: bool = False,
    ) -> bool:
        """Its manifest first (invisible from then on), then its data."""
        del retry, background  # the storage retries each request; removal is inline
        path = f"{layout.root}/{name}"
        try:
            storage.remove_file(f"{path}/{MANIFEST_NAME}")
            storage.remove_tree(path)
        except (OSError, StorageError) as exc:
            _log.warning("could not delete %s: %s", path, exc)
            return False
        _log.info("deleted %s", path)
        return True

    def drain(self) -> None:
        """Nothing runs in the background here."""

    def repair(
        self, layout: RootLayout, storage: Storage, *, stale_after: float, lock_timeout: float
    ) -> list[str]:
        del lock_timeout
        removed = clean_store(storage, layout.root, grace=stale_after)
        return [f"removed {r} (no manifest refers to it)" for r in removed]

    def lock(self, layout: RootLayout, timeout: float) -> contextlib.nullcontext[None]:
        del layout, timeout  # create-only writes decide races; there is no lock
        return contextlib.nullcontext()


def _remove_save(storage: Storage, path: str, save_id: str) -> None:
    try:
        storage.remove_tree(f"{path}/{save_id}")
    except (OSError, StorageError) as exc:
        _log.warning("could not delete the replaced save %s/%s: %s", path, save_id, exc)


def clean_store(storage: Storage, root: str, *, grace: float, dry_run: bool = False) -> list[str]:
    """Remove what no manifest references, once older than ``grace`` seconds.

    Save prefixes of a checkpoint other than the one its manifest names (a replaced save,
    a save that lost, a save killed mid-upload), checkpoint prefixes without a manifest,
    and multipart uploads left open under the root (``url#upload-id``). Returns what was
    (or, with ``dry_run``, would be) removed.
    """
    store = _store(storage)
    now = _dt.datetime.now(_dt.UTC)
    removed: list[str] = []
    by_prefix: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    base = store.key(root)
    for key, info in store.find(root).items():
        parts = key.removeprefix(base + "/").split("/")
        if parts[0] == META_DIR or len(parts) < 2:
            continue
        by_prefix.setdefault(parts[0], []).append((key, info))
    for name, objects in sorted(by_prefix.items()):
        saves = _old_saves(base, objects, now, grace)
        if not saves:
            continue  # nothing past the grace period: no request for this name
        listed = any(key.removeprefix(base + "/").split("/")[1] == MANIFEST_NAME
                     for key, _ in objects)  # fmt: skip
        if listed and len(saves) == 1 and len(_saves_of(base, objects)) == 1:
            continue  # the one save of a committed name: the manifest's (read nothing)
        try:
            manifest = read_marker(storage, f"{root}/{name}")
        except (UnsafeManifest, StorageError) as exc:
            # A manifest that is there but cannot be read now (a 503, a newer schema):
            # its save must not be taken for an orphan. Leave the whole name alone.
            _log.warning("clean-up skips %s/%s: its manifest cannot be read: %s", root, name, exc)
            continue
        keep = manifest.save_id if manifest is not None else None
        for save_id, items in sorted(saves.items()):
            if save_id == keep:
                continue
            removed.append(posixpath.join(root, name, save_id))
            if not dry_run:
                for key, _ in items:
                    storage.remove_file(store.url_of(key))
    # multipart uploads a killed save left open (invisible, but stored and billed)
    abort = getattr(store, "abort_stale_uploads", None)
    if callable(abort):
        removed += abort(root, grace=grace, dry_run=dry_run)
    return removed


def _saves_of(
    base: str, objects: list[tuple[str, dict[str, Any]]]
) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """A name's objects by save id (its manifest left out)."""
    saves: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for key, info in objects:
        parts = key.removeprefix(base + "/").split("/")
        if parts[1] != MANIFEST_NAME:
            saves.setdefault(parts[1], []).append((key, info))
    return saves


def _old_saves(
    base: str, objects: list[tuple[str, dict[str, Any]]], now: _dt.datetime, grace: float
) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """A name's saves whose every object is older than ``grace`` seconds (or undated)."""
    old = {}
    for save_id, items in _saves_of(base, objects).items():
        times = [t for _, info in items if (t := _modified(info)) is not None]
        if not times or (now - max(times)).total_seconds() >= grace:
            old[save_id] = items
    return old


def _modified(info: Mapping[str, Any]) -> _dt.datetime | None:
    for field_name in ("LastModified", "last_modified", "mtime", "created"):
        value = info.get(field_name)
        if isinstance(value, _dt.datetime):
            return value if value.tzinfo else value.replace(tzinfo=_dt.UTC)
        if isinstance(value, (int, float)):
            return _dt.datetime.fromtimestamp(value, _dt.UTC)
    return None
