"""Versioned sharing end to end: git + DVC (push, commit, clone, pull, experiments) and MLflow
(relative artifact locations, real run times, one parent run per pipeline execution).

- the params files are fixed points of DVC's own YAML writer, so `dvc exp run -S` changes the
  one value it sets and nothing of the formatting;
- a tiny copy of the project: `dvc repro`, commit what DVC asks git to track, `dvc push` to a
  local directory remote and to an S3-compatible server (moto, on loopback), `git clone`,
  `dvc pull`: `dvc status` is clean and a second `dvc repro` runs no stage; `dvc exp run -S`
  then `dvc exp show --json` holds numeric COSE headline metrics for main and the experiment,
  and `dvc metrics diff` succeeds;
- MLflow: a checkout moved after a run logs its new runs' artifacts inside the moved tree and
  still reads the old ones; a replayed journal keeps its runs' start and end times; the runs of
  one pipeline execution nest under one parent, each tagged with the experiment and params.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from conftest import ROOT, make_project, project_env, sh, tiny_params
from test_remotes import _env, home, s3  # noqa: F401 - the S3 server fixture and its env

from cose import tracking


def test_params_files_are_fixed_points_of_dvcs_yaml_writer(tmp_path):
    """`dvc exp run -S key=value` rewrites params.yaml with ruamel's round trip: a file that
    round-trips unchanged keeps its comments, flow mappings and layout, and only the set line
    changes."""
    from dvc.utils.hydra import apply_overrides  # what `dvc exp run -S` calls
    from dvc.utils.serialize import modify_yaml

    for src in [ROOT / "params.yaml", *sorted((ROOT / "params" / "paper").glob("*.yaml"))]:
        copy = tmp_path / src.name
        copy.write_bytes(src.read_bytes())
        with modify_yaml(copy) as doc:
            doc["explain"]["images"] = 3
        before, after = src.read_text().splitlines(), copy.read_text().splitlines()
        changed = [(a, b) for a, b in zip(before, after) if a != b]
        assert len(before) == len(after) and len(changed) == 1, (src.name, changed[:3])
        assert changed[0][1].lstrip().startswith("images: 3"), changed
        # DVC's -S path (hydra overrides merged into ruamel's round trip): each scalar set
        # changes its one line, comments and lists elsewhere stay as they are
        for override, line in (("explain.images=3", "images: 3"), ("seed=7", "seed: 7"),
                               ("train.lr=0.01", "lr: 0.01"),
                               ("explain.magnitudes=2", "magnitudes: 2")):
            copy.write_bytes(src.read_bytes())
            apply_overrides(copy, [override])
            after = copy.read_text().splitlines()
            changed = [(a, b) for a, b in zip(before, after) if a != b]
            assert len(before) == len(after) and len(changed) == 1, (src.name, override,
                                                                     changed[:3])
            assert changed[0][1].lstrip().startswith(line), (src.name, changed)


# --------------------------------------------------------------------------- MLflow


def _journal(root: Path, stage: str = "compile") -> tracking.Journal:
    j = tracking.Journal(stage, root=root, retries=0)
    j.root_run.log_params({"seed": 0}).log_metrics({"cose": 0.5})
    out = root / "results" / "summary.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("a,b\n1,2\n")
    j.root_run.log_artifact(out)
    return j


def _client(root: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")


def _runs(root: Path):
    client = _client(root)
    exp = client.get_experiment_by_name("cose")
    return client, client.search_runs([exp.experiment_id], order_by=["attributes.start_time"])


def test_a_moved_checkout_keeps_its_mlflow_artifacts_inside_it(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    first = tmp_path / "first"
    first.mkdir()
    monkeypatch.setenv("COSE_PROJECT_ROOT", str(first))
    assert _journal(first).flush()
    moved = tmp_path / "moved"
    shutil.move(first, moved)
    monkeypatch.setenv("COSE_PROJECT_ROOT", str(moved))
    assert _journal(moved).flush()
    client, runs = _runs(moved)
    runs = [r for r in runs if r.data.tags.get("cose.stage") == "compile"]
    assert len(runs) == 2
    for run in runs:  # old and new: inside the moved checkout, readable
        uri = run.info.artifact_uri
        assert uri.removeprefix("file://").startswith(str(moved / "mlruns")), uri
        local = Path(client.download_artifacts(run.info.run_id, "summary.csv", str(tmp_path)))
        assert local.read_text() == "a,b\n1,2\n"
    assert not first.exists()


def test_a_replayed_run_keeps_its_start_and_end_times(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("COSE_PROJECT_ROOT", str(tmp_path))
    j = _journal(tmp_path, "train")
    child = j.run("digits/demo_resnet", "train digits/demo_resnet")
    child.log_metric("val_acc", 0.5, step=1)
    time.sleep(0.3)
    child.finish()
    j.finish()
    path = j.save_pending()  # as an outage leaves it
    time.sleep(1.2)
    pushed, pending = tracking.replay_pending(tmp_path)
    assert (pushed, pending) == (1, 0) and not path.exists()
    client, runs = _runs(tmp_path)
    by_name = {r.info.run_name: r for r in runs}
    run = by_name["train digits/demo_resnet"]
    assert run.info.start_time == child.start_ms and run.info.end_time == child.end_ms
    assert run.info.end_time - run.info.start_time >= 300
    assert run.info.end_time < int(time.time() * 1000) - 1000  # not the replay's clock
    history = client.get_metric_history(run.info.run_id, "val_acc")
    assert history[0].timestamp <= child.end_ms


def test_the_runs_of_one_pipeline_execution_nest_under_one_parent(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("COSE_PROJECT_ROOT", str(tmp_path))
    monkeypatch.setenv("DVC_EXP_NAME", "lean-pipe")
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    for stage in ("train", "train", "explain", "compile"):
        j = _journal(tmp_path, stage)
        j.run("digits/x", f"{stage} digits/x").log_metrics({"n": 1})
        assert j.flush()
    client, runs = _runs(tmp_path)
    parents = [r for r in runs if r.data.tags.get("cose.stage") == "pipeline"]
    assert len(parents) == 1
    pid = parents[0].info.run_id
    stages = [r for r in runs if r.data.tags.get("cose.stage") in ("train", "explain", "compile")
              and r.data.tags.get("mlflow.parentRunId") == pid]
    assert len(stages) == 4  # every stage execution under the one parent
    for r in runs:
        assert r.data.tags.get("dvc.experiment") == "lean-pipe"
    (tmp_path / "params.yaml").write_text("seed: 1\n")  # another pipeline: another parent
    assert _journal(tmp_path, "train").flush()
    _, runs = _runs(tmp_path)
    assert len([r for r in runs if r.data.tags.get("cose.stage") == "pipeline"]) == 2


# --------------------------------------------------------------------------- git + DVC


def _files(root: Path, tops=("data", "checkpoints", "outputs/explain", "results")) -> dict:
    out = {}
    for top in tops:
        for p in sorted((root / top).rglob("*")):
            if p.is_file() and ".gitignore" not in p.name and "/.locks/" not in str(p):
                out[p.relative_to(root).as_posix()] = p.read_bytes()
    return out


@pytest.mark.slow
def test_push_commit_clone_pull_and_experiments(tmp_path, s3, home):  # noqa: F811
    def env(repo: Path, **extra) -> dict:
        isolated = {k: v for k, v in _env(home).items() if k.startswith(("AWS_", "DVC_"))}
        return {**project_env(repo), **isolated, **extra}

    creds = {"AWS_ACCESS_KEY_ID": s3["key"], "AWS_SECRET_ACCESS_KEY": s3["secret"],
             "AWS_ENDPOINT_URL_S3": s3["url"]}
    proj = make_project(tmp_path / "proj", tiny_params({"models": ["demo_resnet"],
                                                        "methods": ["gradcam", "ig"]}))
    remote = tmp_path / "remote"
    sh(["dvc", "remote", "modify", "--local", "local", "url", str(remote)], proj, env=env(proj))
    sh(["cose", "data", "fetch", "digits"], proj, env=env(proj))
    sh(["dvc", "repro"], proj, env=env(proj))
    # what DVC asks git to track: dvc.lock and the headline metrics (autostaged), committed
    status = sh(["git", "status", "--porcelain"], proj, env=env(proj)).stdout
    assert "dvc.lock" in status and "results/headline.json" in status, status
    sh(["git", "add", "-A"], proj, env=env(proj))
    sh(["git", "commit", "-qm", "demo run"], proj, env=env(proj))
    assert sh(["git", "status", "--porcelain"], proj, env=env(proj)).stdout == ""
    headline = json.loads((proj / "results" / "headline.json").read_text())
    assert set(headline["cose"]) == {"gradcam", "ig"}
    assert all(isinstance(v, float) for v in headline["cose"].values())
    sh(["dvc", "push"], proj, env=env(proj))  # the README's plain push: the local remote
    sh(["dvc", "push", "-r", "team"], proj, env=env(proj, **creds))  # the team remote: S3
    expected = _files(proj)

    clones = {}
    for name, extra in (("clone-s3", creds), ("clone-local", {})):
        clone = tmp_path / name
        sh(["git", "clone", "-q", str(proj), str(clone)], tmp_path, env=env(clone))
        sh(["dvc", "remote", "modify", "--local", "local", "url", str(remote)], clone,
           env=env(clone))
        if name == "clone-s3":  # a team member's clone (README, Team setup, step 3)
            sh(["dvc", "remote", "default", "--local", "team"], clone, env=env(clone))
        check = sh(["cose", "remote", "check"], clone, env=env(clone, **extra))
        where = ".dvc/config.local" if name == "clone-s3" else ".dvc/config"
        assert f"the default remote, set in {where}" in check.stdout, check.stdout
        sh(["dvc", "pull"], clone, env=env(clone, **extra))  # plain, as the README says
        assert _files(clone) == expected, name
        assert "up to date" in sh(["dvc", "status"], clone, env=env(clone)).stdout.lower()
        res = sh(["dvc", "repro"], clone, env=env(clone))
        assert "Running stage" not in res.stdout, res.stdout
        clones[name] = clone
    clone = clones["clone-local"]

    # experiments: numbers of main and of the experiment, side by side
    sh(["dvc", "exp", "run", "-S", "explain.images=1", "-n", "one-image"], clone,
       env=env(clone))
    shown = json.loads(sh(["dvc", "exp", "show", "--json"], clone, env=env(clone)).stdout)
    flat = json.dumps(shown)
    assert "one-image" in flat
    values = _headline_values(shown)
    assert len(values) >= 2 and all(isinstance(v, float) for v in values), values
    diff = sh(["dvc", "metrics", "diff", "HEAD"], clone, env=env(clone))
    assert diff.returncode == 0
    # the workspace holds the experiment's params (DVC's way): only the line -S set changed
    before = (proj / "params.yaml").read_text().splitlines()
    after = (clone / "params.yaml").read_text().splitlines()
    changed = [(a, b) for a, b in zip(before, after) if a != b]
    assert len(before) == len(after) and [b.strip() for _, b in changed] == ["images: 1"]
    assert "dvc_plots" not in sh(["git", "status", "--porcelain"], clone, env=env(clone)).stdout


def _headline_values(shown) -> list:
    """The `cose.gradcam` headline values of every revision in `dvc exp show --json`."""
    out = []

    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "results/headline.json" and isinstance(value, dict):
                    data = value.get("data", {})
                    if "cose" in data:
                        out.append(data["cose"].get("gradcam"))
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(shown)
    return out
