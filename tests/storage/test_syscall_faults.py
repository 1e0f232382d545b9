"""Real syscall faults, injected into a child process with strace (and ENOSPC from a tmpfs).

Every case runs a small child script that first commits ``checkpoint-1`` and then tries
``checkpoint-2``; a fault is injected into one syscall of the second save. Which call to
hit is not hard-coded: a fault-free "probe" run under strace counts the calls first, and
the faulty run's strace log is checked to show that the fault hit the intended call. A
separate process then inspects the root, so every assertion is about what is on disk:

- EBUSY on the commit rename is retried and the save succeeds; with a zero retry
  deadline (the control) the same fault fails the save, so the retry is what saved it;
- EIO on a file's fsync aborts the save with a typed error and that file is never
  fsynced again ("fsyncgate");
- ENOSPC on a small tmpfs gives StorageFull, naming the free space and bytes written;
- a persistent EROFS/EIO on the commit rename gives a typed error, tried only once.

In every failure, ``checkpoint-1`` still verifies, ``checkpoint-2`` never appears and the
staging directory is removed. strace and unshare are required: missing, the tests fail.
"""

from __future__ import annotations

import errno
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

CHILD_TIMEOUT = 120.0
SMALL = 4096
TMPFS_SIZE = "2m"
BIGGER_THAN_TMPFS = 4 * 1024 * 1024

CHILD_SOURCE = '''\
"""Child of test_syscall_faults.py; prints one JSON line.

python child.py save ROOT SIZE DEADLINE   commit checkpoint-1, then try checkpoint-2
                                          (DEADLINE: retry deadline in s, or "default")
python child.py inspect ROOT              report what is on disk under ROOT
"""
import json
import os
import sys
from pathlib import Path

import ckptguard


def try_save(final, sizes, retry):
    saver = ckptguard.atomic_checkpoint(final, retry=retry)
    try:
        with saver as staging_dir:
            for i, size in enumerate(sizes):
                with open(staging_dir / f"part-{i}.bin", "wb") as f:
                    f.write(os.urandom(size))
            (staging_dir / "meta.json").write_text(json.dumps({"name": final.name}))
    except Exception as exc:
        return {
            "ok": False,
            "type": type(exc).__name__,
            "mro": [c.__name__ for c in type(exc).__mro__],
            "message": str(exc),
            "errno": getattr(exc, "errno", None),
            "bytes_needed": getattr(exc, "bytes_needed", None),
        }
    return {"ok": True, "outcome": saver.result.outcome.value}


def inspect(root):
    def names(path):
        return sorted(os.listdir(path)) if path.is_dir() else None

    meta = root / ".ckptguard"
    checkpoints = {}
    for name in names(root) or []:
        if name.startswith("checkpoint-"):
            report = ckptguard.verify(root / name)
            files = sorted(f.path for f in report.manifest.files) if report.manifest else []
            checkpoints[name] = {"ok": report.ok, "problems": report.problems, "files": files}
    return {
        "entries": names(root),
        "staging": names(meta / "staging"),
        "trash": names(meta / "trash"),
        "quarantine": names(meta / "quarantine"),
        "checkpoints": checkpoints,
    }


def main():
    mode, root = sys.argv[1], Path(sys.argv[2])
    if mode == "inspect":
        print(json.dumps(inspect(root)))
        return
    size, deadline = int(sys.argv[3]), sys.argv[4]
    first = try_save(root / "checkpoint-1", [4096], ckptguard.RetryPolicy())
    options = {} if deadline == "default" else {"deadline": float(deadline)}
    retry = ckptguard.RetryPolicy(**options)
    second = try_save(root / "checkpoint-2", [size], retry) if first["ok"] else None
    print(json.dumps({"pid": os.getpid(), "first": first, "second": second}))


main()
'''


@dataclass(frozen=True)
class Call:
    """One syscall from an strace log (one process, ``-y -s 4096``)."""

    name: str
    args: str
    ret: int
    err: str | None
    injected: bool

    @property
    def strings(self) -> list[str]:
        """The quoted string arguments (paths of a rename)."""
        return re.findall(r'"((?:[^"\\]|\\.)*)"', self.args)

    @property
    def fd_path(self) -> str | None:
        """The path of the fd argument, as ``-y`` prints it: ``3</path>``."""
        match = re.match(r"\d+<(.*)>$", self.args)
        return match.group(1) if match else None


_LINE = re.compile(
    r"(?P<name>\w+)\((?P<args>.*)\) += (?P<ret>-?\d+)"
    r"(?: (?P<err>E[A-Z0-9]+) \([^)]*\))?(?P<inj> \(INJECTED\))?$"
)


def _parse_log(path: Path) -> list[Call]:
    calls = []
    for line in path.read_text().splitlines():
        match = _LINE.match(line)
        if match:
            calls.append(
                Call(
                    match["name"],
                    match["args"],
                    int(match["ret"]),
                    match["err"],
                    match["inj"] is not None,
                )
            )
    return calls


def _require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(
            f"{tool} is required by the syscall fault tests and was not found on PATH; "
            f"install it (apt-get install {tool}). CI installs it: these tests never skip."
        )
    return path


@pytest.fixture
def strace() -> str:
    return _require("strace")


@pytest.fixture
def child(tmp_path: Path) -> Path:
    path = tmp_path / "child.py"
    path.write_text(CHILD_SOURCE)
    return path


def _run_json(cmd: list[str]) -> list[dict[str, Any]]:
    """Run ``cmd``; it must exit 0; return the JSON objects it printed, one per line."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CHILD_TIMEOUT, check=False)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, f"{cmd} printed no result\n{proc.stdout}\n{proc.stderr}"
    return [json.loads(line) for line in lines]


@dataclass(frozen=True)
class Traced:
    """A ``save`` run under strace: the child's report and its own syscalls."""

    result: dict[str, Any]
    calls: list[Call]

    def of(self, name: str) -> list[Call]:
        return [c for c in self.calls if c.name == name]


def _save_under_strace(
    strace: str,
    child: Path,
    root: Path,
    *,
    log: Path,
    size: int = SMALL,
    deadline: str = "default",
    inject: str | None = None,
) -> Traced:
    cmd = [strace, "-f", "-ff", "-y", "-s", "4096", "-o", str(log)]
    cmd += ["-e", "trace=renameat2,rename,renameat,fsync,fdatasync"]
    if inject is not None:
        cmd += ["-e", f"inject={inject}"]
    cmd += [sys.executable, str(child), "save", str(root), str(size), deadline]
    (result,) = _run_json(cmd)
    # -ff: one log per process; the child's own calls are in LOG.<its pid>.
    own_log = log.with_name(f"{log.name}.{result['pid']}")
    assert own_log.exists(), f"no strace log {own_log}"
    return Traced(result, _parse_log(own_log))


def _inspect(child: Path, root: Path) -> dict[str, Any]:
    (state,) = _run_json([sys.executable, str(child), "inspect", str(root)])
    return state


def _renames_onto(calls: list[Call], final: Path) -> list[Call]:
    return [c for c in calls if c.name == "renameat2" and c.strings[-1:] == [str(final)]]


def _commit_rename_index(strace: str, child: Path, tmp_path: Path) -> int:
    """1-based position of checkpoint-2's commit among the child's renameat2 calls."""
    probe = tmp_path / "probe"
    traced = _save_under_strace(strace, child, probe, log=tmp_path / "probe.log")
    assert traced.result["second"]["ok"], traced.result
    renames = traced.of("renameat2")
    assert renames, (
        "ckptguard made no renameat2 call; the rename syscalls seen were "
        f"{[c.name for c in traced.calls if 'rename' in c.name]}"
    )
    hits = [i for i, c in enumerate(renames, 1) if c.strings[-1:] == [str(probe / "checkpoint-2")]]
    assert len(hits) == 1, renames
    return hits[0]


def _assert_earlier_intact_and_no_leftovers(state: dict[str, Any]) -> None:
    assert state["entries"] == [".ckptguard", "checkpoint-1"], state
    assert state["checkpoints"]["checkpoint-1"]["ok"], state["checkpoints"]
    assert state["checkpoints"]["checkpoint-1"]["files"] == ["meta.json", "part-0.bin"]
    assert state["staging"] == [], state
    assert state["trash"] == [], state
    assert state["quarantine"] == [], state


@pytest.mark.parametrize("failures", [1, 2])
def test_transient_ebusy_on_commit_rename_is_retried(
    strace: str, child: Path, tmp_path: Path, failures: int
) -> None:
    k = _commit_rename_index(strace, child, tmp_path)
    root = tmp_path / "run"
    inject = f"renameat2:error=EBUSY:when={k}..{k + failures - 1}"
    traced = _save_under_strace(strace, child, root, log=tmp_path / "run.log", inject=inject)

    assert traced.result["second"] == {"ok": True, "outcome": "committed"}, traced.result
    attempts = _renames_onto(traced.calls, root / "checkpoint-2")
    assert [(c.err, c.injected) for c in attempts] == [("EBUSY", True)] * failures + [(None, False)]
    assert attempts[-1].ret == 0
    state = _inspect(child, root)
    assert state["entries"] == [".ckptguard", "checkpoint-1", "checkpoint-2"]
    assert all(c["ok"] for c in state["checkpoints"].values()), state["checkpoints"]
    assert state["staging"] == []


def test_control_ebusy_without_retry_fails(strace: str, child: Path, tmp_path: Path) -> None:
    """The same fault with a zero retry deadline: the save fails, so the retry is what helps."""
    k = _commit_rename_index(strace, child, tmp_path)
    root = tmp_path / "run"
    traced = _save_under_strace(
        strace,
        child,
        root,
        log=tmp_path / "run.log",
        deadline="0",
        inject=f"renameat2:error=EBUSY:when={k}..{k + 1}",
    )

    second = traced.result["second"]
    assert second["ok"] is False, traced.result
    assert second["type"] == "TransientStorageError", second
    assert second["errno"] == errno.EBUSY
    attempts = _renames_onto(traced.calls, root / "checkpoint-2")
    assert [(c.err, c.injected) for c in attempts] == [("EBUSY", True)]
    _assert_earlier_intact_and_no_leftovers(_inspect(child, root))


def test_eio_on_file_fsync_aborts_and_never_fsyncs_that_file_again(
    strace: str, child: Path, tmp_path: Path
) -> None:
    # Probe: the position of the fsync of checkpoint-2's data file, made inside seal.
    probe = tmp_path / "probe"
    traced = _save_under_strace(strace, child, probe, log=tmp_path / "probe.log")
    staging = f"{probe}/.ckptguard/staging/checkpoint-2."
    fsyncs = traced.of("fsync")
    hits = [
        i
        for i, c in enumerate(fsyncs, 1)
        if (c.fd_path or "").startswith(staging) and (c.fd_path or "").endswith("/part-0.bin")
    ]
    assert len(hits) == 1, [c.fd_path for c in fsyncs]

    root = tmp_path / "run"
    traced = _save_under_strace(
        strace, child, root, log=tmp_path / "run.log", inject=f"fsync:error=EIO:when={hits[0]}"
    )

    second = traced.result["second"]
    assert second["ok"] is False, traced.result
    assert "StorageError" in second["mro"], second  # typed, not a bare OSError
    assert second["type"] == "StorageError"
    assert second["errno"] == errno.EIO
    fsyncs = traced.of("fsync")
    failed = [i for i, c in enumerate(fsyncs) if c.injected]
    assert len(failed) == 1, [(c.fd_path, c.err) for c in fsyncs]
    bad_path = fsyncs[failed[0]].fd_path
    assert bad_path is not None
    assert bad_path.startswith(f"{root}/.ckptguard/staging/checkpoint-2.")
    assert bad_path.endswith("/part-0.bin")
    assert fsyncs[failed[0]].err == "EIO"
    later = [c.fd_path or "" for c in fsyncs[failed[0] + 1 :]]
    assert bad_path not in later, f"{bad_path} was fsynced again after EIO: {later}"
    staging_dir = bad_path.rsplit("/", 1)[0]
    assert not [p for p in later if p.startswith(staging_dir)], later  # nothing of that save
    _assert_earlier_intact_and_no_leftovers(_inspect(child, root))


@pytest.mark.parametrize(
    ("code", "error_type"), [("EROFS", "ReadOnlyStorage"), ("EIO", "StorageError")]
)
def test_persistent_error_on_commit_rename_is_typed_and_not_retried(
    strace: str, child: Path, tmp_path: Path, code: str, error_type: str
) -> None:
    k = _commit_rename_index(strace, child, tmp_path)
    root = tmp_path / "run"
    traced = _save_under_strace(
        strace, child, root, log=tmp_path / "run.log", inject=f"renameat2:error={code}:when={k}+"
    )

    second = traced.result["second"]
    assert second["ok"] is False, traced.result
    assert second["type"] == error_type, second
    assert second["errno"] == getattr(errno, code)
    assert "checkpoint-2" in second["message"]
    # A permanent error is never retried: one attempt, and the save is aborted.
    attempts = _renames_onto(traced.calls, root / "checkpoint-2")
    assert [(c.err, c.injected) for c in attempts] == [(code, True)]
    _assert_earlier_intact_and_no_leftovers(_inspect(child, root))


def _private_mount_prefix(tmp_path: Path) -> list[str]:
    """``unshare -rm`` (a user and mount namespace), else ``unshare -m`` as root."""
    unshare = _require("unshare")
    probe = tmp_path / "mount-probe"
    probe.mkdir()
    failures = []
    for prefix in ([unshare, "-rm"], [unshare, "-m"]):
        cmd = [*prefix, "sh", "-c", 'mount -t tmpfs -o size=1m tmpfs "$1"', "sh", str(probe)]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=CHILD_TIMEOUT, check=False
        )
        if proc.returncode == 0:
            return prefix
        failures.append(f"{' '.join(prefix)}: exit {proc.returncode}: {proc.stderr.strip()}")
    pytest.fail("cannot mount a tmpfs in a private mount namespace: " + "; ".join(failures))


def test_enospc_gives_storage_full_and_keeps_earlier_checkpoint(
    child: Path, tmp_path: Path
) -> None:
    prefix = _private_mount_prefix(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    root = mnt / "run"
    # The tmpfs lives as long as this shell: save, then inspect from a fresh process.
    script = (
        f'mount -t tmpfs -o size={TMPFS_SIZE} tmpfs "$1" && '
        f'"$2" "$3" save "$4" {BIGGER_THAN_TMPFS} default && "$2" "$3" inspect "$4"'
    )
    result, state = _run_json(
        [*prefix, "sh", "-c", script, "sh", str(mnt), sys.executable, str(child), str(root)]
    )
    assert list(mnt.iterdir()) == [], "the tmpfs leaked out of its mount namespace"

    assert result["first"]["ok"], result
    second = result["second"]
    assert second["ok"] is False, result
    assert second["type"] == "StorageFull", second
    assert second["errno"] == errno.ENOSPC
    message = second["message"]
    written = re.search(r"(\d+) bytes were written", message)
    free = re.search(r"(\d+) bytes are free on (\S+),", message)
    assert written is not None, message
    assert free is not None, message
    assert free[2] == str(root)
    # The tmpfs is 2 MiB: the save wrote most of it before the disk filled up.
    assert 1024 * 1024 < int(written[1]) <= 2 * 1024 * 1024
    assert int(free[1]) < BIGGER_THAN_TMPFS - int(written[1])
    assert second["bytes_needed"] == int(written[1])
    _assert_earlier_intact_and_no_leftovers(state)
