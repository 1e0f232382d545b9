"""A tiny protected Trainer run that a preemption signal stops (``protect(trainer)``).

    python tests/integrations/preempt_hf_driver.py OUT [--steps 12] [--save-steps 100]
        [--signal-at STEP] [--signal-rank R] [--no-preemption] [--local-only]

The model and data are ``hf_driver.py``'s. It resumes from the newest checkpoint that
verifies (prints ``resumed from step N``). ``--signal-at K``: rank ``--signal-rank`` sends
itself SIGTERM in ``on_step_end`` of step K, before ckptguard's callback asks the ranks.
``--no-preemption``: ``protect(trainer, preemption=False)``. ``--local-only`` (the
control): the ranks do not vote; each acts on its own signal alone. At the end rank 0
writes ``OUT/final.json`` (step and a digest of every weight).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from ckptguard.integrations.transformers import last_valid_checkpoint, protect
from hf_driver import SEQ, VOCAB, _digest, _exit, _Rows  # also sets up the environment


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--save-steps", type=int, default=100)
    ap.add_argument("--signal-at", type=int, default=None)
    ap.add_argument("--signal-rank", type=int, default=0)
    ap.add_argument("--no-preemption", action="store_true")
    ap.add_argument("--local-only", action="store_true")
    ap.add_argument("--async", dest="async_save", action="store_true")
    opts = ap.parse_args()
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.WARNING, format=f"rank{rank}: %(message)s")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=1, n_head=2)
    )
    args = TrainingArguments(
        output_dir=opts.out,
        max_steps=opts.steps,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        save_strategy="steps",
        save_steps=opts.save_steps,
        logging_steps=5,
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
    )
    trainer = Trainer(model=model, args=args, train_dataset=_Rows())

    class Preempt(TrainerCallback):  # added before protect(): runs before ckptguard's
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            del args, control, kwargs
            if state.global_step == opts.signal_at and rank == opts.signal_rank:
                os.kill(os.getpid(), signal.SIGTERM)

    trainer.add_callback(Preempt())
    protect(trainer, preemption=not opts.no_preemption, async_save=opts.async_save)
    if opts.local_only:  # the control: no vote, each rank its own signal
        from ckptguard._manager.preemption import Agreement

        def local(_self: Agreement, _coordinator: object, flag: bool) -> bool:
            return flag

        setattr(Agreement, "_any", local)  # noqa: B010 - mypy forbids assigning a method
    resume = last_valid_checkpoint(opts.out)
    if rank == 0:
        step = 0 if resume is None else int(resume.rsplit("-", 1)[1])
        print(f"resumed from step {step}", flush=True)
    trainer.train(resume_from_checkpoint=True if resume else None)
    if rank == 0:
        with open(os.path.join(opts.out, "final.json"), "w") as f:
            result = {"step": int(trainer.state.global_step), "weights": _digest(trainer.model)}
            json.dump(result, f, sort_keys=True)
    return 0


if __name__ == "__main__":
    try:
        _exit(main())
    except SystemExit as done:  # protect()'s exit after a preemption save
        _exit(done.code if isinstance(done.code, int) else 1)
