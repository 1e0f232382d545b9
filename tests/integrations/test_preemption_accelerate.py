"""Saves on preemption for Accelerate: ``protect(accelerator, preemption=True)``.

Two gloo ranks under torchrun run the documented loop (``preemption_requested``,
``save_state``, ``exit_preempted``); rank 1 alone sends itself SIGTERM before the boundary
of step 3. Both ranks must save at step 3 (one committed ``checkpoint_0``), exit with
``PREEMPTED_EXIT_CODE`` and log the line.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import ckptguard
import driver_jobs

LOOP = textwrap.dedent(
    """
    import logging, os, signal, sys
    import torch
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from ckptguard.integrations.accelerate import exit_preempted, preemption_requested, protect

    out = sys.argv[1]
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.WARNING, format=f"rank{rank}: %(message)s")
    accelerator = protect(Accelerator(cpu=True, project_config=ProjectConfiguration(
        project_dir=out, automatic_checkpoint_naming=True)), preemption=True)
    set_seed(0)
    model = torch.nn.Linear(8, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = accelerator.prepare(model, opt)
    try:
        for step in range(1, 20):
            loss = model(torch.randn(4, 8)).pow(2).mean()
            accelerator.backward(loss)
            opt.step()
            opt.zero_grad()
            if step == 3 and rank == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            if preemption_requested(accelerator, step):
                exit_preempted(accelerator, accelerator.save_state())
    except SystemExit as done:
        sys.stdout.flush(); sys.stderr.flush(); logging.shutdown()
        os._exit(done.code)  # skip the shutdown with a gloo group up (hf_driver._exit)
    os._exit(0)
    """
)


def test_sigterm_to_one_rank_saves_state_on_every_rank_at_the_same_step(tmp_path: Path) -> None:
    script = tmp_path / "loop.py"
    script.write_text(LOOP)

    class Job(driver_jobs.Job):
        driver = script

    done = driver_jobs.finish(Job(tmp_path / "run", nproc=2))
    codes = re.findall(r"^\s*exitcode\s+:\s*(-?\d+)", done.stderr, re.MULTILINE)
    assert sorted(codes) == ["75", "75"], done.stderr[-4000:]
    path = tmp_path / "run" / "checkpoints" / "checkpoint_0"
    line = "preempted by {} at step 3: committed {}; exiting with code 75"
    assert "rank1: " + line.format("SIGTERM", path) in done.stderr, done.stderr[-4000:]
    assert "rank0: " + line.format("a peer's signal", path) in done.stderr
    assert sorted(p.name for p in path.parent.glob("checkpoint_*")) == ["checkpoint_0"]
    report = ckptguard.verify(path)
    assert report.ok, report.problems
