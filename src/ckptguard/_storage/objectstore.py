"""fsspec object stores (s3://, gs://, memory://, ...): the storage contract on a store.

:class:`FsspecStorage` implements the same contract as ``LocalStorage``; the commit on
a store (the manifest as the commit marker) is ``ckptguard/_protocol/marker.py``.

Errors: every request is retried on 5xx, throttling, 409 and dropped connections with
the root's :class:`RetryPolicy` (backoff to its ``deadline``), and what fails for good
is mapped to the same typed errors as on a filesystem:

- 403, AccessDenied, InvalidAccessKeyId, SignatureDoesNotMatch: StoragePermissionError;
- EntityTooLarge, QuotaExceeded, 507: StorageFull;
- a missing bucket: CheckpointNotFound (``require_root``);
- an endpoint that refuses or does not answer connections for ``connect_budget``
  seconds: StorageUnreachable, one message (no retry log: retries are logged at DEBUG);
- transient errors past the deadline: TransientStorageError; anything else: StorageError.

botocore's and s3fs's own retries are turned down (one attempt, a short connect
timeout) unless ``storage_options`` set them, so that the budget above is what holds.
Credentials come from fsspec's and boto's usual configuration (the AWS environment
variables, config files, ``storage_options``); they are never logged.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import shutil
import tempfile
import time
import uuid
from typing import TYPE_CHECKING, Any, TypeVar

import tenacity
import xxhash

from ckptguard._errors import (
    CheckpointError,
    CheckpointNotFound,
    CorruptCheckpoint,
    StorageError,
    StorageFull,
    StoragePermissionError,
    StorageUnreachable,
    TransientStorageError,
)
from ckptguard._storage.base import READ_CHUNK, FileDigest, FileWriter
from ckptguard._storage.faults import fault_point
from ckptguard._storage.retry import DEFAULT_RETRY, RetryPolicy
from ckptguard._storage.transfer import (
    DEFAULT_MAX_CONCURRENCY,
    ConcurrentUpload,
    RangeStream,
    Transfers,
)

if TYPE_CHECKING:
    import io
    from collections.abc import Callable, Iterator, Mapping

__all__ = ["FsspecStorage", "ObjectSource", "ObjectTree", "StoreListing", "is_transient"]

_log = logging.getLogger("ckptguard.objectstore")
T = TypeVar("T")

PROBE_DIR = ".ckptguard"  # where the create-only probe object goes (never a checkpoint name)
UPLOAD_BLOCK = 16 << 20  # multipart part size for large files (S3's minimum is 5 MiB)
_TRANSIENT_STATUS = frozenset({409, 429, 500, 502, 503, 504})
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError",
        "ServiceUnavailable", "OperationAborted", "RequestLimitExceeded", "Conflict",
    }
)  # fmt: skip
_DENIED_CODES = frozenset(
    {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled",
     "InvalidToken", "ExpiredToken", "AccountProblem"}
)  # fmt: skip
_FULL_CODES = frozenset({"EntityTooLarge", "QuotaExceeded", "XMinioStorageFull"})
_UNREACHABLE = ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionRefused",
                "Could not connect", "Cannot connect to host", "Connect timeout")  # fmt: skip
SMALL_CACHE_ENTRIES = 4096  # manifests kept in memory by ETag (a few KiB each)
CONNECT_TIMEOUT = 3.0  # seconds per connection attempt (botocore's default is 60)
# A connection dropped while a body was streaming (aiohttp, botocore): worth another try.
_DROPPED = ("ClientPayloadError", "ServerDisconnectedError", "ContentLengthError",
            "IncompleteRead", "ResponseStreamingError", "ClientOSError")  # fmt: skip
SPOOL_SPARE = 256 << 20  # free disk a restore's spool leaves (see ObjectSource.checksum)


def _range_size(span: int, workers: int) -> int:
    """Ranges of a read: enough of them to keep every worker busy, whole MiBs."""
    mib = 1 << 20
    return max(mib, -(-max(span, 1) // workers + mib - 1) // mib * mib)


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


def _etag(info: Mapping[str, Any]) -> str | None:
    tag = info.get("ETag") or info.get("etag")
    return str(tag) if tag else None


def _chain_text(exc: BaseException) -> str:
    parts, seen = [], set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        parts.append(f"{type(current).__name__} {current}")
        current = current.__cause__ or current.__context__
    return " | ".join(parts)


def is_unreachable(exc: BaseException) -> bool:
    """A connection refused, reset before an answer, or never answered."""
    return any(s in _chain_text(exc) for s in _UNREACHABLE)


def is_transient(exc: BaseException) -> bool:
    """5xx, throttling, 409 and dropped connections: worth another try."""
    if isinstance(exc, CheckpointError):
        return False
    status, code = _status_and_code(exc)
    if status in _TRANSIENT_STATUS or code in _TRANSIENT_CODES:
        return True
    if isinstance(exc, (ConnectionError, TimeoutError)) or is_unreachable(exc):
        return True
    if any(name in _chain_text(exc) for name in _DROPPED):
        return True
    text = f"{type(exc).__name__} {exc}"
    return any(s in text for s in ("SlowDown", "ServiceUnavailable", "Throttl"))


def typed_store_error(exc: BaseException, what: str, path: str) -> StorageError:
    """The typed error for what a store request failed with, for good."""
    status, code = _status_and_code(exc)
    detail = f"{type(exc).__name__}: {exc}"
    if is_unreachable(exc):
        return StorageUnreachable(
            f"{what} of {path} failed: the endpoint cannot be reached ({detail})",
            path=path,
            errno=errno.ECONNREFUSED,
        )
    if code in _DENIED_CODES or status == 403 or isinstance(exc, PermissionError):
        return StoragePermissionError(
            f"{what} of {path} was refused ({code or status or detail})",
            path=path,
            errno=errno.EACCES,
            hint="check the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or "
            "storage_options) and the bucket's policy",
        )
    if code in _FULL_CODES or status == 507:
        return StorageFull(f"{what} of {path} failed: {code or status}", path=path,
                           errno=errno.ENOSPC)  # fmt: skip
    if is_transient(exc):
        return TransientStorageError(
            f"{what} of {path} kept failing past the retry deadline ({detail})",
            path=path,
            errno=errno.EAGAIN,
        )
    return StorageError(
        f"{what} of {path} failed: {detail}",
        path=path,
        hint="check the endpoint, the bucket and the credentials (fsspec/boto "
        "configuration or storage_options)",
    )


def _retry(
    fn: Callable[[], T], *, what: str, path: str, policy: RetryPolicy, writing: bool = False
) -> T:
    """Run one store request with the policy's retries; failures raised typed.

    FileNotFoundError passes through for reads (a missing object is an answer); for a
    write it can only mean a missing bucket, raised typed.
    """
    first_unreachable: list[float] = []

    def retry_if(exc: BaseException) -> bool:
        if not is_transient(exc):
            return False
        if is_unreachable(exc):
            now = time.monotonic()
            first_unreachable[:1] = first_unreachable[:1] or [now]
            return now - first_unreachable[0] < policy.connect_budget
        return True

    def log_retry(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        _log.debug("%s of %s failed (%s); retry %d", what, path, exc, state.attempt_number)

    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception(retry_if),
        wait=tenacity.wait_random_exponential(multiplier=policy.initial_wait, max=policy.max_wait),
        stop=tenacity.stop_after_delay(policy.deadline),
        before_sleep=log_retry,
        reraise=True,
    )
    try:
        return retrying(fn)
    except FileNotFoundError as exc:
        if writing:
            raise _missing_bucket(exc, what, path) from exc
        raise
    except (CheckpointError, FileExistsError):
        raise
    except Exception as exc:
        raise typed_store_error(exc, what, path) from exc


def _missing_bucket(exc: BaseException, what: str, path: str) -> StorageError:
    return StorageError(
        f"{what} of {path} failed: {exc} (the bucket does not exist)",
        path=path,
        errno=errno.ENOENT,
        hint="check the bucket name in the URL, or create the bucket",
    )


def _typed_upload_error(exc: BaseException, path: str) -> StorageError:
    """A streamed upload failed (the save that wrote it is redone or aborted)."""
    if isinstance(exc, CheckpointError):
        return exc if isinstance(exc, StorageError) else StorageError(str(exc), path=path)
    if isinstance(exc, FileNotFoundError):
        return _missing_bucket(exc, "upload", path)
    return typed_store_error(exc, "upload", path)


class _UploadWriter:
    """Streams to an object (multipart for large ones), hashing every byte as it goes."""

    def __init__(self, storage: FsspecStorage, path: str) -> None:
        self._storage = storage
        self._path = path
        self._file: Any = storage.fs.open(storage.key(path), "wb", block_size=UPLOAD_BLOCK)
        self._hasher = xxhash.xxh3_128()
        self._size = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        for start in range(0, len(view), UPLOAD_BLOCK):  # one part at a time
            chunk = view[start : start + UPLOAD_BLOCK]
            self._hasher.update(chunk)
            try:
                self._file.write(chunk)
            except Exception as exc:  # a part upload failed: typed, never retried here
                raise _typed_upload_error(exc, self._path) from exc
            self._size += len(chunk)
            fault_point("remote.uploading")

    def close(self) -> FileDigest:
        try:
            self._file.close()  # completes the (multipart) upload
        except Exception as exc:
            raise _typed_upload_error(exc, self._path) from exc
        return FileDigest(self._size, self._hasher.hexdigest())

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            discard = getattr(self._file, "discard", None)  # s3fs: abort the multipart upload
            if callable(discard):
                discard()
                # discard() leaves the file open: its finaliser would close() it and fail
                # on the dropped buffer ("'NoneType' object has no attribute 'tell'").
                self._file.closed = True
            else:
                self._file.close()
        # A store that made the object visible at open (fsspec's memory://, whose discard
        # does nothing) keeps a partial object: remove it.
        with contextlib.suppress(Exception):
            self._storage.remove_file(self._path)

    def __enter__(self) -> _UploadWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.abort()


class _S3Parts:
    """One object's multipart requests on s3fs, each retried alone with the root's policy.

    Each request is a coroutine run on s3fs's own event loop by the calling (worker)
    thread; s3fs's own retry loop is turned down (see FsspecStorage), so the policy holds.
    A body is sent whole again on every attempt.
    """

    def __init__(self, storage: FsspecStorage, path: str) -> None:
        self._storage, self._path = storage, path
        self._bucket, self._key, _ = storage.fs.split_path(storage.key(path))

    def _request(self, method: str, body: io.RawIOBase | None = None, **kwargs: Any) -> Any:
        from fsspec.asyn import sync  # noqa: PLC0415 - only for s3 roots

        fs = self._storage.fs
        if body is not None:
            body.seek(0)
            kwargs["Body"] = body
        return sync(fs.loop, fs._call_s3, method, Bucket=self._bucket, Key=self._key, **kwargs)  # noqa: SLF001

    def _call(self, what: str, method: str, body: io.RawIOBase | None = None, **kw: Any) -> Any:
        return _retry(
            lambda: self._request(method, body, **kw), what=what, path=self._path,
            policy=self._storage.retry, writing=True,
        )  # fmt: skip

    def start(self) -> str:
        upload_id: str = self._call("upload", "create_multipart_upload")["UploadId"]
        return upload_id

    def put_part(self, upload_id: str, number: int, body: io.RawIOBase) -> dict[str, Any]:
        out = self._call(f"upload of part {number}", "upload_part", body,
                         UploadId=upload_id, PartNumber=number)  # fmt: skip
        return {"PartNumber": number, "ETag": out["ETag"]}

    def complete(self, upload_id: str, parts: list[dict[str, Any]]) -> None:
        self._call("upload", "complete_multipart_upload", UploadId=upload_id,
                   MultipartUpload={"Parts": parts})  # fmt: skip

    def abort(self, upload_id: str) -> None:
        self._call("abort of the upload", "abort_multipart_upload", UploadId=upload_id)

    def put_whole(self, body: io.RawIOBase) -> None:
        self._call("upload", "put_object", body)


async def _s3_range_into(fs: Any, bucket: str, key: str, offset: int, view: memoryview) -> Any:
    """Fill ``view`` with the object's bytes at ``offset``; (bytes read, ETag, Content-Range)."""
    end = offset + len(view) - 1
    resp = await fs._call_s3("get_object", Bucket=bucket, Key=key, Range=f"bytes={offset}-{end}")  # noqa: SLF001
    body, pos = resp["Body"], 0
    try:
        while pos < len(view):
            chunk = await body.read(min(len(view) - pos, 1 << 20))
            if not chunk:
                break
            view[pos : pos + len(chunk)] = chunk
            pos += len(chunk)
    finally:
        body.close()
    return pos, resp.get("ETag"), resp.get("ContentRange")


def _unsupported(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it wraps) says the store has no such operation."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, NotImplementedError):
            return True
        if isinstance(seen, OSError) and seen.errno in {errno.ENOSYS, errno.EOPNOTSUPP}:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class FsspecStorage:
    """The storage contract on an fsspec filesystem.

    Paths are URLs (``s3://bucket/run/checkpoint-1/...``) or the filesystem's own keys.
    ``max_concurrency`` bounds the requests of this root in flight at once and its
    transfer memory (``transfer.py``): multipart uploads (s3) send that many parts at
    once, and reads (every store) fetch that many ranges at once.
    """

    durable = True

    def __init__(
        self,
        url: str,
        storage_options: Mapping[str, Any] | None = None,
        *,
        retry: RetryPolicy = DEFAULT_RETRY,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    ) -> None:
        import fsspec  # noqa: PLC0415 - only for object-store roots

        self.transfers = Transfers(max_concurrency)
        self._no_copy = False  # the store refused a server-side copy (see link_file)

        self.url = url.rstrip("/")
        self.retry = retry
        self.protocol = self.url.split("://", 1)[0]
        options = dict(storage_options or {})
        if self.protocol in {"s3", "s3a"}:
            # a listing cached by another user of this filesystem object must never decide
            # whether a manifest exists
            options.setdefault("use_listings_cache", False)
            # fsspec caches one filesystem per set of options, made with the environment
            # of its time (AWS_ENDPOINT_URL, keys): a later change would go unseen.
            options.setdefault("skip_instance_cache", True)
            # The retry policy decides (one clear error within connect_budget), not
            # botocore's and s3fs's own retry loops (about 65 s on a dead endpoint).
            config = dict(options.get("config_kwargs") or {})
            config.setdefault("connect_timeout", min(CONNECT_TIMEOUT, retry.connect_budget))
            config.setdefault("retries", {"total_max_attempts": 1, "mode": "standard"})
            # every transfer worker its own connection, and a few for listings and the commit
            config.setdefault("max_pool_connections", max(10, max_concurrency + 4))
            options["config_kwargs"] = config
        try:
            self.fs, root = fsspec.core.url_to_fs(self.url, **options)
        except ImportError as exc:
            raise ImportError(
                f"{self.url}: {exc} (fsspec needs that package for this kind of URL; for "
                "s3:// install ckptguard[s3])"
            ) from exc
        self.root_key = root.rstrip("/")
        if self.protocol in {"s3", "s3a"} and hasattr(self.fs, "retries"):
            self.fs.retries = 1  # s3fs's own loop (5 by default): the policy retries instead
        self._conditional: bool | None = None
        self._small: dict[tuple[str, str], bytes] = {}  # (key, ETag) -> bytes (manifests)
        # Multipart uploads with parts in flight concurrently: s3fs's requests, made by
        # ckptguard (other stores stream through fsspec's file object, one at a time).
        self.multipart = self.protocol in {"s3", "s3a"} and hasattr(self.fs, "_call_s3")

    @property
    def max_concurrency(self) -> int:
        return self.transfers.max_concurrency

    def _retry(self, fn: Callable[[], T], *, what: str, path: str) -> T:
        return _retry(fn, what=what, path=path, policy=self.retry)

    def require_root(self) -> None:
        """Raise typed unless the bucket (or the store's top level) can be reached and read."""
        bucket = self.root_key.split("/", 1)[0]
        if self.protocol == "memory" or not bucket:
            return

        def look() -> bool:
            try:
                self.fs.ls(bucket, detail=False, refresh=True)
            except FileNotFoundError:
                return False
            return True

        if not self._retry(look, what="list", path=f"{self.protocol}://{bucket}"):
            raise CheckpointNotFound(
                f"the bucket {bucket!r} of {self.url} does not exist",
                path=self.url,
                hint="check the bucket name in the URL, or create the bucket",
            )

    def open_tree(self, path: str) -> ObjectTree:
        return ObjectTree(self, path)

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
    def open_write(self, path: str, *, fsync: bool = True) -> FileWriter:
        del fsync  # an object is durable once its upload completes
        if self.multipart:
            return ConcurrentUpload(self.transfers, _S3Parts(self, path), path)
        return _UploadWriter(self, path)

    def write_bytes(self, path: str, data: bytes, *, fsync: bool = True) -> FileDigest:
        del fsync
        key = self.key(path)
        _retry(
            lambda: self.fs.pipe_file(key, data), what="upload", path=path, policy=self.retry,
            writing=True,
        )  # fmt: skip
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

        data = self._retry(read, what="download", path=path)
        if len(data) > limit:
            raise ValueError(f"{path} is larger than {limit} bytes")
        return data

    def read_small_cached(self, path: str, limit: int, etag: str | None) -> bytes:
        """A small object (a manifest), from memory if a listing gave the same ETag.

        An ETag names one content of one key (a replaced manifest has a new one), so a
        manifest read once is not read again by every later save's retention.
        """
        if etag is None:
            return self.read_bytes(path, limit=limit)
        cache_key = (self.key(path), etag)
        data = self._small.get(cache_key)
        if data is None:
            data = self.read_bytes(path, limit=limit)
            if len(self._small) >= SMALL_CACHE_ENTRIES:
                self._small.pop(next(iter(self._small)))
            self._small[cache_key] = data
        return data

    def listing(self, path: str) -> StoreListing:
        """Every object under ``path`` from one listing (see :class:`StoreListing`)."""
        return StoreListing(self, path, self.find(path))

    def exists(self, path: str) -> bool:
        """An object of that name, or a prefix with objects under it.

        Not ``fs.exists``: a store may keep listing a prefix whose objects are all gone
        (SeaweedFS does), which would make a retired checkpoint look present.
        """
        key = self.key(path)

        def is_object() -> bool:
            try:
                info = self.fs.info(key, refresh=True)
            except FileNotFoundError:
                return False
            return bool(info.get("type") != "directory")

        if self._retry(is_object, what="look up", path=path):
            return True
        return bool(self.find(path))

    def list_dir(self, path: str) -> list[str]:
        """Names directly under a prefix that hold objects, sorted; [] if there is none."""
        base = self.key(path)
        names = {k.removeprefix(base + "/").split("/", 1)[0] for k in self.find(path)}
        return sorted(names - {""})

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

        return self._retry(find, what="list", path=path)

    def remove_file(self, path: str) -> None:
        key = self.key(path)

        def rm() -> None:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(key)

        self._retry(rm, what="delete", path=path)

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

    def link_file(self, source: str, dest: str, *, try_reflink: bool = True) -> str | None:
        """A server-side copy of ``source`` at ``dest``: no byte passes through here.

        Incremental saves (``_state/reuse.py``): each checkpoint keeps objects of its own,
        so deleting one never touches another. None if ``source`` is gone.
        """
        del try_reflink
        if self._no_copy:
            return None
        src, dst = self.key(source), self.key(dest)
        try:
            self._retry(lambda: self.fs.copy(src, dst), what="copy", path=dest)
        except FileNotFoundError:
            return None
        except Exception as exc:  # uploaded instead
            if not _unsupported(exc):  # this copy only (retries ran out, access denied...)
                _log.warning("%s: server-side copy failed (%s); uploading it", dest, exc)
                return None
            self._no_copy = True  # a store without server-side copy: never asked again
            _log.warning(
                "%s: server-side copy failed (%s: %s); incremental saves upload every file",
                self.url, type(exc).__name__, exc,
            )  # fmt: skip
            return None
        return "copy"

    def open_read(self, path: str) -> Any:
        return self.fs.open(self.key(path), "rb", block_size=READ_CHUNK, cache_type="none")

    def size_of(self, path: str) -> int:
        key = self.key(path)
        return int(self._retry(lambda: self.fs.size(key), what="look up", path=path))

    def hash_object(self, path: str, size: int | None = None) -> FileDigest:
        """Stream an object through xxh3-128: ranges fetched concurrently, hashed in order."""
        size = self.size_of(path) if size is None else size
        hasher = xxhash.xxh3_128()
        for chunk in self.read_ranges(path, 0, size, total=size):
            hasher.update(chunk)
        return FileDigest(size, hasher.hexdigest())

    def read_ranges(
        self, path: str, start: int, end: int, *, total: int, etag: list[str] | None = None
    ) -> Iterator[memoryview]:
        """The bytes [start, end) of an object, in order, fetched ``max_concurrency`` at once.

        ``total`` is the object's size as listed: a store that says otherwise, or a range
        the object does not fill, raises CorruptCheckpoint. ``etag`` holds the object's
        ETag once seen (or as given): a range of another version (the object replaced
        while read) raises CorruptCheckpoint.
        """
        fetch = functools.partial(
            self.fetch_range, path, total=total, etag=etag if etag is not None else []
        )
        size = _range_size(end - start, self.max_concurrency)
        return iter(RangeStream(self.transfers, fetch, start, end, range_size=size))

    def fetch_range(
        self, path: str, offset: int, view: memoryview, *, total: int, etag: list[str]
    ) -> None:
        """Fill ``view`` with the object's bytes at ``offset`` (one ranged read, retried)."""
        key = self.key(path)

        def s3() -> tuple[int, str | None, str | None]:
            from fsspec.asyn import sync  # noqa: PLC0415 - only for s3 roots

            bucket, name, _ = self.fs.split_path(key)
            got: tuple[int, str | None, str | None] = sync(
                self.fs.loop, _s3_range_into, self.fs, bucket, name, offset, view
            )
            return got

        def other() -> tuple[int, str | None, str | None]:
            data = self.fs.cat_file(key, start=offset, end=offset + len(view))
            view[: len(data)] = data[: len(view)]
            return min(len(data), len(view)), None, None

        n, tag, content_range = self._retry(s3 if self.multipart else other,
                                            what="download", path=path)  # fmt: skip
        if n < len(view):
            raise CorruptCheckpoint(
                f"{path}: shorter than listed ({offset + n} bytes; changed while read?)",
                path=path,
            )
        if content_range is not None:
            if not str(content_range).startswith(f"bytes {offset}-"):
                raise StorageError(
                    f"download of {path}: a ranged read was answered with {content_range!r}",
                    path=path,
                    hint="the endpoint must honour HTTP Range requests",
                )
            if str(content_range).rsplit("/", 1)[-1] not in {str(total), "*"}:
                raise CorruptCheckpoint(
                    f"{path}: {content_range.rsplit('/', 1)[-1]} bytes, listed with {total} "
                    "(changed while read?)",
                    path=path,
                )
        if tag is not None:
            etag[:1] = etag[:1] or [tag]
            if etag[0] != tag:
                raise CorruptCheckpoint(
                    f"{path}: replaced while it was read (ETag {etag[0]} then {tag})", path=path
                )

    def abort_stale_uploads(self, path: str, *, grace: float, dry_run: bool = False) -> list[str]:
        """Abort multipart uploads under ``path`` begun over ``grace`` seconds ago.

        A save killed mid-upload leaves its multipart upload open: invisible, but its parts
        stay stored (and billed) until aborted. Returns ``url#upload-id`` of each one
        aborted (or, with ``dry_run``, that would be). Stores without multipart: [].
        """
        if not self.multipart:
            return []
        from fsspec.asyn import sync  # noqa: PLC0415 - only for s3 roots

        bucket, prefix, _ = self.fs.split_path(self.key(path))
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        now = time.time()
        found: list[tuple[str, str]] = []
        markers: dict[str, str] = {}
        while True:
            call = functools.partial(
                sync, self.fs.loop, self.fs._call_s3, "list_multipart_uploads",  # noqa: SLF001
                Bucket=bucket, Prefix=prefix, **markers,
            )  # fmt: skip
            page: dict[str, Any] = self._retry(call, what="list uploads", path=path)
            for upload in page.get("Uploads", []):
                started = upload.get("Initiated")
                age = now - started.timestamp() if hasattr(started, "timestamp") else 0.0
                if age >= grace:
                    found.append((upload["Key"], upload["UploadId"]))
            if not page.get("IsTruncated"):
                break
            markers = {"KeyMarker": page.get("NextKeyMarker", ""),
                       "UploadIdMarker": page.get("NextUploadIdMarker", "")}  # fmt: skip
        aborted = []
        for key, upload_id in found:
            aborted.append(f"{self.url_of(f'{bucket}/{key}')}#{upload_id}")
            if not dry_run:
                abort = functools.partial(
                    sync, self.fs.loop, self.fs._call_s3, "abort_multipart_upload",  # noqa: SLF001
                    Bucket=bucket, Key=key, UploadId=upload_id,
                )  # fmt: skip
                self._retry(abort, what="abort of the upload", path=path)
        return aborted

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

        return _retry(put, what="conditional upload", path=path, policy=self.retry, writing=True)

    def supports_create_only(self) -> bool:
        """Probe once per root: does a second create-only write of one object fail?"""
        if self._conditional is None:
            probe = f"{self.url}/{PROBE_DIR}/probe-{uuid.uuid4().hex}"
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


class ObjectSource:
    """An object, open for reading: ranges fetched concurrently, in order where read so.

    Sequential reads (``pread_into`` at the offset where the last one ended) share one
    :class:`RangeStream` that reads ahead ``max_concurrency`` ranges. :meth:`checksum`
    hashes the whole object as its ranges arrive, in order, and keeps the bytes it hashed
    in an unlinked temporary file (where the temp dir has room for them): later reads are
    served from those very bytes, so a restore downloads the object once and what reaches
    a target is what was checked. Without room, later reads download again, each range
    required to be of the same object version (ETag) as the one whose checksum was checked.
    """

    def __init__(self, storage: FsspecStorage, path: str, size: int | None = None) -> None:
        self.path = path
        self._storage = storage
        self._size = storage.size_of(path) if size is None else size
        self._etag: list[str] = []
        self._spool: int | None = None  # fd of the checked bytes
        self._stream: Iterator[memoryview] | None = None
        self._pos = 0  # where the stream is
        self._left = memoryview(b"")  # what the stream handed out and was not read yet

    @property
    def size(self) -> int:
        return self._size

    def _short(self) -> CorruptCheckpoint:
        return CorruptCheckpoint(
            f"{self.path}: shorter than its header says (changed while read?)", path=self.path
        )

    def pread_into(self, view: memoryview, offset: int) -> None:
        view = view.cast("B") if view.format != "B" else view
        if offset + len(view) > self._size:
            raise self._short()
        if self._spool is not None:
            while view:
                n = os.preadv(self._spool, [view], offset)
                if not n:
                    raise self._short()
                view, offset = view[n:], offset + n
            return
        if self._stream is None or offset != self._pos:
            self._close_stream()
            self._stream = self._storage.read_ranges(
                self.path, offset, self._size, total=self._size, etag=self._etag
            )
            self._pos = offset
        while view:
            if not self._left:
                self._left = next(self._stream, memoryview(b""))
                if not self._left:
                    raise self._short()
            n = min(len(view), len(self._left))
            view[:n] = self._left[:n]
            view, self._left, self._pos = view[n:], self._left[n:], self._pos + n

    def read_at_most(self, limit: int, offset: int = 0) -> bytes:
        out = bytearray(max(0, min(limit, self._size - offset)))
        if not out:
            return b""
        if self._spool is not None or (self._stream is not None and offset == self._pos):
            self.pread_into(memoryview(out), offset)
            return bytes(out)
        pos = 0  # a header or a tail: its own request(s); the stream stays where it is
        for chunk in self._storage.read_ranges(
            self.path, offset, offset + len(out), total=self._size, etag=self._etag
        ):
            out[pos : pos + len(chunk)] = chunk
            pos += len(chunk)
        return bytes(out)

    def checksum(self) -> str:
        self._close_stream()
        hasher = xxhash.xxh3_128()
        spool = self._open_spool()
        try:
            for chunk in self._storage.read_ranges(
                self.path, 0, self._size, total=self._size, etag=self._etag
            ):
                hasher.update(chunk)
                if spool is not None:
                    _write_all(spool, chunk)
        except BaseException:
            if spool is not None:
                os.close(spool)
            raise
        if spool is not None:
            if self._spool is not None:
                os.close(self._spool)
            self._spool = spool
        return hasher.hexdigest()

    def _open_spool(self) -> int | None:
        """An unlinked temporary file for the object's bytes, or None without room."""
        try:
            where = tempfile.gettempdir()
            if shutil.disk_usage(where).free < self._size + SPOOL_SPARE:
                _log.info("%s: no room in %s to keep it while restoring: read twice",
                          self.path, where)  # fmt: skip
                return None
            with tempfile.TemporaryFile(prefix="ckptguard-restore-", dir=where) as f:
                return os.dup(f.fileno())  # the file is unlinked; the duplicate keeps it
        except OSError as exc:
            _log.info("%s: no temporary file (%s): read twice", self.path, exc)
            return None

    def _close_stream(self) -> None:
        stream, self._stream, self._left = self._stream, None, memoryview(b"")
        close = getattr(stream, "close", None)
        if callable(close):
            close()

    def close(self) -> None:
        self._close_stream()
        if self._spool is not None:
            os.close(self._spool)
            self._spool = None


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data) :]


class ObjectTree:
    """One checkpoint on a store: one listing of its prefix, then reads by key."""

    def __init__(
        self,
        storage: FsspecStorage,
        path: str,
        found: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        self.path = path.rstrip("/")
        self._storage = storage
        self._base = storage.key(self.path)
        if found is None:
            found = storage.find(self.path)
        self._etags = {
            key.removeprefix(self._base + "/"): tag for key, info in found.items()
            if (tag := _etag(info))
        }  # fmt: skip
        if not found:
            raise CheckpointNotFound(f"{self.path} does not exist (no objects)", path=self.path)
        self._sizes = {
            key.removeprefix(self._base + "/"): int(info.get("size", -1))
            for key, info in found.items()
        }

    def read_small(self, rel: str, limit: int) -> bytes:
        size = self._sizes.get(rel)
        if size is None:
            raise FileNotFoundError(errno.ENOENT, "no such object", f"{self.path}/{rel}")
        if size > limit:
            raise ValueError(f"{rel} is {size} bytes: too large")
        data = self._storage.read_small_cached(f"{self.path}/{rel}", limit, self._etags.get(rel))
        if len(data) > limit:
            raise ValueError(f"{rel} grew over {limit} bytes while read: too large")
        return data

    def entries(self, under: str, problem: Callable[[str], None]) -> dict[str, int]:
        del problem  # objects are never links or devices
        return {rel: size for rel, size in self._sizes.items() if rel.startswith(under)}

    def digest(self, rel: str, progress: Callable[[int], None] | None = None) -> FileDigest:
        size = self._sizes.get(rel)
        digest = self._storage.hash_object(
            f"{self.path}/{rel}", size if size is not None and size >= 0 else None
        )
        if progress is not None:
            progress(digest.size)
        return digest

    def open(self, rel: str) -> ObjectSource:
        if rel not in self._sizes:
            raise FileNotFoundError(errno.ENOENT, "no such object", f"{self.path}/{rel}")
        return ObjectSource(self._storage, f"{self.path}/{rel}", self._sizes[rel])

    def close(self) -> None:
        return None


class StoreListing:
    """A root's objects as one listing saw them: names, checkpoint trees and pins from it.

    Retention, ``latest()`` and start-up look at every checkpoint of a root; one listing
    (ListObjectsV2 pages of 1000 keys) answers which names hold a manifest, each
    checkpoint's object sizes and which pin markers exist, and manifests are read once per
    ETag (``read_small_cached``): the requests of a save do not grow with the number of
    checkpoints. What must be current (a commit's create-only write, "was it removed
    while checked") never asks a listing.
    """

    def __init__(
        self, storage: FsspecStorage, path: str, found: Mapping[str, Mapping[str, Any]]
    ) -> None:
        self.path = path.rstrip("/")
        self._storage = storage
        self._base = storage.key(self.path)
        self._found = {k: v for k, v in found.items() if k.startswith(self._base + "/")}

    def _key(self, path: str) -> str:
        key = self._storage.key(path)
        if key != self._base and not key.startswith(self._base + "/"):
            raise ValueError(f"{path} is not under the listed {self.path}")
        return key

    def under(self, path: str) -> dict[str, Mapping[str, Any]]:
        """Objects under ``path`` (the listed root or a prefix inside it)."""
        prefix = self._key(path) + "/"
        return {k: v for k, v in self._found.items() if k.startswith(prefix)}

    def exists(self, path: str) -> bool:
        """Whether the listing saw an object named ``path`` or objects under it."""
        return self._key(path) in self._found or bool(self.under(path))

    def open_tree(self, path: str) -> ObjectTree:
        return ObjectTree(self._storage, path, self.under(path))
