"""A tiny Accelerate training loop protected by ckptguard.

    python tests/integrations/accel_driver.py OUT [--steps 30] [--save-every 10] [--limit N]
        [--kill-at POINT:N] [--unprotected] [--async] [--width W] [--explicit] [--scramble]

Saves with ``save_state()`` (automatic checkpoint naming: ``OUT/checkpoints/checkpoint_<i>``),
resumes by itself with ``load_state()`` (the newest checkpoint that verifies) and prints
``resumed from step I`` (I: the number of the checkpoint loaded, or ``none``); writes
``OUT/final.json`` (step and weight digests). Run by torchrun or ckpt-chaos ``--ranks 2``
it trains data-parallel on gloo. ``--async``: ``protect(accelerator, async_save=True)``;
``--width``: the hidden layer's width (a wider one has tensors big enough to be deferred);
``--explicit``: no automatic naming, each save is ``save_state(OUT/explicit/step_N)`` (and
nothing is resumed); ``--scramble``: right
after the first save returns, record the weights, then change them in place while the
background write is held back (``OUT/scrambled.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import warnings

import torch
import xxhash
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed

from ckptguard._errors import NoValidCheckpoint
from ckptguard.integrations.accelerate import protect, wait
from driver_faults import kill_at

warnings.filterwarnings("ignore")


def _digests(model: torch.nn.Module) -> dict[str, str]:
    return {
        k: xxhash.xxh3_64_hexdigest(v.detach().contiguous().numpy().tobytes())
        for k, v in sorted(model.state_dict().items())
    }


def _hold_first_deferred_write() -> threading.Event:
    """The background's first deferred write waits until the returned event is set."""
    from ckptguard._storage import faults

    changed = threading.Event()
    previous = faults.set_fault_hook(None)

    def hold(name: str) -> None:
        if name == "deferred.write" and not changed.wait(120):
            raise RuntimeError("the training loop never changed the weights")
        if previous is not None:
            previous(name)

    faults.set_fault_hook(hold)
    return changed


def _scramble(model: torch.nn.Module, out: str, step: int) -> None:
    with open(os.path.join(out, "scrambled.json"), "w") as f:
        json.dump({"step": step, "weights": _digests(model)}, f, sort_keys=True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--save-every", type=int, default=10)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--kill-at", default=None)
    ap.add_argument("--unprotected", action="store_true")
    ap.add_argument("--async", dest="async_save", action="store_true")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--explicit", action="store_true")
    ap.add_argument("--scramble", action="store_true")
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
            automatic_checkpoint_naming=not opts.explicit,
            total_limit=opts.limit,
        ),
    )
    if opts.project or opts.mirror:
        protect(accelerator, mirror=opts.mirror, cache_dir=opts.cache)
    elif not opts.unprotected:
        protect(accelerator, async_save=opts.async_save)
    held = _hold_first_deferred_write() if opts.scramble else None
    set_seed(0)
    width = opts.width
    model = torch.nn.Sequential(
        torch.nn.Linear(8, width), torch.nn.ReLU(), torch.nn.Linear(width, 1)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)
    model, opt, sched = accelerator.prepare(model, opt, sched)

    step = 0
    loaded = "none"
    try:
        if opts.explicit:
            raise NoValidCheckpoint("--explicit: no resume")  # noqa: TRY301 - the same path
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
            if opts.explicit:
                accelerator.save_state(os.path.join(opts.out, "explicit", f"step_{step}"))
            else:
                accelerator.save_state()
            if held is not None and not held.is_set():
                _scramble(accelerator.unwrap_model(model), opts.out, step)
                held.set()
    if opts.async_save:
        wait(accelerator)  # a failed background save raises here
    if accelerator.is_main_process:
        weights = _digests(accelerator.unwrap_model(model))
        with open(os.path.join(opts.out, "final.json"), "w") as f:
            json.dump({"step": step, "weights": weights}, f, sort_keys=True)
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
