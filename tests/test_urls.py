"""s3:// URLs through every public entry point, against a real S3 server (moto's, on 127.0.0.1).

Credentials and the endpoint come only from the standard AWS environment variables (no
storage_options anywhere, AWS config files pointed at nothing). Every test runs in a fresh
working directory and ends by checking that it is still empty: a URL must never become a
local folder named ``s3:``. Plain files written for a store are spooled under
``CKPTGUARD_SPOOL``, which must be empty again afterwards.

What runs: ``atomic_checkpoint`` and ``CheckpointManager`` committing on the store,
``verify``/``read_manifest``/``scan``/``recover``/``doctor`` reading it, the ``ckptguard``
command on it (with and without ``--json``), and the failures a URL brings: a missing
bucket, a missing prefix, an endpoint nobody listens on, credentials the server refuses
(a second moto server with its IAM authentication switched on). Last, the framework
integrations, which write through local files, must refuse a URL before writing anything
(one child process, so that transformers, accelerate and lightning are imported and
patched away from the test process).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptguard
from ckptguard._protocol.backend import backend_for
from s3_servers import KEY, SECRET, S3Server, free_port, start_moto

CLI_TIMEOUT = 120  # seconds for one `ckptguard` child (about 1 s normally)
PARALLEL = 4  # `ckptguard` children at once (they mostly wait on imports and the server)
RETRY_WORDS = re.compile(r"\bretr(y|ies|ying)\b|\battempt", re.IGNORECASE)


# -- the server and the environment ------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    started = start_moto(tmp_path_factory.mktemp("moto"))
    try:
        yield started
    finally:
        started.stop()


def _require_auth(server: S3Server) -> None:
    """Switch on moto's IAM authentication: from now on, unknown access keys get 403."""
    request = urllib.request.Request(  # noqa: S310 - http://127.0.0.1, our own server
        f"{server.endpoint}/moto-api/reset-auth",
        data=b"0",  # INITIAL_NO_AUTH_ACTION_COUNT: authenticate every request from now on
        method="POST",
        headers={"Content-Type": "text/plain"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
        assert json.loads(response.read())["status"] == "ok"


@pytest.fixture(scope="module")
def locked_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A second moto server (its bucket made first) that then refuses unknown access keys."""
    started = start_moto(tmp_path_factory.mktemp("moto-auth"))
    try:
        _require_auth(started)
        yield started
    finally:
        started.stop()


@dataclass(frozen=True)
class Env:
    """The AWS environment of one test, its empty working directory and its spool."""

    cwd: Path
    spool: Path

    def assert_nothing_local(self) -> None:
        assert not Path("s3:").exists()
        assert sorted(os.listdir(self.cwd)) == [], "something was written to the local cwd"
        assert sorted(os.listdir(self.spool)) == [], "a local spool was left behind"


def _clear_fs_cache() -> None:
    # fsspec reuses one filesystem object per set of options; the endpoint and keys come from
    # the environment, which these tests change between tests.
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


def _aws_env(mp: pytest.MonkeyPatch, base: Path, endpoint: str, key: str = KEY) -> Env:
    for name in (
        "CKPTGUARD_STORAGE_OPTIONS", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
        "AWS_ENDPOINT_URL_S3", "AWS_REGION",
    ):  # fmt: skip
        mp.delenv(name, raising=False)
    mp.setenv("AWS_CONFIG_FILE", str(base / "no-aws-config"))
    mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(base / "no-aws-credentials"))
    mp.setenv("AWS_ENDPOINT_URL", endpoint)
    mp.setenv("AWS_ACCESS_KEY_ID", key)
    mp.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
    spool, cwd = base / "spool", base / "cwd"
    spool.mkdir()
    cwd.mkdir()
    mp.setenv("CKPTGUARD_SPOOL", str(spool))
    mp.chdir(cwd)
    _clear_fs_cache()
    return Env(cwd, spool)


@pytest.fixture
def env(server: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Env]:
    yield _aws_env(monkeypatch, tmp_path, server.endpoint)
    _clear_fs_cache()


@pytest.fixture
def dead_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Env]:
    """AWS_ENDPOINT_URL on a port where nothing listens."""
    yield _aws_env(monkeypatch, tmp_path, f"http://127.0.0.1:{free_port()}")
    _clear_fs_cache()


@pytest.fixture
def locked_env(
    locked_server: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[Env]:
    yield _aws_env(monkeypatch, tmp_path, locked_server.endpoint, key="AKIAUNKNOWNKEY000000")
    _clear_fs_cache()


def _fresh_url(server: S3Server) -> str:
    return server.url(f"runs/{uuid.uuid4().hex[:12]}")


def _keys(server: S3Server, url: str) -> list[str]:
    """Every object under ``url`` on the server, relative to it (boto, not ckptguard)."""
    prefix = url.removeprefix(f"s3://{server.bucket}/").rstrip("/") + "/"
    listed = server.client().list_objects_v2(Bucket=server.bucket, Prefix=prefix)
    return sorted(obj["Key"].removeprefix(prefix) for obj in listed.get("Contents", []))


def _get(server: S3Server, url: str) -> bytes:
    obj = server.client().get_object(
        Bucket=server.bucket, Key=url.removeprefix(f"s3://{server.bucket}/")
    )
    data: bytes = obj["Body"].read()
    return data


def _state(step: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(step)
    return {
        "model": {"w": torch.randn(3, 4, generator=g), "b": torch.arange(4) * step},
        "step": step,
        "epoch": step // 2,
    }


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (
        a["step"] == b["step"]
        and a["epoch"] == b["epoch"]
        and a["model"].keys() == b["model"].keys()
        and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    )


@dataclass(frozen=True)
class Saved:
    url: str
    states: dict[int, dict[str, Any]]


@pytest.fixture(scope="module")
def saved(server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Saved:
    """A root on the store holding checkpoint-2 and checkpoint-3 (keep_last=2 of 1..3)."""
    url = _fresh_url(server)
    with pytest.MonkeyPatch.context() as mp:
        local = _aws_env(mp, tmp_path_factory.mktemp("saved"), server.endpoint)
        manager = ckptguard.CheckpointManager(url, keep_last=2)
        states = {step: _state(step) for step in (1, 2, 3)}
        for step, state in states.items():
            manager.save(step, state)
        manager.close()
        local.assert_nothing_local()
    _clear_fs_cache()
    return Saved(url, states)


# -- the command -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    args: tuple[str, ...]
    code: int
    out: str
    err: str
    seconds: float

    def json(self) -> Any:
        return json.loads(self.out)

    def error_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]

    def __str__(self) -> str:  # what an assertion shows
        return f"ckptguard {' '.join(self.args)} -> {self.code}\n{self.out[-3000:]}\n{self.err}"


def cli(*args: str, env: dict[str, str] | None = None) -> Run:
    """``python -m ckptguard ARGS`` in the current (empty) cwd, with the test's environment."""
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "ckptguard", *args],
        capture_output=True,
        text=True,
        env=dict(os.environ) if env is None else env,
        timeout=CLI_TIMEOUT,
        check=False,
    )
    return Run(args, proc.returncode, proc.stdout, proc.stderr, time.monotonic() - started)


def cli_all(*calls: Sequence[str]) -> list[Run]:
    """Several ``ckptguard`` commands at once (independent of each other), in order."""
    child_env = dict(os.environ)  # read here, on the test's thread

    def one(args: Sequence[str]) -> Run:
        return cli(*args, env=child_env)

    with ThreadPoolExecutor(max_workers=PARALLEL) as pool:
        return list(pool.map(one, calls))


# -- 1. atomic_checkpoint ----------------------------------------------------------------------
def test_atomic_checkpoint_commits_on_the_store_through_a_local_spool(
    env: Env, server: S3Server
) -> None:
    url = _fresh_url(server)
    backend = backend_for(url)
    assert backend.remote
    assert backend.root == url
    with ckptguard.atomic_checkpoint(url + "/checkpoint-2") as spool:
        assert spool.is_dir()
        assert spool.resolve().is_relative_to(env.spool.resolve()), spool  # a local spool
        (spool / "weights.bin").write_bytes(b"\x01" * 1000)
        (spool / "sub").mkdir()
        (spool / "sub" / "config.json").write_text('{"a": 1}')
        assert _keys(server, url) == []  # nothing uploaded while the block writes
    assert not spool.exists()  # the spool is removed once the save is committed

    report = ckptguard.verify(url + "/checkpoint-2")
    assert report.ok, report.problems
    assert report.files_checked == 2
    assert report.manifest is not None
    save_id = report.manifest.save_id
    # the manifest-marker layout: <name>/<save id>/<file>, and <name>/ckptguard.json
    assert _keys(server, url) == sorted(
        [
            "checkpoint-2/ckptguard.json",
            f"checkpoint-2/{save_id}/sub/config.json",
            f"checkpoint-2/{save_id}/weights.bin",
        ]
    )
    assert _get(server, f"{url}/checkpoint-2/{save_id}/weights.bin") == b"\x01" * 1000
    assert _get(server, f"{url}/checkpoint-2/{save_id}/sub/config.json") == b'{"a": 1}'
    assert backend_for(url).names() == ["checkpoint-2"]
    env.assert_nothing_local()


def test_atomic_checkpoint_exception_in_the_block_leaves_nothing(
    env: Env, server: S3Server
) -> None:
    url = _fresh_url(server)
    with (
        pytest.raises(RuntimeError, match="the block failed"),
        ckptguard.atomic_checkpoint(url + "/checkpoint-2") as spool,
    ):
        (spool / "weights.bin").write_bytes(b"\x02" * 100)
        (spool / "sub").mkdir()
        (spool / "sub" / "config.json").write_text("{}")
        raise RuntimeError("the block failed")
    assert not spool.exists()
    assert _keys(server, url) == []
    assert backend_for(url).names() == []
    assert not ckptguard.verify(url + "/checkpoint-2").ok
    env.assert_nothing_local()


# -- 2. CheckpointManager ----------------------------------------------------------------------
def test_manager_saves_lists_restores_and_retains_on_the_store(env: Env, server: S3Server) -> None:
    url = _fresh_url(server)
    manager = ckptguard.CheckpointManager(url, keep_last=2)
    states = {step: _state(step) for step in (1, 2, 3)}
    for step, state in states.items():
        info = manager.save(step, state)
        assert info.path == f"{url}/checkpoint-{step}"
    listed = manager.list()
    assert [(i.step, i.name, i.valid) for i in listed] == [
        (2, "checkpoint-2", True),
        (3, "checkpoint-3", True),
    ]
    assert [i.path for i in listed] == [f"{url}/checkpoint-2", f"{url}/checkpoint-3"]
    latest = manager.latest()
    assert latest is not None
    assert latest.step == 3
    assert _same(manager.restore(), states[3])
    assert _same(manager.restore(2), states[2])
    # on the store itself: checkpoint-1 retired (manifest and data), 2 and 3 committed
    names = {key.split("/", 1)[0] for key in _keys(server, url)}
    assert names == {"checkpoint-2", "checkpoint-3"}
    for step in (2, 3):
        assert f"checkpoint-{step}/ckptguard.json" in _keys(server, url)

    def write(tx: ckptguard.AtomicCheckpoint) -> None:
        (tx.staging_dir / "a.bin").write_bytes(b"framework bytes")

    info = manager.save_files(4, write)
    manager.close()
    assert info.step == 4
    assert info.path == f"{url}/checkpoint-4"
    manifest = ckptguard.read_manifest(f"{url}/checkpoint-4")
    assert manifest.step == 4
    assert [f.path for f in manifest.files] == [f"{manifest.save_id}/a.bin"]
    assert _get(server, f"{url}/checkpoint-4/{manifest.save_id}/a.bin") == b"framework bytes"
    assert [i.step for i in ckptguard.CheckpointManager(url, keep_last=2).list()] == [3, 4]
    env.assert_nothing_local()


# -- 3. verify, read_manifest, scan, recover ---------------------------------------------------
def test_verify_read_manifest_scan_and_recover_act_on_the_store(env: Env, saved: Saved) -> None:
    url = saved.url
    for step in (2, 3):
        report = ckptguard.verify(f"{url}/checkpoint-{step}")
        assert report.ok, report.problems
        assert report.checksums
        assert report.step == step
        manifest = ckptguard.read_manifest(f"{url}/checkpoint-{step}")
        assert manifest.name == f"checkpoint-{step}"
        assert manifest.step == step
        assert report.files_checked == len(manifest.files) > 0
        assert all(f.path.startswith(manifest.save_id + "/") for f in manifest.files)
    gone = ckptguard.verify(f"{url}/checkpoint-1")  # retired by keep_last=2
    assert not gone.ok
    assert gone.problems

    scanned = ckptguard.scan(url)
    assert scanned.root == url
    assert [(e.kind, e.name, e.path) for e in scanned.entries] == [
        (ckptguard.EntryKind.COMMITTED_VALID, "checkpoint-2", f"{url}/checkpoint-2"),
        (ckptguard.EntryKind.COMMITTED_VALID, "checkpoint-3", f"{url}/checkpoint-3"),
    ]
    assert scanned.latest is not None
    assert scanned.latest.step == 3

    recovered = ckptguard.recover(url)
    assert recovered.actions == ()  # nothing to repair on a healthy root
    assert [(e.kind, e.name) for e in recovered.entries] == [
        (ckptguard.EntryKind.COMMITTED_VALID, "checkpoint-2"),
        (ckptguard.EntryKind.COMMITTED_VALID, "checkpoint-3"),
    ]
    env.assert_nothing_local()


# -- 4. doctor ---------------------------------------------------------------------------------
def test_doctor_on_a_healthy_store_root(env: Env, saved: Saved) -> None:
    report = ckptguard.doctor(saved.url)
    assert report.root == saved.url
    roots = [c for c in report.checks if c.name.startswith("root.")]
    assert roots, report.checks
    assert all(c.status == "ok" for c in roots), roots
    # no local-filesystem check was made on a URL (free space, mounts, rename probe)
    assert not {"root.free_space", "root.filesystem", "root.rename_noreplace"} & {
        c.name for c in roots
    }
    assert all(c.name.startswith("versions.") for c in report.problems())
    assert report.exit_code == (1 if report.problems() else 0)
    assert report.ok
    assert report.to_json()["exit_code"] == report.exit_code
    env.assert_nothing_local()


def test_doctor_on_a_missing_bucket_fails_with_exit_code_2(env: Env) -> None:
    bucket = f"no-such-bucket-{uuid.uuid4().hex[:12]}"
    report = ckptguard.doctor(f"s3://{bucket}/x")
    assert report.exit_code == 2
    assert not report.ok
    failed = [c for c in report.checks if c.status == "fail"]
    assert failed
    assert any(bucket in c.message for c in failed), failed
    env.assert_nothing_local()


def test_doctor_on_a_new_prefix_of_an_existing_bucket_does_not_fail(
    env: Env, server: S3Server
) -> None:
    """A new run's root does not exist yet on a store: that is a warning, not a failure."""
    url = _fresh_url(server)
    report = ckptguard.doctor(url)
    assert report.exit_code in {0, 1}, [c for c in report.checks if c.status == "fail"]
    assert report.ok
    env.assert_nothing_local()


# -- 5. the command on a healthy root ----------------------------------------------------------
def test_cli_on_a_healthy_store_root(env: Env, saved: Saved) -> None:
    url = saved.url
    ckpt2, ckpt3 = f"{url}/checkpoint-2", f"{url}/checkpoint-3"
    runs = cli_all(
        ["list", url], ["list", url, "--json"],
        ["verify", url], ["verify", url, "--json"],
        ["verify", ckpt3], ["verify", ckpt3, "--json"],
        ["inspect", ckpt3], ["inspect", ckpt3, "--json"],
        ["clean", url], ["clean", url, "--json"],
        ["doctor", url], ["doctor", url, "--json"],
    )  # fmt: skip
    (ls, ls_j, ver, ver_j, one, one_j, ins, ins_j, clean, clean_j, doc, doc_j) = runs
    for run in runs:
        if run.args[0] != "doctor":
            assert run.code == 0, run
            assert run.err == "", run

    assert url in ls.out
    assert ls.out.count("ok (sizes)") == 2, ls
    assert [(r["name"], r["path"], r["step"], r["status"]) for r in ls_j.json()["checkpoints"]] == [
        ("checkpoint-2", ckpt2, 2, "ok (sizes)"),
        ("checkpoint-3", ckpt3, 3, "ok (sizes)"),
    ]

    ok_lines = [line for line in ver.out.splitlines() if line.startswith("ok")]
    assert [line.split()[1] for line in ok_lines] == [ckpt2, ckpt3], ver
    assert ver_j.json()["ok"] is True
    assert [(c["path"], c["step"], c["ok"]) for c in ver_j.json()["checkpoints"]] == [
        (ckpt2, 2, True),
        (ckpt3, 3, True),
    ]

    assert [line.split()[:2] for line in one.out.splitlines()] == [["ok", ckpt3]], one
    (checked,) = one_j.json()["checkpoints"]
    assert (checked["path"], checked["step"], checked["ok"]) == (ckpt3, 3, True)
    assert checked["files_checked"] == len(ckptguard.read_manifest(ckpt3).files)

    assert ckpt3 in ins.out
    assert "tensors" in ins.out
    assert "(3, 4)" in ins.out
    assert "F32" in ins.out
    inspected = ins_j.json()
    assert (inspected["path"], inspected["step"], inspected["name"]) == (ckpt3, 3, "checkpoint-3")
    assert {(t["name"], t["dtype"], tuple(t["shape"])) for t in inspected["tensors"]} == {
        ("w", "F32", (3, 4)),
        ("b", "I64", (4,)),
    }

    assert f"nothing to clean in {url}" in clean.out
    assert (clean_j.json()["dry_run"], clean_j.json()["planned"]) == (True, [])

    report = doc_j.json()
    assert doc.code == doc_j.code == report["exit_code"], doc
    assert doc.code in {0, 1}
    assert report["root"] == url
    roots = [c for c in report["checks"] if c["name"].startswith("root.")]
    assert roots
    assert all(c["status"] == "ok" for c in roots), roots
    assert url in doc.out
    assert "FAIL" not in doc.out
    env.assert_nothing_local()


def test_cli_clean_dry_run_plans_an_orphan_upload_and_keeps_it(env: Env, server: S3Server) -> None:
    url = _fresh_url(server)
    with ckptguard.atomic_checkpoint(url + "/checkpoint-1") as spool:
        (spool / "a.bin").write_bytes(b"a")
    orphan = "checkpoint-9/20200101T000000000000Z-deadbeef-1-0123456789abcdef"
    key = url.removeprefix(f"s3://{server.bucket}/") + f"/{orphan}/x.bin"
    server.client().put_object(Bucket=server.bucket, Key=key, Body=b"killed mid-upload")
    text, as_json = cli_all(
        ["clean", url, "--stale-after", "0"], ["clean", url, "--stale-after", "0", "--json"]
    )
    assert text.code == 0, text
    assert f"would remove {url}/{orphan}" in text.out
    assert "dry run" in text.out
    assert as_json.code == 0, as_json
    assert as_json.json()["dry_run"] is True
    assert [p["path"] for p in as_json.json()["planned"]] == [f"{url}/{orphan}"]
    assert f"{orphan}/x.bin" in _keys(server, url)  # a dry run removes nothing
    assert ckptguard.verify(url + "/checkpoint-1").ok
    env.assert_nothing_local()


# -- 6a. a missing bucket ----------------------------------------------------------------------
def test_cli_on_a_missing_bucket_exits_2_naming_the_bucket(env: Env) -> None:
    bucket = f"no-such-bucket-{uuid.uuid4().hex[:12]}"
    url = f"s3://{bucket}/x"
    runs = cli_all(
        *(
            [command, path, *flag]
            for command, path in (
                ("list", url), ("verify", url), ("inspect", url + "/checkpoint-1"), ("doctor", url),
            )
            for flag in ([], ["--json"])
        )
    )  # fmt: skip
    for run in runs:
        assert run.code == 2, run
        if run.args[0] == "doctor" and "--json" in run.args:
            report = run.json()
            assert report["exit_code"] == 2
            failed = [c["message"] for c in report["checks"] if c["status"] == "fail"]
            assert any(bucket in m and "does not exist" in m for m in failed), run
        elif run.args[0] == "doctor":
            assert "FAIL" in run.out, run  # a table: the message may wrap inside its cell
            assert bucket in run.out, run
        elif "--json" in run.args:
            assert run.json()["ok"] is False
            assert bucket in run.json()["error"]["message"], run
            assert "does not exist" in run.json()["error"]["message"], run
        else:
            assert run.out == "", run
            (line,) = run.error_lines()
            assert line.startswith("error:"), run
            assert bucket in line, run
            assert "does not exist" in line, run
    env.assert_nothing_local()


def test_cli_inspect_error_for_a_missing_bucket_reads_as_one_sentence(env: Env) -> None:
    bucket = f"no-such-bucket-{uuid.uuid4().hex[:12]}"
    run = cli("inspect", f"s3://{bucket}/x/checkpoint-1")
    assert run.code == 2, run
    (line,) = run.error_lines()
    assert bucket in line
    # not "... does not exist — check the bucket name ..., or create the bucket is missing"
    assert not line.endswith(" is missing"), line
    env.assert_nothing_local()


MISSING_BUCKET_CALLS: dict[str, Callable[[str], object]] = {
    "scan": ckptguard.scan,
    "recover": ckptguard.recover,
    "read_manifest": lambda url: ckptguard.read_manifest(url + "/checkpoint-1"),
    "CheckpointManager": ckptguard.CheckpointManager,
}


@pytest.mark.parametrize("call", sorted(MISSING_BUCKET_CALLS))
def test_python_api_on_a_missing_bucket_raises_checkpoint_not_found(env: Env, call: str) -> None:
    bucket = f"no-such-bucket-{uuid.uuid4().hex[:12]}"
    with pytest.raises(ckptguard.CheckpointNotFound) as caught:
        MISSING_BUCKET_CALLS[call](f"s3://{bucket}/x")
    assert isinstance(caught.value, ckptguard.CheckpointError)
    assert bucket in str(caught.value)
    env.assert_nothing_local()


def test_saving_to_a_missing_bucket_raises_a_storage_error(env: Env) -> None:
    bucket = f"no-such-bucket-{uuid.uuid4().hex[:12]}"
    with (
        pytest.raises(ckptguard.StorageError, match="bucket does not exist") as caught,
        ckptguard.atomic_checkpoint(f"s3://{bucket}/x/checkpoint-1") as spool,
    ):
        (spool / "a.bin").write_bytes(b"a")
    assert bucket in str(caught.value)
    env.assert_nothing_local()


def test_verify_on_a_missing_bucket_reports_not_ok(env: Env) -> None:
    bucket = f"no-such-bucket-{uuid.uuid4().hex[:12]}"
    report = ckptguard.verify(f"s3://{bucket}/x/checkpoint-1")
    assert not report.ok
    assert report.manifest is None
    assert report.files_checked == 0
    assert report.problems
    assert any(bucket in p for p in report.problems), report.problems
    env.assert_nothing_local()


# -- 6b. a missing prefix in an existing bucket ------------------------------------------------
MISSING_PATHS = {
    # case: (command, under the missing prefix or the healthy root, then this, --json)
    "list-prefix": ("list", "prefix", "", False),
    "list-prefix-json": ("list", "prefix", "", True),
    "verify-prefix": ("verify", "prefix", "", False),
    "verify-checkpoint-under-prefix": ("verify", "prefix", "/checkpoint-1", False),
    "verify-checkpoint-of-healthy-root": ("verify", "root", "/checkpoint-404", False),
    "inspect-prefix": ("inspect", "prefix", "", False),
    "inspect-prefix-json": ("inspect", "prefix", "", True),
    "inspect-checkpoint-under-prefix": ("inspect", "prefix", "/checkpoint-1", False),
    "inspect-checkpoint-of-healthy-root": ("inspect", "root", "/checkpoint-404", False),
}


@pytest.mark.parametrize("case", list(MISSING_PATHS))
def test_cli_on_a_missing_prefix_exits_2(
    env: Env, server: S3Server, saved: Saved, case: str
) -> None:
    """Exit 2 for "a path, bucket or prefix that is not there" (the command's docstring)."""
    command, under, tail, as_json = MISSING_PATHS[case]
    base = server.url(f"missing-{uuid.uuid4().hex[:12]}") if under == "prefix" else saved.url
    run = cli(command, base + tail, *(["--json"] if as_json else []))
    assert run.code == 2, run
    text = json.dumps(run.json()["error"]) if as_json else "\n".join(run.error_lines())
    assert base in text, run
    env.assert_nothing_local()


# -- 6c. an endpoint nobody listens on ---------------------------------------------------------
def test_unreachable_endpoint_fails_fast_with_one_clear_error(dead_env: Env) -> None:
    url = "s3://b/x"
    endpoint = os.environ["AWS_ENDPOINT_URL"].removeprefix("http://")
    child_env = dict(os.environ)
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = [
            pool.submit(cli, *args, env=child_env)
            for args in (["list", url], ["list", url, "--json"], ["doctor", url])
        ]
        started = time.monotonic()
        with pytest.raises(ckptguard.StorageUnreachable) as by_manager:
            ckptguard.CheckpointManager(url, retry=ckptguard.RetryPolicy(connect_budget=1.0))
        manager_s = time.monotonic() - started
        started = time.monotonic()
        with pytest.raises(ckptguard.StorageUnreachable) as by_scan:
            ckptguard.scan(url)
        scan_s = time.monotonic() - started
        text, as_json, doctor = (f.result() for f in futures)

    for caught in (by_manager.value, by_scan.value):
        assert isinstance(caught, ConnectionError)
        assert isinstance(caught, ckptguard.StorageError)
        assert endpoint in str(caught)
    assert manager_s < 15, manager_s  # a 1 s connect budget
    assert scan_s < 30, scan_s  # the default 10 s budget

    assert text.code == 2, text
    assert text.seconds < 30, text.seconds
    assert text.out == ""
    (line,) = text.error_lines()  # one line, no retry chatter
    assert line.startswith("error:")
    assert "cannot be reached" in line
    assert endpoint in line
    assert not [ln for ln in text.err.splitlines() if RETRY_WORDS.search(ln)], text.err

    assert as_json.code == 2, as_json
    assert as_json.seconds < 30
    assert as_json.json()["ok"] is False
    assert "cannot be reached" in as_json.json()["error"]["message"]
    assert not [ln for ln in as_json.err.splitlines() if RETRY_WORDS.search(ln)], as_json.err

    assert doctor.code == 2, doctor
    assert doctor.seconds < 30
    assert "cannot be reached" in doctor.out
    dead_env.assert_nothing_local()


# -- 6d. credentials the server refuses --------------------------------------------------------
def test_refused_credentials_are_a_permission_error(
    locked_env: Env, locked_server: S3Server
) -> None:
    with pytest.raises(Exception, match="InvalidAccessKeyId"):  # botocore's ClientError
        locked_server.client().list_objects_v2(Bucket=locked_server.bucket)  # even ours: 403
    url = locked_server.url("runs/x")
    text, as_json = cli_all(["list", url], ["list", url, "--json"])
    for run, message in ((text, text.err), (as_json, as_json.out)):
        assert run.code == 2, run
        assert "InvalidAccessKeyId" in message
        assert "credentials" in message
        assert "AWS_ACCESS_KEY_ID" in message
    (line,) = text.error_lines()
    assert line.startswith("error:")
    assert as_json.json()["ok"] is False

    with pytest.raises(ckptguard.StoragePermissionError) as by_manager:
        ckptguard.CheckpointManager(url)
    with pytest.raises(ckptguard.StoragePermissionError) as by_scan:
        ckptguard.scan(url)
    with (
        pytest.raises(ckptguard.StoragePermissionError) as by_save,
        ckptguard.atomic_checkpoint(url + "/checkpoint-1") as spool,
    ):
        (spool / "a.bin").write_bytes(b"a")
    for caught in (by_manager.value, by_scan.value, by_save.value):
        assert isinstance(caught, PermissionError)
        assert "InvalidAccessKeyId" in str(caught)
    locked_env.assert_nothing_local()


# -- 7. integrations: a URL is taken, and nothing is left in a local folder named "s3:" ---------
INTEGRATIONS = r"""
import json, os, sys, warnings
from pathlib import Path
warnings.filterwarnings("ignore")  # third-party deprecations are not these checks' subject

URL = sys.argv[1]
HOME = Path.cwd()
report = {}


def tree():
    return sorted(str(p.relative_to(Path.cwd())) for p in Path.cwd().rglob("*"))


def attempt(fn):
    try:
        returned = fn()
    except Exception as exc:
        return {"type": type(exc).__name__, "bases": [c.__name__ for c in type(exc).__mro__],
                "message": str(exc)}
    return {"type": None, "returned": repr(returned)}


def fresh(name):
    where = HOME / name
    where.mkdir()
    os.chdir(where)


from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
from ckptguard.integrations import transformers as hf


def model():
    return GPT2LMHeadModel(
        GPT2Config(vocab_size=97, n_positions=16, n_embd=32, n_layer=1, n_head=2)
    )


def training_args():
    return TrainingArguments(output_dir=URL, use_cpu=True, report_to=[])


fresh("hf-protect")
args = training_args()
case = {"before": tree()}
trainer = Trainer(model=model(), args=args)
case["before_protect"] = tree()
case["error"] = attempt(lambda: hf.protect(trainer))
case["after"] = tree()
case["protected"] = getattr(trainer, "_ckptguard_guard", None) is not None
report["transformers.protect"] = case

fresh("hf-install")
hf.install()
try:
    case = {"before": tree(), "before_protect": tree()}
    case["error"] = attempt(lambda: Trainer(model=model(), args=training_args()))
finally:
    hf.uninstall()
case["after"] = tree()
report["transformers.install"] = case

fresh("hf-last-valid")
report["transformers.last_valid_checkpoint"] = {
    "before": [], "before_protect": [], "error": attempt(lambda: hf.last_valid_checkpoint(URL)),
    "after": tree(),
}

from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from ckptguard.integrations import accelerate as ac

fresh("acc-protect")
config = ProjectConfiguration(project_dir=URL, automatic_checkpoint_naming=True)
acc = Accelerator(cpu=True, project_config=config)
case = {"before": [], "before_protect": tree()}
case["error"] = attempt(lambda: ac.protect(acc))
case["after"] = tree()
case["protected"] = getattr(acc, "_ckptguard_guard", None) is not None
report["accelerate.protect"] = case

fresh("acc-state")
plain = ac.protect(Accelerator(cpu=True))
for name, call in (
    ("save_state", lambda: plain.save_state(URL + "/manual")),
    ("load_state", lambda: plain.load_state(URL + "/manual")),
):
    report[f"accelerate.{name}"] = {"before": [], "before_protect": tree(),
                                    "error": attempt(call), "after": tree()}

from ckptguard.integrations import lightning as pl

fresh("lightning")
io = pl.AtomicCheckpointIO()
ckpt = URL + "/epoch=0-step=1.ckpt"
for name, call in (
    ("save_checkpoint", lambda: io.save_checkpoint({"global_step": 1, "epoch": 0}, ckpt)),
    ("load_checkpoint", lambda: io.load_checkpoint(ckpt)),
    ("remove_checkpoint", lambda: io.remove_checkpoint(ckpt)),
    ("last_valid_checkpoint", lambda: pl.last_valid_checkpoint(URL)),
    ("load", lambda: pl.load(ckpt)),
):
    report[f"lightning.{name}"] = {"before": [], "before_protect": tree(),
                                   "error": attempt(call), "after": tree()}

print(json.dumps(report))
"""
# The Trainer, Accelerate and Lightning's plugin take a URL (each checkpoint staged
# locally and committed on the store: tests/integrations/test_frameworks_objectstore.py
# trains and resumes through them). Lightning's cases run in order on one file: saved,
# loaded, removed (file and sidecar), then not found.
ACCEPTED_CASES = [
    "transformers.protect",
    "transformers.install",
    "transformers.last_valid_checkpoint",
    "accelerate.protect",
    "accelerate.save_state",
    "accelerate.load_state",
    "lightning.save_checkpoint",
    "lightning.load_checkpoint",
    "lightning.remove_checkpoint",
    "lightning.last_valid_checkpoint",
]


@dataclass(frozen=True)
class Integrations:
    url: str
    keys_after: list[str]
    report: dict[str, Any]


@pytest.fixture(scope="module")
def integrations(server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Integrations:
    """One child: each integration entry point given a URL, and the local tree around it."""
    url = _fresh_url(server)
    base = tmp_path_factory.mktemp("integrations")
    with pytest.MonkeyPatch.context() as mp:
        local = _aws_env(mp, base, server.endpoint)
        child_env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
            "CKPTGUARD_CACHE_DIR": str(base / "cache"),
        }
        proc = subprocess.run(
            [sys.executable, "-c", INTEGRATIONS, url],
            capture_output=True,
            text=True,
            env=child_env,
            cwd=local.cwd,
            timeout=280,
            check=False,
        )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return Integrations(url, _keys(server, url), report)


@pytest.mark.parametrize("case", ACCEPTED_CASES)
def test_integration_takes_a_url_and_leaves_no_local_s3_folder(
    integrations: Integrations, case: str
) -> None:
    """The Trainer's own ``os.makedirs("s3:/...")`` (an empty tree) is removed by protect()."""
    result = integrations.report[case]
    assert result["error"]["type"] is None, result["error"]
    assert not [p for p in result["after"] if p.startswith("s3:")], result["after"]
    if "protected" in result:
        assert result["protected"] is True


def test_lightning_load_after_remove_finds_nothing_on_the_store(
    integrations: Integrations,
) -> None:
    """``remove_checkpoint(URL)`` removed the object and its sidecar; a load then says so."""
    error = integrations.report["lightning.load"]["error"]
    assert error["type"] == "NoValidCheckpoint", error
    assert "no checkpoint at" in error["message"], error
    assert not [k for k in integrations.keys_after if ".ckpt" in k], integrations.keys_after
    assert integrations.report["lightning.last_valid_checkpoint"]["error"]["returned"] == "None"


def test_accelerate_save_state_to_a_url_commits_on_the_store(integrations: Integrations) -> None:
    """``save_state(URL + "/manual")`` committed there: one manifest beside its data."""
    manual = [k for k in integrations.keys_after if k.startswith("manual/")]
    assert "manual/ckptguard.json" in manual, integrations.keys_after
    assert len(manual) >= 2, manual


def test_training_arguments_and_accelerator_create_nothing_for_a_url(
    integrations: Integrations,
) -> None:
    """What the frameworks themselves do with a URL before ckptguard is asked (a record).

    Not asserted, because it is transformers' behaviour: the Trainer's own constructor
    (5.x: ``os.makedirs(self.args.output_dir)`` when ``should_save``) creates
    ``s3:/<bucket>/runs/<id>`` in the cwd before protect() can look at the URL.
    """
    report = integrations.report
    assert report["transformers.protect"]["before"] == []  # after TrainingArguments(...)
    assert report["accelerate.protect"]["before_protect"] == []  # after Accelerator(...)
