from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from typing import TYPE_CHECKING

import pytest
from hypothesis import settings

from ckptguard._format.owner import WriterInfo, current_writer
from s3_servers import S3Server, start_moto

if TYPE_CHECKING:
    from collections.abc import Iterator


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A moto S3 server on 127.0.0.1 for the module's tests, stopped by PID after them.

    (Modules that define their own ``moto`` fixture use theirs.)
    """
    server = start_moto(tmp_path_factory.mktemp("moto"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def dead_writer() -> WriterInfo:
    """WriterInfo of a process on this machine that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return dataclasses.replace(current_writer(), pid=proc.pid, pid_start=1)


# CI runs a fixed sequence of examples, so that a landing never depends on the luck of a
# random seed; local runs explore new examples every time (and keep failures in .hypothesis).
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The long exit-abort loop and the heavier variants run only when asked (``make chaos``).

    Deselected, not skipped: a skipped test would read as a test that passed.
    """
    wanted = set()
    if int(os.environ.get("CKPTGUARD_EXIT_LOOP", "0") or 0) > 0:
        wanted.add("exit_loop")
    if os.environ.get("CKPTGUARD_CHAOS") == "1":  # heavier variants (make chaos)
        wanted.add("chaos")
    held = {"exit_loop", "chaos"} - wanted
    keep = [i for i in items if not any(i.get_closest_marker(m) for m in held)]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if i not in keep])
        items[:] = keep
