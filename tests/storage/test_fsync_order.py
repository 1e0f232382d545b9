"""The fsync discipline of the commit, read from the real syscalls (strace).

DESIGN.md: fsync every file, write+fsync the manifest, fsync the staging dir, rename(2)
it to its final name, fsync ROOT. This test traces a real save and checks that order.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

CHILD = """
import sys, ckptguard
from pathlib import Path
with ckptguard.atomic_checkpoint(Path(sys.argv[1]) / "checkpoint-1") as d:
    (d / "a.bin").write_bytes(b"a" * 1000)
    (d / "sub").mkdir()
    (d / "sub" / "b.bin").write_bytes(b"b")
"""

_FSYNC = re.compile(r"^\d+\s+fsync\(\d+<(?P<path>[^>]*)>\)\s+=\s+0")
_RENAME = re.compile(
    r'^\d+\s+renameat2\(AT_FDCWD<[^>]*>, "(?P<src>[^"]+)", AT_FDCWD<[^>]*>, "(?P<dst>[^"]+)", '
    r"(?P<flags>[A-Z_]+)\)\s+=\s+0"
)


def _trace(tmp_path: Path) -> list[tuple[str, str, str]]:
    strace = shutil.which("strace")
    assert strace, "strace is required (CI installs it: apt-get install strace)"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    log = tmp_path / "trace.log"
    subprocess.run(
        [
            strace,
            "-f",
            "-y",
            "-e",
            "trace=fsync,renameat2",
            "-o",
            str(log),
            sys.executable,
            str(script),
            str(tmp_path / "root"),
        ],
        check=True,
        timeout=120,
    )
    events = []
    for line in log.read_text().splitlines():
        if m := _FSYNC.match(line):
            events.append(("fsync", m["path"], ""))
        elif m := _RENAME.match(line):
            events.append(("rename", m["src"], m["dst"] + " " + m["flags"]))
    return events


def test_commit_syscall_order(tmp_path: Path) -> None:
    events = _trace(tmp_path)
    root = str(tmp_path / "root")
    final_rename = next(
        i
        for i, e in enumerate(events)
        if e[0] == "rename" and e[2].startswith(root + "/checkpoint-1 ")
    )
    staging = events[final_rename][1]
    assert events[final_rename][2].endswith("RENAME_NOREPLACE")

    def index(kind: str, path: str) -> int:
        hits = [i for i, e in enumerate(events) if e[0] == kind and e[1] == path]
        assert len(hits) == 1, (kind, path, events)
        return hits[0]

    file_a = index("fsync", f"{staging}/a.bin")
    file_b = index("fsync", f"{staging}/sub/b.bin")
    subdir = index("fsync", f"{staging}/sub")
    manifest_tmp = index("fsync", f"{staging}/.ckptguard.json.tmp")
    manifest_rename = index("rename", f"{staging}/.ckptguard.json.tmp")
    staging_dir = index("fsync", staging)
    root_sync = index("fsync", root)
    assert max(file_a, file_b) < subdir < manifest_tmp < manifest_rename
    assert events[manifest_rename][2].startswith(f"{staging}/ckptguard.json ")
    assert manifest_rename < staging_dir < final_rename < root_sync
