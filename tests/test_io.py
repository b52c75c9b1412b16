"""cose.io: atomic writes and the per-process checksum cache."""

from __future__ import annotations

import hashlib
import os
import time

import pytest

from cose import io


def test_atomic_write_leaves_the_old_file_on_failure(tmp_path):
    path = tmp_path / "a" / "out.bin"
    io.atomic_write_bytes(path, b"one")
    with pytest.raises(RuntimeError), io.atomic_path(path) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed")
    assert path.read_bytes() == b"one"
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.bin"]


def test_cached_digest_is_reused_until_the_file_changes(tmp_path, monkeypatch):
    calls = []
    real = io.sha256_file
    monkeypatch.setattr(io, "sha256_file", lambda p: calls.append(p) or real(p))
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"a" * 1000)
    first = io.sha256_file_cached(path)
    assert first == hashlib.sha256(b"a" * 1000).hexdigest()
    # just written: a write within the same timestamp tick would not show, so not remembered
    assert io.sha256_file_cached(path) == first and len(calls) == 2

    monkeypatch.setattr(io, "SETTLED_NS", 0)  # as if the file were older
    assert io.sha256_file_cached(path) == first and len(calls) == 3
    assert io.sha256_file_cached(str(path)) == first and len(calls) == 3

    # rewritten in place with the same size and its old mtime put back: ctime still moves
    time.sleep(0.05)  # past the file system's timestamp tick (SETTLED_NS covers this)
    st = path.stat()
    with open(path, "r+b") as fh:
        fh.write(b"b")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert io.sha256_file_cached(path) == hashlib.sha256(b"b" + b"a" * 999).hexdigest()
    assert len(calls) == 4

    # replaced by another file (a new inode), as atomic_write_bytes does
    io.atomic_write_bytes(path, b"a" * 1000)
    assert io.sha256_file_cached(path) == first and len(calls) == 5
    assert io.sha256_file_cached(path) == first and len(calls) == 5


def test_atomic_torch_save_gives_the_same_bytes_for_the_same_object(tmp_path):
    """Saved to a temporary file name, torch names the archive's folder after it: the bytes
    would differ on every save and a retrained, bit-identical model would look changed."""
    import torch

    from cose.training import atomic_save

    obj = {"state_dict": {"w": torch.arange(6.0).reshape(2, 3)}, "epoch": 3}
    a = io.atomic_torch_save(obj, tmp_path / "a.pt")
    b = atomic_save(obj, tmp_path / "sub" / "b.pt")
    assert a.read_bytes() == b.read_bytes()
    assert torch.equal(torch.load(b)["state_dict"]["w"], obj["state_dict"]["w"])
    assert not list(tmp_path.rglob("*.tmp"))
