"""Fetch: downloads from a loopback HTTP server, checksums, safe extraction, and each dataset's
real on-disk format turned into a COSE dataset folder (tiny fixtures written here)."""

from __future__ import annotations

import functools
import hashlib
import io
import pickle
import tarfile
import threading
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cose.data as D
from cose.data.download import ChecksumError, UnsafeArchiveError, download, extract
from cose.data.image import PreprocessSpec
from cose.data.validate import validate_dataset

SPEC = PreprocessSpec(resize=16, crop=16)


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    """An HTTP server on 127.0.0.1 serving ``tmp_path/www``; yields (base_url, folder)."""
    www = tmp_path / "www"
    www.mkdir()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(www)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", www
    finally:
        httpd.shutdown()
        httpd.server_close()


def _md5(path: Path) -> str:
    return "md5:" + hashlib.md5(path.read_bytes()).hexdigest()


def _jpeg(size=(20, 12), color=(200, 30, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _tar(path: Path, files: dict[str, bytes], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


def _zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return path


# ------------------------------------------------------------------ download and extraction


def test_download_verifies_checksum(server, tmp_path):
    base, www = server
    (www / "a.bin").write_bytes(b"hello")
    good = "sha256:" + hashlib.sha256(b"hello").hexdigest()
    out = download(f"{base}/a.bin", tmp_path / "dl" / "a.bin", good)
    assert out.read_bytes() == b"hello"
    (www / "a.bin").write_bytes(b"changed")  # the cached copy is reused
    assert download(f"{base}/a.bin", out, good).read_bytes() == b"hello"
    with pytest.raises(ChecksumError, match="does not match"):
        download(f"{base}/a.bin", tmp_path / "dl" / "b.bin", good)
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == ["a.bin"]
    with pytest.raises(ValueError, match="md5"):
        download(f"{base}/a.bin", tmp_path / "c.bin", "crc32:0")


@pytest.mark.parametrize("name", ["../escape.txt", "/abs/escape.txt", "a/../../escape.txt"])
def test_tar_path_traversal_rejected(tmp_path, name):
    arc = _tar(tmp_path / "evil.tar.gz", {"ok.txt": b"ok", name: b"x"})
    dest = tmp_path / "out" / "inner"
    with pytest.raises(UnsafeArchiveError, match="escapes"):
        extract(arc, dest)
    assert not (tmp_path / "out" / "escape.txt").exists()
    assert not (dest / "ok.txt").exists()  # nothing is written before the check


def test_tar_links_rejected(tmp_path):
    arc = tmp_path / "link.tar"
    with tarfile.open(arc, "w") as t:
        info = tarfile.TarInfo("link")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        t.addfile(info)
    with pytest.raises(UnsafeArchiveError, match="link"):
        extract(arc, tmp_path / "out")


def test_zip_path_traversal_rejected(tmp_path):
    arc = _zip(tmp_path / "evil.zip", {"ok.txt": b"ok", "../../escape.txt": b"x"})
    with pytest.raises(UnsafeArchiveError, match="escapes"):
        extract(arc, tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists()


def test_extract_rejects_non_archive(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"plain")
    with pytest.raises(ValueError, match="not a tar or zip"):
        extract(tmp_path / "x.bin", tmp_path / "o")


# -------------------------------------------------------------- fixtures in the real formats


def _cifar_archive(www: Path) -> Path:
    rng = np.random.default_rng(0)

    def batch(n, offset):
        return pickle.dumps({"batch_label": "b", "labels": [(i + offset) % 10 for i in range(n)],
                             "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                             "filenames": [f"f{i}.png" for i in range(n)]}, protocol=2)

    files = {f"cifar-10-batches-py/data_batch_{i}": batch(2, i) for i in range(1, 6)}
    files["cifar-10-batches-py/test_batch"] = batch(3, 0)
    files["cifar-10-batches-py/batches.meta"] = pickle.dumps(
        {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                         "horse", "ship", "truck"], "num_vis": 3072}, protocol=2)
    return _tar(www / "cifar-10-python.tar.gz", files)


def _caltech_archive(www: Path, tmp: Path) -> Path:
    inner = {f"101_ObjectCategories/{c}/image_{i:04d}.jpg": _jpeg()
             for c in ("BACKGROUND_Google", "Faces_easy", "accordion") for i in (1, 2, 3)}
    gz = _tar(tmp / "101_ObjectCategories.tar.gz", inner)
    ann = _tar(tmp / "Annotations.tar", {"Annotations/x.mat": b"0"}, mode="w")
    return _zip(www / "caltech-101.zip", {"caltech-101/101_ObjectCategories.tar.gz": gz.read_bytes(),
                                         "caltech-101/Annotations.tar": ann.read_bytes()})


def _cub_archive(www: Path) -> Path:
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross"]
    imgs = [(1, classes[0], "a_1.jpg", 1), (2, classes[0], "a_2.jpg", 0),
            (3, classes[1], "b_1.jpg", 1), (4, classes[1], "b_2.jpg", 0)]
    files = {f"CUB_200_2011/images/{c}/{f}": _jpeg() for _, c, f, _ in imgs}
    files["CUB_200_2011/images.txt"] = "".join(f"{i} {c}/{f}\n" for i, c, f, _ in imgs).encode()
    files["CUB_200_2011/image_class_labels.txt"] = "".join(
        f"{i} {classes.index(c) + 1}\n" for i, c, _, _ in imgs).encode()
    files["CUB_200_2011/train_test_split.txt"] = "".join(
        f"{i} {t}\n" for i, _, _, t in imgs).encode()
    files["CUB_200_2011/classes.txt"] = "".join(
        f"{i + 1} {c}\n" for i, c in enumerate(classes)).encode()
    return _tar(www / "CUB_200_2011.tgz", files)


def _eurosat_archive(www: Path) -> Path:
    return _zip(www / "EuroSAT.zip", {f"2750/{c}/{c}_{i}.jpg": _jpeg((64, 64))
                                      for c in ("AnnualCrop", "Forest") for i in range(1, 6)})


def _flowers_files(www: Path) -> list[Path]:
    from scipy.io import savemat

    arc = _tar(www / "102flowers.tgz", {f"jpg/image_{i:05d}.jpg": _jpeg() for i in range(1, 7)})
    savemat(www / "imagelabels.mat", {"labels": np.array([[1, 1, 2, 2, 3, 3]], dtype=np.uint8)})
    savemat(www / "setid.mat", {"trnid": np.array([[1, 3]], dtype=np.uint16),
                                "valid": np.array([[5]], dtype=np.uint16),
                                "tstid": np.array([[2, 4, 6]], dtype=np.uint16)})
    return [arc, www / "imagelabels.mat", www / "setid.mat"]


def _check(folder: Path, n: int, classes: list[str], splits: set[str]) -> list[dict]:
    rows = D.read_rows(folder)
    assert len(rows) == n
    assert D.read_classes(folder) == classes
    assert {r["split"] for r in rows} == splits
    report = validate_dataset(folder)
    assert report.ok, report.to_markdown()
    return rows


def test_fetch_cifar10(server, tmp_path):
    base, www = server
    arc = _cifar_archive(www)
    folder = D.fetch("cifar10", tmp_path / "data", mirror=base,
                     checksums={arc.name: _md5(arc)})
    rows = _check(folder, 13, ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                               "horse", "ship", "truck"], {"train", "test"})
    assert rows[0]["path"] == "images/test/00000.ppm" and rows[0]["mode"] == "RGB"
    with tarfile.open(arc) as t:
        raw = pickle.loads(t.extractfile("cifar-10-batches-py/test_batch").read())
    expected = raw["data"][1].reshape(3, 32, 32)
    got = np.asarray(Image.open(folder / "images/test/00001.ppm")).transpose(2, 0, 1)
    assert np.array_equal(got, expected)
    x, y = D.load_split("cifar10", tmp_path / "data", "test", SPEC)
    assert x.shape == (3, 3, 16, 16) and y.tolist() == [0, 1, 2]
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["cifar10"]  # no downloads


def test_cifar_pickle_with_code_is_refused(server, tmp_path):
    base, www = server
    evil = pickle.dumps({"label_names": __import__("os").system}, protocol=2)
    arc = _tar(www / "cifar-10-python.tar.gz", {"cifar-10-batches-py/batches.meta": evil})
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        D.fetch("cifar10", tmp_path / "data", mirror=base, checksums={arc.name: _md5(arc)})
    assert not (tmp_path / "data" / "cifar10").exists()


def test_fetch_caltech101_split(server, tmp_path):
    base, www = server
    arc = _caltech_archive(www, tmp_path)
    folder = D.fetch("caltech101", tmp_path / "data", mirror=base, checksums={arc.name: _md5(arc)})
    rows = _check(folder, 6, ["Faces_easy", "accordion"], {"train", "test"})
    assert not (folder / "images" / "BACKGROUND_Google").exists()
    # 80/20 by random_split with seed 0 over torchvision's order (sorted classes, files)
    order = [f"images/{c}/image_{i:04d}.jpg" for c in ("Faces_easy", "accordion") for i in (1, 2, 3)]
    split = torch.utils.data.random_split(range(6), [0.8, 0.2],
                                          generator=torch.Generator().manual_seed(0))
    test_paths = {order[i] for i in split[1].indices}
    assert {r["path"] for r in rows if r["split"] == "test"} == test_paths


def test_fetch_cub200(server, tmp_path):
    base, www = server
    arc = _cub_archive(www)
    folder = D.fetch("cub200", tmp_path / "data", mirror=base, checksums={arc.name: _md5(arc)})
    rows = _check(folder, 4, ["001.Black_footed_Albatross", "002.Laysan_Albatross"],
                  {"train", "test"})
    by_path = {r["path"]: (r["label"], r["split"]) for r in rows}
    assert by_path["images/002.Laysan_Albatross/b_1.jpg"] == ("1", "train")
    assert by_path["images/001.Black_footed_Albatross/a_2.jpg"] == ("0", "test")


def test_fetch_eurosat(server, tmp_path):
    base, www = server
    arc = _eurosat_archive(www)
    folder = D.fetch("eurosat", tmp_path / "data", mirror=base, checksums={arc.name: _md5(arc)})
    rows = _check(folder, 10, ["AnnualCrop", "Forest"], {"train", "test"})
    assert sum(r["split"] == "train" for r in rows) == 8


def test_fetch_oxford102(server, tmp_path):
    base, www = server
    files = _flowers_files(www)
    folder = D.fetch("oxford102", tmp_path / "data", mirror=base,
                     checksums={f.name: _md5(f) for f in files})
    rows = _check(folder, 6, ["flower_001", "flower_002", "flower_003"], {"train", "val", "test"})
    by_path = {r["path"]: (r["label"], r["split"]) for r in rows}
    assert by_path["images/image_00005.jpg"] == ("2", "val")
    assert by_path["images/image_00002.jpg"] == ("0", "test")
    x, y = D.load_split("oxford102", tmp_path / "data", "test", SPEC)
    assert y.tolist() == [0, 1, 2]


def test_fetch_from_local_source_folder(tmp_path):
    www = tmp_path / "downloaded"
    www.mkdir()
    arc = _eurosat_archive(www)
    folder = D.fetch("eurosat", tmp_path / "data", source=www, checksums={arc.name: _md5(arc)},
                     keep_downloads=True)
    assert len(D.read_rows(folder)) == 10
    assert (tmp_path / "data" / ".downloads" / "eurosat" / "EuroSAT.zip").is_file()
    assert arc.is_file()


def test_fetch_checksum_mismatch_leaves_no_dataset(server, tmp_path):
    base, www = server
    _eurosat_archive(www)
    with pytest.raises(ChecksumError):
        D.fetch("eurosat", tmp_path / "data", mirror=base)  # real md5, fixture bytes
    assert not (tmp_path / "data" / "eurosat").exists()
    assert not list((tmp_path / "data" / ".downloads" / "eurosat").iterdir())


def test_fetch_traversal_archive_rejected(server, tmp_path):
    base, www = server
    arc = _zip(www / "EuroSAT.zip", {"2750/Forest/a.jpg": _jpeg(), "../../../pwned.txt": b"x"})
    with pytest.raises(UnsafeArchiveError):
        D.fetch("eurosat", tmp_path / "data", mirror=base, checksums={arc.name: _md5(arc)})
    assert not (tmp_path / "data" / "eurosat").exists()
    assert not list(tmp_path.rglob("pwned.txt"))


def test_fetch_offline_is_a_clear_error(tmp_path):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with pytest.raises(ConnectionError, match="network access.*EuroSAT.zip"):
        D.fetch("eurosat", tmp_path / "data", mirror=f"http://127.0.0.1:{port}")


def test_imagefolder(tmp_path):
    src = tmp_path / "mine"
    for split, n in (("train", 3), ("test", 2)):
        for c in ("cat", "dog"):
            (src / split / c).mkdir(parents=True)
            for i in range(n):
                (src / split / c / f"{i}.jpg").write_bytes(_jpeg())
    Image.new("RGBA", (8, 8), (255, 0, 0, 128)).save(src / "test" / "dog" / "alpha.png")
    folder = D.fetch("imagefolder", tmp_path / "data", source=src)
    rows = _check(folder, 11, ["cat", "dog"], {"train", "test"})
    assert {r["mode"] for r in rows} == {"RGB", "RGBA"}
    x, y = D.load_split("imagefolder", tmp_path / "data", "test", SPEC)
    assert x.shape == (5, 3, 16, 16)
    alpha = [i for i, r in enumerate(r for r in rows if r["split"] == "test")
             if r["path"].endswith("alpha.png")][0]
    assert torch.allclose(x[alpha, 0], torch.full((16, 16), 128 / 255), atol=1 / 255)
    assert x[alpha, 1].max() == 0  # composited on black
    flat = tmp_path / "flat"
    for c in ("a", "b"):
        (flat / c).mkdir(parents=True)
        for i in range(5):
            (flat / c / f"{i}.jpg").write_bytes(_jpeg())
    folder = D.fetch("imagefolder", tmp_path / "d2", source=flat)
    assert sum(r["split"] == "train" for r in D.read_rows(folder)) == 8
    with pytest.raises(ValueError, match="source"):
        D.fetch("imagefolder", tmp_path / "d3")
