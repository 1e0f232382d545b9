"""The restore paths: into a target without a second copy of the state, and without one.

Into a target, each file is first streamed through its checksum, then every tensor is
read straight into the target's own memory (``_Lazy.fill``); a copy of a tensor
(``_Lazy.materialize``) is made only where the target has no memory of its own to take it
(an optimizer's state, a module whose loading is customised, keys the target lacks).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import ckptguard
from ckptguard._state import serialization


def _model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.BatchNorm1d(32), torch.nn.Linear(32, 4)
    )


@pytest.fixture
def no_copies(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every tensor a restore copies instead of reading into the target."""
    made: list[str] = []
    original = serialization._Lazy.materialize

    def spy(self: serialization._Lazy) -> Any:
        made.append(self.info.name)
        return original(self)

    monkeypatch.setattr(serialization._Lazy, "materialize", spy)
    return made


def test_a_module_is_filled_in_place_without_copies(tmp_path: Path, no_copies: list[str]) -> None:
    saved = _model()
    with torch.no_grad():
        for p in saved.parameters():
            p.mul_(3.0)
    saved.train()(torch.randn(8, 16))  # BatchNorm running stats and num_batches_tracked
    mgr = ckptguard.CheckpointManager(tmp_path / "run")
    mgr.save(1, {"model": saved, "arr": np.arange(6.0).reshape(2, 3)})

    target = _model()
    pointers = {k: v.data_ptr() for k, v in target.state_dict().items()}
    arr = np.zeros((2, 3))
    out = mgr.restore(target={"model": target, "arr": arr})
    assert no_copies == []  # every tensor went straight into the target's memory
    assert {k: v.data_ptr() for k, v in target.state_dict().items()} == pointers
    for key, value in saved.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    assert out["arr"] is arr
    assert np.array_equal(arr, np.arange(6.0).reshape(2, 3))


def test_control_a_module_with_a_load_hook_goes_through_load_state_dict(
    tmp_path: Path, no_copies: list[str]
) -> None:
    """A module whose loading is customised is loaded by its own load_state_dict."""
    mgr = ckptguard.CheckpointManager(tmp_path / "run")
    saved = _model()
    mgr.save(1, {"model": saved})
    target = _model()
    seen: list[str] = []

    def hook(module: Any, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        del module, args
        seen.extend(k for k in state_dict if k.startswith(prefix))

    first, original = target[0], saved[0]
    assert isinstance(first, torch.nn.Linear)
    assert isinstance(original, torch.nn.Linear)
    hooks: Any = first  # register_load_state_dict_pre_hook is untyped in torch's stubs
    hooks.register_load_state_dict_pre_hook(hook)
    with torch.no_grad():
        first.weight.zero_()
    mgr.restore(target={"model": target})
    assert seen  # its hook ran: load_state_dict was used
    assert no_copies  # which needs tensors of their own
    assert torch.equal(first.weight, original.weight)


def test_optimizer_state_and_extra_keys_are_materialised(
    tmp_path: Path, no_copies: list[str]
) -> None:
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(8, 16)).sum().backward()
    opt.step()
    mgr = ckptguard.CheckpointManager(tmp_path / "run")
    mgr.save(1, {"model": model, "optimizer": opt, "extra": torch.arange(5)})

    model2 = _model()
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.1)
    out = mgr.restore(target={"model": model2, "optimizer": opt2})
    assert torch.equal(out["extra"], torch.arange(5))  # not in the target: a new tensor
    assert no_copies  # the optimizer's state and "extra"
    state = opt2.state_dict()["state"]
    expected = opt.state_dict()["state"]
    assert state.keys() == expected.keys()
    for k in state:
        assert torch.equal(state[k]["exp_avg"], expected[k]["exp_avg"])


def test_non_contiguous_targets(tmp_path: Path) -> None:
    mgr = ckptguard.CheckpointManager(tmp_path / "run")
    t = torch.arange(12.0).reshape(3, 4)
    a = np.arange(12, dtype=np.int32).reshape(3, 4)
    mgr.save(1, {"t": t.t().contiguous(), "a": np.ascontiguousarray(a.T)})
    target_t = torch.zeros(4, 3, dtype=torch.float32)
    target_t_view = torch.zeros(3, 4).t()  # a transposed view: not contiguous
    target_a = np.zeros((3, 4), dtype=np.int32).T
    mgr.restore(target={"t": target_t_view, "a": target_a})
    assert torch.equal(target_t_view, t.t())
    assert np.array_equal(target_a, a.T)
    mgr.restore(target={"t": target_t, "a": np.zeros((4, 3), dtype=np.int32)})
    assert torch.equal(target_t, t.t())


def test_a_corrupt_file_leaves_the_target_untouched(tmp_path: Path) -> None:
    mgr = ckptguard.CheckpointManager(tmp_path / "run")
    saved = _model()
    mgr.save(1, {"model": saved})
    victim = tmp_path / "run" / "checkpoint-1" / "model.safetensors"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    target = _model()
    with torch.no_grad():
        for p in target.parameters():
            p.fill_(7.0)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ckptguard.CorruptCheckpoint, match="checksum mismatch"):
        mgr.restore(1, target={"model": target})
    for key, value in target.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_without_a_target_each_file_is_read_once_and_checked(tmp_path: Path) -> None:
    mgr = ckptguard.CheckpointManager(tmp_path / "run")
    mgr.save(1, {"model": _model(), "n": np.arange(3)})
    state = mgr.restore()
    assert isinstance(state["model"]["0.weight"], torch.Tensor)
    state["model"]["0.weight"].add_(1.0)  # a private, writable copy
    victim = tmp_path / "run" / "checkpoint-1" / "model.safetensors"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0x80
    victim.write_bytes(bytes(data))
    with pytest.raises(ckptguard.CorruptCheckpoint, match="checksum mismatch"):
        mgr.restore(1)


def test_modules_whose_saving_or_loading_is_customised_go_through_their_own_methods(
    tmp_path: Path, no_copies: list[str]
) -> None:
    """A submodule's state-dict hook (values saved as copies) and a norm layer that
    transforms what it loads: load_state_dict's result, not a raw copy into the tensors."""

    class Doubling(torch.nn.BatchNorm1d):
        def _load_from_state_dict(
            self, state_dict: dict[str, Any], prefix: str, *args: Any
        ) -> None:
            state_dict[prefix + "weight"] = state_dict[prefix + "weight"] * 2
            super()._load_from_state_dict(state_dict, prefix, *args)

    def as_copies(module: Any, state: dict[str, Any], prefix: str, local: Any) -> None:
        del module, local
        for key in list(state):
            if key.startswith(prefix):
                state[key] = state[key].detach().clone()

    mgr = ckptguard.CheckpointManager(tmp_path / "run")
    linear, norm = torch.nn.Linear(4, 4), Doubling(4)
    saved = torch.nn.Sequential(linear, norm)
    with torch.no_grad():
        norm.weight.fill_(1.0)
    mgr.save(1, {"model": saved})

    hooked = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    hooks: Any = hooked[0]
    hooks._register_state_dict_hook(as_copies)
    mgr.restore(target={"model": hooked})
    first = hooked[0]
    assert isinstance(first, torch.nn.Linear)
    assert torch.equal(first.weight, linear.weight)  # restored, not copied into copies

    doubling = torch.nn.Sequential(torch.nn.Linear(4, 4), Doubling(4))
    mgr.restore(target={"model": doubling})
    second = doubling[1]
    assert isinstance(second, Doubling)
    assert torch.equal(second.weight, torch.full((4,), 2.0))  # its own loading ran
    assert no_copies  # both went through load_state_dict
