"""compile: per-pair tables -> the COSE table, breakdowns, DVC metrics, MLflow runs.

Writes results/summary.csv (one row per saliency_method, dataset, model with REFERENCE.md's
metric names, row counts and cose), results/cose_table.md (the paper's layout),
results/metrics.json (DVC metrics) and the per-transform / per-magnitude breakdowns; then the
report (cose.report): results/cose_table.html, results/figures/*.png (DVC image plots),
results/plots/magnitude/<method>.csv (DVC plot data of the magnitude curves) and
results/report.html. Tables and figures are logged to the stage's MLflow run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from cose import scoring, spec, uncertainty
from cose.config import Config
from cose.io import atomic_write_text, remove_temp_files
from cose.stages import common
from cose.tracking import Journal

log = logging.getLogger("cose.compile")

#: in results/ while compile rewrites it (left there by a compile that did not finish)
INCOMPLETE = "INCOMPLETE.txt"

HEADLINE = ("overall_consistency", "sensitivity", "cose", "cose_hmean", "noise_floor")


def load_pairs(cfg: Config) -> pd.DataFrame:
    parts = []
    for dataset in cfg.datasets:
        for model in cfg.models:
            for method in cfg.methods:
                path = common.explain_dir(dataset, model, method) / "pairs.parquet"
                if not path.exists():
                    raise FileNotFoundError(
                        f"{path} is missing; run the explain stage first (`cose explain`)"
                    )
                common.check_cell_params(cfg, dataset, model, method)
                parts.append(pd.read_parquet(path))
    return pd.concat(parts, ignore_index=True)


def _num(value) -> float | None:
    return None if value is None or pd.isna(value) else round(float(value), 6)


def _method_means(summary: pd.DataFrame, means: pd.DataFrame | None) -> pd.DataFrame:
    """Each method's mean row: ``means`` (with intervals) or the plain mean of its cells."""
    if means is None:
        means = summary.groupby("saliency_method", sort=False)["cose"].mean().reset_index()
    return means


def _mean_cose(means: pd.DataFrame) -> dict[str, float | None]:
    return {r["saliency_method"]: _num(r["cose"]) for r in means.to_dict("records")
            if pd.notna(r["cose"])}


def headline_json(summary: pd.DataFrame, means: pd.DataFrame | None = None) -> dict:
    """The few numbers to compare runs by (``dvc exp show``, ``dvc metrics diff``): each
    method's COSE, the mean over its (dataset, model) cells, and the fewest test images
    behind a cell. The per-cell numbers and intervals are in metrics.json."""
    out: dict = {"cose": _mean_cose(_method_means(summary, means))}
    if "n_images" in summary.columns and len(summary):
        out["images"] = int(summary["n_images"].min())
    return out


def metrics_json(summary: pd.DataFrame, accuracies: dict[str, dict[str, float]],
                 means: pd.DataFrame | None = None) -> dict:
    """Per (dataset, model, method) the headline metrics with their intervals (``*_lo``,
    ``*_hi``) and image count; per dataset and model the test accuracy; per method the mean
    COSE over its cells (with its interval)."""
    out: dict = {}
    keys = [k for m in HEADLINE for k in (m, f"{m}_lo", f"{m}_hi") if k in summary.columns]
    keys += [k for k in ("n_images", "n_pairs", "nan_share") if k in summary.columns]
    for row in summary.to_dict("records"):
        node = out.setdefault(row["dataset"], {}).setdefault(row["model"], {})
        node[row["saliency_method"]] = {k: _num(row[k]) for k in keys}
    for dataset, per_model in accuracies.items():
        for model, acc in per_model.items():
            out.setdefault(dataset, {}).setdefault(model, {})["test_accuracy"] = acc
    means = _method_means(summary, means)
    out["mean_cose"] = _mean_cose(means)
    if "cose_lo" in means.columns:
        out["mean_cose_interval"] = {
            r["saliency_method"]: [_num(r["cose_lo"]), _num(r["cose_hi"])]
            for r in means.to_dict("records") if pd.notna(r["cose"])}
    return out


def write_results(summary: pd.DataFrame, pairs: pd.DataFrame | None, out: Path,
                  accuracies: dict | None = None, means: pd.DataFrame | None = None,
                  comparisons: pd.DataFrame | None = None) -> list[Path]:
    """summary.csv, cose_table.md, metrics.json, comparisons.csv and breakdowns under
    `out`."""
    out.mkdir(parents=True, exist_ok=True)
    tables = scoring.write_summary(summary, out, means=means)
    if "table1" not in tables:  # a DVC output: always there, saying why it is empty
        tables["table1"] = out / "table1.md"
        atomic_write_text(tables["table1"], "The published Table 1's models ("
                          + ", ".join(spec.display_model(m) for m in spec.PUBLISHED_MODELS)
                          + ") are not in this run: `cose_table.md` holds its table.\n")
    written = list(tables.values())
    atomic_write_text(out / "metrics.json", json.dumps(
        metrics_json(summary, accuracies or {}, means), indent=2, sort_keys=True))
    atomic_write_text(out / "headline.json", json.dumps(
        headline_json(summary, means), indent=2, sort_keys=True) + "\n")
    written += [out / "metrics.json", out / "headline.json"]
    if comparisons is not None:
        atomic_write_text(out / "comparisons.csv", comparisons.to_csv(index=False))
        written.append(out / "comparisons.csv")
    if pairs is not None:
        for name, fn in (("by_transform", scoring.breakdown_by_transform),
                         ("by_magnitude", scoring.breakdown_by_magnitude)):
            path = out / f"{name}.csv"
            atomic_write_text(path, fn(pairs).to_csv(index=False))
            written.append(path)
    return written


def train_accuracies(cfg: Config) -> dict[str, dict[str, float]]:
    acc: dict[str, dict[str, float]] = {}
    for dataset in cfg.datasets:
        for model in cfg.models:
            path = common.ckpt_dir(dataset, model) / "metrics.json"
            if path.exists():
                value = json.loads(path.read_text()).get("test_accuracy")
                if value is not None:
                    acc.setdefault(dataset, {})[model] = round(float(value), 6)
    return acc


def load_samples(cfg: Config) -> dict[tuple[str, str], dict[str, dict[str, np.ndarray]]]:
    """The explain stage's sample maps: {(dataset, model): {method: arrays}} where present."""
    out: dict[tuple[str, str], dict[str, dict[str, np.ndarray]]] = {}
    for dataset in cfg.datasets:
        for model in cfg.models:
            for method in cfg.methods:
                path = common.explain_dir(dataset, model, method) / "samples.npz"
                if path.exists():
                    with np.load(path, allow_pickle=False) as z:
                        out.setdefault((dataset, model), {})[method] = {k: z[k] for k in z.files}
    return out


def write_report(cfg: Config, summary: pd.DataFrame, pairs: pd.DataFrame | None, out: Path,
                 accuracies: dict | None = None, samples: dict | None = None) -> list[Path]:
    """cose_table.html, figures/, plots/magnitude/ and report.html under `out`."""
    from cose import report

    log.info("compile: drawing figures and writing %s", out / "report.html")
    params = {k: v for k, v in cfg.to_dict().items() if k != "tracking"}
    return report.write_report(
        out, summary, pairs, load_samples(cfg) if samples is None else samples, params=params,
        versions=report.versions(), accuracies=accuracies or {},
        title="COSE report: " + ", ".join(scoring.display_dataset(d) for d in cfg.datasets),
    )


def _artifact_folder(path: Path) -> str:
    if path.suffix == ".png":
        return "figures"
    if "plots" in path.parts:
        return "plots"
    return "results"


def run(cfg: Config) -> pd.DataFrame:
    journal = Journal.for_config("compile", cfg)  # tracking.required fails before any work
    with common.output_lock("compile", str(common.RESULTS)):
        summary, written = _compile(cfg)
    for path in written:
        journal.root_run.log_artifact(path, _artifact_folder(path))
    for row in summary.to_dict("records"):
        key = f"{row['dataset']}/{row['model']}/{row['saliency_method']}"
        r = journal.run(key, f"cose {key}")
        r.link("cose.explain_run", "explain", key)  # the per-pair table this row scores
        r.log_params({"dataset": row["dataset"], "model": row["model"],
                      "saliency_method": row["saliency_method"]})
        r.log_metrics({k: float(v) for k, v in row.items()
                       if k not in ("dataset", "model", "saliency_method")
                       and isinstance(v, (int, float, np.number)) and pd.notna(v)})
        if row.get("nan_cause"):
            r.set_tags({"cose.nan_cause": row["nan_cause"]})
    log.info("compile: logging %d rows and %d files to MLflow", len(summary), len(written))
    journal.flush()
    log.info("compile: %d rows in results/summary.csv; report: results/report.html",
             len(summary))
    return summary


def _compile(cfg: Config):
    """Score the per-pair tables and write results/ (under the compile lock)."""
    remove_temp_files(common.RESULTS)  # what a killed compile left behind
    if (common.RESULTS / INCOMPLETE).exists():
        log.warning("compile: %s says an earlier compile did not finish; rewriting every "
                    "result", common.RESULTS / INCOMPLETE)
    pairs = load_pairs(cfg)
    from cose.data.validate import validate_pairs

    report = validate_pairs(pairs)
    if not report.ok:
        raise ValueError("per-pair table failed validation:\n" + report.to_markdown())
    c = cfg.compile
    log.info("compile: scoring %d pairs (%s)", len(pairs),
             f"{c.bootstrap} bootstrap resamples" if c.bootstrap else "no intervals")
    summary, reps = uncertainty.summarize(pairs, nan=c.nan, bootstrap=c.bootstrap,
                                          level=c.level, seed=cfg.seed, nan_share=c.nan_share)
    for line in uncertainty.warnings_for(summary):
        log.warning("compile: %s", line)
    means = uncertainty.method_means(summary, reps, c.level) if c.bootstrap else None
    comparisons = uncertainty.compare_methods(pairs, nan=c.nan, bootstrap=c.bootstrap,
                                              level=c.level, seed=cfg.seed)
    accuracies = train_accuracies(cfg)
    # results/ is rewritten file by file: until the last one is in, the folder says so (a
    # killed compile leaves the marker beside a mix of new and old files)
    marker = common.RESULTS / INCOMPLETE
    common.RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(marker, "`cose compile` started writing this folder and did not finish: "
                      "its files may come from two runs. Run `cose compile` (or `dvc repro`) "
                      "again; it removes this file when every result is written.\n")
    written = write_results(summary, pairs, common.RESULTS, accuracies, means, comparisons)
    written += write_report(cfg, summary, pairs, common.RESULTS, accuracies)
    marker.unlink()
    return summary, written


def _summary(cfg: Config, pairs: pd.DataFrame) -> pd.DataFrame:
    c = cfg.compile
    return uncertainty.summarize(pairs, nan=c.nan, bootstrap=c.bootstrap, level=c.level,
                                 seed=cfg.seed, nan_share=c.nan_share)[0]


def report_only(cfg: Config, out: Path, reference_outputs: str | None = None) -> list[Path]:
    """`cose report`: the report pages and figures from the current per-pair tables (or the
    reference's result CSVs), without metrics files or MLflow."""
    if reference_outputs:
        pairs = scoring.read_reference_outputs(reference_outputs)
        summary = _summary(cfg, pairs)
        scoring.write_summary(summary, out)
        from cose import report

        return report.write_report(out, summary, pairs, versions=report.versions(),
                                   title=f"COSE report: {reference_outputs}")
    pairs = load_pairs(cfg)
    summary = _summary(cfg, pairs)
    return write_report(cfg, summary, pairs, out, train_accuracies(cfg))
