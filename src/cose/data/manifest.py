"""Dataset folders: ``manifest.csv`` (path,label,split,width,height,mode,sha256) + ``classes.txt``.

Both files are written sorted by path with LF line endings, into a dataset folder that is
built under a temporary name and renamed into place (never a half-written ``data/NAME``).
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch
from PIL import Image

from cose.io import sha256_file

MANIFEST = "manifest.csv"
CLASSES = "classes.txt"
MANIFEST_COLUMNS = ("path", "label", "split", "width", "height", "mode", "sha256")
SPLITS = ("train", "test", "val")


@dataclass(frozen=True)
class Row:
    path: str  # POSIX path relative to the dataset folder
    label: int
    split: str


def image_info(path: str | Path) -> tuple[int, int, str]:
    """(width, height, mode) read from the file header; ValueError naming the file when it
    is not an image or is too large to decode safely (a decompression bomb)."""
    try:
        with Image.open(path) as im:
            return im.width, im.height, im.mode
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"{path}: not a readable image ({exc})") from None


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def leaves_folder(path: str | Path, folder: str | Path) -> Path | None:
    """Where ``path`` really leads when that is outside ``folder`` (a symbolic link, or a link
    among its parents, out of the folder), else None. A link into this project's DVC cache
    (``cache.type symlink``) stays inside."""
    real = Path(path).resolve()
    roots = [Path(folder).resolve(), Path(".dvc", "cache").resolve()]
    return None if any(_inside(real, r) for r in roots) else real


def image_path(folder: str | Path, rel: str) -> Path:
    """``folder/rel`` for a manifest path, refusing one that leaves the dataset folder
    (absolute, ``..``, or a symbolic link out of it) with one line naming both."""
    folder = Path(folder)
    path = folder / rel
    outside = None if safe_relpath(rel) else path
    outside = outside or leaves_folder(path, folder)
    if outside is not None:
        raise ValueError(f"{path}: leads outside the dataset folder {folder} (to {outside}); "
                         "refused: copy the file into the folder instead of linking it")
    return path


def write_manifest(folder: str | Path, rows: Iterable[Row], classes: Sequence[str]) -> Path:
    """Write ``manifest.csv`` (sizes, modes and checksums read from the files) and
    ``classes.txt`` into ``folder``."""
    folder = Path(folder)
    rows = sorted(rows, key=lambda r: r.path)
    seen: set[str] = set()
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(MANIFEST_COLUMNS)
    for r in rows:
        if r.path in seen:
            raise ValueError(f"duplicate manifest path {r.path!r}")
        seen.add(r.path)
        if not 0 <= r.label < len(classes):
            raise ValueError(f"{r.path}: label {r.label} outside 0..{len(classes) - 1}")
        if r.split not in SPLITS:
            raise ValueError(f"{r.path}: split {r.split!r} not in {SPLITS}")
        f = folder / r.path
        width, height, mode = image_info(f)
        w.writerow([r.path, r.label, r.split, width, height, mode, sha256_file(f)])
    for name in classes:
        if not name or "\n" in name or name != name.strip():
            raise ValueError(f"bad class name {name!r}")
    (folder / CLASSES).write_bytes(("\n".join(classes) + "\n").encode())
    (folder / MANIFEST).write_bytes(buf.getvalue().encode())
    return folder / MANIFEST


def read_classes(folder: str | Path) -> list[str]:
    path = Path(folder) / CLASSES
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: a dataset folder holds {MANIFEST} and "
                                f"{CLASSES} (`cose data fetch NAME` writes both)")
    return [c for c in path.read_text().splitlines() if c.strip()]


def safe_relpath(value: str) -> bool:
    """A manifest path that stays inside its dataset folder (relative, no ``..``)."""
    p = PurePosixPath(value.replace("\\", "/"))
    return bool(value) and not p.is_absolute() and ".." not in p.parts and ":" not in p.parts[0]


def read_rows(folder: str | Path) -> list[dict[str, str]]:
    """Manifest rows as dicts of strings, in file order, checked first: the columns are there,
    every label is an integer class index of ``classes.txt``, every split known, every path
    inside the folder. A ValueError names the file, the line and the value."""
    path = Path(folder) / MANIFEST
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            header = reader.fieldnames or []
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"{path}: not a readable CSV ({exc})") from None
    missing = [c for c in ("path", "label", "split") if c not in header]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; expected "
                         f"{','.join(MANIFEST_COLUMNS)}")
    n_classes = len(read_classes(folder))
    for line, r in enumerate(rows, 2):
        label = (r.get("label") or "").strip()
        if not label.lstrip("-").isdigit():
            raise ValueError(f"{path}: line {line}: label {label!r} is not a class index")
        if not 0 <= int(label) < n_classes:
            raise ValueError(f"{path}: line {line}: label {int(label)} outside 0..{n_classes - 1}"
                             f" ({CLASSES} lists {n_classes} classes)")
        if r.get("split") not in SPLITS:
            raise ValueError(f"{path}: line {line}: split {r.get('split')!r} not in "
                             f"{', '.join(SPLITS)}")
        if not safe_relpath(r.get("path") or ""):
            raise ValueError(f"{path}: line {line}: path {r.get('path')!r} is not inside the "
                             "dataset folder (absolute, empty or with '..')")
    return rows


def split_fractions(n: int, fractions: Sequence[float], seed: int) -> list[list[int]]:
    """Index lists of ``torch.utils.data.random_split(range(n), fractions, generator seeded
    with seed)``: floor lengths, the remainder dealt round-robin, a seeded permutation cut in
    order (the reference's Caltech101 split)."""
    lengths = [int(n * f) for f in fractions]
    for i in range(n - sum(lengths)):
        lengths[i % len(lengths)] += 1
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    out, start = [], 0
    for length in lengths:
        out.append(perm[start : start + length])
        start += length
    return out


def assign_splits(n: int, seed: int = 0, fractions: tuple[float, float] = (0.8, 0.2)) -> list[str]:
    """'train'/'test' for items 0..n-1: the seeded 80/20 split of ``split_fractions``."""
    train, test = split_fractions(n, fractions, seed)
    out = [""] * n
    for i in train:
        out[i] = "train"
    for i in test:
        out[i] = "test"
    return out


@contextlib.contextmanager
def building(target: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; on success it replaces ``target``
    (old contents removed only then), on error it is deleted."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not force:
        raise FileExistsError(f"{target} exists (use force to rebuild it)")
    tmp = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
