"""A tiny Lightning run that a preemption signal stops (``SaveOnPreemption``).

    python tests/integrations/preempt_lightning_driver.py OUT [--steps 12]
        [--signal-at STEP | --signal-in-sanity] [--signal-rank R] [--announce]
        [--no-callback] [--async [--slow-commit]] [--devices N]

One epoch of ``--steps`` optimizer steps; ``ModelCheckpoint`` (``OUT/ckpts``) saves only
at the epoch's end, so a checkpoint of a step inside the epoch comes from the preemption
save. Each step's batch is drawn from a generator seeded by the global step and the rank
(not from the data loader's position): a run resumed mid-epoch sees the same batches as an
uninterrupted one (Lightning restarts a non-stateful loader's epoch on resume). The run
resumes from the newest checkpoint that verifies (prints ``resumed from step N``).

``--signal-at K``: rank ``--signal-rank`` sends itself SIGTERM at the end of step K,
before ``SaveOnPreemption`` votes; ``--signal-in-sanity``: in the first batch of the
sanity-check validation instead. ``--announce``: rank 0 prints ``step N`` after each
step and sleeps 0.1 s, for a signal sent from outside. ``--no-callback``: Lightning alone
(the control). ``--devices N``: DDP on gloo with N processes that Lightning launches
itself (the first is this one), without torchrun. ``--slow-commit``: each background write
starts 1 s late, and the process prints whether the checkpoint the preemption line names
exists when the line is logged. Rank 0 writes ``OUT/steps.json`` (each
step's weight digest, and the first step trained) and, when ``fit`` returns,
``OUT/final.json`` (and prints the SIGTERM handler then in place).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
import warnings
from typing import Any

import torch
import xxhash

warnings.filterwarnings("ignore")
import lightning as L  # noqa: E402, N812 - Lightning's own convention
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from ckptguard.integrations.lightning import (  # noqa: E402
    AtomicCheckpointIO,
    SaveOnPreemption,
    last_valid_checkpoint,
)

STEPS_NAME = "steps.json"


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1)
        )
        self.first_step: int | None = None

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:  # noqa: ARG002
        if self.first_step is None:
            self.first_step = int(self.trainer.global_step) + 1
        g = torch.Generator().manual_seed(1000 * self.trainer.global_step + self.global_rank)
        x = torch.randn(8, 8, generator=g)
        return torch.nn.functional.mse_loss(self.net(x), x.sum(dim=1, keepdim=True))

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


class Validated(Tiny):
    """``--signal-in-sanity``: rank ``signal_rank`` sends itself SIGTERM in the sanity check."""

    def __init__(self, signal_rank: int) -> None:
        super().__init__()
        self.signal_rank = signal_rank

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        if self.trainer.sanity_checking and batch_idx == 0 and self.global_rank == self.signal_rank:
            print("signal in the sanity check", flush=True)
            os.kill(os.getpid(), signal.SIGTERM)
        self.net(batch[0])


def digests(module: torch.nn.Module) -> dict[str, str]:
    return {
        k: xxhash.xxh3_64_hexdigest(v.detach().contiguous().numpy().tobytes())
        for k, v in sorted(module.state_dict().items())
    }


class Record(L.Callback):
    """Rank 0: each step's weights; the self-signal of ``--signal-at``; ``--announce``."""

    def __init__(self, out: str, signal_at: int | None, signal_rank: int, announce: bool) -> None:
        self.out = out
        self.signal_at = signal_at
        self.signal_rank = signal_rank
        self.announce = announce
        self.steps: dict[str, Any] = {}

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        del args
        step = int(trainer.global_step)
        if trainer.global_rank == 0:
            self.steps[str(step)] = digests(pl_module)
            with open(os.path.join(self.out, STEPS_NAME), "w") as f:
                json.dump({"first": pl_module.first_step, "weights": self.steps}, f)
            if self.announce:
                print(f"step {step}", flush=True)
                time.sleep(0.1)
        if step == self.signal_at and trainer.global_rank == self.signal_rank:
            os.kill(os.getpid(), signal.SIGTERM)


class FileAtLine(logging.Handler):
    """Prints whether the file the preemption line names exists when the line is logged."""

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("preempted by") and ": committed " in message:
            path = message.split(": committed ", 1)[1].split(";", 1)[0]
            print(f"at the line: exists={os.path.exists(path)}", flush=True)


def slow_commit() -> None:
    """``--slow-commit``: each background write starts 1 s late; see ``FileAtLine``."""
    from ckptguard._storage import faults

    def hook(name: str) -> None:
        if name == "deferred.write":
            time.sleep(1.0)

    faults.set_fault_hook(hook)
    logging.getLogger("ckptguard.preemption").addHandler(FileAtLine())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--signal-at", type=int, default=None)
    ap.add_argument("--signal-rank", type=int, default=0)
    ap.add_argument("--announce", action="store_true")
    ap.add_argument("--signal-in-sanity", action="store_true")
    ap.add_argument("--no-callback", action="store_true")
    ap.add_argument("--async", dest="async_save", action="store_true")
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--slow-commit", action="store_true")
    opts = ap.parse_args()
    if opts.slow_commit:
        slow_commit()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    devices = world if world > 1 else opts.devices
    if world > 1 and "RANK" in os.environ:  # a rank of torchrun's (no re-launch by Lightning)
        os.environ.setdefault("LOCAL_WORLD_SIZE", str(world))
        os.environ.setdefault("NODE_RANK", "0")
        os.environ.setdefault("TORCHELASTIC_RUN_ID", "ckptguard-test")
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))  # torchrun's, Lightning's
    logging.basicConfig(level=logging.WARNING, format=f"rank{rank}: %(message)s")
    os.makedirs(opts.out, exist_ok=True)
    ckpts = os.path.join(opts.out, "ckpts")
    L.seed_everything(0, verbose=False)
    record = Record(opts.out, opts.signal_at, opts.signal_rank, opts.announce)
    trainer = L.Trainer(
        max_epochs=1,
        max_steps=opts.steps,
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        plugins=[AtomicCheckpointIO(async_save=opts.async_save)],
        callbacks=[
            record,
            *([] if opts.no_callback else [SaveOnPreemption()]),
            ModelCheckpoint(dirpath=ckpts, save_top_k=-1, save_on_train_epoch_end=True),
        ],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    resume = last_valid_checkpoint(ckpts)
    if rank == 0:
        step = 0 if resume is None else int(torch.load(resume, weights_only=True)["global_step"])
        print(f"resumed from step {step}", flush=True)
    model = Validated(opts.signal_rank) if opts.signal_in_sanity else Tiny()
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(8 * 1000, 1)),
                                       batch_size=8)  # fmt: skip
    val = None
    if opts.signal_in_sanity:
        val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(16, 8)),
                                          batch_size=8)  # fmt: skip
    trainer.fit(model, train_dataloaders=data, val_dataloaders=val, ckpt_path=resume)
    if rank == 0:
        print(f"SIGTERM after fit: {signal.getsignal(signal.SIGTERM)!r}", flush=True)
        with open(os.path.join(opts.out, "final.json"), "w") as f:
            json.dump({"step": trainer.global_step, "weights": digests(model)}, f, sort_keys=True)
    return 0


def _exit(code: int) -> None:
    """Exit; with a gloo group up, without the interpreter's shutdown (``hf_driver._exit``)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 and "--devices" not in sys.argv:
        sys.exit(main())  # a plain script: SaveOnPreemption's SystemExit(75) is its exit
    try:
        _exit(main())
    except SystemExit as done:
        code = done.code  # None: Lightning's SIGTERMException, a plain exit
        _exit(0 if code is None else code if isinstance(code, int) else 1)
