"""Child of test_fsdp.py, run by torchrun (gloo on CPU): FSDP2 training saved through ckptguard.

Usage: torchrun ... fsdp_child.py MODE OUT ROOT [ROOT ...]
  save     2 ranks: a reference run of STEPS steps with no checkpointing; then a second,
           identical run that saves model and optimizer state (``get_state_dict``) through
           ``CheckpointManager.save(..., sharded=True)`` on every root after step SAVE_AT
           and trains on to STEPS; then, on every root, a save that fails on rank 1 (it must
           abort everywhere). Writes OUT/reference.pt (full parameters and optimizer state
           after SAVE_AT and after STEPS, the losses), OUT/saving.pt (the same for the
           saving run).
  resume   any number of ranks, for the K-th root: a model initialised differently
           restores the newest checkpoint into its ``get_state_dict`` target,
           ``set_state_dict``, and, with the world size it was saved with, trains on to
           STEPS. Writes OUT/resume-W-K.pt (full state before and after the load and after
           training, the losses).
An object-store root's storage options come from CKPTGUARD_STORAGE_OPTIONS.
Each rank also writes OUT/rankR.json: aborted saves, the step restored, the world size.

Every Linear is ``fully_shard``-ed, then the root. The data of step s on rank r comes from a
generator seeded with (s, r), so that runs are comparable bit for bit. Full tensors are
gathered with ``DTensor.full_tensor()`` on every rank and saved by rank 0.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import ckptguard

STEPS = 6
SAVE_AT = 3
SAVED_WORLD = 2
DIM = 24  # not a multiple of 4 ranks' shards of every tensor: uneven shards too
BATCH = 8


def build(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(DIM, 2 * DIM), nn.ReLU(), nn.Linear(2 * DIM, DIM + 3), nn.ReLU(),
        nn.Linear(DIM + 3, 1),
    )  # fmt: skip
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    return model, optim


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(BATCH, DIM, generator=g)
    return x, x.sum(dim=1, keepdim=True).sin()


def train_step(model: nn.Module, optim: torch.optim.Optimizer, step: int) -> float:
    x, y = batch(step, dist.get_rank())
    loss = (model(x) - y).pow(2).mean()
    loss.backward()
    optim.step()
    optim.zero_grad()
    return float(loss.item())


def full(value: Any) -> Any:
    """A state dict with every DTensor gathered (a collective: every rank calls it)."""
    if isinstance(value, DTensor):
        return value.full_tensor().clone()
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: full(v) for k, v in value.items()}
    if isinstance(value, list):
        return [full(v) for v in value]
    return value


def snapshot(model: nn.Module, optim: torch.optim.Optimizer) -> dict[str, Any]:
    msd, osd = get_state_dict(model, optim)
    return {"model": full(msd), "optim": full(osd)}


def save(roots: list[str], out: Path) -> dict[str, Any]:
    rank = dist.get_rank()
    model, optim = build(seed=0)
    ref_losses, ref_at_save = [], None
    for step in range(1, STEPS + 1):
        ref_losses.append(train_step(model, optim, step))
        if step == SAVE_AT:
            ref_at_save = snapshot(model, optim)
    reference = {"losses": ref_losses, "at_save": ref_at_save, "end": snapshot(model, optim)}

    managers = [ckptguard.CheckpointManager(root, keep_last=None) for root in roots]
    model, optim = build(seed=0)
    losses, at_save, saved = [], None, []
    for step in range(1, STEPS + 1):
        losses.append(train_step(model, optim, step))
        if step == SAVE_AT:
            msd, osd = get_state_dict(model, optim)
            for mgr in managers:
                info = mgr.save(step, {"model": msd, "optim": osd}, sharded=True, blocking=True)
                saved.append({"step": info.step, "valid": info.valid})
            at_save = snapshot(model, optim)
    saving = {"losses": losses, "at_save": at_save, "end": snapshot(model, optim)}

    # A save that fails on rank 1 only (DCP cannot pickle a lambda): aborted on every rank.
    aborted = []
    msd, osd = get_state_dict(model, optim)
    bad = {"model": msd, "optim": osd, "extra": {"hook": (lambda: 0) if rank == 1 else 0}}
    for mgr in managers:
        try:
            mgr.save(STEPS, bad, sharded=True)
        except ckptguard.SaveAborted as exc:
            aborted.append({str(k): v for k, v in exc.failures.items()})
        else:
            aborted.append({})
        mgr.close()
    if rank == 0:
        torch.save(reference, out / "reference.pt")
        torch.save(saving, out / "saving.pt")
    return {"aborted": aborted, "saved": saved}


def resume(roots: list[str], out: Path) -> dict[str, Any]:
    world = dist.get_world_size()
    restored = []
    for index, root in enumerate(roots):
        model, optim = build(seed=1)  # other weights: the load must overwrite every one
        before = snapshot(model, optim)
        msd, osd = get_state_dict(model, optim)
        target: dict[str, Any] = {"model": msd, "optim": osd}
        with ckptguard.CheckpointManager(root, keep_last=None) as mgr:
            info = mgr.latest()
            assert info is not None
            mgr.restore(target=target)
        set_state_dict(
            model, optim, model_state_dict=target["model"], optim_state_dict=target["optim"]
        )
        loaded = snapshot(model, optim)
        losses = []
        if world == SAVED_WORLD:  # the same data split: training continues bit for bit
            losses = [train_step(model, optim, s) for s in range(info.step + 1, STEPS + 1)]
        result = {"step": info.step, "before": before, "loaded": loaded, "losses": losses}
        result["end"] = snapshot(model, optim)
        if dist.get_rank() == 0:
            torch.save(result, out / f"resume-{world}-{index}.pt")
        restored.append(info.step)
    return {"restored_steps": restored}


def main() -> None:
    mode, out, roots = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    torch.use_deterministic_algorithms(True)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    # An exception ends this rank with a traceback; torchrun then stops the job.
    report = save(roots, out) if mode == "save" else resume(roots, out)
    report |= {"rank": rank, "world_size": dist.get_world_size()}
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
