"""Lightning: a ``CheckpointIO`` plugin that makes every checkpoint atomic and verified.

::

    from ckptguard.integrations.lightning import AtomicCheckpointIO, last_valid_checkpoint
    trainer = lightning.Trainer(plugins=[AtomicCheckpointIO()], callbacks=[ModelCheckpoint(...)])
    trainer.fit(model, ckpt_path=last_valid_checkpoint("checkpoints/"))

Each checkpoint Lightning saves (``ModelCheckpoint``'s top-k, ``last.ckpt``,
``trainer.save_checkpoint``) becomes a ckptguard checkpoint *directory* under the path
Lightning chose (``epoch=1-step=20.ckpt/``): the ``torch.save`` file
(:data:`CHECKPOINT_FILE`) and the manifest, staged, sealed and committed in one rename; an
existing checkpoint of that name (``last.ckpt``) is replaced atomically. Loading through
the plugin (``fit(ckpt_path=...)``) checks every byte against the manifest first; a plain
``.ckpt`` file (written without ckptguard) still loads, with a warning. Deleting (top-k
rotation) renames the directory into trash first, so that a crash never leaves a
half-deleted checkpoint. To load one outside a Trainer, use :func:`load` or pass
:func:`checkpoint_file` to ``LightningModule.load_from_checkpoint``.

Lightning saves from global rank 0 only (the other ranks never call the plugin), so each
save commits from that one process.

Not supported: strategies that load checkpoints without the plugin (``FSDPStrategy`` and
``ModelParallelStrategy`` with full state dicts expect a file), and loggers that upload
checkpoint files (``log_model=True``) see a directory.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _load as pl_load

from ckptguard._coordination.base import SingleProcess
from ckptguard._errors import CorruptCheckpoint, NoValidCheckpoint
from ckptguard._format.layout import MANIFEST_NAME, RootLayout
from ckptguard._protocol.cleanup import retire_checkpoint
from ckptguard._protocol.transaction import AtomicCheckpoint
from ckptguard._protocol.verify import verify_local as verify
from ckptguard._storage.local import LocalStorage
from ckptguard.integrations._resume import local_dir, repair_root

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "CHECKPOINT_FILE",
    "AtomicCheckpointIO",
    "checkpoint_file",
    "last_valid_checkpoint",
    "load",
]

_log = logging.getLogger("ckptguard.integrations.lightning")
CHECKPOINT_FILE = "checkpoint.ckpt"  # the torch.save file inside a checkpoint directory


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
    return os.path.isdir(path) and os.path.lexists(os.path.join(path, MANIFEST_NAME))


def checkpoint_file(path: str | os.PathLike[str]) -> str:
    """The ``torch.save`` file of a checkpoint, after checking every byte of it.

    For ``LightningModule.load_from_checkpoint(checkpoint_file(path))``. A plain file (not
    a ckptguard checkpoint) is returned as it is.
    """
    path = _follow_link(os.fspath(path))
    if not os.path.isdir(path):
        return path
    report = verify(path)
    if not report.ok:
        raise CorruptCheckpoint(
            f"{path} does not verify: {'; '.join(report.problems)}",
            path=path,
            problems=report.problems,
        )
    return os.path.join(path, CHECKPOINT_FILE)


def load(
    path: str | os.PathLike[str],
    map_location: Any = None,
    *,
    weights_only: bool | None = None,
) -> dict[str, Any]:
    """Load a checkpoint saved through :class:`AtomicCheckpointIO` (verified first).

    A symlink (``ModelCheckpoint(save_last="link")``'s ``last.ckpt``) is followed to a
    checkpoint in the same directory.
    """
    path = _follow_link(local_dir(path, who="load", framework="Lightning"))
    repair_root(os.path.dirname(os.path.abspath(path)))
    if os.path.isdir(path) and not _is_ours(path):
        raise CorruptCheckpoint(
            f"{path} is a directory without a ckptguard manifest: not a checkpoint it saved",
            path=path,
            hint="a crash may have left it; `ckptguard verify` tells more",
        )
    if not os.path.isdir(path):
        _log.warning("%s was not saved by ckptguard: loading it unverified", path)
    loaded = pl_load(checkpoint_file(path), map_location=map_location, weights_only=weights_only)
    if not isinstance(loaded, dict):
        raise CorruptCheckpoint(f"{path} does not hold a Lightning checkpoint", path=path)
    return loaded


def last_valid_checkpoint(dirpath: str | os.PathLike[str]) -> str | None:
    """The newest checkpoint under ``dirpath`` that verifies (by step, then save time).

    For ``trainer.fit(model, ckpt_path=last_valid_checkpoint(dirpath))``: what a crash left
    is repaired first (a ``last.ckpt`` replace cut between its renames is rolled back);
    half-written, corrupt and foreign entries are skipped and logged. Symlinks
    (``save_last="link"``) are skipped: their target is considered on its own.
    """
    root = local_dir(dirpath, who="last_valid_checkpoint", framework="Lightning")
    if not os.path.isdir(root):
        return None
    repair_root(root)
    best: tuple[int, str, str] | None = None
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if name.startswith(".") or os.path.islink(path) or not os.path.isdir(path):
            continue
        report = verify(path)
        if not report.ok or report.manifest is None:
            _log.warning("skipping %s: %s", path, "; ".join(report.problems))
            continue
        key = (report.manifest.step or 0, report.manifest.created_at, path)
        if best is None or key > best:
            best = key
    return None if best is None else best[2]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning ``CheckpointIO``: atomic, exactly-once, checksummed checkpoint directories."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(
                f"{type(self).__name__} does not take storage_options (local and shared "
                "filesystems only)"
            )
        target = os.path.abspath(local_dir(path, who="save_checkpoint", framework="Lightning"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        step = checkpoint.get("global_step")
        tx = AtomicCheckpoint(
            target,
            step=step if isinstance(step, int) and step >= 0 else None,
            metadata={"framework": "lightning", "epoch": checkpoint.get("epoch")},
            if_exists="replace",
            coordinator=SingleProcess(),  # only global rank 0 ever calls the plugin
        )
        with tx as staging:
            torch.save(checkpoint, os.path.join(staging, CHECKPOINT_FILE))

    def load_checkpoint(
        self,
        path: Any,
        map_location: Callable[..., Any] | None = lambda storage, loc: storage,  # noqa: ARG005
        weights_only: bool | None = None,  # noqa: FBT001 - Lightning's signature
    ) -> dict[str, Any]:
        path = local_dir(path, who="load_checkpoint", framework="Lightning")
        repair_root(os.path.dirname(os.path.abspath(path)))
        if not os.path.lexists(path):
            raise NoValidCheckpoint(f"no checkpoint at {path}", path=path)
        return load(path, map_location=map_location, weights_only=weights_only)

    def remove_checkpoint(self, path: Any) -> None:
        path = os.path.abspath(local_dir(path, who="remove_checkpoint", framework="Lightning"))
        if os.path.islink(path) or os.path.isfile(path):
            os.remove(path)
            return
        if _is_ours(path):
            retire_checkpoint(
                RootLayout(os.path.dirname(path)), os.path.basename(path), storage=LocalStorage()
            )
            return
        if os.path.lexists(path):
            _log.warning("not deleting %s: not a checkpoint saved by ckptguard", path)
