"""Which checkpoints to keep: a pure function of the committed checkpoints and a policy.

Always kept, whatever the policy says:
- the newest checkpoint that is valid (resume needs it);
- the best valid checkpoint by ``best_metric`` (when a metric is set);
- pinned checkpoints;
- every checkpoint that is not valid (retention never deletes what it cannot judge:
  corrupt and foreign entries are for ``ckptguard clean`` and a human).
Then: the ``keep_last`` newest valid ones, the ``keep_best`` best, and every step that is
a multiple of ``keep_every``. Everything else is deleted, and only after the newest save
has been committed and verified.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["Candidate", "RetentionPolicy", "metric_value", "select_deletions"]


@dataclass(frozen=True)
class RetentionPolicy:
    """What to keep. ``keep_last=None`` keeps every checkpoint."""

    keep_last: int | None = 3
    keep_best: int = 1
    best_metric: str | None = None
    best_mode: Literal["min", "max"] = "min"
    keep_every: int | None = None

    def __post_init__(self) -> None:
        for name in ("keep_last", "keep_best", "keep_every"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"{name} must be an int, got {value!r}")
        if self.keep_last is not None and self.keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 or None, got {self.keep_last}")
        if self.keep_best < 0:
            raise ValueError(f"keep_best must be >= 0, got {self.keep_best}")
        if self.best_mode not in {"min", "max"}:
            raise ValueError(f"best_mode must be 'min' or 'max', got {self.best_mode!r}")
        if self.keep_every is not None and self.keep_every < 1:
            raise ValueError(f"keep_every must be >= 1 or None, got {self.keep_every}")


@dataclass(frozen=True)
class Candidate:
    """A committed checkpoint as retention sees it."""

    name: str
    step: int
    valid: bool
    metric: float | None = None
    pinned: bool = False


def metric_value(value: object) -> float | None:
    """A metric as a float retention can rank, or None (bools, non-numbers, inf, nan)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int beyond float: not a usable metric
        return None
    return number if math.isfinite(number) else None


def _metric(c: Candidate) -> float | None:
    return metric_value(c.metric)


def _standing(valid: Sequence[Candidate], policy: RetentionPolicy) -> set[str]:
    """What the policy keeps in place of what it deletes: the newest and the best."""
    keep: set[str] = {valid[-1].name}  # the newest valid
    keep.update(c.name for c in valid[-(policy.keep_last or 1) :])
    if policy.best_metric is not None:
        scored = [c for c in valid if _metric(c) is not None]
        sign = 1.0 if policy.best_mode == "min" else -1.0
        # Best first; ties go to the newer checkpoint.
        scored.sort(key=lambda c: (sign * (_metric(c) or 0.0), -c.step))
        keep.update(c.name for c in scored[: max(1, policy.keep_best)])
    return keep


def select_deletions(candidates: Sequence[Candidate], policy: RetentionPolicy) -> list[str]:
    """Names to delete, oldest first."""
    valid = sorted((c for c in candidates if c.valid), key=lambda c: (c.step, c.name))
    if policy.keep_last is None or not valid:
        return []
    keep: set[str] = {c.name for c in candidates if not c.valid or c.pinned}
    keep.update(_standing(valid, policy))
    if policy.keep_every:
        keep.update(c.name for c in valid if c.step % policy.keep_every == 0)
    return [c.name for c in valid if c.name not in keep]


def standing_in(candidates: Sequence[Candidate], policy: RetentionPolicy) -> set[str]:
    """The valid checkpoints the policy keeps *instead of* the ones it deletes.

    The newest ``keep_last`` and the ``keep_best`` best: these must really be intact
    before anything is deleted. Checkpoints kept for their own sake (pinned, every
    ``keep_every``-th) stand in for nothing, so retention need not read them back.
    """
    valid = sorted((c for c in candidates if c.valid), key=lambda c: (c.step, c.name))
    return _standing(valid, policy) if valid else set()
