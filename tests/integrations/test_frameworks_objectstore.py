"""The Trainer, Accelerate and Lightning saving to, and resuming from, a real S3 server (moto's).

Every run is a real training process (``hf_driver.py``, ``accel_driver.py``; tiny models,
no downloads), the store a real ``moto_server`` on 127.0.0.1. The runs are independent
chains, started together in one module fixture (two cores here), and checked at the end:

- ``hf``: a Trainer with a local output_dir, ``mirror="s3://..."`` and ``keep_last=2``
  trains 6 steps uninterrupted (the reference; checkpoints 4 and 6 kept, on the mirror
  too). The mirror's newest is corrupted in place (same size, one byte changed); a fresh
  process with ``output_dir=`` that prefix (an object-store root like any other) resumes
  with ``resume_from_checkpoint=True``: it must skip checkpoint-6 with a warning,
  download checkpoint-4 into its cache, and end bit-exact with the reference. Then the
  local output_dir is deleted (a fresh node), the newest corrupted again: the mirror run
  resumes from the mirror's checkpoint-4, bit-exact;
- ``hf_ranks``: two ranks under torchrun save to ``s3://`` exactly once per checkpoint
  (one manifest, objects exactly those it lists, both ranks' RNG files among them);
- ``accel``: Accelerate mirrored (the reference), then ``project_dir="s3://..."`` on the
  same prefix with its newest checkpoint corrupted: a run killed once its new save's data
  is uploaded (no manifest yet) leaves nothing visible; the next ``load_state()`` resumes
  from the checkpoint before the corrupt one, bit-exact; then the mirror run on a fresh
  node loads the mirror's newest;
- ``accel_ranks``: two ranks under torchrun save to ``s3://`` once per checkpoint, and
  two ranks of a fresh job load the newest from there (one download per node);
- ``lightning_s3``: the Lightning plugin with ``ModelCheckpoint(dirpath="s3://...")``:
  plain ``.ckpt`` objects with sidecar objects; the newest corrupted, the next run resumes
  from the one before (``last_valid_checkpoint(URL)``), bit-exact.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

import ckptguard
import driver_jobs
from ckptguard._format.layout import MANIFEST_NAME
from driver_jobs import Done
from s3_servers import KEY, SECRET, S3Server, start_moto

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

HERE = Path(__file__).parent
HF_STEPS = ["--steps", "6", "--save-steps", "2"]
pytestmark = pytest.mark.timeout(600)


class HFJob(driver_jobs.Job):
    driver = HERE / "hf_driver.py"


class AccelJob(driver_jobs.Job):
    driver = HERE / "accel_driver.py"


class LightningJob(driver_jobs.Job):
    driver = HERE / "lightning_driver.py"


@dataclass
class Runs:
    server: S3Server
    urls: dict[str, str]
    done: dict[str, Done] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)
    errors: list[BaseException] = field(default_factory=list)


def _corrupt(server: S3Server, url: str, rel: str) -> str:
    """Change one byte of the object ``rel`` of the checkpoint at ``url`` (same size)."""
    manifest = ckptguard.read_manifest(url, storage_options=server.storage_options)
    key = url.removeprefix(f"s3://{server.bucket}/") + f"/{manifest.save_id}/{rel}"
    client = server.client()
    data = bytearray(client.get_object(Bucket=server.bucket, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0xFF
    client.put_object(Bucket=server.bucket, Key=key, Body=bytes(data))
    return key


def _keys(server: S3Server, url: str) -> list[str]:
    prefix = url.removeprefix(f"s3://{server.bucket}/").rstrip("/") + "/"
    client = server.client()
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=server.bucket, Prefix=prefix
    ):
        keys += [o["Key"].removeprefix(prefix) for o in page.get("Contents", [])]
    return sorted(keys)


def _hf(runs: Runs, base: Path, env: dict[str, str]) -> None:
    """Mirror run (the reference), S3-output resume, fresh-node resume from the mirror.

    The mirror's prefix is an object-store root like any other: the S3-output run resumes
    from the checkpoints that the mirror run uploaded.
    """
    url, out = runs.urls["hf"], base / "hf3"
    mirrored = ["--mirror", url, "--cache", str(base / "cache-mirror"), "--keep-last", "2"]
    first = HFJob(out, *mirrored, *HF_STEPS, "--fresh", env=env, cwd=base)
    runs.done["hf3"] = driver_jobs.finish(first).ok()
    runs.notes["reference"] = (out / "final.json").read_bytes()
    runs.notes["hf3_local"] = sorted(p.name for p in out.glob("checkpoint-*"))
    runs.notes["mirror_keys"] = _keys(runs.server, url)
    # An object-store output_dir: checkpoint-6 corrupt on the store, resume from 4.
    _corrupt(runs.server, f"{url}/checkpoint-6", "optimizer.pt")
    cache = base / "cache-hf"
    second = HFJob(base / "hf2", "--output", url, "--cache", str(cache), *HF_STEPS, env=env,
                   cwd=base)  # fmt: skip
    runs.done["hf2"] = driver_jobs.finish(second).ok()
    runs.notes["hf_cache"] = sorted(p.name for p in cache.glob("*/*"))
    runs.notes["hf2_verified"] = _verified(runs, url)
    # A fresh node: the local output_dir is gone, the mirror's newest corrupt again.
    shutil.rmtree(out)
    _corrupt(runs.server, f"{url}/checkpoint-6", "model.safetensors")
    third = HFJob(out, *mirrored, *HF_STEPS, env=env, cwd=base)
    runs.done["hf4"] = driver_jobs.finish(third).ok()


def _hf_ranks(runs: Runs, base: Path, env: dict[str, str]) -> None:
    url = runs.urls["hf_ranks"]
    # Async saves (protect(trainer, async_save=True)): each rank uploads its own files from
    # the background thread and one manifest commits them, over the side channel.
    flags = ["--output", url, "--cache", str(base / "cache-ranks"), "--fresh", "--check-resume",
             "--async"]  # fmt: skip
    job = HFJob(base / "hf5", *flags, "--steps", "4", "--save-steps", "2", nproc=2, env=env,
                cwd=base)  # fmt: skip
    runs.done["hf5"] = driver_jobs.finish(job).ok()


def _accel(runs: Runs, base: Path, env: dict[str, str]) -> None:
    """Mirror run (reference), project_dir on S3 resuming past a corrupt newest, fresh node."""
    url, out = runs.urls["accel"], base / "a3"
    mirrored = ["--mirror", f"{url}/checkpoints", "--cache", str(base / "cache-accel-mirror")]
    runs.done["a3"] = driver_jobs.finish(AccelJob(out, *mirrored, env=env, cwd=base)).ok()
    runs.notes["accel_reference"] = (out / "final.json").read_bytes()
    _corrupt(runs.server, f"{url}/checkpoints/checkpoint_2", "model.safetensors")
    remote = ["--project", url, "--cache", str(base / "cache-accel")]
    # Killed once its re-save of checkpoint_2 is uploaded, before the manifest: invisible.
    killed = AccelJob(base / "a5", *remote, "--kill-at", "remote.data_uploaded:1", env=env,
                      cwd=base)  # fmt: skip
    runs.done["a5"] = driver_jobs.finish(killed)
    runs.notes["a5_keys"] = _keys(runs.server, f"{url}/checkpoints/checkpoint_2")
    runs.done["a2"] = driver_jobs.finish(AccelJob(base / "a2", *remote, env=env, cwd=base)).ok()
    shutil.rmtree(out / "checkpoints")  # a fresh node: the mirror's checkpoint_2 (re-saved)
    runs.done["a4"] = driver_jobs.finish(AccelJob(out, *mirrored, env=env, cwd=base)).ok()


def _accel_ranks(runs: Runs, base: Path, env: dict[str, str]) -> None:
    """Two ranks save to S3, then two ranks of a fresh job load the newest from there."""
    url = runs.urls["accel_ranks"]
    flags = ["--project", url, "--cache", str(base / "cache-accel-ranks"), "--steps", "20"]
    first = AccelJob(base / "a6", *flags, nproc=2, env=env, cwd=base)
    runs.done["a6"] = driver_jobs.finish(first).ok()
    second = AccelJob(base / "a7", *flags, nproc=2, env=env, cwd=base)
    runs.done["a7"] = driver_jobs.finish(second).ok()


def _ranks(runs: Runs, base: Path, env: dict[str, str]) -> None:
    _hf_ranks(runs, base, env)
    _accel_ranks(runs, base, env)


def _lightning_s3(runs: Runs, base: Path, env: dict[str, str]) -> None:
    url, cache = runs.urls["lightning_s3"], str(base / "cache-lightning")
    # Lightning's ModelCheckpoint lists dirpath with its own fsspec filesystem: AWS_* env.
    env = {
        **env,
        "AWS_ENDPOINT_URL": runs.server.endpoint,
        "AWS_ACCESS_KEY_ID": KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(base / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(base / "no-aws-credentials"),
    }
    flags = ["--dirpath", url, "--cache", cache]
    first = LightningJob(base / "l1", *flags, env=env, cwd=base)
    runs.done["l1"] = driver_jobs.finish(first).ok()
    runs.notes["l1_keys"] = _keys(runs.server, url)
    client, key = runs.server.client(), url.removeprefix(f"s3://{runs.server.bucket}/")
    data = bytearray(
        client.get_object(Bucket=runs.server.bucket, Key=f"{key}/step=30.ckpt")["Body"].read()
    )
    data[len(data) // 2] ^= 0xFF
    client.put_object(Bucket=runs.server.bucket, Key=f"{key}/step=30.ckpt", Body=bytes(data))
    second = LightningJob(base / "l2", *flags, env=env, cwd=base)
    runs.done["l2"] = driver_jobs.finish(second).ok()
    runs.notes["l2_cache"] = sorted(p.name for p in Path(cache).glob("*/*"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    moto = start_moto(tmp_path_factory.mktemp("moto"))
    try:
        yield moto
    finally:
        moto.stop()


@pytest.fixture(scope="module")
def runs(server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    base = tmp_path_factory.mktemp("frameworks")
    env = {
        "CKPTGUARD_STORAGE_OPTIONS": json.dumps(server.storage_options),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
    }
    tag = uuid.uuid4().hex[:8]
    # One torchrun job at a time: two launched at the same moment on 127.0.0.1 have been
    # seen to break each other's gloo connections before any checkpoint (1 run in 10).
    chains: dict[str, Callable[[Runs, Path, dict[str, str]], None]] = {
        "ranks": _ranks,
        "hf": _hf,
        "accel": _accel,
        "lightning_s3": _lightning_s3,
    }
    names = ["hf_ranks", "accel_ranks", "hf", "accel", "lightning_s3"]
    result = Runs(server, {name: server.url(f"{name}-{tag}") for name in names})
    result.notes["base"] = base

    def run(chain: Callable[[Runs, Path, dict[str, str]], None]) -> None:
        try:
            chain(result, base, env)
        except BaseException as exc:  # reported by the test that needs the chain
            result.errors.append(exc)

    threads = [threading.Thread(target=run, args=(c,)) for c in chains.values()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.notes["cwd"] = sorted(p.name for p in base.iterdir())
    return result


def _need(runs: Runs, *names: str) -> None:
    missing = [n for n in names if n not in runs.done]
    if missing:
        raise AssertionError(f"runs {missing} did not finish: {runs.errors!r}")


def _verified(runs: Runs, url: str) -> list[str]:
    names = []
    for key in _keys(runs.server, url):
        if key.endswith("/" + MANIFEST_NAME):
            name = key.split("/")[0]
            report = ckptguard.verify(f"{url}/{name}", storage_options=runs.server.storage_options)
            assert report.ok, report.problems
            names.append(name)
    return names


def test_trainer_resumes_from_s3_skipping_a_corrupt_newest_bit_exact(runs: Runs) -> None:
    _need(runs, "hf3", "hf2")
    second = runs.done["hf2"]
    assert second.resumed_from == "4"  # checkpoint-6 corrupt on the store: skipped
    assert "skipping" in second.stderr, second.stderr[-3000:]
    assert "checkpoint-6" in second.stderr, second.stderr[-3000:]
    assert second.final == runs.notes["reference"]  # bit-exact with the uninterrupted run
    # it saved checkpoint-6 again: every checkpoint on the store verifies
    assert runs.notes["hf2_verified"] == ["checkpoint-4", "checkpoint-6"]
    # the cache holds the one checkpoint resumed from; nothing named "s3:" was left behind
    assert runs.notes["hf_cache"] == ["checkpoint-4"]
    assert "s3:" not in runs.notes["cwd"]


def test_trainer_mirror_resumes_from_the_mirror_on_a_fresh_node(runs: Runs) -> None:
    _need(runs, "hf3", "hf4")
    assert runs.done["hf3"].resumed_from == "0"
    assert runs.notes["hf3_local"] == ["checkpoint-4", "checkpoint-6"]  # keep_last=2
    names = {k.split("/")[0] for k in runs.notes["mirror_keys"]}
    assert names == {"checkpoint-4", "checkpoint-6"}  # retention reached the mirror too
    fourth = runs.done["hf4"]
    assert fourth.resumed_from == "4", fourth.stderr[-3000:]  # mirror's 6 corrupt: skipped
    assert "skipping" in fourth.stderr, fourth.stderr[-3000:]
    assert fourth.final == runs.notes["reference"]
    assert _verified(runs, runs.urls["hf"]) == ["checkpoint-4", "checkpoint-6"]


def test_two_ranks_commit_each_s3_checkpoint_exactly_once(runs: Runs) -> None:
    """With async saves: each rank's files uploaded from its background thread."""
    _need(runs, "hf5")
    url = runs.urls["hf_ranks"]
    keys = _keys(runs.server, url)
    names = sorted({k.split("/")[0] for k in keys})
    assert names == ["checkpoint-2", "checkpoint-4"], keys
    for name in names:
        manifest = ckptguard.read_manifest(
            f"{url}/{name}", storage_options=runs.server.storage_options
        )
        mine = sorted(k.removeprefix(name + "/") for k in keys if k.startswith(name + "/"))
        listed = sorted([f.path for f in manifest.files] + [MANIFEST_NAME])
        assert mine == listed  # one manifest, no duplicate or orphan upload
        files = {f.path.removeprefix(manifest.save_id + "/") for f in manifest.files}
        assert {"rng_state_0.pth", "rng_state_1.pth", "model.safetensors"} <= files
    assert _verified(runs, url) == names
    # After training, each rank chose the checkpoint it would resume from: the same
    # download (made once on this node) of the newest one, which verifies locally.
    printed = runs.done["hf5"].stdout
    # (two ranks share torchrun's stdout: their lines may run together)
    chosen = re.findall(r"rank (\d) would resume from (/\S*?/checkpoint-\d+)", printed)
    assert sorted(r for r, _ in chosen) == ["0", "1"], runs.done["hf5"].stdout[-3000:]
    (path,) = {p for _, p in chosen}
    assert Path(path).name == "checkpoint-4"
    assert path.startswith(str(runs.notes["base"] / "cache-ranks"))
    assert ckptguard.verify(path).ok


def test_accelerate_loads_from_s3_skipping_a_corrupt_newest_bit_exact(runs: Runs) -> None:
    _need(runs, "a3", "a2")
    assert runs.done["a3"].resumed_from == "none"
    second = runs.done["a2"]
    assert second.resumed_from == "1", second.stderr[-3000:]  # checkpoint_2 corrupt: skipped
    assert "skipping" in second.stderr, second.stderr[-3000:]
    assert second.final == runs.notes["accel_reference"]


def test_accelerate_killed_mid_upload_leaves_the_store_resumable(runs: Runs) -> None:
    _need(runs, "a5", "a2")
    killed = runs.done["a5"]
    driver_jobs.assert_killed(killed, 1)
    assert killed.resumed_from == "1"
    # its upload is there under a second save id, but the manifest still names the old save
    save_ids = {k.split("/")[0] for k in runs.notes["a5_keys"] if "/" in k}
    assert len(save_ids) == 2, runs.notes["a5_keys"]
    assert runs.done["a2"].resumed_from == "1"  # still checkpoint_1: the killed save is invisible


def test_accelerate_two_ranks_save_to_s3_once_and_load_from_it(runs: Runs) -> None:
    _need(runs, "a6", "a7")
    url = f"{runs.urls['accel_ranks']}/checkpoints"
    keys = _keys(runs.server, url)
    for name in ("checkpoint_0", "checkpoint_1"):
        manifest = ckptguard.read_manifest(
            f"{url}/{name}", storage_options=runs.server.storage_options
        )
        mine = sorted(k.removeprefix(name + "/") for k in keys if k.startswith(name + "/"))
        assert mine == sorted([f.path for f in manifest.files] + [MANIFEST_NAME])
        files = {f.path.removeprefix(manifest.save_id + "/") for f in manifest.files}
        assert {"random_states_0.pkl", "random_states_1.pkl", "model.safetensors"} <= files
    second = runs.done["a7"]
    assert second.resumed_from == "1", second.stderr[-3000:]
    assert second.final == runs.done["a6"].final  # both ranks loaded the store's weights


def test_accelerate_mirror_loads_from_the_mirror_on_a_fresh_node(runs: Runs) -> None:
    _need(runs, "a3", "a4")
    fourth = runs.done["a4"]
    assert fourth.resumed_from == "2", fourth.stderr[-3000:]  # downloaded from the mirror
    assert fourth.final == runs.notes["accel_reference"]  # its weights, bit-exact


def test_lightning_plugin_saves_plain_files_with_sidecars_on_s3_and_resumes(runs: Runs) -> None:
    _need(runs, "l1", "l2")
    first, second = runs.done["l1"], runs.done["l2"]
    names = [f"step={n}.ckpt" for n in (10, 20, 30)]
    assert runs.notes["l1_keys"] == sorted([*names, *(f".{n}.ckptguard.json" for n in names)])
    assert first.resumed_from == "0"
    assert second.resumed_from == "20", second.stderr[-3000:]  # step=30 corrupt: skipped
    assert "skipping" in second.stderr, second.stderr[-3000:]
    assert second.final == first.final
    # the one checkpoint resumed from stays cached, with its sidecar
    assert runs.notes["l2_cache"] == [".step=20.ckpt.ckptguard.json", "step=20.ckpt"]


@pytest.mark.parametrize("which", ["transformers", "accelerate"])
def test_protect_takes_the_manager_options_that_apply_and_refuses_the_others(which: str) -> None:
    """Checked before anything else (no trainer needed): a clear TypeError naming why."""
    from ckptguard.integrations import accelerate, transformers

    protect: Any = transformers.protect if which == "transformers" else accelerate.protect
    with pytest.raises(TypeError, match=r"keep_best= \(the framework decides its best"):
        protect(object(), keep_best=2)
    with pytest.raises(TypeError, match=r"exit_timeout= \(process exit waits"):
        protect(object(), exit_timeout=5)
    with pytest.raises(TypeError, match="unexpected keyword argument 'mirrors'"):
        protect(object(), mirrors="s3://b/x")
    with pytest.raises(TypeError, match="mirror= must be an object-store URL"):
        protect(object(), mirror="/local/path")
    with pytest.raises(TypeError, match="keep_last= must be a positive int"):
        protect(object(), keep_last=0)
    # the options that apply pass this check and reach the framework check
    with pytest.raises(TypeError, match="needs"):
        protect(object(), mirror="s3://b/x", keep_last=2, verify_after_save=True,
                storage_options={"anon": True}, cache_dir="cache", async_save=True)  # fmt: skip


def test_resume_cache_keeps_one_checkpoint_and_reuses_an_intact_copy(
    server: S3Server, tmp_path: Path
) -> None:
    """A resume removes the cache's other entries (older checkpoints, cut downloads) and
    does not download again a copy that is intact and the same save."""
    from ckptguard._coordination.base import SingleProcess
    from ckptguard.integrations._remote import newest_to_resume

    url = server.url(f"cache-{uuid.uuid4().hex[:8]}")
    manager = ckptguard.CheckpointManager(
        url, storage_options=server.storage_options, coordinator=SingleProcess()
    )
    for step in (1, 2):

        def write(tx: Any, step: int = step) -> None:
            (tx.staging_dir / "w.bin").write_bytes(bytes([step]) * 1000)

        manager.save_files(step, write)
    cache = tmp_path / "cache"
    (cache / "checkpoint-1").mkdir(parents=True)  # an older resume's copy
    (cache / ".partial-checkpoint-2.x").mkdir()  # a download cut by a crash
    path = newest_to_resume(manager, str(cache))
    assert path == str(cache / "checkpoint-2")
    assert sorted(os.listdir(cache)) == ["checkpoint-2"]
    assert (cache / "checkpoint-2" / "w.bin").read_bytes() == bytes([2]) * 1000
    assert ckptguard.verify(path).ok
    inode = os.stat(cache / "checkpoint-2" / "w.bin").st_ino
    assert newest_to_resume(manager, str(cache)) == path  # intact, same save: reused
    assert os.stat(cache / "checkpoint-2" / "w.bin").st_ino == inode
    # a cached copy altered locally is not trusted: downloaded again
    (cache / "checkpoint-2" / "w.bin").write_bytes(bytes([9]) * 1000)
    assert newest_to_resume(manager, str(cache)) == path
    assert (cache / "checkpoint-2" / "w.bin").read_bytes() == bytes([2]) * 1000
    manager.close()
