"""Random number generator states: capture all of them, restore all of them.

A resumed run is bit-identical to an uninterrupted one only if every generator it draws
from continues where it stopped: Python's ``random``, numpy's global generator, torch's
CPU generator and each CUDA device's. The captured state is plain data (tuples, ints,
uint8 tensors, numpy arrays) that ckptguard stores without pickle.
"""

from __future__ import annotations

import random
import sys
from typing import Any

__all__ = ["capture_rng_state", "restore_rng_state"]


def capture_rng_state() -> dict[str, Any]:
    """The state of every generator that is in use in this process."""
    state: dict[str, Any] = {"python": random.getstate()}
    np = sys.modules.get("numpy")
    if np is not None:
        state["numpy"] = np.random.get_state()
    torch = sys.modules.get("torch")
    if torch is not None:
        state["torch"] = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put every generator back where :func:`capture_rng_state` found it."""
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        import numpy as np  # noqa: PLC0415 - only when the state holds numpy's generator

        np.random.set_state(tuple(state["numpy"]))
    if "torch" in state or "cuda" in state:
        import torch  # noqa: PLC0415 - only when the state holds torch's generators

        if "torch" in state:
            torch.set_rng_state(state["torch"].clone())
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.clone() for s in state["cuda"]])
