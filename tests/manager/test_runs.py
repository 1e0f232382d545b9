"""Runs: two jobs on one root never delete or resume each other's checkpoints (issue 15).

Job A saves steps 1000, 1001, 1002 and job B steps 1, 2, 3 on one root, each with
keep_last=2, alternating. Before runs, every save of B was deleted by A's retention and
B's restore() returned A's state. Each job is a real process in a session of its own (a
job of its own, as a scheduler starts it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptguard

CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CKPTGUARD_DOCTOR": "0"}
CHILD_ENV.pop("CKPTGUARD_RUN_ID", None)

_JOB = textwrap.dedent(
    """
    import json, sys, torch, ckptguard
    root, tag, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    try:
        mgr = ckptguard.CheckpointManager(
            root, keep_last=2, new_lineage=mode == "new", check_environment=False
        )
    except ckptguard.ForeignRun as exc:
        print(json.dumps({"foreign": str(exc)}), flush=True)
        sys.exit(0)
    print(json.dumps({"run": mgr.lineage.run}), flush=True)
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "quit":
            break
        try:
            if cmd == "save":
                step = int(arg)
                mgr.save(step, {"w": torch.full((8,), float(step)), "tag": tag, "step": step})
                out = {"saved": step}
            else:
                state = mgr.restore()
                out = {"step": state["step"], "tag": state["tag"]}
        except Exception as exc:
            out = {"error": type(exc).__name__, "message": str(exc)}
        print(json.dumps(out), flush=True)
    mgr.close()
    """
)


class Job:
    """A training job in a session of its own, driven line by line."""

    def __init__(self, script: Path, root: Path, tag: str, mode: str = "default") -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(script), str(root), tag, mode],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=CHILD_ENV,
            start_new_session=True,  # another job: another session and process group
        )
        self.hello = self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            _, err = self.proc.communicate(timeout=60)
            pytest.fail(f"the job died: {err[-2000:]}")
        result: dict[str, Any] = json.loads(line)
        return result

    def ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._read()

    def stop(self) -> None:
        if self.proc.poll() is None and self.proc.stdin is not None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
        self.proc.communicate(timeout=60)


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "job.py"
    path.write_text(_JOB)
    return path


def test_a_second_job_on_a_live_runs_root_is_refused_naming_the_run(
    script: Path, tmp_path: Path
) -> None:
    root = tmp_path / "out"
    a = Job(script, root, "A")
    try:
        assert a.ask("save 1000") == {"saved": 1000}
        b = Job(script, root, "B")
        assert "foreign" in b.hello, b.hello
        assert a.hello["run"] in b.hello["foreign"]
        assert "new_lineage=True" in b.hello["foreign"]
        b.stop()
    finally:
        a.stop()


def test_two_jobs_alternating_on_one_root_keep_and_resume_their_own(
    script: Path, tmp_path: Path
) -> None:
    root = tmp_path / "out"
    a = Job(script, root, "A")
    b: Job | None = None
    try:
        assert a.ask("save 1000") == {"saved": 1000}
        b = Job(script, root, "B", "new")  # a new run beside the live one
        assert b.hello["run"] != a.hello["run"]
        for step_a, step_b in ((1001, 1), (1002, 2), (None, 3)):
            if step_a is not None:
                assert a.ask(f"save {step_a}") == {"saved": step_a}
            assert b.ask(f"save {step_b}") == {"saved": step_b}
        names = sorted(p.name for p in root.iterdir() if p.name.startswith("checkpoint-"))
        # each run kept its own last two: no cross deletion
        assert names == sorted(f"checkpoint-{s}" for s in (1001, 1002, 2, 3)), names
        assert b.ask("restore") == {"step": 3, "tag": "B"}  # not A's newer step 1002
        assert a.ask("restore") == {"step": 1002, "tag": "A"}
        collision = b.ask("save 1002")  # one run never replaces another run's checkpoint
        assert collision["error"] == "CommitConflict", collision
        assert a.ask("restore") == {"step": 1002, "tag": "A"}
    finally:
        a.stop()
        if b is not None:
            b.stop()


def test_a_restarted_job_resumes_its_run(script: Path, tmp_path: Path) -> None:
    root = tmp_path / "out"
    first = Job(script, root, "A")
    run = first.hello["run"]
    for step in (1, 2, 3):
        first.ask(f"save {step}")
    first.proc.kill()  # the job dies; its hold on the run goes with it
    first.proc.communicate(timeout=60)
    again = Job(script, root, "A")  # a new job, a new session: the same run
    try:
        assert again.hello["run"] == run
        assert again.ask("restore") == {"step": 3, "tag": "A"}
        assert again.ask("save 4") == {"saved": 4}
        names = sorted(p.name for p in root.iterdir() if p.name.startswith("checkpoint-"))
        assert names == ["checkpoint-3", "checkpoint-4"]  # its retention goes on
    finally:
        again.stop()


def test_restoring_another_runs_step_needs_any_run(tmp_path: Path) -> None:
    root = tmp_path / "out"
    first = ckptguard.CheckpointManager(root, keep_last=None, run_id="run-a")
    first.save(7, {"w": torch.ones(2)})
    first.close()
    other = ckptguard.CheckpointManager(root, keep_last=None, run_id="run-b")
    assert other.latest() is None  # nothing of its own
    with pytest.raises(ckptguard.ForeignRun, match="run-a"):
        other.restore(7)
    assert torch.equal(other.restore(7, any_run=True)["w"], torch.ones(2))
    assert [i.run for i in other.list()] == ["run-a"]
    other.close()


_TRAINER = textwrap.dedent(
    """
    import json, sys, torch
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
    import ckptguard
    from ckptguard.integrations.transformers import protect

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 8
        def __getitem__(self, i):
            ids = torch.arange(8) % 97
            return {"input_ids": ids, "labels": ids}

    model = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_positions=16, n_embd=32, n_layer=1,
                                       n_head=2))
    args = TrainingArguments(output_dir=sys.argv[1], use_cpu=True, report_to=[], max_steps=2,
                             save_steps=1, per_device_train_batch_size=2)
    trainer = protect(Trainer(model=model, args=args, train_dataset=Data()))
    try:
        trainer.train(resume_from_checkpoint=True)
        print(json.dumps({"trained": True}))
    except ckptguard.ForeignRun as exc:
        print(json.dumps({"foreign": str(exc)}))
    """
)


def test_a_trainer_pointed_at_another_live_runs_output_dir_is_refused(
    script: Path, tmp_path: Path
) -> None:
    """The integrations go through CheckpointManager, so they follow the same rule."""
    root = tmp_path / "out"
    a = Job(script, root, "A")
    try:
        assert a.ask("save 1000") == {"saved": 1000}
        trainer = tmp_path / "trainer.py"
        trainer.write_text(_TRAINER)
        proc = subprocess.run(
            [sys.executable, str(trainer), str(root)],
            capture_output=True,
            text=True,
            env=CHILD_ENV,
            timeout=300,
            check=False,
            start_new_session=True,  # another job
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        assert "foreign" in result, result
        assert a.hello["run"] in result["foreign"]
        assert a.ask("restore") == {"step": 1000, "tag": "A"}  # untouched
    finally:
        a.stop()
