"""great-expectations suites over dataset manifests (and their files) and the per-pair table.

``validate_dataset(root/NAME)``: the manifest's columns, non-null values, unique and relative
paths, labels inside ``classes.txt``, splits in {train,test,val}, modes the loaders convert
(16-bit / float modes are rejected, see ``cose.data.image``), positive sizes, sha256 format;
then per file: it exists, its sha256 matches, it opens and verifies as an image, and its size
and mode match the manifest. ``validate_pairs(df)``: the explain stage's per-pair table.
Both return a ``ValidationReport`` (``ok``, ``failures``, ``to_markdown()``). GX runs with an
ephemeral context that is built once per process.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from cose.columns import PAIR_COLUMNS
from cose.spec import TRANSFORMS

from .image import CONVERTED_MODES
from .manifest import (
    CLASSES,
    MANIFEST,
    MANIFEST_COLUMNS,
    SPLITS,
    leaves_folder,
    read_classes,
    sha256_file,
)

TRANSFORM_TYPE_PATTERN = (r"^(?:" + "|".join(TRANSFORMS)
                          + r"|random|seed|mid_ckpt_[A-Za-z0-9]+(?:_[A-Za-z0-9]+)*)$")
_INT_TYPES = ["int64", "int32", "int16", "int8", "uint8", "uint16", "uint32", "uint64",
              "Int64", "Int32"]
_UNSAFE_PATH = r"(?:^/|^[A-Za-z]:|\\|(?:^|/)\.\.(?:/|$))"


@dataclass
class Failure:
    check: str
    message: str
    examples: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        ex = f" (e.g. {', '.join(self.examples)})" if self.examples else ""
        return f"{self.check}: {self.message}{ex}"


@dataclass
class ValidationReport:
    name: str
    rows: int = 0
    checks: int = 0
    failures: list[Failure] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_markdown(self) -> str:
        status = "passed" if self.ok else f"FAILED ({len(self.failures)} checks)"
        lines = [f"## Validation of {self.name}: {status}", "",
                 f"{self.rows} rows, {self.checks} checks.", ""]
        if self.failures:
            lines += ["| check | problem | examples |", "|---|---|---|"]
            for f in self.failures:
                ex = ", ".join(f"`{e}`" for e in f.examples)
                lines.append(f"| {f.check} | {f.message} | {ex} |".replace("\n", " "))
            lines.append("")
        return "\n".join(lines)

    def __str__(self) -> str:
        if self.ok:
            return f"{self.name}: ok ({self.rows} rows)"
        return f"{self.name}: " + "; ".join(map(str, self.failures))


# ------------------------------------------------------------------------------ GX plumbing

_GX: dict[str, Any] = {}


def _batch_definition():
    """The cached ephemeral context's whole-dataframe batch definition."""
    if "bd" not in _GX:
        # GX logs at INFO while importing and pins one logger to INFO on import: quiet both
        noisy = ("great_expectations", "great_expectations._docs_decorators",
                 "great_expectations.data_context.types.base")
        for name in noisy:
            logging.getLogger(name).setLevel(logging.WARNING)
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        for name in noisy:
            logging.getLogger(name).setLevel(logging.WARNING)

        ctx = gx.get_context(mode="ephemeral")
        ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
        asset = ctx.data_sources.add_pandas("cose").add_dataframe_asset("table")
        _GX["gx"] = gx
        _GX["bd"] = asset.add_batch_definition_whole_dataframe("all")
    return _GX["gx"], _GX["bd"]


def _plain(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


def _explain(kind: str, kw: dict[str, Any]) -> str:
    """What the rows that fail ``kind`` are, in words."""
    if kind == "expect_column_values_to_be_unique":
        return "duplicated"
    if kind == "expect_column_values_to_not_be_null":
        return "empty or not a number"
    if kind == "expect_column_values_to_be_between":
        lo, hi = kw.get("min_value"), kw.get("max_value")
        return f"outside [{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
    if kind == "expect_column_values_to_be_in_set":
        return "false" if kw.get("value_set") == [True] else f"not in {kw.get('value_set')}"
    if kind == "expect_column_values_to_match_regex":
        return f"not matching {kw.get('regex')!r}"
    if kind == "expect_column_values_to_not_match_regex":
        return "absolute or escaping the folder ('..')"
    if kind == "expect_column_values_to_be_in_type_list":
        return f"not of type {kw.get('type_list')}"
    return f"violating {kw}"


def _describe(res: Any, key_column: str | None) -> Failure:
    cfg = res.expectation_config
    kw = {k: v for k, v in cfg.kwargs.items() if k not in ("batch_id", "column", "result_format")}
    column = cfg.kwargs.get("column")
    check = column or cfg.type
    r = res.result or {}
    examples: list[str] = []
    if "unexpected_count" in r:
        msg = f"{r['unexpected_count']} of {r.get('element_count', '?')} rows {_explain(cfg.type, kw)}"
        for item in (r.get("unexpected_index_list") or [])[:5]:
            if isinstance(item, dict) and key_column and key_column in item:
                value = _plain(item.get(column))
                examples.append(str(item[key_column]) if isinstance(value, bool) or column == key_column
                                else f"{item[key_column]}: {value!r}")
        if not examples:
            examples = [repr(_plain(v)) for v in (r.get("partial_unexpected_list") or [])[:5]]
    elif "observed_value" in r:
        msg = f"observed {r['observed_value']!r}, expected {kw}"
        details = r.get("details") or {}
        if details.get("mismatched"):
            msg += f" ({details['mismatched']})"
    else:
        info = res.exception_info or {}
        msg = info.get("exception_message") or f"failed ({cfg.type}, {kw})"
    return Failure(check, msg, examples)


def _run(df: pd.DataFrame, expectations: list[Any], key_column: str | None) -> list[Failure]:
    gx, bd = _batch_definition()
    suite = gx.ExpectationSuite(name="cose")
    for e in expectations:
        suite.add_expectation(e)
    fmt: dict[str, Any] = {"result_format": "COMPLETE"}
    if key_column:
        fmt["unexpected_index_column_names"] = [key_column]
    result = bd.get_batch(batch_parameters={"dataframe": df}).validate(suite, result_format=fmt)
    return [_describe(r, key_column) for r in result.results if not r.success]


def _present(df: pd.DataFrame, wanted: tuple[str, ...], gx: Any) -> tuple[list[Any], list[str]]:
    exps = [gx.expectations.ExpectTableColumnsToMatchSet(column_set=list(wanted), exact_match=False)]
    return exps, [c for c in wanted if c in df.columns]


# ------------------------------------------------------------------------------- manifests


def _file_checks(folder: Path, df: pd.DataFrame, hashes: bool) -> pd.DataFrame:
    from PIL import Image

    exists, inside, sha_ok, image_ok = [], [], [], []
    for row in df.itertuples(index=False):
        path = str(getattr(row, "path", ""))
        f = folder / path
        # a symbolic link out of the folder is never read (nor hashed)
        stays = bool(path) and not re.search(_UNSAFE_PATH, path) and leaves_folder(
            f, folder) is None
        inside.append(stays)
        if not stays or not f.is_file():
            exists.append(stays and f.is_file())
            sha_ok.append(False)
            image_ok.append(False)
            continue
        exists.append(True)
        sha_ok.append(not hashes or sha256_file(f) == str(getattr(row, "sha256", "")))
        try:
            with Image.open(f) as im:
                im.verify()
            with Image.open(f) as im:
                im.load()
                size_ok = (str(im.width), str(im.height), im.mode) == (
                    str(getattr(row, "width", "")), str(getattr(row, "height", "")),
                    str(getattr(row, "mode", "")))
            image_ok.append(size_ok)
        except Exception:  # noqa: BLE001 - any decode error means a corrupt image
            image_ok.append(False)
    return pd.DataFrame({"path": df.get("path", pd.Series([""] * len(df))).astype(str),
                         "file_inside_dataset_folder": inside,
                         "file_exists": exists, "sha256_matches": sha_ok,
                         "image_decodes_with_manifest_size_and_mode": image_ok})


def validate_manifest(df: pd.DataFrame, num_classes: int, name: str = "manifest") -> ValidationReport:
    """GX suite over a manifest table (strings as read from the CSV)."""
    gx, _ = _batch_definition()
    E = gx.expectations
    exps, cols = _present(df, MANIFEST_COLUMNS, gx)
    df = df.copy()
    for c in ("label", "width", "height"):
        if c in cols:
            df[c] = pd.to_numeric(df[c], errors="coerce")
    for c in cols:
        exps.append(E.ExpectColumnValuesToNotBeNull(column=c))
    if "path" in cols:
        exps.append(E.ExpectColumnValuesToBeUnique(column="path"))
        exps.append(E.ExpectColumnValuesToNotMatchRegex(column="path", regex=_UNSAFE_PATH))
    if "label" in cols:
        exps.append(E.ExpectColumnValuesToBeBetween(column="label", min_value=0,
                                                    max_value=max(num_classes - 1, 0)))
        df["label_is_integer"] = df["label"].isna() | (df["label"] % 1 == 0)
        exps.append(E.ExpectColumnValuesToBeInSet(column="label_is_integer", value_set=[True]))
    if "split" in cols:
        exps.append(E.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS)))
    if "mode" in cols:
        exps.append(E.ExpectColumnValuesToBeInSet(column="mode", value_set=list(CONVERTED_MODES)))
    for c in ("width", "height"):
        if c in cols:
            exps.append(E.ExpectColumnValuesToBeBetween(column=c, min_value=1))
    if "sha256" in cols:
        exps.append(E.ExpectColumnValuesToMatchRegex(column="sha256", regex=r"^[0-9a-f]{64}$"))
    if num_classes < 1:
        exps.append(E.ExpectTableRowCountToBeBetween(min_value=0, max_value=0))
    report = ValidationReport(name, rows=len(df), checks=len(exps))
    report.failures = _run(df, exps, "path" if "path" in cols else None)
    return report


def validate_dataset(folder: str | Path, check_files: bool = True, check_hashes: bool = True) -> ValidationReport:
    """Validate ``folder`` (``root/NAME``): manifest suite plus, by default, file checks."""
    folder = Path(folder)
    report = ValidationReport(folder.name)
    if not (folder / MANIFEST).is_file():
        report.failures.append(Failure("manifest", f"{folder / MANIFEST} is missing; run "
                                       f"`cose data fetch {folder.name}`"))
        return report
    if not (folder / CLASSES).is_file():
        report.failures.append(Failure("classes", f"{folder / CLASSES} is missing"))
        num_classes = 0
    else:
        num_classes = len(read_classes(folder))
        if num_classes == 0:
            report.failures.append(Failure("classes", f"{folder / CLASSES} lists no classes"))
    try:
        df = pd.read_csv(folder / MANIFEST, dtype=str, keep_default_na=False, na_values=[""])
    except Exception as e:  # noqa: BLE001
        report.failures.append(Failure("manifest", f"cannot be parsed as CSV: {e}"))
        return report
    if df.empty:
        report.failures.append(Failure("manifest", "has no rows"))
        return report
    m = validate_manifest(df, num_classes, folder.name)
    report.rows, report.checks = m.rows, m.checks
    report.failures += m.failures
    if check_files:
        gx, _ = _batch_definition()
        files = _file_checks(folder, df, check_hashes)
        exps = [gx.expectations.ExpectColumnValuesToBeInSet(column=c, value_set=[True])
                for c in files.columns if c != "path"]
        report.checks += len(exps)
        report.failures += _run(files, exps, "path")
    return report


# ------------------------------------------------------------------------------ pair table


def validate_pairs(df: pd.DataFrame, name: str = "pairs") -> ValidationReport:
    """GX suite over the explain stage's per-pair table (see docs/interfaces.md)."""
    gx, _ = _batch_definition()
    E = gx.expectations
    exps, cols = _present(df, PAIR_COLUMNS, gx)
    for c in ("dataset", "model", "saliency_method", "transform_type", "transform_magnitude",
              "test_idx", "target_class", "pred_class", "t_pred_class"):
        if c in cols:
            exps.append(E.ExpectColumnValuesToNotBeNull(column=c))
    for c in ("test_idx", "target_class", "pred_class", "t_pred_class"):
        if c in cols:
            exps.append(E.ExpectColumnValuesToBeInTypeList(column=c, type_list=_INT_TYPES))
            exps.append(E.ExpectColumnValuesToBeBetween(column=c, min_value=0))
    for c in ("ssim", "spearman"):  # NaN is allowed (constant maps); GX skips nulls
        if c in cols:
            exps.append(E.ExpectColumnValuesToBeBetween(column=c, min_value=-1.0 - 1e-6,
                                                        max_value=1.0 + 1e-6))
    if "transform_type" in cols:
        exps.append(E.ExpectColumnValuesToMatchRegex(column="transform_type",
                                                     regex=TRANSFORM_TYPE_PATTERN))
    report = ValidationReport(name, rows=len(df), checks=len(exps))
    if len(df):
        report.failures = _run(df.reset_index(drop=True), exps, None)
    elif set(PAIR_COLUMNS) - set(df.columns):
        report.failures = _run(df, exps[:1], None)
    return report
