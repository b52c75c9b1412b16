"""cose.data: digits export, manifests, loaders, mode policy, errors."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

import cose.data as D
from cose.data.image import PreprocessSpec, to_rgb
from cose.data.manifest import Row, split_fractions, write_manifest

torch.set_num_threads(2)
SPEC32 = PreprocessSpec(resize=32, crop=32, interpolation="bilinear")


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    D.fetch("digits", root)
    return root


def _tree_digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_names():
    assert D.names() == ["digits", "cifar10", "caltech101", "cub200", "eurosat", "oxford102",
                         "imagefolder"]


def test_digits_export_layout(digits_root):
    folder = digits_root / "digits"
    raw = (folder / "manifest.csv").read_bytes()
    assert b"\r" not in raw
    lines = raw.decode().splitlines()
    assert lines[0] == "path,label,split,width,height,mode,sha256"
    rows = [ln.split(",") for ln in lines[1:]]
    assert len(rows) == 1797
    assert [r[0] for r in rows] == sorted(r[0] for r in rows)
    assert {r[2] for r in rows} == {"train", "test"}
    assert sum(r[2] == "train" for r in rows) == 1438  # random_split([0.8, 0.2]) of 1797
    assert all(r[3:6] == ["8", "8", "L"] for r in rows)
    assert (folder / "classes.txt").read_text() == "".join(f"{i}\n" for i in range(10))
    first = (folder / rows[0][0]).read_bytes()
    assert first.startswith(b"P5\n8 8\n255\n") and len(first) == 11 + 64
    assert hashlib.sha256(first).hexdigest() == rows[0][6]
    assert not [p for p in digits_root.iterdir() if p.name.startswith(".")]


def test_digits_values_match_sklearn(digits_root):
    from sklearn.datasets import load_digits

    d = load_digits()
    img = np.asarray(Image.open(digits_root / "digits" / "images" / "0005.pgm"))
    expected = np.floor(d.images[5] * 255 / 16 + 0.5).astype(np.uint8)
    assert np.array_equal(img, expected)
    assert np.floor(8 * 255 / 16 + 0.5) == 128 and img.max() <= 255


def test_digits_export_is_deterministic(digits_root, tmp_path):
    D.fetch("digits", tmp_path)
    assert _tree_digest(tmp_path / "digits") == _tree_digest(digits_root / "digits")


def test_fetch_keeps_existing_and_force_rebuilds(digits_root, tmp_path):
    D.fetch("digits", tmp_path)
    marker = tmp_path / "digits" / "marker"
    marker.write_text("x")
    D.fetch("digits", tmp_path)
    assert marker.exists()
    D.fetch("digits", tmp_path, force=True)
    assert not marker.exists()
    assert _tree_digest(tmp_path / "digits") == _tree_digest(digits_root / "digits")


def test_failed_export_leaves_nothing(tmp_path, monkeypatch):
    from cose.data import sources

    def boom(raw, out):
        (out / "half").write_text("x")
        raise RuntimeError("interrupted")

    monkeypatch.setitem(sources.SOURCES, "digits",
                        lambda: sources.Source("digits", "", boom))
    with pytest.raises(RuntimeError, match="interrupted"):
        D.fetch("digits", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_split_matches_torch_random_split():
    for n in (10, 1797, 8677):
        ours = split_fractions(n, (0.8, 0.2), seed=0)
        ref = torch.utils.data.random_split(range(n), [0.8, 0.2],
                                            generator=torch.Generator().manual_seed(0))
        assert ours == [list(s.indices) for s in ref]


def test_load_split(digits_root):
    x, y = D.load_split("digits", digits_root, "test", SPEC32)
    assert x.shape == (359, 3, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.shape == (359,)
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert torch.equal(x[:, 0], x[:, 1])  # grayscale repeated
    xs, ys = D.load_split("digits", digits_root, "test", SPEC32, indices=[3, 0])
    assert torch.equal(xs, x[[3, 0]]) and torch.equal(ys, y[[3, 0]])
    ds = D.ManifestDataset("digits", digits_root, "test", SPEC32)
    assert len(ds) == 359
    img, label = ds[3]
    assert torch.equal(img, x[3]) and label == y[3]


def test_explain_subset_decodes_only_its_images(digits_root, monkeypatch):
    """The explain stage's images: the first explain.images of a seeded permutation of the
    test split (REFERENCE.md step 1), decoded alone, not the whole split then indexed."""
    from cose import config, models
    from cose.data import image
    from cose.stages import common

    cfg = config.from_dict({"datasets": ["digits"], "models": ["demo_resnet"],
                            "data": {"root": str(digits_root)},
                            "explain": {"images": 7, "seed": 3}})
    full_x, full_y = D.load_split("digits", digits_root, "test", models.preprocess("demo_resnet"))
    assert D.split_size("digits", digits_root, "test") == len(full_y) == 359
    order = torch.randperm(359, generator=torch.Generator().manual_seed(3))[:7]

    decoded = []
    real = image.load_image
    monkeypatch.setattr(D, "load_image", lambda path, spec: decoded.append(path) or real(path,
                                                                                       spec))
    x, y, idx = common.explain_subset(cfg, "digits", "demo_resnet")
    assert len(decoded) == 7 and idx == order.tolist()
    assert torch.equal(x, full_x[order]) and torch.equal(y, full_y[order])


def test_load_split_errors(digits_root, tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'mnist'.*digits"):
        D.load_split("mnist", digits_root, "test", SPEC32)
    with pytest.raises(FileNotFoundError, match="cose data fetch cifar10"):
        D.load_split("cifar10", tmp_path, "test", SPEC32)
    with pytest.raises(ValueError, match="split 'val'.*test, train"):
        D.load_split("digits", digits_root, "val", SPEC32)
    with pytest.raises(ValueError, match="unknown dataset"):
        D.fetch("nope", tmp_path)


def test_preprocess_resize_then_centre_crop(tmp_path):
    arr = np.zeros((40, 80, 3), np.uint8)
    arr[:, 20:60] = 255  # centre 40 columns white
    Image.fromarray(arr).save(tmp_path / "a.png")
    write_manifest(tmp_path, [Row("a.png", 0, "test")], ["c"])
    from cose.data.image import load_image

    img = load_image(tmp_path / "a.png", PreprocessSpec(resize=20, crop=20, interpolation="nearest"))
    assert img.shape == (3, 20, 20)
    assert torch.all(img == 1.0)  # 40x80 -> 20x40, centre 20 columns are the white block


def test_mode_policy():
    gray = Image.fromarray(np.full((2, 2), 100, np.uint8), "L")
    assert np.all(np.asarray(to_rgb(gray)) == 100)
    rgba = Image.fromarray(np.array([[[200, 100, 50, 0], [200, 100, 50, 255]]], np.uint8), "RGBA")
    out = np.asarray(to_rgb(rgba))
    assert out[0, 0].tolist() == [0, 0, 0] and out[0, 1].tolist() == [200, 100, 50]
    pal = Image.fromarray(np.zeros((2, 2), np.uint8), "P")
    pal.putpalette([10, 20, 30] * 256)
    assert np.asarray(to_rgb(pal))[0, 0].tolist() == [10, 20, 30]
    i16 = Image.fromarray(np.full((2, 2), 1000, np.uint16))
    assert i16.mode.startswith("I;16")
    with pytest.raises(D.image.ImageModeError, match="16-bit"):
        to_rgb(i16, "x.png")


def test_spec_validation():
    with pytest.raises(ValueError, match="interpolation"):
        PreprocessSpec(32, 32, "area")
    with pytest.raises(ValueError, match="crop"):
        PreprocessSpec(32, 64)
