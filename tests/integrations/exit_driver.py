"""A tiny protected Trainer run that ends as a user's script does: through Python's shutdown.

    python -m torch.distributed.run --nproc_per_node 2 ... tests/integrations/exit_driver.py OUT
        [--steps 20] [--save-steps 5] [--unprotected] [--destroy] [--no-settle]

Unlike ``hf_driver.py`` (which skips the interpreter's shutdown once a gloo group is up),
this driver returns from ``main()`` and lets Python finalize, with the process group
still up (``--destroy``: destroyed first, as torch's documentation asks; DDP still holds
it). It resumes by itself from the newest checkpoint that verifies, so the second run in
``OUT`` is a resume. ``--no-settle`` is the control: ckptguard's exit hook is removed
after training (see ``ckptguard/_coordination/distributed.py``).
No downloads: a GPT-2 with random weights from a config, integer data.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

warnings.filterwarnings("ignore")  # third-party deprecations are not this test's subject
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402 - after the environment above
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402

from ckptguard._coordination import distributed  # noqa: E402
from ckptguard.integrations.transformers import last_valid_checkpoint, protect  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from hf_driver import SEQ, VOCAB, _Rows  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--save-steps", type=int, default=5)
    ap.add_argument("--unprotected", action="store_true")
    ap.add_argument("--destroy", action="store_true")
    ap.add_argument("--no-settle", action="store_true")
    opts = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rank = int(os.environ.get("RANK", "0"))
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=1, n_head=2)
    )
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
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
        ),
        train_dataset=_Rows(),
    )
    if opts.unprotected:
        from transformers.trainer_utils import get_last_checkpoint

        last: Any = get_last_checkpoint  # untyped upstream
        resume = last(opts.out) if os.path.isdir(opts.out) else None
    else:
        protect(trainer)
        resume = last_valid_checkpoint(opts.out)
    if rank == 0:
        step = 0 if resume is None else int(resume.rsplit("-", 1)[1])
        print(f"resumed from step {step}", flush=True)
    trainer.train(resume_from_checkpoint=resume)
    if opts.destroy and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if opts.no_settle:  # the control: exit without ckptguard's hook (registered by now)
        atexit.unregister(distributed._let_collective_threads_finish)
    if rank == 0:
        print(f"finished at step {trainer.state.global_step}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
