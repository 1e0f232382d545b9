"""FSDP2 (``fully_shard``) training saved and resumed through ckptguard, under real torchrun.

``fsdp_child.py`` trains a small model whose Linear layers and root are each ``fully_shard``-ed
(gloo on CPU, 2 ranks), takes model and AdamW state with ``get_state_dict`` and saves it with
``CheckpointManager.save(..., sharded=True)``, on a local root and straight to S3 (a moto
server). Second torchrun jobs restore it from each: with 2 ranks
they train on and must match an uninterrupted run bit for bit (losses, every parameter and
every optimizer moment); with 1 and with 4 ranks (resharded by DCP) the loaded parameters and
optimizer state must equal those saved, bit for bit. A save that fails on one rank must abort
on every rank and leave nothing visible.

One save job (module fixture) serves these tests; four torchrun launches in all.

The Hugging Face Trainer's own FSDP2 path (Accelerate's ``fully_shard`` wrapping and its
``SHARDED_STATE_DICT`` checkpoints, DCP directories written by every rank) runs under
``protect(trainer)`` in ``hf_fsdp_driver.py``, and so do DeepSpeed ZeRO-2 and ZeRO-3
(``deepspeed`` from the overlay ``make install`` puts beside the venv, on the ZeRO runs'
PYTHONPATH only; it runs on CPU as it is); Accelerate 1.15 does not enable FSDP on
CPU, so that driver lifts that one gate (see its docstring). A run killed inside its 2nd
commit leaves nothing visible and resumes to the same weights as an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch

import ckptguard
from ckptguard._format.layout import MANIFEST_NAME, RootLayout
from s3_servers import S3Server, start_moto

if TYPE_CHECKING:
    from collections.abc import Iterator

CHILD = Path(__file__).with_name("fsdp_child.py")
SAVE_AT, STEPS = 3, 6  # as in fsdp_child.py
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _torchrun(
    mode: str, out: Path, roots: list[str], nproc: int, options: dict[str, Any]
) -> list[dict[str, Any]]:
    out.mkdir()
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        "--nnodes=1", "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
        str(CHILD), mode, str(out), *roots,
    ]  # fmt: skip
    env = CHILD_ENV | {"CKPTGUARD_STORAGE_OPTIONS": json.dumps(options)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, check=False, env=env)
    assert proc.returncode == 0, proc.stderr[-6000:]
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]
    assert [(r["rank"], r["world_size"]) for r in reports] == [(r, nproc) for r in range(nproc)]
    return reports


def _load(path: Path) -> Any:
    return torch.load(path, weights_only=True)


def _differences(a: Any, b: Any, where: str = "") -> list[str]:
    """Every place where two nested state dicts differ, tensors compared bit for bit."""
    if isinstance(a, torch.Tensor):
        same = isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
        return [] if same else [where]
    if isinstance(a, dict):
        if not isinstance(b, dict) or a.keys() != b.keys():
            return [f"{where}: keys differ"]
        return [d for k in a for d in _differences(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, (list, tuple)):
        if not isinstance(b, (list, tuple)) or len(a) != len(b):
            return [f"{where}: lengths differ"]
        return [
            d
            for i, (x, y) in enumerate(zip(a, b, strict=True))
            for d in _differences(x, y, f"{where}[{i}]")
        ]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = start_moto(tmp_path_factory.mktemp("moto"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory, moto: S3Server) -> dict[str, Any]:
    """One 2-rank job saves the same FSDP2 state on a local root and on S3 (moto)."""
    base = tmp_path_factory.mktemp("fsdp")
    roots = [str(base / "root"), moto.url(f"fsdp-{uuid.uuid4().hex[:8]}")]
    reports = _torchrun("save", base / "save", roots, nproc=2, options=moto.storage_options)
    return {
        "roots": roots,
        "options": moto.storage_options,
        "base": base,
        "reports": reports,
        "reference": _load(base / "save" / "reference.pt"),
        "saving": _load(base / "save" / "saving.pt"),
    }


def _resume(saved: dict[str, Any], nproc: int) -> list[Any]:
    """A job of ``nproc`` ranks that restores from every root; what it loaded, per root."""
    out = saved["base"] / f"resume-{nproc}"
    reports = _torchrun("resume", out, saved["roots"], nproc=nproc, options=saved["options"])
    assert all(r["restored_steps"] == [SAVE_AT, SAVE_AT] for r in reports)
    return [_load(out / f"resume-{nproc}-{k}.pt") for k in range(len(saved["roots"]))]


def _state_keys(state: dict[str, Any]) -> set[str]:
    return set(state["model"]) | {f"optim.{k}" for k in state["optim"]["state"]}


def test_fsdp2_state_is_one_verified_sharded_checkpoint(saved: dict[str, Any]) -> None:
    for r in saved["reports"]:
        assert r["saved"] == [{"step": SAVE_AT, "valid": True}] * 2
    for root in saved["roots"]:
        options = saved["options"] if "://" in root else None
        report = ckptguard.verify(f"{root}/checkpoint-{SAVE_AT}", storage_options=options)
        assert report.ok, (root, report.problems)
        assert report.manifest is not None
        # DCP's metadata and one shard file per rank, under one manifest
        files = {f.path.rsplit("/", 1)[-1] for f in report.manifest.files}
        assert files == {".metadata", "__0_0.distcp", "__1_0.distcp"}, (root, files)
        assert report.manifest.writer.world_size == 2
    local = Path(saved["roots"][0]) / f"checkpoint-{SAVE_AT}"
    assert sorted(p.name for p in local.iterdir()) == sorted(
        [MANIFEST_NAME, ".metadata", "__0_0.distcp", "__1_0.distcp"]
    )
    # Checkpointing does not perturb training: the saving run is the uninterrupted one.
    assert _differences(saved["saving"], saved["reference"]) == []
    ref = saved["reference"]
    assert _state_keys(ref["at_save"]) == {
        f"{m}{i}.{p}" for m in ("", "optim.") for i in (0, 2, 4) for p in ("weight", "bias")
    }
    assert _differences(ref["at_save"], ref["end"]) != []  # training moved the state on


def test_a_sharded_save_failing_on_one_rank_leaves_nothing(
    saved: dict[str, Any], moto: S3Server
) -> None:
    for r in saved["reports"]:  # every rank got SaveAborted on each root, naming the pickle
        assert len(r["aborted"]) == 2
        for aborted in r["aborted"]:
            assert any("pickle" in msg for msg in aborted.values()), r["aborted"]
    local, remote = saved["roots"]
    assert sorted(p.name for p in Path(local).iterdir()) == [".ckptguard", f"checkpoint-{SAVE_AT}"]
    layout = RootLayout(local)
    for sub in (layout.staging, layout.trash, layout.quarantine):
        assert list(Path(sub).iterdir()) == []
    prefix = remote.removeprefix(f"s3://{moto.bucket}/")
    listing = moto.client().list_objects_v2(Bucket=moto.bucket, Prefix=prefix)
    keys = [o["Key"] for o in listing.get("Contents", [])]
    assert f"{prefix}/checkpoint-{SAVE_AT}/{MANIFEST_NAME}" in keys
    assert [k for k in keys if f"/checkpoint-{STEPS}" in k] == []  # no manifest, no shard
    mgr = ckptguard.CheckpointManager(remote, storage_options=saved["options"], read_only=True)
    assert [i.step for i in mgr.list()] == [SAVE_AT]


def test_fsdp2_resume_is_bit_exact_with_the_uninterrupted_run(saved: dict[str, Any]) -> None:
    ref = saved["reference"]
    for resumed in _resume(saved, nproc=2):  # from the local root, then from S3
        assert resumed["step"] == SAVE_AT
        assert _differences(resumed["before"], ref["at_save"]) != []  # initialised otherwise
        assert _differences(resumed["loaded"], ref["at_save"]) == []
        assert resumed["losses"] == ref["losses"][SAVE_AT:]  # steps 4..6, float for float
        assert _differences(resumed["end"], ref["end"]) == []


@pytest.mark.parametrize("nproc", [1, 4])
def test_fsdp2_resharded_resume_loads_bit_exact(saved: dict[str, Any], nproc: int) -> None:
    """Saved by 2 ranks, restored by 1 or 4: DCP reshards every parameter and moment."""
    for resumed in _resume(saved, nproc=nproc):  # from the local root, then from S3
        assert resumed["step"] == SAVE_AT
        assert _differences(resumed["before"], saved["reference"]["at_save"]) != []
        assert _differences(resumed["loaded"], saved["reference"]["at_save"]) == []


# --- the Hugging Face Trainer's sharded paths (Accelerate), under protect() ----------------

HF_DRIVER = Path(__file__).with_name("hf_fsdp_driver.py")
HF_TIMEOUT = 280  # seconds for one torchrun of the Trainer (10-30 s on two busy cores)
HF_SEAL_2 = "seal.files_synced:2"  # the 2nd save (checkpoint-6): shards fsynced, no manifest
HF_COMMON = {"rng_state_0.pth", "rng_state_1.pth", "scheduler.pt", "trainer_state.json"}


def _hf_files(engine: str, step: int) -> set[str]:
    """The files of the Trainer's checkpoint-<step>: every rank's shards among them."""
    if engine == "fsdp2":  # accelerate's save_fsdp_model/_optimizer, SHARDED_STATE_DICT: DCP
        return HF_COMMON | {
            f"{d}/{f}"
            for d in ("pytorch_model_fsdp_0", "optimizer_0")
            for f in (".metadata", "__0_0.distcp", "__1_0.distcp")
        }
    ds = {f"global_step{step}/zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)}
    if engine == "zero3":  # the parameters are partitioned too
        ds |= {f"global_step{step}/zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in (0, 1)}
    else:
        ds |= {f"global_step{step}/mp_rank_00_model_states.pt", "model.safetensors"}
    extra = {"latest", "zero_to_fp32.py", "zero_to_torch.py", "config.json"}
    return HF_COMMON | ds | extra | {"generation_config.json", "training_args.bin"}


def _hf_start(out: Path, engine: str, *flags: str) -> subprocess.Popen[str]:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(HF_DRIVER), str(out),
        "--engine", engine, *flags,
    ]  # fmt: skip
    return subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_hf_env(engine),
        start_new_session=True,
    )


def _hf_wait(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=HF_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun's workers are in its group
        proc.communicate()
        raise
    return proc.returncode, out, err


def _files(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()}


DEEPSPEED = Path(sys.prefix) / "deepspeed"  # the overlay `make install` fills


def _hf_env(engine: str) -> dict[str, str]:
    """The drivers' environment: DeepSpeed's overlay on the path for the ZeRO engines only."""
    if engine == "fsdp2":
        return CHILD_ENV
    assert (DEEPSPEED / ".installed").exists(), (
        f"{DEEPSPEED} is missing: run `make install` (it installs deepspeed there, see "
        "constraints-deepspeed.txt)"
    )
    path = os.pathsep.join(p for p in (str(DEEPSPEED), os.environ.get("PYTHONPATH")) if p)
    return CHILD_ENV | {"PYTHONPATH": path}


@pytest.mark.timeout(3 * HF_TIMEOUT)  # three torchruns, two of them at once
@pytest.mark.parametrize(
    "engine",
    [
        "fsdp2",
        # ZeRO-2's files are ZeRO-3's without the partitioned parameters: make chaos (73 s)
        pytest.param("zero2", marks=pytest.mark.chaos),
        "zero3",
    ],
)
def test_hf_trainer_sharded_killed_mid_save_resumes_bit_exact(tmp_path: Path, engine: str) -> None:
    """The Trainer's FSDP2 / ZeRO checkpoints: atomic, verified; a killed save leaves nothing.

    Two runs at once (two cores): an uninterrupted reference and one SIGKILLed inside its
    2nd commit; then the killed one again, which resumes from checkpoint-3 and runs 3 steps.
    """
    ref_out, out = tmp_path / "reference", tmp_path / "killed"
    reference = _hf_start(ref_out, engine)
    killed = _hf_start(out, engine, "--kill-at", HF_SEAL_2)
    ref_code, ref_stdout, ref_stderr = _hf_wait(reference)
    code, _, stderr = _hf_wait(killed)
    assert ref_code == 0, ref_stderr[-6000:]
    assert f"resumed from step 0; sharded by {engine}" in ref_stdout
    assert code != 0
    assert "Signal 9" in stderr or "SIGKILL" in stderr, stderr[-6000:]
    # Nothing of the killed save is visible: checkpoint-3 only, the shards left in staging.
    assert sorted(p.name for p in out.iterdir()) == [".ckptguard", "checkpoint-3"]
    assert list(Path(RootLayout(str(out)).staging).iterdir()) != []
    assert ckptguard.verify(out / "checkpoint-3").ok

    code, stdout, stderr = _hf_wait(_hf_start(out, engine))
    assert code == 0, stderr[-6000:]
    assert f"resumed from step 3; sharded by {engine}" in stdout
    final = json.loads((out / "final.json").read_text())
    expected = json.loads((ref_out / "final.json").read_text())
    assert (expected["step"], expected["ran"], expected["engine"]) == (STEPS, STEPS, engine)
    assert (final["step"], final["ran"], final["engine"]) == (STEPS, STEPS - SAVE_AT, engine)
    assert final["weights"] == expected["weights"]  # every weight, bit for bit
    for root in (ref_out, out):
        for step in (SAVE_AT, STEPS):
            final_dir = root / f"checkpoint-{step}"
            report = ckptguard.verify(final_dir)
            assert report.ok, report.problems
            assert report.manifest is not None
            assert report.manifest.writer.world_size == 2
            assert _files(final_dir) == _hf_files(engine, step) | {MANIFEST_NAME}
        assert list(Path(RootLayout(str(root)).staging).iterdir()) == []
