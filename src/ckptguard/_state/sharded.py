"""Sharded state through torch.distributed.checkpoint (DCP), committed by ckptguard.

Save: every rank writes its own shards with DCP straight into the save's staging path
(a staging dir on a filesystem, the save's fresh prefix on an object store) through
ckptguard's storage (``dcp_storage.py``), each file hashed as written; the transaction
gathers every rank's (path, size, checksum) to the committer, whose one manifest lists
them all and commits the checkpoint once. A failure on any rank aborts the save on
every rank and removes what was written. Restore verifies every checksum first, then
hands the verified files to ``dcp.load`` (ranged reads), which reshards as needed:
ckptguard has no planner of its own.

Trust (partial): DCP stores its ``.metadata`` with pickle, and non-tensor values too.
ckptguard only loads them after the whole checkpoint verified against its manifest,
which catches corruption but not a checkpoint crafted by someone who can write the
manifest too. Load sharded checkpoints only from storage you trust.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import TYPE_CHECKING, Any

from ckptguard._errors import CheckpointError, CorruptCheckpoint

if TYPE_CHECKING:
    from collections.abc import Iterator

    from torch.distributed.checkpoint.api import CheckpointException

    from ckptguard._protocol.backend import Backend
    from ckptguard._protocol.transaction import AtomicCheckpoint

__all__ = ["KIND", "restore_sharded", "write_shards"]

KIND = "dcp"


@contextlib.contextmanager
def _one_process_is_fine() -> Iterator[None]:
    """Without a process group DCP warns that it assumes one process: here it is one."""
    import torch.distributed as dist  # noqa: PLC0415 - torch

    if dist.is_available() and dist.is_initialized():
        yield  # no warning to silence (catch_warnings swaps process-wide state)
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        yield


def write_shards(tx: AtomicCheckpoint, state: dict[str, Any]) -> None:
    """Inside a coordinated transaction, every rank writes its shards with DCP."""
    from torch.distributed.checkpoint.api import CheckpointException  # noqa: PLC0415 - torch
    from torch.distributed.checkpoint.state_dict_saver import save  # noqa: PLC0415 - torch

    from ckptguard._state.dcp_storage import StoreWriter  # noqa: PLC0415 - torch

    if len(set(tx.committers)) > 1:
        # DCP writes one .metadata (on rank 0) for shards spread over every node: a
        # per-node copy would commit checkpoints that verify but cannot be loaded.
        raise CheckpointError(
            f"{tx.root} is not shared by all ranks (node-local disks): sharded saves "
            "need one root that every rank sees; use a shared filesystem or an object store"
        )
    writer = StoreWriter(tx.storage, tx.write_path)
    try:
        with _one_process_is_fine():
            save(state, storage_writer=writer)
    except CheckpointException as exc:
        # DCP raises on every rank when any rank's write failed. The ranks that failed
        # raise their own error; the others return, and the transaction (which hears
        # from the failed ranks) aborts the save on every rank, naming only those.
        if (own := _own_failure(exc)) is not None:
            raise own from None
        return
    tx.known.update(writer.written)  # gathered to the committer with every rank's


def restore_sharded(backend: Backend, path: str, target: Any) -> Any:
    """Verify every byte of a sharded checkpoint, then load it into ``target`` with DCP."""
    from torch.distributed.checkpoint.api import CheckpointException  # noqa: PLC0415 - torch
    from torch.distributed.checkpoint.state_dict_loader import load  # noqa: PLC0415 - torch

    from ckptguard._state.dcp_storage import StoreReader  # noqa: PLC0415 - torch

    if target is None:
        raise ValueError(
            f"{path} is a sharded (DCP) checkpoint: restore it into a target "
            "(restore(target={...})); DCP loads in place and reshards as needed"
        )
    name = path.rstrip("/").rsplit("/", 1)[-1]
    report = backend.verify(path, checksums=True, expect_name=name)
    if not report.ok or report.manifest is None:
        raise CorruptCheckpoint(
            f"{path} does not verify: {'; '.join(report.problems)}",
            path=path,
            problems=report.problems,
        )
    # Only now is DCP's pickled .metadata read (see the trust note above).
    manifest, opener, close = backend.open_files(path, report.manifest)
    try:
        reader = StoreReader(path, opener, {f.path for f in manifest.files})
        with _one_process_is_fine():
            load(target, storage_reader=reader)
    except CheckpointException as exc:
        if (own := _own_failure(exc)) is not None:
            raise own from None
        raise CheckpointError(
            f"{path}: loading failed on rank(s) {sorted(exc.failures)}: {_first(exc)}",
            path=path,
        ) from None
    finally:
        close()
    return target


def _rank() -> int:
    import torch.distributed as dist  # noqa: PLC0415 - torch

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _own_failure(exc: CheckpointException) -> BaseException | None:
    """This rank's own error inside DCP's CheckpointException (a BaseException), if any."""
    failure = exc.failures.get(_rank())
    return None if failure is None else failure[0]


def _first(exc: CheckpointException) -> str:
    rank = min(exc.failures)
    error = exc.failures[rank][0]
    return f"rank {rank}: {type(error).__name__}: {error}"
