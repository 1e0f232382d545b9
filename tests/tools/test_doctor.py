"""``ckptguard doctor``: each check, on real files, real mounts and substituted versions.

Library versions are substituted through ``doctor.version_lookup``; filesystems are real
tmpfs mounts made inside ``unshare -rm`` (a private mount namespace), or a /proc/mounts
fixture for NFS, Lustre and FUSE; an fsync failure is injected with strace.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import ckptguard
from ckptguard._tools.doctor import Check, DoctorReport, check_root, check_versions

doctor_module = sys.modules["ckptguard._tools.doctor"]
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _only(report: DoctorReport | list[Check], name: str) -> Check:
    checks = report.checks if isinstance(report, DoctorReport) else report
    found = [c for c in checks if c.name == name]
    assert len(found) == 1, [c.name for c in checks]
    return found[0]


def _versions(monkeypatch: pytest.MonkeyPatch, **versions: str) -> None:
    monkeypatch.setattr(doctor_module, "version_lookup", versions.get)


# -- versions -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("version", "status", "words"),
    [
        ("4.49.0.dev0", "fail", "huggingface/transformers#36076"),
        ("4.37.2", "fail", "huggingface/transformers#27925"),
        ("4.36.0.dev0", "fail", "huggingface/transformers#28364"),
        ("5.0.0rc1", "warn", "pre-release"),
        ("4.57.0+gitabc123", "warn", "local build"),
        ("4.49.0", "ok", "transformers 4.49.0"),
        ("5.24.0", "ok", "transformers 5.24.0"),
    ],
)
def test_transformers_versions(
    monkeypatch: pytest.MonkeyPatch, version: str, status: str, words: str
) -> None:
    _versions(monkeypatch, transformers=version)
    check = _only(check_versions(), "versions.transformers")
    assert check.status == status
    assert words in check.message
    if status != "ok":
        assert check.advice


@pytest.mark.parametrize(
    ("version", "status"),
    [("2.13.0+cpu", "ok"), ("2.4.1+cu121", "ok"), ("2.6.0.dev20250101+cu124", "warn"),
     ("2.5.0a0+git1234567", "warn"), ("2.7.0rc3", "warn")],
)  # fmt: skip
def test_torch_build_variants_are_not_flagged_but_dev_builds_are(
    monkeypatch: pytest.MonkeyPatch, version: str, status: str
) -> None:
    _versions(monkeypatch, torch=version)
    assert _only(check_versions(), "versions.torch").status == status


def test_uninstalled_libraries_are_not_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    _versions(monkeypatch, safetensors="0.8.0")
    assert [c.name for c in check_versions()] == ["versions.safetensors"]


# -- the root -------------------------------------------------------------------------------
def test_a_fresh_root_is_all_ok(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _versions(monkeypatch)
    report = ckptguard.doctor(tmp_path / "new-run")
    assert report.worst == "ok", [c for c in report.checks if c.status != "ok"]
    assert report.exit_code == 0
    for name in ("root.exists", "root.free_space", "root.filesystem", "root.rename_noreplace",
                 "root.fsync"):  # fmt: skip
        assert _only(report, name).status == "ok"
    assert not (tmp_path / "new-run").exists()  # the doctor creates nothing it leaves
    assert os.listdir(tmp_path) == []


def test_a_file_in_place_of_the_root_fails(tmp_path: Path) -> None:
    (tmp_path / "run").write_text("not a dir")
    checks = check_root(str(tmp_path / "run"))
    assert _only(checks, "root.exists").status == "fail"


def test_hidden_and_foreign_entries(tmp_path: Path) -> None:
    root = tmp_path / "run"
    root.mkdir()
    (root / ".DS_Store").write_text("x")
    (root / "notes.txt").write_text("x")
    assert _only(check_root(str(root)), "root.hidden").status == "warn"
    empty = _only(check_root(str(root), expect_empty=True), "root.empty")
    assert empty.status == "fail"
    assert ".DS_Store" in empty.message
    assert "ls -a" in empty.advice


def test_leftovers_point_to_ckptguard_clean(tmp_path: Path) -> None:
    root = tmp_path / "run"
    (root / ".ckptguard" / "staging" / "checkpoint-3.20260101T000000000000Z-0-0-0").mkdir(
        parents=True
    )
    check = _only(check_root(str(root)), "root.leftovers")
    assert check.status == "warn"
    assert "1 in staging" in check.message
    assert "ckptguard clean" in check.advice
    shutil.rmtree(root / ".ckptguard" / "staging")
    assert _only(check_root(str(root)), "root.leftovers").status == "ok"


@pytest.mark.parametrize(
    ("fstype", "words"),
    [("nfs4", "NFS"), ("lustre", "Lustre"), ("fuse.s3fs", "FUSE"), ("overlay", "container"),
     ("ext4", None)],
)  # fmt: skip
def test_filesystem_type_from_a_mounts_fixture(
    tmp_path: Path, fstype: str, words: str | None
) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "/dev/vda / ext4 rw 0 0\n"
        f"server:/export {tmp_path} {fstype} rw 0 0\n"
        f"/dev/other {tmp_path}/elsewhere ext4 rw 0 0\n"
    )
    check = _only(check_root(str(tmp_path / "run"), mounts_file=str(mounts)), "root.filesystem")
    assert fstype in check.message
    assert check.status == ("ok" if words is None else "warn")
    if words:
        assert words in check.message


_IN_NAMESPACE = textwrap.dedent(
    """
    import json, os, sys
    import ckptguard
    from ckptguard._tools import doctor as _
    root, keep = sys.argv[1], int(sys.argv[2])
    report = ckptguard.doctor(root, keep=keep, versions=False)
    print(json.dumps(report.to_json()))
    """
)


def _doctor_child(tmp_path: Path, prefix: list[str], root: str, keep: int = 3) -> dict[str, Any]:
    script = tmp_path / "doctor_child.py"
    script.write_text(_IN_NAMESPACE)
    proc = subprocess.run(
        [*prefix, sys.executable, str(script), root, str(keep)],
        env=CHILD_ENV,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return report


def _status(report: dict[str, Any], name: str) -> tuple[str, str]:
    (check,) = [c for c in report["checks"] if c["name"] == name]
    return check["status"], check["message"]


def _in_tmpfs(mount: Path, setup: str = "true", *, ro: bool = False) -> list[str]:
    """A command prefix: a private mount namespace with a 4 MiB tmpfs at ``mount``."""
    unshare = shutil.which("unshare")
    assert unshare is not None
    remount = f" && mount -o remount,ro {mount}" if ro else ""
    script = f'mount -t tmpfs -o size=4m tmpfs {mount} && {setup}{remount} && exec "$@"'
    return [unshare, "-rm", "sh", "-c", script, "sh"]


def test_tmpfs_is_named_and_free_space_is_checked(tmp_path: Path) -> None:
    mount = tmp_path / "mnt"
    mount.mkdir()
    ckpt = mount / "run" / "checkpoint-1"
    setup = (
        f"mkdir -p {ckpt} && echo '{{}}' > {ckpt}/ckptguard.json && "
        f"head -c 1572864 /dev/zero > {ckpt}/model.safetensors"
    )
    report = _doctor_child(tmp_path, _in_tmpfs(mount, setup), str(mount / "run"), keep=3)
    status, message = _status(report, "root.filesystem")
    assert status == "warn"
    assert "tmpfs" in message
    status, message = _status(report, "root.free_space")
    assert status == "fail", message  # 1.5 MiB x (3 + 1) does not fit in what is left of 4 MiB
    report = _doctor_child(tmp_path, _in_tmpfs(mount, setup), str(mount / "run"), keep=0)
    assert _status(report, "root.free_space")[0] == "ok"  # 1.5 MiB x 2 fits


def test_a_read_only_root_fails(tmp_path: Path) -> None:
    mount = tmp_path / "mnt"
    mount.mkdir()
    report = _doctor_child(
        tmp_path, _in_tmpfs(mount, f"mkdir {mount}/run", ro=True), str(mount / "run")
    )
    status, _message = _status(report, "root.writable")
    assert status == "fail"
    assert report["exit_code"] == 2


def test_a_failing_fsync_fails(tmp_path: Path) -> None:
    strace = shutil.which("strace")
    assert strace is not None, "strace is installed by .ci/run"
    prefix = [strace, "-f", "-o", "/dev/null", "-e", "trace=fsync", "-e", "inject=fsync:error=EIO"]
    report = _doctor_child(tmp_path, prefix, str(tmp_path / "run"))
    status, message = _status(report, "root.fsync")
    assert status == "fail"
    assert "Input/output error" in message or "EIO" in message


# -- the command line, and the check at start --------------------------------------------------
def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ckptguard", "doctor", *args],
        env=env or CHILD_ENV,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_command_line_exit_codes_and_json(tmp_path: Path) -> None:
    ok = _cli(str(tmp_path / "fresh"), "--json")
    assert ok.returncode in {0, 1}, ok.stderr  # 1 only if this machine's own versions warn
    body = json.loads(ok.stdout)
    assert body["exit_code"] == ok.returncode
    root = tmp_path / "dirty"
    root.mkdir()
    (root / ".hidden").write_text("x")
    dirty = _cli(str(root), "--expect-empty", "--json")
    assert dirty.returncode == 2
    assert json.loads(dirty.stdout)["status"] == "fail"
    table = _cli(str(root), "--expect-empty")
    assert table.returncode == 2
    assert "root.empty" in table.stdout
    assert "FAIL" in table.stdout


def test_a_manager_runs_the_fast_checks_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "run"
    root.mkdir()
    (root / ".nfs000123").write_text("x")
    _versions(monkeypatch, transformers="4.49.0.dev0")
    with caplog.at_level(logging.WARNING, logger="ckptguard"):
        ckptguard.CheckpointManager(root)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "doctor: root.hidden" in text
    assert "huggingface/transformers#36076" in text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ckptguard"):
        ckptguard.CheckpointManager(root, check_environment=False)
        monkeypatch.setenv("CKPTGUARD_DOCTOR", "0")
        ckptguard.CheckpointManager(root)
    assert not [r for r in caplog.records if "doctor:" in r.getMessage()]


def test_the_original_failure_is_caught_before_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The TRL crash: transformers 4.49.0.dev0 and a leftover tmp-checkpoint dir."""
    _versions(monkeypatch, transformers="4.49.0.dev0", torch="2.6.0+cu124")
    out = tmp_path / "output_dir"
    (out / "tmp-checkpoint-l6bxw431").mkdir(parents=True)
    report = ckptguard.doctor(out, expect_empty=True)
    assert report.exit_code == 2
    assert _only(report, "versions.transformers").status == "fail"
    assert _only(report, "root.empty").status == "fail"
    assert _only(report, "versions.torch").status == "ok"


def test_protect_runs_the_fast_checks(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        Trainer,
        TrainingArguments,
    )

    from ckptguard.integrations.transformers import protect

    out = tmp_path / "out"
    out.mkdir()
    (out / ".hidden-leftover").write_text("x")
    _versions(monkeypatch, transformers="4.49.0.dev0")
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=8, n_embd=8, n_layer=1, n_head=1))
    args = TrainingArguments(output_dir=str(out), report_to=[], use_cpu=True)
    with caplog.at_level(logging.WARNING, logger="ckptguard"):
        protect(Trainer(model=model, args=args))
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "doctor: root.hidden" in text
    assert "huggingface/transformers#36076" in text
