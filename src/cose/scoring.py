"""COSE scoring: consistency / fidelity / sensitivity / COSE from the per-pair table.

Aggregation follows shared/REFERENCE.md (the reference's compile script):

- records whose original prediction is wrong (``target_class != pred_class``) are dropped;
- consistency rows: ``t_pred_class == target_class`` and a geometric or photometric transform;
- fidelity rows: ``t_pred_class != target_class`` (any transform type, ``random`` and
  ``mid_ckpt_*`` included);
- every metric is the mean SSIM over its rows; ``sensitivity = 1 - overall_fidelity``;
  ``cose = sqrt(overall_consistency * sensitivity)`` (the reference's geometric mean) and
  ``cose_hmean`` their harmonic mean (extra column).

Deliberate deviation: a NaN SSIM (both maps constant) is skipped by the means and counted in
``n_nan_ssim``; the reference's plain mean would make the whole metric NaN. A metric with no
rows is NaN with count 0. Also here: reading the reference's own result CSVs, the paper's
table layout, breakdowns per transform and magnitude for the report, atomic summary writing.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from cose import spec
from cose.columns import GROUP_COLUMNS, PAIR_COLUMNS
from cose.io import atomic_write_text
from cose.spec import GEOMETRIC, PHOTOMETRIC, TRANSFORMS

__all__ = [
    "METRICS",
    "MEAN_METRICS",
    "PAIR_COLUMNS",
    "GROUP_COLUMNS",
    "REFERENCE_COLUMNS",
    "REFERENCE_METHOD_DIRS",
    "NAN_RULES",
    "method_display",
    "transform_family",
    "score",
    "summarize",
    "agreement",
    "AGREEMENT_TOLERANCE",
    "AGREEMENT_FLIPS",
    "breakdown_by_transform",
    "breakdown_by_magnitude",
    "read_reference_outputs",
    "compile_reference_outputs",
    "paper_table_markdown",
    "published_table_markdown",
    "write_summary",
    "display_dataset",
    "display_model",
]

MEAN_METRICS: tuple[str, ...] = (
    "geom_consistency",
    "photo_consistency",
    "overall_consistency",
    "geom_fidelity",
    "photo_fidelity",
    "img_fidelity",
    "random_fidelity",
    "midckpt_fidelity",
    "model_fidelity",
    "overall_fidelity",
    # the method's own noise: SSIM of the same image and model explained with another seed
    # (stochastic methods; explain.noise_floor), its self-consistency ceiling
    "noise_floor",
)
METRICS: tuple[str, ...] = MEAN_METRICS + ("sensitivity", "cose", "cose_hmean")

REFERENCE_COLUMNS: tuple[str, ...] = (
    "test_idx",
    "target_class",
    "pred_class",
    "transform_type",
    "tranform_magnitude",  # sic: the reference's spelling
    "t_pred_class",
    "ssim",
    "spearman",
)
#: the reference's outputs/<folder> -> method (``gradcamPP`` -> ``gradcampp``)
REFERENCE_METHOD_DIRS: dict[str, str] = spec.reference_method_dirs()
NAN_RULES: tuple[str, ...] = ("skip", "reference")
REFERENCE_FILES: tuple[str, ...] = ("reference", "all")
_MIDCKPT = re.compile(r"^mid_ckpt(_[A-Za-z0-9]+)*$")
_RESULTS_NAME = re.compile(r"^results_(\d+)_(\d+)\.csv$")
_FAMILIES = ("geometric", "photometric", "random", "mid_ckpt", "seed")

display_dataset = spec.display_dataset
display_model = spec.display_model
method_display = spec.method_display


def transform_family(name: str) -> str:
    """``geometric``, ``photometric``, ``random``, ``mid_ckpt`` or ``seed`` (the noise-floor
    variant: the same image and model, the method run with another seed); ValueError
    otherwise."""
    if name in GEOMETRIC:
        return "geometric"
    if name in PHOTOMETRIC:
        return "photometric"
    if name in ("random", "seed"):
        return name
    if isinstance(name, str) and _MIDCKPT.match(name):
        return "mid_ckpt"
    raise ValueError(
        f"unknown transform_type {name!r}; allowed: {', '.join(TRANSFORMS)}, random, "
        "mid_ckpt_eNNN, seed"
    )


# --------------------------------------------------------------------------- scoring


def _require(frame: pd.DataFrame, columns: Iterable[str], what: str) -> None:
    if not isinstance(frame, pd.DataFrame):
        raise ValueError(f"{what}: expected a pandas DataFrame, got {type(frame).__name__}")
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what}: missing columns {missing}; have {list(frame.columns)}")


def _families(types: pd.Series) -> pd.Series:
    """Family per row; ValueError naming the first row with an unknown transform type."""
    mapping = {}
    for value in pd.unique(types):
        try:
            mapping[value] = transform_family(value)
        except ValueError as err:
            row = types.index[types.eq(value) if value == value else types.isna()][0]
            raise ValueError(f"row {row}: {err}") from None
    return types.map(mapping)


def _kept(pairs: pd.DataFrame) -> pd.DataFrame:
    """Rows whose original prediction is right, with ``family`` and ``changed`` columns."""
    kept = pairs.loc[pairs["target_class"] == pairs["pred_class"]].copy()
    kept["family"] = _families(kept["transform_type"])
    kept["changed"] = kept["t_pred_class"] != kept["target_class"]
    return kept


def _selections(kept: pd.DataFrame) -> dict[str, pd.Series]:
    fam = kept["family"]
    changed = kept["changed"]
    geo = fam == "geometric"
    photo = fam == "photometric"
    rand = fam == "random"
    mid = fam == "mid_ckpt"
    seed = fam == "seed"
    changed = changed & ~seed  # the same model on the same image: never a changed prediction
    cons = ~changed & (geo | photo)
    return {
        "geom_consistency": cons & geo,
        "photo_consistency": cons & photo,
        "overall_consistency": cons,
        "geom_fidelity": changed & geo,
        "photo_fidelity": changed & photo,
        "img_fidelity": changed & (geo | photo),
        "random_fidelity": changed & rand,
        "midckpt_fidelity": changed & mid,
        "model_fidelity": changed & (rand | mid),
        "overall_fidelity": changed,
        "noise_floor": seed,
    }


def _combine(consistency: float, sensitivity: float) -> tuple[float, float]:
    """(geometric mean, harmonic mean); NaN where undefined (NaN input, negative product)."""
    prod = consistency * sensitivity
    cose = math.sqrt(prod) if prod >= 0 else float("nan")  # NaN fails the comparison too
    total = consistency + sensitivity
    hmean = 2 * prod / total if total != 0 and not math.isnan(total) else float("nan")
    return cose, hmean


def _check_nan_rule(nan: str) -> str:
    if nan not in NAN_RULES:
        raise ValueError(f"nan: got {nan!r}; allowed: {', '.join(NAN_RULES)} (skip: NaN "
                         "similarities are left out of the means and counted; reference: plain "
                         "means, as the reference's compile takes them)")
    return nan


def score(pairs: pd.DataFrame, column: str = "ssim", nan: str = "skip") -> dict[str, float]:
    """Every metric of REFERENCE.md from one per-pair table (one method/dataset/model).

    Returns the :data:`METRICS` plus ``n_<metric>`` for the ten means (the rows behind each),
    ``n_nan_<column>`` (NaN rows that would have entered a mean), ``n_pairs`` and
    ``n_misclassified`` (rows dropped because target != pred). ``column`` picks the similarity
    (``ssim``, the reference's choice, or ``spearman``). ``nan``: ``skip`` (default) leaves NaN
    similarities (both maps constant) out of every mean; ``reference`` takes plain means as
    the reference's compile does, so one NaN makes that metric (and COSE) NaN.
    """
    _check_nan_rule(nan)
    _require(
        pairs,
        ("target_class", "pred_class", "transform_type", "t_pred_class", column),
        "score",
    )
    kept = _kept(pairs)
    values = pd.to_numeric(kept[column], errors="coerce").astype(float)
    bad = kept[column].notna() & values.isna()
    if bad.any():
        row = bad.index[bad][0]
        raise ValueError(f"score: row {row}: {column} {kept.at[row, column]!r} is not a number")
    out: dict[str, float] = {}
    sel = _selections(kept)
    for metric in MEAN_METRICS:
        v = values[sel[metric]]
        if nan == "skip":
            v = v[v.notna()]
        out[metric] = float(v.to_numpy().mean()) if len(v) else float("nan")
        out[f"n_{metric}"] = int(len(v))
    out["sensitivity"] = 1.0 - out["overall_fidelity"]
    out["cose"], out["cose_hmean"] = _combine(out["overall_consistency"], out["sensitivity"])
    used = sel["overall_consistency"] | sel["overall_fidelity"]
    out[f"n_nan_{column}"] = int((values.isna() & used).sum())
    out["n_pairs"] = int(len(pairs))
    out["n_misclassified"] = int(len(pairs) - len(kept))
    return out


def _count_columns(column: str) -> list[str]:
    return [f"n_{m}" for m in MEAN_METRICS] + [f"n_nan_{column}", "n_pairs", "n_misclassified"]


def _group_order(frame: pd.DataFrame) -> pd.DataFrame:
    rank = {m: i for i, m in enumerate(spec.method_order(frame["saliency_method"]))}
    keys = frame.assign(
        _m=frame["saliency_method"].map(rank),
        _mn=frame["saliency_method"].astype(str),
        _d=frame["dataset"].map(lambda d: display_dataset(d).lower()),
        _o=frame["model"].map(lambda o: display_model(o).lower()),
    )
    keys = keys.sort_values(["_m", "_mn", "_d", "_o"], kind="stable")
    return keys.drop(columns=["_m", "_mn", "_d", "_o"]).reset_index(drop=True)


def summarize(pairs: pd.DataFrame, column: str = "ssim", nan: str = "skip") -> pd.DataFrame:
    """One row per (saliency_method, dataset, model): the metrics and their counts
    (``nan``: the NaN rule of :func:`score`)."""
    _check_nan_rule(nan)
    _require(pairs, GROUP_COLUMNS, "summarize")
    rows = []
    for keys, group in pairs.groupby(list(GROUP_COLUMNS), sort=False, dropna=False):
        row = dict(zip(GROUP_COLUMNS, keys))
        try:
            row.update(score(group, column, nan))
        except ValueError as err:
            raise ValueError(f"{'/'.join(map(str, keys))}: {err}") from None
        rows.append(row)
    cols = list(GROUP_COLUMNS) + list(METRICS) + _count_columns(column)
    if not rows:
        return pd.DataFrame(columns=cols)
    return _group_order(pd.DataFrame(rows, columns=cols))


# --------------------------------------------------------------------------- agreement

#: largest per-cell |delta| of COSE, consistency and sensitivity for two runs to agree
AGREEMENT_TOLERANCE = 0.005
#: largest fraction of pairs whose original or variant class may differ
AGREEMENT_FLIPS = 0.001
_PAIR_KEYS = ("test_idx", "transform_type", "transform_magnitude")


def agreement(base: pd.DataFrame, other: pd.DataFrame, *, column: str = "ssim",
              tolerance: float = AGREEMENT_TOLERANCE, flips: float = AGREEMENT_FLIPS) -> dict:
    """Whether ``other`` reports the same COSE as ``base``: two per-pair tables of the same
    images and variants (one run in fp32, one at another precision, device or library
    version), compared by what a user reads.

    Per cell (dataset, model, saliency_method where the tables have them): |delta| of COSE,
    overall consistency and sensitivity, each <= ``tolerance``; the class flips (pairs whose
    ``pred_class`` or ``t_pred_class`` differ) <= ``flips`` of the pairs; the per-pair
    |delta ``column``| distribution (p50, p99, max over the pairs finite in both) and the
    pairs NaN on one side only, as information. A delta where both sides are NaN is 0; NaN on
    one side only fails. Returns ``{"ok", "cells": [...], "pairs", "class_flips",
    "flip_fraction", "max_abs_delta": {metric: value}, "<column>_diff_p50" / "_p99" /
    "_max", "<column>_nan_one_side", "tolerance", "flips"}``."""
    keys = [k for k in GROUP_COLUMNS if k in base.columns and k in other.columns]
    order = keys + list(_PAIR_KEYS)
    _require(base, order, "agreement")
    _require(other, order, "agreement")
    a = base.sort_values(order, kind="stable").reset_index(drop=True)
    b = other.sort_values(order, kind="stable").reset_index(drop=True)
    if len(a) != len(b) or not a[order].astype(str).equals(b[order].astype(str)):
        raise ValueError("agreement: the tables hold different pairs (images, variants or "
                         "cells); compare runs of the same unit")
    flipped = ((a["pred_class"].to_numpy() != b["pred_class"].to_numpy())
               | (a["t_pred_class"].to_numpy() != b["t_pred_class"].to_numpy()))
    cells, worst = [], {m: 0.0 for m in ("cose", "overall_consistency", "sensitivity")}
    ok = True
    groups = a.groupby(keys, sort=False).groups if keys else {(): a.index}
    for cell, idx in groups.items():
        sa, sb = score(a.loc[idx], column), score(b.loc[idx], column)
        row: dict = dict(zip(keys, cell if isinstance(cell, tuple) else (cell,)))
        for m in worst:
            x, y = sa[m], sb[m]
            d = 0.0 if (math.isnan(x) and math.isnan(y)) else abs(x - y)
            row[f"delta_{m}"] = d  # NaN on one side: NaN, which fails
            worst[m] = max(worst[m], d) if not math.isnan(d) else float("nan")
            ok = ok and d <= tolerance
        n_flip = int(flipped[idx].sum())
        row.update(pairs=int(len(idx)), class_flips=n_flip, cose=sa["cose"],
                   cose_other=sb["cose"], n_pairs_scored=sa["n_overall_consistency"]
                   + sa["n_overall_fidelity"])
        ok = ok and n_flip <= flips * len(idx)
        cells.append(row)
    x = pd.to_numeric(a[column], errors="coerce").to_numpy(float)
    y = pd.to_numeric(b[column], errors="coerce").to_numpy(float)
    both = np.isfinite(x) & np.isfinite(y)
    diff = np.abs(x[both] - y[both])

    def q(p: float) -> float | None:
        return float(np.percentile(diff, p)) if diff.size else None

    n_flip = int(flipped.sum())
    return {
        "ok": bool(ok), "cells": cells, "pairs": int(len(a)), "class_flips": n_flip,
        "flip_fraction": n_flip / len(a) if len(a) else 0.0, "max_abs_delta": worst,
        f"{column}_diff_p50": q(50), f"{column}_diff_p99": q(99),
        f"{column}_diff_max": float(diff.max()) if diff.size else None,
        f"{column}_nan_one_side": int((np.isfinite(x) != np.isfinite(y)).sum()),
        "tolerance": tolerance, "flips": flips,
    }


# --------------------------------------------------------------------------- breakdowns


def _breakdown(pairs: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    _require(
        pairs, ("target_class", "pred_class", "transform_type", "t_pred_class", "ssim"), "breakdown"
    )
    group_cols = [c for c in GROUP_COLUMNS if c in pairs.columns]
    kept = _kept(pairs)
    kept["ssim"] = pd.to_numeric(kept["ssim"], errors="coerce").astype(float)
    image = kept["family"].isin(("geometric", "photometric"))
    cons = image & ~kept["changed"]
    fid = kept["changed"]
    kept["_cons"] = kept["ssim"].where(cons)
    kept["_fid"] = kept["ssim"].where(fid)
    kept["_nan"] = kept["ssim"].isna() & (cons | fid)
    agg = {
        "family": ("family", "first"),
        "n_pairs": ("ssim", "size"),
        "changed_rate": ("changed", "mean"),
        "consistency": ("_cons", "mean"),
        "n_consistency": ("_cons", "count"),
        "fidelity": ("_fid", "mean"),
        "n_fidelity": ("_fid", "count"),
        "n_nan_ssim": ("_nan", "sum"),
    }
    if "spearman" in kept.columns:
        sp = pd.to_numeric(kept["spearman"], errors="coerce").astype(float)
        kept["_cons_sp"] = sp.where(cons)
        kept["_fid_sp"] = sp.where(fid)
        agg["consistency_spearman"] = ("_cons_sp", "mean")
        agg["fidelity_spearman"] = ("_fid_sp", "mean")
    by = group_cols + keys
    if kept.empty:
        return pd.DataFrame(columns=by + list(agg))
    out = kept.groupby(by, sort=False, dropna=False).agg(**agg).reset_index()
    fam_rank = {f: i for i, f in enumerate(_FAMILIES)}
    tf_rank = {t: i for i, t in enumerate(TRANSFORMS)}
    order = out.assign(
        _f=out["family"].map(fam_rank),
        _t=out["transform_type"].map(lambda t: tf_rank.get(t, len(tf_rank))),
        _tn=out["transform_type"].astype(str),
    )
    sort_cols = group_cols + ["_f", "_t", "_tn"] + keys[1:]
    order = order.sort_values(sort_cols, kind="stable")
    out = order.drop(columns=["_f", "_t", "_tn"]).reset_index(drop=True)
    for c in ("n_pairs", "n_consistency", "n_fidelity", "n_nan_ssim"):
        out[c] = out[c].astype(int)
    return out


def breakdown_by_transform(pairs: pd.DataFrame) -> pd.DataFrame:
    """Per (method, dataset, model, transform_type): mean SSIM of consistency rows
    (``consistency``, image transforms only) and of fidelity rows (``fidelity``), counts,
    ``changed_rate`` (share of variants whose prediction differs from the label), Spearman
    means where the table has them. Misclassified originals dropped as in :func:`score`."""
    return _breakdown(pairs, ["transform_type"])


def breakdown_by_magnitude(pairs: pd.DataFrame) -> pd.DataFrame:
    """As :func:`breakdown_by_transform`, one row per (transform_type, transform_magnitude)."""
    _require(pairs, ("transform_magnitude",), "breakdown_by_magnitude")
    return _breakdown(pairs, ["transform_type", "transform_magnitude"])


# --------------------------------------------------------------------------- reference outputs

_CLASS_COLUMNS = ("target_class", "pred_class", "t_pred_class")
_MISSING = ("", "nan", "NaN", "NAN", "None", "none", "null")


def _numeric(frame: pd.DataFrame, column: str, path: Path, *, integer: bool, required: bool,
             bounds: tuple[float, float] | None = None) -> pd.Series:
    raw = frame[column].where(~frame[column].isin(_MISSING))
    values = pd.to_numeric(raw, errors="coerce")
    bad = raw.notna() & values.isna()
    if required:
        bad |= raw.isna()
    if integer:
        finite = values.notna() & np.isfinite(values.astype(float))
        bad |= values.notna() & ~(finite & (values.astype(float) % 1 == 0))
    kind = "an integer" if integer else "a number"
    if bounds is not None:
        lo, hi = bounds
        with np.errstate(invalid="ignore"):
            bad |= values.notna() & ~((values >= lo) & (values <= hi))
        kind = (f"an integer >= {lo:g}" if integer else f"a number in [{lo:g}, {hi:g}] or "
                "empty (NaN)")
    if bad.any():
        i = bad.index[bad][0]
        raise ValueError(
            f"{path}: line {i + 2}: column {column!r} must be {kind}, got {frame.at[i, column]!r}"
        )
    return values.astype("int64") if integer else values.astype(float)


def _classes(frame: pd.DataFrame, path: Path) -> tuple[dict[str, pd.Series], bool]:
    """The three class columns as integers (indices) or stripped strings (class names, as the
    reference writes them: ``idx2label[i]``); True when they hold names."""
    raw = {c: frame[c].str.strip() for c in _CLASS_COLUMNS}
    for c, col in raw.items():
        empty = col.isin(_MISSING)
        if empty.any():
            i = col.index[empty][0]
            raise ValueError(f"{path}: line {i + 2}: column {c!r} must be a class name or "
                             f"index, got {frame.at[i, c]!r}")
    integer = all(col.str.fullmatch(r"[+-]?\d+").all() for col in raw.values())
    if not integer:
        return raw, True
    out = {c: pd.to_numeric(col).astype("int64") for c, col in raw.items()}
    for c, col in out.items():
        if (col < 0).any():
            i = col.index[col < 0][0]
            raise ValueError(f"{path}: line {i + 2}: column {c!r} must be a class index >= 0 "
                             f"or a class name, got {frame.at[i, c]!r}")
    return out, False


def _read_reference_csv(path: Path) -> tuple[pd.DataFrame, bool]:
    try:
        frame = pd.read_csv(path, dtype=str, skipinitialspace=True, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise ValueError(
            f"{path}: empty file, expected a header {','.join(REFERENCE_COLUMNS)}"
        ) from None
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a readable CSV ({err})") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    if "tranform_magnitude" not in frame.columns and "transform_magnitude" in frame.columns:
        frame = frame.rename(columns={"transform_magnitude": "tranform_magnitude"})
    missing = [c for c in REFERENCE_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(
            f"{path}: missing columns {missing}; expected {','.join(REFERENCE_COLUMNS)}"
        )
    if frame.empty:
        raise ValueError(f"{path}: no records (a header only); a result file holds one row "
                         "per image and variant")
    out = pd.DataFrame(index=frame.index)
    out["test_idx"] = _numeric(frame, "test_idx", path, integer=True, required=True,
                               bounds=(0, math.inf))
    classes, named = _classes(frame, path)
    for c in _CLASS_COLUMNS:
        out[c] = classes[c]
    types = frame["transform_type"].str.strip()
    for value in pd.unique(types):
        try:
            transform_family(value)
        except ValueError as err:
            i = types.index[types.eq(value)][0]
            raise ValueError(f"{path}: line {i + 2}: {err}") from None
    out["transform_type"] = types.astype(str)
    out["transform_magnitude"] = _numeric(
        frame, "tranform_magnitude", path, integer=False, required=False
    )
    bad = ~np.isfinite(out["transform_magnitude"]) & out["transform_magnitude"].notna()
    if bad.any():
        i = bad.index[bad][0]
        raise ValueError(f"{path}: line {i + 2}: column 'tranform_magnitude' must be finite, "
                         f"got {frame.at[i, 'tranform_magnitude']!r}")
    for c in ("ssim", "spearman"):  # similarities: in [-1, 1], or NaN (constant maps)
        out[c] = _numeric(frame, c, path, integer=False, required=False, bounds=(-1.0, 1.0))
    return out, named


def _reference_root(root: Path) -> Path:
    if not root.is_dir():
        raise ValueError(f"reference outputs folder not found: {root}")
    if not any(root.glob("*/*/*/results_*.csv")) and (root / "outputs").is_dir():
        return root / "outputs"
    return root


def reference_file(method: str) -> str:
    """The one file the reference's compile reads for ``method``: ``results_0_500.csv``
    (GradCAM, GradCAM++, IG) or ``results_0_50.csv`` (the four costly methods)."""
    return f"results_0_{spec.method(method).paper_images}.csv"


def _code_names(frames: list[pd.DataFrame]) -> list[str]:
    """Class names of one dataset's files -> sorted vocabulary; the columns become its
    indices (only equality between classes matters to the aggregation)."""
    names = sorted({str(v) for f in frames for c in _CLASS_COLUMNS for v in f[c]})
    index = {n: i for i, n in enumerate(names)}
    for f in frames:
        for c in _CLASS_COLUMNS:
            f[c] = f[c].map(lambda v: index[str(v)]).astype("int64")
    return names


def read_reference_outputs(dir: str | os.PathLike, files: str = "reference") -> pd.DataFrame:
    """Read the reference's ``<dir>/<method>/<dataset>/<model>/results_<start>_<end>.csv``
    files into the per-pair table (:data:`PAIR_COLUMNS`); ``dir`` may also hold ``outputs/``.

    ``files``: ``reference`` (default) reads only the file the reference's compile reads for
    each folder (:func:`reference_file`) and names the others in a warning; ``all`` reads
    every ``results_*.csv``. Class columns may hold indices or class NAMES (as the reference
    writes them); names are numbered per dataset in sorted order (``pairs.attrs
    ["class_names"][dataset]`` lists them). Method folders are mapped to our names
    (``gradcamPP`` -> ``gradcampp``); dataset and model keep their folder names (the tables
    show the published names: ``Swin_T_14`` -> Swin-T). A ValueError names the file and line
    of any bad input (similarities outside [-1, 1], negative indices, header-only files...).
    """
    if files not in REFERENCE_FILES:
        raise ValueError(f"files: got {files!r}; allowed: {', '.join(REFERENCE_FILES)}")
    root = _reference_root(Path(dir))
    found = sorted(root.glob("*/*/*/results_*.csv"))
    if not found:
        stray = sorted(root.rglob("results_*.csv"))
        hint = f" (found {stray[0]} at another depth)" if stray else ""
        raise ValueError(
            f"no reference results under {root}: expected "
            f"<method>/<dataset>/<model>/results_<start>_<end>.csv{hint}"
        )
    chosen, ignored = [], []
    for path in found:
        if not _RESULTS_NAME.match(path.name):
            raise ValueError(f"{path}: file name must be results_<start>_<end>.csv")
        method_dir = path.relative_to(root).parts[0]
        if method_dir not in REFERENCE_METHOD_DIRS:
            raise ValueError(
                f"{path}: unknown method folder {method_dir!r}; allowed: "
                f"{', '.join(REFERENCE_METHOD_DIRS)}"
            )
        wanted = reference_file(REFERENCE_METHOD_DIRS[method_dir])
        (chosen if files == "all" or path.name == wanted else ignored).append(path)
    if ignored:
        names = ", ".join(str(p.relative_to(root)) for p in ignored[:5])
        more = f" and {len(ignored) - 5} more" if len(ignored) > 5 else ""
        warnings.warn(
            f"{len(ignored)} result file(s) not read, as the reference's compile reads only "
            f"results_0_500.csv (GradCAM, GradCAM++, IG) or results_0_50.csv (BlurIG, GuidedIG, "
            f"LIME, SmoothGrad): {names}{more} (files='all' / --files all reads them)",
            stacklevel=2,
        )
    if not chosen:
        raise ValueError(f"no result file under {root} is one the reference's compile reads "
                         f"(results_0_500.csv or results_0_50.csv per method); "
                         f"{len(ignored)} other(s) found: use files='all' (--files all)")
    by_dataset: dict[str, list[pd.DataFrame]] = {}
    named: dict[str, bool] = {}
    for path in chosen:
        method_dir, dataset, model = path.relative_to(root).parts[:3]
        frame, has_names = _read_reference_csv(path)
        frame.insert(0, "saliency_method", REFERENCE_METHOD_DIRS[method_dir])
        frame.insert(0, "model", model)
        frame.insert(0, "dataset", dataset)
        by_dataset.setdefault(dataset, []).append(frame)
        named[dataset] = named.get(dataset, False) or has_names
    class_names = {}
    for dataset, frames in by_dataset.items():
        if named[dataset]:
            class_names[dataset] = _code_names(frames)
    pairs = pd.concat([f for fs in by_dataset.values() for f in fs],
                      ignore_index=True)[list(PAIR_COLUMNS)]
    pairs.attrs["class_names"] = class_names
    dup = pairs.duplicated(
        ["saliency_method", "dataset", "model", "test_idx", "transform_type", "transform_magnitude"]
    )
    if dup.any():
        warnings.warn(
            f"{int(dup.sum())} duplicate records (same image, transform and magnitude) in "
            f"{root}; overlapping result files? They are kept, as the reference would.",
            stacklevel=2,
        )
    return pairs


def compile_reference_outputs(dir: str | os.PathLike, nan: str = "skip",
                              files: str = "reference") -> pd.DataFrame:
    """Summary (:func:`summarize`) of the reference's result CSVs under ``dir``;
    ``nan="reference"`` and the default ``files`` give the numbers the reference's compile
    script gives."""
    _check_nan_rule(nan)
    return summarize(read_reference_outputs(dir, files=files), nan=nan)


# --------------------------------------------------------------------------- reporting


def _percent(value: float) -> str:
    if value is None or not np.isfinite(value):
        return "n/a"
    return f"{100 * value:.2f}%"


def _cell(value: float, lo: float | None = None, hi: float | None = None) -> str:
    """A percent cell; with an interval, ``63.20% ± 2.97`` (half its width, percent points)."""
    text = _percent(value)
    if lo is not None and hi is not None and np.isfinite(lo) and np.isfinite(hi) \
            and np.isfinite(value):
        text += f" ± {100 * (hi - lo) / 2:.2f}"
    return text


def paper_table_markdown(summary: pd.DataFrame, metric: str = "cose",
                         methods: list[str] | None = None,
                         means: pd.DataFrame | None = None) -> str:
    """The paper's table: rows dataset x model, columns methods (BlurIG ... SmoothGrad order,
    then registered methods; ``methods`` fixes them), ``metric`` in percent with 2 decimals,
    last row each method's mean over the rows shown, in bold. Where ``summary`` holds
    ``<metric>_lo``/``_hi`` (cose.uncertainty) a cell reads ``63.20% ± 2.97``: half the
    bootstrap interval, and the mean row takes its interval from ``means``
    (:func:`cose.uncertainty.method_means`); where it holds ``n_images`` a last row gives the
    images behind each method's cells."""
    _require(summary, list(GROUP_COLUMNS) + [metric], "paper_table_markdown")
    if methods is None:
        methods = spec.method_order(pd.unique(summary["saliency_method"]))
    lo_col, hi_col = f"{metric}_lo", f"{metric}_hi"
    ranged = lo_col in summary.columns and hi_col in summary.columns
    cells = {(r["dataset"], r["model"], r["saliency_method"]): r
             for r in summary.to_dict("records")}
    present_rows = summary[["dataset", "model"]].drop_duplicates().itertuples(index=False)
    rows = sorted(
        (tuple(r) for r in present_rows),
        key=lambda r: (display_dataset(r[0]).lower(), display_model(r[1]).lower()),
    )
    header = ["**Dataset**", "**Model**"] + [f"**{method_display(m)}**" for m in methods]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    previous = None
    for dataset, model in rows:
        first = "" if dataset == previous else f"**{display_dataset(dataset)}**"
        previous = dataset
        out = [first, f"**{display_model(model)}**"]
        for m in methods:
            r = cells.get((dataset, model, m), {})
            value = float(r.get(metric, float("nan")))
            out.append(_cell(value, r.get(lo_col), r.get(hi_col)) if ranged else _percent(value))
        lines.append("| " + " | ".join(out) + " |")
    mean_cells = ["", "**mean**"]
    by_method = ({r["saliency_method"]: r for r in means.to_dict("records")}
                 if means is not None else {})
    for m in methods:
        col = np.array([float(cells[(d, o, m)][metric]) for d, o in rows if (d, o, m) in cells])
        col = col[np.isfinite(col)]
        if not len(col):
            mean_cells.append("n/a")
            continue
        r = by_method.get(m, {})
        text = _cell(float(col.mean()), r.get(lo_col), r.get(hi_col))
        mean_cells.append(f"**{text}**")
    lines.append("| " + " | ".join(mean_cells) + " |")
    for column, label in (("n_images", "images"), ("n_pairs", "pairs")):
        if column not in summary.columns or "n_images" not in summary.columns:
            continue  # counts rows come with the intervals (cose.uncertainty.summarize)
        counts = ["", label]
        for m in methods:
            n = sorted({int(cells[(d, o, m)][column]) for d, o in rows if (d, o, m) in cells})
            counts.append("-" if not n else str(n[0]) if len(n) == 1 else f"{n[0]}-{n[-1]}")
        lines.append("| " + " | ".join(counts) + " |")
    return "\n".join(lines) + "\n"


def published_table_markdown(summary: pd.DataFrame, metric: str = "cose") -> str | None:
    """The published Table 1's layout: its four models (ConvNext, ResNet50, Swin-T, ViT, in
    the reference's folder names or ours) per dataset, the seven methods as columns, the mean
    row; None when none of the four is in ``summary``."""
    _require(summary, list(GROUP_COLUMNS) + [metric], "published_table_markdown")
    keep = summary["model"].map(lambda m: spec.published_model(m) is not None)
    if not keep.any():
        return None
    return paper_table_markdown(summary[keep], metric,
                                methods=spec.method_order(spec.BUILTIN_METHODS))


def write_summary(summary: pd.DataFrame, out_dir: str | os.PathLike,
                  means: pd.DataFrame | None = None) -> dict[str, Path]:
    """Write ``summary.csv``, ``cose_table.md`` and, when the published Table 1's models are
    present, ``table1.md`` (:func:`published_table_markdown`) into ``out_dir`` atomically (temp
    file in the same folder, then ``os.replace``). Returns their paths."""
    _require(summary, list(GROUP_COLUMNS) + list(METRICS), "write_summary")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = [c for c in summary.columns if c.startswith("n_")]
    extra = [
        c
        for c in summary.columns
        if c not in GROUP_COLUMNS and c not in METRICS and c not in counts
    ]
    columns = list(GROUP_COLUMNS) + list(METRICS) + counts + extra
    csv_text = summary[columns].to_csv(index=False, lineterminator="\n")
    table = paper_table_markdown(summary, means=means)
    if "cose_lo" in summary.columns:
        level = summary.attrs.get("level", 0.95)
        table += (f"\nCOSE in percent, higher is better. ± half the {100 * level:.0f}% bootstrap "
                  "interval over images ([lo, hi] in summary.csv); the last rows: each method's "
                  "mean over its cells, and the test images behind each cell.\n")
    paths = {"summary": out / "summary.csv", "table": out / "cose_table.md"}
    atomic_write_text(paths["summary"], csv_text)
    atomic_write_text(paths["table"], table)
    published = published_table_markdown(summary)  # its own rows: means of those only
    if published is not None:
        paths["table1"] = out / "table1.md"
        atomic_write_text(paths["table1"], published)
    else:  # a stale layout from other models must not stand beside these results
        (out / "table1.md").unlink(missing_ok=True)
    return paths
