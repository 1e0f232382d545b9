"""Save throughput: ckptguard's state writer against safetensors.torch.save_file.

A GPT-like fp32 state dict (tensors from a few KB to tens of MB) is written by each
method in turn, interleaved and with the order rotated every round (this disk is noisy:
only ratios measured in one run mean anything). Two regimes:
- durable: every method fsyncs what it wrote (ckptguard also fsyncs its directory);
- buffered: no fsync anywhere, to isolate the CPU cost of serialization.

Usage: python benchmarks/bench_save.py [--mib 512] [--rounds 9] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import safetensors.torch
import torch

from ckptguard.serialization import write_state
from ckptguard.storage import LocalStorage

if TYPE_CHECKING:
    from collections.abc import Callable


def gpt_like_state(total_mib: int) -> dict[str, torch.Tensor]:
    """~total_mib of fp32 tensors shaped like a small GPT (embeddings, blocks, head)."""
    d = 1024
    vocab = max(1000, (total_mib * 1024 * 1024 // 4 - 12 * 12 * d * d) // d // 2)
    state = {"wte": torch.randn(vocab, d), "wpe": torch.randn(1024, d)}
    layer = 0
    while sum(t.numel() for t in state.values()) * 4 < total_mib * 1024 * 1024 * 0.95:
        p = f"h.{layer}."
        state |= {
            p + "ln_1.weight": torch.randn(d), p + "ln_1.bias": torch.randn(d),
            p + "attn.c_attn.weight": torch.randn(d, 3 * d),
            p + "attn.c_attn.bias": torch.randn(3 * d),
            p + "attn.c_proj.weight": torch.randn(d, d), p + "attn.c_proj.bias": torch.randn(d),
            p + "ln_2.weight": torch.randn(d), p + "ln_2.bias": torch.randn(d),
            p + "mlp.c_fc.weight": torch.randn(d, 4 * d), p + "mlp.c_fc.bias": torch.randn(4 * d),
            p + "mlp.c_proj.weight": torch.randn(4 * d, d), p + "mlp.c_proj.bias": torch.randn(d),
        }  # fmt: skip
        layer += 1
    state["ln_f.weight"] = torch.randn(d)
    return state


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: tmp)")
    args = parser.parse_args()
    state = gpt_like_state(args.mib)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    work = Path(tempfile.mkdtemp(prefix="ckptguard-bench-", dir=args.dir))

    def ckptguard_save(*, durable: bool) -> Callable[[Path], None]:
        storage = LocalStorage(durable=durable)

        def run(out: Path) -> None:
            out.mkdir()
            write_state(str(out), {"model": state}, storage)
            storage.fsync_dir(str(out))

        return run

    def safetensors_save(*, durable: bool) -> Callable[[Path], None]:
        def run(out: Path) -> None:
            out.mkdir()
            safetensors.torch.save_file(state, out / "model.safetensors")
            if durable:
                fsync_path(out / "model.safetensors")

        return run

    methods = {
        "ckptguard (durable)": ckptguard_save(durable=True),
        "safetensors.save_file+fsync": safetensors_save(durable=True),
        "ckptguard (buffered)": ckptguard_save(durable=False),
        "safetensors.save_file (buffered)": safetensors_save(durable=False),
    }
    times: dict[str, list[float]] = {name: [] for name in methods}
    names = list(methods)
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            out = work / f"r{r}-{names.index(name)}"
            start = time.perf_counter()
            methods[name](out)
            times[name].append(time.perf_counter() - start)
            shutil.rmtree(out)
    shutil.rmtree(work)
    print(f"state: {len(state)} tensors, {nbytes / 2**20:.0f} MiB fp32; {args.rounds} rounds")
    print(f"{'method':36} {'median s':>9} {'min':>7} {'max':>7} {'GB/s':>6}")
    result = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        result[name] = {
            "median_s": med,
            "min_s": min(ts),
            "max_s": max(ts),
            "gbps": nbytes / med / 1e9,
        }
        print(f"{name:36} {med:9.3f} {min(ts):7.3f} {max(ts):7.3f} {nbytes / med / 1e9:6.2f}")
    for regime in ("durable", "buffered"):
        ours = next(v for k, v in result.items() if k.startswith("ckptguard") and regime in k)
        theirs = next(
            v
            for k, v in result.items()
            if k.startswith("safetensors")
            and (regime in k or (regime == "durable" and "fsync" in k))
        )
        ratio = theirs["median_s"] / ours["median_s"]
        print(f"{regime}: ckptguard throughput = {ratio:.2f}x safetensors.save_file")
        result[f"ratio_{regime}"] = {"ckptguard_over_safetensors_throughput": ratio}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
