"""The manifest: round trips, every rejection the strict parser promises, and fuzzing.

Each rejection case starts from a valid manifest, changes exactly one thing and re-signs
the self-checksum with the module's own canonical form, so that the intended defect is
the only one left; the expected message proves the parser rejected it for that reason.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import xxhash
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import ckptguard
from ckptguard._format import manifest as mf
from ckptguard._format.layout import new_save_id
from ckptguard._format.manifest import FileEntry, Manifest, validate_relpath
from ckptguard._format.owner import WriterInfo

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import TypeAlias

    Json: TypeAlias = Any
    Mutator: TypeAlias = Callable[[dict[str, Any]], None]

_HEX = "0123456789abcdef" * 2
_WRITER = WriterInfo(
    host="node-7",
    pid=4242,
    pid_start=123456,
    boot_id="3e1f0d2c-7a55-4c8e-9a0b-5d6e7f8a9b0c",
    pid_namespace="pid:[4026531836]",
    ranks=(0, 1),
    world_size=2,
    extra={"launcher": "torchrun", "nested": {"a": [1, 2]}},
)


def _make(
    *,
    files: list[FileEntry] | None = None,
    metrics: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
    step: int | None = 100,
) -> Manifest:
    return Manifest.create(
        name="checkpoint-100",
        save_id=new_save_id(),
        step=step,
        files=[
            FileEntry("optimizer/state.bin", 7, _HEX),
            FileEntry("model.safetensors", 1 << 20, "f" * 32),
            FileEntry("config.json", 0, "0" * 32),
        ]
        if files is None
        else files,
        writer=_WRITER,
        metrics={"eval_loss": 0.25, "epoch": 3} if metrics is None else metrics,
        metadata={"run": {"lr": 1e-4, "tags": ["a", "b"]}} if metadata is None else metadata,
    )


def _valid_dict() -> dict[str, Any]:
    obj: dict[str, Any] = json.loads(_make().to_json())
    return obj


def _sign(obj: dict[str, Any]) -> bytes:
    """Serialise ``obj`` with a correct manifest_checksum, as the parser computes it."""
    body = {k: v for k, v in obj.items() if k != "manifest_checksum"}
    signed = dict(body, manifest_checksum=xxhash.xxh3_128_hexdigest(mf._canonical(body)))
    return (json.dumps(signed, indent=1, ensure_ascii=False) + "\n").encode()


def _signed_text_with(value_text: str) -> bytes:
    """A signed manifest whose metadata value ``x`` is replaced by raw JSON ``value_text``.

    The checksum covers ``"x": 0``, so the parser must reject the raw text before (or
    instead of) checking the checksum.
    """
    obj = _valid_dict()
    obj["metadata"] = {"x": 0}
    data = _sign(obj)
    assert data.count(b'"x": 0') == 1
    return data.replace(b'"x": 0', b'"x": ' + value_text.encode(), 1)


def _rejects(data: bytes, match: str) -> None:
    with pytest.raises(ckptguard.UnsafeManifest, match=match):
        Manifest.from_json(data)


# -- round trips -----------------------------------------------------------------------------


def test_sign_helper_produces_what_the_parser_accepts() -> None:
    manifest = _make()
    assert Manifest.from_json(_sign(json.loads(manifest.to_json()))) == manifest


def test_round_trip_equals_original_with_files_sorted() -> None:
    manifest = _make(
        metrics={"eval_loss": 0.125, "acc": 1, "name": "best", "flag": True, "none": None},
        metadata={
            "run": {"lr": 3e-5, "sched": [1, 2.5, {"warmup": None, "ok": False}]},
            "unicode": "\u00fcn\u00ef \u4e2d\u6587",
            "empty": {},
            "list": [[], [[]], {"deep": {"deeper": [0.0, -1, 1e300]}}],
        },
    )
    assert [f.path for f in manifest.files] == [
        "config.json",
        "model.safetensors",
        "optimizer/state.bin",
    ]
    parsed = Manifest.from_json(manifest.to_json())
    assert parsed == manifest
    assert parsed.to_json() == manifest.to_json()
    assert parsed.total_size == 7 + (1 << 20)
    assert parsed.writer == _WRITER
    assert parsed.versions == mf.library_versions()
    assert parsed.metadata["list"][2]["deep"]["deeper"] == [0.0, -1, 1e300]


def test_round_trip_with_no_files_no_step_and_boundary_sizes() -> None:
    empty = _make(files=[], step=None, metrics={}, metadata={})
    assert Manifest.from_json(empty.to_json()) == empty
    biggest = _make(files=[FileEntry("huge", mf.MAX_FILE_SIZE, _HEX)])
    assert Manifest.from_json(biggest.to_json()).files[0].size == 1 << 50


def test_to_json_is_readable_utf8_with_a_matching_self_checksum() -> None:
    manifest = _make(metadata={"note": "\u00e9t\u00e9"})
    data = manifest.to_json()
    assert data.endswith(b"\n")
    assert "\u00e9t\u00e9".encode() in data  # ensure_ascii=False: readable, still UTF-8
    obj = json.loads(data)
    claimed = obj.pop("manifest_checksum")
    assert claimed == xxhash.xxh3_128_hexdigest(mf._canonical(obj))
    assert obj["format"] == mf.FORMAT
    assert obj["schema_version"] == mf.SCHEMA_VERSION


_json_leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64), max_value=2**64)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
_json_values: st.SearchStrategy[Json] = st.recursive(
    _json_leaves,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=60, deadline=None)
@given(
    metadata=st.dictionaries(st.text(max_size=8), _json_values, max_size=5),
    metrics=st.dictionaries(st.text(max_size=8), _json_leaves, max_size=5),
)
def test_round_trip_of_any_json_metadata(
    metadata: dict[str, Json], metrics: dict[str, Json]
) -> None:
    manifest = _make(metadata=metadata, metrics=metrics)
    assert Manifest.from_json(manifest.to_json()) == manifest


@pytest.mark.parametrize(
    ("metrics", "metadata", "error", "match"),
    [
        ({"loss": math.nan}, {}, ValueError, r"metrics\['loss'\] holds a non-finite float"),
        ({"loss": math.inf}, {}, ValueError, r"metrics\['loss'\] holds a non-finite float"),
        ({}, {"a": [1, -math.inf]}, ValueError, r"metadata\['a'\]\[1\] holds a non-finite"),
        ({}, {"a": {"b": math.nan}}, ValueError, r"metadata\['a'\]\['b'\] holds a non-finite"),
        ({1: 0.5}, {}, TypeError, r"metrics keys must be strings, got 1"),
        ({}, {"a": {2: "x"}}, TypeError, r"metadata\['a'\] keys must be strings, got 2"),
        ({}, {None: 1}, TypeError, r"metadata keys must be strings, got None"),
        ({}, {"a": object()}, TypeError, r"metadata\['a'\] must be JSON data"),
        ({}, {"a": b"bytes"}, TypeError, r"metadata\['a'\] must be JSON data"),
        ({"loss": [0.1]}, {}, TypeError, r"metric 'loss' must be a number, str, bool or None"),
        ({"loss": {"a": 1}}, {}, TypeError, r"metric 'loss' must be a number"),
    ],
)
def test_create_rejects_what_json_cannot_hold(
    metrics: dict[Any, Any], metadata: dict[Any, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        _make(metrics=metrics, metadata=metadata)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "../escape"}, "not a valid checkpoint name"),
        ({"save_id": "not-a-save-id"}, "save_id 'not-a-save-id' is malformed"),
        ({"files": [FileEntry("/etc/passwd", 1, _HEX)]}, "is absolute"),
        ({"files": [FileEntry("a", 1, _HEX), FileEntry("a", 1, _HEX)]}, "duplicate path"),
        ({"files": [FileEntry("a", -1, _HEX)]}, r"size must be an integer"),
        ({"files": [FileEntry("a", 1, "XYZ")]}, "32 lowercase hex digits"),
    ],
)
def test_create_never_builds_a_manifest_it_could_not_read_back(
    kwargs: dict[str, Any], match: str
) -> None:
    args: dict[str, Any] = {
        "name": "checkpoint-1",
        "save_id": new_save_id(),
        "step": 1,
        "files": [],
        "writer": _WRITER,
    }
    args.update(kwargs)
    with pytest.raises(ckptguard.UnsafeManifest, match=match):
        Manifest.create(**args)


# -- every rejection the parser promises ----------------------------------------------------


def _set(key: str, value: Json) -> Mutator:
    def mutate(obj: dict[str, Any]) -> None:
        obj[key] = value

    return mutate


def _drop(key: str) -> Mutator:
    def mutate(obj: dict[str, Any]) -> None:
        del obj[key]

    return mutate


def _set_file(key: str, value: Json, index: int = 0) -> Mutator:
    def mutate(obj: dict[str, Any]) -> None:
        obj["files"][index][key] = value

    return mutate


def _drop_file(key: str) -> Mutator:
    def mutate(obj: dict[str, Any]) -> None:
        del obj["files"][0][key]

    return mutate


def _files(*entries: tuple[Json, Json]) -> Mutator:
    def mutate(obj: dict[str, Any]) -> None:
        obj["files"] = [{"path": p, "size": s, "checksum": _HEX} for p, s in entries]

    return mutate


def _set_writer(key: str, value: Json) -> Mutator:
    def mutate(obj: dict[str, Any]) -> None:
        obj["writer"][key] = value

    return mutate


def _drop_writer(key: str) -> Mutator:
    def mutate(obj: dict[str, Any]) -> None:
        del obj["writer"][key]

    return mutate


_VERSION = "unknown schema_version"
_FIELDS = "missing fields"
_PATH = r"files\[0\]: file path"
_EMPTY_DOT = r"has an empty, '\.' or '\.\.' component"

_DICT_CASES: dict[str, tuple[Mutator, str]] = {
    # schema version and format
    "schema_version=2": (_set("schema_version", 2), _VERSION),
    "schema_version='1'": (_set("schema_version", "1"), _VERSION),
    "schema_version=1.0": (_set("schema_version", 1.0), _VERSION),
    "schema_version=True": (_set("schema_version", True), _VERSION),
    "schema_version=0": (_set("schema_version", 0), _VERSION),
    "schema_version=None": (_set("schema_version", None), _VERSION),
    "schema_version missing": (_drop("schema_version"), _VERSION),
    "format other": (_set("format", "ckptguard-manifest-v2"), "format must be"),
    "format None": (_set("format", None), "format must be"),
    "format missing": (_drop("format"), "format must be"),
    "checksum algorithm": (_set("checksum", "sha256"), "unknown checksum algorithm 'sha256'"),
    # top-level fields
    "unknown top-level field": (_set("extra", 1), r"unknown fields \['extra'\]"),
    "missing metrics": (_drop("metrics"), r"missing fields \['metrics'\]"),
    "missing files": (_drop("files"), r"missing fields \['files'\]"),
    "missing writer": (_drop("writer"), r"missing fields \['writer'\]"),
    "missing versions": (_drop("versions"), r"missing fields \['versions'\]"),
    "missing manifest_checksum": (_drop("manifest_checksum"), r"\['manifest_checksum'\]"),
    "metrics not an object": (_set("metrics", [1]), "metrics must be an object"),
    "metadata not an object": (_set("metadata", "x"), "metadata must be an object"),
    "versions not an object": (_set("versions", None), "versions must be an object"),
    "versions value not str": (_set("versions", {"torch": 2}), r"versions\['torch'\] must be"),
    "files not a list": (_set("files", {"a": 1}), "files must be a list"),
    "file not an object": (_set("files", ["a"]), r"files\[0\] must be an object"),
    # name, save_id, step, created_at
    "name with slash": (_set("name", "a/b"), "not a valid checkpoint name"),
    "name ..": (_set("name", ".."), "not a valid checkpoint name"),
    "name hidden": (_set("name", ".ckptguard"), "not a valid checkpoint name"),
    "name empty": (_set("name", ""), "not a valid checkpoint name"),
    "name reserved": (_set("name", "ckptguard.json"), "not a valid checkpoint name"),
    "name too long": (_set("name", "a" * 201), "not a valid checkpoint name"),
    "name not str": (_set("name", 7), "name must be a string"),
    "save_id garbage": (_set("save_id", "abc"), "save_id 'abc' is malformed"),
    "save_id newline": (
        _set("save_id", new_save_id() + "\n"),
        "is malformed",
    ),
    "save_id uppercase hex": (
        _set("save_id", new_save_id().upper()),
        "is malformed",
    ),
    "save_id not str": (_set("save_id", None), "save_id must be a string"),
    "step negative": (_set("step", -1), "step must be an integer"),
    "step bool": (_set("step", True), "step must be an integer"),
    "step float": (_set("step", 1.0), "step must be an integer"),
    "step str": (_set("step", "100"), "step must be an integer"),
    "step huge": (_set("step", 2**63), "step must be an integer"),
    "created_at words": (_set("created_at", "yesterday"), "is not an ISO timestamp"),
    "created_at empty": (_set("created_at", ""), "is not an ISO timestamp"),
    "created_at long": (_set("created_at", "2024-01-01T00:00:00" + "0" * 60), "at most 64"),
    "created_at int": (_set("created_at", 1700000000), "created_at must be a string"),
    "created_at None": (_set("created_at", None), "created_at must be a string"),
    # file paths
    "absolute /etc/passwd": (_set_file("path", "/etc/passwd"), _PATH + " is absolute"),
    "absolute C:/x": (_set_file("path", "C:/x"), _PATH + " is absolute"),
    "absolute c:x": (_set_file("path", "c:x"), _PATH + " is absolute"),
    "dotdot": (_set_file("path", ".."), _EMPTY_DOT),
    "dotdot first": (_set_file("path", "../x"), _EMPTY_DOT),
    "dotdot middle": (_set_file("path", "a/../b"), _EMPTY_DOT),
    "dotdot last": (_set_file("path", "a/.."), _EMPTY_DOT),
    "dot": (_set_file("path", "."), _EMPTY_DOT),
    "dot first": (_set_file("path", "./a"), _EMPTY_DOT),
    "dot middle": (_set_file("path", "a/./b"), _EMPTY_DOT),
    "empty component": (_set_file("path", "a//b"), _EMPTY_DOT),
    "trailing slash": (_set_file("path", "a/"), _EMPTY_DOT),
    "backslash": (_set_file("path", "a\\b"), "contains a backslash"),
    "backslash dotdot": (_set_file("path", "..\\x"), "contains a backslash"),
    "NUL": (_set_file("path", "a\x00b"), "NUL or control characters"),
    "newline": (_set_file("path", "a\nb"), "NUL or control characters"),
    "tab": (_set_file("path", "a\tb"), "NUL or control characters"),
    "escape": (_set_file("path", "a\x1b[31m"), "NUL or control characters"),
    "unit separator": (_set_file("path", "a\x1f"), "NUL or control characters"),
    "DEL": (_set_file("path", "a\x7fb"), "NUL or control characters"),
    "empty path": (_set_file("path", ""), "must be a non-empty string"),
    "path not str": (_set_file("path", 1), "must be a non-empty string"),
    "path None": (_set_file("path", None), "must be a non-empty string"),
    "path too long": (_set_file("path", "a/" * 2048 + "b"), "longer than 4096"),
    "component too long": (_set_file("path", "d/" + "x" * 256), "component too long"),
    "the manifest itself": (_set_file("path", "ckptguard.json"), "reserved ckptguard file"),
    "the owner file": (_set_file("path", ".ckptguard-owner.json"), "reserved ckptguard file"),
    "the manifest temp": (_set_file("path", ".ckptguard.json.tmp"), "reserved ckptguard file"),
    "duplicate paths": (_files(("a", 1), ("a", 1)), r"files\[1\]: duplicate path 'a'"),
    "file and dir": (_files(("a", 1), ("a/b", 1)), "'a/b' lies under the file 'a'"),
    "dir and file": (_files(("a/b", 1), ("a", 1)), "'a/b' lies under the file 'a'"),
    "deep file and dir": (_files(("x/y/z", 1), ("x/y", 1)), "'x/y/z' lies under the file"),
    # sizes
    "size negative": (_set_file("size", -1), r"size must be an integer in \[0, "),
    "size True": (_set_file("size", True), "size must be an integer"),
    "size False": (_set_file("size", False), "size must be an integer"),
    "size float": (_set_file("size", 7.0), "size must be an integer"),
    "size str": (_set_file("size", "7"), "size must be an integer"),
    "size None": (_set_file("size", None), "size must be an integer"),
    "size absurd": (_set_file("size", 2**50 + 1), "size must be an integer"),
    "size huge": (_set_file("size", 10**30), "size must be an integer"),
    "total absurd": (_files(("a", 2**49 + 1), ("b", 2**49)), "total size is absurd"),
    # checksums
    "checksum upper": (_set_file("checksum", _HEX.upper()), "32 lowercase hex digits"),
    "checksum short": (_set_file("checksum", _HEX[:31]), "32 lowercase hex digits"),
    "checksum long": (_set_file("checksum", _HEX + "0"), "32 lowercase hex digits"),
    "checksum non-hex": (_set_file("checksum", "g" * 32), "32 lowercase hex digits"),
    "checksum newline": (_set_file("checksum", _HEX[:31] + "\n"), "32 lowercase hex"),
    "checksum int": (_set_file("checksum", 0), "32 lowercase hex digits"),
    "checksum None": (_set_file("checksum", None), "32 lowercase hex digits"),
    # file and writer fields
    "unknown file field": (_set_file("mode", 0o644), r"files\[0\] has .*unknown fields \['mode'\]"),
    "missing file checksum": (_drop_file("checksum"), r"files\[0\] has missing fields \['checksum"),
    "missing file size": (_drop_file("size"), r"files\[0\] has missing fields \['size'\]"),
    "missing file path": (_drop_file("path"), r"files\[0\] has missing fields \['path'\]"),
    "unknown writer field": (_set_writer("uid", 0), r"writer has .*unknown fields \['uid'\]"),
    "missing writer host": (_drop_writer("host"), r"writer has missing fields \['host'\]"),
    "missing writer extra": (_drop_writer("extra"), r"writer has missing fields \['extra'\]"),
    "writer not an object": (_set("writer", [1]), "writer must be an object"),
    "writer pid negative": (_set_writer("pid", -1), "writer.pid must be an integer"),
    "writer pid bool": (_set_writer("pid", True), "writer.pid must be an integer"),
    "writer host long": (_set_writer("host", "h" * 256), "writer.host must be a string"),
    "writer host int": (_set_writer("host", 1), "writer.host must be a string"),
    "writer ranks dict": (_set_writer("ranks", {"0": 0}), "writer.ranks must be a list"),
    "writer rank bool": (_set_writer("ranks", [True]), r"writer.ranks\[\] must be an integer"),
    "writer world 0": (_set_writer("world_size", 0), "writer.world_size must be an integer"),
    "writer boot_id int": (_set_writer("boot_id", 5), "writer.boot_id must be a string"),
    "writer extra list": (_set_writer("extra", []), "writer.extra must be an object"),
    "writer pid_start str": (_set_writer("pid_start", "1"), "pid_start must be an integer"),
}


@pytest.mark.parametrize(("mutate", "match"), _DICT_CASES.values(), ids=_DICT_CASES.keys())
def test_one_defect_in_a_signed_manifest_is_rejected(mutate: Mutator, match: str) -> None:
    obj = _valid_dict()
    mutate(obj)
    data = _sign(obj) if "manifest_checksum" in obj else json.dumps(obj).encode()
    _rejects(data, match)


_RAW_CASES: dict[str, tuple[Callable[[], bytes], str]] = {
    "duplicate top-level key": (
        lambda: _sign(_valid_dict()).replace(b'\n "step": 100,', b'\n "step": 100, "step": 100,'),
        "duplicate key 'step'",
    ),
    "duplicate nested key": (
        lambda: _signed_text_with('{"k": 1, "k": 1}'),
        "duplicate key 'k'",
    ),
    "NaN literal": (lambda: _signed_text_with("NaN"), "non-standard JSON constant NaN"),
    "Infinity literal": (lambda: _signed_text_with("Infinity"), "constant Infinity"),
    "-Infinity literal": (lambda: _signed_text_with("-Infinity"), "constant -Infinity"),
    "deep nesting": (
        lambda: _signed_text_with("[" * 100_000 + "]" * 100_000),
        "not valid UTF-8 JSON \\(RecursionError",
    ),
    "deep object nesting": (
        lambda: _signed_text_with('{"a":' * 100_000 + "0" + "}" * 100_000),
        "not valid UTF-8 JSON \\(RecursionError",
    ),
    "latin-1 byte": (
        lambda: _signed_text_with('"caf\u00e9"').replace("\u00e9".encode(), b"\xe9"),
        "not valid UTF-8 JSON \\(UnicodeDecodeError",
    ),
    "0xff byte": (lambda: b"\xff" + _sign(_valid_dict()), "UnicodeDecodeError"),
    "UTF-16": (lambda: _sign(_valid_dict()).decode().encode("utf-16"), "UnicodeDecodeError"),
    "truncated": (lambda: _sign(_valid_dict())[:-10], "JSONDecodeError"),
    "trailing garbage": (lambda: _sign(_valid_dict()) + b"{}", "JSONDecodeError"),
    "empty": (lambda: b"", "JSONDecodeError"),
    "top-level list": (lambda: b"[]", "top level must be an object"),
    "top-level string": (lambda: b'"ckptguard-manifest"', "top level must be an object"),
    "top-level number": (lambda: b"1", "top level must be an object"),
    "top-level null": (lambda: b"null", "top level must be an object"),
    "top-level list of manifest": (
        lambda: b"[" + _sign(_valid_dict()) + b"]",
        "top level must be an object",
    ),
    "over-size": (
        lambda: _sign(_valid_dict()).ljust(mf.MAX_MANIFEST_BYTES + 1),
        f"larger than {mf.MAX_MANIFEST_BYTES} bytes",
    ),
    "tampered step": (
        lambda: _sign(_valid_dict()).replace(b'"step": 100', b'"step": 101'),
        "manifest_checksum does not match",
    ),
    "tampered metric": (
        lambda: _sign(_valid_dict()).replace(b'"eval_loss": 0.25', b'"eval_loss": 0.24'),
        "manifest_checksum does not match",
    ),
    "tampered file size": (
        lambda: _sign(_valid_dict()).replace(b'"size": 7', b'"size": 8'),
        "manifest_checksum does not match",
    ),
    "flipped checksum digit": (
        lambda: _with_claimed_checksum(lambda c: ("1" if c[0] == "0" else "0") + c[1:]),
        "manifest_checksum does not match",
    ),
    "checksum upper-cased": (
        lambda: _with_claimed_checksum(str.upper),
        "manifest_checksum does not match",
    ),
    "checksum not a string": (
        lambda: _with_claimed_checksum(lambda c: int(c, 16)),
        "manifest_checksum does not match",
    ),
}


def _with_claimed_checksum(change: Callable[[str], Json]) -> bytes:
    obj = json.loads(_sign(_valid_dict()))
    obj["manifest_checksum"] = change(obj["manifest_checksum"])
    return json.dumps(obj).encode()


@pytest.mark.parametrize(("build", "match"), _RAW_CASES.values(), ids=_RAW_CASES.keys())
def test_malformed_bytes_are_rejected(build: Callable[[], bytes], match: str) -> None:
    _rejects(build(), match)


@pytest.mark.parametrize("data", ["{}", None, memoryview(b"{}"), [123]])
def test_non_bytes_input_is_rejected(data: Any) -> None:
    with pytest.raises(ckptguard.UnsafeManifest, match="data must be bytes"):
        Manifest.from_json(data)


def test_exactly_max_manifest_bytes_is_accepted() -> None:
    pad = mf.MAX_MANIFEST_BYTES - len(_make(metadata={"pad": ""}).to_json())
    manifest = _make(metadata={"pad": "x" * pad})
    data = manifest.to_json()
    assert len(data) == mf.MAX_MANIFEST_BYTES
    assert Manifest.from_json(data) == manifest
    _rejects(data + b" ", "larger than")


@pytest.mark.parametrize(
    "edit",
    [
        lambda b: b[:-1],  # the final newline dropped
        lambda b: b + b" ",
        lambda b: b.replace(b'"epoch": 3', b'"epoch":  3'),
        lambda b: b.replace(b"0.0001", b"1E-4"),  # the same number, spelled otherwise
        lambda b: b.replace(b'"a"', b'"\\u0061"'),  # the same string, escaped
    ],
)
def test_an_edit_that_keeps_the_content_is_still_rejected(edit: Callable[[bytes], bytes]) -> None:
    data = _make().to_json()
    edited = edit(data)
    assert edited != data
    assert json.loads(edited) == json.loads(data)
    _rejects(edited, "not those ckptguard wrote")


def test_rejection_names_the_path_and_is_a_corrupt_checkpoint() -> None:
    where = "/runs/exp1/checkpoint-7/ckptguard.json"
    with pytest.raises(ckptguard.UnsafeManifest) as info:
        Manifest.from_json(b"[]", path=where)
    err = info.value
    assert err.path == where
    assert where in str(err)
    assert "do not load this checkpoint" in str(err)
    assert isinstance(err, ckptguard.CorruptCheckpoint)
    assert isinstance(err, ckptguard.CheckpointError)
    assert isinstance(err, ValueError)


def test_nesting_far_below_the_recursion_limit_is_fine() -> None:
    nested: Json = 0
    for _ in range(200):
        nested = [nested]
    manifest = _make(metadata={"deep": nested})
    assert Manifest.from_json(manifest.to_json()) == manifest


# JSON that json.loads accepts but the canonical re-encoding behind the self-checksum
# cannot handle (1e400 parses to inf; "\ud800" to a lone surrogate, which UTF-8 cannot
# encode; nesting a few levels short of the recursion limit) once escaped from the
# parser as ValueError / UnicodeEncodeError / RecursionError, and verify(), scan() and
# recover(), which catch only UnsafeManifest, crashed on such a checkpoint.


@pytest.mark.parametrize("literal", ["1e400", "-1e400", "1E999", "[1e400]"])
def test_out_of_range_float_literal_is_rejected(literal: str) -> None:
    _rejects(_signed_text_with(literal), "invalid manifest")


@pytest.mark.parametrize("literal", ['"\\ud800"', '"a\\udfff"', '{"\\udc00": 1}'])
def test_lone_surrogate_escape_is_rejected(literal: str) -> None:
    _rejects(_signed_text_with(literal), "invalid manifest")


def test_nesting_at_every_depth_up_to_the_recursion_limit_is_rejected_cleanly() -> None:
    # json.loads runs a few frames above the re-encoding, so at some depth just below
    # the limit the parse succeeds and only the re-encoding overflows the stack.
    limit = sys.getrecursionlimit()
    for depth in range(limit - 400, limit + 10):
        with pytest.raises(ckptguard.UnsafeManifest):
            Manifest.from_json(_signed_text_with("[" * depth + "]" * depth))


@pytest.mark.parametrize("literal", ["1e400", '"\\ud800"'])
def test_verify_reports_such_a_manifest_instead_of_crashing(tmp_path: Path, literal: str) -> None:
    final = tmp_path / "checkpoint-1"
    with ckptguard.atomic_checkpoint(final, metadata={"x": 0}) as staging:
        (staging / "weights.bin").write_bytes(b"w")
    manifest = final / "ckptguard.json"
    text = manifest.read_bytes()
    assert text.count(b'"x": 0') == 1
    manifest.write_bytes(text.replace(b'"x": 0', b'"x": ' + literal.encode()))
    report = ckptguard.verify(final)
    assert not report.ok
    assert "invalid manifest" in report.problems[0]
    kinds = {e.name: e.kind for e in ckptguard.scan(tmp_path).entries}
    assert kinds == {"checkpoint-1": ckptguard.EntryKind.COMMITTED_CORRUPT}


# -- validate_relpath ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "a",
        "model.safetensors",
        "a/b/c.bin",
        ".hidden",
        "..a",
        "a..",
        "...",
        "a.b/.c",
        "sub/ckptguard.json",  # reserved only at the top of the checkpoint
        "sub/.ckptguard-owner.json",
        "\u00fcn\u00ef/\u4e2d\u6587.bin",
        "with space/and-dash_under.score",
        "x" * 255,
        "d/" + "x" * 255,
        "ab/" * 1365 + "a",  # exactly 4096 characters
        "ab:c/d:e",  # a colon is fine after the first character
        "1:/x",  # not a drive letter
    ],
)
def test_validate_relpath_accepts(path: str) -> None:
    assert len(path) <= mf.MAX_PATH_LENGTH
    assert validate_relpath(path) is path


@pytest.mark.parametrize(
    ("path", "match"),
    [
        ("", "non-empty string"),
        (None, "non-empty string"),
        (3, "non-empty string"),
        (b"a", "non-empty string"),
        ("/", "absolute"),
        ("/etc/passwd", "absolute"),
        ("//server/share", "absolute"),
        ("C:/x", "absolute"),
        ("C:", "absolute"),
        ("z:relative", "absolute"),
        ("C:\\x", "backslash"),
        ("a\\b", "backslash"),
        ("..", "component"),
        ("../a", "component"),
        ("a/../b", "component"),
        ("a/..", "component"),
        (".", "component"),
        ("./a", "component"),
        ("a/.", "component"),
        ("a//b", "component"),
        ("a/", "component"),
        ("a\x00", "control"),
        ("\x01a", "control"),
        ("a\rb", "control"),
        ("a\x7f", "control"),
        ("ckptguard.json", "reserved"),
        (".ckptguard.json.tmp", "reserved"),
        (".ckptguard-owner.json", "reserved"),
        ("x" * 256, "component too long"),
        ("ab/" * 1365 + "ab", "longer than 4096"),
    ],
)
def test_validate_relpath_rejects(path: object, match: str) -> None:
    with pytest.raises(ckptguard.UnsafeManifest, match=match):
        validate_relpath(path)


# -- fuzzing ------------------------------------------------------------------------------------

_BASE_BYTES = _sign(_valid_dict())
_BASE_DICT: dict[str, Any] = json.loads(_BASE_BYTES)


def _parse_or_reject(data: bytes) -> None:
    """The parser's whole contract: UnsafeManifest, or a manifest that round-trips."""
    try:
        manifest = Manifest.from_json(data)
    except ckptguard.UnsafeManifest:
        event("rejected")
        return
    event("accepted")
    again = Manifest.from_json(manifest.to_json())
    assert again == manifest
    assert again.to_json() == manifest.to_json()


_fuzz_leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=12)
    | st.text(st.characters(exclude_categories=()), max_size=4)  # lone surrogates too
    | st.sampled_from(["\ud800", "x\udfff"])
    | st.sampled_from(["/etc/passwd", "..", "a/b", "ckptguard.json", _HEX, "1", "checkpoint-1"])
)
_fuzz_values: st.SearchStrategy[Json] = st.recursive(
    _fuzz_leaves,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.text(max_size=6) | st.sampled_from(sorted(mf._FILE_KEYS | mf._WRITER_KEYS)),
            children,
            max_size=4,
        )
    ),
    max_leaves=16,
)
# Where a value is put: (container path, key). A key beyond a list's end appends.
_SPOTS: list[tuple[tuple[str | int, ...], str | int]] = [
    *(((), key) for key in sorted(mf._TOP_KEYS | {"extra"})),
    *((("files", 0), key) for key in sorted(mf._FILE_KEYS | {"mode"})),
    (("files",), 0),
    (("files",), 3),
    *((("writer",), key) for key in sorted(mf._WRITER_KEYS | {"uid"})),
    (("writer", "ranks"), 0),
    (("metrics",), "eval_loss"),
    (("metrics",), "new"),
    (("metadata",), "run"),
    (("metadata", "run", "tags"), 1),
    (("versions",), "torch"),
]


def _put(obj: dict[str, Any], spot: tuple[tuple[str | int, ...], str | int], value: Json) -> None:
    container: Any = obj
    for key in spot[0]:
        container = container[key]
    key = spot[1]
    if isinstance(container, list) and isinstance(key, int) and key >= len(container):
        container.append(value)
    else:
        container[key] = value


@settings(max_examples=1000, deadline=None)
@given(data=st.binary(max_size=300))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    _parse_or_reject(data)


@settings(max_examples=1000, deadline=None)
@given(
    edits=st.lists(
        st.tuples(st.integers(0, len(_BASE_BYTES) - 1), st.integers(0, 255)), min_size=1, max_size=3
    )
)
def test_fuzz_byte_edits_of_a_valid_manifest(edits: list[tuple[int, int]]) -> None:
    data = bytearray(_BASE_BYTES)
    for index, byte in edits:
        data[index] = byte
    _parse_or_reject(bytes(data))


@settings(max_examples=300, deadline=None)
@given(value=_fuzz_values)
def test_fuzz_any_json_document(value: Json) -> None:
    _parse_or_reject(json.dumps(value).encode())


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spot=st.sampled_from(_SPOTS), value=_fuzz_values, resign=st.booleans())
def test_fuzz_json_values_inserted_into_a_valid_manifest(
    spot: tuple[tuple[str | int, ...], str | int], value: Json, resign: bool
) -> None:
    obj = copy.deepcopy(_BASE_DICT)
    _put(obj, spot, value)
    data = json.dumps(obj).encode()  # NaN and Infinity become literals here
    if resign:
        # Non-finite floats and lone surrogates cannot be canonicalised: then the
        # unsigned text (where json.dumps escapes them) is parsed.
        with contextlib.suppress(ValueError):
            data = _sign(obj)
    _parse_or_reject(data)
