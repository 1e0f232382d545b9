"""Verification of a committed checkpoint against its manifest, on any storage.

A checkpoint verifies when its manifest parses strictly and names this checkpoint, every
listed file exists as a regular file with the listed size and xxh3-128 checksum, and no
other file, symlink or special file lies where its files lie (the whole directory on a
POSIX filesystem; the save's own ``<save id>/`` prefix on an object store). Files are
read through :meth:`Storage.open_tree`, which never follows a link.

Written once for every backend: what differs (where the files lie) is the commit
strategy's ``content_prefix``.
"""

from __future__ import annotations

import os
import posixpath
import shlex
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ckptguard._errors import (
    CheckpointError,
    UnsafeManifest,
    UnsupportedFile,
    storage_error_from_os,
)
from ckptguard._format.layout import ACCELERATE_NAMING, HF_NAMING, MANIFEST_NAME
from ckptguard._format.manifest import MAX_MANIFEST_BYTES, Manifest
from ckptguard._storage.base import is_url
from ckptguard._storage.local import LocalStorage

if TYPE_CHECKING:
    from collections.abc import Callable

    from ckptguard._storage.base import CheckpointTree, Storage

__all__ = ["VerifyReport", "read_manifest_from", "verify_checkpoint"]

MAX_PROBLEMS = 100


@dataclass(frozen=True)
class VerifyReport:
    """The outcome of verifying one checkpoint; ``ok`` is True only with no problems."""

    path: str
    ok: bool
    problems: list[str]
    manifest: Manifest | None = None
    files_checked: int = 0
    bytes_checked: int = 0
    checksums: bool = True
    extra: dict[str, object] = field(default_factory=dict)
    # What does not make it invalid but deserves a look (a stray file beside a state).
    warnings: list[str] = field(default_factory=list)

    @property
    def step(self) -> int | None:
        return self.manifest.step if self.manifest else None


class _Problems(list[str]):
    def add(self, text: str) -> None:
        if len(self) < MAX_PROBLEMS:
            self.append(text)
        elif len(self) == MAX_PROBLEMS:
            self.append("... more problems not shown")


def read_manifest_from(tree: CheckpointTree) -> Manifest:
    """Read and strictly parse a checkpoint's manifest; UnsafeManifest if it cannot be."""
    try:
        data = tree.read_small(MANIFEST_NAME, MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        raise UnsafeManifest(f"no {MANIFEST_NAME} in {tree.path}", path=tree.path) from None
    except UnsupportedFile as exc:
        raise UnsafeManifest(exc.message, path=tree.path) from None
    except ValueError as exc:
        raise UnsafeManifest(str(exc), path=tree.path) from None
    except CheckpointError:
        raise
    except OSError as exc:  # EIO, ENXIO (a socket), EACCES...: typed, with the step
        raise storage_error_from_os(exc, f"reading {MANIFEST_NAME}", tree.path) from exc
    return Manifest.from_json(data, path=f"{tree.path.rstrip('/')}/{MANIFEST_NAME}")


def _expected_name(path: str, expect_name: str | None) -> str | None:
    """The name a checkpoint must have been committed under, because its name gives its step.

    By default, that is its own name when that is a step name (``checkpoint-N``,
    ``checkpoint_N``); a copy under another kind of name (Hugging Face's
    ``last-checkpoint``, ``best``) and staging or trash entries are not checked.
    """
    if expect_name is not None:
        return expect_name
    base = (
        posixpath.basename(path.rstrip("/"))
        if is_url(path)
        else os.path.basename(os.path.abspath(path))
    )
    steps = (HF_NAMING.step(base), ACCELERATE_NAMING.step(base))
    return base if steps != (None, None) else None


def verify_checkpoint(
    storage: Storage,
    path: str,
    *,
    content_prefix: Callable[[Manifest], str],
    checksums: bool = True,
    progress: Callable[[int], None] | None = None,
    expect_name: str | None = None,
    open_tree: Callable[[str], CheckpointTree] | None = None,
) -> VerifyReport:
    """Verify the checkpoint at ``path`` on ``storage`` (see the module docstring).

    ``open_tree``: how to open it, if not ``storage.open_tree`` (from a root's listing).
    """
    problems = _Problems()
    try:
        tree = (open_tree or storage.open_tree)(path)
    except FileNotFoundError:
        return VerifyReport(path, ok=False, problems=[f"{path} does not exist"])
    except UnsupportedFile as exc:
        return VerifyReport(path, ok=False, problems=[exc.message])
    except CheckpointError as exc:
        return _unreadable(path, f"cannot read {path}: {exc.message}", exc)
    except OSError as exc:
        return _unreadable(path, f"{path}: {exc.strerror or exc}", exc)
    try:
        try:
            manifest = read_manifest_from(tree)
        except UnsafeManifest as exc:
            return VerifyReport(path, ok=False, problems=[exc.message])
        except CheckpointError as exc:
            return _unreadable(path, f"cannot read {MANIFEST_NAME}: {exc}", exc)
        except OSError as exc:
            return _unreadable(path, f"cannot read {MANIFEST_NAME} ({exc.strerror or exc})", exc)
        # Resume goes by the name's step: an older checkpoint copied in under a newer name
        # would be taken for that step.
        expected = _expected_name(path, expect_name)
        if expected is not None and expected != manifest.name:
            problems.add(
                f"the manifest was written for {manifest.name}, but this directory is "
                f"{expected} (a copy or a rename): its step cannot be trusted; rename it "
                f"{manifest.name}"
            )
        under = content_prefix(manifest)
        try:
            found = tree.entries(under, problems.add)
        except (CheckpointError, OSError) as exc:
            return _unreadable(path, f"cannot list {path}: {exc}", exc)
        found.pop(MANIFEST_NAME, None)
        files = bytes_checked = 0
        read_error: BaseException | None = None
        for entry in manifest.files:
            size = found.get(entry.path)
            if size is None:
                problems.add(f"{entry.path}: {_why_missing(tree, entry.path)}")
                continue
            if size != entry.size:
                problems.add(f"{entry.path}: size {size}, manifest says {entry.size}")
                continue
            if checksums:
                try:
                    digest = tree.digest(entry.path, progress)
                except UnsupportedFile as exc:
                    problems.add(exc.message)
                    continue
                except (CheckpointError, OSError) as exc:
                    problems.add(f"{entry.path}: read error ({getattr(exc, 'strerror', exc)})")
                    read_error = read_error or exc
                    continue
                bytes_checked += digest.size
                if digest.size != entry.size or digest.checksum != entry.checksum:
                    problems.add(
                        f"{entry.path}: checksum mismatch (content altered)"
                        + shared_damage_note(path, entry.path)
                    )
                    continue
            files += 1
        warnings = _strays(
            path, manifest, {r: found[r] for r in set(found) - listed_of(manifest)}, problems
        )
    finally:
        tree.close()
    return VerifyReport(
        path,
        ok=not problems,
        problems=list(problems),
        manifest=manifest,
        files_checked=files,
        bytes_checked=bytes_checked,
        checksums=checksums,
        extra={} if read_error is None else {"error": read_error},
        warnings=warnings,
    )


def listed_of(manifest: Manifest) -> set[str]:
    return {f.path for f in manifest.files}


def _strays(
    path: str, manifest: Manifest, strays: dict[str, int], problems: _Problems
) -> list[str]:
    """Files the manifest does not list: warnings beside a state, problems elsewhere.

    A state saved by ``CheckpointManager.save`` is read back file by file as its manifest
    lists them, so a stray (``notes.txt`` dropped in by hand) changes nothing that is
    restored. A framework loads its own files by name and may pick one up, so there it
    stays an error that says how to remove it.
    """
    warnings = []
    flags = manifest.metadata.get("ckptguard")
    state = isinstance(flags, dict) and flags.get("kind") == "state"
    for rel in sorted(strays):
        size = strays[rel]
        if state:
            warnings.append(
                f"{rel}: extra file not in the manifest ({size} bytes); restore ignores it"
            )
        else:
            where = f"{path.rstrip('/')}/{rel}"
            problems.add(
                f"{rel}: extra file not in the manifest ({size} bytes): the framework that "
                f"loads this checkpoint may read it; if it is not part of the checkpoint, "
                f"remove it (rm {shlex.quote(where)}) and verify again"
            )
    return warnings


def _unreadable(path: str, problem: str, exc: BaseException) -> VerifyReport:
    """A report of a checkpoint that could not be read: ``extra["error"]`` keeps why.

    Callers that must tell an I/O failure from damage (the check right after a commit)
    look there; ``problems`` reads the same either way.
    """
    return VerifyReport(path, ok=False, problems=[problem], extra={"error": exc})


def _why_missing(tree: CheckpointTree, rel: str) -> str:
    """Why a listed file was not found: missing, or a link in its path."""
    try:
        tree.open(rel).close()
    except UnsupportedFile as exc:
        return exc.message.removeprefix(f"{rel}: ")
    except (CheckpointError, OSError):
        return "missing"
    return "missing"


def sharing_checkpoints(checkpoint: str, rel: str) -> list[str]:
    """The sibling checkpoints holding the same file on disk as ``rel``.

    Incremental saves link files (see ``_state/reuse.py``); empty for object stores or
    a file with one name.
    """
    path = os.path.join(checkpoint, rel)
    try:
        st = os.stat(path, follow_symlinks=False)
    except (OSError, ValueError):
        return []
    if st.st_nlink < 2:
        return []
    ident = (st.st_dev, st.st_ino)
    root, me = os.path.split(os.path.normpath(checkpoint))
    found = []
    try:
        siblings = sorted(e.name for e in os.scandir(root) if e.is_dir(follow_symlinks=False))
    except OSError:
        return []
    for name in siblings:
        if name == me or name.startswith("."):
            continue
        try:
            with os.scandir(os.path.join(root, name)) as entries:
                for entry in entries:
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    other = entry.stat(follow_symlinks=False)
                    if (other.st_dev, other.st_ino) == ident:
                        found.append(name)
                        break
        except OSError:
            continue
    return found


def shared_damage_note(checkpoint: str, rel: str) -> str:
    """For a damaged file: which other checkpoints share it (and are damaged too)."""
    others = sharing_checkpoints(checkpoint, rel)
    if not others:
        return ""
    return (
        f"; the same file on disk is part of {', '.join(others)} too (an incremental save "
        "linked it): they are damaged as well"
    )


def verify_local(
    path: str | os.PathLike[str],
    *,
    checksums: bool = True,
    progress: Callable[[int], None] | None = None,
    expect_name: str | None = None,
) -> VerifyReport:
    """:func:`verify_checkpoint` of a local checkpoint directory (the rename strategy)."""
    return verify_checkpoint(
        LocalStorage(),
        os.fspath(path),
        content_prefix=lambda _m: "",
        checksums=checksums,
        progress=progress,
        expect_name=expect_name,
    )


def read_manifest_local(path: str | os.PathLike[str]) -> Manifest:
    """Read and strictly parse the manifest of the local checkpoint directory ``path``."""
    try:
        tree = LocalStorage().open_tree(os.fspath(path))
    except UnsupportedFile as exc:
        raise UnsafeManifest(exc.message, path=os.fspath(path)) from None
    try:
        return read_manifest_from(tree)
    finally:
        tree.close()
