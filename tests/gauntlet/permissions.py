"""Permissions, and a staging dir swapped for a symlink.

Rows:
- staging dirs are 0700 while they are written, whatever the umask (0, 002, 022, 077),
  for ``CheckpointManager.save`` and for ``atomic_checkpoint`` with the user's own files;
- committed checkpoints: no file or directory writable by group or others, whatever the
  umask, unless configured (``dir_mode`` with those bits: then the user's bits are kept);
- a staging dir replaced by a symlink to another directory at each step of the save
  before the final rename: the save is refused with a typed error, ckptguard writes
  nothing through the link, and nothing is committed.
"""

from __future__ import annotations

import contextlib
import glob
import os
import stat
import tempfile
from typing import TYPE_CHECKING

import numpy as np

import ckptguard
from ckptguard._errors import CheckpointError
from ckptguard._format.layout import RootLayout
from ckptguard.testing import on_step
from gauntlet import Row

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

UMASKS = (0o000, 0o002, 0o022, 0o077)
OTHERS_WRITE = 0o022
SWAP_STEPS = (
    "stage.created",
    "seal.files_synced",
    "seal.manifest_written",
    "seal.done",
    "commit.before_rename",
)


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def _staging_dirs(root: str) -> list[str]:
    return glob.glob(os.path.join(RootLayout(root).staging, "*"))


def _save_manager(root: str, step: int, dir_mode: int | None) -> None:
    del dir_mode  # the manager has no such option: its files are its own (0644)
    with ckptguard.CheckpointManager(root, check_environment=False) as mgr:
        mgr.save(step, {"w": np.arange(8.0), "nested": {"b": np.ones(3)}})


def _save_atomic(root: str, step: int, dir_mode: int | None) -> None:
    with ckptguard.atomic_checkpoint(
        os.path.join(root, f"checkpoint-{step}"), dir_mode=dir_mode
    ) as staging:
        (staging / "model.bin").write_bytes(b"m" * 100)
        (staging / "sub").mkdir()
        (staging / "sub" / "opt.bin").write_bytes(b"o" * 10)


SAVERS: dict[str, Callable[[str, int, int | None], None]] = {
    "save": _save_manager,
    "atomic": _save_atomic,
}


def _modes(path: str) -> dict[str, int]:
    out = {".": stat.S_IMODE(os.lstat(path).st_mode)}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            out[os.path.relpath(full, path)] = stat.S_IMODE(os.lstat(full).st_mode)
    return out


def _mode_rows(work: Path) -> tuple[Row, Row]:
    staging_row = Row("permissions", "staging dirs are 0700 while written, whatever the umask")
    final_row = Row(
        "permissions",
        "committed files and dirs are not group- or world-writable unless configured",
    )
    step = 0
    for mask in UMASKS:
        for label, save in SAVERS.items():
            step += 1
            root = str(work / f"modes-{label}-{mask:03o}")
            seen: list[int] = []

            def look(point: str, root: str = root, seen: list[int] = seen) -> None:
                if point in {"stage.created", "seal.files_synced"}:
                    seen.extend(stat.S_IMODE(os.lstat(d).st_mode) for d in _staging_dirs(root))

            with _umask(mask), on_step(look):
                save(root, step, None)
            bad = [oct(m) for m in seen if m != 0o700]
            staging_row.trial(
                f"{label}, umask {mask:03o}: staging modes {bad}" if bad or not seen else None
            )
            modes = _modes(os.path.join(root, f"checkpoint-{step}"))
            writable = {k: oct(m) for k, m in modes.items() if m & OTHERS_WRITE}
            final_row.trial(
                f"{label}, umask {mask:03o}: writable by others: {writable}" if writable else None
            )
    # Configured: a group-writable dir_mode keeps the user's group write bits.
    root = str(work / "modes-configured")
    with _umask(0o002):
        _save_atomic(root, 1, 0o2775)
    modes = _modes(os.path.join(root, "checkpoint-1"))
    ok = modes["."] == 0o2775 and modes["model.bin"] & 0o020
    final_row.trial(None if ok else f"dir_mode=0o2775 was not honoured: {modes}")
    return staging_row, final_row


def _swap_row(work: Path) -> Row:
    row = Row(
        "permissions",
        "a staging dir swapped for a symlink is refused: nothing written through it, "
        "nothing committed",
    )
    for label, save in SAVERS.items():
        for point in SWAP_STEPS:
            root = str(work / f"swap-{label}-{point}")
            _save_manager(root, 1, None)
            outside = tempfile.mkdtemp(dir=work, prefix="outside-")

            def swap(p: str, root: str = root, outside: str = outside, point: str = point) -> None:
                if p == point:
                    for staging in _staging_dirs(root):
                        os.rename(staging, staging + ".moved")
                        os.symlink(outside, staging)

            problem = None
            try:
                with on_step(swap):
                    save(root, 2, None)
                problem = "the save succeeded"
            except CheckpointError:
                pass
            except Exception as exc:
                problem = f"raised {type(exc).__name__}: {exc}"
            final = os.path.join(root, "checkpoint-2")
            user_files = {"model.bin", "sub"} if label == "atomic" else set()
            written = set(os.listdir(outside)) - user_files
            if problem is None and written:
                problem = f"ckptguard wrote through the link: {sorted(written)}"
            if problem is None and os.path.lexists(final):
                problem = f"{final} was committed (link: {os.path.islink(final)})"
            with ckptguard.CheckpointManager(root, check_environment=False) as mgr:
                latest = mgr.latest()
                if problem is None and (latest is None or latest.step != 1):
                    problem = f"the earlier checkpoint is not the newest valid: {latest}"
            row.trial(None if problem is None else f"{label}, swapped at {point}: {problem}")
    return row


def run(full: bool, work: Path) -> list[Row]:
    del full  # the same cases either way: each is one quick save
    staging_row, final_row = _mode_rows(work)
    return [staging_row, final_row, _swap_row(work)]
