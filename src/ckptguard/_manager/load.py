"""``ckptguard.load``: read one checkpoint for evaluation, with no manager and no writes.

Evaluation jobs, notebooks and archived runs only read: they need no lock, no start-up
recovery and no write access (a read-only mount works), and they may read any run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ckptguard._errors import CheckpointNotFound, UnsafeManifest
from ckptguard._format.layout import HF_NAMING
from ckptguard._manager.catalog import Catalog
from ckptguard._protocol.backend import backend_for, checkpoint_backend

if TYPE_CHECKING:
    import os
    from collections.abc import Mapping

    from ckptguard._format.layout import Naming

__all__ = ["load"]


def _unpinned(_step: int, _manifest: object) -> bool:
    return False


def load(
    path_or_root: str | os.PathLike[str],
    target: Any = None,
    *,
    step: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
    naming: Naming = HF_NAMING,
) -> Any:
    """Load a state saved by ``CheckpointManager.save``, every byte checked first.

    ``path_or_root``: one checkpoint (``run/checkpoint-100``, or a URL), or a root, whose
    newest checkpoint that verifies is taken (of any run; ``step=`` picks one). With
    ``target`` (a module, an optimizer, a dict of them...) the state is loaded into it in
    place, as ``CheckpointManager.restore`` does. Writes nothing and takes no lock.
    Raises :class:`CorruptCheckpoint` for a checkpoint that does not verify, and
    :class:`NoValidCheckpoint` for a root with none that does.
    """
    parent, where = checkpoint_backend(path_or_root, storage_options, what="load")
    try:
        parent.read_manifest(where)
    except (CheckpointNotFound, UnsafeManifest):
        pass  # not a checkpoint: a root (or nothing, which the root's reading reports)
    else:
        if step is not None:
            raise ValueError(f"step={step} is for a root; {where} is one checkpoint")
        return Catalog(parent, naming, pinned=_unpinned).read(parent, where, target, any_run=True)
    backend = backend_for(path_or_root, storage_options, what="load")
    backend.require_root()
    return Catalog(backend, naming, pinned=_unpinned).restore(step, target, any_run=True)
