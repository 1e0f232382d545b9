"""Repeat one ckptguard operation on the benchmark's state, for a profiler to watch.

    py-spy record -o sync.svg -- python benchmarks/profile_save.py sync
    kernprof -l -v benchmarks/profile_save.py async        # line_profiler

Operations: ``sync`` (a durable save), ``async`` (the training thread's part: the
snapshot), ``restore`` (a cold verified restore into the existing tensors). Under
kernprof, the functions that matter to each are profiled line by line.
"""

from __future__ import annotations

import argparse
import builtins
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_save import drop_cache, gpt_like_state  # the same state as the benchmark

import ckptguard
from ckptguard._protocol import rename as commit
from ckptguard._state import serialization
from ckptguard._storage.local import LocalStorage


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("op", choices=["sync", "async", "restore"])
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    profile: Any = getattr(builtins, "profile", None)  # set by kernprof -l
    if profile is not None:
        for fn in (
            serialization.StagingBuffers.snapshot,
            serialization.encode_state,
            serialization._write_group,  # noqa: SLF001
            serialization.write_encoded,
            serialization.read_state,
            serialization._check_checksum,  # noqa: SLF001
            serialization._Lazy.fill,  # noqa: SLF001
            commit.seal,
        ):
            profile.add_function(fn)
        profile.enable_by_count()
    state = {"model": gpt_like_state(args.mib)}
    work = Path(tempfile.mkdtemp(prefix="ckptguard-profile-"))
    try:
        mgr = ckptguard.CheckpointManager(
            work / "run", keep_last=1, async_save=args.op == "async", storage=LocalStorage()
        )
        mgr.save(0, state, blocking=True)
        for i in range(1, args.repeat + 1):
            start = time.perf_counter()
            if args.op == "sync":
                mgr.save(i, state, blocking=True)
            elif args.op == "async":
                job = mgr.save(i, state, blocking=False)
                print(f"stall {job.stall_seconds:.3f} s")
                mgr.wait()
            else:
                drop_cache(work / "run")
                mgr.restore(target=state)
            print(f"{args.op} {i}: {time.perf_counter() - start:.3f} s", flush=True)
        mgr.close()
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
