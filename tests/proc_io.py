"""Bytes this process has written so far (``wchar`` of /proc/self/io), for tests that count a
save's writes: every write(2) the process made, to any file, page cache or not."""

from __future__ import annotations

from pathlib import Path


def wchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise AssertionError("no wchar in /proc/self/io")
