"""Several hosts on this machine: one network namespace per host, on a bridge.

A :class:`Cluster` makes, for one test module:

- a bridge in this machine's namespace with the address ``198.18.N.254/24`` (the test
  process talks to the hosts and the S3 server through it), ``N`` chosen free;
- one network namespace per host, joined to the bridge by a veth pair (``eth0`` inside),
  with the address ``198.18.N.<k+1>`` and ``lo`` up;
- an S3 server (SeaweedFS) in a namespace of its own, bound to ``198.18.N.100``;
- per host, its own node-local disk: a directory of this machine's disk, bind-mounted at
  the same path (``Cluster.local_mount``) on every host, as a node's local disk is.

Each host's processes run under ``ip netns exec NS unshare --uts --mount --pid --fork
--mount-proc --kill-child``: their own hostname (``host<k>``), mounts and process ids.
Killing the one ``unshare`` process of a launch (SIGKILL) kills every process of that
launch, torchrun's workers included (they run in sessions of their own, so a process
group kill would miss them): :meth:`Host.kill` is a host losing power. Teardown (always, in
a ``finally``) kills every launch, then anything still in a namespace (by PID), then
deletes the veths, the namespaces and the bridge.

Needs root (CAP_NET_ADMIN for the network, CAP_SYS_ADMIN for the namespaces and the bind
mount), iproute2's ``ip``, util-linux's ``unshare`` (2.32 or later for ``--kill-child``),
and a kernel with network, UTS, mount and PID namespaces, veth and bridge. Elsewhere the
fixture skips, saying which of these is missing.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from s3_servers import S3Server, _wait_ready

SUBNET = "198.18"  # 198.18.0.0/15: reserved for network tests (RFC 2544)
S3_HOST = 100  # the S3 server's last octet
GATEWAY = 254  # the bridge's (this machine's) last octet
WEED_PORTS = {"s3": 8333, "master": 9333, "volume": 8080, "filer": 8888}  # a fresh namespace

# The wrapper inside a host's namespace: its hostname, then its disk at the shared path.
_HOST_SHELL = 'hostname "$1" && { [ -z "$2" ] || mount --bind "$2" "$3"; } && shift 3 && exec "$@"'


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


def why_no_namespaces() -> str | None:
    """Why hosts cannot be made here, or None if they can."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    if shutil.which("unshare") is None:
        return "util-linux's `unshare` is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_NET_ADMIN, CAP_SYS_ADMIN)"
    name = f"ckg-probe-{uuid.uuid4().hex[:8]}"
    made = _ip("netns", "add", name, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    try:
        probe = subprocess.run(
            ["ip", "netns", "exec", name, "unshare", "--uts", "--mount", "--pid", "--fork",
             "--mount-proc", "--kill-child", "true"],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        if probe.returncode != 0:
            return f"`unshare --uts --mount --pid` in a namespace failed: {probe.stderr.strip()}"
    finally:
        _ip("netns", "del", name, check=False)
    return None


def _free_subnet() -> int:
    """A third octet N with no 198.18.N.x address on this machine."""
    used = {int(m) for m in re.findall(rf"{SUBNET}\.(\d+)\.", _ip("-4", "-o", "addr").stdout)}
    free = sorted(set(range(1, 250)) - used)
    if not free:
        raise RuntimeError(f"every {SUBNET}.N.0/24 is in use on this machine")
    return random.choice(free)  # noqa: S311 - not a secret; avoids two sessions' clash


@dataclass
class Launch:
    """Processes started in one host's namespaces; killing ``proc`` kills them all."""

    proc: subprocess.Popen[bytes]
    log: Path

    def wait(self, timeout: float) -> int:
        """The exit status; SIGKILLs the launch and fails if it runs past ``timeout``."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            tail = self.log.read_text(errors="replace")[-4000:]
            pytest.fail(f"still running after {timeout} s (hung), killed: {tail}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)  # --kill-child: the PID namespace dies
            self.proc.wait(timeout=30)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class Host:
    """One host: a network namespace with an address, a hostname and a local disk."""

    index: int
    netns: str
    addr: str
    disk: Path  # its node-local disk, as seen from this machine
    local_mount: Path  # where it sees that disk (the same path on every host)
    logs: Path
    launches: list[Launch] = field(default_factory=list)

    @property
    def hostname(self) -> str:
        return f"host{self.index}"

    def start(self, argv: Sequence[str], env: dict[str, str], name: str) -> Launch:
        """Run ``argv`` on this host (its own PID namespace), output to a log file."""
        log = self.logs / f"{self.hostname}-{name}.log"
        disk = [str(self.disk), str(self.local_mount)] if self.disk else ["", ""]
        cmd = [
            "ip", "netns", "exec", self.netns,
            "unshare", "--uts", "--mount", "--pid", "--fork", "--mount-proc", "--kill-child",
            "sh", "-c", _HOST_SHELL, "sh", self.hostname, *disk, *argv,
        ]  # fmt: skip
        with log.open("wb") as out:
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        launch = Launch(proc, log)
        self.launches.append(launch)
        return launch

    def kill(self) -> None:
        """Power off: every process started on this host dies at once (SIGKILL).

        Returns once none is left in its namespace.
        """
        for launch in self.launches:
            launch.kill()
        deadline = time.monotonic() + 30
        while _pids(self.netns) and time.monotonic() < deadline:
            time.sleep(0.05)  # the PID namespace's processes are being reaped


def _pids(netns: str) -> list[str]:
    return _ip("netns", "pids", netns, check=False).stdout.split()


@dataclass
class Cluster:
    """Hosts and an S3 server in network namespaces (see the module docstring)."""

    hosts: list[Host]
    s3: S3Server
    s3_host: Host
    bridge: str
    subnet: int
    local_mount: Path
    shared: Path  # a directory every host sees (a shared filesystem, as NFS would be)

    @property
    def master_addr(self) -> str:
        return self.hosts[0].addr


def _teardown(bridge: str, netns: list[str], hosts: list[Host]) -> list[str]:
    """Kill, then delete everything; what could not be removed."""
    left: list[str] = []
    for host in hosts:
        host.kill()
    for name in netns:
        pids = _pids(name)
        for pid in pids:  # none expected: each launch's PID namespace died with it
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        if pids:
            left.append(f"processes {pids} in {name}")
    for i in range(len(netns)):
        _ip("link", "del", f"{bridge}v{i}", check=False)  # both ends of the veth
    left += [f"namespace {n}" for n in netns if _ip("netns", "del", n, check=False).returncode]
    if _ip("link", "del", bridge, check=False).returncode != 0:
        left.append(f"bridge {bridge}")
    return left


@contextlib.contextmanager
def make_cluster(workdir: Path, n_hosts: int) -> Iterator[Cluster]:
    """``n_hosts`` hosts and an S3 server; all torn down on exit, whatever happened."""
    why = why_no_namespaces()
    if why is not None:
        pytest.skip(f"multi-host tests need network namespaces: {why}")
    tag = uuid.uuid4().hex[:6]
    bridge = f"ckg{tag}"  # interface names: at most 15 characters
    subnet = _free_subnet()
    local_mount = workdir / "local"  # every host's own disk appears here
    local_mount.mkdir()
    shared = workdir / "shared"
    shared.mkdir()
    logs = workdir / "logs"
    logs.mkdir()
    netns: list[str] = []
    hosts: list[Host] = []
    try:
        _ip("link", "add", bridge, "type", "bridge")
        _ip("addr", "add", f"{SUBNET}.{subnet}.{GATEWAY}/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        for i, octet in enumerate([*range(1, n_hosts + 1), S3_HOST]):
            name = f"ckg-{tag}-{'s3' if octet == S3_HOST else f'h{i}'}"
            _ip("netns", "add", name)
            netns.append(name)
            _ip("link", "add", f"{bridge}v{i}", "type", "veth", "peer", "name", "eth0",
                "netns", name)  # fmt: skip
            _ip("link", "set", f"{bridge}v{i}", "master", bridge, "up")
            _ip("-n", name, "addr", "add", f"{SUBNET}.{subnet}.{octet}/24", "dev", "eth0")
            _ip("-n", name, "link", "set", "eth0", "up")
            _ip("-n", name, "link", "set", "lo", "up")
            disk = workdir / f"disk{i}"
            if octet != S3_HOST:
                disk.mkdir()
            host = Host(
                i, name, f"{SUBNET}.{subnet}.{octet}",
                disk if octet != S3_HOST else Path(), local_mount, logs,
            )  # fmt: skip
            hosts.append(host)
        s3 = _start_weed(hosts[-1], workdir / "s3")
        yield Cluster(hosts[:-1], s3, hosts[-1], bridge, subnet, local_mount, shared)
    finally:
        left = _teardown(bridge, netns, hosts)
        if left:
            raise RuntimeError(f"multi-host teardown left {', '.join(left)} behind")


def _start_weed(host: Host, workdir: Path) -> S3Server:
    """SeaweedFS in ``host``'s namespace, bound to its address only."""
    data = workdir / "weed"
    data.mkdir(parents=True)
    weed = Path(sys.executable).with_name("weed")
    argv = [
        str(weed), "server", f"-ip={host.addr}", f"-ip.bind={host.addr}", f"-dir={data}",
        "-s3", f"-s3.port={WEED_PORTS['s3']}", f"-master.port={WEED_PORTS['master']}",
        f"-volume.port={WEED_PORTS['volume']}", f"-filer.port={WEED_PORTS['filer']}",
        "-master.volumeSizeLimitMB=256", "-s3.port.iceberg=0", "-s3.port.lance=0",
    ]  # fmt: skip
    launch = host.start(argv, dict(os.environ), "weed")
    server = S3Server(
        "seaweedfs", f"http://{host.addr}:{WEED_PORTS['s3']}", launch.proc, log=launch.log
    )
    _wait_ready(server)  # from this machine, through the bridge
    return server
