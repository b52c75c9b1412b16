"""Hostile and careless input (issue #29): names that would reach a shell, non-finite or
out-of-range numbers, data folders that leave themselves, results labelled with settings that
did not make them. Each case is refused with one line before any work, naming what is wrong."""

from __future__ import annotations

import dataclasses

import pytest
import yaml
from conftest import make_project, sh

from cose import config
from cose.cli import _matrix_item
from cose.config import ConfigError

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
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "is not a name" in out
    assert not (proj / "INJECTED").exists()
    # DVC wrote the refused value into params.yaml before any stage ran: the error says how
    # to undo it (issue #28), and that undo restores the file
    assert "git checkout -- params.yaml" in out, out
    assert "INJECTED" in (proj / "params.yaml").read_text()
    sh(["git", "checkout", "--", "params.yaml"], proj)
    assert yaml.safe_load((proj / "params.yaml").read_text()) == base


# --------------------------------------------------------------------------- data folders


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (a decompression bomb to PIL)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def _folder(base, classes=("cat", "dog"), n=3):
    from PIL import Image

    for c in classes:
        (base / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (40 * i, 100 if c == "cat" else 200, 7)).save(
                base / c / f"{i}.png")
    return base


@pytest.fixture
def registered(tmp_path, monkeypatch):
    """A registered image-folder dataset ``hard_ds`` (removed again afterwards)."""
    from cose import data, spec
    from cose.data.sources import SOURCES

    monkeypatch.chdir(tmp_path)
    src = _folder(tmp_path / "src")
    data.register("hard_ds", src, replace=True)
    yield src
    SOURCES.pop("hard_ds", None)
    spec._DATASETS.pop("hard_ds", None)


def test_symlink_out_of_the_data_folder_is_refused(registered, tmp_path):
    from cose import data
    from cose.data.validate import validate_dataset

    target = data.fetch("hard_ds", "data")
    outside = tmp_path / "secret.png"
    (target / "images" / "cat" / "0.png").rename(outside)
    (target / "images" / "cat" / "0.png").symlink_to(outside)  # same bytes: hash matches
    report = validate_dataset(target)
    assert not report.ok
    assert "file_inside_dataset_folder" in str(report) and "images/cat/0.png" in str(report)
    split = next(r["split"] for r in data.read_rows(target) if r["path"].endswith("cat/0.png"))
    with pytest.raises(ValueError, match=r"0\.png: leads outside the dataset folder .*refused"):
        data.load_split("hard_ds", "data", split, data.PreprocessSpec(8, 8))
    # a link that stays inside the folder is fine
    (target / "images" / "cat" / "0.png").unlink()
    (target / "images" / "cat" / "0.png").symlink_to((target / "images" / "cat" / "1.png")
                                                     .resolve())
    assert data.image_path(target, "images/cat/0.png").is_file()


def test_symlink_and_empty_class_in_an_image_folder_are_refused(registered, tmp_path):
    from cose import data

    (registered / "cat" / "link.png").symlink_to("/etc/hostname")
    with pytest.raises(ValueError, match=r"link\.png: a symbolic link out of the image folder"):
        data.fetch("hard_ds", "data")
    (registered / "cat" / "link.png").unlink()
    (registered / "bird").mkdir()
    with pytest.raises(ValueError, match=r"class folder\(s\) bird hold no images"):
        data.fetch("hard_ds", "data")
    assert not (tmp_path / "data" / "hard_ds").exists()  # nothing half-built


def test_decompression_bomb_names_the_file(registered):
    from cose import data

    (registered / "dog" / "bomb.png").write_bytes(_png_header(40000, 40000))
    with pytest.raises(ValueError, match=r"dog/bomb\.png: not a readable image"):
        data.fetch("hard_ds", "data")
    with pytest.raises(ValueError, match=r"bomb\.png: cannot read the image"):
        data.open_rgb(registered / "dog" / "bomb.png")


def test_changed_source_is_detected_and_force_rebuilds(registered, tmp_path):
    import subprocess

    from conftest import BIN, project_env
    from PIL import Image

    plugin = tmp_path / "plugins"
    plugin.mkdir()
    (plugin / "ds.py").write_text(f"from cose import data\ndata.register('hard_ds', "
                                  f"{str(registered)!r})\n")
    env = {**project_env(tmp_path), "COSE_PROJECT_ROOT": str(tmp_path)}
    env.pop("PYTHONPATH")

    def fetch(*extra):
        return subprocess.run([str(BIN / "cose"), "data", "fetch", "hard_ds", *extra],
                              cwd=tmp_path, env=env, capture_output=True, text=True)

    assert fetch().returncode == 0
    assert fetch().returncode == 0  # unchanged: kept as it is
    Image.new("RGB", (8, 8), (1, 2, 3)).save(registered / "dog" / "new.png")
    Image.new("RGB", (8, 8), (9, 9, 9)).save(registered / "cat" / "1.png")
    res = fetch()
    assert res.returncode != 0
    err = res.stderr.strip().splitlines()[-1]
    assert "changed since" in err and "1 added (e.g. dog/new.png)" in err, err
    assert "1 changed (e.g. cat/1.png)" in err and "cose data fetch hard_ds --force" in err
    res = fetch("--force")
    assert res.returncode == 0, res.stderr
    assert fetch().returncode == 0
    assert (tmp_path / "data" / "hard_ds" / "images" / "dog" / "new.png").is_file()


def test_train_checks_image_hashes_against_the_manifest(tmp_path):
    from cose import data
    from cose.stages import common

    data.fetch("digits", tmp_path / "data")
    cfg = config.validate(config.from_dict({"data": {"root": str(tmp_path / "data")}}))
    assert common.check_images(cfg, "digits", ("train", "test")) == 1797
    row = next(r for r in data.read_rows(tmp_path / "data" / "digits") if r["split"] == "train")
    path = tmp_path / "data" / "digits" / row["path"]
    raw = path.read_bytes()
    path.write_bytes(raw[:-1] + bytes([raw[-1] ^ 0xFF]))
    with pytest.raises(ValueError, match=r"its bytes differ from the sha256.*"
                                         r"cose data fetch digits --force"):
        common.check_images(cfg, "digits", ("train", "test"))


def test_evaluate_folder_refuses_empty_class_and_outward_links(tmp_path):
    """`cose evaluate --data DIR` on a plain image folder holds it to the same rules as
    `cose data fetch`: no empty class folder, no symbolic link out of it."""
    from cose import api
    from cose.data import PreprocessSpec

    src = _folder(tmp_path / "imgs")
    (src / "bird").mkdir()
    with pytest.raises(ValueError, match=r"class folder\(s\) bird hold no images"):
        api.load_folder(src, PreprocessSpec(8, 8))
    (src / "bird").rmdir()
    (src / "cat" / "out.png").symlink_to("/etc/hostname")
    with pytest.raises(ValueError, match=r"out\.png: a symbolic link out of the image folder"):
        api.load_folder(src, PreprocessSpec(8, 8))
    (src / "cat" / "out.png").unlink()
    x, y, _, classes = api.load_folder(src, PreprocessSpec(8, 8))
    assert classes == ["cat", "dog"] and len(x) == 6
