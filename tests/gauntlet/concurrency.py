"""K independent processes commit the same checkpoint name at the same moment, round after round.

No process group: the processes share a root and coordinate only through ckptguard's
file lock. In every round each of K spawned processes saves ``checkpoint-<round>`` with its
own identifiable content; a fault hook at ``seal.done`` waits on a Barrier, so every save
is sealed and all K commit at once. Rows:

- per K (2, 4, 8): with ``atomic_checkpoint`` (``if_exists="keep"``, its default) and
  with ``CheckpointManager.save`` under ``if_exists="keep"`` (the exactly-once policy for
  independent savers): 0 errors in every process, exactly one commit per round (the one
  process whose rename made the name visible; the others get ``kept_existing``), one
  directory whose files are entirely that writer's (its manifest names its pid), every
  process's result naming the same save, and nothing left in staging/trash/quarantine;
- ``CheckpointManager.save`` with its default ``if_exists="replace"`` (all K): 0 errors
  and one complete copy, entirely one writer's, nothing left behind. Not exactly-once by
  design: a later-sealed save replaces an earlier one, so a round may have several commits
  and the processes' results may name different saves (figures count both);
- control: the naive protocol of the incident (own temp dir, then ``os.rename``;
  ``test_race._naive_worker``) must fail the same check, which shows that the processes
  really race;
- an evaluator restoring in a loop beside a ``keep_last=1`` saver in another process:
  every ``restore()`` returns a valid state and nothing outside the CheckpointError tree
  escapes (issue 15: retention removing a checkpoint under a reader).
"""

from __future__ import annotations

import collections
import json
import logging
import multiprocessing
import os
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import ckptguard
from ckptguard import Outcome
from ckptguard._format.layout import MANIFEST_NAME, META_DIR, RootLayout
from ckptguard._protocol.strategy import IfExists
from ckptguard._storage.faults import set_fault_hook
from gauntlet import Row, same
from test_race import USER_FILES, _error_record, _naive_worker, _payload, _write_files

if TYPE_CHECKING:
    from collections.abc import Callable
    from multiprocessing.synchronize import Barrier

SCENARIO = "concurrency"
KS = (2, 4, 8)
CONTROL_K = 4
BARRIER_TIMEOUT = 120.0  # only a dead or hung peer makes a wait this long
JOIN_TIMEOUT = 540.0
# The savers, each on its own root: (name, CheckpointManager's if_exists or None).
SAVERS: tuple[tuple[str, IfExists | None], ...] = (
    ("atomic_checkpoint", None),
    ("manager-keep", "keep"),
    ("manager-replace", "replace"),
)


def _state(wid: int, rnd: int) -> dict[str, Any]:
    return {"w": np.full(2048, 1000 * rnd + wid, dtype=np.int64), "wid": wid, "round": rnd}


# -- the worker (a spawned process) --------------------------------------------------------
def _worker(wid: int, roots: dict[str, str], rounds: int, barrier: Barrier, out: str) -> None:
    """Every round: each saver saves ``checkpoint-<round>`` once, in step with the peers."""
    logging.getLogger("ckptguard").setLevel(logging.ERROR)  # "kept the newer one" is expected
    seen: set[str] = set()

    def hook(point: str) -> None:
        seen.add(point)
        if point == "seal.done":
            barrier.wait()  # every peer has sealed: all commit at once

    records: list[dict[str, Any]] = []
    fatal = None
    try:
        managers = {
            name: ckptguard.CheckpointManager(
                roots[name], keep_last=None, if_exists=policy, check_environment=False
            )
            for name, policy in SAVERS
            if policy is not None
        }
        set_fault_hook(hook)
        for rnd in range(rounds):
            for name, _ in SAVERS:
                seen.clear()
                record: dict[str, Any] = {"round": rnd, "saver": name, "error": None}
                try:
                    if name in managers:
                        info = managers[name].save(rnd, _state(wid, rnd), blocking=True)
                        record |= {"save_id": info.save_id, "valid": info.valid}
                    else:
                        tx = ckptguard.atomic_checkpoint(Path(roots[name]) / f"checkpoint-{rnd}")
                        with tx as staging:
                            _write_files(staging, wid, rnd)
                        assert tx.result is not None
                        record |= {"save_id": tx.result.manifest.save_id, "valid": True}
                        record["outcome"] = tx.result.outcome.value
                except Exception as exc:
                    if "seal.done" not in seen:
                        barrier.wait()  # keep the peers in step; the error is reported
                    record["error"] = _error_record(exc)
                record["renamed"] = "commit.renamed" in seen  # this process's commit
                records.append(record)
    except BaseException as exc:
        fatal = "".join(traceback.format_exception(exc))
        raise
    finally:
        Path(out).write_text(json.dumps({"pid": os.getpid(), "records": records, "fatal": fatal}))


def _run(
    target: Callable[[int, Any, int, Barrier, str], None], k: int, arg: Any, rounds: int, out: Path
) -> tuple[list[dict[str, Any]], str | None]:
    """K spawned processes running ``target``; their reports, and what went wrong if any."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(k, timeout=BARRIER_TIMEOUT)
    out.mkdir(parents=True)
    paths = [out / f"writer-{wid}.json" for wid in range(k)]
    procs = [
        ctx.Process(target=target, args=(wid, arg, rounds, barrier, str(paths[wid])))
        for wid in range(k)
    ]
    started = 0
    try:
        for proc in procs:
            proc.start()
            started += 1
        deadline = time.monotonic() + JOIN_TIMEOUT
        for proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
    finally:  # never leave a writer running, whatever happened
        hung = [proc.pid for proc in procs[:started] if proc.is_alive()]
        for proc in procs[:started]:
            if proc.is_alive():
                proc.kill()
            proc.join()
        codes = [proc.exitcode for proc in procs]
        for proc in procs[:started]:
            proc.close()
    if hung:
        return [], f"K={k}: writers still running after {JOIN_TIMEOUT:.0f}s: pids {hung}"
    reports = []
    for wid, path in enumerate(paths):
        if not path.exists():
            return [], f"K={k}: writer {wid} died without a report (exit code {codes[wid]})"
        report = json.loads(path.read_text())
        if report["fatal"] is not None or codes[wid] != 0:
            return [], f"K={k}: writer {wid} failed (exit {codes[wid]}): {report['fatal']}"
        reports.append(report)
    return reports, None


# -- the checks (in this process) ----------------------------------------------------------
def _round_problem(
    where: str, reader: ckptguard.CheckpointManager, rnd: int, recs: list[Any], pids: list[int]
) -> str | None:
    """What went wrong in one round of one saver (``recs``: one record per writer)."""
    saver, k, root = recs[0]["saver"], len(recs), Path(reader.root)
    errors = [(wid, r["error"]) for wid, r in enumerate(recs) if r["error"] is not None]
    if errors:
        wid, err = errors[0]
        last = err["text"].strip().splitlines()[-1]
        return f"{where}: {len(errors)} writer(s) raised; writer {wid}: {last}"
    renamed = [wid for wid, r in enumerate(recs) if r["renamed"]]
    save_ids = {r["save_id"] for r in recs}
    final = root / f"checkpoint-{rnd}"
    report = ckptguard.verify(final)
    if not report.ok or report.manifest is None:
        return f"{where}: {final} does not verify: {report.problems}"
    winner = pids.index(report.manifest.writer.pid) if report.manifest.writer.pid in pids else -1
    if saver == "atomic_checkpoint":
        outcomes = [r["outcome"] for r in recs]
        if outcomes.count(Outcome.COMMITTED) != 1 or outcomes.count(Outcome.KEPT_EXISTING) != k - 1:
            return f"{where}: outcomes {outcomes}, expected 1 committed and {k - 1} kept_existing"
        if set(os.listdir(final)) != USER_FILES | {MANIFEST_NAME}:
            return f"{where}: {final} holds {sorted(os.listdir(final))}"
        content = json.loads((final / "writer.json").read_text())
        if content != {"writer": winner, "round": rnd} or (
            (final / "model.bin").read_bytes() != _payload(winner, rnd)
        ):
            return f"{where}: {final} is not entirely writer {winner}'s (writer.json: {content})"
    else:
        state = reader.restore(step=rnd)
        if not same(state, _state(winner, rnd)):
            return f"{where}: {final} is not entirely writer {winner}'s: wid {state.get('wid')}"
    if saver != "manager-replace":
        if renamed != [winner]:
            return f"{where}: renamed by writers {renamed}, the manifest names writer {winner}"
        if save_ids != {report.manifest.save_id}:
            return f"{where}: the results name saves {sorted(save_ids)}, the checkpoint holds one"
    elif winner not in renamed or not all(r["valid"] for r in recs):
        return f"{where}: writer {winner} holds the name but renamed were {renamed}"
    return None


def _leftover_problem(where: str, root: str, rounds: int) -> str | None:
    """After all rounds: one entry per round, nothing in staging, trash or quarantine."""
    layout = RootLayout(root)
    names = {f"checkpoint-{rnd}" for rnd in range(rounds)} | {META_DIR}
    if set(os.listdir(root)) != names:
        return f"{where}: {root} holds {sorted(os.listdir(root))}, expected {sorted(names)}"
    for d in (layout.staging, layout.trash, layout.quarantine):
        if os.listdir(d):
            return f"{where}: left behind in {d}: {os.listdir(d)}"
    return None


def _committers_rows(full: bool, work: Path) -> list[Row]:
    rounds = 100 if full else 3
    rows: list[Row] = []
    replace = Row(
        SCENARIO,
        f"K = {', '.join(map(str, KS))} concurrent CheckpointManager.save of one step with the "
        "default if_exists='replace': 0 errors; one complete copy, entirely the state of a "
        "writer whose save committed; nothing left behind (not exactly-once: newer replace older)",
    )
    replace_commits = disagreeing = 0
    for k in KS:
        row = Row(
            SCENARIO,
            f"K={k} concurrent committers x rounds, one checkpoint name per round "
            "(atomic_checkpoint; CheckpointManager.save with if_exists='keep'): 0 errors, "
            "exactly one commit and one copy, entirely one writer's; all results agree",
        )
        roots = {name: str(work / f"k{k}" / name) for name, _ in SAVERS}
        start = time.monotonic()
        reports, fatal = _run(_worker, k, roots, rounds, work / f"k{k}" / "reports")
        seconds = time.monotonic() - start
        if fatal is not None:
            row.trial(fatal)
            replace.trial(fatal)
            rows.append(row)
            continue
        pids = [r["pid"] for r in reports]
        commits = 0
        for i, (saver, _) in enumerate(SAVERS):
            reader = ckptguard.CheckpointManager(
                roots[saver], keep_last=None, check_environment=False
            )
            for rnd in range(rounds):
                recs = [r["records"][rnd * len(SAVERS) + i] for r in reports]
                problem = _round_problem(f"K={k} {saver} round {rnd}", reader, rnd, recs, pids)
                renamed = sum(bool(r["renamed"]) for r in recs)
                if saver == "manager-replace":
                    replace.trial(problem)
                    replace_commits += renamed
                    disagreeing += len({r.get("save_id") for r in recs}) > 1
                else:
                    row.trial(problem)
                    commits += renamed
            left = _leftover_problem(f"K={k} {saver}", roots[saver], rounds)
            (replace if saver == "manager-replace" else row).trial(left)
        row.figures = {"K": k, "rounds": rounds, "savers": 2, "commits": commits}
        row.figures["seconds"] = round(seconds, 1)
        rows.append(row)
    replace.figures = {
        "K": "/".join(map(str, KS)),
        "rounds": rounds,
        "commits": replace_commits,
        "rounds_results_differ": disagreeing,
    }
    return [*rows, replace]


def _control_row(full: bool, work: Path) -> Row:
    rounds = 10 if full else 3
    row = Row(
        SCENARIO,
        f"CONTROL: K={CONTROL_K} processes commit by the naive protocol (own temp dir, then "
        "os.rename onto the name): the same check (0 errors) must fail",
        control=True,
    )
    root = work / "naive"
    root.mkdir()
    reports, fatal = _run(_naive_worker, CONTROL_K, str(root), rounds, work / "naive-reports")
    if fatal is not None:  # a broken harness is not the failure this control must show
        raise RuntimeError(f"the control's processes failed: {fatal}")
    errors: collections.Counter[str] = collections.Counter()
    for rnd in range(rounds):
        failed = [r["records"][rnd]["error"] for r in reports if r["records"][rnd]["error"]]
        errors.update(f"{e['type']}(errno {e['errno']})" for e in failed)
        names = sorted({f"{e['type']}(errno {e['errno']})" for e in failed})
        row.trial(
            f"round {rnd}: {len(failed)} of {CONTROL_K} writers failed: {names}" if failed else None
        )
    row.figures = {"K": CONTROL_K, "rounds": rounds, "errors": dict(errors)}
    return row


_EVALUATED_SAVER = """
import sys, numpy as np, ckptguard
root, last = sys.argv[1], int(sys.argv[2])
mgr = ckptguard.CheckpointManager(root, keep_last=1, check_environment=False)
for step in range(1, last + 1):
    mgr.save(step, {"w": np.full(4096, step, dtype=np.int64), "step": step})
"""


def _evaluator_row(full: bool, work: Path) -> Row:
    """An evaluator restoring in a loop beside a keep_last=1 saver (another process).

    Every restore() must return a valid state (a newer valid checkpoint always exists);
    latest() then restore(step) may find the step retired: CheckpointNotFound, counted.
    Nothing outside the CheckpointError tree may escape (issue 15).
    """
    import subprocess
    import sys

    root = work / "evaluator"
    first = ckptguard.CheckpointManager(root, keep_last=1, check_environment=False)
    first.save(0, {"w": np.zeros(4096, dtype=np.int64), "step": 0})
    saves = 3000 if full else 300
    saver = subprocess.Popen(
        [sys.executable, "-c", _EVALUATED_SAVER, str(root), str(saves)],
        env={**os.environ, "OMP_NUM_THREADS": "1", "CKPTGUARD_DOCTOR": "0"},
    )
    row = Row(
        SCENARIO,
        "evaluator restoring in a loop beside a keep_last=1 saver: every restore() returns "
        "a valid state; no builtin error escapes",
    )
    reader = ckptguard.CheckpointManager(root, keep_last=None, check_environment=False)
    gone = explicit = 0
    steps: set[int] = set()
    try:
        while saver.poll() is None:
            try:
                state = reader.restore()
                ok = bool((state["w"] == state["step"]).all())
                steps.add(int(state["step"]))
                row.trial(None if ok else f"restore() gave an inconsistent state {state['step']}")
            except Exception as exc:
                row.trial(f"restore(): {type(exc).__name__}: {exc}")
            try:
                info = reader.latest()
                if info is not None:
                    reader.restore(info.step)
                    explicit += 1
            except ckptguard.CheckpointNotFound:
                gone += 1
            except Exception as exc:
                row.trial(f"latest()+restore(step): {type(exc).__name__}: {exc}")
    finally:
        saver.wait(600)
    if saver.returncode != 0:
        row.trial(f"the saver failed ({saver.returncode})")
    row.figures = {
        "saves": saves,
        "restores": row.trials,
        "distinct_steps_read": len(steps),
        "explicit_restores": explicit,
        "explicit_retired_meanwhile": gone,
    }
    return row


def run(full: bool, work: Path) -> list[Row]:
    """Every row (see the module docstring)."""
    return [*_committers_rows(full, work), _control_row(full, work), _evaluator_row(full, work)]
