"""``ckptguard doctor``: what will break checkpointing, found before a long run starts.

The original failure came from a development build of transformers that no stable release
had; the advice then was: pin stable releases, make sure the output dir is really empty
(hidden files included), know your filesystem. :func:`doctor` checks each of these and says
what to do:

- versions: pre-release, development and local builds of the libraries that write
  checkpoints, and ranges known to break checkpointing (``data/known_bad.json``, with the
  upstream references);
- the root: exists or can be created, writable, free space for the checkpoints kept, the
  filesystem type (``/proc/mounts``) and what it implies, RENAME_NOREPLACE, fsync, hidden
  or foreign entries in a dir that should be empty, leftover staging, trash, quarantine;
- distributed (when a coordinator with several ranks is given): whether every rank sees
  the same root, clock skew between ranks, and the world size against the newest
  checkpoint's.

Every check is OK, WARN or FAIL; the report's exit code is 0, 1 or 2 accordingly.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import re
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from importlib import metadata as _metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from packaging.version import InvalidVersion, Version

from ckptguard._errors import (
    CheckpointError,
    CheckpointNotFound,
    StoragePermissionError,
    StorageUnreachable,
)
from ckptguard._format.layout import MANIFEST_NAME, META_DIR, RootLayout, step_from_name
from ckptguard._protocol.backend import backend_for
from ckptguard._storage.base import innermost, is_url
from ckptguard._storage.local import tree_size

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from ckptguard._coordination.base import Coordinator

__all__ = ["Check", "DoctorReport", "doctor"]

Status = Literal["ok", "warn", "fail"]
WATCHED = (
    "torch",
    "transformers",
    "trl",
    "accelerate",
    "lightning",
    "deepspeed",
    "safetensors",
    "peft",
)
_KNOWN_BAD = Path(__file__).with_name("data") / "known_bad.json"
_FS_NOTES = {
    "nfs": "NFS: rename and fsync semantics depend on the server and mount options; "
    "ckptguard retries transient NFS errors, but keep the root on one export",
    "nfs4": "NFS: rename and fsync semantics depend on the server and mount options; "
    "ckptguard retries transient NFS errors, but keep the root on one export",
    "lustre": "Lustre: directory renames are atomic, but metadata is slow; save less often "
    "and keep few checkpoints",
    "gpfs": "GPFS: works; fsync can be slow on busy clusters",
    "tmpfs": "tmpfs: lives in memory and is lost on reboot or when the job ends; "
    "not a place for checkpoints you want to keep",
    "overlay": "overlay (a container's own filesystem): lost with the container; mount a "
    "volume for the checkpoints",
    "fuse": "FUSE: rename and fsync depend on the implementation (s3fs-fuse, gcsfuse and "
    "similar do not rename directories atomically); prefer an s3:// root in ckptguard",
}
# Looked up through this hook so that tests can substitute installed versions.
version_lookup: Callable[[str], str | None]


@functools.cache
def _installed_version(dist: str) -> str | None:
    """Installed version of ``dist``, looked up once per process.

    Each lookup scans every installed distribution, and every manager start asks.
    """
    try:
        return _metadata.version(dist)
    except _metadata.PackageNotFoundError:
        return None


version_lookup = _installed_version


@dataclass(frozen=True)
class Check:
    """One finding: its name, OK/WARN/FAIL, what was seen and what to do."""

    name: str
    status: Status
    message: str
    advice: str = ""


@dataclass(frozen=True)
class DoctorReport:
    """Every check of one :func:`doctor` run."""

    root: str | None
    checks: list[Check] = field(default_factory=list)

    @property
    def worst(self) -> Status:
        statuses = {c.status for c in self.checks}
        return "fail" if "fail" in statuses else "warn" if "warn" in statuses else "ok"

    @property
    def exit_code(self) -> int:
        return {"ok": 0, "warn": 1, "fail": 2}[self.worst]

    @property
    def ok(self) -> bool:
        return self.worst != "fail"

    def problems(self) -> list[Check]:
        return [c for c in self.checks if c.status != "ok"]

    def to_json(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "status": self.worst,
            "exit_code": self.exit_code,
            "checks": [asdict(c) for c in self.checks],
        }


# -- versions -------------------------------------------------------------------------------
# Local version labels of regular builds (torch's +cpu, +cu121, +rocm6.1, +xpu); any other
# local label (+git..., +g1a2b3c) marks a build from source.
_BUILD_VARIANT = re.compile(r"^(cpu|cu\d+|rocm[\d.]+|xpu|mps)$")


def check_versions(known_bad: Path = _KNOWN_BAD) -> list[Check]:
    """Pre-release/dev/local builds, and versions in a range known to break checkpoints."""
    checks: list[Check] = []
    try:
        entries = json.loads(known_bad.read_text())["entries"]
    except (OSError, ValueError, KeyError) as exc:
        entries = []
        checks.append(Check("versions.data", "warn", f"cannot read {known_bad}: {exc}"))
    for dist in WATCHED:
        raw = version_lookup(dist)
        if raw is None:
            continue
        name = f"versions.{dist}"
        try:
            version = Version(raw)
        except InvalidVersion:
            checks.append(
                Check(
                    name,
                    "warn",
                    f"{dist} {raw}: not a PEP 440 version",
                    "install a released version",
                )
            )
            continue
        hits = []
        for entry in entries:
            if entry.get("package") != dist:
                continue
            try:
                # Plain ordering, not a PEP 440 specifier: "<4.49.0" would leave out
                # 4.49.0.dev0, the very build this range is about.
                inside = Version(entry["from"]) <= version < Version(entry["before"])
            except (InvalidVersion, KeyError):
                continue
            if inside:
                hits.append(entry)
        if hits:
            for entry in hits:
                refs = ", ".join(entry.get("references", []))
                checks.append(
                    Check(
                        name,
                        "fail",
                        f"{dist} {raw} is in [{entry['from']}, {entry['before']}): "
                        f"{entry['problem']} ({refs})",
                        entry.get("advice", "install another version"),
                    )
                )
        elif (
            version.is_prerelease
            or version.is_devrelease
            or (version.local is not None and not _BUILD_VARIANT.match(version.local))
        ):
            checks.append(
                Check(
                    name,
                    "warn",
                    f"{dist} {raw} is a pre-release, development or local build",
                    f"pin a stable release of {dist}: the original crash this tool exists "
                    "for came from a development build",
                )
            )
        else:
            checks.append(Check(name, "ok", f"{dist} {raw}"))
    return checks


# -- the root ---------------------------------------------------------------------------------
def _mount_of(path: str, mounts_file: str) -> tuple[str, str] | None:
    """(mount point, filesystem type) of the mount holding ``path``."""
    best: tuple[str, str] | None = None
    try:
        lines = Path(mounts_file).read_text().splitlines()
    except OSError:
        return None
    real = os.path.realpath(path)
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        point = parts[1].replace("\\040", " ")
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best[0])):
            best = (point, parts[2])
    return best


def _existing_parent(path: str) -> str:
    current = os.path.abspath(path)
    while not os.path.exists(current):
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    return current


def _checkpoint_sizes(root: str) -> tuple[int, int] | None:
    """(size of the newest committed checkpoint, size of all of them), or None."""
    steps = []
    with contextlib.suppress(OSError):
        for name in os.listdir(root):
            step = step_from_name(name)
            if step is not None and os.path.isfile(os.path.join(root, name, MANIFEST_NAME)):
                steps.append((step, name))
    if not steps:
        return None
    sizes = {name: tree_size(os.path.join(root, name)) for _, name in steps}
    return sizes[max(steps)[1]], sum(sizes.values())


def check_root(
    root: str,
    *,
    keep: int | None = 3,
    expect_empty: bool = False,
    mounts_file: str = "/proc/mounts",
) -> list[Check]:
    """The root's checks (see the module docstring); creates nothing it does not remove."""
    checks: list[Check] = []
    root = os.path.abspath(root)
    exists = os.path.isdir(root)
    where = root if exists else _existing_parent(root)
    if os.path.exists(root) and not exists:
        return [
            Check(
                "root.exists",
                "fail",
                f"{root} exists and is not a directory",
                "choose another output dir",
            )
        ]
    if not os.access(where, os.W_OK | os.X_OK):
        checks.append(
            Check(
                "root.writable",
                "fail",
                f"{where} is not writable by this user",
                "fix the permissions or choose another output dir",
            )
        )
        return checks
    checks.append(
        Check(
            "root.exists",
            "ok",
            f"{root} exists" if exists else f"{root} does not exist yet; {where} is writable",
        )
    )

    # free space against the last checkpoint x (kept + 1)
    usage = shutil.disk_usage(where)
    sizes = _checkpoint_sizes(root) if exists else None
    if sizes is not None:
        last, existing = sizes
        # ``keep`` checkpoints plus one being written; those on disk already count.
        need = max(last, last * ((keep or 1) + 1) - existing)
        status: Status = "ok" if usage.free >= need else "fail"
        checks.append(
            Check(
                "root.free_space",
                status,
                f"{usage.free / 2**30:.2f} GiB free; the last checkpoint is "
                f"{last / 2**30:.3f} GiB, keeping {keep or 1} + 1 being written needs "
                f"{need / 2**30:.3f} GiB more",
                "" if status == "ok" else "free space, lower keep_last, or use a larger volume",
            )
        )
    else:
        checks.append(
            Check(
                "root.free_space",
                "ok",
                f"{usage.free / 2**30:.1f} GiB free (no checkpoint yet to size)",
            )
        )

    # filesystem type
    mount = _mount_of(where, mounts_file)
    if mount is None:
        checks.append(Check("root.filesystem", "warn", f"no entry in {mounts_file} for {where}"))
    else:
        point, fstype = mount
        base = "fuse" if fstype.startswith("fuse") else fstype
        note = _FS_NOTES.get(base) or _FS_NOTES.get(base.rstrip("0123456789"))
        checks.append(
            Check(
                "root.filesystem",
                "warn" if note else "ok",
                f"{fstype} mounted at {point}" + (f": {note}" if note else ""),
            )
        )

    # rename without replace, and fsync, on the real filesystem (a probe dir, removed)
    probe = os.path.join(where, f".ckptguard-doctor-{uuid.uuid4().hex[:8]}")
    try:
        os.mkdir(probe, 0o700)
    except OSError as exc:
        checks.append(Check("root.probe", "fail", f"cannot create a probe dir in {where}: {exc}"))
        return checks
    try:
        from ckptguard._storage.local import LocalStorage  # noqa: PLC0415

        a, b = os.path.join(probe, "a"), os.path.join(probe, "b")
        os.mkdir(a)
        os.mkdir(b)
        storage = LocalStorage()
        try:
            storage.rename_noreplace(a, b)
            checks.append(
                Check(
                    "root.rename_noreplace",
                    "fail",
                    "a rename replaced an existing directory",
                    "this filesystem cannot refuse to overwrite: do not share "
                    "the root between uncoordinated processes",
                )
            )
        except FileExistsError:
            from ckptguard._storage.local import renameat2_available  # noqa: PLC0415

            how = "RENAME_NOREPLACE" if renameat2_available() else "check-then-rename"
            checks.append(Check("root.rename_noreplace", "ok", f"no-replace renames work ({how})"))
        except OSError as exc:
            checks.append(Check("root.rename_noreplace", "warn", f"rename probe failed: {exc}"))
        try:
            storage.write_bytes(os.path.join(probe, "f"), b"ckptguard", fsync=True)
            storage.fsync_dir(probe)
            checks.append(Check("root.fsync", "ok", "fsync of a file and a directory works"))
        except OSError as exc:
            status = "warn" if exc.errno in {errno.EINVAL, errno.ENOTSUP} else "fail"
            checks.append(
                Check(
                    "root.fsync",
                    status,
                    f"fsync failed: {exc}",
                    "checkpoints here cannot be made durable",
                )
            )
    finally:
        shutil.rmtree(probe, ignore_errors=True)

    if exists:
        checks.extend(_check_contents(root, expect_empty=expect_empty))
    return checks


def _check_contents(root: str, *, expect_empty: bool) -> list[Check]:
    checks: list[Check] = []
    names = sorted(os.listdir(root))
    hidden = [n for n in names if n.startswith(".") and n != META_DIR]
    foreign = [n for n in names if not n.startswith(".") and step_from_name(n) is None]
    if expect_empty and (hidden or foreign):
        checks.append(
            Check(
                "root.empty",
                "fail",
                f"{root} should be empty but holds {len(hidden)} hidden and {len(foreign)} other "
                f"entries: {', '.join((hidden + foreign)[:8])}",
                "empty it (hidden files too: ls -a) or choose a new output dir",
            )
        )
    elif hidden:
        checks.append(
            Check(
                "root.hidden",
                "warn",
                f"hidden entries in {root}: {', '.join(hidden[:8])}",
                "remove what is not yours to keep; tools that count entries "
                "(or glob checkpoint-*) may trip on them",
            )
        )
    else:
        checks.append(Check("root.hidden", "ok", "no hidden entries"))
    layout = RootLayout(root)
    leftovers = {}
    for label, path in (
        ("staging", layout.staging),
        ("trash", layout.trash),
        ("quarantine", layout.quarantine),
    ):
        with contextlib.suppress(OSError):
            entries = [e for e in os.listdir(path) if not e.endswith(".json")]
            if entries:
                leftovers[label] = len(entries)
    if leftovers:
        text = ", ".join(f"{n} in {label}" for label, n in leftovers.items())
        checks.append(
            Check(
                "root.leftovers",
                "warn",
                f"leftovers of earlier runs: {text}",
                f"ckptguard clean {root} --yes (a dry run without --yes)",
            )
        )
    else:
        checks.append(Check("root.leftovers", "ok", "no staging, trash or quarantine leftovers"))
    return checks


# -- distributed ------------------------------------------------------------------------------
def check_distributed(
    root: str | None, coordinator: Coordinator, *, expect_shared: bool | None = None
) -> list[Check]:
    """Same root on every rank (and as configured)? Clock skew? World size vs checkpoint's.

    ``expect_shared``: what the job's configuration says (a Trainer's
    ``save_on_each_node=False`` means shared); a mismatch with what the ranks see fails.
    """
    checks: list[Check] = []
    world = coordinator.world_size
    if root is not None:
        # Rank 0 drops a marker into its root; each rank looks for it in its own root.
        name = coordinator.broadcast(
            f".ckptguard-doctor-{uuid.uuid4().hex[:8]}" if coordinator.rank == 0 else None
        )
        marker = os.path.join(root, name)
        if coordinator.rank == 0:
            with contextlib.suppress(OSError):
                os.makedirs(root, exist_ok=True)
                Path(marker).write_text("doctor")
        coordinator.barrier()
        seen = coordinator.all_gather(os.path.exists(marker))
        coordinator.barrier()
        if coordinator.rank == 0:
            with contextlib.suppress(OSError):
                os.unlink(marker)
        nodes = coordinator.all_gather(coordinator.node)
        if expect_shared is not None and expect_shared != all(seen):
            said, found = ("shared", "node-local") if expect_shared else ("node-local", "shared")
            checks.append(
                Check(
                    "dist.same_root",
                    "fail",
                    f"the configuration says the root is {said}; the ranks find it {found}",
                    "fix the configuration (save_on_each_node for the Hugging Face Trainer) "
                    "or the mounts; ckptguard itself follows what it finds",
                )
            )
        elif all(seen):
            checks.append(Check("dist.same_root", "ok", f"all {world} ranks see the same root"))
        else:
            blind = sorted({nodes[r] for r, s in enumerate(seen) if not s})
            checks.append(
                Check(
                    "dist.same_root",
                    "warn",
                    f"ranks on {', '.join(blind)} do not see rank 0's root: it is node-local",
                    "fine with ckptguard (one committer per node, each node keeps a copy); set "
                    "save_on_each_node=True for the Hugging Face Trainer without ckptguard",
                )
            )
    clocks = coordinator.all_gather(time.time())
    skew = max(clocks) - min(clocks)
    checks.append(
        Check(
            "dist.clock_skew",
            "ok" if skew < 5 else "warn",
            f"clocks differ by up to {skew:.2f} s across {world} ranks",
            "" if skew < 5 else "sync the clocks (chrony/NTP): stale-save detection uses mtimes",
        )
    )
    if root is not None:
        checks.extend(_world_size_against_checkpoint(root, world))
    return checks


def _world_size_against_checkpoint(root: str, world: int) -> list[Check]:
    from ckptguard._protocol.verify import read_manifest_local as read_manifest  # noqa: PLC0415

    steps = []
    with contextlib.suppress(OSError):
        for name in os.listdir(root):
            step = step_from_name(name)
            if step is not None:
                steps.append((step, name))
    for _step, name in sorted(steps, reverse=True):
        try:
            manifest = read_manifest(os.path.join(root, name))
        except Exception:  # noqa: S112 - an unreadable one is skipped, as resume does
            continue
        saved = manifest.writer.world_size
        if saved == world:
            return [Check("dist.world_size", "ok", f"{name} was saved by {saved} ranks, as now")]
        return [
            Check(
                "dist.world_size",
                "warn",
                f"{name} was saved by {saved} ranks; this run has {world}",
                "replicated (data-parallel) state resumes fine; sharded state needs "
                "torch.distributed.checkpoint's resharding (sharded=True saves)",
            )
        ]
    return []


# -- object stores ----------------------------------------------------------------------------
def check_store(url: str, storage_options: Mapping[str, Any] | None = None) -> list[Check]:
    """An object-store root: reachable, credentials accepted, bucket and prefix there."""
    advice = {
        CheckpointNotFound: "check the bucket name in the URL, or create the bucket",
        StorageUnreachable: "check the endpoint (AWS_ENDPOINT_URL or storage_options) "
        "and that the server is up",
        StoragePermissionError: "check the credentials (AWS_ACCESS_KEY_ID/"
        "AWS_SECRET_ACCESS_KEY or storage_options) and the bucket's policy",
    }
    try:
        backend = backend_for(url, storage_options, what="doctor")
        store: Any = innermost(backend.storage)
        store.require_root()  # reachable, credentials accepted, the bucket there
    except (CheckpointError, OSError, ImportError) as exc:
        hint = next((a for cls, a in advice.items() if isinstance(exc, cls)), "")
        return [Check("root.store", "fail", str(exc), hint)]
    checks = [Check("root.store", "ok", f"{backend.root}: reachable, credentials accepted")]
    try:
        if not backend.exists():
            checks.append(
                Check(
                    "root.prefix",
                    "warn",
                    f"{backend.root} holds nothing yet",
                    "a new run creates it; otherwise check the prefix for a typo",
                )
            )
        else:
            names = backend.names()
            checks.append(Check("root.prefix", "ok", f"{len(names)} checkpoint(s) committed"))
        if store.supports_create_only():
            checks.append(Check("root.create_only", "ok", "create-only writes are honoured"))
        else:
            checks.append(
                Check(
                    "root.create_only",
                    "warn",
                    "create-only writes are not honoured: among processes committing one "
                    "name at once, the last writer wins (each learns whether it won)",
                    "save each name from one process (CheckpointManager does under "
                    "torch.distributed)",
                )
            )
    except (CheckpointError, OSError) as exc:
        checks.append(Check("root.store", "fail", str(exc)))
    return checks


# -- all of it --------------------------------------------------------------------------------
def doctor(
    root: str | os.PathLike[str] | None = None,
    *,
    keep: int | None = 3,
    expect_empty: bool = False,
    coordinator: Coordinator | None = None,
    mounts_file: str = "/proc/mounts",
    versions: bool = True,
    expect_shared: bool | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> DoctorReport:
    """Check the environment (and ``root``, if given) for what breaks checkpointing.

    ``root`` may be a URL (s3://bucket/run): then the store is checked (reachable,
    credentials accepted, the bucket and the prefix there, create-only writes).
    """
    checks: list[Check] = []
    if versions:
        checks.extend(check_versions())
    path = os.fspath(root) if root is not None else None
    if path is not None:
        if is_url(path):
            checks.extend(check_store(path, storage_options))
        else:
            checks.extend(
                check_root(
                    path.removeprefix("file://"),
                    keep=keep,
                    expect_empty=expect_empty,
                    mounts_file=mounts_file,
                )
            )
    if coordinator is not None and coordinator.world_size > 1:
        local = path if path is not None and not is_url(path) else None
        checks.extend(check_distributed(local, coordinator, expect_shared=expect_shared))
    return DoctorReport(path, checks)


def warn_at_start(
    root: str, *, log: Any, env: Mapping[str, str] | None = None
) -> DoctorReport | None:
    """The fast subset run when a manager or protect() starts: logs WARN/FAIL findings.

    Versions and the root's contents only (no probe writes); off with
    ``CKPTGUARD_DOCTOR=0``.
    """
    env = os.environ if env is None else env
    if env.get("CKPTGUARD_DOCTOR", "1").strip().lower() in {"0", "false", "no", "off"}:
        return None
    checks = check_versions()
    if not is_url(root) and os.path.isdir(root):
        try:
            checks.extend(_check_contents(root, expect_empty=False))
        except OSError as exc:  # a root this process may not list: a hint must not crash
            checks.append(Check("root.readable", "warn", f"cannot list {root}: {exc}"))
    report = DoctorReport(root, checks)
    for check in report.problems():
        # The advice after a dash, as in every CheckpointError: advice that has brackets
        # of its own read "(... (or glob checkpoint-*) ...)" when it was put in brackets.
        log.warning(
            "doctor: %s: %s%s",
            check.name,
            check.message,
            f" — {check.advice}" if check.advice else "",
        )
    return report
