"""Incremental framework saves: the Trainer's frozen base model, Accelerate's files.

In-process Trainers (one process, CPU) on a tiny GPT-2 whose embedding and first block
are frozen (about 1.3 MiB of its weights): each save puts the frozen weights in a shard
of their own, the first save writes it, later saves link it to the committed one and
write only the trainable weights and the optimizer. Bytes written are the process's own
(``/proc/self/io`` wchar) between two saves: a control, the first save, shows the count
sees the shard when it is written. Accelerate: a frozen reference model's file, written
by Accelerate, is replaced by a link once it is known to be unchanged.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest
import safetensors
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import ProjectConfiguration
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import ckptguard
from ckptguard._state.reuse import Reuse
from ckptguard.integrations._frozen import frozen_first
from ckptguard.integrations.accelerate import protect as protect_accelerator
from ckptguard.integrations.transformers import protect
from proc_io import wchar
from request_counter import counting
from s3_servers import S3Server

INDEX = "model.safetensors.index.json"


class Rows(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __init__(self, n: int) -> None:
        self.ids = torch.randint(0, 4096, (n, 8), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class Written(TrainerCallback):
    """Bytes this process wrote between one save's end and the next's."""

    def __init__(self) -> None:
        self.mark = wchar()
        self.per_save: list[int] = []

    def on_save(self, *args: Any, **kwargs: Any) -> None:  # noqa: ARG002
        now = wchar()
        self.per_save.append(now - self.mark)
        self.mark = now


class StopAt(TrainerCallback):
    """Ends training after ``step`` (an interrupted run: the schedule is the full run's)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:  # noqa: ARG002
        if state.global_step >= self.step:
            control.should_training_stop = True


def _model() -> Any:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=4096,
            n_positions=16,
            n_embd=64,
            n_layer=2,
            n_head=2,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    )
    for name, p in model.named_parameters():  # the embedding and block 0 are frozen
        p.requires_grad_(name.startswith(("transformer.h.1.", "transformer.ln_f.")))
    return model


def _train(
    out: Path | str,
    steps: int,
    *,
    resume: bool = False,
    stop_at: int | None = None,
    **options: Any,
) -> tuple[Any, Written]:
    written = Written()
    callbacks: list[TrainerCallback] = [written] if stop_at is None else [written, StopAt(stop_at)]
    args = TrainingArguments(
        output_dir=str(out), max_steps=steps, save_strategy="steps", save_steps=2,
        per_device_train_batch_size=2, use_cpu=True, report_to=[], seed=0,
        disable_tqdm=True, logging_strategy="no", save_total_limit=options.pop("limit", None),
    )  # fmt: skip
    trainer = Trainer(model=_model(), args=args, train_dataset=Rows(16), callbacks=callbacks)
    protect(trainer, **options)
    trainer.train(resume_from_checkpoint=True if resume else None)
    return trainer, written


def _frozen_shard(checkpoint: Path) -> tuple[str, set[str]]:
    """The first shard's name and its tensors (the frozen weights, when sharded so)."""
    index = json.loads((checkpoint / INDEX).read_text())
    first = min(index["weight_map"].values())
    with safetensors.safe_open(str(checkpoint / first), framework="pt") as f:
        return first, set(f.keys())


def _incremental(checkpoint: Path) -> dict[str, Any]:
    manifest = ckptguard.read_manifest(checkpoint)
    return dict(manifest.metadata["ckptguard"]["incremental"])


def _same_weights(checkpoint: Path, model: Any) -> None:
    loaded = GPT2LMHeadModel.from_pretrained(str(checkpoint))
    expected = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_frozen_weights_are_written_once_then_linked(tmp_path: Path) -> None:
    trainer, written = _train(tmp_path / "run", 6)
    run = tmp_path / "run"
    model = trainer.model
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    shard, names = _frozen_shard(run / "checkpoint-2")
    assert names == frozen - {"lm_head.weight"}  # tied to the embedding: saved once
    size = (run / "checkpoint-2" / shard).stat().st_size
    assert size > 1 << 20
    assert not (run / "checkpoint-2" / "model.safetensors").exists()
    for step in (4, 6):
        ckpt = run / f"checkpoint-{step}"
        assert _frozen_shard(ckpt) == (shard, names)
        inc = _incremental(ckpt)
        assert shard in inc["linked_files"]
        assert inc["linked_bytes"] >= size
        if inc["linked_by"] == "hardlink":
            assert (ckpt / shard).stat().st_ino == (run / "checkpoint-2" / shard).stat().st_ino
    assert _incremental(run / "checkpoint-2")["linked_files"] == []
    # The first save wrote the shard; the later ones wrote less than the shard alone.
    assert len(written.per_save) == 3
    assert written.per_save[0] > size
    assert all(w < size for w in written.per_save[1:]), (written.per_save, size)
    for step in (2, 4, 6):
        assert ckptguard.verify(run / f"checkpoint-{step}").ok
    _same_weights(run / "checkpoint-6", model)


def test_control_without_incremental_saves_the_model_in_one_file(tmp_path: Path) -> None:
    trainer, written = _train(tmp_path / "run", 4, incremental=False)
    ckpt = tmp_path / "run" / "checkpoint-4"
    assert (ckpt / "model.safetensors").exists()
    assert not (ckpt / INDEX).exists()
    assert "incremental" not in ckptguard.read_manifest(ckpt).metadata["ckptguard"]
    frozen_bytes = sum(p.numel() * 4 for p in trainer.model.parameters() if not p.requires_grad)
    assert all(w > frozen_bytes * 0.9 for w in written.per_save), written.per_save


def test_resumed_run_matches_an_uninterrupted_one(tmp_path: Path) -> None:
    reference, _ = _train(tmp_path / "ref", 8)
    _train(tmp_path / "run", 8, stop_at=6)
    assert not (tmp_path / "run" / "checkpoint-8").exists()
    resumed, _ = _train(tmp_path / "run", 8, resume=True)
    assert resumed.state.global_step == 8
    assert (
        shard_in(tmp_path / "run" / "checkpoint-8")
        in _incremental(tmp_path / "run" / "checkpoint-8")["linked_files"]
    )
    ref_state = reference.model.state_dict()
    for name, tensor in resumed.model.state_dict().items():
        assert torch.equal(tensor, ref_state[name]), name
    _same_weights(tmp_path / "run" / "checkpoint-8", resumed.model)


def shard_in(checkpoint: Path) -> str:
    return _frozen_shard(checkpoint)[0]


def test_async_saves_link_the_frozen_weights_too(tmp_path: Path) -> None:
    trainer, _ = _train(tmp_path / "run", 6, async_save=True)
    run = tmp_path / "run"
    shard = shard_in(run / "checkpoint-2")
    for step in (4, 6):
        assert shard in _incremental(run / f"checkpoint-{step}")["linked_files"]
        assert ckptguard.verify(run / f"checkpoint-{step}").ok
    _same_weights(run / "checkpoint-6", trainer.model)


def test_retention_deletes_the_linked_checkpoint_and_the_rest_stays_whole(
    tmp_path: Path,
) -> None:
    trainer, _ = _train(tmp_path / "run", 6, limit=1)
    run = tmp_path / "run"
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-6"]
    ckpt = run / "checkpoint-6"
    assert ckptguard.verify(ckpt).ok
    assert (ckpt / shard_in(ckpt)).stat().st_nlink == 1
    _same_weights(ckpt, trainer.model)
    assert os.listdir(run) == ["checkpoint-6"] or "checkpoint-6" in os.listdir(run)


def test_on_an_object_store_the_frozen_shard_is_copied_by_the_server(moto: S3Server) -> None:
    """``output_dir="s3://..."``: the frozen shard of every save after the first is one
    CopyObject of the newest checkpoint's object (nothing uploaded for it), and a run
    resumed from the store ends where an uninterrupted one does."""
    url, options = moto.url("frozen"), moto.storage_options
    with counting() as requests:
        _train(url, 8, stop_at=6, storage_options=options)
        copies = requests.take().get("CopyObject", 0)
    assert copies == 2  # saves 4 and 6
    ckpts = {step: f"{url}/checkpoint-{step}" for step in (2, 4, 6)}
    for step, ckpt in ckpts.items():
        assert ckptguard.verify(ckpt, storage_options=options).ok
        meta = ckptguard.read_manifest(ckpt, storage_options=options).metadata["ckptguard"]
        linked = meta["incremental"]["linked_files"]
        assert linked == ([] if step == 2 else ["model-00001-of-00002.safetensors"]), linked
        if step > 2:
            assert meta["incremental"]["linked_by"] == "copy"
    resumed, _ = _train(url, 8, resume=True, storage_options=options)
    reference, _ = _train(moto.url("frozen-reference"), 8, storage_options=options)
    assert resumed.state.global_step == 8
    ref_state = reference.model.state_dict()
    for name, tensor in resumed.model.state_dict().items():
        assert torch.equal(tensor, ref_state[name]), name


@pytest.mark.parametrize("where", ["local", "s3"])
def test_accelerate_links_a_frozen_reference_model_it_saved_unchanged(
    where: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A policy that trains and a frozen reference model (DPO-style) under Accelerate:
    ``model_1.safetensors`` (the reference) is linked from the third save on (the second
    learns that it is unchanged): a hard link on a local root, a server-side copy of the
    spooled file's committed object on a store (not uploaded). The policy's file and
    the optimizer are written; ``load_state`` restores both models."""
    options: dict[str, Any] | None = None
    if where == "s3":
        server = request.getfixturevalue("moto")
        project, options = server.url("accelerate"), server.storage_options
    else:
        project = str(tmp_path / "p")
    config = ProjectConfiguration(project_dir=project, automatic_checkpoint_naming=True)
    acc = protect_accelerator(Accelerator(cpu=True, project_config=config), storage_options=options)
    try:
        with counting() as requests:
            _accelerate_saves(acc, f"{project}/checkpoints", options)
        assert requests.take().get("CopyObject", 0) == (2 if where == "s3" else 0)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def _accelerate_saves(acc: Any, ckpts: str, options: dict[str, Any] | None) -> None:
    torch.manual_seed(0)
    policy, reference = torch.nn.Linear(256, 256), torch.nn.Linear(512, 512)
    reference.requires_grad_(False)
    opt = torch.optim.SGD(policy.parameters(), lr=0.1)
    policy, reference, opt = acc.prepare(policy, reference, opt)
    for _ in range(4):
        loss = policy(torch.randn(2, 256)).pow(2).mean()
        acc.backward(loss)
        opt.step()
        opt.zero_grad()
        acc.save_state()
    linked = []
    for i in range(4):
        manifest = ckptguard.read_manifest(f"{ckpts}/checkpoint_{i}", storage_options=options)
        linked.append(manifest.metadata["ckptguard"]["incremental"]["linked_files"])
        assert ckptguard.verify(f"{ckpts}/checkpoint_{i}", storage_options=options).ok
    assert linked[0] == linked[1] == []
    assert linked[2] == linked[3] == ["model_1.safetensors"]
    if options is None:
        assert (Path(ckpts) / "checkpoint_3" / "model_1.safetensors").stat().st_nlink >= 2
    trained = policy.weight.detach().clone()
    with torch.no_grad():
        policy.weight.zero_()
        reference.weight.zero_()
    acc.load_state(f"{ckpts}/checkpoint_3")
    assert torch.equal(policy.weight, trained)
    assert reference.weight.abs().sum() > 0


# -- frozen_first itself ------------------------------------------------------------------
def _shards(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("*.safetensors"))


def test_frozen_first_acts_only_for_its_own_thread(tmp_path: Path) -> None:
    """Another thread's save_pretrained while a save has frozen_first open is left alone."""
    model, other = _model(), _model()
    with frozen_first(model, str(tmp_path / "mine"), lambda: None, ckptguard.LocalStorage(), {}):
        thread = threading.Thread(target=other.save_pretrained, args=(str(tmp_path / "other"),))
        thread.start()
        thread.join()
        model.save_pretrained(str(tmp_path / "mine"))
    assert _shards(tmp_path / "other") == ["model.safetensors"]
    assert _shards(tmp_path / "mine") == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    model.save_pretrained(str(tmp_path / "after"))  # closed: as before
    assert _shards(tmp_path / "after") == ["model.safetensors"]


def test_a_linked_shard_written_again_never_writes_into_the_committed_file(
    tmp_path: Path,
) -> None:
    """save_pretrained twice into one save's folder: the second write of the linked frozen
    shard makes a new file; the committed one (same inode until then) keeps its bytes."""
    storage = ckptguard.LocalStorage()
    model = _model()
    committed = tmp_path / "committed"
    with frozen_first(model, str(committed), lambda: None, storage, {}):
        model.save_pretrained(str(committed))
    shard = "model-00001-of-00002.safetensors"
    digest = storage.hash_file(str(committed / shard))
    reuse = Reuse({(digest.size, digest.checksum): str(committed / shard)}, set())
    known: dict[str, ckptguard.FileDigest] = {}
    staging = tmp_path / "staging"
    with frozen_first(model, str(staging), lambda: reuse, storage, known):
        model.save_pretrained(str(staging))
        assert (staging / shard).stat().st_ino == (committed / shard).stat().st_ino
        assert known == {shard: digest}
        with torch.no_grad():  # a frozen weight changes before the second save
            model.transformer.wte.weight.add_(1.0)
        model.save_pretrained(str(staging))
    assert storage.hash_file(str(committed / shard)) == digest
    assert (committed / shard).stat().st_nlink == 1
    assert (staging / shard).stat().st_ino != (committed / shard).stat().st_ino
    assert known == {}
    assert reuse.linked == {}
    assert reuse.linked_bytes == 0
