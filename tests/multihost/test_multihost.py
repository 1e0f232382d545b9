"""Real multi-host runs: two hosts in network namespaces, an S3 server in a third.

Each host (``conftest.py``) has its own address (198.18.N.1 and .2 on a bridge), hostname,
process ids and node-local disk; SeaweedFS runs in its own namespace at 198.18.N.100.
A job is one torchrun per host, 2 ranks each (gloo on CPU), with the static rendezvous on
the first host's address (``--nnodes=2 --node-rank=K --master-addr=198.18.N.1``;
``GLOO_SOCKET_IFNAME=eth0``). c10d's rendezvous is not used: inside a namespace the
hostname does not resolve to the host's address, and no node hosts the store.

What is shown, each from the store itself (listed with boto3, read back with ckptguard):

- exactly-once commits on a shared S3 root: every checkpoint has one manifest and the
  objects of one save only, every rank got the same result; a control where each rank
  commits alone loses the other ranks' files;
- sharded state split across the hosts (a DTensor over all 4 ranks) saved straight to S3:
  one manifest lists every rank's shards; restored bit-exact, also resharded;
- node-local roots: each host commits its own full copy (one committer per node), and
  the storage probe tells node-local roots from a shared root (its log, each manifest's
  writer ranks);
- a host killed mid-save (every process of it, SIGKILL): nothing of that save is visible,
  the other host's ranks fail instead of hanging, and the restarted job resumes from the
  newest valid checkpoint.

Run: ``pytest tests/multihost`` as root (``make test`` runs it). It needs root, iproute2,
util-linux's ``unshare`` and a kernel with network, UTS, mount and PID namespaces, veth
and bridge (see docs/development.md, "Multi-host tests"); where those are missing the
module skips, saying what is missing.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import ckptguard
from multihost.netns_cluster import Cluster, Launch

CHILD = Path(__file__).with_name("host_child.py")
NPROC = 2  # ranks per host
WORLD = 2 * NPROC
JOB_TIMEOUT = 240.0  # seconds; a job past it is hung: killed, and the test fails
_ports = itertools.count(29500)  # fresh namespaces: every port is free; one per job


def start_job(
    cluster: Cluster, phases: str, out: Path, env: dict[str, str] | None = None
) -> list[Launch]:
    """One torchrun per host (2 ranks each), static rendezvous on host 0's address."""
    out.mkdir(parents=True, exist_ok=True)
    port = next(_ports)
    base = {
        **os.environ,
        "GLOO_SOCKET_IFNAME": "eth0",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "CKPT_OUT": str(out),
        "CKPT_STORAGE_OPTIONS": json.dumps(cluster.s3.storage_options),
        **(env or {}),
    }
    return [
        host.start(
            [
                sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
                f"--node-rank={host.index}", f"--nproc-per-node={NPROC}",
                f"--master-addr={cluster.master_addr}", f"--master-port={port}",
                "--monitor-interval=0.5", str(CHILD), phases,
            ],
            base,
            f"{out.name}-{phases}",
        )
        for host in cluster.hosts
    ]  # fmt: skip


def run_job(
    cluster: Cluster, phases: str, out: Path, env: dict[str, str] | None = None
) -> dict[str, list[dict[str, Any]]]:
    """Run a job to its end (it must succeed); every phase's reports, in rank order."""
    launches = start_job(cluster, phases, out, env)
    for launch in launches:
        assert launch.wait(JOB_TIMEOUT) == 0, launch.output()[-6000:]
    return {name: reports(out, name) for name in phases.split(",")}


def reports(out: Path, phase: str) -> list[dict[str, Any]]:
    found = [json.loads((out / f"{phase}-rank{r}.json").read_text()) for r in range(WORLD)]
    assert [r["rank"] for r in found] == list(range(WORLD))
    return found


def keys(cluster: Cluster, prefix: str) -> list[str]:
    """Every object under ``prefix`` of the bucket, listed by boto3 (not by ckptguard)."""
    client = cluster.s3.client()
    found: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=cluster.s3.bucket, Prefix=f"{prefix}/"
    ):
        found += [o["Key"][len(prefix) + 1 :] for o in page.get("Contents", [])]
    return sorted(found)


def saves_under(cluster: Cluster, prefix: str, name: str) -> tuple[list[str], set[str]]:
    """The manifests under ``prefix/name/`` and the save ids that hold objects there."""
    under = keys(cluster, f"{prefix}/{name}")
    manifests = [k for k in under if k == "ckptguard.json"]
    return manifests, {k.split("/", 1)[0] for k in under if "/" in k}


def expect_exactly_once(cluster: Cluster, prefix: str, name: str, save_id: str) -> None:
    manifests, save_ids = saves_under(cluster, prefix, name)
    assert manifests == ["ckptguard.json"], f"{prefix}/{name}: {manifests}"
    assert save_ids == {save_id}, f"{prefix}/{name}: objects of saves {save_ids}"


def test_shared_s3_and_node_local_roots_commit_exactly_once(
    cluster: Cluster, tmp_path: Path
) -> None:
    run = f"job-{uuid.uuid4().hex[:8]}"
    local = cluster.local_mount / run  # the same path on both hosts, another disk on each
    env = {
        "CKPT_S3_URL": cluster.s3.url(run),
        "CKPT_LOCAL_ROOT": str(local),
        "CKPT_SHARED_ROOT": str(cluster.shared / run),
    }
    got = run_job(cluster, "s3,naive,topology,sharded", tmp_path / "out", env)
    assert not local.exists()  # this machine's own view: no host wrote here
    hosts = [r["host"] for r in got["s3"]]
    assert hosts == ["host0", "host0", "host1", "host1"]

    # -- S3, shared by every rank: one commit per checkpoint, the same result everywhere
    s3 = got["s3"]
    assert all(r.get("errors") is None for r in s3), s3[0].get("errors")
    assert all(r["infos"] == s3[0]["infos"] for r in s3)  # the same result on every rank
    for r in s3:
        assert [(i["step"], i["valid"]) for i in r["infos"]] == [(1, True), (2, True), (3, True)]
        assert r["latest"] == 3
        assert r["listed"] == [1, 2, 3]
        assert r["restored_equal"]
    mgr = ckptguard.CheckpointManager(
        cluster.s3.url(f"{run}/managed"), storage_options=cluster.s3.storage_options,
        read_only=True,
    )  # fmt: skip
    for step in (1, 2, 3):
        report = mgr.verify(step)
        assert report.ok, report.problems
        assert report.manifest is not None
        expect_exactly_once(
            cluster, f"{run}/managed", f"checkpoint-{step}", report.manifest.save_id
        )
        assert report.manifest.writer.world_size == WORLD
        assert report.manifest.writer.host == "host0"  # rank 0 committed for everyone
    files = [r["files"] for r in s3]
    assert all(f == files[0] for f in files)  # every rank saw the same commit
    assert files[0]["files"] == [f"rank{r}.bin" for r in range(WORLD)]  # every rank's file
    assert [f["outcome"] for f in files] == ["committed"] * WORLD
    assert files[0]["writer_ranks"] == list(range(WORLD))  # one committer: rank 0, for all
    expect_exactly_once(cluster, f"{run}/files", "checkpoint-0", files[0]["save_id"])

    # -- the control: ranks that commit alone race; one wins and the others' files are lost
    naive = got["naive"]
    winners = [r for r in naive if r["outcome"] == "committed"]
    assert len(winners) == 1, naive
    assert sorted(r["outcome"] for r in naive) == ["committed"] + ["kept_existing"] * (WORLD - 1)
    lost = [r for r in naive if f"rank{r['rank']}.bin" not in r["files"]]
    assert len(lost) == WORLD - 1, naive  # three ranks' files are in no checkpoint

    # -- node-local roots: the probe finds them, each host commits its own full copy
    topo = got["topology"]
    for r in topo:
        assert r.get("errors") is None, r.get("errors")
        for kind in ("local", "shared"):
            assert [i["step"] for i in r[kind]["infos"]] == [1, 2]
            assert all(i["valid"] for i in r[kind]["infos"])
            assert r[kind]["restored_equal"]
        assert r["shared"]["probe_log"] == []  # a shared root: no node-local decision
        assert r["shared"]["files"]["writer_ranks"] == list(range(WORLD))
    decided = [line for r in topo for line in r["local"]["probe_log"]]
    assert decided, "the probe logged no node-local decision"
    assert all(line.endswith("ranks [0, 2]") for line in decided), decided  # first of each
    for host in cluster.hosts:
        mine = list(range(host.index * NPROC, (host.index + 1) * NPROC))
        for r in topo[host.index * NPROC : (host.index + 1) * NPROC]:
            assert r["local"]["files"]["writer_ranks"] == mine
            assert r["local"]["files"]["files"] == [f"rank{k}.bin" for k in mine]
            assert r["local"]["files"]["writer_host"] == host.hostname
        disk_root = host.disk / run
        for step in (1, 2):
            report = ckptguard.verify(disk_root / "managed" / f"checkpoint-{step}")
            assert report.ok, report.problems
            assert report.manifest is not None
            assert report.manifest.writer.host == host.hostname
            assert list(report.manifest.writer.ranks) == mine
        assert ckptguard.verify(disk_root / "files" / "checkpoint-0").ok
    shared_root = cluster.shared / run
    report = ckptguard.verify(shared_root / "files" / "checkpoint-0")
    assert report.ok, report.problems
    assert report.manifest is not None
    assert sorted(f.path for f in report.manifest.files) == [f"rank{r}.bin" for r in range(WORLD)]
    for step in (1, 2):
        assert ckptguard.verify(shared_root / "managed" / f"checkpoint-{step}").ok

    # -- sharded state split across the hosts, straight to S3: one manifest, every shard
    for r in got["sharded"]:
        assert r.get("errors") is None, r.get("errors")
        assert [(i["step"], i["valid"]) for i in r["infos"]] == [(1, True), (2, True)]
        assert all(r["exact"].values()), r["exact"]  # bit-exact, and resharded
        assert r["local_rows"] == 64  # Shard(1): every rank held all 64 rows of 8 columns
    sharded = ckptguard.CheckpointManager(
        cluster.s3.url(f"{run}/sharded"), storage_options=cluster.s3.storage_options,
        read_only=True,
    )  # fmt: skip
    for step in (1, 2):
        report = sharded.verify(step)
        assert report.ok, report.problems
        assert report.manifest is not None
        expect_exactly_once(
            cluster, f"{run}/sharded", f"checkpoint-{step}", report.manifest.save_id
        )
        names = [f.path.split("/", 1)[1] for f in report.manifest.files]
        assert ".metadata" in names
        assert len([n for n in names if n.endswith(".distcp")]) == WORLD  # every rank's shards
        assert report.manifest.metadata["ckptguard"]["kind"] == "dcp"


@dataclass(frozen=True)
class Kill:
    """Where a host dies: ``rank`` stops at fault ``point``, then its whole host is killed."""

    point: str  # "name:count" (see ckptguard._storage.faults)
    rank: int  # 0, 1: host 0 (rank 0 commits; torchrun's store is there); 2, 3: host 1
    committed: bool = False  # whether the save is committed at that point

    @property
    def host(self) -> int:
        return self.rank // NPROC


KILLS = [
    # make test: host 0 dies with every data object uploaded and no manifest yet
    pytest.param(Kill("remote.data_uploaded:1", 0), id="host0-data-uploaded"),
    # the sweep (CKPTGUARD_MULTIHOST_SWEEP=1, make chaos):
    pytest.param(  # mid-upload: a chunk of the state handed to the store, the file not done
        Kill("remote.uploading:2", 0), id="host0-mid-upload", marks=pytest.mark.multihost_sweep
    ),
    pytest.param(  # host 1 dies: host 0's ranks wait for it until the group's timeout
        Kill("remote.data_uploaded:1", 2), id="host1-data-uploaded",
        marks=pytest.mark.multihost_sweep,
    ),
    pytest.param(  # the control: dead right after the manifest, so the save is committed
        Kill("remote.manifest_written:1", 0, committed=True), id="host0-after-commit",
        marks=pytest.mark.multihost_sweep,
    ),
]  # fmt: skip


@pytest.mark.parametrize("kill", KILLS)
def test_a_host_killed_mid_save_leaves_nothing_visible_and_the_job_resumes(
    cluster: Cluster, tmp_path: Path, kill: Kill
) -> None:
    run = f"kill-{uuid.uuid4().hex[:8]}"
    env = {"CKPT_S3_URL": cluster.s3.url(run), "CKPT_PG_TIMEOUT": "20"}
    # One job saves steps 1 and 2, then one rank stops mid-save of step 3 (on a fault
    # point), then its whole host dies.
    out = tmp_path / "first"
    held_env = {**env, "CKPT_HOLD": kill.point, "CKPT_HOLD_RANK": str(kill.rank)}
    launches = start_job(cluster, "before,held", out, held_env)
    deadline = time.monotonic() + JOB_TIMEOUT
    while not (out / "held").exists():
        assert time.monotonic() < deadline, launches[0].output()[-4000:]
        assert all(launch.proc.poll() is None for launch in launches), [
            launch.output()[-3000:] for launch in launches
        ]
        time.sleep(0.1)  # polling for the child's marker file, not ordering a race
    manifests, save_ids = saves_under(cluster, f"{run}/resume", "checkpoint-3")
    assert manifests == (["ckptguard.json"] if kill.committed else [])
    if kill.point.startswith("remote.data_uploaded"):
        assert save_ids, "the held save had uploaded nothing: not mid-save"
    cluster.hosts[kill.host].kill()
    survivor = 1 - kill.host
    status = launches[survivor].wait(JOB_TIMEOUT)  # fails instead of hanging
    assert status != 0, launches[survivor].output()[-4000:]
    for r in reports(out, "before"):
        assert [(i["step"], i["valid"]) for i in r["infos"]] == [(1, True), (2, True)]
    for rank in range(survivor * NPROC, (survivor + 1) * NPROC):
        report = json.loads((out / f"held-rank{rank}.json").read_text())
        assert report["host"] == f"host{survivor}"
        assert report["errors"], report  # e.g. DistNetworkError: the store's host is gone
        assert "step 3 was saved" not in report["errors"][0], report["errors"]

    # Nothing of a dead save is visible: list, latest, verify (read-only, from here).
    mgr = ckptguard.CheckpointManager(
        cluster.s3.url(f"{run}/resume"), storage_options=cluster.s3.storage_options, read_only=True
    )
    newest = 3 if kill.committed else 2
    assert [i.step for i in mgr.list()] == list(range(1, newest + 1))
    latest = mgr.latest()
    assert latest is not None
    assert latest.step == newest
    if not kill.committed and saves_under(cluster, f"{run}/resume", "checkpoint-3")[1]:
        dead = mgr.verify(3)  # objects without a manifest: not a checkpoint
        assert not dead.ok
        assert dead.problems, dead
    elif not kill.committed:  # only an unfinished multipart upload: no object at all
        with pytest.raises(ckptguard.CheckpointNotFound):
            mgr.verify(3)

    # The restarted job resumes from the newest valid checkpoint and saves two more.
    resumed = run_job(cluster, "resume", tmp_path / "second", env)["resume"]
    steps = [newest + 1, newest + 2]
    for r in resumed:
        assert r.get("errors") is None, r.get("errors")
        assert r["latest"] == newest
        assert r["restored_equal"]
        assert [(i["step"], i["valid"]) for i in r["infos"]] == [(s, True) for s in steps]
        assert r["listed"] == list(range(1, newest + 3))
    for step in steps:
        report = mgr.verify(step)
        assert report.ok, report.problems
        assert report.manifest is not None
        manifests, ids = saves_under(cluster, f"{run}/resume", f"checkpoint-{step}")
        assert manifests == ["ckptguard.json"]
        assert report.manifest.save_id in ids
        assert ids - {report.manifest.save_id} <= save_ids  # at most the dead save's leftovers
