"""Accelerate: ``save_state`` / ``load_state`` made atomic, exactly-once and verified.

::

    from ckptguard.integrations.accelerate import protect
    accelerator = protect(Accelerator(project_config=ProjectConfiguration(
        project_dir="runs/exp1", automatic_checkpoint_naming=True, total_limit=3)))
    accelerator.load_state()    # the newest checkpoints/checkpoint_<i> that verifies
    ...
    accelerator.save_state()    # staged, sealed, committed as checkpoint_<i> in one rename

Why: ``save_state`` writes straight into its folder (a crash leaves it half-written and
``load_state()`` picks the highest-numbered folder anyway), rotation deletes the oldest
folders with ``rmtree`` *before* the new save is written, and after ``load_state()`` the
next automatic save tries the name just loaded (``iteration`` is not restored).

With ``protect``:

- ``save_state()`` writes into a ckptguard staging dir (every rank takes part, as in
  Accelerate) and commits it under ``checkpoint_<iteration>`` (automatic naming) or the
  given ``output_dir``; an existing valid checkpoint of that name is replaced atomically;
- ``total_limit`` is applied by ckptguard's retention after the new checkpoint verifies
  (newest valid never deleted); Accelerate's own pre-save deletion never runs;
- ``load_state()`` loads the newest checkpoint that verifies on every node and sets
  ``iteration`` to the one after it; ``load_state(path)`` verifies ``path`` first;
- ``save_on_each_node`` is made to match the storage that the probe finds;
- ``protect(accelerator, async_save=True)``: ``save_state`` returns once the tensors it
  writes are copied into reused host buffers; a background thread writes Accelerate's
  files, then commits and rotates (``integrations/_capture.py``); ``load_state``, the next
  ``save_state`` and :func:`wait` wait for it (and raise its error), as do exit and
  SIGTERM;
- object stores: ``project_dir`` (or ``save_state``/``load_state``'s directory) may be a
  URL, and ``protect(accelerator, mirror=URL)`` mirrors a local ``project_dir``; a load
  from a store downloads the checkpoint into a local cache first, every file checked
  (``integrations/_remote.py``).

Differences a user may notice: ``save_state(output_dir)`` onto an existing directory that
ckptguard did not write moves that directory to ``.ckptguard/quarantine/`` (Accelerate
would write into it); and the ``.ckptguard`` directory inside ``project_dir/checkpoints``
makes an *unprotected* Accelerate's ``load_state()`` fail (its folder-number parsing).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from ckptguard._coordination.base import default_coordinator
from ckptguard._errors import NoValidCheckpoint
from ckptguard._format.layout import ACCELERATE_NAMING
from ckptguard._manager.manager import CheckpointManager
from ckptguard._manager.saver import BackgroundSaves, begin_transaction, finish_transaction
from ckptguard._protocol.backend import parent_of
from ckptguard._protocol.transaction import AtomicCheckpoint
from ckptguard._storage.base import is_url
from ckptguard.integrations._capture import Snapshots, capture
from ckptguard.integrations._preemption import (
    attach_to_accelerator,
    exit_preempted,
    preemption_requested,
)
from ckptguard.integrations._remote import (
    RemoteOptions,
    cache_root,
    fetch_url,
    newest_to_resume,
)
from ckptguard.integrations._resume import agreed_latest, check_resume_path, local_dir

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from ckptguard._coordination.base import Coordinator
    from ckptguard._protocol.transaction import AtomicCheckpoint as Transaction

__all__ = ["exit_preempted", "preemption_requested", "protect", "wait"]

_log = logging.getLogger("ckptguard.integrations.accelerate")
_ATTR = "_ckptguard_guard"
_CHECKPOINTS_DIR = "checkpoints"  # Accelerate's folder for automatic checkpoint naming

T = TypeVar("T")


@dataclass
class _Guard:
    options: RemoteOptions = field(default_factory=RemoteOptions)
    managers: dict[str, CheckpointManager] = field(default_factory=dict)
    warned_topology: bool = False
    snapshots: Snapshots | None = None  # async saves' host copies, reused by each
    background: BackgroundSaves | None = None  # async saves of explicit directories

    def wait(self) -> None:
        """Finish every async save in flight (at most one); raise its error."""
        if self.background is not None:
            self.background.wait()
        for manager in self.managers.values():
            manager.wait()

    def manager(self, root: str, keep_last: int | None) -> CheckpointManager:
        root = root.rstrip("/") if is_url(root) else os.path.abspath(root)
        if root not in self.managers:
            self.managers[root] = CheckpointManager(
                root,
                keep_best=0,
                naming=ACCELERATE_NAMING,
                coordinator=default_coordinator(),
                **self.options.manager_kwargs(root, keep_last),
            )
        return self.managers[root]

    def cache(self, root: str) -> str:
        return cache_root(self.options.cache_dir, self.options.mirror or root)


def protect(
    accelerator: T,
    *,
    mirror: str | None = None,
    keep_last: int | None = None,
    verify_after_save: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    cache_dir: str | None = None,
    async_save: bool = False,
    preemption: Any = False,
    **others: Any,
) -> T:
    """Make ``accelerator.save_state`` / ``load_state`` atomic and verified; returns it.

    Calling it twice is harmless. Every rank must call ``save_state`` and ``load_state``
    (as Accelerate itself requires).

    ``project_dir`` (and ``save_state``/``load_state``'s directory) may be an object-store
    URL: Accelerate writes into a local staging dir, ckptguard uploads and commits; a load
    downloads the checkpoint into ``cache_dir`` first, every byte checked (see
    ``integrations/_remote.py``). ``mirror="s3://..."`` (a local ``project_dir``, automatic
    naming): each checkpoint is committed locally, then uploaded in the background;
    ``load_state()`` takes the newest valid of both. ``keep_last`` (default:
    ``total_limit``), ``verify_after_save`` and ``storage_options`` are
    ``CheckpointManager``'s; its other options are refused with TypeError.

    ``async_save=True``: ``save_state`` returns once the tensors it writes (weights,
    optimizer state) are copied into reused host buffers (pinned for CUDA tensors); a
    background thread writes Accelerate's files, then commits and rotates. At most one
    save is in flight: the next ``save_state``, ``load_state`` and :func:`wait` wait for
    it and raise its error; exit and SIGTERM wait for it. It returns the path the
    checkpoint will have.

    ``preemption=True`` (SIGTERM; or a signal name such as ``"SIGUSR1"``, several, a
    ``ckptguard.Preemption``): the loop asks :func:`preemption_requested` at each step,
    then calls ``save_state()`` and :func:`exit_preempted` (see
    ``integrations/_preemption.py``). Off by default: a loop that does not ask would only
    die later, after the grace period.
    """
    options = RemoteOptions.of(
        "protect(accelerator)",
        others,
        async_save=async_save,
        mirror=mirror,
        keep_last=keep_last,
        verify_after_save=verify_after_save,
        storage_options=storage_options,
        cache_dir=cache_dir,
    )
    if getattr(accelerator, _ATTR, None) is not None:
        return accelerator
    for needed in ("save_state", "load_state", "project_configuration"):
        if not hasattr(accelerator, needed):
            raise TypeError(
                f"protect() needs an accelerate.Accelerator; "
                f"{type(accelerator).__name__} has no {needed!r}"
            )
    acc: Any = accelerator
    if options.mirror is not None and acc.project_dir and is_url(str(acc.project_dir)):
        raise TypeError(f"protect(accelerator): mirror= is for a local project_dir; "
                        f"{acc.project_dir} is on an object store already")  # fmt: skip
    guard = _Guard(options=options)
    original_save = acc.save_state
    original_load = acc.load_state

    @functools.wraps(original_save)
    def save_state(output_dir: str | os.PathLike[str] | None = None, **kwargs: Any) -> str:
        return _save_state(acc, guard, original_save, output_dir, kwargs)

    @functools.wraps(original_load)
    def load_state(input_dir: str | os.PathLike[str] | None = None, **kwargs: Any) -> Any:
        return _load_state(acc, guard, original_load, input_dir, kwargs)

    acc.save_state = save_state
    acc.load_state = load_state
    attach_to_accelerator(acc, preemption)
    setattr(acc, _ATTR, guard)
    return accelerator


def wait(accelerator: Any) -> None:
    """Finish the async ``save_state`` in flight, if any; raise its error.

    For the end of a training script: exit waits too, but can only log a failure.
    """
    guard: _Guard | None = getattr(accelerator, _ATTR, None)
    if guard is not None:
        guard.wait()


def _automatic(acc: Any) -> bool:
    return bool(acc.project_configuration.automatic_checkpoint_naming)


def _checkpoints_root(acc: Any) -> str:
    if not acc.project_dir:
        raise ValueError("automatic_checkpoint_naming needs ProjectConfiguration(project_dir=...)")
    project = str(acc.project_dir)
    if is_url(project):
        return f"{project.rstrip('/')}/{_CHECKPOINTS_DIR}"
    return os.path.join(project, _CHECKPOINTS_DIR)


def _write_with(acc: Any, guard: _Guard, original_save: Any, kwargs: dict[str, Any]) -> Any:
    """A ``write(tx)`` that runs Accelerate's save_state into the staging dir."""

    def write(tx: Transaction) -> Callable[[], None] | None:
        config = acc.project_configuration
        if tx.nodes > 1 and bool(config.save_on_each_node) == tx.shared:
            wanted = not tx.shared
            if not guard.warned_topology:
                _log.warning(
                    "save_on_each_node=%s, but the checkpoint root is %s: ckptguard sets it to %s",
                    config.save_on_each_node,
                    "shared by all nodes" if tx.shared else "local to each node",
                    wanted,
                )
                guard.warned_topology = True
            config.save_on_each_node = wanted
        automatic = config.automatic_checkpoint_naming
        iteration = config.iteration
        config.automatic_checkpoint_naming = False  # write here; no naming, no rmtree
        deferred = None
        try:
            if guard.options.async_save:
                if guard.snapshots is None:
                    guard.snapshots = Snapshots()
                with capture(tx.staging_dir, guard.snapshots) as deferred:
                    original_save(str(tx.staging_dir), **kwargs)
            else:
                original_save(str(tx.staging_dir), **kwargs)
        finally:
            config.automatic_checkpoint_naming = automatic
        # Accelerate counts the save; ckptguard sets the count once the save is committed.
        config.iteration = iteration
        return None if deferred is None else deferred.run

    return write


def _save_state(
    acc: Any,
    guard: _Guard,
    original_save: Any,
    output_dir: str | os.PathLike[str] | None,
    kwargs: dict[str, Any],
) -> str:
    started = time.perf_counter()
    guard.wait()  # at most one save in flight (on one side channel)
    write = _write_with(acc, guard, original_save, kwargs)
    config = acc.project_configuration
    background = guard.options.async_save
    if _automatic(acc):
        manager = guard.manager(_checkpoints_root(acc), config.total_limit)
        iteration = int(config.iteration)
        done = manager.save_files(
            iteration,
            write,
            metadata={"framework": "accelerate"},
            blocking=not background,
        )
        config.iteration = iteration + 1
        return done.path
    if output_dir is None:
        raise ValueError(
            "save_state() needs output_dir unless automatic_checkpoint_naming is enabled"
        )
    text = os.fspath(output_dir)
    tx = AtomicCheckpoint(
        text,
        storage_options=guard.options.storage_options if is_url(text) else None,
        if_exists="replace",
        metadata={"framework": "accelerate"},
        coordinator=default_coordinator(),
    )
    tx.fail_fast = True  # save_state runs Accelerate's own collectives
    if background:
        return _save_in_background(acc, guard, tx, write, started)
    with tx:
        write(tx)
    config.iteration = int(config.iteration) + 1
    if tx.result is None:  # pragma: no cover - __exit__ either sets it or raises
        raise RuntimeError("save finished without a result")
    return tx.result.path


def _save_in_background(
    acc: Any, guard: _Guard, tx: AtomicCheckpoint, write: Any, started: float
) -> str:
    """``save_state(dir)`` with ``async_save``: write here, commit in the background."""
    if guard.background is None:
        guard.background = BackgroundSaves(default_coordinator())
    config = acc.project_configuration
    finish = begin_transaction(tx, write)

    def work(coord: Coordinator) -> None:
        finish_transaction(tx, finish, coord)

    guard.background.start(int(config.iteration), tx.final, work, time.perf_counter() - started)
    config.iteration = int(config.iteration) + 1
    return tx.final


def _load_state(
    acc: Any,
    guard: _Guard,
    original_load: Any,
    input_dir: str | os.PathLike[str] | None,
    kwargs: dict[str, Any],
) -> Any:
    guard.wait()  # the checkpoint to load may be the save in flight
    if input_dir is not None and is_url(os.fspath(input_dir)):
        return _load_remote(acc, guard, original_load, os.fspath(input_dir), kwargs)
    if input_dir is not None:
        text = local_dir(input_dir, who="load_state", framework="Accelerate")
        path = os.path.abspath(os.path.expanduser(text))
        check_resume_path(path, default_coordinator())
        result = original_load(path, **kwargs)
        if _automatic(acc):
            step = ACCELERATE_NAMING.step(os.path.basename(path))
            if step is not None and os.path.dirname(path) == os.path.abspath(
                _checkpoints_root(acc)
            ):
                acc.project_configuration.iteration = step + 1
        return result
    if not _automatic(acc):
        raise ValueError(
            "load_state() needs input_dir unless automatic_checkpoint_naming is enabled"
        )
    root = _checkpoints_root(acc)
    manager = guard.manager(root, acc.project_configuration.total_limit)
    if guard.options.uses_cache(root):
        latest = newest_to_resume(manager, guard.cache(root))
    else:
        latest = agreed_latest(manager)
    if latest is None:
        raise NoValidCheckpoint(
            f"no checkpoint in {manager.root} verifies: nothing to load",
            path=manager.root,
            hint="start from scratch (skip load_state); `ckptguard list` shows why each "
            "checkpoint is invalid",
        )
    step = ACCELERATE_NAMING.step(os.path.basename(latest))
    _log.info("loading %s (the newest checkpoint that verifies)", latest)
    result = original_load(latest, **kwargs)
    if step is not None:
        acc.project_configuration.iteration = step + 1
    return result


def _load_remote(
    acc: Any, guard: _Guard, original_load: Any, url: str, kwargs: dict[str, Any]
) -> Any:
    """``load_state(URL)``: download the checkpoint into the cache (checked), load it there."""
    url = url.rstrip("/")
    cache = guard.cache(parent_of(url))
    local = fetch_url(url, guard.options.storage_options, cache, default_coordinator(),
                      who="load_state")  # fmt: skip
    result = original_load(local, **kwargs)
    if _automatic(acc) and parent_of(url) == _checkpoints_root(acc).rstrip("/"):
        step = ACCELERATE_NAMING.step(url.rsplit("/", 1)[-1])
        if step is not None:
            acc.project_configuration.iteration = step + 1
    return result
