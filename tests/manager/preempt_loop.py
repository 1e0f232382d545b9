"""A plain training loop that saves on preemption (``CheckpointManager(preemption=...)``).

    python tests/manager/preempt_loop.py OUT [--steps 12] [--save-every 4]
        [--signal-at STEP] [--signal-rank R] [--signal SIGTERM] [--grace S] [--off]
        [--local-only] [--stuck] [--async]

Under torchrun (gloo) every rank runs it. It resumes from the newest checkpoint that
verifies (prints ``resumed from step N``), then at each step changes a replicated state
deterministically; ``--signal-at K`` makes rank ``--signal-rank`` send itself the signal
just before step K's boundary. The loop is the documented recipe::

    if mgr.preemption_requested(step):
        mgr.save(step, state)
        mgr.exit_preempted()

``--off``: no preemption handling (the manager's default). ``--local-only`` (the control):
each rank acts on its own signal alone (no agreement), as a per-process handler would.
``--async``: every save is an async save. ``--stuck``: after the signal, start an async
save of that step and block forever (the grace fallback must end the process). At the
end rank 0 writes ``OUT/final.json`` (step and the state's bytes, hex).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
from typing import Any

import torch
import torch.distributed as dist

import ckptguard
from ckptguard._manager import preemption


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--save-every", type=int, default=4)
    ap.add_argument("--signal-at", type=int, default=None)
    ap.add_argument("--signal-rank", type=int, default=0)
    ap.add_argument("--signal", default="SIGTERM")
    ap.add_argument("--grace", type=float, default=20.0)
    ap.add_argument("--off", action="store_true")
    ap.add_argument("--local-only", action="store_true")
    ap.add_argument("--stuck", action="store_true")
    ap.add_argument("--async", dest="async_save", action="store_true")
    opts = ap.parse_args()
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.WARNING, format=f"rank{rank}: %(message)s")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
    policy = ckptguard.Preemption(signals=(opts.signal,), grace=opts.grace)
    mgr = ckptguard.CheckpointManager(
        opts.out, keep_last=None, async_save=opts.async_save, preemption=not opts.off and policy
    )
    state: dict[str, Any] = {"w": torch.zeros(1000, dtype=torch.float64), "step": 0}
    start = 0
    if mgr.latest() is not None:
        state = mgr.restore(target=state)
        start = int(state["step"])
    if rank == 0:
        print(f"resumed from step {start}", flush=True)
    for step in range(start + 1, opts.steps + 1):
        state["w"].mul_(0.99).add_(step)
        state["step"] = step
        if step == opts.signal_at and rank == opts.signal_rank:
            os.kill(os.getpid(), policy.signals[0])
            if opts.stuck:  # an async save in flight, and a loop that never gets further
                mgr.save(step, state, blocking=False)
                threading.Event().wait()
        if opts.local_only:
            stop = bool(preemption.received())
        else:
            stop = not opts.off and mgr.preemption_requested(step)
        if stop:
            mgr.save(step, state)
            mgr.exit_preempted()
        if step % opts.save_every == 0:
            mgr.save(step, state)
    if rank == 0:
        final = {"step": state["step"], "w": state["w"].numpy().tobytes().hex()}
        with open(os.path.join(opts.out, "final.json"), "w") as f:
            json.dump(final, f)
    mgr.close()
    return 0


def _exit(code: int | str | None) -> None:
    """Exit; with a gloo group up, skip the interpreter's shutdown (see hf_driver._exit)."""
    if dist.is_available() and dist.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code if isinstance(code, int) else 1)
    sys.exit(code)


if __name__ == "__main__":
    try:
        _exit(main())
    except SystemExit as done:  # exit_preempted's code
        _exit(done.code)
