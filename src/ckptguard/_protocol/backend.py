"""A checkpoint root on one kind of storage, and the one resolver that makes it.

:func:`backend_for` is the only code that looks at a root's scheme (as torchsnapshot's
``url_to_storage_plugin``): every public entry point turns its root or path into a
:class:`Backend` through it, so a URL can never become a local path. A backend binds
the root to its storage (retrying) and its commit strategy; everything above asks the
backend, never which kind it is.
"""

from __future__ import annotations

import collections.abc
import contextlib
import json
import os
import posixpath
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ckptguard._errors import (
    CheckpointError,
    CheckpointNotFound,
    RootNotADirectory,
    UnsupportedRoot,
    storage_error_from_os,
)
from ckptguard._format.layout import RootLayout
from ckptguard._protocol.marker import MarkerCommit, names_with_manifest, read_marker
from ckptguard._protocol.rename import RenameCommit
from ckptguard._protocol.verify import (
    VerifyReport,
    read_manifest_from,
    verify_checkpoint,
)
from ckptguard._storage.base import innermost, is_url
from ckptguard._storage.local import LocalStorage, read_only_reason
from ckptguard._storage.retry import DEFAULT_RETRY, RetryPolicy, with_retries
from ckptguard._storage.transfer import check_max_concurrency

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping
    from contextlib import AbstractContextManager

    from ckptguard._format.manifest import Manifest
    from ckptguard._protocol.strategy import CommitStrategy
    from ckptguard._storage.base import Source, Storage
    from ckptguard._storage.objectstore import StoreListing

__all__ = ["OPTIONS_ENV", "Backend", "backend_for", "parent_of", "storage_options_from_env"]

OPTIONS_ENV = "CKPTGUARD_STORAGE_OPTIONS"


@dataclass(frozen=True)
class Backend:
    """One checkpoint root: where it is, how to reach it, how a save commits there."""

    root: str  # an absolute path, or a URL without a trailing slash
    storage: Storage
    strategy: CommitStrategy
    retry: RetryPolicy = DEFAULT_RETRY

    @property
    def layout(self) -> RootLayout:
        return RootLayout(self.root)

    @property
    def remote(self) -> bool:
        """Whether the root is on an object store (for messages and the mirror only)."""
        return self.strategy.shared

    def join(self, name: str) -> str:
        return f"{self.root}/{name}" if is_url(self.root) else os.path.join(self.root, name)

    def names(self, listing: StoreListing | None = None) -> list[str]:
        """Names under the root that may be checkpoints (each still to be verified)."""
        if listing is not None:
            return names_with_manifest(self.storage, self.root, listing.under(self.root))
        return self.strategy.visible_names(self.layout, self.storage)

    def listing(self) -> StoreListing | None:
        """One listing of an object-store root, for code that looks at every checkpoint.

        None on a filesystem (its directory reads are local and cheap). Names, trees
        (``verify(listing=)``) and pins are then answered from it, manifests read once per
        ETag: retention and ``latest()`` make a number of requests that does not grow
        with the number of checkpoints.
        """
        if not self.strategy.shared:
            return None
        store = innermost(self.storage)
        lister = getattr(store, "listing", None)
        return lister(self.root) if callable(lister) else None

    def exists(self, path: str | None = None) -> bool:
        """Whether the root (or ``path``) holds anything at all."""
        return self.storage.exists(self.root if path is None else path)

    def require_root(self) -> None:
        """Raise CheckpointNotFound unless the root exists (a bucket, a prefix, a dir)."""
        checker = getattr(innermost(self.storage), "require_root", None)
        if callable(checker):
            checker()  # a missing bucket, refused credentials, an unreachable endpoint
        if not self.exists():
            raise CheckpointNotFound(
                f"{self.root} does not exist",
                path=self.root,
                hint="check the path or URL (for a URL: the bucket and the prefix)",
            )

    def verify(
        self,
        path: str,
        *,
        checksums: bool = True,
        progress: Callable[[int], None] | None = None,
        expect_name: str | None = None,
        listing: StoreListing | None = None,
    ) -> VerifyReport:
        return verify_checkpoint(
            self.storage,
            path,
            content_prefix=self.strategy.content_prefix,
            checksums=checksums,
            progress=progress,
            expect_name=expect_name,
            open_tree=listing.open_tree if listing is not None else None,
        )

    def read_manifest(self, path: str) -> Manifest:
        try:
            tree = self.storage.open_tree(path)
        except CheckpointNotFound:
            raise
        except FileNotFoundError:
            raise CheckpointNotFound(f"{path} does not exist", path=path) from None
        try:
            return read_manifest_from(tree)
        finally:
            tree.close()

    def open_files(
        self, path: str, manifest: Manifest
    ) -> tuple[Manifest, Callable[[str], Source], Callable[[], None]]:
        """(manifest with paths relative to the files, opener, close) to read a checkpoint."""
        import dataclasses  # noqa: PLC0415

        under = self.strategy.content_prefix(manifest)
        files = tuple(
            dataclasses.replace(f, path=f.path.removeprefix(under))
            for f in manifest.files
            if f.path.startswith(under)
        )
        try:
            tree = self.storage.open_tree(path)
        except FileNotFoundError as exc:
            if isinstance(exc, CheckpointNotFound):
                raise
            raise CheckpointNotFound(f"{path} does not exist", path=path) from None

        def opener(rel: str) -> Source:
            return tree.open(under + rel)

        return dataclasses.replace(manifest, files=files), opener, tree.close

    def read_only_reason(self) -> str | None:
        """Why this root cannot be written (a read-only mount, no permission), or None.

        Only a filesystem tells in advance; on an object store a refused write is typed
        when it happens (``StoragePermissionError``).
        """
        return None if self.strategy.shared else read_only_reason(self.root)

    @contextlib.contextmanager
    def _typed(self, what: str) -> Iterator[None]:
        """A refusal (EACCES, EROFS...) of the start-up steps, as a typed StorageError."""
        try:
            yield
        except OSError as exc:
            if isinstance(exc, CheckpointError):  # typed already (a missing bucket...)
                raise
            err = storage_error_from_os(exc, what, self.root)
            err.hint = (
                f"check the owner and mode of {self.root} and its parent (ls -ld); to only "
                "read its checkpoints, open it with read_only=True"
            )
            raise err from exc

    def prepare_root(self) -> None:
        """Create the root and its work dirs; a refusal (EACCES, EROFS...) is typed."""
        with self._typed("preparing the checkpoint root"):
            self.strategy.prepare_root(self.layout, self.storage, retry=self.retry)

    def retire(self, name: str, *, background: bool = False) -> bool:
        return self.strategy.retire(
            self.layout, self.storage, name, retry=self.retry, background=background
        )

    def drain(self) -> None:
        """Wait for the removals of ``retire(..., background=True)``."""
        self.strategy.drain()

    def repair(self, *, stale_after: float, lock_timeout: float) -> list[str]:
        with self._typed("repairing what a crash left in the root"):
            return self.strategy.repair(
                self.layout, self.storage, stale_after=stale_after, lock_timeout=lock_timeout
            )

    def lock(self, timeout: float) -> AbstractContextManager[None]:
        return self.strategy.lock(self.layout, timeout)

    def manifest_or_none(self, path: str) -> Manifest | None:
        return read_marker(self.storage, path)


def storage_options_from_env(env: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """``CKPTGUARD_STORAGE_OPTIONS`` (JSON), or None; a malformed value is refused typed."""
    raw = (os.environ if env is None else env).get(OPTIONS_ENV, "").strip()
    if not raw:
        return None
    try:
        options = json.loads(raw)
    except ValueError as exc:
        raise UnsupportedRoot(
            f"{OPTIONS_ENV} is not valid JSON ({exc})",
            hint=f"set it to a JSON object, e.g. {OPTIONS_ENV}='{{\"anon\": false}}'",
        ) from None
    if not isinstance(options, dict):
        raise UnsupportedRoot(
            f"{OPTIONS_ENV} must be a JSON object, got {type(options).__name__}",
            hint="set it to a JSON object of fsspec storage options",
        )
    return options


def parent_of(path: str) -> str:
    """The root that holds the checkpoint at ``path`` (a local path or a URL)."""
    if is_url(path):
        head = path.rstrip("/")
        return head.rsplit("/", 1)[0] if "/" in head.split("://", 1)[1] else head
    return os.path.dirname(os.path.abspath(path))


def backend_for(
    root: str | os.PathLike[str],
    storage_options: Mapping[str, Any] | None = None,
    *,
    storage: Storage | None = None,
    retry: RetryPolicy = DEFAULT_RETRY,
    what: str = "this operation",
    max_concurrency: int | None = None,
) -> Backend:
    """The backend of ``root``: a local path (or file:// URL), or an fsspec URL.

    ``storage`` replaces the local storage (a fault-injecting wrapper, say); for a URL it
    must wrap an ``FsspecStorage`` of that URL. ``storage_options`` go to fsspec (and
    default to ``CKPTGUARD_STORAGE_OPTIONS``). ``what`` names the caller in errors.
    ``max_concurrency``: a store's requests in flight at once (``_storage/transfer.py``).
    """
    text = os.fspath(root)
    if not isinstance(text, str) or not text.strip():
        # "" would silently be the current directory (os.path.abspath("") is the cwd).
        raise UnsupportedRoot(
            f"{what}: an empty root ({text!r})"
            if isinstance(text, str)
            else f"{what}: a root must be a str or a path, got {type(text).__name__}",
            path=str(text),
            hint="pass a directory such as 'runs/exp1' or a URL such as 's3://bucket/run'",
        )
    if storage_options is not None and not isinstance(storage_options, collections.abc.Mapping):
        raise UnsupportedRoot(
            f"{what}: storage_options must be a dict of fsspec options, "
            f"got {type(storage_options).__name__}",
            path=text,
            hint="pass e.g. storage_options={'client_kwargs': {'endpoint_url': ...}}",
        )
    if max_concurrency is not None:
        check_max_concurrency(max_concurrency)
    if is_url(text):
        from ckptguard._storage.objectstore import FsspecStorage  # noqa: PLC0415 - fsspec

        if storage is None:
            options = (
                storage_options if storage_options is not None else (storage_options_from_env())
            )
            storage = FsspecStorage(
                text, options, retry=retry,
                **({} if max_concurrency is None else {"max_concurrency": max_concurrency}),
            )  # fmt: skip
        url = innermost(storage).url
        return Backend(url, with_retries(storage, retry), MarkerCommit(), retry)
    if storage_options:
        raise UnsupportedRoot(
            f"{what}: storage_options were given for the local path {text}",
            path=text,
            hint="storage_options are for URL roots (s3://bucket/prefix); drop them",
        )
    local = os.path.abspath(text.removeprefix("file://"))
    _refuse_a_file(local, what)
    return Backend(local, with_retries(storage or LocalStorage(), retry), RenameCommit(), retry)


def _refuse_a_file(root: str, what: str) -> None:
    """Raise RootNotADirectory if ``root`` is a file or lies under one.

    Checked here, before anything is written, because the write that would find it says
    only EEXIST or ENOTDIR. A root that does not exist yet is fine (a manager creates it),
    and so is one this process may not read or write: the step that needs access reports
    that, typed (a read-only root is fine for reading).
    """
    probe = root
    while True:
        try:
            mode = os.stat(probe).st_mode
        except (FileNotFoundError, NotADirectoryError):
            parent = os.path.dirname(probe)
            if parent == probe:
                return
            probe = parent
            continue
        except (OSError, ValueError):  # EACCES, ELOOP, a NUL byte: not ours to judge here
            return
        if stat.S_ISDIR(mode):
            return
        kind = "a file" if stat.S_ISREG(mode) else "not a directory"
        message = (
            f"{what}: the root {root} is {kind}, not a directory"
            if probe == root
            else f"{what}: the root {root} lies under {probe}, which is {kind}"
        )
        raise RootNotADirectory(message, path=root)


def checkpoint_backend(
    path: str | os.PathLike[str],
    storage_options: Mapping[str, Any] | None = None,
    *,
    what: str = "this operation",
) -> tuple[Backend, str]:
    """(backend of the root that holds the checkpoint at ``path``, its canonical path)."""
    text = os.fspath(path)
    backend = backend_for(parent_of(text) if text.strip() else text, storage_options, what=what)
    name = (
        posixpath.basename(text.rstrip("/"))
        if is_url(text)
        else os.path.basename(os.path.abspath(text))
    )
    return backend, backend.join(name)
