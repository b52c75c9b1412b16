"""The one place that talks to MLflow.

A stage records what it logs in a `Journal` (params, metrics with steps, tags, artifacts, the
run tree). `flush()` first writes the journal to `mlruns/pending/` (so an outage loses nothing),
then pushes it to MLflow with retries and backoff, and deletes the file once every run is in.
Pushing is idempotent: each run carries a `cose.run_key` tag and is skipped when a complete run
with that key exists, so `cose log` can replay pending journals any number of times.

Every run holds its real start and end time (taken when the work happens, kept by a replay),
every metric the time it was logged. The runs of one pipeline execution (the same experiment
or branch, commit and params.yaml) nest under one parent run (``cose.stage = pipeline``);
every run carries the DVC experiment name (``dvc.experiment``: ``DVC_EXP_NAME`` under
``dvc exp run``, else the git branch or commit) and the stage's resolved params. A project's
sqlite store keeps its artifacts in ``mlruns/artifacts``: MLflow stores those locations as
absolute paths, so a copied or moved checkout has its store's locations moved with it
(:func:`relocate_store`) before anything is logged or shown.

`tracking.retries` and `tracking.backoff_s` bound how long an outage holds a stage up: while
pushing, MLflow's own HTTP retries (7 by default, with a backoff that adds up to minutes per
request) are turned off and the request timeout is 30 s, unless `MLFLOW_HTTP_REQUEST_MAX_RETRIES`
/ `MLFLOW_HTTP_REQUEST_TIMEOUT` are set in the environment.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cose.io import atomic_write_text

log = logging.getLogger(__name__)

RUN_KEY_TAG = "cose.run_key"
COMPLETE_TAG = "cose.complete"


class TrackingError(RuntimeError):
    """MLflow could not be reached and `tracking.required` is true."""


def project_root() -> Path:
    from cose import runtime

    return runtime.current().root()


def tracking_uri(root: Path | None = None) -> str:
    """`MLFLOW_TRACKING_URI` if set, else the project's sqlite store under mlruns/."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    root = root or project_root()
    return f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"


def artifact_root(root: Path | None = None) -> str:
    root = root or project_root()
    return (root / "mlruns" / "artifacts").as_uri()


def pending_dir(root: Path | None = None) -> Path:
    return (root or project_root()) / "mlruns" / "pending"


def git_commit(root: Path | None = None) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root or project_root(),
            capture_output=True, text=True, timeout=10, check=True,
        )
        commit = out.stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root or project_root(),
            capture_output=True, text=True, timeout=10,
        ).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def dvc_experiment(root: Path | None = None, commit: str | None = None) -> str:
    """The DVC experiment this process runs in (``DVC_EXP_NAME``, set by ``dvc exp run``),
    else the git branch, else the commit."""
    name = os.environ.get("DVC_EXP_NAME")
    if name:
        return name
    try:
        branch = subprocess.run(["git", "rev-parse", "--abbrev-ref", "HEAD"],
                                cwd=root or project_root(), capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        branch = ""
    if branch and branch != "HEAD":
        return branch
    return (commit or git_commit(root))[:12]


def pipeline_key(root: Path | None = None, experiment: str = "", commit: str = "") -> str:
    """One pipeline execution: the same experiment or branch, commit and params.yaml. The
    stages of one `dvc repro` (separate processes) share it."""
    import hashlib

    h = hashlib.sha256(f"{experiment}\n{commit}\n".encode())
    params = (root or project_root()) / "params.yaml"
    if params.is_file():
        h.update(params.read_bytes())
    return h.hexdigest()[:16]


def relocate_store(root: Path | None = None) -> int:
    """Move the artifact locations of the project's sqlite store to this checkout.

    MLflow records each experiment's and run's artifact location as an absolute path; in a
    checkout copied or moved elsewhere they still name the old tree, so new runs would write
    there and old ones be read from there. A location ``<old>/mlruns/...`` becomes
    ``<root>/mlruns/...`` (the artifacts moved with the store). Only the project store
    (``sqlite:///<root>/mlruns/mlflow.db``); returns the rows changed."""
    import sqlite3

    root = (root or project_root()).resolve()
    if tracking_uri(root) != f"sqlite:///{root / 'mlruns' / 'mlflow.db'}":
        return 0
    db = root / "mlruns" / "mlflow.db"
    if not db.is_file():
        return 0
    here = str(root / "mlruns")
    changed = 0
    con = sqlite3.connect(db, timeout=30)
    try:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not {"experiments", "runs"} <= tables:
            return 0
        with con:
            for table, column, key in (("experiments", "artifact_location", "experiment_id"),
                                       ("runs", "artifact_uri", "run_uuid")):
                for row_id, value in con.execute(f"SELECT {key}, {column} FROM {table}").fetchall():
                    new = _moved(value, here)
                    if new is not None:
                        con.execute(f"UPDATE {table} SET {column} = ? WHERE {key} = ?",
                                    (new, row_id))
                        changed += 1
    finally:
        con.close()
    if changed:
        log.info("MLflow store moved: %d artifact locations now under %s", changed, here)
    return changed


def _moved(location: str | None, here: str) -> str | None:
    """``location`` under ``here`` when it names another tree's ``.../mlruns/...``."""
    if not location:
        return None
    scheme = "file://" if location.startswith("file://") else ""
    path = location.removeprefix("file://")
    if not path.startswith("/") or path == here or path.startswith(here + "/"):
        return None
    head, sep, tail = path.rpartition("/mlruns")
    if not sep or (tail and not tail.startswith("/")):
        return None
    return f"{scheme}{here}{tail}"


def data_hash(root: Path | None = None) -> str:
    """md5 of the `data` output recorded in data.dvc ("none" without one)."""
    import yaml

    path = (root or project_root()) / "data.dvc"
    try:
        doc = yaml.safe_load(path.read_text())
        return str(doc["outs"][0]["md5"])
    except (OSError, KeyError, IndexError, TypeError, yaml.YAMLError):
        return "none"


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class RunRecord:
    key: str
    name: str
    parent: str | None = None
    params: dict[str, str] = field(default_factory=dict)
    metrics: list[tuple[str, float, int, int]] = field(default_factory=list)  # (k, v, step, ms)
    tags: dict[str, str] = field(default_factory=dict)
    artifacts: list[tuple[str, str | None]] = field(default_factory=list)
    start_ms: int = field(default_factory=_now_ms)
    end_ms: int | None = None
    # tag -> (stage, run key): the run of another stage this one is made from, as MLflow
    # run id once both are pushed (compile's cells link the explain runs they aggregate)
    links: dict[str, list[str]] = field(default_factory=dict)

    def finish(self) -> RunRecord:
        """The run's work is done: its end time is now (once)."""
        if self.end_ms is None:
            self.end_ms = _now_ms()
        return self

    def link(self, tag: str, stage: str, key: str) -> RunRecord:
        self.links[tag] = [stage, key]
        return self

    def log_params(self, params: dict[str, Any], prefix: str = "") -> RunRecord:
        for k, v in _flatten(params, prefix).items():
            self.params[k] = str(v)[:6000]
        return self

    def log_metric(self, key: str, value: float, step: int = 0) -> RunRecord:
        value = float(value)
        if value == value:  # MLflow rejects NaN in some backends: skip, counts say why
            self.metrics.append((key, value, int(step), _now_ms()))
        return self

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> RunRecord:
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.log_metric(k, v, step)
        return self

    def set_tags(self, tags: dict[str, Any]) -> RunRecord:
        self.tags.update({k: str(v) for k, v in tags.items()})
        return self

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> RunRecord:
        self.artifacts.append((str(Path(path).resolve()), artifact_path))
        return self


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


class Journal:
    """Everything one stage execution logs, pushable and replayable."""

    def __init__(
        self,
        stage: str,
        experiment: str = "cose",
        required: bool = False,
        retries: int = 3,
        backoff_s: float = 1.0,
        root: Path | None = None,
    ) -> None:
        self.root = root or project_root()
        self.stage = stage
        self.experiment = experiment
        self.required = required
        self.retries = retries
        self.backoff_s = backoff_s
        self.execution_id = uuid.uuid4().hex[:12]
        self.runs: dict[str, RunRecord] = {}
        commit = git_commit(self.root)
        experiment_name = dvc_experiment(self.root, commit)
        self.common_tags = {
            "cose.stage": stage,
            "dvc.stage": stage,
            "cose.execution_id": self.execution_id,
            "git.commit": commit,
            "data.dvc.md5": data_hash(self.root),
            "dvc.experiment": experiment_name,
            "cose.pipeline": pipeline_key(self.root, experiment_name, commit),
        }
        self.common_params: dict[str, str] = {}  # the resolved params, on every run
        self.root_run = self.run(stage, stage)

    @classmethod
    def for_config(cls, stage: str, cfg: Any) -> Journal:
        """A journal for `stage` with the `tracking` section of a `cose.config.Config`.

        With `tracking.required: true` MLflow is checked now, so a stage whose tracking is
        down fails before its work rather than after it.
        """
        t = cfg.tracking
        journal = cls(stage, experiment=t.experiment, required=t.required, retries=t.retries,
                      backoff_s=t.backoff_s)
        cells = [f"{d}/{m}" for d in cfg.datasets for m in cfg.models]
        if stage == "train" and len(cells) <= 3:  # DVC's matrix runs one per (dataset, model)
            journal.root_run.name = f"{stage} {', '.join(cells)}"
        resolved = cfg.to_dict()
        for key in ("datasets", "models", "methods"):
            resolved[key] = ",".join(resolved[key])
        journal.common_params = {k: str(v)[:6000] for k, v in _flatten(resolved).items()}
        if journal.required:
            journal.preflight()
        return journal

    def run(self, key: str, name: str, parent: str | None = None) -> RunRecord:
        """The run for `key`, created on first use (nested under `parent`, default the stage)."""
        if key not in self.runs:
            if parent is None and self.runs:
                parent = self.stage
            self.runs[key] = RunRecord(key=key, name=name, parent=parent)
        return self.runs[key]

    def finish(self) -> None:
        """Every run still open ends now (the stage's root last)."""
        for rec in self.runs.values():
            if rec is not self.root_run:
                rec.finish()
        self.root_run.finish()

    # ------------------------------------------------------------------ persistence

    def to_json(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "experiment": self.experiment,
            "execution_id": self.execution_id,
            "common_tags": self.common_tags,
            "common_params": self.common_params,
            "runs": [r.__dict__ for r in self.runs.values()],
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any], root: Path | None = None) -> Journal:
        j = cls.__new__(cls)
        j.root = root or project_root()
        j.stage = doc["stage"]
        j.experiment = doc["experiment"]
        j.required = False
        j.retries = 3
        j.backoff_s = 1.0
        j.execution_id = doc["execution_id"]
        j.common_tags = doc["common_tags"]
        j.common_params = doc.get("common_params", {})
        j.runs = {}
        for r in doc["runs"]:
            saved = r.get("start_ms") or _now_ms()  # journals of before the times were kept
            metrics = [tuple(m) if len(m) == 4 else (*m, saved) for m in r["metrics"]]
            rec = RunRecord(**{**r, "metrics": metrics, "start_ms": saved,
                               "artifacts": [tuple(a) for a in r["artifacts"]]})
            j.runs[rec.key] = rec
        j.root_run = j.runs[j.stage]
        return j

    @property
    def pending_path(self) -> Path:
        return pending_dir(self.root) / f"{self.stage}-{self.execution_id}.json"

    def save_pending(self) -> Path:
        path = self.pending_path
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(self.to_json(), indent=1))
        return path

    # ------------------------------------------------------------------ pushing

    def _retrying(self, action: Any, what: str) -> Exception | None:
        """Call `action()` up to 1 + retries times with exponential backoff; the last error."""
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            try:
                action()
                return None
            except Exception as exc:  # noqa: BLE001 - any backend failure is retried
                last = exc
                if attempt < self.retries:
                    delay = self.backoff_s * (2**attempt)
                    log.warning("MLflow %s failed (%s); retrying in %.1fs", what,
                                _one_line(exc), delay)
                    time.sleep(delay)
        return last

    def preflight(self) -> None:
        """Raise `TrackingError` now when MLflow cannot be reached (for `tracking.required`)."""
        def check() -> None:
            with _bounded_http():
                client, uri = _client(self.root)
                _experiment_id(client, self.experiment, uri, self.root)

        last = self._retrying(check, "check")
        if last is not None:
            raise TrackingError(
                f"MLflow tracking at {redact(tracking_uri(self.root))} is unreachable after "
                f"{self.retries + 1} attempts ({type(last).__name__}: {_one_line(last)}); "
                f"tracking.required is true, so the {self.stage} stage stops before its work"
            )

    def flush(self) -> bool:
        """End the open runs, save, push with retries; True when everything reached MLflow."""
        self.finish()
        path = self.save_pending()
        last = self._retrying(lambda: push(self), "push")
        if last is None:
            path.unlink(missing_ok=True)
            return True
        cause = (f"MLflow tracking at {redact(tracking_uri(self.root))} failed after "
                 f"{self.retries + 1} attempts ({type(last).__name__}: {_one_line(last)})")
        if self.required:
            path.unlink(missing_ok=True)  # the stage fails: its rerun logs, nothing to replay
            raise TrackingError(f"{cause}; tracking.required is true, so the {self.stage} "
                                f"stage fails (set it to false to queue the log instead)")
        msg = (f"{cause}; outputs are complete, the log is kept in {path}; "
               f"replay it with `cose log`")
        warnings.warn(msg, stacklevel=2)
        log.warning(msg)
        return False


_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/@\s:]*)(:[^/@\s]*)?@")
_SECRET_QUERY = re.compile(r"(?i)([?&](?:token|password|secret|access_key|secret_key|sig)=)[^&\s]+")


#: environment variables whose values are secrets wherever they appear in a message
_SECRET_ENV = re.compile(r"(?i)(PASSWORD|PASSWD|SECRET|TOKEN|CREDENTIAL|PRIVATE_KEY|_AUTH$)")
_MIN_SECRET = 6  # shorter values are too common to mask without garbling text


def _secret_values() -> list[str]:
    values = {v for k, v in os.environ.items() if _SECRET_ENV.search(k) and len(v) >= _MIN_SECRET}
    return sorted(values, key=len, reverse=True)


def redact(text: str) -> str:
    """``text`` with the credentials of any URI in it masked: ``https://user:token@host`` ->
    ``https://user:***@host``, ``https://token@host`` -> ``https://***@host``, ``?token=...`` ->
    ``?token=***``; and the value of every secret environment variable
    (``MLFLOW_TRACKING_PASSWORD``, ``AWS_SECRET_ACCESS_KEY``, ``*_TOKEN``, ...) as ``***``.
    Used on every message that may hold one (warnings, errors, logs, and MLflow's own lines:
    :func:`redacted_output`)."""
    def mask(m: re.Match) -> str:  # user:password -> user:***; a lone user may be a token
        user = m.group("user") if m.group(3) else "***"
        return f"{m.group('scheme')}{user}{':***' if m.group(3) else ''}@"
    text = _SECRET_QUERY.sub(r"\1***", _USERINFO.sub(mask, str(text)))
    for value in _secret_values():
        text = text.replace(value, "***")
    return text


class RedactingStream:
    """A text stream that writes through :func:`redact`: what a library prints (MLflow's
    "View run ... at: <tracking URI>", a warning holding a URI) loses its credentials too."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(redact(text))
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:  # flush, isatty, fileno, encoding, ...
        return getattr(self._stream, name)


@contextlib.contextmanager
def redacted_output() -> Iterator[None]:
    """``sys.stdout`` and ``sys.stderr`` through :class:`RedactingStream` (the CLI runs every
    command inside it); restored afterwards."""
    import sys

    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = RedactingStream(saved[0]), RedactingStream(saved[1])
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved


def _one_line(exc: BaseException) -> str:
    text = redact(" ".join(str(exc).split()))
    return text if len(text) <= 300 else text[:297] + "..."


# MLflow's HTTP client defaults while a journal is pushed (the environment overrides them).
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


@contextlib.contextmanager
def _bounded_http() -> Iterator[None]:
    """Let `tracking.retries`/`backoff_s` be the retry policy, not MLflow's long HTTP one."""
    added = [k for k in HTTP_DEFAULTS if k not in os.environ]
    for k in added:
        os.environ[k] = HTTP_DEFAULTS[k]
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def _client(root: Path | None = None):
    """A client of the project's store. Not mlflow.set_tracking_uri: that sets
    MLFLOW_TRACKING_URI for the whole process, so a second project root (a moved checkout,
    a test) would keep writing to the first one's store."""
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(root)
    return MlflowClient(tracking_uri=uri), uri


#: MLflow 3's UI opens an experiment by its kind: a model-development one on its runs table
#: (without the tag it may open on the GenAI traces page)
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


#: the runs table as `cose ui` opens it (an MLflow shared view, an experiment tag): every
#: compiled cell with its COSE and interval as columns, best first
VIEW_KEY = "cose"
_VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
_VIEW = json.dumps({
    "searchFilter": "metrics.cose >= 0",
    "orderByKey": "metrics.`cose`", "orderByAsc": False,
    "selectedColumns": [f"metrics.`{m}`" for m in ("cose", "cose_lo", "cose_hi", "n_images")]
    + [f"params.`{p}`" for p in ("dataset", "model", "saliency_method")],
}, sort_keys=True)


def ui_url(base: str, experiment_id: str | None, charts: bool = False) -> str:
    """The MLflow UI page of the COSE runs table (``charts``: its chart view) at ``base``."""
    if experiment_id is None:
        return base
    return (f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType="
            f"machine_learning&viewStateShareKey={VIEW_KEY}"
            + ("&compareRunsMode=CHART" if charts else ""))


def experiment_id(name: str, root: Path | None = None) -> str | None:
    """The id of experiment ``name`` in the project's store, or None (nothing logged yet)."""
    client, _ = _client(root)
    exp = client.get_experiment_by_name(name)
    return exp.experiment_id if exp is not None else None


def _experiment_id(client: Any, name: str, uri: str, root: Path) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        location = artifact_root(root) if uri.startswith("sqlite:") else None
        if location:
            Path(location.removeprefix("file://")).mkdir(parents=True, exist_ok=True)
        try:
            client.create_experiment(name, artifact_location=location,
                                     tags=dict([EXPERIMENT_KIND]))
        except Exception:  # created concurrently
            if client.get_experiment_by_name(name) is None:
                raise
        exp = client.get_experiment_by_name(name)
    tags = exp.tags or {}
    if tags.get(EXPERIMENT_KIND[0]) is None:  # made before the tag, or elsewhere
        client.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
    if tags.get(_VIEW_TAG) != _VIEW:
        client.set_experiment_tag(exp.experiment_id, _VIEW_TAG, _VIEW)
    return exp.experiment_id


def push(journal: Journal) -> None:
    """Send every run of the journal that MLflow does not hold complete yet."""
    with _bounded_http():
        _push(journal)


def _push(journal: Journal) -> None:
    from mlflow.entities import Metric, Param

    if tracking_uri(journal.root).startswith("sqlite:"):
        (journal.root / "mlruns").mkdir(parents=True, exist_ok=True)
        relocate_store(journal.root)
    client, uri = _client(journal.root)
    exp_id = _experiment_id(client, journal.experiment, uri, journal.root)
    ids: dict[str, str] = {}
    pipeline = _pipeline_run(client, exp_id, journal)
    for rec in journal.runs.values():
        full_key = f"{journal.execution_id}/{rec.key}"
        found = client.search_runs(
            [exp_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{full_key}'", max_results=5
        )
        complete = [r for r in found if r.data.tags.get(COMPLETE_TAG) == "1"]
        if complete:
            ids[rec.key] = complete[0].info.run_id
            continue
        for stale in found:  # a push that died half-way: start that run again
            client.delete_run(stale.info.run_id)
        tags = {**journal.common_tags, **rec.tags, RUN_KEY_TAG: full_key,
                "cose.run": rec.key}
        tags["mlflow.runName"] = rec.name
        tags["mlflow.parentRunId"] = ids[rec.parent] if rec.parent is not None else pipeline
        for tag, (stage, key) in rec.links.items():
            linked = _latest_run(client, exp_id, journal.common_tags["cose.pipeline"], stage, key)
            if linked:
                tags[tag] = linked
        run = client.create_run(exp_id, start_time=rec.start_ms, tags=tags, run_name=rec.name)
        run_id = run.info.run_id
        params = [Param(k, v) for k, v in {**journal.common_params, **rec.params}.items()]
        metrics = [Metric(k, v, ts, s) for k, v, s, ts in rec.metrics]
        for i in range(0, max(len(params), len(metrics), 1), 100):
            client.log_batch(run_id, metrics=metrics[i : i + 100], params=params[i : i + 100])
        for path, artifact_path in rec.artifacts:
            if Path(path).is_dir():
                client.log_artifacts(run_id, path, artifact_path)
            elif Path(path).exists():
                client.log_artifact(run_id, path, artifact_path)
        client.set_tag(run_id, COMPLETE_TAG, "1")
        client.set_terminated(run_id, "FINISHED", end_time=rec.end_ms or _now_ms())
        ids[rec.key] = run_id
    _extend(client, pipeline, journal)


def _pipeline_run(client: Any, exp_id: str, journal: Journal) -> str:
    """The parent run of this pipeline execution, created by its first stage to log."""
    from mlflow.entities import Param

    key = journal.common_tags["cose.pipeline"]
    filt = f"tags.`cose.pipeline` = '{key}' and tags.`cose.stage` = 'pipeline'"
    with _pipeline_lock(journal.root):
        found = client.search_runs([exp_id], filter_string=filt, max_results=1,
                                   order_by=["attributes.start_time ASC"])
        if found:
            return found[0].info.run_id
        tags = {k: v for k, v in journal.common_tags.items()
                if k in ("git.commit", "data.dvc.md5", "dvc.experiment", "cose.pipeline")}
        name = f"pipeline {journal.common_tags['dvc.experiment']}"
        run = client.create_run(exp_id, start_time=journal.root_run.start_ms, run_name=name,
                                tags={**tags, "cose.stage": "pipeline", "mlflow.runName": name})
        params = [Param(k, v) for k, v in journal.common_params.items()
                  if not k.startswith(("train.", "explain.", "compile.", "tracking."))]
        if params:
            client.log_batch(run.info.run_id, params=params[:100])
        return run.info.run_id


def _extend(client: Any, run_id: str, journal: Journal) -> None:
    """The pipeline run spans its stages: it starts with the first stage to log (its creator)
    and ends with the latest one."""
    info = client.get_run(run_id).info
    end = max(info.end_time or 0, journal.root_run.end_ms or _now_ms())
    client.set_terminated(run_id, "FINISHED", end_time=end)


def _latest_run(client: Any, exp_id: str, pipeline: str, stage: str, key: str) -> str | None:
    filt = (f"tags.`cose.pipeline` = '{pipeline}' and tags.`cose.stage` = '{stage}' and "
            f"tags.`cose.run` = '{key}' and tags.`{COMPLETE_TAG}` = '1'")
    found = client.search_runs([exp_id], filter_string=filt, max_results=1,
                               order_by=["attributes.start_time DESC"])
    if not found:  # the stage ran in an earlier pipeline execution: its latest run
        filt = (f"tags.`cose.stage` = '{stage}' and tags.`cose.run` = '{key}' and "
                f"tags.`{COMPLETE_TAG}` = '1'")
        found = client.search_runs([exp_id], filter_string=filt, max_results=1,
                                   order_by=["attributes.start_time DESC"])
    return found[0].info.run_id if found else None


@contextlib.contextmanager
def _pipeline_lock(root: Path) -> Iterator[None]:
    """Two stages pushing at once create one parent run (local stores; a server's users are
    not on this machine, and a rare second parent there costs nothing but a row)."""
    from cose.io import exclusive

    if not tracking_uri(root).startswith("sqlite:"):
        yield
        return
    with exclusive(root / "mlruns" / ".pipeline.lock", "the MLflow pipeline run", wait=60):
        yield


def replay_pending(root: Path | None = None) -> tuple[int, int]:
    """Push every pending journal, file by file; returns (pushed, still pending). A file that
    is not a readable journal (truncated, edited) is moved to ``pending/quarantine/`` and
    named in a warning; the others are replayed all the same."""
    root = root or project_root()
    pushed = failed = 0
    for path in sorted(pending_dir(root).glob("*.json")):
        try:
            journal = Journal.from_json(json.loads(path.read_text()), root=root)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            quarantine = pending_dir(root) / "quarantine"
            quarantine.mkdir(parents=True, exist_ok=True)
            os.replace(path, quarantine / path.name)
            msg = (f"{path} is not a readable pending log ({type(exc).__name__}: "
                   f"{_one_line(exc)}); moved to {quarantine / path.name}, the others are "
                   "replayed")
            warnings.warn(msg, stacklevel=2)
            log.warning(msg)
            continue
        try:
            push(journal)
        except Exception as exc:  # noqa: BLE001
            log.warning("replay of %s failed: %s", path.name, _one_line(exc))
            failed += 1
            continue
        path.unlink(missing_ok=True)
        pushed += 1
    return pushed, failed
