"""Legacy pickle files are read only on request, and only with weights_only=True."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

import ckptguard


class _Payload:
    """Unpickling this creates a marker file: proof that code from a file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))  # unpickling calls open(marker, "w")


def test_plain_tensors_load(tmp_path: Path) -> None:
    state = {"w": torch.arange(6.0).reshape(2, 3), "step": 7}
    torch.save(state, tmp_path / "model.pt")
    loaded = ckptguard.load_legacy_pt(tmp_path / "model.pt")
    assert torch.equal(loaded["w"], torch.arange(6.0).reshape(2, 3))
    assert loaded["step"] == 7


def test_pickle_payload_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    with (tmp_path / "evil.pt").open("wb") as f:
        pickle.dump({"w": _Payload(marker)}, f)
    with pytest.raises(ckptguard.CorruptCheckpoint, match="weights_only"):
        ckptguard.load_legacy_pt(tmp_path / "evil.pt")
    assert not marker.exists()
    # The control: an unrestricted load really would have run it.
    with (tmp_path / "evil.pt").open("rb") as f:
        live = pickle.load(f)  # noqa: S301 - deliberately, to prove the payload is live
    live["w"].close()
    assert marker.exists()
