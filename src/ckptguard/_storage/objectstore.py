"""Checkpoints on object stores (s3://, gs://, memory://, ...) through fsspec.

Object stores have no rename, so the commit is an object, not a directory:

    ROOT/<name>/<save id>/<file>       the data objects of one save, written first
    ROOT/<name>/ckptguard.json         the manifest: written last, the commit marker

The manifest lists its files as ``<save id>/<file>``. A prefix without a manifest that
parses and verifies is invisible to list, latest and restore; so are the objects of a save
whose manifest lost (``if_exists="keep"``) or was replaced. ``clean_remote`` removes them
once they are older than a grace period.

Exactly once per name: with ``if_exists="keep"`` the manifest is written with a
create-only conditional write (``If-None-Match: *``) where the store honours it (probed
once per root: a second create of the same probe object must fail); elsewhere it is
written only if absent, then read back and our save id compared (last writer wins that
race, and the loser learns it lost). With ``"replace"`` (the manager's default) the new
manifest simply overwrites the old one (one PUT: readers see one or the other), then the
old save's objects are deleted. Retries with backoff on 5xx, throttling and 409.

Credentials come from fsspec's and boto's usual configuration (environment, config
files, ``storage_options``); they are never logged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import errno
import logging
import os
import posixpath
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import tenacity
import xxhash

from ckptguard._errors import (
    CheckpointError,
    CommitConflict,
    CorruptCheckpoint,
    SaveAborted,
    StorageError,
    UnsafeManifest,
)
from ckptguard._format.layout import MANIFEST_NAME, META_DIR, new_save_id
from ckptguard._format.manifest import FileEntry, Manifest, validate_relpath
from ckptguard._format.owner import current_writer
from ckptguard._protocol.verify import VerifyReport
from ckptguard._state.serialization import Source
from ckptguard._storage.faults import fault_point
from ckptguard._storage.local import FileDigest

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from ckptguard._coordination.base import Coordinator

__all__ = ["FsspecStorage", "clean_remote", "commit_remote", "is_url", "verify_remote"]

_log = logging.getLogger("ckptguard.objectstore")
T = TypeVar("T")

MAX_MANIFEST_BYTES = 64 << 20
READ_CHUNK = 8 << 20
UPLOAD_BLOCK = 16 << 20  # multipart part size for large files (S3's minimum is 5 MiB)
_TRANSIENT_STATUS = frozenset({409, 429, 500, 502, 503, 504})
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError",
        "ServiceUnavailable", "OperationAborted", "RequestLimitExceeded", "Conflict",
    }
)  # fmt: skip


def is_url(root: str) -> bool:
    """Whether ``root`` names an fsspec store rather than a local path."""
    return "://" in root and not root.startswith("file://")


def _status_and_code(exc: BaseException) -> tuple[int | None, str | None]:
    """The HTTP status and error code of a (botocore) error, wherever they hide."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        response = getattr(current, "response", None)
        if isinstance(response, dict):
            error = response.get("Error", {})
            meta = response.get("ResponseMetadata", {})
            status = meta.get("HTTPStatusCode")
            return (int(status) if status else None), error.get("Code")
        current = current.__cause__ or current.__context__
    return None, None


def is_transient(exc: BaseException) -> bool:
    """5xx, throttling, 409 and dropped connections: worth another try."""
    status, code = _status_and_code(exc)
    if status in _TRANSIENT_STATUS or code in _TRANSIENT_CODES:
        return True
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    text = f"{type(exc).__name__} {exc}"
    return any(s in text for s in ("SlowDown", "ServiceUnavailable", "Throttl", "EndpointConnec"))


def _retry(fn: Callable[[], T], *, what: str, path: str, deadline: float = 60.0) -> T:
    def log_retry(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        _log.warning("%s of %s failed (%s); retry %d", what, path, exc, state.attempt_number)

    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception(is_transient),
        wait=tenacity.wait_random_exponential(multiplier=0.05, max=4.0),
        stop=tenacity.stop_after_delay(deadline),
        before_sleep=log_retry,
        reraise=True,
    )
    try:
        return retrying(fn)
    except (StorageError, FileExistsError, FileNotFoundError):
        raise
    except Exception as exc:
        raise StorageError(
            f"{what} of {path} failed: {type(exc).__name__}: {exc}",
            path=path,
            hint="check the endpoint, the bucket and the credentials (fsspec/boto "
            "configuration or storage_options)",
        ) from exc


class _UploadWriter:
    """Streams to an object (multipart for large ones), hashing every byte as it goes."""

    def __init__(self, storage: FsspecStorage, path: str) -> None:
        self._path = path
        self._file: Any = storage.fs.open(storage.key(path), "wb", block_size=UPLOAD_BLOCK)
        self._hasher = xxhash.xxh3_128()
        self._size = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        for start in range(0, len(view), UPLOAD_BLOCK):  # one part at a time
            chunk = view[start : start + UPLOAD_BLOCK]
            self._hasher.update(chunk)
            self._file.write(chunk)
            self._size += len(chunk)
            fault_point("remote.uploading")

    def close(self) -> FileDigest:
        self._file.close()  # completes the (multipart) upload
        return FileDigest(self._size, self._hasher.hexdigest())

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            discard = getattr(self._file, "discard", None)  # s3fs: abort the multipart upload
            if callable(discard):
                discard()
            else:
                self._file.close()

    def __enter__(self) -> _UploadWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.abort()


class FsspecStorage:
    """The storage calls ckptguard's writers and readers make, on an fsspec filesystem.

    Paths are URLs (``s3://bucket/run/checkpoint-1/...``) or the filesystem's own keys.
    """

    durable = True

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        import fsspec  # noqa: PLC0415 - only for object-store roots

        self.url = url.rstrip("/")
        options = dict(storage_options or {})
        if self.url.split("://", 1)[0] in {"s3", "s3a"}:
            # a listing cached by another user of this filesystem object must never decide
            # whether a manifest exists
            options.setdefault("use_listings_cache", False)
        try:
            self.fs, root = fsspec.core.url_to_fs(self.url, **options)
        except ImportError as exc:
            raise ImportError(
                f"{self.url}: {exc} (fsspec needs that package for this kind of URL; for "
                "s3:// install ckptguard[s3])"
            ) from exc
        self.protocol = self.url.split("://", 1)[0]
        self.root_key = root.rstrip("/")
        self._conditional: bool | None = None

    def key(self, path: str) -> str:
        """The filesystem's key for a URL or key."""
        stripped: str = self.fs._strip_protocol(path)  # noqa: SLF001 - fsspec's own parser
        return stripped.rstrip("/")

    def url_of(self, key: str) -> str:
        return (
            f"{self.protocol}://{key.lstrip('/')}"
            if self.protocol != "memory"
            else (f"memory://{key}")
        )

    # -- the calls write_encoded and the manager make -----------------------------------
    def open_write(self, path: str, *, fsync: bool = True) -> _UploadWriter:
        del fsync  # an object is durable once its upload completes
        return _UploadWriter(self, path)

    def write_bytes(self, path: str, data: bytes, *, fsync: bool = True) -> FileDigest:
        del fsync
        key = self.key(path)
        _retry(lambda: self.fs.pipe_file(key, data), what="upload", path=path)
        return FileDigest(len(data), xxhash.xxh3_128_hexdigest(data))

    def fsync_file(self, path: str) -> None:
        del path

    def fsync_dir(self, path: str) -> None:
        del path

    def make_dir(self, path: str, *, mode: int = 0o700, exist_ok: bool = False) -> None:
        del path, mode, exist_ok  # prefixes need no creation

    def read_bytes(self, path: str, *, limit: int) -> bytes:
        key = self.key(path)

        def read() -> bytes:
            with self.fs.open(key, "rb") as f:
                data: bytes = f.read(limit + 1)
            return data

        data = _retry(read, what="download", path=path)
        if len(data) > limit:
            raise StorageError(f"{path} is larger than {limit} bytes", path=path)
        return data

    def exists(self, path: str) -> bool:
        key = self.key(path)
        return bool(_retry(lambda: self.fs.exists(key), what="look up", path=path))

    def list_dir(self, path: str) -> list[str]:
        """Names directly under a prefix, sorted; [] if there is none."""
        key = self.key(path)

        def ls() -> list[str]:
            try:
                entries = self.fs.ls(key, detail=False, refresh=True)
            except FileNotFoundError:
                return []
            return sorted({posixpath.basename(str(e).rstrip("/")) for e in entries} - {""})

        return _retry(ls, what="list", path=path)

    def find(self, path: str) -> dict[str, dict[str, Any]]:
        """Every object under a prefix: key -> info (size, last modified)."""
        key = self.key(path)

        def find() -> dict[str, dict[str, Any]]:
            with contextlib.suppress(AttributeError):
                self.fs.invalidate_cache(key)
            try:
                found: dict[str, dict[str, Any]] = self.fs.find(key, detail=True)
            except FileNotFoundError:
                return {}
            return {k: v for k, v in found.items() if v.get("type") != "directory"}

        return _retry(find, what="list", path=path)

    def remove_file(self, path: str) -> None:
        key = self.key(path)

        def rm() -> None:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(key)

        _retry(rm, what="delete", path=path)

    def remove_tree(self, path: str) -> None:
        for key in sorted(self.find(path)):
            self.remove_file(self.url_of(key))

    def hash_file(
        self, path: str, *, fsync: bool = False, progress: Callable[[int], None] | None = None
    ) -> FileDigest:
        del fsync, progress
        return self.hash_object(path)

    def walk_files(self, path: str) -> tuple[list[str], list[str]]:
        base = self.key(path)
        files = sorted(k.removeprefix(base + "/") for k in self.find(path))
        return files, []

    def set_mode(self, path: str, mode: int) -> None:
        del path, mode  # objects have no permission bits

    def rename_noreplace(self, src: str, dst: str) -> None:
        raise NotImplementedError(
            f"object stores have no rename ({src} -> {dst}); the manifest is the commit"
        )

    def open_read(self, path: str) -> Any:
        return self.fs.open(self.key(path), "rb", block_size=READ_CHUNK, cache_type="none")

    def hash_object(self, path: str) -> FileDigest:
        def run() -> FileDigest:
            hasher, size = xxhash.xxh3_128(), 0
            with self.open_read(path) as f:
                while chunk := f.read(READ_CHUNK):
                    hasher.update(chunk)
                    size += len(chunk)
            return FileDigest(size, hasher.hexdigest())

        return _retry(run, what="download", path=path)

    # -- create-only writes ----------------------------------------------------------------
    def create_only(self, path: str, data: bytes) -> bool:
        """Write ``data`` only if nothing has that name; False if something did already."""
        key = self.key(path)

        def put() -> bool:
            try:
                self.fs.pipe_file(key, data, mode="create")
            except FileExistsError:
                return False
            except OSError as exc:
                status, code = _status_and_code(exc)
                # 412 Precondition Failed; s3fs turns some into OSError(EINVAL)
                if status == 412 or code == "PreconditionFailed" or exc.errno == errno.EINVAL:
                    return False
                raise
            return True

        return _retry(put, what="conditional upload", path=path)

    def supports_create_only(self) -> bool:
        """Probe once per root: does a second create-only write of one object fail?"""
        if self._conditional is None:
            probe = f"{self.url}/{META_DIR}/probe-{uuid.uuid4().hex}"
            try:
                first = self.create_only(probe, b"1")
                second = self.create_only(probe, b"2")
                self._conditional = first and not second
            except (StorageError, TypeError, NotImplementedError, ValueError):
                self._conditional = False
            finally:
                with contextlib.suppress(StorageError):
                    self.remove_file(probe)
            _log.info(
                "%s: create-only writes %s", self.url,
                "honoured" if self._conditional else "not honoured: read back and compare",
            )  # fmt: skip
        return self._conditional


# -- commit --------------------------------------------------------------------------------
@dataclass(frozen=True)
class RemoteCommit:
    path: str
    manifest: Manifest
    outcome: str  # "committed", "replaced" or "kept" (someone else's save was there)


def _read_manifest(storage: FsspecStorage, path: str) -> Manifest | None:
    where = f"{path}/{MANIFEST_NAME}"
    try:
        data = storage.read_bytes(where, limit=MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        return None
    except StorageError:
        if storage.exists(where):
            raise
        return None
    return Manifest.from_json(data, path=where)


def commit_remote(
    storage: FsspecStorage,
    path: str,
    write: Callable[[str], Mapping[str, FileDigest]],
    *,
    step: int | None,
    metrics: Mapping[str, Any] | None,
    metadata: Mapping[str, Any] | None,
    if_exists: str,
    coordinator: Coordinator,
) -> RemoteCommit:
    """Upload a checkpoint under ``path`` and commit it with its manifest.

    Every rank calls; ``write(prefix)`` runs on rank 0 (the committer: one copy on an
    object store, which every node sees) and returns the digests of what it uploaded
    under ``prefix``. Every rank gets the same result or the same error.
    """
    name = posixpath.basename(path.rstrip("/"))
    save_id = coordinator.broadcast(new_save_id() if coordinator.rank == 0 else None)
    prefix = f"{path}/{save_id}"
    error: str | None = None
    result: dict[str, Any] | None = None
    if coordinator.rank == 0:
        try:
            digests = write(prefix)
            fault_point("remote.data_uploaded")
            entries = [
                FileEntry(validate_relpath(f"{save_id}/{rel}"), d.size, d.checksum)
                for rel, d in sorted(digests.items())
            ]
            manifest = Manifest.create(
                name=name,
                save_id=save_id,
                step=step,
                files=entries,
                writer=current_writer(tuple(range(coordinator.world_size)), coordinator.world_size),
                metrics=metrics,
                metadata=metadata,
            )
            outcome = _publish(storage, path, manifest, if_exists=if_exists)
            fault_point("remote.manifest_written")
            result = {"outcome": outcome, "manifest": manifest.to_json().decode()}
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            if coordinator.world_size == 1:
                with contextlib.suppress(Exception):
                    storage.remove_tree(prefix)
                if isinstance(exc, CheckpointError):
                    raise
                raise StorageError(
                    f"saving {path} failed: {error}",
                    path=path,
                    hint="check the endpoint, the bucket and the credentials (fsspec/boto "
                    "configuration or storage_options)",
                ) from exc
            with contextlib.suppress(Exception):
                storage.remove_tree(prefix)
    shared = coordinator.broadcast({"error": error, "result": result})
    if shared["error"] is not None:
        raise SaveAborted(
            f"saving {path} failed on rank 0: {shared['error']}",
            path=path,
            failures={0: shared["error"]},
        )
    manifest = Manifest.from_json(shared["result"]["manifest"].encode())
    return RemoteCommit(path, manifest, shared["result"]["outcome"])


def _publish(storage: FsspecStorage, path: str, manifest: Manifest, *, if_exists: str) -> str:
    """Write the manifest (the commit); remove what it replaced or what lost."""
    where = f"{path}/{MANIFEST_NAME}"
    data = manifest.to_json()
    prefix = f"{path}/{manifest.save_id}"
    if if_exists == "replace":
        old = _read_manifest_quiet(storage, path)
        storage.write_bytes(where, data)
        if old is not None and old.save_id != manifest.save_id:
            _remove_save(storage, path, old.save_id)
            return "replaced"
        return "committed"
    if if_exists == "error" and storage.exists(where):
        storage.remove_tree(prefix)
        raise CommitConflict(f"{path} already exists", path=path)
    if storage.supports_create_only():
        won = storage.create_only(where, data)
    else:
        won = not storage.exists(where)
        if won:
            storage.write_bytes(where, data)
            # No conditional write here: read back, the last writer of a race wins.
            back = _read_manifest_quiet(storage, path)
            won = back is not None and back.save_id == manifest.save_id
    if not won:
        storage.remove_tree(prefix)
        if if_exists == "error":
            raise CommitConflict(f"{path} was committed by another save", path=path)
        _log.info("%s was committed by another save; ours is discarded", path)
        return "kept"
    return "committed"


def _read_manifest_quiet(storage: FsspecStorage, path: str) -> Manifest | None:
    try:
        return _read_manifest(storage, path)
    except (UnsafeManifest, StorageError):
        return None


def _remove_save(storage: FsspecStorage, path: str, save_id: str) -> None:
    try:
        storage.remove_tree(f"{path}/{save_id}")
    except StorageError as exc:
        _log.warning("could not delete the replaced save %s/%s: %s", path, save_id, exc)


def retire_remote(storage: FsspecStorage, path: str) -> None:
    """Delete a checkpoint: its manifest first (it is invisible from then on), then data."""
    storage.remove_file(f"{path}/{MANIFEST_NAME}")
    storage.remove_tree(path)
    _log.info("deleted %s", path)


def committed_names(storage: FsspecStorage, root: str) -> list[str]:
    """Names under ``root`` that hold a manifest, from one listing.

    Prefixes without one (a save killed mid-upload, an empty prefix a store keeps
    listing) are skipped.
    """
    base = storage.key(root)
    names = set()
    for key in storage.find(root):
        parts = key.removeprefix(base + "/").split("/")
        if len(parts) == 2 and parts[1] == MANIFEST_NAME and parts[0] != META_DIR:
            names.add(parts[0])
    return sorted(names)


# -- verify --------------------------------------------------------------------------------
def verify_remote(storage: FsspecStorage, path: str, *, checksums: bool = True) -> VerifyReport:
    """Verify a checkpoint on an object store, as :func:`ckptguard.verify` does locally.

    The manifest parses and names this checkpoint; every listed object exists with its
    size (and checksum); no unlisted object lies under the save's own prefix.
    """
    problems: list[str] = []
    try:
        manifest = _read_manifest(storage, path)
    except UnsafeManifest as exc:
        return VerifyReport(path, ok=False, problems=[f"unsafe manifest: {exc.message}"])
    except StorageError as exc:
        return VerifyReport(path, ok=False, problems=[f"cannot read the manifest: {exc}"])
    if manifest is None:
        return VerifyReport(path, ok=False, problems=[f"no {MANIFEST_NAME} in {path}"])
    name = posixpath.basename(path.rstrip("/"))
    if manifest.name != name:
        problems.append(f"manifest names {manifest.name!r}, the prefix is {name!r}")
    base = storage.key(path)
    found = storage.find(f"{path}/{manifest.save_id}")
    listed = {f"{base}/{f.path}": f for f in manifest.files}
    files = checked = 0
    for key, entry in sorted(listed.items()):
        info = found.get(key)
        if info is None:
            problems.append(f"{entry.path}: missing")
            continue
        if int(info.get("size", -1)) != entry.size:
            problems.append(f"{entry.path}: size {info.get('size')}, manifest says {entry.size}")
            continue
        if checksums:
            digest = storage.hash_object(storage.url_of(key))
            checked += digest.size
            if digest.checksum != entry.checksum:
                problems.append(f"{entry.path}: checksum mismatch (content altered)")
                continue
        files += 1
    problems.extend(
        f"{key.removeprefix(base + '/')}: extra object not in the manifest"
        for key in sorted(set(found) - set(listed))
    )
    return VerifyReport(
        path,
        ok=not problems,
        problems=problems,
        manifest=manifest,
        files_checked=files,
        bytes_checked=checked,
        checksums=checksums,
    )


# -- clean ---------------------------------------------------------------------------------
def clean_remote(
    storage: FsspecStorage, root: str, *, grace: float, dry_run: bool = False
) -> list[str]:
    """Remove what no manifest references, once older than ``grace`` seconds.

    Save prefixes of a checkpoint other than the one its manifest names (a replaced save,
    a save that lost, a save killed mid-upload) and checkpoint prefixes without a
    manifest. Returns what was (or, with ``dry_run``, would be) removed.
    """
    now = _dt.datetime.now(_dt.UTC)
    removed: list[str] = []
    by_prefix: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    base = storage.key(root)
    for key, info in storage.find(root).items():
        rel = key.removeprefix(base + "/")
        parts = rel.split("/")
        if parts[0] == META_DIR or len(parts) < 2:
            continue
        by_prefix.setdefault(parts[0], []).append((key, info))
    for name, objects in sorted(by_prefix.items()):
        try:
            manifest = _read_manifest(storage, f"{root}/{name}")
        except (UnsafeManifest, StorageError) as exc:
            # A manifest that is there but cannot be read now (a 503, a newer schema):
            # its save must not be taken for an orphan. Leave the whole name alone.
            _log.warning("clean-up skips %s/%s: its manifest cannot be read: %s", root, name, exc)
            continue
        keep = manifest.save_id if manifest is not None else None
        stale: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        for key, info in objects:
            parts = key.removeprefix(base + "/").split("/")
            if parts[1] == MANIFEST_NAME or (keep is not None and parts[1] == keep):
                continue
            stale.setdefault(parts[1], []).append((key, info))
        for save_id, items in sorted(stale.items()):
            times = [t for _, info in items if (t := _modified(info)) is not None]
            if times and (now - max(times)).total_seconds() < grace:
                continue
            target = f"{root}/{name}/{save_id}"
            removed.append(target)
            if not dry_run:
                for key, _ in items:
                    storage.remove_file(storage.url_of(key))
    return removed


def _modified(info: Mapping[str, Any]) -> _dt.datetime | None:
    for field_name in ("LastModified", "last_modified", "mtime", "created"):
        value = info.get(field_name)
        if isinstance(value, _dt.datetime):
            return value if value.tzinfo else value.replace(tzinfo=_dt.UTC)
        if isinstance(value, (int, float)):
            return _dt.datetime.fromtimestamp(value, _dt.UTC)
    return None


class ObjectSource(Source):
    """An object, open for reading (ranges through the filesystem's file object)."""

    def __init__(self, storage: FsspecStorage, path: str) -> None:
        self.path = path
        self._file: Any = storage.open_read(path)
        self._size = int(storage.fs.size(storage.key(path)))

    @property
    def size(self) -> int:
        return self._size

    def pread_into(self, view: memoryview, offset: int) -> None:
        self._file.seek(offset)
        while view:
            n = self._file.readinto(view)
            if not n:
                raise CorruptCheckpoint(
                    f"{self.path}: shorter than its header says (changed while read?)",
                    path=self.path,
                )
            view = view[n:]

    def read_at_most(self, limit: int, offset: int = 0) -> bytes:
        self._file.seek(offset)
        data: bytes = self._file.read(limit)
        return data

    def checksum(self) -> str:
        self._file.seek(0)
        hasher = xxhash.xxh3_128()
        while chunk := self._file.read(READ_CHUNK):
            hasher.update(chunk)
        return hasher.hexdigest()

    def close(self) -> None:
        self._file.close()


def remote_read_args(
    storage: FsspecStorage, path: str, manifest: Manifest
) -> tuple[str, Manifest, Callable[[str], Source]]:
    """(base, manifest, opener) for ``read_state`` of a checkpoint on an object store.

    The files of the save lie under ``<path>/<save id>/``; the manifest handed back
    lists them relative to that prefix, as a local checkpoint's manifest does.
    """
    base = f"{path}/{manifest.save_id}"
    prefix = f"{manifest.save_id}/"
    files = tuple(
        FileEntry(f.path.removeprefix(prefix), f.size, f.checksum)
        for f in manifest.files
        if f.path.startswith(prefix)
    )

    def opener(rel: str) -> Source:
        return ObjectSource(storage, f"{base}/{rel}")

    return base, dataclasses.replace(manifest, files=files), opener


def check_remote_path(path: str) -> None:
    """Refuse a checkpoint name that is not a single path component."""
    name = posixpath.basename(path.rstrip("/"))
    if not name or name in {".", ".."} or "/" in name or os.sep in name:
        raise CorruptCheckpoint(f"{path}: not a checkpoint prefix", path=path)
