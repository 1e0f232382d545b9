"""Named fault points of the commit protocol.

Production code calls :func:`fault_point` at each named step; it does nothing unless a
test installed a hook. The crash tests install a hook that SIGKILLs the process at one
point, and fail if that point is never reached, so this list cannot drift from the code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "DEFERRED_FAULT_POINTS",
    "FAULT_POINTS",
    "FILE_FAULT_POINTS",
    "REMOTE_FAULT_POINTS",
    "REUSE_FAULT_POINTS",
    "fault_point",
    "set_fault_hook",
]

FAULT_POINTS: tuple[str, ...] = (
    "stage.created",  # staging dir and owner file exist, nothing written yet
    "seal.files_synced",  # every file hashed and fsynced, no manifest yet
    "seal.manifest_tmp_written",  # manifest written under its temp name and fsynced
    "seal.manifest_written",  # manifest renamed into place, staging dir not yet fsynced
    "seal.done",  # staging dir fsynced: the save is sealed but invisible
    "commit.before_rename",  # holding the lock, about to rename staging onto the final name
    "commit.quarantined",  # a foreign entry in the way was moved to quarantine
    "commit.moved_to_trash",  # replace: old checkpoint in trash, new one not yet renamed in
    "commit.renamed",  # the final name exists, root not yet fsynced
    "publish.root_synced",  # root fsynced: the commit is durable
    "publish.done",  # trash and stale staging cleaned, about to release the lock
)

# Steps of the object-store commit (``objectstore.py``), kept apart: the local crash tests
# require every point above to be reached by a local save.
REMOTE_FAULT_POINTS: tuple[str, ...] = (
    "remote.uploading",  # after each chunk handed to an upload (mid multipart upload)
    "remote.data_uploaded",  # every data object uploaded, no manifest yet: invisible
    "remote.manifest_written",  # the manifest is in place: the save is committed
)

# Steps of a single-file commit (``_protocol/filecommit.py``, Lightning's ``.ckpt`` files), kept
# apart too: tests/integrations/test_lightning_files.py reaches each of these.
FILE_FAULT_POINTS: tuple[str, ...] = (
    "file.written",  # temp file written and fsynced; the sidecar not yet rewritten
    "file.sidecar_written",  # sidecar (new and current entries) durable; not yet renamed
    "file.made_way",  # a directory in the way was moved aside (make_way); not yet renamed
    "file.renamed",  # the name holds the new file; directory not yet fsynced
    "file.committed",  # directory fsynced: durable; the sidecar not yet trimmed
    "file.removed",  # removal: the file is gone (directory fsynced), its sidecar not yet
)

# Async framework saves (``integrations/_capture.py``): the background thread writes the
# files whose tensors the framework's save call handed over as snapshots.
DEFERRED_FAULT_POINTS: tuple[str, ...] = (
    "deferred.write",  # before each deferred file is written (staging dir exists, invisible)
)

REUSE_FAULT_POINTS: tuple[str, ...] = (
    "reuse.linked",  # an incremental save linked a committed file into its staging dir
)

_hook: Callable[[str], None] | None = None


def fault_point(name: str) -> None:
    """Mark that the protocol reached step ``name``; runs the test hook, if any."""
    if _hook is not None:
        _hook(name)


def set_fault_hook(hook: Callable[[str], None] | None) -> Callable[[str], None] | None:
    """Install ``hook`` (or remove it with None); returns the previous hook."""
    global _hook
    previous, _hook = _hook, hook
    return previous
