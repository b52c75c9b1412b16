"""params.yaml parsing, overrides and the one-line errors for bad values."""

from pathlib import Path

import pytest
import yaml

from cose import config
from cose.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def load(overrides=(), registries=False):
    return config.load(ROOT / "params.yaml", list(overrides), check_registries=registries)


def test_project_params_load_and_validate_against_registries():
    cfg = load(registries=True)
    assert cfg.methods == config.METHODS
    assert len(cfg.train.save_epochs) >= 3
    assert set(cfg.explain.transforms) == set(config.TRANSFORM_NAMES)
    assert {"resnet", "vit", "convnext", "swin"} == {m.split("_")[1] for m in cfg.models}


def test_overrides_use_dotted_keys_and_yaml_values():
    cfg = load(["explain.images=3", "train.save_epochs=[1,2]", "explain.settings.ig.steps=5",
                "tracking.required=true", "train.lr=1e-3"])
    assert cfg.explain.images == 3
    assert cfg.train.save_epochs == (1, 2)
    assert cfg.explain.settings["ig"] == {"steps": 5}
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    lime = raw["explain"]["settings"]["lime"]["samples"]
    assert cfg.explain.settings["lime"]["samples"] == lime  # untouched siblings survive
    assert cfg.tracking.required is True
    assert cfg.train.lr == pytest.approx(1e-3)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.epoch=3", "-S train.epoch: unknown key; allowed: train.amp, train.augment"),
        ("nosuch=1", "-S nosuch: unknown key"),
        ("train.epochs=abc", "train.epochs: got 'abc', expected an integer"),
        ("train.epochs=0", "train.epochs: got 0, expected > 0"),
        ("train.lr=-1", "train.lr: got -1.0, expected > 0"),
        ("train.save_epochs=[19]", "train.save_epochs: epoch 19 outside 1..7"),
        ("train.head=conv", "train.head: got 'conv'; allowed: linear, mlp"),
        ("methods=[gradcam,shap]", "methods: unknown value 'shap'; allowed: gradcam"),
        ("methods=[]", "methods: empty list"),
        ("methods=gradcam", "methods: got 'gradcam', expected a list"),
        ("explain.transforms=[Rotate,Zoom]", "explain.transforms: unknown value 'Zoom'"),
        ("explain.magnitudes=61", "explain.magnitudes: got 61, expected 1..60"),
        ("explain.random_model=maybe", "explain.random_model: got 'maybe', expected true or false"),
        ("explain.settings.shap.steps=1", "explain.settings.shap: unknown method"),
        ("explain.images_by_method.shap=1", "explain.images_by_method.shap: unknown method"),
        ("explain.images_by_method.lime=11",
         "explain.images_by_method.lime: got 11, expected an integer in 1..explain.images (10)"),
        ("explain.images_by_method.lime=0", "explain.images_by_method.lime: got 0, expected"),
        ("explain.images_by_method.lime=two", "explain.images_by_method.lime: got 'two'"),
        ("explain.images_by_method=5", "explain.images_by_method: got 5, expected a mapping"),
        ("explain.images.lime=5", "-S explain.images.lime: unknown key"),
        ("noequals", "expected KEY=VALUE"),
    ],
)
def test_bad_values_name_key_value_and_allowed(override, needle):
    with pytest.raises(ConfigError) as err:
        load([override])
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_images_by_method_gives_some_methods_the_first_n_images():
    cfg = load(["explain.images_by_method.lime=2", "explain.images_by_method.guided_ig=6"])
    assert cfg.explain.images_by_method == {"lime": 2, "guided_ig": 6}
    assert [cfg.explain.images_for(m) for m in ("lime", "guided_ig", "ig")] == [
        2, 6, cfg.explain.images]
    # every mapping param takes dotted keys below it
    cfg = load(["train.weights.demo_resnet=/tmp/w.pth"], registries=True)
    assert cfg.train.weights == {"demo_resnet": "/tmp/w.pth"}


@pytest.mark.parametrize("preset", sorted((ROOT / "params" / "paper").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_paper_presets_explain_the_papers_image_counts(preset):
    """REFERENCE.md step 1: 500 images for GradCAM, GradCAM++ and IG, the first 50 for the
    other four methods."""
    cfg = config.load(preset, check_registries=False)
    assert {m: cfg.explain.images_for(m) for m in cfg.methods} == {
        "gradcam": 500, "gradcampp": 500, "ig": 500,
        "smoothgrad": 50, "blur_ig": 50, "guided_ig": 50, "lime": 50}


def test_unknown_dataset_model_and_setting_checked_against_registries():
    with pytest.raises(ConfigError, match="datasets: unknown value 'mnist'; allowed: .*digits"):
        load(["datasets=[mnist]"], registries=True)
    with pytest.raises(ConfigError, match="models: unknown value 'alexnet'"):
        load(["models=[alexnet]"], registries=True)
    with pytest.raises(ConfigError, match=r"explain.settings.ig.stepz: unknown setting; allowed: .*steps"):
        load(["explain.settings.ig.stepz=3"], registries=True)


def test_unknown_key_in_file_and_missing_file(tmp_path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["train"]["epochz"] = 3
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="train.epochz: unknown key"):
        config.load(p, check_registries=False)
    with pytest.raises(ConfigError, match="not found"):
        config.load(tmp_path / "nope.yaml")


def test_section_hash_is_stable_and_sensitive():
    a, b = load(), load(["explain.images=2"])
    assert a.section_hash("explain") == load().section_hash("explain")
    assert a.section_hash("explain") != b.section_hash("explain")
    assert a.section_hash("train") == b.section_hash("train")


def test_recipe_checks_and_weights_mapping():
    with pytest.raises(ConfigError, match="train.optimizer: got 'rmsprop'"):
        load(["train.optimizer=rmsprop"], registries=True)
    with pytest.raises(ConfigError, match="train.weights.resnet50: not in models"):
        load(["train.weights={resnet50: hub}"], registries=True)
    cfg = load(["train.weights={demo_resnet: /tmp/w.pth}"], registries=True)
    assert cfg.train.weights == {"demo_resnet": "/tmp/w.pth"}
