"""Roots and options that cannot be used are refused typed, naming the value and what to do.

Every entry point turns a root into a backend through ``backend_for``; each case here is
checked through the Python API and through the command (exit 2, one JSON error document
with ``--json``). Permission cases run a child process as an unprivileged user (root may
read and write anything).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import ckptguard

NOBODY = 65534  # the unprivileged uid and gid the permission cases run as (when we are root)


def _cli(*args: str | Path, env: dict[str, str] | None = None) -> tuple[int, Any, str]:
    """(exit code, the one JSON document on stdout, stderr) of ``ckptguard ARGS --json``."""
    proc = subprocess.run(
        [sys.executable, "-m", "ckptguard", *map(str, args), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, **(env or {})},
    )
    return proc.returncode, json.loads(proc.stdout), proc.stderr


def _assert_refused(code: int, doc: Any, error_type: str, *names: str) -> None:
    assert code == 2, doc
    assert doc["ok"] is False
    assert set(doc) == {"ok", "command", "error"}
    error = doc["error"]
    assert error["type"] == error_type, error
    assert error["hint"], error  # says what to do
    text = f"{error['message']} {error['path']}"
    for name in names:
        assert name in text, (name, error)


# -- an empty root -----------------------------------------------------------------------------
@pytest.mark.parametrize("root", ["", "   "])
def test_an_empty_root_is_refused_not_taken_for_the_cwd(
    root: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ckptguard.UnsupportedRoot, match="empty root") as caught:
        ckptguard.CheckpointManager(root)
    assert "runs/exp1" in str(caught.value)  # an example of what to pass
    assert list(tmp_path.iterdir()) == []  # nothing was written in the cwd
    code, doc, _ = _cli("list", root)
    _assert_refused(code, doc, "UnsupportedRoot", "empty root")


# -- a file, or a path under one ---------------------------------------------------------------
# (scan and recover of a local root do not resolve it through backend_for yet.)
ENTRY_POINTS: dict[str, Callable[[Path], object]] = {
    "CheckpointManager": ckptguard.CheckpointManager,
    "atomic_checkpoint": lambda root: ckptguard.atomic_checkpoint(root / "checkpoint-1"),
    "verify": lambda root: ckptguard.verify(root / "checkpoint-1"),
}


@pytest.mark.parametrize("call", sorted(ENTRY_POINTS))
def test_a_root_that_is_a_file_is_refused_typed(call: str, tmp_path: Path) -> None:
    file = tmp_path / "weights.pt"
    file.write_bytes(b"not a directory")
    with pytest.raises(ckptguard.RootNotADirectory) as caught:
        ENTRY_POINTS[call](file)
    error = caught.value
    assert isinstance(error, ckptguard.UnsupportedRoot)
    assert isinstance(error, NotADirectoryError)  # as the builtin it resembles
    assert str(file) in str(error)
    assert "is a file" in str(error)
    assert "a root is a directory" in str(error)  # what to do
    assert file.read_bytes() == b"not a directory"


@pytest.mark.parametrize("call", sorted(ENTRY_POINTS))
def test_a_root_under_a_file_names_the_file(call: str, tmp_path: Path) -> None:
    file = tmp_path / "weights.pt"
    file.write_bytes(b"x")
    root = file / "run" / "deeper"
    with pytest.raises(ckptguard.RootNotADirectory) as caught:
        ENTRY_POINTS[call](root)
    assert f"lies under {file}, which is a file" in str(caught.value)
    assert caught.value.path is not None
    assert caught.value.path.startswith(str(file))


def test_a_symlink_to_a_directory_is_a_fine_root(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    mgr = ckptguard.CheckpointManager(tmp_path / "link")
    mgr.save(1, {"step": 1})
    assert (tmp_path / "real" / "checkpoint-1").is_dir()


def test_the_command_refuses_a_file_root_typed(tmp_path: Path) -> None:
    file = tmp_path / "weights.pt"
    file.write_bytes(b"x")
    for command in ("list", "clean"):
        code, doc, _ = _cli(command, file)
        _assert_refused(code, doc, "RootNotADirectory", str(file), "is a file")
        code, doc, _ = _cli(command, file / "sub")
        _assert_refused(code, doc, "RootNotADirectory", str(file), "lies under")
    for command in ("verify", "inspect"):  # a checkpoint is a directory (or a .ckpt)
        code, doc, _ = _cli(command, file)
        _assert_refused(code, doc, "RootNotADirectory", str(file), "not a checkpoint directory")
    # verify takes a .ckpt for a single-file checkpoint (Lightning's): without a checksum
    # sidecar it cannot vouch for it.
    ckpt = tmp_path / "epoch=0-step=1.ckpt"
    ckpt.write_bytes(b"x")
    code, doc, _ = _cli("verify", ckpt)
    assert code == 1, doc
    (report,) = doc["checkpoints"]
    assert report["ok"] is False
    assert "no checksum sidecar" in report["problems"][0]["problem"]
    assert file.read_bytes() == b"x"


# -- storage options ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "words"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object, got list"),
        ('"s3"', "must be a JSON object, got str"),
    ],
)
def test_malformed_storage_options_in_the_environment(
    raw: str, words: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CKPTGUARD_STORAGE_OPTIONS", raw)
    with pytest.raises(ckptguard.UnsupportedRoot, match=words) as caught:
        ckptguard.CheckpointManager("memory://ckptguard-tests/bad-options")
    assert "CKPTGUARD_STORAGE_OPTIONS" in str(caught.value)
    assert "JSON object" in caught.value.hint
    for command in ("list", "verify", "inspect", "clean"):
        code, doc, stderr = _cli(command, "memory://ckptguard-tests/bad-options")
        _assert_refused(code, doc, "UnsupportedRoot", "CKPTGUARD_STORAGE_OPTIONS", words)
        assert "Traceback" not in stderr


def test_storage_options_that_are_not_a_mapping_are_refused() -> None:
    with pytest.raises(ckptguard.UnsupportedRoot, match="must be a dict of fsspec options"):
        ckptguard.CheckpointManager(
            "memory://ckptguard-tests/x",
            storage_options='{"anon": true}',  # type: ignore[arg-type]  # the mistake tested
        )


# -- permissions -------------------------------------------------------------------------------
@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory the unprivileged user can reach (pytest's tmp_path is private to us)."""
    path = Path(tempfile.mkdtemp(prefix="ckptguard-perm-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        for top, dirs, _files in os.walk(path):
            for d in dirs:
                Path(top, d).chmod(0o755)
        shutil.rmtree(path)


def _unprivileged(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``python ARGS`` as a user without privileges (ourselves, unless we are root)."""
    command = [sys.executable, *args]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        assert setpriv, "the permission cases need setpriv (util-linux) when run as root"
        command = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *command]
    env = {k: v for k, v in os.environ.items() if not k.startswith("COV")}
    env["HOME"] = str(cwd)
    return subprocess.run(
        command, capture_output=True, text=True, timeout=120, check=False, cwd=cwd, env=env
    )


_CHILD = """
import json, sys
import ckptguard
root, action = sys.argv[1], sys.argv[2]
try:
    mgr = ckptguard.CheckpointManager(root)
    if action == "save":
        mgr.save(1, {"step": 1})
    outcome = {"raised": None}
except Exception as exc:
    outcome = {
        "raised": type(exc).__name__,
        "typed": isinstance(exc, ckptguard.CheckpointError),
        "oserror": isinstance(exc, OSError),
        "text": str(exc),
    }
print(json.dumps(outcome))
"""


def test_a_root_this_user_may_not_read_is_never_a_bare_permission_error(shared_dir: Path) -> None:
    locked = shared_dir / "locked"
    locked.mkdir()
    locked.chmod(0o000)
    proc = _unprivileged(["-c", _CHILD, str(locked), "open"], shared_dir)
    assert proc.returncode == 0, proc.stderr
    outcome = json.loads(proc.stdout)
    # Opening may succeed (reading fails later, typed) or be refused typed; never a bare
    # PermissionError from a start-up check (doctor's listing of the root was one).
    assert outcome["raised"] is None or outcome["typed"], outcome


def test_saving_where_the_parent_is_not_writable_is_typed(shared_dir: Path) -> None:
    parent = shared_dir / "readonly"
    parent.mkdir()
    parent.chmod(0o555)
    root = parent / "run"
    proc = _unprivileged(["-c", _CHILD, str(root), "save"], shared_dir)
    assert proc.returncode == 0, proc.stderr
    outcome = json.loads(proc.stdout)
    assert outcome["raised"], outcome
    assert outcome["typed"], outcome
    assert outcome["oserror"], outcome  # still an OSError for code that predates ckptguard
    assert str(root) in outcome["text"]
    assert not root.exists()


@pytest.mark.parametrize("command", ["list", "verify", "inspect", "clean"])
def test_the_command_on_a_root_it_may_not_read(command: str, shared_dir: Path) -> None:
    locked = shared_dir / "locked"
    locked.mkdir()
    locked.chmod(0o000)
    proc = _unprivileged(["-m", "ckptguard", command, str(locked), "--json"], shared_dir)
    doc = json.loads(proc.stdout)
    _assert_refused(proc.returncode, doc, "StoragePermissionError", str(locked), "EACCES")
    assert "Traceback" not in proc.stderr
    # not "does not exist": it does, this user may not read it
    assert "does not exist" not in doc["error"]["message"]


_READER = """
import json, sys
import ckptguard
mgr = ckptguard.CheckpointManager(sys.argv[1])
out = {"read_only": mgr.read_only, "restored": mgr.restore()}
try:
    mgr.save(2, {"step": 2})
except ckptguard.ReadOnlyStorage as exc:
    out["save"] = str(exc)
print(json.dumps(out))
"""


def test_a_root_this_user_may_read_but_not_write_opens_read_only(shared_dir: Path) -> None:
    root = shared_dir / "run"
    mgr = ckptguard.CheckpointManager(root, check_environment=False)
    mgr.save(1, {"step": 1})
    mgr.close()
    for top, dirs, files in os.walk(root):
        for d in dirs:
            Path(top, d).chmod(0o755)
        for f in files:
            Path(top, f).chmod(0o644)
    proc = _unprivileged(["-c", _READER, str(root)], shared_dir)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["read_only"] is True
    assert out["restored"] == {"step": 1}
    assert f"may not write to {root}" in out["save"]


@pytest.mark.parametrize("entry", [ckptguard.scan, ckptguard.recover])
def test_scan_and_recover_refuse_a_file_root_typed(entry: Any, tmp_path: Path) -> None:
    file = tmp_path / "weights.pt"
    file.write_bytes(b"x")
    for root, words in ((file, "is a file"), (file / "sub", "lies under")):
        with pytest.raises(ckptguard.RootNotADirectory, match=words):
            entry(root)
    assert file.read_bytes() == b"x"
