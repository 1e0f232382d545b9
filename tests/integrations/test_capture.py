"""integrations/_capture.py: which writes are deferred, and that a deferred write is faithful.

The framework tests (test_async_frameworks.py) show whole trainers; these show the rules
one call at a time: a deferred ``torch.save``/``save_file`` writes, later, the bytes the
call would have written then; anything that cannot be deferred faithfully is written at
once; other threads and other directories are untouched; the patches go away.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

from ckptguard.integrations._capture import DEFER_MIN_BYTES, Snapshots, capture

BIG = DEFER_MIN_BYTES // 4 + 1  # float32 elements: just above the deferral threshold


def _state() -> dict[str, object]:
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(BIG, generator=g)
    return {
        "state": {0: {"exp_avg": weight.clone(), "step": torch.tensor(3.0)}},
        "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99), "params": [0]}],
        "weight": weight,
        "tied": weight,  # the same tensor twice: one copy, shared in the pickle as before
        "param": torch.nn.Parameter(torch.ones(4)),
        "od": OrderedDict(a=torch.zeros(2)),
    }


def test_a_deferred_torch_save_writes_what_the_call_would_have_written_then(
    tmp_path: Path,
) -> None:
    state = _state()
    direct = tmp_path / "direct.pt"
    torch.save(state, direct)  # what the call writes at this moment
    snapshots = Snapshots()
    with capture(tmp_path / "staging", snapshots) as deferred:
        (tmp_path / "staging").mkdir()
        torch.save(state, tmp_path / "staging" / "direct.pt")
    assert not (tmp_path / "staging" / "direct.pt").exists()  # not written yet
    with torch.no_grad():  # the training goes on and changes everything in place
        state["weight"].add_(1.0)  # type: ignore[attr-defined]
        state["state"][0]["exp_avg"].mul_(2.0)  # type: ignore[index]
    state["param_groups"][0]["lr"] = 0.5  # type: ignore[index]
    deferred.run()
    assert (tmp_path / "staging" / "direct.pt").read_bytes() == direct.read_bytes()
    loaded = torch.load(tmp_path / "staging" / "direct.pt", weights_only=True)
    assert loaded["tied"] is loaded["weight"]
    assert isinstance(loaded["param"], torch.nn.Parameter)
    assert isinstance(loaded["od"], OrderedDict)


def test_a_deferred_safetensors_save_writes_the_same_bytes(tmp_path: Path) -> None:
    tensors = {"b": torch.arange(BIG, dtype=torch.float32), "a": torch.ones(3, 5)}
    safetensors.torch.save_file(tensors, tmp_path / "direct.safetensors", metadata={"f": "pt"})
    staging = tmp_path / "staging"
    staging.mkdir()
    with capture(staging, Snapshots()) as deferred:
        safetensors.torch.save_file(tensors, staging / "m.safetensors", metadata={"f": "pt"})
    tensors["b"].zero_()
    assert deferred.paths == [str(staging / "m.safetensors")]
    deferred.run()
    expected = (tmp_path / "direct.safetensors").read_bytes()
    assert (staging / "m.safetensors").read_bytes() == expected


def test_what_cannot_be_deferred_faithfully_is_written_at_once(tmp_path: Path) -> None:
    big = torch.randn(BIG)
    staging = tmp_path / "staging"
    staging.mkdir()
    buffer = io.BytesIO()
    with capture(staging, Snapshots()) as deferred:
        torch.save({"rng": torch.zeros(8)}, staging / "small.pth")  # below the threshold
        torch.save(big, buffer)  # a file object, not a path
        torch.save(big, tmp_path / "elsewhere.pt")  # outside the capture's directory
        torch.save({"s": big.to_sparse()}, staging / "sparse.pt")  # no faithful copy
        with pytest.raises(ValueError, match="non contiguous"):  # raised as it would be
            safetensors.torch.save_file(
                {"t": torch.randn(2 * BIG).view(-1, 2)[:, 0]}, staging / "nc.st"
            )
    assert deferred.writes == []
    assert {p.name for p in staging.iterdir()} == {"small.pth", "sparse.pt"}
    assert (tmp_path / "elsewhere.pt").exists()
    assert buffer.getvalue()
    # recorded: the small, the sparse and the non-contiguous (the others are not ours)
    assert len(deferred.done_at_once) == 3


def test_other_threads_write_at_once_and_the_patches_go_away(tmp_path: Path) -> None:
    original = torch.save
    staging = tmp_path / "staging"
    staging.mkdir()
    big = torch.randn(BIG)
    with capture(staging, Snapshots()) as deferred:
        assert torch.save is not original
        other = threading.Thread(target=torch.save, args=(big, staging / "other.pt"))
        other.start()
        other.join()
        torch.save(big, staging / "mine.pt")
    assert torch.save is original
    assert safetensors.torch.save_file.__module__ == "safetensors.torch"
    assert (staging / "other.pt").exists()  # another thread's write: made at once
    assert deferred.paths == [str(staging / "mine.pt")]


def test_an_error_in_the_block_drops_the_deferred_writes(tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    staging.mkdir()
    with (
        pytest.raises(RuntimeError, match="framework failed"),
        capture(staging, Snapshots()) as deferred,
    ):
        torch.save(torch.randn(BIG), staging / "w.pt")
        raise RuntimeError("framework failed")
    assert deferred.writes == []
    assert torch.save.__module__ == "torch.serialization"


def test_buffers_are_reused_from_one_save_to_the_next(tmp_path: Path) -> None:
    snapshots = Snapshots()
    staging = tmp_path / "staging"
    staging.mkdir()
    state = _state()
    for _ in range(3):
        with capture(staging, snapshots) as deferred:
            torch.save(state, staging / "opt.pt")
        deferred.run()
    assert snapshots.allocations == 5  # exp_avg, step, weight (= tied), param, od.a: once


def test_a_copy_of_a_device_tensor_is_saved_with_its_device(tmp_path: Path) -> None:
    """torch.save records each storage's device; a copy taken from a CUDA tensor is tagged
    with that device (the tagger is what a CUDA machine uses: marked here by hand, as this
    machine has no GPU; benchmarks/device_check.py compares the bytes on a real one)."""
    from ckptguard.integrations import _capture

    copy = torch.arange(6, dtype=torch.float32)
    _capture._register_tagger()
    _capture._DEVICE_OF[copy.untyped_storage().data_ptr()] = "cuda:1"
    try:
        torch.save({"t": copy, "other": torch.ones(2)}, tmp_path / "t.pt")
    finally:
        _capture._forget(copy)
    seen: list[str] = []

    def where(storage: Any, location: str) -> Any:
        seen.append(location)
        return storage

    loaded = torch.load(tmp_path / "t.pt", map_location=where, weights_only=True)
    assert sorted(seen) == ["cpu", "cuda:1"]
    assert torch.equal(loaded["t"], copy)
    torch.save(copy, tmp_path / "u.pt")  # forgotten: a plain CPU storage again
    seen.clear()
    torch.load(tmp_path / "u.pt", map_location=where, weights_only=True)
    assert seen == ["cpu"]
