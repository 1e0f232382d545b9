"""Single-file checkpoints (Lightning's ``.ckpt``) on an object store, with their sidecar.

The same layout as on a filesystem (``_protocol/filecommit.py``): the object
``DIR/epoch=1-step=20.ckpt`` is the plain ``torch.save`` file, and the object
``DIR/.epoch=1-step=20.ckpt.ckptguard.json`` its sidecar (the entries it may match).

The commit, in steps:
1. the framework writes the file into a private local spool (0700), hashed as written;
2. the sidecar object is written listing the new entry, then the entry of what the name
   holds now (if anything);
3. the file is uploaded onto its name: one PUT (or one completed multipart upload), which
   readers see whole or not at all; the checksum computed while uploading must be the one
   computed while writing;
4. the sidecar is trimmed to the new entry.

Why a crash leaves a file that verifies, the old one or the new one: from step 2 on the
sidecar lists both contents; step 3 replaces the object atomically; step 4 drops the old
entry only once the new object is in place. Removal: the object, then its sidecar.

Reading: the object is downloaded into a local cache, hashed as it arrives, and must
match an entry of its sidecar; the local copy gets the sidecar beside it, so it verifies
where it is and is what the framework loads. Partial: one writer per name (Lightning saves
from global rank 0 only).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
from typing import TYPE_CHECKING, Any

import xxhash

from ckptguard._errors import CorruptCheckpoint, NoValidCheckpoint, UnsafeManifest
from ckptguard._format.layout import new_save_id, validate_name
from ckptguard._protocol.backend import backend_for, parent_of
from ckptguard._protocol.filecommit import (
    MAX_SIDECAR_BYTES,
    Sidecar,
    new_entry,
    sidecar_name,
    write_sidecar,
)
from ckptguard._protocol.marker import SPOOL_ENV
from ckptguard._storage.base import READ_CHUNK, FileDigest, innermost
from ckptguard._storage.local import LocalStorage

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import BinaryIO

    from ckptguard._format.manifest import Manifest
    from ckptguard._storage.base import Storage

__all__ = [
    "clean_file_cache",
    "commit_remote_file",
    "fetch_remote_file",
    "remote_candidates",
    "remove_remote_file",
]

_log = logging.getLogger("ckptguard.integrations.lightning")


def _split(url: str) -> tuple[str, str]:
    url = url.rstrip("/")
    return parent_of(url), validate_name(url.rsplit("/", 1)[-1])


def _storage(url: str, storage_options: Mapping[str, Any] | None) -> Storage:
    return backend_for(parent_of(url.rstrip("/")), storage_options, what="Lightning").storage


def read_remote_sidecar(storage: Storage, url: str) -> Sidecar | None:
    """The sidecar of the object at ``url`` (None: it has none); UnsafeManifest if bad."""
    head, name = _split(url)
    where = f"{head}/{sidecar_name(name)}"
    try:
        data = storage.read_bytes(where, limit=MAX_SIDECAR_BYTES)
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise UnsafeManifest(f"{where}: {exc}", path=where) from None
    sidecar = Sidecar.from_json(data, path=where)
    if sidecar.file != name:
        raise UnsafeManifest(f"{where} was written for {sidecar.file}, not {name}", path=where)
    return sidecar


def _current_entry(storage: Storage, url: str) -> Manifest | None:
    """The entry that matches what the name holds now (None: nothing to keep)."""
    if not storage.exists(url):
        return None
    try:
        sidecar = read_remote_sidecar(storage, url)
    except UnsafeManifest as exc:
        _log.warning("the sidecar of %s cannot be read (%s): replacing both", url, exc)
        return None
    if sidecar is not None and len(sidecar.entries) == 1:
        return sidecar.entries[0]
    digest = innermost(storage).hash_object(url)
    if sidecar is not None:
        return sidecar.match(digest)
    return new_entry(_split(url)[1], digest, step=None, metadata={"ckptguard": {"adopted": True}})


def _put_sidecar(storage: Storage, url: str, sidecar: Sidecar) -> None:
    head, name = _split(url)
    storage.write_bytes(f"{head}/{sidecar_name(name)}", sidecar.to_json())


def commit_remote_file(
    url: str,
    write: Callable[[BinaryIO], None],
    *,
    step: int | None,
    metadata: dict[str, Any] | None,
    storage_options: Mapping[str, Any] | None,
) -> Manifest:
    """Save the object at ``url`` with what ``write`` writes, with its sidecar (see above)."""
    storage = _storage(url, storage_options)
    _head, name = _split(url)
    spool = tempfile.mkdtemp(prefix=f"ckptguard-{name}.", dir=os.environ.get(SPOOL_ENV))
    try:
        local = os.path.join(spool, name)
        with LocalStorage().open_write(local, fsync=False) as writer:
            stream = io.BufferedWriter(_Sink(writer), buffer_size=READ_CHUNK)
            write(stream)
            stream.flush()
            digest = writer.close()
        entry = new_entry(name, digest, step=step, metadata=metadata, save_id=new_save_id())
        current = _current_entry(storage, url)
        _put_sidecar(storage, url, Sidecar(name, (entry,) if current is None else (entry, current)))
        uploaded = _upload(storage, local, url)
        if uploaded != digest:
            raise CorruptCheckpoint(
                f"{url}: the upload's checksum is not the written file's (changed while "
                "uploaded?); its sidecar does not list it",
                path=url,
            )
    finally:
        shutil.rmtree(spool, ignore_errors=True)
    if current is not None:
        try:
            _put_sidecar(storage, url, Sidecar(name, (entry,)))
        except OSError as exc:  # committed already; the two-entry sidecar is still right
            _log.warning("could not trim the sidecar of %s: %s", url, exc)
    return entry


class _Sink(io.RawIOBase):
    def __init__(self, writer: Any) -> None:
        super().__init__()
        self._writer = writer

    def writable(self) -> bool:
        return True

    def write(self, b: Any, /) -> int:
        view = memoryview(b).cast("B")
        self._writer.write(view)
        return view.nbytes


def _upload(storage: Storage, local: str, url: str) -> FileDigest:
    writer = storage.open_write(url)
    try:
        with open(local, "rb") as src:
            while chunk := src.read(READ_CHUNK):
                writer.write(chunk)
        return writer.close()
    except BaseException:
        writer.abort()
        raise


def remove_remote_file(url: str, storage_options: Mapping[str, Any] | None) -> None:
    """Delete the object at ``url``, then its sidecar."""
    storage = _storage(url, storage_options)
    head, name = _split(url)
    if storage.exists(url):
        storage.remove_file(url)
    with contextlib.suppress(FileNotFoundError):
        storage.remove_file(f"{head}/{sidecar_name(name)}")


def fetch_remote_file(url: str, storage_options: Mapping[str, Any] | None, cache: str) -> str:
    """Download the object at ``url`` into ``cache``, checked against its sidecar; its path.

    CorruptCheckpoint if its bytes match no entry of its sidecar, NoValidCheckpoint if
    it has no sidecar (written without ckptguard: not loaded from a store) or is gone.
    """
    storage = _storage(url, storage_options)
    _head, name = _split(url)
    try:
        sidecar = read_remote_sidecar(storage, url)
    except UnsafeManifest as exc:
        raise CorruptCheckpoint(f"{url}: {exc.message}", path=url) from None
    if sidecar is None and not storage.exists(url):
        raise NoValidCheckpoint(f"no checkpoint at {url}", path=url)
    if sidecar is None:
        raise NoValidCheckpoint(
            f"{url} has no checksum sidecar: not saved by ckptguard, not loaded from a store",
            path=url,
            hint="save it through AtomicCheckpointIO, or download it and load it locally",
        )
    target = os.path.join(cache, name)
    if _cached(target, sidecar):
        return target
    partial = os.path.join(cache, f".partial-{name}.{new_save_id()}")
    try:
        hasher, size = xxhash.xxh3_128(), 0
        with innermost(storage).open_read(url) as src, open(partial, "wb") as dst:
            while chunk := src.read(READ_CHUNK):
                hasher.update(chunk)
                dst.write(chunk)
                size += len(chunk)
        entry = sidecar.match(FileDigest(size, hasher.hexdigest()))
        if entry is None:
            raise CorruptCheckpoint(
                f"{url}: {size} bytes {hasher.hexdigest()} match no entry of its sidecar "
                "(corrupt on the store)",
                path=url,
            )
        with contextlib.suppress(FileNotFoundError):
            os.unlink(target)
        os.rename(partial, target)
    except FileNotFoundError as exc:
        raise NoValidCheckpoint(f"{url} is gone", path=url) from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
    write_sidecar(target, Sidecar(name, (entry,)))
    _log.info("downloaded %s into %s (checksum checked)", url, target)
    return target


def _cached(target: str, sidecar: Sidecar) -> bool:
    """Whether ``target`` holds, intact, what the store's object holds after a clean save."""
    from ckptguard._protocol.filecommit import verify_file  # noqa: PLC0415

    if not os.path.isfile(target):
        return False
    report = verify_file(target)
    return (
        report.ok
        and report.manifest is not None
        and (report.manifest.save_id == sidecar.entries[0].save_id)
    )


def clean_file_cache(cache: str, keep: str) -> None:
    """Remove the cache's other checkpoints (and their sidecars) but ``keep``'s."""
    keep_names = {keep, sidecar_name(keep)}
    for entry in os.listdir(cache):
        if entry in keep_names or entry.startswith(".partial-"):
            continue  # another rank's download may be in flight
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(cache, entry))


def remote_candidates(
    dir_url: str, storage_options: Mapping[str, Any] | None
) -> list[tuple[int | None, float, str]]:
    """(step, time, URL) of every object under ``dir_url`` with a sidecar that reads.

    Step and time are upper bounds until the object is checked (any entry may match).
    """
    import datetime as _dt  # noqa: PLC0415

    storage = backend_for(dir_url, storage_options, what="last_valid_checkpoint").storage
    base = dir_url.rstrip("/")
    try:
        names = storage.list_dir(base)
    except FileNotFoundError:
        return []
    found = []
    for entry in names:
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith(".") or not name.endswith(".ckpt"):
            continue
        url = f"{base}/{name}"
        try:
            sidecar = read_remote_sidecar(storage, url)
        except UnsafeManifest as exc:
            _log.warning("skipping %s: %s", url, exc.message)
            continue
        if sidecar is None:
            _log.warning("skipping %s: no checksum sidecar (not saved by ckptguard)", url)
            continue
        steps = [e.step for e in sidecar.entries if e.step is not None]
        when = max(_dt.datetime.fromisoformat(e.created_at).timestamp() for e in sidecar.entries)
        found.append((max(steps) if steps else None, when, url))
    return found
