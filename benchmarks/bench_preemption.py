"""Saves on preemption: what the agreement costs per step, and signal-to-commit time.

    python benchmarks/bench_preemption.py [--mib 100] [--rounds 3] [--calls 2000]
        [--json benchmarks/results/preemption-latest.json]

1. ``mgr.preemption_requested(step)`` per call (µs), 1 process and 2 gloo ranks under
   torchrun, with ``check_every`` 1 (the default) and 10: the median of batches of calls
   with no signal pending (the steady state of a training loop); for reference, a gloo
   ``all_reduce(max)`` of one int on a side group (what ckptguard does not use: see
   ``_manager/preemption.py``).
2. From the signal (a rank sends itself SIGTERM just before a step boundary) to the
   committed checkpoint of that step, ``--mib`` MiB of state, sync save, in a fresh
   process each round (a signal is a one-shot): 1 process, and 2 ranks with the signal to
   rank 1 (rank 0 commits). Median and minimum over ``--rounds``.

Each measurement runs in a child (``--child``), launched by torchrun for 2 ranks.
"""

from __future__ import annotations

import argparse
import json
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
    # Two ranks share torchrun's stdout: their lines may run together ("{...}{...}").
    lines: list[dict[str, Any]] = []
    decoder = json.JSONDecoder()
    for text in done.stdout.splitlines():
        at = text.find("{")
        while at != -1:
            value, end = decoder.raw_decode(text, at)
            lines.append(value)
            at = text.find("{", end)
    if not lines:
        raise RuntimeError(f"child failed ({done.returncode}): {done.stderr[-3000:]}")
    return lines


# -- children ---------------------------------------------------------------------------------
def _child_vote(calls: int, check_every: int) -> None:
    import torch.distributed as dist  # noqa: PLC0415

    import ckptguard  # noqa: PLC0415

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
        _gloo_reference(calls)
    with tempfile.TemporaryDirectory() as root:
        policy = ckptguard.Preemption(check_every=check_every)
        mgr = ckptguard.CheckpointManager(root, preemption=policy, check_environment=False)
        batch = max(1, calls // 20)
        per_call = []
        step = 0
        for _ in range(20):
            started = time.perf_counter()
            for _ in range(batch):
                step += 1
                if mgr.preemption_requested(step):
                    raise RuntimeError("no signal was sent")
            per_call.append((time.perf_counter() - started) / batch * 1e6)
        mgr.close()
    rank = int(os.environ.get("RANK", "0"))
    print(json.dumps({"rank": rank, "us_per_call": statistics.median(per_call)}), flush=True)
    _exit(0)


def _gloo_reference(calls: int) -> None:
    """For comparison: a gloo all_reduce(max) of one int per call on a side group."""
    import torch  # noqa: PLC0415
    import torch.distributed as dist  # noqa: PLC0415

    group = dist.new_group(backend="gloo")
    flag = torch.zeros(1, dtype=torch.int32)
    per_call = []
    for _ in range(20):
        started = time.perf_counter()
        for _ in range(max(1, calls // 20)):
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        per_call.append((time.perf_counter() - started) / max(1, calls // 20) * 1e6)
    rank = int(os.environ.get("RANK", "0"))
    print(json.dumps({"rank": rank, "gloo_us_per_call": statistics.median(per_call)}), flush=True)


def _child_commit(mib: int, root: str) -> None:
    import torch  # noqa: PLC0415
    import torch.distributed as dist  # noqa: PLC0415

    import ckptguard  # noqa: PLC0415

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = int(os.environ.get("RANK", "0"))
    mgr = ckptguard.CheckpointManager(root, keep_last=None, preemption=True)
    state: dict[str, Any] = {"w": torch.randn(mib * 2**20 // 4), "step": 0}
    signalled_at = None
    for step in range(1, 100):
        state["w"].add_(1.0)
        state["step"] = step
        if step == 3 and rank == world - 1:
            signalled_at = time.time()
            os.kill(os.getpid(), signal.SIGTERM)
        if mgr.preemption_requested(step):
            info = mgr.save(step, state)
            committed_at = time.time()
            result = {"rank": rank, "step": info.step, "committed_at": committed_at}
            if signalled_at is not None:
                result["signalled_at"] = signalled_at
            print(json.dumps(result), flush=True)
            mgr.close()
            _exit(0)
    raise RuntimeError("the preemption was never agreed")


def _exit(code: int) -> None:
    """Skip the interpreter's shutdown with a gloo group up (see hf_driver._exit)."""
    sys.stdout.flush()
    os._exit(code)


# -- the parent -------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", choices=["vote", "commit"], default=None)
    ap.add_argument("--check-every", type=int, default=1)
    ap.add_argument("--root", default=None)
    opts = ap.parse_args()
    if opts.child == "vote":
        _child_vote(opts.calls, opts.check_every)
    if opts.child == "commit":
        _child_commit(opts.mib, opts.root)

    report: dict[str, Any] = {"vote_us_per_call": {}, "signal_to_commit_s": {}, "mib": opts.mib}
    for nproc in (1, 2):
        for every in (1, 10):
            lines = _launch(
                nproc, "--child", "vote", "--calls", str(opts.calls), "--check-every", str(every)
            )
            worst = max(line["us_per_call"] for line in lines if "us_per_call" in line)
            report["vote_us_per_call"][f"ranks={nproc} check_every={every}"] = round(worst, 2)
            print(f"agreement, {nproc} rank(s), check_every={every}: {worst:.1f} µs per call")
            gloo = [line["gloo_us_per_call"] for line in lines if "gloo_us_per_call" in line]
            if gloo and every == 1:
                report["gloo_all_reduce_us_per_call"] = round(max(gloo), 2)
                print(f"  (reference: gloo all_reduce of one int, {max(gloo):.1f} µs per call)")
    for nproc in (1, 2):
        took = []
        for _ in range(opts.rounds):
            with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as root:
                lines = _launch(nproc, "--child", "commit", "--mib", str(opts.mib), "--root", root)
            signalled = next(x["signalled_at"] for x in lines if "signalled_at" in x)
            committed = max(x["committed_at"] for x in lines)
            took.append(committed - signalled)
        report["signal_to_commit_s"][f"ranks={nproc}"] = {
            "median": round(statistics.median(took), 3),
            "min": round(min(took), 3),
            "runs": [round(t, 3) for t in took],
        }
        print(
            f"signal to committed checkpoint, {nproc} rank(s), {opts.mib} MiB: "
            f"median {statistics.median(took):.3f} s, min {min(took):.3f} s"
        )
    if opts.json:
        Path(opts.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
