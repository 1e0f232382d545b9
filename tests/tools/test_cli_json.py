"""``--json``: exactly one JSON document on stdout for every subcommand, in every outcome.

The schema is the one in ``ckptguard._tools.cli``'s docstring: ``ok`` (true exactly when
the exit code is 0) and ``command`` always; an error is ``{"ok": false, "command",
"error": {type, message, path, hint}}`` and nothing else; every ``problems`` is a list of
``{path, problem, severity}``. Exit codes: 0 good, 1 corrupt or refused, 2 bad usage or
a path that cannot be acted on. Run in-process with click's CliRunner (real files).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

import ckptguard
from ckptguard._format.layout import MANIFEST_NAME
from ckptguard._tools.cli import main

ERROR_KEYS = {"type", "message", "path", "hint"}
PROBLEM_KEYS = {"path", "problem", "severity"}


def _problem_lists(doc: Any) -> list[Any]:
    """Every value under a "problems" key, anywhere in the document."""
    found = []
    if isinstance(doc, dict):
        for key, value in doc.items():
            if key == "problems":
                found.append(value)
            found.extend(_problem_lists(value))
    elif isinstance(doc, list):
        for value in doc:
            found.extend(_problem_lists(value))
    return found


def _run(*args: str | Path) -> tuple[int, dict[str, Any]]:
    """(exit code, the document) of ``ckptguard ARGS --json``, the schema checked."""
    argv = [*map(str, args), "--json"]
    result = CliRunner().invoke(main, argv, catch_exceptions=False)
    doc = json.loads(result.stdout)  # exactly one document: "Extra data" otherwise
    assert isinstance(doc, dict), result.stdout
    assert doc["ok"] is (result.exit_code == 0), (argv, doc)
    assert doc["command"] == (argv[0] if argv[0] in main.commands else "ckptguard"), doc
    if "error" in doc:
        assert set(doc) == {"ok", "command", "error"}, doc
        assert set(doc["error"]) == ERROR_KEYS, doc
        assert doc["error"]["type"], doc
        assert doc["error"]["message"], doc
        assert result.exit_code in {1, 2}, doc
    for problems in _problem_lists(doc):
        assert isinstance(problems, list), doc
        for problem in problems:
            assert set(problem) == PROBLEM_KEYS, problem
            assert problem["severity"] in {"error", "warning"}, problem
            assert problem["problem"], problem
    return result.exit_code, doc


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "run"
    mgr = ckptguard.CheckpointManager(path, keep_last=None)
    for step in (1, 2, 3):
        mgr.save(step, {"w": torch.full((2, 3), float(step)), "step": step})
    return path


def _corrupt(root: Path, step: int) -> Path:
    path = root / f"checkpoint-{step}" / "tensors.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    return path.parent


# -- success -----------------------------------------------------------------------------------
ROOT_KEYS = {"root", "checkpoints"}
VERIFY_KEYS = {"path", "kind", "checkpoints"}
INSPECT_KEYS = {
    "path", "name", "step", "save_id", "created_at", "size_bytes", "shared_bytes",
    "shared_files", "metrics", "metadata", "writer", "versions", "files", "tensors", "state",
}  # fmt: skip
CLEAN_KEYS = {"root", "dry_run", "planned", "recovery_actions", "removed"}
PIN_KEYS = {"root", "step", "path", "pinned"}
RM_KEYS = {"root", "step", "path", "dry_run", "removed", "size_bytes", "protected", "forced"}
ADOPT_KEYS = {"root", "dry_run", "checkpoints"}
SUCCESS: dict[str, tuple[list[str], set[str]]] = {
    # case: (arguments, "@x" standing for ROOT/x, and the keys besides ok and command)
    "list": (["list", "@"], ROOT_KEYS),
    "list --checksums": (["list", "--checksums", "@"], ROOT_KEYS),
    "verify a root": (["verify", "@"], VERIFY_KEYS),
    "verify a checkpoint": (["verify", "@checkpoint-2"], VERIFY_KEYS),
    "inspect": (["inspect", "@checkpoint-2"], INSPECT_KEYS),
    "clean": (["clean", "@"], CLEAN_KEYS),
    "clean --yes": (["clean", "--yes", "@"], CLEAN_KEYS),
    "pin": (["pin", "@", "1"], PIN_KEYS),
    "unpin": (["unpin", "@", "1"], PIN_KEYS),
    "rm (a dry run)": (["rm", "@", "1"], RM_KEYS),
    "rm --yes": (["rm", "--yes", "@", "2"], RM_KEYS),
    "rm the newest --force": (["rm", "--force", "@", "3"], RM_KEYS),
    "adopt (nothing to adopt)": (["adopt", "@"], ADOPT_KEYS),
    "adopt --yes": (["adopt", "--yes", "@"], ADOPT_KEYS),
}


def _args(args: list[str], base: Path) -> list[str]:
    return [str(base / a[1:]) if a.startswith("@") else a for a in args]


@pytest.mark.parametrize("case", list(SUCCESS))
def test_success_is_one_document_with_ok_true(case: str, root: Path) -> None:
    args, keys = SUCCESS[case]
    code, doc = _run(*_args(args, root))
    assert code == 0, doc
    assert set(doc) == {"ok", "command", *keys}, doc


def test_list_rows_and_their_problems(root: Path) -> None:
    _corrupt(root, 2)
    code, doc = _run("list", "--checksums", root)
    assert code == 0  # a listing that worked, whatever it found
    rows = {r["name"]: r for r in doc["checkpoints"]}
    assert rows["checkpoint-1"]["problems"] == []
    assert rows["checkpoint-2"]["status"] == "corrupt"
    (problem,) = rows["checkpoint-2"]["problems"]
    assert problem["severity"] == "error"
    assert problem["path"] == str(root / "checkpoint-2")
    assert "checksum mismatch" in problem["problem"]


def test_verify_corrupt_is_exit_1_with_problem_objects(root: Path) -> None:
    bad = _corrupt(root, 3)
    for target in (root, bad):
        code, doc = _run("verify", target)
        assert code == 1, doc
        assert "error" not in doc  # a verdict, not an error: the report is there
        by_path = {c["path"]: c for c in doc["checkpoints"]}
        assert by_path[str(bad)]["ok"] is False
        assert by_path[str(bad)]["problems"][0]["path"] == str(bad)
        assert "checksum mismatch" in by_path[str(bad)]["problems"][0]["problem"]
    assert _run("verify", root)[1]["kind"] == "root"
    assert _run("verify", bad)[1]["kind"] == "checkpoint"


def test_doctor_document(root: Path) -> None:
    code, doc = _run("doctor", root)
    assert code in {0, 1}, doc  # versions of this machine may warn
    assert {"root", "status", "exit_code", "checks", "problems"} <= set(doc)
    assert doc["exit_code"] == code
    assert len(doc["problems"]) == sum(c["status"] != "ok" for c in doc["checks"])

    (root / ".hidden").write_text("left by a tool")
    code, doc = _run("doctor", "--expect-empty", root)
    assert code == 2, doc  # doctor's own scale: FAIL
    assert doc["ok"] is False
    failed = [p for p in doc["problems"] if p["severity"] == "error"]
    assert any("root.empty" in p["problem"] for p in failed), doc


# -- errors ------------------------------------------------------------------------------------
ERRORS: dict[str, tuple[list[str], int, str, str]] = {
    # case: (arguments, "@x" standing for TMP/x, exit code, error type, words in the message)
    "list a missing root": (["list", "@nope"], 2, "CheckpointNotFound", "does not exist"),
    "list a file": (["list", "@file"], 2, "RootNotADirectory", "is a file"),
    "verify a missing path": (["verify", "@nope"], 2, "CheckpointNotFound", "does not exist"),
    "verify an empty dir": (["verify", "@empty"], 2, "CheckpointNotFound", "is empty"),
    "inspect a missing path": (["inspect", "@nope"], 2, "CheckpointNotFound", "does not exist"),
    "inspect an empty dir": (["inspect", "@empty"], 2, "CheckpointNotFound", "is empty"),
    "inspect a root": (["inspect", "@run"], 2, "CheckpointNotFound", "is a checkpoint root"),
    "inspect a bad manifest": (
        ["inspect", "@run/checkpoint-1"], 1, "UnsafeManifest", "format must be",
    ),
    "inspect a folder without manifest": (
        ["inspect", "@half"], 1, "CorruptCheckpoint", f"no {MANIFEST_NAME}",
    ),
    "clean a missing root": (["clean", "--yes", "@nope"], 2, "CheckpointNotFound", "not exist"),
    "a missing argument": (["list"], 2, "UsageError", "Missing argument"),
    "an unknown option": (["verify", "--no-such-flag", "@run"], 2, "UsageError", "No such option"),
    "a bad option value": (["clean", "@run", "--stale-after", "soon"], 2, "UsageError", "soon"),
    "an unknown command": (["no-such-command"], 2, "UsageError", "No such command"),
    "doctor: a bad option value": (["doctor", "@run", "--keep", "all"], 2, "UsageError", "all"),
    "rm the newest": (["rm", "@run", "3"], 1, "ProtectedCheckpoint", "newest valid"),
    "rm --yes the newest": (["rm", "--yes", "@run", "3"], 1, "ProtectedCheckpoint", "newest"),
    "rm a missing step": (["rm", "@run", "9"], 2, "CheckpointNotFound", "no checkpoint for step 9"),
    "rm in a missing root": (["rm", "@nope", "1"], 2, "CheckpointNotFound", "does not exist"),
    "pin a missing step": (["pin", "@run", "9"], 2, "CheckpointNotFound", "step 9"),
    "pin a step that is no number": (["pin", "@run", "x"], 2, "UsageError", "'x'"),
    "unpin a missing step": (["unpin", "@run", "9"], 2, "CheckpointNotFound", "step 9"),
    "rm without a step": (["rm", "@run"], 2, "UsageError", "Missing argument 'STEP'"),
    "adopt a missing root": (["adopt", "@nope"], 2, "CheckpointNotFound", "is not a directory"),
    "adopt a URL": (["adopt", "s3://bucket/run"], 2, "UnsupportedRoot", "is a URL"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_are_one_document_with_a_typed_error(case: str, root: Path) -> None:
    tmp = root.parent
    (tmp / "file").write_text("x")
    (tmp / "empty").mkdir()
    (tmp / "half").mkdir()
    (tmp / "half" / "model.safetensors").write_bytes(b"partial")
    (root / "checkpoint-1" / MANIFEST_NAME).write_text('{"format": "not ours"}')
    args, want_code, want_type, words = ERRORS[case]
    code, doc = _run(*_args(args, tmp))
    assert code == want_code, doc
    assert "error" in doc, doc
    assert doc["error"]["type"] == want_type, doc
    assert words in doc["error"]["message"], doc
    if want_type != "UsageError":
        assert doc["error"]["path"], doc  # names the path it is about ...
        assert doc["error"]["hint"], doc  # ... and what to do


def test_inspect_a_root_points_to_list(root: Path) -> None:
    _, doc = _run("inspect", root)
    assert doc["error"]["path"] == str(root)
    assert f"ckptguard list {root}" in doc["error"]["hint"]
    assert str(root / "checkpoint-3") in doc["error"]["hint"]  # one to inspect
    assert "do not load" not in json.dumps(doc)  # it is not a rejected manifest


def test_an_unexpected_error_is_still_one_document(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr("ckptguard._tools.cli._list_rows", broken)
    code, doc = _run("list", root)
    assert code == 2
    assert doc["error"]["type"] == "RuntimeError"
    assert doc["error"]["message"] == "a bug"


def test_a_store_root_and_its_checkpoint(tmp_path: Path) -> None:
    """The same on an object store (fsspec's in-process memory filesystem)."""
    url = f"memory://ckptguard-tests/cli-{tmp_path.name}"
    mgr = ckptguard.CheckpointManager(url, keep_last=None)
    for step in (1, 2):
        mgr.save(step, {"w": torch.zeros(2), "step": step})
    code, doc = _run("list", url)
    assert (code, [r["name"] for r in doc["checkpoints"]]) == (0, ["checkpoint-1", "checkpoint-2"])
    code, doc = _run("verify", url)
    assert (code, doc["kind"], len(doc["checkpoints"])) == (0, "root", 2)
    code, doc = _run("verify", f"{url}/checkpoint-2")
    assert (code, doc["kind"], doc["checkpoints"][0]["ok"]) == (0, "checkpoint", True)
    code, doc = _run("inspect", f"{url}/checkpoint-2")
    assert (code, doc["step"], doc["state"]["step"]) == (0, 2, 2)
    code, doc = _run("inspect", url)
    assert (code, doc["error"]["type"]) == (2, "CheckpointNotFound")
    assert "is a checkpoint root" in doc["error"]["message"]
    code, doc = _run("verify", f"{url}/checkpoint-9")
    assert (code, doc["error"]["type"]) == (2, "CheckpointNotFound")
    code, doc = _run("clean", url)
    assert (code, doc["planned"]) == (0, [])


# -- pin, unpin, rm ----------------------------------------------------------------------------
def _listed(root: Path | str, *extra: str) -> dict[str, dict[str, Any]]:
    code, doc = _run("list", *extra, root)
    assert code == 0, doc
    return {r["name"]: r for r in doc["checkpoints"]}


def test_pin_unpin_and_rm_with_its_refusals(tmp_path: Path) -> None:
    root = tmp_path / "run"
    mgr = ckptguard.CheckpointManager(root, keep_last=None, best_metric="loss")
    for step, loss in ((1, 0.5), (2, 0.2), (3, 0.4), (4, 0.3)):
        mgr.save(step, {"w": torch.zeros(2)}, metrics={"loss": loss})
    rows = _listed(root)
    assert [n for n, r in rows.items() if r["best"]] == ["checkpoint-2"]
    assert not any(r["pinned"] for r in rows.values())

    code, doc = _run("pin", root, "1")
    assert (code, doc["pinned"], doc["path"]) == (0, True, str(root / "checkpoint-1"))
    assert _listed(root)["checkpoint-1"]["pinned"] is True

    for step, why in ((1, "it is pinned"), (2, "best checkpoint by loss"), (4, "newest valid")):
        for extra in ([], ["--yes"]):
            code, doc = _run("rm", *extra, root, str(step))
            assert (code, doc["error"]["type"]) == (1, "ProtectedCheckpoint"), doc
            assert why in doc["error"]["message"]
            assert "--force" in doc["error"]["hint"]
            assert (root / f"checkpoint-{step}").is_dir()

    code, doc = _run("rm", root, "3")  # a dry run
    assert code == 0
    assert (doc["dry_run"], doc["removed"], doc["protected"]) == (True, False, None)
    assert doc["size_bytes"] > 0
    assert (root / "checkpoint-3").is_dir()
    code, doc = _run("rm", "--yes", root, "3")
    assert (code, doc["removed"]) == (0, True)
    assert not (root / "checkpoint-3").exists()
    assert "checkpoint-3" not in _listed(root)

    code, doc = _run("rm", "--yes", "--force", root, "1")
    assert (code, doc["forced"], doc["protected"]) == (0, True, "it is pinned (unpin it first)")
    assert not (root / "checkpoint-1").exists()
    assert ckptguard.CheckpointManager(root).restore(step=4)["w"].shape == (2,)

    code, doc = _run("pin", root, "2")
    code, doc = _run("unpin", root, "2")
    assert (code, doc["pinned"]) == (0, False)
    assert _listed(root)["checkpoint-2"]["pinned"] is False

    mgr.save(5, {"w": torch.zeros(2)}, metrics={"loss": 0.9}, pin=True)
    code, doc = _run("unpin", root, "5")
    assert (code, doc["error"]["type"]) == (1, "ProtectedCheckpoint"), doc
    assert "saved with pin=True" in doc["error"]["message"]


def test_rm_and_pin_in_text(root: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["rm", str(root), "1"])
    assert result.exit_code == 0, result.output
    assert f"would delete {root / 'checkpoint-1'} (" in result.stdout
    assert "dry run: nothing removed" in result.stdout
    result = runner.invoke(main, ["rm", str(root), "3"])
    assert result.exit_code == 1
    assert "newest valid checkpoint" in result.stderr
    assert "pass --force" in result.stderr
    result = runner.invoke(main, ["pin", str(root), "1"])
    assert result.exit_code == 0
    assert f"ckptguard unpin {root} 1" in " ".join(result.stdout.split())
    table = runner.invoke(main, ["list", str(root)])
    line = next(x for x in table.stdout.splitlines() if x.startswith("checkpoint-1 "))
    assert "pinned" in line  # the flags column


def test_list_with_a_mirror_has_one_row_per_name(tmp_path: Path) -> None:
    url = f"memory://ckptguard-tests/mirror-{tmp_path.name}"
    root = tmp_path / "run"
    mgr = ckptguard.CheckpointManager(root, keep_last=None, mirror=url)
    for step in (1, 2):
        mgr.save(step, {"w": torch.zeros(2)})
    mgr.close()
    ckptguard.CheckpointManager(root, keep_last=None).save(3, {"w": torch.ones(2)})
    code, doc = _run("rm", "--yes", "--force", root, "1")  # leaves the mirror's copy
    assert code == 0, doc

    rows = _listed(root, "--mirror", url)
    assert list(rows) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert [r["mirrored"] for r in rows.values()] == [True, True, False]
    assert rows["checkpoint-1"]["status"] == "mirror only"
    assert rows["checkpoint-1"]["path"] == f"{url}/checkpoint-1"
    assert rows["checkpoint-2"]["status"] == "ok (sizes)"
    assert all(r["mirrored"] is None for r in _listed(root).values())

    table = CliRunner().invoke(main, ["list", str(root), "--mirror", url])
    assert table.exit_code == 0, table.output
    assert "mirrored" in table.stdout
    assert "mirror only" in table.stdout

    # rm --mirror deletes the mirror's copy too.
    code, doc = _run("rm", "--yes", "--mirror", url, root, "2")
    assert code == 0, doc
    rows = _listed(root, "--mirror", url)
    assert list(rows) == ["checkpoint-1", "checkpoint-3"]


def test_pin_and_rm_refuse_a_root_whose_meta_dir_is_a_symlink(root: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    meta = root / ".ckptguard"
    for child in meta.iterdir():
        child.rename(elsewhere / child.name)
    meta.rmdir()
    meta.symlink_to(elsewhere)
    before = sorted(p.name for p in elsewhere.iterdir())
    cases: list[list[str | Path]] = [
        ["pin", root, "1"],
        ["rm", "--yes", "--force", root, "1"],
        ["unpin", root, "1"],
    ]
    for args in cases:
        code, doc = _run(*args)
        assert (code, doc["error"]["type"]) == (2, "UnsupportedFile"), doc
    assert sorted(p.name for p in elsewhere.iterdir()) == before  # nothing written there
    assert (root / "checkpoint-1").is_dir()
