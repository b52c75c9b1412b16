"""great-expectations suites: dataset manifests + files, and the per-pair table."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

import cose.data as D
from cose.data.validate import PAIR_COLUMNS, validate_dataset, validate_pairs


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("v")
    return D.fetch("digits", root)


def _edit_manifest(folder, fn):
    lines = (folder / "manifest.csv").read_text().splitlines()
    fn(lines)
    (folder / "manifest.csv").write_text("\n".join(lines) + "\n")


def test_clean_dataset_passes(digits):
    report = validate_dataset(digits)
    assert report.ok, report.to_markdown()
    assert report.rows == 1797 and "passed" in report.to_markdown()


def test_broken_dataset_reports_each_problem(digits, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(digits, bad)
    (bad / "images" / "0003.pgm").unlink()                       # missing file
    (bad / "images" / "0004.pgm").write_bytes(b"not an image")   # corrupt image

    def edit(lines):
        lines[11] = lines[11].replace("images/0010.pgm,0,", "images/0010.pgm,12,")  # label
        lines[10] = lines[10].replace(",train,", ",holdout,").replace(",test,", ",holdout,")
        lines[31] = lines[31].replace(",L,", ",I;16,")          # 16-bit mode: rejected
        lines.append(lines[21])                                  # duplicate path
        lines.append("../outside.pgm,1,train,8,8,L," + "0" * 64)  # escaping path

    _edit_manifest(bad, edit)
    report = validate_dataset(bad)
    assert not report.ok
    by_check = {f.check: f for f in report.failures}
    assert "images/0010.pgm" in " ".join(by_check["label"].examples)
    assert "holdout" in " ".join(by_check["split"].examples)
    assert "I;16" in " ".join(by_check["mode"].examples)
    paths = [f for f in report.failures if f.check == "path"]
    assert any("duplicated" in f.message and "images/0020.pgm" in f.examples for f in paths)
    assert any("escaping" in f.message and "../outside.pgm" in " ".join(f.examples) for f in paths)
    assert "images/0003.pgm" in by_check["file_exists"].examples
    assert "images/0004.pgm" in by_check["sha256_matches"].examples
    assert "images/0004.pgm" in by_check["image_decodes_with_manifest_size_and_mode"].examples
    md = report.to_markdown()
    assert "FAILED" in md and "| label |" in md and "images/0003.pgm" in md


def test_missing_pieces(digits, tmp_path):
    assert not validate_dataset(tmp_path / "nothing").ok
    partial = tmp_path / "p"
    shutil.copytree(digits, partial)
    (partial / "classes.txt").unlink()
    _edit_manifest(partial, lambda lines: lines.__setitem__(0, "path,label,split,width,height,mode"))
    report = validate_dataset(partial, check_files=False)
    checks = {f.check for f in report.failures}
    assert "classes" in checks
    assert any("sha256" in f.message for f in report.failures)


def _pairs(n=4):
    return pd.DataFrame({
        "dataset": ["digits"] * n, "model": ["demo_resnet"] * n,
        "saliency_method": ["gradcam"] * n, "test_idx": np.arange(n),
        "target_class": [1] * n, "pred_class": [1] * n,
        "transform_type": ["Rotate", "random", "mid_ckpt_e003", "FlipLR"][:n],
        "transform_magnitude": [4.5, 0.0, 0.0, 0.0][:n], "t_pred_class": [1, 2, 1, 1][:n],
        "ssim": [0.5, np.nan, -0.2, 1.0][:n], "spearman": [0.1, 0.3, np.nan, -1.0][:n],
    })


def test_pairs_ok():
    df = _pairs()
    assert list(df.columns) == list(PAIR_COLUMNS)
    report = validate_pairs(df)
    assert report.ok, report.to_markdown()


def test_pairs_bad_values():
    df = _pairs()
    df.loc[0, "ssim"] = 1.5
    df.loc[1, "spearman"] = -3.0
    df.loc[2, "transform_type"] = "Zoom"
    df["pred_class"] = [1, -1, 1, 1]
    df["t_pred_class"] = df["t_pred_class"].astype(float)
    report = validate_pairs(df)
    checks = {f.check for f in report.failures}
    assert {"ssim", "spearman", "transform_type", "pred_class", "t_pred_class"} <= checks
    assert not validate_pairs(df.drop(columns=["ssim"])).ok
