"""Verification of a committed checkpoint against its manifest.

A checkpoint verifies when its manifest parses strictly, every listed file exists as a
regular file with the listed size and xxh3-128 checksum, and no other file, symlink or
special file is present. Every file is opened relative to the checkpoint's directory
descriptor with O_NOFOLLOW on each component, so a symlink planted anywhere in the tree
is reported, never followed.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ckptguard._errors import UnsafeManifest, storage_error_from_os
from ckptguard._format.layout import ACCELERATE_NAMING, HF_NAMING, MANIFEST_NAME
from ckptguard._format.manifest import MAX_MANIFEST_BYTES, Manifest
from ckptguard._storage.local import digest_fd

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["VerifyReport", "open_checkpoint_file", "read_manifest", "verify"]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
MAX_PROBLEMS = 100
MAX_DEPTH = 64  # directories inside a checkpoint; deeper is hostile, not a model


@dataclass(frozen=True)
class VerifyReport:
    """The outcome of verifying one checkpoint; ``ok`` is True only with no problems."""

    path: str
    ok: bool
    problems: list[str]
    manifest: Manifest | None = None
    files_checked: int = 0
    bytes_checked: int = 0
    checksums: bool = True
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def step(self) -> int | None:
        return self.manifest.step if self.manifest else None


class _Problems(list[str]):
    def add(self, text: str) -> None:
        if len(self) < MAX_PROBLEMS:
            self.append(text)
        elif len(self) == MAX_PROBLEMS:
            self.append("... more problems not shown")


def _open_dir(path: str) -> int:
    return os.open(path, _DIR_FLAGS)


def _open_relative(dir_fd: int, rel: str) -> int:
    """Open ``rel`` under ``dir_fd`` without following a symlink at any component."""
    parts = rel.split("/")
    fd = os.dup(dir_fd)
    try:
        for part in parts[:-1]:
            nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nxt
        return os.open(parts[-1], _FILE_FLAGS, dir_fd=fd)
    finally:
        os.close(fd)


def open_checkpoint_file(checkpoint: str, rel: str) -> int:
    """Open file ``rel`` of a checkpoint read-only, refusing symlinks at every component."""
    dir_fd = _open_dir(checkpoint)
    try:
        return _open_relative(dir_fd, rel)
    finally:
        os.close(dir_fd)


def _read_manifest_fd(dir_fd: int, path: str) -> Manifest:
    try:
        fd = os.open(MANIFEST_NAME, _FILE_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        raise UnsafeManifest(f"no {MANIFEST_NAME} in {path}", path=path) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeManifest(f"{MANIFEST_NAME} is a symlink", path=path) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeManifest(f"{MANIFEST_NAME} is not a regular file", path=path)
        if st.st_size > MAX_MANIFEST_BYTES:
            raise UnsafeManifest(f"{MANIFEST_NAME} is {st.st_size} bytes: too large", path=path)
        # Loop: one read(2) may return less (FUSE direct_io, network filesystems, signals).
        chunks, total = [], 0
        # Ask for what fstat says (+1 to see growth), not the cap: read(2) of n bytes
        # allocates n bytes first, and a manifest is usually a few KiB.
        limit = MAX_MANIFEST_BYTES + 1
        while chunk := os.read(fd, min(limit - total, max(st.st_size + 1 - total, 65536))):
            chunks.append(chunk)
            total += len(chunk)
            if total > MAX_MANIFEST_BYTES:
                break
        data = b"".join(chunks)
    finally:
        os.close(fd)
    return Manifest.from_json(data, path=os.path.join(path, MANIFEST_NAME))


def read_manifest(path: str) -> Manifest:
    """Read and strictly parse the manifest of the checkpoint directory ``path``."""
    try:
        dir_fd = _open_dir(path)
    except OSError as exc:
        if exc.errno in {errno.ELOOP, errno.ENOTDIR}:
            raise UnsafeManifest(f"{path} is a symlink or not a directory", path=path) from None
        raise
    try:
        return _read_manifest_fd(dir_fd, path)
    except (UnsafeManifest, FileNotFoundError):
        raise
    except OSError as exc:
        raise storage_error_from_os(exc, f"reading {MANIFEST_NAME}", path) from exc
    finally:
        os.close(dir_fd)


def _tree(dir_fd: int, problems: _Problems, found: set[str]) -> None:
    """Every regular file under ``dir_fd``; symlinks, specials and too-deep trees are problems."""
    stack: list[tuple[int, str, int]] = [(os.dup(dir_fd), "", 0)]
    while stack:
        fd, prefix, depth = stack.pop()
        try:
            with os.scandir(fd) as it:
                entries = list(it)
            for entry in entries:
                rel = f"{prefix}{entry.name}"
                if entry.is_symlink():
                    problems.add(f"{rel}: is a symlink")
                elif entry.is_dir(follow_symlinks=False):
                    if depth + 1 > MAX_DEPTH:
                        problems.add(f"{rel}/: nested deeper than {MAX_DEPTH} directories")
                        continue
                    try:
                        sub = os.open(entry.name, _DIR_FLAGS, dir_fd=fd)
                    except OSError as exc:
                        problems.add(f"{rel}/: cannot open ({exc.strerror})")
                        continue
                    stack.append((sub, rel + "/", depth + 1))
                elif entry.is_file(follow_symlinks=False):
                    found.add(rel)
                else:
                    problems.add(f"{rel}: is a device, fifo or socket")
        finally:
            os.close(fd)


def verify(
    path: str | os.PathLike[str],
    *,
    checksums: bool = True,
    progress: Callable[[int], None] | None = None,
    expect_name: str | None = None,
) -> VerifyReport:
    """Verify the checkpoint at ``path``; with ``checksums=False`` only sizes are checked.

    ``expect_name``: the name it must have been committed under, because its name gives
    its step. By default, that is its directory's name when that is a step name
    (``checkpoint-N``, ``checkpoint_N``); a copy under another kind of name (Hugging
    Face's ``last-checkpoint``, ``best``) and staging or trash entries are not checked.
    """
    path = os.fspath(path)
    problems = _Problems()
    try:
        dir_fd = _open_dir(path)
    except FileNotFoundError:
        return VerifyReport(path, ok=False, problems=[f"{path} does not exist"])
    except OSError as exc:
        reason = "is a symlink" if exc.errno == errno.ELOOP else exc.strerror or str(exc)
        return VerifyReport(path, ok=False, problems=[f"{path}: {reason}"])
    try:
        try:
            manifest = _read_manifest_fd(dir_fd, path)
        except UnsafeManifest as exc:
            return VerifyReport(path, ok=False, problems=[exc.message])
        except OSError as exc:
            why = f"cannot read {MANIFEST_NAME} ({exc.strerror or exc})"
            return VerifyReport(path, ok=False, problems=[why])
        # Resume goes by the name's step: an older checkpoint copied in under a newer name
        # would be taken for that step.
        if expect_name is None:
            base = os.path.basename(os.path.abspath(path))
            steps = (HF_NAMING.step(base), ACCELERATE_NAMING.step(base))
            expect_name = base if steps != (None, None) else None
        if expect_name is not None and expect_name != manifest.name:
            problems.add(
                f"the manifest was written for {manifest.name}, but this directory is "
                f"{expect_name} (a copy or a rename): its step cannot be trusted; rename it "
                f"{manifest.name}"
            )
        files = bytes_checked = 0
        for entry in manifest.files:
            try:
                fd = _open_relative(dir_fd, entry.path)
            except FileNotFoundError:
                problems.add(f"{entry.path}: missing")
                continue
            except OSError as exc:
                # O_NOFOLLOW gives ELOOP on a symlinked file, O_DIRECTORY ENOTDIR on a
                # symlinked directory component.
                symlinked = exc.errno in {errno.ELOOP, errno.ENOTDIR}
                reason = (
                    "a symlink or non-directory in its path" if symlinked else str(exc.strerror)
                )
                problems.add(f"{entry.path}: cannot open ({reason})")
                continue
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    problems.add(f"{entry.path}: not a regular file")
                    continue
                if st.st_size != entry.size:
                    problems.add(f"{entry.path}: size {st.st_size}, manifest says {entry.size}")
                    continue
                if checksums:
                    digest = digest_fd(fd, progress=progress)
                    bytes_checked += digest.size
                    if digest.size != entry.size or digest.checksum != entry.checksum:
                        problems.add(f"{entry.path}: checksum mismatch (content altered)")
                        continue
                files += 1
            except OSError as exc:
                problems.add(f"{entry.path}: read error ({exc.strerror})")
            finally:
                os.close(fd)
        found: set[str] = set()
        _tree(dir_fd, problems, found)
        found.discard(MANIFEST_NAME)
        listed = {f.path for f in manifest.files}
        for rel in sorted(found - listed):
            problems.add(f"{rel}: extra file not in the manifest")
    finally:
        os.close(dir_fd)
    return VerifyReport(
        path,
        ok=not problems,
        problems=list(problems),
        manifest=manifest,
        files_checked=files,
        bytes_checked=bytes_checked,
        checksums=checksums,
    )
