"""Single-file checkpoints: the checksum sidecar, the file commit, and verification.

A framework that saves one file per checkpoint (Lightning's ``epoch=1-step=20.ckpt``)
keeps a plain file that its own tools load (``torch.load``, ``load_from_checkpoint``, a
Trainer without ckptguard); ckptguard adds a hidden sidecar next to it::

    DIR/
      epoch=1-step=20.ckpt                     the file, exactly as the framework wrote it
      .epoch=1-step=20.ckpt.ckptguard.json     its sidecar
      .epoch=1-step=20.ckpt.<save id>.tmp      a save in progress, or left by a crash

The sidecar (strict JSON, never pickle) names its file and holds one or two *entries*,
newest first. Each entry is a ckptguard manifest of a one-file checkpoint (size, xxh3-128
checksum, step, writer, versions; self-checksummed, parsed by the manifest's strict
parser): the file verifies when its bytes match one entry, and that entry gives its step.
The sidecar's name starts with a dot and does not end in ``.ckpt``, so Lightning's
``ModelCheckpoint`` (which lists ``*.ckpt`` and ``last*.ckpt``) never takes it for a
checkpoint.

The commit (:func:`commit_file`), in named steps (:data:`FILE_FAULT_POINTS`):
1. write the content to the temp file, hashing while writing; fsync it  [file.written]
2. write the sidecar: the new entry, then the entry of what the name holds now (if
   anything); temp name, fsync, rename, directory fsync  [file.sidecar_written]
3. rename the temp file onto the name: renameat2(RENAME_NOREPLACE) for a new name, one
   atomic rename(2) over a file or symlink already there; a directory in the way is
   first moved aside by the caller's ``make_way`` [file.made_way]  [file.renamed]
4. fsync the directory: the save is durable  [file.committed]
5. trim the sidecar to the new entry (temp, fsync, rename; no directory fsync: the
   two-entry sidecar it may fall back to is still right).

Why a crash anywhere leaves a file that verifies, the old one or the new one: at every
instant the sidecar lists an entry for what the name holds. Until step 2's rename, the old
sidecar describes the old file; from then on the sidecar lists both contents, so the
rename of step 3 (atomic: the name holds the old file or the new one, never a mix) may
land or not; step 5 drops the old entry only after the new file is in place. The sidecar
is durable before the rename, so a file never appears without a sidecar describing it.
What "the entry of what the name holds now" is: the sidecar's only entry after a clean
save; after a crashed save (two entries) or for a file written without ckptguard (no
sidecar: it is *adopted*, its entry marked so), the current file is hashed once to know.

Removal (:func:`remove_file`): the file first, a directory fsync, then the sidecar. A crash
between leaves a sidecar without a file (garbage that the next save of the name
overwrites), never a file without its sidecar, which would pass for one written without
ckptguard.

A file without a sidecar was written without ckptguard: it cannot be verified, only checked
to be a complete zip archive holding ``data.pkl``, the format of ``torch.save``
(:func:`zip_problem`; a truncated file fails it).

Partial guarantees:
- one writer per name: two processes saving the same name at the same moment may leave a
  sidecar that matches neither file (it then fails verification; it never verifies
  wrongly). Lightning saves from global rank 0 only;
- where the filesystem lacks renameat2, a new name is committed by check-then-rename
  (see ``LocalStorage.rename_noreplace``);
- temp files are removed when their writer is gone from this host (its pid, from the save
  id) or after ``DEFAULT_STALE_AFTER`` unchanged: a writer with the same host name in
  another pid namespace, stalled for ``OWNERLESS_GRACE``, could be taken for dead.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import stat
import time
import zipfile
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, BinaryIO

from ckptguard._errors import CommitConflict, UnsafeManifest
from ckptguard._format.layout import (
    host_hash,
    is_save_id,
    new_save_id,
    save_id_writer,
    validate_name,
)
from ckptguard._format.manifest import FileEntry, Manifest, strict_json_document
from ckptguard._format.owner import current_writer
from ckptguard._protocol.cleanup import DEFAULT_STALE_AFTER, OWNERLESS_GRACE
from ckptguard._protocol.verify import VerifyReport
from ckptguard._storage.base import FileDigest
from ckptguard._storage.faults import FILE_FAULT_POINTS, fault_point
from ckptguard._storage.local import LocalStorage, digest_fd

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from _typeshed import ReadableBuffer

    from ckptguard._storage.base import FileWriter

__all__ = [
    "FILE_FAULT_POINTS",
    "SIDECAR_FORMAT",
    "SIDECAR_SUFFIX",
    "Sidecar",
    "commit_file",
    "is_sidecar_name",
    "new_entry",
    "open_verified",
    "parse_temp_name",
    "read_sidecar",
    "remove_file",
    "remove_stale_temps",
    "sidecar_name",
    "sidecar_path",
    "temp_name",
    "verify_file",
    "write_sidecar",
    "zip_problem",
]

_log = logging.getLogger("ckptguard.sidecar")

SIDECAR_FORMAT = "ckptguard-sidecar"
SIDECAR_SCHEMA_VERSION = 1
SIDECAR_SUFFIX = ".ckptguard.json"
TEMP_SUFFIX = ".tmp"
MAX_SIDECAR_BYTES = 1 << 20  # two entries take ~2 KiB; larger is corrupt or hostile
MAX_ENTRIES = 8  # ckptguard writes at most 2; a few more are read, for later versions
SIDECAR_BYTES_PER_CONTAINER = 4
WRITE_BUFFER = 1 << 20  # torch.save's many small header writes, coalesced
_SIDECAR_KEYS = frozenset({"format", "schema_version", "file", "entries"})
_TEMP_RE = re.compile(r"\.(?P<name>.+)\.(?P<save_id>[^./]+)" + re.escape(TEMP_SUFFIX))


# -- names ---------------------------------------------------------------------------------
def sidecar_name(name: str) -> str:
    """The sidecar's name for the file ``name``: ``.<name>.ckptguard.json``."""
    return f".{name}{SIDECAR_SUFFIX}"


def sidecar_path(path: str | os.PathLike[str]) -> str:
    """The sidecar's path for the file at ``path`` (in the same directory)."""
    head, name = os.path.split(os.fspath(path))
    return os.path.join(head, sidecar_name(name))


def is_sidecar_name(entry: str) -> bool:
    """Whether a directory entry is named like a sidecar."""
    return entry.startswith(".") and entry.endswith(SIDECAR_SUFFIX) and len(entry) > 16


def temp_name(name: str, save_id: str) -> str:
    """The temp name of a save of ``name`` (data or sidecar): ``.<name>.<save id>.tmp``."""
    return f".{name}.{save_id}{TEMP_SUFFIX}"


def parse_temp_name(entry: str) -> tuple[str, str] | None:
    """(name, save id) of a temp file made by :func:`temp_name`; None if not one."""
    match = _TEMP_RE.fullmatch(entry)
    if match is None or not is_save_id(match.group("save_id")):
        return None
    return match.group("name"), match.group("save_id")


# -- the sidecar ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Sidecar:
    """A file's sidecar: the file's name and the entries it may match, newest first."""

    file: str
    entries: tuple[Manifest, ...]

    def match(self, digest: FileDigest, *, checksums: bool = True) -> Manifest | None:
        """The entry whose size (and checksum) ``digest`` has; None if there is none."""
        for entry in self.entries:
            (f,) = entry.files
            if f.size == digest.size and (not checksums or f.checksum == digest.checksum):
                return entry
        return None

    def to_json(self) -> bytes:
        body = {
            "format": SIDECAR_FORMAT,
            "schema_version": SIDECAR_SCHEMA_VERSION,
            "file": self.file,
            "entries": [json.loads(e.to_json()) for e in self.entries],
        }
        return (json.dumps(body, indent=1, ensure_ascii=False, allow_nan=False) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, *, path: str | None = None) -> Sidecar:
        """Parse and validate a sidecar; any defect raises :class:`UnsafeManifest`."""
        try:
            return _parse(data)
        except UnsafeManifest as exc:
            raise UnsafeManifest(exc.message, path=path) from None


def _reject(message: str) -> UnsafeManifest:
    return UnsafeManifest(f"invalid sidecar: {message}")


def _parse(data: bytes) -> Sidecar:
    obj = strict_json_document(
        data,
        what="sidecar",
        max_bytes=MAX_SIDECAR_BYTES,
        bytes_per_container=SIDECAR_BYTES_PER_CONTAINER,
        fmt=SIDECAR_FORMAT,
        version=SIDECAR_SCHEMA_VERSION,
    )
    if set(obj) != _SIDECAR_KEYS:
        raise _reject(f"keys must be {sorted(_SIDECAR_KEYS)}, got {sorted(obj)}")
    name = obj["file"]
    try:
        validate_name(name)
    except ValueError:
        raise _reject(f"file {name!r} is not a valid checkpoint name") from None
    raw_entries = obj["entries"]
    if not isinstance(raw_entries, list) or not 1 <= len(raw_entries) <= MAX_ENTRIES:
        raise _reject(f"entries must be a list of 1 to {MAX_ENTRIES} manifests")
    entries = []
    for i, raw in enumerate(raw_entries):
        if not isinstance(raw, dict):
            raise _reject(f"entries[{i}] must be an object")
        try:
            # The manifest's own bytes, as its strict parser (and self-checksum) expects.
            text = json.dumps(raw, indent=1, ensure_ascii=False, allow_nan=False) + "\n"
            entry = Manifest.from_json(text.encode())
        except UnsafeManifest as exc:
            raise _reject(f"entries[{i}]: {exc.message}") from None
        except (ValueError, RecursionError) as exc:
            raise _reject(f"entries[{i}] cannot be re-encoded ({type(exc).__name__})") from None
        if entry.name != name or [f.path for f in entry.files] != [name]:
            raise _reject(f"entries[{i}] describes {entry.name!r}, not the file {name!r} alone")
        entries.append(entry)
    sidecar = Sidecar(name, tuple(entries))
    if sidecar.to_json() != bytes(data):
        # Each entry's checksum covers its content; this covers the rest, byte for byte.
        raise _reject("its bytes are not those ckptguard wrote for its content (altered)")
    return sidecar


def new_entry(
    name: str,
    digest: FileDigest,
    *,
    step: int | None,
    metadata: dict[str, Any] | None = None,
    save_id: str | None = None,
) -> Manifest:
    """A sidecar entry for the file ``name`` with ``digest``'s size and checksum."""
    return Manifest.create(
        name=name,
        save_id=save_id or new_save_id(),
        step=step,
        files=[FileEntry(name, digest.size, digest.checksum)],
        writer=current_writer(),
        metadata=metadata,
    )


def read_sidecar(path: str | os.PathLike[str]) -> Sidecar | None:
    """The sidecar of the file at ``path``; None if it has none.

    UnsafeManifest when it cannot be trusted (malformed, a symlink, too large, or written
    for another file); OSError when it cannot be read.
    """
    path = os.fspath(path)
    where = sidecar_path(path)
    try:
        data = LocalStorage().read_bytes(where, limit=MAX_SIDECAR_BYTES)
    except FileNotFoundError:
        return None
    except ValueError as exc:  # over the size limit, or not a regular file
        raise UnsafeManifest(f"{where}: {exc}", path=where) from None
    except OSError:
        if os.path.islink(where):
            raise UnsafeManifest(f"{where} is a symlink: not read", path=where) from None
        raise
    sidecar = Sidecar.from_json(data, path=where)
    if sidecar.file != os.path.basename(path):
        raise UnsafeManifest(
            f"{where} was written for {sidecar.file}, not {os.path.basename(path)}", path=where
        )
    return sidecar


def write_sidecar(path: str | os.PathLike[str], sidecar: Sidecar, *, sync_dir: bool = True) -> None:
    """Replace the sidecar of ``path`` atomically: temp name, fsync, rename(2), dir fsync."""
    path = os.path.abspath(os.fspath(path))
    head = os.path.dirname(path)
    storage = LocalStorage()
    tmp = os.path.join(head, temp_name(sidecar.file, new_save_id()))
    try:
        storage.write_bytes(tmp, sidecar.to_json())
        os.replace(tmp, sidecar_path(path))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if sync_dir:
        storage.fsync_dir(head)


# -- the commit ----------------------------------------------------------------------------
class _RawSink(io.RawIOBase):
    """The temp file's writer as a raw stream (checksummed while written)."""

    def __init__(self, writer: FileWriter) -> None:
        super().__init__()
        self._writer: FileWriter | None = writer

    def writable(self) -> bool:
        return True

    def write(self, b: ReadableBuffer, /) -> int:
        view = memoryview(b).cast("B")
        if self._writer is not None:
            self._writer.write(view)
        return view.nbytes

    def release(self) -> None:
        """Drop later writes: the buffer a failed save leaves, flushed at garbage collection."""
        self._writer = None


def commit_file(
    path: str | os.PathLike[str],
    write: Callable[[BinaryIO], None],
    *,
    step: int | None,
    metadata: dict[str, Any] | None = None,
    make_way: Callable[[str], None] | None = None,
) -> Manifest:
    """Save the file at ``path`` with what ``write`` writes, atomically and checksummed.

    ``write`` is called once with a binary stream (``torch.save(obj, f)``). An existing
    file or symlink at ``path`` is replaced in one atomic step. A directory in the way is
    handed to ``make_way`` just before the rename (it must move it away); without one,
    it is a :class:`CommitConflict`. Returns the new sidecar entry. The steps and why a
    crash leaves the old or the new file, verifying, are in the module docstring.
    """
    path = os.path.abspath(os.fspath(path))
    head, name = os.path.split(path)
    validate_name(name)
    storage = LocalStorage()
    remove_stale_temps(head)
    save_id = new_save_id()
    tmp = os.path.join(head, temp_name(name, save_id))
    try:
        with storage.open_write(tmp) as writer:
            sink = _RawSink(writer)
            try:
                stream = io.BufferedWriter(sink, buffer_size=WRITE_BUFFER)
                write(stream)
                stream.flush()
            finally:
                sink.release()
            digest = writer.close()
        fault_point("file.written")
        entry = new_entry(name, digest, step=step, metadata=metadata, save_id=save_id)
        current = _current_entry(path)
        write_sidecar(path, Sidecar(name, (entry,) if current is None else (entry, current)))
        fault_point("file.sidecar_written")
        _rename_into_place(storage, tmp, path, make_way)
    except Exception:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fault_point("file.renamed")
    storage.fsync_dir(head)
    fault_point("file.committed")
    if current is not None:
        try:
            write_sidecar(path, Sidecar(name, (entry,)), sync_dir=False)
        except OSError as exc:  # committed already; the two-entry sidecar is still right
            _log.warning("could not trim the sidecar of %s: %s", path, exc)
    return entry


def _current_entry(path: str) -> Manifest | None:
    """The sidecar entry that matches what ``path`` holds now (None: nothing to keep).

    A symlink, a directory or nothing: None (a link's target keeps its own sidecar). A
    file whose sidecar cannot be read, or matches none of its entries, did not verify
    before this save either: None.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    try:
        sidecar = read_sidecar(path)
    except (UnsafeManifest, OSError) as exc:
        _log.warning("the sidecar of %s cannot be read (%s): replacing both", path, exc)
        return None
    if sidecar is not None and len(sidecar.entries) == 1:
        return sidecar.entries[0]  # after a clean save: no need to read the file
    digest = LocalStorage().hash_file(path)
    if sidecar is not None:
        return sidecar.match(digest)
    # Written without ckptguard: adopted, so that a crash before the rename leaves it
    # loadable rather than refused for not matching the new sidecar.
    return new_entry(
        os.path.basename(path), digest, step=None, metadata={"ckptguard": {"adopted": True}}
    )


def _rename_into_place(
    storage: LocalStorage, tmp: str, path: str, make_way: Callable[[str], None] | None
) -> None:
    try:
        st: os.stat_result | None = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None and stat.S_ISDIR(st.st_mode):
        if make_way is None:
            raise CommitConflict(
                f"{path} is a directory: the checkpoint file was not put in its place",
                path=path,
                hint="move the directory away, or save under another name",
            )
        make_way(path)
        fault_point("file.made_way")
        st = None
    if st is not None:
        os.replace(tmp, path)  # a file or a symlink: replaced in one atomic rename(2)
        return
    try:
        storage.rename_noreplace(tmp, path)
    except FileExistsError:
        raise CommitConflict(
            f"{path} appeared while it was being saved (another writer?): not replaced",
            path=path,
            hint="save each checkpoint name from one process",
        ) from None


def remove_file(path: str | os.PathLike[str]) -> None:
    """Delete a file checkpoint (or a link to one) and its sidecar, the file first."""
    path = os.path.abspath(os.fspath(path))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    LocalStorage().fsync_dir(os.path.dirname(path))
    fault_point("file.removed")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(sidecar_path(path))


def remove_stale_temps(dirpath: str, *, stale_after: float = DEFAULT_STALE_AFTER) -> list[str]:
    """Remove the temp files of saves whose writer is gone; returns their paths."""
    removed: list[str] = []
    try:
        entries = os.listdir(dirpath)
    except FileNotFoundError:
        return removed
    for entry in entries:
        parsed = parse_temp_name(entry)
        if parsed is None:
            continue
        path = os.path.join(dirpath, entry)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        # A change time in the future (another host's clock) counts as now.
        age = max(0.0, time.time() - st.st_mtime)
        if not stat.S_ISREG(st.st_mode) or not _writer_gone(parsed[1], age, stale_after):
            continue
        try:
            os.unlink(path)
        except FileNotFoundError:
            continue
        except OSError as exc:  # one stuck leftover must not fail a save
            _log.warning("could not remove the stale temp file %s: %s", path, exc)
            continue
        _log.info("removed %s, left by a save whose writer is gone", path)
        removed.append(path)
    return removed


def _writer_gone(save_id: str, age: float, stale_after: float) -> bool:
    if age >= stale_after:
        return True
    origin = save_id_writer(save_id)
    if age < OWNERLESS_GRACE or origin is None or origin[0] != host_hash():
        return False
    if origin[1] == os.getpid():
        return False  # this process: a save in another thread
    try:
        os.kill(origin[1], 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError, ValueError):
        return False  # alive as another user's process, or an absurd pid
    return False


# -- verification --------------------------------------------------------------------------
def zip_problem(f: IO[bytes]) -> str | None:
    """Why ``f`` is not a complete ``torch.save`` archive (None: it is one).

    Structure only: the zip's central directory parses and lists a ``data.pkl``. A file
    cut short loses its central directory; damage inside the data is not seen.
    """
    try:
        with zipfile.ZipFile(f) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        return f"not a complete zip archive ({exc}): truncated, or not a torch.save file"
    if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        return "a zip archive without data.pkl: not a torch.save file"
    return None


@contextlib.contextmanager
def open_verified(
    path: str | os.PathLike[str], *, checksums: bool = True
) -> Iterator[tuple[VerifyReport, BinaryIO | None]]:
    """Check the file at ``path``; yields the report and the file, open at its start.

    Load from the yielded file (None if it could not be opened): what is loaded is then
    the very file that was checked, even if the name is replaced meanwhile. See
    :func:`verify_file` for the report.
    """
    path = os.fspath(path)
    where = sidecar_path(path)
    # The sidecar first, then the file: a replace committed in between leaves a sidecar
    # that lists the new content too, and one re-read covers a replace after the open.
    sidecar: Sidecar | None = None
    sidecar_error: str | None = None
    try:
        sidecar = read_sidecar(path)
    except UnsafeManifest as exc:
        sidecar_error = exc.message
    except OSError as exc:
        sidecar_error = f"cannot read {where} ({exc.strerror or exc})"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        if os.path.islink(path):
            problem = f"{path} is a symlink (-> {os.readlink(path)}): verify its target"
        elif isinstance(exc, FileNotFoundError):
            problem = f"{path} does not exist"
        else:
            problem = f"cannot open {path} ({exc.strerror or exc})"
        yield VerifyReport(path, ok=False, problems=[problem], extra={"form": "file"}), None
        return
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            problem = f"{path} is not a regular file"
            yield VerifyReport(path, ok=False, problems=[problem], extra={"form": "file"}), None
            return
        report = _check(path, f, sidecar, sidecar_error, checksums=checksums)
        f.seek(0)
        yield report, f


def _check(
    path: str,
    f: BinaryIO,
    sidecar: Sidecar | None,
    sidecar_error: str | None,
    *,
    checksums: bool,
) -> VerifyReport:
    where = sidecar_path(path)
    extra: dict[str, object] = {"form": "file", "sidecar": where}
    if sidecar_error is not None:
        return VerifyReport(path, ok=False, problems=[sidecar_error], extra=extra)
    if sidecar is None:
        structure = zip_problem(f)
        problems = [
            (
                f"{path} has no checksum sidecar ({os.path.basename(where)}): written "
                "without ckptguard, it was not checksummed and cannot be verified"
            )
        ]
        if structure is not None:
            problems.append(f"{path}: {structure}")
        extra.update(sidecar=None, structure=structure)
        return VerifyReport(path, ok=False, problems=problems, extra=extra)
    size_only = FileDigest(os.fstat(f.fileno()).st_size, "")
    digest = digest_fd(f.fileno()) if checksums else size_only
    entry = sidecar.match(digest, checksums=checksums)
    if entry is None:
        with contextlib.suppress(UnsafeManifest, OSError):
            sidecar = read_sidecar(path) or sidecar
        entry = sidecar.match(digest, checksums=checksums)
    extra.update(size=digest.size, checksum=digest.checksum if checksums else None)
    if entry is None:
        expected = ", ".join(
            f"{e.files[0].size} bytes {e.files[0].checksum}" for e in sidecar.entries
        )
        found = f"{digest.size} bytes" + (f" {digest.checksum}" if checksums else "")
        problem = (
            f"{os.path.basename(path)}: {found}, but its sidecar lists {expected}: altered "
            "or corrupt (or rewritten without ckptguard: then delete the sidecar to load it "
            "unverified)"
        )
        return VerifyReport(
            path,
            ok=False,
            problems=[problem],
            bytes_checked=digest.size if checksums else 0,
            checksums=checksums,
            extra=extra,
        )
    flags = entry.metadata.get("ckptguard", {})
    extra["adopted"] = isinstance(flags, dict) and flags.get("adopted") is True
    return VerifyReport(
        path,
        ok=True,
        problems=[],
        manifest=entry,
        files_checked=1,
        bytes_checked=digest.size if checksums else 0,
        checksums=checksums,
        extra=extra,
    )


def verify_file(path: str | os.PathLike[str], *, checksums: bool = True) -> VerifyReport:
    """Verify a single-file checkpoint against its sidecar.

    ``ok`` when the file's size and xxh3-128 checksum (size only with
    ``checksums=False``) match an entry of its sidecar; ``manifest`` is that entry (its
    ``step``, writer, versions). ``extra``: ``form`` ("file"), ``sidecar`` (its path, None
    when there is none), ``size`` and ``checksum`` found, ``adopted`` (the entry was made
    for a file written without ckptguard, when a save replaced it), and for a file without
    sidecar ``structure`` (:func:`zip_problem`'s verdict: None when it is complete).
    """
    with open_verified(path, checksums=checksums) as (report, _):
        return report
