"""The original bug and its fix, with real processes under torchrun (gloo on CPU).

Several ranks renamed their own temporary directory onto the same checkpoint-N, and every
rank but the first crashed with "OSError: [Errno 39] Directory not empty". The naive
protocol is kept as a control that shows the test can fail; through ckptguard, all ranks
write into one staging dir and rank 0 alone commits.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import ckptguard
from ckptguard._format.layout import MANIFEST_NAME, RootLayout

CHILD = Path(__file__).parents[1] / "dist_child.py"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _torchrun(mode: str, root: Path, rounds: int, out: Path, nproc: int) -> list[dict[str, Any]]:
    out.mkdir()
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        "--nnodes=1", "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
        str(CHILD), mode, str(root), str(rounds), str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=280, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]
    assert [r["rank"] for r in reports] == list(range(nproc))
    return reports


def test_control_naive_rename_fails_with_directory_not_empty(tmp_path: Path) -> None:
    reports = _torchrun("naive", tmp_path / "run", 10, tmp_path / "out", nproc=2)
    errors = [e for r in reports for e in r["errors"]]
    assert errors, "the naive protocol should race"
    assert all(e.startswith(("errno 39", "errno 17")) for e in errors), errors


@pytest.mark.parametrize(("nproc", "rounds"), [(2, 200), (4, 30)])
def test_every_rank_files_committed_exactly_once(tmp_path: Path, nproc: int, rounds: int) -> None:
    root = tmp_path / "run"
    reports = _torchrun("guarded", root, rounds, tmp_path / "out", nproc=nproc)
    assert [r["errors"] for r in reports] == [[]] * nproc
    assert [r["aborted"] for r in reports] == [[]] * nproc
    assert all(r["outcomes"] == ["committed"] * rounds for r in reports)
    expected = {MANIFEST_NAME}
    for rank in range(nproc):
        expected |= {f"rank{rank}.bin", f"rank{rank}"}
    for r in range(rounds):
        final = root / f"checkpoint-{r}"
        assert {p.name for p in final.iterdir()} == expected
        report = ckptguard.verify(final)
        assert report.ok, report.problems
        assert report.manifest is not None
        assert report.manifest.writer.world_size == nproc
    layout = RootLayout(str(root))
    assert sorted(p.name for p in root.iterdir()) == sorted(
        [".ckptguard"] + [f"checkpoint-{r}" for r in range(rounds)]
    )
    for sub in (layout.staging, layout.trash, layout.quarantine):
        assert list(Path(sub).iterdir()) == []
    print(
        f"{nproc} ranks x {rounds} rounds: 0 errors; max {max(r['seconds'] for r in reports):.1f}s"
    )


def test_a_failing_rank_aborts_the_save_on_every_rank(tmp_path: Path) -> None:
    root = tmp_path / "run"
    reports = _torchrun("raising", root, 3, tmp_path / "out", nproc=2)
    for r in reports:
        assert r["errors"] == []
        assert r["outcomes"] == ["committed", "committed"]  # rounds 0 and 2
        assert len(r["aborted"]) == 1
        assert r["aborted"][0]["round"] == 1
        failures = r["aborted"][0]["failures"]
        assert list(failures) == ["1"]  # the same error, naming rank 1, on every rank
        assert "simulated failure" in failures["1"]
    assert not (root / "checkpoint-1").exists()
    assert ckptguard.verify(root / "checkpoint-2").ok  # the next save works
    assert list(Path(RootLayout(str(root)).staging).iterdir()) == []


def test_single_process_twin(tmp_path: Path) -> None:
    """The same workload without torchrun: one process, same outcome shape."""
    root = tmp_path / "run"
    for r in range(3):
        tx = ckptguard.atomic_checkpoint(root / f"checkpoint-{r}")
        with tx as staging:
            (staging / "rank0.bin").write_bytes(b"\0" * 4096)
        assert tx.result is not None
        assert tx.result.outcome == ckptguard.Outcome.COMMITTED
        assert ckptguard.verify(root / f"checkpoint-{r}").ok


def test_checkpoint_manager_under_torchrun(tmp_path: Path) -> None:
    root = tmp_path / "run"
    reports = _torchrun("manager", root, 5, tmp_path / "out", nproc=2)
    for r in reports:
        assert [i["step"] for i in r["infos"]] == [1, 2, 3, 4, 5]
        assert all(i["valid"] for i in r["infos"])
        assert r["restored_equal"]
        assert len(r["aborted"]) == 1
        assert list(r["aborted"][0]) == ["0"]
        assert "lambda" in r["aborted"][0]["0"] or "function" in r["aborted"][0]["0"]
    assert sorted(p.name for p in root.iterdir()) == [".ckptguard", "checkpoint-4", "checkpoint-5"]
    assert not (root / "checkpoint-6").exists()


def test_checkpoint_manager_single_process_twin(tmp_path: Path) -> None:
    import torch

    mgr = ckptguard.CheckpointManager(tmp_path / "run", keep_last=2)
    for step in range(1, 6):
        torch.manual_seed(step)
        assert mgr.save(step, {"w": torch.randn(64), "step": step}).result().valid
    torch.manual_seed(5)
    assert torch.equal(mgr.restore()["w"], torch.randn(64))
    with pytest.raises(TypeError):
        mgr.save(6, {"bad": lambda: None})
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        ".ckptguard", "checkpoint-4", "checkpoint-5",
    ]  # fmt: skip


def _two_nodes(
    mode: str, root: str, rounds: int, out: Path, env: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """Two torchrun invocations (--nnodes=2, one rank each) on one machine."""
    out.mkdir()
    port = _free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1",
                "--nnodes=2", f"--node_rank={node}", "--master_addr=127.0.0.1",
                f"--master_port={port}", str(CHILD), mode, root, str(rounds), str(out),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        for node in (0, 1)
    ]  # fmt: skip
    for proc in procs:
        _, err = proc.communicate(timeout=280)
        assert proc.returncode == 0, err[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_manager_on_node_local_roots_commits_on_every_node(tmp_path: Path) -> None:
    reports = _two_nodes("manager", str(tmp_path / "node{node}"), 5, tmp_path / "out")
    for r in reports:
        assert [i["step"] for i in r["infos"]] == [1, 2, 3, 4, 5]
        assert r["restored_equal"]
    for node in (0, 1):
        root = tmp_path / f"node{node}"
        assert sorted(p.name for p in root.iterdir()) == [
            ".ckptguard", "checkpoint-4", "checkpoint-5",
        ]  # fmt: skip
        assert ckptguard.verify(root / "checkpoint-5").ok
    # each rank's info points into its own node's root
    assert [Path(r["infos"][-1]["path"]).parent.name for r in reports] == ["node0", "node1"]


def test_async_saves_under_torchrun(tmp_path: Path) -> None:
    """The background commit talks on its own channel while the training thread runs
    collectives; every checkpoint holds the state as it was when its save was called."""
    root = tmp_path / "run"
    reports = _torchrun("async", root, 6, tmp_path / "out", nproc=2)
    assert [r["errors"] for r in reports] == [[], []]
    assert reports[0]["buffer_bytes"] >= 4 << 16  # rank 0 commits: it keeps its buffers
    assert reports[1]["buffer_bytes"] == 0  # rank 1 never commits: no copy held
    assert sorted(p.name for p in root.iterdir()) == [".ckptguard"] + [
        f"checkpoint-{s}" for s in range(1, 7)
    ]
    for s in range(1, 7):
        assert ckptguard.verify(root / f"checkpoint-{s}").ok


def test_async_saves_on_node_local_roots(tmp_path: Path) -> None:
    """With async_writer="process": each node's committer has a writer process of its own."""
    reports = _two_nodes("async_process", str(tmp_path / "node{node}"), 4, tmp_path / "out")
    assert [r["errors"] for r in reports] == [[], []]
    assert all(r["buffer_bytes"] >= 4 << 16 for r in reports)  # each node's writer keeps one
    writers = {r["writer_pid"] for r in reports}
    assert None not in writers
    assert len(writers) == 2
    assert writers.isdisjoint({r["pid"] for r in reports})
    for node in (0, 1):
        assert ckptguard.verify(tmp_path / f"node{node}" / "checkpoint-4").ok


def test_doctor_across_ranks_on_a_shared_root(tmp_path: Path) -> None:
    root = tmp_path / "run"
    ckptguard.CheckpointManager(root).save(1, {"w": 1.0})  # saved by one process
    reports = _torchrun("doctor", root, 1, tmp_path / "out", nproc=2)
    for report in reports:
        checks = report["doctor"]
        assert checks["dist.same_root"][0] == "ok", checks
        assert checks["dist.clock_skew"][0] == "ok", checks
        assert checks["dist.world_size"][0] == "warn", checks
        assert "saved by 1 ranks; this run has 2" in checks["dist.world_size"][1]
    assert sorted(p.name for p in root.iterdir()) == [".ckptguard", "checkpoint-1"]  # no probe


def test_doctor_finds_node_local_roots(tmp_path: Path) -> None:
    reports = _two_nodes("doctor", str(tmp_path / "node{node}"), 1, tmp_path / "out")
    for report in reports:
        status, message = report["doctor"]["dist.same_root"]
        assert status == "warn"
        assert "node-local" in message
    # configured as shared (a Trainer's save_on_each_node=False): that fails
    reports = _two_nodes(
        "doctor", str(tmp_path / "node{node}"), 1, tmp_path / "out2", {"CKPT_EXPECT_SHARED": "1"}
    )
    for report in reports:
        status, message = report["doctor"]["dist.same_root"]
        assert status == "fail"
        assert "configuration says the root is shared" in message


def test_sharded_save_on_node_local_roots_is_refused(tmp_path: Path) -> None:
    reports = _two_nodes("sharded_refused", str(tmp_path / "node{node}"), 1, tmp_path / "out")
    for r in reports:
        assert r["errors"] == []
        assert "not shared by all ranks" in r["aborted"][0]
    for node in (0, 1):
        assert not (tmp_path / f"node{node}" / "checkpoint-1").exists()


@pytest.mark.parametrize("shared", [True, False], ids=["shared-root", "root-per-node"])
def test_two_simulated_nodes(tmp_path: Path, shared: bool) -> None:
    """Two torchrun invocations (--nnodes=2) on one machine, rendezvous on 127.0.0.1.

    Each run also claims the opposite topology (shared_storage=, as Hugging Face's
    save_on_each_node would): the probe wins and rank 0 warns about the mismatch.
    """
    root = str(tmp_path / "shared") if shared else str(tmp_path / "node{node}")
    out = tmp_path / "out"
    out.mkdir()
    port = _free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc_per_node=1",
                "--nnodes=2",
                f"--node_rank={node}",
                "--master_addr=127.0.0.1",
                f"--master_port={port}",
                str(CHILD),
                "guarded",
                root,
                "20",
                str(out),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "CKPT_EXPECT_SHARED": "0" if shared else "1"},
        )
        for node in (0, 1)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=280)
        assert proc.returncode == 0, err[-4000:]
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["errors"] == [] and r["outcomes"] == ["committed"] * 20 for r in reports)
    mismatch = [w for w in reports[0]["warnings"] if "the probe found it" in w]
    assert len(mismatch) == 20, reports[0]["warnings"][:3]
    assert ("shared by all ranks" in mismatch[0]) == shared
    roots = [tmp_path / "shared"] if shared else [tmp_path / "node0", tmp_path / "node1"]
    for i, node_root in enumerate(roots):
        for r in range(20):
            final = node_root / f"checkpoint-{r}"
            report = ckptguard.verify(final)
            assert report.ok, report.problems
            files = {f.path for f in report.manifest.files} if report.manifest else set()
            if shared:  # one commit holding both ranks' files
                assert files == {"rank0.bin", "rank0/state.json", "rank1.bin", "rank1/state.json"}
            else:  # one commit per node root, each with its own node's files
                assert files == {f"rank{i}.bin", f"rank{i}/state.json"}
        assert list(Path(RootLayout(str(node_root)).staging).iterdir()) == []


def test_a_rank_killed_mid_save_fails_the_job_and_the_root_recovers(tmp_path: Path) -> None:
    root = tmp_path / "run"
    out = tmp_path / "out"
    out.mkdir()
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "--monitor_interval=0.5",
        str(CHILD), "killed", str(root), "4", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=280, check=False)
    assert proc.returncode != 0  # the job fails instead of hanging
    assert "SIGKILL" in proc.stderr or "Signal 9" in proc.stderr or "-9" in proc.stderr
    report = ckptguard.recover(root)  # after the "restart"
    assert [e.name for e in report.valid] == ["checkpoint-0", "checkpoint-1", "checkpoint-2"]
    assert report.of_kind(ckptguard.EntryKind.COMMITTED_CORRUPT) == []
    assert list(Path(RootLayout(str(root)).staging).iterdir()) == []  # its owner is dead
    latest = report.latest
    assert latest is not None
    assert latest.name == "checkpoint-2"
    for entry in report.valid:
        report_files = ckptguard.verify(entry.path)
        assert report_files.manifest is not None
        assert {f.path for f in report_files.manifest.files} == {"rank0.bin", "rank1.bin"}


def test_sharded_dcp_round_trip_with_two_ranks(tmp_path: Path) -> None:
    root = tmp_path / "run"
    reports = _torchrun("sharded", root, 3, tmp_path / "out", nproc=2)
    assert [r["errors"] for r in reports] == [[], []]
    assert [r["local_shard"] for r in reports] == [4, 4]  # each rank held half the rows
    assert sorted(p.name for p in root.iterdir()) == [".ckptguard", "checkpoint-2", "checkpoint-3"]
    report = ckptguard.verify(root / "checkpoint-3")
    assert report.ok, report.problems
    assert report.manifest is not None
    files = {f.path for f in report.manifest.files}
    assert ".metadata" in files
    assert len([f for f in files if f.endswith(".distcp")]) == 2  # one per rank, both covered
    assert report.manifest.metadata["ckptguard"]["kind"] == "dcp"


def test_sharded_single_process_twin(tmp_path: Path) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
    )
    try:
        mgr = ckptguard.CheckpointManager(tmp_path / "run")
        mgr.save(1, {"w": torch.arange(6.0)}, sharded=True)
        target = {"w": torch.zeros(6)}
        mgr.restore(target=target)
        assert torch.equal(target["w"], torch.arange(6.0))
        with pytest.raises(ValueError, match="target"):
            mgr.restore()
    finally:
        dist.destroy_process_group()


def test_rank0_failing_to_probe_aborts_every_rank_instead_of_hanging(tmp_path: Path) -> None:
    root = tmp_path / "run"
    root.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (root / ".ckptguard").symlink_to(tmp_path / "elsewhere")  # ensure_root refuses it
    reports = _torchrun("guarded", root, 1, tmp_path / "out", nproc=2)
    for r in reports:
        assert r["errors"] == []
        assert [a["round"] for a in r["aborted"]] == [0]
        assert list(r["aborted"][0]["failures"]) == ["0"]
        assert "symlink" in r["aborted"][0]["failures"]["0"]
    assert list((tmp_path / "elsewhere").iterdir()) == []
