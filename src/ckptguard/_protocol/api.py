"""The read-side public functions: verify and read a checkpoint, on any backend."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from ckptguard._protocol.backend import checkpoint_backend
from ckptguard._protocol.filecommit import verify_file
from ckptguard._storage.base import is_url

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from ckptguard._format.manifest import Manifest
    from ckptguard._protocol.verify import VerifyReport

__all__ = ["read_manifest", "verify"]


def verify(
    path: str | os.PathLike[str],
    *,
    checksums: bool = True,
    progress: Callable[[int], None] | None = None,
    expect_name: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> VerifyReport:
    """Verify the checkpoint at ``path`` (a directory, or a URL such as s3://b/run/checkpoint-1).

    A regular file (a Lightning ``.ckpt`` saved through ckptguard) is verified against
    its checksum sidecar.

    ``checksums=False`` checks sizes only. ``expect_name``: the name it must have been
    committed under, because its name gives its step (default: its own name, when that
    is a step name such as ``checkpoint-N``).
    """
    text = os.fspath(path)
    if not is_url(text) and os.path.isfile(text) and not os.path.islink(text):
        # A single-file checkpoint (Lightning's .ckpt), checked against its sidecar.
        return verify_file(text, checksums=checksums)
    backend, where = checkpoint_backend(path, storage_options, what="verify")
    return backend.verify(where, checksums=checksums, progress=progress, expect_name=expect_name)


def read_manifest(
    path: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None
) -> Manifest:
    """Read and strictly parse the manifest of the checkpoint at ``path`` (path or URL)."""
    backend, where = checkpoint_backend(path, storage_options, what="read_manifest")
    return backend.read_manifest(where)
