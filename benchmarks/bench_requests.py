"""Object-store requests per operation on a root of 10 and of 1000 checkpoints.

Counted on the wire (botocore's before-send event: every attempt the server receives)
against moto's S3 server on 127.0.0.1, for start-up, ``latest()`` and a save (its
retention included), with two policies: ``keep_last=3, keep_every=1`` (a root that keeps
every checkpoint, the worst case for retention) and ``best_metric`` ranking (which needs
every manifest: read once per process, then by ETag). Requests are not time: this
benchmark is not sensitive to the machine's load.

    python benchmarks/bench_requests.py --counts 10 1000 --json benchmarks/results/requests.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch

import ckptguard

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from request_counter import counting
from s3_servers import S3Server, start_moto

POLICIES: dict[str, dict[str, Any]] = {
    "keep_last=3,keep_every=1": {"keep_last": 3, "keep_every": 1},
    "best_metric=loss": {"keep_last": 3, "keep_every": 1, "best_metric": "loss"},
}


def populate(server: S3Server, count: int) -> str:
    url = server.url(f"bench-{uuid.uuid4().hex[:8]}")
    mgr = ckptguard.CheckpointManager(
        url, keep_last=None, storage_options=server.storage_options, check_environment=False
    )
    for step in range(1, count + 1):
        mgr.save(step, {"w": torch.full((16,), float(step))}, metrics={"loss": 1.0 / step})
        if step % 200 == 0:
            print(f"  populated {step}/{count}", file=sys.stderr)
    mgr.close()
    return url


def measure(server: S3Server, url: str, count: int, policy: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with counting() as requests:
        mgr = ckptguard.CheckpointManager(
            url, storage_options=server.storage_options, check_environment=False, **policy
        )
        out["start-up"] = requests.take()
        mgr.latest()
        out["latest"] = requests.take()
        for n in (1, 2, 3):
            mgr.save(count + n, {"w": torch.zeros(16)}, metrics={"loss": 5.0})
            out[f"save {n}"] = requests.take()
        mgr.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[10, 1000])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        server = start_moto(Path(tmp))
        try:
            for count in args.counts:
                print(f"populating a root of {count} checkpoints", file=sys.stderr)
                url = populate(server, count)
                held = count
                for label, policy in POLICIES.items():
                    # one root for both: each measure adds its 3 saves to it
                    results[f"{held} checkpoints, {label}"] = measure(server, url, held, policy)
                    held += 3
        finally:
            server.stop()
    print(
        f"{'root':44s} {'start-up':>9s} {'latest':>7s} {'save 1':>7s} {'save 2':>7s} {'save 3':>7s}"
    )
    for key, row in results.items():
        cells = [row[k]["total"] for k in ("start-up", "latest", "save 1", "save 2", "save 3")]
        print(f"{key:44s} " + " ".join(f"{c:>8d}" for c in cells))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
