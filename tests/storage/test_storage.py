from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import xxhash

import ckptguard
from ckptguard._storage.local import LocalStorage, renameat2_available


@pytest.fixture(params=[True, False], ids=["renameat2", "fallback"])
def storage(request: pytest.FixtureRequest) -> LocalStorage:
    return LocalStorage(use_renameat2=bool(request.param))


def test_renameat2_is_available_here() -> None:
    assert renameat2_available()


def test_write_bytes_checksums_while_writing(tmp_path: Path, storage: LocalStorage) -> None:
    data = os.urandom(3 * 1024 * 1024 + 7)
    digest = storage.write_bytes(str(tmp_path / "f"), data)
    assert digest.size == len(data)
    assert digest.checksum == xxhash.xxh3_128_hexdigest(data)
    assert (tmp_path / "f").read_bytes() == data
    assert storage.hash_file(str(tmp_path / "f")) == digest


def test_streaming_writer_accepts_buffers(tmp_path: Path, storage: LocalStorage) -> None:
    chunks: list[bytes | bytearray | memoryview] = [
        b"abc",
        bytearray(b"defg"),
        memoryview(b"0123456789")[2:8],
    ]
    writer = storage.open_write(str(tmp_path / "f"))
    for chunk in chunks:
        writer.write(chunk)
    digest = writer.close()
    expected = b"abcdefg234567"
    assert (tmp_path / "f").read_bytes() == expected
    assert digest.checksum == xxhash.xxh3_128_hexdigest(expected)


def test_writer_abort_removes_file(tmp_path: Path, storage: LocalStorage) -> None:
    writer = storage.open_write(str(tmp_path / "f"))
    writer.write(b"partial")
    writer.abort()
    assert not (tmp_path / "f").exists()


def test_never_writes_over_a_file_or_through_a_symlink(
    tmp_path: Path, storage: LocalStorage
) -> None:
    (tmp_path / "existing").write_bytes(b"keep")
    with pytest.raises(FileExistsError):
        storage.write_bytes(str(tmp_path / "existing"), b"x")
    assert (tmp_path / "existing").read_bytes() == b"keep"
    target = tmp_path / "outside"
    target.write_bytes(b"secret")
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(FileExistsError):
        storage.write_bytes(str(tmp_path / "link"), b"x")
    assert target.read_bytes() == b"secret"


@pytest.mark.parametrize("umask", [0o000, 0o077, 0o022])
def test_make_dir_mode_is_exact(tmp_path: Path, storage: LocalStorage, umask: int) -> None:
    old = os.umask(umask)
    try:
        storage.make_dir(str(tmp_path / "d"), mode=0o700)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "d").st_mode) == 0o700


def test_make_dir_exist_ok_refuses_a_symlink(tmp_path: Path, storage: LocalStorage) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    storage.make_dir(str(tmp_path / "real"), exist_ok=True)
    with pytest.raises(ckptguard.UnsupportedFile):
        storage.make_dir(str(tmp_path / "link"), exist_ok=True)
    with pytest.raises(FileExistsError):
        storage.make_dir(str(tmp_path / "real"))


@pytest.mark.parametrize("kind", ["file", "empty_dir", "full_dir"])
def test_rename_noreplace_never_replaces(tmp_path: Path, storage: LocalStorage, kind: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"new")
    dst = tmp_path / "dst"
    if kind == "file":
        dst.write_bytes(b"old")
    else:
        dst.mkdir()
        if kind == "full_dir":
            (dst / "a").write_bytes(b"old")
    with pytest.raises(FileExistsError):
        storage.rename_noreplace(str(src), str(dst))
    assert (src / "a").read_bytes() == b"new"
    if kind == "file":
        assert dst.read_bytes() == b"old"
    elif kind == "full_dir":
        assert (dst / "a").read_bytes() == b"old"


def test_rename_noreplace_moves(tmp_path: Path, storage: LocalStorage) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a").write_bytes(b"x")
    storage.rename_noreplace(str(tmp_path / "src"), str(tmp_path / "dst"))
    assert (tmp_path / "dst" / "a").read_bytes() == b"x"
    assert not (tmp_path / "src").exists()


def test_remove_tree_never_follows_symlinks(tmp_path: Path, storage: LocalStorage) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_bytes(b"keep")
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "f").write_bytes(b"x")
    (tree / "link_dir").symlink_to(outside)
    (tree / "sub" / "link_file").symlink_to(outside / "precious")
    storage.remove_tree(str(tree))
    assert not tree.exists()
    assert (outside / "precious").read_bytes() == b"keep"
    # The path itself a symlink: the link goes, the target stays.
    (tmp_path / "alias").symlink_to(outside)
    storage.remove_tree(str(tmp_path / "alias"))
    assert not (tmp_path / "alias").exists()
    assert (outside / "precious").exists()
    storage.remove_tree(str(tmp_path / "missing"))  # missing is fine


def test_walk_files_lists_and_refuses_specials(tmp_path: Path, storage: LocalStorage) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "f").write_bytes(b"1")
    (tmp_path / "g").write_bytes(b"2")
    files, dirs = storage.walk_files(str(tmp_path))
    assert files == ["a/b/f", "g"]
    assert dirs == ["a", "a/b"]
    (tmp_path / "a" / "l").symlink_to(tmp_path / "g")
    with pytest.raises(ckptguard.UnsupportedFile, match="symlink"):
        storage.walk_files(str(tmp_path))
    (tmp_path / "a" / "l").unlink()
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(ckptguard.UnsupportedFile, match="fifo"):
        storage.walk_files(str(tmp_path))


def test_hash_file_refuses_symlink_and_reports_progress(
    tmp_path: Path, storage: LocalStorage
) -> None:
    data = os.urandom(20 * 1024 * 1024 + 3)
    (tmp_path / "f").write_bytes(data)
    seen: list[int] = []
    digest = storage.hash_file(str(tmp_path / "f"), fsync=True, progress=seen.append)
    assert sum(seen) == len(data) == digest.size
    assert len(seen) > 1
    (tmp_path / "l").symlink_to(tmp_path / "f")
    with pytest.raises(ckptguard.UnsupportedFile):
        storage.hash_file(str(tmp_path / "l"))


def test_read_bytes_limit(tmp_path: Path, storage: LocalStorage) -> None:
    (tmp_path / "f").write_bytes(b"x" * 100)
    assert storage.read_bytes(str(tmp_path / "f"), limit=100) == b"x" * 100
    with pytest.raises(ValueError, match="limit"):
        storage.read_bytes(str(tmp_path / "f"), limit=99)


def test_list_dir_and_exists(tmp_path: Path, storage: LocalStorage) -> None:
    assert storage.list_dir(str(tmp_path / "missing")) == []
    (tmp_path / "b").write_bytes(b"")
    (tmp_path / "a").mkdir()
    (tmp_path / "dangling").symlink_to(tmp_path / "nothing")
    assert storage.list_dir(str(tmp_path)) == ["a", "b", "dangling"]
    assert storage.exists(str(tmp_path / "dangling"))
    assert not storage.exists(str(tmp_path / "nothing"))
    storage.fsync_dir(str(tmp_path))
    assert isinstance(storage, ckptguard.Storage)


def test_large_writes_hash_while_writing_in_another_thread(
    tmp_path: Path, storage: LocalStorage
) -> None:
    from ckptguard._storage.local import OVERLAP_MIN_BYTES

    big = os.urandom(3 * OVERLAP_MIN_BYTES + 5)
    writer = storage.open_write(str(tmp_path / "f"))
    writer.write(b"head")
    writer.write(memoryview(big))
    digest = writer.close()
    assert (tmp_path / "f").read_bytes() == b"head" + big
    assert digest.size == len(big) + 4
    assert digest.checksum == xxhash.xxh3_128_hexdigest(b"head" + big)
    aborted = storage.open_write(str(tmp_path / "g"))
    aborted.write(big)
    aborted.abort()
    assert not (tmp_path / "g").exists()
