"""A full disk part-way through a save.

Rows:
- a real full disk: a small tmpfs mounted by the test in a private mount namespace
  (``unshare -rm``, else ``unshare -m`` as root); saves sized around the free space, so
  that ENOSPC hits the data files, the small files or the manifest, by
  ``CheckpointManager.save`` and by ``atomic_checkpoint`` with the user's own writes. Each
  one that does not fit must raise StorageFull naming the space needed
  (``bytes_needed``), keep the earlier checkpoint restorable, and leave no staging dir;
  where no tmpfs can be mounted, this row is left out and the next one says why;
- the fault wrapper: ENOSPC injected at each write, close and fsync of a save.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from typing import TYPE_CHECKING, Any

import numpy as np

import ckptguard
from ckptguard._errors import StorageFull
from ckptguard._format.layout import RootLayout
from ckptguard.testing import Fault, FaultyStorage
from gauntlet import Row

if TYPE_CHECKING:
    from pathlib import Path

TMPFS = 4 * 1024 * 1024
FIRST = 256 * 1024  # the earlier checkpoint's data, in float32 elements x 4 bytes
CHILD = textwrap.dedent(
    """
    import json, os, shutil, sys
    import numpy as np
    import ckptguard

    mnt, kind, sizes = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    for i, size in enumerate(sizes):
        root = os.path.join(mnt, f"run{i}")
        mgr = ckptguard.CheckpointManager(root, keep_last=5, check_environment=False)
        mgr.save(1, {"w": np.ones(FIRST // 4, np.float32)})
        free = shutil.disk_usage(mnt).free
        out = {"size": free + size, "free": free}
        try:
            if kind == "manager":
                mgr.save(2, {"w": np.ones((free + size) // 4, np.float32)})
            else:
                with ckptguard.atomic_checkpoint(os.path.join(root, "checkpoint-2")) as d:
                    (d / "w.bin").write_bytes(b"x" * (free + size))
            out["error"] = None
        except Exception as exc:
            out["error"] = type(exc).__name__
            out["bytes_needed"] = getattr(exc, "bytes_needed", None)
            out["message"] = str(exc)
        restored = mgr.restore(1)["w"]
        out["earlier_ok"] = bool((restored == 1).all() and restored.size == FIRST // 4)
        out["staging"] = os.listdir(os.path.join(root, ".ckptguard", "staging"))
        mgr.close()
        shutil.rmtree(root)
        print(json.dumps(out), flush=True)
    """
).replace("FIRST", str(FIRST))


def _mount_prefix(probe: Path) -> tuple[list[str] | None, str]:
    unshare = shutil.which("unshare")
    if unshare is None:
        return None, "unshare is not installed (util-linux)"
    probe.mkdir()
    why = []
    for prefix in ([unshare, "-rm"], [unshare, "-m"]):
        cmd = [*prefix, "sh", "-c", 'mount -t tmpfs -o size=1m tmpfs "$1"', "sh", str(probe)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
        if proc.returncode == 0:
            return prefix, ""
        why.append(f"{' '.join(prefix)}: {proc.stderr.strip()}")
    return None, "; ".join(why)


def _tmpfs_row(work: Path, full: bool, prefix: list[str]) -> Row:
    row = Row(
        "enospc",
        "a real full disk (tmpfs): StorageFull naming the space needed, "
        "earlier checkpoint intact, no staging left",
    )
    # Bytes beyond the free space: from "the manifest does not fit" to "nothing fits".
    deltas = (
        [-16384, -4096, 0, 1, 4096, 65536, 1 << 20]
        if not full
        else [*range(-65536, 65536, 2048), 1 << 19, 1 << 20, 2 << 20]
    )
    mnt = work / "mnt"
    mnt.mkdir()
    fits = 0
    for kind in ("manager", "atomic"):
        script = f'mount -t tmpfs -o size={TMPFS} tmpfs "$1" && "$2" -c "$3" "$1" "$4" "$5"'
        cmd = [
            *prefix,
            "sh",
            "-c",
            script,
            "sh",
            str(mnt),
            sys.executable,
            CHILD,
            kind,
            json.dumps(deltas),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
        if proc.returncode != 0:
            row.fail(f"{kind}: the child failed ({proc.returncode}): {proc.stderr[-2000:]}")
            continue
        for line in proc.stdout.splitlines():
            out: dict[str, Any] = json.loads(line)
            label = f"{kind}, {out['size']} bytes with {out['free']} free"
            problem = None
            if out["error"] is None:
                fits += 1  # it fitted after all (tmpfs counts pages, not bytes)
            elif out["error"] != "StorageFull":
                problem = f"{label}: raised {out['error']}: {out.get('message')}"
            elif not out.get("bytes_needed") or "needs" not in out["message"]:
                problem = f"{label}: StorageFull does not name the space needed: {out['message']}"
            if problem is None and not out["earlier_ok"]:
                problem = f"{label}: the earlier checkpoint no longer restores"
            if problem is None and out["staging"]:
                problem = f"{label}: staging left behind: {out['staging']}"
            if out["error"] is not None or problem is not None:
                row.trial(problem)
    if list(mnt.iterdir()):
        row.fail("the tmpfs leaked out of its mount namespace")
    row.figures.update({"tmpfs_bytes": TMPFS, "saves_that_fitted": fits})
    return row


def _wrapper_row(work: Path) -> Row:
    row = Row(
        "enospc",
        "ENOSPC injected at each write/close/fsync of a save: StorageFull, "
        "earlier checkpoint intact, no staging left",
    )
    data_ops = ("open_write", "write", "close", "write_bytes", "fsync_file", "fsync_dir")
    probe = FaultyStorage()
    root = str(work / "probe-run")
    ckptguard.CheckpointManager(root, storage=probe, check_environment=False).save(
        1, {"w": np.arange(10.0)}
    )
    calls = sum(1 for op, _ in probe.log if op in data_ops)
    for k in range(1, calls + 1):
        root = str(work / f"wrapped-{k}")
        storage = FaultyStorage(record=False)
        mgr = ckptguard.CheckpointManager(root, storage=storage, check_environment=False)
        mgr.save(1, {"w": np.arange(10.0)})
        storage.add(Fault(op="*", ops=data_ops, errno=errno.ENOSPC, at=k))
        problem = None
        try:
            mgr.save(2, {"w": np.arange(20.0)})
            storage.clear()
            if not np.array_equal(mgr.restore(2)["w"], np.arange(20.0)):
                problem = f"ENOSPC at data call {k}: the save returned but does not restore"
        except StorageFull:
            pass
        except Exception as exc:
            problem = f"ENOSPC at data call {k}: raised {type(exc).__name__}: {exc}"
        storage.clear()
        if problem is None and not np.array_equal(mgr.restore(1)["w"], np.arange(10.0)):
            problem = f"ENOSPC at data call {k}: the earlier checkpoint no longer restores"
        staging = os.listdir(RootLayout(root).staging)
        if problem is None and staging:
            problem = f"ENOSPC at data call {k}: staging left behind: {staging}"
        mgr.close()
        row.trial(problem)
    row.figures["data_calls_per_save"] = calls
    return row


def run(full: bool, work: Path) -> list[Row]:
    prefix, why = _mount_prefix(work / "probe")
    wrapped = _wrapper_row(work)
    if prefix is None:  # no tmpfs here: the fault wrapper's row stands alone, and says why
        wrapped.figures["tmpfs"] = f"cannot be mounted here: {why}"
        return [wrapped]
    return [_tmpfs_row(work, full, prefix), wrapped]
