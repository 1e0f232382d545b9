"""The manifest: the record of a committed checkpoint, and its strict parser.

``ckptguard.json`` is versioned JSON holding every file's relative path, size and
xxh3-128 checksum, the step, metrics, user metadata, the writer, library versions and
the creation time, plus an xxh3-128 of the manifest itself so that a flipped bit in a
metric or in metadata is caught too.

Parsing trusts nothing: a manifest is rejected with :class:`UnsafeManifest` when it is
too large, not UTF-8 JSON, has duplicate keys, NaN/Infinity, unknown or missing fields,
an unknown schema version, a bad self-checksum, or any file entry that is absolute,
contains ``..``, ``.``, empty components, backslashes, NUL or control characters,
names a reserved file, duplicates another entry, is both a file and a directory, or
claims an absurd size.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import math
import platform
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import metadata as _metadata
from typing import Any

import xxhash

from ckptguard._errors import UnsafeManifest
from ckptguard._format.layout import RESERVED_NAMES, is_save_id, validate_name
from ckptguard._format.owner import WriterInfo

__all__ = [
    "FORMAT",
    "MAX_FILES",
    "MAX_FILE_SIZE",
    "MAX_MANIFEST_BYTES",
    "SCHEMA_VERSION",
    "FileEntry",
    "Manifest",
    "library_versions",
    "run_of",
    "strict_json_document",
    "too_dense",
    "validate_relpath",
]

FORMAT = "ckptguard-manifest"
SCHEMA_VERSION = 1
MAX_MANIFEST_BYTES = 32 * 1024 * 1024  # ~200k files; parsing a hostile one costs ~25x in RAM
MAX_FILES = 1_000_000
MAX_FILE_SIZE = 1 << 50  # 1 PiB: larger is a corrupt or hostile manifest, not a tensor
MAX_PATH_LENGTH = 4096
MAX_COMPONENT_LENGTH = 255
CHECKSUM_ALGORITHM = "xxh3_128"
_HEX128 = re.compile(r"[0-9a-f]{32}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Distributions whose versions are recorded when installed (read from metadata; nothing imported).
_VERSIONED = (
    "ckptguard", "torch", "numpy", "safetensors", "transformers", "trl", "accelerate",
    "lightning", "deepspeed", "xxhash",
)  # fmt: skip

_TOP_KEYS = frozenset(
    {
        "format", "schema_version", "name", "save_id", "step", "created_at", "checksum",
        "files", "metrics", "metadata", "writer", "versions", "manifest_checksum",
    }
)  # fmt: skip
_FILE_KEYS = frozenset({"path", "size", "checksum"})
_WRITER_KEYS = frozenset(
    {"host", "pid", "pid_start", "boot_id", "pid_namespace", "ranks", "world_size", "extra"}
)


@cache
def library_versions() -> dict[str, str]:
    """Python, platform and installed versions of the libraries that matter for checkpoints.

    Looked up once per process (a lookup scans every installed distribution: ~10 ms,
    which every save paid).
    """
    return dict(_library_versions())


@functools.cache
def _library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in _VERSIONED:
        try:
            versions[dist] = _metadata.version(dist)
        except _metadata.PackageNotFoundError:
            continue
    return versions


def run_of(manifest: Manifest | None) -> str | None:
    """The training run a checkpoint belongs to (``metadata["ckptguard"]["run"]``).

    None for checkpoints written before run ids, and for ``atomic_checkpoint`` saves.
    """
    flags = manifest.metadata.get("ckptguard", {}) if manifest else {}
    run = flags.get("run") if isinstance(flags, dict) else None
    return run if isinstance(run, str) else None


def validate_relpath(path: object) -> str:
    """Return ``path`` if it is a safe relative POSIX path inside a checkpoint."""
    if not isinstance(path, str) or not path:
        raise UnsafeManifest(f"file path must be a non-empty string, got {path!r}")
    if len(path) > MAX_PATH_LENGTH:
        raise UnsafeManifest(f"file path longer than {MAX_PATH_LENGTH}: {path[:80]!r}...")
    if _CONTROL.search(path):
        raise UnsafeManifest(f"file path contains NUL or control characters: {path!r}")
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsafeManifest(f"file path is not valid UTF-8: {path!r}") from None
    if "\\" in path:
        raise UnsafeManifest(f"file path contains a backslash: {path!r}")
    if path.startswith("/") or re.match(r"[A-Za-z]:", path):
        raise UnsafeManifest(f"file path is absolute: {path!r}")
    for part in path.split("/"):
        if part in {"", ".", ".."}:
            raise UnsafeManifest(f"file path has an empty, '.' or '..' component: {path!r}")
        if len(part) > MAX_COMPONENT_LENGTH:
            raise UnsafeManifest(f"file path component too long: {path!r}")
    if path in RESERVED_NAMES:
        raise UnsafeManifest(f"file path names a reserved ckptguard file: {path!r}")
    return path


@dataclass(frozen=True)
class FileEntry:
    """One file of a checkpoint: relative POSIX path, size in bytes, xxh3-128 hex digest."""

    path: str
    size: int
    checksum: str

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "checksum": self.checksum}


def _finite(value: Any, where: str) -> Any:
    """Check that ``value`` is plain JSON without NaN/Infinity (which JSON cannot hold)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(
            f"{where} holds a non-finite float ({value}); JSON cannot store it: "
            "pass it as a string or None"
        )
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where} keys must be strings, got {k!r}")
            _finite(v, f"{where}[{k!r}]")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _finite(v, f"{where}[{i}]")
    elif not isinstance(value, (str, int, float, bool)) and value is not None:
        raise TypeError(f"{where} must be JSON data (dict, list, str, number, bool, None)")
    return value


def _normalized(value: dict[str, Any], where: str) -> dict[str, Any]:
    """``value`` as it will read back from disk (tuples become lists), or a clear error."""
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(
            f"{where} holds text that is not valid Unicode (a lone surrogate)"
        ) from None
    except RecursionError:
        raise ValueError(f"{where} is nested too deeply") from None
    result: dict[str, Any] = json.loads(text)
    return result


def _canonical(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


@dataclass(frozen=True)
class Manifest:
    """A committed checkpoint's record. Build with :meth:`create`, read with :meth:`from_json`."""

    name: str
    save_id: str
    step: int | None
    created_at: str
    files: tuple[FileEntry, ...]
    writer: WriterInfo
    metrics: Mapping[str, Any] = field(default_factory=dict)
    metadata: Mapping[str, Any] = field(default_factory=dict)
    versions: Mapping[str, str] = field(default_factory=dict)

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    @classmethod
    def create(
        cls,
        *,
        name: str,
        save_id: str,
        step: int | None,
        files: list[FileEntry],
        writer: WriterInfo,
        metrics: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> Manifest:
        """A new manifest; checks that metrics and metadata are JSON data."""
        metrics = _normalized(_finite(dict(metrics or {}), "metrics"), "metrics")
        metadata = _normalized(_finite(dict(metadata or {}), "metadata"), "metadata")
        for key, value in metrics.items():
            if not isinstance(value, (int, float, str, bool)) and value is not None:
                raise TypeError(f"metric {key!r} must be a number, str, bool or None")
        manifest = cls(
            name=name,
            save_id=save_id,
            step=step,
            created_at=_dt.datetime.now(_dt.UTC).isoformat(timespec="microseconds"),
            files=tuple(sorted(files, key=lambda f: f.path)),
            writer=writer,
            metrics=metrics,
            metadata=metadata,
            versions=library_versions(),
        )
        # Round-trip now: a manifest we cannot read back must never be committed.
        cls.from_json(manifest.to_json())
        return manifest

    def _body(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            "name": self.name,
            "save_id": self.save_id,
            "step": self.step,
            "created_at": self.created_at,
            "checksum": CHECKSUM_ALGORITHM,
            "files": [f.to_dict() for f in self.files],
            "metrics": dict(self.metrics),
            "metadata": dict(self.metadata),
            "writer": self.writer.to_dict(),
            "versions": dict(self.versions),
        }

    def to_json(self) -> bytes:
        """The manifest file's bytes: readable JSON with a self-checksum over the canonical form."""
        body = self._body()
        body["manifest_checksum"] = xxhash.xxh3_128_hexdigest(_canonical(body))
        return (json.dumps(body, indent=1, ensure_ascii=False, allow_nan=False) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, *, path: str | None = None) -> Manifest:
        """Parse and validate a manifest; any defect raises :class:`UnsafeManifest`."""
        try:
            return _parse(data)
        except UnsafeManifest as exc:
            raise UnsafeManifest(exc.message, path=path) from None


def _reject(message: str) -> UnsafeManifest:
    return UnsafeManifest(f"invalid manifest: {message}")


def no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads`` hook: a repeated key is an error (a ValueError), never last-one-wins."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _int(value: Any, what: str, lo: int, hi: int) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise _reject(f"{what} must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def _str(value: Any, what: str, max_len: int = 4096) -> str:
    if not isinstance(value, str) or len(value) > max_len:
        raise _reject(f"{what} must be a string of at most {max_len} characters")
    return value


def _opt_str(value: Any, what: str) -> str | None:
    return None if value is None else _str(value, what)


def _keys(obj: Any, expected: frozenset[str], what: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise _reject(f"{what} must be an object")
    if set(obj) != expected:
        missing, unknown = sorted(expected - set(obj)), sorted(set(obj) - expected)
        raise _reject(f"{what} has missing fields {missing} or unknown fields {unknown}")
    return obj


# json.loads builds ~20 bytes of Python objects per byte of "[],[],..." input: a large
# document denser in arrays and objects than its writer ever makes is refused unparsed.
# A manifest (indented: user metadata can hold empty lists) has at least 4 bytes per
# array or object; a safetensors header of ckptguard's at least 15 (a tensor's entry).
DENSE_JSON_MIN = 256 * 1024
MANIFEST_BYTES_PER_CONTAINER = 4


def too_dense(data: bytes, bytes_per_container: int) -> str | None:
    """Why a JSON document is refused before parsing (None: it is not): see above."""
    if len(data) < DENSE_JSON_MIN:
        return None
    containers = data.count(b"[") + data.count(b"{")
    if containers * bytes_per_container <= len(data):
        return None
    return (
        f"{containers} arrays and objects in {len(data)} bytes: far denser than anything "
        "ckptguard writes, refused unparsed (parsing it would take ~20x its size in memory)"
    )


def strict_json_document(
    data: bytes, *, what: str, max_bytes: int, bytes_per_container: int, fmt: str, version: int
) -> dict[str, Any]:
    """Parse a ckptguard JSON document (a manifest, a sidecar) that trusts nothing.

    Capped in size and in density, strict UTF-8 JSON (no duplicate keys, no NaN or
    Infinity), an object whose ``format`` is ``fmt`` and ``schema_version`` ``version``.
    Any defect raises :class:`UnsafeManifest` ("invalid WHAT: ...").
    """

    def reject(message: str) -> UnsafeManifest:
        return UnsafeManifest(f"invalid {what}: {message}")

    def no_constants(name: str) -> Any:
        raise reject(f"non-standard JSON constant {name}")

    def finite_float(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            raise reject(f"number {text[:40]!r} is out of range")
        return value

    if not isinstance(data, (bytes, bytearray)):
        raise reject("data must be bytes")
    if len(data) > max_bytes:
        raise reject(f"larger than {max_bytes} bytes")
    if (dense := too_dense(data, bytes_per_container)) is not None:
        raise reject(dense)
    try:
        obj = json.loads(
            bytes(data).decode("utf-8"),
            object_pairs_hook=no_duplicate_keys,
            parse_constant=no_constants,
            parse_float=finite_float,
        )
    except UnsafeManifest:
        raise
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as exc:
        raise reject(f"not valid UTF-8 JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict):
        raise reject("top level must be an object")
    if obj.get("format") != fmt:
        raise reject(f"format must be {fmt!r}, got {obj.get('format')!r}")
    found = obj.get("schema_version")
    if found != version or type(found) is not int:
        raise reject(
            f"unknown schema_version {found!r} (this ckptguard reads {version}); "
            "it may have been written by a newer ckptguard: upgrade to read it"
        )
    return obj


def _parse(data: bytes) -> Manifest:
    obj = strict_json_document(
        data,
        what="manifest",
        max_bytes=MAX_MANIFEST_BYTES,
        bytes_per_container=MANIFEST_BYTES_PER_CONTAINER,
        fmt=FORMAT,
        version=SCHEMA_VERSION,
    )
    obj = _keys(obj, _TOP_KEYS, "manifest")
    try:
        # The exact bytes ckptguard writes for this content (see to_json).
        written = (json.dumps(obj, indent=1, ensure_ascii=False, allow_nan=False) + "\n").encode()
        claimed = obj.pop("manifest_checksum")
        actual = xxhash.xxh3_128_hexdigest(_canonical(obj))
    except (ValueError, RecursionError) as exc:
        # Values json.loads accepts but we never write: lone surrogates, 1e400 (-> inf),
        # nesting deeper than re-encoding allows.
        raise _reject(f"content cannot be re-encoded ({type(exc).__name__})") from None
    if not isinstance(claimed, str) or actual != claimed:
        raise _reject("manifest_checksum does not match its content (manifest altered or corrupt)")
    if bytes(data) != written:
        # The checksum covers the content; this covers the bytes: an edit that keeps the
        # content (whitespace, "e" -> "E", a digit that rounds the same) is still an edit.
        raise _reject("its bytes are not those ckptguard wrote for its content (altered)")
    if obj["checksum"] != CHECKSUM_ALGORITHM:
        raise _reject(f"unknown checksum algorithm {obj['checksum']!r}")

    name = _str(obj["name"], "name")
    try:
        validate_name(name)
    except ValueError:
        raise _reject(f"name {name!r} is not a valid checkpoint name") from None
    save_id = _str(obj["save_id"], "save_id")
    if not is_save_id(save_id):
        raise _reject(f"save_id {save_id!r} is malformed")
    step = None if obj["step"] is None else _int(obj["step"], "step", 0, 2**63 - 1)
    created_at = _str(obj["created_at"], "created_at", 64)
    try:
        _dt.datetime.fromisoformat(created_at)
    except ValueError:
        raise _reject(f"created_at {created_at!r} is not an ISO timestamp") from None

    raw_files = obj["files"]
    if not isinstance(raw_files, list) or len(raw_files) > MAX_FILES:
        raise _reject(f"files must be a list of at most {MAX_FILES} entries")
    files: list[FileEntry] = []
    seen: set[str] = set()
    for i, raw in enumerate(raw_files):
        entry = _keys(raw, _FILE_KEYS, f"files[{i}]")
        try:
            rel = validate_relpath(entry["path"])
        except UnsafeManifest as exc:
            raise _reject(f"files[{i}]: {exc.message}") from None
        if rel in seen:
            raise _reject(f"files[{i}]: duplicate path {rel!r}")
        seen.add(rel)
        size = _int(entry["size"], f"files[{i}].size", 0, MAX_FILE_SIZE)
        checksum = entry["checksum"]
        if not isinstance(checksum, str) or _HEX128.fullmatch(checksum) is None:
            raise _reject(f"files[{i}].checksum must be 32 lowercase hex digits")
        files.append(FileEntry(rel, size, checksum))
    # A path cannot be both a file and a directory ("a" and "a/b").
    for rel in seen:
        parts = rel.split("/")
        for depth in range(1, len(parts)):
            if "/".join(parts[:depth]) in seen:
                raise _reject(f"path {rel!r} lies under the file {'/'.join(parts[:depth])!r}")
    if sum(f.size for f in files) > MAX_FILE_SIZE:
        raise _reject("total size is absurd")

    w = _keys(obj["writer"], _WRITER_KEYS, "writer")
    ranks = w["ranks"]
    if not isinstance(ranks, list) or len(ranks) > 1 << 20:
        raise _reject("writer.ranks must be a list")
    writer = WriterInfo(
        host=_str(w["host"], "writer.host", 255),
        pid=_int(w["pid"], "writer.pid", 0, 2**31),
        pid_start=None if w["pid_start"] is None else _int(w["pid_start"], "pid_start", 0, 2**63),
        boot_id=_opt_str(w["boot_id"], "writer.boot_id"),
        pid_namespace=_opt_str(w["pid_namespace"], "writer.pid_namespace"),
        ranks=tuple(_int(r, "writer.ranks[]", 0, 1 << 24) for r in ranks),
        world_size=_int(w["world_size"], "writer.world_size", 1, 1 << 24),
        extra=_dict(w["extra"], "writer.extra"),
    )
    versions = _dict(obj["versions"], "versions")
    for key, value in versions.items():
        _str(value, f"versions[{key!r}]", 256)
    return Manifest(
        name=name,
        save_id=save_id,
        step=step,
        created_at=created_at,
        files=tuple(files),
        writer=writer,
        metrics=_dict(obj["metrics"], "metrics"),
        metadata=_dict(obj["metadata"], "metadata"),
        versions=versions,
    )


def _dict(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _reject(f"{what} must be an object")
    return value
