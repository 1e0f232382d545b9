"""The safetensors file format: a writer that streams tensor memory, and a strict reader.

Layout (https://github.com/huggingface/safetensors): an 8-byte little-endian header
length N, N bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]},
"__metadata__": {str: str}}`` padded with spaces to a multiple of 8, then the data.
Files written here load with the reference ``safetensors`` library.

The reader trusts nothing: the header size is capped, the JSON must be strict (no
duplicate keys), every dtype known, every shape a short list of non-negative ints,
``end - begin == prod(shape) * itemsize`` exactly (Python ints: no overflow), offsets in
bounds and no two tensors overlapping. Any defect raises :class:`CorruptCheckpoint`.

This module does not import torch; it deals in raw buffers.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ckptguard._errors import CorruptCheckpoint
from ckptguard._format.manifest import no_duplicate_keys, too_dense

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

__all__ = [
    "DTYPE_SIZES",
    "MAX_HEADER_BYTES",
    "TensorInfo",
    "build_header",
    "parse_header",
]

if sys.byteorder != "little":  # pragma: no cover - every platform torch supports today
    raise ImportError("ckptguard's safetensors writer assumes a little-endian machine")

MAX_HEADER_BYTES = 100 * 1024 * 1024
# A tensor's entry ({"dtype":..,"shape":[..],"data_offsets":[..]}) takes 15 bytes or more
# per array or object; a header far denser than that is refused unparsed (manifest.py).
HEADER_BYTES_PER_CONTAINER = 12
MAX_DIMS = 64
# Even an empty tensor (a 0 in its shape) may not claim more: torch cannot allocate it.
MAX_TENSOR_BYTES = 1 << 50
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}  # fmt: skip
# The order the safetensors library lays tensors out in: by dtype, in this order, then by
# name. Each starts aligned to its item size, and a file written here is byte for byte
# the file ``safetensors.torch.save_file`` writes for the same tensors and metadata (so
# its digest can be known before either writes it: see ``_state/reuse.py``).
_DTYPE_ORDER = {
    dtype: rank
    for rank, dtype in enumerate(
        ("U64", "I64", "F64", "C64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16",
         "F8_E4M3", "F8_E5M2", "I8", "U8", "BOOL")
    )
}  # fmt: skip


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file; offsets are relative to the start of the data."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def build_header(
    tensors: Iterable[tuple[str, str, tuple[int, ...]]], metadata: Mapping[str, str] | None = None
) -> tuple[bytes, list[TensorInfo]]:
    """The header bytes (length prefix included) and the layout for (name, dtype, shape).

    Tensors are laid out as the safetensors library lays them out (``_DTYPE_ORDER``): by
    descending item size, so each one starts aligned to its item size (the data section
    starts at a multiple of 8); that keeps zero-copy views valid.
    """
    items = sorted(tensors, key=lambda t: (_DTYPE_ORDER[t[1]], t[0]))
    infos: list[TensorInfo] = []
    offset = 0
    body: dict[str, Any] = {}
    if metadata is not None:  # {} too, as the library writes it
        body["__metadata__"] = dict(metadata)
    for name, dtype, shape in items:
        nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
        infos.append(TensorInfo(name, dtype, tuple(shape), offset, offset + nbytes))
        body[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw, infos


def _bad(path: str, message: str) -> CorruptCheckpoint:
    return CorruptCheckpoint(f"invalid safetensors file {path}: {message}", path=path)


def parse_header(
    prefix: bytes | memoryview, file_size: int, path: str
) -> tuple[int, list[TensorInfo], dict[str, str]]:
    """Validate a header; returns (data start, tensors sorted by offset, metadata).

    ``prefix`` holds at least the first ``8 + N`` bytes of the file (or all of it).
    """
    if file_size < 8 or len(prefix) < 8:
        raise _bad(path, f"file of {file_size} bytes is too short for a header")
    (length,) = struct.unpack("<Q", bytes(prefix[:8]))
    if length > MAX_HEADER_BYTES:
        raise _bad(path, f"header of {length} bytes exceeds the cap of {MAX_HEADER_BYTES}")
    if 8 + length > file_size or len(prefix) < 8 + length:
        raise _bad(path, f"header of {length} bytes runs past the end of the file")
    header = bytes(prefix[8 : 8 + length])
    if (dense := too_dense(header, HEADER_BYTES_PER_CONTAINER)) is not None:
        raise _bad(path, f"header: {dense}")
    try:
        obj = json.loads(
            header.decode("utf-8"),
            object_pairs_hook=no_duplicate_keys,
            parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)),
        )
    except (ValueError, RecursionError) as exc:
        raise _bad(path, f"header is not strict UTF-8 JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise _bad(path, "header is not a JSON object")
    data_start = 8 + length
    data_len = file_size - data_start
    metadata = obj.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _bad(path, "__metadata__ must map strings to strings")
    infos: list[TensorInfo] = []
    for name, entry in obj.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise _bad(path, f"tensor {name!r}: entry must have dtype, shape, data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise _bad(path, f"tensor {name!r}: unknown dtype {dtype!r}")
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_DIMS
            or not all(type(d) is int and d >= 0 for d in shape)
        ):
            raise _bad(path, f"tensor {name!r}: shape must be a list of non-negative ints")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int for o in offsets)
        ):
            raise _bad(path, f"tensor {name!r}: data_offsets must be two ints")
        begin, end = offsets
        if not 0 <= begin <= end <= data_len:
            raise _bad(path, f"tensor {name!r}: offsets {offsets} outside the data ({data_len} B)")
        if math.prod(d for d in shape if d) * DTYPE_SIZES[dtype] > MAX_TENSOR_BYTES:
            raise _bad(path, f"tensor {name!r}: shape {shape} is absurd")
        expected = math.prod(shape) * DTYPE_SIZES[dtype]  # exact: Python ints do not overflow
        if end - begin != expected:
            raise _bad(
                path, f"tensor {name!r}: {end - begin} bytes for shape {shape} {dtype} ({expected})"
            )
        infos.append(TensorInfo(name, dtype, tuple(shape), begin, end))
    infos.sort(key=lambda t: (t.begin, t.end))
    previous_end = 0
    for info in infos:
        if info.begin < previous_end:
            raise _bad(path, f"tensor {info.name!r} overlaps the tensor before it")
        previous_end = max(previous_end, info.end)
    return data_start, infos, metadata
