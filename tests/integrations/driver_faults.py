"""``--kill-at POINT:N`` for the training drivers: SIGKILL at a commit-protocol step.

The drivers (hf_driver.py, accel_driver.py, lightning_driver.py) run as scripts, so this
module is imported from their own directory.
"""

from __future__ import annotations

import os
import signal

from ckptguard._storage import faults as _faults


def kill_at(spec: str) -> None:
    """SIGKILL this process the Nth time it reaches fault point POINT (``"POINT:N"``)."""
    point, nth = spec.rsplit(":", 1)
    seen = [0]

    def hook(name: str) -> None:
        if name == point:
            seen[0] += 1
            if seen[0] == int(nth):
                os.kill(os.getpid(), signal.SIGKILL)

    _faults.set_fault_hook(hook)


def fail_at(spec: str) -> None:
    """Raise ENOSPC the Nth time this process reaches fault point POINT (``"POINT:N"``)."""
    import errno

    point, nth = spec.rsplit(":", 1)
    seen = [0]
    previous = _faults.set_fault_hook(None)

    def hook(name: str) -> None:
        if previous is not None:
            previous(name)
        if name == point:
            seen[0] += 1
            if seen[0] == int(nth):
                raise OSError(errno.ENOSPC, "No space left on device (injected)")

    _faults.set_fault_hook(hook)
