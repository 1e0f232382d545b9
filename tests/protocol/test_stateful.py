"""A state machine over a real checkpoint root: saves, crashes, corruption and recovery.

Hypothesis drives random sequences of saves (new names, the same name with every
``if_exists``), saves that crash at each named step of the protocol, abandoned staging
dirs of dead or unidentifiable writers, in-progress saves of a live writer, corruption of
committed checkpoints, foreign entries in a checkpoint's way, and ``recover``. A model
records what each name must hold; after every step the root is scanned and must match:
every checkpoint reported valid has exactly the model's bytes, nothing committed and not
corrupted or replaced is lost (a replace cut between its renames keeps the old copy in
trash, and ``recover`` puts it back), corrupt entries are never valid, and after
``recover`` no stale staging remains while live ones are untouched.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import ckptguard
from ckptguard._format.layout import MANIFEST_NAME, OWNER_NAME, RootLayout, parse_staging_name
from ckptguard._format.owner import WriterInfo, current_writer
from ckptguard._protocol import rename as protocol
from ckptguard._protocol.cleanup import DEFAULT_STALE_AFTER
from ckptguard._protocol.locking import root_lock
from ckptguard._protocol.recovery import EntryKind
from ckptguard._protocol.strategy import Staging
from ckptguard._storage.faults import FAULT_POINTS, set_fault_hook

if TYPE_CHECKING:
    from ckptguard._protocol.strategy import IfExists

Files = dict[str, bytes]

# Relative paths a save may hold; none is a prefix directory of another, so any subset
# is a valid checkpoint.
_PATHS = ("model.bin", "config.json", "shards/0.bin", "shards/1.bin", "a/b/c/deep.pt")
_STRAY = "stray.bin"  # a file a corruption adds: never one of _PATHS
_SEAL = (
    "stage.created",
    "seal.files_synced",
    "seal.manifest_tmp_written",
    "seal.manifest_written",
    "seal.done",
    "commit.before_rename",
)
_PUBLISH = ("commit.renamed", "publish.root_synced", "publish.done")
# The named steps each kind of save passes, in order (see commit.py).
_STEPS: dict[str, tuple[str, ...]] = {
    "new": (*_SEAL, *_PUBLISH),
    "replace": (*_SEAL, "commit.moved_to_trash", *_PUBLISH),
    "quarantine": (*_SEAL, "commit.quarantined", *_PUBLISH),
    "keep": (*_SEAL, "publish.root_synced", "publish.done"),
    "error": _SEAL,
}
_FOREIGN_HOST = WriterInfo(host="elsewhere.invalid", pid=1, pid_start=1, boot_id="x")

files_strategy = st.dictionaries(
    st.sampled_from(_PATHS), st.binary(max_size=24), min_size=1, max_size=len(_PATHS)
)


class _Crash(BaseException):
    """The process "dies" at a fault point: no protocol step after it runs.

    A BaseException, like KeyboardInterrupt, so that no ``except Exception`` in the
    library can swallow it.
    """


@functools.cache
def _dead_writer() -> WriterInfo:
    """A writer on this machine whose process has exited (pid_start guards pid reuse)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return dataclasses.replace(current_writer(), pid=proc.pid, pid_start=1)


@dataclasses.dataclass
class _Copy:
    """A checkpoint moved to trash: its save id and content (None if it does not verify)."""

    save_id: str
    content: Files | None


@dataclasses.dataclass
class _Name:
    """What the model expects under ROOT/<name>."""

    present: bool = False  # something exists under the final name
    content: Files | None = None  # the bytes of a valid checkpoint; None: corrupt/foreign
    save_id: str | None = None
    trash: list[_Copy] = dataclasses.field(default_factory=list)  # oldest first

    @property
    def valid(self) -> bool:
        return self.present and self.content is not None

    def commit(self, content: Files, save_id: str) -> None:
        self.present, self.content, self.save_id = True, content, save_id


def _read_tree(path: str) -> Files:
    root = Path(path)
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and p.name != MANIFEST_NAME
    }


def _write_tree(path: str | Path, files: Files) -> None:
    for rel, data in files.items():
        target = Path(path, rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


class CheckpointRootMachine(RuleBasedStateMachine):
    """Random sequences of saves, crashes, corruption and recovery on one root."""

    def __init__(self) -> None:
        super().__init__()
        self.root = tempfile.mkdtemp(prefix="ckptguard-stateful-")
        self.layout = RootLayout(self.root)
        self.names: dict[str, _Name] = {}
        self.next_step = 0
        self.quarantined = 0
        self.live: dict[str, Staging | None] = {}  # path -> open save (None: leaked)
        self.dead: set[str] = set()  # staging left by a writer that died on this machine
        self.foreign: set[str] = set()  # staging left by a writer on another host

    def teardown(self) -> None:
        set_fault_hook(None)
        shutil.rmtree(self.root, ignore_errors=True)

    # -- helpers ------------------------------------------------------------------------------

    def _fresh_name(self) -> str:
        self.next_step += 1
        return f"checkpoint-{self.next_step}"

    def _final(self, name: str) -> str:
        return os.path.join(self.root, name)

    def _staging_entries(self) -> set[str]:
        if not os.path.isdir(self.layout.staging):
            return set()
        return {os.path.join(self.layout.staging, e) for e in os.listdir(self.layout.staging)}

    def _kind_of_save(self, name: str, if_exists: IfExists) -> str:
        # commit() fully verifies an existing checkpoint of another save before keeping,
        # replacing or reporting it; anything that does not verify (a bit flip included)
        # is quarantined.
        entry = self.names.get(name)
        if entry is None or not entry.present:
            return "new"
        if entry.content is None:
            return "quarantine"
        return if_exists

    def _stale_staging_removed(self) -> None:
        """publish (or recover) removed the staging of writers that died here."""
        for path in self.dead:
            assert not os.path.lexists(path), f"{path}: dead writer's staging survived cleanup"
        self.dead.clear()

    def _save(
        self, name: str, files: Files, if_exists: IfExists, crash_at: str | None = None
    ) -> None:
        """Save through atomic_checkpoint, optionally crashing at one named step."""
        kind = self._kind_of_save(name, if_exists)
        steps = _STEPS[kind]
        entry = self.names.setdefault(name, _Name())
        reached: list[str] = []

        def hook(point: str) -> None:
            reached.append(point)
            if point == crash_at:
                raise _Crash(point)

        before = self._staging_entries()
        save = ckptguard.atomic_checkpoint(self._final(name), if_exists=if_exists)
        save_id: str | None = None
        crashed = False
        conflict_path: str | None = None
        previous = set_fault_hook(hook)
        try:
            with save as staging_dir:
                parsed = parse_staging_name(staging_dir.name)
                assert parsed is not None
                assert parsed[0] == name
                save_id = parsed[1]
                _write_tree(staging_dir, files)
        except _Crash:
            crashed = True
        except ckptguard.CommitConflict as exc:
            conflict_path = exc.path
        finally:
            set_fault_hook(previous)

        # The protocol passes its named steps in the documented order, and a crash point
        # that the save's path does not pass is never reached.
        assert crashed == (crash_at in steps), (crash_at, reached)
        assert reached == list(steps[: steps.index(crash_at) + 1] if crashed else steps)
        conflict = conflict_path is not None
        assert conflict == (kind == "error" and not crashed)
        assert conflict_path in {None, self._final(name)}

        leaked = self._staging_entries() - before
        if crash_at == "stage.created" and crashed:
            # stage() itself was interrupted: the with-block never ran, so __exit__ did
            # not abort, and the staging dir may stay; its owner (this process) is alive,
            # so it must stay "live" until this process is gone.
            assert len(leaked) <= 1
            self.live.update(dict.fromkeys(leaked))
        else:
            assert not leaked, f"staging left behind: {leaked}"

        event(f"save: {kind}, crashed at {crash_at}" if crashed else f"save: {kind}")
        done = set(reached)
        old = _Copy(entry.save_id or "", entry.content)
        if "commit.moved_to_trash" in done and crash_at != "commit.moved_to_trash":
            entry.trash.append(old)
            entry.present = False
        # A failure right after "old -> trash" (here the injected crash, in real life an
        # error or Ctrl-C) puts the old checkpoint straight back: nothing changes.
        if "commit.quarantined" in done:
            self.quarantined += 1
            entry.present = False
        if "commit.renamed" in done:
            assert save_id is not None
            entry.commit(files, save_id)
        if kind == "replace" and "publish.done" in done:
            entry.trash.remove(old)  # publish dropped the checkpoint this save replaced
        if not entry.present and not entry.trash:
            del self.names[name]
        if "publish.done" in done:
            # publish also repairs what earlier cut replaces left in trash, and removes
            # the staging of dead writers
            self._repair_trash()
            self._stale_staging_removed()

        if crashed or conflict:
            return
        result = save.result
        assert result is not None
        assert result.path == self._final(name)
        expected = {
            "new": ckptguard.Outcome.COMMITTED,
            "quarantine": ckptguard.Outcome.COMMITTED,
            "replace": ckptguard.Outcome.REPLACED,
            "keep": ckptguard.Outcome.KEPT_EXISTING,
        }[kind]
        assert result.outcome == expected
        assert (result.quarantined is not None) == (kind == "quarantine")
        if result.quarantined is not None:
            assert os.path.lexists(result.quarantined)
        if kind == "replace":
            assert result.replaced is not None
            assert not os.path.lexists(result.replaced)
        if kind == "keep":
            assert result.manifest.save_id == entry.save_id

    # -- rules --------------------------------------------------------------------------------

    @rule(files=files_strategy)
    def save_new(self, files: Files) -> None:
        self._save(self._fresh_name(), files, "keep")

    @precondition(lambda self: bool(self.names))
    @rule(
        data=st.data(),
        files=files_strategy,
        if_exists=st.sampled_from(["replace", "keep", "error"]),
    )
    def save_same_name(self, data: st.DataObject, files: Files, if_exists: IfExists) -> None:
        name = data.draw(st.sampled_from(sorted(self.names)), label="name")
        self._save(name, files, if_exists)

    @precondition(lambda self: any(e.valid for e in self.names.values()))
    @rule(data=st.data(), files=files_strategy, then_recover=st.booleans())
    def crash_mid_replace(self, data: st.DataObject, files: Files, then_recover: bool) -> None:
        """An exception after "old -> trash" and before "new -> final" rolls back at once.

        (A SIGKILL at the same point is covered by test_crash.py: recover() restores it.)
        """
        name = data.draw(st.sampled_from(sorted(n for n, e in self.names.items() if e.valid)))
        old = self.names[name].content
        self._save(name, files, "replace", crash_at="commit.moved_to_trash")
        assert _read_tree(self._final(name)) == old  # the OLD content, visible again
        # (what trash should hold is checked after every step by the invariant below)
        if then_recover:
            self._recover(DEFAULT_STALE_AFTER)
            assert _read_tree(self._final(name)) == old

    @rule(
        data=st.data(),
        files=files_strategy,
        crash_at=st.sampled_from(FAULT_POINTS),
        if_exists=st.sampled_from(["replace", "keep", "error"]),
        reuse=st.booleans(),
    )
    def crash_during_save(
        self,
        data: st.DataObject,
        files: Files,
        crash_at: str,
        if_exists: IfExists,
        reuse: bool,
    ) -> None:
        if reuse and self.names:
            name = data.draw(st.sampled_from(sorted(self.names)), label="name")
        else:
            name = self._fresh_name()
        self._save(name, files, if_exists, crash_at=crash_at)

    @rule(
        data=st.data(),
        files=files_strategy,
        owner=st.sampled_from(["dead", "foreign"]),
        sealed=st.booleans(),
        reuse=st.booleans(),
    )
    def abandoned_save(
        self, data: st.DataObject, files: Files, owner: str, sealed: bool, reuse: bool
    ) -> None:
        """A saver wrote files (and maybe sealed them) and then its process died."""
        if reuse and self.names:
            name = data.draw(st.sampled_from(sorted(self.names)), label="name")
        else:
            name = self._fresh_name()
        writer = _dead_writer() if owner == "dead" else _FOREIGN_HOST
        staging = protocol.stage(self.root, name, writer=writer)
        _write_tree(staging.path, files)
        if sealed:
            protocol.seal(staging)
        (self.dead if owner == "dead" else self.foreign).add(staging.path)

    @precondition(lambda self: sum(s is not None for s in self.live.values()) < 2)
    @rule(files=files_strategy)
    def start_live_save(self, files: Files) -> None:
        """A save of this (alive) process is in progress: recovery must never touch it."""
        staging = protocol.stage(self.root, self._fresh_name())
        _write_tree(staging.path, files)
        self.live[staging.path] = staging

    @precondition(lambda self: any(s is not None for s in self.live.values()))
    @rule(data=st.data())
    def finish_live_save(self, data: st.DataObject) -> None:
        path = data.draw(st.sampled_from(sorted(p for p, s in self.live.items() if s)))
        staging = self.live.pop(path)
        assert staging is not None
        files = _read_tree(staging.path)
        del files[OWNER_NAME]
        manifest = protocol.seal(staging)
        with root_lock(staging.layout):
            result = protocol.commit(staging, manifest)
            protocol.publish(staging, result)
        assert result.outcome == ckptguard.Outcome.COMMITTED
        assert {f.path for f in manifest.files} == set(files)
        self.names.setdefault(staging.name, _Name()).commit(files, staging.save_id)
        # publish also repairs what earlier cut replaces left in trash (of any save)
        self._repair_trash()
        self._stale_staging_removed()

    @precondition(lambda self: any(e.valid for e in self.names.values()))
    @rule(
        data=st.data(),
        how=st.sampled_from(
            [
                "bitflip",
                "truncate",
                "append",
                "delete_file",
                "extra_file",
                "flip_manifest",
                "remove_manifest",
            ]
        ),
    )
    def corrupt(self, data: st.DataObject, how: str) -> None:
        name = data.draw(st.sampled_from(sorted(n for n, e in self.names.items() if e.valid)))
        entry = self.names[name]
        assert entry.content is not None
        final = Path(self._final(name))
        nonempty = sorted(rel for rel, b in entry.content.items() if b)
        if how in {"bitflip", "truncate"} and not nonempty:
            how = "append"
        if how == "bitflip":
            target = final / data.draw(st.sampled_from(nonempty))
            raw = bytearray(target.read_bytes())
            raw[data.draw(st.integers(0, len(raw) - 1))] ^= 1 << data.draw(st.integers(0, 7))
            target.write_bytes(raw)
        elif how == "truncate":
            target = final / data.draw(st.sampled_from(nonempty))
            old = target.read_bytes()
            target.write_bytes(old[: data.draw(st.integers(0, len(old) - 1))])
        elif how == "append":
            target = final / data.draw(st.sampled_from(sorted(entry.content)))
            target.write_bytes(target.read_bytes() + data.draw(st.binary(min_size=1, max_size=4)))
        elif how == "delete_file":
            (final / data.draw(st.sampled_from(sorted(entry.content)))).unlink()
        elif how == "extra_file":
            (final / _STRAY).write_bytes(b"not in the manifest")
        elif how == "flip_manifest":
            # Every single-bit flip of a manifest without floats is caught: whitespace,
            # keys and literals stop parsing, any value change breaks the self-checksum.
            target = final / MANIFEST_NAME
            manifest = bytearray(target.read_bytes())
            manifest[data.draw(st.integers(0, len(manifest) - 1))] ^= 1 << data.draw(
                st.integers(0, 7)
            )
            target.write_bytes(manifest)
        else:
            (final / MANIFEST_NAME).unlink()
        entry.content = None

    @rule(as_file=st.booleans())
    def foreign_entry(self, as_file: bool) -> None:
        """Something that is not a ckptguard checkpoint takes a checkpoint's name."""
        name = self._fresh_name()
        if as_file:
            Path(self._final(name)).write_bytes(b"a file, not a checkpoint")
        else:
            _write_tree(self._final(name), {"half-written.bin": b"\0" * 5})
        self.names[name] = _Name(present=True)

    @rule()
    def recover(self) -> None:
        self._recover(DEFAULT_STALE_AFTER)

    @rule()
    def recover_judging_staging_by_age_only(self) -> None:
        # stale_after=0: a staging whose owner cannot be identified (another host) is
        # stale at once; one whose owner is alive here must still be kept.
        self._recover(0.0)

    def _repair_trash(self) -> set[str]:
        """What repair_trash does (in recover and in every publish); returns restored finals."""
        restored = set()
        for name, entry in list(self.names.items()):
            if entry.trash and not entry.present:
                for copy in reversed(entry.trash):
                    if copy.content is not None:  # the newest copy that verifies comes back
                        entry.trash.remove(copy)
                        entry.commit(copy.content, copy.save_id)
                        restored.add(self._final(name))
                        break
            if entry.valid:
                entry.trash.clear()
            if not entry.present and not entry.trash:
                del self.names[name]
        return restored

    def _recover(self, stale_after: float) -> None:
        report = ckptguard.recover(self.root, stale_after=stale_after)
        restored = self._repair_trash()
        self._stale_staging_removed()
        if stale_after == 0:
            self.foreign.clear()  # an unidentifiable owner is judged by age alone

        if restored:
            event("recover: rolled back a cut replace")
        if stale_after == 0 and any(e.kind == EntryKind.STAGING_LIVE for e in report.entries):
            event("recover: kept a live staging with stale_after=0")
        actions = " ".join(report.actions)
        for final in restored:
            assert f"restored {final} from " in actions
        assert actions.count("restored ") == len(restored)
        rescan = ckptguard.scan(self.root, stale_after=stale_after)
        for found in (*report.entries, *rescan.entries):
            assert found.kind != EntryKind.STAGING_STALE, found
        latest = max(
            (int(n.rsplit("-", 1)[1]) for n, e in self.names.items() if e.valid), default=None
        )
        if latest is None:
            assert report.latest is None
        else:
            assert report.latest is not None
            assert report.latest.name == f"checkpoint-{latest}"

    # -- invariants ---------------------------------------------------------------------------

    @invariant()
    def root_matches_model(self) -> None:
        report = ckptguard.scan(self.root)
        top = {e.name: e for e in report.entries if os.path.dirname(e.path) == self.root}
        assert set(top) == {n for n, e in self.names.items() if e.present}
        for name, entry in self.names.items():
            if not entry.present:
                continue
            found = top[name]
            if entry.content is None:
                # Corrupt or foreign: never reported valid.
                assert found.kind in {EntryKind.COMMITTED_CORRUPT, EntryKind.FOREIGN}, found
                continue
            # Committed and untouched: valid, with exactly the bytes that were saved.
            assert found.kind == EntryKind.COMMITTED_VALID, found
            assert found.report is not None
            assert found.report.manifest is not None
            assert found.report.manifest.save_id == entry.save_id
            assert _read_tree(found.path) == entry.content

    @invariant()
    def trash_holds_what_a_cut_replace_moved_aside(self) -> None:
        report = ckptguard.scan(self.root)
        found: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)
        for e in report.of_kind(EntryKind.TRASH):
            found[e.name].append((ckptguard.read_manifest(e.path).save_id, e.path))
        expected = {n: e.trash for n, e in self.names.items() if e.trash}
        assert set(found) == set(expected)
        for name, copies in expected.items():
            by_id = dict(found[name])
            assert sorted(by_id) == sorted(c.save_id for c in copies)
            for copy in copies:
                verdict = ckptguard.verify(by_id[copy.save_id])
                if copy.content is None:
                    assert not verdict.ok
                else:
                    # Nothing lost: the old checkpoint waits in trash, intact.
                    assert verdict.ok, verdict.problems
                    assert _read_tree(by_id[copy.save_id]) == copy.content

    @invariant()
    def staging_and_quarantine_match_model(self) -> None:
        report = ckptguard.scan(self.root)
        kinds = {
            e.path: e.kind for e in report.entries if os.path.dirname(e.path) == self.layout.staging
        }
        for path in self.live:
            assert kinds.get(path) == EntryKind.STAGING_LIVE, path
        for path in self.foreign:  # younger than the default 6 h
            assert kinds.get(path) == EntryKind.STAGING_LIVE, path
        for path in self.dead & set(kinds):
            assert kinds[path] == EntryKind.STAGING_STALE, path
        assert set(kinds) <= set(self.live) | self.foreign | self.dead
        assert len(report.of_kind(EntryKind.QUARANTINE)) == self.quarantined


CheckpointRootMachine.TestCase.settings = settings(
    max_examples=80,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestCheckpointRoot = CheckpointRootMachine.TestCase
