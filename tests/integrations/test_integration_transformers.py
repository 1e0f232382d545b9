"""The Hugging Face integration with real training runs: Trainer, TRL's SFTTrainer, torchrun.

Every run is a child process (``tests/integrations/hf_driver.py``, a tiny GPT-2 run that resumes by
itself from the newest checkpoint that verifies and writes ``OUT/final.json``: the final
step and a digest of every weight). A run killed inside ckptguard's commit protocol and
resumed must end with a ``final.json`` byte-identical to an uninterrupted run's.

The runs are independent of each other (a test compares them only at the end), so a module
fixture starts every job at once and runs three at a time in the background on this
machine's two cores; each test waits for the jobs it checks. Every child gets
``OMP_NUM_THREADS=1``: results then do not depend on how many threads torch picks.

A control shows what the protection is for: an unprotected Trainer resumes from a
half-written ``checkpoint-20`` and crashes; the protected one skips it and resumes
exactly.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

import ckptguard
from ckptguard._format.layout import RootLayout
from ckptguard.integrations.transformers import last_valid_checkpoint

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

DRIVER = Path(__file__).with_name("hf_driver.py")
CHECKPOINTS = ["checkpoint-10", "checkpoint-20", "checkpoint-30"]  # --steps 30 --save-steps 10
TIMEOUT = 280  # seconds for one child; a run takes 5-30 s on two busy cores
# The same environment for every child, so that runs are comparable byte for byte.
CHILD_ENV = {
    **os.environ,
    "PYTHONWARNINGS": "ignore",  # third-party deprecations are not these tests' subject
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
}
SEAL_2 = "seal.files_synced:2"  # the 2nd save, its files fsynced, no manifest yet
# A test's time includes waiting for the jobs queued before its own in the shared pool.
pytestmark = pytest.mark.timeout(900)
# (trainer, kill point, step the resumed run starts from)
KILLS = [
    ("trainer", SEAL_2, 10),
    ("sft", SEAL_2, 10),
    ("trainer", "commit.before_rename:3", 20),  # sealed, about to be renamed into place
]
# (trainer, save_on_each_node) under torchrun with 2 ranks on one node
TWO_RANKS = [("trainer", False), ("trainer", True), ("sft", False)]


@dataclass(frozen=True)
class Run:
    """One finished child process."""

    returncode: int
    stdout: str
    stderr: str

    @property
    def resumed_from(self) -> int | None:
        """The step the driver said it resumed from (None if it said nothing)."""
        found = re.search(r"resumed from step (\d+)", self.stdout)
        return None if found is None else int(found.group(1))

    def ok(self) -> Run:
        """Assert that the child exited with 0; returns self."""
        assert self.returncode == 0, self.stderr[-4000:]
        return self


@dataclass(frozen=True)
class Snapshot:
    """What an output dir held at one moment."""

    checkpoints: dict[str, bool]  # checkpoint-N -> whether it verifies
    staging: list[str]
    trash: list[str]
    quarantine: list[str]


@dataclass(frozen=True)
class Job:
    """A background job: its output dir and runs in order, each root before the last run."""

    out: Path
    runs: list[Run]
    before_last: list[Snapshot] = field(default_factory=list)


def _start(cmd: list[str]) -> subprocess.Popen[str]:
    """Start a child in its own process group, with the shared environment."""
    return subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=CHILD_ENV,
        start_new_session=True,
    )


def _finished(proc: subprocess.Popen[str]) -> Run:
    """Wait for ``proc`` and collect its output; a hung child is killed with its workers."""
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun's workers are in its group
        proc.communicate()
        raise
    return Run(proc.returncode, out, err)


def _free_port() -> int:
    """A TCP port that was free a moment ago (for torchrun's rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _torchrun_cmd(nproc: int, nnodes: int, node_rank: int, port: int) -> list[str]:
    """torchrun's command line up to the script (rendezvous on 127.0.0.1)."""
    return [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        f"--nnodes={nnodes}", f"--node_rank={node_rank}", "--master_addr=127.0.0.1",
        f"--master_port={port}",
    ]  # fmt: skip


def _solo(out: Path, *flags: str) -> list[Run]:
    """The driver in one process."""
    return [_finished(_start([sys.executable, str(DRIVER), str(out), *flags]))]


def _two_ranks(out: Path, *flags: str) -> list[Run]:
    """The driver as two ranks on one node (gloo), sharing one output dir."""
    cmd = _torchrun_cmd(2, 1, 0, _free_port())
    return [_finished(_start([*cmd, str(DRIVER), str(out), *flags]))]


def _two_nodes(out: Path, *flags: str) -> list[Run]:
    """The driver on two simulated nodes (two torchruns, --nnodes=2), in out/node<N>."""
    port = _free_port()
    procs = [
        _start([*_torchrun_cmd(1, 2, node, port), str(DRIVER), str(out / "node{node}"), *flags])
        for node in (0, 1)
    ]
    return [_finished(proc) for proc in procs]


def _roots(out: Path, launch: Callable[..., list[Run]]) -> list[Path]:
    """The checkpoint roots that ``launch`` writes under ``out``."""
    return [out / "node0", out / "node1"] if launch is _two_nodes else [out]


def _snapshot(out: Path) -> Snapshot:
    """Verify every checkpoint of ``out`` and list ckptguard's work dirs."""
    layout = RootLayout(str(out))

    def listing(path: str) -> list[str]:
        return sorted(os.listdir(path)) if os.path.isdir(path) else []

    return Snapshot(
        checkpoints={
            p.name: ckptguard.verify(p).ok
            for p in sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        },
        staging=listing(layout.staging),
        trash=listing(layout.trash),
        quarantine=listing(layout.quarantine),
    )


def _all_valid(*names: str) -> dict[str, bool]:
    """The ``Snapshot.checkpoints`` of a dir holding exactly ``names``, all verifying."""
    return dict.fromkeys(names, True)


def _quarantined(snap: Snapshot) -> list[str]:
    """The checkpoint names set aside in quarantine (without their ``.json`` notes)."""
    return [q.split(".")[0] for q in snap.quarantine if not q.endswith(".json")]


def _flip_byte(path: Path) -> None:
    """Corrupt ``path`` in place without changing its size (only the checksum can tell)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _crash_during_save_of_20(out: Path) -> None:
    """Make a finished run's dir look as if the Trainer had died while writing checkpoint-20.

    ``model.safetensors`` is cut in half; checkpoint-30 (written after the crash) and the
    result files are removed.
    """
    weights = out / "checkpoint-20" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    shutil.rmtree(out / "checkpoint-30")
    for result in out.glob("final*.json"):
        result.unlink()


def _same_result(out: Path, reference: Path) -> None:
    """Assert that two runs ended with byte-identical ``final.json`` files."""
    got = (out / "final.json").read_bytes()
    want = (reference / "final.json").read_bytes()
    assert json.loads(got)["step"] == json.loads(want)["step"] == 30
    assert got == want, "the resumed run's weights differ from the uninterrupted run's"


def _assert_complete(checkpoint: Path, *names: str) -> None:
    """Assert that ``checkpoint`` verifies and its manifest lists ``names``."""
    report = ckptguard.verify(checkpoint)
    assert report.ok, report.problems
    assert report.manifest is not None
    files = {f.path for f in report.manifest.files}
    assert set(names) <= files, sorted(files)


# --- the jobs -----------------------------------------------------------------------------


def _uninterrupted(launch: Callable[..., list[Run]], out: Path, *flags: str) -> Job:
    """One run that nothing interrupts."""
    return Job(out, launch(out, *flags))


def _kill_then_resume(
    launch: Callable[..., list[Run]], out: Path, kill_at: str, *flags: str
) -> Job:
    """A run that SIGKILLs itself at ``kill_at``, then the same run again (it resumes)."""
    killed = launch(out, *flags, "--kill-at", kill_at)
    after_kill = [_snapshot(root) for root in _roots(out, launch)]
    return Job(out, [*killed, *launch(out, *flags)], after_kill)


def _unprotected_crash(out: Path) -> Job:
    """Control: an unprotected run, its save of 20 "crashed", then resumed unprotected."""
    (first,) = _solo(out, "--unprotected")
    _crash_during_save_of_20(out)
    return Job(out, [first, *_solo(out, "--unprotected")])


def _adopted(out: Path) -> Job:
    """A run written without ckptguard, its save of 20 cut, then resumed with protect()."""
    (first,) = _solo(out, "--unprotected")
    _crash_during_save_of_20(out)
    before = _snapshot(out)
    return Job(out, [first, *_solo(out)], [before])


def _copy_of(reference: Future[Job], out: Path) -> None:
    """Copy the finished reference run's dir to ``out``, without its result files."""
    shutil.copytree(reference.result().out, out)
    for result in out.glob("final*.json"):
        result.unlink()


def _protected_crash(out: Path, reference: Future[Job]) -> Job:
    """The control's surgery on a copy of the protected reference, then a resume."""
    _copy_of(reference, out)
    _crash_during_save_of_20(out)
    before = _snapshot(out)
    return Job(out, _solo(out), [before])


def _newest_corrupt(out: Path, reference: Future[Job]) -> Job:
    """A copy of the reference whose checkpoint-30 is corrupt, trained on to step 40."""
    _copy_of(reference, out)
    _flip_byte(out / "checkpoint-30" / "model.safetensors")
    before = _snapshot(out)
    return Job(out, _solo(out, "--steps", "40"), [before])


# One child, one JSON line: install()/uninstall(), and the two resumes that must be refused.
PROBE = """
import json, sys, warnings
from pathlib import Path
warnings.filterwarnings("ignore")
from datasets import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
import ckptguard
from ckptguard.integrations.transformers import install, protect, uninstall

out = Path(sys.argv[1])

def trainer(name, cls=Trainer):
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=97, n_positions=16, n_embd=32, n_layer=1, n_head=2)
    )
    data = Dataset.from_dict({"input_ids": [[1] * 16] * 8, "labels": [[1] * 16] * 8})
    args = TrainingArguments(
        output_dir=str(out / name), max_steps=2, save_steps=1, report_to=[], use_cpu=True,
        disable_tqdm=True,
    )
    return cls(model=model, args=args, train_dataset=data)

def protected(t):
    return getattr(t, "_ckptguard_guard", None) is not None

def failure(t, resume):
    try:
        protect(t).train(resume_from_checkpoint=resume)
    except Exception as exc:
        return {
            "type": type(exc).__name__,
            "bases": [c.__name__ for c in type(exc).__mro__],
            "message": str(exc),
            "global_step": t.state.global_step,
            "saved": sorted(p.name for p in Path(t.args.output_dir).glob("checkpoint-*")),
        }
    return None

report = {}
install()
install()  # twice is harmless
class Sub(Trainer):
    pass
a, sub = trainer("a"), trainer("sub", Sub)
uninstall()
b = trainer("b")
report["install"] = {
    "installed": protected(a), "subclass": protected(sub), "after_uninstall": protected(b),
    "first_still_protected": protected(a),
}

corrupt = out / "elsewhere" / "checkpoint-5"
with ckptguard.atomic_checkpoint(corrupt) as staging:
    (staging / "model.safetensors").write_bytes(bytes(range(256)) * 4)
data = bytearray((corrupt / "model.safetensors").read_bytes())
data[100] ^= 0xFF
(corrupt / "model.safetensors").write_bytes(bytes(data))
report["corrupt"] = failure(trainer("c"), str(corrupt))
report["empty"] = failure(trainer("empty"), True)
print(json.dumps(report))
"""


def _probe(out: Path) -> Job:
    """install()/uninstall() and the two refused resumes, in one child (one import)."""
    out.mkdir()
    return Job(out, [_finished(_start([sys.executable, "-c", PROBE, str(out)]))])


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Future[Job]]]:
    """Every run of this module, started at once, three at a time in the background.

    The longest chains go first. The jobs that copy the Trainer's reference come last: by
    the time a worker picks one up, the reference has started, so waiting for it cannot
    block the pool.
    """
    base = tmp_path_factory.mktemp("hf")
    pool = ThreadPoolExecutor(max_workers=3, thread_name_prefix="hf-job")
    started: dict[str, Future[Job]] = {}

    def submit(name: str, fn: Callable[..., Job], *args: Any) -> None:
        started[name] = pool.submit(fn, *args)

    submit(
        "kill-two-nodes",
        _kill_then_resume,
        _two_nodes,
        base / "kill-two-nodes",
        SEAL_2,
        "--save-on-each-node",
    )
    submit("reference-two-nodes", _uninterrupted, _two_nodes, base / "ref-two-nodes")
    for trainer, each_node in TWO_RANKS:
        name = f"kill-two-ranks-{trainer}-{each_node}"
        flags = ["--trainer", trainer] + (["--save-on-each-node"] if each_node else [])
        submit(name, _kill_then_resume, _two_ranks, base / name, SEAL_2, *flags)
    for trainer in ("trainer", "sft"):
        name = f"reference-two-ranks-{trainer}"
        submit(name, _uninterrupted, _two_ranks, base / name, "--trainer", trainer)
    for trainer in ("trainer", "sft"):
        submit(
            f"reference-{trainer}",
            _uninterrupted,
            _solo,
            base / f"ref-{trainer}",
            "--trainer",
            trainer,
        )
    for trainer, kill_at, _ in KILLS:
        name = f"kill-{trainer}-{kill_at}"
        submit(name, _kill_then_resume, _solo, base / name, kill_at, "--trainer", trainer)
    submit("unprotected-crash", _unprotected_crash, base / "unprotected")
    submit("adopted", _adopted, base / "adopted")
    submit("limit", _uninterrupted, _solo, base / "limit", "--limit", "2", "--show-limit")
    submit("best", _uninterrupted, _solo, base / "best", "--limit", "1", "--best", "max")
    submit("probe", _probe, base / "probe")
    submit("late-writes", _uninterrupted, _solo, base / "late-writes", "--late-writes")
    reference = started["reference-trainer"]
    submit("protected-crash", _protected_crash, base / "protected", reference)
    submit("newest-corrupt", _newest_corrupt, base / "newest-corrupt", reference)
    yield started
    pool.shutdown(wait=True, cancel_futures=True)


def _done(jobs: dict[str, Future[Job]], name: str) -> Job:
    """Wait for the job ``name`` (a hung child times out in ``_finished``)."""
    return jobs[name].result()


# --- one process, killed inside the commit protocol ---------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("trainer", "kill_at", "resumed_from"), KILLS)
def test_killed_mid_save_resumes_from_the_last_commit_exactly(
    jobs: dict[str, Future[Job]], trainer: str, kill_at: str, resumed_from: int
) -> None:
    job = _done(jobs, f"kill-{trainer}-{kill_at}")
    killed, resumed = job.runs
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-4000:]  # the point was reached
    (after_kill,) = job.before_last
    committed = [f"checkpoint-{s}" for s in range(10, resumed_from + 1, 10)]
    assert after_kill.checkpoints == _all_valid(*committed)  # the interrupted one is absent
    assert after_kill.staging  # the killed save's leftovers

    resumed.ok()
    assert resumed.resumed_from == resumed_from
    _same_result(job.out, _done(jobs, f"reference-{trainer}").out)
    done = _snapshot(job.out)
    assert done.checkpoints == _all_valid(*CHECKPOINTS)
    assert (done.staging, done.trash, done.quarantine) == ([], [], [])  # stale staging cleaned


# --- two ranks on one node, two simulated nodes --------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("trainer", "save_on_each_node"), TWO_RANKS)
def test_two_ranks_killed_mid_save_resume_exactly(
    jobs: dict[str, Future[Job]], trainer: str, save_on_each_node: bool
) -> None:
    job = _done(jobs, f"kill-two-ranks-{trainer}-{save_on_each_node}")
    killed, resumed = job.runs
    # Only the committing rank reaches the seal points; torchrun then stops the other.
    assert killed.returncode != 0
    assert "Signal 9" in killed.stderr or "SIGKILL" in killed.stderr, killed.stderr[-4000:]
    (after_kill,) = job.before_last
    assert after_kill.checkpoints == _all_valid("checkpoint-10")
    assert after_kill.staging  # the killed save's leftovers

    resumed.ok()
    assert resumed.resumed_from == 10
    _same_result(job.out, _done(jobs, f"reference-two-ranks-{trainer}").out)
    done = _snapshot(job.out)
    assert done.checkpoints == _all_valid(*CHECKPOINTS)
    assert (done.staging, done.trash) == ([], [])
    _assert_complete(
        job.out / "checkpoint-30", "model.safetensors", "rng_state_0.pth", "rng_state_1.pth"
    )


def _assert_every_node_complete(out: Path) -> None:
    """Each node's checkpoints verify and hold the weights, the config and its RNG state.

    transformers 5.x writes the weights on global rank 0 only; ckptguard has each node's
    writer save them too, or resuming on node 1 would find no model.
    """
    for node in (0, 1):
        root = out / f"node{node}"
        snap = _snapshot(root)
        assert snap.checkpoints == _all_valid(*CHECKPOINTS), node
        assert (snap.staging, snap.trash) == ([], []), node
        for name in CHECKPOINTS:
            _assert_complete(
                root / name, "model.safetensors", "config.json", f"rng_state_{node}.pth"
            )


@pytest.mark.slow
def test_two_nodes_with_node_local_dirs_each_get_complete_checkpoints(
    jobs: dict[str, Future[Job]],
) -> None:
    """save_on_each_node=False; the killed-and-resumed job below covers True."""
    job = _done(jobs, "reference-two-nodes")
    for run in job.runs:
        run.ok()
    _assert_every_node_complete(job.out)


@pytest.mark.slow
def test_two_nodes_killed_mid_save_resume_exactly(jobs: dict[str, Future[Job]]) -> None:
    """save_on_each_node=True, compared with the reference run without it."""
    job = _done(jobs, "kill-two-nodes")
    killed0, _killed1, resumed0, resumed1 = job.runs
    # Node 0 kills itself; node 1 kills itself too or fails with it: either is fine.
    assert killed0.returncode != 0
    for node, after_kill in enumerate(job.before_last):
        assert after_kill.checkpoints == _all_valid("checkpoint-10"), node

    resumed0.ok()
    resumed1.ok()
    assert resumed0.resumed_from == 10
    _same_result(job.out / "node0", _done(jobs, "reference-two-nodes").out / "node0")
    _assert_every_node_complete(job.out)


# --- retention ----------------------------------------------------------------------------


@pytest.mark.slow
def test_save_total_limit_is_enforced_by_ckptguard(jobs: dict[str, Future[Job]]) -> None:
    job = _done(jobs, "limit")
    (run,) = job.runs
    run.ok()
    # While training, ckptguard holds the limit: the Trainer's own rmtree rotation never
    # runs; the user's arguments are left as they were before and after.
    assert "save_total_limit after protect: 2" in run.stdout
    assert "save_total_limit while training: None" in run.stdout
    assert "save_total_limit after training: 2" in run.stdout
    done = _snapshot(job.out)
    assert done.checkpoints == _all_valid("checkpoint-20", "checkpoint-30")
    assert (done.staging, done.trash) == ([], [])


@pytest.mark.slow
def test_the_best_checkpoint_survives_retention_under_its_final_name(
    jobs: dict[str, Future[Job]],
) -> None:
    """save_total_limit=1 + load_best_model_at_end; "best" is the highest eval_loss (step 10)."""
    job = _done(jobs, "best")
    (run,) = job.runs
    run.ok()
    done = _snapshot(job.out)
    assert done.checkpoints == _all_valid("checkpoint-10", "checkpoint-30")  # best + newest
    assert (done.staging, done.trash) == ([], [])
    for name in ("checkpoint-10", "checkpoint-30"):
        state: dict[str, Any] = json.loads((job.out / name / "trainer_state.json").read_text())
        # recorded under the final name, never the staging dir it was written in
        assert state["best_model_checkpoint"] == str(job.out / "checkpoint-10"), name


# --- choosing what to resume from ---------------------------------------------------------


@pytest.mark.slow
def test_a_corrupt_newest_checkpoint_is_skipped_on_resume(jobs: dict[str, Future[Job]]) -> None:
    job = _done(jobs, "newest-corrupt")
    (before,) = job.before_last
    assert before.checkpoints == {**_all_valid(*CHECKPOINTS), "checkpoint-30": False}
    (resumed,) = job.runs
    resumed.ok()
    assert resumed.resumed_from == 20
    assert json.loads((job.out / "final.json").read_text())["step"] == 40
    done = _snapshot(job.out)
    assert done.checkpoints == _all_valid(*CHECKPOINTS, "checkpoint-40")
    assert _quarantined(done) == ["checkpoint-30"]  # set aside when the new one took its name


@pytest.mark.slow
def test_a_run_started_without_ckptguard_resumes_from_its_newest_complete_checkpoint(
    jobs: dict[str, Future[Job]],
) -> None:
    """Adoption: no manifests to check, so a structural check picks what to resume from.

    checkpoint-20 is cut in half (its safetensors header points past the end): skipped;
    checkpoint-10 looks complete: resumed from, with a warning that it was not checksummed,
    and the run ends bit-identical to the uninterrupted one.
    """
    job = _done(jobs, "adopted")
    (before,) = job.before_last
    assert before.checkpoints == {"checkpoint-10": False, "checkpoint-20": False}
    _, resumed = job.runs
    resumed.ok()
    assert resumed.resumed_from == 10
    assert "checkpoint-20 (written without ckptguard)" in resumed.stderr
    assert "checkpoint-10 was written without ckptguard (no manifest)" in resumed.stderr
    assert "NOT checksummed" in resumed.stderr
    _same_result(job.out, _done(jobs, "reference-trainer").out)


@pytest.fixture(scope="module")
def probe(jobs: dict[str, Future[Job]]) -> dict[str, Any]:
    """The JSON report of the probe child (install/uninstall, refused resumes)."""
    (run,) = _done(jobs, "probe").runs
    run.ok()
    report: dict[str, Any] = json.loads(run.stdout.strip().splitlines()[-1])
    return report


@pytest.mark.slow
def test_an_explicit_corrupt_resume_path_is_refused_before_loading(probe: dict[str, Any]) -> None:
    failure = probe["corrupt"]
    assert failure is not None, "resuming from a corrupt checkpoint did not fail"
    assert failure["type"] == "CorruptCheckpoint"
    assert "ValueError" in failure["bases"]
    assert "refusing to resume from" in failure["message"]
    assert "model.safetensors" in failure["message"]
    assert failure["global_step"] == 0  # nothing trained ...
    assert failure["saved"] == []  # ... and nothing saved


@pytest.mark.slow
def test_resume_true_without_checkpoints_says_there_is_nothing_to_resume_from(
    probe: dict[str, Any],
) -> None:
    failure = probe["empty"]
    assert failure is not None
    assert failure["type"] == "NoValidCheckpoint"
    assert "FileNotFoundError" in failure["bases"]
    assert "nothing to resume from" in failure["message"]
    assert failure["saved"] == []


@pytest.mark.slow
def test_install_protects_new_trainers_until_uninstall(probe: dict[str, Any]) -> None:
    assert probe["install"] == {
        "installed": True,
        "subclass": True,
        "after_uninstall": False,
        "first_still_protected": True,
    }


# --- the control: what an unprotected Trainer does with a half-written checkpoint ---------


@pytest.mark.slow
def test_control_unprotected_trainer_resumes_from_a_half_written_checkpoint_and_fails(
    jobs: dict[str, Future[Job]],
) -> None:
    """The upstream failure mode: get_last_checkpoint picks the highest number, valid or not."""
    first, resumed = _done(jobs, "unprotected-crash").runs
    first.ok()
    assert resumed.resumed_from == 20
    assert resumed.returncode != 0
    assert "safetensor" in resumed.stderr.lower(), resumed.stderr[-4000:]


@pytest.mark.slow
def test_protected_trainer_skips_a_half_written_checkpoint_and_resumes_exactly(
    jobs: dict[str, Future[Job]],
) -> None:
    job = _done(jobs, "protected-crash")
    (before,) = job.before_last
    assert before.checkpoints == {"checkpoint-10": True, "checkpoint-20": False}
    (resumed,) = job.runs
    resumed.ok()
    assert resumed.resumed_from == 10
    _same_result(job.out, _done(jobs, "reference-trainer").out)
    done = _snapshot(job.out)
    assert done.checkpoints == _all_valid(*CHECKPOINTS)
    assert _quarantined(done) == ["checkpoint-20"]  # set aside when the new one took its name


# --- in process: no transformers import needed ---------------------------------------------


def _commit(path: Path, payload: bytes) -> None:
    """Commit a checkpoint at ``path`` holding one file."""
    with ckptguard.atomic_checkpoint(path) as staging:
        (staging / "model.safetensors").write_bytes(payload)


def test_last_valid_checkpoint_skips_half_written_and_corrupt_ones(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "out"
    for step in (9, 20, 30):
        _commit(root / f"checkpoint-{step}", bytes([step]) * 512)
    _flip_byte(root / "checkpoint-30" / "model.safetensors")
    half = root / "checkpoint-40"  # what the Trainer leaves when killed mid-save
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"\0" * 100)
    (root / "runs").mkdir()  # not a checkpoint

    with caplog.at_level(logging.WARNING, logger="ckptguard.integrations.transformers"):
        # numeric order: checkpoint-9 sorts after checkpoint-20 as text
        assert last_valid_checkpoint(root) == str(root / "checkpoint-20")
    skipped = " ".join(r.getMessage() for r in caplog.records)
    assert "checkpoint-40" in skipped
    assert "checkpoint-30" in skipped

    assert last_valid_checkpoint(str(root)) == str(root / "checkpoint-20")
    _flip_byte(root / "checkpoint-20" / "model.safetensors")
    _flip_byte(root / "checkpoint-9" / "model.safetensors")
    assert last_valid_checkpoint(root) is None
    assert last_valid_checkpoint(tmp_path / "missing") is None
    (tmp_path / "empty").mkdir()
    assert last_valid_checkpoint(tmp_path / "empty") is None


@pytest.mark.slow
def test_files_on_save_callbacks_add_are_committed_with_the_checkpoint(
    jobs: dict[str, Future[Job]],
) -> None:
    """A callback writes checkpoint-N/merged/ after the commit: it is committed again."""
    job = _done(jobs, "late-writes")
    (run,) = job.runs
    run.ok()
    done = _snapshot(job.out)
    assert done.checkpoints == _all_valid(*CHECKPOINTS)  # not "extra file not in manifest"
    assert (done.staging, done.trash, done.quarantine) == ([], [], [])
    for step in (10, 20, 30):
        report = ckptguard.verify(job.out / f"checkpoint-{step}")
        assert report.manifest is not None
        assert "merged/extra.bin" in {f.path for f in report.manifest.files}
        extra = job.out / f"checkpoint-{step}" / "merged" / "extra.bin"
        assert extra.read_bytes() == bytes(range(256)) * step
