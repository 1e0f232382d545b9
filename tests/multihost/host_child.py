"""Child of the multi-host tests, run by torchrun on each host (gloo on CPU).

Usage: torchrun ... host_child.py PHASE[,PHASE...]; one JSON report per phase and rank,
``$CKPT_OUT/<phase>-rank<r>.json``. Configuration from the environment:

- ``CKPT_S3_URL`` (an ``s3://`` prefix for this job) and ``CKPT_STORAGE_OPTIONS`` (JSON);
- ``CKPT_LOCAL_ROOT``: a path on the host's own disk (the same path on every host);
- ``CKPT_SHARED_ROOT``: a path every host sees (a shared filesystem);
- ``CKPT_HOLD=point:count``: rank ``CKPT_HOLD_RANK`` (default 0) stops the count-th time
  it reaches the named fault point, writes ``$CKPT_OUT/held`` and waits there to be killed
  with its host;
- ``CKPT_PG_TIMEOUT``: the process group's timeout in seconds (default 60): how long a
  rank waits for a dead peer before it fails.

Phases:
  s3         CheckpointManager saves to S3, then every rank writes its own file into one
             atomic_checkpoint on S3; what each rank saw of every commit
  naive      the control: every rank commits the same name on S3 alone (no coordinator)
  topology   the same two saves on node-local roots and on a shared POSIX root: what the
             storage probe decided (its log lines and each commit's writer ranks)
  sharded    a DTensor sharded over every rank of both hosts, saved straight to S3
             (``sharded=True``) and restored bit-exact, in its layout and resharded
  before     saves steps 1 and 2 to ``$CKPT_S3_URL/resume``
  held       saves step 3 there, with ``CKPT_HOLD`` set: the held rank never returns
  resume     the restarted job: the newest valid checkpoint, restored, then steps 3 and 4
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
import threading
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import ckptguard
from ckptguard._coordination.base import SingleProcess
from ckptguard._storage.faults import set_fault_hook

OUT = Path(os.environ["CKPT_OUT"])
OPTIONS: dict[str, Any] = json.loads(os.environ.get("CKPT_STORAGE_OPTIONS", "null"))
S3_URL = os.environ.get("CKPT_S3_URL", "")


class Collect(logging.Handler):
    """ckptguard's log lines of this process (the probe says what it decided at INFO)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname} {record.getMessage()}")


LOG = Collect()


def state(step: int, big: int = 0) -> dict[str, Any]:
    """Replicated training state: the same on every rank for a step."""
    g = torch.Generator().manual_seed(step)
    out: dict[str, Any] = {"w": torch.randn(4096, generator=g), "step": step}
    if big:
        out["big"] = torch.full((big,), float(step))
    return out


def same(got: dict[str, Any], want: dict[str, Any]) -> bool:
    return got.keys() == want.keys() and all(
        torch.equal(got[k], v) if isinstance(v, torch.Tensor) else got[k] == v
        for k, v in want.items()
    )


def infos_of(mgr: ckptguard.CheckpointManager, steps: range, big: int = 0) -> list[Any]:
    out = []
    for step in steps:
        info = mgr.save(step, state(step, big), metrics={"loss": 1 / step}).result()
        out.append({"step": info.step, "valid": info.valid, "path": info.path})
    return out


def files_tx(root: str, rank: int, **kwargs: Any) -> dict[str, Any]:
    """Every rank writes its own file into one checkpoint; what this rank got back."""
    tx = ckptguard.atomic_checkpoint(f"{root}/checkpoint-0", **kwargs)
    with tx as staging:
        (staging / f"rank{rank}.bin").write_bytes(bytes([rank]) * 65536)
    assert tx.result is not None
    manifest = tx.result.manifest
    return {
        "outcome": tx.result.outcome.value,
        "save_id": manifest.save_id,
        "files": sorted(f.path.rsplit("/", 1)[-1] for f in manifest.files),
        "writer_ranks": list(manifest.writer.ranks),
        "writer_host": manifest.writer.host,
    }


def phase_s3(rank: int) -> dict[str, Any]:
    mgr = ckptguard.CheckpointManager(f"{S3_URL}/managed", keep_last=None, storage_options=OPTIONS)
    infos = infos_of(mgr, range(1, 4))
    latest = mgr.latest()
    restored = mgr.restore()
    listed = [i.step for i in mgr.list()]
    files = files_tx(f"{S3_URL}/files", rank, storage_options=OPTIONS)
    return {
        "infos": infos,
        "latest": None if latest is None else latest.step,
        "listed": listed,
        "restored_equal": same(restored, state(3)),
        "files": files,
    }


def phase_naive(rank: int) -> dict[str, Any]:
    dist.barrier()  # all ranks race for the same name
    return files_tx(f"{S3_URL}/naive", rank, storage_options=OPTIONS, coordinator=SingleProcess())


def phase_topology(rank: int) -> dict[str, Any]:
    report: dict[str, Any] = {}
    for kind in ("local", "shared"):
        root = os.environ[f"CKPT_{kind.upper()}_ROOT"]
        start = len(LOG.lines)
        mgr = ckptguard.CheckpointManager(f"{root}/managed", keep_last=None)
        infos = infos_of(mgr, range(1, 3))
        restored = mgr.restore()
        files = files_tx(f"{root}/files", rank)
        report[kind] = {
            "infos": infos,
            "restored_equal": same(restored, state(2)),
            "files": files,
            "probe_log": [line for line in LOG.lines[start:] if "node-local" in line],
        }
    return report


def phase_sharded(rank: int) -> dict[str, Any]:
    """A DTensor split across both hosts' ranks, saved straight to S3, restored twice."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    del rank
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    mgr = ckptguard.CheckpointManager(f"{S3_URL}/sharded", keep_last=None, storage_options=OPTIONS)
    full = {
        step: torch.randn(64, 32, generator=torch.Generator().manual_seed(step)) for step in (1, 2)
    }
    infos = []
    for step in (1, 2):
        state = {"w": distribute_tensor(full[step], mesh, [Shard(0)]), "b": torch.ones(3) * step}
        info = mgr.save(step, state, sharded=True).result()
        infos.append({"step": info.step, "valid": info.valid, "path": info.path})
    exact = {}
    for step, placement in ((2, Shard(0)), (1, Shard(1))):  # Shard(1): resharded on load
        w = distribute_tensor(torch.zeros(64, 32), mesh, [placement])
        b = torch.zeros(3)
        mgr.restore(step, target={"w": w, "b": b})
        exact[f"{step}-{placement}"] = bool(torch.equal(w.full_tensor(), full[step])) and bool(
            torch.equal(b, torch.ones(3) * step)
        )
    return {"infos": infos, "exact": exact, "local_rows": w.to_local().shape[0]}


BIG = 6 << 20  # 24 MiB of float32: a multipart upload


def phase_before(rank: int) -> dict[str, Any]:
    del rank
    mgr = ckptguard.CheckpointManager(f"{S3_URL}/resume", keep_last=None, storage_options=OPTIONS)
    return {"infos": infos_of(mgr, range(1, 3), BIG)}


def _hold_at(point: str, count: int) -> None:
    seen = 0

    def hook(name: str) -> None:
        nonlocal seen
        if name != point:
            return
        seen += 1
        if seen == count:
            (OUT / "held").write_text(f"{point}:{count}")
            threading.Event().wait()  # until this host is killed

    set_fault_hook(hook)


def phase_held(rank: int) -> dict[str, Any]:
    mgr = ckptguard.CheckpointManager(f"{S3_URL}/resume", keep_last=None, storage_options=OPTIONS)
    if rank == int(os.environ.get("CKPT_HOLD_RANK", "0")):
        point, count = os.environ["CKPT_HOLD"].rsplit(":", 1)
        _hold_at(point, int(count))
    info = mgr.save(3, state(3, BIG)).result()
    return {"errors": [f"step 3 was saved: {info}"]}


def phase_resume(rank: int) -> dict[str, Any]:
    del rank
    mgr = ckptguard.CheckpointManager(f"{S3_URL}/resume", keep_last=None, storage_options=OPTIONS)
    latest = mgr.latest()
    restored = mgr.restore()
    step = int(restored["step"])
    return {
        "latest": None if latest is None else latest.step,
        "restored_equal": same(restored, state(step, BIG)),
        "infos": infos_of(mgr, range(step + 1, step + 3), BIG),
        "listed": [i.step for i in mgr.list()],
    }


PHASES = {
    "s3": phase_s3,
    "naive": phase_naive,
    "topology": phase_topology,
    "sharded": phase_sharded,
    "before": phase_before,
    "held": phase_held,
    "resume": phase_resume,
}


def main() -> None:
    logging.getLogger("ckptguard").addHandler(LOG)
    logging.getLogger("ckptguard").setLevel(logging.INFO)
    # A bounded wait everywhere: a peer that died must fail this job, not hang it.
    timeout = float(os.environ.get("CKPT_PG_TIMEOUT", "60"))
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout))
    rank = dist.get_rank()
    failed = False
    for name in sys.argv[1].split(","):
        try:
            report = PHASES[name](rank)
        except Exception as exc:
            report = {"errors": [traceback.format_exc()], "error_type": type(exc).__name__}
            failed = True
        report |= {"rank": rank, "world_size": dist.get_world_size(), "host": os.uname()[1]}
        (OUT / f"{name}-rank{rank}.json").write_text(json.dumps(report))
        if failed:
            sys.exit(1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
