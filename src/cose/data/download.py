"""Downloads with checksums, and archive extraction that cannot write outside its target."""

from __future__ import annotations

import shutil
import tarfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from cose.io import atomic_path, file_digest


class ChecksumError(ValueError):
    """A downloaded file whose checksum differs from the expected one."""


class UnsafeArchiveError(ValueError):
    """An archive member that would land outside the extraction folder (or is a link/device)."""


@dataclass(frozen=True)
class Resource:
    """One file of a dataset's public source; ``checksum`` is ``md5:<hex>`` or ``sha256:<hex>``."""

    url: str
    filename: str
    checksum: str


def verify(path: str | Path, checksum: str) -> None:
    """Raise ChecksumError unless ``path`` has ``checksum`` (``algo:hex``)."""
    algo, _, expected = checksum.partition(":")
    if algo not in ("md5", "sha256") or not expected:
        raise ValueError(f"checksum {checksum!r} must be 'md5:<hex>' or 'sha256:<hex>'")
    got = file_digest(path, algo)
    if got != expected.lower():
        raise ChecksumError(f"{path}: {algo} {got} does not match the expected {expected}")


def download(url: str, dest: str | Path, checksum: str, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` (via a temporary file beside it), verify ``checksum``; an existing
    ``dest`` with the right checksum is reused. A mismatch deletes the download."""
    dest = Path(dest)
    if dest.exists():
        try:
            verify(dest, checksum)
            return dest
        except ChecksumError:
            dest.unlink()
    req = urllib.request.Request(url, headers={"User-Agent": "cose-data-fetch"})
    with atomic_path(dest) as part:  # renamed into place only once verified
        with urllib.request.urlopen(req, timeout=timeout) as r, open(part, "wb") as f:
            shutil.copyfileobj(r, f, 1 << 20)
        verify(part, checksum)
    return dest


def _safe_name(name: str, archive: Path) -> PurePosixPath:
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or (p.parts and ":" in p.parts[0]):
        raise UnsafeArchiveError(f"{archive}: member {name!r} escapes the extraction folder")
    return p


def extract(archive: str | Path, dest: str | Path) -> Path:
    """Extract a tar(.gz/.bz2/.xz) or zip archive into ``dest``. Absolute paths, ``..``
    components, links and special files are refused before anything is written."""
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            infos = z.infolist()
            for info in infos:
                _safe_name(info.filename, archive)
                mode = (info.external_attr >> 16) & 0o170000
                if mode not in (0, 0o100000, 0o040000):
                    raise UnsafeArchiveError(f"{archive}: member {info.filename!r} is not a plain file")
            for info in infos:
                z.extract(info, dest)
        return dest
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive) as t:
            members = t.getmembers()
            for m in members:
                _safe_name(m.name, archive)
                if not (m.isfile() or m.isdir()):
                    raise UnsafeArchiveError(
                        f"{archive}: member {m.name!r} is a link or special file; refused"
                    )
            kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            t.extractall(dest, members=members, **kwargs)
        return dest
    raise ValueError(f"{archive}: not a tar or zip archive")
