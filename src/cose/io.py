"""Atomic file writes, checksums and output locks: no reader ever sees a half-written output,
and one writer at a time owns an output tree."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; rename it over `path` only if the block succeeds.
    The file gets the mode a plain ``open()`` would give it (0666 less the umask; mkstemp's
    own 0600 would hide outputs from the team's other users)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def remove_temp_files(folder: str | Path, names=("*",)) -> int:
    """Delete the ``.<name>.*.tmp`` files an interrupted atomic write left in ``folder`` (and
    below); returns how many. Call it only while holding the folder's lock."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    n = 0
    for pattern in names:
        for tmp in folder.rglob(f".{pattern}.tmp"):
            if tmp.is_file():
                tmp.unlink(missing_ok=True)
                n += 1
    return n


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: object, path: str | Path) -> Path:
    """``torch.save`` through :func:`atomic_path`. Written through a file object, so the
    archive's inner folder is always ``archive/`` (saved to a file name, torch names it after
    the temporary file): the same object gives the same bytes, and a retrained model that
    came out bit-identical keeps every explain shard and DVC cache entry."""
    import torch

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
    return Path(path)


def file_digest(path: str | Path, algo: str = "sha256", chunk: int = 1 << 20) -> str:
    """The hex digest of a file's bytes (``algo``: any :func:`hashlib.new` name), read in
    chunks: the project's one file checksum."""
    h = hashlib.new(algo)
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_file(path: str | Path) -> str:
    return file_digest(path, "sha256")


_DIGESTS: dict[tuple[str, int, int, int, int, int], str] = {}
# A file changed this recently is hashed every time: file timestamps tick in steps of a few
# milliseconds, so a second write within one step would leave its stat unchanged.
SETTLED_NS = 2_000_000_000


def sha256_file_cached(path: str | Path) -> str:
    """`sha256_file`, remembered in this process per (path, device, inode, size, mtime, ctime).

    For large files read again and again (checkpoints: 1.2 GB each for ViT-L/16). Replacing or
    writing a file changes its inode or ctime, which no user call can set back, so a changed
    file is hashed anew; so is one changed less than `SETTLED_NS` ago.
    """
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
           st.st_ctime_ns)
    digest = _DIGESTS.get(key)
    if digest is None:
        digest = sha256_file(path)
        if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) >= SETTLED_NS:
            _DIGESTS[key] = digest
    return digest


# --------------------------------------------------------------------------- locks


class LockedError(RuntimeError):
    """Another live process holds an output tree's lock."""


@contextlib.contextmanager
def exclusive(lock: str | Path, what: str, wait: float = 0.0) -> Iterator[None]:
    """One writer for ``what`` (an output tree): an OS lock (``fcntl.flock``) on the file
    ``lock``, which holds the holder's pid, host, command and start time. A second writer
    waits up to ``wait`` seconds, then raises :class:`LockedError` naming the holder. The OS
    drops the lock when its process dies, so a killed run leaves none behind (the file stays,
    harmless). No-op where ``fcntl`` is missing (Windows)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on POSIX
        yield
        return
    lock = Path(lock)
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
    try:
        deadline = time.monotonic() + max(0.0, wait)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockedError(f"{what} is being written by another run "
                                      f"({_holder(lock)}); wait for it to finish, or set "
                                      "COSE_LOCK_WAIT=SECONDS to wait") from None
                time.sleep(0.2)
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "command": " ".join(sys.argv)[:300], "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _holder(lock: Path) -> str:
    try:
        info = json.loads(lock.read_text() or "{}")
    except (OSError, ValueError):
        return "holder unknown"
    return (f"pid {info.get('pid')} on {info.get('host')}, since {info.get('since')}: "
            f"{info.get('command')}")
