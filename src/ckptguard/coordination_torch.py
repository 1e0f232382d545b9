"""The torch.distributed backend of :class:`~ckptguard.coordination.Coordinator`.

Collectives run on a separate gloo group created once per process group: they move a
few hundred bytes of JSON on the CPU whatever the training's backend (NCCL included), and
they never interleave with the training's own collectives. Objects travel as UTF-8 JSON in
uint8 tensors (``broadcast_object_list`` would pickle them).
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["TorchCoordinator"]

_GROUPS: dict[int, Any] = {}


def _gloo_group() -> Any:
    """One gloo group over the default group's ranks, made once (a collective call)."""
    key = id(dist.distributed_c10d._get_default_group())  # noqa: SLF001 - identity of the PG
    if key not in _GROUPS:
        if dist.get_backend() == "gloo":
            _GROUPS[key] = None  # the default group is gloo already
        else:
            _GROUPS[key] = dist.new_group(backend="gloo")
    return _GROUPS[key]


def _encode(obj: Any) -> torch.Tensor:
    data = json.dumps(obj, separators=(",", ":")).encode("utf-8")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0)


def _decode(tensor: torch.Tensor) -> Any:
    return json.loads(bytes(tensor.tolist()).decode("utf-8"))


class TorchCoordinator:
    """Collectives over torch.distributed's default process group (a gloo side group)."""

    def __init__(self) -> None:
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised")
        self._group = _gloo_group()

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
        dist.barrier(group=self._group)

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        payload = _encode(obj) if self.rank == src else torch.empty(0, dtype=torch.uint8)
        size = torch.tensor([payload.numel()], dtype=torch.int64)
        dist.broadcast(size, src=src, group=self._group)
        if self.rank != src:
            payload = torch.empty(int(size.item()), dtype=torch.uint8)
        dist.broadcast(payload, src=src, group=self._group)
        return _decode(payload)

    def all_gather(self, obj: Any) -> list[Any]:
        payload = _encode(obj)
        size = torch.tensor([payload.numel()], dtype=torch.int64)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
        dist.all_gather(sizes, size, group=self._group)
        longest = max(int(s.item()) for s in sizes)
        padded = torch.zeros(longest, dtype=torch.uint8)
        padded[: payload.numel()] = payload
        chunks = [torch.zeros(longest, dtype=torch.uint8) for _ in range(self.world_size)]
        dist.all_gather(chunks, padded, group=self._group)
        return [_decode(c[: int(s.item())]) for c, s in zip(chunks, sizes, strict=True)]
