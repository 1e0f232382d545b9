"""A tiny Accelerate training loop protected by ckptguard.

    python tests/integrations/accel_driver.py OUT [--steps 30] [--save-every 10] [--limit N]
        [--kill-at POINT:N] [--unprotected]

Saves with ``save_state()`` (automatic checkpoint naming: ``OUT/checkpoints/checkpoint_<i>``),
resumes by itself with ``load_state()`` (the newest checkpoint that verifies) and prints
``resumed from step I`` (I: the number of the checkpoint loaded, or ``none``); writes
``OUT/final.json`` (step and weight digests). Run by torchrun or ckpt-chaos ``--ranks 2``
it trains data-parallel on gloo.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

import torch
import xxhash
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed

from ckptguard._errors import NoValidCheckpoint
from ckptguard.integrations.accelerate import protect
from driver_faults import kill_at

warnings.filterwarnings("ignore")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--save-every", type=int, default=10)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--kill-at", default=None)
    ap.add_argument("--unprotected", action="store_true")
    # Object stores: --project URL (checkpoints there; OUT keeps final.json), or --mirror URL.
    ap.add_argument("--project", default=None)
    ap.add_argument("--mirror", default=None)
    ap.add_argument("--cache", default=None)
    opts = ap.parse_args()
    if opts.kill_at:
        kill_at(opts.kill_at)
    os.makedirs(opts.out, exist_ok=True)
    accelerator = Accelerator(
        cpu=True,
        project_config=ProjectConfiguration(
            project_dir=opts.project or opts.out,
            automatic_checkpoint_naming=True,
            total_limit=opts.limit,
        ),
    )
    if opts.project or opts.mirror:
        protect(accelerator, mirror=opts.mirror, cache_dir=opts.cache)
    elif not opts.unprotected:
        protect(accelerator)
    set_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)
    model, opt, sched = accelerator.prepare(model, opt, sched)

    step = 0
    loaded = "none"
    try:
        accelerator.load_state()
        # checkpoint_<i> holds step (i + 1) * save_every; print i, the number in its name,
        # which is what ckpt-chaos compares with the newest complete checkpoint_<i>.
        loaded = str(accelerator.project_configuration.iteration - 1)
        step = accelerator.project_configuration.iteration * opts.save_every
    except (NoValidCheckpoint, FileNotFoundError, IndexError):
        step = 0
    if accelerator.is_main_process:
        print(f"resumed from step {loaded} (checkpoint number; training step {step})", flush=True)
    while step < opts.steps:
        g = torch.Generator().manual_seed(1000 * step + accelerator.process_index)
        x = torch.randn(16, 8, generator=g)
        y = x.sum(dim=1, keepdim=True)
        loss = torch.nn.functional.mse_loss(model(x), y)
        accelerator.backward(loss)
        opt.step()
        sched.step()
        opt.zero_grad()
        step += 1
        if step % opts.save_every == 0:
            accelerator.save_state()
    if accelerator.is_main_process:
        weights = {
            k: xxhash.xxh3_64_hexdigest(v.detach().contiguous().numpy().tobytes())
            for k, v in sorted(accelerator.unwrap_model(model).state_dict().items())
        }
        with open(os.path.join(opts.out, "final.json"), "w") as f:
            json.dump({"step": step, "weights": weights}, f, sort_keys=True)
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
