from __future__ import annotations

import multiprocessing as mp

import pytest

import ckptguard
from ckptguard._format import layout


def _ids(n: int) -> list[str]:
    return [layout.new_save_id() for _ in range(n)]


def test_save_ids_are_unique_across_processes_and_sortable() -> None:
    with mp.get_context("spawn").Pool(4) as pool:
        batches = pool.map(_ids, [5000] * 4)
    ids = [i for batch in batches for i in batch]
    assert len(set(ids)) == len(ids) == 20000
    for save_id in ids:
        assert layout.is_save_id(save_id)
    within = batches[0]
    assert within == sorted(within)  # time-ordered within a process


def test_staging_name_round_trip() -> None:
    save_id = layout.new_save_id()
    for name in ["checkpoint-100", "best.model", "a", "x_y-z.1"]:
        entry = layout.staging_name(name, save_id)
        assert layout.parse_staging_name(entry) == (name, save_id)


@pytest.mark.parametrize(
    "entry", ["checkpoint-1", "checkpoint-1.1234", ".hidden.x", "tmp-checkpoint-l6bxw431", ""]
)
def test_foreign_entries_do_not_parse(entry: str) -> None:
    assert layout.parse_staging_name(entry) is None


@pytest.mark.parametrize(
    "name",
    ["", ".", "..", ".hidden", "a/b", "a\\b", "-x", "x" * 201, "ckptguard.json", "a\x00b", " a"],
)
def test_invalid_names(name: str) -> None:
    with pytest.raises(ckptguard.InvalidCheckpointName):
        layout.validate_name(name)


def test_steps() -> None:
    assert layout.checkpoint_name(100) == "checkpoint-100"
    assert layout.step_from_name("checkpoint-100") == 100
    assert layout.step_from_name("checkpoint-x") is None
    assert layout.step_from_name("best") is None
    with pytest.raises(ckptguard.InvalidCheckpointName):
        layout.checkpoint_name(-1)
