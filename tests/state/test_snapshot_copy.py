"""The async snapshot's memcpy path (issue 18): plain CPU tensors are copied by numpy.

``StagingBuffers.snapshot`` copies a contiguous CPU tensor's bytes with one memcpy and
leaves every other tensor to torch (``tests/manager/test_async.py`` covers the dtypes and
layouts). These are the cases where the memcpy path could go wrong: a tensor that needs
grad, a contiguous slice that starts inside its storage, a negative view, and a tensor
changed right after the snapshot.
"""

from __future__ import annotations

import torch

from ckptguard._state.serialization import StagingBuffers, encode_state


def _sources(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    snap = StagingBuffers().snapshot(encode_state({"s": state}))
    return {p.name: p.source for g in snap.groups for p in g.tensors}


def test_memcpy_cases_copy_exactly_what_the_tensor_holds() -> None:
    base = torch.arange(40, dtype=torch.float32)
    param = torch.nn.Parameter(torch.randn(6, 5))
    state = {
        "param": param,  # requires grad
        "slice": base[7:19],  # contiguous, storage offset 7
        "rows": base.reshape(8, 5)[2:4],  # contiguous rows, offset 10
        "neg": torch._neg_view(torch.randn(4)),  # a view with the neg bit set
    }
    got = _sources(state)
    for key, value in state.items():
        expected = value.detach().resolve_neg().contiguous()
        assert got[key].dtype == expected.dtype, key
        assert got[key].shape == expected.shape, key
        assert torch.equal(got[key], expected), key
        assert got[key].untyped_storage().data_ptr() != value.untyped_storage().data_ptr()


def test_snapshot_is_isolated_from_later_changes() -> None:
    weights = torch.randn(1024, 64)
    before = weights.clone()
    got = _sources({"w": weights})
    weights.add_(1.0)  # the training step right after save() returned
    assert torch.equal(got["w"], before)
