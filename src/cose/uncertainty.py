"""How sure the COSE numbers are: bootstrap intervals over images, paired method comparisons,
and flags for cells whose similarities are mostly NaN.

- **Intervals.** The images of a (dataset, model, method) cell are resampled with replacement
  (``B`` times, seeded per cell), never the pairs: an image brings all its variants, so the
  interval reflects how many images the cell rests on. Each replicate recomputes every metric
  of :func:`cose.scoring.score` from per-image sums (the same NaN rule), and the interval is
  the replicates' percentile interval at ``level``. The mean row of a method (its mean over the
  cells) gets an interval from the cells' replicates averaged replicate by replicate (cells are
  independent samples).
- **Comparisons.** Within a (dataset, model), two methods explained on the same images are
  compared on those images with one resampling shared by both (a paired bootstrap): the
  interval of COSE(A) - COSE(B), a two-sided bootstrap p-value, and "significant" when the
  interval excludes 0.
- **NaN flags.** A cell where more than ``threshold`` of the consistency and fidelity pairs
  have a NaN similarity is flagged with its cause, read off the pairs: SSIM and Spearman both
  NaN -> constant maps (a one-segment LIME map, an all-zero CAM); SSIM NaN alone -> the
  eroded valid mask is empty.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable

import numpy as np
import pandas as pd

from cose import scoring
from cose.columns import GROUP_COLUMNS

DEFAULT_BOOTSTRAP = 1000
DEFAULT_LEVEL = 0.95
DEFAULT_NAN_SHARE = 0.05
#: replicates that must be defined (finite) for an interval to be given
MIN_DEFINED = 0.9

__all__ = ["summarize", "replicates", "method_means", "compare_methods", "nan_flags",
           "DEFAULT_BOOTSTRAP", "DEFAULT_LEVEL", "DEFAULT_NAN_SHARE"]


def _seed(seed: int, *keys: object) -> int:
    """A per-cell seed: stable across runs, processes and the order of the cells."""
    return zlib.crc32("/".join(map(str, (seed, *keys))).encode())


def image_sums(group: pd.DataFrame, column: str = "ssim", nan: str = "skip",
               images: np.ndarray | None = None):
    """Per image (``images``, default: every test_idx of the group, sorted) and mean metric:
    the sum of the similarities in the metric's rows, their count, and whether one is NaN
    (under the reference rule, that image makes the metric NaN)."""
    kept = scoring._kept(group)
    values = pd.to_numeric(kept[column], errors="coerce").to_numpy(dtype=float)
    ids = np.unique(group["test_idx"].to_numpy()) if images is None else np.asarray(images)
    pos = np.searchsorted(ids, kept["test_idx"].to_numpy())
    inside = (pos < len(ids)) & (ids[np.minimum(pos, len(ids) - 1)] == kept["test_idx"].to_numpy())
    sel = scoring._selections(kept)
    n, m = len(ids), len(scoring.MEAN_METRICS)
    sums = np.zeros((n, m))
    counts = np.zeros((n, m))
    flags = np.zeros((n, m))
    isnan = np.isnan(values)
    for j, metric in enumerate(scoring.MEAN_METRICS):
        rows = sel[metric].to_numpy() & inside
        use = rows & ~isnan
        np.add.at(sums[:, j], pos[use], values[use])
        np.add.at(counts[:, j], pos[rows if nan == "reference" else use], 1.0)
        if nan == "reference":
            np.add.at(flags[:, j], pos[rows & isnan], 1.0)
    return ids, sums, counts, flags


def _derived(means: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    cons, sens = means["overall_consistency"], 1.0 - means["overall_fidelity"]
    with np.errstate(invalid="ignore", divide="ignore"):
        prod = cons * sens
        cose = np.where(prod >= 0, np.sqrt(np.where(prod >= 0, prod, 0.0)), np.nan)
        total = cons + sens
        hmean = np.where(total != 0, 2 * prod / np.where(total != 0, total, 1.0), np.nan)
    return {**means, "sensitivity": sens, "cose": cose, "cose_hmean": hmean}


def replicates(sums: np.ndarray, counts: np.ndarray, flags: np.ndarray,
               weights: np.ndarray) -> dict[str, np.ndarray]:
    """Every metric for each row of ``weights`` [B, n] (how often each image is drawn)."""
    w = weights.astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = (w @ sums) / (w @ counts)
    means[(w @ flags) > 0] = np.nan  # the reference rule: a NaN pair makes the metric NaN
    means[~np.isfinite(means)] = np.nan
    return _derived({m: means[:, j] for j, m in enumerate(scoring.MEAN_METRICS)})


def _weights(n: int, b: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=b)


def _interval(rep: np.ndarray, level: float) -> tuple[float, float]:
    finite = rep[np.isfinite(rep)]
    if len(rep) == 0 or len(finite) < MIN_DEFINED * len(rep):
        return float("nan"), float("nan")
    lo, hi = np.percentile(finite, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def _check(b: int, level: float) -> None:
    if isinstance(b, bool) or not isinstance(b, int) or b < 0:
        raise ValueError(f"bootstrap: got {b!r}, expected an integer >= 0 (0: no intervals)")
    if not 0 < level < 1:
        raise ValueError(f"level: got {level!r}, expected a confidence level in (0, 1)")


def summarize(pairs: pd.DataFrame, column: str = "ssim", nan: str = "skip",
              bootstrap: int = DEFAULT_BOOTSTRAP, level: float = DEFAULT_LEVEL, seed: int = 0,
              nan_share: float = DEFAULT_NAN_SHARE):
    """:func:`cose.scoring.summarize` plus ``n_images``, ``<metric>_lo`` / ``<metric>_hi``
    (the bootstrap interval over images at ``level``; absent when ``bootstrap`` is 0) and the
    NaN flag columns of :func:`nan_flags`. Returns ``(summary, replicates)``, the replicates
    by (method, dataset, model), for :func:`method_means`."""
    _check(bootstrap, level)
    summary = scoring.summarize(pairs, column, nan)
    reps: dict[tuple, dict[str, np.ndarray]] = {}
    extra: dict[str, list] = {"n_images": []}
    if bootstrap:
        for m in scoring.METRICS:
            extra[f"{m}_lo"], extra[f"{m}_hi"] = [], []
    groups = dict(iter(pairs.groupby(list(GROUP_COLUMNS), sort=False, dropna=False)))
    for row in summary[list(GROUP_COLUMNS)].itertuples(index=False):
        key = tuple(row)
        group = groups[key]
        ids, sums, counts, flags = image_sums(group, column, nan)
        extra["n_images"].append(len(ids))
        if not bootstrap:
            continue
        rep = replicates(sums, counts, flags, _weights(len(ids), bootstrap, _seed(seed, *key)))
        reps[key] = rep
        for m in scoring.METRICS:
            lo, hi = _interval(rep[m], level)
            extra[f"{m}_lo"].append(lo)
            extra[f"{m}_hi"].append(hi)
    out = summary.assign(**{k: v for k, v in extra.items()})
    out = nan_flags(out, pairs, nan_share, column)
    out.attrs.update(bootstrap=bootstrap, level=level, seed=seed)
    return out, reps


def method_means(summary: pd.DataFrame, reps: dict[tuple, dict[str, np.ndarray]],
                 level: float = DEFAULT_LEVEL,
                 metrics: Iterable[str] = ("overall_consistency", "sensitivity", "cose",
                                           "noise_floor")) -> pd.DataFrame:
    """Each method's mean over its cells (the tables' mean row) with a bootstrap interval:
    the cells' replicates averaged replicate by replicate. Cells whose value is NaN are left
    out, as the mean row leaves them out."""
    rows = []
    for method, cells in summary.groupby("saliency_method", sort=False):
        row: dict = {"saliency_method": method, "cells": 0}
        for m in metrics:
            finite = cells[np.isfinite(cells[m].astype(float))]
            row["cells"] = max(row["cells"], len(finite))
            row[m] = float(finite[m].mean()) if len(finite) else float("nan")
            keys = [tuple(r) for r in finite[list(GROUP_COLUMNS)].itertuples(index=False)]
            if keys and all(k in reps for k in keys):
                stacked = np.vstack([reps[k][m] for k in keys])
                row[f"{m}_lo"], row[f"{m}_hi"] = _interval(stacked.mean(axis=0), level)
            else:
                row[f"{m}_lo"] = row[f"{m}_hi"] = float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def compare_methods(pairs: pd.DataFrame, column: str = "ssim", nan: str = "skip",
                    bootstrap: int = DEFAULT_BOOTSTRAP, level: float = DEFAULT_LEVEL,
                    seed: int = 0, metric: str = "cose") -> pd.DataFrame:
    """Per (dataset, model), every pair of methods on the images both explained: the
    difference of ``metric`` (A - B), its paired-bootstrap interval, a two-sided p-value, and
    ``significant`` (the interval excludes 0)."""
    _check(bootstrap, level)
    cols = ["dataset", "model", "method_a", "method_b", "n_images", metric + "_a",
            metric + "_b", "delta", "delta_lo", "delta_hi", "p_value", "significant"]
    out = []
    if not bootstrap:
        return pd.DataFrame(columns=cols)
    for (dataset, model), cell in pairs.groupby(["dataset", "model"], sort=False):
        methods = [m for m in scoring.spec.method_order(pd.unique(cell["saliency_method"]))]
        by_method = {m: cell[cell["saliency_method"] == m] for m in methods}
        ids = {m: np.unique(g["test_idx"].to_numpy()) for m, g in by_method.items()}
        for i, a in enumerate(methods):
            for b in methods[i + 1 :]:
                common = np.intersect1d(ids[a], ids[b])
                if len(common) == 0:
                    continue
                w = _weights(len(common), bootstrap, _seed(seed, dataset, model, a, b))
                full = np.ones((1, len(common)))
                va, vb = (image_sums(by_method[x], column, nan, common) for x in (a, b))
                point = replicates(*va[1:], full)[metric][0] - replicates(*vb[1:], full)[metric][0]
                delta = replicates(*va[1:], w)[metric] - replicates(*vb[1:], w)[metric]
                lo, hi = _interval(delta, level)
                finite = delta[np.isfinite(delta)]
                p = (min(1.0, 2 * min(np.mean(finite <= 0), np.mean(finite >= 0)))
                     if len(finite) else float("nan"))
                out.append([dataset, model, a, b, len(common),
                            replicates(*va[1:], full)[metric][0],
                            replicates(*vb[1:], full)[metric][0], point, lo, hi, p,
                            bool(np.isfinite(lo) and (lo > 0 or hi < 0))])
    return pd.DataFrame(out, columns=cols)


def nan_flags(summary: pd.DataFrame, pairs: pd.DataFrame, threshold: float = DEFAULT_NAN_SHARE,
              column: str = "ssim") -> pd.DataFrame:
    """``summary`` with ``nan_share`` (NaN similarities among the consistency and fidelity
    pairs), ``nan_cause`` (``constant maps``, ``empty masks``, both, or empty) and
    ``nan_flag`` (share above ``threshold``)."""
    shares, causes = [], []
    groups = dict(iter(pairs.groupby(list(GROUP_COLUMNS), sort=False, dropna=False)))
    for row in summary[list(GROUP_COLUMNS)].itertuples(index=False):
        kept = scoring._kept(groups[tuple(row)])
        sel = scoring._selections(kept)
        used = (sel["overall_consistency"] | sel["overall_fidelity"]).to_numpy()
        values = pd.to_numeric(kept[column], errors="coerce").to_numpy(dtype=float)
        nan_rows = used & np.isnan(values)
        shares.append(float(nan_rows.sum() / used.sum()) if used.sum() else 0.0)
        cause = []
        if "spearman" in kept.columns and nan_rows.any():
            other = pd.to_numeric(kept["spearman"], errors="coerce").to_numpy(dtype=float)
            if (nan_rows & np.isnan(other)).any():
                cause.append("constant maps")
            if (nan_rows & ~np.isnan(other)).any():
                cause.append("empty masks")
        elif nan_rows.any():
            cause.append("constant maps or empty masks")
        causes.append(" and ".join(cause))
    out = summary.assign(nan_share=shares, nan_cause=causes)
    return out.assign(nan_flag=out["nan_share"] > threshold)


def warnings_for(summary: pd.DataFrame) -> list[str]:
    """One line per flagged cell (for the CLI and the logs)."""
    lines = []
    for r in summary[summary.get("nan_flag", False) == True].to_dict("records"):  # noqa: E712
        lines.append(
            f"{r['dataset']}/{r['model']}/{r['saliency_method']}: {100 * r['nan_share']:.0f}% "
            f"of its consistency and fidelity pairs have a NaN similarity ({r['nan_cause']}: "
            f"{_explain(r['nan_cause'])}); they are left out of the means")
    return lines


def _explain(cause: str) -> str:
    if "constant" in cause:
        return ("both maps constant, e.g. a one-segment LIME map or an all-zero CAM on a 1x1 "
                "CAM layer")
    return "a valid region too small to erode"
