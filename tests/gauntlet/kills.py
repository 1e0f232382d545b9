"""SIGKILL: at every named step of the commit protocol, and at random moments of a save loop.

Rows:
- every point of ``FAULT_POINTS`` (a new name, a replace of an existing name, a foreign
  folder in the way; the cases of ``test_crash.CASES``): a child saves, with
  ``atomic_checkpoint`` (``crash_child.py``) or ``CheckpointManager.save``, and SIGKILLs
  itself at that point. Then: no visible checkpoint is corrupt, every checkpoint committed
  before is there and verifies with checksums, resume (``CheckpointManager.latest``) takes
  the new save if the kill came after the final rename and the previous one otherwise, and
  the next save works and leaves no staging or trash behind;
- a random-kill loop: a child resumes from ``latest()`` and saves step after step (keep 3),
  printing ``committed N`` after each save returns; the parent SIGKILLs it after a seeded
  random delay (interpreter start, startup recovery, or any moment of a save), then checks
  that every reported step that retention keeps restores exactly, that ``latest()`` is the
  newest checkpoint, at least the last reported step, and restores exactly, and that the
  next child resumes from it. Two roots run side by side. A kill between a staging dir's
  mkdir and its owner file leaves a dir that recovery keeps until it is 10 s old (then the
  dead pid in its save id decides; ``_leftovers``): such young dirs are counted apart
  (figure ``ownerless_staging_kept``), anything else left fails.

- the same loop with async saves (``async_save=True``), ended by SIGKILL or SIGTERM at
  random: after a SIGTERM the process must end by SIGTERM within its exit_timeout (the
  handler once deadlocked inside a wait on the save, issue 15), having finished the save in
  flight; the checks after each end are those of the loop above.

Children run as ``python -m gauntlet.kills fault|loop|aloop ...``.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import ckptguard
from ckptguard import EntryKind
from ckptguard._format.layout import OWNER_NAME, RootLayout, parse_staging_name, save_id_writer
from ckptguard._storage.faults import set_fault_hook
from gauntlet import Row, same

if TYPE_CHECKING:
    from collections.abc import Collection

TESTS = Path(__file__).resolve().parents[1]
SCENARIO = "kills"
NEW_SIZE = 256 * 1024  # crash_child.py's new weights.bin
OLD_BYTES = {1: b"one", 2: b"two"}  # test_crash._save's content of the first checkpoints
LOOP_KEEP = 3
LOOP_ROOTS = 2
ASYNC_EXIT_TIMEOUT = 30.0


def _env() -> dict[str, str]:
    path = [str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


def _fault_state(step: int, tag: str) -> dict[str, Any]:
    return {"w": np.full(1024, 10 * step + (tag == "new"), dtype=np.int64), "tag": tag}


def _loop_state(step: int) -> dict[str, Any]:
    return {"w": np.full(4096, step, dtype=np.int64), "step": step}


def _leftovers(root: Path, *, dead: Collection[int] = ()) -> tuple[list[str], set[str]]:
    """Staging and trash entries (files, verdict); apart: ownerless dirs of the pids ``dead``.

    Recovery keeps an ownerless staging dir as live for its first 10 s (``OWNERLESS_GRACE``).
    """
    layout = RootLayout(str(root))
    found, ownerless = [], set()
    for entry in ckptguard.scan(root).entries:
        if os.path.dirname(entry.path) not in {layout.staging, layout.trash}:
            continue
        files = sorted(os.listdir(entry.path)) if os.path.isdir(entry.path) else []
        parsed = parse_staging_name(os.path.basename(entry.path))
        origin = save_id_writer(parsed[1]) if parsed else None
        pid = origin[1] if origin else None
        if (
            entry.kind == EntryKind.STAGING_LIVE
            and pid in dead
            and entry.detail.startswith("unknown owner")
            and set(files) <= {OWNER_NAME}
        ):
            ownerless.add(entry.path)
        else:
            found.append(f"{entry.kind} {entry.path} holding {files} ({entry.detail})")
    return found, ownerless


# -- row 1: a kill at every named step --------------------------------------------------------
def _fault_child(root: str, step: int, point: str, marker: str) -> None:
    """A CheckpointManager save of ``step`` that SIGKILLs itself at ``point``."""

    def hook(reached: str) -> None:
        if reached == point:
            Path(marker).write_text(reached)
            os.kill(os.getpid(), signal.SIGKILL)

    mgr = ckptguard.CheckpointManager(root, keep_last=None, check_environment=False)
    set_fault_hook(hook)
    mgr.save(step, _fault_state(step, "new"))
    print(f"no kill happened at {point}", file=sys.stderr)
    sys.exit(3)


def _content_problem(mgr: ckptguard.CheckpointManager, saver: str, step: int, tag: str) -> str:
    """What is wrong with checkpoint-``step`` (``tag``: "old" or "new" content), or ""."""
    if saver == "manager":
        got = mgr.restore(step=step)
        return "" if same(got, _fault_state(step, tag)) else f"step {step} restores {got!r}"
    data = (Path(mgr.root) / f"checkpoint-{step}" / "weights.bin").read_bytes()
    ok = len(data) == NEW_SIZE if tag == "new" else data == OLD_BYTES[step]
    return "" if ok else f"checkpoint-{step} holds {len(data)} bytes, expected the {tag} save"


def _fault_case(work: Path, saver: str, scenario: str, point: str) -> str | None:
    """One kill; the problem found, or None."""
    from test_crash import AFTER_RENAME, CHILD
    from test_crash import _save as save_files

    root, marker = work / "run", work / "reached"
    where = f"{saver} save, {scenario}, killed at {point}"
    for step, data in OLD_BYTES.items():
        if saver == "manager":
            setup = ckptguard.CheckpointManager(root, keep_last=None, check_environment=False)
            setup.save(step, _fault_state(step, "old"))
        else:
            save_files(root, f"checkpoint-{step}", data)
    step = 2 if scenario == "replace" else 3
    if scenario == "quarantine":
        (root / "checkpoint-3").mkdir()
        (root / "checkpoint-3" / "half-written.bin").write_bytes(b"partial")
    if saver == "manager":
        args = ["-m", "gauntlet.kills", "fault", str(root), str(step), point, str(marker)]
    else:
        policy = "replace" if scenario == "replace" else "keep"
        args = [str(CHILD), str(root), f"checkpoint-{step}", policy, point, str(marker)]
    cmd = [sys.executable, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=120, check=False)
    if not marker.exists():
        return f"{where}: never reached (exit {proc.returncode}): {proc.stderr[-300:]}"
    if proc.returncode != -signal.SIGKILL:
        return f"{where}: the child exited with {proc.returncode}, not SIGKILL"
    corrupt = ckptguard.scan(root).of_kind(EntryKind.COMMITTED_CORRUPT)
    if corrupt:
        first = corrupt[0]
        return f"{where}: visible but corrupt before any repair: {first.name}: {first.detail}"

    # Resume as a training job would: a manager (its startup recovery repairs the root).
    mgr = ckptguard.CheckpointManager(root, keep_last=None, check_environment=False)
    expected = dict.fromkeys(OLD_BYTES, "old")
    if point in AFTER_RENAME and scenario != "quarantine":
        expected[step] = "new"
    infos = mgr.list(checksums=True)
    if sorted(i.step for i in infos) != sorted(expected):
        return f"{where}: checkpoints {[i.step for i in infos]}, expected {sorted(expected)}"
    for info in infos:
        if not info.valid:
            return f"{where}: checkpoint-{info.step} does not verify: {info.problems}"
    for s, tag in expected.items():
        if problem := _content_problem(mgr, saver, s, tag):
            return f"{where}: {problem}"
    latest = mgr.latest()
    if latest is None or latest.step != max(expected):
        return f"{where}: latest() is {latest and latest.step}, expected {max(expected)}"
    if scenario == "quarantine":
        kept = ckptguard.scan(root).of_kind(EntryKind.QUARANTINE)
        if len(kept) != 1 or not (Path(kept[0].path) / "half-written.bin").exists():
            return f"{where}: the foreign folder is not kept in quarantine: {kept}"

    # The next save works and leaves nothing behind.
    if saver == "manager":
        mgr.save(4, _fault_state(4, "new"))
    else:
        save_files(root, "checkpoint-4", b"four")
    latest = mgr.latest()
    if latest is None or latest.step != 4:
        return f"{where}: after the next save, latest() is {latest and latest.step}, not 4"
    left, ownerless = _leftovers(root)
    if left or ownerless:
        return f"{where}: the next save left {left or ownerless}"
    return None


def _fault_row(full: bool, work: Path) -> Row:
    from test_crash import CASES

    # Full: every case with each saver, 5 times. Sample: every case once, savers alternating.
    savers = ("atomic_checkpoint", "manager")
    runs = [(savers[n % 2], *case) for n, case in enumerate(CASES)]
    if full:
        runs = [(saver, *case) for _ in range(5) for saver in savers for case in CASES]
    row = Row(
        SCENARIO,
        "SIGKILL at every named protocol step (new, replace, quarantine; atomic_checkpoint and "
        "CheckpointManager.save): committed checkpoints lost or corrupt = 0; resume takes the "
        "newest valid; the next save leaves no staging/trash",
    )

    def one(n: int) -> str | None:
        saver, scenario, point = runs[n]
        case = work / "faults" / f"{n:03d}-{saver}-{scenario}-{point}"
        case.mkdir(parents=True)
        try:
            return _fault_case(case, saver, scenario, point)
        except Exception as exc:  # a check that raises (restore of a bad checkpoint) fails too
            return f"{saver} save, {scenario}, killed at {point}: {type(exc).__name__}: {exc}"

    with ThreadPoolExecutor(2) as pool:
        for problem in pool.map(one, range(len(runs))):
            row.trial(problem)
    row.figures = {"points": len({p for _, p in CASES}), "cases": len(CASES), "kills": len(runs)}
    row.figures["savers"] = len(savers)
    return row


# -- row 2: random kills of a save loop -------------------------------------------------------
def _loop_child(root: str, *, asynchronous: bool = False) -> None:
    """Resume from the newest valid checkpoint, then save forever; report each commit.

    Async: each save returns at once; "committed N" is printed once the next save has
    waited for N (a save waits for the one in flight, and raises its error).
    """
    mgr = ckptguard.CheckpointManager(
        root,
        keep_last=LOOP_KEEP,
        check_environment=False,
        async_save=asynchronous,
        exit_timeout=ASYNC_EXIT_TIMEOUT,
    )
    info = mgr.latest()
    if info is not None and not same(mgr.restore(), _loop_state(info.step)):
        print(f"bad-resume {info.step}", flush=True)
        sys.exit(2)
    print("fresh" if info is None else f"resumed {info.step}", flush=True)
    step = 0 if info is None else info.step + 1
    in_flight: int | None = None
    while True:
        mgr.save(step, _loop_state(step))
        if asynchronous:
            if in_flight is not None:
                print(f"committed {in_flight}", flush=True)
            in_flight = step
        else:
            print(f"committed {step}", flush=True)
        step += 1


@dataclass
class _LoopStats:
    problems: list[str] = field(default_factory=list)  # of the kill being checked
    results: list[str | None] = field(default_factory=list)  # per kill: its problems, or None
    dead: set[int] = field(default_factory=set)  # pids of the killed children
    reported: set[int] = field(default_factory=set)  # steps reported committed
    ownerless: set[str] = field(default_factory=set)  # see _leftovers
    commits: int = 0
    sigterms: int = 0  # ends by SIGTERM (the async loop), the rest by SIGKILL
    startup_kills: int = 0  # before the child had resumed
    staging_kills: int = 0  # a new staging dir existed at the kill: mid-save
    max_step: int = -1
    max_on_disk: int = 0
    # How far latest() may be ahead of the last step reported committed: one in flight;
    # async, one more (committed, its line not yet printed, and the next finished by the
    # SIGTERM watcher).
    ahead: int = 1


def _check_after_kill(root: Path, lines: list[str], prev: int | None, st: _LoopStats) -> int | None:
    """Check the root after one kill; returns the step that latest() takes."""
    layout = RootLayout(str(root))
    staging = os.listdir(layout.staging) if os.path.isdir(layout.staging) else []
    if set(staging) - {os.path.basename(p) for p in st.ownerless}:
        st.staging_kills += 1
    head = lines[0].split() if lines else []
    committed = [int(line.split()[1]) for line in lines if line.startswith("committed ")]
    resumed = int(head[1]) if len(head) == 2 and head[0] == "resumed" else None
    if not head:
        st.startup_kills += 1
    elif head[0] not in {"fresh", "resumed"} or resumed != prev:
        st.problems.append(f"the child printed {lines[0]!r} at start; the newest valid is {prev}")
    start = 0 if resumed is None else resumed + 1
    if committed and committed != list(range(start, start + len(committed))):
        st.problems.append(f"reported steps {committed[:5]}... do not follow from {start}")
    st.commits += len(committed)
    st.reported.update(committed)
    reported = max(committed, default=prev)
    corrupt = ckptguard.scan(root).of_kind(EntryKind.COMMITTED_CORRUPT)
    if corrupt:
        st.problems.append(f"visible but corrupt after the kill: {corrupt[0].name}")
    # What the next child does first: startup recovery, then latest() and restore().
    mgr = ckptguard.CheckpointManager(root, keep_last=LOOP_KEEP, check_environment=False)
    left, ownerless = _leftovers(root, dead=st.dead)
    st.ownerless |= ownerless
    if left:
        st.problems.append(f"startup recovery left {left}")
    latest = mgr.latest()
    infos = mgr.list(checksums=True)
    st.max_on_disk = max(st.max_on_disk, len(infos))
    if latest is None:
        if reported is not None:
            st.problems.append(f"latest() is None, step {reported} was reported committed")
        return None
    st.max_step = max(st.max_step, latest.step)
    if reported is not None and not reported <= latest.step <= reported + st.ahead:
        st.problems.append(f"latest() is step {latest.step}, the last reported is {reported}")
    if not same(mgr.restore(), _loop_state(latest.step)):
        st.problems.append(f"restore() does not give step {latest.step}'s state")
    if latest.step != max(i.step for i in infos):
        st.problems.append(f"latest() is step {latest.step}, not the newest of {infos}")
    for info in infos:  # every checkpoint visible: valid and exact
        if not info.valid:
            st.problems.append(f"checkpoint-{info.step} does not verify: {info.problems}")
        elif not same(mgr.restore(step=info.step), _loop_state(info.step)):
            st.problems.append(f"checkpoint-{info.step} restores another state")
    kept = {i.step for i in infos}
    for step in range(latest.step - LOOP_KEEP + 1, latest.step + 1):  # what retention keeps
        if step in st.reported and step not in kept:
            st.problems.append(f"step {step} was reported committed and is gone ({sorted(kept)})")
    return latest.step


def _wait_for_output(out: Path, proc: subprocess.Popen[bytes], *, timeout: float) -> None:
    """Until the child wrote its first line (or exited, or ``timeout`` passed)."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if b"\n" in out.read_bytes():
            return
        time.sleep(0.01)


def _kill_loop(root: Path, kills: int, seed: int, *, asynchronous: bool = False) -> _LoopStats:
    rng = random.Random(seed)  # noqa: S311 - reproducible delays, not secrets
    st = _LoopStats(ahead=2 if asynchronous else 1)
    prev: int | None = None
    args = [sys.executable, "-m", "gauntlet.kills", "aloop" if asynchronous else "loop", str(root)]
    for k in range(kills):
        # 1 in 5: the first 0.35 s (interpreter start, startup recovery, resume); else later.
        delay = rng.uniform(0.0, 0.35) if rng.random() < 0.2 else rng.uniform(0.35, 0.9)
        out, err = root.with_name(f"{root.name}.out"), root.with_name(f"{root.name}.err")
        with out.open("wb") as sink, err.open("wb") as errors:
            proc = subprocess.Popen(args, stdout=sink, stderr=errors, env=_env())
            term = asynchronous and rng.random() < 0.5
            hung = False
            try:
                if asynchronous and delay >= 0.35:
                    # The async loop's ends belong in its save loop, not in the interpreter's
                    # start (about a second here): wait for its first line, then the delay.
                    _wait_for_output(out, proc, timeout=60)
                    delay -= 0.35
                time.sleep(delay)
                early = proc.poll()
                if term and early is None:
                    st.sigterms += 1
                    proc.send_signal(signal.SIGTERM)
                    try:  # it finishes the save in flight, then dies of SIGTERM
                        proc.wait(ASYNC_EXIT_TIMEOUT + 30)
                    except subprocess.TimeoutExpired:
                        hung = True
            finally:
                proc.kill()
                proc.wait(30)
        st.dead.add(proc.pid)
        text = out.read_text(errors="replace")
        lines = [line.strip() for line in text.splitlines(keepends=True) if line.endswith("\n")]
        st.problems = []
        if hung:
            st.problems.append("the process hung after SIGTERM (a deadlock on exit)")
        elif term and early is None and proc.returncode != -signal.SIGTERM:
            st.problems.append(f"after SIGTERM it ended with {proc.returncode}, not -SIGTERM")
        if early is not None:
            st.problems.append(f"the child exited by itself ({early}): {err.read_text()[-300:]}")
        else:
            try:
                prev = _check_after_kill(root, lines, prev, st)
            except Exception as exc:  # a check that raises (restore of a bad checkpoint) fails too
                st.problems.append(f"{type(exc).__name__}: {exc}")
        where = f"{root.name}, kill {k} after {delay:.2f}s"
        st.results.append(f"{where}: {'; '.join(st.problems)}" if st.problems else None)
    # Then one more save, in this process: it works, and leaves nothing new behind.
    mgr = ckptguard.CheckpointManager(root, keep_last=LOOP_KEEP, check_environment=False)
    step = 0 if prev is None else prev + 1
    mgr.save(step, _loop_state(step))
    mgr.wait()  # retired checkpoints leave trash in the background
    latest = mgr.latest()
    left, ownerless = _leftovers(root, dead=st.dead)
    if latest is None or latest.step != step or left or ownerless - st.ownerless:
        final = f"{root.name}: the save after the last kill: latest {latest}, left {left}"
        st.results[-1] = "; ".join(filter(None, [st.results[-1], final]))
    return st


def _run_loops(work: Path, kills: int, *, asynchronous: bool) -> tuple[Row, list[_LoopStats]]:
    """LOOP_ROOTS kill loops side by side; a row with one trial per kill."""
    name = "aloop" if asynchronous else "loop"
    roots = [work / name / f"root-{i}" for i in range(LOOP_ROOTS)]
    for root in roots:
        root.mkdir(parents=True)
    seeds = [(100 if asynchronous else 0) + i for i in range(LOOP_ROOTS)]
    with ThreadPoolExecutor(LOOP_ROOTS) as pool:
        stats = list(
            pool.map(lambda r, s: _kill_loop(r, kills, s, asynchronous=asynchronous), roots, seeds)
        )
    claim = (
        "random SIGKILL/SIGTERM of an async save loop (keep 3): SIGTERM ends the process by "
        "SIGTERM within exit_timeout (no deadlock); reported-committed checkpoints lost or "
        "corrupt = 0; resume always takes the newest valid"
        if asynchronous
        else "random-kill loop (SIGKILL at a random moment of a CheckpointManager save loop, "
        "keep 3): reported-committed checkpoints lost or corrupt = 0; resume always takes the "
        "newest valid"
    )
    row = Row(SCENARIO, claim)
    for st in stats:
        for problem in st.results:
            row.trial(problem)
    return row, stats


def _loop_row(full: bool, work: Path) -> Row:
    kills = (1000 if full else 16) // LOOP_ROOTS
    row, stats = _run_loops(work, kills, asynchronous=False)
    row.figures = {
        "kills": kills * LOOP_ROOTS,
        "roots": LOOP_ROOTS,
        "saves_committed": sum(st.commits for st in stats),
        "max_step": max(st.max_step for st in stats),
        "kills_at_startup": sum(st.startup_kills for st in stats),
        "kills_mid_save": sum(st.staging_kills for st in stats),
        "max_checkpoints_on_disk": max(st.max_on_disk for st in stats),
        "ownerless_staging_kept": sum(len(st.ownerless) for st in stats),
    }
    return row


def _async_loop_row(full: bool, work: Path) -> Row:
    kills = (500 if full else 8) // LOOP_ROOTS
    row, stats = _run_loops(work, kills, asynchronous=True)
    row.figures = {
        "ends": kills * LOOP_ROOTS,
        "by_sigterm": sum(st.sigterms for st in stats),
        "saves_committed": sum(st.commits for st in stats),
        "kills_at_startup": sum(st.startup_kills for st in stats),
        "ends_mid_save": sum(st.staging_kills for st in stats),
    }
    return row


def run(full: bool, work: Path) -> list[Row]:
    """The three rows (see the module docstring)."""
    return [_fault_row(full, work), _loop_row(full, work), _async_loop_row(full, work)]


if __name__ == "__main__":  # the children: fault ROOT STEP POINT MARKER, or loop ROOT
    if sys.argv[1] == "fault":
        _fault_child(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5])
    else:
        _loop_child(sys.argv[2], asynchronous=sys.argv[1] == "aloop")
