"""Corruption: bit flips, truncations, appended bytes and zeroed ranges of committed files.

A root holds three checkpoints saved by ``CheckpointManager`` (numpy arrays, scalars, a
float metric written with an exponent, as learning rates are). Every trial damages one
committed file of the newest, checks, then puts the original bytes back.

Rows:
- random: seeded random damage to a random file of the newest checkpoint (the manifest
  ``ckptguard.json`` included): ``verify()`` must report it, and resume must skip it:
  a new manager's ``latest()`` is the previous step and ``restore()`` returns exactly
  the previous state;
- manifest sweep: single-bit flips, truncations and one-byte appends of ``ckptguard.json``
  alone, which holds the checksums of everything else: each must fail ``verify()``.
  Full: every bit and every length; sample: the metrics object (user numbers), the tail
  and a seeded sample of the rest;
- control: the random row's bit flips checked by size-only verification
  (``verify(checksums=False)``) must go unnoticed in data files, which shows that the
  rows above can fail.
"""

from __future__ import annotations

import contextlib
import logging
import random
from typing import TYPE_CHECKING, Any

import numpy as np

import ckptguard
from ckptguard._format.layout import MANIFEST_NAME
from ckptguard._format.manifest import Manifest
from gauntlet import Row, same

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

SCENARIO = "corruption"
SEED = 8_2024
STEPS = (1, 2, 3)
KINDS = ("bit_flip", "truncation", "append", "zeroed_range")
KIND_WEIGHTS = (6, 2, 1, 1)


def _state(step: int) -> dict[str, Any]:
    return {
        "w": np.arange(256, dtype=np.float32) * step,
        "opt": {"m": np.full((8, 8), step, dtype=np.int64), "lr": 1e-5 * step},
        "step": step,
        "tag": f"step-{step}",
    }


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence latest()/restore()'s "skipping ..." warnings: thousands of them otherwise."""
    logger = logging.getLogger("ckptguard")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _damage(data: bytes, kind: str, rng: random.Random) -> tuple[bytes, str]:
    """``data`` damaged in one way (always different from ``data``), and what was done."""
    out = bytearray(data)
    if kind == "bit_flip":
        pos, bit = rng.randrange(len(data)), rng.randrange(8)
        out[pos] ^= 1 << bit
        return bytes(out), f"bit {bit} of byte {pos} flipped"
    if kind == "truncation":
        n = rng.randrange(len(data))
        return data[:n], f"truncated to {n} of {len(data)} bytes"
    if kind == "append":
        extra = rng.randbytes(rng.randint(1, 16))
        return data + extra, f"{extra!r} appended"
    nonzero = [i for i, b in enumerate(data) if b]  # a zeroed range must change something
    start = rng.choice(nonzero)
    n = rng.randint(1, 64)
    out[start : start + n] = bytes(len(out[start : start + n]))
    return bytes(out), f"bytes {start}..{start + n} zeroed"


def _benign(name: str, original: bytes, damaged: bytes) -> str:
    """For a manifest: whether the damaged bytes still parse to the very same manifest."""
    if name != MANIFEST_NAME:
        return ""
    with contextlib.suppress(ckptguard.UnsafeManifest):
        if Manifest.from_json(damaged) == Manifest.from_json(original):
            return " (it still parses to the identical manifest: only its bytes changed)"
    return ""


def _resume_problem(root: Path, expected: dict[str, Any]) -> str | None:
    """What is wrong with resuming from ``root`` (the newest checkpoint being damaged)."""
    mgr = ckptguard.CheckpointManager(root, keep_last=None)
    try:
        latest = mgr.latest()
        if latest is None or latest.step != STEPS[-2]:
            return f"latest() returned {latest and latest.step}, not step {STEPS[-2]}"
        restored = mgr.restore()
    except Exception as exc:  # any exception is the finding, reported with its type
        return f"resume raised {type(exc).__name__}: {exc}"
    if not same(restored, expected):
        return "restore() did not return the previous state exactly"
    return None


def _build(work: Path) -> tuple[Path, Path, dict[str, bytes]]:
    root = work / "run"
    mgr = ckptguard.CheckpointManager(root, keep_last=None)
    for step in STEPS:
        mgr.save(step, _state(step), metrics={"loss": 1e-5 / step})
    newest = root / f"checkpoint-{STEPS[-1]}"
    files = {p.name: p.read_bytes() for p in sorted(newest.iterdir()) if p.is_file()}
    if MANIFEST_NAME not in files or not ckptguard.verify(newest).ok:
        raise AssertionError(f"setup: {newest} is not a valid checkpoint with a manifest")
    return root, newest, files


def _random_rows(
    root: Path, newest: Path, files: dict[str, bytes], trials: int, controls: int
) -> list[Row]:
    row = Row(
        SCENARIO,
        "a random bit flip, truncation, append or zeroed range of a committed file "
        "(manifest included) fails verify(); latest() and restore() fall back to the "
        "previous checkpoint, exactly",
    )
    control = Row(
        SCENARIO,
        "control: size-only verify(checksums=False) notices every random bit flip",
        control=True,
    )
    rng = random.Random(SEED)  # noqa: S311 - reproducible damage, not secrets
    expected = _state(STEPS[-2])
    counts = dict.fromkeys(KINDS, 0)
    per_file = dict.fromkeys(files, 0)
    names = sorted(files)
    resumed = 0
    for i in range(trials + controls):
        name = rng.choice(names)
        kind = "bit_flip" if i >= trials else rng.choices(KINDS, KIND_WEIGHTS)[0]
        damaged, what = _damage(files[name], kind, rng)
        path = newest / name
        path.write_bytes(damaged)
        try:
            if i >= trials:
                missed = ckptguard.verify(newest, checksums=False).ok
                control.trial(f"{name}: {what}: size-only verify said ok" if missed else None)
                continue
            counts[kind] += 1
            per_file[name] += 1
            if ckptguard.verify(newest).ok:
                row.trial(f"{name}: {what}: verify() said ok{_benign(name, files[name], damaged)}")
                continue
            resumed += 1
            resume = _resume_problem(root, expected)
            row.trial(f"{name}: {what}: {resume}" if resume else None)
        finally:
            path.write_bytes(files[name])
    row.figures = {
        "seed": SEED,
        **{f"{kind}s": n for kind, n in counts.items()},
        "resume_checked": resumed,
        **{f"on_{n}": c for n, c in per_file.items()},
    }
    control.figures = {"seed": SEED, "bit_flips": control.trials, "missed": control.failures}
    return [row, control]


def _sweep_positions(manifest: bytes, *, full: bool, rng: random.Random) -> list[int]:
    """Byte positions of the manifest to flip: all, or its metrics, tail and a sample."""
    if full:
        return list(range(len(manifest)))
    start = manifest.index(b'"metrics"')
    end = manifest.index(b'"metadata"')
    chosen = set(range(start, end)) | set(range(len(manifest) - 8, len(manifest)))
    chosen |= set(rng.sample(range(len(manifest)), 24))
    return sorted(chosen)


def _sweep_row(newest: Path, manifest: bytes, *, full: bool) -> Row:
    row = Row(
        SCENARIO,
        f"every single-bit flip, truncation and one-byte append of {MANIFEST_NAME} fails verify()",
    )
    rng = random.Random(SEED + 1)  # noqa: S311 - reproducible damage, not secrets
    positions = _sweep_positions(manifest, full=full, rng=rng)
    lengths = (
        range(len(manifest))
        if full
        else sorted(
            set(range(len(manifest) - 8, len(manifest))) | set(rng.sample(range(len(manifest)), 24))
        )
    )
    cases: list[tuple[bytes, str]] = []
    for pos in positions:
        for bit in range(8):
            out = bytearray(manifest)
            out[pos] ^= 1 << bit
            cases.append((bytes(out), f"bit {bit} of byte {pos} ({manifest[pos : pos + 1]!r})"))
    cases += [(manifest[:n], f"truncated to {n} of {len(manifest)} bytes") for n in lengths]
    cases += [(manifest + bytes([b]), f"{bytes([b])!r} appended") for b in range(256)]
    path = newest / MANIFEST_NAME
    try:
        for damaged, what in cases:
            path.write_bytes(damaged)
            if ckptguard.verify(newest).ok:
                row.trial(f"{what}: verify() said ok" + _benign(MANIFEST_NAME, manifest, damaged))
            else:
                row.trial(None)
    finally:
        path.write_bytes(manifest)
    row.figures = {
        "manifest_bytes": len(manifest),
        "bit_flips": 8 * len(positions),
        "truncations": len(lengths),
        "appends": 256,
        "positions": "all" if full else len(positions),
    }
    return row


def run(full: bool, work: Path) -> list[Row]:
    """The rows of the corruption scenario (see the module docstring)."""
    root, newest, files = _build(work)
    with _quiet():
        rows = _random_rows(
            root, newest, files, trials=10_000 if full else 200, controls=1000 if full else 50
        )
        rows.insert(1, _sweep_row(newest, files[MANIFEST_NAME], full=full))
    if not ckptguard.verify(newest).ok:  # every trial put the original bytes back
        rows[0].fail(f"{newest} does not verify after the trials: originals not restored")
    return rows
