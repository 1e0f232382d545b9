"""The Trainer integration on the lowest transformers the ``hf`` extra declares (4.57).

``make install`` puts transformers 4.57.6 (and the versions of its dependencies that
differ from the main environment) into an overlay directory, ``$VENV/hf-lowest``; these
tests run the Trainer driver with that overlay in front of the venv on PYTHONPATH. The
newest version (the venv's own) is covered by test_integration_transformers.py.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import ckptguard

DRIVER = Path(__file__).resolve().parent / "hf_driver.py"
OVERLAY = Path(sys.prefix) / "hf-lowest"
LOWEST = "4.57.6"


def _env() -> dict[str, str]:
    assert (OVERLAY / ".installed").exists(), (
        f"{OVERLAY} is missing: run `make install` (it installs the lowest transformers there)"
    )
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(OVERLAY), os.environ.get("PYTHONPATH", "")]),
        "PYTHONWARNINGS": "ignore",
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _run(
    args: list[str], *, ranks: int = 1, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run the driver (under torchrun for several ranks) with the lowest transformers."""
    launcher = (
        [
            "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
            "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
        ]
        if ranks > 1
        else []
    )  # fmt: skip
    proc = subprocess.run(
        [sys.executable, *launcher, str(DRIVER), *args],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=280,
        check=False,
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_the_overlay_holds_the_lowest_transformers() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", "import transformers; print(transformers.__version__)"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
        check=True,
    )
    assert proc.stdout.strip() == LOWEST


@pytest.mark.slow
def test_killed_mid_save_and_resumed_is_bit_identical(tmp_path: Path) -> None:
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    _run([str(reference)])
    killed = _run([str(crashed), "--kill-at", "seal.files_synced:2"], check=False)
    assert killed.returncode != 0
    assert not (crashed / "checkpoint-20").exists()  # never half-visible
    assert ckptguard.verify(crashed / "checkpoint-10").ok
    resumed = _run([str(crashed)])
    assert "resumed from step 10" in resumed.stdout
    assert (crashed / "final.json").read_bytes() == (reference / "final.json").read_bytes()
    for step in (10, 20, 30):
        assert ckptguard.verify(crashed / f"checkpoint-{step}").ok
    assert list((crashed / ".ckptguard" / "staging").iterdir()) == []
    assert json.loads((crashed / "final.json").read_text())["step"] == 30


@pytest.mark.slow
def test_two_processes_commit_every_rank_s_files_once(tmp_path: Path) -> None:
    """Saving only: transformers 4.57 itself cannot resume a multi-process CPU run on
    torch 2.13 ("don't know how to restore data location of torch.storage.UntypedStorage
    (tagged with cpu:0)", unprotected too), so resume is covered with one process here."""
    out = tmp_path / "out"
    _run([str(out)], ranks=2)
    for step in (10, 20, 30):
        checkpoint = out / f"checkpoint-{step}"
        assert ckptguard.verify(checkpoint).ok
        files = {p.name for p in checkpoint.iterdir()}
        assert {"rng_state_0.pth", "rng_state_1.pth", "model.safetensors"} <= files
    assert list((out / ".ckptguard" / "staging").iterdir()) == []
