"""The torch.distributed backend of :class:`~ckptguard.Coordinator`.

Messages are small JSON documents exchanged through the key-value store of the default
process group (the c10d ``Store`` that torchrun's rendezvous made): no process group of
our own, no collective on the training's backend, nothing pickled.

Why not gloo collectives on a side group (the first design): a gloo ``all_gather`` leaves
work objects in gloo's threads that can be destroyed while the interpreter shuts down,
and the process then aborts after a successful run (SIGABRT, "terminate called without an
active exception"): 9 of 20 two-rank runs of three all_gathers here, 2 of 30 protected
Accelerate runs. A side group also added gloo threads to NCCL jobs.

Keys: ``ckptguard/<world size>/<generation>/<round>/<rank>`` (``.../<round>/b`` for a
broadcast); a named channel (the background thread of async saves) uses
``ckptguard/<channel>/...`` and a store connection of its own, so that its exchanges
never interleave with, or wait behind, the training thread's. This stands in for the
"side process group" of other libraries, without a collective backend. The round number
advances on every call; every rank makes the same calls in the same order (the
Coordinator contract), so the numbers agree. The generation tells process groups that
reuse a store apart (a group destroyed and created again in the same processes): each
rank draws a ticket from the store's counter for its world size when it first uses a
group, and the ranks of one group draw consecutive tickets. Partial: a group re-created
on the same store by a different set of processes, some of which never joined the
earlier one, could disagree on the generation. A key is deleted by its writer once a
later ``all_gather`` shows that every rank has read it; at most one round of keys per
rank stays in the store.

Exit with a gloo group (the abort is upstream's; what ckptguard does about it):

- A gloo worker thread releases a finished collective's work after its caller has
  returned. When the work's tensors were the caller's Python tensors, the release takes
  the GIL. Once the interpreter finalizes, Python < 3.14 ends a thread that takes the GIL
  with ``pthread_exit``; the forced unwind meets the work's ``noexcept`` destructor and
  ``std::terminate`` aborts a rank whose run succeeded ("terminate called without an
  active exception", SIGABRT, torchrun exits 1). The aborting thread in the core dump,
  innermost first: ``PyThread_exit_thread``, ``take_gil``, ``gil_scoped_acquire``,
  ``TensorImpl::decref_pyobject``, ``~AsyncAllgatherWork``, ``ProcessGroupGloo::runLoop``
  (torch 2.13, Python 3.11). The Trainer's last ``all_gather`` (``store_flos``, at the end
  of ``train()``) returns about 1 ms before the interpreter's shutdown; a thread waiting for
  the GIL asks its holder for it only after 5 ms. Without the two measures below, 20 of 60
  two-rank protected Trainer runs aborted here and 5 of 30 unprotected ones
  (tests/integrations/test_exit_abort.py). Upstream: pytorch/pytorch#190489 (no warning,
  no fix), CPython gh-87135 (3.14 hangs such a thread instead of ending it).
- ckptguard's part: ``_Rounds`` held the group itself, so ``destroy_process_group()`` no
  longer destroyed it (which joins the gloo threads) and left it, threads and all, for the
  interpreter's shutdown: 8 of 20 two-rank runs aborted after a ckptguard exchange and a
  ``destroy_process_group()``, 1 of 20 without the exchange. It holds a weak reference now.
- At exit, once this process has exchanged over a group, ckptguard hands the GIL over for
  a moment before the interpreter finalizes (an ``atexit`` hook): a gloo thread waiting for
  it finishes its release while the interpreter is whole. Partial: a thread kept off the
  CPU for longer than that moment still aborts; a group that ckptguard never exchanged
  over (a protected Trainer that neither saves nor resumes) gets no hook.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist

__all__ = ["TorchCoordinator"]

_PREFIX = "ckptguard"


@dataclass
class _Rounds:
    """This process's position in the message rounds of one process group."""

    # Weak: a reference held here kept a destroyed group's gloo threads alive until the
    # interpreter's shutdown, where they abort the process (see the module docstring).
    # A dead reference also tells a new group that reuses the id() apart.
    group: weakref.ref[Any]
    store: Any
    prefix: str
    next_round: int = 0
    undeleted: list[str] = field(default_factory=list)  # own keys, not yet known read by all

    def take(self) -> str:
        base = f"{self.prefix}{self.next_round}/"
        self.next_round += 1
        return base

    def everyone_read_earlier_rounds(self) -> None:
        """After an all_gather: every rank has finished every earlier round."""
        for key in self.undeleted:
            self.store.delete_key(key)
        self.undeleted.clear()


_ROUNDS: dict[tuple[int, str], _Rounds] = {}
_LOCK = threading.Lock()
_SETTLE_SECONDS = 0.05  # any release sufficed in 40 of 40 runs; margin for a descheduled thread
_exit_hooked = False


def _let_collective_threads_finish() -> None:
    """At exit: release the GIL for a moment, while the interpreter is whole (see above)."""
    time.sleep(_SETTLE_SECONDS)  # sleeps without the GIL


def _hook_exit() -> None:
    """Register the exit hook once, when this process first exchanges over a group."""
    global _exit_hooked  # noqa: PLW0603 - once per process
    if not _exit_hooked:
        atexit.register(_let_collective_threads_finish)
        _exit_hooked = True


def _own_connection(store: Any) -> Any:
    """A store client of its own for a side channel; the shared one if it cannot be cloned.

    A channel that blocks in ``wait`` must not hold up the training thread's use of the
    shared client.
    """
    try:
        return store.clone()
    except (RuntimeError, NotImplementedError, AttributeError):
        return store


def _rounds(channel: str = "") -> _Rounds:
    group = dist.distributed_c10d._get_default_group()  # noqa: SLF001 - the PG's identity
    with _LOCK:
        _hook_exit()
        for key in [k for k, r in _ROUNDS.items() if r.group() is None]:
            del _ROUNDS[key]  # a destroyed group's
        rounds = _ROUNDS.get((id(group), channel))
        if rounds is None or rounds.group() is not group:
            store = dist.distributed_c10d._get_default_store()  # noqa: SLF001 - its store
            if channel:
                store = _own_connection(store)
            world = int(dist.get_world_size())
            space = f"{_PREFIX}/{channel}/" if channel else f"{_PREFIX}/"
            ticket = int(store.add(f"{space}tickets/{world}", 1))
            generation = (ticket - 1) // world
            rounds = _Rounds(weakref.ref(group), store, f"{space}{world}/{generation}/")
            _ROUNDS[(id(group), channel)] = rounds
        return rounds


def _encode(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode("utf-8")


def _decode(data: bytes) -> Any:
    return json.loads(data.decode("utf-8"))


class TorchCoordinator:
    """Collectives over torch.distributed's default process group, through its store."""

    def __init__(self, channel: str = "") -> None:
        """Exchanges over the default group's store; ``channel`` names a separate stream.

        A named channel (a background thread's) has its own rounds and its own store
        connection, independent of the default channel's; every rank must use a channel
        the same way.
        """
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised")
        if channel and not channel.isidentifier():
            raise ValueError(f"channel must be an identifier, got {channel!r}")
        self._rounds = _rounds(channel)

    def channel(self, name: str) -> TorchCoordinator:
        """The same ranks, exchanging on channel ``name`` (see ``__init__``)."""
        return TorchCoordinator(name)

    @property
    def rank(self) -> int:
        return int(dist.get_rank())

    @property
    def world_size(self) -> int:
        return int(dist.get_world_size())

    @property
    def local_rank(self) -> int:
        return int(os.environ.get("LOCAL_RANK", "0") or 0)

    @property
    def node(self) -> str:
        # torchrun's node rank tells simulated nodes on one host apart.
        return f"{socket.gethostname()}/{os.environ.get('GROUP_RANK', '0')}"

    def barrier(self) -> None:
        self.all_gather(None)

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        rounds = self._rounds
        key = rounds.take() + "b"
        if self.rank == src:
            rounds.store.set(key, _encode(obj))
            rounds.undeleted.append(key)
        rounds.store.wait([key])
        return _decode(bytes(rounds.store.get(key)))

    def all_gather(self, obj: Any) -> list[Any]:
        rounds = self._rounds
        base = rounds.take()
        mine = f"{base}{self.rank}"
        rounds.store.set(mine, _encode(obj))
        keys = [f"{base}{r}" for r in range(self.world_size)]
        rounds.store.wait(keys)
        values = [_decode(bytes(v)) for v in rounds.store.multi_get(keys)]
        # Every rank wrote this round, so every rank finished reading the earlier ones.
        rounds.everyone_read_earlier_rounds()
        rounds.undeleted.append(mine)
        return values
