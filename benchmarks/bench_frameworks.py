"""End to end: a GPT-2 of ~30M parameters trained on CPU with and without ckptguard.

Hugging Face ``Trainer`` (40 steps, a save every 10: each checkpoint holds the weights and
the AdamW state, ~0.35 GB) in three variants, each in its own fresh output dir:

- ``Trainer (plain)``: the Trainer as it is (its saves are not even durable);
- ``protect(trainer)``: ckptguard's synchronous, atomic, fsynced saves;
- ``protect(trainer, async_save=True)``: non-blocking saves (issue 18). Where this
  ckptguard's ``protect()`` does not take ``async_save`` (TypeError), the row says
  "not available" and is left out of later rounds.

Then the same shape for Lightning: a ``LightningModule`` wrapping the same model, a
``ModelCheckpoint`` every 10 steps keeping every file (``save_top_k=-1``), with
Lightning's own ``CheckpointIO``, ckptguard's ``AtomicCheckpointIO()`` and
``AtomicCheckpointIO(async_save=True)`` (same "not available" rule).

Every run is a fresh subprocess (nothing cached or allocated carries over); each round
runs every variant once, the order rotated each round. Reported: the wall time of
``train()``/``fit()`` (it includes waiting for an async save in flight at its end), the
CPU seconds of the whole process (every thread, from ``wait4``), the wall time of the
process, medians with min and max and the ratios of medians against the plain run, and
the size of one checkpoint. No download: the model is built from a config with random
weights, the tokens are made in code.

Usage: python benchmarks/bench_frameworks.py [--rounds 3] [--only trainer,lightning]
       [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MiB = 1 << 20
# ~29M parameters: token embeddings 16.8M (tied to the head), 4 blocks of 3.1M, positions
# 33k; a checkpoint with the AdamW state is ~0.35 GB.
MODEL: dict[str, Any] = {
    "vocab_size": 32768,
    "n_positions": 64,
    "n_embd": 512,
    "n_layer": 4,
    "n_head": 8,
}
SEQ, BATCH = 16, 2
NOT_AVAILABLE = "not available"

TRAINER_VARIANTS = {
    "Trainer (plain)": "plain",
    "protect(trainer)": "sync",
    "protect(trainer, async_save=True)": "async",
}
LIGHTNING_VARIANTS = {
    "Lightning (plain CheckpointIO)": "plain",
    "AtomicCheckpointIO()": "sync",
    "AtomicCheckpointIO(async_save=True)": "async",
}


# -- the child: one training run ----------------------------------------------------------
def _quiet() -> None:
    import logging  # noqa: PLC0415
    import warnings  # noqa: PLC0415

    warnings.filterwarnings("ignore")  # third-party deprecations are not measured here
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in ("lightning", "lightning.pytorch", "ckptguard"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _model() -> Any:
    import torch  # noqa: PLC0415
    from transformers import GPT2Config, GPT2LMHeadModel  # noqa: PLC0415

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(**MODEL))


def _tokens(n: int) -> Any:
    import torch  # noqa: PLC0415

    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, MODEL["vocab_size"], (n, SEQ), generator=g)


def _tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _parameters(model: Any) -> Any:
    return model.parameters()


def run_trainer(variant: str, out: Path, steps: int, every: int) -> dict[str, Any]:
    import torch  # noqa: PLC0415
    from transformers import Trainer, TrainingArguments  # noqa: PLC0415

    from ckptguard.integrations.transformers import protect  # noqa: PLC0415

    class Rows(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
        def __init__(self, ids: torch.Tensor) -> None:
            self.ids = ids

        def __len__(self) -> int:
            return len(self.ids)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": self.ids[i], "labels": self.ids[i]}

    args = TrainingArguments(
        output_dir=str(out), max_steps=steps, save_strategy="steps", save_steps=every,
        per_device_train_batch_size=BATCH, use_cpu=True, report_to=[], seed=0, data_seed=0,
        disable_tqdm=True, logging_strategy="no", dataloader_num_workers=0,
    )  # fmt: skip
    trainer = Trainer(model=_model(), args=args, train_dataset=Rows(_tokens(steps * BATCH)))
    if variant == "sync":
        trainer = protect(trainer)
    elif variant == "async":
        try:
            trainer = protect(trainer, async_save=True)
        except TypeError as exc:  # this ckptguard's protect() has no async_save
            return {"status": NOT_AVAILABLE, "reason": str(exc)}
    start, cpu = time.perf_counter(), time.process_time()
    trainer.train()
    train_s, train_cpu = time.perf_counter() - start, time.process_time() - cpu
    checkpoints = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return {
        "status": "ok",
        "train_s": train_s,
        "train_cpu_s": train_cpu,
        "checkpoints": [p.name for p in checkpoints],
        "checkpoint_bytes": _tree_bytes(checkpoints[0]) if checkpoints else 0,
        "params": sum(p.numel() for p in _parameters(trainer.model)),
    }


def run_lightning(variant: str, out: Path, steps: int, every: int) -> dict[str, Any]:
    import lightning as L  # noqa: N812, PLC0415 - Lightning's own convention
    import torch  # noqa: PLC0415
    from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: PLC0415

    from ckptguard.integrations.lightning import AtomicCheckpointIO  # noqa: PLC0415

    class GPT2Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = _model()

        def training_step(self, batch: Any, batch_idx: int) -> Any:  # noqa: ARG002
            (ids,) = batch
            return self.model(input_ids=ids, labels=ids).loss

        def configure_optimizers(self) -> Any:
            return torch.optim.AdamW(self.parameters(), lr=5e-5)  # the Trainer's default

    plugins: list[Any] = []
    if variant == "sync":
        plugins = [AtomicCheckpointIO()]
    elif variant == "async":
        try:
            plugins = [AtomicCheckpointIO(async_save=True)]
        except TypeError as exc:  # this ckptguard's AtomicCheckpointIO has no async_save
            return {"status": NOT_AVAILABLE, "reason": str(exc)}
    L.seed_everything(0, verbose=False)
    ckpts = out / "ckpts"
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, plugins=plugins, logger=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[ModelCheckpoint(dirpath=ckpts, filename="{step}", every_n_train_steps=every,
                                   save_top_k=-1, save_last=False)],
    )  # fmt: skip
    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(_tokens(steps * BATCH)), batch_size=BATCH
    )
    module = GPT2Module()
    start, cpu = time.perf_counter(), time.process_time()
    trainer.fit(module, train_dataloaders=data)
    train_s, train_cpu = time.perf_counter() - start, time.process_time() - cpu
    files = sorted(ckpts.glob("*.ckpt"), key=lambda p: int(p.stem.split("=")[1]))
    return {
        "status": "ok",
        "train_s": train_s,
        "train_cpu_s": train_cpu,
        "checkpoints": [p.name for p in files],
        "checkpoint_bytes": _tree_bytes(files[0]) if files else 0,
        "params": sum(p.numel() for p in module.parameters()),
    }


def child(framework: str, variant: str, out: Path, steps: int, every: int) -> None:
    _quiet()
    run = run_trainer if framework == "trainer" else run_lightning
    result = run(variant, out, steps, every)
    print("RESULT " + json.dumps(result), flush=True)


# -- the parent: interleaved rounds -------------------------------------------------------
def run_child(framework: str, variant: str, out: Path, steps: int, every: int) -> dict[str, Any]:
    """One training run in a fresh process (its result, and the process's wall time)."""
    cmd = [sys.executable, __file__, "--child", framework, variant, str(out),
           "--steps", str(steps), "--save-every", str(every)]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.Popen(  # noqa: S603 - this script, as a child
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{framework}/{variant} failed ({proc.returncode}):\n{stderr[-3000:]}")
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"{framework}/{variant} printed no result:\n{stderr[-3000:]}")
    result: dict[str, Any] = json.loads(lines[-1].removeprefix("RESULT "))
    result["process_s"] = wall
    return result


def _children_cpu() -> float:
    import resource  # noqa: PLC0415

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return float(usage.ru_utime + usage.ru_stime)


def bench(  # noqa: PLR0917 - one section's settings
    framework: str, variants: dict[str, str], rounds: int, work: Path, steps: int, every: int
) -> dict[str, Any]:
    samples: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    unavailable: dict[str, str] = {}
    names = list(variants)
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            if name in unavailable:
                continue
            out = work / f"{framework}-{variants[name]}-{r}"
            # the parent runs one child at a time and reaps it (wait4): the difference in
            # RUSAGE_CHILDREN is that child's CPU, every thread, start-up and exit included
            before = _children_cpu()
            result = run_child(framework, variants[name], out, steps, every)
            result["process_cpu_s"] = _children_cpu() - before
            shutil.rmtree(out, ignore_errors=True)
            if result["status"] == NOT_AVAILABLE:
                unavailable[name] = result["reason"]
                continue
            samples[name].append(result)
        print(f"  {framework} round {r + 1}/{rounds} done", flush=True)
    return summarize(samples, unavailable, names[0])


def summarize(
    samples: dict[str, list[dict[str, Any]]], unavailable: dict[str, str], plain: str
) -> dict[str, Any]:
    def med(name: str, key: str) -> float:
        return float(statistics.median(s[key] for s in samples[name]))

    rows: dict[str, Any] = {}
    for name, runs in samples.items():
        if name in unavailable:
            rows[name] = {"status": NOT_AVAILABLE, "reason": unavailable[name]}
            continue
        train = [s["train_s"] for s in runs]
        rows[name] = {
            "status": "ok",
            "rounds": len(runs),
            "train_median_s": statistics.median(train),
            "train_min_s": min(train),
            "train_max_s": max(train),
            "train_s_each_round": train,
            "process_cpu_s_each_round": [s["process_cpu_s"] for s in runs],
            "train_cpu_median_s": med(name, "train_cpu_s"),
            "process_median_s": med(name, "process_s"),
            "process_cpu_median_s": med(name, "process_cpu_s"),
            "checkpoint_bytes": runs[0]["checkpoint_bytes"],
            "checkpoints": runs[0]["checkpoints"],
            "params": runs[0]["params"],
        }
    base = rows[plain]
    for row in rows.values():
        if row["status"] == "ok":
            row["train_vs_plain"] = row["train_median_s"] / base["train_median_s"]
            row["process_cpu_vs_plain"] = row["process_cpu_median_s"] / base["process_cpu_median_s"]
    return rows


def print_table(title: str, rows: dict[str, Any]) -> None:
    print(f"\n{title}")
    print(
        f"  {'variant':38} {'train s':>8} {'min':>6} {'max':>6} {'x plain':>7} "
        f"{'proc s':>7} {'proc CPU s':>10} {'x plain':>7} {'ckpt MB':>8}"
    )
    for name, row in rows.items():
        if row["status"] != "ok":
            print(f"  {name:38} {NOT_AVAILABLE}")
            continue
        print(
            f"  {name:38} {row['train_median_s']:8.2f} {row['train_min_s']:6.2f} "
            f"{row['train_max_s']:6.2f} {row['train_vs_plain']:7.3f} "
            f"{row['process_median_s']:7.2f} {row['process_cpu_median_s']:10.2f} "
            f"{row['process_cpu_vs_plain']:7.3f} "
            f"{row['checkpoint_bytes'] / 1e6:8.0f}"
        )


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--save-every", type=int, default=10)
    parser.add_argument("--only", default="trainer,lightning")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: tmp)")
    parser.add_argument("--child", nargs=3, metavar=("FRAMEWORK", "VARIANT", "OUT"))
    args = parser.parse_args()
    if args.child:
        framework, variant, out = args.child
        child(framework, variant, Path(out), args.steps, args.save_every)
        return
    import torch  # noqa: PLC0415

    import ckptguard  # noqa: PLC0415

    results: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "ckptguard": ckptguard.__version__,
            "load_before": _load(),
        },
        "model": MODEL | {"seq": SEQ, "batch": BATCH},
        "steps": args.steps,
        "save_every": args.save_every,
        "rounds": args.rounds,
    }
    print(
        f"GPT-2 {MODEL}, {args.steps} steps of {BATCH}x{SEQ} tokens, a save every "
        f"{args.save_every}; {args.rounds} rounds; {os.cpu_count()} CPUs, load {_load()}",
        flush=True,
    )
    work = Path(tempfile.mkdtemp(prefix="ckptguard-frameworks-", dir=args.dir))
    sections = {"trainer": TRAINER_VARIANTS, "lightning": LIGHTNING_VARIANTS}
    try:
        for framework in args.only.split(","):
            results[framework] = bench(
                framework, sections[framework], args.rounds, work, args.steps, args.save_every
            )
            print_table(f"{framework}: train() wall and process CPU", results[framework])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["machine"]["load_after"] = _load()
    print(f"\nload average before {results['machine']['load_before']}, after {_load()}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
