"""Async framework saves: the framework's own save code runs, its heavy writes run later.

::

    snapshots = Snapshots()
    with capture(staging_dir, snapshots) as deferred:
        trainer._save_checkpoint(model, trial)    # the framework's code, unchanged
    # the training thread goes on; the weights may change from here
    deferred.run()                                # in a background thread: the same files

Inside ``capture(directory)``, each ``torch.save`` and safetensors ``save_file`` that this
thread aims at a file under ``directory`` copies the tensors it would write into host
buffers (:class:`Snapshots`, reused from one save to the next; pinned memory for CUDA
tensors, so that the copies are DMA) and returns without writing. ``Deferred.run`` later
makes the very same call, with the same arguments and the copies in place of the
tensors, in the same order: each file holds what the framework would have written at
the moment of its call, in the format the framework loads. Everything else (JSON, a
tokenizer, small or tensor-free ``torch.save`` objects such as RNG states and training
arguments) is written at once, as without the capture.

A copy of a CUDA tensor keeps its device in the file: ``torch.save`` records each
storage's device, and a pinned copy is tagged with the device its tensor was on (a
``torch.serialization`` tagger for those copies alone), so the file loads onto the same
device as a file written at the moment of the call would.

A call that cannot be deferred faithfully (a file object instead of a path, tensor
subclasses such as DTensor, sparse or quantized tensors, a non-contiguous tensor that
safetensors would refuse, an object that cannot be copied) is made at once: slower,
never different.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import sys
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy
import torch

from ckptguard._storage.faults import fault_point

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

__all__ = ["DEFER_MIN_BYTES", "Deferred", "Snapshots", "capture", "copy_tree"]

_log = logging.getLogger("ckptguard.integrations")

# Below this many tensor bytes a write is made at once: copying it buys nothing.
DEFER_MIN_BYTES = 64 << 10
_SCALARS = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device)


# The storage of a pinned copy -> the device of the tensor it copies (see the docstring).
_DEVICE_OF: dict[int, str] = {}
_tagger_registered = False


def _tag_copy(storage: Any) -> str | None:
    try:
        return _DEVICE_OF.get(int(storage.data_ptr()))
    except Exception:
        return None


def _restore_nothing(storage: Any, location: str) -> None:
    del storage, location  # loading uses torch's own deserializers


def _register_tagger() -> None:
    global _tagger_registered  # noqa: PLW0603 - once per process
    if not _tagger_registered:
        torch.serialization.register_package(1, _tag_copy, _restore_nothing)
        _tagger_registered = True


def _forget(buffer: torch.Tensor) -> None:
    _DEVICE_OF.pop(int(buffer.untyped_storage().data_ptr()), None)


class NotDeferrable(Exception):
    """This call must be made at once (see the module docstring)."""


class Snapshots:
    """Host copies of tensors, in buffers reused by every save of one trainer.

    A buffer is keyed by where its tensor sits (the file, then its place in the object);
    a later save whose tensor at that place has the same dtype and size copies into the
    same buffer, so the steady state allocates nothing. Buffers no save used last time
    are freed. One save's copies may be taken only once the previous save has written.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[Any, ...], torch.Tensor] = {}
        self._used: set[tuple[Any, ...]] = set()
        self._devices: set[torch.device] = set()
        self.allocations = 0
        self.copied_bytes = 0

    def begin(self) -> None:
        self._used = set()
        self._devices = set()
        self.copied_bytes = 0

    def _buffer(self, key: tuple[Any, ...], nbytes: int, *, pinned: bool) -> torch.Tensor:
        """The reused uint8 buffer of ``key`` (a new one if the size or kind changed)."""
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() != nbytes or (pinned and not buffer.is_pinned()):
            if buffer is not None:
                _forget(buffer)
            buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
            self._buffers[key] = buffer
            self.allocations += 1
        self._used.add(key)
        self.copied_bytes += nbytes
        return buffer

    def _fill(self, buffer: torch.Tensor, source: torch.Tensor) -> None:
        """Copy ``source`` (contiguous uint8, the same size) into ``buffer``.

        A CPU source with one memcpy on this thread (numpy, without the GIL): torch's
        ``copy_`` splits a large CPU copy over its OpenMP threads, whose spinning cost
        several times the CPU on busy cores, beside the training's own threads. A CUDA
        source by DMA into the pinned buffer (waited for in :meth:`end`), the buffer
        tagged with the device for ``torch.save``.
        """
        if source.device.type == "cuda":
            buffer.copy_(source, non_blocking=True)
            self._devices.add(source.device)
            _register_tagger()
            _DEVICE_OF[int(buffer.untyped_storage().data_ptr())] = str(source.device)
            return
        _forget(buffer)
        numpy.copyto(buffer.numpy(), source.numpy())

    def copy(self, key: tuple[Any, ...], tensor: torch.Tensor) -> torch.Tensor:
        """A host copy of ``tensor`` (same dtype and shape, contiguous): its bytes only."""
        source = tensor.detach()
        _check_tensor(source)
        buffer = self._buffer(
            key, source.numel() * source.element_size(), pinned=source.device.type == "cuda"
        )
        self._fill(buffer, source.contiguous().reshape(-1).view(torch.uint8))
        return buffer.view(source.dtype).view(source.shape)

    def copy_storage(self, key: tuple[Any, ...], tensor: torch.Tensor) -> torch.Tensor:
        """A copy of ``tensor``'s whole storage (what ``torch.save`` writes), as uint8."""
        storage = tensor.untyped_storage()
        source = torch.empty(0, dtype=torch.uint8, device=tensor.device).set_(storage)
        buffer = self._buffer(key, storage.nbytes(), pinned=tensor.device.type == "cuda")
        self._fill(buffer, source)
        return buffer

    def end(self) -> None:
        """Wait for the device copies (every device copied from); free unused buffers."""
        for device in self._devices:
            torch.cuda.synchronize(device)
        for key in [k for k in self._buffers if k not in self._used]:
            _forget(self._buffers.pop(key))

    def release(self) -> None:
        for buffer in self._buffers.values():
            _forget(buffer)
        self._buffers.clear()

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())


def _plain_tensor(value: Any) -> bool:
    return type(value) in {torch.Tensor, torch.nn.Parameter}


def _check_tensor(value: torch.Tensor) -> None:
    if (
        value.layout != torch.strided
        or value.is_quantized
        or value.device.type not in {"cpu", "cuda"}
        or value.is_conj()
        or value.is_neg()
    ):
        raise NotDeferrable(f"a {value.layout} {value.device.type} tensor")


def tensor_bytes(obj: Any, depth: int = 0) -> int:
    """Bytes of the tensors inside ``obj``'s containers (dicts, lists, tuples)."""
    if depth > 64:
        return 0
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, depth + 1) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, depth + 1) for v in obj)
    return 0


def copy_tree(obj: Any, snapshots: Snapshots, where: tuple[Any, ...] = ()) -> Any:
    """``obj`` with every tensor replaced by a copy, as ``torch.save`` would write it.

    Containers are copied (their type kept), other values deep-copied (NotDeferrable if
    that fails). Storages are copied whole, once each, and every tensor becomes the same
    view (offset, size, stride) of its storage's copy: tensors that shared a storage
    (tied weights, views) still share one in the file, byte for byte as written now.
    """
    memo: dict[int, Any] = {}
    storages: dict[tuple[int, int, str], torch.Tensor] = {}

    def walk(value: Any, path: tuple[Any, ...]) -> Any:
        if id(value) in memo:
            return memo[id(value)]
        if isinstance(value, torch.Tensor):
            if not _plain_tensor(value):
                raise NotDeferrable(f"a {type(value).__name__}")
            _check_tensor(value)
            storage = value.untyped_storage()
            skey = (int(storage.data_ptr()), storage.nbytes(), str(value.device))
            base = storages.get(skey) if skey[0] else None
            if base is None:
                base = snapshots.copy_storage((*where, len(storages)), value)
                storages[skey] = base
            copied = torch.empty(0, dtype=value.dtype).set_(
                base.untyped_storage(), value.storage_offset(), value.size(), value.stride()
            )
            if isinstance(value, torch.nn.Parameter):
                copied = torch.nn.Parameter(copied, requires_grad=value.requires_grad)
            out: Any = copied
        elif isinstance(value, _SCALARS):
            return value
        elif isinstance(value, dict):
            out = copy.copy(value)  # keeps the type (OrderedDict, defaultdict) and attributes
            for key, item in value.items():
                out[key] = walk(item, (*path, key))
        elif type(value) is list:
            out = [walk(item, (*path, i)) for i, item in enumerate(value)]
        elif type(value) is tuple:
            out = tuple(walk(item, (*path, i)) for i, item in enumerate(value))
        elif isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple
            out = type(value)(*(walk(item, (*path, i)) for i, item in enumerate(value)))
        else:
            try:
                out = copy.deepcopy(value)
            except Exception as exc:
                raise NotDeferrable(f"{type(value).__name__} cannot be copied: {exc}") from exc
        memo[id(value)] = out
        return out

    return walk(obj, where)


@dataclass
class _Write:
    """One deferred call: ``function(*args, **kwargs)`` writes ``path``."""

    path: str
    function: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


@dataclass
class Deferred:
    """The writes a capture deferred, in call order; :meth:`run` makes them."""

    writes: list[_Write] = field(default_factory=list)
    done_at_once: list[tuple[str, str]] = field(default_factory=list)  # (path, why)

    @property
    def paths(self) -> list[str]:
        return [w.path for w in self.writes]

    def run(self) -> None:
        """Write every deferred file (in a background thread), then drop the copies."""
        try:
            for write in self.writes:
                fault_point("deferred.write")
                write.function(*write.args, **write.kwargs)
        finally:
            self.writes = []


def _under(directory: str, target: Any) -> str | None:
    """``target`` as an absolute path if it is a path inside ``directory``, else None."""
    if not isinstance(target, (str, os.PathLike)):
        return None
    path = os.path.abspath(os.fspath(target))
    return path if path.startswith(directory + os.sep) else None


class _Patches:
    """torch.save and safetensors' save_file (under each module's name), patched.

    Patched while any capture is open (process-wide, as the framework looks them up);
    calls from other threads, or aimed elsewhere, go to the original functions untouched.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.active: dict[int, tuple[str, Snapshots, Deferred]] = {}  # thread id -> capture
        self.undo: list[tuple[Any, str, Any]] = []

    def install(self) -> None:
        import safetensors.torch  # noqa: PLC0415 - only with the frameworks

        original_save, original_file = torch.save, safetensors.torch.save_file
        targets: list[tuple[Any, str, Any]] = [
            (torch, "save", _deferring(original_save, _copy_for_torch_save))
        ]
        replacement = _deferring(original_file, _copy_for_save_file)
        # transformers, accelerate, peft import it under their own names
        targets.extend(
            (module, name, replacement)
            for module in list(sys.modules.values())
            for name in ("save_file", "safe_save_file")
            if getattr(module, name, None) is original_file
        )
        for owner, name, new in targets:
            self.undo.append((owner, name, getattr(owner, name)))
            setattr(owner, name, new)

    def uninstall(self) -> None:
        for owner, name, old in reversed(self.undo):
            setattr(owner, name, old)
        self.undo = []


_PATCHES = _Patches()


def _current() -> tuple[str, Snapshots, Deferred] | None:
    return _PATCHES.active.get(threading.get_ident())


def _big_enough(obj: Any) -> None:
    if tensor_bytes(obj) < DEFER_MIN_BYTES:
        raise NotDeferrable("small")


def _contiguous_dict(tensors: Any) -> None:
    """What safetensors' save_file accepts (it raises itself on the rest: made at once)."""
    if not isinstance(tensors, dict) or not all(
        isinstance(v, torch.Tensor) and v.is_contiguous() for v in tensors.values()
    ):
        raise NotDeferrable("not a dict of contiguous tensors")


def _copy_for_torch_save(obj: Any, path: str, snapshots: Snapshots, deferred: Deferred) -> Any:
    _big_enough(obj)
    return copy_tree(obj, snapshots, (path, len(deferred.writes)))


def _copy_for_save_file(tensors: Any, path: str, snapshots: Snapshots, _: Deferred) -> Any:
    _contiguous_dict(tensors)
    _big_enough(tensors)
    return {name: snapshots.copy((path, name), t) for name, t in tensors.items()}


def _deferring(
    original: Callable[..., Any], copy: Callable[[Any, str, Snapshots, Deferred], Any]
) -> Callable[..., Any]:
    """``original(obj, target, ...)`` deferred when this thread captures ``target``'s dir."""

    def deferring(obj: Any, target: Any, *args: Any, **kwargs: Any) -> Any:
        active = _current()
        path = None if active is None else _under(active[0], target)
        if active is None or path is None:
            return original(obj, target, *args, **kwargs)
        _directory, snapshots, deferred = active
        try:
            copied = copy(obj, path, snapshots, deferred)
        except NotDeferrable as why:
            deferred.done_at_once.append((path, str(why)))
            return original(obj, target, *args, **kwargs)
        deferred.writes.append(_Write(path, original, (copied, path, *args), dict(kwargs)))
        return None

    return deferring


@contextlib.contextmanager
def capture(directory: str | os.PathLike[str], snapshots: Snapshots) -> Iterator[Deferred]:
    """Defer this thread's tensor writes into ``directory`` (see the module docstring).

    On an exception in the block nothing deferred is written (the copies are dropped).
    """
    root = os.path.abspath(os.fspath(directory))
    deferred = Deferred()
    ident = threading.get_ident()
    with _PATCHES.lock:
        if ident in _PATCHES.active:
            raise RuntimeError("capture() is not re-entrant")
        if not _PATCHES.active:
            _PATCHES.install()
        _PATCHES.active[ident] = (root, snapshots, deferred)
    snapshots.begin()
    ok = False
    try:
        yield deferred
        ok = True
    finally:
        with _PATCHES.lock:
            del _PATCHES.active[ident]
            if not _PATCHES.active:
                _PATCHES.uninstall()
        if ok:
            snapshots.end()
        else:
            deferred.writes = []
    if deferred.done_at_once:
        _log.debug("written at once (not deferred): %s", deferred.done_at_once)
