"""Training state <-> files, without pickle.

A state is a tree of dicts, lists and tuples whose leaves are torch tensors, numpy arrays,
Python scalars (bool, int, float, str, bytes, None), numpy scalars and torch dtypes. An
object with ``state_dict``/``load_state_dict`` (a module, optimizer, scheduler, scaler)
is saved as its ``state_dict()`` and, on restore into a target, loaded back through
``load_state_dict``.

On disk, inside a checkpoint:
- ``<key>.safetensors`` for each top-level key holding tensors (``model.safetensors``
  loads with the reference safetensors library and with Hugging Face tools), and
- ``state.json``: the tree, with tagged references to tensors and typed scalars.

Write path: each tensor's bytes go from its memory straight to the file (one write per
tensor; only non-contiguous or non-CPU tensors are copied, one at a time), checksummed
while written. Tensors that share storage (tied weights) are stored once and restored
tied. Async saves first copy every tensor into reused staging buffers
(:class:`StagingBuffers`), then write from those. Load path: with a target, each file is
streamed through its xxh3-128 (bounded buffer) and checked against the manifest, then the
tensors are read straight into the target's own memory; without one, each file is read
once into new tensors and hashed as it is read, and nothing is returned unless it
matches. Nothing is ever unpickled.

torch is imported only when the state holds tensors (or a target asks for them).
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import json
import math
import os
import re
import struct
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import xxhash

from ckptguard._errors import (
    CheckpointError,
    CorruptCheckpoint,
    StateFormatError,
    TargetMismatch,
)
from ckptguard._format.layout import STATE_NAME
from ckptguard._format.safetensors import (
    DTYPE_SIZES,
    MAX_HEADER_BYTES,
    TensorInfo,
    build_header,
    parse_header,
)
from ckptguard._state.reuse import FROZEN_SUFFIX
from ckptguard._storage.base import Source
from ckptguard._storage.faults import fault_point
from ckptguard._storage.local import (
    PARALLEL_FSYNC_MIN,
    LocalSource,
    open_checkpoint_file,
)
from ckptguard._storage.retry import BackgroundFsyncs, call_fsync

if TYPE_CHECKING:
    from ckptguard._format.manifest import Manifest
    from ckptguard._state.reuse import Reuse
    from ckptguard._storage.base import FileDigest, Storage

__all__ = [
    "EncodedState",
    "StagingBuffers",
    "StateFormatError",
    "TargetMismatch",
    "encode_state",
    "load_legacy_pt",
    "read_state",
    "write_encoded",
    "write_state",
]

STATE_FORMAT = "ckptguard-state"
STATE_VERSION = 1
MAX_STATE_JSON = 64 * 1024 * 1024  # the tree only (tensors live elsewhere): generous
_FILE_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,100}")

_PT = {"format": "pt"}  # the metadata every file written here has (what transformers expects)
_TORCH_TO_ST = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8",
    "bool": "BOOL", "uint16": "U16", "uint32": "U32", "uint64": "U64",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2", "complex64": "C64",
}  # fmt: skip
_ST_TO_TORCH = {v: k for k, v in _TORCH_TO_ST.items()}
_NUMPY_TO_ST = {
    "float64": "F64", "float32": "F32", "float16": "F16", "int64": "I64", "int32": "I32",
    "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL", "uint16": "U16",
    "uint32": "U32", "uint64": "U64", "complex64": "C64",
}  # fmt: skip
_ST_TO_NUMPY = {v: k for k, v in _NUMPY_TO_ST.items()}


_MAX_INT_BITS = 13_000  # about 4,000 decimal digits: Python's int <-> str limit is 4,300


def _float_json(value: float) -> Any:
    return value if math.isfinite(value) else {"__float__": repr(value)}


def _torch() -> Any:
    import torch  # noqa: PLC0415 - torch is optional: imported only when tensors are involved

    return torch


def _is_tensor(value: object) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def _is_ndarray(value: object) -> bool:
    np = sys.modules.get("numpy")
    return np is not None and isinstance(value, np.ndarray)


def _is_np_scalar(value: object) -> bool:
    np = sys.modules.get("numpy")
    return np is not None and isinstance(value, np.generic)


def _is_stateful(value: object) -> bool:
    return (
        not _is_tensor(value)
        and callable(getattr(value, "state_dict", None))
        and callable(getattr(value, "load_state_dict", None))
    )


# -- writing -------------------------------------------------------------------------------
@dataclass
class _Pending:
    name: str
    dtype: str
    shape: tuple[int, ...]
    source: Any  # tensor, ndarray, or the bytes themselves (a memoryview)
    offset: int = -1  # where a snapshot put it in its staging block


@dataclass
class _Group:
    file: str
    tensors: list[_Pending] = field(default_factory=list)
    names: set[str] = field(default_factory=set)


class _Encoder:
    def __init__(self, *, split_frozen: bool = False) -> None:
        self.split_frozen = split_frozen
        self.groups: dict[str, _Group] = {}
        self.seen: dict[tuple[Any, ...], dict[str, Any]] = {}
        self._shared: _Group | None = None

    def _name(self, group: _Group, path: list[str]) -> str:
        base = "/".join(path) or "tensor"
        name, n = base, 1
        while name in group.names:
            name, n = f"{base}#{n}", n + 1
        group.names.add(name)
        return name

    def _tensor(self, value: Any, group: _Group, path: list[str], where: str) -> dict[str, Any]:
        torch = _torch()
        t = value.detach()
        if t.is_sparse or t.layout != torch.strided:
            raise StateFormatError(f"{where}: sparse tensors are not supported; store .to_dense()")
        dtype = _TORCH_TO_ST.get(str(t.dtype).removeprefix("torch."))
        if dtype is None:
            raise StateFormatError(f"{where}: dtype {t.dtype} cannot be stored in safetensors")
        # Tied weights: the same storage, offset, shape and strides are one tensor.
        key = (
            "t", t.device.type, t.untyped_storage().data_ptr(), t.storage_offset(),
            tuple(t.shape), tuple(t.stride()), t.dtype, t.is_conj(), t.is_neg(),
        )  # fmt: skip
        if t.numel() > 0 and key in self.seen:
            return self.seen[key]
        name = self._name(group, path)
        group.tensors.append(_Pending(name, dtype, tuple(t.shape), t))
        ref = {"__tensor__": {"file": group.file, "name": name}}
        if t.numel() > 0:
            self.seen[key] = ref
        return ref

    def _ndarray(self, value: Any, group: _Group, path: list[str], where: str) -> dict[str, Any]:
        dtype = _NUMPY_TO_ST.get(str(value.dtype))
        if dtype is None:
            raise StateFormatError(f"{where}: numpy dtype {value.dtype} is not supported")
        name = self._name(group, path)
        group.tensors.append(_Pending(name, dtype, tuple(value.shape), value))
        return {"__ndarray__": {"file": group.file, "name": name}}

    def _np_scalar(self, value: Any, where: str) -> dict[str, Any]:
        dtype = str(value.dtype)
        if dtype not in _NUMPY_TO_ST:
            raise StateFormatError(f"{where}: numpy scalar of dtype {dtype} is not supported")
        item = value.item()
        if isinstance(item, complex):
            encoded: Any = [_float_json(item.real), _float_json(item.imag)]
        elif isinstance(item, float):
            encoded = _float_json(item)
        else:
            encoded = item
        return {"__npscalar__": {"dtype": dtype, "value": encoded}}

    def _module(self, module: Any, group: _Group, path: list[str], where: str) -> Any:
        """A module's state_dict, its frozen parameters in a file of their own.

        Parameters with ``requires_grad=False`` (a frozen backbone or embedding, a
        reference model) go to ``<file>.frozen.safetensors``: that file stays the same
        from save to save, so an incremental save links it instead of writing it again
        (see ``_state/reuse.py``). Everything else stays in the group's file.
        """
        frozen = {n for n, p in module.named_parameters() if not p.requires_grad}
        state = module.state_dict()
        if not frozen or not all(isinstance(k, str) and not k.startswith("__") for k in state):
            return self.encode(state, group, path, where)
        cold = self.frozen_group_for(group)
        return {
            key: self.encode(
                value, cold if key in frozen else group, [*path, key], f"{where}[{key!r}]"
            )
            for key, value in state.items()
        }

    def frozen_group_for(self, group: _Group) -> _Group:
        file = group.file.removesuffix(".safetensors") + ".frozen.safetensors"
        return self.groups.setdefault(file, _Group(file))

    def encode(self, value: Any, group: _Group, path: list[str], where: str) -> Any:
        if _is_stateful(value):
            torch = sys.modules.get("torch")
            if self.split_frozen and torch is not None and isinstance(value, torch.nn.Module):
                return self._module(value, group, path, where)
            value = value.state_dict()
        if _is_np_scalar(value):  # before float: np.float64 subclasses float
            return self._np_scalar(value, where)
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, int):
            if value.bit_length() > _MAX_INT_BITS:
                raise StateFormatError(f"{where}: an int of {value.bit_length()} bits is too big")
            return int(value)
        if isinstance(value, float):
            return _float_json(float(value))
        if isinstance(value, (bytes, bytearray)):
            return {"__bytes__": base64.b64encode(bytes(value)).decode("ascii")}
        if _is_tensor(value):
            return self._tensor(value, group, path, where)
        if _is_ndarray(value):
            return self._ndarray(value, group, path, where)
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(value, torch.dtype):
            return {"__torch_dtype__": str(value).removeprefix("torch.")}
        if isinstance(value, Mapping):
            items = [
                (k, self.encode(v, group, [*path, str(k)], f"{where}[{k!r}]"))
                for k, v in value.items()
            ]
            if all(isinstance(k, str) and not k.startswith("__") for k, _ in items):
                return dict(items)
            return {"__dict__": [[self.encode(k, group, path, where), v] for k, v in items]}
        if isinstance(value, (list, tuple)):
            encoded = [
                self.encode(v, group, [*path, str(i)], f"{where}[{i}]") for i, v in enumerate(value)
            ]
            return {"__tuple__": encoded} if isinstance(value, tuple) else encoded
        raise StateFormatError(
            f"{where} is a {type(value).__name__}; ckptguard stores tensors, numpy arrays, "
            "numbers, str, bytes, None, dtypes and dicts/lists/tuples of them (no pickle). "
            "Convert it, or save it with its own state_dict()"
        )

    def shared_group(self) -> _Group:
        if self._shared is None:
            self._shared = self.group_for("tensors")
        return self._shared

    def group_for(self, key: str | None) -> _Group:
        file = f"{key}.safetensors" if key and _FILE_KEY.fullmatch(key) else None
        if file is None or file in self.groups:
            file = f"tensors-{len(self.groups)}.safetensors"
        return self.groups.setdefault(file, _Group(file))


def _tensor_bytes(source: Any) -> memoryview:
    if isinstance(source, memoryview):
        return source
    if _is_ndarray(source):
        np = sys.modules["numpy"]
        return memoryview(np.ascontiguousarray(source)).cast("B")
    torch = _torch()
    t = source.resolve_conj().resolve_neg()
    if t.device.type != "cpu":
        t = t.cpu()
    if not t.is_contiguous():
        t = t.contiguous()  # a copy of this one tensor, never of the whole state
    raw = t.reshape(-1).view(torch.uint8)
    return memoryview(raw.numpy()).cast("B")


@dataclass
class EncodedState:
    """A state turned into its JSON tree and the tensors of each file, not yet written."""

    tree: Any
    groups: list[_Group]
    # A snapshot's staging block, and what writes its tensor files instead of this thread
    # (the writer process: ``procwriter.WriterProcess.write``).
    block: Any = None
    writer: Callable[[str, EncodedState], dict[str, FileDigest]] | None = None
    # Async incremental saves: frozen files a committed checkpoint holds, by file: their
    # digest (hashed when the save started) and the live tensors, not copied (see
    # ``prelink_frozen``).
    prelinked: dict[str, tuple[FileDigest, _Group]] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(p) for g in self.groups for p in g.tensors)


def _nbytes(pending: _Pending) -> int:
    return math.prod(pending.shape) * DTYPE_SIZES[pending.dtype]


def encode_state(state: Any, *, split_frozen: bool = False) -> EncodedState:
    """The tree of ``state`` (``state_dict()`` called where needed), tensors by reference.

    ``split_frozen``: a module's frozen parameters go to a file of their own (for
    incremental saves, see ``_Encoder._module``).
    """
    encoder = _Encoder(split_frozen=split_frozen)
    if isinstance(state, Mapping) and not _is_stateful(state):
        tree: Any = {}
        plain = all(isinstance(k, str) and not k.startswith("__") for k in state)
        encoded_items = []
        for key, value in state.items():
            # A container (a model's state_dict, an optimizer) gets <key>.safetensors; tensors
            # directly at the top level (a flat state_dict) share tensors.safetensors.
            leaf = _is_tensor(value) or _is_ndarray(value)
            group = (
                encoder.shared_group()
                if leaf
                else encoder.group_for(key if isinstance(key, str) else None)
            )
            encoded_items.append((key, encoder.encode(value, group, [], f"state[{key!r}]")))
        if plain:
            tree = dict(encoded_items)
        else:
            tree = {
                "__dict__": [
                    [encoder.encode(k, encoder.group_for(None), [], "state"), v]
                    for k, v in encoded_items
                ]
            }
    else:
        tree = encoder.encode(state, encoder.group_for("tensors"), [], "state")
    return EncodedState(tree, [g for g in encoder.groups.values() if g.tensors])


def write_encoded(
    directory: str, encoded: EncodedState, storage: Storage, *, reuse: Reuse | None = None
) -> dict[str, FileDigest]:
    """Write an encoded state into ``directory``; returns the digests of the files written.

    With ``reuse`` (an incremental save, see ``reuse.py``), files likely unchanged are
    hashed from memory first and linked to an equal committed file where one exists.
    """
    digests: dict[str, FileDigest] = {}
    for file, (digest, live) in encoded.prelinked.items():
        if reuse is not None and reuse.link(file, digest, os.path.join(directory, file), storage):
            digests[file] = digest
            fault_point("reuse.linked")
        else:  # the source went away (or a full save is due): the live tensors, if unchanged
            digests[file] = _write_unchanged(directory, live, digest, storage)
    groups = encoded.groups
    if reuse is not None:
        groups = []
        for group in encoded.groups:
            if not reuse.likely_same(group.file):  # the cheap test first
                groups.append(group)
                continue
            header, infos = _layout(group)
            if reuse.worth_hashing(group.file, len(header) + sum(i.nbytes for i in infos)):
                digest = _digest_group(group, header, infos)
                if reuse.link(group.file, digest, os.path.join(directory, group.file), storage):
                    digests[group.file] = digest
                    fault_point("reuse.linked")
                    continue
            groups.append(group)
    if encoded.writer is not None:
        written = encoded.writer(directory, dataclasses.replace(encoded, groups=groups))
    else:
        written = write_tensor_files(directory, groups, storage)
    if reuse is not None:
        reuse.written(written)
    digests.update(written)
    doc = {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "files": sorted(digests),
        "tree": encoded.tree,
    }
    data = json.dumps(doc, ensure_ascii=False, allow_nan=False).encode("utf-8")
    digests[STATE_NAME] = storage.write_bytes(os.path.join(directory, STATE_NAME), data)
    return digests


def prelink_frozen(encoded: EncodedState, reuse: Reuse | None) -> EncodedState:
    """Async incremental saves: the frozen files a committed checkpoint holds, not copied.

    On the training thread, before the snapshot: each frozen-parameter file that was
    unchanged at the previous save (frozen parameters updated in place, such as an EMA
    teacher, are not: they are not hashed here) is hashed from memory; one that equals a
    committed file is left out of the snapshot (no host copy) and kept as ``prelinked``,
    to be linked by the background write. Hashing costs about what the copy would; the
    staging buffers shrink by the frozen part. A frozen file that cannot be linked then
    is written from the live tensors, and only if they still hash the same
    (``_write_unchanged``).
    """
    if reuse is None:
        return encoded
    groups, prelinked = [], dict(encoded.prelinked)
    for group in encoded.groups:
        if group.file.endswith(FROZEN_SUFFIX) and group.file in reuse.expect_same:
            header, infos = _layout(group)
            if reuse.may_match(len(header) + sum(i.nbytes for i in infos)):
                digest = _digest_group(group, header, infos)
                if (digest.size, digest.checksum) in reuse.sources:
                    prelinked[group.file] = (digest, group)
                    continue
        groups.append(group)
    return dataclasses.replace(encoded, groups=groups, prelinked=prelinked)


def _write_unchanged(
    directory: str, group: _Group, digest: FileDigest, storage: Storage
) -> FileDigest:
    """Write a prelinked group from its live tensors; the save fails if they changed."""
    written = write_tensor_files(directory, [group], storage)[group.file]
    if written != digest:
        storage.remove_file(os.path.join(directory, group.file))
        raise CheckpointError(
            f"{group.file}: frozen parameters changed while the async save was in flight "
            "(they were not copied: a committed checkpoint held them, then it was gone); "
            "this save is abandoned",
            hint="save again (the next save copies them); parameters that change should "
            "require grad, or be saved with blocking=True",
        )
    return written


def _layout(
    group: _Group, metadata: Mapping[str, str] | None = _PT
) -> tuple[bytes, list[TensorInfo]]:
    """The group's safetensors header and tensor layout (as ``_write_group`` writes it)."""
    return build_header(((p.name, p.dtype, p.shape) for p in group.tensors), metadata)


def safetensors_digest(
    tensors: Mapping[str, Any],
    metadata: Mapping[str, str] | None = None,
    *,
    if_size: Callable[[int], bool] | None = None,
) -> FileDigest | None:
    """The digest of what ``safetensors.torch.save_file`` writes, without writing it.

    Hashed from memory: the library's layout is the one ``_format/safetensors.py`` builds,
    byte for byte. None where a value is not a tensor safetensors stores,
    where ``metadata`` has more than one key (the library writes them in a hash map's
    order, which varies from call to call), or where ``if_size(file size)`` says it is
    not worth hashing.
    """
    if metadata is not None and len(metadata) > 1:
        return None
    torch = _torch()
    group = _Group("")
    for name, value in tensors.items():
        if not isinstance(name, str) or type(value) not in (torch.Tensor, torch.nn.Parameter):
            return None  # a subclass (DTensor, quantized) may not be what the library writes
        dtype = _TORCH_TO_ST.get(str(value.dtype).removeprefix("torch."))
        if dtype is None or value.is_sparse or value.layout != torch.strided:
            return None
        group.tensors.append(_Pending(name, dtype, tuple(value.shape), value.detach()))
    header, infos = _layout(group, metadata)
    if if_size is not None and not if_size(len(header) + sum(i.nbytes for i in infos)):
        return None
    return _digest_group(group, header, infos)


def _digest_group(group: _Group, header: bytes, infos: list[TensorInfo]) -> FileDigest:
    """The size and xxh3-128 the group's file would have, hashed from memory."""
    from ckptguard._storage.base import FileDigest  # noqa: PLC0415

    by_name = {p.name: p for p in group.tensors}
    hasher = xxhash.xxh3_128(header)
    size = len(header)
    for info in infos:
        if info.nbytes:
            data = _tensor_bytes(by_name[info.name].source)
            hasher.update(data)
            size += len(data)
    return FileDigest(size, hasher.hexdigest())


def write_tensor_files(
    directory: str, groups: list[_Group], storage: Storage
) -> dict[str, FileDigest]:
    """One fsynced safetensors file per group in ``directory``; their digests.

    A large file is fsynced by another thread as soon as it is written, while the next
    one is written: its writeback overlaps the next file's writes.
    """
    digests: dict[str, FileDigest] = {}
    with BackgroundFsyncs(storage, workers=2) as syncs:
        for group in groups:
            path = os.path.join(directory, group.file)
            digest = digests[group.file] = _write_group(path, group, storage)
            if digest.size >= PARALLEL_FSYNC_MIN:
                syncs.submit(path)
            else:  # small: inline (see PARALLEL_FSYNC_MIN)
                call_fsync(
                    functools.partial(storage.fsync_file, path), what="fsync file", path=path
                )
    return digests


def _write_group(path: str, group: _Group, storage: Storage) -> FileDigest:
    """One safetensors file (not fsynced yet); its digest, computed while written."""
    header, infos = _layout(group)
    by_name = {p.name: p for p in group.tensors}
    writer = storage.open_write(path, fsync=False)
    try:
        writer.write(header)
        for info in infos:
            if info.nbytes:
                writer.write(_tensor_bytes(by_name[info.name].source))
        return writer.close()
    except BaseException:
        writer.abort()
        raise


def write_state(directory: str, state: Any, storage: Storage) -> dict[str, FileDigest]:
    """Write ``state`` into ``directory``; returns the digests of the files written."""
    return write_encoded(directory, encode_state(state), storage)


_ALIGN = 64  # every tensor starts on a cache line of the staging buffer


def _copy_bytes(dst: Any, src: Any) -> bool:
    """Copy a plain CPU tensor's bytes into ``dst`` (a numpy uint8 view) with one memcpy.

    False, and nothing copied, for any other tensor (CUDA, non-contiguous, a conjugate or
    negative view, quantized): torch copies those. torch's ``copy_`` splits a large CPU
    copy over its OpenMP threads, and on 2 busy cores their spinning cost about 8 times
    the CPU of one memcpy (issue 18: the async save used 2.3x the sync save's CPU); numpy
    copies on this thread, without the GIL.
    """
    torch = _torch()
    plain = (
        src.device.type == "cpu"
        and src.layout == torch.strided
        and src.is_contiguous()
        and not src.is_conj()
        and not src.is_neg()
        and not src.is_quantized
    )
    if not plain:
        return False
    np = sys.modules["numpy"]
    np.copyto(dst, src.detach().reshape(-1).view(torch.uint8).numpy())
    return True


class StagingBuffers:
    """Host memory for async saves: one block, allocated once and reused by every save.

    :meth:`snapshot` copies each tensor of an encoded state into the block (pinned host
    memory when the state has CUDA tensors, so that the copies are DMA) and returns the
    same state with its tensors replaced by views of the block: the training thread may
    change its tensors as soon as it returns. The block grows only when a state needs more
    than it holds; a snapshot may be taken again only once the previous one is written.
    """

    def __init__(self, *, shared: bool = False) -> None:
        """``shared=True``: the block is memory a writer process maps (see ``procwriter``)."""
        self._block: Any = None  # torch uint8 tensor, or numpy uint8 array without torch
        self._pinned = False
        self._shared = shared
        self._shared_block: Any = None  # procwriter.SharedBlock
        self.allocations = 0

    @property
    def capacity(self) -> int:
        return 0 if self._block is None else int(self._block.shape[0])

    def release(self) -> None:
        """Free the block (the next snapshot allocates again)."""
        self._block = None
        if self._shared_block is not None:
            self._shared_block.close()
            self._shared_block = None

    def _ensure(self, nbytes: int, *, use_torch: bool, pinned: bool) -> Any:
        block = self._block
        fits = block is not None and int(block.shape[0]) >= nbytes
        pinned = pinned and not self._shared
        kind_ok = block is not None and (_is_tensor(block) == use_torch) and self._pinned >= pinned
        if fits and kind_ok:
            return block
        self.release()  # free the old block before allocating the new one
        if self._shared:
            # Not pinned: CUDA copies into it are synchronous (the writer process is for
            # CPU-bound Python loops; see docs/performance.md).
            from ckptguard._state.procwriter import SharedBlock  # noqa: PLC0415

            self._shared_block = SharedBlock(nbytes)
            array = self._shared_block.array()
            self._block = _torch().from_numpy(array) if use_torch else array
        elif use_torch:
            torch = _torch()
            self._block = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=pinned)
        else:
            np = sys.modules["numpy"]
            self._block = np.empty(max(nbytes, 1), dtype=np.uint8)
        self._pinned = pinned
        self.allocations += 1
        return self._block

    def snapshot(self, encoded: EncodedState) -> EncodedState:
        """``encoded`` with every tensor copied into the block (see the class docstring)."""
        pending = [p for g in encoded.groups for p in g.tensors]
        offsets, total = [], 0
        for p in pending:
            offsets.append(total)
            total += -(-_nbytes(p) // _ALIGN) * _ALIGN
        use_torch = any(_is_tensor(p.source) for p in pending)
        cuda = use_torch and any(
            p.source.device.type == "cuda" for p in pending if _is_tensor(p.source)
        )
        block = self._ensure(total, use_torch=use_torch, pinned=cuda)
        flat = block.numpy() if use_torch else block
        groups = []
        for group in encoded.groups:
            copied = _Group(group.file, names=set(group.names))
            for p in group.tensors:
                copied.tensors.append(_Pending(p.name, p.dtype, p.shape, None))
            groups.append(copied)
        copies = iter(t for g in groups for t in g.tensors)
        for p, off, dst in zip(pending, offsets, copies, strict=True):
            n = _nbytes(p)
            dst.offset = off
            if _is_tensor(p.source):
                view = block[off : off + n].view(p.source.dtype).view(p.shape)
                if not _copy_bytes(flat[off : off + n], p.source):
                    view.copy_(p.source.detach(), non_blocking=p.source.device.type == "cuda")
                dst.source = view
            else:
                np = sys.modules["numpy"]
                view = flat[off : off + n].view(p.source.dtype).reshape(p.shape)
                np.copyto(view, p.source)
                dst.source = view
        if cuda:  # every device copied from, not only the current one
            torch = _torch()
            for device in {p.source.device for p in pending if _is_tensor(p.source)}:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
        return EncodedState(
            encoded.tree, groups, block=self._shared_block, prelinked=dict(encoded.prelinked)
        )


# -- reading -------------------------------------------------------------------------------
def _corrupt(path: str, message: str) -> CorruptCheckpoint:
    return CorruptCheckpoint(f"{path}: {message}", path=path)


class _File:
    """One safetensors file of a checkpoint, open, its header parsed and validated.

    ``arrays`` holds each tensor's bytes once the file was read whole (restores without a
    target); otherwise the bytes are read later, straight into the target's tensors.
    """

    def __init__(
        self, path: str, source: Source, size: int, data_start: int, infos: list[TensorInfo]
    ) -> None:
        self.path, self.source, self.size, self.data_start = path, source, size, data_start
        self.tensors = {t.name: t for t in infos}
        self.arrays: dict[str, Any] | None = None

    def close(self) -> None:
        self.source.close()

    def read_into(self, info: TensorInfo, view: memoryview) -> None:
        """Read the bytes of tensor ``info`` into ``view`` (exactly its size)."""
        self.source.pread_into(view, self.data_start + info.begin)


Opener = Callable[[str], Source]


def local_opener(checkpoint: str) -> Opener:
    """Opens files of a local checkpoint, refusing symlinks at every path component."""

    def open_(rel: str) -> Source:
        return LocalSource(os.path.join(checkpoint, rel), open_checkpoint_file(checkpoint, rel))

    return open_


def _open_file(checkpoint: str, rel: str, manifest: Manifest, opener: Opener) -> _File:
    """Open a listed safetensors file and validate its header (its checksum not yet)."""
    entry = next((f for f in manifest.files if f.path == rel), None)
    path = os.path.join(checkpoint, rel)
    if entry is None:
        raise _corrupt(path, "referenced by state.json but not listed in the manifest")
    source = opener(rel)
    try:
        size = source.size
        if size != entry.size or size < 8:
            raise _corrupt(path, f"size {size}, manifest says {entry.size}")  # noqa: TRY301
        (length,) = struct.unpack("<Q", source.read_at_most(8))
        prefix = source.read_at_most(min(size, 8 + min(length, MAX_HEADER_BYTES)))
        data_start, infos, _ = parse_header(prefix, size, path)
    except BaseException:
        source.close()
        raise
    return _File(path, source, size, data_start, infos)


def _check_checksum(file: _File, checksum: str) -> None:
    """Stream the whole file through xxh3-128 (bounded memory) and compare."""
    if file.source.checksum() != checksum:
        raise _corrupt(file.path, "checksum mismatch (content altered)")


def _read_whole(file: _File, checksum: str) -> None:
    """Read every tensor into its own new buffer, hashing the file in order as it goes."""
    np = _numpy()
    hasher = xxhash.xxh3_128()
    hasher.update(file.source.read_at_most(file.data_start))
    arrays: dict[str, Any] = {}
    pos = file.data_start
    scratch = bytearray()
    for info in sorted(file.tensors.values(), key=lambda t: t.begin):
        begin = file.data_start + info.begin
        if begin > pos:  # bytes between tensors: hashed, not kept
            scratch[:] = bytes(begin - pos)
            file.source.pread_into(memoryview(scratch), pos)
            hasher.update(scratch)
        array = np.empty(info.nbytes, dtype=np.uint8)
        file.source.pread_into(memoryview(array), begin)
        hasher.update(array)
        arrays[info.name] = array
        pos = begin + info.nbytes
    if file.size > pos:
        hasher.update(file.source.read_at_most(file.size - pos, pos))
    if hasher.hexdigest() != checksum:
        raise _corrupt(file.path, "checksum mismatch (content altered)")
    file.arrays = arrays


class _Lazy:
    """A tensor or array of a verified file, not read yet: what a target restore decodes to.

    Its bytes go straight into the target's own tensor (:meth:`fill`), or, where the
    target has none to take them, into a new one (:meth:`materialize`).
    """

    def __init__(self, file: _File, info: TensorInfo, *, numpy: bool) -> None:
        self.file, self.info, self.numpy = file, info, numpy

    @property
    def shape(self) -> tuple[int, ...]:
        return self.info.shape

    @property
    def dtype(self) -> Any:
        if self.numpy:
            return _numpy().dtype(_ST_TO_NUMPY[self.info.dtype])
        return getattr(_torch(), _ST_TO_TORCH[self.info.dtype])

    def materialize(self) -> Any:
        np = _numpy()
        raw = np.empty(self.info.nbytes, dtype=np.uint8)
        self.file.read_into(self.info, memoryview(raw))
        if self.numpy:
            return raw.view(self.dtype).reshape(self.shape)
        return _as_tensor(raw, self.info)

    def fill(self, target: Any) -> None:
        """Read the bytes into ``target`` (same shape and dtype, checked before)."""
        if _is_ndarray(target):
            if target.flags.c_contiguous and target.flags.writeable and target.size:
                self.file.read_into(self.info, memoryview(target.reshape(-1).view("u1")))
            else:
                target[...] = self.materialize()
            return
        torch = _torch()
        with torch.no_grad():
            t = target.detach()
            direct = (
                t.device.type == "cpu" and t.is_contiguous() and not t.is_conj() and not t.is_neg()
            )
            if direct and t.numel():
                raw = t.reshape(-1).view(torch.uint8).numpy()
                self.file.read_into(self.info, memoryview(raw))
            elif t.numel():
                t.copy_(self.materialize())


def _as_tensor(raw: Any, info: TensorInfo) -> Any:
    """A tensor over the bytes of ``raw`` (a numpy uint8 array), shaped as ``info``."""
    torch = _torch()
    dtype = getattr(torch, _ST_TO_TORCH[info.dtype])
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=dtype)
    return torch.from_numpy(raw).view(dtype).reshape(info.shape)


def _numpy() -> Any:
    import numpy as np  # noqa: PLC0415 - only for states that hold tensors or arrays

    return np


def _read_state_json(checkpoint: str, manifest: Manifest, opener: Opener) -> Any:
    entry = next((f for f in manifest.files if f.path == STATE_NAME), None)
    path = os.path.join(checkpoint, STATE_NAME)
    if entry is None:
        raise _corrupt(checkpoint, f"no {STATE_NAME}: not a CheckpointManager checkpoint")
    if entry.size > MAX_STATE_JSON:
        raise _corrupt(path, f"{entry.size} bytes is over the cap of {MAX_STATE_JSON}")
    source = opener(STATE_NAME)
    try:
        data = source.read_at_most(entry.size + 1)
    finally:
        source.close()
    if len(data) != entry.size or xxhash.xxh3_128_hexdigest(data) != entry.checksum:
        raise _corrupt(path, "checksum mismatch (content altered)")
    try:
        doc = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise _corrupt(path, f"not valid JSON ({exc})") from None
    if (
        not isinstance(doc, dict)
        or doc.get("format") != STATE_FORMAT
        or doc.get("version") != STATE_VERSION
        or not isinstance(doc.get("files"), list)
    ):
        raise _corrupt(path, f"not a {STATE_FORMAT} v{STATE_VERSION} document")
    return doc


class _Decoder:
    """state.json's tree -> values; tensors from the files (read whole, or lazily)."""

    def __init__(self, files: dict[str, _File]) -> None:
        self.files = files
        self.cache: dict[tuple[str, str, bool], Any] = {}

    def _info(self, ref: Any, where: str) -> tuple[_File, TensorInfo]:
        if (
            not isinstance(ref, dict)
            or set(ref) != {"file", "name"}
            or not all(isinstance(v, str) for v in ref.values())
        ):
            raise CorruptCheckpoint(f"state.json: bad tensor reference at {where}")
        loaded = self.files.get(ref["file"])
        info = loaded.tensors.get(ref["name"]) if loaded else None
        if loaded is None or info is None:
            raise CorruptCheckpoint(f"state.json: {where} refers to a missing tensor {ref}")
        return loaded, info

    def _value(self, ref: Any, where: str, *, numpy: bool) -> Any:
        file, info = self._info(ref, where)
        key = (ref["file"], ref["name"], numpy)
        if key in self.cache:
            return self.cache[key]  # tied weights come back tied
        if numpy and info.dtype not in _ST_TO_NUMPY:
            raise CorruptCheckpoint(f"state.json: {where}: dtype {info.dtype} is not numpy's")
        if file.arrays is None:
            value: Any = _Lazy(file, info, numpy=numpy)
        else:
            raw = file.arrays[info.name]
            if numpy:
                value = raw.view(_ST_TO_NUMPY[info.dtype]).reshape(info.shape)
            else:
                value = _as_tensor(raw, info)
        self.cache[key] = value
        return value

    def tensor(self, ref: Any, where: str) -> Any:
        return self._value(ref, where, numpy=False)

    def ndarray(self, ref: Any, where: str) -> Any:
        return self._value(ref, where, numpy=True)

    def decode(self, value: Any, where: str) -> Any:
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, list):
            return [self.decode(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if not isinstance(value, dict):
            raise CorruptCheckpoint(f"state.json: unexpected {type(value).__name__} at {where}")
        tags = [k for k in value if k.startswith("__")]
        if not tags:
            return {k: self.decode(v, f"{where}[{k!r}]") for k, v in value.items()}
        if len(value) != 1:
            raise CorruptCheckpoint(f"state.json: malformed tagged value at {where}")
        tag, body = tags[0], value[tags[0]]
        return self._tagged(tag, body, where)

    def _np_scalar(self, body: dict[str, Any], where: str) -> Any:
        import numpy as np  # noqa: PLC0415 - only for states that hold numpy scalars

        dtype, raw = body["dtype"], body["value"]
        if not isinstance(dtype, str) or dtype not in _NUMPY_TO_ST:
            raise CorruptCheckpoint(f"state.json: numpy dtype {dtype!r} at {where}")
        kind = np.dtype(dtype).kind
        if kind == "c":
            if not isinstance(raw, list) or len(raw) != 2:
                raise CorruptCheckpoint(f"state.json: bad complex scalar at {where}")
            real, imag = (self.decode(v, where) for v in raw)
            value: Any = complex(real, imag)
        else:
            value = self.decode(raw, where)
        ok = {
            "b": isinstance(value, bool),
            "i": isinstance(value, int) and not isinstance(value, bool),
            "u": isinstance(value, int) and not isinstance(value, bool) and value >= 0,
            "f": isinstance(value, (int, float)) and not isinstance(value, bool),
            "c": isinstance(value, complex),
        }.get(kind, False)
        if not ok:
            raise CorruptCheckpoint(f"state.json: {value!r} is not a {dtype} at {where}")
        try:
            return np.array(value, dtype=dtype)[()]
        except (OverflowError, ValueError, TypeError):
            raise CorruptCheckpoint(
                f"state.json: {value!r} does not fit {dtype} at {where}"
            ) from None

    def _tagged(self, tag: str, body: Any, where: str) -> Any:
        if tag == "__tensor__":
            return self.tensor(body, where)
        if tag == "__ndarray__":
            return self.ndarray(body, where)
        if tag == "__tuple__" and isinstance(body, list):
            return tuple(self.decode(v, f"{where}[{i}]") for i, v in enumerate(body))
        if tag == "__dict__" and isinstance(body, list):
            out = {}
            for pair in body:
                if not isinstance(pair, list) or len(pair) != 2:
                    raise CorruptCheckpoint(f"state.json: malformed dict item at {where}")
                key = self.decode(pair[0], where)
                try:
                    out[key] = self.decode(pair[1], f"{where}[{key!r}]")
                except TypeError:
                    raise CorruptCheckpoint(f"state.json: unhashable key at {where}") from None
            return out
        if tag == "__float__" and isinstance(body, str) and body in {"nan", "inf", "-inf"}:
            return float(body)
        if tag == "__bytes__" and isinstance(body, str):
            try:
                return base64.b64decode(body, validate=True)
            except ValueError:
                raise CorruptCheckpoint(f"state.json: bad base64 at {where}") from None
        if tag == "__npscalar__" and isinstance(body, dict) and set(body) == {"dtype", "value"}:
            return self._np_scalar(body, where)
        if tag == "__torch_dtype__" and isinstance(body, str) and body in _TORCH_TO_ST:
            return getattr(_torch(), body)
        raise CorruptCheckpoint(f"state.json: unknown or malformed tag {tag!r} at {where}")


def _check_stateful(target: Any, loaded: Any, where: str) -> None:
    """Pre-check what ``load_state_dict`` would do, so a mismatch changes nothing."""
    torch = sys.modules.get("torch")
    current = target.state_dict()
    if torch is not None and isinstance(target, torch.nn.Module):
        if not isinstance(loaded, dict):
            raise TargetMismatch(f"{where}: the checkpoint holds a {type(loaded).__name__}")
        extra = [k for k in loaded if k not in current]
        if extra:
            raise TargetMismatch(f"{where}: the checkpoint has keys the model lacks: {extra[:5]}")
        _check_target(dict(current), loaded, where)
    elif torch is not None and isinstance(target, torch.optim.Optimizer):
        groups = loaded.get("param_groups") if isinstance(loaded, dict) else None
        ours = current["param_groups"]
        if not isinstance(groups, list) or [len(g.get("params", [])) for g in groups] != [
            len(g["params"]) for g in ours
        ]:
            raise TargetMismatch(f"{where}: the optimizer's parameter groups differ")


def _check_target(target: Any, loaded: Any, where: str) -> None:
    """Raise :class:`TargetMismatch` before anything is copied into ``target``."""
    if _is_stateful(target):
        _check_stateful(target, loaded, where)
    elif _is_tensor(target):
        if not _is_tensor(loaded) and not (isinstance(loaded, _Lazy) and not loaded.numpy):
            raise TargetMismatch(f"{where}: the checkpoint holds a {type(loaded).__name__}")
        if tuple(target.shape) != tuple(loaded.shape) or target.dtype != loaded.dtype:
            raise TargetMismatch(
                f"{where}: checkpoint tensor is {tuple(loaded.shape)} {loaded.dtype}, "
                f"target is {tuple(target.shape)} {target.dtype}"
            )
    elif _is_ndarray(target):
        array = _is_ndarray(loaded) or (isinstance(loaded, _Lazy) and loaded.numpy)
        if not array or target.shape != loaded.shape or target.dtype != loaded.dtype:
            raise TargetMismatch(f"{where}: shape or dtype differs from the target's")
    elif isinstance(target, Mapping):
        if not isinstance(loaded, dict):
            raise TargetMismatch(f"{where}: the checkpoint holds a {type(loaded).__name__}")
        missing = [k for k in target if k not in loaded]
        if missing:
            raise TargetMismatch(f"{where}: the checkpoint has no {missing[:5]}")
        for key, sub in target.items():
            _check_target(sub, loaded[key], f"{where}[{key!r}]")
    elif isinstance(target, (list, tuple)):
        if not isinstance(loaded, (list, tuple)) or len(target) != len(loaded):
            raise TargetMismatch(f"{where}: the checkpoint's sequence differs from the target's")
        for i, (t, v) in enumerate(zip(target, loaded, strict=True)):
            _check_target(t, v, f"{where}[{i}]")


def _apply(target: Any, loaded: Any, where: str) -> Any:
    """Load ``loaded`` into ``target`` in place; :func:`_check_target` has vetted the pair."""
    if _is_stateful(target):
        if _fill_module(target, loaded):
            return target
        try:
            target.load_state_dict(_materialize(loaded))
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            raise TargetMismatch(f"{where}: load_state_dict refused the checkpoint: {exc}") from exc
        return target
    if _is_tensor(target):
        if isinstance(loaded, _Lazy):
            loaded.fill(target)
        else:
            with _torch().no_grad():
                target.copy_(loaded)
        return target
    if _is_ndarray(target):
        if isinstance(loaded, _Lazy):
            loaded.fill(target)
        else:
            target[...] = loaded
        return target
    if isinstance(target, Mapping):
        for key, sub in target.items():
            loaded[key] = _apply(sub, loaded[key], f"{where}[{key!r}]")
        return loaded
    if isinstance(target, (list, tuple)):
        merged = [
            _apply(t, v, f"{where}[{i}]")
            for i, (t, v) in enumerate(zip(target, loaded, strict=True))
        ]
        return tuple(merged) if isinstance(loaded, tuple) else merged
    return loaded


def _plain_loading(module: Any) -> bool:
    """Whether ``load_state_dict`` on ``module`` only copies each tensor into its own.

    True for modules without load hooks whose classes keep ``Module``'s loading (or the
    norm layers', which only migrate old versions' keys).
    """
    torch = _torch()
    from torch.nn.modules.batchnorm import _NormBase  # noqa: PLC0415 - with torch

    base = torch.nn.Module._load_from_state_dict  # noqa: SLF001 - compared, not called
    norm = _NormBase._load_from_state_dict  # noqa: SLF001 - only migrates old versions' keys
    hooks = (
        "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks", "_state_dict_hooks",
        "_state_dict_pre_hooks",
    )  # fmt: skip
    for m in module.modules():
        if any(getattr(m, h, None) for h in hooks):
            return False
        if type(m)._load_from_state_dict not in {base, norm}:  # noqa: SLF001
            return False
    return bool(
        type(module).load_state_dict is torch.nn.Module.load_state_dict
        and type(module).state_dict is torch.nn.Module.state_dict
    )


def _fill_module(target: Any, loaded: Any) -> bool:
    """Load a module's state by reading each tensor into the module's own (no copy held).

    Only where that is exactly what ``load_state_dict`` would do: a plain module, the same
    keys, tensors of the same shapes and dtypes. False: nothing was done.
    """
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(target, torch.nn.Module) or not isinstance(loaded, dict):
        return False
    if not _plain_loading(target):
        return False
    current = target.state_dict(keep_vars=True)
    if set(current) != set(loaded):
        return False
    # Each entry must be the module's own parameter or buffer, not a copy made for saving.
    own = {
        **dict(target.named_parameters(remove_duplicate=False)),
        **dict(target.named_buffers(remove_duplicate=False)),
    }
    if any(own.get(key) is not tensor for key, tensor in current.items()):
        return False
    for key, tensor in current.items():
        value = loaded[key]
        if not isinstance(value, _Lazy) or value.numpy or not _is_tensor(tensor):
            return False
        if tuple(tensor.shape) != value.shape or tensor.dtype != value.dtype:
            return False
    for key, tensor in current.items():
        loaded[key].fill(tensor)
    return True


def _materialize(value: Any) -> Any:
    """``value`` with every lazy tensor read into a tensor of its own."""
    if isinstance(value, _Lazy):
        return value.materialize()
    if isinstance(value, dict):
        return {k: _materialize(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_materialize(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_materialize(v) for v in value)
    return value


def read_state(
    checkpoint: str, manifest: Manifest, *, target: Any = None, opener: Opener | None = None
) -> Any:
    """Load the state saved in ``checkpoint``, every byte checked against ``manifest``.

    Every file is verified before any value is used, so a corrupt checkpoint raises
    :class:`CorruptCheckpoint` without touching ``target``. Without a target each file
    is read once, into new tensors, hashed as it is read. With one, each file is first
    streamed through its checksum (a bounded buffer), then its tensors are read straight
    into the target's own (a copy of the state is never held).
    """
    opener = opener or local_opener(checkpoint)
    doc = _read_state_json(checkpoint, manifest, opener)
    checksums = {f.path: f.checksum for f in manifest.files}
    files: dict[str, _File] = {}
    try:
        for rel in doc["files"]:
            if not isinstance(rel, str) or rel in files:
                raise _corrupt(checkpoint, "state.json lists a bad or duplicate file")
            file = files[rel] = _open_file(checkpoint, rel, manifest, opener)
            if target is None:
                _read_whole(file, checksums[rel])
            else:
                _check_checksum(file, checksums[rel])
        decoder = _Decoder(files)
        try:
            tree = decoder.decode(doc.get("tree"), "state")
        except RecursionError:
            raise _corrupt(checkpoint, "state.json is nested too deeply") from None
        except (TypeError, ValueError, OverflowError, KeyError) as exc:
            if isinstance(exc, CorruptCheckpoint):
                raise
            raise _corrupt(
                checkpoint, f"state.json is malformed ({type(exc).__name__}: {exc})"
            ) from None
        if target is None:
            return tree
        _check_target(target, tree, "state")  # every shape and key first: all or nothing
        return _materialize(_apply(target, tree, "state"))
    finally:
        for file in files.values():
            file.close()


def iter_tensor_infos(
    checkpoint: str, manifest: Manifest, opener: Opener | None = None
) -> Iterator[tuple[str, TensorInfo]]:
    """(file, tensor info) for every tensor of a checkpoint, headers validated (for inspect).

    ``manifest`` lists the files relative to what ``opener`` opens (default: a local dir).
    """
    opener = opener or local_opener(checkpoint)
    for entry in manifest.files:
        if not entry.path.endswith(".safetensors"):
            continue
        source = opener(entry.path)
        try:
            size = source.size
            prefix = source.read_at_most(min(size, 8 + (100 << 20)))
        finally:
            source.close()
        _, infos, _ = parse_header(prefix, size, f"{checkpoint}/{entry.path}")
        for info in infos:
            yield entry.path, info


def load_legacy_pt(path: str | os.PathLike[str]) -> Any:
    """Read a legacy ``torch.save`` file (``.pt``/``.bin``): an explicit, opt-in call.

    ckptguard never reads pickle files on its own. This reads one with
    ``torch.load(weights_only=True)``, which refuses any object but tensors, primitive
    containers and a few allow-listed types, so no code from the file is executed. A file
    that needs more than that raises :class:`CorruptCheckpoint`; convert it in a trusted
    environment instead.
    """
    torch = _torch()
    path = os.fspath(path)
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, ... by file
        raise CorruptCheckpoint(
            f"{path}: refused by torch.load(weights_only=True): {type(exc).__name__}",
            path=path,
            hint="it holds objects beyond tensors and plain containers; if you trust its "
            "origin, load it elsewhere and save the state again with ckptguard",
        ) from exc
