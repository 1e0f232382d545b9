"""Incremental saves: bytes a committed checkpoint already holds are linked, not written.

The unit of reuse is a whole file, known by its size and xxh3-128, which every manifest
already records. A file of a new save whose content equals a file of a committed
checkpoint of the same root is not written again: the new checkpoint gets a reflink of
it where the filesystem has them (btrfs, XFS: a new inode sharing the extents,
copy-on-write) and a hard link otherwise (the same inode under a second name). Either
way each checkpoint stays a complete directory whose manifest lists every byte it needs,
so a reader, ``verify`` and ``restore`` see nothing new, and deleting any checkpoint
(retention, ``ckptguard clean``, ``rm -rf``) only drops names: the others keep the data.

Which files are looked at before they are written (hashed from memory; linked when a
committed file matches, written otherwise):

- a module's frozen parameters, which the state format puts in a file of their own
  (``<key>.frozen.safetensors``, see ``serialization._Encoder._module``);
- any file that was unchanged at this manager's previous save (buffers, a reference
  model in a plain dict, an optimizer of frozen parts).

Every other file is written and hashed as before (no cost where everything changes);
one that turns out equal to a committed file is remembered, so the next save looks at
it first. Files under ``MIN_BYTES`` are always written: a link saves nothing there.

Durability: a link is a new name in the staging dir, made durable by the seal's fsync
of that directory like every file's name; the data it names was fsynced when its first
checkpoint was committed. A source that disappears before it is linked (retention or a
cleanup removed it) is written instead.

The trade-off (docs/incremental.md): a shared file is one copy on disk, so a bit flip in
it damages every checkpoint that shares it. ``full_every`` bounds how many: every N-th
save is written in full.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ckptguard._storage.faults import fault_point

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from ckptguard._format.manifest import Manifest
    from ckptguard._storage.base import FileDigest, Storage

__all__ = [
    "FROZEN_SUFFIX",
    "MIN_BYTES",
    "Incremental",
    "Reuse",
    "link_unchanged_files",
    "owned_and_shared",
    "shared_files",
]

_log = logging.getLogger("ckptguard.incremental")

MIN_BYTES = 64 * 1024
FROZEN_SUFFIX = ".frozen.safetensors"
LINK_SUFFIX = ".ckptguard-link"  # a link made beside a framework's file, then renamed over it


@dataclass
class Reuse:
    """One save's view of what it may link: committed files by (size, checksum)."""

    sources: dict[tuple[int, str], str]  # -> the absolute path of a committed file
    expect_same: set[str]  # files unchanged at the previous save: hashed before writing
    try_reflink: bool = True
    linked: dict[str, str] = field(default_factory=dict)  # file -> how ("hardlink", ...)
    linked_bytes: int = 0
    same: set[str] = field(default_factory=set)  # files equal to a committed one

    def __post_init__(self) -> None:
        self._sizes = {size for size, _ in self.sources}

    def likely_same(self, file: str) -> bool:
        """Whether ``file`` is likely unchanged: frozen parameters, or unchanged last time."""
        return file.endswith(FROZEN_SUFFIX) or file in self.expect_same

    def worth_hashing(self, file: str, size: int) -> bool:
        """Whether to hash ``file`` from memory first: likely unchanged, and a match may exist."""
        return self.may_match(size) and self.likely_same(file)

    def may_match(self, size: int) -> bool:
        """Whether a committed file of ``size`` bytes exists to link to (a cheap test)."""
        return size >= MIN_BYTES and size in self._sizes

    def link(self, file: str, digest: FileDigest, dest: str, storage: Storage) -> bool:
        """Link ``dest`` to a committed file with ``digest``; False: write it instead."""
        source = self.sources.get((digest.size, digest.checksum))
        if source is None:
            return False
        size_of = getattr(storage, "size_of", None)  # an object store's
        try:  # a cheap check that it is still the regular file its manifest lists
            if size_of is not None:
                size = size_of(source)
            else:
                st = os.stat(source, follow_symlinks=False)
                size = st.st_size if stat.S_ISREG(st.st_mode) else -1  # never a symlink
        except OSError:
            return False
        if size != digest.size:
            return False
        link = getattr(storage, "link_file", None)  # local storages have it
        how = None if link is None else link(source, dest, try_reflink=self.try_reflink)
        if how is None:
            return False
        if how == "hardlink":
            self.try_reflink = False  # this filesystem has no reflinks: stop asking
        self.linked[file] = how
        self.linked_bytes += digest.size
        self.same.add(file)
        return True

    def written(self, digests: dict[str, FileDigest]) -> None:
        """Note which written files turned out equal to a committed one (for next time)."""
        for file, digest in digests.items():
            if (digest.size, digest.checksum) in self.sources:
                self.same.add(file)


class Incremental:
    """A manager's incremental saves: which committed files to link, and when to write all.

    ``full_every``: every N-th save is written in full (no links), so one damaged
    shared file reaches at most N checkpoints. The count is kept in each manifest
    (``ckptguard.incremental.chain``: saves since the last full one).
    """

    def __init__(self, full_every: int) -> None:
        if isinstance(full_every, bool) or not isinstance(full_every, int) or full_every < 1:
            raise ValueError(f"full_every must be a positive int, got {full_every!r}")
        self.full_every = full_every
        self.expect_same: set[str] = set()
        self.try_reflink = True
        self._cache: dict[str, tuple[tuple[int, int], Manifest]] = {}

    def plan(
        self, checkpoints: Iterable[str], read: Callable[[str], Manifest] | None = None
    ) -> tuple[Reuse | None, int]:
        """This save's :class:`Reuse` (None: a full save) and its chain count.

        ``checkpoints``: the paths of the root's committed checkpoints, newest first;
        ``read``: how to read a manifest of an object store (local ones are cached by
        their inode and mtime). On an object store only the newest checkpoint is a
        source: a file unchanged since the last save is in it, and a save then reads one
        manifest at most (none once cached), however many checkpoints the root holds.
        """
        paths = list(checkpoints)
        if read is not None:
            paths = paths[:1]
        for gone in set(self._cache) - set(paths):
            del self._cache[gone]
        manifests = [(path, m) for path in paths if (m := self._manifest(path, read))]
        newest_chain = _chain(manifests[0][1]) if manifests else None
        if newest_chain is None or newest_chain + 1 >= self.full_every:
            return None, 0
        sources: dict[tuple[int, str], str] = {}
        for path, manifest in reversed(manifests):  # newest last: it wins a tie
            for entry in manifest.files:
                if entry.size >= MIN_BYTES:
                    sources[(entry.size, entry.checksum)] = os.path.join(path, entry.path)
        reuse = Reuse(sources, set(self.expect_same), try_reflink=self.try_reflink)
        return reuse, newest_chain + 1

    def learn(self, reuse: Reuse | None, files: Iterable[tuple[str, int, str]]) -> None:
        """After a framework save: which of its files (rel, size, checksum) were unchanged."""
        if reuse is None:
            return
        reuse.same.update(rel for rel, size, checksum in files if (size, checksum) in reuse.sources)
        self.done(reuse)

    def done(self, reuse: Reuse | None) -> None:
        """After a save: remember what was unchanged, and whether reflinks work here."""
        if reuse is None:
            return
        self.expect_same = set(reuse.same)
        self.try_reflink = reuse.try_reflink

    def _manifest(self, path: str, read: Callable[[str], Manifest] | None) -> Manifest | None:
        from ckptguard._format.layout import MANIFEST_NAME  # noqa: PLC0415
        from ckptguard._protocol.api import read_manifest  # noqa: PLC0415

        if read is not None:  # an object store: a manifest is replaced only with its name's
            cached = self._cache.get(path)  # save id prefix, so a stale entry fails its copy
            if cached is not None:
                return cached[1]
            with contextlib.suppress(Exception):
                manifest = read(path)
                self._cache[path] = ((0, 0), manifest)
                return manifest
            return None
        try:
            st = os.stat(os.path.join(path, MANIFEST_NAME))
        except OSError:
            return None
        key = (st.st_ino, st.st_mtime_ns)
        cached = self._cache.get(path)
        if cached is not None and cached[0] == key:
            return cached[1]
        with contextlib.suppress(Exception):  # a bad manifest: not a source
            manifest = read_manifest(path)
            self._cache[path] = (key, manifest)
            return manifest
        return None


def _chain(manifest: Manifest) -> int | None:
    """Saves since the last full one, as the manifest records it (None: not recorded)."""
    flags = manifest.metadata.get("ckptguard")
    if not isinstance(flags, dict):
        return None
    inc = flags.get("incremental")
    if not isinstance(inc, dict):
        return 0 if flags.get("kind") == "state" else None
    chain = inc.get("chain")
    return chain if isinstance(chain, int) and not isinstance(chain, bool) else None


def shared_files(checkpoint: str, manifest: Manifest) -> set[str] | None:
    """The files of a local checkpoint that share their bytes with another checkpoint.

    A file with more than one name on disk (a hard link), or one this checkpoint's save
    reflinked (as its manifest records: a reflink cannot be told from a copy afterwards,
    so it counts as shared even once the other checkpoint is gone). None where the
    checkpoint is not a local directory (an object store).
    """
    if not os.path.isdir(checkpoint):
        return None
    shared = set(_linked_in(manifest))
    for entry in manifest.files:
        with contextlib.suppress(OSError):
            if os.stat(os.path.join(checkpoint, entry.path), follow_symlinks=False).st_nlink > 1:
                shared.add(entry.path)
    return shared


def _linked_in(manifest: Manifest) -> list[str]:
    flags = manifest.metadata.get("ckptguard")
    inc = flags.get("incremental") if isinstance(flags, dict) else None
    if not isinstance(inc, dict) or inc.get("linked_by") != "reflink":
        return []  # hard links show on disk (their link count), as they are now
    linked = inc.get("linked_files")
    return [f for f in linked if isinstance(f, str)] if isinstance(linked, list) else []


def owned_and_shared(checkpoint: str, manifest: Manifest) -> tuple[int, int] | None:
    """(bytes this checkpoint owns alone, bytes it shares with others); None off local disk."""
    shared = shared_files(checkpoint, manifest)
    if shared is None:
        return None
    shared_bytes = sum(f.size for f in manifest.files if f.path in shared)
    return manifest.total_size - shared_bytes, shared_bytes


def link_unchanged_files(
    staging_dir: str,
    reuse: Reuse,
    storage: Storage,
    known: dict[str, FileDigest],
    *,
    upload_to: str | None = None,
) -> None:
    """Files a framework wrote into ``staging_dir`` that equal a committed one: linked.

    Only files unchanged at the previous save are looked at (each is read back and
    hashed, from the page cache); each equal one is replaced by a link to the committed
    file and its digest put in ``known`` (the seal trusts it). Others are left to the
    seal, which hashes and fsyncs every file; :meth:`Incremental.learn` then notes from
    the manifest which files turned out unchanged, for the next save.

    ``upload_to``: on an object store, ``staging_dir`` is the local spool the commit
    uploads under that prefix; an equal file is copied there by the server instead
    (``storage.link_file``), and its spooled copy removed so that it is not uploaded.
    """
    from ckptguard._storage.local import LocalStorage  # noqa: PLC0415

    local = storage if upload_to is None else LocalStorage()  # where the files are now
    files, _dirs = local.walk_files(staging_dir)
    for rel in files:
        if rel in known or rel not in reuse.expect_same:
            continue
        path = os.path.join(staging_dir, rel)
        size = os.stat(path, follow_symlinks=False).st_size
        if not reuse.worth_hashing(rel, size):
            continue
        digest = local.hash_file(path, fsync=False)
        if (digest.size, digest.checksum) not in reuse.sources:
            continue
        if upload_to is not None:
            if not reuse.link(rel, digest, f"{upload_to}/{rel}", storage):
                continue
            os.unlink(path)
        else:
            # Linked beside it first: if the source went away meanwhile, the written file stays.
            spare = f"{path}{LINK_SUFFIX}"
            if not reuse.link(rel, digest, spare, storage):
                continue
            storage.remove_file(path)
            storage.rename_noreplace(spare, path)
        known[rel] = digest
        fault_point("reuse.linked")
