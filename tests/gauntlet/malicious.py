"""Malicious checkpoints: refused, nothing written outside, no code run, in 1 s and 64 MiB.

Each case is a root with a good ``checkpoint-1`` and a hostile ``checkpoint-2`` whose
abused paths point into a sentinel folder ``outside`` (holding a victim file). Every entry
point runs on it: ``verify()``, ``CheckpointManager(root)``, ``latest()``, ``restore(2)``,
``restore()``, and ``python -m ckptguard verify`` (3 cases in the sample, all in the full
run). Each call may take 1 s of CPU and 64 MiB (tracemalloc peak, in a second pass); all
but the hostile checkpoint and ``.ckptguard`` must be unchanged, and no pickle may run
(it would create ``outside/PWNED``).

Rows: manifest and layout (hostile manifests, re-signed with the library's canonical form
where the case is about content; symlinks, FIFOs, deep trees, a replayed older checkpoint:
verify() and latest() must refuse them); safetensors headers behind an honest manifest and
pickles (intact files: verify() and latest() may accept them, counted as figures; restore
must refuse them); scale (flat JSON lists of 256 KiB, full run 4 MiB; caps are 32 MiB for
a manifest, 100 MiB for a header); fuzz of ``Manifest.from_json`` and ``parse_header``
(a safe result or the typed error, nothing else); and the control: ``pickle.loads`` (and
``torch.load(weights_only=False)`` in the full run) does run the payload.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import logging
import os
import pickle
import shlex
import shutil
import struct
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckptguard
from ckptguard._format.layout import MANIFEST_NAME, STATE_NAME
from ckptguard._format.manifest import MAX_MANIFEST_BYTES
from ckptguard._format.safetensors import build_header, parse_header
from ckptguard._state.serialization import STATE_FORMAT, STATE_VERSION
from gauntlet import Row, same
from test_manifest import (
    _BASE_BYTES,
    _BASE_DICT,
    _SPOTS,
    _fuzz_values,
    _parse_or_reject,
    _put,
    _sign,
)

SCENARIO = "malicious"
MAX_CPU_S, MAX_PEAK_MIB = 1.0, 64.0
VICTIM = "victim.bin"
Build = Callable[[Path, Path], Any]  # makes checkpoint-2 hostile: (its folder, outside)


@dataclass
class Case:
    name: str
    build: Build
    reject: bool = True  # False: intact files, hostile content (verify() may pass them)
    # A stray file beside a manager's state: the checkpoint stays valid (verify warns) and
    # restores its own state from the files its manifest lists; the stray is never read.
    stray: str | None = None


class Payload:
    """Unpickling this runs ``os.system``: proof that code from a checkpoint ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[[str], int], tuple[str]]:
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def _pickled(outside: Path) -> bytes:
    return pickle.dumps(Payload(outside / "PWNED"), protocol=2)  # torch.save's protocol


def _good(step: int) -> dict[str, Any]:
    return {"w": np.arange(64, dtype=np.float32) * step, "step": step}


# -- hostile checkpoints ----------------------------------------------------------------------
def _entry(path: Any, data: bytes) -> dict[str, Any]:
    return {"path": path, "size": len(data), "checksum": xxhash.xxh3_128_hexdigest(data)}


def _edit(
    mutate: Callable[[dict[str, Any], Path], Any], old: bytes = b"", new: bytes = b""
) -> Build:
    """Change the manifest, sign it again, then replace ``old`` by ``new`` in its bytes."""

    def build(ckpt: Path, outside: Path) -> None:
        obj = json.loads((ckpt / MANIFEST_NAME).read_bytes())
        mutate(obj, outside)
        data = _sign(obj)
        (ckpt / MANIFEST_NAME).write_bytes(data.replace(old, new, 1) if old else data)

    return build


def _add(path: Callable[[Path], Any]) -> Build:
    """List one more file at ``path(outside)``, with the victim's true size and checksum."""
    return _edit(lambda m, out: m["files"].append(_entry(path(out), (out / VICTIM).read_bytes())))


def _raw(old: bytes, new: bytes) -> Build:
    return _edit(lambda _m, _o: None, old, new)


def _set(key: str, value: Any, *, in_file: bool = False) -> Build:
    return _edit(lambda m, _: (m["files"][0] if in_file else m).__setitem__(key, value))


def _commit(files: Callable[[Path], dict[str, bytes]]) -> Build:
    """Replace checkpoint-2 by a freshly committed one holding ``files`` (honest manifest)."""

    def build(ckpt: Path, outside: Path) -> None:
        shutil.rmtree(ckpt)
        with ckptguard.atomic_checkpoint(ckpt, step=2) as staging:
            for name, data in files(outside).items():
                (staging / name).write_bytes(data)

    return build


def _state_doc(file: str | None, tree: Any = None) -> bytes:
    tree = tree or {"w": {"__ndarray__": {"file": file, "name": "w"}}}
    doc = {"format": STATE_FORMAT, "version": STATE_VERSION, "files": [file] if file else []}
    return json.dumps({**doc, "tree": tree}).encode()


def _st(header: Any, data: bytes = bytes(8)) -> bytes:
    """A safetensors file with an arbitrary header (an object, or raw bytes)."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def _t(dtype: str = "F32", shape: tuple[int, ...] = (2,), offsets: tuple[int, int] = (0, 8)) -> Any:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def _tensors(blob: bytes) -> Build:
    doc = _state_doc("tensors.safetensors")
    return _commit(lambda _: {"tensors.safetensors": blob, STATE_NAME: doc})


def _move_out(name: str, *, whole: bool = False) -> Build:
    """Move a file (or the whole checkpoint) into ``outside``, leaving a symlink to it."""

    def build(ckpt: Path, outside: Path) -> None:
        src = ckpt if whole else ckpt / name
        shutil.move(src, outside / name)
        src.symlink_to(outside / name)  # the target is intact: following it would verify

    return build


def _symlinked_subdir(ckpt: Path, outside: Path) -> None:
    _add(lambda _: f"sub/{VICTIM}")(ckpt, outside)
    (ckpt / "sub").symlink_to(outside)  # following it would find the very bytes listed


def _fifo(name: str) -> Build:
    def build(ckpt: Path, _outside: Path) -> None:
        (ckpt / name).unlink()
        os.mkfifo(ckpt / name)

    return build


def _replayed(ckpt: Path, _outside: Path) -> None:
    shutil.rmtree(ckpt)
    shutil.copytree(ckpt.with_name("checkpoint-1"), ckpt)  # an older save, a newer name


def _flat_list(kib: int) -> bytes:
    return b"[" + b"[]," * (kib * 1024 // 3) + b"[]]"  # ~30x its size once parsed


def _cases(kib: int) -> dict[str, list[Case]]:
    """Each row's cases; ``kib``: the size of the scale row's files."""
    valid, tensor = _st({"w": _t()}), json.dumps(_t()).encode()
    tag = _state_doc(None, {"w": {"__pickle__": "PICKLE"}})
    legacy = ["pytorch_model.bin", "optimizer.pt", "model.pt", "training_args.bin"]
    big = b'{"format": "ckptguard-manifest", "schema_version": 1, "metadata": '
    headers = {
        "offsets-out-of-bounds": _st({"w": _t(shape=(2**38,), offsets=(0, 2**40))}),
        "offsets-past-end": _st({"w": _t(shape=(4,), offsets=(0, 16))}),
        "offsets-negative": _st({"w": _t(offsets=(-8, 0))}),
        "offsets-overlap": _st({"w": _t(), "v": _t(offsets=(4, 12))}, bytes(16)),
        "shape-overflows-int64": _st({"w": _t(shape=(2**62, 2**62, 4))}),
        "shape-disagrees-with-bytes": _st({"w": _t(shape=(3,))}),
        "dtype-unknown": _st({"w": _t(dtype="F128")}),
        "length-2**63": struct.pack("<Q", 2**63) + valid[8:],
        "length-u64-max": struct.pack("<Q", 2**64 - 1) + valid[8:],
        "length-past-end": struct.pack("<Q", 4096) + valid[8:],
        "truncated": valid[:20],
        "not-utf8": _st(b'{"w\xff": 1}'),
        "deep-nesting": _st(b"[" * 10**5),
        "duplicate-tensor": _st(b'{"w": ' + tensor + b', "w": ' + tensor + b"}"),
        "empty-file": b"",
    }
    return {
        "manifest": [
            Case("path-absolute", _add(lambda out: str(out / VICTIM))),
            Case("path-dotdot", _add(lambda _: f"../../outside/{VICTIM}")),
            Case("path-dotdot-inside", _add(lambda _: f"sub/../../../outside/{VICTIM}")),
            Case("path-backslash", _add(lambda _: f"..\\..\\outside\\{VICTIM}")),
            Case("path-nul", _add(lambda _: f"{VICTIM}\x00.txt")),
            Case("path-reserved-name", _add(lambda _: MANIFEST_NAME)),
            Case("path-lone-surrogate", _edit(
                lambda m, _: m["files"].append(_entry("SUR", b"")), b'"SUR"', b'"\\ud800"')),
            Case("path-file-and-dir", _edit(
                lambda m, _: m["files"].extend([_entry("x", b""), _entry("x/y", b"")]))),
            Case("size-2**62", _set("size", 2**62, in_file=True)),
            Case("size-negative", _set("size", -1, in_file=True)),
            Case("duplicate-entry", _edit(lambda m, _: m["files"].append(dict(m["files"][0])))),
            Case("duplicate-key", _raw(b'"step": 2,', b'"step": 2, "step": 9,')),
            Case("schema-version-2", _set("schema_version", 2)),
            Case("format-unknown", _set("format", "ckptguard-manifest-v0")),
            Case("unknown-field", _set("exec", "__import__('os').system('touch PWNED')")),
            Case("not-utf8", _raw(b'"state.json"', b'"state\xff.json"')),
            Case("deep-nesting", _raw(b'"metadata": ', b'"metadata": ' + b"[" * 10**5)),
            Case("over-size-cap",
                 lambda c, _: os.truncate(c / MANIFEST_NAME, MAX_MANIFEST_BYTES + 1)),
            Case("symlink-subdir", _symlinked_subdir),
            Case("symlink-file", _move_out("tensors.safetensors")),
            Case("symlink-manifest", _move_out(MANIFEST_NAME)),
            Case("symlink-checkpoint-dir", _move_out("checkpoint-2", whole=True)),
            Case("fifo-file", _fifo(STATE_NAME)),
            Case("fifo-manifest", _fifo(MANIFEST_NAME)),
            Case("nested-dirs-100", lambda c, _: (c / "/".join(["d"] * 100)).mkdir(parents=True)),
            Case("replayed-older-checkpoint", _replayed),
        ],
        "safetensors": [Case(f"header-{k}", _tensors(v), reject=False) for k, v in headers.items()],
        "pickle": [
            Case("legacy-pickles-only", _commit(lambda o: dict.fromkeys(legacy, _pickled(o))),
                 reject=False),
            Case("pickle-as-safetensors", _commit(lambda o: {
                "pytorch_model.bin": _pickled(o), STATE_NAME: _state_doc("pytorch_model.bin")}),
                 reject=False),
            Case("pickle-as-state-json", _commit(lambda o: {STATE_NAME: _pickled(o)}), False),
            Case("pickle-tag-in-state-json", _commit(lambda o: {
                STATE_NAME: tag.replace(b"PICKLE", base64.b64encode(_pickled(o)))}), False),
            Case("planted-pickle", lambda c, o: (c / "pytorch_model.bin").write_bytes(_pickled(o)),
                 reject=False, stray="pytorch_model.bin"),
        ],
        "scale": [
            Case(f"manifest-{kib}KiB",
                 lambda c, _: (c / MANIFEST_NAME).write_bytes(big + _flat_list(kib) + b"}")),
            Case(f"header-{kib}KiB", _tensors(_st(b'{"w": ' + _flat_list(kib) + b"}")), False),
        ],
    }  # fmt: skip


# -- every entry point on a case --------------------------------------------------------------
ENTRY_POINTS = ("verify()", "CheckpointManager()", "latest()", "restore(2)", "restore()")


def _call(name: str, root: Path, mgr: Any) -> Any:
    if name == "verify()":
        return ckptguard.verify(root / "checkpoint-2")
    if name == "CheckpointManager()":
        return ckptguard.CheckpointManager(root, keep_last=None)
    if name == "restore(2)":
        return mgr.restore(2)
    return mgr.latest() if name == "latest()" else mgr.restore()


def _measure(root: Path, *, traced: bool) -> tuple[dict[str, Any], float, float]:
    """Each entry point's result (or exception), and the costliest call's CPU s and wall s
    (``traced``: its tracemalloc peak in MiB, and 0)."""
    results: dict[str, Any] = {}
    worst = (0.0, 0.0)
    for name in ENTRY_POINTS:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        cpu, wall = time.process_time(), time.perf_counter()
        try:
            results[name] = _call(name, root, results.get("CheckpointManager()"))
        except Exception as exc:  # judged by _judge: a typed refusal, or a finding
            results[name] = exc
        if traced:
            cost = ((tracemalloc.get_traced_memory()[1] - base) / 2**20, 0.0)
        else:
            cost = (time.process_time() - cpu, time.perf_counter() - wall)
        worst = (max(worst[0], cost[0]), max(worst[1], cost[1]))
    return results, *worst


def _judge(case: Case, call: str, result: Any) -> str | None:
    """What is wrong with what one entry point did with the case (None: nothing)."""
    typed = isinstance(result, ckptguard.CheckpointError)
    if case.stray is not None:
        return _judge_stray(case.stray, call, result)
    if isinstance(result, Exception) and not (typed and call in {"verify()", "restore(2)"}):
        return f"{call} raised {type(result).__name__}: {result}"
    step = getattr(result, "step", None)
    if call == "verify()" and case.reject and getattr(result, "ok", False):
        return "verify() said ok"
    if call == "latest()" and step != 1 and (case.reject or step != 2):
        return f"latest() returned step {step}, not 1"
    if call == "restore(2)" and not typed:
        return "restore(2) returned a state instead of raising"
    if call == "restore()" and not same(result, _good(1)):
        return "restore() did not return step 1's state"
    return None


def _judge_stray(stray: str, call: str, result: Any) -> str | None:
    """A stray file beside a state: valid with a warning, and its own state restored."""
    if isinstance(result, Exception):
        return f"{call} raised {type(result).__name__}: {result}"
    if call == "verify()" and not (
        result.ok and any(w.startswith(f"{stray}: extra file") for w in result.warnings)
    ):
        return f"verify() did not accept it with a warning naming {stray}"
    if call == "latest()" and getattr(result, "step", None) != 2:
        return f"latest() returned step {getattr(result, 'step', None)}, not 2"
    if call in {"restore(2)", "restore()"} and not same(result, _good(2)):
        return f"{call} did not return step 2's own state"
    return None


def _snapshot(case_dir: Path) -> set[tuple[str, int, int, int]]:
    """(path, size, mtime, mode) of all but the hostile checkpoint and .ckptguard."""
    skip = {case_dir / "run" / "checkpoint-2", case_dir / "run" / ".ckptguard"}
    out = set()
    for top, dirs, files in os.walk(case_dir):
        dirs[:] = [d for d in dirs if Path(top, d) not in skip]
        for path in (Path(top, n) for n in dirs + files):
            if path not in skip:
                st_ = path.lstat()
                out.add(
                    (str(path.relative_to(case_dir)), st_.st_size, st_.st_mtime_ns, st_.st_mode)
                )
    return out


def _cli(ckpt: Path, case: Case) -> str | None:
    proc = subprocess.run(
        [sys.executable, "-m", "ckptguard", "verify", str(ckpt)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    if "Traceback" in proc.stderr:
        return f"`ckptguard verify` crashed: {proc.stderr.strip().splitlines()[-1]}"
    return "`ckptguard verify` exited 0" if case.reject and proc.returncode == 0 else None


def _run_case(case: Case, work: Path, stats: dict[str, Any], *, cli: bool) -> str | None:
    case_dir = work / "cases" / case.name
    root, outside = case_dir / "run", case_dir / "outside"
    shutil.copytree(work / "template", root, symlinks=True)
    outside.mkdir()
    (outside / VICTIM).write_bytes(b"a file outside the checkpoint: must never change\n")
    case.build(root / "checkpoint-2", outside)
    before = _snapshot(case_dir)
    results, cpu, wall = _measure(root, traced=False)
    tracemalloc.start()
    try:
        peak = _measure(root, traced=True)[1]
    finally:
        tracemalloc.stop()
    problems = [_judge(case, call, result) for call, result in results.items()]
    if cli:
        stats["cli_checked"] += 1
        problems.append(_cli(root / "checkpoint-2", case))
    if (outside / "PWNED").exists():
        problems.append("code ran: the pickle payload created its marker")
    if changed := sorted({entry[0] for entry in before ^ _snapshot(case_dir)}):
        problems.append(f"changed outside the checkpoint: {changed[:3]}")
    if cpu > MAX_CPU_S:
        problems.append(f"an entry point took {cpu:.2f} s of CPU")
    if peak > MAX_PEAK_MIB:
        problems.append(f"an entry point peaked at {peak:.0f} MiB (tracemalloc)")
    stats["max_cpu_s"] = round(max(stats["max_cpu_s"], cpu), 3)
    stats["max_wall_s"] = round(max(stats["max_wall_s"], wall), 3)
    stats["max_peak_mib"] = round(max(stats["max_peak_mib"], peak), 1)
    if not case.reject:
        stats["verify_accepts"] += bool(getattr(results["verify()"], "ok", False))
        stats["latest_takes_it"] += getattr(results["latest()"], "step", None) == 2
    found = [p for p in problems if p]
    return f"{case.name}: {'; '.join(found)}" if found else None


# -- fuzzing the two parsers ------------------------------------------------------------------
BYTE_EDITS = st.lists(
    st.tuples(st.sampled_from(["flip", "set", "insert", "delete"]), st.integers(0, 2**20),
              st.integers(0, 255)), min_size=1, max_size=6,
)  # fmt: skip


def _edit_bytes(data: bytes, edits: list[tuple[str, int, int]]) -> bytes:
    out = bytearray(data)
    for op, pos, byte in edits:
        i = pos % (len(out) + 1)
        if op == "insert":
            out.insert(i, byte)
        elif i < len(out) and op == "delete":
            del out[i]
        elif i < len(out):
            out[i] = out[i] ^ (1 << byte % 8) if op == "flip" else byte
    return bytes(out)


def _put_signed(spot: tuple[tuple[str | int, ...], str | int], value: Any) -> bytes:
    """test_manifest's base manifest with ``value`` put at ``spot``, signed where possible."""
    obj = copy.deepcopy(_BASE_DICT)
    _put(obj, spot, value)
    with contextlib.suppress(ValueError):  # NaN, lone surrogates: cannot be canonicalised
        return _sign(obj)
    return json.dumps(obj).encode()


def _typed(error: type[Exception], call: Callable[[], object], data: bytes) -> str | None:
    try:
        call()
    except error:
        return None
    except Exception as exc:  # the finding, reported with its type
        return f"{data[:60]!r}: {type(exc).__name__}: {exc}"[:300]
    return None


def _check_header(data: bytes, size: int) -> None:
    start, infos, _ = parse_header(data, size, "fuzz.safetensors")
    end = 0
    for info in infos:  # accepted: in bounds, in order, not overlapping
        if not end <= info.begin <= info.end <= size - start:
            raise AssertionError(f"accepted {info}: out of bounds or overlapping")
        end = info.end


def _fuzz(row: Row, check: Callable[[Any], str | None], n: int, **strategies: Any) -> None:
    """At least ``n`` examples, split among ``strategies``; each one's count is a figure."""
    for name, strategy in strategies.items():
        before = row.trials

        @settings(max_examples=-(-n // len(strategies)), database=None, derandomize=True,
                  deadline=None, suppress_health_check=list(HealthCheck))  # fmt: skip
        @given(strategy)
        def prop(value: Any) -> None:
            row.trial(check(value))

        prop()
        row.figures[name] = row.trials - before


def _manifest_check(data: bytes) -> str | None:
    return _typed(ckptguard.UnsafeManifest, lambda: _parse_or_reject(data), data)


def _header_check(sized: tuple[bytes, int]) -> str | None:
    return _typed(ckptguard.CorruptCheckpoint, lambda: _check_header(*sized), sized[0])


def _fuzz_rows(n: int) -> list[Row]:
    m_row = Row(
        SCENARIO,
        "fuzz: Manifest.from_json on arbitrary bytes, byte-mutated manifests and "
        "re-signed ones holding hostile values: a manifest that round-trips, or UnsafeManifest",
    )
    signed = st.tuples(st.sampled_from(_SPOTS), _fuzz_values).map(lambda sv: _put_signed(*sv))
    byte_mutated = BYTE_EDITS.map(lambda e: _edit_bytes(_BASE_BYTES, e))
    _fuzz(m_row, _manifest_check, n, arbitrary_bytes=st.binary(max_size=2048),
          byte_mutated=byte_mutated, re_signed_hostile_values=signed)  # fmt: skip
    h_row = Row(
        SCENARIO,
        "fuzz: parse_header on arbitrary bytes (true or huge claimed sizes) and "
        "byte-mutated valid files: in-bounds tensors, or CorruptCheckpoint",
    )
    tensors = [("a", "F32", (2, 2)), ("b", "I64", (1,)), ("c", "BOOL", (0,))]
    valid = build_header(tensors, {"k": "v"})[0] + bytes(24)
    sized = st.binary(max_size=512).flatmap(
        lambda b: st.tuples(st.just(b), st.just(len(b)) | st.integers(0, 2**64 - 1))
    )
    mutated = BYTE_EDITS.map(lambda e: _edit_bytes(valid, e)).map(lambda b: (b, len(b)))
    _fuzz(h_row, _header_check, n, arbitrary_bytes=sized, byte_mutated=mutated)
    return [m_row, h_row]


# -- the control, the legacy loader and the rows ----------------------------------------------
def _control(work: Path, *, full: bool) -> Row:
    row = Row(
        SCENARIO,
        "control: loading the payload naively (pickle.loads; torch.load(weights_only=False) "
        "in the full run) does not run its code",
        control=True,
    )
    folder = work / "control"
    folder.mkdir()
    pickle.loads(_pickled(folder))  # noqa: S301 - the point of the control
    row.trial("pickle.loads ran the payload" if (folder / "PWNED").exists() else None)
    if full:
        import torch

        (folder / "PWNED").unlink()
        (folder / "evil.pt").write_bytes(_pickled(folder))
        with contextlib.suppress(Exception):  # a bare pickle: it fails after running it
            torch.load(folder / "evil.pt", weights_only=False)  # the control
        row.trial("torch.load ran the payload" if (folder / "PWNED").exists() else None)
    return row


def _legacy_loader(work: Path) -> str | None:
    """``ckptguard.load_legacy_pt`` (opt-in; torch, weights_only=True) refuses the payload."""
    (folder := work / "legacy").mkdir()
    (folder / "pytorch_model.bin").write_bytes(_pickled(folder))
    load = lambda: ckptguard.load_legacy_pt(folder / "pytorch_model.bin")  # noqa: E731
    problem = _typed(ckptguard.CorruptCheckpoint, load, b"pytorch_model.bin")
    if (folder / "PWNED").exists():
        problem = "it ran the payload"
    return problem and f"load_legacy_pt: {problem}"


BOUNDS = "; nothing changed outside, no marker, each call within 1 s CPU and 64 MiB"
CLAIMS = {
    "manifest": "hostile manifests (paths, sizes, versions, duplicates, encodings), symlinks, "
    "FIFOs, deep trees, a replayed older checkpoint: verify(), latest() and the CLI refuse "
    "them, restore(2) raises a CheckpointError, restore() falls back" + BOUNDS,
    "safetensors": "hostile safetensors headers behind an honest manifest: restore(2) raises a "
    "CheckpointError, restore() falls back" + BOUNDS,
    "pickle": "pickle payloads (legacy files, in place of state.json or safetensors, tagged "
    "in state.json, planted) are never unpickled: restore(2) raises a CheckpointError, "
    "restore() falls back (load_legacy_pt refuses it too, full run); one planted beside a "
    "state is a stray file: verify warns, the state restores from its listed files" + BOUNDS,
    "scale": "hostile files of flat JSON lists (manifest, safetensors header): refused" + BOUNDS,
}
STATS = ("max_cpu_s", "max_wall_s", "max_peak_mib", "cli_checked", "verify_accepts",
         "latest_takes_it")  # fmt: skip
CLI_SAMPLE = {"symlink-checkpoint-dir", "header-offsets-out-of-bounds", "planted-pickle"}


def run(full: bool, work: Path) -> list[Row]:
    """The rows of the malicious scenario (see the module docstring)."""
    mgr = ckptguard.CheckpointManager(work / "template", keep_last=None)
    for step in (1, 2):
        mgr.save(step, _good(step))
    rows = []
    logger = logging.getLogger("ckptguard")
    level = logger.level
    logger.setLevel(logging.ERROR)  # latest() and restore() log every checkpoint they skip
    try:
        for kind, cases in _cases(4096 if full else 256).items():
            row = Row(SCENARIO, CLAIMS[kind])
            stats: dict[str, Any] = dict.fromkeys(STATS, 0)
            for case in cases:
                row.trial(_run_case(case, work, stats, cli=full or case.name in CLI_SAMPLE))
            if all(case.reject for case in cases):  # counted for intact-but-hostile cases
                del stats["verify_accepts"], stats["latest_takes_it"]
            row.figures = {"cases": len(cases), **stats}
            rows.append(row)
    finally:
        logger.setLevel(level)
    if full:
        rows[2].trial(_legacy_loader(work))
        rows[2].figures["load_legacy_pt_checked"] = 1
    rows += _fuzz_rows(10_000 if full else 200)
    rows.append(_control(work, full=full))
    return rows
