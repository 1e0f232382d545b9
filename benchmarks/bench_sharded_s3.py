"""Sharded 2-rank saves to S3: ckptguard's ``save(..., sharded=True)`` against ``dcp.save``
with DCP's own fsspec writer, to the same SeaweedFS through the same throttling proxy.

Each of 2 ranks (torchrun, gloo on CPU) holds half of a DTensor of ``--mib`` MiB. One
interleaved run (each round runs both once, the order alternating): ckptguard uploads
every rank's shards straight to the store through its DCP StorageWriter (hashing each byte,
parts in flight concurrently) and commits one manifest (retention included); DCP's
``FsspecWriter`` writes the same shards through s3fs's file objects, with no checksum and
no commit. Then the restore of each (ckptguard verifies every object before DCP loads).
Ratios are throughput ratios (DCP's time / ckptguard's): > 1 means ckptguard is faster.

    python benchmarks/bench_sharded_s3.py [--mib 128] [--rounds 3] [--mbps 10] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_s3 import Proxy, options_for, start_weed  # noqa: E402 - the S3 bench's parts


def child(url: str, mib: int, rounds: int, options: dict[str, Any]) -> None:
    """One rank of the torchrun job: the interleaved rounds; rank 0 prints the times."""
    import torch  # noqa: PLC0415 - only in the torchrun children
    import torch.distributed as dist  # noqa: PLC0415
    from torch.distributed.checkpoint._fsspec_filesystem import (  # noqa: PLC0415
        FsspecReader,
        FsspecWriter,
    )
    from torch.distributed.checkpoint.state_dict_loader import load  # noqa: PLC0415
    from torch.distributed.checkpoint.state_dict_saver import save  # noqa: PLC0415
    from torch.distributed.device_mesh import init_device_mesh  # noqa: PLC0415
    from torch.distributed.tensor import Shard, distribute_tensor  # noqa: PLC0415

    import ckptguard  # noqa: PLC0415

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    rows = mib * (1 << 20) // 4 // 1024
    full = torch.randn(rows, 1024, generator=torch.Generator().manual_seed(0))
    state = {"w": distribute_tensor(full, mesh, [Shard(0)])}
    mgr = ckptguard.CheckpointManager(
        f"{url}/ckptguard", keep_last=2, storage_options=options, check_environment=False
    )
    times: dict[str, list[float]] = {"ckptguard": [], "dcp": [], "ckptguard_restore": [],
                                     "dcp_restore": []}  # fmt: skip

    def timed(key: str, fn: Any) -> None:
        dist.barrier()
        start = time.perf_counter()
        fn()
        dist.barrier()
        times[key].append(time.perf_counter() - start)

    for r in range(rounds):
        kinds = ("ckptguard", "dcp") if r % 2 == 0 else ("dcp", "ckptguard")
        for kind in kinds:
            if kind == "ckptguard":
                timed(kind, lambda r=r: mgr.save(r, state, sharded=True))
            else:
                writer = FsspecWriter(f"{url}/dcp/{r}", **options)
                timed(kind, lambda w=writer: save(state, storage_writer=w))
        for kind in kinds:
            target = {"w": distribute_tensor(torch.zeros(rows, 1024), mesh, [Shard(0)])}
            if kind == "ckptguard":
                timed("ckptguard_restore", lambda t=target, r=r: mgr.restore(r, target=t))
            else:
                reader = FsspecReader(f"{url}/dcp/{r}", **options)
                timed("dcp_restore", lambda t=target, rd=reader: load(t, storage_reader=rd))
            if not torch.equal(target["w"].full_tensor(), full):
                raise SystemExit(f"{kind} restored other bytes")
    mgr.close()
    if dist.get_rank() == 0:
        print("TIMES " + json.dumps(times), flush=True)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mbps", type=float, default=10.0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", nargs=2, metavar=("URL", "OPTIONS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.mib, args.rounds, json.loads(args.child[1]))
        return
    report: dict[str, Any] = {"loadavg_start": os.getloadavg(), "mib": args.mib,
                              "mbps_per_connection": args.mbps, "ranks": 2}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="ckptguard-bench-sharded-") as work:
        server = start_weed(Path(work))
        proxy = Proxy(server.endpoint, args.mbps)
        try:
            options = options_for(proxy.endpoint)
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            url = server.url(f"sharded-{uuid.uuid4().hex[:8]}")
            cmd = [
                sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                "--nnodes=1", "--master_addr=127.0.0.1", f"--master_port={port}",
                str(Path(__file__).resolve()), "--mib", str(args.mib), "--rounds",
                str(args.rounds), "--child", url, json.dumps(options),
            ]  # fmt: skip
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)  # noqa: S603
            if proc.returncode != 0:
                raise SystemExit(proc.stderr[-4000:])
        finally:
            report["proxy"] = proxy.stop()
            server.stop()
    line = next(x for x in proc.stdout.splitlines() if x.startswith("TIMES "))
    times = json.loads(line.removeprefix("TIMES "))
    medians = {k: statistics.median(v) for k, v in times.items()}
    report.update(times_s=times, median_s=medians, loadavg_end=os.getloadavg())
    report["save_ratio"] = medians["dcp"] / medians["ckptguard"]
    report["restore_ratio"] = medians["dcp_restore"] / medians["ckptguard_restore"]
    print(
        f"sharded save (2 ranks, {args.mib} MiB): ckptguard {medians['ckptguard']:.2f}s vs "
        f"dcp+fsspec {medians['dcp']:.2f}s ({report['save_ratio']:.2f}x); restore "
        f"{medians['ckptguard_restore']:.2f}s vs {medians['dcp_restore']:.2f}s "
        f"({report['restore_ratio']:.2f}x)"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
