"""Hostile and careless input (issue #29): names that would reach a shell, non-finite or
out-of-range numbers, data folders that leave themselves, results labelled with settings that
did not make them. Each case is refused with one line before any work, naming what is wrong."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from cose import config
from cose.cli import _matrix_item
from cose.config import ConfigError

from conftest import make_project, sh

INJECTIONS = ["digits$(touch INJECTED)", "x`touch INJECTED`", "x'; touch INJECTED; '",
              'x"; touch INJECTED; "', "../../victim", "a b", "-rf", "x\ntouch INJECTED"]


def _load(*overrides: str) -> config.Config:
    return config.load("params.yaml", list(overrides))


@pytest.mark.parametrize("name", INJECTIONS)
@pytest.mark.parametrize("key", ["datasets", "models", "methods"])
def test_names_are_identifiers(key, name):
    with pytest.raises(ConfigError, match=rf"^{key}: .* is not a name"):
        config.validate(config.from_dict({key: [name]}), check_registries=False)
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        _load(f"{key}={yaml.safe_dump([name], default_flow_style=True).strip()}")


@pytest.mark.parametrize("override, needle", [
    ("train.lr=.inf", "train.lr: got inf, expected a finite number"),
    ("train.weight_decay=inf", "train.weight_decay: got inf, expected a finite number"),
    ("train.grad_clip=.nan", "train.grad_clip: got nan, expected a finite number"),
    ("tracking.backoff_s=nan", "tracking.backoff_s: got nan, expected a finite number"),
    ("tracking.backoff_s=.inf", "tracking.backoff_s: got inf, expected a finite number"),
    ("tracking.backoff_s=1e6", "tracking.backoff_s: got 1000000.0, expected 0..600.0"),
    ("tracking.retries=1000", "tracking.retries: got 1000, expected 0..20"),
    ("explain.seed=100000000000000000000000", "explain.seed: got 100000000000000000000000"),
    ("explain.seed=4294967296", "explain.seed: got 4294967296, expected 0..4294967295"),
    ("seed=-1", "seed: got -1, expected 0..4294967295"),
    ("train.lr=1e400", "train.lr: got inf, expected a finite number"),
    ("train.per_model={demo_resnet: {lr: .nan}}", "train.per_model.demo_resnet.lr: got nan"),
    ("explain.settings.lime.seed=-1", "explain.settings.lime.seed: got -1"),
    ("explain.settings.lime.seed=99999999999", "explain.settings.lime.seed: got 99999999999"),
    ("explain.settings.smoothgrad.noise=.inf", "explain.settings.smoothgrad.noise: got inf"),
    ("explain.settings.ig.steps=100000000000000000000000", "explain.settings.ig.steps: got"),
])
def test_numbers_finite_and_in_range_before_any_work(override, needle):
    with pytest.raises(ConfigError) as err:
        _load(override)
    assert str(err.value).startswith(needle), str(err.value)
    assert "\n" not in str(err.value)


def test_train_config_built_in_python_refuses_non_finite():
    with pytest.raises(ConfigError, match="train.lr: got inf, expected a finite number"):
        config.TrainConfig(lr=float("inf"))


def test_matrix_item_comes_from_dvc_stage_not_the_shell():
    cfg = _load("datasets=[digits]", "models=[demo_resnet, demo_vit]")
    one = _matrix_item(cfg, "train", "train@digits-demo_vit")
    assert (one.datasets, one.models) == (("digits",), ("demo_vit",))
    assert one == dataclasses.replace(cfg, models=("demo_vit",))
    sub = _matrix_item(cfg, "train", "pipelines/dvc.yaml:train@digits-demo_resnet")
    assert sub.models == ("demo_resnet",)
    for bad in ("", "train@digits-demo_swin", "validate@digits", "train@digits",
                "train@digits-demo_vit$(touch x)"):
        with pytest.raises(ConfigError, match="^--dvc-stage: DVC_STAGE is"):
            _matrix_item(cfg, "train", bad)


def test_dvc_yaml_commands_hold_no_param_value():
    from conftest import ROOT

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        assert "${" not in str(stage["cmd"]), f"{name}: {stage['cmd']}"
    # the stage that checks every name runs before any path built from one is touched
    assert {"datasets", "models"} <= set(stages["validate"]["params"])
    assert "matrix" not in stages["validate"]
    for name, stage in stages.items():
        if name != "validate":
            assert any(str(d).startswith("outputs/validation") or d in ("data", "checkpoints",
                                                                         "outputs/explain")
                       for d in stage["deps"]), name


@pytest.mark.slow
def test_injection_through_params_and_exp_run_never_runs(tmp_path):
    """`dvc repro` and `dvc exp run -S` with shell syntax and path escapes in the names:
    the validate stage refuses them with one line, no injected command runs, and no path
    outside the outputs is removed (DVC removes a stage's outputs before its command)."""
    proj = make_project(tmp_path / "proj")
    sh(["cose", "data", "fetch", "digits"], proj)
    (proj / "victim").mkdir()
    (proj / "victim" / "keep").write_text("x")
    sh(["dvc", "repro", "validate"], proj)  # a cached validate: a names change reruns it
    base = yaml.safe_load((proj / "params.yaml").read_text())
    for key, names in (("models", ["demo_resnet", "x$(touch INJECTED)"]),
                       ("models", ["../../victim"]),
                       ("models", ["x'; touch INJECTED; '"]),
                       ("datasets", ["digits", "y`touch INJECTED`"])):
        (proj / "params.yaml").write_text(yaml.safe_dump({**base, key: names}, sort_keys=False))
        res = sh(["dvc", "repro"], proj, check=False)
        out = res.stdout + res.stderr
        assert res.returncode != 0 and "is not a name" in out, out
        assert not (proj / "INJECTED").exists(), names
        assert (proj / "victim" / "keep").exists(), names
    (proj / "params.yaml").write_text(yaml.safe_dump(base, sort_keys=False))
    res = sh(["dvc", "exp", "run", "-S", "models=[demo_resnet,\"m$(touch INJECTED)\"]"], proj,
             check=False)
    assert res.returncode != 0 and "is not a name" in res.stdout + res.stderr
    assert not (proj / "INJECTED").exists()
