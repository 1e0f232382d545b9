"""Incremental saves (issue 19): bytes written, disk growth and time per save.

- ``frozen``: a model whose embedding and backbone are frozen (about 90% of its
  parameters) and whose head trains, with AdamW, saved 10 times with a training step
  between, by an incremental manager (the default) and by one with ``incremental=False``,
  interleaved. Per save: the bytes this process wrote (``wchar`` of /proc/self/io), the
  root's growth on disk (blocks of distinct inodes), the save's time; against the bytes
  that changed (the trainable parameters' and the optimizer's files) plus the small files.
- ``worst``: everything trains, so nothing can be reused: the incremental save's time
  against the full save's, interleaved, rotated each round.
- ``trainer``: a ``transformers.Trainer`` fine-tune of a GPT-2 whose embeddings and
  blocks are frozen, saved 5 times: bytes written per save (between two ``on_save``
  callbacks; the first save writes everything) and the disk used, the plain Trainer
  against ``protect(trainer)`` (which puts the frozen weights in a shard of their own
  and links it: ``integrations/_frozen.py``).

Usage: python benchmarks/bench_incremental.py [--only frozen,worst,trainer] [--rounds 7]
       [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import ckptguard

MiB = 1 << 20


def _wchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise RuntimeError("no wchar in /proc/self/io")


def _disk(root: Path) -> int:
    """Bytes the root takes on disk: allocated blocks, each inode counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def _model(*, frozen: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    backbone = [torch.nn.Linear(1024, 1024) for _ in range(4)]
    model = torch.nn.Sequential(
        torch.nn.Embedding(8192, 1024), *backbone, torch.nn.Linear(1024, 512)
    )
    if frozen:  # embedding and backbone: 12.6M of 13.1M parameters... the head trains
        for module in list(model)[:-1]:
            for p in module.parameters():
                p.requires_grad = False
    return model


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, n: int) -> None:
    x = torch.randint(0, 8192, (4,), generator=torch.Generator().manual_seed(n))
    model(x).square().mean().backward()
    opt.step()
    opt.zero_grad()


def bench_frozen(work: Path, saves: int) -> dict[str, Any]:
    model = _model(frozen=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    total = sum(p.numel() * 4 for p in model.parameters())
    trainable = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    roots = {"incremental": work / "inc", "full": work / "full"}
    managers = {
        "incremental": ckptguard.CheckpointManager(roots["incremental"], keep_last=None),
        "full": ckptguard.CheckpointManager(roots["full"], keep_last=None, incremental=False),
    }
    rows: dict[str, list[dict[str, float]]] = {k: [] for k in managers}
    try:
        for n in range(1, saves + 1):
            _step(model, opt, n)
            order = list(managers) if n % 2 else list(reversed(managers))
            for kind in order:
                mgr, root = managers[kind], roots[kind]
                disk, wrote = _disk(root) if root.exists() else 0, _wchar()
                start = time.perf_counter()
                mgr.save(n, {"model": model, "opt": opt, "step": n})
                seconds = time.perf_counter() - start
                ckpt = root / f"checkpoint-{n}"
                changed = sum(
                    (ckpt / f).stat().st_size
                    for f in ("model.safetensors", "opt.safetensors")
                    if (ckpt / f).exists()
                )
                small = sum((ckpt / f).stat().st_size for f in ("state.json", "ckptguard.json"))
                rows[kind].append({
                    "seconds": seconds,
                    "written": _wchar() - wrote,
                    "growth": _disk(root) - disk,
                    "changed": changed,
                    "small": small,
                })  # fmt: skip
    finally:
        for mgr in managers.values():
            mgr.close()
    later = {k: v[1:] for k, v in rows.items()}  # the first save writes everything

    def med(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in later[kind])

    inc = later["incremental"]
    bound = [r["written"] / (r["changed"] + r["small"]) for r in inc]
    return {
        "state_bytes": total,
        "trainable_bytes": trainable,
        "saves": saves,
        "written_per_save": {k: med(k, "written") for k in later},
        "growth_per_save": {k: med(k, "growth") for k in later},
        "seconds_per_save": {k: med(k, "seconds") for k in later},
        "changed_plus_small": statistics.median(r["changed"] + r["small"] for r in inc),
        "written_vs_changed_plus_small_max": max(bound),
        "time_incremental_vs_full": med("incremental", "seconds") / med("full", "seconds"),
        "rows": rows,
    }


def bench_worst(work: Path, rounds: int) -> dict[str, Any]:
    model = _model(frozen=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    managers = {
        "incremental": ckptguard.CheckpointManager(work / "winc", keep_last=2),
        "full": ckptguard.CheckpointManager(work / "wfull", keep_last=2, incremental=False),
    }
    times: dict[str, list[float]] = {k: [] for k in managers}
    try:
        for n in range(1, rounds + 3):
            _step(model, opt, n)
            order = list(managers) if n % 2 else list(reversed(managers))
            for kind in order:
                start = time.perf_counter()
                managers[kind].save(n, {"model": model, "opt": opt, "step": n})
                managers[kind].wait()
                if n > 2:  # two warm-up saves each (the incremental one learns nothing)
                    times[kind].append(time.perf_counter() - start)
    finally:
        for mgr in managers.values():
            mgr.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "seconds_per_save": med,
        "incremental_vs_full": med["incremental"] / med["full"],
        "rounds": rounds,
        "times": times,
    }


def bench_trainer(work: Path, saves: int) -> dict[str, Any]:
    from transformers import (  # noqa: PLC0415 - only this section needs them
        GPT2Config,
        GPT2LMHeadModel,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from ckptguard.integrations.transformers import protect  # noqa: PLC0415

    class Rows(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
        def __init__(self, ids: torch.Tensor) -> None:
            self.ids = ids

        def __len__(self) -> int:
            return len(self.ids)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": self.ids[i], "labels": self.ids[i]}

    steps, every = saves * 2, 2
    ids = torch.randint(0, 8192, (steps * 2, 16), generator=torch.Generator().manual_seed(0))

    class Written(TrainerCallback):
        def __init__(self) -> None:
            self.mark, self.per_save = _wchar(), list[int]()

        def on_save(self, *args: Any, **kwargs: Any) -> None:  # noqa: ARG002
            now = _wchar()
            self.per_save.append(now - self.mark)
            self.mark = now

    out: dict[str, Any] = {}
    for variant in ("plain", "protect"):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(
            GPT2Config(vocab_size=8192, n_positions=32, n_embd=256, n_layer=4, n_head=4)
        )
        for name, p in model.named_parameters():  # a frozen base: only the last block trains
            p.requires_grad_(name.startswith("transformer.h.3."))
        args = TrainingArguments(
            output_dir=str(work / f"trainer-{variant}"), max_steps=steps,
            save_strategy="steps", save_steps=every, per_device_train_batch_size=2,
            use_cpu=True, report_to=[], seed=0, disable_tqdm=True, logging_strategy="no",
        )  # fmt: skip
        written = Written()
        trainer = Trainer(model=model, args=args, train_dataset=Rows(ids), callbacks=[written])
        if variant == "protect":
            trainer = protect(trainer)
        trainer.train()
        out[variant] = {
            "written_per_save": written.per_save,  # the first save writes everything
            "written_later": statistics.median(written.per_save[1:]),
            "disk": _disk(work / f"trainer-{variant}"),
            "checkpoints": len(list((work / f"trainer-{variant}").glob("checkpoint-*"))),
        }
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    out["trainable_bytes"] = trainable
    out["written_protect_vs_plain"] = (
        out["protect"]["written_later"] / out["plain"]["written_later"]
    )
    out["disk_protect_vs_plain"] = out["protect"]["disk"] / out["plain"]["disk"]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="frozen,worst,trainer")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--saves", type=int, default=10)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    sections = set(args.only.split(","))
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "load": os.getloadavg()},
    }  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="bench-incremental-", dir=args.dir))
    try:
        if "frozen" in sections:
            r = results["frozen"] = bench_frozen(work / "frozen", args.saves)
            print(f"frozen 90%: state {r['state_bytes'] / MiB:.1f} MiB, trainable "
                  f"{r['trainable_bytes'] / MiB:.2f} MiB; medians of saves 2..")  # fmt: skip
            for kind in ("incremental", "full"):
                print(f"  {kind:12s} wrote {r['written_per_save'][kind] / MiB:8.2f} MiB  "
                      f"disk +{r['growth_per_save'][kind] / MiB:8.2f} MiB  "
                      f"{r['seconds_per_save'][kind] * 1000:7.1f} ms")  # fmt: skip
            print(f"  changed + small files: {r['changed_plus_small'] / MiB:.2f} MiB; written / "
                  f"that, worst save: {r['written_vs_changed_plus_small_max']:.3f}; time "
                  f"incremental / full: {r['time_incremental_vs_full']:.3f}")  # fmt: skip
        if "worst" in sections:
            r = results["worst"] = bench_worst(work / "worst", args.rounds)
            print(f"worst case (everything trains): incremental / full save time "
                  f"{r['incremental_vs_full']:.3f} ({args.rounds} rounds)")  # fmt: skip
        if "trainer" in sections:
            r = results["trainer"] = bench_trainer(work / "trainer", 5)
            print(f"Trainer, frozen base, 5 saves (trainable {r['trainable_bytes'] / MiB:.2f} "
                  f"MiB): written per save after the first, median: plain "
                  f"{r['plain']['written_later'] / MiB:.2f} MiB, protect "
                  f"{r['protect']['written_later'] / MiB:.2f} MiB "
                  f"({r['written_protect_vs_plain']:.2f}x); first save plain "
                  f"{r['plain']['written_per_save'][0] / MiB:.2f}, protect "
                  f"{r['protect']['written_per_save'][0] / MiB:.2f} MiB; "
                  f"disk {r['disk_protect_vs_plain']:.2f}x")  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["machine"]["load_after"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
