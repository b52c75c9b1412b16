"""Tables and figures of the COSE report, and one self-contained HTML page.

- the paper's Table 1 layout as HTML (:func:`paper_table_html`, from
  :func:`cose.scoring.paper_table_markdown`, so both layouts always agree);
- Fig. 3: COSE by architecture family (CNN / Transformer) per method (:func:`plot_cose_by_family`);
- Fig. 5: distributions of the per-pair consistency SSIM per method, geometric and photometric
  (:func:`plot_consistency_distributions`);
- Fig. 6: consistency and sensitivity against the transform magnitude, geometric vs photometric
  (:func:`magnitude_curves`, :func:`plot_magnitude`), also as CSV plot data for DVC;
- a qualitative grid (image, original map, transformed maps, per method) from the explain
  stage's ``samples.npz`` (:func:`plot_samples`);
- headline bars per method (:func:`plot_scores`);
- ``report.html`` (:func:`render_html`, :func:`write_report`): tables, figures embedded as base64
  PNG, params and the versions of data and code; no scripts, no external resources.

Every ``plot_*`` function returns a :class:`Plot` ``(figure, data)``: ``data`` is exactly what is
drawn, so callers and tests can check the numbers. Figures are ``matplotlib.figure.Figure``
objects made without pyplot (no display, no global state). Output bytes depend only on the
inputs (no timestamps), so an unchanged DVC stage writes identical files.
"""

from __future__ import annotations

import base64
import html
import io
import os
import platform
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from cose import scoring, spec
from cose import transforms as T

__all__ = [
    "Plot",
    "FIGURES",
    "architecture_family",
    "relative_magnitude",
    "magnitude_curves",
    "magnitude_plot_tables",
    "cose_by_family",
    "consistency_values",
    "method_scores",
    "plot_cose_by_family",
    "plot_consistency_distributions",
    "plot_magnitude",
    "plot_samples",
    "plot_scores",
    "markdown_table_html",
    "paper_table_html",
    "versions",
    "render_html",
    "write_report",
    "figure_png",
]

FAMILY_COLORS = {"CNN": "#1f77b4", "Transformer": "#d62728", "other": "#7f7f7f"}
KIND_COLORS = {"geometric": "#2ca02c", "photometric": "#9467bd"}
_TRANSFORMER_KEYS = ("vit", "swin", "deit", "beit", "transformer", "eva", "cait", "xcit")
_CNN_FAMILIES = ("resnet", "convnext", "vgg", "densenet", "efficientnet", "mobilenet", "regnet")

# figure file stem -> caption (the order of the report)
FIGURES: dict[str, str] = {
    "scores": "Consistency, sensitivity and COSE per method (mean over datasets and models); "
              "higher is better for all three.",
    "cose_by_family": "Fig. 3 layout: COSE per method by architecture family (one point per "
                      "dataset and model, with its bootstrap interval over images as an error "
                      "bar; a violin where a family has 5 values or more). Higher is better.",
    "consistency_distributions": "Fig. 5 layout: distribution of the per-pair consistency "
                                 "(SSIM of variants still predicted as the label), geometric "
                                 "and photometric transforms, pooled over datasets and models.",
    "magnitude": "Fig. 6 layout: consistency and sensitivity against the transform magnitude "
                 "(|magnitude| / the transform's largest magnitude, binned), geometric vs "
                 "photometric, pooled over datasets and models. Sensitivity is 1 - SSIM and "
                 "SSIM lies in [-1, 1], so sensitivity can exceed 1 (maps anti-correlated "
                 "with the original's); the axes cover every value drawn.",
}


class Plot(NamedTuple):
    """A figure and the data it draws."""

    figure: Any  # matplotlib.figure.Figure
    data: Any


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def figure_png(fig, dpi: int = 100) -> bytes:
    """PNG bytes of a figure (no timestamp in the metadata: same figure, same bytes)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    return buf.getvalue()


def _methods(values: Sequence[str]) -> list[str]:
    present = list(dict.fromkeys(values))
    return spec.method_order(present)


def _display(method: str) -> str:
    return spec.method_display(method)


# --------------------------------------------------------------------------- data


def architecture_family(model: str) -> str:
    """``CNN`` or ``Transformer`` (the paper's grouping) for a registry model name; names not
    in the registry are guessed from their spelling (``vit``/``swin``/... -> Transformer)."""
    family = spec.model_family(model)
    try:
        from cose import models

        family = family or models.get(model).family
    except Exception:  # noqa: BLE001 - unknown name (or no torch): guess from the name
        pass
    key = re.sub(r"[^a-z0-9]", "", str(family or model).lower())
    if any(k in key for k in _TRANSFORMER_KEYS):
        return "Transformer"
    if family is not None or any(k in key for k in _CNN_FAMILIES + ("cnn", "conv", "net")):
        return "CNN"
    return "other"


def _model_size(model: str) -> int | None:
    try:
        from cose import models

        return int(models.preprocess(model).crop)
    except Exception:  # noqa: BLE001
        return None


def relative_magnitude(
    pairs: pd.DataFrame, sizes: int | Mapping[str, int] | None = None
) -> pd.Series:
    """``|transform_magnitude|`` over the transform's largest magnitude, in (0, 1]; NaN for
    unsigned transforms and model changes. Translations scale with the image side: ``sizes`` is
    that side (one int, or per model name); by default the registry model's crop size, else the
    largest translation seen in the table."""
    out = pd.Series(np.nan, index=pairs.index, dtype=float)
    mags = pd.to_numeric(pairs["transform_magnitude"], errors="coerce").abs()
    types = pairs["transform_type"]
    for name in T.SIGNED:
        sel = types == name
        if not sel.any():
            continue
        if name in ("TranslateX", "TranslateY"):
            groups = pairs.loc[sel].groupby("model", sort=False).groups if "model" in pairs else {
                None: pairs.index[sel]}
            for model, idx in groups.items():
                size = sizes.get(model) if isinstance(sizes, Mapping) else sizes
                size = size or (_model_size(model) if model is not None else None)
                top = (max(T.magnitude_grid(name, int(size))) if size
                       else float(mags.loc[idx].max()))
                out.loc[idx] = mags.loc[idx] / top if top else np.nan
        else:
            out.loc[sel] = mags.loc[sel] / max(T.magnitude_grid(name))
    return out.clip(upper=1.0)


def _pooled(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Pool breakdown rows: means weighted by their counts (NaN where no rows)."""
    f = frame.copy()
    f["_cs"] = f["consistency"].fillna(0) * f["n_consistency"]
    f["_fs"] = f["fidelity"].fillna(0) * f["n_fidelity"]
    g = f.groupby(keys, sort=False)[["_cs", "n_consistency", "_fs", "n_fidelity"]].sum()
    g = g.reset_index()
    g["consistency"] = np.where(g["n_consistency"] > 0,
                                g["_cs"] / g["n_consistency"].where(g["n_consistency"] > 0), np.nan)
    fid = np.where(g["n_fidelity"] > 0, g["_fs"] / g["n_fidelity"].where(g["n_fidelity"] > 0),
                   np.nan)
    g["fidelity"] = fid
    g["sensitivity"] = 1.0 - fid
    return g.drop(columns=["_cs", "_fs"])


def magnitude_curves(
    pairs: pd.DataFrame, bins: int = 6, sizes: int | Mapping[str, int] | None = None
) -> pd.DataFrame:
    """Fig. 6 data: per (saliency_method, kind in geometric/photometric, magnitude bin) the
    consistency (mean SSIM of variants still predicted as the label) and the sensitivity
    (1 - mean SSIM of variants whose prediction changed), pooled over datasets, models and
    transforms. Signed transforms only; bin ``b`` of ``bins`` holds relative magnitudes in
    ((b-1)/bins, b/bins] and sits at its centre. Misclassified originals dropped as in
    :func:`cose.scoring.score`."""
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be an integer >= 1, got {bins!r}")
    cols = ["saliency_method", "kind", "bin", "relative_magnitude", "consistency",
            "sensitivity", "n_consistency", "n_fidelity"]
    signed = pairs[pairs["transform_type"].isin(T.SIGNED)]
    rel = relative_magnitude(signed, sizes)
    signed, rel = signed[rel > 0], rel[rel > 0].to_numpy()
    bin_of = np.clip(np.ceil(rel * bins - 1e-9), 1, bins)
    geometric = signed["transform_type"].isin(T.GEOMETRIC).to_numpy()
    rows = []
    # reuse scoring's breakdown (same row selection and NaN handling): one stand-in transform
    # per kind and the bin as the magnitude, then pool datasets and models by row counts
    for kind, sel, stand_in in (("geometric", geometric, "Rotate"),
                                ("photometric", ~geometric, "Brightness")):
        if not sel.any():
            continue
        part = signed[sel].assign(transform_type=stand_in, transform_magnitude=bin_of[sel])
        g = _pooled(scoring.breakdown_by_magnitude(part),
                    ["saliency_method", "transform_magnitude"])
        g["kind"] = kind
        rows.append(g)
    if not rows:
        return pd.DataFrame(columns=cols)
    out = pd.concat(rows, ignore_index=True)
    out["bin"] = out["transform_magnitude"].astype(int)
    out["relative_magnitude"] = (out["bin"] - 0.5) / bins
    rank = {m: i for i, m in enumerate(_methods(out["saliency_method"]))}
    out = out.assign(_m=out["saliency_method"].map(rank), _k=out["kind"].map(
        {"geometric": 0, "photometric": 1}))
    out = out.sort_values(["_m", "_k", "bin"], kind="stable").reset_index(drop=True)
    for c in ("n_consistency", "n_fidelity"):
        out[c] = out[c].astype(int)
    return out[cols]


def magnitude_plot_tables(curves: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per method, the Fig. 6 curves as one wide table for DVC plots: ``relative_magnitude``,
    ``geometric_consistency``, ``photometric_consistency``, ``geometric_sensitivity``,
    ``photometric_sensitivity`` (NaN where a bin has no rows)."""
    cols = ["geometric_consistency", "photometric_consistency", "geometric_sensitivity",
            "photometric_sensitivity"]
    out = {}
    for method in _methods(curves["saliency_method"]):
        c = curves[curves["saliency_method"] == method]
        wide = c.pivot_table(index="relative_magnitude", columns="kind",
                             values=["consistency", "sensitivity"], aggfunc="first",
                             dropna=False)
        table = pd.DataFrame(index=sorted(c["relative_magnitude"].unique()))
        for col in cols:
            kind, metric = col.split("_")
            key = (metric, kind)
            table[col] = wide[key] if key in wide.columns else np.nan
        table = table.dropna(how="all")
        table.index.name = "relative_magnitude"
        out[method] = table.reset_index()
    return out


def cose_by_family(summary: pd.DataFrame, metric: str = "cose") -> pd.DataFrame:
    """Fig. 3 data: one row per (method, dataset, model) with a finite ``metric`` and the
    model's architecture ``family`` (and the metric's interval where the summary has it)."""
    ranged = [c for c in (f"{metric}_lo", f"{metric}_hi") if c in summary.columns]
    d = summary[["saliency_method", "dataset", "model", metric, *ranged]].copy()
    d = d[np.isfinite(pd.to_numeric(d[metric], errors="coerce").astype(float))]
    d["family"] = d["model"].map(architecture_family)
    return d[["saliency_method", "family", "dataset", "model", metric, *ranged]].reset_index(
        drop=True)


def consistency_values(pairs: pd.DataFrame, column: str = "ssim") -> pd.DataFrame:
    """Fig. 5 data: the per-pair consistency values (``column`` of image-transform variants
    still predicted as the label, original correctly classified), with ``kind``."""
    kept = pairs[pairs["target_class"] == pairs["pred_class"]]
    kept = kept[kept["t_pred_class"] == kept["target_class"]]
    kind = kept["transform_type"].map(
        lambda t: "geometric" if t in T.GEOMETRIC else "photometric" if t in T.PHOTOMETRIC
        else None)
    values = pd.to_numeric(kept[column], errors="coerce").astype(float)
    out = pd.DataFrame({"saliency_method": kept["saliency_method"], "kind": kind,
                        column: values})
    return out[out["kind"].notna() & np.isfinite(out[column])].reset_index(drop=True)


def method_scores(summary: pd.DataFrame,
                  metrics: Sequence[str] = ("overall_consistency", "sensitivity", "cose")
                  ) -> pd.DataFrame:
    """Per method (rows, paper order) the mean of each metric over datasets and models."""
    methods = _methods(summary["saliency_method"])
    g = summary.groupby("saliency_method")[list(metrics)].mean()
    return g.reindex(methods)


# --------------------------------------------------------------------------- figures


#: a violin (a density) is drawn over this many values or more; fewer are shown as points
VIOLIN_MIN = 5


def _violins(ax, groups: list[np.ndarray], positions: list[float], color: str,
             width: float, points: bool) -> list[float]:
    """Violins where a group has >= VIOLIN_MIN distinct-enough values (fewer make no density
    worth drawing), a median tick for every non-empty group (one LineCollection, gid
    ``medians``), optionally the points. Returns the medians."""
    ok = [i for i, g in enumerate(groups) if len(g) >= VIOLIN_MIN and np.ptp(g) > 0]
    if ok:
        parts = ax.violinplot([groups[i] for i in ok], positions=[positions[i] for i in ok],
                              widths=width, showextrema=False)
        for body in parts["bodies"]:
            body.set_facecolor(color)
            body.set_edgecolor(color)
            body.set_alpha(0.35)
    medians = [float(np.median(g)) if len(g) else float("nan") for g in groups]
    xs = [p for p, g in zip(positions, groups) if len(g)]
    ys = [m for m, g in zip(medians, groups) if len(g)]
    if xs:
        ax.hlines(ys, [x - width / 3 for x in xs], [x + width / 3 for x in xs], colors=color,
                  linewidth=2, gid="medians")
    if points:
        for x, g in zip(positions, groups):
            if len(g):
                ax.scatter(np.full(len(g), x), g, s=14, color=color, edgecolor="white",
                           linewidth=0.5, zorder=3)
    return medians


def plot_cose_by_family(summary: pd.DataFrame, metric: str = "cose") -> Plot:
    """Fig. 3: per method, the COSE of each (dataset, model), side by side per architecture
    family. ``data``: :func:`cose_by_family` (one row per drawn point)."""
    data = cose_by_family(summary, metric)
    methods = _methods(summary["saliency_method"])
    families = [f for f in ("CNN", "Transformer", "other") if f in set(data["family"])]
    fig = _figure(max(6.0, 1.1 * len(methods) + 2), 4.0)
    ax = fig.subplots()
    n = max(len(families), 1)
    width = 0.8 / n
    for k, fam in enumerate(families):
        positions = [i - 0.4 + width * (k + 0.5) for i in range(len(methods))]
        groups = [data.loc[(data["saliency_method"] == m) & (data["family"] == fam),
                           metric].to_numpy(float) for m in methods]
        _violins(ax, groups, positions, FAMILY_COLORS[fam], width * 0.9, points=True)
        if f"{metric}_lo" in data.columns:  # each point's bootstrap interval
            for x, m in zip(positions, methods):
                rows = data[(data["saliency_method"] == m) & (data["family"] == fam)]
                lo, hi = rows[f"{metric}_lo"].to_numpy(float), rows[f"{metric}_hi"].to_numpy(float)
                ok = np.isfinite(lo) & np.isfinite(hi)
                if ok.any():  # the bar spans [lo, hi] itself: a percentile interval need not
                    # hold the point (COSE is a nonlinear statistic; with one image lo = hi
                    # can sit an ulp beside it), and matplotlib refuses negative error sizes
                    ax.errorbar(np.full(ok.sum(), x), (lo[ok] + hi[ok]) / 2,
                                yerr=np.abs(hi[ok] - lo[ok]) / 2, fmt="none",
                                ecolor=FAMILY_COLORS[fam], elinewidth=1, capsize=3,
                                gid="intervals")
        ax.scatter([], [], color=FAMILY_COLORS[fam], label=fam)  # legend entry only
    ax.set_xticks(range(len(methods)), [_display(m) for m in methods])
    ax.set_xlim(-0.6, len(methods) - 0.4)
    ax.set_ylabel((metric.upper() if metric == "cose" else metric) + " (higher is better)")
    bounds = [data[c] for c in (metric, f"{metric}_lo", f"{metric}_hi") if c in data.columns]
    ax.set_ylim(*_limits(pd.concat(bounds) if bounds else data[metric]))
    ax.set_title("COSE by architecture family")
    ax.grid(axis="y", alpha=0.3)
    if families:
        ax.legend(loc="upper right", fontsize="small")
    return Plot(fig, data)


def plot_consistency_distributions(pairs: pd.DataFrame, column: str = "ssim") -> Plot:
    """Fig. 5: per method, violins of the per-pair consistency for geometric and photometric
    transforms; a tick at each median. ``data``: :func:`consistency_values`."""
    data = consistency_values(pairs, column)
    methods = _methods(pairs["saliency_method"])
    fig = _figure(max(6.0, 1.1 * len(methods) + 2), 4.0)
    ax = fig.subplots()
    for k, kind in enumerate(("geometric", "photometric")):
        positions = [i - 0.2 + 0.4 * k for i in range(len(methods))]
        groups = [data.loc[(data["saliency_method"] == m) & (data["kind"] == kind),
                           column].to_numpy(float) for m in methods]
        _violins(ax, groups, positions, KIND_COLORS[kind], 0.36, points=False)
        ax.plot([], [], color=KIND_COLORS[kind], linewidth=6, alpha=0.5, label=kind)
    ax.set_xticks(range(len(methods)), [_display(m) for m in methods])
    ax.set_xlim(-0.6, len(methods) - 0.4)
    ax.set_ylabel(f"consistency ({column.upper() if column == 'ssim' else column})")
    ax.set_ylim(*_limits(data[column], 0, 1.05, 0.05))
    ax.set_title("Consistency distributions")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    return Plot(fig, data)


MAGNITUDE_PANELS = tuple((metric, kind) for metric in ("consistency", "sensitivity")
                         for kind in ("geometric", "photometric"))


def plot_magnitude(curves: pd.DataFrame) -> Plot:
    """Fig. 6: consistency (top) and sensitivity (bottom) against the relative transform
    magnitude, geometric transforms (left, solid) and photometric ones (right, dashed) in
    panels of their own (:data:`MAGNITUDE_PANELS`, in ``fig.axes`` order), one colour per
    method in every panel. Each line is labelled ``"<Method> (<kind>)"`` and draws the bins of
    :func:`magnitude_curves` with a value."""
    fig = _figure(11.0, 7.0)
    axes = fig.subplots(2, 2, sharex=True, sharey="row").ravel()
    methods = _methods(curves["saliency_method"])
    colors = dict(zip(methods, _palette(len(methods))))
    styles = {"geometric": ("-", "o"), "photometric": ("--", "s")}
    for ax, (metric, kind) in zip(axes, MAGNITUDE_PANELS):
        for m in methods:
            c = curves[(curves["saliency_method"] == m) & (curves["kind"] == kind)]
            c = c[np.isfinite(c[metric].astype(float))]
            if c.empty:
                continue
            ax.plot(c["relative_magnitude"].to_numpy(float), c[metric].to_numpy(float),
                    linestyle=styles[kind][0], marker=styles[kind][1], color=colors[m],
                    markersize=4, label=f"{_display(m)} ({kind})")
        ax.set_xlabel("relative transform magnitude")
        ax.set_ylabel(metric)
        ax.set_xlim(0, 1)
        ax.set_ylim(*_limits(curves[metric] if len(curves) else [], -0.05, 1.05, 0))
        ax.grid(alpha=0.3)
        ax.set_title(f"{metric.capitalize()} vs magnitude: {kind}", fontsize="small")
    from matplotlib.lines import Line2D

    # one legend entry per method (its colour is the same in every panel)
    fig.legend([Line2D([], [], color=colors[m], marker="o") for m in methods],
               [_display(m) for m in methods], loc="outside right center", fontsize="small")
    return Plot(fig, curves)


def _limits(values, low: float = 0.0, high: float = 1.0, pad: float = 0.05) -> tuple:
    """[low, high], widened to the finite values (SSIM can be negative, so sensitivity > 1)."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if len(v):
        low, high = min(low, float(v.min()) - pad), max(high, float(v.max()) + pad)
    return low, high


def _palette(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def method_score_colors() -> dict[str, str]:
    return {"overall_consistency": "#2ca02c", "sensitivity": "#ff7f0e", "cose": "#1f77b4"}


def plot_scores(summary: pd.DataFrame) -> Plot:
    """Bars per method: mean overall consistency, sensitivity and COSE over datasets and
    models. ``data``: :func:`method_scores` (rows in bar order; NaN bars are not drawn)."""
    data = method_scores(summary)
    fig = _figure(max(6.0, 1.1 * len(data) + 2), 3.6)
    ax = fig.subplots()
    colors = method_score_colors()
    metrics = list(data.columns)
    width = 0.8 / len(metrics)
    for k, metric in enumerate(metrics):
        xs = np.arange(len(data)) - 0.4 + width * (k + 0.5)
        ys = data[metric].to_numpy(float)
        ok = np.isfinite(ys)
        ax.bar(xs[ok], ys[ok], width=width, color=colors.get(metric), label=metric,
               gid=f"bars:{metric}")
    ax.set_xticks(range(len(data)), [_display(m) for m in data.index])
    low, high = _limits(data.to_numpy().ravel(), 0, 1)
    ax.set_ylim(low, high + 0.15)
    ax.set_title("COSE per saliency method")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper center", fontsize="small", ncols=len(metrics), frameon=False)
    return Plot(fig, data)


def _sample_columns(names: Sequence[str], max_variants: int) -> list[int]:
    """Variant indices for the grid: the first variant of each transform / model change,
    taken round-robin over geometric, photometric, random and mid-checkpoint variants when
    there are more than ``max_variants``, shown in their original order."""
    firsts: dict[str, int] = {}
    for i, n in enumerate(names):
        firsts.setdefault(n, i)
    queues: dict[str, list[int]] = {}
    for n, i in firsts.items():
        try:
            fam = scoring.transform_family(n)
        except ValueError:
            fam = "other"
        queues.setdefault(fam, []).append(i)
    picked: list[int] = []
    order = [q for f in ("geometric", "photometric", "random", "mid_ckpt", "other")
             if (q := queues.get(f))]
    while len(picked) < max_variants and any(order):
        for q in order:
            if q and len(picked) < max_variants:
                picked.append(q.pop(0))
    return sorted(picked)


def _variant_label(name: str, magnitude: float) -> str:
    if name in T.SIGNED:
        unit = {"Rotate": "°", "TranslateX": " px", "TranslateY": " px"}.get(name, "")
        return f"{name} {magnitude:+.3g}{unit}"
    return name


def _as_image(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img, dtype=float)
    if img.ndim == 3 and img.shape[0] in (1, 3):
        img = img.transpose(1, 2, 0)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    return np.clip(img, 0, 1)


def plot_samples(samples: Mapping[str, Mapping[str, np.ndarray]], index: int = 0,
                 max_variants: int = 7, title: str | None = None) -> Plot:
    """Qualitative grid: one row per method with the image, the original map and the maps of
    up to ``max_variants`` variants (the first of each transform / model change; geometric ones
    mapped back to the original frame), for sample ``index`` of each method's ``samples.npz``.
    ``data``: ``{"columns": [...], "panels": {(method, column): 2-D array}}``."""
    methods = _methods([m for m, s in samples.items() if s and len(s.get("map", ())) > index])
    if not methods:
        raise ValueError("plot_samples: no method has sample maps (explain.sample_maps = 0?)")
    first = samples[methods[0]]
    cols_idx = _sample_columns([str(n) for n in first["variant_names"]], max_variants)
    columns = ["image", "original map"] + [
        _variant_label(str(first["variant_names"][i]), float(first["variant_magnitudes"][i][index]))
        for i in cols_idx]
    fig = _figure(1.45 * len(columns) + 0.6, 1.5 * len(methods) + 0.6)
    axes = np.atleast_2d(fig.subplots(len(methods), len(columns), squeeze=False))
    panels: dict[tuple[str, str], np.ndarray] = {}
    for r, m in enumerate(methods):
        s = samples[m]
        names = [str(n) for n in s["variant_names"]]
        signed = m == "lime" or float(np.min(s["map"][index])) < 0
        kw = dict(cmap="bwr", vmin=-1, vmax=1) if signed else dict(cmap="jet", vmin=0, vmax=1)
        img = _as_image(s["images"][index])
        axes[r, 0].imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
        panels[(m, "image")] = img
        axes[r, 1].imshow(np.asarray(s["map"][index], float), **kw)
        panels[(m, "original map")] = np.asarray(s["map"][index], float)
        for c, i in enumerate(cols_idx, start=2):
            # the same variant (name and magnitude) in this method's samples
            j = next((k for k, n in enumerate(names) if n == str(first["variant_names"][i])
                      and np.isclose(s["variant_magnitudes"][k][index],
                                     first["variant_magnitudes"][i][index])), None)
            if j is None:
                axes[r, c].set_axis_off()
                continue
            arr = np.asarray(s["variant_maps"][j][index], float)
            axes[r, c].imshow(arr, **kw)
            panels[(m, columns[c])] = arr
        axes[r, 0].set_ylabel(_display(m), fontsize="small")
        # the row's colour scale (each map is drawn on it: signed maps -1..1, others 0..1)
        bar = fig.colorbar(axes[r, 1].images[0], ax=list(axes[r, :]), fraction=0.02, pad=0.01)
        bar.set_label("signed" if signed else "saliency", fontsize="x-small")
        bar.ax.tick_params(labelsize="xx-small")
    for r in range(len(methods)):
        for c in range(len(columns)):
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
            if r == 0:
                axes[r, c].set_title(columns[c], fontsize="x-small")
    if title:
        fig.suptitle(title, fontsize="small")
    return Plot(fig, {"columns": columns, "panels": panels})


# --------------------------------------------------------------------------- tables


def _inline(text: str) -> str:
    """Markdown ``**bold**`` -> <strong>, everything else escaped."""
    parts = re.split(r"\*\*(.+?)\*\*", text)
    return "".join(html.escape(p) if i % 2 == 0 else f"<strong>{html.escape(p)}</strong>"
                   for i, p in enumerate(parts))


def markdown_table_html(markdown: str, css_class: str = "cose-table") -> str:
    """A pipe table (as :func:`cose.scoring.paper_table_markdown` writes) as an HTML table."""
    rows = [ln.strip() for ln in markdown.strip().splitlines() if ln.strip().startswith("|")]
    if len(rows) < 2:
        raise ValueError("markdown_table_html: not a markdown table (need a header and a rule)")

    def cells(line: str) -> list[str]:
        return [c.strip() for c in line.strip().strip("|").split("|")]

    head = "".join(f"<th>{_inline(c)}</th>" for c in cells(rows[0]))
    body = []
    for line in rows[2:]:
        body.append("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in cells(line)) + "</tr>")
    return (f'<table class="{html.escape(css_class)}"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table>")


def paper_table_html(summary: pd.DataFrame, metric: str = "cose") -> str:
    """The paper's Table 1 layout (rows dataset x model, columns methods, percent, mean row) as
    HTML; same content as :func:`cose.scoring.paper_table_markdown`."""
    return markdown_table_html(scoring.paper_table_markdown(summary, metric))


def _frame_html(frame: pd.DataFrame, digits: int = 4) -> str:
    def fmt(v):
        if isinstance(v, (float, np.floating)):
            return "n/a" if not np.isfinite(v) else f"{v:.{digits}f}"
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = "".join("<tr>" + "".join(f"<td>{fmt(v)}</td>" for v in row) + "</tr>"
                   for row in frame.itertuples(index=False))
    return f'<table class="data"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _by_transform_tables(pairs: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per transform / model change (rows) and method (columns): pooled consistency, and
    sensitivity (1 - pooled fidelity)."""
    bd = scoring.breakdown_by_transform(pairs)
    if bd.empty:
        return pd.DataFrame(), pd.DataFrame()
    pooled = _pooled(bd, ["saliency_method", "transform_type"])
    methods = _methods(pooled["saliency_method"])
    order = list(dict.fromkeys(bd["transform_type"]))
    tables = []
    for metric in ("consistency", "sensitivity"):
        t = pooled.pivot_table(index="transform_type", columns="saliency_method", values=metric,
                               aggfunc="first", dropna=False)
        t = t.reindex(index=order, columns=methods)
        if metric == "consistency":
            t = t.loc[[i for i in t.index if i in T.TRANSFORMS]]
        t.columns = [_display(m) for m in t.columns]
        tables.append(t.reset_index().rename(columns={"transform_type": "variant"}))
    return tables[0], tables[1]


# --------------------------------------------------------------------------- versions


def _dvc_lock_md5(root: Path) -> dict[str, str]:
    import yaml

    try:
        lock = yaml.safe_load((root / "dvc.lock").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    out = {}
    for stage in (lock.get("stages") or {}).values():
        for o in stage.get("outs") or []:
            if o.get("path") in ("outputs/explain",) and o.get("md5"):
                out[f"dvc.lock {o['path']} md5"] = str(o["md5"])
    return out


def versions(root: str | os.PathLike | None = None) -> dict[str, str]:
    """What produced the results: git commit, ``data.dvc`` md5, the explain outputs' md5 in
    ``dvc.lock``, and the cose / Python / torch / platform versions."""
    from cose import __version__
    from cose.tracking import data_hash, git_commit, project_root

    root = Path(root) if root is not None else project_root()
    out = {"git commit": git_commit(root), "data.dvc md5": data_hash(root)}
    out.update(_dvc_lock_md5(root))
    out["cose"] = __version__
    out["python"] = platform.python_version()
    try:
        import torch

        out["torch"] = torch.__version__
    except ImportError:  # pragma: no cover
        pass
    out["platform"] = f"{platform.system()} {platform.machine()}"
    return out


# --------------------------------------------------------------------------- HTML page

_CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:24px auto;
max-width:1150px;color:#1b1f24;background:#fff;line-height:1.45;padding:0 16px}
h1{font-size:1.7em;margin-bottom:.2em}h2{border-bottom:1px solid #d0d7de;padding-bottom:.2em;
margin-top:1.6em}.lead{color:#57606a;margin-top:0}
table{border-collapse:collapse;margin:.6em 0 1em;font-size:.9em}
th,td{border:1px solid #d0d7de;padding:4px 9px;text-align:right}
th{background:#f6f8fa}td:first-child,th:first-child,td:nth-child(2){text-align:left}
table.kv td{text-align:left;font-family:ui-monospace,Menlo,Consolas,monospace}
figure{margin:1em 0 1.8em}figure img{max-width:100%;border:1px solid #eaeef2}
figcaption{color:#57606a;font-size:.9em}pre{background:#f6f8fa;padding:10px;overflow:auto;
font-size:.85em;border:1px solid #eaeef2}details summary{cursor:pointer;font-weight:600}
"""


_GLOSSARY = """<dl>
<dt>consistency (<code>geom_consistency</code>, <code>photo_consistency</code>,
<code>overall_consistency</code>)</dt><dd>mean SSIM between the original map and the map of a
transformed image whose prediction did not change (geometric ones mapped back): a good map
follows the image. Higher is better.</dd>
<dt><code>*_fidelity</code> (the reference's names: <code>geom_fidelity</code>,
<code>photo_fidelity</code>, <code>img_fidelity</code>, <code>random_fidelity</code>,
<code>midckpt_fidelity</code>, <code>model_fidelity</code>, <code>overall_fidelity</code>)</dt>
<dd>mean SSIM between the original map and the map of a variant whose prediction changed
(a transformed image, the random-init model, a mid-training checkpoint): a good map changes
with the prediction, so lower is better here.</dd>
<dt>sensitivity</dt><dd>1 &minus; <code>overall_fidelity</code>. SSIM lies in [&minus;1, 1],
so sensitivity lies in [0, 2]: above 1 the variant's map is anti-correlated with the
original's. Higher is better.</dd>
<dt>COSE</dt><dd>sqrt(overall_consistency &times; sensitivity), the geometric mean the paper
reports (<code>cose_hmean</code>: the harmonic mean). Higher is better.</dd>
<dt>noise floor</dt><dd>mean SSIM between two maps of the same image and model from a
stochastic method run with two seeds: its own self-consistency ceiling. A consistency close to
it says the transform changed the map no more than the method's own randomness does.</dd>
<dt>n_images, n_&lt;metric&gt;, n_nan_ssim</dt><dd>the test images behind a cell, the pairs
behind each mean, and the pairs whose SSIM is NaN (left out: both maps constant, or an empty
eroded mask).</dd>
</dl>"""


def _kv_html(d: Mapping[str, Any]) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                   for k, v in d.items())
    return f'<table class="kv"><tbody>{rows}</tbody></table>'


def _img(png: bytes, alt: str) -> str:
    b64 = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{b64}" alt="{html.escape(alt)}">'


def render_html(
    summary: pd.DataFrame,
    pairs: pd.DataFrame | None = None,
    figures: Mapping[str, tuple[bytes, str]] | None = None,
    params: Mapping[str, Any] | None = None,
    versions: Mapping[str, str] | None = None,
    accuracies: Mapping[str, Mapping[str, float]] | None = None,
    title: str = "COSE report",
) -> str:
    """One self-contained HTML page: Table 1 (COSE, paper layout), consistency and sensitivity
    in the same layout, per-transform tables, the full summary, ``figures`` (``{name: (png,
    caption)}``, embedded as base64), training accuracies, ``params`` and ``versions``."""
    import yaml

    h = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
         '<meta name="viewport" content="width=device-width, initial-scale=1">',
         f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
         f"<h1>{html.escape(title)}</h1>"]
    combos = summary[["dataset", "model"]].drop_duplicates() if len(summary) else summary
    methods = _methods(summary["saliency_method"]) if len(summary) else []
    h.append(
        f'<p class="lead">COnsistency-SEnsitivity of saliency maps (Daroya, Sun, Maji, ICCV-W '
        f"2023): {len(methods)} method(s) on {len(combos)} dataset/model pair(s). "
        "COSE = sqrt(consistency &times; sensitivity), SSIM based.</p>")
    if versions:
        h += ["<h2>Versions</h2>", _kv_html(versions)]
    ranged = "cose_lo" in summary.columns
    h.append("<p>Higher is better in every table. " + (
        "A cell reads <em>value &plusmn; h</em>: h is half the bootstrap interval over images "
        "(summary.csv has [lo, hi]); the last rows give each method's mean over its cells and "
        "the test images and pairs behind each cell." if ranged else "") + "</p>")
    flagged = summary[summary["nan_flag"]] if "nan_flag" in summary.columns else summary[:0]
    if len(flagged):
        from cose.uncertainty import warnings_for

        h += ["<h2>Warnings</h2>", "<ul>"] + [f"<li>{html.escape(w)}</li>"
                                              for w in warnings_for(summary)] + ["</ul>"]
    h += ["<h2>Table 1: COSE</h2>", paper_table_html(summary, "cose"),
          "<h2>Consistency</h2>", paper_table_html(summary, "overall_consistency"),
          "<h2>Sensitivity</h2>", paper_table_html(summary, "sensitivity")]
    if figures:
        h.append("<h2>Figures</h2>")
        for name, (png, caption) in figures.items():
            h.append(f"<figure>{_img(png, name)}<figcaption>{html.escape(caption)}"
                     "</figcaption></figure>")
    if pairs is not None and len(pairs):
        cons, sens = _by_transform_tables(pairs)
        if len(cons):
            h += ["<h2>Consistency by transform</h2>", _frame_html(cons)]
        if len(sens):
            h += ["<h2>Sensitivity by variant</h2>",
                  "<p>1 &minus; mean SSIM of the variants whose prediction changed.</p>",
                  _frame_html(sens)]
    if accuracies:
        rows = [{"dataset": d, "model": m, "test_accuracy": float(a)}
                for d, per in accuracies.items() for m, a in per.items()]
        h += ["<h2>Classifier accuracy</h2>", _frame_html(pd.DataFrame(rows))]
    if len(summary):
        cols = list(scoring.GROUP_COLUMNS) + list(scoring.METRICS) + [
            c for c in summary.columns if c.startswith("n_")]
        h += ["<details><summary>Full summary (every metric and its row count)</summary>",
              _frame_html(summary[[c for c in cols if c in summary.columns]]), "</details>"]
    h += ["<h2>Glossary</h2>", _GLOSSARY]
    if params:
        h += ["<h2>Parameters</h2>",
              f"<pre>{html.escape(yaml.safe_dump(dict(params), sort_keys=False))}</pre>"]
    h.append("</body></html>\n")
    return "\n".join(h)


# --------------------------------------------------------------------------- writing


def _write_set(folder: Path, files: Mapping[str, bytes], suffix: str) -> list[Path]:
    """Write ``files`` (name -> bytes) into ``folder`` atomically and remove stale ``suffix``
    files that are not in the set (a method or model dropped from params)."""
    from cose.io import atomic_write_bytes

    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob(f"*{suffix}"):
        if old.name not in files:
            old.unlink()
    written = []
    for name, data in files.items():
        atomic_write_bytes(folder / name, data)
        written.append(folder / name)
    return written


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name))


def build_figures(
    summary: pd.DataFrame,
    pairs: pd.DataFrame | None,
    samples: Mapping[tuple[str, str], Mapping[str, Mapping[str, np.ndarray]]] | None = None,
    sizes: int | Mapping[str, int] | None = None,
    bins: int = 6,
) -> tuple[dict[str, tuple[bytes, str]], pd.DataFrame | None]:
    """``({file stem: (png, caption)}, magnitude curves)`` of every figure the data allows."""
    figures: dict[str, tuple[bytes, str]] = {}
    curves = None
    if len(summary):
        figures["scores"] = (figure_png(plot_scores(summary).figure), FIGURES["scores"])
        figures["cose_by_family"] = (figure_png(plot_cose_by_family(summary).figure),
                                     FIGURES["cose_by_family"])
    if pairs is not None and len(pairs):
        figures["consistency_distributions"] = (
            figure_png(plot_consistency_distributions(pairs).figure),
            FIGURES["consistency_distributions"])
        curves = magnitude_curves(pairs, bins=bins, sizes=sizes)
        if len(curves):
            figures["magnitude"] = (figure_png(plot_magnitude(curves).figure), FIGURES["magnitude"])
    for (dataset, model), per_method in (samples or {}).items():
        if not any(s and len(s.get("map", ())) for s in per_method.values()):
            continue
        name = f"qualitative_{_safe(dataset)}_{_safe(model)}"
        label = f"{scoring.display_dataset(dataset)} / {scoring.display_model(model)}"
        fig = plot_samples(per_method, title=label).figure
        figures[name] = (figure_png(fig), f"Qualitative: {label}, first sample image: the "
                         "image, its map, and the maps of the first variant of each transform "
                         "and model change (geometric ones mapped back).")
    return figures, curves


def write_report(
    out: str | os.PathLike,
    summary: pd.DataFrame,
    pairs: pd.DataFrame | None = None,
    samples: Mapping[tuple[str, str], Mapping[str, Mapping[str, np.ndarray]]] | None = None,
    params: Mapping[str, Any] | None = None,
    versions: Mapping[str, str] | None = None,
    accuracies: Mapping[str, Mapping[str, float]] | None = None,
    sizes: int | Mapping[str, int] | None = None,
    title: str = "COSE report",
) -> list[Path]:
    """Write under ``out``: ``cose_table.html``, ``figures/*.png``, ``plots/magnitude/<method>.csv``
    (DVC plot data of Fig. 6) and ``report.html``. Returns the written files."""
    from cose.io import atomic_write_text

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    atomic_write_text(out / "cose_table.html", paper_table_html(summary) + "\n")
    written.append(out / "cose_table.html")
    figures, curves = build_figures(summary, pairs, samples, sizes)
    written += _write_set(out / "figures", {f"{k}.png": v[0] for k, v in figures.items()}, ".png")
    tables = magnitude_plot_tables(curves) if curves is not None and len(curves) else {}
    csvs = {f"{_safe(m)}.csv": t.to_csv(index=False, lineterminator="\n",
                                        float_format="%.6g").encode()
            for m, t in tables.items()}
    written += _write_set(out / "plots" / "magnitude", csvs, ".csv")
    page = render_html(summary, pairs, figures, params, versions, accuracies, title)
    atomic_write_text(out / "report.html", page)
    written.append(out / "report.html")
    return written
