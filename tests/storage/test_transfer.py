"""Concurrent transfers to object stores (``_storage/transfer.py``), on a real moto server.

Every request goes through a small HTTP proxy started here (one request per connection),
which counts requests by kind, how many of a kind were in flight at once, and answers
chosen ones itself with an error, so that faults are real failed requests. What is
checked: parts in flight concurrently round-trip bit-exact with the right digest; a part
that fails transiently is retried alone (and without retries the same fault fails the
upload: the control); an abort leaves no object and no incomplete multipart upload;
ranged reads run concurrently and return exact bytes; a corrupt or replaced object never
reaches a restore's target; the buffer pool never hands out more than its bound.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import torch
import xxhash

import ckptguard
from ckptguard._errors import CorruptCheckpoint, StoragePermissionError, TransientStorageError
from ckptguard._protocol.marker import clean_store
from ckptguard._storage import objectstore
from ckptguard._storage.objectstore import FsspecStorage, ObjectSource
from ckptguard._storage.retry import RetryPolicy
from ckptguard._storage.transfer import BufferPool
from s3_servers import HOST, S3Server, start_moto, start_seaweedfs

MIB = 1 << 20
Fault = Callable[[str, dict[str, list[str]], int], int | None]  # kind, query, attempt -> status


def _kind(method: str, query: dict[str, list[str]], headers: dict[str, str]) -> str:
    if method == "PUT" and "partNumber" in query:
        return "upload_part"
    if method == "POST" and "uploads" in query:
        return "create"
    if method == "POST" and "uploadId" in query:
        return "complete"
    if method == "DELETE" and "uploadId" in query:
        return "abort"
    if method == "GET" and "range" in headers:
        return "get_range"
    return f"{method.lower()}"


def _read_head(sock: socket.socket, buf: bytearray) -> bytes:
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before a full head")
        buf += chunk
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    buf[:] = rest
    return head


def _headers(lines: list[bytes]) -> dict[str, str]:
    out = {}
    for line in lines:
        name, _, value = line.decode("latin-1").partition(":")
        out[name.strip().lower()] = value.strip()
    return out


def _rewrite(lines: list[bytes], drop: set[str]) -> bytes:
    kept = [line for line in lines if line.split(b":", 1)[0].strip().lower().decode() not in drop]
    return b"\r\n".join([*kept, b"Connection: close", b"", b""])


class S3Proxy:
    """An HTTP proxy in front of an S3 server: one request per connection, counted."""

    def __init__(self, upstream: str, fault: Fault | None = None, hold: float = 0.0) -> None:
        split = urlsplit(upstream)
        self.upstream = (split.hostname or HOST, split.port or 80)
        self.fault, self.hold = fault, hold
        self.counts: Counter[str] = Counter()
        self.parts: Counter[int] = Counter()  # attempts per part number
        self.in_flight: Counter[str] = Counter()
        self.peak: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._sock = socket.create_server((HOST, 0))
        self._sock.settimeout(0.1)
        self._stop = threading.Event()
        self.endpoint = f"http://{HOST}:{self._sock.getsockname()[1]}"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(60)
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            self._relay(conn)

    def _relay(self, conn: socket.socket) -> None:
        buf = bytearray()
        lines = _read_head(conn, buf).split(b"\r\n")
        method, target, _ = lines[0].decode("latin-1").split(" ", 2)
        headers = _headers(lines[1:])
        query = parse_qs(urlsplit(target).query, keep_blank_values=True)
        if headers.get("expect", "").lower() == "100-continue":
            conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        length = int(headers.get("content-length", "0"))
        while len(buf) < length:
            chunk = conn.recv(min(1 << 20, length - len(buf)))
            if not chunk:
                return
            buf += chunk
        kind = _kind(method, query, headers)
        with self._lock:
            self.counts[kind] += 1
            if kind == "upload_part":
                self.parts[int(query["partNumber"][0])] += 1
            attempt = self.parts[int(query["partNumber"][0])] if kind == "upload_part" else 1
            self.in_flight[kind] += 1
            self.peak[kind] = max(self.peak[kind], self.in_flight[kind])
        done = False

        def finished() -> None:  # before the client can see any answer: never over-counted
            nonlocal done
            with self._lock:
                if not done:
                    self.in_flight[kind] -= 1
                    done = True

        try:
            status = self.fault(kind, query, attempt) if self.fault else None
            if kind in {"upload_part", "get_range"} and self.hold:
                time.sleep(self.hold)  # so that concurrent requests overlap here
            if status is not None:
                code = {503: "SlowDown", 403: "AccessDenied"}.get(status, "InternalError")
                body = f"<Error><Code>{code}</Code><Message>injected</Message></Error>".encode()
                finished()
                conn.sendall(
                    f"HTTP/1.1 {status} Injected\r\nContent-Type: application/xml\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                    + body
                )
                return
            with socket.create_connection(self.upstream) as up:
                up.sendall(_rewrite(lines, {"connection", "expect"}) + bytes(buf[:length]))
                rest = bytearray()
                head = _read_head(up, rest).split(b"\r\n")
                finished()
                conn.sendall(_rewrite(head, {"connection", "keep-alive"}) + bytes(rest))
                while chunk := up.recv(1 << 20):
                    conn.sendall(chunk)
        finally:
            finished()


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = start_moto(tmp_path_factory.mktemp("moto"))
    try:
        yield server
    finally:
        server.stop()


def _options(server: S3Server, endpoint: str) -> dict[str, Any]:
    options = server.storage_options
    options["client_kwargs"] = {**options["client_kwargs"], "endpoint_url": endpoint}
    options["config_kwargs"] = {
        **options["config_kwargs"],
        "retries": {"total_max_attempts": 1, "mode": "standard"},
    }
    return options


@pytest.fixture
def proxied(moto: S3Server) -> Iterator[Callable[..., tuple[S3Proxy, FsspecStorage]]]:
    made: list[S3Proxy] = []

    def make(
        fault: Fault | None = None,
        *,
        hold: float = 0.0,
        max_concurrency: int = 4,
        retry: RetryPolicy | None = None,
    ) -> tuple[S3Proxy, FsspecStorage]:
        proxy = S3Proxy(moto.endpoint, fault, hold)
        made.append(proxy)
        storage = FsspecStorage(
            moto.url(f"t-{uuid.uuid4().hex[:8]}"),
            _options(moto, proxy.endpoint),
            retry=retry or RetryPolicy(deadline=20.0, initial_wait=0.01, max_wait=0.1),
            max_concurrency=max_concurrency,
        )
        return proxy, storage

    yield make
    for proxy in made:
        proxy.close()


def _pending_uploads(server: S3Server) -> list[dict[str, Any]]:
    uploads: list[dict[str, Any]] = (
        server.client().list_multipart_uploads(Bucket=server.bucket).get("Uploads", [])
    )
    return uploads


def _object(server: S3Server, storage: FsspecStorage, name: str) -> bytes | None:
    key = storage.key(f"{storage.url}/{name}").split("/", 1)[1]
    client = server.client()
    try:
        data: bytes = client.get_object(Bucket=server.bucket, Key=key)["Body"].read()
    except client.exceptions.NoSuchKey:
        return None
    return data


def _upload(storage: FsspecStorage, name: str, data: bytes, piece: int = 3 * MIB) -> Any:
    writer = storage.open_write(f"{storage.url}/{name}")
    for start in range(0, len(data), piece):
        writer.write(data[start : start + piece])
    return writer.close()


def test_parts_in_flight_at_once_round_trip_bit_exact(
    moto: S3Server, proxied: Callable[..., tuple[S3Proxy, FsspecStorage]]
) -> None:
    proxy, storage = proxied(hold=0.3, max_concurrency=3)
    data = os.urandom(6 * 8 * MIB + 12345)  # 7 parts
    digest = _upload(storage, "big.bin", data)
    assert digest.size == len(data)
    assert digest.checksum == xxhash.xxh3_128_hexdigest(data)
    assert _object(moto, storage, "big.bin") == data
    assert proxy.counts["create"] == 1
    assert proxy.counts["complete"] == 1
    assert sorted(proxy.parts) == list(range(1, 8))
    assert 2 <= proxy.peak["upload_part"] <= 3  # concurrent, and never over the bound
    assert storage.transfers.pool.peak <= 3 + 2
    assert storage.transfers.pool.in_use == 0


def test_a_small_file_is_one_request_and_no_multipart_upload(
    moto: S3Server, proxied: Callable[..., tuple[S3Proxy, FsspecStorage]]
) -> None:
    proxy, storage = proxied()
    assert _upload(storage, "small", b"abc").checksum == xxhash.xxh3_128_hexdigest(b"abc")
    assert _upload(storage, "empty", b"").size == 0
    assert _object(moto, storage, "small") == b"abc"
    assert _object(moto, storage, "empty") == b""
    assert proxy.counts["create"] == 0
    assert proxy.counts["put"] == 2


def test_a_part_that_fails_transiently_is_retried_alone(
    moto: S3Server, proxied: Callable[..., tuple[S3Proxy, FsspecStorage]]
) -> None:
    def third_part_once(kind: str, query: dict[str, list[str]], attempt: int) -> int | None:
        return (
            503 if kind == "upload_part" and query["partNumber"] == ["3"] and attempt == 1 else None
        )

    proxy, storage = proxied(third_part_once)
    data = os.urandom(5 * 8 * MIB)
    assert _upload(storage, "retried.bin", data).checksum == xxhash.xxh3_128_hexdigest(data)
    assert _object(moto, storage, "retried.bin") == data
    assert proxy.parts == {1: 1, 2: 1, 3: 2, 4: 1, 5: 1}  # part 3 again, no other
    assert proxy.counts["create"] == 1
    assert proxy.counts["complete"] == 1

    # Control: the same fault with no time to retry fails the upload, typed, and the
    # multipart upload is aborted (nothing left behind, nothing visible).
    proxy, storage = proxied(third_part_once, retry=RetryPolicy(deadline=0.0))
    with pytest.raises(TransientStorageError, match="part 3"):
        _upload(storage, "not-retried.bin", data)
    assert proxy.counts["abort"] == 1
    assert _object(moto, storage, "not-retried.bin") is None
    assert not [u for u in _pending_uploads(moto) if "not-retried" in u["Key"]]


def test_a_part_refused_for_good_fails_typed_and_leaves_nothing(
    moto: S3Server, proxied: Callable[..., tuple[S3Proxy, FsspecStorage]]
) -> None:
    def deny_part_2(kind: str, query: dict[str, list[str]], attempt: int) -> int | None:
        del attempt
        return 403 if kind == "upload_part" and query["partNumber"] == ["2"] else None

    proxy, storage = proxied(deny_part_2)
    with pytest.raises(StoragePermissionError):
        _upload(storage, "denied.bin", os.urandom(4 * 8 * MIB))
    assert proxy.parts[2] == 1  # a refusal is never retried
    assert proxy.counts["abort"] == 1
    assert _object(moto, storage, "denied.bin") is None
    assert not [u for u in _pending_uploads(moto) if "denied" in u["Key"]]
    assert storage.transfers.pool.in_use == 0


def test_an_abort_leaves_no_object_and_no_incomplete_upload(
    moto: S3Server, proxied: Callable[..., tuple[S3Proxy, FsspecStorage]]
) -> None:
    proxy, storage = proxied(hold=0.2)
    writer = storage.open_write(f"{storage.url}/aborted.bin")
    writer.write(os.urandom(3 * 8 * MIB + 5))  # parts 1-3 sent, the 4th being filled
    assert [u for u in _pending_uploads(moto) if "aborted" in u["Key"]]  # control: one exists
    writer.abort()
    assert proxy.counts["abort"] == 1
    assert _object(moto, storage, "aborted.bin") is None
    assert not [u for u in _pending_uploads(moto) if "aborted" in u["Key"]]
    assert storage.transfers.pool.in_use == 0


def test_ranged_reads_run_concurrently_and_return_exact_bytes(
    proxied: Callable[..., tuple[S3Proxy, FsspecStorage]],
) -> None:
    proxy, storage = proxied(hold=0.2, max_concurrency=4)
    data = os.urandom(24 * MIB + 777)
    path = f"{storage.url}/read.bin"
    digest = _upload(storage, "read.bin", data)
    assert storage.hash_object(path) == digest
    assert 2 <= proxy.peak["get_range"] <= 4
    source = ObjectSource(storage, path, len(data))
    try:
        for offset, size in [(0, 8), (5, 1000), (1005, 13 * MIB), (1005 + 13 * MIB, 9 * MIB)]:
            out = bytearray(size)
            source.pread_into(memoryview(out), offset)
            assert out == data[offset : offset + size]
        assert source.read_at_most(10_000, len(data) - 777) == data[-777:]
        with pytest.raises(CorruptCheckpoint):  # past the end: refused, never short
            source.pread_into(memoryview(bytearray(10)), len(data) - 5)
        assert source.checksum() == digest.checksum
    finally:
        source.close()
    assert storage.transfers.pool.in_use == 0


@pytest.mark.parametrize("spool", [True, False])
def test_an_object_replaced_after_its_checksum_never_reaches_the_reader(
    proxied: Callable[..., tuple[S3Proxy, FsspecStorage]],
    monkeypatch: pytest.MonkeyPatch,
    spool: bool,
) -> None:
    if not spool:  # no room for the checked bytes: they are downloaded again
        monkeypatch.setattr(objectstore, "SPOOL_SPARE", 1 << 62)
    _, storage = proxied()
    data, other = os.urandom(10 * MIB), os.urandom(10 * MIB)
    path = f"{storage.url}/swap.bin"
    digest = _upload(storage, "swap.bin", data)
    source = ObjectSource(storage, path, len(data))
    try:
        assert source.checksum() == digest.checksum
        _upload(storage, "swap.bin", other)  # replaced, same size, after the check
        out = bytearray(len(data))
        if spool:  # the very bytes that were checked
            source.pread_into(memoryview(out), 0)
            assert out == data
        else:
            with pytest.raises(CorruptCheckpoint, match="replaced while it was read"):
                source.pread_into(memoryview(out), 0)
    finally:
        source.close()


def _state() -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    return {"model": {f"w{i}": torch.randn(512, 1024, generator=gen) for i in range(6)}}


def test_a_corrupt_object_is_refused_before_any_byte_reaches_the_target(
    moto: S3Server,
) -> None:
    url = moto.url(f"run-{uuid.uuid4().hex[:8]}")
    options = moto.storage_options
    manager = ckptguard.CheckpointManager(
        url, storage_options=options, max_concurrency=3, check_environment=False
    )
    state = _state()
    manager.save(1, state)
    prefix = url.split("/", 3)[3]
    client = moto.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=moto.bucket, Prefix=prefix)["Contents"]]
    (key,) = [k for k in keys if k.endswith(".safetensors")]

    def fresh_target() -> dict[str, Any]:
        return {"model": {k: torch.zeros_like(v) for k, v in state["model"].items()}}

    # Control: the checkpoint as saved restores into the target (its bytes reach it).
    target = fresh_target()
    manager.restore(target=target)
    assert all(torch.equal(target["model"][k], v) for k, v in state["model"].items())

    blob = bytearray(client.get_object(Bucket=moto.bucket, Key=key)["Body"].read())
    blob[len(blob) // 2] ^= 0xFF  # inside the tensors' bytes (the header is small)
    client.put_object(Bucket=moto.bucket, Key=key, Body=bytes(blob))
    target = fresh_target()
    reader = ckptguard.CheckpointManager(
        url, storage_options=options, max_concurrency=3, check_environment=False,
        read_only=True,
    )  # fmt: skip
    with pytest.raises(CorruptCheckpoint):
        reader.restore(1, target)
    assert all(not t.any() for t in target["model"].values())  # not one byte reached it
    manager.close()
    reader.close()


def test_the_pool_never_hands_out_more_than_its_bound() -> None:
    pool = BufferPool(16, limit=3)
    counts: list[int] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(200):
            bufs = pool.acquire_many(2) if threading.get_ident() % 2 else [pool.acquire()]
            with lock:
                counts.append(pool.in_use)
            time.sleep(0.0005)  # hold them a moment: the others come in meanwhile
            for buf in bufs:
                assert buf is not None
                pool.release(buf)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert max(counts) <= 3
    assert pool.peak <= 3
    assert pool.in_use == 0
    assert pool.peak >= 2  # control: the workers did overlap

    # An empty pool blocks the next acquire until a buffer comes back.
    held = [pool.acquire() for _ in range(3)]
    assert pool.acquire(block=False) is None
    got: list[bytearray | None] = []
    waiter = threading.Thread(target=lambda: got.append(pool.acquire()))
    waiter.start()
    waiter.join(timeout=0.5)
    assert not got  # still waiting
    pool.release(held.pop())  # type: ignore[arg-type]
    waiter.join()
    assert got
    assert got[0] is not None
    assert pool.in_use == 3


def test_max_concurrency_is_checked(moto: S3Server) -> None:
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_concurrency"):
            ckptguard.CheckpointManager(
                moto.url("bad"), storage_options=moto.storage_options,
                max_concurrency=bad,  # type: ignore[arg-type]
                check_environment=False,
            )  # fmt: skip


@pytest.fixture(scope="module")
def weed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = start_seaweedfs(tmp_path_factory.mktemp("weed"))
    try:
        yield server
    finally:
        server.stop()


def test_clean_store_aborts_uploads_a_killed_save_left_open(weed: S3Server) -> None:
    # SeaweedFS, not moto: moto dates every upload in 2010, so no grace period could hold
    moto = weed
    url = moto.url(f"clean-{uuid.uuid4().hex[:8]}")
    storage = FsspecStorage(url, moto.storage_options)
    writer = storage.open_write(f"{url}/checkpoint-1/save-x/model.safetensors")
    writer.write(os.urandom(8 * MIB + 1))  # one part sent: an upload is open, as if killed
    open_uploads = [u for u in _pending_uploads(moto) if u["Key"].startswith(url.split("/", 3)[3])]
    assert len(open_uploads) == 1
    # within the grace period (a save may still be writing it): left alone
    assert clean_store(storage, url, grace=3600.0) == []
    assert len([u for u in _pending_uploads(moto) if u in open_uploads]) == 1
    removed = clean_store(storage, url, grace=0.0)
    assert removed == [f"{url}/checkpoint-1/save-x/model.safetensors#{open_uploads[0]['UploadId']}"]
    assert not [u for u in _pending_uploads(moto) if u["UploadId"] == open_uploads[0]["UploadId"]]


def test_the_mirror_uploads_a_checkpoints_files_concurrently_within_the_bound(
    moto: S3Server, tmp_path: Path
) -> None:
    proxy = S3Proxy(moto.endpoint, hold=0.3)
    try:
        gen = torch.Generator().manual_seed(1)
        state = {f"part{i}": {"w": torch.randn(256, 256, generator=gen)} for i in range(6)}
        manager = ckptguard.CheckpointManager(
            tmp_path / "run",
            storage_options=_options(moto, proxy.endpoint),
            mirror=moto.url(f"mirror-{uuid.uuid4().hex[:8]}"),
            max_concurrency=3,
            check_environment=False,
        )
        manager.save(1, state)
        manager.wait()
        files = sorted(os.listdir(tmp_path / "run" / "checkpoint-1"))
        assert len([f for f in files if f.endswith(".safetensors")]) == 6, files
        assert manager.mirror is not None
        assert manager.mirror.uploaded == ["checkpoint-1"]
        assert proxy.counts["put"] >= 6  # a request per file (each smaller than a part)
        assert 2 <= proxy.peak["put"] <= 3  # several files in flight, never over the bound
        restored = manager.restore(1)
        assert all(torch.equal(restored[k]["w"], v["w"]) for k, v in state.items())
        manager.close()
    finally:
        proxy.close()
