"""Child process of test_crash.py: one save that SIGKILLs itself at a named fault point.

Usage: python crash_child.py ROOT NAME IF_EXISTS POINT MARKER
Writes MARKER (the point's name) just before killing itself, so the parent can tell
that the point was really reached.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import ckptguard
from ckptguard._protocol.strategy import IfExists
from ckptguard._storage.faults import set_fault_hook


def main() -> None:
    root, name, if_exists, point, marker = sys.argv[1:6]

    def hook(reached: str) -> None:
        if reached == point:
            Path(marker).write_text(reached)
            os.kill(os.getpid(), signal.SIGKILL)

    set_fault_hook(hook)
    policies: dict[str, IfExists] = {"keep": "keep", "replace": "replace", "error": "error"}
    with ckptguard.atomic_checkpoint(Path(root) / name, if_exists=policies[if_exists]) as staging:
        (staging / "weights.bin").write_bytes(os.urandom(256 * 1024))
        (staging / "sub").mkdir()
        (staging / "sub" / "state.json").write_text('{"writer": "child"}')
    print("no kill happened", file=sys.stderr)
    sys.exit(3)


if __name__ == "__main__":
    main()
