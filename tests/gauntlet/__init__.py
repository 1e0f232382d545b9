"""The reliability and security gauntlet: scenarios that each report rows of figures.

Each scenario module defines ``run(full: bool, work: Path) -> list[Row]``. ``full=False``
is the sample that ``make test`` runs (tests/test_gauntlet.py, seconds); ``full=True`` is
the sweep of ``make chaos`` (tests/run_gauntlet.py prints the table). A row counts trials
and failures of one claim; a *control* row runs the same check with a protection turned
off and must fail, which shows that the check can fail.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Scenarios reuse helpers of the layer tests they extend (test_crash, test_race in
# tests/protocol, test_manifest in tests/format): importable wherever the gauntlet runs.
_TESTS = Path(__file__).resolve().parents[1]
for _layer in ("protocol", "format"):
    if str(_TESTS / _layer) not in sys.path:
        sys.path.append(str(_TESTS / _layer))

__all__ = ["SCENARIOS", "Row", "run_scenario", "same"]

# Module names under tests/gauntlet, in the order of the table.
SCENARIOS: tuple[str, ...] = (
    "kills",
    "power",
    "concurrency",
    "transient",
    "enospc",
    "corruption",
    "malicious",
    "permissions",
    "objectstore",
    "incremental",
)

MAX_EXAMPLES = 5


@dataclass
class Row:
    """One claim, and how often it held.

    ``failures`` counts trials where the claim did not hold; ``examples`` describes up to
    five of them. A control row (``control=True``) must have failures.
    """

    scenario: str
    claim: str
    trials: int = 0
    failures: int = 0
    control: bool = False
    figures: dict[str, Any] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    def fail(self, why: str) -> None:
        """Count one failed trial (the trial itself is counted with :meth:`trial`)."""
        self.failures += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(why)

    def trial(self, problem: str | None) -> None:
        """Count one trial; ``problem`` (None when the claim held) counts a failure."""
        self.trials += 1
        if problem is not None:
            self.fail(problem)

    @property
    def ok(self) -> bool:
        """A row passes with at least one trial, and 0 failures (a control: > 0)."""
        if self.trials == 0:
            return False
        return self.failures > 0 if self.control else self.failures == 0

    def describe(self) -> str:
        """A line for an assertion message: the claim, the counts and the examples."""
        kind = "control (must fail)" if self.control else "claim"
        lines = [f"{self.scenario}: {kind}: {self.claim}: {self.failures}/{self.trials} failed"]
        lines += [f"  - {e}" for e in self.examples]
        return "\n".join(lines)


def same(a: Any, b: Any) -> bool:
    """Exact equality of two state trees: key order, types, dtypes, shapes and bytes."""
    import numpy as np

    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (
            isinstance(a, np.ndarray)
            and isinstance(b, np.ndarray)
            and (a.dtype, a.shape) == (b.dtype, b.shape)
            and a.tobytes() == b.tobytes()
        )
    return type(a) is type(b) and bool(a == b)


def run_scenario(name: str, *, full: bool, work: Path) -> list[Row]:
    """Import ``gauntlet.<name>`` and run it in ``work`` (an empty directory)."""
    if name not in SCENARIOS:
        raise ValueError(f"unknown scenario {name!r}; choose from {', '.join(SCENARIOS)}")
    module = importlib.import_module(f"gauntlet.{name}")
    rows: list[Row] = module.run(full, work)
    return rows
