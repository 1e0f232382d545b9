"""Background runs of the training drivers, shared by the integration tests.

Each test module binds a driver script: ``class Job(driver_jobs.Job): driver = DRIVER``.
Output goes to files (no pipe can fill up); a run left going by a failed test is killed
with its torchrun workers.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, ClassVar

# Children may import whatever warns (frameworks' deprecations are not under test here); one
# thread each, as torchrun sets for its workers: two runs share this machine's cores.
CHILD_ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
RUN_TIMEOUT = 240


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class Done:
    """A finished run: its exit status and output."""

    out: Path
    returncode: int
    stdout: str
    stderr: str

    def ok(self) -> Done:
        assert self.returncode == 0, self.stderr[-4000:]
        return self

    @property
    def resumed_from(self) -> str:
        """What the driver printed after "resumed from step" (a step or checkpoint number)."""
        match = re.search(r"^resumed from step (\S+)", self.stdout, re.MULTILINE)
        assert match is not None, self.stdout
        return match.group(1)

    @property
    def final(self) -> bytes:
        return (self.out / "final.json").read_bytes()


class Job:
    """A driver run in the background (its output goes to files: no pipe can fill up)."""

    driver: ClassVar[Path]  # the script, set by each test module's subclass

    def __init__(
        self,
        out: Path,
        *args: str,
        nproc: int = 1,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.out = out
        out.parent.mkdir(parents=True, exist_ok=True)
        launcher = [sys.executable]
        if nproc > 1:
            launcher += [
                "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
                "--master_addr=127.0.0.1", f"--master_port={free_port()}",
            ]  # fmt: skip
        self._stdout: IO[str] = out.with_name(f"{out.name}.stdout").open("w+")
        self._stderr: IO[str] = out.with_name(f"{out.name}.stderr").open("w+")
        self._done: Done | None = None
        self.proc = subprocess.Popen(
            [*launcher, str(self.driver), str(out), *args],
            stdout=self._stdout,
            stderr=self._stderr,
            text=True,
            env={**CHILD_ENV, **(env or {})},
            cwd=cwd,
            start_new_session=True,  # stop() can end torchrun's workers with it
        )

    def wait(self) -> Done:
        if self._done is None:
            returncode = self.proc.wait(timeout=RUN_TIMEOUT)
            outputs = []
            for stream in (self._stdout, self._stderr):
                stream.seek(0)
                outputs.append(stream.read())
                stream.close()
            self._done = Done(self.out, returncode, outputs[0], outputs[1])
        return self._done

    def stop(self) -> None:
        """End the run if a failed test left it running, its workers too.

        torchrun starts each worker in a session of its own, outside the run's process
        group: they are found as descendants before the group is killed.
        """
        if self.proc.poll() is None:
            import psutil  # type: ignore[import-untyped]  # only a failed test gets here

            with contextlib.suppress(psutil.NoSuchProcess):
                for child in psutil.Process(self.proc.pid).children(recursive=True):
                    with contextlib.suppress(psutil.NoSuchProcess):
                        child.kill()
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.wait()


def finish(job: Job) -> Done:
    """Wait for ``job``; stop it if waiting fails."""
    try:
        return job.wait()
    finally:
        job.stop()


def assert_killed(done: Done, nproc: int) -> None:
    """The run died by the SIGKILL of its fault hook: the fault point was reached."""
    if nproc == 1:
        assert done.returncode == -signal.SIGKILL, (done.returncode, done.stderr[-4000:])
    else:  # torchrun reports its worker's signal and fails the job
        assert done.returncode != 0
        assert "Signal 9 (SIGKILL)" in done.stderr, done.stderr[-4000:]
