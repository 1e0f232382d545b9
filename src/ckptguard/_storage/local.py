"""POSIX storage: :class:`LocalStorage`, the local implementation of the storage contract.

Guarantees of :class:`LocalStorage`:
- files are created with O_EXCL|O_NOFOLLOW (never through a planted symlink, never over
  an existing file) and fsynced before they are reported written;
- ``rename_noreplace`` uses Linux renameat2(RENAME_NOREPLACE): it never replaces an
  existing target. Where the kernel or filesystem lacks it (ENOSYS/EINVAL; some NFS,
  FUSE and older kernels) it falls back to check-then-rename(2), which is weaker
  (partial): a target created by another process between the check and the rename is
  replaced if it is an empty directory; a non-empty one still makes the rename fail.
  ckptguard holds the root's lock around the commit, so only processes that bypass the
  lock can hit that window;
- ``remove_tree`` never follows a symlink: it removes the link, not its target;
- ``open_tree`` opens a checkpoint's directory once and every file relative to it with
  O_NOFOLLOW on each component: a symlink planted anywhere in the tree is reported,
  never followed.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import os
import shutil
import stat
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from typing import TYPE_CHECKING, Self

import xxhash

from ckptguard._errors import CorruptCheckpoint, UnsupportedFile
from ckptguard._storage.base import READ_CHUNK, FileDigest

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "LocalSource",
    "LocalStorage",
    "LocalTree",
    "digest_fd",
    "read_only_reason",
    "renameat2_available",
    "tree_size",
]

# Files at least this large are fsynced by another thread while the next file is written
# or hashed (commit.seal, serialization.write_encoded); smaller ones inline.
PARALLEL_FSYNC_MIN = 8 * 1024 * 1024
OVERLAP_MIN_BYTES = 4 * 1024 * 1024  # below this, hashing inline is cheaper than a handoff
MAX_DEPTH = 64  # directories inside a checkpoint; deeper is hostile, not a model
_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


@cache
def _libc_renameat2() -> Callable[..., int] | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    result: Callable[..., int] = fn
    return result


def renameat2_available() -> bool:
    """Whether the C library exposes renameat2 (the filesystem may still refuse it)."""
    return _libc_renameat2() is not None


class _LocalWriter:
    def __init__(self, path: str, fd: int, *, fsync: bool) -> None:
        self._path, self._fd, self._fsync = path, fd, fsync
        self._hasher = xxhash.xxh3_128()
        self._size = 0
        self._pool: ThreadPoolExecutor | None = None

    def _shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _write_all(self, view: memoryview) -> int:
        total = 0
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
            total += written
        return total

    def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        if len(view) < OVERLAP_MIN_BYTES:
            self._hasher.update(view)
            self._size += self._write_all(view)
            return
        # Hash while another thread writes, so a large tensor costs max(hash, write)
        # instead of their sum (write(2) and xxhash 4's update both release the GIL).
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="ckptguard-write")
        pending = self._pool.submit(self._write_all, view)
        try:
            self._hasher.update(view)
        finally:
            self._size += pending.result()

    def close(self) -> FileDigest:
        self._shutdown()
        try:
            if self._fsync:
                os.fsync(self._fd)
        finally:
            os.close(self._fd)
            self._fd = -1
        return FileDigest(self._size, self._hasher.hexdigest())

    def abort(self) -> None:
        self._shutdown()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.abort()


_FICLONE = 0x40049409  # _IOW(0x94, 9, int): linux/fs.h
# Errors that mean "cannot link this one here": the file is written instead.
_CANNOT_LINK = {
    errno.ENOENT,  # the source was removed meanwhile
    errno.EXDEV,  # another filesystem
    errno.EMLINK,  # too many links to the inode
    errno.EPERM,  # hard links refused (protected_hardlinks, some FUSE mounts)
    errno.EACCES,
    errno.ENOTSUP,
    errno.EOPNOTSUPP,
    errno.EINVAL,
    errno.ENOSYS,
}


def _reflink(source: str, dest: str, mode: int) -> bool:
    """A reflink of ``source`` at ``dest`` (fsynced); False where the filesystem has none."""
    src = os.open(source, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        dst = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        try:
            fcntl.ioctl(dst, _FICLONE, src)
        except OSError as exc:
            os.close(dst)
            os.unlink(dest)
            if exc.errno in {errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EINVAL,
                             errno.ENOTTY, errno.ENOSYS, errno.EPERM}:  # fmt: skip
                return False
            raise
        try:
            os.fsync(dst)  # its own inode: the extents it shares must be recorded
        finally:
            os.close(dst)
    finally:
        os.close(src)
    return True


def _link_file(source: str, dest: str, *, try_reflink: bool, mode: int) -> str | None:
    """Make ``dest`` (absent) hold ``source``'s bytes without copying them.

    Returns "reflink" or "hardlink", or None where neither is possible here (the caller
    writes the file).
    """
    try:
        if try_reflink and _reflink(source, dest, mode):
            return "reflink"
        os.link(source, dest, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in _CANNOT_LINK:
            return None
        raise
    return "hardlink"


class LocalStorage:
    """POSIX storage with the fsync discipline of the on-disk contract."""

    def __init__(
        self, *, use_renameat2: bool = True, file_mode: int = 0o644, durable: bool = True
    ) -> None:
        """``durable=False`` skips every fsync: for benchmarks and fault-test controls only."""
        self.use_renameat2 = use_renameat2
        self.file_mode = file_mode
        self.durable = durable

    # -- directories -------------------------------------------------------------------
    def make_dir(self, path: str, *, mode: int = 0o700, exist_ok: bool = False) -> None:
        try:
            os.mkdir(path, mode)
        except FileExistsError:
            if not exist_ok:
                raise
            st = os.lstat(path)
            if not stat.S_ISDIR(st.st_mode):
                raise UnsupportedFile(
                    f"{path} exists but is not a directory (a symlink or a file)", path=path
                ) from None
            return
        os.chmod(path, mode)  # mkdir applies the umask; the contract needs the mode exactly

    def fsync_dir(self, path: str) -> None:
        if not self.durable:
            return
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def set_mode(self, path: str, mode: int) -> None:
        # Through an O_PATH descriptor opened without following a symlink (it needs no read
        # permission): a staging dir swapped for a link is refused, its target untouched.
        fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            if stat.S_ISLNK(os.fstat(fd).st_mode):
                raise _symlink_refused(path)
            try:
                os.chmod(f"/proc/self/fd/{fd}", mode)  # fchmod refuses O_PATH descriptors
            except FileNotFoundError:  # no /proc: by name, checked not to be a link above
                os.chmod(path, mode)
        finally:
            os.close(fd)

    def list_dir(self, path: str) -> list[str]:
        try:
            return sorted(os.listdir(path))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def exists(self, path: str) -> bool:
        return os.path.lexists(path)

    # -- files -------------------------------------------------------------------------
    def link_file(self, source: str, dest: str, *, try_reflink: bool = True) -> str | None:
        """Make ``dest`` (absent) hold ``source``'s bytes without copying them.

        Returns "reflink" or "hardlink"; None where neither is possible here (the caller
        writes the file). A reflink is fsynced here (an inode of its own); either way
        the new name needs its directory's fsync, like any new file.
        """
        return _link_file(source, dest, try_reflink=try_reflink, mode=self.file_mode)

    def open_write(self, path: str, *, fsync: bool = True) -> _LocalWriter:
        # Created inside its directory opened with O_NOFOLLOW: if that directory (a staging
        # dir) was swapped for a symlink, nothing is written through it (partial: only the
        # last directory of the path is checked so; ckptguard writes at the top of a
        # staging dir, which its seal and commit check again).
        parent, name = os.path.split(path)
        parent = parent or "."
        try:
            dir_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno in {errno.ELOOP, errno.ENOTDIR} and os.path.islink(parent):
                raise _symlink_refused(parent) from None
            raise
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(name, flags, self.file_mode, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)
        return _LocalWriter(path, fd, fsync=fsync and self.durable)

    def write_bytes(self, path: str, data: bytes, *, fsync: bool = True) -> FileDigest:
        with self.open_write(path, fsync=fsync) as writer:
            writer.write(data)
            return writer.close()

    def _open_regular(self, path: str) -> tuple[int, os.stat_result]:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise UnsupportedFile(f"{path} is not a regular file", path=path)
        return fd, st

    def read_bytes(self, path: str, *, limit: int) -> bytes:
        fd, st = self._open_regular(path)
        try:
            if st.st_size > limit:
                raise ValueError(f"{path} is {st.st_size} bytes, over the limit of {limit}")
            chunks, total = [], 0
            while chunk := os.read(fd, min(READ_CHUNK, limit + 1 - total)):
                chunks.append(chunk)
                total += len(chunk)
                if total > limit:
                    raise ValueError(f"{path} grew over the limit of {limit} bytes")
            return b"".join(chunks)
        finally:
            os.close(fd)

    def hash_file(
        self, path: str, *, fsync: bool = False, progress: Callable[[int], None] | None = None
    ) -> FileDigest:
        try:
            fd, _ = self._open_regular(path)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsupportedFile(f"{path} is a symlink", path=path) from None
            raise
        try:
            return digest_fd(fd, progress=progress, fsync=fsync and self.durable)
        finally:
            os.close(fd)

    def fsync_file(self, path: str) -> None:
        if not self.durable:
            return
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def walk_files(self, path: str) -> tuple[list[str], list[str]]:
        if os.path.islink(path):
            raise _symlink_refused(path)
        files: list[str] = []
        dirs: list[str] = []
        stack = [(path, "", 0)]
        while stack:
            abs_dir, rel_dir, depth = stack.pop()
            with os.scandir(abs_dir) as it:
                entries = sorted(it, key=lambda e: e.name, reverse=True)
            for entry in entries:
                rel = f"{rel_dir}{entry.name}"
                if entry.is_symlink():
                    target = os.readlink(entry.path)
                    raise UnsupportedFile(
                        f"{entry.path} is a symlink (-> {target}); a checkpoint holds "
                        "regular files only",
                        path=entry.path,
                        hint="copy the file into the checkpoint instead of linking it",
                    )
                if entry.is_dir(follow_symlinks=False):
                    if depth + 1 > MAX_DEPTH:
                        raise UnsupportedFile(
                            f"{entry.path}: nested deeper than {MAX_DEPTH} directories",
                            path=entry.path,
                        )
                    dirs.append(rel)
                    stack.append((entry.path, rel + "/", depth + 1))
                elif entry.is_file(follow_symlinks=False):
                    files.append(rel)
                else:
                    raise UnsupportedFile(
                        f"{entry.path} is a device, fifo or socket", path=entry.path
                    )
        # Parents before children (seal fsyncs them in reverse: children first).
        dirs.sort(key=lambda d: (d.count("/"), d))
        return sorted(files), dirs

    # -- rename and removal ------------------------------------------------------------
    def rename_noreplace(self, src: str, dst: str) -> None:
        fn = _libc_renameat2() if self.use_renameat2 else None
        if fn is not None:
            ret = fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE)
            if ret == 0:
                return
            code = ctypes.get_errno()
            if code not in {errno.ENOSYS, errno.EINVAL}:
                raise OSError(code, os.strerror(code), src, None, dst)
            # EINVAL also means "src is an ancestor of dst"; the fallback re-detects that.
        self._rename_check_then_rename(src, dst)

    @staticmethod
    def _rename_check_then_rename(src: str, dst: str) -> None:
        # Weaker fallback (see module docstring): check, then rename(2).
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, "target exists", dst)
        try:
            os.rename(src, dst)
        except OSError as exc:
            # rename(2) onto a non-empty directory: ENOTEMPTY or EEXIST. Report it as the
            # conflict it is, so that callers never see "Directory not empty".
            if exc.errno in {errno.ENOTEMPTY, errno.EEXIST} and os.path.lexists(dst):
                raise FileExistsError(errno.EEXIST, "target exists", dst) from exc
            raise

    def remove_file(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def open_tree(self, path: str) -> LocalTree:
        return LocalTree(path)

    def remove_tree(self, path: str) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISDIR(st.st_mode):
            self.remove_file(path)
            return
        # shutil.rmtree uses the fd-based walk on Linux (avoids_symlink_attacks): a
        # symlink inside the tree is unlinked, its target left alone.
        try:
            shutil.rmtree(path)
        except FileNotFoundError:
            if os.path.lexists(path):
                raise


def _symlink_refused(path: str) -> UnsupportedFile:
    try:
        target = os.readlink(path)
    except OSError:
        target = "?"
    return UnsupportedFile(
        f"{path} is a symlink (-> {target}), where ckptguard created a directory: "
        "refused, nothing is written through it",
        path=path,
        hint="another process replaced it; find out which, and save again",
    )


def digest_fd(
    fd: int, *, progress: Callable[[int], None] | None = None, fsync: bool = False
) -> FileDigest:
    """Stream an open file through xxh3-128 with one reused buffer."""
    hasher = xxhash.xxh3_128()
    buf = bytearray(READ_CHUNK)
    view = memoryview(buf)
    size = 0
    while n := os.readv(fd, [buf]):
        hasher.update(view[:n])
        size += n
        if progress is not None:
            progress(n)
    if fsync:
        os.fsync(fd)
    return FileDigest(size, hasher.hexdigest())


# -- reading a checkpoint ------------------------------------------------------------------
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def open_relative(dir_fd: int, rel: str) -> int:
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
    dir_fd = os.open(checkpoint, _DIR_FLAGS)
    try:
        return open_relative(dir_fd, rel)
    finally:
        os.close(dir_fd)


def read_at_most(fd: int, limit: int, offset: int = 0) -> bytes:
    """Up to ``limit`` bytes from ``offset``; loops, since one read(2) may return less."""
    chunks, total = [], 0
    while total < limit and (chunk := os.pread(fd, limit - total, offset + total)):
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


class LocalSource:
    """One local file of a checkpoint, open for reading."""

    def __init__(self, path: str, fd: int) -> None:
        self.path, self._fd = path, fd
        with contextlib.suppress(OSError, AttributeError):  # a hint only
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)

    @property
    def size(self) -> int:
        return os.fstat(self._fd).st_size

    def pread_into(self, view: memoryview, offset: int) -> None:
        while view:
            n = os.preadv(self._fd, [view], offset)
            if n == 0:
                raise CorruptCheckpoint(
                    f"{self.path}: shorter than its header says (changed while read?)",
                    path=self.path,
                )
            view, offset = view[n:], offset + n

    def read_at_most(self, limit: int, offset: int = 0) -> bytes:
        return read_at_most(self._fd, limit, offset)

    def checksum(self) -> str:
        """xxh3-128 of the whole file, streamed through one bounded buffer."""
        os.lseek(self._fd, 0, os.SEEK_SET)
        return digest_fd(self._fd).checksum

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class LocalTree:
    """A local checkpoint directory, opened once; every file relative to it (O_NOFOLLOW)."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self._fd = os.open(path, _DIR_FLAGS)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsupportedFile(f"{path}: is a symlink", path=path) from None
            if exc.errno == errno.ENOTDIR:
                raise UnsupportedFile(f"{path}: is not a directory", path=path) from None
            raise

    def read_small(self, rel: str, limit: int) -> bytes:
        """A small file of the checkpoint (the manifest), read in full."""
        try:
            fd = open_relative(self._fd, rel)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsupportedFile(f"{rel} is a symlink", path=self.path) from None
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise UnsupportedFile(f"{rel} is not a regular file", path=self.path)
            if st.st_size > limit:
                raise ValueError(f"{rel} is {st.st_size} bytes: too large")
            # Ask for what fstat says (+1 to see growth), not the cap: read(2) of n bytes
            # allocates n bytes first, and a manifest is usually a few KiB. Loop: one read
            # may return less (FUSE direct_io, network filesystems, signals).
            chunks, total = [], 0
            while chunk := os.read(fd, min(limit + 1 - total, max(st.st_size + 1 - total, 65536))):
                chunks.append(chunk)
                total += len(chunk)
                if total > limit:
                    raise ValueError(f"{rel} grew over {limit} bytes while read: too large")
            return b"".join(chunks)
        finally:
            os.close(fd)

    def entries(self, under: str, problem: Callable[[str], None]) -> dict[str, int]:
        found: dict[str, int] = {}
        stack: list[tuple[int, str, int]] = [(os.dup(self._fd), "", 0)]
        while stack:
            fd, prefix, depth = stack.pop()
            try:
                with os.scandir(fd) as it:
                    entries = list(it)
                for entry in entries:
                    rel = f"{prefix}{entry.name}"
                    if entry.is_symlink():
                        problem(f"{rel}: is a symlink")
                    elif entry.is_dir(follow_symlinks=False):
                        if depth + 1 > MAX_DEPTH:
                            problem(f"{rel}/: nested deeper than {MAX_DEPTH} directories")
                            continue
                        try:
                            sub = os.open(entry.name, _DIR_FLAGS, dir_fd=fd)
                        except OSError as exc:
                            problem(f"{rel}/: cannot open ({exc.strerror})")
                            continue
                        stack.append((sub, rel + "/", depth + 1))
                    elif entry.is_file(follow_symlinks=False):
                        if rel.startswith(under):
                            found[rel] = entry.stat(follow_symlinks=False).st_size
                    else:
                        problem(f"{rel}: is a device, fifo or socket")
            finally:
                os.close(fd)
        return found

    def _open_fd(self, rel: str) -> int:
        try:
            fd = open_relative(self._fd, rel)
        except OSError as exc:
            # O_NOFOLLOW gives ELOOP on a symlinked file, O_DIRECTORY ENOTDIR on a
            # symlinked directory component.
            if exc.errno in {errno.ELOOP, errno.ENOTDIR}:
                raise UnsupportedFile(
                    f"{rel}: cannot open (a symlink or non-directory in its path)",
                    path=os.path.join(self.path, rel),
                ) from None
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise UnsupportedFile(f"{rel}: not a regular file", path=os.path.join(self.path, rel))
        return fd

    def digest(self, rel: str, progress: Callable[[int], None] | None = None) -> FileDigest:
        fd = self._open_fd(rel)
        try:
            return digest_fd(fd, progress=progress)
        finally:
            os.close(fd)

    def open(self, rel: str) -> LocalSource:
        return LocalSource(os.path.join(self.path, rel), self._open_fd(rel))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def tree_size(path: str, *, skip: str | None = None) -> int:
    """Bytes of every file under ``path`` (best effort); ``skip``: a top-level name left out."""
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            if dirpath == path and f == skip:
                continue
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, f)).st_size
    return total


def read_only_reason(path: str) -> str | None:
    """Why this process cannot write ``path`` (a read-only mount, no permission), or None.

    While ``path`` does not exist, its nearest existing parent is asked. Asked once when
    a root is opened, so that reading it never needs write access.
    """
    probe = os.path.abspath(path)
    while not os.path.lexists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            return None
        probe = parent
    if not os.path.isdir(probe):
        return None  # not a directory: the resolver refuses it with its own message
    try:
        if os.statvfs(probe).f_flag & os.ST_RDONLY:
            return f"{probe} is on a read-only mount"
    except OSError:
        return None
    if not os.access(probe, os.R_OK | os.X_OK):
        return None  # not even readable: the reading says so, typed (not "read-only")
    if not os.access(probe, os.W_OK):
        return f"uid {os.geteuid()} may not write to {probe}"
    return None
