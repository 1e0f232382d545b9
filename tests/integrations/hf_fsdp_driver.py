"""A tiny Hugging Face Trainer run sharded on CPU (gloo), protected by ckptguard.

    torchrun --nproc_per_node=2 ... tests/integrations/hf_fsdp_driver.py OUT [--steps 6]
        [--save-steps 3] [--kill-at POINT:N] [--engine fsdp2|zero2|zero3] [--no-shim]

The Trainer shards a 2-block GPT-2 (random weights, built from a config: no downloads) with
Accelerate's FSDP2 (``fsdp_config={"fsdp_version": 2, ...}``, ``SHARDED_STATE_DICT``): each
checkpoint holds ``pytorch_model_fsdp_0/`` and ``optimizer_0/``, DCP directories that every
rank writes its shards into. The run resumes by itself from the newest checkpoint that
verifies (prints ``resumed from step N``); at the end every rank gathers the full weights
and rank 0 writes ``OUT/final.json``: the step, how many steps this process ran, the engine
that actually sharded the model (``ddp`` when the Trainer fell back to DDP) and a digest of
every weight.

Accelerate 1.15 does not enable FSDP on CPU: ``AcceleratorState.__init__`` (accelerate/
state.py, the ``elif self.distributed_type in [DistributedType.MULTI_GPU, ...]`` branch, line
986) only turns a ``fsdp_plugin`` into ``DistributedType.FSDP`` for accelerator device types;
with ``use_cpu=True`` the type stays ``MULTI_CPU``, the plugin is dropped without a word and
the Trainer trains with DDP. ``_lift_cpu_gate`` below sets the two attributes that branch
would have set (the FSDP type and the plugin), nothing else; everything after it (wrapping
with ``fully_shard``, ``save_fsdp_model``/``save_fsdp_optimizer``, loading on resume) is
Accelerate's and the Trainer's own code. ``--no-shim`` shows the fallback to DDP.

Without ``use_cpu=True`` the Trainer refuses: "Using fsdp only works in distributed training."
(transformers 5.24, trainer.py line 478: Accelerate's state is ``DistributedType.NO`` on a
machine without an accelerator).

``--engine zero2|zero3``: DeepSpeed ZeRO stage 2 or 3 (``deepspeed`` must be importable; its
CPU accelerator falls back to gloo without oneCCL). Each checkpoint holds DeepSpeed's
``global_step<N>/`` (every rank's ``zero_pp_rank_<R>_*`` files) and ``latest``. This path
needs no help on CPU: with ``use_cpu=True`` (gloo) Accelerate hands the model to DeepSpeed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import warnings
from typing import Any

import xxhash

warnings.filterwarnings("ignore")  # third-party deprecations are not this test's subject
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402 - after the environment above
from transformers import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from ckptguard.integrations.transformers import last_valid_checkpoint, protect  # noqa: E402
from driver_faults import kill_at  # noqa: E402
from hf_driver import SEQ, VOCAB, _Rows  # noqa: E402


def _lift_cpu_gate() -> None:
    """Let Accelerate's FSDP plugin take effect on CPU (see the module docstring)."""
    import accelerate.state
    from accelerate.utils import DistributedType

    original = accelerate.state.AcceleratorState.__init__

    def init(self: Any, *args: Any, fsdp_plugin: Any = None, **kwargs: Any) -> None:
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    accelerate.state.AcceleratorState.__init__ = init


def _digest(tensor: torch.Tensor) -> str:
    return xxhash.xxh3_64_hexdigest(tensor.detach().cpu().contiguous().numpy().tobytes())


def _full_digest(model: Any, engine: str) -> dict[str, str]:
    """A digest of every full weight (a collective: every rank gathers every shard)."""
    if engine == "fsdp2":
        from torch.distributed.tensor import DTensor

        return {
            name: _digest(value.full_tensor() if isinstance(value, DTensor) else value)
            for name, value in sorted(model.state_dict().items())
        }
    # An optional package, not in the dev environment: imported by name (no stubs needed).
    deepspeed = importlib.import_module("deepspeed")
    # ZeRO-3 partitions the parameters; with ZeRO-2 this gathers nothing.

    params = dict(model.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {name: _digest(p) for name, p in sorted(params.items())}


def _sharding(engine: str) -> dict[str, Any]:
    if engine == "fsdp2":
        return {
            "fsdp": True,
            "fsdp_config": {
                "fsdp_version": 2,
                "transformer_layer_cls_to_wrap": ["GPT2Block"],
                "state_dict_type": "SHARDED_STATE_DICT",
            },
            "use_cpu": True,
        }
    zero = {
        "zero_optimization": {"stage": int(engine[-1])},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "zero_allow_untested_optimizer": True,  # the Trainer's torch AdamW
    }
    return {"deepspeed": zero, "use_cpu": True}


class _CountSteps(TrainerCallback):
    """How many optimizer steps this process ran (a resumed run runs only the rest)."""

    def __init__(self) -> None:
        self.ran = 0

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        del args, state, control, kwargs
        self.ran += 1


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--save-steps", type=int, default=3)
    ap.add_argument("--kill-at", default=None)
    ap.add_argument("--engine", choices=["fsdp2", "zero2", "zero3"], default="fsdp2")
    ap.add_argument("--no-shim", action="store_true")
    opts = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rank = int(os.environ.get("RANK", "0"))
    if opts.kill_at:
        kill_at(opts.kill_at)
    if opts.engine == "fsdp2" and not opts.no_shim:
        _lift_cpu_gate()

    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2)
    )
    args = TrainingArguments(
        output_dir=opts.out,
        max_steps=opts.steps,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        save_strategy="steps",
        save_steps=opts.save_steps,
        logging_steps=1,
        report_to=[],
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        ddp_backend="gloo",
        **_sharding(opts.engine),
    )
    counter = _CountSteps()
    trainer = protect(Trainer(model=model, args=args, train_dataset=_Rows(), callbacks=[counter]))
    on = trainer.is_fsdp_enabled if opts.engine == "fsdp2" else trainer.is_deepspeed_enabled
    engine = opts.engine if on else "ddp"  # the Trainer falls back to DDP without a word
    resume = last_valid_checkpoint(opts.out)
    step = 0 if resume is None else int(resume.rsplit("-", 1)[1])
    if rank == 0:
        print(f"resumed from step {step}; sharded by {engine}", flush=True)
    trainer.train(resume_from_checkpoint=True if resume else None)
    weights = _full_digest(trainer.model, opts.engine)
    if rank == 0:
        result = {
            "step": int(trainer.state.global_step),
            "ran": counter.ran,
            "engine": engine,
            "weights": weights,
        }
        with open(os.path.join(opts.out, "final.json"), "w") as f:
            json.dump(result, f, sort_keys=True)
    return 0


if __name__ == "__main__":
    code = main()
    # As hf_driver.py's _exit: skip the interpreter's shutdown while a gloo group is up
    # (torch 2.13's gloo worker thread can abort the process after a successful run).
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)
