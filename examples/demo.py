"""ckptguard demo: a save killed with SIGKILL half-way never becomes a checkpoint.

1. commits checkpoint-1..3 through ``atomic_checkpoint``;
2. starts a child that saves checkpoint-4 and SIGKILLs it half-way through a file;
3. for contrast, a child that writes straight into checkpoint-5 (as Trainer does today)
   is killed the same way;
4. runs ``recover`` and shows what it found, then commits checkpoint-4 for real.

Usage: python examples/demo.py [ROOT]   (default: ./demo-run, wiped first)
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import ckptguard

CHUNK = 1024 * 1024


def write_checkpoint(directory: Path, step: int) -> None:
    """What a training script would write: weights and a small state file."""
    with (directory / "weights.bin").open("wb") as f:
        for i in range(8):
            f.write(bytes([step + i]) * CHUNK)
            if i == 3 and os.environ.get("DEMO_STOP_HALFWAY"):
                f.flush()
                print("HALFWAY", flush=True)
                sys.stdin.readline()  # wait here until the parent kills us
    (directory / "trainer_state.json").write_text(f'{{"global_step": {step}}}\n')


def child(root: Path, mode: str, step: int) -> None:
    if mode == "ckptguard":
        with ckptguard.atomic_checkpoint(root / f"checkpoint-{step}") as staging:
            write_checkpoint(staging, step)
    else:  # the unprotected way: write straight into the final directory
        target = root / f"checkpoint-{step}"
        target.mkdir()
        write_checkpoint(target, step)


def kill_halfway(root: Path, mode: str, step: int) -> None:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", str(root), mode, str(step)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "DEMO_STOP_HALFWAY": "1"},
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line != "HALFWAY":
        proc.kill()
        raise SystemExit(f"demo child did not reach the middle of its save: {line!r}")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    print(f"  killed pid {proc.pid} with SIGKILL half-way through checkpoint-{step} ({mode})")


def show(root: Path) -> None:
    for name in sorted(os.listdir(root)):
        print(f"    {name}/")
    staging = root / ".ckptguard" / "staging"
    for name in sorted(os.listdir(staging)):
        print(f"    .ckptguard/staging/{name}/")


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "demo-run").resolve()
    shutil.rmtree(root, ignore_errors=True)
    print(f"ckptguard demo in {root}\n")

    print("1. three checkpoints committed atomically")
    for step in (1, 2, 3):
        tx = ckptguard.atomic_checkpoint(root / f"checkpoint-{step}")
        with tx as staging:
            write_checkpoint(staging, step)
        assert tx.result is not None
        print(f"  checkpoint-{step}: {tx.result.outcome}")

    print("\n2. a save through ckptguard, killed half-way")
    kill_halfway(root, "ckptguard", 4)
    print("\n3. for contrast, a save written straight into its folder, killed half-way")
    kill_halfway(root, "unprotected", 5)

    print("\n  what is on disk now:")
    show(root)
    print("  a 'resume from the highest checkpoint-N' would now pick the half-written")
    print("  checkpoint-5; ckptguard's own checkpoint-4 never became visible.\n")

    print("4. recover(): classify every entry, repair what the crash left")
    report = ckptguard.recover(root)
    for entry in report.entries:
        detail = f"  ({entry.detail})" if entry.detail else ""
        print(f"  {entry.kind:18} {os.path.relpath(entry.path, root)}{detail}")
    for action in report.actions:
        print(f"  repaired: {action}")
    latest = report.latest
    assert latest is not None
    print(f"\n  resume from: {latest.name} (the newest checkpoint that verifies)")
    assert latest.name == "checkpoint-3"

    print("\n5. checkpoint-4 saved again, this time to completion")
    with ckptguard.atomic_checkpoint(root / "checkpoint-4") as staging:
        write_checkpoint(staging, 4)
    verified = ckptguard.verify(root / "checkpoint-4")
    print(
        f"  verify checkpoint-4: ok={verified.ok}, {verified.files_checked} files, "
        f"{verified.bytes_checked} bytes checked"
    )
    final = ckptguard.scan(root)
    valid = ", ".join(e.name for e in final.valid)
    print(f"  valid checkpoints: {valid}")
    print(f"  staging left behind: {os.listdir(root / '.ckptguard' / 'staging')}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
    else:
        main()
