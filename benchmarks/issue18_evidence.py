"""The measurements behind docs/performance.md's "durable save path" section (issue 18).

Each part prints ratios taken in one interleaved run; run it on an otherwise idle machine
(or note the load, which it prints).

- ``unlink``: wall and CPU time of unlinking a 1 GiB file on ``--dir`` (ext4 mounted with
  ``discard`` waits for the discard), and a small fsync right after.
- ``removal``: the sync save with retention's removal inline (as before issue 18) and in
  the background (now), beside raw write+fsync and ``torch.save``+fsync, order rotated.
  Run it under ``strace -f --seccomp-bpf -T -y -e trace=fsync,fdatasync,unlinkat,unlink,
  renameat2,rename`` to see each call's time, as the docs do.
- ``snapshot``: the async save until committed, with the snapshot copied by one memcpy
  (now) or by torch's ``copy_`` (before), against the sync save: wall and CPU seconds.

Usage: python benchmarks/issue18_evidence.py [--only unlink,removal,snapshot] [--mib 512]
       [--rounds 6] [--dir DIR]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from bench_save import fsync_tree, gpt_like_state, raw_write

import ckptguard
from ckptguard._protocol.backend import Backend
from ckptguard._state import serialization

if TYPE_CHECKING:
    from collections.abc import Callable


def cpu() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def unlink_cost(work: Path, rounds: int) -> None:
    block = os.urandom(1 << 20)
    for r in range(rounds):
        path = work / "big"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        for _ in range(1024):
            os.write(fd, block)
        os.fsync(fd)
        os.close(fd)
        before, start = cpu(), time.perf_counter()
        path.unlink()
        wall, after = time.perf_counter() - start, cpu()
        fd = os.open(work / "small", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(fd, b"x" * 100)
        start = time.perf_counter()
        os.fsync(fd)
        small = time.perf_counter() - start
        os.close(fd)
        (work / "small").unlink()
        print(
            f"  round {r}: unlink of 1 GiB {wall * 1e3:.0f} ms (user {after[0] - before[0]:.3f} "
            f"s, sys {after[1] - before[1]:.3f} s); a small fsync after it {small * 1e3:.1f} ms"
        )


def interleaved(
    methods: dict[str, Callable[[Path], Any]], rounds: int, work: Path
) -> dict[str, list[Any]]:
    names = list(methods)
    results: dict[str, list[Any]] = {n: [] for n in names}
    for r in range(rounds + 1):  # round 0 warms up
        k = r % len(names)
        for name in names[k:] + names[:k]:
            out = work / f"out-{r}"
            measured = methods[name](out)
            shutil.rmtree(out, ignore_errors=True)
            if r:
                results[name].append(measured)
    return results


def removal(state: dict[str, torch.Tensor], rounds: int, work: Path) -> None:
    blobs = [t.reshape(-1).view(torch.uint8).numpy().data for t in state.values()]
    steps = itertools.count(1)
    managers = {}
    for kind in ("inline", "background"):
        mgr = ckptguard.CheckpointManager(work / kind, keep_last=2)
        if kind == "inline":  # as before issue 18: the removal inside the save
            inline = functools.partial(Backend.retire, mgr.backend, background=False)
            object.__setattr__(mgr.backend, "retire", inline)
        for _ in range(2):
            mgr.save(next(steps), {"model": state})
        mgr.wait()
        managers[kind] = mgr

    def save(kind: str, out: Path) -> float:
        del out
        start = time.perf_counter()
        managers[kind].save(next(steps), {"model": state})
        took = time.perf_counter() - start
        managers[kind].wait()
        return took

    def raw(out: Path) -> float:
        start = time.perf_counter()
        raw_write(blobs, out, durable=True)
        return time.perf_counter() - start

    def torch_save(out: Path) -> float:
        start = time.perf_counter()
        out.mkdir()
        torch.save(state, out / "model.pt")
        fsync_tree(out)
        return time.perf_counter() - start

    methods: dict[str, Callable[[Path], Any]] = {
        "raw write+fsync": raw,
        "sync save, removal inline (before)": functools.partial(save, "inline"),
        "sync save, removal in the background (now)": functools.partial(save, "background"),
        "torch.save+fsync": torch_save,
    }
    results = interleaved(methods, rounds, work)
    floor = statistics.median(results["raw write+fsync"])
    for name, ts in results.items():
        med = statistics.median(ts)
        print(f"  {name:44} median {med:.3f} s (min {min(ts):.3f}), {med / floor:.2f}x raw")
    for mgr in managers.values():
        mgr.close()


def _torch_copies(dst: Any, src: Any) -> bool:
    """As before issue 18: every tensor copied by torch's ``copy_``."""
    del dst, src
    return False


def snapshot(state: dict[str, torch.Tensor], rounds: int, work: Path) -> None:
    memcpy = serialization._copy_bytes  # noqa: SLF001 - the change being measured
    steps = itertools.count(1)
    kinds = ("sync", "async, memcpy (now)", "async, torch copy_ (before)")
    managers = {
        kind: ckptguard.CheckpointManager(
            work / f"snap-{i}", keep_last=2, async_save=kind != "sync"
        )
        for i, kind in enumerate(kinds)
    }

    def save(kind: str, out: Path) -> tuple[float, float, float]:
        del out
        serialization._copy_bytes = memcpy if "now" in kind else _torch_copies  # noqa: SLF001
        mgr = managers[kind]
        start, before = time.perf_counter(), cpu()
        job = mgr.save(next(steps), {"model": state})
        if kind != "sync":
            job.result()
        wall, after = time.perf_counter() - start, cpu()
        mgr.wait()
        return wall, after[0] - before[0], after[1] - before[1]

    try:
        for mgr in managers.values():  # the steady state: buffers allocated, two checkpoints
            for _ in range(3):
                mgr.save(next(steps), {"model": state})
                mgr.wait()
        results = interleaved({k: functools.partial(save, k) for k in kinds}, rounds, work)
    finally:
        serialization._copy_bytes = memcpy  # noqa: SLF001
    sync_wall = statistics.median(x[0] for x in results["sync"])
    sync_cpu = statistics.median(x[1] + x[2] for x in results["sync"])
    for name, xs in results.items():
        wall = statistics.median(x[0] for x in xs)
        user = statistics.median(x[1] for x in xs)
        sys_ = statistics.median(x[2] for x in xs)
        total = statistics.median(x[1] + x[2] for x in xs)
        print(
            f"  {name:30} until committed {wall:.3f} s ({wall / sync_wall:.2f}x sync), CPU "
            f"{total:.3f} s ({total / sync_cpu:.2f}x; user {user:.3f}, sys {sys_:.3f})"
        )
    for mgr in managers.values():
        mgr.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="unlink,removal,snapshot")
    parser.add_argument("--mib", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    parts = args.only.split(",")
    work = Path(tempfile.mkdtemp(prefix="ckptguard-issue18-", dir=args.dir))
    try:
        state = gpt_like_state(args.mib)
        for part in parts:
            print(f"{part} (load {os.getloadavg()[0]:.1f}; {args.mib} MiB, {args.rounds} rounds)")
            if part == "unlink":
                unlink_cost(work, args.rounds)
            elif part == "removal":
                removal(state, args.rounds, work)
            elif part == "snapshot":
                snapshot(state, args.rounds, work)
        print(f"load at the end {os.getloadavg()[0]:.1f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
