"""Dataset registry, fetch/export, manifests and loaders.

A dataset lives in ``<root>/<name>/``: its images, ``manifest.csv``
(path,label,split,width,height,mode,sha256; sorted by path, LF) and ``classes.txt`` (one class
name per line; label = line index). ``fetch`` builds that folder (digits: exported from
scikit-learn, deterministically; the others: downloaded, checksum-verified, safely extracted);
``load_split`` and ``ManifestDataset`` read it as [0,1] float images resized/cropped per a
``PreprocessSpec``. Image modes follow the policy of ``cose.data.image``.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .download import ChecksumError, Resource, UnsafeArchiveError, download, extract, verify
from .image import PreprocessSpec, load_image, open_rgb, to_rgb
from .manifest import (
    MANIFEST,
    MANIFEST_COLUMNS,
    building,
    image_path,
    read_classes,
    read_rows,
    sha256_file,
)
from .sources import SOURCES

__all__ = [
    "MANIFEST_COLUMNS",
    "ChecksumError",
    "ManifestDataset",
    "PreprocessSpec",
    "Resource",
    "UnsafeArchiveError",
    "dataset_dir",
    "download",
    "extract",
    "fetch",
    "image_path",
    "load_image",
    "load_split",
    "names",
    "num_classes",
    "open_rgb",
    "read_classes",
    "read_rows",
    "register",
    "sha256_file",
    "split_rows",
    "split_size",
    "to_rgb",
]

def names() -> list[str]:
    """Registered dataset names."""
    return list(SOURCES)


def register(name: str, source, *, description: str = "", replace: bool = False) -> None:
    """Add a dataset of your own: ``source`` is a folder of images (``DIR/<class>/*``, or
    ``DIR/<split>/<class>/*`` with train/val/test; an 80/20 seeded split otherwise) or a
    :class:`cose.data.sources.Source` (its ``prepare(raw, out)`` writes the images, the
    manifest and classes.txt). ``cose data fetch NAME`` then builds ``data/NAME``, and the
    name is accepted everywhere a built-in dataset is."""
    from .sources import Source, prepare_imagefolder

    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"dataset name {name!r}: use letters, digits and _ (it names folders)")
    if name in SOURCES and not replace:
        raise ValueError(f"dataset {name!r} is already registered")
    from cose import spec

    spec.register_dataset(name)
    if isinstance(source, Source):
        SOURCES[name] = lambda: source
        return
    folder = Path(source).expanduser()

    def prepare(raw: Path, out: Path, _folder: Path = folder) -> None:
        if not _folder.is_dir():
            raise FileNotFoundError(f"dataset {name!r}: image folder {_folder} does not exist")
        prepare_imagefolder(_folder, out)

    SOURCES[name] = lambda: Source(name, description or f"images from {folder}", prepare,
                                   local=True, folder=folder)


def _source_changes(folder: Path, target: Path) -> str:
    """How the image folder ``folder`` differs from the dataset built from it at ``target``
    ('' when it does not): files added, removed or with other bytes."""
    from .sources import imagefolder_files

    built = {r["path"].removeprefix("images/"): r.get("sha256", "") for r in read_rows(target)}
    now = set(imagefolder_files(folder))
    added, removed = now - set(built), set(built) - now
    changed = [f for f in sorted(now & set(built)) if sha256_file(folder / f) != built[f]]
    parts = [f"{len(v)} {what} (e.g. {sorted(v)[0]})" for v, what in
             ((added, "added"), (removed, "removed"), (changed, "changed")) if v]
    return ", ".join(parts)


def _check_name(name: str) -> None:
    if name not in SOURCES:
        raise ValueError(f"unknown dataset {name!r}; allowed: {', '.join(SOURCES)}")


def dataset_dir(name: str, root: str | Path = "data") -> Path:
    """``root/name``, checked to hold a manifest; clear errors otherwise."""
    _check_name(name)
    path = Path(root) / name
    if not (path / MANIFEST).is_file():
        raise FileNotFoundError(
            f"dataset {name!r} not found at {path} (no {MANIFEST}); run `cose data fetch {name}`"
            " (or `dvc pull`) first"
        )
    return path


def num_classes(name: str, root: str | Path = "data") -> int:
    return len(read_classes(dataset_dir(name, root)))


def fetch(
    name: str,
    root: str | Path = "data",
    force: bool = False,
    source: str | Path | None = None,
    mirror: str | None = None,
    checksums: dict[str, str] | None = None,
    keep_downloads: bool = False,
) -> Path:
    """Materialise ``root/name`` and return it. An existing dataset folder is kept unless
    ``force``. ``source``: the image folder for ``imagefolder``, or a folder already holding
    the downloaded files for the others; ``mirror``: base URL replacing the public one;
    ``checksums``: ``{filename: "md5:..."|"sha256:..."}`` overrides (repackaged mirrors).
    Downloads are cached in ``root/.downloads/name`` and removed after a successful build
    unless ``keep_downloads`` (so a DVC-tracked ``root`` holds only the dataset folders)."""
    _check_name(name)
    root = Path(root)
    target = root / name
    src = SOURCES[name]()
    if (target / MANIFEST).is_file() and not force:
        if src.folder is not None and src.folder.is_dir():
            changes = _source_changes(src.folder, target)
            if changes:
                raise ValueError(f"dataset {name!r}: {src.folder} changed since {target} was "
                                 f"built ({changes}); rebuild it with `cose data fetch {name} "
                                 "--force`")
        return target
    if src.local:  # a registered image folder: nothing to download
        with building(target, force=True) as out:
            src.prepare(Path(source) if source is not None else target, out)
        return target
    if name == "imagefolder":
        if source is None:
            raise ValueError("imagefolder needs source=DIR (DIR/<class>/* or DIR/<split>/<class>/*)")
        with building(target, force=True) as out:
            src.prepare(Path(source), out)
        return target
    raw = root / ".downloads" / name
    for res in src.resources:
        raw.mkdir(parents=True, exist_ok=True)
        checksum = (checksums or {}).get(res.filename, res.checksum)
        local = Path(source) / res.filename if source is not None else None
        if local is not None and local.is_file():
            verify(local, checksum)
            if local.resolve() != (raw / res.filename).resolve():
                shutil.copyfile(local, raw / res.filename)
            continue
        url = f"{mirror.rstrip('/')}/{res.filename}" if mirror else res.url
        try:
            download(url, raw / res.filename, checksum)
        except OSError as e:
            raise ConnectionError(
                f"{name}: could not download {url} ({e}); fetch needs network access, or pass "
                f"source=DIR holding {', '.join(r.filename for r in src.resources)}"
            ) from e
    with building(target, force=True) as out:
        src.prepare(raw, out)
    if not keep_downloads:
        shutil.rmtree(raw, ignore_errors=True)
        with contextlib.suppress(OSError):
            raw.parent.rmdir()  # only when empty
    return target


def _select(folder: Path, split: str) -> list[dict[str, str]]:
    rows = read_rows(folder)
    chosen = [r for r in rows if r["split"] == split]
    if not chosen:
        have = sorted({r["split"] for r in rows})
        raise ValueError(f"{folder}: no images in split {split!r}; available: {', '.join(have)}")
    return chosen


def split_rows(name: str, root: str | Path, split: str) -> list[dict[str, str]]:
    """The manifest rows of one split, in manifest order (checked: :func:`read_rows`)."""
    return _select(dataset_dir(name, root), split)


def split_size(name: str, root: str | Path, split: str) -> int:
    """Images in one split (from the manifest: nothing is decoded)."""
    return len(_select(dataset_dir(name, root), split))


def load_split(
    name: str,
    root: str | Path,
    split: str,
    spec: PreprocessSpec,
    indices: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of one split (manifest order, or ``indices`` into it) as float ``[N,3,H,W]`` in
    [0,1], resized and centre-cropped per ``spec``, and their labels ``[N]`` (int64)."""
    folder = dataset_dir(name, root)
    rows = _select(folder, split)
    if indices is not None:
        rows = [rows[i] for i in indices]
    images = torch.stack([load_image(image_path(folder, r["path"]), spec) for r in rows])
    labels = torch.tensor([int(r["label"]) for r in rows], dtype=torch.int64)
    return images, labels


class ManifestDataset(Dataset):
    """One split of a dataset folder, decoded lazily: ``(image01 [3,H,W], label)``."""

    def __init__(self, name: str, root: str | Path, split: str, spec: PreprocessSpec):
        self.folder = dataset_dir(name, root)
        self.spec = spec
        rows = _select(self.folder, split)
        self.paths = [r["path"] for r in rows]
        self.labels = torch.tensor([int(r["label"]) for r in rows], dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return load_image(image_path(self.folder, self.paths[i]), self.spec), self.labels[i]
