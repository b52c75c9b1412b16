"""The one place that talks to MLflow.

A stage records what it logs in a `Journal` (params, metrics with steps, tags, artifacts, the
run tree). `flush()` first writes the journal to `mlruns/pending/` (so an outage loses nothing),
then pushes it to MLflow with retries and backoff, and deletes the file once every run is in.
Pushing is idempotent: each run carries a `cose.run_key` tag and is skipped when a complete run
with that key exists, so `cose log` can replay pending journals any number of times.

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


def data_hash(root: Path | None = None) -> str:
    """md5 of the `data` output recorded in data.dvc ("none" without one)."""
    import yaml

    path = (root or project_root()) / "data.dvc"
    try:
        doc = yaml.safe_load(path.read_text())
        return str(doc["outs"][0]["md5"])
    except (OSError, KeyError, IndexError, TypeError, yaml.YAMLError):
        return "none"


@dataclass
class RunRecord:
    key: str
    name: str
    parent: str | None = None
    params: dict[str, str] = field(default_factory=dict)
    metrics: list[tuple[str, float, int]] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)
    artifacts: list[tuple[str, str | None]] = field(default_factory=list)

    def log_params(self, params: dict[str, Any], prefix: str = "") -> RunRecord:
        for k, v in _flatten(params, prefix).items():
            self.params[k] = str(v)[:6000]
        return self

    def log_metric(self, key: str, value: float, step: int = 0) -> RunRecord:
        value = float(value)
        if value == value:  # MLflow rejects NaN in some backends: skip, counts say why
            self.metrics.append((key, value, int(step)))
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
        self.common_tags = {
            "cose.stage": stage,
            "dvc.stage": stage,
            "cose.execution_id": self.execution_id,
            "git.commit": git_commit(self.root),
            "data.dvc.md5": data_hash(self.root),
        }
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
        journal.root_run.log_params({"seed": cfg.seed, "datasets": ",".join(cfg.datasets),
                                     "models": ",".join(cfg.models),
                                     "methods": ",".join(cfg.methods)})
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

    # ------------------------------------------------------------------ persistence

    def to_json(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "experiment": self.experiment,
            "execution_id": self.execution_id,
            "common_tags": self.common_tags,
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
        j.runs = {}
        for r in doc["runs"]:
            rec = RunRecord(**{**r, "metrics": [tuple(m) for m in r["metrics"]],
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
                client, uri = _client()
                _experiment_id(client, self.experiment, uri, self.root)

        last = self._retrying(check, "check")
        if last is not None:
            raise TrackingError(
                f"MLflow tracking at {redact(tracking_uri(self.root))} is unreachable after "
                f"{self.retries + 1} attempts ({type(last).__name__}: {_one_line(last)}); "
                f"tracking.required is true, so the {self.stage} stage stops before its work"
            )

    def flush(self) -> bool:
        """Save, push with retries; True when everything reached MLflow."""
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


def redact(text: str) -> str:
    """``text`` with the credentials of any URI in it masked: ``https://user:token@host`` ->
    ``https://user:***@host``, ``https://token@host`` -> ``https://***@host``, ``?token=...`` ->
    ``?token=***``. Used on every message that may
    hold a tracking URI (warnings, errors, logs)."""
    def mask(m: re.Match) -> str:  # user:password -> user:***; a lone user may be a token
        user = m.group("user") if m.group(3) else "***"
        return f"{m.group('scheme')}{user}{':***' if m.group(3) else ''}@"
    return _SECRET_QUERY.sub(r"\1***", _USERINFO.sub(mask, str(text)))


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


def _client():
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri), uri


def _experiment_id(client: Any, name: str, uri: str, root: Path) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = artifact_root(root) if uri.startswith("sqlite:") else None
    if location:
        Path(location.removeprefix("file://")).mkdir(parents=True, exist_ok=True)
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # created concurrently
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def push(journal: Journal) -> None:
    """Send every run of the journal that MLflow does not hold complete yet."""
    with _bounded_http():
        _push(journal)


def _push(journal: Journal) -> None:
    from mlflow.entities import Metric, Param

    if tracking_uri(journal.root).startswith("sqlite:"):
        (journal.root / "mlruns").mkdir(parents=True, exist_ok=True)
    client, uri = _client()
    exp_id = _experiment_id(client, journal.experiment, uri, journal.root)
    ids: dict[str, str] = {}
    now = int(time.time() * 1000)
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
        tags = {**journal.common_tags, **rec.tags, RUN_KEY_TAG: full_key}
        tags["mlflow.runName"] = rec.name
        if rec.parent is not None:
            tags["mlflow.parentRunId"] = ids[rec.parent]
        run = client.create_run(exp_id, tags=tags, run_name=rec.name)
        run_id = run.info.run_id
        params = [Param(k, v) for k, v in rec.params.items()]
        metrics = [Metric(k, v, now, s) for k, v, s in rec.metrics]
        for i in range(0, max(len(params), len(metrics), 1), 100):
            client.log_batch(run_id, metrics=metrics[i : i + 100], params=params[i : i + 100])
        for path, artifact_path in rec.artifacts:
            if Path(path).is_dir():
                client.log_artifacts(run_id, path, artifact_path)
            elif Path(path).exists():
                client.log_artifact(run_id, path, artifact_path)
        client.set_tag(run_id, COMPLETE_TAG, "1")
        client.set_terminated(run_id, "FINISHED")
        ids[rec.key] = run_id


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
