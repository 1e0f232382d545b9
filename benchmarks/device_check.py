"""ckptguard's CUDA paths, run on a machine with NVIDIA GPUs (``make device-check``).

Checks (each in its own try/except: one failing check is reported, the others still run):

- ``model_adam``: ``save``/``restore`` of a model and its Adam state on the device, into
  module and optimizer targets: bit-exact, the restored tensors on the device, verified;
- ``stall`` (a): how long ``save(..., blocking=False)`` blocks the caller, against a
  device-to-host copy of the same bytes into preallocated pinned buffers (the floor; the
  target is <= 1.2x) and against ``torch.distributed.checkpoint.async_save`` (also with
  ``cache_staged_state_dict=True`` where its writer takes it), in interleaved rounds with
  the order rotated, medians; the saves themselves must commit and verify;
- ``every_device`` (b): one state with tensors on every visible device (cuda:0..N-1),
  saved sync and async, restored bit-exact with and without a target (the target's
  tensors stay on their devices);
- ``low_precision`` (c): bf16 (with NaN, +-inf, -0.0, a subnormal) and every bit
  pattern of float8_e4m3fn and float8_e5m2 (where torch has them) on each device, saved
  sync and async, restored onto the device; bits compared through ``.view(torch.uint8)``;
- ``async_isolation`` (e): a model on the device is changed in place right after
  ``save`` returns (once with the background writer held until the change is done, once
  racing it): the checkpoint holds the old values; how long ``save`` blocked vs the save;
- ``distributed`` (d): under torchrun, 2 ranks on NCCL where two GPUs exist (1 rank
  with one GPU; gloo on CPU): a replicated save/restore through the coordinator, an async
  save with a collective right after it, and an FSDP2 model+optimizer saved with
  ``sharded=True`` and restored into a differently initialised one (issue 17's check).
  The child has a timeout and is killed with its process group.

``--device cpu`` is a dry run of the same checks on CPU (pinned memory only where CUDA
exists, gloo for the distributed check), so the script's own code runs where no GPU is.
Without CUDA (and without ``--device cpu``) it prints that it found no CUDA device and
exits 0. The JSON report (``--json``) is rewritten after every check, and a watchdog ends
the run after ``--deadline`` seconds, so a hang still leaves the figures so far.
Exit status: 1 if a check failed (a stall above the target is reported, not a failure).

Usage: python benchmarks/device_check.py [--device cuda|cpu] [--mib 1024] [--rounds 7]
       [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

import ckptguard
from ckptguard._storage import faults as _faults

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

MiB = 1 << 20
STALL_TARGET = 1.2  # ckptguard's stall over the pinned device-to-host copy (issue 18)
CHILD_TIMEOUT_S = 150  # the torchrun child, killed with its process group after this
PG_TIMEOUT_S = 60  # collectives of the child: a lost peer fails it rather than hanging


@dataclass(frozen=True)
class Ctx:
    device: str  # "cuda" or "cpu"
    devices: list[torch.device]
    pinned: bool  # pinned host buffers: only where CUDA exists
    mib: int
    rounds: int
    deadline_at: float  # time.monotonic() at which the watchdog ends the run

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def sync(self) -> None:
        if self.cuda:
            for d in self.devices:
                torch.cuda.synchronize(d)


# -- helpers ---------------------------------------------------------------------------------
def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes on the CPU (NaN == NaN and -0.0 != 0.0, unlike torch.equal)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8).cpu()


def _same_bits(expected: Any, got: Any) -> bool:
    if isinstance(expected, dict):
        return (
            isinstance(got, dict)
            and expected.keys() == got.keys()
            and all(_same_bits(expected[k], got[k]) for k in expected)
        )
    if isinstance(expected, torch.Tensor):
        return (
            isinstance(got, torch.Tensor)
            and got.dtype == expected.dtype
            and got.shape == expected.shape
            and torch.equal(_bits(got), _bits(expected))
        )
    return bool(expected == got)


def _copy(state: Any) -> Any:
    """A deep copy of a tree of tensors, on the CPU (what the checkpoint must hold)."""
    if isinstance(state, dict):
        return {k: _copy(v) for k, v in state.items()}
    if isinstance(state, torch.Tensor):
        return state.detach().cpu().clone()
    return state


def _empty_like(state: Any) -> Any:
    """Restore targets: fresh tensors of the same dtype/shape on the same devices, zeroed."""
    if isinstance(state, dict):
        return {k: _empty_like(v) for k, v in state.items()}
    if isinstance(state, torch.Tensor):
        return torch.zeros_like(state)
    return state


def _manager(root: Path, **options: Any) -> ckptguard.CheckpointManager:
    return ckptguard.CheckpointManager(root, check_environment=False, **options)


@contextlib.contextmanager
def _held_writer() -> Iterator[threading.Event]:
    """Holds an async save's background thread before it writes anything, until set."""
    go = threading.Event()

    def hook(name: str) -> None:
        if name == "stage.created" and threading.current_thread() is not threading.main_thread():
            go.wait(60)

    previous = _faults.set_fault_hook(hook)
    try:
        yield go
    finally:
        go.set()
        _faults.set_fault_hook(previous)


def gpt_like_state(total_mib: int, device: torch.device) -> dict[str, torch.Tensor]:
    """~total_mib of fp32 tensors shaped like a GPT's (embeddings, 12 tensors a block)."""
    d = 1024 if total_mib >= 256 else 256
    gen = torch.Generator().manual_seed(0)
    target = total_mib * MiB // 4
    vocab = max(256, int(target * 0.155) // d)
    shapes: list[tuple[str, tuple[int, ...]]] = [("wte", (vocab, d)), ("wpe", (1024, d))]
    block = [
        ("ln_1.w", (d,)), ("ln_1.b", (d,)), ("attn.w", (d, 3 * d)), ("attn.b", (3 * d,)),
        ("proj.w", (d, d)), ("proj.b", (d,)), ("ln_2.w", (d,)), ("ln_2.b", (d,)),
        ("fc.w", (d, 4 * d)), ("fc.b", (4 * d,)), ("out.w", (4 * d, d)), ("out.b", (d,)),
    ]  # fmt: skip
    total, layer = vocab * d + 1024 * d, 0
    while total + 12 * d * d <= target:
        shapes += [(f"h.{layer}.{name}", shape) for name, shape in block]
        total += sum(math.prod(s) for _, s in block)
        layer += 1
    return {
        name: torch.randn(shape, generator=gen).to(device) for name, shape in shapes
    }  # fmt: skip


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# -- the checks ---------------------------------------------------------------------------
def _mlp(seed: int, width: int, device: torch.device) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width)).to(device)


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, width: int) -> None:
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(7)
    for _ in range(steps):
        x = torch.randn(32, width, device=device, generator=gen)
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def check_model_adam(ctx: Ctx, work: Path) -> dict[str, Any]:
    device, width = ctx.devices[0], 2048 if ctx.cuda else 256
    model = _mlp(0, width, device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    _train(model, opt, 3, width)
    saved = _copy(model.state_dict())
    saved_opt = _copy(opt.state_dict()["state"])
    mgr = _manager(work)
    mgr.save(3, {"model": model, "optimizer": opt})
    fresh = _mlp(1, width, device)
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=1e-3)
    _train(fresh, fresh_opt, 1, width)
    differed = not _same_bits(saved, _copy(fresh.state_dict()))
    mgr.restore(target={"model": fresh, "optimizer": fresh_opt})
    mgr.close()
    restored = fresh.state_dict()
    return {
        "ok_flags": ["differed_before", "bit_exact", "optimizer_bit_exact", "on_device",
                     "verified"],
        "differed_before": differed,
        "bit_exact": _same_bits(saved, _copy(restored)),
        "optimizer_bit_exact": _same_bits(saved_opt, _copy(fresh_opt.state_dict()["state"])),
        "on_device": all(v.device == device for v in restored.values())
        and all(v.device == device for s in fresh_opt.state.values() for v in s.values()
                if isinstance(v, torch.Tensor) and v.dim() > 0),
        "verified": ckptguard.verify(work / "checkpoint-3").ok,
    }  # fmt: skip


def check_stall(ctx: Ctx, work: Path) -> dict[str, Any]:
    from torch.distributed.checkpoint.filesystem import FileSystemWriter  # noqa: PLC0415
    from torch.distributed.checkpoint.state_dict_saver import async_save  # noqa: PLC0415

    state = gpt_like_state(ctx.mib, ctx.devices[0])
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    ctx.sync()
    stalls: dict[str, list[float]] = {}
    totals: dict[str, list[float]] = {}
    committed: list[bool] = []
    mgr = _manager(work / "ckptguard", keep_last=None, async_save=True)
    steps = iter(range(1, 10_000))
    buffers = [torch.empty(t.shape, dtype=t.dtype, pin_memory=ctx.pinned) for t in state.values()]

    def floor(_out: Path) -> tuple[float, float]:
        start = time.perf_counter()
        for dst, src in zip(buffers, state.values(), strict=True):
            dst.copy_(src, non_blocking=ctx.cuda)
        ctx.sync()
        took = time.perf_counter() - start
        return took, took

    def ours(_out: Path) -> tuple[float, float]:
        start = time.perf_counter()
        mgr.save(next(steps), {"model": state}, blocking=False)
        stall = time.perf_counter() - start
        info = mgr.wait()
        total = time.perf_counter() - start
        committed.append(info is not None and info.valid and ckptguard.verify(info.path).ok)
        if info is not None:
            shutil.rmtree(info.path)
        return stall, total

    def dcp(out: Path, **writer_options: Any) -> tuple[float, float]:
        writer = FileSystemWriter(str(out), sync_files=True, **writer_options)
        start = time.perf_counter()
        future = async_save({"model": state}, storage_writer=writer, no_dist=True)
        stall = time.perf_counter() - start
        done = future if isinstance(future, Future) else future.upload_completion
        done.result()
        total = time.perf_counter() - start
        shutil.rmtree(out, ignore_errors=True)
        return stall, total

    methods: dict[str, Callable[[Path], tuple[float, float]]] = {
        "pinned device-to-host copy (floor)" if ctx.pinned else "host copy (floor)": floor,
        "ckptguard save(blocking=False)": ours,
        "dcp.async_save": dcp,
    }
    try:  # the writer option that keeps dcp's staging buffers between saves
        FileSystemWriter(str(work / "probe"), cache_staged_state_dict=True)
        methods["dcp.async_save (cache_staged_state_dict)"] = lambda out: dcp(
            out, cache_staged_state_dict=True
        )
    except TypeError:
        pass
    names = list(methods)
    errors: dict[str, str] = {}  # a peer that fails here is reported and left out
    for r in range(ctx.rounds + 1):  # round 0 warms up (allocations, first touches)
        k = r % len(names)
        for name in names[k:] + names[:k]:
            if name in errors:
                continue
            try:
                stall, total = methods[name](work / f"r{r}-{names.index(name)}")
            except Exception as exc:
                if name in names[:2]:  # the floor or ckptguard itself: the check fails
                    raise
                errors[name] = f"{type(exc).__name__}: {exc}"
                continue
            if r:
                stalls.setdefault(name, []).append(stall)
                totals.setdefault(name, []).append(total)
    mgr.close()
    names = [n for n in names if n not in errors]
    table = {
        name: {
            "stall_median_s": statistics.median(stalls[name]),
            "stall_min_s": min(stalls[name]),
            "stall_max_s": max(stalls[name]),
            "total_median_s": statistics.median(totals[name]),
        }
        for name in names
    }
    floor_s = table[names[0]]["stall_median_s"]
    ours_s = table["ckptguard save(blocking=False)"]["stall_median_s"]
    ratios = {f"ours_vs_{name}": ours_s / table[name]["stall_median_s"] for name in names[2:]}
    return {
        "ok_flags": ["every_save_committed"],
        "every_save_committed": len(committed) == ctx.rounds + 1 and all(committed),
        "state_mib": nbytes / MiB,
        "tensors": len(state),
        "rounds": ctx.rounds,
        "methods": table,
        "method_errors": errors,
        "stall_vs_floor": ours_s / floor_s,
        "stall_target": STALL_TARGET,
        "stall_target_met": ours_s / floor_s <= STALL_TARGET,
        **ratios,
    }


def check_every_device(ctx: Ctx, work: Path) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for i, device in enumerate(ctx.devices):
        g = torch.Generator().manual_seed(i)
        state[f"dev{i}"] = {
            "w": torch.randn(257, 129, generator=g).to(device),
            "h": torch.randn(1000, generator=g).to(torch.bfloat16).to(device),
            "i": torch.arange(i, i + 77, dtype=torch.int64).to(device),
            "strided": torch.randn(16, 32, generator=g).to(device)[:, ::2],
        }
    expected = _copy(state)
    out: dict[str, Any] = {"devices": [str(d) for d in ctx.devices]}
    for mode in ("sync", "async"):
        state = _on_devices(expected, ctx.devices)
        mgr = _manager(work / mode, async_save=mode == "async")
        mgr.save(1, {"s": state})
        if mode == "async":  # after save returned: the snapshot holds the old values
            for sub in state.values():
                for t in sub.values():
                    t.add_(1)
        mgr.wait()
        out[f"{mode}_restored_new"] = _same_bits(expected, mgr.restore(1)["s"])
        target = _empty_like(_on_devices(expected, ctx.devices))
        mgr.restore(1, target={"s": target})
        out[f"{mode}_restored_into_targets"] = _same_bits(expected, _copy(target))
        out[f"{mode}_targets_stay_on_devices"] = all(
            t.device == ctx.devices[i]
            for i in range(len(ctx.devices))
            for t in target[f"dev{i}"].values()
        )
        out[f"{mode}_verified"] = ckptguard.verify(work / mode / "checkpoint-1").ok
        mgr.close()
    out["ok_flags"] = [k for k, v in out.items() if isinstance(v, bool)]
    return out


def _on_devices(expected: dict[str, Any], devices: list[torch.device]) -> dict[str, Any]:
    """``expected`` (``dev<i>`` keys, on the CPU) moved back onto device i."""
    return {
        key: {
            name: t.to(devices[int(key.removeprefix("dev"))], copy=True) for name, t in sub.items()
        }
        for key, sub in expected.items()
    }


def _low_precision(device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    bf16 = (torch.randn(7, 9, generator=g, dtype=torch.float64) * 1e3).to(torch.bfloat16)
    bf16.view(-1)[:5] = torch.tensor([math.nan, math.inf, -math.inf, -0.0, 1e-40])
    state = {"bf16": bf16}
    for name in ("float8_e4m3fn", "float8_e5m2"):
        if hasattr(torch, name):  # all 256 bit patterns of the format
            state[name] = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(
                getattr(torch, name)
            ).reshape(16, 16)  # fmt: skip
    return {k: v.to(device) for k, v in state.items()}


def check_low_precision(ctx: Ctx, work: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"dtypes": sorted(_low_precision(torch.device("cpu")))}
    for i, device in enumerate(ctx.devices):
        for mode in ("sync", "async"):
            state = _low_precision(device)
            expected = _copy(state)
            mgr = _manager(work / f"{i}-{mode}", async_save=mode == "async")
            mgr.save(1, {"low": state})
            if mode == "async":
                for t in state.values():
                    t.view(torch.uint8).add_(1)
            mgr.wait()
            plain = mgr.restore(1)["low"]  # onto the CPU
            target = {k: torch.zeros_like(v) for k, v in expected.items()}
            target = {k: v.to(device) for k, v in target.items()}
            mgr.restore(1, target={"low": target})  # onto the device, in place
            mgr.close()
            out[f"{device}_{mode}_bit_exact"] = _same_bits(expected, plain)
            out[f"{device}_{mode}_onto_device_bit_exact"] = _same_bits(expected, target) and all(
                t.device == device for t in target.values()
            )
    out["ok_flags"] = [k for k, v in out.items() if isinstance(v, bool)]
    return out


def check_async_isolation(ctx: Ctx, work: Path) -> dict[str, Any]:
    device, width = ctx.devices[0], 8192 if ctx.cuda else 1024
    model = _mlp(2, width, device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    _train(model, opt, 1, width)
    mgr = _manager(work, keep_last=None, async_save=True)
    mgr.save(1, {"model": model, "optimizer": opt})  # warm-up: staging buffers allocated
    mgr.wait()
    out: dict[str, Any] = {
        "state_mib": sum(v.numel() * v.element_size() for v in model.state_dict().values())
        * 3 / MiB,
    }  # fmt: skip
    for step, held in ((2, True), (3, False)):
        saved = _copy(model.state_dict())
        with _held_writer() as release:
            if not held:
                release.set()
            start = time.perf_counter()
            pending = mgr.save(step, {"model": model, "optimizer": opt})
            blocked = time.perf_counter() - start
            with torch.no_grad():  # at once, on the device, while the save is written
                for p in model.parameters():
                    p.add_(1.0)
            ctx.sync()
            release.set()
            info = pending.result()
        total = time.perf_counter() - start
        fresh = _mlp(3, width, device)
        fresh_opt = torch.optim.Adam(fresh.parameters(), lr=1e-3)
        mgr.restore(step=step, target={"model": fresh, "optimizer": fresh_opt})
        kind = "held" if held else "racing"
        out[f"{kind}_checkpoint_holds_old_values"] = _same_bits(saved, _copy(fresh.state_dict()))
        out[f"{kind}_changed_after_save"] = not _same_bits(saved, _copy(model.state_dict()))
        out[f"{kind}_verified"] = info.valid and ckptguard.verify(info.path).ok
        out[f"{kind}_save_blocked_s"] = blocked
        out[f"{kind}_save_total_s"] = total
    mgr.close()
    out["ok_flags"] = [k for k, v in out.items() if isinstance(v, bool)]
    return out


def check_distributed(ctx: Ctx, work: Path) -> dict[str, Any]:
    nproc = 2 if not ctx.cuda else min(2, torch.cuda.device_count())
    reports_dir = work / "reports"
    reports_dir.mkdir(parents=True)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        "--nnodes=1", "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
        str(Path(__file__).resolve()), "--device", ctx.device,
        "--dist-child", str(reports_dir), str(work / "root"),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if not ctx.cuda:
        env["OMP_NUM_THREADS"] = "1"
    start = time.perf_counter()
    log = work / "torchrun.log"  # a file, not a pipe: nothing left running can block a read
    with log.open("w") as sink:
        proc = subprocess.Popen(  # noqa: S603 - this script under torchrun
            cmd, stdout=sink, stderr=subprocess.STDOUT, text=True, env=env,
            start_new_session=True,
        )  # fmt: skip
    # within the watchdog's deadline: the parent must outlive (and kill) its child
    timeout = max(5.0, min(CHILD_TIMEOUT_S, ctx.deadline_at - time.monotonic() - 10))
    try:
        proc.wait(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        _kill_tree(proc.pid)
        proc.wait(timeout=30)
        timed_out = True
    output = log.read_text(errors="replace")
    out: dict[str, Any] = {
        "backend": "nccl" if ctx.cuda else "gloo",
        "ranks": nproc,
        "two_ranks": nproc >= 2,
        "seconds": time.perf_counter() - start,
        "exit_code": proc.returncode,
        "timed_out": timed_out,
    }
    reports = []
    for r in range(nproc):
        path = reports_dir / f"rank{r}.json"
        reports.append(json.loads(path.read_text()) if path.exists() else {"missing": True})
    out["per_rank"] = reports
    flags = [v for rep in reports for part in rep.values() if isinstance(part, dict)
             for k, v in part.items() if isinstance(v, bool) and k != "skipped"]  # fmt: skip
    out["every_rank_reported"] = all("missing" not in rep for rep in reports)
    out["every_rank_passed"] = bool(flags) and all(flags) and proc.returncode == 0
    if not out["every_rank_passed"]:
        out["output_tail"] = output[-4000:]
    out["ok_flags"] = ["every_rank_reported", "every_rank_passed"]
    return out


def _kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and its descendants: torchrun starts each rank in a session of its
    own (so killing torchrun's process group leaves the ranks running)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = (entry / "stat").read_text()
                ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
                parents.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(parents.get(p, []))
    for p in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def check_trainer_async(ctx: Ctx, work: Path) -> dict[str, Any]:
    """``protect(trainer, async_save=True)`` training on the device, in a child process
    (one visible GPU: the Trainer would wrap the model in DataParallel over several)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--device", ctx.device,
           "--trainer-child", str(work / "run")]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}  # fmt: skip
    if ctx.cuda:
        env["CUDA_VISIBLE_DEVICES"] = str(ctx.devices[0].index)
    work.mkdir(parents=True)
    log = work / "child.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(  # noqa: S603 - this script, as a child
            cmd, stdout=sink, stderr=subprocess.STDOUT, text=True, env=env,
            start_new_session=True,
        )  # fmt: skip
    timeout = max(5.0, min(CHILD_TIMEOUT_S, ctx.deadline_at - time.monotonic() - 10))
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc.pid)
        proc.wait(timeout=30)
    output = log.read_text(errors="replace")
    lines = [ln for ln in output.splitlines() if ln.startswith("RESULT ")]
    out: dict[str, Any] = json.loads(lines[-1].removeprefix("RESULT ")) if lines else {}
    out["exit_code"] = proc.returncode
    out["exited_cleanly"] = proc.returncode == 0 and bool(lines)
    if not out["exited_cleanly"] or out.get("failed_steps"):
        out["output_tail"] = output[-4000:]
    out["ok_flags"] = ["exited_cleanly"] + (
        [] if "skipped" in out else ["every_checkpoint_verified", "holds_the_saved_moment"]
    )
    return out


def trainer_child(out: Path, device_kind: str) -> int:
    try:
        from transformers import (  # noqa: PLC0415
            GPT2Config,
            GPT2LMHeadModel,
            Trainer,
            TrainerCallback,
            TrainingArguments,
        )
    except ImportError:
        print("RESULT " + json.dumps({"skipped": "transformers is not installed"}), flush=True)
        return 0
    import safetensors.torch  # noqa: PLC0415

    from ckptguard.integrations.transformers import protect  # noqa: PLC0415

    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=512, n_positions=32, n_embd=256, n_layer=2, n_head=4)
    )
    g = torch.Generator().manual_seed(1)
    data = [
        {"input_ids": row, "labels": row} for row in torch.randint(0, 512, (48, 32), generator=g)
    ]
    args = TrainingArguments(
        output_dir=str(out), max_steps=12, save_strategy="steps", save_steps=4,
        per_device_train_batch_size=4, use_cpu=device_kind == "cpu", report_to=[], seed=0,
        data_seed=0, disable_tqdm=True, logging_strategy="no",
    )  # fmt: skip
    recorded: dict[int, dict[str, Any]] = {}
    # The background write of each save (but the last) is held until the next step's
    # optimizer has changed the weights and moments in place on the device.
    go = threading.Event()
    go.set()

    def hold(name: str) -> None:
        if name == "deferred.write" and threading.current_thread() is not threading.main_thread():
            go.wait(60)

    _faults.set_fault_hook(hold)

    class Record(TrainerCallback):
        """At the end of a step that saves, what its checkpoint must hold (the save comes
        next, with no change in between). Not on_save: protect() makes an async save wait
        for its commit when a callback acts on_save (it may read the files)."""

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            del control
            if state.global_step - 1 in recorded:
                go.set()  # this step changed what the save in flight holds
            if state.global_step % args.save_steps == 0:
                opt_state = kwargs["optimizer"].state_dict()["state"]
                recorded[state.global_step] = {
                    "weights": _copy(kwargs["model"].state_dict()),
                    "exp_avg": {str(k): _copy(v["exp_avg"]) for k, v in opt_state.items()},
                }
                if state.global_step < args.max_steps:
                    go.clear()  # this step's save is about to start: hold its write

    trainer = protect(Trainer(model=model, args=args, train_dataset=data), async_save=True)
    trainer.add_callback(Record())
    trainer.train()
    _faults.set_fault_hook(None)
    trained: Any = trainer.model
    device = str(next(trained.parameters()).device)
    failed, verified = [], []
    for step, want in sorted(recorded.items()):
        ckpt = out / f"checkpoint-{step}"
        verified.append(ckptguard.verify(ckpt).ok)
        weights = safetensors.torch.load_file(ckpt / "model.safetensors")
        moments = torch.load(ckpt / "optimizer.pt", weights_only=True, map_location="cpu")
        same = all(_same_bits(want["weights"][k], v) for k, v in weights.items())
        got = {str(k): v["exp_avg"] for k, v in moments["state"].items()}
        if not (same and len(weights) >= 10 and _same_bits(want["exp_avg"], got)):
            failed.append(step)
    result = {
        "device": device,
        "steps_saved": sorted(recorded),
        "every_checkpoint_verified": len(verified) == 3 and all(verified),
        "holds_the_saved_moment": len(recorded) == 3 and not failed,
        "failed_steps": failed,
    }
    print("RESULT " + json.dumps(result), flush=True)
    return 0


# -- the torchrun child of check_distributed --------------------------------------------------
def _dist_replicated(root: Path, device: torch.device) -> dict[str, Any]:
    import torch.distributed as dist  # noqa: PLC0415

    torch.manual_seed(5)  # replicated state: identical on every rank
    state = {"w": torch.randn(1024, 65).to(device), "h": torch.randn(33).bfloat16().to(device)}
    expected = _copy(state)
    mgr = _manager(root / "replicated")
    info = mgr.save(1, {"s": state}, metadata={"world": dist.get_world_size()}, blocking=True)
    target = {k: torch.zeros_like(v) for k, v in state.items()}
    mgr.restore(1, target={"s": target})
    mgr.close()
    return {
        "committed": info.valid,
        "same_checkpoint_on_every_rank": _same_path_everywhere(info.path),
        "bit_exact_into_device_targets": _same_bits(expected, _copy(target))
        and all(t.device == device for t in target.values()),
    }


def _same_path_everywhere(path: str) -> bool:
    import torch.distributed as dist  # noqa: PLC0415

    paths: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(paths, path)
    return len(set(paths)) == 1


def _dist_async(root: Path, device: torch.device) -> dict[str, Any]:
    import torch.distributed as dist  # noqa: PLC0415

    w = torch.full((1 << 18,), 1.0, device=device)
    mgr = _manager(root / "async", keep_last=None, async_save=True)
    pending = mgr.save(1, {"w": w}, blocking=False)
    # training goes on at once: a collective on the training's group, and the tensor the
    # save is writing changes under it
    total = torch.ones(1, device=device)
    dist.all_reduce(total)
    w.add_(1.0)
    info = pending.result()
    restored = mgr.restore(1)
    mgr.close()
    return {
        "committed": info.valid,
        "collective_ran": int(total.item()) == dist.get_world_size(),
        "holds_old_values": bool(torch.all(restored["w"] == 1.0)),
        "stall_s": pending.stall_seconds,
    }


def _dist_fsdp2(root: Path, device: torch.device) -> dict[str, Any]:
    import torch.distributed as dist  # noqa: PLC0415
    from torch.distributed.checkpoint.state_dict import (  # noqa: PLC0415
        get_state_dict,
        set_state_dict,
    )
    from torch.distributed.device_mesh import init_device_mesh  # noqa: PLC0415
    from torch.distributed.fsdp import fully_shard  # noqa: PLC0415

    width = 1024 if device.type == "cuda" else 64
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))

    def build(seed: int) -> tuple[nn.Sequential, torch.optim.Optimizer]:
        model = _mlp(seed, width, device)
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3)

    def full(model: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.full_tensor().detach().cpu().clone() for k, v in model.state_dict().items()}

    model, opt = build(4)
    _train(model, opt, 2, width)
    saved = full(model)
    msd, osd = get_state_dict(model, opt)
    mgr = _manager(root / "fsdp2")
    mgr.save(2, {"model": msd, "optim": osd}, sharded=True)
    fresh, fresh_opt = build(5)
    _train(fresh, fresh_opt, 1, width)
    before = full(fresh)
    target_m, target_o = get_state_dict(fresh, fresh_opt)
    mgr.restore(target={"model": target_m, "optim": target_o})  # DCP loads in place
    set_state_dict(fresh, fresh_opt, model_state_dict=target_m, optim_state_dict=target_o)
    after = full(fresh)
    mgr.close()
    _train(model, opt, 1, width)  # and training goes on identically from both
    _train(fresh, fresh_opt, 1, width)
    return {
        "differed_before_restore": not _same_bits(saved, before),
        "bit_exact": _same_bits(saved, after),
        "continues_identically": _same_bits(full(model), full(fresh)),
        "verified": ckptguard.verify(root / "fsdp2" / "checkpoint-2").ok,
    }


def dist_child(reports: Path, root: Path, device_kind: str) -> int:
    import torch.distributed as dist  # noqa: PLC0415

    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device_kind == "cuda":
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    init: dict[str, Any] = {"backend": backend, "timeout": timedelta(seconds=PG_TIMEOUT_S)}
    if backend == "nccl":
        init["device_id"] = device  # binds the communicator to this rank's GPU
    dist.init_process_group(**init)
    report: dict[str, Any] = {"rank": rank, "world_size": dist.get_world_size()}
    for name, fn in (("replicated", _dist_replicated), ("async", _dist_async),
                     ("fsdp2", _dist_fsdp2)):  # fmt: skip
        try:
            report[name] = fn(root, device)
        except Exception as exc:  # reported per check; the others still run
            report[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                            "traceback": traceback.format_exc()[-3000:]}  # fmt: skip
    (reports / f"rank{rank}.json").write_text(json.dumps(report, indent=2))
    dist.barrier()
    dist.destroy_process_group()
    return 0


# -- the driver ---------------------------------------------------------------------------
CHECKS: dict[str, Callable[[Ctx, Path], dict[str, Any]]] = {
    "model_adam": check_model_adam,
    "stall": check_stall,
    "every_device": check_every_device,
    "low_precision": check_low_precision,
    "async_isolation": check_async_isolation,
    "distributed": check_distributed,
    "trainer_async": check_trainer_async,
}


def run_check(name: str, ctx: Ctx, work: Path) -> dict[str, Any]:
    start = time.perf_counter()
    try:
        result = CHECKS[name](ctx, work / name)
        flags = result.pop("ok_flags")
        result["failed"] = [k for k in flags if result.get(k) is not True]
        result["ok"] = not result["failed"]
    except Exception as exc:  # reported per check; the others still run
        result = {
            "ok": False,
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc()[-3000:],
        }
    result["seconds"] = time.perf_counter() - start
    return result


def _summary(name: str, result: dict[str, Any]) -> str:
    if "error" in result:
        return str(result["error"])[:100]
    if result["failed"]:
        return "failed: " + ", ".join(result["failed"])
    if name == "stall":
        dcp = result.get("ours_vs_dcp.async_save")
        return (
            f"{result['state_mib']:.0f} MiB: stall {result['stall_vs_floor']:.2f}x the copy "
            f"(target <= {STALL_TARGET}: {'met' if result['stall_target_met'] else 'NOT met'})"
            + (f", {dcp:.2f}x dcp.async_save" if dcp is not None else "")
        )
    if name == "distributed":
        return f"{result['ranks']} rank(s) on {result['backend']}"
    if name == "async_isolation":
        return (
            f"blocked {result['racing_save_blocked_s'] * 1e3:.1f} ms of a "
            f"{result['racing_save_total_s']:.2f} s save"
        )
    if name == "trainer_async":
        if "skipped" in result:
            return f"skipped: {result['skipped']}"
        return f"steps {result['steps_saved']} on {result['device']}"
    if name == "every_device":
        return ", ".join(result["devices"])
    if name == "low_precision":
        return ", ".join(result["dtypes"])
    return ""


def print_report(report: dict[str, Any]) -> None:
    print(f"\n  {'check':18} {'result':6} {'s':>6}  notes")
    for name, result in report["checks"].items():
        verdict = "FAIL" if not result["ok"] else "skip" if "skipped" in result else "ok"
        print(f"  {name:18} {verdict:6} {result['seconds']:6.1f}  {_summary(name, result)}")
    stall = report["checks"].get("stall", {})
    if "methods" in stall:
        print(f"\n  async stall, {stall['rounds']} interleaved rounds (medians):")
        for method, row in stall["methods"].items():
            print(
                f"    {method:45} {row['stall_median_s'] * 1e3:9.2f} ms "
                f"(min {row['stall_min_s'] * 1e3:.2f}, max {row['stall_max_s'] * 1e3:.2f}); "
                f"until written {row['total_median_s']:.2f} s"
            )


def machine(ctx: Ctx) -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ckptguard": ckptguard.__version__,
        "device": ctx.device,
        "cuda_available": torch.cuda.is_available(),
    }
    if ctx.cuda:
        info |= {
            "cuda": torch.version.cuda,
            "gpus": [torch.cuda.get_device_name(d) for d in ctx.devices],
            "nccl": ".".join(map(str, torch.cuda.nccl.version())),  # type: ignore[no-untyped-call]
        }
    return info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--mib", type=int, default=None, help="stall state (cuda 1024, cpu 64)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--only", default=",".join(CHECKS))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: tmp)")
    parser.add_argument("--deadline", type=float, default=285.0, help="watchdog, seconds")
    parser.add_argument("--dist-child", nargs=2, metavar=("REPORTS", "ROOT"))
    parser.add_argument("--trainer-child", type=Path, metavar="OUT")
    args = parser.parse_args()
    if args.dist_child:
        return dist_child(Path(args.dist_child[0]), Path(args.dist_child[1]), args.device)
    if args.trainer_child:
        return trainer_child(args.trainer_child, args.device)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            f"device-check: found no CUDA device (torch {torch.__version__}, built for CUDA "
            f"{torch.version.cuda}): nothing to check. `--device cpu` runs the same checks "
            "on the CPU."
        )
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"cuda_available": False}, indent=2))
        return 0
    # Never hang: after the deadline, dump every thread's stack and exit (the JSON so far
    # is on disk: it is rewritten after each check).
    faulthandler.dump_traceback_later(args.deadline, exit=True)
    cuda = args.device == "cuda"
    ctx = Ctx(
        device=args.device,
        devices=[torch.device("cuda", i) for i in range(torch.cuda.device_count())]
        if cuda else [torch.device("cpu")],
        pinned=torch.cuda.is_available(),
        mib=args.mib or (1024 if cuda else 64),
        rounds=args.rounds,
        deadline_at=time.monotonic() + args.deadline,
    )  # fmt: skip
    report: dict[str, Any] = {"machine": machine(ctx), "checks": {}}
    print(f"device-check on {ctx.device}: {', '.join(map(str, ctx.devices))}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="ckptguard-device-", dir=args.dir))
    try:
        for name in args.only.split(","):
            print(f"  {name} ...", flush=True)
            report["checks"][name] = run_check(name, ctx, work)
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(report, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    faulthandler.cancel_dump_traceback_later()
    print_report(report)
    if args.json:
        print(f"wrote {args.json}")
    return 0 if all(r["ok"] for r in report["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
