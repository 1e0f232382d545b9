"""Checkpoints on object stores, against real S3-compatible servers on 127.0.0.1.

One contract suite runs on a local root, fsspec's memory://, SeaweedFS and moto's
standalone server (both started here, stopped by PID). Then what only object stores
have: prefixes without a manifest, a process killed mid-upload, concurrent committers
(exactly one manifest wins), retries, credentials kept out of logs.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptguard
from ckptguard._protocol.backend import backend_for
from ckptguard._protocol.marker import clean_store
from ckptguard._storage.objectstore import FsspecStorage, _retry, is_transient
from ckptguard._storage.retry import DEFAULT_RETRY
from s3_servers import S3Server, start_moto, start_seaweedfs

SERVERS = ("moto", "seaweedfs")
BACKENDS = ("local", "memory", *SERVERS)
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, S3Server]]:
    started: dict[str, S3Server] = {}
    try:
        started["moto"] = start_moto(tmp_path_factory.mktemp("moto"))
        started["seaweedfs"] = start_seaweedfs(tmp_path_factory.mktemp("weed"))
        yield started
    finally:
        for server in started.values():
            server.stop()


@dataclass
class Root:
    url: str
    options: dict[str, Any] | None
    backend: str

    def manager(self, **kwargs: Any) -> ckptguard.CheckpointManager:
        return ckptguard.CheckpointManager(self.url, storage_options=self.options, **kwargs)

    def storage(self) -> FsspecStorage:
        return FsspecStorage(self.url, self.options)


@pytest.fixture(params=BACKENDS)
def root(request: pytest.FixtureRequest, tmp_path: Path) -> Root:
    backend: str = request.param
    name = f"run-{uuid.uuid4().hex[:8]}"
    if backend == "local":
        return Root(str(tmp_path / name), None, backend)
    if backend == "memory":
        return Root(f"memory://ckptguard-tests/{name}", None, backend)
    servers: dict[str, S3Server] = request.getfixturevalue("servers")
    server = servers[backend]
    return Root(server.url(name), server.storage_options, backend)


@pytest.fixture(params=SERVERS)
def s3(request: pytest.FixtureRequest, servers: dict[str, S3Server]) -> Root:
    server = servers[request.param]
    return Root(server.url(f"run-{uuid.uuid4().hex[:8]}"), server.storage_options, server.name)


def _state(step: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(step)
    model = torch.nn.Linear(32, 16)
    with torch.no_grad():
        model.weight.copy_(torch.randn(16, 32, generator=g))
        model.bias.copy_(torch.randn(16, generator=g))
    return {"model": model.state_dict(), "extra": torch.randn(100, generator=g), "step": step}


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (
        a["step"] == b["step"]
        and torch.equal(a["extra"], b["extra"])
        and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    )


def _flip_byte(root: Root, step: int) -> None:
    """Change one byte of checkpoint-<step>'s model.safetensors where it is stored."""
    if root.backend == "local":
        victim = Path(root.url) / f"checkpoint-{step}" / "model.safetensors"
        data = bytearray(victim.read_bytes())
        data[-1] ^= 0x01
        victim.write_bytes(bytes(data))
        return
    storage = root.storage()
    (key,) = [
        k for k in storage.find(f"{root.url}/checkpoint-{step}") if k.endswith("/model.safetensors")
    ]
    data = bytearray(storage.fs.cat_file(key))
    data[-1] ^= 0x01
    storage.fs.pipe_file(key, bytes(data))


# -- the contract, on every backend -------------------------------------------------------
def test_save_list_latest_restore_verify_retention(root: Root) -> None:
    mgr = root.manager(keep_last=2)
    for step in (1, 2, 3):
        info = mgr.save(step, _state(step), metrics={"loss": 1 / step}).result()
        assert info.valid
        assert info.step == step
    assert [i.step for i in mgr.list(checksums=True)] == [2, 3]
    assert all(i.valid and i.checksums_verified for i in mgr.list(checksums=True))
    latest = mgr.latest()
    assert latest is not None
    assert latest.step == 3
    assert latest.metrics == {"loss": 1 / 3}
    assert mgr.verify().ok
    assert _same(mgr.restore(), _state(3))
    target = _state(0)
    out = mgr.restore(2, target=target)
    assert _same(out, _state(2))
    assert torch.equal(target["model"]["weight"], _state(2)["model"]["weight"])  # in place
    if root.backend != "local":
        assert backend_for(root.url, root.options).names() == ["checkpoint-2", "checkpoint-3"]
        assert root.storage().find(f"{root.url}/checkpoint-1") == {}  # nothing left of it


def test_replace_keeps_one_save_and_the_newest_values(root: Root) -> None:
    mgr = root.manager(keep_last=None)
    mgr.save(1, _state(1))
    mgr.save(1, _state(5))  # if_exists="replace" (the default)
    assert _same(mgr.restore(1), _state(5))
    if root.backend != "local":
        storage = root.storage()
        base = storage.key(f"{root.url}/checkpoint-1")
        prefixes = {k.removeprefix(base + "/").split("/")[0] for k in storage.find(base)}
        assert len(prefixes - {"ckptguard.json"}) == 1  # the replaced save's objects are gone


def test_a_corrupt_newest_is_skipped(root: Root) -> None:
    mgr = root.manager(keep_last=None)
    mgr.save(1, _state(1))
    mgr.save(2, _state(2))
    _flip_byte(root, 2)
    report = mgr.verify(2)
    assert not report.ok
    assert any("checksum mismatch" in p for p in report.problems)
    latest = mgr.latest()
    assert latest is not None
    assert latest.step == 1
    assert _same(mgr.restore(), _state(1))
    with pytest.raises(ckptguard.CorruptCheckpoint):
        mgr.restore(2)


def test_async_saves(root: Root) -> None:
    with root.manager(keep_last=2, async_save=True) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, _state(step))
        last = mgr.wait()
    assert last is not None
    assert last.step == 3
    assert _same(root.manager().restore(), _state(3))


def test_pins_survive_retention(root: Root) -> None:
    mgr = root.manager(keep_last=1)
    mgr.save(1, _state(1))
    mgr.pin(1)
    mgr.save(2, _state(2))
    mgr.save(3, _state(3))
    assert [i.step for i in mgr.list()] == [1, 3]
    assert [i.pinned for i in mgr.list()] == [True, False]


# -- only on object stores -------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["memory", *SERVERS])
def test_a_prefix_without_manifest_is_invisible_and_cleaned(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    root = _root_for(backend, request, tmp_path)
    mgr = root.manager(keep_last=None)
    mgr.save(1, _state(1))
    storage = root.storage()
    orphan = f"{root.url}/checkpoint-9/20260101T000000000000Z-0-0-0/model.safetensors"
    storage.write_bytes(orphan, b"half of an upload")
    assert [i.step for i in mgr.list()] == [1]
    latest = mgr.latest()
    assert latest is not None
    assert latest.step == 1
    # a young orphan is left alone (a save may still be uploading it) ...
    root.manager(keep_last=None)
    assert storage.exists(orphan)
    # ... an old one is removed by the next start
    root.manager(keep_last=None, stale_after=0)
    assert not storage.exists(orphan)
    assert mgr.verify(1).ok


def _root_for(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Root:
    del tmp_path
    name = f"run-{uuid.uuid4().hex[:8]}"
    if backend == "memory":
        return Root(f"memory://ckptguard-tests/{name}", None, backend)
    server: S3Server = request.getfixturevalue("servers")[backend]
    return Root(server.url(name), server.storage_options, backend)


_CHILD = textwrap.dedent(
    """
    import json, os, signal, sys, time
    import torch
    import ckptguard
    from ckptguard._storage import faults as _faults

    url, options, mode = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    value = float(sys.argv[4])
    if mode.startswith("kill-at="):
        point, nth = mode.removeprefix("kill-at=").split(":")
        seen = [0]
        def hook(name):
            if name == point:
                seen[0] += 1
                if seen[0] == int(nth):
                    os.kill(os.getpid(), signal.SIGKILL)
        _faults.set_fault_hook(hook)
    if mode == "race":
        start = float(sys.argv[5])
        while time.time() < start:
            time.sleep(0.001)
    mgr = ckptguard.CheckpointManager(
        url, storage_options=options, keep_last=None,
        if_exists="keep" if mode == "race" else "replace",
    )
    state = {"w": torch.full((int(sys.argv[6]) if len(sys.argv) > 6 else 1000,), value)}
    info = mgr.save(2 if mode.startswith("kill") else 1, state).result()
    print(json.dumps({"save_id": info.save_id, "valid": info.valid}))
    """
)


def _child(root: Root, tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    script = tmp_path / "child.py"
    if not script.exists():  # once: a child still starting must never read a rewrite
        script.write_text(_CHILD)
    return subprocess.Popen(
        [sys.executable, str(script), root.url, json.dumps(root.options), *args],
        env=CHILD_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize(
    "point", ["remote.uploading:3", "remote.data_uploaded:1", "remote.manifest_written:1"]
)
def test_a_process_killed_mid_upload_leaves_nothing_listed(
    s3: Root, tmp_path: Path, point: str
) -> None:
    mgr = s3.manager(keep_last=None)
    mgr.save(1, _state(1))
    # 24 MiB: a multipart upload (16 MiB parts), killed after its third chunk, before its
    # manifest, or right after it (then the save is committed)
    proc = _child(s3, tmp_path, f"kill-at={point}", "2.0", "0", str(6 << 20))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -9, err
    committed = point.startswith("remote.manifest_written")
    assert [i.step for i in mgr.list()] == ([1, 2] if committed else [1])
    latest = mgr.latest()
    assert latest is not None
    assert latest.step == (2 if committed else 1)
    leftovers = s3.storage().find(f"{s3.url}/checkpoint-2")
    if point == "remote.data_uploaded:1":
        assert leftovers  # its data is there, without a manifest: invisible
    s3.manager(keep_last=None, stale_after=0)  # the next start cleans up what is not committed
    if committed:
        assert mgr.verify(2).ok
        assert float(mgr.restore()["w"][0]) == 2.0
    else:
        assert s3.storage().find(f"{s3.url}/checkpoint-2") == {}
        assert _same(mgr.restore(), _state(1))


def test_control_without_the_manifest_check_a_killed_save_would_be_listed(
    s3: Root, tmp_path: Path
) -> None:
    """The test above can fail: listing every prefix (as a plain ls would) shows the
    killed save's checkpoint-2."""
    mgr = s3.manager(keep_last=None)
    mgr.save(1, _state(1))
    proc = _child(s3, tmp_path, "kill-at=remote.data_uploaded:1", "2.0")
    proc.communicate(timeout=120)
    assert proc.returncode == -9
    assert "checkpoint-2" in s3.storage().list_dir(s3.url)
    assert "checkpoint-2" not in backend_for(s3.url, s3.options).names()


def test_concurrent_committers_exactly_one_manifest_wins(s3: Root, tmp_path: Path) -> None:
    import time

    start = time.time() + 3.0
    procs = [_child(s3, tmp_path, "race", str(float(i)), str(start)) for i in range(4)]
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:  # never leave a child running into the next test
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    # every process learns the same winner
    assert len({r["save_id"] for r in results}) == 1, results
    mgr = s3.manager()
    report = mgr.verify(1)
    assert report.ok, report.problems
    assert report.manifest is not None
    assert report.manifest.save_id == results[0]["save_id"]
    value = float(mgr.restore(1)["w"][0])
    assert value in {0.0, 1.0, 2.0, 3.0}
    storage = s3.storage()
    base = storage.key(f"{s3.url}/checkpoint-1")
    prefixes = {k.removeprefix(base + "/").split("/")[0] for k in storage.find(base)}
    assert prefixes == {"ckptguard.json", report.manifest.save_id}  # the losers cleaned up


def test_concurrent_committers_without_create_only_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the store ignores If-None-Match, the read-back still leaves one valid save."""
    monkeypatch.setattr(FsspecStorage, "supports_create_only", lambda _self: False)
    url = f"memory://ckptguard-tests/race-{uuid.uuid4().hex[:8]}"
    errors: list[BaseException] = []

    def commit(value: float) -> None:
        try:
            mgr = ckptguard.CheckpointManager(url, keep_last=None, if_exists="keep")
            mgr.save(1, {"w": torch.full((100,), value)})
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=commit, args=(float(i),)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    mgr = ckptguard.CheckpointManager(url)
    assert mgr.verify(1).ok
    assert float(mgr.restore(1)["w"][0]) in {float(i) for i in range(6)}


def test_create_only_writes_are_probed(servers: dict[str, S3Server]) -> None:
    for server in servers.values():
        storage = FsspecStorage(server.url("probe"), server.storage_options)
        assert storage.supports_create_only(), server.name
        key = f"{server.url('probe')}/once"
        assert storage.create_only(key, b"a")
        assert not storage.create_only(key, b"b")
        assert storage.read_bytes(key, limit=10) == b"a"


def test_transient_errors_are_retried_and_permanent_ones_are_not() -> None:
    from botocore.exceptions import ClientError

    def error(status: int, code: str) -> ClientError:
        return ClientError(
            {
                "Error": {"Code": code, "Message": "x"},
                "ResponseMetadata": {"HTTPStatusCode": status},
            },
            "PutObject",
        )

    assert is_transient(error(503, "SlowDown"))
    assert is_transient(error(500, "InternalError"))
    assert is_transient(error(409, "OperationAborted"))
    assert not is_transient(error(403, "AccessDenied"))
    assert not is_transient(error(404, "NoSuchKey"))
    calls = [0]

    def flaky() -> str:
        calls[0] += 1
        if calls[0] < 3:
            raise error(503, "SlowDown")
        return "done"

    assert _retry(flaky, what="upload", path="s3://b/k", policy=DEFAULT_RETRY) == "done"
    assert calls[0] == 3
    calls[0] = 0

    def denied() -> None:
        calls[0] += 1
        raise error(403, "AccessDenied")

    with pytest.raises(ckptguard.StorageError, match="AccessDenied"):
        _retry(denied, what="upload", path="s3://b/k", policy=DEFAULT_RETRY)
    assert calls[0] == 1


def test_credentials_are_never_logged(
    servers: dict[str, S3Server], caplog: pytest.LogCaptureFixture
) -> None:
    server = servers["moto"]
    with caplog.at_level(logging.DEBUG, logger="ckptguard"):
        mgr = ckptguard.CheckpointManager(
            server.url("secrets"), storage_options=server.storage_options, keep_last=1
        )
        mgr.save(1, _state(1))
        mgr.save(2, _state(2))
        with pytest.raises(ckptguard.CheckpointNotFound, match="no-such-bucket"):
            ckptguard.CheckpointManager(  # a missing bucket fails at start, not at a save
                f"s3://no-such-bucket-{uuid.uuid4().hex[:6]}/run",
                storage_options=server.storage_options,
            )
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert text  # something was logged
    assert server.storage_options["secret"] not in text
    assert server.storage_options["key"] not in text


def test_checkpoint_manager_under_torchrun_on_s3(
    servers: dict[str, S3Server], tmp_path: Path
) -> None:
    """Two ranks (gloo) save to moto: rank 0 uploads and commits, both get the same result,
    and a failure on rank 0 is raised on every rank."""
    server = servers["moto"]
    url = server.url(f"dist-{uuid.uuid4().hex[:8]}")
    out = tmp_path / "out"
    out.mkdir()
    env = {
        **CHILD_ENV,
        "CKPT_ROOT_URL": url,
        "CKPT_STORAGE_OPTIONS": json.dumps(server.storage_options),
    }
    child = Path(__file__).parents[1] / "dist_child.py"
    from s3_servers import free_port

    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}",
        str(child), "manager", str(tmp_path / "unused"), "4", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=280, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for report in reports:
        assert report["errors"] == []
        assert [i["step"] for i in report["infos"]] == [1, 2, 3, 4]
        assert all(i["valid"] for i in report["infos"])
        assert report["restored_equal"]
        assert report["aborted"]  # rank 0 could not store a lambda: every rank heard
    assert backend_for(url, server.storage_options).names() == [
        "checkpoint-3",
        "checkpoint-4",
    ]


def test_the_command_line_on_an_object_store(servers: dict[str, S3Server]) -> None:
    """`ckptguard list/verify/clean` take a URL; options come from the environment."""
    server = servers["moto"]
    url = server.url(f"cli-{uuid.uuid4().hex[:8]}")
    mgr = ckptguard.CheckpointManager(url, storage_options=server.storage_options)
    mgr.save(1, _state(1))
    mgr.save(2, _state(2))
    storage = FsspecStorage(url, server.storage_options)
    orphan = f"{url}/checkpoint-7/20260101T000000000000Z-0-0-0/model.safetensors"
    storage.write_bytes(orphan, b"left by a killed save")
    env = {**CHILD_ENV, "CKPTGUARD_STORAGE_OPTIONS": json.dumps(server.storage_options)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "ckptguard", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    listed = cli("list", url, "--json")
    assert listed.returncode == 0, listed.stderr
    assert [r["step"] for r in json.loads(listed.stdout)["checkpoints"]] == [1, 2]
    assert cli("verify", url).returncode == 0
    _flip_byte(Root(url, server.storage_options, "moto"), 2)
    bad = cli("verify", f"{url}/checkpoint-2", "--json")
    assert bad.returncode == 1
    assert not json.loads(bad.stdout)["ok"]
    dry = cli("clean", url, "--stale-after", "0", "--json")
    planned = [p["path"] for p in json.loads(dry.stdout)["planned"]]
    assert planned == [f"{url}/checkpoint-7/20260101T000000000000Z-0-0-0"]
    assert storage.exists(orphan)
    done = cli("clean", url, "--stale-after", "0", "--yes")
    assert done.returncode == 0, done.stderr
    assert not storage.exists(orphan)
    assert server.storage_options["secret"] not in listed.stdout + listed.stderr


def test_clean_up_never_takes_a_committed_save_for_an_orphan() -> None:
    """A manifest that is there but cannot be read (a newer schema, a failing read) keeps
    its save: clean-up skips the name instead of deleting the data it lists."""
    url = f"memory://ckptguard-tests/clean-{uuid.uuid4().hex[:8]}"
    mgr = ckptguard.CheckpointManager(url, keep_last=None)
    mgr.save(1, _state(1))
    storage = FsspecStorage(url)
    manifest = f"{url}/checkpoint-1/ckptguard.json"
    good = storage.read_bytes(manifest, limit=1 << 20)
    doc = json.loads(good)
    doc["schema_version"] = 99  # written by a newer ckptguard
    storage.fs.pipe_file(storage.key(manifest), json.dumps(doc).encode())
    data = [k for k in storage.find(f"{url}/checkpoint-1") if not k.endswith("ckptguard.json")]
    assert data
    assert clean_store(storage, url, grace=0) == []
    assert all(storage.exists(storage.url_of(k)) for k in data)
    storage.fs.pipe_file(storage.key(manifest), good)
    assert mgr.verify(1).ok
