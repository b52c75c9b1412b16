"""explain.selection: the shared seeded images, and the official numpy stream (`reference`).

The reference side restates the official explain loop (src/explain.py) plainly: np.random.seed
once, per model a shuffle of the test indices, per image ctr = start..end INCLUSIVE, per
transform in the official config's order a choice of 6 signed magnitudes without replacement
from the float32 grid (+bins then -bins). The same comparison was made once against the
official loop itself, run with its model and saliency calls stubbed (images, magnitudes and
the second model's continued stream all matched).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from cose import config
from cose.selection import OFFICIAL_TRANSFORMS, reference_stream

SIGNED = ("TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast", "Sharpness")
MAX = {"TranslateX": 32.0, "TranslateY": 32.0, "Rotate": 135.0, "Brightness": 0.99,
       "Color": 0.99, "Contrast": 0.99, "Sharpness": 0.99}


def official_loop(n_test: int, models: list[str], end_idx: int, mag_per_transform: int = 6):
    """{model: [(test index, transform, signed magnitude), ...]} in the official order."""
    np.random.seed(0)
    out = {}
    for model in models:
        records = []
        idxs = np.arange(n_test)
        np.random.shuffle(idxs)
        for ctr, i in enumerate(idxs):
            if ctr < 0:  # start_idx
                continue
            for t_type in OFFICIAL_TRANSFORMS:
                if t_type in SIGNED:
                    mags = torch.linspace(0.0, MAX[t_type], 31)
                    signed = torch.Tensor([1, -1]).reshape(-1, 1) @ mags.reshape(1, -1)
                    pool = np.asarray(signed[signed != 0])
                    for m in np.random.choice(pool, size=mag_per_transform, replace=False):
                        records.append((int(i), t_type, float(m)))
            if ctr >= end_idx:
                break
        out[model] = records
    return out


@pytest.mark.parametrize("n_test, end_idx, models", [
    (37, 7, ["resnet50", "vit_b16"]),
    (120, 50, ["convnext_s", "resnet50", "swin_t", "vit_b16"]),
    (5, 9, ["resnet50", "vit_b16"]),  # a split shorter than the run: every image, once
])
def test_reference_stream_is_the_official_loop(n_test, end_idx, models):
    ours = reference_stream(n_test, models, end_idx, count=6, seed=0)
    ref = official_loop(n_test, models, end_idx)
    for model in models:
        sel = ours[model]
        assert len(sel) == min(end_idx + 1, n_test)  # end index inclusive: 501 for 500
        records = [(i, t, float(sel.draws[t][k, j]))
                   for k, i in enumerate(sel.test_idx) for t in OFFICIAL_TRANSFORMS if t in SIGNED
                   for j in range(6)]
        assert records == ref[model]
    if n_test > end_idx + 1:  # each model of a run sees another image set
        assert ours[models[0]].test_idx != ours[models[1]].test_idx


def test_reference_stream_depends_on_the_models_before():
    alone = reference_stream(200, ["vit_b16"], 10)["vit_b16"]
    second = reference_stream(200, ["resnet50", "vit_b16"], 10)["vit_b16"]
    assert alone.test_idx != second.test_idx
    again = reference_stream(200, ["resnet50", "vit_b16"], 10)["vit_b16"]
    assert again.test_idx == second.test_idx
    assert all(np.array_equal(again.draws[t], second.draws[t]) for t in second.draws)


def _cfg(**explain):
    return config.validate(config.from_dict({
        "datasets": ["digits"], "models": ["demo_resnet", "demo_vit"],
        "methods": explain.pop("methods", ["gradcam", "ig"]), "explain": explain,
    }), check_registries=False)


def test_reference_selection_config_errors():
    assert _cfg(selection="reference").explain.selection == "reference"
    with pytest.raises(config.ConfigError, match="explain.selection: got 'official'; allowed: "
                                                 "shared, reference"):
        _cfg(selection="official")
    with pytest.raises(config.ConfigError, match="cannot regenerate .* of smoothgrad, lime"):
        _cfg(selection="reference", methods=["gradcam", "smoothgrad", "lime"])
    with pytest.raises(config.ConfigError, match="'demo_vit' .* is missing"):
        _cfg(selection="reference", reference_models=["demo_resnet"])
    # the order may stand in params while the selection is shared (it is then unused)
    assert _cfg(reference_models=["demo_resnet", "demo_vit"]).explain.selection == "shared"


def test_stage_writes_the_official_rows(tmp_path, monkeypatch):
    """Through the explain stage's units: each model's shards hold the official stream's images
    and magnitudes (end index inclusive), for a run whose official order has a model before."""
    import cose.data as D
    import cose.models as M
    from cose.stages import common, explain

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COSE_DEVICE", "cpu")
    D.fetch("digits", tmp_path / "data")
    for k, model in enumerate(("demo_resnet", "demo_vit")):
        d = tmp_path / "checkpoints" / "digits" / model
        d.mkdir(parents=True)
        for name in ("final.pt", "random.pt"):
            torch.save(M.cose_checkpoint(M.create(model, 10, seed=k)), d / name)
    order = ["demo_convnext", "demo_resnet", "demo_vit"]
    cfg = config.validate(config.from_dict({
        "datasets": ["digits"], "models": ["demo_resnet", "demo_vit"], "methods": ["gradcam"],
        "data": {"root": "data"}, "train": {"save_epochs": []},
        "explain": {"images": 2, "shard_size": 2, "mid_ckpt": False, "sample_maps": 0,
                    "transforms": ["TranslateX", "Rotate", "FlipLR", "Contrast"],
                    "selection": "reference", "reference_models": order},
    }))
    explain.release()
    try:
        units = explain.plan(cfg)
        for job in explain.jobs(units):
            explain.run_job(job, cfg.to_dict())
    finally:
        explain.release()
    n_test = D.split_size("digits", "data", "test")
    ref = official_loop(n_test, order, end_idx=2)
    for model in ("demo_resnet", "demo_vit"):
        parts = [pd.read_parquet(u.parquet) for u in units if u.model == model]
        pairs = pd.concat(parts, ignore_index=True)
        assert pairs.test_idx.nunique() == 3
        got = pairs[pairs.transform_type.isin(["TranslateX", "Rotate", "Contrast"])]
        want = [r for r in ref[model] if r[1] in ("TranslateX", "Rotate", "Contrast")]
        # magnitudes at 32 px: the translation grid scales with the image (32 * 32 / 224)
        key = {(i, t) for i, t, _ in want}
        assert {(int(i), t) for i, t in zip(got.test_idx, got.transform_type)} == key
        rot = sorted((int(i), float(m)) for i, t, m in zip(got.test_idx, got.transform_type,
                                                          got.transform_magnitude) if t == "Rotate")
        assert rot == sorted((i, m) for i, t, m in want if t == "Rotate")
        sel = common.selection(cfg, "digits", model, "gradcam")
        assert list(pd.unique(pairs.test_idx)) == list(sel.test_idx)
