"""The whole pipeline on a tiny config: real DVC, real MLflow store, real data export."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import yaml
from conftest import sh

pytestmark = pytest.mark.slow

METRICS = ["geom_consistency", "photo_consistency", "overall_consistency", "geom_fidelity",
           "photo_fidelity", "img_fidelity", "random_fidelity", "midckpt_fidelity",
           "model_fidelity", "overall_fidelity", "sensitivity", "cose", "cose_hmean"]


def test_results_have_one_row_per_method_dataset_model(tiny_project):
    summary = pd.read_csv(tiny_project / "results" / "summary.csv")
    params = yaml.safe_load((tiny_project / "params.yaml").read_text())
    assert {"saliency_method", "dataset", "model", *METRICS} <= set(summary.columns)
    combos = {(r.saliency_method, r.dataset, r.model) for r in summary.itertuples()}
    assert combos == {(m, d, mo) for m in params["methods"] for d in params["datasets"]
                      for mo in params["models"]}
    cose = summary["cose"].dropna()
    # sqrt(consistency * (1 - fidelity)): fidelity is a mean SSIM in [-1, 1], so COSE <= sqrt(2)
    assert len(cose) > 0 and cose.between(0, 2 ** 0.5).all()
    table = (tiny_project / "results" / "cose_table.md").read_text()
    assert "GradCAM++" in table and "SmoothGrad" in table and "%" in table
    metrics = json.loads((tiny_project / "results" / "metrics.json").read_text())
    assert "mean_cose" in metrics and "digits" in metrics


def test_per_pair_table_covers_every_variant(tiny_project):
    params = yaml.safe_load((tiny_project / "params.yaml").read_text())
    ex = params["explain"]
    df = pd.read_parquet(tiny_project / "outputs/explain/digits/demo_resnet/ig/pairs.parquet")
    signed = {"TranslateX", "Rotate", "Brightness"} & set(ex["transforms"])
    unsigned = set(ex["transforms"]) - signed
    per_image = (len(signed) * ex["magnitudes"] + len(unsigned) + 1
                 + len(params["train"]["save_epochs"]))
    assert len(df) == per_image * ex["images"]
    kinds = set(df["transform_type"])
    assert "random" in kinds and "mid_ckpt_e001" in kinds
    assert set(ex["transforms"]) <= kinds
    # magnitudes are signed, non-zero, and drawn without replacement per image
    rot = df[df.transform_type == "Rotate"]
    assert (rot.transform_magnitude != 0).all()
    assert rot.groupby("test_idx").transform_magnitude.nunique().eq(ex["magnitudes"]).all()


def test_second_repro_runs_no_stage_and_data_matches_data_dvc(tiny_project):
    res = sh(["dvc", "repro"], tiny_project)
    assert "Running stage" not in res.stdout, res.stdout
    status = sh(["dvc", "status", "--json"], tiny_project)
    assert json.loads(status.stdout or "{}") == {}


def test_mlflow_has_nested_tagged_runs_for_each_stage(tiny_project):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tiny_project / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("cose")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    stages = {r.data.tags.get("dvc.stage") for r in runs}
    assert {"train", "explain", "compile"} <= stages
    for r in runs:
        assert r.data.tags["git.commit"] != "unknown"
        assert r.data.tags["data.dvc.md5"] != "none"
    child = [r for r in runs if r.data.tags.get("dvc.stage") == "compile"
             and "mlflow.parentRunId" in r.data.tags]
    assert child and any("cose" in r.data.metrics for r in child)
    train = [r for r in runs if r.data.tags.get("dvc.stage") == "train"
             and "mlflow.parentRunId" in r.data.tags]
    # each (dataset, model) of DVC's train matrix is its own stage run, named after its cell
    roots = sorted(r.data.tags["mlflow.runName"] for r in runs
                   if r.data.tags.get("cose.run") == "train")
    assert roots == ["train digits/demo_resnet", "train digits/demo_vit"], roots
    hist = client.get_metric_history(train[0].info.run_id, "val_acc")
    assert len(hist) >= 2  # a per-epoch curve
    assert not list((tiny_project / "mlruns" / "pending").glob("*.json"))


def test_compile_only_change_does_not_retrain(tiny_project, tmp_path):
    proj = tmp_path / "copy"
    shutil.copytree(tiny_project, proj, symlinks=True)
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["compile"]["drop_misclassified"] = False
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = json.loads(sh(["dvc", "status", "--json"], proj).stdout)
    assert set(status) == {"compile"}, status
