"""Your own saliency method, model and dataset: one registry of names, plugins end to end.

- the names: every registered method, transform and precision is accepted by config and known
  to scoring and the report; the modules hold the spec's own tuples, not copies;
- plugins/*.py load before params are read, once per process; a broken one is one line naming
  the file;
- a plugin method through `dvc repro` in a copy of the tiny project: its row in summary.csv, the
  COSE table, report.html and MLflow, while no existing shard is recomputed;
- a plugin model (a small CNN factory) on a plugin dataset (an image folder of PNGs the test
  writes) through `dvc repro`, and through `cose evaluate --model module:factory`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import make_project, sh, tiny_params

from cose import config, plugins, scoring, spec

BIN = Path(sys.executable).parent

GRAD_X_INPUT = textwrap.dedent('''
    """Gradient x input: |d p(target) / d x * x| summed over channels."""
    from cose import saliency
    from cose.saliency import _core
    from cose.saliency.postprocess import gradient_map


    def grad_x_input(model, images, targets, max_target, *, batch_size=None):
        grads = _core.prob_grad(model, images, targets, max_target)
        return gradient_map(grads * images)


    saliency.register("grad_x_input", grad_x_input, {"batch_size": None}, "gradient x input",
                      display="Grad x Input", kind="gradient", fusable=True)
''')

CUSTOM = textwrap.dedent('''
    """A model and a dataset of the project's own."""
    from pathlib import Path

    from cose import data, models

    import custom_models

    models.register("tiny_cnn", custom_models.make, preprocess=32, cam_layer="features.2",
                    classifier="fc", display="Tiny CNN")
    data.register("shapes", Path(__file__).resolve().parent.parent / "raw_shapes")
''')

CUSTOM_MODELS = textwrap.dedent('''
    from torch import nn


    class TinyCNN(nn.Module):
        def __init__(self, num_classes):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                                          nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
            self.fc = nn.Linear(16, num_classes)

        def forward(self, x):
            return self.fc(self.features(x).mean((2, 3)))


    def make(num_classes):
        return TinyCNN(num_classes)
''')


# --------------------------------------------------------------------------- names


def test_every_registered_name_is_accepted_and_known():
    for method in spec.methods():
        cfg = config.validate(config.from_dict({"methods": [method]}), check_registries=False)
        assert cfg.methods == (method,)
        assert scoring.method_display(method) == spec.method(method).display
        assert spec.method_order([method, "zzz"]) == [method, "zzz"]
    for name in spec.TRANSFORMS:
        config.validate(config.from_dict({"explain": {"transforms": [name]}}),
                        check_registries=False)
        assert scoring.transform_family(name) in ("geometric", "photometric")
    for p in spec.PRECISIONS:
        config.validate(config.from_dict({"explain": {"precision": p}}), check_registries=False)


def test_modules_hold_the_specs_names_not_copies():
    from cose import precision, saliency, transforms
    from cose.data import validate

    assert config.METHODS is spec.BUILTIN_METHODS and saliency.METHODS is spec.BUILTIN_METHODS
    assert config.PRECISIONS is spec.PRECISIONS and precision.PRECISIONS is spec.PRECISIONS
    assert config.TRANSFORM_NAMES is spec.TRANSFORMS and transforms.TRANSFORMS is spec.TRANSFORMS
    assert transforms.GEOMETRIC is spec.GEOMETRIC and transforms.SIGNED is spec.SIGNED
    assert all(t in validate.TRANSFORM_TYPE_PATTERN for t in spec.TRANSFORMS)
    assert scoring.REFERENCE_METHOD_DIRS == spec.reference_method_dirs()
    from cose import training

    assert training.TrainConfig is config.TrainConfig  # one TrainConfig


def test_a_registered_method_reaches_config_scoring_and_the_report(tmp_path):
    import torch

    from cose import report, saliency

    def ones(model, images, targets, max_target, *, scale=1.0):
        return torch.full((images.shape[0], *images.shape[-2:]), scale)

    saliency.register("plugin_ones", ones, {"scale": 1.0}, display="Ones", replace=True)
    try:
        cfg = config.validate(config.from_dict({"methods": ["gradcam", "plugin_ones"], "explain": {
            "settings": {"plugin_ones": {"scale": 0.5}}}}), check_registries=False)
        assert cfg.methods == ("gradcam", "plugin_ones")
        with pytest.raises(config.ConfigError, match="plugin_ones.scale: got 'x', expected a "):
            config.validate(config.from_dict({"methods": ["plugin_ones"], "explain": {
                "settings": {"plugin_ones": {"scale": "x"}}}}), check_registries=False)
        assert report._methods(["plugin_ones", "gradcam"]) == ["gradcam", "plugin_ones"]
        assert scoring.method_display("plugin_ones") == "Ones"
    finally:
        saliency._REGISTRY.pop("plugin_ones", None)
        spec.unregister_method("plugin_ones")


# --------------------------------------------------------------------------- loading


def test_plugins_load_once_and_a_broken_one_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "gxi.py").write_text(GRAD_X_INPUT)
    (tmp_path / "plugins" / "_helper.py").write_text("raise SystemExit('never imported')")
    loaded = plugins.load(tmp_path, entry_point_group=None)
    try:
        assert [Path(p).name for p in loaded] == ["gxi.py"]
        assert plugins.load(tmp_path, entry_point_group=None) == []  # once per process
        assert "grad_x_input" in spec.methods()
        assert spec.method("grad_x_input").display == "Grad x Input"
        (tmp_path / "plugins" / "zz_broken.py").write_text("import not_a_module_anywhere\n")
        with pytest.raises(plugins.PluginError, match=r"plugin .*zz_broken.py: "
                                                      r"ModuleNotFoundError: No module named"):
            plugins.load(tmp_path, entry_point_group=None)
    finally:
        from cose import saliency

        saliency._REGISTRY.pop("grad_x_input", None)
        spec.unregister_method("grad_x_input")
        plugins._LOADED.clear()
    res = subprocess.run([str(BIN / "cose"), "explain"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 1
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("cose: error:")]
    assert len(errors) == 1 and "zz_broken.py: ModuleNotFoundError" in errors[0]
    assert "Traceback" not in res.stderr


# --------------------------------------------------------------------------- pipeline


@pytest.mark.slow
def test_plugin_method_through_dvc_repro_reuses_every_existing_shard(tiny_project, tmp_path):
    proj = tmp_path / "proj"
    shutil.copytree(tiny_project, proj, symlinks=True)
    shards = {p: p.read_bytes() for p in (proj / "outputs" / "explain").rglob("shard_*.json")}
    assert shards
    (proj / "plugins" / "grad_x_input.py").write_text(GRAD_X_INPUT)
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["methods"] = params["methods"] + ["grad_x_input"]
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    res = sh(["dvc", "repro"], proj)
    n_new = len(params["models"]) * params["explain"]["images"] // params["explain"]["shard_size"]
    done = f"resumed: {len(shards)} of {len(shards) + n_new} units already done, {n_new} to run"
    assert done in res.stderr
    for path, before in shards.items():  # not one existing shard recomputed
        assert path.read_bytes() == before, path
    summary = pd.read_csv(proj / "results" / "summary.csv")
    assert set(summary.loc[summary.saliency_method == "grad_x_input", "model"]) == set(
        params["models"])
    assert "**Grad x Input**" in (proj / "results" / "cose_table.md").read_text()
    assert "Grad x Input" in (proj / "results" / "report.html").read_text()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{proj / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("cose")
    runs = client.search_runs([exp.experiment_id],
                              filter_string="params.saliency_method = 'grad_x_input'")
    assert {r.data.tags.get("cose.stage") for r in runs} >= {"explain", "compile"}
    # editing the plugin recomputes its units only
    (proj / "plugins" / "grad_x_input.py").write_text(GRAD_X_INPUT + "\n# edited\n")
    res = sh(["dvc", "repro", "explain"], proj)
    assert done in res.stderr


@pytest.mark.slow
def test_plugin_model_and_dataset_through_dvc_repro_and_cose_evaluate(tmp_path):
    from PIL import Image

    params = tiny_params({"datasets": ["shapes"], "models": ["tiny_cnn"],
                          "methods": ["gradcam", "ig"]})
    params["train"].update({"max_train_images": None, "epochs": 8, "save_epochs": [2, 4],
                            "lr": 0.01, "batch_size": 16})
    proj = make_project(tmp_path / "proj", params)
    rng = np.random.default_rng(0)
    for split, n in (("train", 24), ("test", 8)):
        for c, color in enumerate(((220, 40, 40), (40, 200, 40), (40, 40, 220))):
            folder = proj / "raw_shapes" / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                img = (rng.random((32, 32, 3)) * 60).astype(np.uint8)
                y, x = rng.integers(4, 20, 2)
                img[y : y + 10, x : x + 10] = color
                Image.fromarray(img).save(folder / f"{i}.png")
    (proj / "plugins" / "custom.py").write_text(CUSTOM)
    (proj / "custom_models.py").write_text(CUSTOM_MODELS)
    env_path = f"{proj}:{proj / 'src'}"
    env = {**__import__("conftest").project_env(proj), "PYTHONPATH": env_path}
    sh(["cose", "data", "fetch", "shapes"], proj, env=env)
    sh(["dvc", "repro"], proj, env=env)
    summary = pd.read_csv(proj / "results" / "summary.csv")
    assert set(summary.model) == {"tiny_cnn"} and set(summary.dataset) == {"shapes"}
    assert summary["cose"].notna().all()
    assert "**Tiny CNN**" in (proj / "results" / "cose_table.md").read_text()
    metrics = json.loads((proj / "checkpoints" / "shapes" / "tiny_cnn" / "metrics.json")
                         .read_text())
    assert metrics["test_accuracy"] > 0.5
    res = sh(["cose", "evaluate", "--model", "custom_models:make", "--weights",
              "checkpoints/shapes/tiny_cnn/final.pt", "--data", "data/shapes", "--size", "32",
              "--methods", "ig", "--images", "6", "--bootstrap", "200",
              "--setting", "ig.steps=4"], proj, env=env)
    assert "| IG |" in res.stdout and "(6 test images" in res.stdout
    bad = sh(["cose", "evaluate", "--model", "custom_models:make", "--weights",
              "checkpoints/shapes/tiny_cnn/final.pt", "--data", "data/shapes",
              "--num-classes", "7"], proj, env=env, check=False)
    assert bad.returncode == 2
    assert bad.stderr.strip() == "cose: error: --num-classes 7, but data/shapes has 3 classes"


def test_readme_plugin_examples_run_as_written(tmp_path):
    """README's plugin block: each python fence is the file its first line names; the bash
    fence runs in that folder, with my_images/<class>/*.png."""
    import re

    from PIL import Image

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = text.split("<!-- cose-plugin-example:start -->", 1)[1].split(
        "<!-- cose-plugin-example:end -->", 1)[0]
    fences = re.findall(r"```python\n(.*?)```", block, re.S)
    assert len(fences) == 3
    for code in fences:
        target = re.match(r"# (plugins/\w+\.py)", code).group(1)
        (tmp_path / target).parent.mkdir(exist_ok=True)
        (tmp_path / target).write_text(code)
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (tmp_path / "my_images" / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray((rng.random((40, 40, 3)) * 255).astype(np.uint8)).save(
                tmp_path / "my_images" / c / f"{i}.png")
    shell = re.search(r"```bash\n(.*?)```", block, re.S).group(1)
    env = {**__import__("os").environ, "CI": "true", "COSE_DEVICE": "cpu",
           "PATH": f"{BIN}:{__import__('os').environ['PATH']}"}
    for line in shell.strip().splitlines():
        cmd = line.split("#")[0].strip()
        res = subprocess.run(cmd, shell=True, cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=600)
        assert res.returncode == 0, (cmd, res.stderr[-3000:])
    assert "| Grad x Input |" in res.stdout and "| GradCAM |" in res.stdout
    assert (tmp_path / "data" / "my_images" / "manifest.csv").exists()


def test_the_spec_holds_the_registries_names():
    """config checks dataset and model names against the spec (it imports no registry): the
    spec's built-ins are the registries' own, in their order, and a registration reaches it."""
    import cose.data as D
    import cose.models as M

    assert spec.BUILTIN_DATASETS == tuple(D.sources.SOURCES)[: len(spec.BUILTIN_DATASETS)]
    assert spec.BUILTIN_MODELS == tuple(M.REGISTRY)[: len(spec.BUILTIN_MODELS)]
    assert set(spec.datasets()) == set(D.names()) and set(spec.models()) == set(M.names())
    assert not {n for n, _ in __import__("inspect").getmembers(config)} & {"data", "models"}
    with pytest.raises(config.ConfigError, match="models: unknown value 'tiny_x'"):
        config.validate(config.from_dict({"models": ["tiny_x"]}))
    M.register("tiny_x", lambda n: __import__("torch").nn.Linear(3, n), preprocess=8,
               replace=True)
    D.register("shapes_x", "/nonexistent", replace=True)
    try:
        cfg = config.validate(config.from_dict({"models": ["tiny_x"], "datasets": ["shapes_x"]}))
        assert cfg.models == ("tiny_x",) and cfg.datasets == ("shapes_x",)
    finally:
        M.REGISTRY.pop("tiny_x")
        D.sources.SOURCES.pop("shapes_x")
        spec._MODEL_NAMES.pop("tiny_x")
        spec._DATASETS.pop("shapes_x")
