"""Lightning: a ``CheckpointIO`` plugin that makes every checkpoint atomic and verified.

::

    from ckptguard.integrations.lightning import AtomicCheckpointIO, last_valid_checkpoint
    trainer = lightning.Trainer(plugins=[AtomicCheckpointIO()], callbacks=[ModelCheckpoint(...)])
    trainer.fit(model, ckpt_path=last_valid_checkpoint("checkpoints/"))

Each checkpoint Lightning saves (``ModelCheckpoint``'s top-k, ``last.ckpt``,
``trainer.save_checkpoint``) stays the plain ``torch.save`` file Lightning names
(``epoch=1-step=20.ckpt``): ``Model.load_from_checkpoint(path)``, ``torch.load(path)`` and
a Trainer without the plugin read it as always. The plugin commits it atomically (a temp
file in the same directory, fsynced, renamed into place, the directory fsynced; an
existing ``last.ckpt`` is replaced in one rename) with a hidden checksum sidecar
(``.epoch=1-step=20.ckpt.ckptguard.json``) written before the rename: a crash leaves the
old file or the new one, and either verifies. The format and the crash argument are in
:mod:`ckptguard._protocol.filecommit`.

Loading through the plugin (``fit(ckpt_path=...)``) or :func:`load` checks every byte
against the sidecar first and raises :class:`~ckptguard.CorruptCheckpoint` on a mismatch.
A ``.ckpt`` file without a sidecar (written without ckptguard) loads with a warning after
a structural check (a complete zip archive: a truncated file fails it). Deleting (top-k
rotation) removes the file, then its sidecar. ``save_last="link"`` works: a ``last.ckpt``
symlink is followed to a checkpoint in its own directory, never outside it.

Checkpoints saved by earlier releases, directories named like the file (``epoch=1-step=20.ckpt/``
holding :data:`CHECKPOINT_FILE` and a manifest), still load, verify and rotate; saving
over one replaces it with a file (the directory goes to the root's trash first, restored
by recovery if the save is cut). :func:`checkpoint_file` gives the loadable file of either
form.

Lightning saves from global rank 0 only (the other ranks never call the plugin), so each
save commits from that one process.

An object-store ``dirpath`` (``ModelCheckpoint(dirpath="s3://bucket/run")``) keeps the
same layout as objects: the file and its sidecar object, committed so that a crash leaves
the old or the new file verifying; loads download into a local cache and check it first
(``integrations/_remotefile.py``).

``AtomicCheckpointIO(async_save=True)``: ``save_checkpoint`` returns once the checkpoint's
tensors are copied into reused host buffers (pinned for CUDA tensors); a background thread
writes and commits the file. At most one save is in flight; a removal of that very file,
a load and ``teardown`` (the end of ``fit``) wait for it, and a failed save raises at the
next save or at ``teardown``; exit and SIGTERM wait for it.

:class:`SaveOnPreemption` (a callback, opt-in): on SIGTERM (or the signals named) every
rank agrees on one step, that step is saved through the plugin, and ``fit`` raises
``SystemExit(PREEMPTED_EXIT_CODE)`` (75) on every rank (``_lightning_preemption.py``).

Not supported: strategies that save sharded checkpoints as directories of their own
(``FSDPStrategy`` and ``ModelParallelStrategy`` with sharded state dicts) bypass the plugin.
"""

from __future__ import annotations

import bisect
import contextlib
import datetime as _dt
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _load as pl_load

from ckptguard._coordination.base import SingleProcess
from ckptguard._errors import CheckpointError, CommitConflict, CorruptCheckpoint, NoValidCheckpoint
from ckptguard._format.layout import MANIFEST_NAME, RootLayout, new_save_id
from ckptguard._manager.saver import BackgroundSaves
from ckptguard._protocol.cleanup import remove_retrying, retire_checkpoint
from ckptguard._protocol.filecommit import (
    commit_file,
    open_verified,
    read_sidecar,
    remove_file,
    sidecar_path,
    verify_file,
)
from ckptguard._protocol.locking import root_lock
from ckptguard._protocol.verify import read_manifest_local
from ckptguard._protocol.verify import verify_local as verify
from ckptguard._storage.base import is_url
from ckptguard._storage.faults import fault_point
from ckptguard._storage.local import LocalStorage
from ckptguard.integrations._capture import NotDeferrable, Snapshots, copy_tree
from ckptguard.integrations._lightning_preemption import SaveOnPreemption
from ckptguard.integrations._remote import cache_root
from ckptguard.integrations._remotefile import (
    clean_file_cache,
    commit_remote_file,
    fetch_remote_file,
    remote_candidates,
    remove_remote_file,
)
from ckptguard.integrations._resume import local_dir, repair_root

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping
    from typing import BinaryIO

    from ckptguard._format.manifest import Manifest

__all__ = [
    "CHECKPOINT_FILE",
    "AtomicCheckpointIO",
    "SaveOnPreemption",
    "checkpoint_file",
    "last_valid_checkpoint",
    "load",
]

_log = logging.getLogger("ckptguard.integrations.lightning")
CHECKPOINT_FILE = "checkpoint.ckpt"  # the torch.save file inside an earlier release's directory
CKPT_SUFFIX = ".ckpt"  # ModelCheckpoint.FILE_EXTENSION: plain files are adopted by it
# Lightning's default names hold the global step: "epoch=1-step=20.ckpt", "step=20.ckpt".
_STEP_IN_NAME = re.compile(r"(?:^|[^A-Za-z0-9])step=([0-9]+)")


def _follow_link(path: str) -> str:
    """The checkpoint a ``last.ckpt`` link points to; it must be in the link's directory."""
    if not os.path.islink(path):
        return path
    target = os.path.realpath(path)
    if os.path.dirname(target) != os.path.realpath(os.path.dirname(os.path.abspath(path))):
        raise CorruptCheckpoint(
            f"{path} links to {target}, outside its directory: not followed",
            path=path,
            hint="point it at a checkpoint in the same directory, or load the target itself",
        )
    return target


def _is_ours(path: str) -> bool:
    """Whether ``path`` is a checkpoint directory of an earlier release (with a manifest)."""
    return os.path.isdir(path) and os.path.lexists(os.path.join(path, MANIFEST_NAME))


@contextlib.contextmanager
def _checked_file(path: str) -> Iterator[BinaryIO]:
    """The file at ``path``, open, after its check: verified, or structurally sound.

    A file with a sidecar must match it; one without (written without ckptguard) must be
    a complete zip archive, and is let through with a warning.
    """
    if not os.path.lexists(path):
        raise NoValidCheckpoint(f"no checkpoint at {path}", path=path)
    with open_verified(path) as (report, f):
        structure = report.extra.get("structure", "unchecked")
        plain = report.extra.get("sidecar", "") is None and structure is None
        if f is None or not (report.ok or plain):
            raise CorruptCheckpoint(
                f"{path} does not verify: {'; '.join(report.problems)}",
                path=path,
                problems=report.problems,
            )
        if plain:
            _log.warning(
                "%s was not saved by ckptguard (no checksum sidecar): it was not checksummed; "
                "loading it after a structural check only",
                path,
            )
        yield f


def checkpoint_file(path: str | os.PathLike[str]) -> str:
    """The loadable ``torch.save`` file of a checkpoint, after checking every byte of it.

    For ``LightningModule.load_from_checkpoint(checkpoint_file(path))``: the file itself
    (verified against its sidecar; a file without one, structurally checked), or the file
    inside a checkpoint directory of an earlier release (verified against its manifest).
    """
    path = _follow_link(os.fspath(path))
    if not os.path.isdir(path):
        with _checked_file(path):
            return path
    report = verify(path)
    if not report.ok:
        raise CorruptCheckpoint(
            f"{path} does not verify: {'; '.join(report.problems)}",
            path=path,
            problems=report.problems,
        )
    return os.path.join(path, CHECKPOINT_FILE)


def fetch(
    url: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    cache_dir: str | None = None,
) -> str:
    """Download the checkpoint at ``url`` into the local cache, checked; its local path.

    The cache (``cache_dir``, else ``CKPTGUARD_CACHE_DIR``, else under the system temp
    dir) keeps one checkpoint per directory of the store: the others go.
    """
    url = url.rstrip("/")
    cache = cache_root(cache_dir, url.rsplit("/", 1)[0])
    local = fetch_remote_file(url, storage_options, cache)
    clean_file_cache(cache, os.path.basename(local))
    return local


def load(
    path: str | os.PathLike[str],
    map_location: Any = None,
    *,
    weights_only: bool | None = None,
    storage_options: Mapping[str, Any] | None = None,
    cache_dir: str | None = None,
) -> dict[str, Any]:
    """Load a Lightning checkpoint, verified first (see :func:`checkpoint_file`).

    A symlink (``ModelCheckpoint(save_last="link")``'s ``last.ckpt``) is followed to a
    checkpoint in the same directory. What is loaded is the very file that was checked.
    A URL (``s3://bucket/run/epoch=1-step=20.ckpt``) is downloaded first (:func:`fetch`).
    """
    if is_url(os.fspath(path)):
        path = fetch(os.fspath(path), storage_options=storage_options, cache_dir=cache_dir)
    path = _follow_link(local_dir(path, who="load", framework="Lightning"))
    repair_root(os.path.dirname(os.path.abspath(path)))
    if os.path.isdir(path) and not _is_ours(path):
        raise CorruptCheckpoint(
            f"{path} is a directory without a ckptguard manifest: not a checkpoint it saved",
            path=path,
            hint="a crash may have left it; `ckptguard verify` tells more",
        )
    if os.path.isdir(path):
        loaded = pl_load(
            checkpoint_file(path), map_location=map_location, weights_only=weights_only
        )
    else:
        with _checked_file(path) as f:
            loaded = pl_load(f, map_location=map_location, weights_only=weights_only)
    if not isinstance(loaded, dict):
        raise CorruptCheckpoint(f"{path} does not hold a Lightning checkpoint", path=path)
    return loaded


# -- choosing the checkpoint to resume from ------------------------------------------------
@dataclass(frozen=True)
class _Candidate:
    path: str
    kind: str  # "file" (with a sidecar), "directory" (earlier release), "plain" (no sidecar)
    step: int | None
    time: float  # when it was saved: the manifest's created_at, or a plain file's mtime
    final: bool  # step and time are checked (else: upper bounds, read before verifying)


def _timestamp(manifest: Manifest) -> float:
    return _dt.datetime.fromisoformat(manifest.created_at).timestamp()


def _step_in_name(name: str) -> int | None:
    match = _STEP_IN_NAME.search(name)
    return None if match is None else int(match.group(1))


def _candidate(path: str) -> _Candidate | None:
    """What ``path`` claims to be (nothing read beyond a manifest or sidecar), or None."""
    name = os.path.basename(path)
    if os.path.isdir(path):
        try:
            manifest = read_manifest_local(path)
        except (CheckpointError, OSError) as exc:
            _log.warning("skipping %s: %s", path, exc)
            return None
        return _Candidate(path, "directory", manifest.step, _timestamp(manifest), final=False)
    if not os.path.isfile(path):
        return None
    try:
        sidecar = read_sidecar(path)
    except (CheckpointError, OSError) as exc:
        _log.warning("skipping %s: its sidecar cannot be read (%s)", path, exc)
        return None
    if sidecar is not None:
        # Until the file is hashed, any entry may be the one it matches: the largest step
        # and time are upper bounds.
        steps = [e.step for e in sidecar.entries if e.step is not None]
        step = max(steps) if steps else None
        time = max(_timestamp(e) for e in sidecar.entries)
        return _Candidate(path, "file", step, time, final=False)
    if not name.endswith(CKPT_SUFFIX):
        return None  # hparams.yaml, logs, ...: not a checkpoint
    try:
        mtime = os.stat(path).st_mtime
    except OSError:
        return None
    return _Candidate(path, "plain", _step_in_name(name), mtime, final=False)


def _check(candidate: _Candidate) -> _Candidate | None:
    """``candidate`` with its step and time checked, or None (logged) if it fails."""
    if candidate.kind == "directory":
        report = verify(candidate.path)
    else:
        report = verify_file(candidate.path)
        if report.extra.get("sidecar", "") is None and report.extra.get("structure") is None:
            return _Candidate(candidate.path, "plain", candidate.step, candidate.time, final=True)
    if not report.ok or report.manifest is None:
        _log.warning("skipping %s: %s", candidate.path, "; ".join(report.problems))
        return None
    kind = "directory" if candidate.kind == "directory" else "file"
    step, time = report.manifest.step, _timestamp(report.manifest)
    return _Candidate(candidate.path, kind, step, time, final=True)


def _order_key(candidate: _Candidate, stepped: list[_Candidate]) -> tuple[Any, ...]:
    """Newer sorts higher; see :func:`last_valid_checkpoint` for the rule."""
    verified = 0 if candidate.kind == "plain" else 1
    if candidate.step is not None:
        return (candidate.step, 0, verified, candidate.time, candidate.path)
    # No step known: just after the newest stepped candidate saved no later than it.
    before = [c.step for c in stepped if c.step is not None and c.time <= candidate.time]
    return (max(before, default=-1), 1, verified, candidate.time, candidate.path)


def last_valid_checkpoint(
    dirpath: str | os.PathLike[str],
    *,
    storage_options: Mapping[str, Any] | None = None,
    cache_dir: str | None = None,
) -> str | None:
    """The newest checkpoint under ``dirpath`` that verifies, or None.

    ``dirpath`` may be an object-store URL: the candidates are the objects with a
    sidecar (newest step first, then the newest save), each downloaded into the cache and
    checked (see :func:`fetch`); the first that passes is returned as its URL, and a
    load of it through the plugin reuses the cached copy.

    For ``trainer.fit(model, ckpt_path=last_valid_checkpoint(dirpath))``. Candidates: files
    with a sidecar (verified against it), checkpoint directories of earlier releases
    (verified against their manifest), and ``.ckpt`` files written without ckptguard
    (*adopted*: only checked to be a complete zip archive, and logged as not checksummed
    when chosen). Corrupt, truncated and foreign entries are skipped and logged; symlinks
    (``save_last="link"``) are skipped too, their target is considered on its own.

    Newest means, explicitly:
    1. the highest step: a sidecar's or manifest's step, or for a plain file the
       ``step=N`` in its name (Lightning's default names);
    2. a candidate without a known step (a plain ``last.ckpt``) is placed by its time
       (modification time, or the time a save was made): just after the newest candidate
       with a step that is no newer than it;
    3. at the same place, a verified checkpoint wins over a plain file, then the later
       time, then the name.
    Candidates are checked newest first, and the first that passes is returned.
    """
    if is_url(os.fspath(dirpath)):
        return _last_valid_remote(os.fspath(dirpath), storage_options, cache_dir)
    root = local_dir(dirpath, who="last_valid_checkpoint", framework="Lightning")
    if not os.path.isdir(root):
        return None
    repair_root(root)
    candidates = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if name.startswith(".") or os.path.islink(path):
            continue
        if (candidate := _candidate(path)) is not None:
            candidates.append(candidate)
    stepped = [c for c in candidates if c.step is not None]

    def key(c: _Candidate) -> tuple[Any, ...]:
        return _order_key(c, stepped)

    pending = sorted(candidates, key=key)  # newest last
    while pending:
        candidate = pending.pop()
        if candidate.final:
            if candidate.kind == "plain":
                _log.warning(
                    "resuming from %s: written without ckptguard, it was not checksummed "
                    "(only checked to be a complete zip archive)",
                    candidate.path,
                )
            return candidate.path
        if (checked := _check(candidate)) is not None:
            # Its checked place is no higher than the bound it was taken at: put back, it
            # comes out next unless another candidate lies between the two.
            bisect.insort(pending, checked, key=key)
    return None


def _last_valid_remote(
    dirpath: str, storage_options: Mapping[str, Any] | None, cache_dir: str | None
) -> str | None:
    found = remote_candidates(dirpath, storage_options)
    for _step, _time, url in sorted(found, key=lambda c: (c[0] or -1, c[1], c[2]), reverse=True):
        try:
            fetch(url, storage_options=storage_options, cache_dir=cache_dir)
        except (CorruptCheckpoint, NoValidCheckpoint) as exc:
            _log.warning("skipping %s: %s", url, exc.message)
            continue
        return url
    return None


# -- the plugin ----------------------------------------------------------------------------
def _replace_directory(
    target: str,
    write: Callable[[BinaryIO], None],
    *,
    step: int | None,
    metadata: dict[str, Any],
) -> None:
    """Save ``target`` as a file where an earlier release saved a directory.

    Under the root's lock, the directory moves to trash just before the file's rename:
    a crash between the two leaves it there, and recovery (which every load runs first)
    renames it back.
    """
    if not _is_ours(target):
        raise CommitConflict(
            f"{target} is a directory that ckptguard did not save: it was not replaced",
            path=target,
            hint="move it away, or save under another name",
        )
    layout = RootLayout(os.path.dirname(target))
    storage = LocalStorage()
    storage.make_dir(layout.meta, mode=0o700, exist_ok=True)
    storage.make_dir(layout.trash, mode=0o700, exist_ok=True)
    trash = os.path.join(layout.trash, f"{os.path.basename(target)}.{new_save_id()}")

    def make_way(path: str) -> None:
        storage.rename_noreplace(path, trash)
        storage.fsync_dir(layout.trash)

    with root_lock(layout):
        try:
            commit_file(target, write, step=step, metadata=metadata, make_way=make_way)
        except BaseException:
            if os.path.isdir(trash) and not os.path.lexists(target):
                with contextlib.suppress(OSError):  # else recovery restores it
                    storage.rename_noreplace(trash, target)
            raise
    try:
        remove_retrying(storage, trash, what="remove the replaced checkpoint directory")
    except (CheckpointError, OSError) as exc:
        _log.warning("could not remove %s: %s", trash, exc)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning ``CheckpointIO``: atomic, checksummed checkpoint files (plain ``.ckpt``).

    ``ModelCheckpoint(dirpath="s3://bucket/run")`` works too: each file is written into a
    local spool and uploaded onto its name with its sidecar object
    (``integrations/_remotefile.py``); a load downloads it into ``cache_dir`` and checks
    it first. ``storage_options`` are fsspec's for the store (default:
    ``CKPTGUARD_STORAGE_OPTIONS``); Lightning's ``ModelCheckpoint`` lists the directory
    with its own fsspec filesystem, configured by the usual environment (``AWS_*``).
    """

    def __init__(
        self,
        *,
        storage_options: Mapping[str, Any] | None = None,
        cache_dir: str | None = None,
        async_save: bool = False,
    ) -> None:
        super().__init__()
        self.storage_options = storage_options
        self.cache_dir = cache_dir
        self.async_save = async_save
        self._background: BackgroundSaves | None = None
        self._snapshots = Snapshots()

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(
                f"{type(self).__name__}.save_checkpoint does not take storage_options; "
                "give them to AtomicCheckpointIO(storage_options=...)"
            )
        if not self.async_save:
            self._commit(checkpoint, path)
            return
        started = time.perf_counter()
        if self._background is None:  # Lightning saves from global rank 0 alone
            self._background = BackgroundSaves(SingleProcess())
        self._background.wait()  # at most one in flight; raises a failed one's error
        self._snapshots.begin()
        try:
            snapshot = copy_tree(checkpoint, self._snapshots)
        except NotDeferrable as why:
            _log.info("saving %s synchronously: %s", path, why)
            self._commit(checkpoint, path)
            return
        self._snapshots.end()
        step = checkpoint.get("global_step")
        self._background.start(
            step if isinstance(step, int) else 0,
            os.fspath(path),
            lambda _coord: self._commit_deferred(snapshot, path),
            time.perf_counter() - started,
        )

    def _commit_deferred(self, snapshot: dict[str, Any], path: Any) -> None:
        fault_point("deferred.write")
        self._commit(snapshot, path)

    def wait(self) -> None:
        """Finish the async save in flight, if any; raise its error."""
        if self._background is not None:
            self._background.wait()

    def teardown(self) -> None:
        """The end of ``fit``: finish the async save in flight (raising its error)."""
        self.wait()
        super().teardown()

    def _commit(self, checkpoint: dict[str, Any], path: Any) -> None:
        global_step = checkpoint.get("global_step")
        step = global_step if isinstance(global_step, int) and global_step >= 0 else None
        metadata = {"framework": "lightning", "epoch": checkpoint.get("epoch")}

        def write(f: BinaryIO) -> None:
            torch.save(checkpoint, f)

        if is_url(os.fspath(path)):
            commit_remote_file(os.fspath(path), write, step=step, metadata=metadata,
                               storage_options=self.storage_options)  # fmt: skip
            return
        target = os.path.abspath(local_dir(path, who="save_checkpoint", framework="Lightning"))
        os.makedirs(os.path.dirname(target), exist_ok=True)

        if os.path.isdir(target) and not os.path.islink(target):
            _replace_directory(target, write, step=step, metadata=metadata)
        else:
            commit_file(target, write, step=step, metadata=metadata)

    def load_checkpoint(
        self,
        path: Any,
        map_location: Callable[..., Any] | None = lambda storage, loc: storage,  # noqa: ARG005
        weights_only: bool | None = None,  # noqa: FBT001 - Lightning's signature
    ) -> dict[str, Any]:
        self.wait()  # the file to load may be the save in flight
        if is_url(os.fspath(path)):
            return load(path, map_location=map_location, weights_only=weights_only,
                        storage_options=self.storage_options, cache_dir=self.cache_dir)  # fmt: skip
        path = local_dir(path, who="load_checkpoint", framework="Lightning")
        repair_root(os.path.dirname(os.path.abspath(path)))
        if not os.path.lexists(path):
            raise NoValidCheckpoint(f"no checkpoint at {path}", path=path)
        return load(path, map_location=map_location, weights_only=weights_only)

    def remove_checkpoint(self, path: Any) -> None:
        job = None if self._background is None else self._background.in_flight
        if job is not None and os.path.abspath(job.path) == os.path.abspath(os.fspath(path)):
            self.wait()  # removing the very file in flight: after its commit
        if is_url(os.fspath(path)):
            remove_remote_file(os.fspath(path), self.storage_options)
            return
        path = os.path.abspath(local_dir(path, who="remove_checkpoint", framework="Lightning"))
        if os.path.islink(path) or os.path.isfile(path):
            remove_file(path)  # the file (or link) first, then its sidecar
            return
        if _is_ours(path):
            retire_checkpoint(
                RootLayout(os.path.dirname(path)), os.path.basename(path), storage=LocalStorage()
            )
            return
        if os.path.lexists(path):
            _log.warning("not deleting %s: not a checkpoint saved by ckptguard", path)
        elif os.path.lexists(sidecar_path(path)):
            remove_file(path)  # the file went first (a crash, or someone else): its sidecar
