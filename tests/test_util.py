import os

import pytest

from pkmem._util import atomic_write_bytes, not_allowed


def test_not_allowed_names_the_key_the_value_and_what_is_allowed():
    e = not_allowed("memory.topk", 9, "<= num_keys=8")
    assert isinstance(e, ValueError)
    assert str(e) == "memory.topk=9 is not allowed: memory.topk must be <= num_keys=8"
    assert str(not_allowed("gate", "none", "None or 'swilu'")).startswith("gate='none' is not allowed")
    assert str(not_allowed("--seq-len", 0, ">= 1")) == "--seq-len 0 is not allowed: --seq-len must be >= 1"


def test_atomic_write_bytes_replaces_whole_files_only(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "f.json"
    atomic_write_bytes(path, b"one")
    atomic_write_bytes(path, b"two")
    assert path.read_bytes() == b"two" and os.listdir(path.parent) == ["f.json"]

    def fail(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(path, b"three")
    assert path.read_bytes() == b"two" and os.listdir(path.parent) == ["f.json"]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_write_bytes_gives_the_umask_mode_not_0600(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "f.json", b"{}")
        open(tmp_path / "plain", "wb").close()  # what open() gives under the same umask
    finally:
        os.umask(old)
    mode = os.stat(tmp_path / "f.json").st_mode & 0o777
    assert mode == os.stat(tmp_path / "plain").st_mode & 0o777 == 0o666 & ~umask
