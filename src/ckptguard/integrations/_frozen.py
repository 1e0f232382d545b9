"""Incremental Trainer saves with a frozen base: its frozen weights are linked, not written.

``save_pretrained`` writes one ``model.safetensors`` (or shards in the model's own order),
so with a frozen backbone every save's file differs from the last one by the trainable
part and is written in full. While a Trainer saves into an incremental checkpoint (see
``_state/reuse.py``), :func:`frozen_first` patches two of ``transformers.modeling_utils``'
names for the duration of the save:

- ``split_torch_state_dict_into_shards``: when the frozen parameters weigh
  ``FROZEN_SHARD_MIN`` or more, the state dict is split as two, frozen parameters first
  (``huggingface_hub``'s own split on each part, ``max_shard_size`` kept), and the shards
  numbered together: ``model-00001-of-00002.safetensors`` holds the frozen weights and
  ``model.safetensors.index.json`` maps every name, as for any sharded model.
  ``from_pretrained`` and the Trainer's resume load it as they load any sharded model.
- ``safe_save_file``: for a frozen shard, its digest is computed from memory (the file
  safetensors writes is the one ckptguard's writer would write, byte for byte); when a
  committed checkpoint of the root holds that file, it is linked (``Reuse.link``; on an
  object store a server-side copy of the newest checkpoint's object) and nothing is
  written. Otherwise, and for every other file, the call goes through to
  what was there (safetensors, or the async capture's deferral).

A model whose frozen part is small, a PEFT adapter (its own save path) and a state dict
whose names are not the model's parameter names are saved as before.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import TYPE_CHECKING, Any

from ckptguard._storage.faults import fault_point

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from ckptguard._state.reuse import Reuse
    from ckptguard._storage.base import FileDigest, Storage

__all__ = ["FROZEN_SHARD_MIN", "frozen_first", "frozen_names"]

_log = logging.getLogger("ckptguard.incremental")

FROZEN_SHARD_MIN = 1 << 20  # below this, a shard of its own is not worth the change of layout


def frozen_names(model: Any) -> set[str]:
    """The names of ``model``'s parameters that do not require grad."""
    named = getattr(model, "named_parameters", None)
    if named is None:
        return set()
    return {name for name, p in named() if not p.requires_grad}


def _nbytes(tensors: dict[str, Any]) -> int:
    return sum(int(t.numel()) * int(t.element_size()) for t in tensors.values())


@contextlib.contextmanager
def frozen_first(
    model: Any,
    directory: str,
    reuse_for: Callable[[], Reuse | None],
    storage: Storage,
    known: dict[str, FileDigest],
    *,
    dest_for: Callable[[str], str] | None = None,
) -> Iterator[set[str]]:
    """While open, ``model.save_pretrained(directory)`` links its frozen weights.

    Its frozen weights go into shards of their own; those a committed checkpoint holds
    are linked, not written.

    ``reuse_for()``: this save's plan (None: written in full); a linked file's digest goes
    into ``known`` under its path relative to ``directory``; ``dest_for(that path)``
    names where the link goes (default: the file itself; on an object store, where the
    spooled file would be uploaded to). Yields the names of the frozen shards (filled in
    by the save).
    """
    frozen_files: set[str] = set()
    frozen = frozen_names(model)
    try:
        import transformers.modeling_utils as mu  # noqa: PLC0415 - with the Trainer only
        from huggingface_hub.serialization._base import StateDictSplit  # noqa: PLC0415
    except ImportError:  # pragma: no cover - the hf extra brings both
        frozen = set()
    split_before = getattr(mu, "split_torch_state_dict_into_shards", None) if frozen else None
    save_before = getattr(mu, "safe_save_file", None) if frozen else None
    if split_before is None or save_before is None:
        yield frozen_files
        return
    root = os.path.abspath(directory)

    def split(state_dict: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        cold = {k: v for k, v in state_dict.items() if k in frozen}
        if args or len(cold) == len(state_dict) or _nbytes(cold) < FROZEN_SHARD_MIN:
            return split_before(state_dict, *args, **kwargs)
        warm = {k: v for k, v in state_dict.items() if k not in frozen}
        parts = [split_before(cold, **kwargs), split_before(warm, **kwargs)]
        shards = [names for part in parts for names in part.filename_to_tensors.values()]
        pattern = kwargs.get("filename_pattern", "model{suffix}.safetensors")
        files = [pattern.format(suffix=f"-{i:05d}-of-{len(shards):05d}") for i in
                 range(1, len(shards) + 1)]  # fmt: skip
        frozen_files.update(files[: len(parts[0].filename_to_tensors)])
        to_tensors = dict(zip(files, shards, strict=True))
        metadata = {"total_size": sum(int(p.metadata.get("total_size", 0)) for p in parts)}
        return StateDictSplit(
            metadata=metadata,
            filename_to_tensors=to_tensors,
            tensor_to_filename={name: file for file, names in to_tensors.items() for name in names},
        )

    def save_file(tensors: Any, filename: Any, metadata: Any = None, **kwargs: Any) -> Any:
        path = os.path.abspath(os.fspath(filename)) if isinstance(filename, str) else None
        rel = os.path.relpath(path, root) if path and path.startswith(root + os.sep) else None
        if path and rel in frozen_files and not kwargs and isinstance(tensors, dict):
            dest = path if dest_for is None else dest_for(str(rel))
            digest = _link(tensors, metadata, (str(rel), dest), reuse_for(), storage)
            if digest is not None:
                known[rel] = digest
                fault_point("reuse.linked")
                return None
        return save_before(tensors, filename, metadata=metadata, **kwargs)

    setattr(mu, "split_torch_state_dict_into_shards", split)  # noqa: B010 - not exported
    setattr(mu, "safe_save_file", save_file)  # noqa: B010
    try:
        yield frozen_files
    finally:
        setattr(mu, "split_torch_state_dict_into_shards", split_before)  # noqa: B010
        setattr(mu, "safe_save_file", save_before)  # noqa: B010
    if frozen_files:
        _log.debug("frozen weights in %s", sorted(frozen_files))


def _link(
    tensors: dict[str, Any],
    metadata: Any,
    where: tuple[str, str],
    reuse: Reuse | None,
    storage: Storage,
) -> FileDigest | None:
    """The digest of the file linked at ``where`` to an equal committed one; None: write it.

    ``where``: the file's path in the checkpoint, and on disk.
    """
    from ckptguard._state.serialization import safetensors_digest  # noqa: PLC0415 - torch

    if reuse is None:
        return None
    digest = safetensors_digest(tensors, metadata, if_size=reuse.may_match)
    if digest is None or not reuse.link(where[0], digest, where[1], storage):
        return None
    return digest
