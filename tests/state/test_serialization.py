"""Serialization without pickle: state trees <-> state.json + safetensors, through the API.

Everything here uses real files and real torch: round trips of training state (bit-exact),
a resumed run that ends with the very weights of an uninterrupted one, every supported
dtype and Python value, tied weights, interoperability with the reference safetensors
reader, unsupported values, pickle payloads that must never run, and malformed or
malicious safetensors headers and state.json documents.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import math
import os
import pickle
import random
import struct
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import ckptguard
from ckptguard._format.layout import META_DIR, STAGING_DIR, STATE_NAME, new_save_id
from ckptguard._format.manifest import Manifest
from ckptguard._format.owner import current_writer
from ckptguard._format.safetensors import DTYPE_SIZES, MAX_HEADER_BYTES, parse_header
from ckptguard._state.serialization import (
    STATE_FORMAT,
    STATE_VERSION,
    TargetMismatch,
    read_state,
    safetensors_digest,
    write_state,
)

TESTS_DIR = Path(__file__).resolve().parent

# -- helpers -------------------------------------------------------------------------------


def _manager(root: Path) -> ckptguard.CheckpointManager:
    return ckptguard.CheckpointManager(root, keep_last=None)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor (NaN-safe, -0.0-aware comparison)."""
    flat = t.detach().resolve_conj().resolve_neg().contiguous().reshape(-1)
    return flat.view(torch.uint8)


def _float_bits(x: float) -> bytes:
    return struct.pack("<d", x)


def assert_same(expected: Any, actual: Any, where: str = "state") -> None:
    """Bit-exact equality of two trees, with exact container and leaf types."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), where
        assert actual.dtype == expected.dtype, where
        assert actual.shape == expected.shape, where
        assert torch.equal(_bits(actual), _bits(expected)), where
    elif isinstance(expected, np.ndarray):
        assert isinstance(actual, np.ndarray), where
        assert actual.dtype == expected.dtype, where
        assert actual.shape == expected.shape, where
        assert actual.tobytes() == expected.tobytes(), where
    elif isinstance(expected, np.generic):
        assert type(actual) is type(expected), where
        assert actual.tobytes() == expected.tobytes(), where
    elif isinstance(expected, float):
        assert type(actual) is float, where
        assert _float_bits(actual) == _float_bits(expected), where
    elif isinstance(expected, Mapping):
        # A restored tree holds plain dicts; a state_dict() compared with one is ordered.
        assert type(actual) is dict if type(expected) is dict else isinstance(actual, Mapping)
        assert list(actual) == list(expected), where
        assert [type(k) for k in actual] == [type(k) for k in expected], where
        for key, value in expected.items():
            assert_same(value, actual[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert type(actual) is type(expected), where
        assert len(actual) == len(expected), where
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            assert_same(e, a, f"{where}[{i}]")
    else:
        assert type(actual) is type(expected), where
        assert actual == expected, where


def _round_trip(tmp_path: Path, state: Mapping[str, Any]) -> Any:
    mgr = _manager(tmp_path / "run")
    mgr.save(1, state)
    return mgr.restore()


def _no_staging(root: Path) -> bool:
    staging = root / META_DIR / STAGING_DIR
    return not staging.exists() or not any(staging.iterdir())


def _state_doc(files: list[Any], tree: Any) -> bytes:
    doc = {"format": STATE_FORMAT, "version": STATE_VERSION, "files": files, "tree": tree}
    return json.dumps(doc).encode()


def _commit_raw(root: Path, step: int, files: Mapping[str, bytes]) -> Path:
    """Commit arbitrary files as checkpoint-<step> with a valid, freshly sealed manifest."""
    final = root / f"checkpoint-{step}"
    with ckptguard.atomic_checkpoint(final, step=step) as staging:
        for name, data in files.items():
            (staging / name).write_bytes(data)
    assert ckptguard.verify(final).ok
    return final


def _st_bytes(header: Any, data: bytes, *, pad: bool = True) -> bytes:
    """A safetensors file with an arbitrary (possibly malicious) header object."""
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    if pad:
        raw += b" " * (-(8 + len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def _parse(buf: bytes) -> Any:
    return parse_header(buf, len(buf), "x.safetensors")


# -- models --------------------------------------------------------------------------------


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 1))


class TiedLM(nn.Module):
    """An embedding whose weight is also the output head's (as in GPT-2)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.proj = nn.Linear(6, 6)
        self.head = nn.Linear(6, 20, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return cast("torch.Tensor", self.head(torch.tanh(self.proj(self.emb(ids)))))


OptFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]

OPTIMIZERS: dict[str, OptFactory] = {
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.8, 0.99)),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, amsgrad=True),
}


def _training_objects(
    make_opt: OptFactory, seed: int
) -> tuple[nn.Sequential, torch.optim.Optimizer, torch.optim.lr_scheduler.StepLR]:
    torch.manual_seed(seed)
    model = _mlp()
    opt = make_opt(list(model.parameters()))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return model, opt, sched


def _step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    loss = model(x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


# -- round trips of training state ---------------------------------------------------------


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_training_state_round_trip_bit_exact(tmp_path: Path, opt_name: str) -> None:
    make_opt = OPTIMIZERS[opt_name]
    model, opt, sched = _training_objects(make_opt, seed=0)
    x = torch.randn(16, 8)
    for _ in range(3):  # real steps: momentum buffers, exp_avg, max_exp_avg_sq exist
        _step(model, opt, x)
        sched.step()
    assert opt.state_dict()["state"], "the optimizer has state to save"
    random.gauss(0, 1)  # leave a cached gaussian in Python's and numpy's generator states
    np.random.standard_normal()
    rng = ckptguard.capture_rng_state()
    mgr = _manager(tmp_path / "run")
    mgr.save(3, {"model": model, "optimizer": opt, "scheduler": sched, "rng": rng, "step": 3})

    expected = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng": rng,
        "step": 3,
    }
    tree = mgr.restore()
    assert_same(expected, tree)
    assert list(tree["optimizer"]["state"]) == [0, 1, 2, 3]  # int keys stay ints

    # Into fresh objects, in place: the same Parameter objects, the checkpoint's values.
    fresh_model, fresh_opt, fresh_sched = _training_objects(make_opt, seed=1)
    params = list(fresh_model.parameters())
    assert not torch.equal(params[0], next(model.parameters()))
    out = mgr.restore(
        target={"model": fresh_model, "optimizer": fresh_opt, "scheduler": fresh_sched}
    )
    assert out["model"] is fresh_model
    assert out["optimizer"] is fresh_opt
    assert out["scheduler"] is fresh_sched
    assert out["step"] == 3
    assert all(a is b for a, b in zip(fresh_model.parameters(), params, strict=True))
    assert_same(expected["model"], fresh_model.state_dict())
    assert_same(expected["optimizer"], fresh_opt.state_dict())
    assert_same(expected["scheduler"], fresh_sched.state_dict())

    # Both continue identically (dropout draws the same masks from the same RNG state).
    rng_now = ckptguard.capture_rng_state()
    for m, o, s in ((model, opt, sched), (fresh_model, fresh_opt, fresh_sched)):
        ckptguard.restore_rng_state(rng_now)
        _step(m, o, x)
        s.step()
    assert_same(model.state_dict(), fresh_model.state_dict())
    assert_same(opt.state_dict(), fresh_opt.state_dict())


def _draws() -> tuple[list[float], list[float], list[float], list[float]]:
    return (
        torch.rand(5).tolist(),
        np.random.standard_normal(5).tolist(),
        [random.random() for _ in range(3)]  # noqa: S311 - not crypto
        + [random.gauss(0, 1) for _ in range(3)],
        torch.randn(3).tolist(),
    )


def test_rng_state_round_trip_continues_every_generator(tmp_path: Path) -> None:
    torch.manual_seed(7)
    np.random.seed(7)
    random.seed(7)
    _draws()
    random.gauss(0, 1)  # odd number of gaussians: the cached second value is part of the state
    np.random.standard_normal()
    mgr = _manager(tmp_path / "run")
    mgr.save(1, {"rng": ckptguard.capture_rng_state()})
    expected = _draws()

    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    assert _draws() != expected
    ckptguard.restore_rng_state(mgr.restore()["rng"])
    assert _draws() == expected


# -- a resumed run ends with the weights of an uninterrupted run ---------------------------

RESUME_AT, TOTAL_STEPS = 10, 20


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(256, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g) + 0.1 * torch.randn(256, 1, generator=g)
    return x, y


def _fresh_run(
    init_seed: int,
) -> tuple[nn.Sequential, torch.optim.AdamW, torch.optim.lr_scheduler.StepLR, torch.Generator]:
    torch.manual_seed(init_seed)
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    loader_gen = torch.Generator().manual_seed(init_seed + 1)  # a seeded sampler's generator
    return model, opt, sched, loader_gen


def _train(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    loader_gen: torch.Generator,
    steps: range,
) -> None:
    x_all, y_all = _data()
    model.train()
    for _ in steps:
        idx = torch.randint(0, x_all.shape[0], (32,), generator=loader_gen)  # the "DataLoader"
        noise = torch.from_numpy(np.random.normal(0.0, 0.01, size=(32, 8)).astype(np.float32))
        # Augmentation from Python's generator (not crypto).
        scale = 1.0 + 0.1 * random.random()  # noqa: S311
        pred = model((x_all[idx] + noise) * scale)  # dropout draws from torch's generator
        loss = (pred - y_all[idx]).pow(2).mean()  # MSE
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _resume_and_finish(root: str) -> dict[str, torch.Tensor]:
    """Fresh objects (other init, other seeds), restore, finish the run."""
    _seed_everything(424242)
    model, opt, sched, loader_gen = _fresh_run(init_seed=77)
    state = _manager(Path(root)).restore(
        target={"model": model, "optimizer": opt, "scheduler": sched}
    )
    assert state["step"] == RESUME_AT
    ckptguard.restore_rng_state(state["rng"])
    loader_gen.set_state(state["loader"].clone())
    _train(model, opt, sched, loader_gen, range(state["step"], TOTAL_STEPS))
    return {**model.state_dict(), **{f"opt/{k}": v for k, v in _opt_tensors(opt).items()}}


def _opt_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    return {
        f"{i}/{name}": value
        for i, per_param in opt.state_dict()["state"].items()
        for name, value in per_param.items()
    }


def _child_main(root: str, out: str) -> None:  # runs in a new process
    safetensors.torch.save_file(_resume_and_finish(root), out)


@pytest.mark.parametrize("where", ["same-process", "new-process"])
def test_resumed_run_matches_uninterrupted_run(tmp_path: Path, where: str) -> None:
    _seed_everything(0)
    model_a, opt_a, sched_a, gen_a = _fresh_run(init_seed=0)
    _train(model_a, opt_a, sched_a, gen_a, range(TOTAL_STEPS))
    expected = {**model_a.state_dict(), **{f"opt/{k}": v for k, v in _opt_tensors(opt_a).items()}}

    _seed_everything(0)
    model_b, opt_b, sched_b, gen_b = _fresh_run(init_seed=0)
    _train(model_b, opt_b, sched_b, gen_b, range(RESUME_AT))
    root = tmp_path / "run"
    _manager(root).save(
        RESUME_AT,
        {
            "model": model_b,
            "optimizer": opt_b,
            "scheduler": sched_b,
            "rng": ckptguard.capture_rng_state(),
            "loader": gen_b.get_state(),
            "step": RESUME_AT,
        },
    )
    del model_b, opt_b, sched_b, gen_b

    if where == "same-process":
        resumed = _resume_and_finish(str(root))
    else:
        out = tmp_path / "final.safetensors"
        code = (
            f"import sys; sys.path.insert(0, {str(TESTS_DIR)!r}); "
            "import test_serialization as t; t._child_main(sys.argv[1], sys.argv[2])"
        )
        subprocess.run([sys.executable, "-c", code, str(root), str(out)], check=True, timeout=120)
        resumed = safetensors.torch.load_file(out)
    assert sorted(resumed) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(resumed[name], tensor), name


# -- dtypes, layouts and Python values -----------------------------------------------------

TORCH_DTYPES = [
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.int16,
    torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64,
]  # fmt: skip


def _sample(dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    if dtype == torch.bool:
        return torch.rand(4, 5, generator=g) > 0.5
    if dtype.is_floating_point or dtype.is_complex:
        t = torch.randn(4, 5, generator=g, dtype=torch.float64).to(dtype) * 100
        if dtype.is_complex:
            t = torch.complex(t.real.float(), torch.randn(4, 5, generator=g)).to(dtype)
        else:
            t[0, 0], t[0, 1], t[0, 2], t[0, 3] = math.nan, math.inf, -math.inf, -0.0
        return t
    info = torch.iinfo(dtype)
    t = torch.randint(info.min, info.max, (4, 5), generator=g, dtype=dtype)
    t[0, 0], t[0, 1] = info.min, info.max
    return t


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
def test_tensor_dtypes_round_trip(tmp_path: Path, dtype: torch.dtype) -> None:
    t = _sample(dtype)
    out = _round_trip(tmp_path, {"t": {"x": t, "row": t[1], "scalar": t[2, 3].clone()}})
    assert_same({"x": t, "row": t[1], "scalar": t[2, 3]}, out["t"])
    assert out["t"]["scalar"].dim() == 0


def test_layouts_empty_scalars_and_requires_grad(tmp_path: Path) -> None:
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    leaf = torch.randn(3, 4, requires_grad=True)
    state = {
        "transposed": base.t(),
        "stepped": base[::2, 1::3],
        "expanded": torch.arange(3.0).expand(4, 3),
        "channels_last": torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last),
        "conj": torch.randn(3, dtype=torch.complex64).conj(),
        "empty": torch.empty(0),
        "empty_2d": torch.zeros(3, 0, dtype=torch.int64),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "bool_scalar": torch.tensor(True),
        "leaf": leaf,
        "non_leaf": leaf * 2,
        "param": nn.Parameter(torch.ones(2)),
    }
    out = _round_trip(tmp_path, {"t": state})["t"]
    assert_same({k: v.detach() for k, v in state.items()}, out)
    assert out["empty_2d"].shape == (3, 0)
    assert out["scalar"].shape == ()
    assert all(v.is_contiguous() for v in out.values())
    assert not out["conj"].is_conj()


def test_numpy_arrays_and_scalars_round_trip(tmp_path: Path) -> None:
    rs = np.random.RandomState(0)
    arrays = {
        str(dt): (rs.standard_normal((3, 4)) * 50).astype(dt)
        for dt in ["float64", "float32", "float16", "int64", "int32", "int16", "int8", "uint8"]
    }
    arrays["bool"] = rs.standard_normal(7) > 0
    arrays["complex64"] = (rs.standard_normal(3) + 1j * rs.standard_normal(3)).astype(np.complex64)
    arrays["uint32"] = np.array([0, 2**32 - 1], dtype=np.uint32)
    arrays["fortran"] = np.asfortranarray(rs.standard_normal((3, 5)))
    arrays["strided"] = np.arange(20.0)[::3]
    arrays["empty"] = np.zeros((2, 0), dtype=np.float32)
    arrays["zero_d"] = np.array(7, dtype=np.int16)
    scalars = [
        np.float32(math.nan), np.float16(-0.0), np.int8(-128),
        np.int64(-(2**63)), np.uint64(2**64 - 1), np.uint8(255), np.bool_(True),
    ]  # fmt: skip
    out = _round_trip(tmp_path, {"arrays": arrays, "scalars": scalars})
    assert_same({"arrays": arrays, "scalars": scalars}, out)


# Found while writing these tests (fixed): np.float64 subclasses float and came back as a
# Python float; a complex64 numpy scalar was refused because its .item() is a Python complex.
@pytest.mark.parametrize(
    "value", [np.float64(0.1), np.complex64(1 + 2j)], ids=["float64", "complex64"]
)
def test_numpy_scalar_subtleties(tmp_path: Path, value: np.generic) -> None:
    assert_same({"x": value}, _round_trip(tmp_path, {"x": value}))


def test_python_values_round_trip(tmp_path: Path) -> None:
    state = {
        "ints": [0, -1, 2**63, 2**64 + 1, -(2**70), 10**300],
        "floats": [0.1, -0.0, math.nan, math.inf, -math.inf, 5e-324, 1.7976931348623157e308],
        "str": 'héllo ✓ \x00 "quoted"',
        "bytes": b"\x00\xff\x80 bytes",
        "none": None,
        "bools": (True, False),
        "tuple": (1, (2, [3, (4,)]), []),
        "list": [1, [2, (3,)], ()],
        "int_keys": {0: "a", 1: {"nested": [1.5]}, -7: None},
        "mixed_keys": {1: "int", "1": "str", 2.5: "float", (1, "x"): "tuple", None: 0},
        "bool_keys": {True: "t", False: "f"},
        "dunder_keys": {"__tensor__": {"file": "x", "name": "y"}, "__reduce__": "text"},
        "tag_lookalike": ["__tuple__", {"plain": "__dict__"}],
        "empty": {"dict": {}, "list": [], "tuple": ()},
        "dtypes": [torch.bfloat16, torch.float32, torch.bool],
    }
    out = _round_trip(tmp_path, state)
    assert_same(state, out)


def test_top_level_non_string_keys_and_non_dict_states(tmp_path: Path) -> None:
    mgr = _manager(tmp_path / "run")
    t = torch.arange(4)
    for step, state in enumerate([{0: t, "__x": 1}, [t, t + 1], (1, "two"), t, 3.5]):
        mgr.save(step, state)
        assert_same(state, mgr.restore(step=step))


def test_restored_tensors_are_private_copies_of_the_file(tmp_path: Path) -> None:
    mgr = _manager(tmp_path / "run")
    mgr.save(1, {"model": {"w": torch.ones(4)}, "arr": np.ones(3)})
    out = mgr.restore()
    out["model"]["w"].add_(1)  # copy-on-write mapping: the checkpoint is unchanged
    out["arr"][:] = 5
    assert ckptguard.verify(tmp_path / "run" / "checkpoint-1").ok
    again = mgr.restore()
    assert torch.equal(again["model"]["w"], torch.ones(4))
    assert np.array_equal(again["arr"], np.ones(3))


# -- tied weights --------------------------------------------------------------------------


def test_tied_weights_are_stored_once_and_restored_tied(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TiedLM()
    shared = torch.randn(5)
    mgr = _manager(tmp_path / "run")
    mgr.save(1, {"model": model, "a": shared, "b": shared, "nested": {"again": shared}})

    ckpt = tmp_path / "run" / "checkpoint-1"
    with safetensors.safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert "emb.weight" in keys
    assert "head.weight" not in keys  # one tensor for both names
    assert len(keys) == len(model.state_dict()) - 1
    assert not (ckpt / "b.safetensors").exists()
    assert not (ckpt / "nested.safetensors").exists()

    out = mgr.restore()
    assert out["model"]["emb.weight"] is out["model"]["head.weight"]
    assert out["a"] is out["b"] is out["nested"]["again"]
    assert torch.equal(out["a"], shared)

    fresh = TiedLM()
    fresh_weight = fresh.emb.weight
    mgr.restore(target={"model": fresh})
    assert fresh.head.weight is fresh.emb.weight is fresh_weight
    assert_same(model.state_dict(), fresh.state_dict())
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(fresh(ids), model(ids))


def test_distinct_tensors_with_equal_values_are_not_tied(tmp_path: Path) -> None:
    base = torch.arange(8.0)
    state = {"x": base, "copy": base.clone(), "view": base[2:6], "as_int": base.view(torch.int32)}
    out = _round_trip(tmp_path, state)
    assert_same(state, out)
    assert out["x"] is not out["copy"]
    assert out["x"] is not out["view"]


# -- interoperability with the reference safetensors library -------------------------------


def test_files_load_with_the_reference_safetensors_library(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.Adam(model.parameters())
    _step(model, opt, torch.randn(4, 8))
    mixed = {str(dt).removeprefix("torch."): _sample(dt) for dt in TORCH_DTYPES}
    mixed["strided"] = torch.arange(30.0).reshape(5, 6)[:, ::2]
    mgr = _manager(tmp_path / "run")
    mgr.save(1, {"model": model, "optimizer": opt, "mixed": mixed})
    ckpt = tmp_path / "run" / "checkpoint-1"

    loaded = safetensors.torch.load_file(ckpt / "model.safetensors")
    expected = model.state_dict()
    assert sorted(loaded) == sorted(expected)
    for name, t in expected.items():
        assert_same(t, loaded[name], name)
    with safetensors.safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    loaded_mixed = safetensors.torch.load_file(ckpt / "mixed.safetensors")
    assert sorted(loaded_mixed) == sorted(mixed)
    for name, t in mixed.items():
        assert_same(t, loaded_mixed[name], name)
    opt_tensors = safetensors.torch.load_file(ckpt / "optimizer.safetensors")
    assert len(opt_tensors) == 3 * len(list(model.parameters()))  # step, exp_avg, exp_avg_sq


def test_digest_from_memory_is_that_of_the_reference_safetensors_file(tmp_path: Path) -> None:
    """Every dtype, names in mixed order, with and without metadata: the digest of what
    ``safetensors.torch.save_file`` writes, known without writing it (incremental saves
    link a framework's unchanged file this way, see reuse.py)."""
    torch.manual_seed(0)
    tensors = {
        f"{chr(ord('z') - i)}.{str(dt).removeprefix('torch.')}": _sample(dt)
        for i, dt in enumerate(TORCH_DTYPES)
    }
    for dt in (torch.uint16, torch.uint32, torch.uint64, torch.float8_e4m3fn, torch.float8_e5m2):
        tensors[f"m.{str(dt).removeprefix('torch.')}"] = torch.arange(6).to(dt)
    tensors["a.empty"] = torch.zeros(0, 3)
    tensors["b.more"] = torch.randn(4, 5)
    tensors["b.morë"] = torch.randn(3)
    storage = ckptguard.LocalStorage()
    for n, metadata in enumerate([{"format": "pt"}, None, {}, {"ü": "ë"}]):
        reference = tmp_path / f"reference{n}.safetensors"
        safetensors.torch.save_file(tensors, reference, metadata=metadata)
        data = reference.read_bytes()
        assert {i.dtype for i in parse_header(data, len(data), "x")[1]} == set(DTYPE_SIZES)
        assert safetensors_digest(tensors, metadata) == storage.hash_file(str(reference))
    assert safetensors_digest(tensors, if_size=lambda size: size < 100) is None
    assert safetensors_digest(tensors, {"a": "1", "b": "2"}) is None  # the library's order varies
    assert safetensors_digest({"x": torch.zeros(2).to_sparse()}) is None


def _manifest_for(digests: Mapping[str, ckptguard.FileDigest]) -> Manifest:
    return Manifest.create(
        name="checkpoint-0",
        save_id=new_save_id(),
        step=0,
        files=[ckptguard.FileEntry(n, d.size, d.checksum) for n, d in digests.items()],
        writer=current_writer(),
    )


def test_write_state_and_read_state_directly(tmp_path: Path) -> None:
    storage = ckptguard.LocalStorage()
    directory = str(tmp_path)
    state: dict[str, Any] = {
        "model": {"w": torch.randn(3, 3)},
        "arr": np.arange(5),
        "meta": {"epoch": 2},
    }
    digests = write_state(directory, state, storage)
    assert sorted(digests) == ["model.safetensors", STATE_NAME, "tensors.safetensors"]
    for name, digest in digests.items():
        assert digest.size == (tmp_path / name).stat().st_size
    doc = json.loads((tmp_path / STATE_NAME).read_text())
    assert doc["format"] == STATE_FORMAT
    assert doc["files"] == ["model.safetensors", "tensors.safetensors"]
    assert doc["tree"]["meta"] == {"epoch": 2}

    manifest = _manifest_for(digests)
    assert_same(state, read_state(directory, manifest))
    w = torch.zeros(3, 3)
    out = read_state(directory, manifest, target={"model": {"w": w}})
    assert out["model"]["w"] is w
    assert torch.equal(w, state["model"]["w"])

    # A checksum that does not match the bytes: nothing is loaded into the target.
    (tmp_path / "other").mkdir()
    other = write_state(str(tmp_path / "other"), {"model": {"w": torch.ones(3, 3)}}, storage)
    wrong = dict(digests)
    wrong["model.safetensors"] = other["model.safetensors"]
    w.zero_()
    with pytest.raises(ckptguard.CorruptCheckpoint, match=r"model\.safetensors"):
        read_state(directory, _manifest_for(wrong), target={"model": {"w": w}})
    assert not w.any()


# -- unsupported values --------------------------------------------------------------------


class Opaque:
    """Not a tensor, not a scalar, no state_dict: cannot be stored without pickle."""


@pytest.mark.parametrize(
    ("state", "where"),
    [
        ({"cfg": {"layers": [1, {"fn": lambda: 0}]}}, "state['cfg']['layers'][1]['fn']"),
        ({"obj": Opaque()}, "state['obj']"),
        ({"model": {"w": torch.zeros(2, dtype=torch.complex128)}}, "state['model']['w']"),
        ({"sparse": [torch.eye(3).to_sparse()]}, "state['sparse'][0]"),
        ({"set": {1, 2}}, "state['set']"),
        ({"arr": np.array(["a", "b"])}, "state['arr']"),
        ({"arr": np.zeros(2, dtype=">f4")}, "state['arr']"),
        ({"arr": np.zeros(2, dtype=object)}, "state['arr']"),
        ({"c": {"x": 1j}}, "state['c']['x']"),
    ],
    ids=["lambda", "object", "complex128", "sparse", "set", "str-array", "big-endian",
         "object-array", "complex"],
)  # fmt: skip
def test_unsupported_values_raise_type_error_naming_the_path(
    tmp_path: Path, state: dict[str, Any], where: str
) -> None:
    root = tmp_path / "run"
    mgr = _manager(root)
    mgr.save(1, {"model": {"w": torch.ones(2)}})
    with pytest.raises(TypeError) as info:
        mgr.save(2, {"model": {"w": torch.ones(2)}, **state})
    assert where in str(info.value)
    assert sorted(p.name for p in root.iterdir()) == [META_DIR, "checkpoint-1"]
    assert _no_staging(root)
    assert mgr.restore()["model"]["w"].tolist() == [1.0, 1.0]


# -- pickle payloads are never executed ----------------------------------------------------


class Payload:
    """Unpickling this creates a directory: proof that pickled code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[[str], None], tuple[str]]:
        return (os.mkdir, (str(self.marker),))


def test_legacy_pickle_files_in_a_valid_checkpoint_are_never_loaded(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    root = tmp_path / "run"
    torch.save({"model": Payload(marker)}, tmp_path / "evil.pt")
    evil = (tmp_path / "evil.pt").read_bytes()
    tensors = safetensors.torch.save({"w": torch.ones(2)})
    tree = {"model": {"w": {"__tensor__": {"file": "model.safetensors", "name": "w"}}}}
    _commit_raw(
        root,
        1,
        {
            "model.safetensors": tensors,
            "pytorch_model.bin": evil,
            "model.pt": evil,
            "optimizer.pt": evil,
            STATE_NAME: _state_doc(["model.safetensors"], tree),
        },
    )
    _commit_raw(root, 2, {"pytorch_model.bin": evil, "training_args.bin": evil})
    mgr = _manager(root)

    with pytest.raises(ckptguard.CorruptCheckpoint, match=STATE_NAME):
        mgr.restore(step=2)  # only pickles: not a state checkpoint, nothing to unpickle
    out = mgr.restore()  # skips checkpoint-2, loads checkpoint-1's safetensors only
    assert torch.equal(out["model"]["w"], torch.ones(2))
    w = torch.zeros(2)
    mgr.restore(target={"model": {"w": w}})
    assert w.tolist() == [1.0, 1.0]
    assert not marker.exists()

    # The control: the same bytes do run their payload when unpickled.
    torch.load(tmp_path / "evil.pt", weights_only=False)  # the point of the control
    assert marker.exists()


@pytest.mark.parametrize(
    "tree",
    [
        {"__reduce__": ["os.system", ["touch PWNED"]]},
        {"__class__": "os.system", "args": ["touch PWNED"]},
        {"__pickle__": "PICKLE"},
        {"__bytes__": "PICKLE", "__reduce__": "PICKLE"},
        {"__object__": {"module": "os", "name": "system"}},
        {"__torch_dtype__": "__class__"},
        {"__npscalar__": {"dtype": "object", "value": "x"}},
        {"__npscalar__": {"dtype": "float64"}},
        {"__tensor__": {"file": "../evil.safetensors", "name": "w"}},
        {"__tensor__": {"file": "model.safetensors", "name": "w", "extra": 1}},
        {"__ndarray__": {"file": "missing.safetensors", "name": "w"}},
        {"__tuple__": [], "__dict__": []},
        {"__tuple__": 5},
        {"__float__": "1e400"},
        {"__bytes__": "not base64!"},
        {"__dict__": [[[1], "unhashable key"]]},
        {"__dict__": [[1, 2, 3]]},
    ],
    ids=lambda t: "-".join(sorted(t))[:40],
)
def test_malicious_state_json_is_rejected(tmp_path: Path, tree: dict[str, Any]) -> None:
    marker = tmp_path / "PWNED"
    armed = base64.b64encode(pickle.dumps(Payload(marker))).decode()
    text = json.dumps(tree).replace("touch PWNED", f"touch {marker}").replace("PICKLE", armed)
    root = tmp_path / "run"
    _commit_raw(root, 1, {STATE_NAME: _state_doc([], {"x": json.loads(text)})})
    mgr = _manager(root)
    with pytest.raises(ckptguard.CorruptCheckpoint):
        mgr.restore(step=1)
    with pytest.raises(ckptguard.NoValidCheckpoint):
        mgr.restore()
    assert not marker.exists()


@pytest.mark.parametrize(
    "doc",
    [
        b"not json",
        b"\xff\xfe",
        b"[]",
        json.dumps({"format": "pickle", "version": 1, "files": [], "tree": 1}).encode(),
        json.dumps({"format": STATE_FORMAT, "version": 2, "files": [], "tree": 1}).encode(),
        json.dumps({"format": STATE_FORMAT, "version": 1, "files": {}, "tree": 1}).encode(),
        _state_doc(["../../etc/passwd"], None),
        _state_doc([STATE_NAME], None),
        _state_doc(["ckptguard.json"], None),
        _state_doc([1], None),
        _state_doc(["a.safetensors", "a.safetensors"], None),
        _state_doc([], None).replace(b"null", b"[" * 100_000 + b"]" * 100_000),
    ],
    ids=lambda d: repr(d[:30]),
)
def test_malformed_state_documents_are_rejected(tmp_path: Path, doc: bytes) -> None:
    root = tmp_path / "run"
    _commit_raw(root, 1, {STATE_NAME: doc, "a.safetensors": safetensors.torch.save({})})
    with pytest.raises(ckptguard.CorruptCheckpoint):
        _manager(root).restore(step=1)


# Found while writing these tests (fixed): attacker-controlled JSON that escaped as a builtin
# error (TypeError/ValueError/OverflowError, not CorruptCheckpoint, so restore() did not skip
# the checkpoint) or decoded to a value of the wrong type.
@pytest.mark.parametrize(
    "tree",
    [
        {"__torch_dtype__": []},
        {"__float__": []},
        {"__npscalar__": {"dtype": [], "value": 1}},
        {"__tensor__": {"file": [], "name": "w"}},
        {"__npscalar__": {"dtype": "float64", "value": "abc"}},
        {"__npscalar__": {"dtype": "int8", "value": 1000}},
        {"__npscalar__": {"dtype": "bool", "value": [1, 2]}},  # decodes to an ndarray
    ],
    ids=lambda t: json.dumps(t)[:40],
)
def test_malicious_state_json_typed_values(tmp_path: Path, tree: dict[str, Any]) -> None:
    root = tmp_path / "run"
    _commit_raw(root, 1, {STATE_NAME: _state_doc([], {"x": tree})})
    with pytest.raises(ckptguard.CorruptCheckpoint):
        _manager(root).restore(step=1)


# -- safetensors headers: strict parsing ---------------------------------------------------


def _valid_file() -> tuple[dict[str, Any], bytes]:
    header = {
        "__metadata__": {"format": "pt"},
        "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "b": {"dtype": "I64", "shape": [1], "data_offsets": [16, 24]},
    }
    return header, bytes(range(1, 25))


def test_parse_header_accepts_a_valid_file() -> None:
    header, data = _valid_file()
    buf = _st_bytes(header, data)
    start, infos, meta = _parse(buf)
    assert start == len(buf) - len(data)
    assert [(i.name, i.dtype, i.shape, i.begin, i.end) for i in infos] == [
        ("a", "F32", (2, 2), 0, 16),
        ("b", "I64", (1,), 16, 24),
    ]
    assert meta == {"format": "pt"}


def _tensor(dtype: Any = "F32", shape: Any = (2,), offsets: Any = (0, 8)) -> dict[str, Any]:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


BAD_HEADERS: dict[str, Any] = {
    "not-an-object": [1, 2],
    "offsets-past-end": {"a": _tensor(offsets=(8, 16))},
    "begin-after-end": {"a": _tensor(shape=(0,), offsets=(8, 0))},
    "negative-begin": {"a": _tensor(offsets=(-8, 0))},
    "overlap": {"a": _tensor(offsets=(0, 8)), "b": _tensor(shape=(1,), offsets=(4, 8))},
    "contained": {"a": _tensor(offsets=(0, 8)), "b": _tensor(shape=(0,), offsets=(2, 2)),
                  "c": _tensor(shape=(1,), offsets=(4, 8))},
    "size-too-small": {"a": _tensor(shape=(3,), offsets=(0, 8))},
    "size-too-large": {"a": _tensor(shape=(1,), offsets=(0, 8))},
    "size-overflow": {"a": _tensor(shape=(2**62, 2**62, 4), offsets=(0, 8))},
    "unknown-dtype": {"a": _tensor(dtype="F128")},
    "lowercase-dtype": {"a": _tensor(dtype="f32")},
    "int-dtype": {"a": _tensor(dtype=4)},
    "negative-shape": {"a": _tensor(shape=(-2,))},
    "float-shape": {"a": _tensor(shape=(2.0,))},
    "bool-shape": {"a": _tensor(dtype="BOOL", shape=(True,), offsets=(0, 1))},
    "string-shape": {"a": _tensor(shape=("2",))},
    "shape-not-list": {"a": {"dtype": "F32", "shape": 2, "data_offsets": [0, 8]}},
    "too-many-dims": {"a": _tensor(shape=[1] * 65 + [2])},
    "float-offsets": {"a": _tensor(offsets=(0.0, 8.0))},
    "three-offsets": {"a": _tensor(offsets=(0, 8, 8))},
    "missing-field": {"a": {"dtype": "F32", "shape": [2]}},
    "extra-field": {"a": {**_tensor(), "pickle": "x"}},
    "entry-not-object": {"a": "F32"},
    "metadata-not-strings": {"__metadata__": {"format": 1}, "a": _tensor()},
    "metadata-list": {"__metadata__": ["pt"], "a": _tensor()},
}  # fmt: skip


@pytest.mark.parametrize("name", list(BAD_HEADERS))
def test_parse_header_rejects(name: str) -> None:
    with pytest.raises(ckptguard.CorruptCheckpoint):
        _parse(_st_bytes(BAD_HEADERS[name], bytes(8)))


@pytest.mark.parametrize(
    "raw",
    [
        b'{"a":%s,"a":%s}' % (json.dumps(_tensor()).encode(), json.dumps(_tensor()).encode()),
        b'{"a":{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}}',
        b'{"a":{"dtype":"F32","shape":[NaN],"data_offsets":[0,8]}}',
        b'{"a":{"dtype":"F32","shape":[Infinity],"data_offsets":[0,8]}}',
        b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}',
        b"\xff" + b" " * 7,
        b"[" * 100_000,
        b"",
    ],
    ids=["duplicate-tensor", "duplicate-field", "nan", "infinity", "truncated-json",
         "not-utf8", "deep-nesting", "empty"],
)  # fmt: skip
def test_parse_header_rejects_raw_json(raw: bytes) -> None:
    with pytest.raises(ckptguard.CorruptCheckpoint):
        _parse(_st_bytes(raw, bytes(8)))


@pytest.mark.parametrize(
    "length",
    [MAX_HEADER_BYTES + 1, 2**40, 2**64 - 1, 10_000],
    ids=["cap+1", "1TiB", "u64-max", "past-end"],
)
def test_parse_header_rejects_huge_or_overlong_length(length: int) -> None:
    header, data = _valid_file()
    buf = struct.pack("<Q", length) + _st_bytes(header, data)[8:]
    assert length > len(buf)
    with pytest.raises(ckptguard.CorruptCheckpoint):
        _parse(buf)
    with pytest.raises(ckptguard.CorruptCheckpoint):  # a caller claiming a huge file: the
        parse_header(buf, 2**41, "x.safetensors")  # cap, or the short prefix, still rejects


def test_parse_header_rejects_every_truncation() -> None:
    header, data = _valid_file()
    buf = _st_bytes(header, data)
    for n in range(len(buf)):
        with pytest.raises(ckptguard.CorruptCheckpoint):
            parse_header(buf[:n], n, "x.safetensors")


def test_parse_header_byte_flips() -> None:
    header, data = _valid_file()
    buf = _st_bytes(header, data)
    # Specific flips that must be caught: the length, the opening brace, a dtype letter,
    # an offset digit (size no longer matches the shape).
    for pos in [1, 7, 8, buf.index(b"F32"), buf.index(b"16, 24") + 1]:
        bad = bytearray(buf)
        bad[pos] ^= 0x04
        with pytest.raises(ckptguard.CorruptCheckpoint):
            _parse(bytes(bad))
    # Any single flip anywhere in the header: rejected or still a consistent header.
    data_start = len(buf) - len(data)
    for pos in range(data_start):
        for bit in (0x01, 0x80):
            bad = bytearray(buf)
            bad[pos] ^= bit
            try:
                start, infos, _ = _parse(bytes(bad))
            except ckptguard.CorruptCheckpoint:
                continue
            assert all(0 <= i.begin <= i.end <= len(bad) - start for i in infos)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300), st.integers(min_value=0, max_value=2**64 - 1))
def test_fuzz_parse_header_arbitrary_bytes(blob: bytes, claimed_size: int) -> None:
    for buf, size in ((blob, len(blob)), (blob, claimed_size)):
        with contextlib.suppress(ckptguard.CorruptCheckpoint):
            _parse_sized(buf, size)


def _parse_sized(buf: bytes, size: int) -> None:
    start, infos, meta = parse_header(buf, size, "x.safetensors")
    assert start >= 8
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    previous = 0
    for info in infos:
        assert previous <= info.begin <= info.end <= size - start
        previous = info.end


JSON_LEAVES = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5)
JSON = st.recursive(
    JSON_LEAVES,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=10,
)
DTYPE = st.sampled_from(sorted(DTYPE_SIZES)) | JSON
SHAPE = st.lists(st.integers(min_value=-2, max_value=2**63), max_size=3) | JSON
OFFSETS = st.lists(st.integers(min_value=-2, max_value=64), min_size=2, max_size=2) | JSON
ENTRY = st.fixed_dictionaries({"dtype": DTYPE, "shape": SHAPE, "data_offsets": OFFSETS}) | JSON


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(st.text(max_size=4), ENTRY, max_size=4),
    st.none() | JSON,
    st.binary(max_size=64),
)
def test_fuzz_parse_header_structured(entries: dict[str, Any], meta: Any, data: bytes) -> None:
    header = dict(entries)
    if meta is not None:
        header["__metadata__"] = meta
    raw = json.dumps(header).encode()
    for buf in (_st_bytes(raw, data), _st_bytes(raw, data, pad=False)):
        with contextlib.suppress(ckptguard.CorruptCheckpoint):
            _parse_sized(buf, len(buf))


@pytest.mark.parametrize("dtype", [[], {}, ["F32"]], ids=["list", "dict", "list-f32"])
def test_parse_header_unhashable_dtype(dtype: Any) -> None:
    with pytest.raises(ckptguard.CorruptCheckpoint):
        _parse(_st_bytes({"a": _tensor(dtype=dtype)}, bytes(8)))


# -- corrupt safetensors end to end --------------------------------------------------------

W_TREE = {"model": {"w": {"__tensor__": {"file": "model.safetensors", "name": "w"}}}}


@pytest.mark.parametrize(
    "header",
    [
        {"w": _tensor(offsets=(0, 16))},
        {"w": _tensor(shape=(3,))},
        {"w": _tensor(dtype="Q8")},
        {"w": _tensor(), "v": _tensor(shape=(1,), offsets=(4, 8))},
        {"w": _tensor(shape=(-1,))},
        struct.pack("<Q", 2**40),
    ],
    ids=["out-of-bounds", "size-mismatch", "unknown-dtype", "overlap", "negative-shape",
         "huge-length"],
)  # fmt: skip
def test_malicious_safetensors_with_valid_manifest_is_rejected_by_restore(
    tmp_path: Path, header: Any
) -> None:
    root = tmp_path / "run"
    good = _manager(root)
    good.save(1, {"model": {"w": torch.full((2,), 7.0)}})
    bad = header + bytes(8) if isinstance(header, bytes) else _st_bytes(header, bytes(8))
    _commit_raw(
        root, 2, {"model.safetensors": bad, STATE_NAME: _state_doc(["model.safetensors"], W_TREE)}
    )
    mgr = _manager(root)
    with pytest.raises(ckptguard.CorruptCheckpoint, match=r"model\.safetensors"):
        mgr.restore(step=2)
    target = {"model": {"w": torch.zeros(2)}}
    w = target["model"]["w"]
    out = mgr.restore(target=target)  # checkpoint-2 skipped: the older one loads in place
    assert out["model"]["w"] is w
    assert w.tolist() == [7.0, 7.0]


def test_state_json_referring_to_a_missing_tensor_is_rejected(tmp_path: Path) -> None:
    tree = {"model": {"w": {"__tensor__": {"file": "model.safetensors", "name": "nope"}}}}
    _commit_raw(tmp_path, 1, {
        "model.safetensors": safetensors.torch.save({"w": torch.ones(2)}),
        STATE_NAME: _state_doc(["model.safetensors"], tree),
    })  # fmt: skip
    with pytest.raises(ckptguard.CorruptCheckpoint, match="missing tensor"):
        _manager(tmp_path).restore(step=1)


# -- target mismatches, corrupt checkpoints and fallback -----------------------------------


def test_restore_into_mismatched_target_raises_a_clear_error(tmp_path: Path) -> None:
    mgr = _manager(tmp_path / "run")
    torch.manual_seed(0)
    mgr.save(1, {"model": _mlp(), "w": torch.zeros(2, 3), "arr": np.zeros(3)})

    with pytest.raises(TargetMismatch, match=r"\(32, 8\).*\(16, 8\)"):
        mgr.restore(
            target={
                "model": nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(), nn.Linear(16, 1))
            }
        )
    with pytest.raises(ValueError, match=r"state\['w'\].*\(2, 3\).*\(3, 2\)"):
        mgr.restore(target={"w": torch.zeros(3, 2)})
    with pytest.raises(ValueError, match=r"state\['w'\].*float64"):
        mgr.restore(target={"w": torch.zeros(2, 3, dtype=torch.float64)})
    with pytest.raises(ValueError, match=r"state\['arr'\]"):
        mgr.restore(target={"arr": np.zeros(3, dtype=np.float32)})
    with pytest.raises(TargetMismatch, match="nope"):
        mgr.restore(target={"nope": torch.zeros(1)})


Corruption = Callable[[Path], None]


def _flip_data_byte(ckpt: Path) -> None:
    path = ckpt / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(ckpt: Path) -> None:
    path = ckpt / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-3])


def _flip_header_byte(ckpt: Path) -> None:
    path = ckpt / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8] ^= 0x20
    path.write_bytes(bytes(data))


def _remove_state(ckpt: Path) -> None:
    (ckpt / STATE_NAME).unlink()


def _edit_state(ckpt: Path) -> None:
    path = ckpt / STATE_NAME
    path.write_bytes(path.read_bytes().replace(b'"step": ', b'"step": 9'))


CORRUPTIONS: dict[str, Corruption] = {
    "flipped-data": _flip_data_byte,
    "flipped-header": _flip_header_byte,
    "truncated": _truncate,
    "state-removed": _remove_state,
    "state-edited": _edit_state,
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_corrupt_newest_is_skipped_in_favour_of_the_previous(
    tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "run"
    mgr = _manager(root)
    for step in (1, 2, 3):
        mgr.save(step, {"model": {"w": torch.full((4,), float(step))}, "step": step})
    assert b'"step": 3' in (root / "checkpoint-3" / STATE_NAME).read_bytes()
    CORRUPTIONS[kind](root / "checkpoint-3")

    with pytest.raises(ckptguard.CorruptCheckpoint):
        mgr.restore(step=3)
    target = {"model": {"w": torch.zeros(4)}}
    with pytest.raises(ckptguard.CorruptCheckpoint):
        mgr.restore(step=3, target=target)
    assert target["model"]["w"].tolist() == [0.0] * 4  # never touched by a corrupt one

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ckptguard.manager"):
        out = mgr.restore(target=target)
    assert out["step"] == 2
    assert target["model"]["w"].tolist() == [2.0] * 4
    skipped = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(skipped) == 1
    assert str(root / "checkpoint-3") in skipped[0].getMessage()

    for step in (1, 2):
        CORRUPTIONS[kind](root / f"checkpoint-{step}")
    with pytest.raises(ckptguard.NoValidCheckpoint, match="checkpoint-1"):
        mgr.restore()


def test_empty_root_and_missing_step(tmp_path: Path) -> None:
    mgr = _manager(tmp_path / "run")
    with pytest.raises(ckptguard.NoValidCheckpoint):
        mgr.restore()
    with pytest.raises(ckptguard.CheckpointNotFound):
        mgr.restore(step=5)
