"""CUDA checks of ckptguard's torch paths, for a machine with an NVIDIA GPU (CI has none).

Run under torchrun with one process per GPU (NCCL)::

    torchrun --nproc_per_node=1 benchmarks/gpu_check.py OUT.json

Checks, each bit-exact against a copy taken on the GPU before the save:

1. ``save``/``restore`` of a CUDA model and its Adam state (module and optimizer
   targets): restored tensors land on the GPU, equal to what was saved;
2. ``blocking=False`` (async) saves: ``save`` returns once the state is staged; the
   model is then changed in place on the GPU at once, and the checkpoint must still hold
   the state of the moment of ``save`` (the device-to-host copies finished before it
   returned); also reports how long ``save`` blocked against the full save;
3. FSDP2 (``fully_shard`` over a CUDA device mesh, NCCL) model and optimizer state saved
   with ``save(..., sharded=True)`` (DCP through ckptguard's StorageWriter), restored
   into a differently initialised sharded model with ``set_state_dict``.

Writes a JSON report; exits non-zero if any check fails.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import ckptguard


def _model(seed: int, width: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width)).cuda()


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, width: int) -> None:
    gen = torch.Generator(device="cuda").manual_seed(7)
    for _ in range(steps):
        x = torch.randn(32, width, device="cuda", generator=gen)
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def check_plain(root: Path, width: int) -> dict[str, Any]:
    model = _model(0, width)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    _train(model, opt, 3, width)
    saved = _snapshot(model)
    saved_moment = opt.state_dict()["state"][0]["exp_avg"].clone()
    mgr = ckptguard.CheckpointManager(root, check_environment=False)
    mgr.save(3, {"model": model, "optimizer": opt})
    fresh = _model(1, width)
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=1e-3)
    _train(fresh, fresh_opt, 1, width)
    mgr.restore(target={"model": fresh, "optimizer": fresh_opt})
    restored = _snapshot(fresh)
    moment = fresh_opt.state_dict()["state"][0]["exp_avg"]
    return {
        "bit_exact": _same(saved, restored) and torch.equal(saved_moment, moment),
        "on_cuda": all(v.is_cuda for v in restored.values()) and moment.is_cuda,
        "verified": ckptguard.verify(root / "checkpoint-3").ok,
    }


def check_async(root: Path, width: int) -> dict[str, Any]:
    model = _model(2, width)
    saved = _snapshot(model)
    mgr = ckptguard.CheckpointManager(root, async_save=True, check_environment=False)
    mgr.save(1, {"model": model})  # warm-up: staging buffers allocated
    mgr.wait()
    start = time.perf_counter()
    pending = mgr.save(2, {"model": model})
    blocked = time.perf_counter() - start
    with torch.no_grad():  # at once, on the GPU, while the save is written
        for p in model.parameters():
            p.add_(1.0)
    torch.cuda.synchronize()
    pending.result()
    total = time.perf_counter() - start
    fresh = _model(3, width)
    mgr.restore(step=2, target={"model": fresh})
    mgr.close()
    return {
        "bit_exact_despite_change": _same(saved, _snapshot(fresh)),
        "changed_after_save": not _same(saved, _snapshot(model)),
        "state_mib": sum(v.numel() * v.element_size() for v in saved.values()) / 2**20,
        "save_blocked_s": round(blocked, 4),
        "save_total_s": round(total, 4),
    }


def check_fsdp2(root: Path, width: int) -> dict[str, Any]:
    mesh = init_device_mesh("cuda", (dist.get_world_size(),))

    def build(seed: int) -> tuple[nn.Sequential, torch.optim.Optimizer]:
        model = _model(seed, width)
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3)

    def full(model: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.full_tensor().clone() for k, v in model.state_dict().items()}

    model, opt = build(4)
    _train(model, opt, 2, width)
    saved = full(model)
    msd, osd = get_state_dict(model, opt)
    mgr = ckptguard.CheckpointManager(root, check_environment=False)
    mgr.save(2, {"model": msd, "optim": osd}, sharded=True)
    fresh, fresh_opt = build(5)
    _train(fresh, fresh_opt, 1, width)
    before = full(fresh)
    target_m, target_o = get_state_dict(fresh, fresh_opt)
    mgr.restore(target={"model": target_m, "optim": target_o})  # DCP loads in place
    set_state_dict(fresh, fresh_opt, model_state_dict=target_m, optim_state_dict=target_o)
    after = full(fresh)
    # and training goes on identically from both
    _train(model, opt, 1, width)
    _train(fresh, fresh_opt, 1, width)
    return {
        "differed_before_restore": not _same(saved, before),
        "bit_exact": _same(saved, after),
        "continues_identically": _same(full(model), full(fresh)),
        "verified": ckptguard.verify(root / "checkpoint-2").ok,
        "world_size": dist.get_world_size(),
    }


def main() -> int:
    out = Path(sys.argv[1])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl")
    report: dict[str, Any] = {
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(),
        "cuda": torch.version.cuda,
    }
    base = Path(tempfile.mkdtemp(prefix="ckptguard-gpu-"))
    try:
        if dist.get_rank() == 0:
            report["plain"] = check_plain(base / "plain", 2048)
            report["async"] = check_async(base / "async", 8192)
        dist.barrier()
        report["fsdp2"] = check_fsdp2(base / "fsdp2", 1024)
    except Exception as exc:  # the report says what failed
        report["error"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        if dist.get_rank() == 0:
            out.write_text(json.dumps(report, indent=2))
            print(json.dumps(report, indent=2))
        dist.destroy_process_group()
    flags = [v for part in ("plain", "async", "fsdp2") for k, v in report[part].items()
             if isinstance(v, bool)]  # fmt: skip
    return 0 if all(flags) else 1


if __name__ == "__main__":
    sys.exit(main())
