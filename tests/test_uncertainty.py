"""cose.uncertainty: bootstrap intervals over images (coverage at the nominal rate in a seeded
simulation, narrowing with more images), the paired comparison (a planted difference found, a
null one not), NaN flags with their cause."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from cose import scoring
from cose import uncertainty as U

TRUE_CONS, TRUE_FID = 0.6, 0.25
TRUE_COSE = math.sqrt(TRUE_CONS * (1 - TRUE_FID))


def population_sample(rng: np.random.Generator, n_images: int, method: str = "gradcam",
                      shift: float = 0.0, ids=None) -> pd.DataFrame:
    """Per image: 12 consistency rows (SSIM around the image's own level, drawn from a
    population with mean TRUE_CONS + shift) and 4 fidelity rows (around TRUE_FID)."""
    rows = []
    ids = range(n_images) if ids is None else ids
    for k, i in enumerate(ids):
        level = (rng.normal(TRUE_CONS, 0.15) if not isinstance(shift, np.ndarray)
                 else shift[k]) + (shift if isinstance(shift, float) else 0.0)
        fid = rng.normal(TRUE_FID, 0.1)
        for j in range(12):
            rows.append(("d", "m", method, i, 1, 1, "Rotate", float(j), 1,
                         float(level + rng.normal(0, 0.1)), 0.5))
        for j in range(4):
            rows.append(("d", "m", method, i, 1, 1, "random" if j == 0 else f"mid_ckpt_e00{j}",
                         0.0, 2, float(fid + rng.normal(0, 0.1)), 0.1))
    return pd.DataFrame(rows, columns=list(scoring.PAIR_COLUMNS))


def test_interval_covers_the_true_value_at_the_nominal_rate():
    rng = np.random.default_rng(0)
    hits = {"overall_consistency": 0, "cose": 0}
    sims = 200
    for s in range(sims):
        pairs = population_sample(rng, 30)
        summary, _ = U.summarize(pairs, bootstrap=400, seed=s)
        row = summary.iloc[0]
        hits["overall_consistency"] += row["overall_consistency_lo"] <= TRUE_CONS <= \
            row["overall_consistency_hi"]
        hits["cose"] += row["cose_lo"] <= TRUE_COSE <= row["cose_hi"]
    for metric, n in hits.items():
        # nominal 95%: the percentile bootstrap runs a little narrow at 30 images
        assert 0.88 <= n / sims <= 0.99, (metric, n / sims)


def test_intervals_shrink_with_more_images():
    rng = np.random.default_rng(1)
    widths = {}
    for n in (10, 160):
        summary, _ = U.summarize(population_sample(rng, n), bootstrap=500, seed=0)
        widths[n] = float(summary["cose_hi"].iloc[0] - summary["cose_lo"].iloc[0])
        assert summary["n_images"].iloc[0] == n
    assert 2.5 <= widths[10] / widths[160] <= 6.5  # ~ sqrt(16) = 4


def test_intervals_are_seeded_and_match_the_point_estimate():
    pairs = population_sample(np.random.default_rng(2), 20)
    a, _ = U.summarize(pairs, bootstrap=300, seed=5)
    b, _ = U.summarize(pairs, bootstrap=300, seed=5)
    pd.testing.assert_frame_equal(a, b)
    row = a.iloc[0]
    point = scoring.score(pairs)
    for m in ("overall_consistency", "sensitivity", "cose", "overall_fidelity"):
        assert row[m] == pytest.approx(point[m])
        assert row[f"{m}_lo"] <= row[m] <= row[f"{m}_hi"]
    no, _ = U.summarize(pairs, bootstrap=0)
    assert "cose_lo" not in no.columns and no["n_images"].iloc[0] == 20


def test_paired_comparison_finds_a_planted_difference_and_not_a_null_one():
    found_planted, found_null = 0, 0
    for s in range(20):
        rng = np.random.default_rng(100 + s)
        levels = rng.normal(TRUE_CONS, 0.15, size=40)
        a = population_sample(rng, 40, "gradcam", shift=levels)
        planted = population_sample(rng, 40, "ig", shift=levels + 0.12)
        null = population_sample(rng, 40, "ig", shift=levels)
        comp = U.compare_methods(pd.concat([a, planted]), bootstrap=400, seed=s)
        found_planted += bool(comp["significant"].iloc[0])
        assert comp["delta"].iloc[0] < 0  # gradcam - ig: ig was raised
        comp = U.compare_methods(pd.concat([a, null]), bootstrap=400, seed=s)
        found_null += bool(comp["significant"].iloc[0])
    assert found_planted >= 19 and found_null <= 3


def test_comparison_uses_the_common_images_only():
    rng = np.random.default_rng(4)
    a = population_sample(rng, 30, "gradcam")
    b = population_sample(rng, 30, "lime", ids=range(10))  # the first 10, as images_by_method
    comp = U.compare_methods(pd.concat([a, b]), bootstrap=100)
    assert comp["n_images"].iloc[0] == 10
    assert comp["method_a"].iloc[0] == "gradcam" and comp["method_b"].iloc[0] == "lime"


def test_method_mean_interval_from_the_cells():
    rng = np.random.default_rng(6)
    cells = []
    for model in ("m1", "m2", "m3"):
        p = population_sample(rng, 25)
        p["model"] = model
        cells.append(p)
    summary, reps = U.summarize(pd.concat(cells), bootstrap=300)
    means = U.method_means(summary, reps)
    row = means.iloc[0]
    assert row["cells"] == 3 and row["cose"] == pytest.approx(summary["cose"].mean())
    assert row["cose_lo"] < row["cose"] < row["cose_hi"]
    # the mean of three cells is surer than one cell
    assert row["cose_hi"] - row["cose_lo"] < (summary["cose_hi"] - summary["cose_lo"]).mean()


def test_nan_flags_name_the_cause():
    pairs = population_sample(np.random.default_rng(7), 10)
    rot = pairs.index[pairs["transform_type"] == "Rotate"]
    pairs.loc[rot[:60], ["ssim", "spearman"]] = np.nan  # both maps constant
    pairs.loc[rot[60:65], "ssim"] = np.nan  # an empty eroded mask: Spearman still defined
    summary, _ = U.summarize(pairs, bootstrap=50, nan_share=0.05)
    row = summary.iloc[0]
    assert row["nan_share"] == pytest.approx(65 / 160)
    assert row["nan_cause"] == "constant maps and empty masks" and bool(row["nan_flag"])
    assert row["n_nan_ssim"] == 65
    lines = U.warnings_for(summary)
    assert len(lines) == 1 and lines[0].startswith("d/m/gradcam: 41% of its consistency")
    clean, _ = U.summarize(population_sample(np.random.default_rng(8), 10), bootstrap=0)
    assert not clean["nan_flag"].any() and U.warnings_for(clean) == []


def test_reference_nan_rule_in_the_replicates():
    pairs = population_sample(np.random.default_rng(9), 15)
    pairs.loc[pairs.index[0], "ssim"] = np.nan
    summary, _ = U.summarize(pairs, nan="reference", bootstrap=200)
    row = summary.iloc[0]
    assert math.isnan(row["cose"])  # the plain mean, as the reference's compile
    # about 1 - (14/15)^15 = 64% of the replicates draw the NaN image: no interval
    assert math.isnan(row["cose_lo"])
    skip, _ = U.summarize(pairs, nan="skip", bootstrap=200)
    assert np.isfinite(skip.iloc[0]["cose_lo"])


def test_bad_arguments():
    pairs = population_sample(np.random.default_rng(0), 3)
    with pytest.raises(ValueError, match="bootstrap: got -1"):
        U.summarize(pairs, bootstrap=-1)
    with pytest.raises(ValueError, match="level: got 1.5"):
        U.summarize(pairs, level=1.5)
