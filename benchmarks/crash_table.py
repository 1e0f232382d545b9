"""The before/after crash table of the README: ckpt-chaos's own Trainer bench, twice.

    python benchmarks/crash_table.py [--ranks 1] [--jobs 2]

``ckpt-chaos bench hf_trainer`` kills a Trainer at every file event of the save of
checkpoint-10 (before the event, and after a torn half-write) and resumes it with
``resume_from_checkpoint=True``. It runs once as shipped, once with ckptguard's
``install()`` added through ``benchmarks/chaos_protect/sitecustomize.py``; the verdict
counts of both go to stdout as a Markdown table row each.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHAOS = Path(sys.executable).with_name("ckpt-chaos")
VERDICT = re.compile(r"^(?:.*\s)?(PASS|HARD_FAIL|SILENT_DIVERGENCE|LOST_WORK|CONTROL_FAIL)\s*$")


def _bench(ranks: int, jobs: int, *, protected: bool) -> tuple[Counter[str], str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if protected:
        env["CKPT_CHAOS_PREPEND_PYTHONPATH"] = str(HERE / "chaos_protect")
    with tempfile.TemporaryDirectory() as work:
        proc = subprocess.run(  # noqa: S603 - our own command line
            [str(CHAOS), "bench", "hf_trainer", "--ranks", str(ranks), "--jobs", str(jobs),
             "--work", os.path.join(work, "w")],
            capture_output=True, text=True, env=env, check=False, timeout=3600,
        )  # fmt: skip
    counts: Counter[str] = Counter()
    for line in proc.stdout.splitlines():
        match = VERDICT.match(line)
        if match:
            counts[match.group(1)] += 1
    return counts, proc.stdout


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, default=1)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--verbose", action="store_true")
    opts = ap.parse_args()
    print("| Trainer | ranks | runs | PASS | HARD_FAIL | SILENT_DIVERGENCE | LOST_WORK |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for protected in (False, True):
        counts, out = _bench(opts.ranks, opts.jobs, protected=protected)
        if opts.verbose:
            print(out)
        name = "with ckptguard `install()`" if protected else "transformers as shipped"
        cells = [str(counts[v]) for v in ("PASS", "HARD_FAIL", "SILENT_DIVERGENCE", "LOST_WORK")]
        print(f"| {name} | {opts.ranks} | {sum(counts.values())} | {' | '.join(cells)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
