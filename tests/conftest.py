from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from ckptguard.owner import WriterInfo, current_writer


@pytest.fixture
def dead_writer() -> WriterInfo:
    """WriterInfo of a process on this machine that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return dataclasses.replace(current_writer(), pid=proc.pid, pid_start=1)
