"""Sharded state through torch.distributed.checkpoint (DCP), committed by ckptguard.

DCP writes every rank's shards (and its ``.metadata``) into the staging dir that all ranks
agreed on; ckptguard's protocol then seals and commits it once, the manifest covering every
shard. Restore verifies every checksum first, then hands the directory to ``dcp.load``,
which reshards as needed. ckptguard has no planner of its own.

Trust (partial): DCP stores its ``.metadata`` with pickle. ckptguard only loads it after
the whole checkpoint verified against its manifest, which catches corruption but not a
checkpoint crafted by someone who can write the manifest too. Load sharded checkpoints
only from storage you trust.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ckptguard._errors import CheckpointError, CorruptCheckpoint
from ckptguard._protocol.verify import verify_local as verify

if TYPE_CHECKING:
    from pathlib import Path

    from ckptguard._protocol.transaction import AtomicCheckpoint

__all__ = ["KIND", "restore_sharded", "write_shards"]

KIND = "dcp"


def write_shards(tx: AtomicCheckpoint, staging: Path, state: dict[str, Any]) -> None:
    """Inside a coordinated transaction, every rank writes its shards with DCP."""
    from torch.distributed.checkpoint.state_dict_saver import save  # noqa: PLC0415 - torch

    if len(set(tx.committers)) > 1:
        # DCP writes one .metadata (on rank 0) for shards spread over every node: a
        # per-node copy would commit checkpoints that verify but cannot be loaded.
        raise CheckpointError(
            f"{tx.root} is not shared by all ranks (node-local disks): sharded saves "
            "need one root that every rank sees; use a shared filesystem"
        )
    save(state, checkpoint_id=str(staging))


def restore_sharded(path: str, target: Any) -> Any:
    """Verify every byte of a sharded checkpoint, then load it into ``target`` with DCP."""
    from torch.distributed.checkpoint.state_dict_loader import load  # noqa: PLC0415 - torch

    if target is None:
        raise ValueError(
            f"{path} is a sharded (DCP) checkpoint: restore it into a target "
            "(restore(target={...})); DCP loads in place and reshards as needed"
        )
    report = verify(path)
    if not report.ok:
        raise CorruptCheckpoint(
            f"{path} does not verify: {'; '.join(report.problems)}",
            path=path,
            problems=report.problems,
        )
    load(target, checkpoint_id=path)
    return target
