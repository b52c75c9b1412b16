"""Per-dataset sources: where each dataset comes from and how its on-disk format becomes a
COSE dataset folder (images + manifest.csv + classes.txt).

URLs and checksums are those torchvision's downloaders use where torchvision has the dataset
(CIFAR10, Caltech101, EuroSAT, Flowers102); CUB-200-2011 comes from CaltechDATA.
Splits: CIFAR10 and CUB200 their official train/test; Oxford102 its train/val/test (setid.mat);
Caltech101 and EuroSAT (no official split) 80/20 by ``torch.utils.data.random_split`` with
seed 0 over torchvision's item order (sorted classes, sorted files).
"""

from __future__ import annotations

import os
import pickle
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .download import Resource, extract
from .manifest import Row, assign_splits, leaves_folder, write_manifest

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")


@dataclass(frozen=True)
class Source:
    name: str
    description: str
    prepare: Callable[[Path, Path], None]  # (raw download folder, output folder)
    resources: tuple[Resource, ...] = field(default_factory=tuple)
    splits: tuple[str, ...] = ("train", "test")
    local: bool = False  # prepared from a local folder (a registered dataset): no download
    folder: Path | None = None  # that folder (``cose data fetch`` compares it with the build)


def _extract_fresh(archive: Path, work: Path) -> Path:
    """Extract into an emptied ``work`` folder (no leftovers of an interrupted attempt)."""
    shutil.rmtree(work, ignore_errors=True)
    return extract(archive, work)


def _save_pnm(array: np.ndarray, path: Path) -> None:
    """Uncompressed binary PGM (gray) / PPM (RGB): the same bytes with any Pillow/zlib."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PPM")


# ----------------------------------------------------------------------------------- digits


def digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as uint8 images [1797, 8, 8] (0..16 -> round(x*255/16)) and labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.images.astype(np.int64)  # integers 0..16 stored as float
    u8 = ((x * 255 + 8) // 16).astype(np.uint8)  # round half up, integer arithmetic
    return u8, d.target.astype(np.int64)


def prepare_digits(raw: Path, out: Path) -> None:
    images, labels = digits_uint8()
    splits = assign_splits(len(labels), seed=0)
    rows = []
    for i, (img, label) in enumerate(zip(images, labels)):
        path = f"images/{i:04d}.pgm"
        _save_pnm(img, out / path)
        rows.append(Row(path, int(label), splits[i]))
    write_manifest(out, rows, [str(c) for c in range(10)])


# ---------------------------------------------------------------------------------- cifar10


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR's python batches hold dicts of numpy arrays: allow only what builds those."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch")


def _load_batch(path: Path) -> dict:
    with open(path, "rb") as f:
        return _NumpyOnlyUnpickler(f, encoding="latin1").load()


def prepare_cifar10(raw: Path, out: Path) -> None:
    work = raw / "extracted"
    _extract_fresh(raw / "cifar-10-python.tar.gz", work)
    base = work / "cifar-10-batches-py"
    classes = list(_load_batch(base / "batches.meta")["label_names"])
    rows = []
    for split, files in (("train", [f"data_batch_{i}" for i in range(1, 6)]),
                         ("test", ["test_batch"])):
        idx = 0
        for name in files:
            batch = _load_batch(base / name)
            data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            labels = batch.get("labels", batch.get("fine_labels"))
            for img, label in zip(data, labels):
                path = f"images/{split}/{idx:05d}.ppm"
                _save_pnm(np.ascontiguousarray(img.transpose(1, 2, 0)), out / path)
                rows.append(Row(path, int(label), split))
                idx += 1
    shutil.rmtree(work)
    write_manifest(out, rows, classes)


# ------------------------------------------------------------------------------- caltech101


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _random_split_folder(base: Path, out_prefix: str, skip: tuple[str, ...] = ()) -> tuple[list[Row], list[str]]:
    classes = sorted(d.name for d in base.iterdir() if d.is_dir() and d.name not in skip)
    items = [(f"{out_prefix}/{c}/{p.name}", i) for i, c in enumerate(classes)
             for p in _list_images(base / c)]
    splits = assign_splits(len(items), seed=0)
    return [Row(path, label, s) for (path, label), s in zip(items, splits)], classes


def prepare_caltech101(raw: Path, out: Path) -> None:
    work = raw / "extracted"
    _extract_fresh(raw / "caltech-101.zip", work)
    inner = work / "caltech-101" / "101_ObjectCategories.tar.gz"
    extract(inner if inner.exists() else work / "101_ObjectCategories.tar.gz", work)
    shutil.move(str(work / "101_ObjectCategories"), out / "images")
    shutil.rmtree(work)
    rows, classes = _random_split_folder(out / "images", "images", skip=("BACKGROUND_Google",))
    shutil.rmtree(out / "images" / "BACKGROUND_Google", ignore_errors=True)
    write_manifest(out, rows, classes)


# ---------------------------------------------------------------------------------- eurosat


def prepare_eurosat(raw: Path, out: Path) -> None:
    work = raw / "extracted"
    _extract_fresh(raw / "EuroSAT.zip", work)
    shutil.move(str(work / "2750"), out / "images")
    shutil.rmtree(work)
    rows, classes = _random_split_folder(out / "images", "images")
    write_manifest(out, rows, classes)


# ----------------------------------------------------------------------------------- cub200


def prepare_cub200(raw: Path, out: Path) -> None:
    work = raw / "extracted"
    _extract_fresh(raw / "CUB_200_2011.tgz", work)
    base = work / "CUB_200_2011"

    def table(name: str) -> dict[int, str]:
        lines = (base / name).read_text().splitlines()
        return {int(a): b.strip() for a, _, b in (ln.partition(" ") for ln in lines if ln.strip())}

    paths, labels, is_train = table("images.txt"), table("image_class_labels.txt"), table(
        "train_test_split.txt")
    class_table = table("classes.txt")
    classes = [class_table[i] for i in sorted(class_table)]
    if sorted(class_table) != list(range(1, len(classes) + 1)):
        raise ValueError("CUB classes.txt: class ids are not 1..N")
    shutil.move(str(base / "images"), out / "images")
    shutil.rmtree(work)
    rows = [Row(f"images/{paths[i]}", int(labels[i]) - 1, "train" if is_train[i] == "1" else "test")
            for i in sorted(paths)]
    write_manifest(out, rows, classes)


# -------------------------------------------------------------------------------- oxford102


def prepare_oxford102(raw: Path, out: Path) -> None:
    from scipy.io import loadmat

    work = raw / "extracted"
    _extract_fresh(raw / "102flowers.tgz", work)
    shutil.move(str(work / "jpg"), out / "images")
    shutil.rmtree(work)
    labels = np.asarray(loadmat(raw / "imagelabels.mat", squeeze_me=True)["labels"]).reshape(-1)
    setid = loadmat(raw / "setid.mat", squeeze_me=True)
    rows = []
    for split, key in (("train", "trnid"), ("val", "valid"), ("test", "tstid")):
        for image_id in np.asarray(setid[key]).reshape(-1):
            image_id = int(image_id)
            rows.append(Row(f"images/image_{image_id:05d}.jpg", int(labels[image_id - 1]) - 1, split))
    n = int(labels.max())
    write_manifest(out, rows, [f"flower_{i:03d}" for i in range(1, n + 1)])


# ------------------------------------------------------------------------------ imagefolder


def imagefolder_files(src: Path) -> list[str]:
    """The image files an image folder contributes, relative to it (``<split>/<class>/f`` or
    ``<class>/f``), sorted; ValueError naming the first symbolic link that leads out of it."""
    src = Path(src)
    for here, dirs, files in os.walk(src):  # links are checked, never followed
        for name in dirs + files:
            entry = Path(here) / name
            if entry.is_symlink() and (outside := leaves_folder(entry, src)) is not None:
                raise ValueError(f"{entry}: a symbolic link out of the image folder {src} "
                                 f"(to {outside}); refused: copy the file in instead")
    splits = [d for d in ("train", "val", "test") if (src / d).is_dir()]
    tops = [src / s for s in splits] if splits else [src]
    return sorted(str(p.relative_to(src).as_posix()) for top in tops
                  for c in sorted(top.iterdir()) if c.is_dir() for p in _list_images(c))


def imagefolder_classes(src: Path) -> list[str]:
    """The class names of an image folder (its class folders, over every split), sorted;
    ValueError naming a class folder without images (it would be a class no image has) or a
    symbolic link out of the folder (:func:`imagefolder_files`)."""
    src = Path(src)
    files = imagefolder_files(src)
    split_dirs = [d for d in ("train", "val", "test") if (src / d).is_dir()]
    tops = [src / s for s in split_dirs] if split_dirs else [src]
    folders = sorted({c.name for top in tops for c in top.iterdir() if c.is_dir()})
    used = {f.split("/")[-2] for f in files}
    empty = [c for c in folders if c not in used]
    if files and empty:
        raise ValueError(f"image folder {src}: class folder(s) {', '.join(empty)} hold no "
                         f"images ({', '.join(IMAGE_SUFFIXES)}): remove them or add images "
                         "(an empty class would be a class no image has)")
    return folders


def prepare_imagefolder(src: Path, out: Path) -> None:
    """``src/<split>/<class>/*`` (splits among train/val/test) or ``src/<class>/*`` (80/20
    seeded split). Files are copied into ``out/images`` with the same relative paths. A class
    folder without images, or a symbolic link out of ``src``, is refused naming it."""
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"imagefolder source {src} is not a folder")
    folders = imagefolder_classes(src)
    split_dirs = [d for d in ("train", "val", "test") if (src / d).is_dir()]
    shutil.copytree(src, out / "images")
    if split_dirs:
        classes = folders
        rows = [Row(f"images/{s}/{c}/{p.name}", classes.index(c), s)
                for s in split_dirs for c in classes if (src / s / c).is_dir()
                for p in _list_images(src / s / c)]
    else:
        rows, classes = _random_split_folder(out / "images", "images")
    if not rows:
        raise ValueError(f"imagefolder source {src} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    write_manifest(out, rows, classes)


def _tv(cls_name: str) -> type:
    """A torchvision dataset class, for its download URLs and checksums."""
    import torchvision.datasets as tvd

    return getattr(tvd, cls_name)


def _cifar_resources() -> tuple[Resource, ...]:
    c = _tv("CIFAR10")
    return (Resource(c.url, c.filename, f"md5:{c.tgz_md5}"),)


def _flowers_resources() -> tuple[Resource, ...]:
    f = _tv("Flowers102")
    return tuple(Resource(f._download_url_prefix + name, name, f"md5:{md5}")
                 for name, md5 in f._file_dict.values())


SOURCES: dict[str, Callable[[], Source]] = {
    "digits": lambda: Source(
        "digits", "scikit-learn's handwritten digits (8x8, 10 classes), embedded", prepare_digits),
    "cifar10": lambda: Source(
        "cifar10", "CIFAR-10 (32x32, 10 classes), official train/test", prepare_cifar10,
        _cifar_resources()),
    "caltech101": lambda: Source(
        "caltech101", "Caltech-101 (101 classes), 80/20 split seed 0", prepare_caltech101,
        (Resource("https://data.caltech.edu/records/mzrjq-6wc02/files/caltech-101.zip",
                  "caltech-101.zip", "md5:3138e1922a9193bfa496528edbbc45d0"),)),
    "cub200": lambda: Source(
        "cub200", "CUB-200-2011 birds (200 classes), official train/test", prepare_cub200,
        (Resource("https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz",
                  "CUB_200_2011.tgz", "md5:97eceeb196236b17998738112f37df78"),)),
    "eurosat": lambda: Source(
        "eurosat", "EuroSAT RGB (64x64, 10 classes), 80/20 split seed 0", prepare_eurosat,
        (Resource("https://huggingface.co/datasets/torchgeo/eurosat/resolve/"
                  "c877bcd43f099cd0196738f714544e355477f3fd/EuroSAT.zip", "EuroSAT.zip",
                  "md5:c8fa014336c82ac7804f0398fcb19387"),)),
    "oxford102": lambda: Source(
        "oxford102", "Oxford 102 Flowers, official train/val/test", prepare_oxford102,
        _flowers_resources(), splits=("train", "val", "test")),
    "imagefolder": lambda: Source(
        "imagefolder", "your own images: fetch(..., source=DIR) with DIR/<class>/* or "
        "DIR/<split>/<class>/*", prepare_imagefolder),
}
