"""A tiny Hugging Face training run protected by ckptguard (Trainer or TRL's SFTTrainer).

    python tests/integrations/hf_driver.py OUT [--trainer trainer|sft] [--steps 30]
        [--save-steps 10] [--limit N] [--save-on-each-node] [--kill-at POINT:N] [--unprotected]
        [--best min|max] [--show-limit]

Resumes by itself from the newest checkpoint that verifies (prints ``resumed from step N``)
and writes ``OUT/final.json``: the step and a digest of every weight, so that an
interrupted-and-resumed run can be compared with an uninterrupted one. ``OUT`` may contain
``{node}`` (torchrun's node rank) to give each simulated node its own output dir.
``--kill-at seal.files_synced:2`` SIGKILLs the process the 2nd time it reaches that fault
point (its 2nd save). ``--best min|max`` evaluates at every save and keeps the best
model by ``eval_loss`` (``max``: the highest loss is "best", so that the best checkpoint is
an old one); ``--show-limit`` prints ``save_total_limit`` after protect, while training and
after training; ``--late-writes`` adds a callback that writes ``checkpoint-N/merged/``
from ``on_save``, after the commit (as TRL's MergeModelCallback does). No downloads: the
model is a GPT-2 built from a config with random weights, the data integers.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from typing import Any

import xxhash

warnings.filterwarnings("ignore")  # third-party deprecations are not this test's subject
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402 - after the environment above
from transformers import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from ckptguard.integrations.transformers import (  # noqa: E402
    last_valid_checkpoint,
    protect,
)
from driver_faults import fail_at, kill_at  # noqa: E402

VOCAB = 97
SEQ = 16


def _tokenizer() -> Any:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    pad, eos = "<pad>", "<eos>"
    vocab = {f"w{i}": i for i in range(VOCAB - 2)} | {pad: VOCAB - 2, eos: VOCAB - 1}
    tok = Tokenizer(WordLevel(vocab, unk_token=pad))
    tok.pre_tokenizer = WhitespaceSplit()
    fast: Any = PreTrainedTokenizerFast
    return fast(tokenizer_object=tok, pad_token=pad, eos_token=eos)


def _rows(n: int = 256) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, VOCAB - 2, (n, SEQ), generator=g).tolist()
    return [{"input_ids": row, "labels": row} for row in ids]


class _Rows(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Plain torch data for the Trainer: no ``datasets`` needed (old transformers too)."""

    def __init__(self, n: int = 256) -> None:
        self.rows = _rows(n)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: torch.tensor(v) for k, v in self.rows[i].items()}


def _digest(model: Any) -> dict[str, str]:
    return {
        k: xxhash.xxh3_64_hexdigest(v.detach().cpu().contiguous().numpy().tobytes())
        for k, v in sorted(model.state_dict().items())
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--trainer", choices=["trainer", "sft"], default="trainer")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--save-steps", type=int, default=10)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--save-on-each-node", action="store_true")
    ap.add_argument("--kill-at", default=None)
    ap.add_argument("--unprotected", action="store_true")
    ap.add_argument("--best", choices=["min", "max"], default=None)
    ap.add_argument("--show-limit", action="store_true")
    ap.add_argument("--late-writes", action="store_true")
    # Async saves: protect(trainer, async_save=True). --scramble: after the first save
    # returns, the next step's start records the weights and Adam moments, then changes
    # them in place while the background write is held back (until then); the
    # checkpoint must hold the recorded values (OUT/scrambled.json).
    ap.add_argument("--async", dest="async_save", action="store_true")
    ap.add_argument("--scramble", action="store_true")
    ap.add_argument("--fail-at", default=None)  # POINT:N raises ENOSPC there
    # Object stores: --output URL (checkpoints there; OUT keeps final.json), or --mirror URL
    # (checkpoints in OUT, mirrored); --cache DIR; --fresh: no resume (else always resume).
    ap.add_argument("--output", default=None)
    ap.add_argument("--mirror", default=None)
    ap.add_argument("--cache", default=None)
    ap.add_argument("--keep-last", type=int, default=None)
    ap.add_argument("--fresh", action="store_true")
    # After training, every rank chooses the checkpoint it would resume from (the path the
    # Trainer would be given) and prints it: the multi-rank choice without a second launch.
    ap.add_argument("--check-resume", action="store_true")
    opts = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = opts.out.replace("{node}", os.environ.get("GROUP_RANK", "0"))
    rank = int(os.environ.get("RANK", "0"))
    if opts.kill_at:
        kill_at(opts.kill_at)
    if opts.fail_at:
        fail_at(opts.fail_at)

    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=1, n_head=2)
    )
    remote = opts.output is not None or opts.mirror is not None
    common: dict[str, Any] = {
        "output_dir": opts.output or out,
        "max_steps": opts.steps,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-3,
        "save_strategy": "steps",
        "save_steps": opts.save_steps,
        "save_total_limit": opts.limit,
        "save_on_each_node": opts.save_on_each_node,
        "logging_steps": 5,
        "report_to": [],
        "use_cpu": True,
        "seed": 0,
        "data_seed": 0,
        "disable_tqdm": True,
        "ddp_backend": "gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
    }
    if opts.best:
        common |= {
            "eval_strategy": "steps",
            "eval_steps": opts.save_steps,
            "per_device_eval_batch_size": 8,
            "load_best_model_at_end": True,
            "metric_for_best_model": "eval_loss",
            "greater_is_better": opts.best == "max",
        }
    if opts.trainer == "sft":
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        trainer: Any = SFTTrainer(
            model=model,
            args=SFTConfig(**common, max_length=SEQ, packing=False),
            train_dataset=Dataset.from_list(_rows()),
            eval_dataset=Dataset.from_list(_rows(32)) if opts.best else None,
            processing_class=_tokenizer(),
        )
    else:
        trainer = Trainer(
            model=model,
            args=TrainingArguments(**common),
            train_dataset=_Rows(),
            eval_dataset=_Rows(32) if opts.best else None,
        )
    if remote:
        protect(trainer, mirror=opts.mirror, cache_dir=opts.cache, keep_last=opts.keep_last,
                async_save=opts.async_save)  # fmt: skip

        class ShowStart(TrainerCallback):
            def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                del args, control, kwargs
                if state.is_world_process_zero:
                    print(f"resumed from step {state.global_step}", flush=True)

        trainer.add_callback(ShowStart())
    elif not opts.unprotected:
        protect(trainer, async_save=opts.async_save)
    if opts.scramble:
        _scramble_after_first_save(trainer, out)
    if opts.show_limit and rank == 0:
        print(f"save_total_limit after protect: {trainer.args.save_total_limit}", flush=True)

        class ShowLimit(TrainerCallback):
            def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                del state, control, kwargs
                print(f"save_total_limit while training: {args.save_total_limit}", flush=True)

        trainer.add_callback(ShowLimit())

    if opts.late_writes:

        class MergeLike(TrainerCallback):
            """Writes into checkpoint-N from on_save, as TRL's MergeModelCallback does."""

            def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                del control, kwargs
                if state.is_world_process_zero:
                    merged = os.path.join(
                        args.output_dir, f"checkpoint-{state.global_step}", "merged"
                    )
                    os.makedirs(merged, exist_ok=True)
                    with open(os.path.join(merged, "extra.bin"), "wb") as f:
                        f.write(bytes(range(256)) * state.global_step)

        trainer.add_callback(MergeLike())

    resume = last_valid_checkpoint(out) if not opts.unprotected and not remote else None
    if remote:
        os.makedirs(out, exist_ok=True)
        trainer.train(resume_from_checkpoint=None if opts.fresh else True)
        if opts.check_resume:
            from ckptguard.integrations import transformers as hf

            chosen = hf._resolve_resume(trainer, getattr(trainer, hf._ATTR), True)
            print(f"rank {rank} would resume from {chosen}", flush=True)
        if rank == 0:
            with open(os.path.join(out, "final.json"), "w") as f:
                result = {"step": int(trainer.state.global_step), "weights": _digest(trainer.model)}
                json.dump(result, f, sort_keys=True)
        return 0
    if opts.unprotected:
        from transformers.trainer_utils import get_last_checkpoint

        last: Any = get_last_checkpoint
        resume = last(out) if os.path.isdir(out) else None
    step = 0 if resume is None else int(resume.rsplit("-", 1)[1])
    if rank == 0:
        print(f"resumed from step {step}", flush=True)
    trainer.train(resume_from_checkpoint=True if resume else None)
    if opts.show_limit and rank == 0:
        print(f"save_total_limit after training: {trainer.args.save_total_limit}", flush=True)

    if rank == 0 or opts.save_on_each_node:
        result = {
            "step": int(trainer.state.global_step),
            "weights": _digest(trainer.model),
            "checkpoints": sorted(n for n in os.listdir(out) if n.startswith("checkpoint-")),
        }
        with open(os.path.join(out, f"final.rank{rank}.json"), "w") as f:
            json.dump(result, f, sort_keys=True)
        if rank == 0:
            with open(os.path.join(out, "final.json"), "w") as f:
                json.dump({"step": result["step"], "weights": result["weights"]}, f, sort_keys=True)
    return 0


def _scramble_after_first_save(trainer: Any, out: str) -> None:
    """See --scramble: the background's first deferred write waits for the change."""
    import threading

    from ckptguard._storage import faults

    changed = threading.Event()
    previous = faults.set_fault_hook(None)

    def hold(name: str) -> None:
        if name == "deferred.write" and not changed.wait(120):
            raise RuntimeError("the training thread never changed the weights")
        if previous is not None:
            previous(name)

    faults.set_fault_hook(hold)

    class Scramble(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            del args, control, kwargs
            if changed.is_set() or state.global_step == 0 or not os.listdir(out):
                return
            record = {"step": int(state.global_step), "weights": _digest(trainer.model)}
            moments = trainer.optimizer.state_dict()["state"]
            record["moments"] = {
                str(k): xxhash.xxh3_64_hexdigest(v["exp_avg"].numpy().tobytes())
                for k, v in moments.items()
            }
            with torch.no_grad():
                for p in trainer.model.parameters():
                    p.add_(1.0)
                for v in moments.values():
                    v["exp_avg"].add_(1.0)
            with open(os.path.join(out, "scrambled.json"), "w") as f:
                json.dump(record, f, sort_keys=True)
            changed.set()

    trainer.add_callback(Scramble())


def _exit(code: int) -> None:
    """Exit without the interpreter's shutdown when a gloo process group is up.

    torch 2.13's gloo worker thread can release the Trainer's last ``all_gather`` work (it
    holds Python tensors) while the main thread runs ``Py_FinalizeEx``; taking the GIL then
    ends the worker thread inside a noexcept destructor, and the process aborts with
    "terminate called without an active exception" after a successful run (core dump:
    ``AsyncAllgatherWork::~AsyncAllgatherWork`` <- ``ProcessGroupGloo::runLoop``; 2 of 10
    two-rank runs here). ``destroy_process_group()`` aborted here too. Everything this
    driver writes is closed by now, and ckptguard commits synchronously, so nothing is lost
    by skipping the shutdown.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    _exit(main())
