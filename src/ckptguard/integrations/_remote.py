"""Frameworks on object stores: the options, the local cache, and resuming from a store.

The frameworks (the Hugging Face Trainer, Accelerate) read and write their checkpoint
files through local paths. With an object-store output (``s3://bucket/run``) or a
``mirror=``:

- saving: the framework writes into a local staging dir that ckptguard gives each
  process (the object-store commit's spool, ``_protocol/marker.py``); ckptguard uploads
  every rank's files, hashing them as they go, and commits the checkpoint with one
  manifest, exactly once. With ``mirror=`` the checkpoint is committed locally first and
  uploaded in the background (``_manager/mirror.py``).
- resuming: the newest checkpoint that verifies is chosen among the store's (and, with a
  mirror, the local root's); a remote one is downloaded into a local cache, every byte
  checked against its manifest as it arrives, and the framework is given that local
  directory. A remote checkpoint that fails (a corrupt or missing object) is skipped with
  a warning and the next older one is tried.

What this module guarantees:
- the directory handed to the framework holds exactly the files of one committed
  checkpoint, each matching its manifest's size and checksum (downloaded into a private
  0700 directory, renamed into place only once complete);
- every rank is handed the same checkpoint: each node's first process (``LOCAL_RANK``
  0) chooses and downloads, and the oldest proposal wins if nodes disagree;
- the cache holds one checkpoint per output: a resume removes the others of the same
  output (and downloads cut by a crash). Partial: two jobs resuming the same output
  through one cache at once may remove each other's copy; give them separate
  ``cache_dir``.

Cache location: ``cache_dir=`` of ``protect``, else ``CKPTGUARD_CACHE_DIR``, else
``<system temp dir>/ckptguard-cache-<uid>``; below it, one directory per output
(its last path component and a hash of its URL).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import xxhash

from ckptguard._errors import (
    CheckpointError,
    CheckpointNotFound,
    CorruptCheckpoint,
    NoValidCheckpoint,
    StorageError,
)
from ckptguard._format.layout import MANIFEST_NAME, new_save_id, validate_name
from ckptguard._protocol.verify import verify_local
from ckptguard._storage.base import READ_CHUNK, is_url
from ckptguard._storage.local import LocalStorage
from ckptguard.integrations._resume import raise_choice_failures

if TYPE_CHECKING:
    from collections.abc import Mapping

    from ckptguard._coordination.base import Coordinator
    from ckptguard._format.manifest import Manifest
    from ckptguard._manager.manager import CheckpointManager
    from ckptguard._protocol.backend import Backend

__all__ = [
    "CACHE_ENV",
    "RemoteOptions",
    "cache_root",
    "fetch",
    "fetch_url",
    "newest_to_resume",
    "remove_url_folder",
]

_log = logging.getLogger("ckptguard.integrations")
CACHE_ENV = "CKPTGUARD_CACHE_DIR"
_PARTIAL = ".partial-"

# CheckpointManager options a framework integration cannot take, and why.
_NOT_FOR_FRAMEWORKS = {
    "keep_best": "the framework decides its best checkpoint (e.g. metric_for_best_model)",
    "best_metric": "the framework decides its best checkpoint (e.g. metric_for_best_model)",
    "best_mode": "the framework decides its best checkpoint (e.g. greater_is_better)",
    "keep_every": "not supported for framework checkpoints yet",
    "naming": "the framework names its checkpoints",
    "if_exists": "the framework's own rule applies (a save of an existing step replaces it)",
    "storage": "a storage object is for CheckpointManager only",
    "coordinator": "the integration uses torch.distributed's process group",
    "run_id": "the integration continues the run it finds",
    "new_lineage": "the integration continues the run it finds",
    "read_only": "a framework run writes checkpoints",
    "retry": "not taken by the integrations; CKPTGUARD_* environment settings apply",
    "lock_timeout": "not taken by the integrations",
    "stale_after": "not taken by the integrations",
    "exit_timeout": "process exit waits up to 120 s for an async save in flight",
    "check_environment": "the integration runs the checks itself",
}


@dataclass(frozen=True)
class RemoteOptions:
    """The ``CheckpointManager`` options a framework integration accepts."""

    mirror: str | None = None
    keep_last: int | None = None  # None: the framework's own limit
    verify_after_save: bool = False
    storage_options: Mapping[str, Any] | None = None
    cache_dir: str | None = None
    async_save: bool = False  # see integrations/_capture.py
    incremental: bool | None = None  # None: CheckpointManager's default (on)
    full_every: int | None = None  # None: CheckpointManager's default

    @classmethod
    def of(cls, who: str, extra: Mapping[str, Any], **given: Any) -> RemoteOptions:
        """Check the options of ``who`` (``extra``: anything else passed); TypeError if wrong."""
        for name in extra:
            why = _NOT_FOR_FRAMEWORKS.get(name)
            if why is not None:
                raise TypeError(f"{who} does not take {name}= ({why})")
            if name in {"incremental", "full_every"}:
                continue
            raise TypeError(
                f"{who} got an unexpected keyword argument {name!r}; it takes async_save=, "
                "mirror=, keep_last=, verify_after_save=, storage_options=, cache_dir=, "
                "incremental= and full_every="
            )
        options = cls(**given, **extra)
        if options.mirror is not None and not is_url(options.mirror):
            raise TypeError(f"{who}: mirror= must be an object-store URL, got {options.mirror!r}")
        if options.keep_last is not None and (
            isinstance(options.keep_last, bool)
            or not isinstance(options.keep_last, int)
            or options.keep_last < 1
        ):
            raise TypeError(f"{who}: keep_last= must be a positive int or None")
        if options.incremental is not None and not isinstance(options.incremental, bool):
            raise TypeError(f"{who}: incremental= must be True, False or None (the default)")
        every = options.full_every
        if every is not None and (type(every) is not int or every < 1):
            raise TypeError(f"{who}: full_every= must be a positive int")
        return options

    def manager_kwargs(self, root: str, keep_last: int | None) -> dict[str, Any]:
        """Keyword arguments of ``CheckpointManager`` for ``root`` (a path or a URL)."""
        remote = is_url(root)
        if remote and self.mirror is not None:
            raise TypeError(f"mirror= is for a local output: {root} is on an object store already")
        # On a local root without a mirror they are for URLs given elsewhere (Accelerate's
        # save_state(URL)), not for this root.
        options = self.storage_options if remote or self.mirror is not None else None
        kwargs: dict[str, Any] = {
            "keep_last": self.keep_last if self.keep_last is not None else keep_last,
            "storage_options": options,
            "mirror": self.mirror,
            "verify_after_save": self.verify_after_save,
            "incremental": self.incremental,
        }
        if self.full_every is not None:
            kwargs["full_every"] = self.full_every
        return kwargs

    def uses_cache(self, root: str) -> bool:
        return is_url(root) or self.mirror is not None


def cache_root(cache_dir: str | None, source: str) -> str:
    """The cache directory of one output (made 0700 if missing).

    The default base (in the shared temp dir) must be this user's own directory, not a
    link: another user could otherwise swap what is loaded.
    """
    base = cache_dir or os.environ.get(CACHE_ENV)
    if not base:
        base = os.path.join(tempfile.gettempdir(), f"ckptguard-cache-{os.getuid()}")
        os.makedirs(base, mode=0o700, exist_ok=True)
        st = os.lstat(base)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            raise CheckpointError(
                f"{base} is not a directory of this user's: not used as the checkpoint cache",
                path=base,
                hint=f"remove it, or give protect(..., cache_dir=...) or {CACHE_ENV}",
            )
    last = source.rstrip("/").rsplit("/", 1)[-1][-40:]
    tail = "".join(c if c.isalnum() or c in "-_." else "_" for c in last).lstrip(".") or "root"
    digest = xxhash.xxh3_64_hexdigest(source.encode())[:12]
    path = os.path.join(os.path.abspath(base), f"{tail}-{digest}")
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


def _cached(target: str, manifest: Manifest) -> bool:
    """Whether ``target`` already holds this very save, intact."""
    try:
        report = verify_local(target)
    except (CheckpointError, OSError):
        return False
    return report.ok and report.manifest is not None and report.manifest.save_id == manifest.save_id


def fetch(backend: Backend, path: str, manifest: Manifest, cache: str) -> str:
    """Download the checkpoint at ``path`` into ``cache``, every byte checked; its local path.

    Raises CorruptCheckpoint (a byte or a size that does not match the manifest) or
    CheckpointNotFound (an object gone). The local copy gets a manifest of its own (the
    same save, with paths relative to it), so that it verifies where it is.
    """
    name = validate_name(path.rstrip("/").rsplit("/", 1)[-1])
    target = os.path.join(cache, name)
    if _cached(target, manifest):
        _log.info("resuming from %s: already in the cache as %s", path, target)
        return target
    partial = os.path.join(cache, f"{_PARTIAL}{name}.{new_save_id()}")
    os.mkdir(partial, 0o700)
    try:
        local_manifest = _download(backend, path, manifest, partial)
        LocalStorage().write_bytes(os.path.join(partial, MANIFEST_NAME), local_manifest.to_json())
        if os.path.lexists(target):
            shutil.rmtree(target)
        os.rename(partial, target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    _log.info("downloaded %s into %s (every checksum checked)", path, target)
    return target


def _download(backend: Backend, path: str, manifest: Manifest, dest: str) -> Manifest:
    local, opener, close = backend.open_files(path, manifest)
    storage = LocalStorage()
    buf = bytearray(READ_CHUNK)
    try:
        for entry in local.files:
            out = os.path.join(dest, entry.path)
            os.makedirs(os.path.dirname(out), mode=0o700, exist_ok=True)
            try:
                source = opener(entry.path)
            except FileNotFoundError as exc:
                raise CorruptCheckpoint(f"{path}: {entry.path} is missing", path=path) from exc
            if source.size != entry.size:
                source.close()
                raise CorruptCheckpoint(
                    f"{path}: {entry.path} has {source.size} bytes, its manifest says {entry.size}",
                    path=path,
                )
            writer = storage.open_write(out, fsync=False)
            try:
                offset = 0
                while offset < entry.size:
                    n = min(len(buf), entry.size - offset)
                    view = memoryview(buf)[:n]
                    source.pread_into(view, offset)
                    writer.write(view)
                    offset += n
                digest = writer.close()
            except BaseException:
                writer.abort()
                raise
            finally:
                source.close()
            if digest.checksum != entry.checksum:
                raise CorruptCheckpoint(
                    f"{path}: {entry.path} does not match its checksum (corrupt on the store)",
                    path=path,
                )
    finally:
        close()
    return local


def clean_cache(cache: str, keep: str | None) -> None:
    """Remove every entry of ``cache`` but ``keep`` (older checkpoints, cut downloads)."""
    for entry in os.listdir(cache):
        path = os.path.join(cache, entry)
        if path == keep:
            continue
        with contextlib.suppress(OSError):
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)


# -- choosing what to resume from -----------------------------------------------------------
def _candidates(manager: CheckpointManager) -> list[tuple[int, int, str, Backend]]:
    """(step, 1 if local else 0, path, backend), newest first (local first on a tie)."""
    found = [(s, 1, p, manager.backend) for s, p in manager.catalog.committed()]
    mirror = manager.catalog.mirror
    if mirror is not None:
        try:
            found += [(s, 0, p, mirror) for s, p in manager.catalog.committed(mirror)]
        except (CheckpointError, OSError) as exc:
            _log.warning("mirror unreachable (%s): local checkpoints only", exc)
    return sorted(found, key=lambda c: c[:3], reverse=True)


def _try(manager: CheckpointManager, backend: Backend, path: str, cache: str) -> str:
    """``path`` as a verified local directory (downloaded if remote); raises if it fails."""
    report = manager.catalog.check(path, checksums=not backend.remote, backend=backend)
    if not report.ok or report.manifest is None:
        if not backend.exists(path):
            raise CheckpointNotFound(f"{path} was removed while it was checked", path=path)
        raise CorruptCheckpoint(f"{'; '.join(report.problems)}", path=path)
    if not manager.catalog.owns(report.manifest):
        raise CheckpointNotFound(f"{path} belongs to another run", path=path)
    if not backend.remote:
        return path
    return fetch(backend, path, report.manifest, cache)


def _choose(manager: CheckpointManager, cache: str, step: int | None) -> tuple[int, str] | None:
    """The newest (or ``step``'s) checkpoint that verifies, as (step, local path).

    On a local root with a mirror, a newer checkpoint written there before ckptguard (no
    manifest) that passes the structural check is taken, with a warning, as without one.
    """
    found: tuple[int, str] | None = None
    for s, _local, path, backend in _candidates(manager):
        if step is not None and s != step:
            continue
        try:
            found = s, _try(manager, backend, path, cache)
            break
        except CheckpointNotFound as exc:
            _log.info("skipping %s: %s", path, exc.message)
        except (CorruptCheckpoint, StorageError) as exc:
            _log.warning("skipping %s: %s", path, exc.message)
    if step is None and not manager.backend.remote:
        from ckptguard._manager.adoption import newest_adoptable  # noqa: PLC0415

        newer_than = None if found is None else found[0]
        older = newest_adoptable(manager.root, manager.naming, newer_than=newer_than)
        if older is not None:
            return older.step, older.path
    return found


def newest_to_resume(manager: CheckpointManager, cache: str) -> str | None:
    """The local directory of the newest checkpoint that verifies, the same on every rank.

    Each node's first process chooses (and downloads into ``cache``); the oldest
    proposal wins. Stale cache entries go once every rank has its copy.
    """
    coord = manager.coordinator
    leader = coord.world_size == 1 or coord.local_rank == 0
    idle = {"step": None, "path": None, "error": None, "node": coord.node}
    chosen = _propose(manager, cache, coord, None) if leader else idle
    if coord.world_size == 1:
        return _finish(cache, chosen["path"])
    proposals = coord.all_gather({**chosen, "leader": leader})
    raise_choice_failures(manager, proposals)
    steps = [p["step"] for p in proposals if p["leader"]]
    if not steps or any(s is None for s in steps):
        return None
    step = min(int(s) for s in steps)
    if any(int(s) != step for s in steps):
        _log.warning("nodes disagree on the newest valid checkpoint (%s); taking step %d",
                     steps, step)  # fmt: skip
        if leader and chosen["step"] != step:
            chosen = _propose(manager, cache, coord, step)
        again = coord.all_gather({**chosen, "leader": leader})
        raise_choice_failures(manager, again)
        if any(p["leader"] and p["step"] != step for p in again):
            raise NoValidCheckpoint(
                f"checkpoint step {step} of {manager.root} does not verify on every node",
                path=manager.root,
            )
        proposals = again
    mine = next(p for p in proposals if p["leader"] and p["node"] == coord.node)
    return _finish(cache, mine["path"], coord)


def _propose(
    manager: CheckpointManager, cache: str, coord: Coordinator, step: int | None
) -> dict[str, Any]:
    try:
        found = _choose(manager, cache, step)
    except Exception as exc:  # every rank must hear of it, or the others hang
        if coord.world_size == 1:
            raise
        return {"step": None, "path": None, "error": f"{type(exc).__name__}: {exc}",
                "node": coord.node}  # fmt: skip
    if found is None:
        return {"step": None, "path": None, "error": None, "node": coord.node}
    return {"step": found[0], "path": found[1], "error": None, "node": coord.node}


def _finish(cache: str, path: str | None, coord: Coordinator | None = None) -> str | None:
    """Drop the cache's other entries (once every rank has chosen); ``path`` back."""
    if coord is not None:
        coord.barrier()
    if coord is None or coord.local_rank == 0:
        keep = path if path is not None and os.path.dirname(path) == cache else None
        clean_cache(cache, keep)
    return path


def fetch_url(
    url: str,
    storage_options: Mapping[str, Any] | None,
    cache: str,
    coord: Coordinator,
    *,
    who: str,
) -> str:
    """The checkpoint at ``url``, downloaded into ``cache`` (checked) on each node; its path.

    Raises NoValidCheckpoint on every rank if it does not verify on some node.
    """
    from ckptguard._protocol.backend import backend_for, parent_of  # noqa: PLC0415

    url = url.rstrip("/")
    backend = backend_for(parent_of(url), storage_options, what=who)
    local = os.path.join(cache, validate_name(url.rsplit("/", 1)[-1]))
    error: str | None = None
    if coord.world_size == 1 or coord.local_rank == 0:
        try:
            report = backend.verify(url, checksums=False)
            if not report.ok or report.manifest is None:
                raise NoValidCheckpoint(  # noqa: TRY301 - typed like the other failures
                    f"{who}: {url} does not verify: {'; '.join(report.problems)}",
                    path=url,
                    hint="`ckptguard verify URL` tells why; `ckptguard list ROOT` shows the others",
                )
            local = fetch(backend, url, report.manifest, cache)
        except Exception as exc:
            if coord.world_size == 1:
                raise
            error = f"{type(exc).__name__}: {exc}"
    if coord.world_size > 1:
        failures = {r: str(e) for r, e in enumerate(coord.all_gather(error)) if e}
        if failures:
            raise NoValidCheckpoint(f"{who}: {url} could not be downloaded: {failures}", path=url)
    return local


def remove_url_folder(url: str) -> None:
    """Remove the empty local folders a framework made from a URL (``s3:/bucket/run``).

    Frameworks ``os.makedirs(output_dir)`` before ckptguard sees it; only empty folders
    are removed (``rmdir``), deepest first.
    """
    scheme, rest = url.split("://", 1)
    parts = [f"{scheme}:", *[p for p in rest.split("/") if p]]
    for depth in range(len(parts), 0, -1):
        folder = os.path.join(*parts[:depth])
        with contextlib.suppress(OSError):
            os.rmdir(folder)
