"""The gauntlet's sample (``make chaos`` runs the full sweep): every row must hold.

Each scenario lives in ``tests/gauntlet/<name>.py``; a control row must fail, which shows
that its check can fail. See tests/gauntlet/__init__.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from gauntlet import SCENARIOS, run_scenario

if TYPE_CHECKING:
    from pathlib import Path


@pytest.mark.parametrize("name", SCENARIOS)
def test_gauntlet_sample(name: str, tmp_path: Path) -> None:
    rows = run_scenario(name, full=False, work=tmp_path)
    assert rows, f"scenario {name} reported no rows"
    bad = [row.describe() for row in rows if not row.ok]
    assert not bad, "\n".join(bad)
