"""Hugging Face Trainer and TRL's trainers: every checkpoint atomic, exactly once, verified.

::

    from ckptguard.integrations.transformers import protect
    trainer = protect(SFTTrainer(...))            # or install() before creating trainers
    trainer.train(resume_from_checkpoint=True)    # resumes from the newest that verifies

Why: the Trainer writes straight into ``checkpoint-N`` (no staging, no fsync, no
completeness check) and ``get_last_checkpoint`` resumes from the highest-numbered folder
even when a crash left it half-written; a development build that staged and renamed per
process crashed with ``[Errno 39] Directory not empty`` when several ranks renamed onto the
same ``checkpoint-N``.

How, for each checkpoint the trainer saves (every rank takes part, as in the Trainer):

1. ckptguard opens one coordinated transaction for ``checkpoint-<global_step>`` (one
   staging dir per storage, probed: shared root or one per node);
2. the trainer's own ``_save_checkpoint`` (a subclass's override included) runs unchanged,
   but its run directory is the staging dir: model, optimizer, scheduler, scaler, each
   rank's ``rng_state_<rank>.pth``, ``trainer_state.json``, FSDP/DeepSpeed shards all land
   in ``<staging>/checkpoint-<step>/``;
3. after every rank's writes succeeded, the committer moves them up into the staging dir,
   seals it (checksums, manifest) and renames it to ``checkpoint-<step>`` in one step;
4. retention: ckptguard keeps ``save_total_limit`` newest valid checkpoints plus the
   trainer's best (``load_best_model_at_end``), never the newest valid or the best deleted,
   only after the new one verifies. While ``train()`` runs, ``trainer.args.save_total_limit``
   reads None, so that the Trainer's own rotation (a plain ``rmtree``, also at the end of
   training) never runs; it is restored afterwards. A Hub push of a checkpoint
   (``push_to_hub`` with a checkpoint ``hub_strategy``) happens once it is committed.

``save_on_each_node`` is made to match the storage that the probe finds: True on
node-local roots (each node gets a complete checkpoint, or resume on other nodes would
find only their RNG files), False on a shared root (one writer per file).

Object stores (``integrations/_remote.py``): with ``output_dir="s3://..."`` each process
writes into its own local spool, ckptguard uploads every rank's files and commits one
manifest (exactly once); with ``protect(trainer, mirror="s3://...")`` each local commit
is uploaded in the background. ``resume_from_checkpoint=True`` downloads the newest remote
checkpoint that verifies into a local cache (each file checked as it arrives) when no
newer local one verifies, and hands the Trainer that directory.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from ckptguard._coordination.base import default_coordinator
from ckptguard._errors import CheckpointError, NoValidCheckpoint, UnsupportedRoot
from ckptguard._format.layout import HF_NAMING, MANIFEST_NAME, RESERVED_NAMES
from ckptguard._manager.adoption import newest_adoptable
from ckptguard._manager.manager import CheckpointManager
from ckptguard._manager.preemption import policy_of
from ckptguard._manager.retention import RetentionPolicy
from ckptguard._manager.saver import PendingSave
from ckptguard._protocol.backend import backend_for
from ckptguard._protocol.verify import verify_local as verify
from ckptguard._storage.base import is_url
from ckptguard.integrations._capture import Snapshots, capture
from ckptguard.integrations._frozen import frozen_first
from ckptguard.integrations._preemption import TrainerPreemption
from ckptguard.integrations._remote import (
    RemoteOptions,
    cache_root,
    fetch_url,
    newest_to_resume,
    remove_url_folder,
)
from ckptguard.integrations._resume import (
    agreed_latest,
    check_resume_path,
    local_dir,
    repair_root,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from pathlib import Path

    from ckptguard._protocol.transaction import AtomicCheckpoint

__all__ = ["install", "last_valid_checkpoint", "protect", "uninstall"]

_log = logging.getLogger("ckptguard.integrations.transformers")
_ATTR = "_ckptguard_guard"
_TRAINER_STATE_NAME = "trainer_state.json"
_install_lock = threading.Lock()
_original_init: Any = None

T = TypeVar("T")


def last_valid_checkpoint(
    output_dir: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None
) -> str | None:
    """The newest ``checkpoint-<step>`` under ``output_dir`` that verifies, or None.

    ``output_dir`` may be an object-store URL (``s3://bucket/run``, ``storage_options``
    as for ``CheckpointManager``): the newest remote checkpoint whose every object matches
    its manifest, as a URL (read in full to check it; nothing is downloaded to disk).

    The safe replacement for ``transformers.trainer_utils.get_last_checkpoint``: every file
    is checked against the checkpoint's manifest; half-written and corrupt folders are
    skipped and logged. A folder written before ckptguard (no manifest) that is newer than
    every one that verifies is returned if it passes a structural check (see
    ``adoption.py``), with a warning that it was not checksummed. What a crash left is
    repaired first (a replace cut between its renames is rolled back); nothing else is
    changed.
    """
    if is_url(os.fspath(output_dir)):
        return _last_valid_remote(os.fspath(output_dir), storage_options)
    root = local_dir(output_dir, who="last_valid_checkpoint", framework="the Trainer")
    if not os.path.isdir(root):
        return None
    repair_root(root)
    found: tuple[int, str] | None = None
    for name in sorted(
        (n for n in os.listdir(root) if HF_NAMING.step(n) is not None),
        key=lambda n: HF_NAMING.step(n) or 0,
        reverse=True,
    ):
        path = os.path.join(root, name)
        if not os.path.lexists(os.path.join(path, MANIFEST_NAME)):
            continue  # written without ckptguard: adopted below if nothing newer verifies
        report = verify(path)
        if report.ok:
            found = (HF_NAMING.step(name) or 0, path)
            break
        _log.warning("skipping %s: %s", path, "; ".join(report.problems))
    older = newest_adoptable(root, HF_NAMING, newer_than=None if found is None else found[0])
    return older.path if older is not None else (None if found is None else found[1])


def _last_valid_remote(url: str, storage_options: Mapping[str, Any] | None) -> str | None:
    backend = backend_for(url, storage_options, what="last_valid_checkpoint")
    steps = sorted(
        ((step, n) for n in backend.names() if (step := HF_NAMING.step(n)) is not None),
        reverse=True,
    )
    for _step, name in steps:
        path = backend.join(name)
        report = backend.verify(path, expect_name=name)
        if report.ok:
            return path
        _log.warning("skipping %s: %s", path, "; ".join(report.problems))
    return None


@dataclass
class _Guard:
    """What ckptguard keeps on a protected trainer."""

    keep_last: int | None
    options: RemoteOptions = field(default_factory=RemoteOptions)
    managers: dict[str, CheckpointManager] = field(default_factory=dict)
    redirect: str | None = None  # the run dir the trainer writes into during a save
    warned_topology: bool = False
    # (root, step, keep, save id) of the save just committed (or the async save in
    # flight), until on_save has run
    just_saved: tuple[str, int, set[str], str | PendingSave | None] | None = None
    snapshots: Any = None  # _capture.Snapshots of async saves, reused by each
    warned_sync: bool = False

    def manager(self, root: str) -> CheckpointManager:
        """The checkpoint manager of ``root`` (made on first use: every rank calls)."""
        root = root.rstrip("/") if is_url(root) else os.path.abspath(root)
        kwargs = self.options.manager_kwargs(root, self.keep_last)
        if root not in self.managers:
            self.managers[root] = CheckpointManager(
                root,
                keep_best=0,
                coordinator=default_coordinator(),
                check_environment=False,  # protect() ran the checks already
                **kwargs,
            )
        manager = self.managers[root]
        manager.policy = RetentionPolicy(keep_last=kwargs["keep_last"], keep_best=0)
        return manager

    def cache(self, root: str) -> str:
        """The local cache that checkpoints of ``root`` (or its mirror) are resumed from."""
        return cache_root(self.options.cache_dir, self.options.mirror or root)


def _keep_last(limit: Any) -> int | None:
    """``save_total_limit`` as retention's ``keep_last`` (the Trainer: None or <= 0 = all)."""
    return None if limit is None or int(limit) <= 0 else int(limit)


def protect(
    trainer: T,
    *,
    mirror: str | None = None,
    keep_last: int | None = None,
    verify_after_save: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    cache_dir: str | None = None,
    async_save: bool = False,
    preemption: Any = True,
    **others: Any,
) -> T:
    """Make every checkpoint of ``trainer`` atomic, exactly-once and verified; returns it.

    Works for ``transformers.Trainer`` and any subclass (TRL's SFTTrainer, DPOTrainer,
    GRPOTrainer, ...). Calling it twice is harmless. See the module docstring for what
    changes.

    ``args.output_dir`` may be an object-store URL (``s3://bucket/run``): the trainer
    writes each checkpoint into a local staging dir, ckptguard uploads and commits it on
    the store; ``train(resume_from_checkpoint=True)`` downloads the newest valid one into
    ``cache_dir`` (see ``integrations/_remote.py``). ``mirror="s3://..."`` (a local
    output_dir): each checkpoint is committed locally, then uploaded in the background;
    resume takes the newest valid of both. ``keep_last`` (default: ``save_total_limit``),
    ``verify_after_save`` and ``storage_options`` are ``CheckpointManager``'s; its other
    options are refused with TypeError.

    ``async_save=True``: a save returns once the tensors it writes (weights, optimizer
    state) are copied into reused host buffers (pinned for CUDA tensors); a background
    thread writes the files, in the Trainer's own formats, then seals, commits and
    rotates (see ``integrations/_capture.py``). At most one save is in flight; a failed
    one raises at the next save or at the end of ``train()``; process exit and SIGTERM
    wait for it. Costs host memory of about one checkpoint's tensors.

    ``preemption`` (default True: SIGTERM; a signal name such as ``"SIGUSR1"``, several,
    a ``ckptguard.Preemption``, or False: off): on that signal every rank agrees on one
    step, the trainer saves it and stops, and ``train()`` exits the process with
    ``ckptguard.PREEMPTED_EXIT_CODE`` (see ``integrations/_preemption.py``). The handler
    is installed while ``train()`` runs; off, with a warning, when the program handles
    the signal itself.
    """
    options = RemoteOptions.of(
        "protect(trainer)",
        others,
        async_save=async_save,
        mirror=mirror,
        keep_last=keep_last,
        verify_after_save=verify_after_save,
        storage_options=storage_options,
        cache_dir=cache_dir,
    )
    if getattr(trainer, _ATTR, None) is not None:
        return trainer
    for needed in ("_save_checkpoint", "_get_output_dir", "train", "args", "state"):
        if not hasattr(trainer, needed):
            raise TypeError(
                f"protect() needs a transformers Trainer (or subclass); "
                f"{type(trainer).__name__} has no {needed!r}"
            )
    t: Any = trainer
    remote = bool(t.args.output_dir) and is_url(str(t.args.output_dir))
    if remote:
        _check_remote_args(t.args)
        remove_url_folder(str(t.args.output_dir))  # the Trainer's makedirs("s3:/...")
    is_zero = getattr(t, "is_world_process_zero", None)
    if t.args.output_dir and not remote and (not callable(is_zero) or is_zero()):
        from ckptguard._tools.doctor import warn_at_start  # noqa: PLC0415

        warn_at_start(str(t.args.output_dir), log=_log)  # versions, leftovers (fast)
    guard = _Guard(keep_last=_keep_last(t.args.save_total_limit), options=options)
    preempt = None if policy_of(preemption) is None else TrainerPreemption(preemption)
    original_save = t._save_checkpoint  # noqa: SLF001 - the hook this integration wraps
    original_output_dir = t._get_output_dir  # noqa: SLF001
    original_train = t.train
    original_load_best = getattr(t, "_load_best_model", None)

    def _get_output_dir(trial: Any = None, *args: Any, **kwargs: Any) -> str:
        if guard.redirect is not None:
            return guard.redirect
        return str(original_output_dir(trial, *args, **kwargs))

    @functools.wraps(original_save)
    def _save_checkpoint(model: Any, trial: Any, *args: Any, **kwargs: Any) -> None:
        root = str(original_output_dir(trial))
        _save(t, guard, root, lambda: original_save(model, trial, *args, **kwargs))

    @functools.wraps(original_train)
    def train(*args: Any, **kwargs: Any) -> Any:
        args_list = list(args)
        if args_list:
            args_list[0] = _resolve_resume(t, guard, args_list[0])
        elif "resume_from_checkpoint" in kwargs:
            kwargs["resume_from_checkpoint"] = _resolve_resume(
                t, guard, kwargs["resume_from_checkpoint"]
            )
        # The Trainer's rotation deletes with rmtree, and at the end of training it deletes
        # the newest checkpoint when save_total_limit == 1: while it trains, it sees no
        # limit and ckptguard's retention applies the user's (args may be shared: restored).
        limit = t.args.save_total_limit
        guard.keep_last = _keep_last(limit)
        t.args.save_total_limit = None
        if preempt is not None:
            preempt.arm()
        try:
            result = original_train(*args_list, **kwargs)
        finally:
            t.args.save_total_limit = limit
            if preempt is not None:
                preempt.disarm()
        for manager in guard.managers.values():
            manager.wait()  # mirror uploads: their failure is raised here
        if preempt is not None:
            preempt.exit_if_preempted(guard.managers.values())
        return result

    handler = t.callback_handler
    original_on_save = handler.on_save

    @functools.wraps(original_on_save)
    def on_save(*args: Any, **kwargs: Any) -> Any:
        saved = guard.just_saved
        if saved is not None and isinstance(saved[3], PendingSave):
            # An async save: callbacks that act on_save find the checkpoint committed
            # (they may read or add files); without any, training goes on at once.
            if _acts_on_save(handler):
                guard.just_saved = (*saved[:3], saved[3].result().save_id)
            else:
                guard.just_saved = None
        result = original_on_save(*args, **kwargs)
        if guard.just_saved is not None:
            saved, guard.just_saved = guard.just_saved, None
            _commit_late_writes(t, guard, saved)
        return result

    if callable(original_load_best):

        @functools.wraps(original_load_best)
        def load_best_model(*args: Any, **kwargs: Any) -> Any:
            for manager in guard.managers.values():
                manager.wait()  # the best checkpoint may be the save in flight
            return original_load_best(*args, **kwargs)

        t._load_best_model = load_best_model  # noqa: SLF001

    t._get_output_dir = _get_output_dir  # noqa: SLF001
    t._save_checkpoint = _save_checkpoint  # noqa: SLF001
    t.train = train
    handler.on_save = on_save
    if preempt is not None:
        t.add_callback(preempt.callback)
    setattr(t, _ATTR, guard)
    _log.info("ckptguard protects the checkpoints of %s in %s", type(t).__name__, t.args.output_dir)
    return trainer


def _resolve_resume(trainer: Any, guard: _Guard, value: Any) -> Any:
    """Turn ``resume_from_checkpoint`` into a path that verifies on every node.

    ``True`` becomes the newest checkpoint that verifies; a path is verified before the
    trainer loads anything from it.
    """
    if value is None or value is False:
        return value
    root = str(trainer.args.output_dir)
    manager = guard.manager(root)
    coord = manager.coordinator
    if guard.options.uses_cache(root):
        return _resolve_remote(guard, manager, root, value)
    if value is True:
        path = agreed_latest(manager)
        if path is None:
            raise NoValidCheckpoint(
                f"no checkpoint in {trainer.args.output_dir} verifies: nothing to resume from",
                path=str(trainer.args.output_dir),
                hint="train without resume_from_checkpoint to start from scratch; "
                "`ckptguard list OUTPUT_DIR` shows each checkpoint and why it is invalid",
            )
        _log.info("resuming from %s (the newest checkpoint that verifies)", path)
        return path
    path = os.fspath(value)
    check_resume_path(path, coord)
    return path


def _resolve_remote(guard: _Guard, manager: CheckpointManager, root: str, value: Any) -> str:
    """``resume_from_checkpoint`` for an object-store output or a mirror: a local path."""
    cache = guard.cache(root)
    if value is True:
        path = newest_to_resume(manager, cache)
        if path is None:
            raise NoValidCheckpoint(
                f"no checkpoint in {root}"
                + (f" or its mirror {guard.options.mirror}" if guard.options.mirror else "")
                + " verifies: nothing to resume from",
                path=root,
                hint="train without resume_from_checkpoint to start from scratch; "
                "`ckptguard list URL` shows each checkpoint and why it is invalid",
            )
        _log.info("resuming from %s (the newest checkpoint that verifies)", path)
        return path
    text = str(os.fspath(value))
    if not is_url(text):
        check_resume_path(text, manager.coordinator)
        return text
    return fetch_url(text, guard.options.storage_options, cache, manager.coordinator,
                     who="resume_from_checkpoint")  # fmt: skip


def _check_remote_args(args: Any) -> None:
    """Refuse, before training, what an object-store output_dir cannot do yet."""
    if getattr(args, "load_best_model_at_end", False):
        raise UnsupportedRoot(
            f"load_best_model_at_end with an object-store output_dir ({args.output_dir}) "
            "is not supported: the Trainer loads the best checkpoint from a local path",
            path=str(args.output_dir),
            hint="use a local output_dir with mirror='s3://...' for an off-node copy",
        )


def _step_metrics(state: Any, step: int) -> dict[str, Any]:
    """The numbers the trainer logged at ``step`` (eval metrics included), for the manifest."""
    metrics: dict[str, Any] = {}
    for entry in getattr(state, "log_history", None) or []:
        if isinstance(entry, dict) and entry.get("step") == step:
            metrics.update(
                {
                    str(k): v
                    for k, v in entry.items()
                    if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
                }
            )
    return metrics


def _acts_on_save(handler: Any) -> bool:
    """Whether any of the trainer's callbacks has an ``on_save`` of its own."""
    from transformers import TrainerCallback  # noqa: PLC0415 - transformers is optional

    return any(type(cb).on_save is not TrainerCallback.on_save for cb in handler.callbacks)


def _in_background(trainer: Any, guard: _Guard) -> bool:
    """Whether this save may finish in the background.

    With ``async_save``, except under DeepSpeed or FSDP, whose engines write their own
    files with their own collectives.
    """
    if not guard.options.async_save:
        return False
    engine = "DeepSpeed" if getattr(trainer, "is_deepspeed_enabled", False) else None
    if engine is None and getattr(trainer, "is_fsdp_enabled", False):
        engine = "FSDP"
    if engine is None:
        return True
    if not guard.warned_sync:
        _log.warning("async_save: with %s the Trainer's saves stay synchronous", engine)
        guard.warned_sync = True
    return False


def _save(trainer: Any, guard: _Guard, root: str, run_original: Any) -> None:
    manager = guard.manager(root)
    background = _in_background(trainer, guard)
    step = int(trainer.state.global_step)
    name = HF_NAMING.name(step)
    final = manager.backend.join(name)
    keep: set[str] = set()  # the trainer's best checkpoint, known once the trainer has saved
    pushes: list[str] = []  # the trainer asked to push this checkpoint to the Hub

    def write(tx: AtomicCheckpoint) -> Callable[[], None] | None:
        _match_save_on_each_node(trainer, guard, tx)
        staging = str(tx.staging_dir)
        guard.redirect = staging
        undo = _let_node_leaders_save_weights(trainer) if not tx.shared else None
        undo_push = _defer_push(trainer, pushes)
        deferred = None
        try:
            if background:
                if guard.snapshots is None:
                    guard.snapshots = Snapshots()
                with capture(staging, guard.snapshots) as deferred, frozen_weights(tx):
                    run_original()
            else:
                with frozen_weights(tx):
                    run_original()
        finally:
            guard.redirect = None
            undo_push()
            if undo is not None:
                undo()
        best = trainer.state.best_model_checkpoint
        if isinstance(best, str) and os.path.abspath(best).startswith(staging + os.sep):
            # The trainer recorded the staging path as its best checkpoint: record the
            # final one (and write trainer_state.json again with it).
            relative = os.path.relpath(os.path.abspath(best), staging)
            trainer.state.best_model_checkpoint = manager.backend.join(relative)
            if trainer.args.should_save:
                trainer.state.save_to_json(os.path.join(staging, name, _TRAINER_STATE_NAME))
        keep.update(_current_best(trainer, manager.root))
        # On a store each rank writes into its own spool: each moves its own files up
        # (a rank that saved nothing has no folder; the committer must have one).
        mine = tx.committer == manager.coordinator.rank
        hoist = remote and (mine or os.path.isdir(os.path.join(staging, name)))
        if deferred is None:
            if hoist:
                _hoist(tx.staging_dir, name)
            return None

        def finish() -> None:  # in the background thread
            deferred.run()
            if hoist:
                _hoist(tx.staging_dir, name)

        return finish

    remote = manager.backend.remote

    def frozen_weights(tx: AtomicCheckpoint) -> contextlib.AbstractContextManager[Any]:
        """Incremental saves: the frozen weights in shards of their own, linked (_frozen.py)."""
        if manager.incremental is None:
            return contextlib.nullcontext()
        return frozen_first(
            _unwrapped(trainer),
            os.path.join(tx.staging_dir, name),
            lambda: manager.reuse_for(tx),
            tx.storage,
            tx.known,
            dest_for=(lambda rel: f"{tx.write_path}/{rel}") if remote else None,  # not spooled
        )

    def prepare(staging: Path) -> None:
        _hoist(staging, name)

    done = manager.save_files(
        step,
        write,
        metrics=_step_metrics(trainer.state, step),
        metadata={"framework": "transformers", "trainer": type(trainer).__name__},
        prepare=None if remote else prepare,
        also_keep=keep,
        blocking=not background,
    )
    if isinstance(done, PendingSave):
        _log.info("saving %s in the background (training was held %.3f s)", final,
                  done.stall_seconds)  # fmt: skip
        guard.just_saved = (manager.root, step, keep, done)
        if pushes and not remote:  # the Trainer's Hub push needs the committed folder
            guard.just_saved = (manager.root, step, keep, done.result().save_id)
    else:
        _log.info("committed %s", final)
        guard.just_saved = (manager.root, step, keep, done.save_id)
    if pushes and remote:
        _log.warning("not pushing %s to the Hub: it is on an object store", final)
    elif pushes:
        trainer._push_from_checkpoint(final)  # noqa: SLF001 - the Trainer's own push, deferred


def _unwrapped(trainer: Any) -> Any:
    """The model whose ``save_pretrained`` the Trainer calls (without DDP or compile)."""
    unwrap = getattr(getattr(trainer, "accelerator", None), "unwrap_model", None)
    if not callable(unwrap):
        return trainer.model
    try:
        return unwrap(trainer.model, keep_torch_compile=False)
    except TypeError:  # an accelerate without keep_torch_compile
        return unwrap(trainer.model)


def _commit_late_writes(
    trainer: Any, guard: _Guard, saved: tuple[str, int, set[str], str | PendingSave | None]
) -> None:
    """Commit what ``on_save`` callbacks wrote into a checkpoint after its commit.

    Callbacks run after ``_save_checkpoint`` and find the checkpoint under its final name
    (TRL's MergeModelCallback adds ``merged/``, PEFT savers add or remove files). Left so,
    the checkpoint would no longer match its manifest, and resume would skip it. Every
    rank checks its root's structure (names and sizes; one exchange per save); if any
    changed, the checkpoint is committed again, atomically replacing the first commit, from
    hard links of what is there now. Partial: a callback that rewrites a file in place
    with the same size is not noticed.
    """
    root, step, keep, save_id = saved
    if isinstance(save_id, PendingSave):  # pragma: no cover - on_save resolved it
        save_id = save_id.result().save_id
    manager = guard.manager(root)
    if manager.backend.remote:
        return  # callbacks cannot write into a checkpoint on a store
    coord = manager.coordinator
    path = os.path.join(manager.root, HF_NAMING.name(step))
    changed = os.path.isdir(path) and not verify(path, checksums=False).ok
    if coord.world_size > 1:
        changed = any(coord.all_gather(changed))
    if not changed:
        return
    _log.info("on_save callbacks changed %s after its commit: committing it again", path)

    def relink(tx: AtomicCheckpoint) -> None:
        if coord.rank == tx.committer:
            _link_tree(path, str(tx.staging_dir))

    manager.save_files(
        step,
        relink,
        metrics=_step_metrics(trainer.state, step),
        metadata={"framework": "transformers", "trainer": type(trainer).__name__},
        also_keep=keep,
        supersedes=save_id,
    )


def _link_tree(source: str, target: str) -> None:
    """Hard-link (or copy, across filesystems) every file of ``source`` into ``target``."""
    for dirpath, dirnames, filenames in os.walk(source):
        rel = os.path.relpath(dirpath, source)
        dest_dir = target if rel == os.curdir else os.path.join(target, rel)
        for name in dirnames:
            os.makedirs(os.path.join(dest_dir, name), exist_ok=True)
        for name in filenames:
            if rel == os.curdir and name in RESERVED_NAMES:
                continue  # the old manifest: the new commit writes its own
            src, dst = os.path.join(dirpath, name), os.path.join(dest_dir, name)
            try:
                os.link(src, dst, follow_symlinks=False)
            except OSError:
                shutil.copy2(src, dst, follow_symlinks=False)


def _current_best(trainer: Any, root: str) -> set[str]:
    best = trainer.state.best_model_checkpoint
    if isinstance(best, str) and is_url(root):
        head, _, tail = best.rstrip("/").rpartition("/")
        return {tail} if head == root else set()
    if isinstance(best, str) and os.path.dirname(os.path.abspath(best)) == root:
        return {os.path.basename(best)}
    return set()


def _match_save_on_each_node(trainer: Any, guard: _Guard, tx: AtomicCheckpoint) -> None:
    """Make ``save_on_each_node`` agree with the storage that the probe found."""
    args = trainer.args
    if tx.nodes <= 1 or args.save_on_each_node == (not tx.shared):
        return  # on one node both settings pick the same writer
    wanted = not tx.shared
    if not guard.warned_topology:
        _log.warning(
            "save_on_each_node=%s, but the checkpoint root %s is %s: ckptguard sets it to %s "
            "so that %s",
            args.save_on_each_node,
            args.output_dir,
            "shared by all nodes" if tx.shared else "local to each node",
            wanted,
            "one process writes each file"
            if tx.shared
            else "every node gets a complete checkpoint to resume from",
        )
        guard.warned_topology = True
    args.save_on_each_node = wanted


def _defer_push(trainer: Any, pushes: list[str]) -> Any:
    """Hold back the Trainer's Hub push of a checkpoint until it is committed.

    Pushed from the staging dir, the upload would race the seal and the rename. Returns an
    undo.
    """
    if not callable(getattr(trainer, "_push_from_checkpoint", None)):
        return lambda: None

    def record(checkpoint_folder: str, *args: Any, **kwargs: Any) -> None:
        del args, kwargs
        pushes.append(checkpoint_folder)

    trainer._push_from_checkpoint = record  # noqa: SLF001

    def undo() -> None:
        del trainer._push_from_checkpoint  # noqa: SLF001

    return undo


def _let_node_leaders_save_weights(trainer: Any) -> Any:
    """On node-local roots, let each node's writer save the weights too; returns an undo.

    transformers 5.x's ``save_pretrained`` writes on global rank 0 only
    (``should_save_on_this_rank``), whatever ``save_on_each_node`` says: every other node's
    checkpoint would lack the model, and resuming there would fail.
    """
    model = _unwrapped(trainer)
    if not callable(getattr(model, "should_save_on_this_rank", None)):
        return None  # transformers 4.x: is_main_process (= should_save) alone decides

    def only_is_main_process(is_main_process: bool) -> bool:  # noqa: FBT001 - its signature
        return is_main_process

    model.should_save_on_this_rank = only_is_main_process

    def undo() -> None:
        del model.should_save_on_this_rank

    return undo


def _hoist(staging: Path, name: str) -> None:
    """Move what the trainer wrote into ``<staging>/<name>/`` up into the staging dir."""
    nested = staging / name
    if not nested.is_dir() or nested.is_symlink():
        raise CheckpointError(
            f"the trainer wrote no {name} directory into {staging}",
            path=str(staging),
            hint="this Trainer version saves checkpoints differently; please report it",
        )
    for entry in sorted(os.listdir(nested)):
        target = staging / entry
        if os.path.lexists(target):
            raise CheckpointError(
                f"{entry} was written both inside and outside {name} in {staging}",
                path=str(staging),
            )
        os.rename(nested / entry, target)
    os.rmdir(nested)


def install() -> None:
    """Protect every ``transformers.Trainer`` (and subclass) created from now on."""
    global _original_init  # noqa: PLW0603 - one process-wide hook, undone by uninstall()
    from transformers import Trainer  # noqa: PLC0415 - transformers is an optional extra

    with _install_lock:
        if _original_init is not None:
            return
        original = Trainer.__init__

        @functools.wraps(original)
        def init(self: Any, *args: Any, **kwargs: Any) -> None:
            # Before the Trainer's own constructor, which creates output_dir: a URL there
            # would become a local folder named "s3:".
            original(self, *args, **kwargs)
            protect(self)

        _original_init = original
        setattr(Trainer, "__init__", init)  # noqa: B010 - mypy forbids assigning a method


def uninstall() -> None:
    """Undo :func:`install` (trainers already protected stay protected)."""
    global _original_init  # noqa: PLW0603
    from transformers import Trainer  # noqa: PLC0415

    with _install_lock:
        if _original_init is not None:
            setattr(Trainer, "__init__", _original_init)  # noqa: B010
            _original_init = None
