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
import threading
from typing import TYPE_CHECKING, Any

from ckptguard._storage.faults import fault_point
from ckptguard.integrations._capture import tensor_bytes

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
    return {name for name, p in named(remove_duplicate=False) if not p.requires_grad}


class _Save:
    """One thread's open :func:`frozen_first`: what its ``save_pretrained`` calls do."""

    def __init__(
        self,
        frozen: set[str],
        directory: str,
        reuse_for: Callable[[], Reuse | None],
        storage: Storage,
        known: dict[str, FileDigest],
        *,
        dest_for: Callable[[str], str] | None,
    ) -> None:
        self.frozen, self.root = frozen, os.path.abspath(directory)
        self.reuse_for, self.storage, self.known = reuse_for, storage, known
        self.dest_for = dest_for
        self.files: set[str] = set()  # the frozen shards' names, once split
        self.linked: dict[str, tuple[Reuse, FileDigest]] = {}  # rel -> how it was linked

    def split(self, before: Callable[..., Any], state_dict: Any, *args: Any, **kwargs: Any) -> Any:
        from huggingface_hub.serialization._base import StateDictSplit  # noqa: PLC0415

        cold = {k: v for k, v in state_dict.items() if k in self.frozen}
        if args or len(cold) == len(state_dict) or tensor_bytes(cold) < FROZEN_SHARD_MIN:
            return before(state_dict, *args, **kwargs)
        warm = {k: v for k, v in state_dict.items() if k not in self.frozen}
        parts = [before(cold, **kwargs), before(warm, **kwargs)]
        shards = [names for part in parts for names in part.filename_to_tensors.values()]
        pattern = kwargs.get("filename_pattern", "model{suffix}.safetensors")
        files = [pattern.format(suffix=f"-{i:05d}-of-{len(shards):05d}") for i in
                 range(1, len(shards) + 1)]  # fmt: skip
        self.files.update(files[: len(parts[0].filename_to_tensors)])
        to_tensors = dict(zip(files, shards, strict=True))
        metadata = {"total_size": sum(int(p.metadata.get("total_size", 0)) for p in parts)}
        return StateDictSplit(
            metadata=metadata,
            filename_to_tensors=to_tensors,
            tensor_to_filename={name: file for file, names in to_tensors.items() for name in names},
        )

    def save_file(
        self, before: Callable[..., Any], tensors: Any, filename: Any, metadata: Any, kwargs: Any
    ) -> Any:
        path = os.path.abspath(os.fspath(filename)) if isinstance(filename, str) else None
        if not path or not path.startswith(self.root + os.sep):
            return before(tensors, filename, metadata=metadata, **kwargs)
        rel = os.path.relpath(path, self.root)
        if rel in self.linked:  # written again in this save: never into the committed inode
            was, linked = self.linked.pop(rel)
            self.known.pop(rel, None)
            if was.linked.pop(rel, None) is not None:
                was.linked_bytes -= linked.size
            if self.dest_for is None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        elif rel in self.files and not kwargs and isinstance(tensors, dict):
            dest = path if self.dest_for is None else self.dest_for(rel)
            if self.dest_for is not None or not os.path.lexists(path):
                reuse = self.reuse_for()
                try:
                    digest = _link(tensors, metadata, (rel, dest), reuse, self.storage)
                except OSError as exc:  # written instead
                    _log.debug("%s: not linked (%s)", rel, exc)
                    digest = None
                if digest is not None and reuse is not None:
                    self.known[rel] = digest
                    self.linked[rel] = (reuse, digest)
                    fault_point("reuse.linked")
                    return None
        return before(tensors, filename, metadata=metadata, **kwargs)


class _Patches:
    """``transformers.modeling_utils``' two names, patched while any save has one open.

    Installed once for every thread (the Trainer looks them up as module globals) and
    acting only for a thread with an open :func:`frozen_first`; other threads' calls go
    to what was there. Removed when the last closes, unless someone patched over them.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.active: dict[int, _Save] = {}
        self.before: dict[str, Any] = {}

    def split(self, state_dict: Any, *args: Any, **kwargs: Any) -> Any:
        before = self.before["split_torch_state_dict_into_shards"]
        save = self.active.get(threading.get_ident())
        if save is None:
            return before(state_dict, *args, **kwargs)
        return save.split(before, state_dict, *args, **kwargs)

    def save_file(self, tensors: Any, filename: Any, metadata: Any = None, **kwargs: Any) -> Any:
        before = self.before["safe_save_file"]
        save = self.active.get(threading.get_ident())
        if save is None:
            return before(tensors, filename, metadata=metadata, **kwargs)
        return save.save_file(before, tensors, filename, metadata, kwargs)

    def ours(self) -> dict[str, Any]:
        return {"split_torch_state_dict_into_shards": self.split, "safe_save_file": self.save_file}

    def enter(self, module: Any, save: _Save) -> None:
        with self.lock:
            if threading.get_ident() in self.active:
                raise RuntimeError("frozen_first() is not re-entrant")
            if not self.active:
                self.before = {name: getattr(module, name) for name in self.ours()}
                for name, new in self.ours().items():
                    setattr(module, name, new)
            self.active[threading.get_ident()] = save

    def exit(self, module: Any) -> None:
        with self.lock:
            del self.active[threading.get_ident()]
            if not self.active:
                for name, new in self.ours().items():
                    if getattr(module, name) == new:  # not patched over since
                        setattr(module, name, self.before[name])


_PATCHES = _Patches()


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
    """While open, this thread's ``model.save_pretrained(directory)`` links frozen weights.

    Its frozen weights go into shards of their own; those a committed checkpoint holds
    are linked, not written.

    ``reuse_for()``: this save's plan (None: written in full); a linked file's digest goes
    into ``known`` under its path relative to ``directory``; ``dest_for(that path)``
    names where the link goes (default: the file itself; on an object store, where the
    spooled file would be uploaded to). A file this save linked and then writes again is
    written as a new file (never into the committed one). Yields the names of the frozen
    shards (filled in by the save).
    """
    frozen = frozen_names(model)
    try:
        import transformers.modeling_utils as mu  # noqa: PLC0415 - with the Trainer only
    except ImportError:  # pragma: no cover - the hf extra brings it
        frozen = set()
    save = _Save(frozen, directory, reuse_for, storage, known, dest_for=dest_for)
    if not frozen or not all(hasattr(mu, name) for name in _PATCHES.ours()):
        yield save.files
        return
    _PATCHES.enter(mu, save)
    try:
        yield save.files
    finally:
        _PATCHES.exit(mu)
    if save.files:
        _log.debug("frozen weights in %s", sorted(save.files))


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
