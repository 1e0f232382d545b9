"""Who wrote a save, and whether that writer is still alive.

A staging directory records its owner (host, pid, the pid's start time, the boot id and
the pid namespace). Cleanup removes a staging dir only when its owner is provably dead:
- same kernel and pid namespace (boot id and pid namespace equal; the hostname is not
  evidence: it can change under a running machine or differ between containers that
  share one kernel) and the pid is gone or now belongs to a process that started at
  another time (pid reuse);
- or, when the owner is on another machine or cannot be identified, the staging dir has
  not changed for longer than a grace period (partial: a writer on another host that
  stalls longer than the grace period can lose its staging; the grace period is a
  setting for that reason).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from functools import cache
from typing import Any

__all__ = ["WriterInfo", "current_writer", "is_alive_here", "process_start_time"]


@cache
def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return None


@cache
def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def process_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (Linux), or None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses; fields after the
    # last ')' are fixed. starttime is field 22, i.e. index 19 after the ')'.
    fields = stat.rsplit(")", 1)[-1].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


@dataclass(frozen=True)
class WriterInfo:
    """The process that wrote a save, and the ranks it wrote for."""

    host: str
    pid: int
    pid_start: int | None = None
    boot_id: str | None = None
    pid_namespace: str | None = None
    ranks: tuple[int, ...] = (0,)
    world_size: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "pid": self.pid,
            "pid_start": self.pid_start,
            "boot_id": self.boot_id,
            "pid_namespace": self.pid_namespace,
            "ranks": list(self.ranks),
            "world_size": self.world_size,
            "extra": dict(self.extra),
        }


def current_writer(ranks: tuple[int, ...] = (0,), world_size: int = 1) -> WriterInfo:
    """WriterInfo of this process."""
    pid = os.getpid()
    return WriterInfo(
        host=socket.gethostname(),
        pid=pid,
        pid_start=process_start_time(pid),
        boot_id=_boot_id(),
        pid_namespace=_pid_namespace(),
        ranks=ranks,
        world_size=world_size,
    )


def is_alive_here(writer: WriterInfo) -> bool | None:
    """True/False if ``writer`` ran on this machine and is alive/dead; None if we cannot tell."""
    here_boot, here_ns = _boot_id(), _pid_namespace()
    # A boot id is a random 128-bit id of this kernel's boot: equal boot ids and pid
    # namespaces mean the same pid numbers, whatever the hostname says (issue 15: after a
    # hostname change a dead writer's staging was kept for stale_after).
    if (
        here_boot is None
        or writer.boot_id is None
        or here_ns is None
        or writer.pid_namespace != here_ns
    ):
        return None
    if writer.boot_id != here_boot:
        # Same hostname and namespace id but another boot: could be a reboot of this
        # machine or a twin container elsewhere; only the age rule may decide.
        return None
    start = process_start_time(writer.pid)
    if start is None:
        return False
    return writer.pid_start is None or start == writer.pid_start
