"""bf16 and fp8 tensors round-trip bit-exact through CheckpointManager, sync and async.

What a CPU can show of the GPU check in ``benchmarks/device_check.py`` (c): every bit
pattern of the 8-bit float formats (NaNs, infinities, -0.0, subnormals included) and a
bf16 tensor with its special values survive save and restore, with and without a target,
from a synchronous save and from an async one whose source changes right after ``save``
returns. Bits are compared through ``.view(torch.uint8)``: ``torch.equal`` would call
NaN unequal to itself and -0.0 equal to 0.0.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import ckptguard
from ckptguard._storage import faults as _faults

FP8 = [getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name)]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    bf16 = (torch.randn(7, 9, generator=g, dtype=torch.float64) * 1e3).to(torch.bfloat16)
    bf16.view(-1)[:5] = torch.tensor([math.nan, math.inf, -math.inf, -0.0, 1e-40])
    state = {"bf16": bf16, "bf16_row": bf16[3].clone()}
    for dtype in FP8:
        # all 256 bit patterns of the format, as a 16x16 tensor
        state[str(dtype).removeprefix("torch.")] = (
            torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype).reshape(16, 16)
        )
    return state


def _assert_bits(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(expected)
    for name, t in expected.items():
        assert got[name].dtype == t.dtype, name
        assert got[name].shape == t.shape, name
        assert torch.equal(_bits(got[name]), _bits(t)), name


def test_fp8_formats_exist() -> None:
    """The fp8 rows below are not silently empty on this torch."""
    assert torch.float8_e4m3fn in FP8
    assert torch.float8_e5m2 in FP8


@pytest.fixture
def hold_background() -> Iterator[threading.Event]:
    """Holds the async save's background thread before it writes anything, until set."""
    go = threading.Event()

    def hook(name: str) -> None:
        if name == "stage.created" and threading.current_thread() is not threading.main_thread():
            go.wait(60)

    previous = _faults.set_fault_hook(hook)
    try:
        yield go
    finally:
        go.set()
        _faults.set_fault_hook(previous)


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_low_precision_round_trip(
    tmp_path: Path, hold_background: threading.Event, *, async_save: bool
) -> None:
    state = _state()
    expected = {k: v.clone() for k, v in state.items()}
    mgr = ckptguard.CheckpointManager(
        tmp_path / "run", async_save=async_save, check_environment=False
    )
    try:
        mgr.save(1, {"low": state})
        if async_save:
            # save() returned, nothing is written yet: change every source bit pattern
            for t in state.values():
                _bits(t).add_(1)
        hold_background.set()
        mgr.wait()
        _assert_bits(expected, mgr.restore(1)["low"])  # into new tensors
        target = {k: torch.zeros_like(v) for k, v in expected.items()}
        mgr.restore(1, target={"low": target})  # into existing tensors, in place
        _assert_bits(expected, target)
    finally:
        mgr.close()
    assert ckptguard.verify(tmp_path / "run" / "checkpoint-1").ok
