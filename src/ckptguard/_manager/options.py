"""What a manager stores besides the user's state: its flags in the manifest, clean metrics."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Mapping

    from ckptguard._format.manifest import Manifest

__all__ = ["PINS_DIR", "RESERVED_METADATA", "clean_metrics", "flagged", "kind_of", "pinned_in"]

_log = logging.getLogger("ckptguard.manager")
PINS_DIR = "pins"  # ROOT/.ckptguard/pins/<name>: pinned after the save (see layout.py)
RESERVED_METADATA = "ckptguard"


def flagged(metadata: Mapping[str, Any] | None, *, kind: str, pin: bool) -> dict[str, Any]:
    """The user's metadata plus ckptguard's own flags (how to restore it, whether pinned)."""
    out = dict(metadata or {})
    if RESERVED_METADATA in out:
        raise ValueError(f"metadata key {RESERVED_METADATA!r} is reserved")
    out[RESERVED_METADATA] = {"kind": kind, "pinned": pin}
    return out


def _flags(manifest: Manifest | None) -> dict[str, Any]:
    flags = manifest.metadata.get(RESERVED_METADATA, {}) if manifest else {}
    return flags if isinstance(flags, dict) else {}


def kind_of(manifest: Manifest | None) -> str | None:
    """What wrote the checkpoint: "state", "files" or "dcp" (None: not a manager's)."""
    kind = _flags(manifest).get("kind")
    return kind if isinstance(kind, str) else None


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
