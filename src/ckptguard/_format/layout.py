"""Every name of the on-disk contract, and the rules for making and reading them.

::

    ROOT/
      checkpoint-100/                      committed (never visible before it is complete)
        ...user files...
        ckptguard.json                     the manifest, written and fsynced last
      .ckptguard/                          mode 0700
        lock                               file lock serialising commits and cleanup
        staging/checkpoint-200.<save_id>/  a save in progress, or left by a crash
          .ckptguard-owner.json            who is writing it (removed when sealed)
        trash/checkpoint-100.<save_id>/    a replaced checkpoint, until the replace is published
        quarantine/<name>.<save_id>/       anything that stood in a checkpoint's way
        quarantine/<name>.<save_id>.json   why it was moved there
        pins/<name>                        kept whatever the retention policy says
        runs/<run>/<host>-<pid>            a live run's process (flock held while open)

A save id is unique across processes, hosts and runs: UTC time, a short hash of the
host, the pid and 64 random bits. It sorts by creation time.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import re
import secrets
import socket
from dataclasses import dataclass

from ckptguard._errors import InvalidCheckpointName

__all__ = [
    "ACCELERATE_NAMING",
    "CHECKPOINT_PREFIX",
    "HF_NAMING",
    "LOCK_NAME",
    "MANIFEST_NAME",
    "MANIFEST_TMP_NAME",
    "META_DIR",
    "OWNER_NAME",
    "PINS_DIR",
    "QUARANTINE_DIR",
    "RESERVED_NAMES",
    "RETIRED_SUFFIX",
    "RUNS_DIR",
    "STAGING_DIR",
    "STATE_NAME",
    "TRASH_DIR",
    "Naming",
    "RootLayout",
    "checkpoint_name",
    "host_hash",
    "is_save_id",
    "new_save_id",
    "parse_staging_name",
    "save_id_writer",
    "staging_name",
    "step_from_name",
    "validate_name",
]

MANIFEST_NAME = "ckptguard.json"
STATE_NAME = "state.json"  # CheckpointManager's tree of a saved state (serialization.py)
RETIRED_SUFFIX = ".retired"  # trash entries deleted by retention: removed, never restored
MANIFEST_TMP_NAME = ".ckptguard.json.tmp"
OWNER_NAME = ".ckptguard-owner.json"
META_DIR = ".ckptguard"
STAGING_DIR = "staging"
TRASH_DIR = "trash"
QUARANTINE_DIR = "quarantine"
LOCK_NAME = "lock"
RUNS_DIR = "runs"  # ROOT/.ckptguard/runs/<run>/<host>-<pid>: a live run's processes
PINS_DIR = "pins"  # ROOT/.ckptguard/pins/<name>: pinned after its save (CheckpointManager.pin)
CHECKPOINT_PREFIX = "checkpoint-"
QUARANTINE_REASON_SUFFIX = ".json"

# Names inside a checkpoint that belong to ckptguard, never to user data.
RESERVED_NAMES = frozenset({MANIFEST_NAME, MANIFEST_TMP_NAME, OWNER_NAME})

# The longest name whose every derived name still fits NAME_MAX (255 bytes): staging,
# trash and quarantine entries are "<name>.<save id>" (a save id is at most 56 bytes:
# 22 of time, 8 of host hash, a pid of up to 7 digits, 16 random, 3 dashes), plus
# ".retired" (8) or a quarantine note's ".json" (5). A longer name was accepted and then
# could not be quarantined (ENAMETOOLONG, issue 15).
MAX_SAVE_ID_LENGTH = 56
MAX_NAME_LENGTH = 255 - 1 - MAX_SAVE_ID_LENGTH - len(RETIRED_SUFFIX)
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=-]*")  # "=": Lightning's epoch=1-step=20.ckpt
# <UTC yyyymmddThhmmssffffff>Z-<host hash>-<pid>-<random>
_SAVE_ID_RE = re.compile(r"\d{8}T\d{12}Z-[0-9a-f]{8}-\d+-[0-9a-f]{16}")
_STAGING_RE = re.compile(rf"(?P<name>.+)\.(?P<save_id>{_SAVE_ID_RE.pattern})")


def host_hash() -> str:
    """This host's part of a save id."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def new_save_id() -> str:
    """A fresh save id: sortable by time, unique across processes, hosts and runs."""
    now = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
    return f"{now}-{host_hash()}-{os.getpid()}-{secrets.token_hex(8)}"


def save_id_writer(save_id: str) -> tuple[str, int] | None:
    """(host hash, pid) of the process that made ``save_id``; None if it is not a save id."""
    if not is_save_id(save_id):
        return None
    _, host, pid, _ = save_id.split("-")
    return host, int(pid)


def is_save_id(text: str) -> bool:
    """Whether ``text`` has the shape of a save id made by :func:`new_save_id`."""
    return _SAVE_ID_RE.fullmatch(text) is not None


def validate_name(name: str) -> str:
    """Return ``name`` if it is one safe path component usable as a checkpoint name."""
    if (
        not isinstance(name, str)
        or len(name) > MAX_NAME_LENGTH
        or _NAME_RE.fullmatch(name) is None
        or name in RESERVED_NAMES
        or name in {".", ".."}
    ):
        if isinstance(name, str) and len(name) > MAX_NAME_LENGTH:
            raise InvalidCheckpointName(
                f"checkpoint name of {len(name)} characters: at most {MAX_NAME_LENGTH} "
                "(the names ckptguard derives from it must fit the filesystem's 255)",
                path=name,
            )
        raise InvalidCheckpointName(f"invalid checkpoint name {name!r}", path=str(name))
    return name


def checkpoint_name(step: int) -> str:
    """The Hugging Face compatible name of a step: ``checkpoint-<step>``."""
    if step < 0:
        raise InvalidCheckpointName(f"step must be >= 0, got {step}")
    return f"{CHECKPOINT_PREFIX}{step}"


def step_from_name(name: str) -> int | None:
    """The step of a ``checkpoint-<step>`` name (ASCII digits only), or None otherwise."""
    return HF_NAMING.step(name)


@dataclass(frozen=True)
class Naming:
    """How a root names its step checkpoints: ``<prefix><step>``.

    Hugging Face's Trainer uses ``checkpoint-<step>`` (the default); Accelerate's automatic
    checkpoint naming uses ``checkpoint_<iteration>``.
    """

    prefix: str = CHECKPOINT_PREFIX

    def __post_init__(self) -> None:
        validate_name(f"{self.prefix}0")

    def name(self, step: int) -> str:
        """The name of ``step``."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise InvalidCheckpointName(f"step must be an int >= 0, got {step!r}")
        return f"{self.prefix}{step}"

    def step(self, name: str) -> int | None:
        """The step of a name of this scheme, or None for any other name."""
        rest = name.removeprefix(self.prefix)
        if rest == name or not rest.isascii() or not rest.isdigit():
            return None
        return int(rest)


HF_NAMING = Naming(CHECKPOINT_PREFIX)
ACCELERATE_NAMING = Naming("checkpoint_")


def staging_name(name: str, save_id: str) -> str:
    """The staging directory name of a save: ``<name>.<save_id>``."""
    return f"{validate_name(name)}.{save_id}"


def parse_staging_name(entry: str) -> tuple[str, str] | None:
    """Split a staging, trash or quarantine entry into (name, save_id); None if not ours."""
    match = _STAGING_RE.fullmatch(entry)
    if match is None:
        return None
    name = match.group("name")
    try:
        validate_name(name)
    except InvalidCheckpointName:
        return None
    return name, match.group("save_id")


@dataclass(frozen=True)
class RootLayout:
    """Absolute paths of a root's fixed entries."""

    root: str

    @property
    def meta(self) -> str:
        return os.path.join(self.root, META_DIR)

    @property
    def staging(self) -> str:
        return os.path.join(self.root, META_DIR, STAGING_DIR)

    @property
    def trash(self) -> str:
        return os.path.join(self.root, META_DIR, TRASH_DIR)

    @property
    def quarantine(self) -> str:
        return os.path.join(self.root, META_DIR, QUARANTINE_DIR)

    @property
    def lock(self) -> str:
        return os.path.join(self.root, META_DIR, LOCK_NAME)

    def final(self, name: str) -> str:
        return os.path.join(self.root, validate_name(name))

    def staging_dir(self, name: str, save_id: str) -> str:
        return os.path.join(self.staging, staging_name(name, save_id))
