"""cose.evaluate: the explain stage's work unit on your own model, without DVC or MLflow;
`cose evaluate`; and the README's example, run as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

import cose
from cose import scoring
from cose.engine import explain_unit

ROOT = Path(__file__).resolve().parent.parent
MARK_START = "<!-- cose-api-example:start -->"
MARK_END = "<!-- cose-api-example:end -->"


class TinyNet(nn.Module):
    """A classifier outside the model registry (CAM methods need its layer)."""

    def __init__(self, seed: int = 0, classes: int = 3):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(6, classes)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x):
        return self.fc(self.drop(torch.relu(self.conv(x)).mean((2, 3))))


def _images(n=5, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g)


@pytest.fixture
def setup():
    model = TinyNet(0)
    x = _images()
    with torch.no_grad():
        labels = model.eval()(x).argmax(1)  # correct originals: every row is scored
    labels[4] = (labels[4] + 1) % 3  # one misclassified image
    return model, x, labels


TF = ["Rotate", "FlipLR", "Brightness"]


def test_evaluate_is_the_explain_unit_per_method(setup):
    model, x, labels = setup
    random_model, ckpt = TinyNet(1).eval(), TinyNet(2)  # ckpt in train mode, as built
    model.train()  # modes are set to eval for the run and restored
    settings = {"gradcam": {"layer": model.conv}}
    res = cose.evaluate(model, x, labels, methods=["gradcam", "ig"], transforms=TF,
                        normalize=None, random_model=random_model, checkpoints={"e001": ckpt},
                        magnitudes=2, seed=3, settings=settings, batch_size=7, chunk_size=2,
                        progress=False, dataset="toy", model_name="tiny")
    assert model.training and ckpt.training and not random_model.training
    pairs = res.pairs
    assert list(pairs.columns) == list(scoring.PAIR_COLUMNS)
    per_image = 2 * 2 + 1 + 1 + 1  # Rotate, Brightness x2; FlipLR; random; mid_ckpt_e001
    assert len(pairs) == 2 * len(x) * per_image
    assert set(pairs.transform_type) == set(TF) | {"random", "mid_ckpt_e001"}
    assert set(pairs.dataset) == {"toy"} and set(pairs.model) == {"tiny"}

    # the same numbers as one explain work unit over all images (chunking changes nothing)
    for method in ("gradcam", "ig"):
        unit = explain_unit(model.eval(), x, labels, list(range(len(x))), method, lambda t: t,
                            transforms=tuple(TF), magnitudes=2, seed=3,
                            random_model=random_model, checkpoints={"mid_ckpt_e001": ckpt.eval()},
                            settings={"layer": "conv"} if method == "gradcam" else {},
                            batch_size=7).pairs
        got = pairs[pairs.saliency_method == method].drop(
            columns=["dataset", "model", "saliency_method"])
        key = ["transform_type", "test_idx", "transform_magnitude"]
        pd.testing.assert_frame_equal(got.sort_values(key).reset_index(drop=True),
                                      unit.sort_values(key).reset_index(drop=True)[got.columns])

    pd.testing.assert_frame_equal(res.table(), scoring.summarize(pairs))
    table = res.table()
    assert list(table.saliency_method) == ["gradcam", "ig"]
    assert (table.n_misclassified == per_image).all()  # image 4's rows dropped
    fig = res.plot()
    bars = [p.get_height() for p in fig.axes[0].patches if p.get_gid() == "bars:cose"]
    assert bars == pytest.approx(list(table.cose))
    assert res.plot("samples").axes and res.plot("magnitude").axes
    assert res.plot("consistency").axes
    assert set(res.samples) == {"gradcam", "ig"}
    assert res.samples["ig"]["map"].shape == (2, 16, 16)


def test_evaluate_normalize_options_reach_the_model(setup):
    model, x, labels = setup
    seen = []

    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, t):
            seen.append(float(t.detach().mean()))
            return self.inner(t)

    spy = Spy()
    common = dict(methods="gradcam", transforms=["FlipLR"], magnitudes=1, progress=False,
                  settings={"gradcam": {"layer": model.conv}})
    # the first call: the input check's probe on the first image; the second: the unit's
    cose.evaluate(spy, x[:2], labels[:2], normalize=(0.5, 0.25), **common)
    assert seen[0] == pytest.approx(float(((x[:1] - 0.5) / 0.25).mean()), rel=1e-5)
    assert seen[1] == pytest.approx(float(((x[:2] - 0.5) / 0.25).mean()), rel=1e-5)
    seen.clear()
    cose.evaluate(spy, x[:2], labels[:2], normalize=lambda t: t * 2, **common)
    assert seen[1] == pytest.approx(float((x[:2] * 2).mean()), rel=1e-5)
    seen.clear()
    cose.evaluate(spy, x[:2], labels[:2], **common)  # default: ImageNet mean/std
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    assert seen[1] == pytest.approx(float(((x[:2] - mean) / std).mean()), rel=1e-5)


@pytest.mark.parametrize("kwargs, needle", [
    ({"images": torch.rand(2, 3, 8, 8) * 255}, "in [0,1]"),
    ({"images": torch.rand(3, 8, 8)}, "[N,C,H,W]"),
    ({"labels": torch.tensor([0])}, "labels: expected 2 integer labels"),
    ({"methods": ["shap"]}, "methods: unknown value(s) ['shap']; allowed: gradcam"),
    ({"transforms": ["Zoom"]}, "transforms: unknown value(s) ['Zoom']; allowed: TranslateX"),
    ({"settings": {"ig": {"steps": 3}}}, "settings: ['ig'] are not among the methods"),
    ({"checkpoints": {"epoch-1": TinyNet()}}, "checkpoints: name 'epoch-1'"),
    ({"normalize": "cifar"}, "normalize: unknown value 'cifar'"),
    ({"magnitudes": 0}, "magnitudes: expected an integer >= 1"),
    ({"ids": [3, 3]}, "ids: expected 2 distinct integers"),
    # the model's own class count, dimensions and outputs
    ({"labels": torch.tensor([0, 3])}, "labels: 3 (image 1) outside 0..2: the model has 3"),
    ({"labels": torch.tensor([-1, 0])}, "labels: -1 (image 0) outside 0..2"),
    ({"images": torch.rand(2, 1, 8, 8)}, "images: 1 channel(s), but normalize turns"),
    ({"images": torch.rand(2, 1, 8, 8), "normalize": None},
     "model: does not take images of shape (1, 8, 8)"),
    ({"random_model": TinyNet(classes=7)}, "random_model: 7 outputs, the model 3"),
])
def test_evaluate_bad_input_names_the_argument(kwargs, needle):
    args = {"images": torch.rand(2, 3, 8, 8), "labels": torch.tensor([0, 1]),
            "methods": "gradcam", "progress": False, **kwargs}
    with pytest.raises(ValueError) as err:
        cose.evaluate(TinyNet(), **args)
    assert needle in str(err.value)


class _NaNLogits(TinyNet):
    def forward(self, x):
        return super().forward(x) * float("nan")


class _Flat(TinyNet):
    def forward(self, x):
        return super().forward(x).flatten()


@pytest.mark.parametrize("model, needle", [
    (_NaNLogits(), "model: NaN or infinite logits on image 0"),
    (_Flat(), "model: output (3,) for one image; expected logits [B, classes]"),
])
def test_evaluate_checks_the_model_output(model, needle):
    with pytest.raises(ValueError) as err:
        cose.evaluate(model, torch.rand(2, 3, 8, 8), torch.tensor([0, 1]), methods="gradcam",
                      progress=False)
    assert needle in str(err.value)


def test_intervals_and_comparisons_from_the_api(setup):
    model, x, labels = setup
    res = cose.evaluate(model, x, labels, methods=["gradcam", "ig"], transforms=TF,
                        magnitudes=2, progress=False, random_model=TinyNet(1),
                        settings={"gradcam": {"layer": model.conv}, "ig": {"steps": 4}})
    table = res.intervals(bootstrap=200)
    assert {"cose_lo", "cose_hi", "n_images", "nan_share"} <= set(table.columns)
    assert (table["n_images"] == 5).all()
    pd.testing.assert_frame_equal(table[res.table().columns], res.table())
    comp = res.compare(bootstrap=200)
    assert list(comp[["method_a", "method_b"]].iloc[0]) == ["gradcam", "ig"]


def test_import_cose_stays_light():
    code = ("import sys, cose; heavy = [m for m in ('torch', 'pandas', 'matplotlib') "
            "if m in sys.modules]; assert not heavy, heavy; "
            "assert callable(cose.evaluate) and 'torch' in sys.modules; "
            "from cose import Evaluation; print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


# --------------------------------------------------------------------------- folders + CLI


def _image_folder(root: Path, layout: str) -> Path:
    rng = np.random.default_rng(0)
    for i, cls in enumerate(["cat", "dog", "emu"] * 2):
        folder = root / ("test" if layout == "split" else "") / cls
        folder.mkdir(parents=True, exist_ok=True)
        arr = (rng.random((20, 24, 3)) * 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"{i}.png")
    if layout == "split":
        (root / "train" / "bee").mkdir(parents=True)  # a class only in train still counts
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "train" / "bee" / "0.png")
    return root


def test_load_folder_layouts(tmp_path):
    import cose.api  # noqa: F401 - cose.api is an attribute of cose once imported (alone too)
    from cose import data, models

    spec = models.preprocess("demo_resnet")
    x, y, ids, classes = cose.api.load_folder(_image_folder(tmp_path / "flat", "flat"), spec)
    assert x.shape == (6, 3, 32, 32) and classes == ["cat", "dog", "emu"]
    assert y.tolist() == [0, 0, 1, 1, 2, 2] and ids == list(range(6))
    assert 0 <= float(x.min()) and float(x.max()) <= 1
    x, y, ids, classes = cose.api.load_folder(_image_folder(tmp_path / "split", "split"), spec,
                                              images=4, seed=1)
    assert classes == ["bee", "cat", "dog", "emu"] and len(ids) == 4 and set(y.tolist()) <= {1, 2, 3}
    with pytest.raises(ValueError, match="no 'val' folder"):
        cose.api.load_folder(tmp_path / "split", spec, split="val")
    folder = data.fetch("digits", root=tmp_path / "data")
    x, y, ids, _ = cose.api.load_folder(folder, spec, images=3)
    ref_x, ref_y = data.load_split("digits", tmp_path / "data", "test", spec)
    assert torch.equal(x, ref_x[ids]) and torch.equal(y, ref_y[ids])


def test_cli_evaluate_prints_the_table_and_writes_a_report(tmp_path, capsys, monkeypatch):
    from cose import cli, models, training

    monkeypatch.setenv("CI", "true")
    monkeypatch.setenv("COSE_DEVICE", "cpu")
    folder = _image_folder(tmp_path / "imgs", "flat")
    model = models.create("demo_resnet", 3, seed=0)
    weights = tmp_path / "final.pt"
    training.save_weights(model, weights)
    training.save_weights(models.create("demo_resnet", 3, seed=5), tmp_path / "epoch_002.pt")
    code = cli.main(["evaluate", "--model", "demo_resnet", "--weights", str(weights),
                     "--data", str(folder), "--methods", "gradcam,gradcampp", "--images", "4",
                     "--transforms", "Rotate,FlipLR", "--magnitudes", "1",
                     "--checkpoint", str(tmp_path / "epoch_002.pt"),
                     "--out", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "| method | consistency | sensitivity | COSE |" in out
    assert re.search(r"^\| GradCAM \| ", out, re.M) and re.search(r"^\| GradCAM\+\+ \| ", out, re.M)
    assert "(4 test images, accuracy" in out
    pairs = pd.read_parquet(tmp_path / "out" / "pairs.parquet")
    assert set(pairs.transform_type) == {"Rotate", "FlipLR", "random", "mid_ckpt_e002"}
    assert len(pairs) == 2 * 4 * 4
    assert (tmp_path / "out" / "report.html").exists()
    assert "it/s" not in err and "%|" not in err  # no progress bar under CI

    code = cli.main(["evaluate", "--model", "alexnet", "--weights", str(weights),
                     "--data", str(folder)])
    _, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1 and "--model: unknown value 'alexnet'" in err

    # --precision: an explicit precision nobody validated says so; the pairs are the same
    # (predictions stay fp32); an unknown one is refused by the parser
    with pytest.warns(UserWarning, match="precision reference: not validated for gradcam"):
        code = cli.main(["evaluate", "--model", "demo_resnet", "--weights", str(weights),
                         "--data", str(folder), "--methods", "gradcam", "--images", "4",
                         "--transforms", "Rotate,FlipLR", "--magnitudes", "1", "--precision",
                         "reference", "--checkpoint", str(tmp_path / "epoch_002.pt"),
                         "--out", str(tmp_path / "ref")])
    assert code == 0
    ref = pd.read_parquet(tmp_path / "ref" / "pairs.parquet")
    assert ref.equals(pairs[pairs.saliency_method == "gradcam"].reset_index(drop=True))
    with pytest.raises(SystemExit):
        cli.main(["evaluate", "--model", "demo_resnet", "--data", str(folder),
                  "--precision", "fp16"])
    assert "invalid choice: 'fp16'" in capsys.readouterr().err


# --------------------------------------------------------------------------- README example


def example_source() -> tuple[Path, str]:
    """The example block of README.md once it holds one, else of docs/report.md."""
    readme = ROOT / "README.md"
    text = readme.read_text()
    if MARK_START in text:
        return readme, text
    return ROOT / "docs" / "report.md", (ROOT / "docs" / "report.md").read_text()


def example_blocks() -> tuple[str, str]:
    path, text = example_source()
    block = text.split(MARK_START, 1)[1].split(MARK_END, 1)[0]
    python = re.search(r"```python\n(.*?)```", block, re.S)
    shell = re.search(r"```bash\n(.*?)```", block, re.S)
    assert python and shell, f"{path}: the example block needs a python and a bash fence"
    return python.group(1), shell.group(1)


def test_example_block_is_where_the_test_looks():
    python, shell = example_blocks()
    assert "cose.evaluate(" in python and ".table()" in python and ".plot()" in python
    assert "cose evaluate --model" in shell


@pytest.mark.slow
def test_readme_example_runs(tiny_project, tmp_path):
    """After the pipeline (data and checkpoints exist), the README's Python and CLI examples
    run as written, in a fresh folder that links to the project's data and checkpoints."""
    from conftest import project_env

    python, shell = example_blocks()
    work = tmp_path / "work"
    work.mkdir()
    for name in ("data", "checkpoints"):
        (work / name).symlink_to(tiny_project / name)
    (work / "outputs").mkdir()  # as after `make demo`
    (work / "example.py").write_text(python)
    env = project_env(tiny_project)  # the project's own source, run from another folder
    res = subprocess.run([sys.executable, "example.py"], cwd=work, env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "cose" in res.stdout and "gradcam" in res.stdout
    pngs = list((work / "outputs").glob("*.png"))
    assert pngs and all(p.read_bytes().startswith(b"\x89PNG") for p in pngs)
    assert not list(work.glob("*.png"))  # nothing for `git add -A` to pick up
    ignored = subprocess.run(["git", "check-ignore", "-q", "outputs/cose_scores.png"], cwd=ROOT)
    assert ignored.returncode == 0
    cmd = shell.replace("\\\n", " ").strip()
    res = subprocess.run(cmd, shell=True, cwd=work, env=env, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "| GradCAM |" in res.stdout
