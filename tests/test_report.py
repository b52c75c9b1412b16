"""Report: figures draw the numbers they claim, the HTML page is self-contained and renders in
headless Chromium, and the compile stage writes, declares (DVC plots) and logs it all."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import LineCollection, PathCollection, PolyCollection

from cose import report, scoring

# --------------------------------------------------------------------------- a known table


def _row(model, method, t, m, ssim, changed=False, target=1, pred=1, idx=0):
    return dict(dataset="digits", model=model, saliency_method=method, test_idx=idx,
                target_class=target, pred_class=pred, transform_type=t,
                transform_magnitude=float(m), t_pred_class=2 if changed else target,
                ssim=ssim, spearman=ssim / 2)


TX_MAX_32 = 32 * 32 / 224  # TranslateX's largest magnitude at 32 px (demo models)


@pytest.fixture
def known_pairs() -> pd.DataFrame:
    """Hand-made per-pair rows whose binned curves are worked out in the tests (bins=6:
    relative magnitude r goes to bin ceil(6r), drawn at its centre (b - 0.5) / 6)."""
    g = "gradcam"
    rows = [
        # demo_resnet
        _row("demo_resnet", g, "Rotate", 45, 0.8),                  # r=1/3 -> bin 2, cons
        _row("demo_resnet", g, "Rotate", -45, 0.6),                 # bin 2, cons
        _row("demo_resnet", g, "Rotate", 135, 0.1, changed=True),   # r=1 -> bin 6, fid
        _row("demo_resnet", g, "TranslateX", TX_MAX_32, 0.9),       # r=1 -> bin 6, cons
        _row("demo_resnet", g, "Brightness", 0.99, 0.5),            # bin 6, cons (photo)
        _row("demo_resnet", g, "Brightness", -0.33, 0.3, changed=True),  # bin 2, fid (photo)
        _row("demo_resnet", g, "Rotate", 45, 0.0, pred=3),          # misclassified: dropped
        _row("demo_resnet", g, "Rotate", 45, float("nan")),         # NaN SSIM: skipped
        _row("demo_resnet", g, "FlipLR", 0, 0.7),                   # unsigned: not on curves
        _row("demo_resnet", g, "random", 0, 0.2, changed=True),     # model change
        # demo_vit: pooled with the resnet rows by counts
        _row("demo_vit", g, "Rotate", 45, 0.1),                     # bin 2, cons
        _row("demo_vit", g, "Rotate", -90, 0.4),                    # r=2/3 -> bin 4, cons
        _row("demo_vit", g, "random", 0, 0.5, changed=True),
        # a second method
        _row("demo_resnet", "ig", "Rotate", 45, 0.2),
        _row("demo_resnet", "ig", "Color", 0.66, 0.4),              # r=2/3 -> bin 4 (photo)
        _row("demo_resnet", "ig", "random", 0, 0.9, changed=True),
    ]
    return pd.DataFrame(rows)


def test_relative_magnitude_uses_each_transforms_range(known_pairs):
    rel = report.relative_magnitude(known_pairs)
    by = dict(zip(zip(known_pairs.transform_type, known_pairs.transform_magnitude), rel))
    assert by[("Rotate", 45.0)] == pytest.approx(1 / 3)
    assert by[("Rotate", -90.0)] == pytest.approx(2 / 3)
    assert by[("TranslateX", TX_MAX_32)] == pytest.approx(1.0)  # 32 px at 224 -> 4.57 px at 32
    assert by[("Brightness", -0.33)] == pytest.approx(1 / 3)
    assert np.isnan(by[("FlipLR", 0.0)]) and np.isnan(by[("random", 0.0)])
    # an explicit image side overrides the registry's: 224 px -> 4.57 px is 1/7 of 32 px
    rel224 = report.relative_magnitude(known_pairs, sizes=224)
    assert rel224[known_pairs.transform_type.eq("TranslateX")].iloc[0] == pytest.approx(1 / 7)


def test_magnitude_curves_bin_pool_and_select_like_scoring(known_pairs):
    c = report.magnitude_curves(known_pairs, bins=6)
    geo = c[(c.saliency_method == "gradcam") & (c.kind == "geometric")].set_index("bin")
    photo = c[(c.saliency_method == "gradcam") & (c.kind == "photometric")].set_index("bin")
    assert list(geo.index) == [2, 4, 6] and list(photo.index) == [2, 6]
    assert geo.loc[2, "relative_magnitude"] == pytest.approx(1.5 / 6)
    # bin 2: resnet 0.8, 0.6 and vit 0.1 (pooled by rows); misclassified and NaN rows out
    assert geo.loc[2, "consistency"] == pytest.approx((0.8 + 0.6 + 0.1) / 3)
    assert geo.loc[2, "n_consistency"] == 3 and geo.loc[2, "n_fidelity"] == 0
    assert np.isnan(geo.loc[2, "sensitivity"])
    assert geo.loc[4, "consistency"] == pytest.approx(0.4)
    assert geo.loc[6, "consistency"] == pytest.approx(0.9)      # TranslateX at full range
    assert geo.loc[6, "sensitivity"] == pytest.approx(1 - 0.1)  # Rotate 135 changed
    assert photo.loc[2, "sensitivity"] == pytest.approx(1 - 0.3)
    assert np.isnan(photo.loc[2, "consistency"])
    assert photo.loc[6, "consistency"] == pytest.approx(0.5)
    ig = c[c.saliency_method == "ig"].set_index(["kind", "bin"])
    assert ig.loc[("photometric", 4), "consistency"] == pytest.approx(0.4)

    wide = report.magnitude_plot_tables(c)
    assert list(wide) == ["gradcam", "ig"]  # paper order: GradCAM before IG
    g = wide["gradcam"].set_index("relative_magnitude")
    assert list(g.columns) == ["geometric_consistency", "photometric_consistency",
                               "geometric_sensitivity", "photometric_sensitivity"]
    assert g.loc[5.5 / 6, "geometric_sensitivity"] == pytest.approx(0.9)
    assert g.loc[1.5 / 6, "photometric_sensitivity"] == pytest.approx(0.7)
    assert np.isnan(g.loc[3.5 / 6, "photometric_consistency"])


def test_magnitude_figure_draws_the_curves(known_pairs):
    curves = report.magnitude_curves(known_pairs)
    plot = report.plot_magnitude(curves)
    # a panel per (metric, kind): at most one line per method in each (issue #28: 14 lines
    # in one panel could not be read)
    panels = dict(zip(report.MAGNITUDE_PANELS, plot.figure.axes))
    assert len(panels) == 4
    for ax in panels.values():
        labels = [ln.get_label() for ln in ax.get_lines()]
        assert len(labels) == len(set(labels)) <= 2
    lines = {ln.get_label(): ln for kind in ("geometric", "photometric")
             for ln in panels[("consistency", kind)].get_lines()}
    geo = lines["GradCAM (geometric)"]
    np.testing.assert_allclose(geo.get_xdata(), [1.5 / 6, 3.5 / 6, 5.5 / 6])
    np.testing.assert_allclose(geo.get_ydata(), [0.5, 0.4, 0.9])
    assert geo.get_linestyle() == "-" and lines["GradCAM (photometric)"].get_linestyle() == "--"
    np.testing.assert_allclose(lines["GradCAM (photometric)"].get_ydata(), [0.5])
    sens = {ln.get_label(): ln for kind in ("geometric", "photometric")
            for ln in panels[("sensitivity", kind)].get_lines()}
    np.testing.assert_allclose(sens["GradCAM (geometric)"].get_xdata(), [5.5 / 6])
    np.testing.assert_allclose(sens["GradCAM (geometric)"].get_ydata(), [0.9])
    np.testing.assert_allclose(sens["GradCAM (photometric)"].get_ydata(), [0.7])
    assert "IG (photometric)" in lines and "IG (geometric)" in lines
    assert plot.data is curves


def _summary_for_families() -> pd.DataFrame:
    rows = []
    values = {("gradcam", "demo_resnet"): 0.6, ("gradcam", "demo_convnext"): 0.5,
              ("gradcam", "demo_vit"): 0.3, ("gradcam", "my_swin_custom"): 0.35,
              ("ig", "demo_resnet"): 0.7, ("ig", "demo_vit"): 0.2,
              ("ig", "demo_convnext"): float("nan")}
    for (method, model), v in values.items():
        rows.append({"saliency_method": method, "dataset": "digits", "model": model,
                     "cose": v, "overall_consistency": v, "sensitivity": v})
    return pd.DataFrame(rows)


def test_architecture_families():
    assert report.architecture_family("resnet50") == "CNN"
    assert report.architecture_family("convnext_s") == "CNN"
    assert report.architecture_family("dino_vit_b16") == "Transformer"
    assert report.architecture_family("ibot_swin_t") == "Transformer"
    assert report.architecture_family("my_swin_custom") == "Transformer"  # guessed from name
    assert report.architecture_family("mystery") == "other"


def test_cose_by_family_figure_draws_one_point_per_model():
    summary = _summary_for_families()
    plot = report.plot_cose_by_family(summary)
    data = plot.data
    assert len(data) == 6  # the NaN row is not drawn
    expect = {("gradcam", "CNN"): [0.5, 0.6], ("gradcam", "Transformer"): [0.3, 0.35],
              ("ig", "CNN"): [0.7], ("ig", "Transformer"): [0.2]}
    got = {k: sorted(g["cose"]) for k, g in data.groupby(["saliency_method", "family"])}
    assert got == expect
    ax = plot.figure.axes[0]
    points = np.concatenate([c.get_offsets() for c in ax.collections
                             if isinstance(c, PathCollection) and len(c.get_offsets())])
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["GradCAM", "IG"]
    for i, method in enumerate(["gradcam", "ig"]):
        near = points[np.abs(points[:, 0] - i) < 0.5]
        assert sorted(near[:, 1]) == pytest.approx(
            sorted(expect[(method, "CNN")] + expect[(method, "Transformer")]))
        # CNN points sit left of the Transformer points
        cnn = near[np.isin(near[:, 1], expect[(method, "CNN")])][:, 0]
        tr = near[np.isin(near[:, 1], expect[(method, "Transformer")])][:, 0]
        assert cnn.max() < tr.min()
    medians = [c for c in ax.collections if isinstance(c, LineCollection)
               and c.get_gid() == "medians"]
    ys = sorted(seg[0][1] for c in medians for seg in c.get_segments())
    assert ys == pytest.approx(sorted([0.55, 0.325, 0.7, 0.2]))
    # two points per family make no density: points and a median, no violin (#28)
    assert not [c for c in ax.collections if isinstance(c, PolyCollection)]


def test_family_violins_from_enough_points():
    rows = [{"saliency_method": "gradcam", "dataset": "digits", "model": f"demo_resnet_{i}",
             "cose": 0.5 + 0.05 * i} for i in range(report.VIOLIN_MIN)]
    summary = pd.DataFrame(rows).assign(overall_consistency=0.5, sensitivity=0.5)
    ax = report.plot_cose_by_family(summary).figure.axes[0]
    assert len([c for c in ax.collections if isinstance(c, PolyCollection)]) == 1


def test_intervals_that_do_not_hold_their_point_are_drawn_as_they_are():
    """A percentile bootstrap interval need not contain the point estimate: with one image
    every replicate is that image, and lo = hi can sit an ulp above the estimate (found by
    `dvc exp run -S explain.images=1`: matplotlib refused the negative error size)."""
    from matplotlib.collections import LineCollection

    summary = _summary_for_families()
    summary["cose_lo"] = summary["cose"] - 0.05
    summary["cose_hi"] = summary["cose"] + 0.05
    v = summary.loc[0, "cose"]
    summary.loc[0, ["cose_lo", "cose_hi"]] = [np.nextafter(v, 1), np.nextafter(v, 1)]
    summary.loc[1, ["cose_lo", "cose_hi"]] = [0.52, 0.58]  # the point 0.5 lies below
    ax = report.plot_cose_by_family(summary).figure.axes[0]
    bars = [seg for c in ax.collections if isinstance(c, LineCollection)
            and c.get_gid() == "intervals" for seg in c.get_segments()]
    spans = sorted((round(float(s[:, 1].min()), 6), round(float(s[:, 1].max()), 6))
                   for s in bars)
    assert (0.52, 0.58) in spans and (round(v, 6), round(v, 6)) in spans
    assert len(spans) == 6  # one bar per drawn point (the NaN cell has none)


def test_values_outside_0_1_stay_in_view():
    # SSIM can be negative: sensitivity and COSE can exceed 1, consistency can be below 0
    summary = _summary_for_families()
    summary.loc[0, ["cose", "sensitivity"]] = [1.02, 1.3]
    ax = report.plot_cose_by_family(summary).figure.axes[0]
    assert ax.get_ylim()[0] <= 0 and ax.get_ylim()[1] >= 1.02
    ax = report.plot_scores(summary).figure.axes[0]
    assert ax.get_ylim()[1] >= summary.groupby("saliency_method")["sensitivity"].mean().max()


def test_consistency_distribution_figure_medians(known_pairs):
    plot = report.plot_consistency_distributions(known_pairs)
    data = plot.data
    g = data[(data.saliency_method == "gradcam") & (data.kind == "geometric")]["ssim"]
    # consistency rows only: correct original, unchanged prediction, image transform, finite
    assert sorted(g) == pytest.approx(sorted([0.8, 0.6, 0.9, 0.7, 0.1, 0.4]))
    p = data[(data.saliency_method == "gradcam") & (data.kind == "photometric")]["ssim"]
    assert list(p) == pytest.approx([0.5])
    ax = plot.figure.axes[0]
    segs = [seg for c in ax.collections if isinstance(c, LineCollection)
            and c.get_gid() == "medians" for seg in c.get_segments()]
    by_x = {round(float(s[:, 0].mean()), 3): float(s[0, 1]) for s in segs}
    # positions: method i, geometric at i - 0.2, photometric at i + 0.2
    assert by_x[-0.2] == pytest.approx(np.median([0.8, 0.6, 0.9, 0.7, 0.1, 0.4]))
    assert by_x[0.2] == pytest.approx(0.5)
    assert by_x[0.8] == pytest.approx(0.2) and by_x[1.2] == pytest.approx(0.4)


def test_scores_figure_bars(known_pairs):
    summary = scoring.summarize(known_pairs)
    plot = report.plot_scores(summary)
    ax = plot.figure.axes[0]
    for metric in ("overall_consistency", "sensitivity", "cose"):
        bars = [p for p in ax.patches if p.get_gid() == f"bars:{metric}"]
        expect = summary.groupby("saliency_method")[metric].mean()
        assert [b.get_height() for b in bars] == pytest.approx(
            [expect["gradcam"], expect["ig"]])
    assert list(plot.data.index) == ["gradcam", "ig"]


def _samples(rng, method, names, mags, signed=False):
    k, V = 2, len(names)
    lo = -1 if signed else 0
    return {"test_idx": np.arange(k), "images": rng.random((k, 3, 8, 8)),
            "labels": np.zeros(k, int), "pred": np.zeros(k, int),
            "map": rng.uniform(lo, 1, (k, 8, 8)),
            "variant_names": np.asarray(names),
            "variant_magnitudes": np.asarray(mags, float),
            "variant_maps": rng.uniform(lo, 1, (V, k, 8, 8)),
            "variant_pred": np.zeros((V, k), int)}


def test_qualitative_grid_shows_the_sample_maps():
    rng = np.random.default_rng(0)
    names = ["Rotate", "Rotate", "FlipLR", "Brightness", "random", "mid_ckpt_e001"]
    mags = [[30.0, 12.0], [-60.0, 9.0], [0, 0], [0.2, 0.1], [0, 0], [0, 0]]
    samples = {"gradcam": _samples(rng, "gradcam", names, mags),
               "lime": _samples(rng, "lime", names, mags, signed=True)}
    plot = report.plot_samples(samples, index=1, max_variants=4)
    cols = plot.data["columns"]
    # round robin over geometric, photometric, random, mid-checkpoint: Rotate, Brightness,
    # random, mid_ckpt (FlipLR would be the 5th); first Rotate at this image's magnitude
    assert cols == ["image", "original map", "Rotate +12°", "Brightness +0.1", "random",
                    "mid_ckpt_e001"]
    # the grid's panels, then each row's colour scale (a colorbar axes per row)
    axes = np.asarray(plot.figure.axes[:2 * len(cols)]).reshape(2, len(cols))
    bars = plot.figure.axes[2 * len(cols):]
    assert len(bars) == 2 and [b.get_ylabel() for b in bars] == ["saliency", "signed"]
    assert bars[1].get_ylim() == (-1, 1) and bars[0].get_ylim() == (0, 1)
    for r, method in enumerate(["gradcam", "lime"]):
        s = samples[method]
        np.testing.assert_allclose(axes[r, 0].images[0].get_array(),
                                   s["images"][1].transpose(1, 2, 0))
        np.testing.assert_allclose(axes[r, 1].images[0].get_array(), s["map"][1])
        np.testing.assert_allclose(axes[r, 2].images[0].get_array(), s["variant_maps"][0][1])
        np.testing.assert_allclose(axes[r, 4].images[0].get_array(), s["variant_maps"][4][1])
        np.testing.assert_array_equal(plot.data["panels"][(method, "random")],
                                      s["variant_maps"][4][1])
    assert axes[1, 1].images[0].get_cmap().name == "bwr"  # LIME's signed maps
    assert axes[1, 1].images[0].get_clim() == (-1, 1)


def test_paper_table_html_matches_the_markdown(known_pairs):
    summary = scoring.summarize(known_pairs)
    md = scoring.paper_table_markdown(summary)
    page = report.paper_table_html(summary)
    md_cells = [c.strip().replace("**", "") for ln in md.strip().splitlines()
                if not ln.startswith("|---") for c in ln.strip().strip("|").split("|")]
    html_cells = [re.sub(r"<[^>]+>", "", c) for c in
                  re.findall(r"<t[hd]>(.*?)</t[hd]>", page)]
    assert html_cells == md_cells
    assert "<strong>GradCAM</strong>" in page and "%" in page


def _write(out, known_pairs, versions=None):
    rng = np.random.default_rng(1)
    summary = scoring.summarize(known_pairs)
    samples = {("digits", "demo_resnet"): {
        "gradcam": _samples(rng, "gradcam", ["Rotate", "random"], [[45, 45], [0, 0]])}}
    return report.write_report(
        out, summary, known_pairs, samples, params={"seed": 0, "explain": {"images": 8}},
        versions=versions or {"git commit": "abc123", "data.dvc md5": "f00d.dir"},
        accuracies={"digits": {"demo_resnet": 0.75}})


def test_write_report_is_self_contained_and_deterministic(tmp_path, known_pairs):
    files = _write(tmp_path / "a", known_pairs)
    names = {str(p.relative_to(tmp_path / "a")) for p in files}
    assert {"report.html", "cose_table.html", "figures/scores.png",
            "figures/cose_by_family.png", "figures/consistency_distributions.png",
            "figures/magnitude.png", "figures/qualitative_digits_demo_resnet.png",
            "plots/magnitude/gradcam.csv", "plots/magnitude/ig.csv"} <= names
    page = (tmp_path / "a" / "report.html").read_text()
    imgs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(imgs) == len(list((tmp_path / "a" / "figures").glob("*.png")))
    for b64 in imgs:
        assert base64.b64decode(b64).startswith(b"\x89PNG\r\n\x1a\n")
    # nothing fetched from elsewhere, no scripts
    assert "<script" not in page
    assert not re.search(r'(src|href)="(?!data:)', page)
    for needle in ("abc123", "f00d.dir", "Table 1: COSE", "GradCAM", "explain:", "images: 8",
                   "0.7500", "Consistency by transform"):
        assert needle in page, needle
    csv = pd.read_csv(tmp_path / "a" / "plots" / "magnitude" / "gradcam.csv")
    assert csv.columns[0] == "relative_magnitude"
    # same inputs, same bytes; a stale figure of a dropped method/model is removed
    (tmp_path / "b" / "figures").mkdir(parents=True)
    (tmp_path / "b" / "figures" / "qualitative_old_model.png").write_bytes(b"x")
    _write(tmp_path / "b", known_pairs)
    for rel in names:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    assert not (tmp_path / "b" / "figures" / "qualitative_old_model.png").exists()


def test_explain_progress_bar_is_off_in_ci(monkeypatch):
    from cose.stages import common, explain

    monkeypatch.setenv("CI", "true")
    assert common.quiet() and explain._progress_bar(5).disable
    monkeypatch.delenv("CI")
    monkeypatch.delenv("COSE_QUIET", raising=False)
    monkeypatch.setattr(common, "quiet", lambda: False)
    bar = explain._progress_bar(5)
    assert not bar.disable
    bar.close()


# --------------------------------------------------------------------------- Chromium

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def chromium() -> str | None:
    env = os.environ.get("COSE_CHROMIUM")
    if env:
        return env
    return next((p for n in CHROMIUM_NAMES if (p := shutil.which(n))), None)


def screenshot(page: Path, png: Path, tmp: Path) -> None:
    exe = chromium()
    if exe is None:
        pytest.skip("no chromium binary on PATH (chromium, chromium-browser, google-chrome); "
                    "install it with `apt-get install -y chromium` or set COSE_CHROMIUM")
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run",
           f"--user-data-dir={tmp / 'chromium-profile'}", f"--screenshot={png}",
           "--window-size=1200,2000", page.resolve().as_uri()]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0 and png.exists(), res.stderr[-3000:]


def test_report_renders_in_headless_chromium(tmp_path, known_pairs):
    from PIL import Image

    _write(tmp_path / "out", known_pairs)
    png = tmp_path / "shot.png"
    screenshot(tmp_path / "out" / "report.html", png, tmp_path)
    img = np.asarray(Image.open(png).convert("RGB")).astype(int)
    assert img.shape[:2] == (2000, 1200)
    ink = (img < 200).any(axis=2)  # text, table rules, plot lines
    assert ink.mean() > 0.01, "screenshot is (nearly) blank"
    assert ink[:1000].mean() > 0.005 and ink[1000:].mean() > 0.005  # top and bottom halves
    colour = (img.max(axis=2) - img.min(axis=2)) > 80  # the embedded figures' colours
    assert colour.sum() > 2000, "no embedded figure was drawn"


# --------------------------------------------------------------------------- pipeline


FIGURE_FILES = ("scores.png", "cose_by_family.png", "consistency_distributions.png",
                "magnitude.png")


@pytest.mark.slow
def test_compile_writes_declares_and_logs_the_report(tiny_project, tmp_path):
    import yaml
    from conftest import sh

    from cose.tracking import data_hash

    params = yaml.safe_load((tiny_project / "params.yaml").read_text())
    res = tiny_project / "results"
    for name in FIGURE_FILES:
        assert (res / "figures" / name).read_bytes().startswith(b"\x89PNG")
    for model in params["models"]:
        assert (res / "figures" / f"qualitative_digits_{model}.png").exists()
    assert sorted(p.stem for p in (res / "plots" / "magnitude").glob("*.csv")) == sorted(
        params["methods"])
    page = (res / "report.html").read_text()
    commit = sh(["git", "rev-parse", "HEAD"], tiny_project).stdout.strip()
    assert commit in page and data_hash(tiny_project) in page
    assert page.count("data:image/png;base64,") == len(list((res / "figures").glob("*.png")))
    # header, one row per model, the mean row, the images and pairs behind each cell
    table = (res / "cose_table.html").read_text()
    assert table.count("<tr>") == 1 + len(params["models"]) + 1 + 2
    assert "<td>images</td>" in table and "<td>pairs</td>" in table
    summary = pd.read_csv(res / "summary.csv")
    assert {"cose_lo", "cose_hi", "n_images", "nan_share"} <= set(summary.columns)
    ranged = summary.dropna(subset=["cose_lo"])  # 2 images per cell: mostly undefined
    assert ((ranged["cose_lo"] <= ranged["cose"]) & (ranged["cose"] <= ranged["cose_hi"])).all()
    assert (res / "comparisons.csv").exists()

    # DVC: the PNGs as image plots, one magnitude plot per method, no errors
    shown = json.loads(sh(["dvc", "plots", "show", "--json", "-o", str(tmp_path / "plots")],
                          tiny_project).stdout)
    assert not shown.get("errors"), shown.get("errors")
    kinds = {k: v[0]["type"] for k, v in shown["data"].items()}
    for name in FIGURE_FILES:
        assert kinds[f"results/figures/{name}"] == "image"
    for method in params["methods"]:
        assert kinds[f"results/plots/magnitude/{method}.csv"] == "vega"
    assert not (tiny_project / "dvc_plots").exists()

    # MLflow: the compile run holds the figures and the pages
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tiny_project / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("cose")
    runs = client.search_runs([exp.experiment_id], "tags.`dvc.stage` = 'compile'")
    root = next(r for r in runs if r.data.tags["mlflow.runName"] == "compile")  # the stage's
    figures = {Path(a.path).name for a in client.list_artifacts(root.info.run_id, "figures")}
    assert set(FIGURE_FILES) <= figures
    results = {Path(a.path).name for a in client.list_artifacts(root.info.run_id, "results")}
    assert {"report.html", "cose_table.html", "cose_table.md", "summary.csv"} <= results


@pytest.mark.slow
def test_cose_report_rebuilds_the_same_figures_quietly(tiny_project, tmp_path):
    from conftest import sh

    out = tmp_path / "rebuilt"
    res = sh(["cose", "--quiet", "report", "--out", str(out)], tiny_project)
    assert res.stdout.strip() == str(out / "report.html")
    assert res.stderr.strip() == ""  # --quiet: no log lines, no progress
    for rel in [f"figures/{n}" for n in FIGURE_FILES] + ["cose_table.html"]:
        assert (out / rel).read_bytes() == (tiny_project / "results" / rel).read_bytes(), rel


@pytest.mark.slow
def test_report_of_the_pipeline_renders_in_chromium(tiny_project, tmp_path):
    from PIL import Image

    png = tmp_path / "shot.png"
    screenshot(tiny_project / "results" / "report.html", png, tmp_path)
    img = np.asarray(Image.open(png).convert("RGB")).astype(int)
    assert (img < 200).any(axis=2).mean() > 0.01

