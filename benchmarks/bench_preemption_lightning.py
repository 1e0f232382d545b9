"""Lightning saves on preemption: the time from the signal to the committed checkpoint.

    python benchmarks/bench_preemption_lightning.py [--mib 100] [--rounds 3]
        [--json benchmarks/results/preemption-lightning-latest.json]

A tiny module carrying ``--mib`` MiB of parameters (AdamW: the checkpoint holds about
three times that), ``AtomicCheckpointIO`` and ``SaveOnPreemption``. At the end of step 5
a rank sends itself SIGTERM just before ``SaveOnPreemption`` votes; the time measured runs
from that ``os.kill`` to the moment the preemption line is logged, which is after the
checkpoint is committed (for ``async_save=True``, after the background commit). Cases:
1 process (sync, async), and 2 gloo ranks under torchrun with the signal to rank 1 (rank 0
commits; its line's time minus rank 1's signal time, one host's clock). A fresh process
each round (a signal is a one-shot); median and minimum over ``--rounds``.

Not counted: the rest of the step the signal interrupts (the loop votes at step ends).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
SIGNAL_STEP = 5


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _launch(nproc: int, *args: str) -> list[dict[str, Any]]:
    """Run this script as a child (under torchrun for 2 ranks); its JSON lines."""
    cmd = [sys.executable]
    if nproc > 1:
        cmd += [
            "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
        ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(  # noqa: S603 - this script, as a child
        [*cmd, str(HERE), *args], capture_output=True, text=True, env=env, timeout=600, check=False
    )
    lines: list[dict[str, Any]] = []
    decoder = json.JSONDecoder()
    for text in done.stdout.splitlines():  # two ranks' lines may run together
        at = text.find("{")
        while at != -1:
            value, end = decoder.raw_decode(text, at)
            lines.append(value)
            at = text.find("{", end)
    if len(lines) != nproc:
        raise RuntimeError(f"child failed ({done.returncode}): {done.stderr[-3000:]}")
    return lines


def _child(mib: int, async_save: bool, signal_rank: int) -> None:  # noqa: FBT001
    import lightning as L  # noqa: N812, PLC0415 - Lightning's own convention
    import torch  # noqa: PLC0415

    from ckptguard.integrations.lightning import (  # noqa: PLC0415
        AtomicCheckpointIO,
        SaveOnPreemption,
    )

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        os.environ.setdefault("LOCAL_WORLD_SIZE", str(world))
        os.environ.setdefault("NODE_RANK", "0")
        os.environ.setdefault("TORCHELASTIC_RUN_ID", "ckptguard-bench")
    rank = int(os.environ.get("RANK", "0"))
    times: dict[str, float] = {}

    class LineTime(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("preempted by"):
                times["line_at"] = time.time()

    logging.getLogger("ckptguard.preemption").addHandler(LineTime())

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(8, 1)
            self.bulk = torch.nn.Parameter(torch.zeros(mib * 2**20 // 4))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:  # noqa: ARG002
            x = batch[0]
            loss: torch.Tensor = self.net(x).pow(2).mean() + self.bulk[:8].sum() * 0.0
            return loss

        def configure_optimizers(self) -> Any:
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    class Signal(L.Callback):
        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            del args
            if trainer.global_step == SIGNAL_STEP and trainer.global_rank == signal_rank:
                times["signal_at"] = time.time()
                os.kill(os.getpid(), signal.SIGTERM)

    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as out:
        trainer = L.Trainer(
            max_steps=50, accelerator="cpu", devices=world,
            strategy="ddp" if world > 1 else "auto",
            plugins=[AtomicCheckpointIO(async_save=async_save)],
            callbacks=[Signal(), SaveOnPreemption(dirpath=out)],
            logger=False, enable_progress_bar=False, enable_model_summary=False,
            enable_checkpointing=False,
        )  # fmt: skip
        data = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(torch.randn(800, 8)), batch_size=8
        )
        code = 0
        try:
            trainer.fit(Module(), train_dataloaders=data)
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else 1
        print(json.dumps({"rank": rank, "code": code, **times}), flush=True)
    sys.stdout.flush()
    os._exit(code)  # with a gloo group up: no interpreter shutdown (see the test drivers)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--async", dest="async_save", action="store_true")
    ap.add_argument("--signal-rank", type=int, default=0)
    opts = ap.parse_args()
    if opts.child:
        _child(opts.mib, opts.async_save, opts.signal_rank)
        return
    cases = {
        "1 process, sync": (1, []),
        "1 process, async_save=True": (1, ["--async"]),
        "2 ranks, sync, SIGTERM to rank 1": (2, ["--signal-rank", "1"]),
    }
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for r in range(opts.rounds):
        order = list(cases)[r % len(cases) :] + list(cases)[: r % len(cases)]  # rotated
        for name in order:
            nproc, extra = cases[name]
            lines = _launch(nproc, "--child", "--mib", str(opts.mib), *extra)
            if sorted(line["code"] for line in lines) != [75] * nproc:
                raise RuntimeError(f"{name}: exit codes {lines}")
            signalled = next(line["signal_at"] for line in lines if "signal_at" in line)
            committed = next(line["line_at"] for line in lines if line["rank"] == 0)
            samples[name].append(committed - signalled)
    result = {
        "mib": opts.mib,
        "rounds": opts.rounds,
        "seconds": {
            name: {"median": statistics.median(s), "min": min(s), "all": s}
            for name, s in samples.items()
        },
    }
    for name, s in samples.items():
        print(f"{name:36s} signal->committed median {statistics.median(s):.3f} s, "
              f"min {min(s):.3f} s ({len(s)} rounds, {opts.mib} MiB of parameters)")  # fmt: skip
    if opts.json:
        Path(opts.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
