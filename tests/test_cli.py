"""CLI errors: one clear line, non-zero exit, nothing half-written."""

from __future__ import annotations

import pytest
from conftest import make_project, sh


@pytest.fixture(scope="module")
def bare_project(tmp_path_factory):
    return make_project(tmp_path_factory.mktemp("bare") / "proj")


def test_help_documents_each_stage(bare_project):
    out = sh(["cose", "--help"], bare_project).stdout
    for cmd in ("data", "validate", "train", "explain", "compile", "log", "ui"):
        assert cmd in out
    out = sh(["cose", "explain", "--help"], bare_project).stdout
    assert "-S KEY=VALUE" in out and "--backend" in out


@pytest.mark.parametrize(
    "args, code, needle",
    [
        (["train", "-S", "models=[alexnet]"], 2, "models: unknown value 'alexnet'; allowed:"),
        (["train", "-S", "datasets=[mnist]"], 2, "datasets: unknown value 'mnist'; allowed:"),
        (["explain", "-S", "methods=[shap]"], 2, "methods: unknown value 'shap'"),
        (["explain", "-S", "explain.imgs=3"], 2, "-S explain.imgs: unknown key"),
        (["train", "-S", "train.epochs=-1"], 2, "train.epochs: got -1, expected > 0"),
        (["train", "--params", "nope.yaml"], 2, "params file 'nope.yaml' not found"),
        (["validate"], 2, "run `cose data fetch digits`"),
        (["train"], 2, "run `cose data fetch digits`"),
        (["data", "fetch", "mnist"], 2, "dataset: unknown value 'mnist'; allowed:"),
    ],
)
def test_bad_input_one_line_nonzero_exit(bare_project, args, code, needle):
    res = sh(["cose", *args], bare_project, check=False)
    assert res.returncode == code, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], res.stderr
    assert not (bare_project / "checkpoints").exists()
    assert not (bare_project / "results").exists()
