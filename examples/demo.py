"""ckptguard demo: a training run killed in the middle of a save resumes exactly.

1. trains a small PyTorch model on generated data, saving every 10 steps through
   CheckpointManager; the run SIGKILLs itself in the middle of the save at step 40;
2. restarts: the manager repairs the root, resumes from the newest checkpoint that
   verifies, and says which one and why; the run finishes;
3. compares the final weights with an uninterrupted run (bit-identical), and
4. shows `ckptguard list` of the run.

Usage: python examples/demo.py [WORKDIR]   (default: ./demo-run, wiped first)
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

STEPS, SAVE_EVERY, KILL_AT = 60, 10, 40


def train(root: Path, kill_at: int | None) -> None:
    """The training script: resume if possible, train, save every SAVE_EVERY steps."""
    import torch  # noqa: PLC0415 - the parent process does not need torch

    import ckptguard  # noqa: PLC0415
    from ckptguard._storage.faults import set_fault_hook  # noqa: PLC0415

    logging.basicConfig(level=logging.WARNING, format="    [log] %(message)s")
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(mode=True)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(64, 1)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=20, gamma=0.5)
    true_w = torch.linspace(-1, 1, 16)
    mgr = ckptguard.CheckpointManager(root, keep_last=3, best_metric="loss")
    start = 0
    if mgr.latest() is not None:
        state = mgr.restore(target={"model": model, "optimizer": opt, "scheduler": sched})
        ckptguard.restore_rng_state(state["rng"])
        start = state["step"]
        print(f"  resumed from checkpoint-{start}: the newest checkpoint that verifies")
    else:
        print("  no checkpoint yet: starting from scratch")

    if kill_at is not None:

        def die_mid_save(point: str) -> None:
            if point == "seal.files_synced" and current_step == kill_at:
                print(f"  step {kill_at}: files written, manifest not yet -> SIGKILL", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)

        set_fault_hook(die_mid_save)

    for current_step in range(start + 1, STEPS + 1):
        x = torch.randn(32, 16)
        y = x @ true_w + 0.1 * torch.randn(32)
        loss = torch.nn.functional.mse_loss(model(x).squeeze(-1), y)
        opt.zero_grad()
        torch.autograd.backward(loss)
        opt.step()
        sched.step()
        if current_step % SAVE_EVERY == 0:
            state = {
                "model": model,
                "optimizer": opt,
                "scheduler": sched,
                "rng": ckptguard.capture_rng_state(),
                "step": current_step,
            }
            mgr.save(current_step, state, metrics={"loss": loss.item()})
            print(f"  step {current_step}: loss {loss.item():.4f}, saved checkpoint-{current_step}")


def run_child(root: Path, *extra: str) -> int:
    proc = subprocess.run([sys.executable, __file__, "--train", str(root), *extra], check=False)
    return proc.returncode


def _same(a: object, b: object) -> bool:
    """Bit-identical trees of tensors and plain values."""
    import torch  # noqa: PLC0415

    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def main() -> None:
    import ckptguard  # noqa: PLC0415

    work = Path(sys.argv[1] if len(sys.argv) > 1 else "demo-run").resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    run = work / "run"
    print(f"ckptguard demo in {work}\n")

    print(f"1. training for {STEPS} steps, saving every {SAVE_EVERY}; killed during save {KILL_AT}")
    code = run_child(run, "--kill-at", str(KILL_AT))
    print(f"  (the process ended with signal {-code})" if code < 0 else f"  exit code {code}")
    staging = sorted(os.listdir(run / ".ckptguard" / "staging"))
    print(f"  on disk: {sorted(n for n in os.listdir(run) if not n.startswith('.'))}")
    print(f"  left in staging by the killed save: {staging}\n")

    print("2. restart: the same command, which resumes")
    run_child(run)

    print("\n3. the same training without any interruption, for comparison")
    reference = work / "reference"
    run_child(reference)
    a = ckptguard.CheckpointManager(run).restore(step=STEPS)
    b = ckptguard.CheckpointManager(reference).restore(step=STEPS)
    same = _same(a["model"], b["model"]) and _same(a["optimizer"], b["optimizer"])
    print(
        f"  model and optimizer at step {STEPS} equal the uninterrupted run's, bit for bit: {same}"
    )
    if not same:
        raise SystemExit("the resumed run diverged")

    print("\n4. ckptguard list")
    sys.stdout.flush()
    subprocess.run([sys.executable, "-m", "ckptguard", "list", "--checksums", str(run)], check=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--train":
        kill = int(sys.argv[4]) if len(sys.argv) > 4 and sys.argv[3] == "--kill-at" else None
        train(Path(sys.argv[2]), kill)
    else:
        main()
