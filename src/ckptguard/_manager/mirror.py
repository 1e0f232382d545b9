"""Mirroring: commit locally first (fast), then copy each checkpoint to an object store.

``CheckpointManager(root, mirror="s3://bucket/run")``: after each local commit, a
background thread uploads the checkpoint (its files streamed from disk, each checksum
computed while uploading and compared with the local manifest's), commits it on the store
with its own manifest (the manifest-marker commit, ``_protocol/marker.py``), then reads the
remote copy back and checks every checksum. Its files are uploaded concurrently, each in
parts uploaded concurrently, all within the store's ``max_concurrency`` requests and
buffer pool (``_storage/transfer.py``); checkpoints go one after another, in the order
they were committed, so a deletion never overtakes the upload it follows. A checkpoint
that local retention deletes is deleted from the mirror too. Failures are logged at once
and raised by the manager's ``wait``/``close``; they never fail a local save. Resume
takes the newest valid checkpoint of local and remote (``CheckpointManager.latest``/``restore``).
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import queue
import threading
import time
from typing import TYPE_CHECKING, Any

from ckptguard._coordination.base import SingleProcess
from ckptguard._errors import CorruptCheckpoint
from ckptguard._protocol.backend import backend_for
from ckptguard._protocol.transaction import AtomicCheckpoint
from ckptguard._protocol.verify import verify_local as verify
from ckptguard._storage.base import FileDigest, innermost
from ckptguard._storage.local import open_checkpoint_file

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from ckptguard._format.manifest import FileEntry

__all__ = ["Mirror"]

_log = logging.getLogger("ckptguard.mirror")
COPY_CHUNK = 1 << 20  # per file in flight; the upload copies it into its pool buffers


class Mirror:
    """The background copier of one manager's committed checkpoints."""

    def __init__(
        self,
        url: str,
        storage_options: Mapping[str, Any] | None = None,
        *,
        max_concurrency: int | None = None,
    ) -> None:
        self.backend = backend_for(
            url, storage_options, what="mirror", max_concurrency=max_concurrency
        )
        # files in flight at once (each also sends its parts concurrently)
        self.max_files = getattr(innermost(self.backend.storage), "max_concurrency", 1)
        self.url = self.backend.root
        self._jobs: queue.Queue[tuple[str, str] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self.uploaded: list[str] = []
        self._last_upload_ok = True  # deletions wait while uploads fail

    # -- the manager's calls ------------------------------------------------------------------
    def upload(self, local_path: str) -> None:
        """Queue a committed local checkpoint for upload."""
        self._submit(("upload", local_path))

    def retire(self, name: str) -> None:
        """Queue the deletion of ``name`` on the mirror (local retention deleted it)."""
        self._submit(("retire", name))

    def wait(self) -> None:
        """Wait until every queued job is done; raise the first failure since the last wait."""
        self._jobs.join()
        with self._lock:
            error, self._error = self._error, None
        if error is not None:
            raise error

    def drain(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the queue to empty; whether it did."""
        deadline = time.monotonic() + timeout
        while self._jobs.unfinished_tasks:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._thread is not None:
                self._jobs.put(None)
                self._thread.join()
                self._thread = None

    # -- the background thread ----------------------------------------------------------------
    def _submit(self, job: tuple[str, str]) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="ckptguard-mirror", daemon=True)
            self._thread.start()
        self._jobs.put(job)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is None:
                    return
                kind, arg = job
                if kind == "upload":
                    self._last_upload_ok = False
                    self._upload(arg)
                    self._last_upload_ok = True
                elif self._last_upload_ok:
                    self.backend.retire(arg)
                else:  # never empty the mirror while no newer copy reaches it
                    _log.warning("not deleting %s from the mirror: the last upload failed", arg)
            except BaseException as exc:
                _log.error("mirroring to %s failed: %s: %s", self.url, type(exc).__name__, exc)
                with self._lock:
                    self._error = self._error or exc
            finally:
                self._jobs.task_done()

    def _upload(self, local_path: str) -> None:
        name = os.path.basename(local_path)
        local = verify(local_path, checksums=False)
        if not local.ok or local.manifest is None:
            if not os.path.lexists(local_path):
                _log.info("not mirroring %s: deleted before its upload", local_path)
                return
            raise CorruptCheckpoint(
                f"{local_path} does not verify; not mirrored: {'; '.join(local.problems)}",
                path=local_path,
            )
        manifest = local.manifest
        target = f"{self.url}/{name}"
        tx = AtomicCheckpoint(
            target,
            step=manifest.step,
            metrics=manifest.metrics,
            metadata=manifest.metadata,
            if_exists="replace",
            storage=self.backend.storage,
            retry=self.backend.retry,
            coordinator=SingleProcess(),
        )
        try:
            with tx:
                tx.known.update(self._copy_all(local_path, manifest.files, tx.write_path))
        except Exception:
            if not os.path.lexists(local_path):  # retention got to it first: nothing to keep
                _log.info("not mirroring %s: deleted by retention during its upload", name)
                return
            raise
        report = self.backend.verify(target, checksums=True)  # the remote copy, read back
        if not report.ok:
            raise CorruptCheckpoint(
                f"the mirror copy {target} does not verify: {'; '.join(report.problems)}",
                path=target,
                problems=report.problems,
            )
        self.uploaded.append(name)
        _log.info(
            "mirrored %s to %s (%d bytes, checksums verified)", name, target, report.bytes_checked
        )

    def _copy_all(
        self, checkpoint: str, entries: Sequence[FileEntry], staging: str
    ) -> dict[str, FileDigest]:
        """Upload a checkpoint's files, ``max_files`` at once, each checked as committed.

        The first failure stops the files not started yet and is raised once the others
        have ended (each aborts its own upload on failure).
        """

        def copy(entry: FileEntry) -> FileDigest:
            digest = self._copy(checkpoint, entry.path, f"{staging}/{entry.path}")
            _same_as_committed(checkpoint, entry.path, digest, entry.size, entry.checksum)
            return digest

        # the largest first: the small ones fill in around them
        order = sorted(entries, key=lambda e: e.size, reverse=True)
        workers = max(1, min(self.max_files, len(order)))
        with concurrent.futures.ThreadPoolExecutor(
            workers, thread_name_prefix="ckptguard-mirror-file"
        ) as pool:
            futures = {pool.submit(copy, entry): entry.path for entry in order}
            try:
                return {futures[f]: f.result() for f in concurrent.futures.as_completed(futures)}
            except BaseException:
                for future in futures:
                    future.cancel()
                raise

    def _copy(self, checkpoint: str, rel: str, dest: str) -> FileDigest:
        fd = open_checkpoint_file(checkpoint, rel)
        try:
            writer = self.backend.storage.open_write(dest)
            try:
                buf = bytearray(COPY_CHUNK)
                view = memoryview(buf)
                while n := os.readv(fd, [buf]):
                    writer.write(view[:n])
                return writer.close()
            except BaseException:
                writer.abort()
                raise
        finally:
            os.close(fd)


def _same_as_committed(
    checkpoint: str, rel: str, digest: FileDigest, size: int, checksum: str
) -> None:
    """Refuse to mirror a file whose bytes are no longer those its manifest lists."""
    if digest.size != size or digest.checksum != checksum:
        raise CorruptCheckpoint(
            f"{checkpoint}/{rel} changed since its commit "
            "(its bytes do not match the local manifest); not mirrored",
            path=checkpoint,
        )
