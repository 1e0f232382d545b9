"""ckptguard against boto3's transfer manager on a real S3 server behind a throttling proxy.

A real SeaweedFS server (tests/s3_servers.py) is reached through benchmarks/throttle_proxy.py,
which caps each TCP connection at ``--mbps`` MB/s per direction (10 by default), as cloud
stores cap a single stream. One interleaved run (each round runs every method once, the
order rotated each round; only ratios from one run mean anything):

- ``save``: ``CheckpointManager.save`` of a ~``--mib`` MiB state dict to ``s3://`` (from the
  call until committed: upload, manifest, create-only commit, retention) against boto3's
  ``upload_fileobj`` of the same bytes with ``TransferConfig(max_concurrency=10)``;
- ``restore``: ``CheckpointManager.restore(step, target)`` (every byte checked before any
  reaches the target) against boto3's ``download_fileobj`` of the same object;
- ``sweep``: save and restore for each ``--sweep`` max_concurrency (what chose the default);
- ``memory``: peak RSS beyond what a process held before (VmHWM reset through
  /proc/self/clear_refs), of one save and of one restore, each in its own process, for
  two state sizes, straight to the server (no proxy): bounded by the buffer pool, not the
  state.

Usage: python benchmarks/bench_s3.py [--mib 128] [--rounds 3] [--mbps 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent / "src"))

MIB = 1 << 20


def make_state(mib: int) -> dict[str, Any]:
    import torch  # noqa: PLC0415

    gen = torch.Generator().manual_seed(0)
    n = max(1, mib // 8)  # 8 MiB tensors
    return {"model": {f"layer{i}.weight": torch.randn(2048, 1024, generator=gen) for i in range(n)}}


def state_bytes(state: dict[str, Any]) -> bytes:
    return b"".join(t.numpy().tobytes() for t in state["model"].values())


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak() -> int:
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def options_for(endpoint: str) -> dict[str, Any]:
    from s3_servers import KEY, SECRET  # noqa: PLC0415

    return {
        "key": KEY,
        "secret": SECRET,
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
    }


def boto_client(endpoint: str) -> Any:
    import boto3  # noqa: PLC0415
    from botocore.config import Config  # noqa: PLC0415

    from s3_servers import KEY, SECRET  # noqa: PLC0415

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=KEY,
        aws_secret_access_key=SECRET,
        region_name="us-east-1",
        config=Config(max_pool_connections=20, retries={"mode": "standard"}),
    )


class Proxy:
    def __init__(self, upstream: str, mbps: float) -> None:
        host_port = upstream.split("://", 1)[1]
        self.proc = subprocess.Popen(  # noqa: S603 - our own script
            [sys.executable, str(HERE / "throttle_proxy.py"), "--upstream", host_port,
             "--mbps", str(mbps)],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line.startswith("ready "):
            self.proc.kill()
            raise RuntimeError(f"proxy did not start: {line!r}")
        self.endpoint = f"http://127.0.0.1:{line.split()[1]}"

    def stop(self) -> dict[str, Any]:
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=30)
        with contextlib.suppress(ValueError, IndexError):
            stats: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
            return stats
        return {}


def timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(server: Any, proxy: Proxy, args: argparse.Namespace) -> dict[str, Any]:
    """The interleaved save/restore run, and the max_concurrency sweep."""
    from boto3.s3.transfer import TransferConfig  # noqa: PLC0415

    import ckptguard  # noqa: PLC0415

    logging.getLogger("ckptguard").setLevel(logging.ERROR)
    state = make_state(args.mib)
    blob = state_bytes(state)
    client = boto_client(proxy.endpoint)
    config = TransferConfig(max_concurrency=10)
    target = {"model": {k: v.clone().zero_() for k, v in state["model"].items()}}
    managers: dict[int, Any] = {}

    def manager(mc: int) -> Any:
        if mc not in managers:
            managers[mc] = ckptguard.CheckpointManager(
                server.url(f"bench-{mc}-{uuid.uuid4().hex[:6]}"),
                keep_last=2,
                storage_options=options_for(proxy.endpoint),
                max_concurrency=mc,
                check_environment=False,
            )
        return managers[mc]

    steps: dict[int, int] = {}

    def ck_save(mc: int) -> float:
        steps[mc] = steps.get(mc, 0) + 1
        return timed(lambda: manager(mc).save(steps[mc], state))

    def ck_restore(mc: int) -> float:
        return timed(lambda: manager(mc).restore(steps[mc], target))

    key = f"boto-{uuid.uuid4().hex[:6]}/blob"

    def boto_save() -> float:
        return timed(lambda: client.upload_fileobj(io.BytesIO(blob), server.bucket, key,
                                                   Config=config))  # fmt: skip

    def boto_restore() -> float:
        out = io.BytesIO()
        t = timed(lambda: client.download_fileobj(server.bucket, key, out, Config=config))
        if out.getvalue() != blob:
            raise RuntimeError("boto3 download differs")
        return t

    mc = args.max_concurrency
    ck_save(mc)  # warm-up: connections, the store's create-only probe
    boto_save()
    times: dict[str, list[float]] = {k: [] for k in ("ck_save", "boto_save", "ck_restore",
                                                     "boto_restore")}  # fmt: skip
    methods: list[tuple[str, Callable[[], float]]] = [
        ("ck_save", lambda: ck_save(mc)), ("boto_save", boto_save),
        ("ck_restore", lambda: ck_restore(mc)), ("boto_restore", boto_restore),
    ]  # fmt: skip
    for rnd in range(args.rounds):
        for name, fn in methods[rnd % 4 :] + methods[: rnd % 4]:  # no method always leads
            times[name].append(fn())
        print(f"round {rnd + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()),
              flush=True)  # fmt: skip
    ok = all(torch_equal(target["model"][k], v) for k, v in state["model"].items())
    if not ok:
        raise RuntimeError("the restored state differs")
    med = {k: statistics.median(v) for k, v in times.items()}
    result: dict[str, Any] = {
        "mib": len(blob) / MIB,
        "max_concurrency": mc,
        "median_s": med,
        "min_s": {k: min(v) for k, v in times.items()},
        "max_s": {k: max(v) for k, v in times.items()},
        "save_ratio": med["boto_save"] / med["ck_save"],
        "restore_ratio": med["boto_restore"] / med["ck_restore"],
    }
    sweep: dict[int, dict[str, float]] = {}
    for value in args.sweep:
        ck_save(value)  # warm-up
        s = [ck_save(value) for _ in range(args.sweep_rounds)]
        r = [ck_restore(value) for _ in range(args.sweep_rounds)]
        b = [boto_save() for _ in range(1)] + [boto_restore() for _ in range(1)]
        sweep[value] = {
            "save_s": statistics.median(s),
            "restore_s": statistics.median(r),
            "boto_save_s": b[0],
            "boto_restore_s": b[1],
        }
        print(f"max_concurrency={value}: {sweep[value]}", flush=True)
    result["sweep"] = sweep
    for m in managers.values():
        m.close()
    return result


def torch_equal(a: Any, b: Any) -> bool:
    import torch  # noqa: PLC0415

    return bool(torch.equal(a, b))


def memory_child(mode: str, mib: int, endpoint: str, url: str, mc: int) -> dict[str, int]:
    """One save or one restore in this process: peak RSS beyond what it held before."""
    import ckptguard  # noqa: PLC0415

    state = make_state(mib)
    manager = ckptguard.CheckpointManager(
        url, storage_options=options_for(endpoint), max_concurrency=mc, check_environment=False
    )
    if mode == "restore":
        target = {"model": {k: v.clone().zero_() for k, v in state["model"].items()}}
        del state
        manager.save(2, {"model": {"tiny": target["model"]["layer0.weight"][:1]}})  # warm-up
        before = reset_peak()
        manager.restore(1, target)
    else:
        manager.save(0, {"model": {"tiny": state["model"]["layer0.weight"][:1]}})  # warm-up
        before = reset_peak()
        manager.save(1, state)
    peak = _status("VmHWM")
    manager.close()
    return {"before": before, "peak": peak, "extra": peak - before}


def memory(server: Any, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mib in args.memory_mib:
        url = server.url(f"mem-{mib}-{uuid.uuid4().hex[:6]}")
        for mode in ("save", "restore"):
            cmd = [sys.executable, __file__, "--memory-child", mode, "--mib", str(mib),
                   "--endpoint", server.endpoint, "--url", url,
                   "--max-concurrency", str(args.max_concurrency)]  # fmt: skip
            done = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600)  # noqa: S603
            got = json.loads(done.stdout.strip().splitlines()[-1])
            out[f"{mode}_{mib}MiB"] = got
            print(f"memory {mode} {mib} MiB: extra {got['extra'] / MIB:.0f} MiB", flush=True)
    return out


def start_weed(workdir: Path) -> Any:
    """SeaweedFS as the tests start it, but with room for the bench's gigabytes.

    (The tests' server has a few 256 MB volumes: it answers InternalError once full.)
    """
    from s3_servers import HOST, S3Server, _wait_ready, free_port  # noqa: PLC0415

    weed = Path(sys.executable).with_name("weed")
    data = workdir / "weed"
    data.mkdir(parents=True, exist_ok=True)
    ports = {name: free_port(grpc_too=True) for name in ("s3", "master", "volume", "filer")}
    cmd = [
        str(weed), "server", f"-ip={HOST}", f"-ip.bind={HOST}", f"-dir={data}", "-s3",
        f"-s3.port={ports['s3']}", f"-master.port={ports['master']}",
        f"-volume.port={ports['volume']}", f"-filer.port={ports['filer']}",
        "-master.volumeSizeLimitMB=1024", "-volume.max=0",
        "-s3.port.iceberg=0", "-s3.port.lance=0",
    ]  # fmt: skip
    log = workdir / "weed.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(  # noqa: S603 - the venv's weed
            cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=workdir
        )
    server = S3Server("seaweedfs", f"http://{HOST}:{ports['s3']}", proc, log=log, extra=ports)
    _wait_ready(server)
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--mbps", type=float, default=10.0)
    parser.add_argument("--max-concurrency", type=int, default=None)
    parser.add_argument("--sweep", default="2,4,8,10,16")
    parser.add_argument("--sweep-rounds", type=int, default=2)
    parser.add_argument("--memory-mib", default="128,512")
    parser.add_argument("--only", default="compare,memory")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    from ckptguard._storage.transfer import DEFAULT_MAX_CONCURRENCY  # noqa: PLC0415

    args.max_concurrency = args.max_concurrency or DEFAULT_MAX_CONCURRENCY
    if args.memory_child:
        got = memory_child(args.memory_child, args.mib, args.endpoint, args.url,
                           args.max_concurrency)  # fmt: skip
        print(json.dumps(got))
        return
    args.sweep = [int(v) for v in args.sweep.split(",") if v]
    args.memory_mib = [int(v) for v in args.memory_mib.split(",") if v]

    load = os.getloadavg()
    report: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "loadavg_start": load,
            "python": platform.python_version(),
        },
        "mbps_per_connection": args.mbps,
    }
    print(f"load average at start: {load}", flush=True)
    with tempfile.TemporaryDirectory(prefix="ckptguard-bench-s3-") as work:
        server = start_weed(Path(work))
        proxy = None
        try:
            if "compare" in args.only:
                proxy = Proxy(server.endpoint, args.mbps)
                report["compare"] = compare(server, proxy, args)
                report["proxy"] = proxy.stop()
                proxy = None
            if "memory" in args.only:
                report["memory"] = memory(server, args)
        finally:
            if proxy is not None:
                proxy.stop()
            server.stop()
    report["machine"]["loadavg_end"] = os.getloadavg()
    c = report.get("compare")
    if c:
        print(
            f"save {c['median_s']['ck_save']:.2f}s vs boto3 {c['median_s']['boto_save']:.2f}s "
            f"({c['save_ratio']:.2f}x); restore {c['median_s']['ck_restore']:.2f}s vs boto3 "
            f"{c['median_s']['boto_restore']:.2f}s ({c['restore_ratio']:.2f}x)"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
