"""A quarantine entry's note: why something was moved to ``.ckptguard/quarantine``.

The commit writes the note (``<entry>.json``, fsynced) before it moves the entry there
(``rename.py: quarantine``), so every entry ckptguard quarantined has one. Read here for
``ckptguard clean``, which shows the reason before deleting. A note is small JSON written
by ckptguard, but it lies in a directory anyone could write to: it is read capped and
parsed as data only, and a missing or odd note is "no reason recorded", never an error.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass

from ckptguard._format.layout import QUARANTINE_REASON_SUFFIX

__all__ = ["MAX_NOTE_BYTES", "QuarantineNote", "note_path", "read_note"]

MAX_NOTE_BYTES = 64 * 1024  # a reason and two paths; anything larger is not our note


@dataclass(frozen=True)
class QuarantineNote:
    """What the commit recorded when it moved an entry to quarantine."""

    reason: str
    original: str | None = None  # where the entry stood
    by_save: str | None = None  # the save id of the commit that moved it


def note_path(entry: str) -> str:
    """The note of the quarantine entry at ``entry`` (a sibling file)."""
    return entry.rstrip("/" + os.sep) + QUARANTINE_REASON_SUFFIX


def read_note(entry: str) -> QuarantineNote | None:
    """The note of a local quarantine entry, or None (missing, too big, not a note)."""
    path = note_path(entry)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        data = b""
        while len(data) <= MAX_NOTE_BYTES and (chunk := os.read(fd, MAX_NOTE_BYTES + 1)):
            data += chunk
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(data) > MAX_NOTE_BYTES:
        return None
    try:
        doc = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError):
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("reason"), str):
        return None
    original, by_save = doc.get("original"), doc.get("by_save")
    return QuarantineNote(
        reason=doc["reason"],
        original=original if isinstance(original, str) else None,
        by_save=by_save if isinstance(by_save, str) else None,
    )
