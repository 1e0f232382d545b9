"""A tiny Lightning training run whose checkpoints go through ckptguard's CheckpointIO.

    python tests/integrations/lightning_driver.py OUT [--steps 30] [--kill-at POINT:N]
        [--unprotected]
        [--top-k K] [--async] [--scramble]

Ten steps an epoch; ModelCheckpoint saves at each epoch's end and keeps every checkpoint
(``OUT/ckpts/step=<n>.ckpt``: Lightning restarts an epoch it resumes in the middle of, so
mid-epoch checkpoints would not resume bit-identically with or without ckptguard); the run
resumes by itself from the newest that verifies, prints ``resumed from step N`` and writes
``OUT/final.json`` (step and weight digests). ``--top-k K`` keeps only the K checkpoints
with the lowest training loss instead (top-k rotation deletes through the plugin). Under
torchrun or ckpt-chaos ``--ranks 2`` it runs DDP on gloo (one process per rank, no
re-launch). ``--async``: ``AtomicCheckpointIO(async_save=True)``; ``--scramble``: the first
batch after the first save records the weights, then changes them in place while the
background write of that save is held back (``OUT/scrambled.json``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import warnings
from typing import Any

import torch
import xxhash

warnings.filterwarnings("ignore")
logging.getLogger("lightning").setLevel(logging.ERROR)
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

import lightning as L  # noqa: E402, N812 - Lightning's own convention
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from ckptguard.integrations.lightning import (  # noqa: E402
    AtomicCheckpointIO,
    last_valid_checkpoint,
)
from driver_faults import kill_at  # noqa: E402


class Tiny(L.LightningModule):
    def __init__(self, *, log_loss: bool = False) -> None:
        super().__init__()
        self.log_loss = log_loss
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1)
        )

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:  # noqa: ARG002
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        if self.log_loss:  # ModelCheckpoint(monitor="train_loss") ranks checkpoints by it
            self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def _digests(module: torch.nn.Module) -> dict[str, str]:
    return {
        k: xxhash.xxh3_64_hexdigest(v.detach().contiguous().numpy().tobytes())
        for k, v in sorted(module.state_dict().items())
    }


class Scramble(L.Callback):
    """See --scramble: the background's first deferred write waits for the change."""

    def __init__(self, out: str) -> None:
        from ckptguard._storage import faults

        self.out = out
        self.changed = threading.Event()
        previous = faults.set_fault_hook(None)

        def hold(name: str) -> None:
            if name == "deferred.write" and not self.changed.wait(120):
                raise RuntimeError("the training loop never changed the weights")
            if previous is not None:
                previous(name)

        faults.set_fault_hook(hold)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        del args
        if self.changed.is_set() or trainer.global_step == 0 or trainer.global_step % 10:
            return
        with open(os.path.join(self.out, "scrambled.json"), "w") as f:
            record = {"step": trainer.global_step, "weights": _digests(pl_module)}
            json.dump(record, f, sort_keys=True)
        with torch.no_grad():
            for p in pl_module.parameters():
                p.add_(1.0)
        self.changed.set()


def _data() -> torch.utils.data.DataLoader[Any]:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(80, 8, generator=g)  # 10 steps an epoch: saves at epoch ends
    ds = torch.utils.data.TensorDataset(x, x.sum(dim=1, keepdim=True))
    return torch.utils.data.DataLoader(ds, batch_size=8, shuffle=False)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--kill-at", default=None)
    ap.add_argument("--unprotected", action="store_true")
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--async", dest="async_save", action="store_true")
    ap.add_argument("--scramble", action="store_true")
    # --dirpath URL: checkpoints on an object store (OUT keeps final.json); --cache DIR.
    ap.add_argument("--dirpath", default=None)
    ap.add_argument("--cache", default=None)
    opts = ap.parse_args()
    if opts.kill_at:
        kill_at(opts.kill_at)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        # Run as one rank of a job launched outside Lightning (torchrun, ckpt-chaos --ranks).
        os.environ.setdefault("LOCAL_WORLD_SIZE", str(world))
        os.environ.setdefault("NODE_RANK", "0")
        os.environ.setdefault("TORCHELASTIC_RUN_ID", "ckptguard-test")
    os.makedirs(opts.out, exist_ok=True)
    ckpts = opts.dirpath or os.path.join(opts.out, "ckpts")
    L.seed_everything(0, workers=True, verbose=False)
    trainer = L.Trainer(
        max_epochs=opts.steps // 10,
        accelerator="cpu",
        devices=world,
        strategy="ddp" if world > 1 else "auto",
        plugins=[]
        if opts.unprotected
        else [AtomicCheckpointIO(cache_dir=opts.cache, async_save=opts.async_save)],
        callbacks=[
            *([Scramble(opts.out)] if opts.scramble else []),
            ModelCheckpoint(
                dirpath=ckpts,
                filename="{step}",
                every_n_epochs=1,
                save_on_train_epoch_end=True,
                save_top_k=-1 if opts.top_k is None else opts.top_k,
                monitor=None if opts.top_k is None else "train_loss",
                mode="min",
            ),
        ],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    resume = last_valid_checkpoint(ckpts, cache_dir=opts.cache)
    if opts.unprotected and os.path.isdir(ckpts):
        names = sorted(os.listdir(ckpts), key=lambda n: int(n.split("=")[1].split(".")[0]))
        resume = os.path.join(ckpts, names[-1]) if names else None
    step = 0 if resume is None else int(os.path.basename(resume).split("=")[1].split(".")[0])
    if trainer.global_rank == 0:
        print(f"resumed from step {step}", flush=True)
    model = Tiny(log_loss=opts.top_k is not None)
    trainer.fit(model, train_dataloaders=_data(), ckpt_path=resume)
    if trainer.global_rank == 0:
        weights = _digests(model)
        with open(os.path.join(opts.out, "final.json"), "w") as f:
            json.dump({"step": trainer.global_step, "weights": weights}, f, sort_keys=True)
    if torch.distributed.is_initialized():
        # torch 2.13 with gloo: work objects that outlive the interpreter's shutdown abort
        # the process ("terminate called without an active exception") after a successful
        # run, now and then (seen with Lightning DDP, which makes no ckptguard exchanges).
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
