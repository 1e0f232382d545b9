"""Who does what when several processes save one checkpoint.

A :class:`Coordinator` gives the commit protocol the few collectives it needs. Call order
for one save (every rank makes every call, in this order; a constant six collectives,
whatever the number of files):

1. ``broadcast(probe)``       rank 0 drops a probe file into its root;
2. ``all_gather(sees)``       each rank says whether it sees it: one committer for a shared
                              root, one per node for node-local roots;
3. ``all_gather(staging)``    each committer stages and everyone learns where to write;
4. ``all_gather(written)``    every rank reports whether its writes succeeded;
5. ``all_gather(sealed)``     every committer seals (manifest written, nothing visible);
6. ``all_gather(committed)``  only if all sealed, every committer renames; everyone returns
                              the same result or raises the same SaveAborted.

Only committers ever create, rename or remove staging dirs and final directories.
Messages are small JSON documents; nothing received from a peer is unpickled.

Backends: :class:`SingleProcess` (no peers; commits are serialised with the root's file
lock, as for independent processes sharing a root) and the torch.distributed backend in
``coordination_torch.py`` (imported only when a process group exists).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "Coordinator",
    "SingleProcess",
    "default_coordinator",
    "gather_failures",
    "side_channel",
]


@runtime_checkable
class Coordinator(Protocol):
    """The collectives of one group of processes that save together."""

    @property
    def rank(self) -> int: ...
    @property
    def world_size(self) -> int: ...
    @property
    def local_rank(self) -> int: ...
    @property
    def node(self) -> str: ...

    def barrier(self) -> None:
        """Wait until every rank arrives."""

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s JSON-able ``obj``, on every rank."""

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's JSON-able ``obj``, in rank order, on every rank."""


class SingleProcess:
    """A group of one: every collective is local."""

    rank = 0
    world_size = 1
    local_rank = 0

    @property
    def node(self) -> str:
        return socket.gethostname()

    def barrier(self) -> None:
        return None

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if src != 0:
            raise ValueError(f"a single process has no rank {src}")
        return obj

    def all_gather(self, obj: Any) -> list[Any]:
        return [obj]


def gather_failures(coordinator: Coordinator, error: str | None) -> dict[int, str]:
    """Every rank's failure (rank -> message), {} if none failed: one all_gather.

    Every rank must call it, failed or not, or the others wait in the collective.
    """
    if coordinator.world_size == 1:
        return {} if error is None else {0: error}
    return {r: str(e) for r, e in enumerate(coordinator.all_gather(error)) if e is not None}


def side_channel(coordinator: Coordinator, name: str) -> Coordinator:
    """The coordinator a background thread uses next to ``coordinator``'s own users.

    The torch backend gives the same ranks a channel of their own (own rounds, own store
    connection). A single process needs none. Any other coordinator is shared as it is:
    its user must not call it from another thread while a background save runs.
    """
    make = getattr(coordinator, "channel", None)
    if callable(make):
        side: Coordinator = make(name)
        return side
    return coordinator


def default_coordinator() -> Coordinator:
    """torch.distributed's default group when one is initialised, else a single process.

    torch is not imported here: a process group can only exist if the program already
    imported ``torch.distributed`` itself.
    """
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        from ckptguard._coordination.distributed import TorchCoordinator  # noqa: PLC0415 - needs torch

        return TorchCoordinator()
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        _warn_multi_rank_without_group()
    return SingleProcess()


_warned_multi_rank = False


def _warn_multi_rank_without_group() -> None:
    """Warn once: WORLD_SIZE > 1 but no process group to coordinate the ranks' saves."""
    # Without a coordinator every process stages and commits its own save; the first
    # commit wins and files that only other ranks wrote are not in it.
    global _warned_multi_rank  # noqa: PLW0603 - warn once per process, not once per save
    if not _warned_multi_rank:
        _warned_multi_rank = True
        logging.getLogger("ckptguard.commit").warning(
            "WORLD_SIZE=%s but torch.distributed is not initialised: each process commits its "
            "own save and the first commit wins, so files written only by other ranks are "
            "dropped. Initialise the process group before saving (or save from one rank)",
            os.environ.get("WORLD_SIZE"),
        )
