"""ckptguard against the other ways to checkpoint, in one run, interleaved.

A GPT-like fp32 state dict (~1 GiB by default: ~200 tensors from 4 KiB to ~160 MiB) is
saved and restored by each method in turn; every round runs every method once, the order
rotated each round so that no method always follows another (this disk is noisy: only
ratios taken in one run mean anything). Medians, with min and max.

Sections (``--only`` picks some):
- ``save``: durable saves. The floor is os.write of the same bytes + one fsync;
  torch.save+fsync, safetensors save_file+fsync, torch.distributed.checkpoint save and
  async_save (its writer fsyncs), ckptguard sync and async (until committed).
- ``cpu``: the same without any fsync, to isolate the CPU cost of a save.
- ``stall``: how long the training thread is blocked by an async save: a memcpy of the
  same bytes into preallocated buffers (the floor), dcp.async_save, ckptguard async.
- ``restore``: cold reads (the page cache of the files dropped before each): the floor is
  preadv of the same bytes into the existing tensors; torch.load, safetensors load_file,
  dcp.load (into the existing tensors), ckptguard's verified restore into them.
- ``memory``: peak RSS beyond what the process held before (VmHWM reset through
  /proc/self/clear_refs) for a sync save, an async save and a verified restore; and RSS
  over 100 consecutive async saves (``--growth-mib`` state, fsync off to keep it short).
- ``trainer``: the Hugging Face Trainer's own ``_save_checkpoint`` against the same under
  ``protect(trainer)``, and against the Trainer's save followed by an fsync of its files.

Usage: python benchmarks/bench_save.py [--mib 1024] [--rounds 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import logging
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safetensors.torch
import torch

import ckptguard
from ckptguard._storage.local import LocalStorage

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

MiB = 1 << 20


def gpt_like_state(total_mib: int, d: int = 1024) -> dict[str, torch.Tensor]:
    """~total_mib of fp32 tensors shaped like a GPT: embeddings, blocks, head norm.

    The token embedding is ~15% of the whole (~160 MiB at 1 GiB); each block has 12
    tensors, from 4 KiB (layer norms) to 16 MiB (MLP weights) at d=1024.
    """
    gen = torch.Generator().manual_seed(0)
    target = total_mib * MiB // 4  # elements
    vocab = max(256, int(target * 0.155) // d)
    state = {"wte.weight": torch.empty(vocab, d), "wpe.weight": torch.empty(1024, d)}
    layer = 0
    while sum(t.numel() for t in state.values()) + 12 * d * d <= target:
        p = f"h.{layer}."
        state |= {
            p + "ln_1.weight": torch.empty(d), p + "ln_1.bias": torch.empty(d),
            p + "attn.c_attn.weight": torch.empty(d, 3 * d),
            p + "attn.c_attn.bias": torch.empty(3 * d),
            p + "attn.c_proj.weight": torch.empty(d, d), p + "attn.c_proj.bias": torch.empty(d),
            p + "ln_2.weight": torch.empty(d), p + "ln_2.bias": torch.empty(d),
            p + "mlp.c_fc.weight": torch.empty(d, 4 * d), p + "mlp.c_fc.bias": torch.empty(4 * d),
            p + "mlp.c_proj.weight": torch.empty(4 * d, d), p + "mlp.c_proj.bias": torch.empty(d),
        }  # fmt: skip
        layer += 1
    state["ln_f.weight"] = torch.empty(d)
    for t in state.values():
        t.normal_(generator=gen)
    return state


def nbytes_of(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def fsync_tree(path: Path) -> None:
    """fsync every file under ``path`` and the directories (what a durable save needs)."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def drop_cache(path: Path) -> None:
    """Evict the (clean, fsynced) pages of every file under ``path`` from the page cache."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _status(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field_name)


def reset_peak() -> int:
    """Reset the peak RSS (VmHWM) to the current RSS; returns the current RSS."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def peak_rss() -> int:
    return _status("VmHWM")


class PeakSampler:
    """The highest RSS seen: VmHWM, and a thread reading /proc/self/statm every ~1 ms
    (VmHWM alone can miss a peak whose memory was unmapped before it was read)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._page = os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        with open("/proc/self/statm") as f:
            while not self._stop.is_set():
                f.seek(0)
                self.peak = max(self.peak, int(f.read().split()[1]) * self._page)
                time.sleep(0.001)

    def __enter__(self) -> PeakSampler:
        self.before = reset_peak()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.extra = max(self.peak, peak_rss()) - self.before


@dataclass
class Timings:
    """Seconds per method, in the order each was first seen."""

    samples: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)

    def add(self, name: str, seconds: float, cpu_seconds: float | None = None) -> None:
        self.samples.setdefault(name, []).append(seconds)
        if cpu_seconds is not None:
            self.cpu.setdefault(name, []).append(cpu_seconds)

    def median(self, name: str) -> float:
        return statistics.median(self.samples[name])

    def summary(self, nbytes: int) -> dict[str, dict[str, float]]:
        return {
            name: {
                "median_s": statistics.median(ts),
                "min_s": min(ts),
                "max_s": max(ts),
                "gb_per_s": nbytes / statistics.median(ts) / 1e9,
                "rounds": len(ts),
                **(
                    {"cpu_median_s": statistics.median(self.cpu[name])}
                    if self.cpu.get(name)
                    else {}
                ),
            }
            for name, ts in self.samples.items()
        }


def cpu_now() -> float:
    """CPU seconds of this process so far, every thread, user and kernel."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True)
class Measured:
    """What a method measured itself (leaving out its own clean-up)."""

    wall: float
    cpu: float


def interleave(
    methods: dict[str, Callable[[Path], Measured | float | None]],
    rounds: int,
    work: Path,
    timings: Timings,
    label: str = "round",
) -> None:
    """Run every method once per round, the order rotated.

    Wall and CPU time of each call, unless the method returns its own measurement
    (seconds of wall time, or a :class:`Measured`). Its output is removed afterwards.
    """
    names = list(methods)
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            out = work / f"{label}{r}-{names.index(name)}"
            start, cpu_start = time.perf_counter(), cpu_now()
            measured = methods[name](out)
            elapsed, cpu = time.perf_counter() - start, cpu_now() - cpu_start
            if isinstance(measured, Measured):
                timings.add(name, measured.wall, measured.cpu)
            else:
                timings.add(name, elapsed if measured is None else measured, cpu)
            shutil.rmtree(out, ignore_errors=True)
        print(f"  {label} {r + 1}/{rounds} done", flush=True)


def raw_write(blobs: list[memoryview], out: Path, *, durable: bool) -> None:
    """The floor: the same bytes, os.write per tensor into one file, one fsync."""
    out.mkdir()
    fd = os.open(out / "raw.bin", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for blob in blobs:
            view = blob
            while view:
                view = view[os.write(fd, view) :]
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)


# -- the sections ---------------------------------------------------------------------------
KEEP_LAST = 2  # retention as in training: every timed save retires the checkpoint before last


def ckptguard_savers(
    state: dict[str, torch.Tensor], work: Path, storage: LocalStorage, stalls: Timings
) -> tuple[Any, Any, Callable[[Path], Measured], Callable[[Path], Measured]]:
    """A sync and an async manager, each saving as a training run does.

    One manager of each kind for the whole run: the async one allocates its staging
    buffers at its first save and reuses them (the steady state). Retention runs inside
    every save (``keep_last=2`` on a root that holds two earlier checkpoints, so each
    timed save retires one). The sync save is timed until it returns, the async one
    until its commit (``PendingSave.result``); the removal of the retired checkpoint,
    which runs in the background after that, is waited for outside the timing and
    recorded as its own row.
    """
    steps = itertools.count(1)
    managers = []
    for kind in ("sync", "async"):
        mgr = ckptguard.CheckpointManager(
            work / f"cg-{kind}", keep_last=KEEP_LAST, storage=storage, async_save=kind == "async"
        )
        for _ in range(KEEP_LAST):  # the earlier checkpoints that retention finds
            mgr.save(next(steps), {"model": state})
            mgr.wait()
        managers.append(mgr)
    sync_mgr, async_mgr = managers

    def drained(mgr: Any, name: str) -> None:
        start = time.perf_counter()
        mgr.wait()  # the retired checkpoint's removal (background): off the timed path
        stalls.add(name, time.perf_counter() - start)

    def ckptguard_sync(out: Path) -> Measured:
        del out
        start, cpu = time.perf_counter(), cpu_now()
        sync_mgr.save(next(steps), {"model": state}, blocking=True)
        measured = Measured(time.perf_counter() - start, cpu_now() - cpu)
        drained(sync_mgr, "removal after the sync save returned (background)")
        return measured

    def ckptguard_async(out: Path) -> Measured:
        del out
        start, cpu = time.perf_counter(), cpu_now()
        job = async_mgr.save(next(steps), {"model": state}, blocking=False)
        stalls.add("ckptguard async", time.perf_counter() - start)
        job.result()
        measured = Measured(time.perf_counter() - start, cpu_now() - cpu)
        drained(async_mgr, "removal after the async save committed (background)")
        return measured

    return sync_mgr, async_mgr, ckptguard_sync, ckptguard_async


def bench_save(
    state: dict[str, torch.Tensor], rounds: int, work: Path, *, durable: bool
) -> Timings:
    from torch.distributed.checkpoint.filesystem import FileSystemWriter  # noqa: PLC0415
    from torch.distributed.checkpoint.state_dict_saver import async_save, save  # noqa: PLC0415

    blobs = [t.reshape(-1).view(torch.uint8).numpy().data for t in state.values()]
    storage = LocalStorage(durable=durable)
    fs = "+fsync" if durable else ""
    stalls = Timings()

    sync_mgr, async_mgr, ckptguard_sync, ckptguard_async = ckptguard_savers(
        state, work, storage, stalls
    )

    def torch_save(out: Path) -> None:
        out.mkdir()
        torch.save(state, out / "model.pt")
        if durable:
            fsync_tree(out)

    def st_save(out: Path) -> None:
        out.mkdir()
        safetensors.torch.save_file(state, out / "model.safetensors")
        if durable:
            fsync_tree(out)

    def dcp_save(out: Path) -> None:
        writer = FileSystemWriter(str(out), sync_files=durable)
        save({"model": state}, storage_writer=writer, no_dist=True)

    def dcp_async(out: Path) -> None:
        writer = FileSystemWriter(str(out), sync_files=durable)
        start = time.perf_counter()
        future = async_save({"model": state}, storage_writer=writer, no_dist=True)
        stalls.add("dcp.async_save", time.perf_counter() - start)
        done = future if isinstance(future, Future) else future.upload_completion
        done.result()

    buffers = [torch.empty_like(t) for t in state.values()]

    def memcpy(out: Path) -> float:
        """The stall floor: copy every tensor into buffers allocated beforehand."""
        del out
        start = time.perf_counter()
        for dst, src in zip(buffers, state.values(), strict=True):
            dst.copy_(src)
        return time.perf_counter() - start

    methods: dict[str, Callable[[Path], Measured | float | None]] = {
        f"raw write{fs} (floor)": lambda out: raw_write(blobs, out, durable=durable),
        "ckptguard sync": ckptguard_sync,
        "ckptguard async (until committed)": ckptguard_async,
        f"torch.save{fs}": torch_save,
        f"safetensors save_file{fs}": st_save,
        "dcp.save": dcp_save,
        "dcp.async_save (until written)": dcp_async,
        "stall: memcpy into preallocated buffers (floor)": memcpy,
    }
    warmup = Timings()  # one untimed round: allocations, imports, first-touch page faults
    interleave(methods, 1, work, warmup, label="warm-up")
    stalls.samples.clear()
    timings = Timings()
    interleave(methods, rounds, work, timings)
    for name, ts in stalls.samples.items():
        timings.samples[name if name.startswith("removal") else f"stall: {name}"] = ts
    sync_mgr.close()
    async_mgr.close()
    return timings


FIVE = ("raw write+fsync", "ckptguard sync", "ckptguard async", "torch.save+fsync", "dcp.save")


def five_methods(
    state: dict[str, torch.Tensor], work: Path, stalls: Timings
) -> tuple[dict[str, Callable[[Path], Measured | float | None]], Callable[[], None]]:
    """The five durable saves of issue 18, as a training run makes them; and a closer."""
    from torch.distributed.checkpoint.filesystem import FileSystemWriter  # noqa: PLC0415
    from torch.distributed.checkpoint.state_dict_saver import save  # noqa: PLC0415

    blobs = [t.reshape(-1).view(torch.uint8).numpy().data for t in state.values()]
    sync_mgr, async_mgr, ckptguard_sync, ckptguard_async = ckptguard_savers(
        state, work, LocalStorage(), stalls
    )

    def torch_save(out: Path) -> None:
        out.mkdir()
        torch.save(state, out / "model.pt")
        fsync_tree(out)

    def dcp_save(out: Path) -> None:
        save({"model": state}, storage_writer=FileSystemWriter(str(out)), no_dist=True)

    methods: dict[str, Callable[[Path], Measured | float | None]] = dict(
        zip(
            FIVE,
            [
                lambda out: raw_write(blobs, out, durable=True),
                ckptguard_sync,
                ckptguard_async,
                torch_save,
                dcp_save,
            ],
            strict=True,
        )
    )

    def close() -> None:
        sync_mgr.close()
        async_mgr.close()

    return methods, close


def bench_five(state: dict[str, torch.Tensor], rounds: int, work: Path) -> Timings:
    """The five saves interleaved in one run, the order rotated every round."""
    stalls = Timings()
    methods, close = five_methods(state, work, stalls)
    try:
        interleave(methods, 1, work, Timings(), label="warm-up")
        stalls.samples.clear()
        timings = Timings()
        interleave(methods, rounds, work, timings)
    finally:
        close()
    for name, ts in stalls.samples.items():
        if name.startswith("removal"):
            timings.samples[name] = ts
    return timings


# -- GIL contention ------------------------------------------------------------------------
def _python_step(a: torch.Tensor) -> float:
    """A Python-heavy training step: a bit of pure Python and small tensor ops."""
    total = sum(i * i for i in range(300))
    for _ in range(4):
        a = torch.tanh(a @ a) * 0.5
    return total + float(a[0, 0])


def _rate(until: Callable[[], bool], a: torch.Tensor) -> tuple[float, float]:
    """Steps per second of ``_python_step`` until ``until()``; and the seconds it ran."""
    count, start = 0, time.perf_counter()
    while not until():
        _python_step(a)
        count += 1
    elapsed = time.perf_counter() - start
    return count / max(elapsed, 1e-9), elapsed


def bench_gil(state: dict[str, torch.Tensor], rounds: int, work: Path) -> dict[str, Any]:
    """How much a background save slows a Python-heavy loop on the training thread.

    Each round, in rotated order: the loop's step rate while an async save is in flight
    (from its return to its commit); while a plain thread writes and fsyncs the same bytes
    (os.write releases the GIL: what any in-process writer costs in CPU and memory
    bandwidth); and alone, for as long as the save ran.
    """
    a = torch.randn(32, 32)
    blobs = [t.reshape(-1).view(torch.uint8).numpy().data for t in state.values()]
    # The loop's small tensor ops on one intra-op thread: on 2 cores, OpenMP threads that
    # spin beside any background thread would measure oversubscription, not the GIL.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    mgr = ckptguard.CheckpointManager(work / "gil", keep_last=KEEP_LAST, async_save=True)
    proc = ckptguard.CheckpointManager(
        work / "gil-proc", keep_last=KEEP_LAST, async_save=True, async_writer="process"
    )
    steps = itertools.count(1)
    for m in (mgr, proc):
        for _ in range(KEEP_LAST + 1):
            m.save(next(steps), {"model": state})
            m.wait()
    rates: dict[str, list[float]] = {
        "alone": [],
        "async save": [],
        "async save, writer process": [],
        "raw writer thread": [],
    }
    commits: dict[str, list[float]] = {"async save": [], "async save, writer process": []}
    window = [1.0]

    def beside(m: ckptguard.CheckpointManager, name: str) -> None:
        job = m.save(next(steps), {"model": state}, blocking=False)
        rate, window[0] = _rate(job.done, a)
        m.wait()
        rates[name].append(rate)
        commits[name].append(window[0] + job.stall_seconds)

    def beside_save() -> None:
        beside(mgr, "async save")

    def beside_process() -> None:
        beside(proc, "async save, writer process")

    def beside_writer() -> None:
        out = work / "gil-raw"
        thread = threading.Thread(target=raw_write, args=(blobs, out), kwargs={"durable": True})
        thread.start()
        rates["raw writer thread"].append(_rate(lambda: not thread.is_alive(), a)[0])
        thread.join()
        shutil.rmtree(out)

    def alone() -> None:
        deadline = time.perf_counter() + window[0]
        rates["alone"].append(_rate(lambda: time.perf_counter() >= deadline, a)[0])

    runs = [beside_save, beside_process, beside_writer, alone]
    for r in range(rounds + 1):  # the first round warms up
        for run in runs[r % 4 :] + runs[: r % 4]:
            run()
        if r == 0:
            for v in (*rates.values(), *commits.values()):
                v.clear()
    mgr.close()
    proc.close()
    torch.set_num_threads(threads)
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {
        "steps_per_s": med,
        "slowdown": med["alone"] / med["async save"] - 1.0,
        "slowdown_writer_process": med["alone"] / med["async save, writer process"] - 1.0,
        "slowdown_beside_raw_writer": med["alone"] / med["raw writer thread"] - 1.0,
        # What the save costs the loop beyond a writer that never holds the GIL.
        "slowdown_vs_raw_writer": med["raw writer thread"] / med["async save"] - 1.0,
        "slowdown_writer_process_vs_raw_writer": (
            med["raw writer thread"] / med["async save, writer process"] - 1.0
        ),
        # Until committed, the loop running beside it (the stall included).
        "commit_s": {k: statistics.median(v) for k, v in commits.items()},
        "rounds": rounds,
    }


# -- metadata operations per save (strace) -------------------------------------------------
TRACED = (
    "fsync,fdatasync,openat,mkdir,mkdirat,rename,renameat,renameat2,getdents64,unlink,"
    "unlinkat,rmdir,newfstatat,statx,stat,lstat,flock,chmod,fchmod,fchmodat"
)
MARK = "/ckptguard-bench-mark-"  # an os.stat of a missing path: a marker in the trace


def traced_child(method: str, mib: int, work: Path) -> None:
    """Run in a child under strace: a warm-up save, then one save between two markers."""
    state = gpt_like_state(mib)
    stalls = Timings()
    methods, close = five_methods(state, work, stalls)
    try:
        methods[method](work / "warm-up")
        shutil.rmtree(work / "warm-up", ignore_errors=True)
        with contextlib.suppress(OSError):
            os.stat(MARK + "start")
        # ckptguard's savers wait for the retired checkpoint's background removal after
        # the save (outside their timing): counted too.
        methods[method](work / "traced")
        with contextlib.suppress(OSError):
            os.stat(MARK + "end")
    finally:
        close()


_CALL = re.compile(r"^(\d+)\s+(\w+)\((.*)$")
_RESUMED = re.compile(r"^(\d+)\s+<\.\.\. (\w+) resumed>(.*)$")


def _calls(trace: str) -> Iterator[tuple[str, str]]:
    """(name, arguments and result) of each call of a strace -f log, split calls joined."""
    pending: dict[str, str] = {}
    for line in trace.splitlines():
        if line.endswith("<unfinished ...>"):
            pid = line.split(None, 1)[0]
            pending[pid] = line.removesuffix("<unfinished ...>")
            continue
        whole = line
        if m := _RESUMED.match(line):
            whole = pending.pop(m.group(1), "") + m.group(3)
        if m := _CALL.match(whole):
            yield m.group(2), m.group(3)
        elif MARK in whole:
            yield "mark", whole


def count_ops(trace: str, work: Path) -> dict[str, int]:
    """Metadata operations under ``work`` between the two markers of a strace -f -y log."""
    counts = dict.fromkeys(
        ("fsync file", "fsync dir", "create", "mkdir", "rename", "listing", "unlink", "rmdir",
         "stat", "lock", "chmod"), 0,
    )  # fmt: skip
    dirs: set[str] = set()
    inside = False
    where = str(work)
    for name, rest in _calls(trace):
        if MARK + "start" in rest:
            inside = True
            continue
        if MARK + "end" in rest:
            break
        if where not in rest:
            continue
        result = rest.rsplit(") = ", 1)[-1]
        failed = result.startswith("-1")
        if name == "openat" and "O_DIRECTORY" in rest and not failed:
            dirs.add(result.split("<", 1)[-1].split(">", 1)[0])
        if not inside:
            continue
        if name in {"fsync", "fdatasync"}:
            path = rest.split("<", 1)[1].split(">", 1)[0] if "<" in rest else ""
            counts["fsync dir" if path in dirs else "fsync file"] += 1
        elif name == "openat" and "O_CREAT" in rest and not failed:
            counts["create"] += 1
        elif name in {"mkdir", "mkdirat"}:
            counts["mkdir"] += 1
        elif name.startswith("rename"):
            counts["rename"] += 1
        elif name == "getdents64" and not result.startswith("0"):
            counts["listing"] += 1
        elif name == "rmdir" or (name == "unlinkat" and "AT_REMOVEDIR" in rest):
            counts["rmdir"] += 1
        elif name in {"unlink", "unlinkat"}:
            counts["unlink"] += 1
        elif name in {"newfstatat", "statx", "stat", "lstat"} and "AT_EMPTY_PATH" not in rest:
            counts["stat"] += 1
        elif name == "flock" and "LOCK_UN" not in rest:
            counts["lock"] += 1
        elif "chmod" in name:
            counts["chmod"] += 1
    return counts


def bench_ops(mib: int, base: Path) -> dict[str, dict[str, int]]:
    """Each of the five saves once under strace (outside any timed round): its counts."""
    strace = shutil.which("strace")
    if strace is None:
        print("  strace not found: metadata operations not counted")
        return {}
    out = {}
    for method in FIVE:
        work = Path(tempfile.mkdtemp(prefix="ops-", dir=base))
        log = work.parent / f"{work.name}.strace"
        cmd = [strace, "-f", "-y", "-qq", "-o", str(log), "-e", f"trace={TRACED}",
               sys.executable, __file__, "--trace-child", method, "--mib", str(mib),
               "--dir", str(work)]  # fmt: skip
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)  # noqa: S603 - our own
        out[method] = count_ops(log.read_text(), work)
        log.unlink()
        shutil.rmtree(work, ignore_errors=True)
    return out


def print_ops(table: dict[str, dict[str, int]]) -> None:
    if not table:
        return
    cols = list(next(iter(table.values())))
    print("\nmetadata operations per save (strace -f, one save after a warm-up; ckptguard")
    print("saves with keep_last=2 retiring one checkpoint, its background removal included)")
    print(f"  {'method':20}" + "".join(f"{c:>11}" for c in cols))
    for name, row in table.items():
        print(f"  {name:20}" + "".join(f"{row[c]:>11}" for c in cols))


def bench_restore(state: dict[str, torch.Tensor], rounds: int, work: Path) -> Timings:
    """Cold restores into the existing tensors (``state`` is overwritten in place)."""
    from torch.distributed.checkpoint.state_dict_loader import load  # noqa: PLC0415
    from torch.distributed.checkpoint.state_dict_saver import save  # noqa: PLC0415

    files = work / "restore"
    files.mkdir()
    raw = files / "raw"
    raw_write(
        [t.reshape(-1).view(torch.uint8).numpy().data for t in state.values()],
        raw,
        durable=True,
    )
    torch.save(state, files / "model.pt")
    safetensors.torch.save_file(state, files / "model.safetensors")
    save({"model": state}, checkpoint_id=str(files / "dcp"), no_dist=True)
    mgr = ckptguard.CheckpointManager(files / "ckptguard", keep_last=None)
    mgr.save(1, {"model": state}, blocking=True)
    fsync_tree(files)
    expected = {k: v.clone() for k, v in state.items()}

    def cold(path: Path, load: Callable[[], None]) -> float:
        drop_cache(path)
        start = time.perf_counter()
        load()
        return time.perf_counter() - start

    def floor() -> None:
        fd = os.open(raw / "raw.bin", os.O_RDONLY)
        try:
            offset = 0
            for t in state.values():
                view = t.reshape(-1).view(torch.uint8).numpy().data
                while view:
                    n = os.preadv(fd, [view], offset)
                    view, offset = view[n:], offset + n
        finally:
            os.close(fd)

    def torch_load() -> None:
        loaded = torch.load(files / "model.pt", weights_only=True)
        for k, t in state.items():
            t.copy_(loaded[k])

    def st_load() -> None:
        loaded = safetensors.torch.load_file(files / "model.safetensors")
        for k, t in state.items():
            t.copy_(loaded[k])

    def dcp_load() -> None:
        load({"model": state}, checkpoint_id=str(files / "dcp"), no_dist=True)

    def ours() -> None:
        mgr.restore(1, target={"model": state})

    methods: dict[str, Callable[[Path], Measured | float | None]] = {
        "cold read into the tensors (floor)": lambda _: cold(raw, floor),
        "ckptguard verified restore": lambda _: cold(files / "ckptguard", ours),
        "torch.load (+copy in)": lambda _: cold(files / "model.pt", torch_load),
        "safetensors load_file (+copy in)": lambda _: cold(files / "model.safetensors", st_load),
        "dcp.load (in place)": lambda _: cold(files / "dcp", dcp_load),
    }
    timings = Timings()
    interleave(methods, rounds, work, timings)
    ours()
    if not all(torch.equal(state[k], expected[k]) for k in state):
        raise RuntimeError("a restore changed the values")
    shutil.rmtree(files)
    return timings


def bench_memory(state: dict[str, torch.Tensor], work: Path, growth_mib: int) -> dict[str, Any]:
    """Peak RSS beyond what the process holds, for each ckptguard operation."""
    out: dict[str, Any] = {"state_bytes": nbytes_of(state)}
    root = work / "memory"

    mgr = ckptguard.CheckpointManager(root / "sync", keep_last=1)
    mgr.save(1, {"model": state}, blocking=True)  # warm-up (imports, first allocations)
    with PeakSampler() as peak:
        mgr.save(2, {"model": state}, blocking=True)
    out["sync_save_extra_bytes"] = peak.extra

    drop_cache(root / "sync")
    with PeakSampler() as peak:
        mgr.restore(target={"model": state})
    out["restore_extra_bytes"] = peak.extra
    mgr.close()

    mgr = ckptguard.CheckpointManager(root / "async", keep_last=1, async_save=True)
    with PeakSampler() as peak:
        mgr.save(1, {"model": state})
        mgr.wait()
    out["async_save_extra_bytes"] = peak.extra
    with PeakSampler() as peak:
        mgr.save(2, {"model": state})
        mgr.wait()
    out["async_second_save_extra_bytes"] = peak.extra  # the buffers exist already
    mgr.close()
    shutil.rmtree(root)

    small = gpt_like_state(growth_mib, d=512)
    mgr = ckptguard.CheckpointManager(
        root / "growth", keep_last=1, async_save=True, storage=LocalStorage(durable=False)
    )
    rss = []
    base = reset_peak()
    for step in range(1, 101):
        for t in small.values():
            t.add_(1.0)
        mgr.save(step, {"model": small})
        mgr.wait()
        rss.append(_status("VmRSS") - base)
    if mgr.saver._buffers is None:  # noqa: SLF001
        raise RuntimeError("an async manager without staging buffers")
    out["growth"] = {
        "state_bytes": nbytes_of(small),
        "saves": 100,
        "rss_after_first_bytes": rss[0],
        "rss_max_after_later_bytes": max(rss[1:]),
        "rss_last_bytes": rss[-1],
        "buffer_allocations": mgr.saver._buffers.allocations,  # noqa: SLF001
    }
    mgr.close()
    shutil.rmtree(root)
    return out


def bench_trainer(mib: int, rounds: int, work: Path) -> Timings:
    """The Trainer's own save with and without protect(), on a GPT-2 of ~mib fp32 params
    (with its AdamW state after one step: ~3x that on disk)."""
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: PLC0415

    from ckptguard.integrations.transformers import protect  # noqa: PLC0415

    d, layers = 512, 4
    vocab = max(1000, (mib * MiB // 4 - layers * 12 * d * d) // d)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=vocab, n_positions=64, n_embd=d, n_layer=layers, n_head=8)
    )
    data = [{"input_ids": torch.randint(0, vocab, (16,)), "labels": torch.randint(0, vocab, (16,))}]

    def make(out: Path) -> Any:
        args = TrainingArguments(
            output_dir=str(out), max_steps=1, per_device_train_batch_size=1,
            save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
        )  # fmt: skip
        trainer = Trainer(model=model, args=args, train_dataset=data)
        trainer.train()  # one step: the optimizer has its state
        return trainer

    plain = make(work / "plain-init")
    guarded = protect(make(work / "guarded-init"))
    step = [100]

    def save(trainer: Any, out: Path, *, then_fsync: bool = False) -> None:
        trainer.args.output_dir = str(out)
        step[0] += 1
        trainer.state.global_step = step[0]
        trainer._save_checkpoint(trainer.model, trial=None)  # noqa: SLF001
        if then_fsync:
            fsync_tree(out)

    methods: dict[str, Callable[[Path], Measured | float | None]] = {
        "Trainer._save_checkpoint": lambda out: save(plain, out),
        "Trainer._save_checkpoint + fsync of its files": lambda out: save(
            plain, out, then_fsync=True
        ),
        "protect(trainer)._save_checkpoint": lambda out: save(guarded, out),
    }
    timings = Timings()
    interleave(methods, rounds, work, timings)
    size = sum(f.stat().st_size for f in (work / "plain-init").rglob("*") if f.is_file())
    del size
    return timings


def _ratio(a: float, b: float) -> float:
    return a / b


def report(results: dict[str, Any], nbytes: int) -> list[str]:
    """The targets of issue 6, as ratios of medians taken in this run."""
    lines = []
    checks: dict[str, Any] = {}
    save = results.get("save")
    if save:
        floor = save["raw write+fsync (floor)"]["median_s"]
        ours = save["ckptguard sync"]["median_s"]
        checks["sync_vs_raw_write_fsync_throughput"] = _ratio(floor, ours)
        checks["sync_faster_than_torch_save_fsync"] = ours < save["torch.save+fsync"]["median_s"]
        checks["sync_faster_than_dcp_save"] = ours < save["dcp.save"]["median_s"]
        stall_floor = save["stall: memcpy into preallocated buffers (floor)"]["median_s"]
        checks["async_stall_vs_memcpy"] = _ratio(
            save["stall: ckptguard async"]["median_s"], stall_floor
        )
        checks["dcp_async_stall_vs_memcpy"] = _ratio(
            save["stall: dcp.async_save"]["median_s"], stall_floor
        )
    for fs in ("disk", "tmpfs"):
        five = results.get(f"five_{fs}")
        if not five:
            continue
        sync = five["ckptguard sync"]
        for peer in ("raw write+fsync", "torch.save+fsync", "dcp.save"):
            # Above 1: the sync save is faster than the peer (a throughput ratio).
            checks[f"{fs}_{peer}_time_over_sync"] = five[peer]["median_s"] / sync["median_s"]
        checks[f"{fs}_async_until_committed_over_sync"] = (
            five["ckptguard async"]["median_s"] / sync["median_s"]
        )
        checks[f"{fs}_async_cpu_over_sync_cpu"] = (
            five["ckptguard async"]["cpu_median_s"] / sync["cpu_median_s"]
        )
    gil = results.get("gil")
    if gil:
        checks["gil_loop_slowdown_beside_async_save"] = gil["slowdown"]
        checks["gil_loop_slowdown_beside_raw_writer_thread"] = gil["slowdown_beside_raw_writer"]
        checks["gil_loop_async_save_vs_raw_writer_thread"] = gil["slowdown_vs_raw_writer"]
        checks["gil_loop_slowdown_beside_writer_process"] = gil["slowdown_writer_process"]
    cpu = results.get("cpu")
    if cpu:
        floor = cpu["raw write (floor)"]["cpu_median_s"]
        wall = cpu["raw write (floor)"]["median_s"]
        for name in ("ckptguard sync", "torch.save", "safetensors save_file", "dcp.save"):
            checks[f"cpu_seconds_{name}_vs_raw_write"] = cpu[name]["cpu_median_s"] / floor
            checks[f"wall_{name}_vs_raw_write"] = cpu[name]["median_s"] / wall
    restore = results.get("restore")
    if restore:
        checks["restore_vs_cold_read_throughput"] = _ratio(
            restore["cold read into the tensors (floor)"]["median_s"],
            restore["ckptguard verified restore"]["median_s"],
        )
    trainer = results.get("trainer")
    if trainer:
        own = trainer["Trainer._save_checkpoint"]["median_s"]
        checks["protect_added_over_trainer_save"] = (
            _ratio(trainer["protect(trainer)._save_checkpoint"]["median_s"], own) - 1.0
        )
        checks["protect_added_over_trainer_save_plus_fsync"] = (
            _ratio(
                trainer["protect(trainer)._save_checkpoint"]["median_s"],
                trainer["Trainer._save_checkpoint + fsync of its files"]["median_s"],
            )
            - 1.0
        )
    memory = results.get("memory")
    if memory:
        checks["sync_save_extra_mib"] = memory["sync_save_extra_bytes"] / MiB
        checks["async_save_extra_vs_state"] = memory["async_save_extra_bytes"] / nbytes
        checks["restore_extra_vs_state"] = memory["restore_extra_bytes"] / nbytes
        g = memory["growth"]
        checks["async_growth_over_100_saves_mib"] = (
            g["rss_max_after_later_bytes"] - g["rss_after_first_bytes"]
        ) / MiB
    results["checks"] = checks
    for key, value in checks.items():
        lines.append(
            f"  {key:55} {value:.3f}" if isinstance(value, float) else f"  {key:55} {value}"
        )
    return lines


def print_table(title: str, table: dict[str, dict[str, float]]) -> None:
    print(f"\n{title}")
    print(f"  {'method':50} {'median s':>9} {'min':>7} {'max':>7} {'GB/s':>6} {'CPU s':>6}")
    for name, row in table.items():
        cpu = f"{row['cpu_median_s']:6.3f}" if "cpu_median_s" in row else f"{'':6}"
        print(
            f"  {name:50} {row['median_s']:9.3f} {row['min_s']:7.3f} {row['max_s']:7.3f} "
            f"{row['gb_per_s']:6.2f} {cpu}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=1024, help="state size (default 1024)")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--only", default="save,cpu,five,ops,gil,restore,memory,trainer")
    parser.add_argument("--growth-mib", type=int, default=128)
    parser.add_argument("--trainer-mib", type=int, default=128)
    parser.add_argument("--ops-mib", type=int, default=64, help="state size for ops counts")
    parser.add_argument("--gil-mib", type=int, default=1024, help="state size for gil")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: tmp)")
    parser.add_argument("--tmpfs", type=Path, default=Path("/dev/shm"), help="for five")  # noqa: S108
    parser.add_argument("--trace-child", choices=FIVE, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if args.trace_child:
        traced_child(args.trace_child, args.mib, args.dir)
        return
    sections = set(args.only.split(","))
    state = gpt_like_state(args.mib)
    nbytes = nbytes_of(state)
    sizes = sorted(t.numel() * 4 for t in state.values())
    machine = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ckptguard": ckptguard.__version__,
    }
    print(
        f"state: {len(state)} fp32 tensors, {nbytes / MiB:.0f} MiB "
        f"({sizes[0] / 1024:.0f} KiB to {sizes[-1] / MiB:.0f} MiB); {args.rounds} rounds; "
        f"{machine['cpus']} CPUs, torch {machine['torch']}"
    )
    work = Path(tempfile.mkdtemp(prefix="ckptguard-bench-", dir=args.dir))
    results: dict[str, Any] = {"machine": machine, "state_bytes": nbytes, "rounds": args.rounds}
    try:
        if "save" in sections:
            print("durable saves ...", flush=True)
            t = bench_save(state, args.rounds, work, durable=True)
            results["save"] = t.summary(nbytes)
            print_table("durable saves (and async stalls)", results["save"])
        if "cpu" in sections:
            print("saves without fsync ...", flush=True)
            t = bench_save(state, args.rounds, work, durable=False)
            results["cpu"] = {
                k: v for k, v in t.summary(nbytes).items() if not k.startswith(("stall", "removal"))
            }
            print_table("saves without fsync (CPU cost)", results["cpu"])
        if "five" in sections:
            for fs, base in (("disk", work), ("tmpfs", args.tmpfs)):
                print(f"five durable saves interleaved ({fs}) ...", flush=True)
                where = Path(tempfile.mkdtemp(prefix="ckptguard-bench-", dir=base))
                try:
                    results[f"five_{fs}"] = bench_five(state, args.rounds, where).summary(nbytes)
                finally:
                    shutil.rmtree(where, ignore_errors=True)
                print_table(f"five durable saves interleaved, {fs}", results[f"five_{fs}"])
        if "ops" in sections:
            print("metadata operations (strace) ...", flush=True)
            results["ops"] = bench_ops(args.ops_mib, work)
            print_ops(results["ops"])
        if "gil" in sections:
            print("a Python-heavy loop beside a background save ...", flush=True)
            results["gil"] = bench_gil(gpt_like_state(args.gil_mib), args.rounds, work)
            print(f"\nGIL: {json.dumps(results['gil'], indent=2)}")
        if "restore" in sections:
            print("cold restores ...", flush=True)
            results["restore"] = bench_restore(state, args.rounds, work).summary(nbytes)
            print_table("cold restores into the existing tensors", results["restore"])
        if "trainer" in sections:
            print("Trainer saves ...", flush=True)
            results["trainer"] = bench_trainer(args.trainer_mib, args.rounds, work).summary(1)
            print_table("Hugging Face Trainer saves (GB/s column: n/a)", results["trainer"])
        if "memory" in sections:
            print("memory ...", flush=True)
            results["memory"] = bench_memory(state, work, args.growth_mib)
            print(f"\nmemory: {json.dumps(results['memory'], indent=2)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\ntargets (ratios of medians in this run):")
    for line in report(results, nbytes):
        print(line)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
