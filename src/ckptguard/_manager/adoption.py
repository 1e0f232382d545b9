"""Checkpoints written before ckptguard: resumed after a structural check, then sealed.

A run started without ckptguard (a Trainer's ``checkpoint-500``, Accelerate's
``checkpoint_3``) has no manifests, so nothing can be checksummed against. Throwing the
run away is worse than resuming from its newest checkpoint that *looks* complete, with a
warning. A structural check catches what a crash or a partial copy leaves:

- at least one weights file (``*.safetensors``, or ``model*``/``pytorch_model*``/
  ``adapter_model*`` as ``.bin``, ``.pt`` or ``.pth``; an optimizer alone is no model);
- every ``*.safetensors`` header parses, and its tensors lie within the file (a
  truncated file fails);
- every ``*.bin``/``*.pt``/``*.pth``/``*.ckpt`` is a ``torch.save`` zip whose central
  directory parses (it is written last: a truncated file fails);
- every ``*.json`` parses (``trainer_state.json``, ``config.json``, sharded indexes), and
  each shard a ``*.index.json`` names is there;
- no empty file, no symlink.

A single-file checkpoint written without ckptguard (Lightning's ``epoch=1-step=20.ckpt``)
is checked as a ``torch.save`` zip; adopting it writes its checksum sidecar (see
``_protocol/filecommit.py``), the file itself untouched.

``ckptguard adopt ROOT`` seals such checkpoints: each is staged as hard links to its own
files (no copy, no extra space), sealed with a manifest (every file checksummed) and
committed in place of the original, which is kept in quarantine (same inodes) until
``ckptguard clean`` removes it. From then on it is verified like any other.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ckptguard._errors import CorruptCheckpoint
from ckptguard._format.layout import MANIFEST_NAME
from ckptguard._format.safetensors import MAX_HEADER_BYTES, parse_header
from ckptguard._protocol.filecommit import (
    Sidecar,
    new_entry,
    sidecar_path,
    write_sidecar,
    zip_problem,
)
from ckptguard._storage.local import digest_fd

if TYPE_CHECKING:
    from ckptguard._format.layout import Naming
    from ckptguard._protocol.strategy import CommitResult

__all__ = [
    "Adoptable",
    "adopt",
    "adoptable",
    "adoptable_files",
    "newest_adoptable",
    "structural_problems",
]

_log = logging.getLogger("ckptguard.adoption")
WEIGHTS = ("model", "pytorch_model", "adapter_model")  # names of weights saved as pickles
ZIPPED = (".bin", ".pt", ".pth", ".ckpt")
MAX_JSON_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Adoptable:
    """A checkpoint without a manifest, and what its structural check found."""

    step: int
    path: str
    problems: list[str]
    size_bytes: int

    @property
    def ok(self) -> bool:
        return not self.problems


def _check_safetensors(path: str, size: int) -> str | None:
    try:
        with open(path, "rb") as f:
            prefix = f.read(min(size, 8 + MAX_HEADER_BYTES))
        parse_header(prefix, size, path)
    except CorruptCheckpoint as exc:
        return exc.message
    except OSError as exc:
        return f"{path}: cannot read ({exc.strerror or exc})"
    return None


def _check_zip(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            problem = zip_problem(f)
    except OSError as exc:
        return f"{path}: cannot read ({exc.strerror or exc})"
    return None if problem is None else f"{path}: {problem}"


def _check_json(path: str, size: int, present: set[str], rel: str) -> list[str]:
    if size > MAX_JSON_BYTES:
        return [f"{path}: {size} bytes of JSON is too large to check"]
    try:
        with open(path, "rb") as f:
            obj = json.loads(f.read())
    except (ValueError, OSError) as exc:
        return [f"{path}: not valid JSON ({exc})"]
    problems = []
    if rel.endswith(".index.json") and isinstance(obj, dict):
        shards = obj.get("weight_map")
        base = os.path.dirname(rel)
        problems += [
            f"{path}: names shard {shard}, which is missing"
            for shard in sorted(set(shards.values()) if isinstance(shards, dict) else ())
            if os.path.normpath(os.path.join(base, str(shard))) not in present
        ]
    if os.path.basename(rel) == "trainer_state.json" and (
        not isinstance(obj, dict) or not isinstance(obj.get("global_step"), int)
    ):
        problems.append(f"{path}: no global_step")
    return problems


def _is_weights(rel: str) -> bool:
    name = os.path.basename(rel)
    return name.endswith(".safetensors") or (
        name.startswith(WEIGHTS) and name.endswith((".bin", ".pt", ".pth"))
    )


def structural_problems(path: str) -> list[str]:
    """What makes ``path`` (a checkpoint directory without a manifest) look incomplete."""
    return _survey(path)[0]


def _survey(path: str) -> tuple[list[str], int]:
    """(structural problems of ``path``, bytes of its files): one walk for both."""
    if os.path.islink(path) or not os.path.isdir(path):
        return [f"{path} is not a directory"], 0
    sizes: dict[str, int] = {}
    problems: list[str] = []
    for top, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            full = os.path.join(top, name)
            if os.path.islink(full):
                problems.append(f"{full}: a symlink")
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(top, d))]
        for name in files:
            full = os.path.join(top, name)
            if not os.path.islink(full):
                sizes[os.path.relpath(full, path)] = os.lstat(full).st_size
    if not any(_is_weights(rel) for rel in sizes):
        problems.append(f"{path}: no weights file (*.safetensors, model*.bin, ...)")
    for rel, size in sorted(sizes.items()):
        full = os.path.join(path, rel)
        if size == 0:
            problems.append(f"{full}: empty")
        elif rel.endswith(".safetensors"):
            problems.extend(filter(None, [_check_safetensors(full, size)]))
        elif rel.endswith(ZIPPED):
            problems.extend(filter(None, [_check_zip(full)]))
        elif rel.endswith(".json"):
            problems.extend(_check_json(full, size, set(sizes), rel))
    return problems, sum(sizes.values())


def adoptable(root: str, naming: Naming) -> list[Adoptable]:
    """The step-named checkpoints of ``root`` without a manifest, newest first."""
    found = []
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    for name in names:
        step = naming.step(name)
        path = os.path.join(root, name)
        if step is None or os.path.lexists(os.path.join(path, MANIFEST_NAME)):
            continue
        if os.path.islink(path) or not os.path.isdir(path):
            continue
        problems, size = _survey(path)
        found.append(Adoptable(step, path, problems, size))
    return sorted(found, key=lambda a: (a.step, a.path), reverse=True)


_STEP_IN_NAME = re.compile(r"(?:^|[^A-Za-z0-9])step=([0-9]+)")  # Lightning's default names


def adoptable_files(root: str) -> list[Adoptable]:
    """The ``.ckpt`` files of ``root`` without a checksum sidecar, newest step first.

    A file without ``step=N`` in its name (``last.ckpt``) counts as step -1; links are
    left out (their target is considered on its own).
    """
    found = []
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    for name in names:
        path = os.path.join(root, name)
        if name.startswith(".") or not name.endswith(".ckpt") or os.path.islink(path):
            continue
        if not os.path.isfile(path) or os.path.lexists(sidecar_path(path)):
            continue
        match = _STEP_IN_NAME.search(name)
        problem = _check_zip(path)
        size = os.lstat(path).st_size
        found.append(
            Adoptable(
                int(match.group(1)) if match else -1, path, [problem] if problem else [], size
            )
        )
    return sorted(found, key=lambda a: (a.step, a.path), reverse=True)


def _adopt_file(candidate: Adoptable) -> None:
    """Write the checksum sidecar of a complete ``.ckpt`` file written without ckptguard."""
    fd = os.open(candidate.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        digest = digest_fd(fd)
    finally:
        os.close(fd)
    name = os.path.basename(candidate.path)
    entry = new_entry(
        name,
        digest,
        step=candidate.step if candidate.step >= 0 else None,
        metadata={"ckptguard": {"kind": "files", "pinned": False, "adopted": True}},
    )
    write_sidecar(candidate.path, Sidecar(name, (entry,)))


def newest_adoptable(root: str, naming: Naming, *, newer_than: int | None) -> Adoptable | None:
    """The newest manifest-less checkpoint that passes the structural check, or None.

    Only one newer than the newest verified checkpoint (``newer_than``) is taken; the
    ones passed over are logged with why.
    """
    for candidate in adoptable(root, naming):
        if newer_than is not None and candidate.step <= newer_than:
            return None
        if candidate.ok:
            _log.warning(
                "%s was written without ckptguard (no manifest): resuming from it after a "
                "structural check only; its bytes were NOT checksummed. `ckptguard adopt %s "
                "--yes` seals it (and the others) with manifests",
                candidate.path, root,
            )  # fmt: skip
            return candidate
        _log.warning(
            "skipping %s (written without ckptguard): %s",
            candidate.path, "; ".join(candidate.problems),
        )  # fmt: skip
    return None


def _link_tree(source: str, target: str) -> None:
    """Hard-link every file of ``source`` into ``target`` (directories made as needed)."""
    for top, dirs, files in os.walk(source):
        rel = os.path.relpath(top, source)
        for d in dirs:
            os.makedirs(os.path.join(target, rel, d), mode=0o700, exist_ok=True)
        for f in files:
            os.link(os.path.join(top, f), os.path.join(target, rel, f))


def adopt(candidate: Adoptable, *, framework: str | None = None) -> CommitResult | None:
    """Seal ``candidate`` with a manifest, in place (see the module docstring).

    A single file gets its sidecar (and None is returned); a directory is committed
    over itself, and its :class:`CommitResult` returned.

    Refuses (CorruptCheckpoint) one that fails the structural check: a manifest would
    vouch for a broken checkpoint.
    """
    from ckptguard._protocol.transaction import AtomicCheckpoint  # noqa: PLC0415 - cycle

    if not candidate.ok:
        raise CorruptCheckpoint(
            f"not adopting {candidate.path}: {'; '.join(candidate.problems)}",
            path=candidate.path,
            problems=candidate.problems,
            hint="a crash or a partial copy left it incomplete; resume from an earlier one",
        )
    if os.path.isfile(candidate.path):
        _adopt_file(candidate)
        return None
    metadata = {"ckptguard": {"kind": "files", "pinned": False, "adopted": True}}
    if framework is not None:
        metadata["framework"] = framework  # type: ignore[assignment]
    tx = AtomicCheckpoint(
        candidate.path, step=candidate.step, metadata=metadata, if_exists="replace"
    )
    with tx as staging:
        _link_tree(candidate.path, os.fspath(staging))
    if tx.result is None:  # pragma: no cover - a with-block that did not raise committed
        raise CorruptCheckpoint(f"adopting {candidate.path} did not commit", path=candidate.path)
    return tx.result
