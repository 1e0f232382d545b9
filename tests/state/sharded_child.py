"""Child of the sharded tests, run by torchrun (gloo on CPU): one JSON report per rank.

Usage: torchrun ... sharded_child.py MODE OUT_DIR ROOT [ROOT ...]
  save     every root: checkpoint-1 and checkpoint-2 of ``state(step)``, sharded=True;
           then, on each object-store root, checkpoint-3 with rank 1 raising inside its
           upload: reports each rank's SaveAborted and what latest() says after it
  restore  every root: restore the newest and step 1 into zeroed targets on this world
           size's mesh; report, per root, which parameters' full tensors differ (bit for
           bit) from ``reference(step)`` and how many rows and columns this rank held

An object-store root's storage options come from CKPTGUARD_STORAGE_OPTIONS.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

import ckptguard
from ckptguard._storage.faults import set_fault_hook

ROWS = 10  # "emb" has 10 rows: uneven over 4 ranks (3, 3, 3, 1)


def reference(step: int) -> dict[str, Any]:
    """The full (unsharded) values of a step's state, the same on every rank."""
    g = torch.Generator().manual_seed(1000 + step)
    return {
        "w": torch.arange(48.0).reshape(8, 6) * step,
        "emb": torch.randn(ROWS, 3, generator=g, dtype=torch.float64),
        "half": torch.randn(6, 5, generator=g).to(torch.bfloat16),
        "rep": torch.randn(7, generator=g),
        "meta": {"step": step, "name": f"run-{step}", "lr": 0.1 * step},
    }


def state(step: int, mesh: DeviceMesh) -> dict[str, Any]:
    """``reference(step)`` sharded over ``mesh``: DTensors, a plain replicated tensor, values."""
    ref = reference(step)
    return {
        "w": distribute_tensor(ref["w"], mesh, [Shard(0)]),
        "emb": distribute_tensor(ref["emb"], mesh, [Shard(0)]),
        "half": distribute_tensor(ref["half"], mesh, [Shard(1)]),
        "rep": ref["rep"],
        "meta": dict(ref["meta"]),
    }


def zeroed(mesh: DeviceMesh) -> dict[str, Any]:
    """A target of the same shapes on this job's mesh, every value wrong."""
    ref = reference(0)
    return {
        "w": distribute_tensor(torch.zeros_like(ref["w"]), mesh, [Shard(0)]),
        "emb": distribute_tensor(torch.zeros_like(ref["emb"]), mesh, [Shard(0)]),
        "half": distribute_tensor(torch.zeros_like(ref["half"]), mesh, [Shard(1)]),
        "rep": torch.zeros(7),
        "meta": {"step": -1, "name": "", "lr": -1.0},
    }


def _bits(t: torch.Tensor) -> bytes:
    return bytes(t.detach().contiguous().view(torch.uint8).numpy().tobytes())


def mismatches(got: dict[str, Any], step: int) -> list[str]:
    """Which parameters differ, bit for bit, from ``reference(step)`` (full tensors)."""
    ref = reference(step)
    bad = []
    for key in ("w", "emb", "half", "rep"):
        value = got[key]
        full = value.full_tensor() if isinstance(value, DTensor) else value
        if full.dtype != ref[key].dtype or _bits(full) != _bits(ref[key]):
            bad.append(key)
    if got["meta"] != ref["meta"]:
        bad.append(f"meta={got['meta']}")
    return bad


def save(roots: list[str], mesh: DeviceMesh) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for root in roots:
        with ckptguard.CheckpointManager(root, keep_last=5) as mgr:
            paths = [mgr.save(step, state(step, mesh), sharded=True).path for step in (1, 2)]
            out[root] = {"paths": paths}
            if "://" in root:
                out[root] |= fail_an_upload(mgr, mesh)
    return out


def fail_an_upload(mgr: ckptguard.CheckpointManager, mesh: DeviceMesh) -> dict[str, Any]:
    """checkpoint-3, with rank 1 raising inside its first upload (a real multipart write)."""
    rank = dist.get_rank()
    reached: list[str] = []

    def fail_in_upload(point: str) -> None:
        reached.append(point)
        if point == "remote.uploading":
            raise RuntimeError(f"simulated failure while uploading on rank {rank}")

    aborted: dict[str, str] | None = None
    previous = set_fault_hook(fail_in_upload if rank == 1 else None)
    try:
        mgr.save(3, state(3, mesh), sharded=True)
    except ckptguard.SaveAborted as exc:
        aborted = {str(r): m for r, m in exc.failures.items()}
    finally:
        set_fault_hook(previous)
    latest = mgr.latest()
    return {
        "aborted": aborted,
        "reached": sorted(set(reached)),
        "latest": None if latest is None else latest.step,
    }


def restore(roots: list[str], mesh: DeviceMesh) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for root in roots:
        with ckptguard.CheckpointManager(root, keep_last=5) as mgr:
            newest = zeroed(mesh)
            mgr.restore(target=newest)
            first = zeroed(mesh)
            mgr.restore(1, target=first)
        out[root] = {
            "newest": mismatches(newest, 2),
            "step1": mismatches(first, 1),
            "rows": newest["emb"].to_local().shape[0],
            "cols": newest["half"].to_local().shape[1],
        }
    return out


def run(mode: str, roots: list[str], mesh: DeviceMesh) -> dict[str, Any]:
    if mode == "save":
        return {"roots": save(roots, mesh)}
    if mode == "restore":
        return {"roots": restore(roots, mesh)}
    raise ValueError(f"unknown mode {mode}")


def main() -> None:
    mode, out, roots = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    report: dict[str, Any] = {"rank": rank, "world_size": dist.get_world_size(), "error": None}
    try:
        report |= run(mode, roots, mesh)
    except Exception:  # reported, so that the test shows it
        report["error"] = traceback.format_exc()
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
