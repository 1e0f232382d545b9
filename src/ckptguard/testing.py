"""Fault injection for your own pipeline's tests (and ckptguard's): a public test double.

- :class:`FaultyStorage` wraps a :class:`~ckptguard.Storage` (``LocalStorage()`` by
  default) and injects :class:`Fault` s into its operations: raise an errno at the k-th
  call or with probability p, persistently or a few times; SIGKILL the process at the
  k-th call; tear a file (write part of a chunk, then die); or cut the power. Pass it to
  ``CheckpointManager(root, storage=...)`` or ``atomic_checkpoint(..., storage=...)``.
- Power loss: ``FaultyStorage(track=root)`` records what the protocol made durable (file
  data at fsync, directory entries at the directory's fsync). After a ``power_cut`` fault
  (or any time), :meth:`FaultyStorage.power_loss` rewrites ``root`` to that durable image:
  unsynced data and unsynced names are dropped, as a crash of the machine would.
- :func:`kill_at` / :func:`cut_power_at` act at a named step of the commit protocol
  (``ckptguard._storage.faults.FAULT_POINTS``); :func:`flip_bit` and :func:`truncate` damage a
  committed file.

The power-loss model is the strict POSIX one (partial: real filesystems are kinder):
- a file's data survives only up to its last fsync; a file whose name survived but whose
  data was never fsynced comes back empty;
- a name in a directory (a create, a rename's new name, a removal) survives only if that
  directory was fsynced after the change; a rename whose old and new directories were
  not both fsynced may leave the object under both names, or under neither;
- only changes made through the wrapper's storage (and, for durability, fsyncs of files
  written by other code) are tracked: it holds small test states in memory.
It cannot model a disk that lies about fsync: nothing in software can.

Example::

    storage = FaultyStorage(track=root, faults=[Fault.power_cut(at=40)])
    mgr = CheckpointManager(root, storage=storage)
    try:
        mgr.save(1, state)
    except PowerCut:
        storage.power_loss()          # the machine comes back
    assert CheckpointManager(root).latest() ...   # your recovery claims
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import fnmatch
import os
import random
import signal
import stat
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from ckptguard._storage.faults import (
    DEFERRED_FAULT_POINTS,
    FAULT_POINTS,
    REMOTE_FAULT_POINTS,
    REUSE_FAULT_POINTS,
    set_fault_hook,
)
from ckptguard._storage.local import LocalStorage

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    from ckptguard._storage.base import CheckpointTree, FileDigest, FileWriter, Storage

__all__ = [
    "OPERATIONS",
    "PROTOCOL_STEPS",
    "Fault",
    "FaultyStorage",
    "PowerCut",
    "cut_power_at",
    "flip_bit",
    "kill_at",
    "on_step",
    "truncate",
]

# What a Fault's ``op`` may name: the Storage methods, plus "write" (each chunk written
# through ``open_write``) and "close" (the end of such a file, with its fsync).
OPERATIONS: tuple[str, ...] = (
    "make_dir",
    "open_write",
    "write",
    "close",
    "write_bytes",
    "read_bytes",
    "hash_file",
    "fsync_file",
    "walk_files",
    "fsync_dir",
    "set_mode",
    "rename_noreplace",
    "list_dir",
    "exists",
    "remove_tree",
    "remove_file",
    "open_tree",
    "link_file",
)
PROTOCOL_STEPS: tuple[str, ...] = (
    FAULT_POINTS + REMOTE_FAULT_POINTS + DEFERRED_FAULT_POINTS + REUSE_FAULT_POINTS
)

Action = Literal["raise", "kill", "tear", "power_cut"]


class PowerCut(BaseException):
    """The simulated machine lost power (a BaseException: ``except Exception`` misses it).

    After it, the storage refuses every operation until ``power_loss()``.
    """


@dataclass(frozen=True)
class Fault:
    """One fault: what it does, on which operations, and when.

    ``op`` is an entry of :data:`OPERATIONS` or ``"*"``; ``path`` an fnmatch pattern on
    the operation's path (``"*"``: any). It fires on the ``at``-th matching call
    (1-based), or else on each matching call with probability ``p``; ``times`` limits how
    often it fires (None: every matching call from then on, a persistent fault).
    ``action``: ``"raise"`` OSError(``errno``, or one of a tuple chosen at random);
    ``"kill"`` SIGKILL this process; ``"tear"`` write part of the chunk then SIGKILL (on
    other operations: like kill); ``"power_cut"`` raise :class:`PowerCut`.
    """

    op: str = "*"
    errno: int | tuple[int, ...] = errno_mod.EIO
    at: int | None = None
    p: float = 0.0
    times: int | None = 1
    path: str = "*"
    action: Action = "raise"
    ops: tuple[str, ...] = field(default=(), repr=False)  # several ops (see ``flaky``)

    def __post_init__(self) -> None:
        for name in (self.op, *self.ops):
            if name != "*" and name not in OPERATIONS:
                raise ValueError(f"unknown operation {name!r}; choose from {OPERATIONS}")
        if self.at is None and not 0.0 < self.p <= 1.0:
            raise ValueError("a Fault needs at=K (the K-th matching call) or 0 < p <= 1")
        if self.at is not None and self.at < 1:
            raise ValueError(f"at={self.at}: calls are counted from 1")

    def matches(self, op: str, path: str) -> bool:
        """Whether a call of ``op`` on ``path`` is one this fault counts."""
        names = self.ops or (self.op,)
        return ("*" in names or op in names) and fnmatch.fnmatchcase(path, self.path)

    # Readable constructors for the common cases.
    @classmethod
    def fail(
        cls, op: str, err: int | tuple[int, ...], *, at: int = 1, times: int | None = 1
    ) -> Fault:
        """Raise ``err`` at the ``at``-th call of ``op`` (``times=None``: and every later one)."""
        return cls(op=op, errno=err, at=at, times=times)

    @classmethod
    def flaky(cls, err: int | tuple[int, ...], p: float, *, ops: Sequence[str] = ("*",)) -> Fault:
        """Raise ``err`` on each call of ``ops`` with probability ``p``, forever."""
        return cls(op="*", ops=tuple(ops), errno=err, p=p, times=None)

    @classmethod
    def kill(cls, *, at: int, op: str = "*") -> Fault:
        """SIGKILL this process at the ``at``-th call of ``op``."""
        return cls(op=op, at=at, action="kill")

    @classmethod
    def tear(cls, *, at: int) -> Fault:
        """At the ``at``-th chunk written, write only part of it, then SIGKILL."""
        return cls(op="write", at=at, action="tear")

    @classmethod
    def power_cut(cls, *, at: int, op: str = "*") -> Fault:
        """Cut the power at the ``at``-th call of ``op``: raise :class:`PowerCut`."""
        return cls(op=op, at=at, action="power_cut")


@dataclass
class _Armed:
    fault: Fault
    calls: int = 0
    fired: int = 0


class _Durable:
    """What of a tree would survive a power cut: the data and names last fsynced.

    Objects get ids of their own (inode numbers are reused at once after a delete); a
    path maps to an id while the wrapper sees it there, checked against the inode.
    """

    def __init__(self, root: str) -> None:
        self.root = root
        self._next = 0
        self._at: dict[str, tuple[int, int]] = {}  # path -> (id, inode)
        self.data: dict[int, bytes] = {}  # file id -> bytes at its last fsync
        self.names: dict[int, dict[str, int]] = {}  # dir id -> entries at its last fsync
        self.kind: dict[int, str] = {}  # id -> "dir", "file" or "link"
        self.mode: dict[int, int] = {}
        self.link: dict[int, str] = {}
        self.snapshot()

    def covers(self, path: str) -> bool:
        return path == self.root or path.startswith(self.root + "/")

    def ident(self, path: str, *, fresh: bool = False) -> int:
        st = os.lstat(path)
        known = self._at.get(path)
        if known is not None and not fresh and known[1] == st.st_ino:
            return known[0]
        self._next += 1
        oid = self._next
        self._at[path] = (oid, st.st_ino)
        if stat.S_ISDIR(st.st_mode):
            self.kind[oid] = "dir"
        elif stat.S_ISLNK(st.st_mode):
            self.kind[oid] = "link"
            self.link[oid] = os.readlink(path)
        else:
            self.kind[oid] = "file"
        self.mode[oid] = stat.S_IMODE(st.st_mode)
        return oid

    def snapshot(self) -> None:
        """Take the whole tree as it is now as durable (the start, or after a power loss)."""
        self._at.clear()
        self.data.clear()
        self.names.clear()
        for dirpath, dirnames, filenames in os.walk(self.root):
            for name in filenames:
                self.synced_file(os.path.join(dirpath, name))
            self.synced_dir(dirpath)
            del dirnames  # walk them all (os.walk never follows symlinked dirs)

    def created(self, path: str) -> None:
        if self.covers(path):
            self.ident(path, fresh=True)

    def linked(self, src: str, dst: str, *, synced: bool) -> None:
        """``dst``: a new name for ``src``'s data (a hard link), or a fsynced reflink.

        Either way the data is as durable as ``src``'s; the new name still needs its
        directory's fsync.
        """
        if not self.covers(dst):
            return
        oid = self.ident(dst, fresh=True)
        if self.covers(src):
            source = self.ident(src)
            if source in self.data:
                self.data[oid] = self.data[source]
        elif synced or not self.covers(src):
            with open(dst, "rb") as f:  # outside the tree: taken as durable
                self.data[oid] = f.read()

    # Each fsync is recorded in two halves: what is there is read before the fsync (what
    # other threads write during it is not made durable by it), and kept once it returned.
    def file_now(self, path: str) -> tuple[int, bytes] | None:
        if not self.covers(path):
            return None
        oid = self.ident(path)
        if self.kind[oid] != "file":
            return None
        with open(path, "rb") as f:
            return oid, f.read()

    def dir_now(self, path: str) -> tuple[int, int, dict[str, int]] | None:
        if not self.covers(path):
            return None
        oid = self.ident(path)
        names: dict[str, int] = {}
        for name in os.listdir(path):
            with contextlib.suppress(FileNotFoundError):  # removed by other code meanwhile
                names[name] = self.ident(os.path.join(path, name))
        return oid, stat.S_IMODE(os.lstat(path).st_mode), names

    def keep_file(self, now: tuple[int, bytes] | None) -> None:
        if now is not None:
            self.data[now[0]] = now[1]

    def keep_dir(self, now: tuple[int, int, dict[str, int]] | None) -> None:
        if now is not None:
            oid, self.mode[now[0]], self.names[oid] = now

    def synced_file(self, path: str) -> None:
        self.keep_file(self.file_now(path))

    def synced_dir(self, path: str) -> None:
        self.keep_dir(self.dir_now(path))

    def renamed(self, src: str, dst: str) -> None:
        moved = {p: v for p, v in self._at.items() if p == src or p.startswith(src + "/")}
        for p, v in moved.items():
            del self._at[p]
            if self.covers(dst):
                self._at[dst + p[len(src) :]] = v

    def removed(self, path: str) -> None:
        for p in [p for p in self._at if p == path or p.startswith(path + "/")]:
            del self._at[p]

    def restore(self) -> None:
        """Rewrite the tree to its durable image, then take that as the new start."""
        root_id = self._at[self.root][0]
        image = os.path.join(self.root, f".ckptguard-power-loss-{os.getpid()}")
        os.mkdir(image, 0o700)
        for name, oid in self.names.get(root_id, {}).items():
            self._build(os.path.join(image, name), oid, depth=0)
        for name in os.listdir(self.root):
            if name != os.path.basename(image):
                LocalStorage().remove_tree(os.path.join(self.root, name))
        for name in os.listdir(image):
            os.rename(os.path.join(image, name), os.path.join(self.root, name))
        os.rmdir(image)
        os.chmod(self.root, self.mode.get(root_id, 0o755))
        self.snapshot()

    def _build(self, path: str, oid: int, *, depth: int) -> None:
        kind = self.kind[oid]
        if kind == "link":
            os.symlink(self.link[oid], path)
            return
        if kind == "file":
            with open(path, "xb") as f:
                f.write(self.data.get(oid, b""))  # data never fsynced: an empty file
            os.chmod(path, self.mode[oid])
            return
        if depth > 64:  # a directory renamed into its own durable subtree: cut the cycle
            return
        os.mkdir(path, 0o700)
        for name, child in self.names.get(oid, {}).items():
            self._build(os.path.join(path, name), child, depth=depth + 1)
        os.chmod(path, self.mode[oid])


class _FaultyWriter:
    def __init__(
        self,
        inner: FileWriter,
        path: str,
        check: Callable[[str, str], Fault | None],
        synced: Callable[[str], None] | None,
    ) -> None:
        self._inner, self._path, self._check, self._synced = inner, path, check, synced

    def write(self, data: bytes | bytearray | memoryview) -> None:
        fault = self._check("write", self._path)
        if fault is not None and fault.action == "tear":
            view = memoryview(data).cast("B")
            self._inner.write(view[: max(1, len(view) // 2)])
            os.kill(os.getpid(), signal.SIGKILL)
        self._inner.write(data)

    def close(self) -> FileDigest:
        try:
            self._check("close", self._path)
        except BaseException:
            self._inner.abort()  # never leak the descriptor
            raise
        digest = self._inner.close()
        if self._synced is not None:
            self._synced(self._path)
        return digest

    def abort(self) -> None:
        # Not a fault point: the caller is already failing; this only frees the file.
        self._inner.abort()

    def __enter__(self) -> _FaultyWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.abort()


class FaultyStorage:
    """A :class:`~ckptguard.Storage` that injects faults into another one.

    ``faults``: the :class:`Fault` s to inject (checked in order; the first that fires
    acts). ``seed``: for probabilistic faults. ``track``: a directory whose durability
    to record for :meth:`power_loss`. ``ignore_fsync=True`` turns every fsync into a
    no-op (and records nothing as durable): the control of a power-loss test, which must
    then lose data; a pattern (fnmatch) or a predicate skips only the fsyncs of the
    paths it matches, to show which fsync a guarantee rests on. ``calls`` counts
    operations, ``log`` lists them (op, path) and ``fired`` the faults that acted.
    Thread-safe.
    """

    def __init__(
        self,
        inner: Storage | None = None,
        *,
        faults: Sequence[Fault] = (),
        seed: int = 0,
        track: str | os.PathLike[str] | None = None,
        ignore_fsync: bool | str | Callable[[str], bool] = False,
        record: bool = True,
    ) -> None:
        self.inner: Storage = inner if inner is not None else LocalStorage()
        self._armed = [_Armed(f) for f in faults]
        self._rng = random.Random(seed)  # noqa: S311 - fault schedules, not secrets
        self._lock = threading.RLock()
        self.ignore_fsync = ignore_fsync
        self.record = record
        self.calls = 0
        self.log: list[tuple[str, str]] = []
        self.fired: list[tuple[int, str, str, Fault]] = []  # (call, op, path, fault)
        self.dead = False
        self._durable: _Durable | None = None
        if track is not None:
            root = os.path.abspath(os.fspath(track))
            os.makedirs(root, exist_ok=True)
            self._durable = _Durable(root)

    # -- faults --------------------------------------------------------------------------
    def add(self, fault: Fault) -> None:
        """Arm one more fault (its call count starts now)."""
        with self._lock:
            self._armed.append(_Armed(fault))

    def clear(self) -> None:
        """Disarm every fault."""
        with self._lock:
            self._armed.clear()

    def _check(self, op: str, path: str) -> Fault | None:
        """Count a call; act on the first fault that fires. Returns a ``tear`` fault."""
        with self._lock:
            if self.dead:
                raise PowerCut(f"{op} {path}: the power is off (call power_loss())")
            self.calls += 1
            if self.record:
                self.log.append((op, path))
            fault = self._due(op, path)
            if fault is None:
                return None
            self.fired.append((self.calls, op, path, fault))
            if fault.action == "power_cut":
                self.dead = True
                raise PowerCut(f"power cut at call {self.calls}: {op} {path}")
            code = fault.errno if isinstance(fault.errno, int) else self._rng.choice(fault.errno)
        if fault.action == "raise":
            raise OSError(code, f"{os.strerror(code)} (injected)", path)
        if fault.action == "kill" or (fault.action == "tear" and op != "write"):
            os.kill(os.getpid(), signal.SIGKILL)
        return fault

    def _due(self, op: str, path: str) -> Fault | None:
        for armed in self._armed:
            fault = armed.fault
            if not fault.matches(op, path):
                continue
            armed.calls += 1
            if fault.times is not None and armed.fired >= fault.times:
                continue
            if fault.at is not None:
                hit = armed.calls == fault.at or (fault.times is None and armed.calls > fault.at)
            else:
                hit = self._rng.random() < fault.p
            if hit:
                armed.fired += 1
                return fault
        return None

    # -- power loss ----------------------------------------------------------------------
    def cut(self, why: str = "power cut") -> None:
        """Cut the power now: raise :class:`PowerCut`; every later operation raises it too."""
        with self._lock:
            self.dead = True
        raise PowerCut(why)

    def power_loss(self) -> None:
        """Rewrite the tracked root to what was durable, and turn the power back on."""
        if self._durable is None:
            raise RuntimeError("power_loss() needs FaultyStorage(track=root)")
        with self._lock:
            self._durable.restore()
            self.dead = False

    def _skip_sync(self, path: str) -> bool:
        skip = self.ignore_fsync
        if isinstance(skip, str):
            return fnmatch.fnmatchcase(path, skip)
        return skip if isinstance(skip, bool) else skip(path)

    def _synced_file(self, path: str) -> None:
        if self._durable is not None and not self._skip_sync(path):
            with self._lock:
                self._durable.synced_file(path)

    def _file_now(self, path: str) -> tuple[int, bytes] | None:
        if self._durable is None:
            return None
        with self._lock:
            return self._durable.file_now(path)

    def _keep_file(self, now: tuple[int, bytes] | None) -> None:
        if self._durable is not None:
            with self._lock:
                self._durable.keep_file(now)

    def _created(self, path: str) -> None:
        if self._durable is not None:
            with self._lock:
                self._durable.created(path)

    def _removed(self, path: str) -> None:
        if self._durable is not None:
            with self._lock:
                self._durable.removed(path)

    # -- the Storage interface -----------------------------------------------------------
    def make_dir(self, path: str, *, mode: int = 0o700, exist_ok: bool = False) -> None:
        self._check("make_dir", path)
        existed = exist_ok and os.path.lexists(path)
        self.inner.make_dir(path, mode=mode, exist_ok=exist_ok)
        if not existed:
            self._created(path)

    def link_file(self, source: str, dest: str, *, try_reflink: bool = True) -> str | None:
        self._check("link_file", dest)
        link = getattr(self.inner, "link_file", None)  # an optional capability
        how: str | None = None if link is None else link(source, dest, try_reflink=try_reflink)
        if how is not None and self._durable is not None:
            with self._lock:
                self._durable.linked(source, dest, synced=how == "reflink")
        return how

    def open_write(self, path: str, *, fsync: bool = True) -> FileWriter:
        self._check("open_write", path)
        sync = fsync and not self._skip_sync(path)
        writer = self.inner.open_write(path, fsync=sync)
        self._created(path)
        return _FaultyWriter(writer, path, self._check, self._synced_file if sync else None)

    def write_bytes(self, path: str, data: bytes, *, fsync: bool = True) -> FileDigest:
        self._check("write_bytes", path)
        sync = fsync and not self._skip_sync(path)
        digest = self.inner.write_bytes(path, data, fsync=sync)
        self._created(path)
        if sync:
            self._synced_file(path)
        return digest

    def read_bytes(self, path: str, *, limit: int) -> bytes:
        self._check("read_bytes", path)
        return self.inner.read_bytes(path, limit=limit)

    def hash_file(
        self, path: str, *, fsync: bool = False, progress: Callable[[int], None] | None = None
    ) -> FileDigest:
        self._check("hash_file", path)
        sync = fsync and not self._skip_sync(path)
        now = self._file_now(path) if sync else None
        digest = self.inner.hash_file(path, fsync=sync, progress=progress)
        self._keep_file(now)
        return digest

    def fsync_file(self, path: str) -> None:
        self._check("fsync_file", path)
        if not self._skip_sync(path):
            now = self._file_now(path)
            self.inner.fsync_file(path)
            self._keep_file(now)

    def walk_files(self, path: str) -> tuple[list[str], list[str]]:
        self._check("walk_files", path)
        return self.inner.walk_files(path)

    def fsync_dir(self, path: str) -> None:
        self._check("fsync_dir", path)
        if self._skip_sync(path):
            return
        if self._durable is None:
            self.inner.fsync_dir(path)
            return
        with self._lock:
            now = self._durable.dir_now(path)
        self.inner.fsync_dir(path)
        with self._lock:
            self._durable.keep_dir(now)

    def set_mode(self, path: str, mode: int) -> None:
        self._check("set_mode", path)
        self.inner.set_mode(path, mode)

    def rename_noreplace(self, src: str, dst: str) -> None:
        self._check("rename_noreplace", src)
        self.inner.rename_noreplace(src, dst)
        if self._durable is not None:
            with self._lock:
                self._durable.renamed(src, dst)

    def list_dir(self, path: str) -> list[str]:
        self._check("list_dir", path)
        return self.inner.list_dir(path)

    def exists(self, path: str) -> bool:
        self._check("exists", path)
        return self.inner.exists(path)

    def remove_tree(self, path: str) -> None:
        self._check("remove_tree", path)
        self.inner.remove_tree(path)
        self._removed(path)

    def remove_file(self, path: str) -> None:
        self._check("remove_file", path)
        self.inner.remove_file(path)
        self._removed(path)

    def open_tree(self, path: str) -> CheckpointTree:
        self._check("open_tree", path)
        return self.inner.open_tree(path)

    def __getattr__(self, name: str) -> Any:
        # Anything beyond the Storage protocol (an object store's extras) passes through.
        return getattr(self.inner, name)


@contextlib.contextmanager
def _at_step(step: str, act: Callable[[], None], nth: int) -> Iterator[list[str]]:
    if step not in PROTOCOL_STEPS:
        raise ValueError(f"unknown protocol step {step!r}; choose from {PROTOCOL_STEPS}")
    seen: list[str] = []
    count = 0

    def hook(point: str) -> None:
        nonlocal count
        if point == step:
            count += 1
            if count == nth:
                seen.append(point)
                act()

    previous = set_fault_hook(hook)
    try:
        yield seen
    finally:
        set_fault_hook(previous)


@contextlib.contextmanager
def on_step(fn: Callable[[str], None]) -> Iterator[None]:
    """Call ``fn(step)`` at every named protocol step reached within the block.

    ``fn`` may inspect the tree, change it (swap a directory for a symlink, as an
    attacker would), raise, or kill the process.
    """
    previous = set_fault_hook(fn)
    try:
        yield
    finally:
        set_fault_hook(previous)


def kill_at(
    step: str, *, nth: int = 1, sig: int = signal.SIGKILL
) -> contextlib.AbstractContextManager[list[str]]:
    """Send ``sig`` to this process the ``nth`` time the protocol reaches ``step``.

    ``step`` is a name in :data:`PROTOCOL_STEPS`. The block yields a list that holds the
    step once it was reached (with a signal that does not kill, check that it was).
    """
    return _at_step(step, lambda: os.kill(os.getpid(), sig), nth)


def cut_power_at(
    step: str, storage: FaultyStorage, *, nth: int = 1
) -> contextlib.AbstractContextManager[list[str]]:
    """Cut ``storage``'s power the ``nth`` time the protocol reaches ``step``.

    :class:`PowerCut` is raised there, and the storage refuses every later operation.
    """
    return _at_step(step, lambda: storage.cut(f"power cut at protocol step {step}"), nth)


def _rng(seed: int) -> random.Random:
    return random.Random(seed)  # noqa: S311 - where to damage a test file, not a secret


def flip_bit(path: str | os.PathLike[str], bit: int | None = None, *, seed: int = 0) -> int:
    """Flip one bit of a file in place (``bit``, or a random one); returns its index."""
    with open(path, "r+b") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise ValueError(f"{os.fspath(path)} is empty: no bit to flip")
        index = _rng(seed).randrange(size * 8) if bit is None else bit
        f.seek(index // 8)
        byte = f.read(1)[0]
        f.seek(index // 8)
        f.write(bytes([byte ^ (1 << (index % 8))]))
    return index


def truncate(path: str | os.PathLike[str], size: int | None = None, *, seed: int = 0) -> int:
    """Cut a file to ``size`` bytes (or a random shorter length); returns the new size."""
    length = os.path.getsize(path)
    if size is None:
        if length == 0:
            raise ValueError(f"{os.fspath(path)} is empty: nothing to cut")
        size = _rng(seed).randrange(length)
    os.truncate(path, size)
    return size
