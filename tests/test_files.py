"""One atomic write: a file is complete or absent whatever happens while it is written, shared like any other
file, and its name is on disk once the write returns."""

import errno
import os

import pytest

from gptrain.files import atomic_write, atomic_write_text, publish, remove_temporaries


def interrupted(error: BaseException):
    """A `write` that puts half its data down, then fails as a full disk or a Ctrl-C would."""

    def write(f) -> None:
        f.write(b"half of the new")
        f.flush()
        raise error

    return write


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()])
def test_a_write_that_fails_midway_leaves_the_old_file_and_no_temporary(tmp_path, error):
    target = tmp_path / "meta.json"
    atomic_write_text(target, "old, complete")
    with pytest.raises(type(error)):
        atomic_write(target, interrupted(error))
    assert target.read_text() == "old, complete"
    assert os.listdir(tmp_path) == ["meta.json"]
    with pytest.raises(type(error)):
        atomic_write(tmp_path / "new" / "meta.json", interrupted(error))
    assert os.listdir(tmp_path / "new") == []  # absent, not half-written


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_permissions_follow_the_umask_as_for_any_new_file(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "results.json", "{}")
        (tmp_path / "plain.json").write_text("{}")
    finally:
        os.umask(old)
    mode = (tmp_path / "results.json").stat().st_mode & 0o777
    assert mode == (tmp_path / "plain.json").stat().st_mode & 0o777 == 0o666 & ~umask


def record_fsyncs(monkeypatch) -> list[tuple[int, int]]:
    """Each fsync's target as (device, inode), in order; the real fsync still runs."""
    synced, real = [], os.fsync

    def fsync(fd: int) -> None:
        stat = os.fstat(fd)
        synced.append((stat.st_dev, stat.st_ino))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return synced


def identity(path) -> tuple[int, int]:
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino


def test_the_data_then_the_directory_are_synced_before_the_write_returns(tmp_path, monkeypatch):
    synced = record_fsyncs(monkeypatch)
    atomic_write_text(tmp_path / "metrics.jsonl", '{"step": 0}\n')
    assert synced == [identity(tmp_path / "metrics.jsonl"), identity(tmp_path)]  # the rename itself is durable


def test_publish_renames_a_file_assembled_in_place_and_syncs_its_directory(tmp_path, monkeypatch):
    (tmp_path / "train.bin.tmp").write_bytes(b"\x01\x00" * 8)
    (tmp_path / "train.bin").write_bytes(b"old")
    synced = record_fsyncs(monkeypatch)
    publish(tmp_path / "train.bin.tmp", tmp_path / "train.bin")
    assert (tmp_path / "train.bin").read_bytes() == b"\x01\x00" * 8 and not (tmp_path / "train.bin.tmp").exists()
    assert synced == [identity(tmp_path)]


def test_remove_temporaries_takes_only_what_writers_of_that_file_left(tmp_path):
    for name in (".meta.json.a1b2.tmp", ".meta.json.zz.tmp", ".meta.pkl.a1b2.tmp", "meta.json", "train.bin.tmp"):
        (tmp_path / name).write_text("x")
    remove_temporaries(tmp_path / "meta.json")
    assert sorted(os.listdir(tmp_path)) == [".meta.pkl.a1b2.tmp", "meta.json", "train.bin.tmp"]
