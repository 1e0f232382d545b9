"""One storage contract, one commit protocol: the same suite on every backend.

Backends: a local directory, fsspec's memory://, moto's standalone S3 server and
SeaweedFS (both started once for this module, stopped by PID). Everything goes through
``backend_for(root, options)``, as the library's own entry points do.

1. The :class:`~ckptguard._storage.base.Storage` contract: writes, reads and their
   limit, streamed writes and their digest, listing and removal, ``open_tree`` (the
   read side of verify and restore), missing paths.
2. The protocol: ``atomic_checkpoint`` commits, ``if_exists``, a failed block, retire,
   corruption found by verify, and ``CheckpointManager`` save/restore/retention.
3. ``FaultyStorage`` around ``FsspecStorage``: transient errors are retried (with a
   control, retries off, that must fail saves); a persistent EIO is a typed error that
   leaves the previous checkpoint intact.
4. Two ranks under torchrun (gloo) commit one checkpoint on a real S3 server.
"""

from __future__ import annotations

import errno
import gc
import json
import logging
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import xxhash

import ckptguard
from ckptguard._format.layout import MANIFEST_NAME, RootLayout
from ckptguard._protocol.backend import Backend, backend_for
from ckptguard._protocol.strategy import Outcome
from ckptguard._storage.base import FileDigest, Storage
from ckptguard._storage.objectstore import FsspecStorage
from ckptguard._storage.retry import RetryPolicy
from ckptguard.testing import Fault, FaultyStorage
from s3_servers import S3Server, free_port, start_moto, start_seaweedfs

SERVERS = ("moto", "seaweedfs")
STORES = ("memory", *SERVERS)
BACKENDS = ("local", *STORES)
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
# Injected faults need no time to clear: short waits, a deadline far above what they need.
FAST = RetryPolicy(deadline=10.0, initial_wait=0.001, max_wait=0.02)
NO_RETRY = RetryPolicy(deadline=0.0, initial_wait=0.0, max_wait=0.0)
TRANSIENT = (errno.EBUSY, errno.EAGAIN)
SAVES = 8  # per fault test: enough that retries off fail some (seeded: always the same)
METADATA_OPS = (
    "make_dir",
    "open_write",
    "read_bytes",
    "walk_files",
    "list_dir",
    "exists",
    "remove_tree",
    "remove_file",
    "open_tree",
)


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
    """A fresh, empty checkpoint root on one backend."""

    url: str
    options: dict[str, Any] | None
    kind: str

    @property
    def local(self) -> bool:
        return self.kind == "local"

    def backend(self, **kwargs: Any) -> Backend:
        return backend_for(self.url, self.options, **kwargs)

    def at(self, *parts: str) -> str:
        """A path or URL under the root ('/'-separated on every backend)."""
        return "/".join((self.url, *parts))

    def raw(self) -> FsspecStorage:
        """The store itself, no retries and no checks (to damage what it holds)."""
        return FsspecStorage(self.url, self.options)

    def manager(self, **kwargs: Any) -> ckptguard.CheckpointManager:
        return ckptguard.CheckpointManager(self.url, storage_options=self.options, **kwargs)


def _root(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Root:
    name = f"run-{uuid.uuid4().hex[:10]}"
    if kind == "local":
        return Root(str(tmp_path / name), None, kind)
    if kind == "memory":
        return Root(f"memory://ckptguard-contract/{name}", None, kind)
    server: S3Server = request.getfixturevalue("servers")[kind]
    return Root(server.url(name), server.storage_options, kind)


@pytest.fixture(params=BACKENDS)
def root(request: pytest.FixtureRequest, tmp_path: Path) -> Root:
    return _root(request.param, request, tmp_path)


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Root:
    return _root(request.param, request, tmp_path)


def _xxh(data: bytes) -> FileDigest:
    return FileDigest(len(data), xxhash.xxh3_128(data).hexdigest())


def _blob(n: int, seed: int = 0) -> bytes:
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=_gen(seed)).numpy().tobytes()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _populate(storage: Storage, root: Root) -> dict[str, bytes]:
    """a.bin, empty.bin and sub/b.bin under the root; returns rel -> bytes."""
    files = {"a.bin": _blob(3000, 1), "empty.bin": b"", "sub/b.bin": _blob(777, 2)}
    storage.make_dir(root.url, mode=0o700)
    storage.make_dir(root.at("sub"), mode=0o700)
    for rel, data in files.items():
        assert storage.write_bytes(root.at(rel), data) == _xxh(data)
    return files


# -- 1. the storage contract ---------------------------------------------------------------
def test_write_bytes_read_bytes_round_trip_and_limit(root: Root) -> None:
    storage = root.backend().storage
    files = _populate(storage, root)
    for rel, data in files.items():
        assert storage.read_bytes(root.at(rel), limit=len(data)) == data  # the limit is inclusive
        assert storage.read_bytes(root.at(rel), limit=1 << 20) == data
        assert storage.hash_file(root.at(rel)) == _xxh(data)
    with pytest.raises(ValueError, match="2999"):
        storage.read_bytes(root.at("a.bin"), limit=2999)
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(root.at("missing.bin"), limit=100)
    with pytest.raises(FileNotFoundError):
        storage.hash_file(root.at("missing.bin"))


def test_open_write_streams_and_digests_every_byte(root: Root) -> None:
    storage = root.backend().storage
    storage.make_dir(root.url)
    chunks: list[bytes | bytearray | memoryview] = [
        b"header",
        bytearray(_blob(5 << 20, 3)),  # large: the local writer hashes while a thread writes
        memoryview(_blob(1000, 4)),
        torch.arange(64, dtype=torch.float32).numpy().data,  # a float32 buffer, cast to bytes
        b"",
    ]
    whole = b"".join(bytes(memoryview(c).cast("B")) for c in chunks)
    writer = storage.open_write(root.at("stream.bin"))
    for chunk in chunks:
        writer.write(chunk)
    digest = writer.close()
    assert digest == _xxh(whole)
    assert digest.checksum == xxhash.xxh3_128_hexdigest(whole)
    assert storage.read_bytes(root.at("stream.bin"), limit=len(whole)) == whole
    assert storage.hash_file(root.at("stream.bin")) == digest


def test_a_second_write_of_one_name(root: Root) -> None:
    """Storage.open_write: a filesystem never writes over an existing file; a store
    replaces the object (the commit marker alone is written create-only, by the strategy)."""
    storage = root.backend().storage
    storage.make_dir(root.url)
    storage.write_bytes(root.at("once.bin"), b"first")
    if root.kind == "local":
        with pytest.raises(FileExistsError):
            storage.write_bytes(root.at("once.bin"), b"second")
        with pytest.raises(FileExistsError):
            storage.open_write(root.at("once.bin")).close()
        assert storage.read_bytes(root.at("once.bin"), limit=100) == b"first"
    else:
        storage.write_bytes(root.at("once.bin"), b"second")
        assert storage.read_bytes(root.at("once.bin"), limit=100) == b"second"


def test_an_aborted_write_leaves_no_file(root: Root) -> None:
    storage = root.backend().storage
    storage.make_dir(root.url)
    writer = storage.open_write(root.at("partial.bin"))
    writer.write(b"half of a file")
    writer.abort()
    del writer  # the file object goes now: nothing may complete or fail in a finaliser
    assert not storage.exists(root.at("partial.bin"))
    assert storage.list_dir(root.url) == []


def test_exists_list_dir_remove_file_remove_tree(root: Root) -> None:
    storage = root.backend().storage
    assert not storage.exists(root.url)
    assert storage.list_dir(root.url) == []  # documented: [] if it does not exist
    files = _populate(storage, root)
    assert all(storage.exists(root.at(rel)) for rel in files)
    assert storage.exists(root.at("sub"))
    assert not storage.exists(root.at("missing.bin"))
    assert storage.list_dir(root.url) == ["a.bin", "empty.bin", "sub"]
    assert storage.list_dir(root.at("sub")) == ["b.bin"]
    assert storage.list_dir(root.at("nowhere")) == []
    storage.remove_file(root.at("a.bin"))
    assert not storage.exists(root.at("a.bin"))
    storage.remove_file(root.at("a.bin"))  # missing is fine
    storage.remove_tree(root.at("empty.bin"))  # a file: removed like one
    assert not storage.exists(root.at("empty.bin"))
    storage.remove_tree(root.at("sub"))
    assert not storage.exists(root.at("sub"))
    assert not storage.exists(root.at("sub", "b.bin"))
    assert storage.list_dir(root.url) == []
    storage.remove_tree(root.at("sub"))  # missing is fine


def test_walk_files(root: Root) -> None:
    storage = root.backend().storage
    files = _populate(storage, root)
    storage.make_dir(root.at("sub", "deeper"))
    storage.write_bytes(root.at("sub", "deeper", "c.bin"), b"c")
    found, dirs = storage.walk_files(root.url)
    assert found == sorted([*files, "sub/deeper/c.bin"])
    assert set(dirs) <= {"sub", "sub/deeper"}  # object stores have no directories
    if root.local:
        assert dirs == ["sub", "sub/deeper"]  # parents before children
    assert storage.walk_files(root.at("sub"))[0] == ["b.bin", "deeper/c.bin"]


def test_open_tree_reads_lists_digests_and_opens(root: Root) -> None:
    storage = root.backend().storage
    files = _populate(storage, root)
    problems: list[str] = []
    tree = storage.open_tree(root.url)
    try:
        assert tree.read_small("a.bin", 3000) == files["a.bin"]
        assert tree.read_small("empty.bin", 0) == b""
        with pytest.raises(ValueError, match="large"):
            tree.read_small("a.bin", 2999)
        with pytest.raises(FileNotFoundError):
            tree.read_small("missing.bin", 100)
        assert tree.entries("", problems.append) == {rel: len(d) for rel, d in files.items()}
        assert tree.entries("sub/", problems.append) == {"sub/b.bin": 777}
        assert tree.entries("none/", problems.append) == {}
        assert problems == []
        for rel, data in files.items():
            assert tree.digest(rel) == _xxh(data)
        seen: list[int] = []
        assert tree.digest("a.bin", seen.append) == _xxh(files["a.bin"])
        assert sum(seen) == 3000  # progress reports every byte

        source = tree.open("a.bin")
        try:
            data = files["a.bin"]
            assert source.size == 3000
            buf = bytearray(1000)
            source.pread_into(memoryview(buf), 1500)
            assert bytes(buf) == data[1500:2500]
            source.pread_into(memoryview(buf)[:10], 0)  # reads may go backwards
            assert bytes(buf[:10]) == data[:10]
            assert source.read_at_most(100, 2950) == data[2950:]  # at most: 50 are left
            assert source.read_at_most(10) == data[:10]
            assert source.read_at_most(10, 3000) == b""
            assert source.checksum() == _xxh(data).checksum
            with pytest.raises(ckptguard.CorruptCheckpoint):
                source.pread_into(memoryview(bytearray(100)), 2950)  # past the end
        finally:
            source.close()
        with pytest.raises(FileNotFoundError):
            tree.open("missing.bin")
        with pytest.raises(FileNotFoundError):
            tree.digest("missing.bin")
    finally:
        tree.close()
    with pytest.raises(FileNotFoundError):
        storage.open_tree(root.at("nowhere"))


def test_the_root_resolves_to_the_right_kind(root: Root) -> None:
    backend = root.backend()
    assert isinstance(backend.storage, Storage)
    assert backend.remote is (not root.local)
    assert backend.strategy.kind == ("rename" if root.local else "manifest-marker")
    assert backend.join("checkpoint-1") == root.at("checkpoint-1")
    assert backend.names() == []
    assert not backend.exists()


# -- 2. the protocol on every backend ------------------------------------------------------
def _commit(
    root: Root, name: str, files: dict[str, bytes], **kwargs: Any
) -> ckptguard.AtomicCheckpoint:
    tx = ckptguard.atomic_checkpoint(root.at(name), storage_options=root.options, **kwargs)
    with tx as staging:
        for rel, data in files.items():
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            (staging / rel).write_bytes(data)
    return tx


def _read_committed(backend: Backend, name: str) -> dict[str, bytes]:
    """Every file of a committed checkpoint, read through its manifest: rel -> bytes."""
    path = backend.join(name)
    manifest, opener, close = backend.open_files(path, backend.read_manifest(path))
    out: dict[str, bytes] = {}
    try:
        for entry in manifest.files:
            source = opener(entry.path)
            try:
                out[entry.path] = source.read_at_most(entry.size + 1)
            finally:
                source.close()
    finally:
        close()
    return out


def _saves_under(root: Root, name: str) -> set[str]:
    """What lies in a checkpoint's prefix on a store: save ids and the manifest."""
    raw = root.raw()
    base = raw.key(root.at(name))
    return {k.removeprefix(base + "/").split("/")[0] for k in raw.find(root.at(name))}


def _nothing_in_flight(root: Root) -> None:
    """No staging dir (local), no upload without a manifest (stores)."""
    if root.local:
        staging = RootLayout(root.url).staging
        assert not os.path.isdir(staging) or os.listdir(staging) == []
        return
    backend = root.backend()
    raw = root.raw()
    base = raw.key(root.url)
    prefixes = {k.removeprefix(base + "/").split("/")[0] for k in raw.find(root.url)}
    for name in prefixes - {".ckptguard"}:
        assert name in backend.names(), f"{name}: objects without a manifest"
        manifest = backend.read_manifest(backend.join(name))
        assert _saves_under(root, name) == {MANIFEST_NAME, manifest.save_id}


FILES = {"model.bin": _blob(4096, 10), "sub/opt.bin": _blob(1500, 11), "empty": b""}


def test_atomic_checkpoint_commits_a_visible_verified_checkpoint(root: Root) -> None:
    tx = _commit(root, "checkpoint-1", FILES, step=1, metrics={"loss": 0.5})
    assert tx.result is not None
    assert tx.result.outcome is Outcome.COMMITTED
    backend = root.backend()
    assert backend.names() == ["checkpoint-1"]
    path = backend.join("checkpoint-1")
    report = backend.verify(path)
    assert report.ok, report.problems
    assert report.files_checked == len(FILES)
    assert report.bytes_checked == sum(len(d) for d in FILES.values())
    assert report.step == 1
    manifest = backend.read_manifest(path)
    assert manifest.save_id == tx.result.manifest.save_id
    assert manifest.metrics == {"loss": 0.5}
    prefix = backend.strategy.content_prefix(manifest)
    assert sorted(f.path.removeprefix(prefix) for f in manifest.files) == sorted(FILES)
    assert _read_committed(backend, "checkpoint-1") == FILES
    assert ckptguard.verify(path, storage_options=root.options).ok  # the public entry point
    _nothing_in_flight(root)


def test_if_exists_keep_replace_error(root: Root) -> None:
    first = {"w.bin": b"first" * 100}
    second = {"w.bin": b"second" * 100}
    third = {"w.bin": b"third" * 100}
    backend = root.backend()
    tx = _commit(root, "checkpoint-1", first)
    assert tx.result is not None
    original = tx.result.manifest.save_id

    kept = _commit(root, "checkpoint-1", second, if_exists="keep")
    assert kept.result is not None
    assert kept.result.outcome is Outcome.KEPT_EXISTING
    assert kept.result.manifest.save_id == original
    assert _read_committed(backend, "checkpoint-1") == first
    _nothing_in_flight(root)

    replaced = _commit(root, "checkpoint-1", second, if_exists="replace")
    assert replaced.result is not None
    assert replaced.result.outcome is Outcome.REPLACED
    assert replaced.result.manifest.save_id != original
    assert _read_committed(backend, "checkpoint-1") == second
    assert backend.verify(backend.join("checkpoint-1")).ok
    _nothing_in_flight(root)  # the replaced save's objects are gone

    with pytest.raises(ckptguard.CommitConflict):
        _commit(root, "checkpoint-1", third, if_exists="error")
    assert _read_committed(backend, "checkpoint-1") == second
    assert backend.names() == ["checkpoint-1"]
    _nothing_in_flight(root)


def test_a_failed_block_leaves_nothing_visible(root: Root) -> None:
    backend = root.backend()
    _commit(root, "checkpoint-1", FILES)
    where: list[Path] = []
    tx = ckptguard.atomic_checkpoint(root.at("checkpoint-2"), storage_options=root.options)
    with pytest.raises(RuntimeError, match="simulated"), tx as staging:
        where.append(staging)
        (staging / "model.bin").write_bytes(_blob(2048, 5))
        raise RuntimeError("simulated failure while writing")
    assert tx.result is None
    assert not where[0].exists()  # the staging dir (local) or spool (stores) is gone
    assert backend.names() == ["checkpoint-1"]
    assert not backend.exists(backend.join("checkpoint-2"))
    assert backend.verify(backend.join("checkpoint-2")).ok is False
    assert backend.verify(backend.join("checkpoint-1")).ok
    _nothing_in_flight(root)


def test_retire_removes_a_checkpoint(root: Root) -> None:
    backend = root.backend()
    _commit(root, "checkpoint-1", FILES)
    _commit(root, "checkpoint-2", FILES)
    assert backend.names() == ["checkpoint-1", "checkpoint-2"]
    assert backend.retire("checkpoint-1")
    assert backend.names() == ["checkpoint-2"]
    assert not backend.exists(backend.join("checkpoint-1"))
    assert backend.verify(backend.join("checkpoint-2")).ok


def _rewrite(root: Root, path: str, change: Any) -> None:
    """Replace the bytes of a committed file with ``change(bytes)``, where it is stored."""
    if root.local:
        target = Path(path)
        target.write_bytes(change(target.read_bytes()))
        return
    raw = root.raw()
    key = raw.key(path)
    raw.fs.pipe_file(key, change(raw.fs.cat_file(key)))


def test_verify_finds_altered_extra_and_missing_files(root: Root) -> None:
    backend = root.backend()
    tx = _commit(root, "checkpoint-3", FILES)
    assert tx.result is not None
    path = backend.join("checkpoint-3")
    # where the files lie: the directory itself (POSIX) or the save's prefix (stores)
    content = path + "/" + backend.strategy.content_prefix(tx.result.manifest)

    def flip(data: bytes) -> bytes:
        return data[:100] + bytes([data[100] ^ 0x01]) + data[101:]

    _rewrite(root, content + "model.bin", flip)
    report = backend.verify(path)
    assert not report.ok
    assert any("model.bin: checksum mismatch" in p for p in report.problems), report.problems
    assert len(report.problems) == 1
    assert backend.verify(path, checksums=False).ok  # same size: only checksums see it

    backend.storage.write_bytes(content + "planted.bin", b"not in the manifest")
    backend.storage.remove_file(content + "sub/opt.bin")
    problems = backend.verify(path).problems
    assert any("planted.bin: extra file not in the manifest" in p for p in problems), problems
    assert any("sub/opt.bin: missing" in p for p in problems), problems
    assert any("model.bin: checksum mismatch" in p for p in problems), problems
    assert len(problems) == 3
    problems = backend.verify(path, checksums=False).problems
    assert len(problems) == 2  # extra and missing are found without reading any data


def test_verify_reports_a_size_change(root: Root) -> None:
    backend = root.backend()
    tx = _commit(root, "checkpoint-4", FILES)
    assert tx.result is not None
    path = backend.join("checkpoint-4")
    content = path + "/" + backend.strategy.content_prefix(tx.result.manifest)
    _rewrite(root, content + "model.bin", lambda data: data[:-1])
    report = backend.verify(path, checksums=False)
    assert not report.ok
    assert any("model.bin: size 4095, manifest says 4096" in p for p in report.problems)


def _state(step: int) -> dict[str, Any]:
    g = _gen(step)
    return {
        "model": {
            "weight": torch.randn(16, 32, generator=g),
            "bias": torch.randn(16, generator=g).to(torch.bfloat16),
        },
        "opt": {"step": torch.tensor(step, dtype=torch.int64), "lr": 1e-3 * step},
        "step": step,
    }


def _same(a: Any, b: Any) -> bool:
    """Bit-exact equality of two state trees (tensors: dtype, shape and bytes)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return (
            a.dtype == b.dtype
            and a.shape == b.shape
            and a.reshape(-1).view(torch.uint8).equal(b.reshape(-1).view(torch.uint8))
        )
    return type(a) is type(b) and bool(a == b)


def test_checkpoint_manager_save_restore_list_latest_retention(root: Root) -> None:
    mgr = root.manager(keep_last=2, check_environment=False)
    for step in (1, 2, 3):
        info = mgr.save(step, _state(step), metrics={"loss": 1 / step}).result()
        assert info.valid
        assert info.step == step
    assert [i.step for i in mgr.list()] == [2, 3]
    assert all(i.valid for i in mgr.list(checksums=True))
    latest = mgr.latest()
    assert latest is not None
    assert latest.step == 3
    assert latest.metrics == {"loss": 1 / 3}
    assert _same(mgr.restore(), _state(3))
    assert _same(mgr.restore(2), _state(2))
    with pytest.raises(ckptguard.CheckpointNotFound):
        mgr.restore(1)  # retired: gone, not corrupt
    with pytest.raises(ckptguard.CheckpointNotFound):
        mgr.verify(1)
    assert mgr.verify().ok
    backend = root.backend()
    assert backend.names() == ["checkpoint-2", "checkpoint-3"]
    assert not backend.exists(backend.join("checkpoint-1"))
    # a second manager (a restarted job) sees the same
    again = root.manager(keep_last=2)
    assert [i.step for i in again.list()] == [2, 3]
    assert _same(again.restore(), _state(3))
    _nothing_in_flight(root)


# -- 3. injected faults on an object store ---------------------------------------------------
def _faulty_manager(
    store: Root, faults: list[Fault], policy: RetryPolicy, seed: int = 0
) -> tuple[ckptguard.CheckpointManager, FaultyStorage]:
    faulty = FaultyStorage(
        FsspecStorage(store.url, store.options, retry=policy), faults=faults, seed=seed
    )
    mgr = ckptguard.CheckpointManager(
        store.url, keep_last=None, storage=faulty, retry=policy, check_environment=False
    )
    return mgr, faulty


def _flaky_saves(store: Root, policy: RetryPolicy, saves: int) -> tuple[list[int], list[str]]:
    """``saves`` saves with EBUSY/EAGAIN at p=0.05 on metadata ops: (steps saved, errors)."""
    mgr, faulty = _faulty_manager(store, [], policy, seed=7)
    faulty.add(Fault.flaky(TRANSIENT, 0.05, ops=METADATA_OPS))
    saved: list[int] = []
    errors: list[str] = []
    for step in range(1, saves + 1):
        try:
            mgr.save(step, _state(step))
        except ckptguard.StorageError as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
        else:
            saved.append(step)
    faulty.clear()
    assert faulty.fired, "no fault was injected: the test tests nothing"
    return saved, errors


def test_transient_errors_on_a_store_are_retried(
    store: Root, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="ckptguard")  # each retry logs a warning
    saved, errors = _flaky_saves(store, FAST, SAVES)
    assert errors == []
    assert saved == list(range(1, SAVES + 1))
    mgr = store.manager(keep_last=None, check_environment=False)
    assert [i.step for i in mgr.list(checksums=True)] == saved
    assert all(_same(mgr.restore(step), _state(step)) for step in saved)
    _nothing_in_flight(store)


def test_control_transient_errors_fail_saves_with_retries_off(
    store: Root, caplog: pytest.LogCaptureFixture
) -> None:
    """The test above can fail: the same faults with no retries fail some saves."""
    caplog.set_level(logging.CRITICAL, logger="ckptguard")
    saved, errors = _flaky_saves(store, NO_RETRY, SAVES)
    assert errors, "retries off, yet every save survived the injected faults"
    assert len(saved) < SAVES
    mgr = store.manager(keep_last=None, check_environment=False)
    # what did commit is intact even so
    assert all(_same(mgr.restore(step), _state(step)) for step in saved)


def test_a_persistent_eio_is_typed_and_keeps_the_previous_checkpoint(
    store: Root, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.CRITICAL, logger="ckptguard")
    mgr, faulty = _faulty_manager(store, [], FAST)
    mgr.save(1, _state(1))
    faulty.add(Fault.fail("write_bytes", errno.EIO, times=None))
    with pytest.raises(ckptguard.StorageError) as caught:
        mgr.save(2, _state(2))
    assert not isinstance(caught.value, ckptguard.TransientStorageError)
    assert caught.value.errno == errno.EIO
    assert [op for _, op, _, _ in faulty.fired] == ["write_bytes"]  # never retried
    faulty.clear()
    assert [i.step for i in mgr.list()] == [1]
    assert _same(mgr.restore(), _state(1))
    assert mgr.verify(1).ok
    assert store.raw().find(store.at("checkpoint-2")) == {}  # the aborted save's uploads
    fresh = store.manager(keep_last=None, check_environment=False)
    assert _same(fresh.restore(), _state(1))
    _nothing_in_flight(store)


def test_a_write_error_mid_file_aborts_the_upload_cleanly(
    store: Root, caplog: pytest.LogCaptureFixture
) -> None:
    """EIO on the second chunk of a streamed file: the upload is abandoned, typed, quietly.

    (An abandoned upload whose file object then fails in its finaliser is reported by
    pytest as an unraisable exception, an error here: warnings are errors.)
    """
    caplog.set_level(logging.CRITICAL, logger="ckptguard")
    mgr, faulty = _faulty_manager(store, [], FAST)
    mgr.save(1, _state(1))
    faulty.add(Fault.fail("write", errno.EIO, at=2, times=None))
    with pytest.raises(ckptguard.StorageError) as caught:
        mgr.save(2, _state(2))
    assert caught.value.errno == errno.EIO
    del caught  # its traceback holds the abandoned upload's file object ...
    gc.collect()  # ... finalised now, inside this test
    faulty.clear()
    assert [i.step for i in mgr.list()] == [1]
    assert _same(mgr.restore(), _state(1))
    assert store.raw().find(store.at("checkpoint-2")) == {}
    _nothing_in_flight(store)


# -- 4. several ranks commit one checkpoint on a store ------------------------------------
_RANKS = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path

    import torch.distributed as dist

    import ckptguard
    from ckptguard._protocol.backend import backend_for

    url, options, out = sys.argv[1], json.loads(sys.argv[2]), Path(sys.argv[3])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    tx = ckptguard.atomic_checkpoint(url + "/checkpoint-1", storage_options=options, step=1)
    with tx as staging:
        (staging / f"rank{rank}.bin").write_bytes(bytes([rank + 1]) * (4096 + rank))
    report = {
        "rank": rank,
        "outcome": tx.result.outcome.value,
        "save_id": tx.result.manifest.save_id,
        "spool_left": staging.exists(),
    }
    if rank == 0:
        backend = backend_for(url, options)
        verified = backend.verify(backend.join("checkpoint-1"))
        report["names"] = backend.names()
        report["ok"] = verified.ok
        report["problems"] = verified.problems
        report["files"] = sorted(f.path.split("/", 1)[1] for f in verified.manifest.files)
    dist.barrier()
    dist.destroy_process_group()
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    """
)


def test_two_ranks_commit_one_checkpoint_on_s3(
    servers: dict[str, S3Server], tmp_path: Path
) -> None:
    server = servers["moto"]  # memory:// is per process: a real server is shared
    url = server.url(f"ranks-{uuid.uuid4().hex[:8]}")
    script = tmp_path / "ranks.py"
    script.write_text(_RANKS)
    out = tmp_path / "out"
    out.mkdir()
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}",
        str(script), url, json.dumps(server.storage_options), str(out),
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=240, env=CHILD_ENV, check=False
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["outcome"] for r in reports] == ["committed", "committed"]
    assert reports[0]["save_id"] == reports[1]["save_id"]  # one save, both ranks' files
    assert not any(r["spool_left"] for r in reports)
    assert reports[0]["names"] == ["checkpoint-1"]
    assert reports[0]["ok"], reports[0]["problems"]
    assert reports[0]["files"] == ["rank0.bin", "rank1.bin"]
    # and seen from here, a third process
    backend = backend_for(url, server.storage_options)
    assert backend.names() == ["checkpoint-1"]
    assert backend.verify(backend.join("checkpoint-1")).ok
    assert _read_committed(backend, "checkpoint-1") == {
        "rank0.bin": b"\x01" * 4096,
        "rank1.bin": b"\x02" * 4097,
    }
    assert _saves_under(Root(url, server.storage_options, "moto"), "checkpoint-1") == {
        MANIFEST_NAME,
        reports[0]["save_id"],
    }
