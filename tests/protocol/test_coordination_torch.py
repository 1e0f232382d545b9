"""TorchCoordinator: JSON messages through the process group's store, under torchrun.

Every rank makes the same calls; each all_gather returns every rank's object in rank
order and each broadcast the source's object; the store keeps at most a round of
ckptguard keys per rank however many rounds ran; and a finished process exits 0 (the
gloo-collective design could abort at interpreter shutdown).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

CHILD = """
import json, sys
import torch.distributed as dist
from ckptguard._coordination.distributed import TorchCoordinator
dist.init_process_group("gloo")
rounds = int(sys.argv[2])
coord = TorchCoordinator()
rank, world = coord.rank, coord.world_size
gathered, broadcasts = [], []
for i in range(rounds):
    gathered.append(coord.all_gather({"rank": rank, "i": i, "text": "é" * rank}))
    broadcasts.append(coord.broadcast({"from": i % world, "i": i} if rank == i % world else None,
                                      src=i % world))
    TorchCoordinator().barrier()  # a new instance continues the same rounds
store = dist.distributed_c10d._get_default_store()
keys = store.num_keys()
with open(f"{sys.argv[1]}/rank{rank}.json", "w") as f:
    json.dump({"gathered": gathered, "broadcasts": broadcasts, "keys": keys, "world": world}, f)
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.mark.parametrize("nproc", [1, 2], ids=["1-process", "2-processes"])
def test_rounds_agree_and_the_store_stays_small(tmp_path: Path, nproc: int) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    rounds = 60
    proc = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
            str(script), str(tmp_path), str(rounds),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "terminate called" not in proc.stderr
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(nproc)]
    for report in reports:
        assert report["gathered"] == [
            [{"rank": r, "i": i, "text": "é" * r} for r in range(nproc)] for i in range(rounds)
        ]
        assert report["broadcasts"] == [{"from": i % nproc, "i": i} for i in range(rounds)]
        # 180 rounds ran; what is left is the last round's keys (plus torchrun's own and
        # the ticket counter), not one key per round.
        assert report["keys"] < 20 + 2 * nproc
