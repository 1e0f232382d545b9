"""Run the gauntlet and print its table of figures (``make chaos``).

    python tests/run_gauntlet.py [--full] [--only NAME ...] [--json FILE]

Exit status 1 if any row fails (a claim with failures, or a control without any).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

from gauntlet import SCENARIOS, Row, run_scenario


def _table(rows: list[tuple[Row, float]]) -> Table:
    table = Table(title="ckptguard gauntlet")
    for column in ("scenario", "claim", "trials", "failures", "result", "seconds", "figures"):
        table.add_column(column, overflow="fold")
    for row, seconds in rows:
        figures = ", ".join(f"{k}={v}" for k, v in row.figures.items())
        result = "ok" if row.ok else "FAIL"
        if row.control:
            result += " (control: must fail)"
        table.add_row(
            row.scenario,
            row.claim,
            str(row.trials),
            str(row.failures),
            result,
            f"{seconds:.1f}",
            figures,
        )
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the full sweep (default: sample)")
    parser.add_argument("--only", nargs="*", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()
    console = Console(width=200)
    results: list[tuple[Row, float]] = []
    for name in args.only:
        with tempfile.TemporaryDirectory(prefix=f"gauntlet-{name}-") as work:
            start = time.monotonic()
            console.print(f"[bold]{name}[/bold] ...")
            rows = run_scenario(name, full=args.full, work=Path(work))
            seconds = time.monotonic() - start
        for row in rows:
            results.append((row, seconds / len(rows)))
            if not row.ok:
                console.print(row.describe(), markup=False)
    console.print(_table(results))
    if args.json:
        doc = [{**asdict(row), "ok": row.ok, "seconds": round(s, 2)} for row, s in results]
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    failed = [row for row, _ in results if not row.ok]
    console.print(f"{len(results) - len(failed)} of {len(results)} rows ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
