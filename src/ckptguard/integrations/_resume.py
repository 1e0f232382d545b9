"""Choosing, and checking, the checkpoint a framework resumes from (all ranks agree).

Frameworks load checkpoint files themselves; ckptguard's part is to hand them a directory
that verifies (every file checksummed against the manifest) and the same one on every
rank. One process per node verifies (``LOCAL_RANK`` 0): on a shared root each node checks
once, on node-local roots each node checks its own copy. Two collectives at most.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from ckptguard._coordination.base import gather_failures
from ckptguard._errors import (
    CheckpointError,
    CorruptCheckpoint,
    NoValidCheckpoint,
    RankFailure,
    UnsupportedRoot,
)
from ckptguard._format.layout import MANIFEST_NAME, META_DIR
from ckptguard._manager.adoption import newest_adoptable, structural_problems
from ckptguard._protocol.recovery import recover
from ckptguard._protocol.verify import verify_local as verify
from ckptguard._storage.base import is_url

if TYPE_CHECKING:
    from ckptguard._coordination.base import Coordinator
    from ckptguard._manager.manager import CheckpointManager

__all__ = [
    "agreed_latest",
    "check_resume_path",
    "local_dir",
    "raise_choice_failures",
    "repair_root",
]

_log = logging.getLogger("ckptguard.integrations")


def local_dir(path: str | os.PathLike[str], *, who: str, framework: str) -> str:
    """``path`` as a local path; UnsupportedRoot for a URL, before anything is written.

    The frameworks write and read their checkpoint files with local file APIs: given
    ``s3://bucket/run`` they would create a local folder named ``s3:`` and the user would
    believe the checkpoints were off the node.
    """
    text = os.fspath(path)
    if is_url(text):
        raise UnsupportedRoot(
            f"{who}: {text} is an object-store URL, but {framework} writes and reads its "
            "checkpoints through local files; ckptguard wrote nothing (if the framework "
            f"already made a local folder named '{text.split('://', 1)[0]}:' in the "
            "working directory, remove it)",
            path=text,
            hint="give a local or shared-filesystem directory; protect(..., mirror=URL) "
            "and the frameworks' object-store outputs are described in the docs (Object "
            "stores), and for files you write yourself use "
            "ckptguard.atomic_checkpoint(URL + '/name')",
        )
    return text


def repair_root(root: str) -> None:
    """Repair what a crash left in a ckptguard root before reading it.

    A save that replaces a checkpoint and is killed between its two renames leaves the old
    checkpoint in the root's trash and nothing under its name: recovery renames it back.
    Stale staging dirs go too. A directory that is not a ckptguard root is left alone.
    """
    if not os.path.isdir(os.path.join(root, META_DIR)):
        return
    try:
        recover(root, checksums=False)
    except (OSError, CheckpointError) as exc:  # a read-only mount, a busy lock: read anyway
        _log.warning("could not repair %s before reading it (%s); reading it as it is", root, exc)


def raise_choice_failures(manager: CheckpointManager, proposals: list[dict[str, Any]]) -> None:
    """RankFailure naming every rank whose proposal carries an ``error``; else nothing."""
    failures = {r: str(p["error"]) for r, p in enumerate(proposals) if p.get("error")}
    if failures:
        raise RankFailure(
            f"choosing the checkpoint to resume from in {manager.root} failed on rank(s) "
            f"{sorted(failures)}",
            path=manager.root,
            failures=failures,
            hint="see each rank's failure; `ckptguard list ROOT` shows every checkpoint",
        )


def _leader(coord: Coordinator) -> bool:
    return coord.world_size == 1 or coord.local_rank == 0


def _gather_errors(coord: Coordinator, error: str | None, what: str, path: str) -> None:
    if coord.world_size == 1:
        return
    if failures := gather_failures(coord, error):
        raise RankFailure(
            f"{what} failed on rank(s) {sorted(failures)}",
            path=path,
            failures=failures,
            hint="see each rank's failure; `ckptguard verify PATH` tells why a checkpoint "
            "does not verify",
        )


def agreed_latest(manager: CheckpointManager) -> str | None:
    """The newest checkpoint of ``manager``'s root that verifies on every node, or None.

    Each node's verifying process proposes its newest valid step; the oldest proposal wins
    (a node-local root may lag behind by a save that another node committed) and is then
    checked on every node.
    """
    coord = manager.coordinator
    newest: int | None = None
    error: str | None = None
    if _leader(coord):
        try:
            info = manager.latest()  # verifies newest first, logs each one it skips
            newest = None if info is None else info.step
            # A checkpoint written before ckptguard (no manifest) that is newer and looks
            # complete: resumed with a warning rather than the run thrown away.
            older = newest_adoptable(manager.root, manager.naming, newer_than=newest)
            newest = older.step if older is not None else newest
        except Exception as exc:  # every rank must hear of it, or the others hang
            error = f"{type(exc).__name__}: {exc}"
    if coord.world_size == 1:
        if error is not None:  # pragma: no cover - latest() raises directly with one process
            raise RuntimeError(error)
        return None if newest is None else os.path.join(manager.root, manager.naming.name(newest))
    proposals = coord.all_gather({"step": newest, "error": error, "leader": _leader(coord)})
    raise_choice_failures(manager, proposals)
    steps = [p["step"] for p in proposals if p["leader"]]
    if not steps or any(s is None for s in steps):
        return None
    step = min(int(s) for s in steps)
    path = os.path.join(manager.root, manager.naming.name(step))
    if any(int(s) != step for s in steps):
        _log.warning("nodes disagree on the newest valid checkpoint (%s); trying %s", steps, path)
        check_resume_path(path, coord)
    return path


def check_resume_path(path: str, coord: Coordinator) -> None:
    """Raise unless ``path`` verifies on every node.

    A directory without a manifest (not written by ckptguard) is let through with a
    warning: there is nothing to check it by.
    """
    error: str | None = None
    if _leader(coord):
        try:
            _check_one(path)
        except Exception as exc:
            if coord.world_size == 1:
                raise
            error = f"{type(exc).__name__}: {exc}"
    _gather_errors(coord, error, f"checking {path} before resuming", path)


def _check_one(path: str) -> None:
    repair_root(os.path.dirname(os.path.abspath(path)))
    if not os.path.isdir(path):
        raise NoValidCheckpoint(
            f"cannot resume from {path}: no such directory",
            path=path,
            hint="check the path; `ckptguard list ROOT` shows the checkpoints that verify",
        )
    if not os.path.lexists(os.path.join(path, MANIFEST_NAME)):
        if problems := structural_problems(path):
            raise CorruptCheckpoint(
                f"refusing to resume from {path} (written without ckptguard, no manifest): "
                f"{'; '.join(problems)}",
                path=path,
                problems=problems,
                hint="it looks incomplete (a crash or a partial copy); resume from an "
                "earlier checkpoint",
            )
        _log.warning(
            "%s has no ckptguard manifest (written without ckptguard?): resuming from it "
            "after a structural check only, its bytes NOT checksummed; `ckptguard adopt "
            "ROOT --yes` seals it",
            path,
        )
        return
    report = verify(path)
    if not report.ok:
        raise CorruptCheckpoint(
            f"refusing to resume from {path}: {'; '.join(report.problems)}",
            path=path,
            problems=report.problems,
        )
