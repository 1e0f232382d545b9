"""The ``ckptguard`` command, run as a real process against roots built by CheckpointManager.

Exit codes: 0 all good, 1 something corrupt, 2 bad usage or a missing path. Every command
is checked in its human form and with ``--json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptguard
from ckptguard._format.layout import MANIFEST_NAME, RootLayout, new_save_id
from ckptguard._format.owner import current_writer
from ckptguard._protocol.rename import stage

CLI = Path(sys.executable).with_name("ckptguard")
STEPS = (1, 2, 3)


def _cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "80", "PYTHONIOENCODING": "utf-8"}
    env.pop("FORCE_COLOR", None)
    return subprocess.run(
        [str(CLI), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )


def _text(output: str) -> str:
    """Human output with whitespace collapsed: rich wraps long lines at the console width."""
    return " ".join(output.split())


def _json(proc: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(proc.stdout)


def _texts(problems: list[dict[str, str]]) -> str:
    """The problems of a --json report as one string (each is {path, problem, severity})."""
    return "\n".join(p["problem"] for p in problems)


def _state(step: int) -> dict[str, Any]:
    torch.manual_seed(step)
    return {
        "model": torch.nn.Linear(4, 3).state_dict(),
        "emb": torch.zeros(2, 5, dtype=torch.bfloat16),
        "step": step,
    }


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A root with checkpoint-1..3, each with a loss metric."""
    path = tmp_path / "run"
    mgr = ckptguard.CheckpointManager(path, keep_last=None)
    for step in STEPS:
        mgr.save(step, _state(step), metrics={"loss": 1.0 / step})
    return path


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _listing(path: Path) -> list[str]:
    """Every path under ``path``, relative, sorted (to prove a dry run changed nothing)."""
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


# -- --help / --version ------------------------------------------------------------------------
def test_help_and_version() -> None:
    for flag in ("--help", "-h"):
        proc = _cli(flag)
        assert proc.returncode == 0, proc.stderr
        for command in ("list", "verify", "inspect", "clean"):
            assert command in _text(proc.stdout)
    version = _cli("--version")
    assert version.returncode == 0, version.stderr
    assert ckptguard.__version__ in version.stdout
    for command in ("list", "verify", "inspect", "clean"):
        sub = _cli(command, "--help")
        assert sub.returncode == 0, sub.stderr
        assert "--json" in sub.stdout


def test_bad_usage_exits_2() -> None:
    assert _cli("no-such-command").returncode == 2
    assert _cli("list").returncode == 2  # ROOT missing
    assert _cli("verify", "--no-such-flag", ".").returncode == 2


# -- list --------------------------------------------------------------------------------------
def test_list_table(root: Path) -> None:
    proc = _cli("list", root)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for step in STEPS:  # one row per name, the name first
        assert any(re.match(rf"^checkpoint-{step}\s", line) for line in lines), proc.stdout
    for header in ("name", "time", "size", "files", "metrics", "flags", "status"):
        assert header in _text(proc.stdout)
    assert "loss=0.5" in _text(proc.stdout)
    assert proc.stdout.count("ok (sizes)") == len(STEPS)


def test_list_json(root: Path) -> None:
    proc = _cli("list", "--json", root)
    assert proc.returncode == 0, proc.stderr
    rows = _json(proc)["checkpoints"]
    assert [r["step"] for r in rows] == list(STEPS)
    infos = {c.step: c for c in ckptguard.CheckpointManager(root).list()}
    for row in rows:
        assert row["status"] == "ok (sizes)"
        assert row["name"] == f"checkpoint-{row['step']}"
        assert row["metrics"] == {"loss": 1.0 / row["step"]}
        assert row["size_bytes"] == infos[row["step"]].size_bytes > 0
        assert row["files"] == infos[row["step"]].files
        assert row["created_at"]
        assert row["problems"] == []


def test_list_checksums_corrupt_and_foreign(root: Path) -> None:
    _flip_last_byte(root / "checkpoint-2" / "model.safetensors")  # same size, new content
    with (root / "checkpoint-3" / "tensors.safetensors").open("ab") as f:
        f.write(b"\0")  # a size change: seen without checksums too
    foreign = root / "checkpoint-9"  # left by a Trainer crash: no manifest
    foreign.mkdir()
    (foreign / "model.safetensors").write_bytes(b"half")
    (root / "notes.txt").write_text("user file, not listed")

    by_step = {r["step"]: r for r in _json(_cli("list", "--json", root))["checkpoints"]}
    assert set(by_step) == {1, 2, 3, 9}
    assert by_step[1]["status"] == "ok (sizes)"
    assert by_step[2]["status"] == "ok (sizes)"  # sizes only: the flipped byte is unseen
    assert by_step[3]["status"] == "corrupt"
    assert "tensors.safetensors" in _texts(by_step[3]["problems"])
    assert by_step[9]["status"] == "no manifest"
    assert by_step[9]["size_bytes"] is None
    assert by_step[9]["metrics"] == {}

    proc = _cli("list", "--checksums", "--json", root)
    assert proc.returncode == 0, proc.stderr
    by_step = {r["step"]: r for r in _json(proc)["checkpoints"]}
    assert by_step[1]["status"] == "ok"
    assert by_step[2]["status"] == "corrupt"
    assert "checksum mismatch" in _texts(by_step[2]["problems"])
    assert by_step[3]["status"] == "corrupt"
    assert by_step[9]["status"] == "no manifest"

    table = _cli("list", "--checksums", root)
    assert table.returncode == 0, table.stderr
    rows = [line for line in table.stdout.splitlines() if line.startswith("checkpoint-")]
    assert sum("corrupt" in line for line in rows) == 2
    assert any(re.match(r"^checkpoint-9\s.*no manifest", line) for line in rows), rows
    # each problem on a line of its own below the table, whole
    assert "  checkpoint-2: model.safetensors: checksum mismatch" in table.stdout
    assert f"  checkpoint-9: no ckptguard.json in {root / 'checkpoint-9'}" in table.stdout


def test_list_missing_root(tmp_path: Path) -> None:
    for args in (("list",), ("list", "--json")):
        proc = _cli(*args, tmp_path / "nope")
        assert proc.returncode == 2
        # --json: the error is a JSON document on stdout, as for every other outcome
        where = proc.stdout if "--json" in args else proc.stderr
        assert "does not exist" in _text(where)


# -- verify ------------------------------------------------------------------------------------
def test_verify_all_good(root: Path) -> None:
    proc = _cli("verify", root / "checkpoint-2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("ok")
    proc = _cli("verify", root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("ok ") == len(STEPS)
    report = _json(_cli("verify", "--json", root))
    assert report["ok"] is True
    assert [c["step"] for c in report["checkpoints"]] == list(STEPS)
    assert all(c["ok"] and c["problems"] == [] for c in report["checkpoints"])
    assert all(c["files_checked"] == 3 and c["bytes_checked"] > 0 for c in report["checkpoints"])


def test_verify_corrupt(root: Path) -> None:
    _flip_last_byte(root / "checkpoint-2" / "model.safetensors")

    proc = _cli("verify", root)
    assert proc.returncode == 1
    assert "CORRUPT" in _text(proc.stdout)
    assert "model.safetensors: checksum mismatch" in _text(proc.stdout)
    proc = _cli("verify", "--json", root)
    assert proc.returncode == 1
    report = _json(proc)
    assert report["ok"] is False
    by_step = {c["step"]: c for c in report["checkpoints"]}
    assert [by_step[s]["ok"] for s in STEPS] == [True, False, True]
    assert "checksum mismatch" in _texts(by_step[2]["problems"])

    assert _cli("verify", root / "checkpoint-1").returncode == 0
    single = _cli("verify", "--json", root / "checkpoint-2")
    assert single.returncode == 1
    assert _json(single)["ok"] is False

    (root / "checkpoint-3" / MANIFEST_NAME).write_text("{not json")
    broken = _cli("verify", "--json", root / "checkpoint-3")
    assert broken.returncode == 1
    assert _json(broken)["checkpoints"][0]["problems"]


def test_verify_missing_path(tmp_path: Path) -> None:
    for args in (("verify",), ("verify", "--json")):
        proc = _cli(*args, tmp_path / "nope")
        assert proc.returncode == 2
        # --json: the error is a JSON document on stdout, as for every other outcome
        where = proc.stdout if "--json" in args else proc.stderr
        assert "does not exist" in _text(where)
    (tmp_path / "file").write_text("x")
    assert _cli("verify", tmp_path / "file").returncode == 2


# -- inspect -----------------------------------------------------------------------------------
def test_inspect(root: Path) -> None:
    path = root / "checkpoint-2"
    proc = _cli("inspect", path)
    assert proc.returncode == 0, proc.stderr
    for text in ("step 2", "weight", "bias", "F32", "BF16", "(3, 4)", "(3,)", "(2, 5)"):
        assert text in _text(proc.stdout), text
    assert "model.safetensors" in _text(proc.stdout)

    info = _json(_cli("inspect", "--json", path))
    assert info["step"] == 2
    assert info["name"] == "checkpoint-2"
    assert info["metrics"] == {"loss": 0.5}
    assert sorted(f["path"] for f in info["files"]) == [
        "model.safetensors",
        "state.json",
        "tensors.safetensors",
    ]
    tensors = {(t["file"], t["name"]): t for t in info["tensors"]}
    assert tensors[("model.safetensors", "weight")]["dtype"] == "F32"
    assert tensors[("model.safetensors", "weight")]["shape"] == [3, 4]
    assert tensors[("model.safetensors", "weight")]["bytes"] == 48
    assert tensors[("model.safetensors", "bias")]["shape"] == [3]
    emb = [t for (file, _), t in tensors.items() if file == "tensors.safetensors"]
    assert [(t["dtype"], t["shape"]) for t in emb] == [("BF16", [2, 5])]


def test_inspect_missing_and_corrupt(root: Path, tmp_path: Path) -> None:
    for args in (("inspect",), ("inspect", "--json")):
        proc = _cli(*args, tmp_path / "nope")
        assert proc.returncode == 2
        where = proc.stdout if "--json" in args else proc.stderr  # --json: JSON on stdout
        assert "does not exist" in _text(where)

    (root / "checkpoint-1" / MANIFEST_NAME).write_text('{"format": "not ours"')
    proc = _cli("inspect", root / "checkpoint-1")
    assert proc.returncode == 1
    assert "error" in _text(proc.stderr)
    assert _cli("inspect", "--json", root / "checkpoint-1").returncode == 1

    # A truncated safetensors header is reported, not trusted.
    (root / "checkpoint-2" / "model.safetensors").write_bytes(b"\xff\xff\xff\xff")
    proc = _cli("inspect", root / "checkpoint-2")
    assert proc.returncode == 1
    assert "invalid safetensors" in _text(proc.stderr)


# -- clean -------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Mess:
    stale: Path
    live: Path
    trash_old: Path  # trash of checkpoint-1, which is still valid: safe to remove
    trash_only_copy: Path  # checkpoint-2 cut mid-replace: the only copy, must come back
    quarantined: Path


def _make_mess(root: Path) -> _Mess:
    layout = RootLayout(str(root))
    dead = dataclasses.replace(current_writer(), pid=_dead_pid(), pid_start=1)
    stale = Path(stage(root, "checkpoint-4", writer=dead).path)
    (stale / "model.safetensors").write_bytes(b"partial")
    live = Path(stage(root, "checkpoint-5").path)  # owned by this (live) process
    trash_old = Path(layout.trash, f"checkpoint-1.{new_save_id()}")
    trash_old.mkdir()
    (trash_old / "w.bin").write_bytes(b"old")
    trash_only_copy = Path(layout.trash, f"checkpoint-2.{new_save_id()}")
    os.rename(root / "checkpoint-2", trash_only_copy)
    quarantined = Path(layout.quarantine, f"checkpoint-7.{new_save_id()}")
    quarantined.mkdir()
    (quarantined / "junk").write_text("x")
    Path(f"{quarantined}.json").write_text('{"reason": "in the way"}')
    return _Mess(stale, live, trash_old, trash_only_copy, quarantined)


def _assert_cleaned(root: Path, mess: _Mess) -> None:
    assert not mess.stale.exists()
    assert mess.live.exists()  # never remove a staging dir a live writer owns
    assert not mess.trash_old.exists()
    assert not mess.trash_only_copy.exists()
    assert not mess.quarantined.exists()
    assert not Path(f"{mess.quarantined}.json").exists()
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("checkpoint-")) == [
        "checkpoint-1",
        "checkpoint-2",
        "checkpoint-3",
    ]
    for step in STEPS:
        assert ckptguard.verify(root / f"checkpoint-{step}").ok, step
    restored = ckptguard.CheckpointManager(root).restore(step=2)
    assert torch.equal(restored["model"]["weight"], _state(2)["model"]["weight"])


def test_clean_dry_run_then_yes(root: Path) -> None:
    mess = _make_mess(root)
    before = _listing(root)

    proc = _cli("clean", root)
    assert proc.returncode == 0, proc.stderr
    assert "dry run" in _text(proc.stdout)
    assert "nothing removed" in _text(proc.stdout)
    assert "would remove" in _text(proc.stdout)
    for kind in ("staging-stale", "trash", "quarantine"):
        assert kind in _text(proc.stdout)
    assert "staging-live" not in _text(proc.stdout)

    dry = _cli("clean", "--json", root)
    assert dry.returncode == 0, dry.stderr
    plan = _json(dry)
    assert plan["dry_run"] is True
    assert plan["removed"] == []
    assert plan["recovery_actions"] == []
    planned = {(p["kind"], p["path"]) for p in plan["planned"]}
    assert planned == {
        ("staging-stale", str(mess.stale)),
        ("trash", str(mess.trash_old)),
        ("trash", str(mess.trash_only_copy)),
        ("quarantine", str(mess.quarantined)),
    }
    assert _listing(root) == before  # a dry run changes nothing

    proc = _cli("clean", "--yes", root)
    assert proc.returncode == 0, proc.stderr
    assert "restored" in _text(proc.stdout)
    assert "interrupted replace" in _text(proc.stdout)
    _assert_cleaned(root, mess)

    again = _cli("clean", "--yes", root)
    assert again.returncode == 0, again.stderr
    assert "nothing to clean" in _text(again.stdout)


def test_clean_yes_json(root: Path) -> None:
    mess = _make_mess(root)
    proc = _cli("clean", "--yes", "--json", root)
    assert proc.returncode == 0, proc.stderr
    result = _json(proc)
    assert result["dry_run"] is False
    assert str(mess.quarantined) in result["removed"]
    actions = "\n".join(result["recovery_actions"])
    assert f"restored {root / 'checkpoint-2'}" in actions
    assert "stale staging" in actions
    _assert_cleaned(root, mess)

    empty = _json(_cli("clean", "--json", root))
    assert empty == {
        "ok": True,
        "command": "clean",
        "root": str(root),
        "dry_run": True,
        "planned": [],
        "recovery_actions": [],
        "removed": [],
    }


def test_clean_nothing_and_missing_root(root: Path, tmp_path: Path) -> None:
    proc = _cli("clean", root)
    assert proc.returncode == 0, proc.stderr
    assert "nothing to clean" in _text(proc.stdout)
    assert _cli("clean", "--yes", tmp_path / "nope").returncode == 2
    assert _cli("clean", "--json", tmp_path / "nope").returncode == 2


# -- found in review (each failed before its fix) ------------------------------------------
def test_verify_a_folder_without_manifest_fails(root: Path) -> None:
    half = root / "checkpoint-9"  # what a Trainer crash leaves: no manifest
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"partial")
    proc = _cli("verify", half)
    assert proc.returncode == 1, proc.stdout
    assert "no ckptguard.json" in _text(proc.stdout)
    proc = _cli("verify", "--json", root)
    assert proc.returncode == 1
    bad = [c for c in _json(proc)["checkpoints"] if not c["ok"]]
    assert [Path(c["path"]).name for c in bad] == ["checkpoint-9"]


def test_inspect_a_checkpoint_missing_a_file_is_corrupt_not_missing(root: Path) -> None:
    (root / "checkpoint-3" / "tensors.safetensors").unlink()
    proc = _cli("inspect", root / "checkpoint-3")
    assert proc.returncode == 1
    assert "tensors.safetensors" in _text(proc.stderr)
    assert "not a valid checkpoint" in _text(proc.stderr)


def test_clean_says_restore_for_an_interrupted_replace(root: Path) -> None:
    trash = Path(RootLayout(str(root)).trash) / f"checkpoint-2.{new_save_id()}"
    os.rename(root / "checkpoint-2", trash)
    dry = _cli("clean", root)
    assert f"would restore trash {trash}" in _text(dry.stdout)
    planned = _json(_cli("clean", "--json", root))["planned"]
    assert [p["action"] for p in planned] == ["restore"]


def test_piped_output_never_wraps_a_path(root: Path) -> None:
    deep = root / ("x" * 60) / ("y" * 60)
    mgr = ckptguard.CheckpointManager(deep)
    mgr.save(1, _state(1))
    proc = _cli("verify", deep / "checkpoint-1")
    assert str(deep / "checkpoint-1") in proc.stdout  # whole, on one line


# -- issue 16: a root or an empty dir where a checkpoint was expected --------------------------
def test_inspect_and_verify_given_a_root_say_so_and_point_to_list(root: Path) -> None:
    proc = _cli("inspect", root)
    assert proc.returncode == 2
    text = _text(proc.stderr)
    assert f"{root} is a checkpoint root (3 checkpoints), not a checkpoint" in text
    assert f"ckptguard list {root}" in text
    assert "rejected" not in text
    assert "do not load" not in text

    proc = _cli("verify", root)  # a root: every checkpoint of it is verified
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("ok ") == len(STEPS)
    assert f"{root} is a checkpoint root: 3 checkpoints verified, 0 corrupt" in _text(proc.stdout)
    assert f"ckptguard list {root}" in _text(proc.stdout)


def test_an_empty_directory_is_empty_not_corrupt(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    for command in ("verify", "inspect"):
        proc = _cli(command, empty)
        assert proc.returncode == 2, (command, proc.stdout, proc.stderr)
        assert f"{empty} is empty: there is no checkpoint to {command}" in _text(proc.stderr)
        assert "CORRUPT" not in proc.stdout + proc.stderr
        assert "manifest" not in _text(proc.stderr)
    proc = _cli("list", empty)
    assert proc.returncode == 0, proc.stderr
    assert f"no checkpoints in {empty}" in _text(proc.stdout)


# -- issue 16: inspect shows the state besides tensors -----------------------------------------
def test_inspect_shows_step_scheduler_and_optimizer_hyperparameters(tmp_path: Path) -> None:
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, betas=(0.8, 0.95), weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    mgr = ckptguard.CheckpointManager(tmp_path / "run")
    info = mgr.save(
        7, {"model": model, "optimizer": optimizer, "scheduler": scheduler, "step": 7}
    ).result()

    proc = _cli("inspect", info.path)
    assert proc.returncode == 0, proc.stderr
    out = _text(proc.stdout)
    for line in (
        "step = 7",
        "optimizer.param_groups[0].lr = 0.01",
        "optimizer.param_groups[0].betas = [0.8, 0.95]",
        "optimizer.param_groups[0].weight_decay = 0.1",
        "scheduler.step_size = 2",
        "scheduler.gamma = 0.5",
        "scheduler.last_epoch = 1",
    ):
        assert line in out, (line, proc.stdout)
    assert "exp_avg" not in out.split("files")[0]  # tensors are in the tensor table, not here

    state = _json(_cli("inspect", "--json", info.path))["state"]
    assert state["step"] == 7
    group = state["optimizer"]["param_groups"][0]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (0.01, [0.8, 0.95], 0.1)
    assert state["scheduler"]["gamma"] == 0.5
    weight = state["model"]["weight"]["__tensor__"]
    assert (weight["dtype"], weight["shape"]) == ("F32", [3, 4])
    exp_avg = state["optimizer"]["state"]["0"]["exp_avg"]["__tensor__"]
    assert exp_avg["shape"] in ([3, 4], [3])


# -- issue 16: clean says why and how big ------------------------------------------------------
def test_clean_shows_each_entry_size_and_the_quarantine_reason(tmp_path: Path) -> None:
    root = tmp_path / "run"
    in_the_way = root / "checkpoint-2"  # a Trainer's half-written save: no manifest
    in_the_way.mkdir(parents=True)
    (in_the_way / "model.safetensors").write_bytes(b"x" * 3000)
    mgr = ckptguard.CheckpointManager(root, keep_last=None)
    mgr.save(2, _state(2))  # moves the folder in the way to quarantine, with a note
    (entry,) = [p for p in Path(RootLayout(str(root)).quarantine).iterdir() if p.is_dir()]

    dry = _cli("clean", root)
    assert dry.returncode == 0, dry.stderr
    line = next(x for x in dry.stdout.splitlines() if "quarantine" in x)
    assert "would remove quarantine" in line
    assert str(entry) in line
    assert "(2.9 KiB;" in line
    assert f"quarantined because: no ckptguard.json in {in_the_way}" in line

    (planned,) = _json(_cli("clean", "--json", root))["planned"]
    assert planned["path"] == str(entry)
    assert planned["size_bytes"] == 3000
    assert planned["reason"] == f"no ckptguard.json in {in_the_way}"
    assert planned["action"] == "remove"

    done = _cli("clean", "--yes", root)
    assert done.returncode == 0, done.stderr
    assert "quarantined because" in done.stdout  # shown before it went
    assert not entry.exists()


def test_clean_without_a_note_says_no_reason_was_recorded(root: Path) -> None:
    entry = Path(RootLayout(str(root)).quarantine) / f"checkpoint-8.{new_save_id()}"
    entry.mkdir()
    (entry / "w.bin").write_bytes(b"12345")
    line = next(x for x in _cli("clean", root).stdout.splitlines() if "quarantine" in x)
    assert "(5 B; no reason recorded)" in line
    assert _json(_cli("clean", "--json", root))["planned"][0]["reason"] is None


# -- issue 16: doctor's start-up hint ----------------------------------------------------------
def test_doctor_start_up_warnings_never_nest_brackets(root: Path) -> None:
    import logging

    from ckptguard._tools.doctor import warn_at_start

    (root / ".DS_Store").write_text("hidden")
    stale = Path(RootLayout(str(root)).trash) / f"checkpoint-1.{new_save_id()}"
    stale.mkdir()

    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    log = logging.getLogger("ckptguard.test.doctor")
    log.setLevel(logging.INFO)  # whatever other tests left on the "ckptguard" logger
    log.addHandler(Collect())
    warn_at_start(str(root), log=log, env={})
    hints = [r for r in records if "root.hidden" in r or "root.leftovers" in r]
    assert len(hints) == 2, records
    for message in hints:
        depth = 0
        for char in message:
            depth += {"(": 1, ")": -1}.get(char, 0)
            assert depth <= 1, message
        assert " — " in message  # the advice follows a dash
