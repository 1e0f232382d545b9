"""A manager's options for a save, and what it stores besides the user's state.

:class:`SaveOptions` turns a step into the commit transaction with the manager's settings;
:func:`commit_state` is the manager's save path on every backend: the transaction's
committer streams the encoded state straight into the staging (a staging dir, or the
save's prefix on a store), and the transaction seals and commits it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from ckptguard._protocol.transaction import AtomicCheckpoint
from ckptguard._storage.retry import call_save_with_retry

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from ckptguard._coordination.base import Coordinator
    from ckptguard._format.layout import Naming
    from ckptguard._format.manifest import Manifest
    from ckptguard._protocol.backend import Backend
    from ckptguard._protocol.strategy import CommitResult, IfExists
    from ckptguard._state.reuse import Incremental, Reuse
    from ckptguard._state.serialization import EncodedState
    from ckptguard._storage.retry import RetryPolicy

__all__ = [
    "RESERVED_METADATA",
    "BestSpec",
    "SaveOptions",
    "best_in",
    "clean_metrics",
    "commit_state",
    "flagged",
    "kind_of",
    "pinned_in",
    "result_of",
]

_log = logging.getLogger("ckptguard.manager")
RESERVED_METADATA = "ckptguard"


BestSpec = tuple[str, Literal["min", "max"]]  # (metric, mode) that ranks "best"


def flagged(
    metadata: Mapping[str, Any] | None,
    *,
    kind: str,
    pin: bool,
    run: str | None = None,
    best: BestSpec | None = None,
) -> dict[str, Any]:
    """The user's metadata plus ckptguard's flags: how to restore, pinned, which run.

    ``best``: the manager's best_metric and best_mode, so that tools without the
    manager's arguments (``ckptguard list``) rank "best" the same way.
    """
    out = dict(metadata or {})
    if RESERVED_METADATA in out:
        raise ValueError(f"metadata key {RESERVED_METADATA!r} is reserved")
    flags: dict[str, Any] = {"kind": kind, "pinned": pin}
    if run is not None:
        flags["run"] = run
    if best is not None:
        flags["best"] = {"metric": best[0], "mode": best[1]}
    out[RESERVED_METADATA] = flags
    return out


def _flags(manifest: Manifest | None) -> dict[str, Any]:
    flags = manifest.metadata.get(RESERVED_METADATA, {}) if manifest else {}
    return flags if isinstance(flags, dict) else {}


def kind_of(manifest: Manifest | None) -> str | None:
    """What wrote the checkpoint: "state", "files" or "dcp" (None: not a manager's)."""
    kind = _flags(manifest).get("kind")
    return kind if isinstance(kind, str) else None


def best_in(manifest: Manifest | None) -> BestSpec | None:
    """The (metric, mode) a manager ranked "best" by when it saved this (None: none)."""
    best = _flags(manifest).get("best")
    if not isinstance(best, dict):
        return None
    metric, mode = best.get("metric"), best.get("mode")
    if not isinstance(metric, str) or mode not in {"min", "max"}:
        return None
    return (metric, "min" if mode == "min" else "max")


def pinned_in(manifest: Manifest | None) -> bool:
    """Whether the checkpoint was saved with ``pin=True``."""
    return bool(_flags(manifest).get("pinned"))


def clean_metrics(metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    """Metrics as JSON values: 0-d tensors as numbers, inf and nan as strings."""
    out: dict[str, Any] = {}
    for key, raw in (metrics or {}).items():
        value = raw.item() if callable(getattr(raw, "item", None)) else raw  # 0-d tensors
        if isinstance(value, float) and not math.isfinite(value):
            _log.warning("metric %r is %s; stored as a string, never counted as best", key, value)
            value = repr(value)
        out[str(key)] = value
    return out


@dataclass(frozen=True)
class SaveOptions:
    """What every save of one manager shares: where, how named, how committed."""

    backend: Backend
    naming: Naming
    if_exists: IfExists
    retry: RetryPolicy
    lock_timeout: float
    stale_after: float

    def committed(self) -> list[str]:
        """The paths of the root's step-named entries, newest first (local roots)."""
        found = []
        for name in self.backend.names():
            step = self.naming.step(name)
            if step is not None:
                found.append((step, self.backend.join(name)))
        return [path for _, path in sorted(found, reverse=True)]

    def manifest_reader(self) -> Callable[[str], Manifest] | None:
        """How incremental saves read an object store's manifests (None: a local root)."""
        return self.backend.read_manifest if self.backend.remote else None

    def transaction(
        self,
        step: int,
        metrics: Mapping[str, Any] | None,
        metadata: dict[str, Any],
        coord: Coordinator,
    ) -> AtomicCheckpoint:
        """The coordinated commit of the checkpoint of ``step`` with these settings."""
        return AtomicCheckpoint(
            self.backend.join(self.naming.name(step)),
            step=step,
            metrics=clean_metrics(metrics),
            metadata=metadata,
            if_exists=self.if_exists,
            storage=self.backend.storage,
            retry=self.retry,
            lock_timeout=self.lock_timeout,
            stale_after=self.stale_after,
            coordinator=coord,
        )


def result_of(tx: AtomicCheckpoint) -> CommitResult:
    """What a finished transaction committed."""
    if tx.result is None:  # pragma: no cover - __exit__ either sets it or raises
        raise RuntimeError("save finished without a result")
    return tx.result


def commit_state(  # noqa: PLR0917 - the manager's save, positionally as it calls it
    options: SaveOptions,
    step: int,
    encoded: EncodedState | None,
    state: Any,
    metrics: Mapping[str, Any] | None,
    metadata: dict[str, Any],
    *,
    coord: Coordinator,
    took_part: Callable[[bool], None],
    incremental: Incremental | None = None,
) -> tuple[str, bool]:
    """Every rank calls; each committer writes its state into the agreed staging.

    One committer for a shared root (or a store), one per node for node-local roots;
    ``metadata`` is flagged already. ``encoded`` is the state ready to write (a snapshot
    for async saves); a committer without one encodes ``state`` (the training thread's,
    for blocking saves only). ``took_part(committer)`` learns whether this rank committed.
    ``incremental``: link files that committed checkpoints hold already (see reuse.py);
    the manifest's metadata records how many (``ckptguard.incremental``).
    Returns (the checkpoint's path, whether this rank committed it).
    """
    from ckptguard._state.serialization import encode_state, write_encoded  # noqa: PLC0415 - torch

    def attempt() -> tuple[str, bool]:
        tx = options.transaction(step, metrics, metadata, coord)
        with tx:
            committer = coord.rank == tx.committer
            took_part(committer)
            if committer:
                snapshot = encoded
                if snapshot is None:
                    if state is None:
                        raise RuntimeError(
                            f"rank {coord.rank} commits for its node this time but took "
                            "no snapshot (it did not commit the previous save); save again"
                        )
                    snapshot = encode_state(state, split_frozen=incremental is not None)
                tx.expected_bytes = snapshot.nbytes
                reuse, chain = None, 0
                if incremental is not None:
                    reuse, chain = incremental.plan(options.committed(), options.manifest_reader())
                written = write_encoded(tx.write_path, snapshot, tx.storage, reuse=reuse)
                tx.known.update(written)
                if incremental is not None:
                    incremental.done(reuse)
                    tx.metadata = with_incremental(tx.metadata, chain, reuse)
        return result_of(tx).path, committer

    if coord.world_size == 1:
        # One process: a save that a transient error aborted is made again from scratch.
        final = options.backend.join(options.naming.name(step))
        return call_save_with_retry(attempt, final=final, policy=options.retry)
    return attempt()


def with_incremental(
    metadata: Mapping[str, Any] | None, chain: int, reuse: Reuse | None
) -> dict[str, Any]:
    """``metadata`` with what an incremental save linked (its files and bytes)."""
    out = dict(metadata or {})
    flags = dict(out.get(RESERVED_METADATA) or {})
    flags["incremental"] = {
        "chain": chain,
        "linked_files": sorted(reuse.linked) if reuse is not None else [],
        "linked_bytes": reuse.linked_bytes if reuse is not None else 0,
        "linked_by": (
            min(set(reuse.linked.values())) if reuse is not None and reuse.linked else None
        ),  # "copy" (an object store), "hardlink" or "reflink"
    }
    out[RESERVED_METADATA] = flags
    return out
