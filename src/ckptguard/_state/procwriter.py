"""A writer process for async saves (``CheckpointManager(async_writer="process")``).

A background save thread holds the GIL for its Python work (the write loop, the hashing
hand-offs, the fsync pool), which slows a Python-heavy training loop beside it (issue 18
measured 10.4% against 2.8% beside a writer that never holds the GIL). With this writer
the tensor files of an async save are written by a separate process instead:

- The snapshot goes into a shared block (``memfd_create``: anonymous, so nothing is left
  behind in ``/dev/shm`` by a crash), allocated once and reused like
  :class:`~ckptguard._state.serialization.StagingBuffers`' own; the memcpy into it stays
  the only cost on the training thread.
- The process is started once per manager (``python -m ckptguard._state.procwriter``:
  a fresh interpreter, which imports neither torch nor the training script, and inherits
  no CUDA or lock state). It receives the block's file descriptor over a Unix socket
  (``SCM_RIGHTS``) and, per save, the files to write as JSON: names, dtypes, shapes and
  offsets in the block. It writes each safetensors file into the staging dir, hashed
  while written and fsynced exactly as the thread would (the same code), and answers
  with the digests, or with the error.
- Everything else stays in the training process: the transaction, the coordination, the
  ``state.json``, the seal, the commit and retention. The background thread that runs
  them waits on the socket (no GIL) while the bytes are written. The protocol has one
  home; the writer only makes files in a staging dir it is given.

Failure: a writer that dies mid-save (OOM killer, a signal) fails that save like any
other I/O error (the transaction aborts and removes its staging; the next save starts a
new writer). The writer ignores SIGINT and SIGTERM (the training process decides what a
signal means: SIGTERM finishes the save in flight) and exits when the training process
is gone (end of file on the socket, or a changed parent pid), so it never writes into a
staging dir that a new run may be cleaning up. Nothing is pickled either way: JSON only.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from ckptguard import _errors
from ckptguard._format.safetensors import DTYPE_SIZES
from ckptguard._storage.base import FileDigest

if TYPE_CHECKING:
    from ckptguard._state.serialization import EncodedState
    from ckptguard._storage.local import LocalStorage

__all__ = ["SharedBlock", "WriterProcess", "process_writer_unsupported"]

_HEADER = struct.Struct("<Q")
_MAX_MESSAGE = 256 * 1024 * 1024  # a save's file list is small; anything larger is a bug


def process_writer_unsupported() -> str | None:
    """Why this platform cannot run the writer process, or None if it can."""
    if not hasattr(os, "memfd_create"):
        return "it needs memfd_create (Linux)"
    if not hasattr(socket, "send_fds"):  # pragma: no cover - Python >= 3.9 has it
        return "it needs socket.send_fds (Python 3.9 or later)"
    return None


class SharedBlock:
    """Memory shared with the writer process: an anonymous memfd, mapped read-write here."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = max(1, nbytes)
        self.fd = os.memfd_create("ckptguard-snapshot", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, self.nbytes)
            self._map: mmap.mmap | None = mmap.mmap(self.fd, self.nbytes)
        except BaseException:
            os.close(self.fd)
            raise

    def array(self) -> Any:
        """The block as a writable numpy uint8 array (views of it share the memory)."""
        import numpy as np  # noqa: PLC0415 - only async saves need it

        if self._map is None:
            raise ValueError("the shared block is closed")
        return np.frombuffer(self._map, dtype=np.uint8)

    def close(self) -> None:
        """Unmap and close (views still alive keep the mapping until they are freed)."""
        if self._map is not None:
            with contextlib.suppress(BufferError):  # a view is alive: the GC unmaps it
                self._map.close()
            self._map = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# -- the wire: length-prefixed JSON over a Unix stream socket --------------------------------
def _send(sock: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    body = json.dumps(message, separators=(",", ":")).encode("utf-8")
    data = _HEADER.pack(len(body)) + body
    if fds:  # the descriptors travel with the first bytes
        sent = socket.send_fds(sock, [data], fds)
        data = data[sent:]
    if data:
        sock.sendall(data)


def _recv_exact(sock: socket.socket, n: int, got: bytes = b"") -> bytes:
    chunks, have = [got], len(got)
    while have < n:
        chunk = sock.recv(min(n - have, 1 << 20))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        have += len(chunk)
    return b"".join(chunks)


def _recv(sock: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """One message and the descriptors sent with it; EOFError when the peer is gone."""
    first, fds, _flags, _addr = socket.recv_fds(sock, _HEADER.size, 4)
    if not first:
        raise EOFError
    head = _recv_exact(sock, _HEADER.size, first)
    (size,) = _HEADER.unpack(head)
    if size > _MAX_MESSAGE:
        raise ValueError(f"writer process: a message of {size} bytes is not ours")
    message = json.loads(_recv_exact(sock, size))
    if not isinstance(message, dict):
        raise TypeError("writer process: a message must be a JSON object")
    return message, list(fds)


def _error_message(exc: BaseException) -> dict[str, Any]:
    reply: dict[str, Any] = {"ok": False, "type": type(exc).__name__, "message": str(exc)}
    if isinstance(exc, _errors.CheckpointError):
        reply.update(message=exc.message, path=exc.path, hint=exc.hint)
    if isinstance(exc, OSError):
        reply.update(errno=exc.errno, strerror=exc.strerror, filename=exc.filename)
    return reply


def _error_from(reply: dict[str, Any]) -> BaseException:
    """The writer's error, rebuilt as the same type where it is one of ours or an OSError."""
    name, message = str(reply.get("type")), str(reply.get("message"))
    cls = getattr(_errors, name, None)
    if isinstance(cls, type) and issubclass(cls, _errors.CheckpointError):
        kwargs: dict[str, Any] = {"path": reply.get("path"), "hint": reply.get("hint")}
        if issubclass(cls, _errors.StorageError):
            kwargs["errno"] = reply.get("errno")
        with contextlib.suppress(TypeError):  # a class with another constructor
            return cls(message, **kwargs)
    code = reply.get("errno")
    if isinstance(code, int):
        return OSError(code, reply.get("strerror") or os.strerror(code), reply.get("filename"))
    return RuntimeError(f"the writer process failed: {name}: {message}")


# -- the training process's side ------------------------------------------------------------
class WriterProcess:
    """The writer process of one manager, started at its first write; one write at a time."""

    def __init__(self, storage: LocalStorage) -> None:
        self._storage = storage
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._mapped: SharedBlock | None = None  # the block the writer has mapped
        self._lock = threading.Lock()
        self.starts = 0  # how many processes were started (a test reads it)

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def _start(self) -> socket.socket:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._proc = subprocess.Popen(  # noqa: S603 - our own module, no shell
                [sys.executable, "-m", "ckptguard._state.procwriter", str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                env={**os.environ, "CKPTGUARD_WRITER_PARENT": str(os.getpid())},
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._sock, self._mapped = ours, None
        self.starts += 1
        return ours

    def _died(self, path: str) -> _errors.WriterDied:
        code = None
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = self._proc.wait(5)
        self._reset()
        how = f"exit code {code}" if code is not None and code >= 0 else f"signal {-(code or 0)}"
        return _errors.WriterDied(
            f"the writer process ended ({how}) while writing the save to {path}", path=path
        )

    def _reset(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock, self._mapped = None, None
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def write(self, directory: str, encoded: EncodedState) -> dict[str, FileDigest]:
        """Have the writer write ``encoded``'s tensor files into ``directory``; their digests.

        ``encoded`` is a snapshot in a :class:`SharedBlock` (each tensor's ``offset`` set).
        """
        block = encoded.block
        if not isinstance(block, SharedBlock):
            raise TypeError("the writer process writes snapshots in its shared block only")
        files = [
            {
                "file": group.file,
                "tensors": [[p.name, p.dtype, list(p.shape), p.offset] for p in group.tensors],
            }
            for group in encoded.groups
        ]
        with self._lock:
            sock = self._sock if self._sock is not None else self._start()
            try:
                if self._mapped is not block:
                    _send(sock, {"op": "map", "nbytes": block.nbytes}, [block.fd])
                    self._mapped = block
                _send(
                    sock,
                    {
                        "op": "write",
                        "directory": directory,
                        "files": files,
                        "file_mode": self._storage.file_mode,
                        "durable": self._storage.durable,
                    },
                )
                reply, _ = _recv(sock)
            except (EOFError, BrokenPipeError, ConnectionResetError):
                raise self._died(directory) from None
        if not reply.get("ok"):
            raise _error_from(reply)
        return {
            name: FileDigest(int(size), str(checksum))
            for name, (size, checksum) in reply["digests"].items()
        }

    def close(self, timeout: float = 10.0) -> None:
        """Ask the writer to exit; kill it if it does not within ``timeout``."""
        with self._lock:
            if self._sock is None:
                return
            with contextlib.suppress(OSError):
                _send(self._sock, {"op": "exit"})
            if self._proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._proc.wait(timeout)
            self._reset()


# -- the writer process's side --------------------------------------------------------------
def _write(message: dict[str, Any], block: memoryview | None) -> dict[str, Any]:
    from ckptguard._state.serialization import (  # noqa: PLC0415 - the child's only import
        _Group,
        _Pending,
        write_tensor_files,
    )
    from ckptguard._storage.local import LocalStorage  # noqa: PLC0415

    if block is None:
        raise RuntimeError("the writer process was asked to write before a block was mapped")

    groups = []
    for entry in message["files"]:
        group = _Group(str(entry["file"]))
        for name, dtype, shape, offset in entry["tensors"]:
            n = DTYPE_SIZES[dtype]
            for dim in shape:
                n *= int(dim)
            if not 0 <= offset <= offset + n <= len(block):
                raise ValueError(f"tensor {name!r} lies outside the shared block")
            group.tensors.append(_Pending(name, dtype, tuple(shape), block[offset : offset + n]))
        groups.append(group)
    storage = LocalStorage(file_mode=int(message["file_mode"]), durable=bool(message["durable"]))
    digests = write_tensor_files(str(message["directory"]), groups, storage)
    return {"ok": True, "digests": {k: [d.size, d.checksum] for k, d in digests.items()}}


def _watch_parent(parent: int) -> None:
    """End this process once the training process is gone (its pid is no longer our parent)."""
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            os._exit(1)


def _serve(sock: socket.socket) -> None:
    block: memoryview | None = None
    mapping: mmap.mmap | None = None
    while True:
        try:
            message, fds = _recv(sock)
        except EOFError:
            return
        op = message.get("op")
        if op == "exit":
            return
        if op == "map":
            block = None
            if mapping is not None:
                mapping.close()
            (fd,) = fds
            try:
                mapping = mmap.mmap(fd, int(message["nbytes"]), prot=mmap.PROT_READ)
            finally:
                os.close(fd)
            block = memoryview(mapping)
            continue
        for fd in fds:  # only a map carries a descriptor
            os.close(fd)
        try:
            reply = _write(message, block)
        except Exception as exc:
            reply = _error_message(exc)
        _send(sock, reply)


def main(argv: list[str]) -> int:
    """The writer process: serve writes on the socket whose descriptor is ``argv[0]``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the training process decides
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    parent = int(os.environ.get("CKPTGUARD_WRITER_PARENT", os.getppid()))
    if os.getppid() != parent:
        return 1
    os.dup2(2, 1)  # stray prints go to stderr; the protocol has its own socket
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    sock = socket.socket(fileno=int(argv[0]))
    try:
        _serve(sock)
    except (BrokenPipeError, ConnectionResetError):
        return 1
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
