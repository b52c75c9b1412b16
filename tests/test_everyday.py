"""The everyday flows as a new user meets them (issue #28): the MLflow UI showing COSE at first
sight (driven in headless Chromium), `cose evaluate` saying why a value is n/a, one exit code
for bad input, the usage of the command typed, `make exp` without an install.
(`dvc pull` in a teammate's clone and `dvc exp run -S` changing one line: test_sharing.py.)"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import BIN, ROOT, project_env

from cose.cli import main, na_reasons


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- the MLflow UI


def _healthy(port: int) -> bool:
    import http.client

    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        conn.request("GET", "/health")
        return conn.getresponse().status == 200
    except OSError:
        return False


@pytest.mark.slow
def test_mlflow_ui_shows_cose_at_first_sight(tiny_project, tmp_path):
    """`cose ui` on the reproduced tiny project: the page it prints opens, in a real browser, on
    the runs table in model-training mode, one row per compiled cell named after it, with
    COSE and its interval as columns (the values the compile stage logged)."""
    from test_report import chromium

    exe = chromium()
    if exe is None:
        pytest.skip("no chromium binary (apt-get install -y chromium)")
    from mlflow.tracking import MlflowClient

    work = tmp_path / "ui"
    work.mkdir()
    shutil.copytree(tiny_project / "mlruns", work / "mlruns")
    shutil.copy(tiny_project / "params.yaml", work / "params.yaml")
    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("cose")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    cells = client.search_runs([exp.experiment_id], "metrics.cose >= 0")
    scored = json.loads((tiny_project / "results" / "metrics.json").read_text())["digits"]
    expected = {f"cose digits/{model}/{method}" for model, per in scored.items()
                for method, v in per.items() if isinstance(v, dict) and v.get("cose") is not None}
    assert expected and {r.info.run_name for r in cells} == expected
    port = _free_port()
    env = {**project_env(tiny_project), "COSE_PROJECT_ROOT": str(work)}
    log = (tmp_path / "ui.log").open("w")
    proc = subprocess.Popen([str(BIN / "cose"), "ui", "--port", str(port)], cwd=work, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not _healthy(port):
            assert proc.poll() is None and time.monotonic() < deadline, \
                (tmp_path / "ui.log").read_text()[-3000:]
            time.sleep(0.5)
        printed = (tmp_path / "ui.log").read_text().splitlines()
        url = next(ln.split(": ", 1)[1] for ln in printed if ln.startswith("COSE per cell"))
        assert url.startswith(f"http://127.0.0.1:{port}/#/experiments/{exp.experiment_id}/runs")
        dom = subprocess.run(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1600,1600",
             "--virtual-time-budget=20000", "--dump-dom", url],
            capture_output=True, text=True, timeout=180).stdout
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()
    assert "Send your first trace" not in dom  # not the GenAI landing page
    for run in cells:
        assert run.info.run_name in dom, run.info.run_name  # "cose digits/demo_vit/ig"
        assert repr(run.data.metrics["cose"])[:7] in dom, run.info.run_name
        for metric in ("cose_lo", "cose_hi"):  # where an interval could be drawn
            if metric in run.data.metrics:
                assert repr(run.data.metrics[metric])[:7] in dom, (run.info.run_name, metric)
    # (the tiny project's cells score one image each: no interval to show; the demo's have)


# --------------------------------------------------------------------------- cose evaluate


def test_na_reasons_name_the_cause():
    nan = float("nan")
    row = {"n_pairs": 40, "n_misclassified": 40, "overall_consistency": nan,
           "sensitivity": nan, "cose": nan, "cose_lo": nan, "cose_hi": nan, "n_images": 0}
    [(what, why)] = na_reasons(row)
    assert what == "every value" and "misclassified" in why and "--weights" in why
    row.update(n_misclassified=0, overall_consistency=0.8, n_images=2)
    reasons = dict(na_reasons(row))
    assert "no variant" in reasons["sensitivity"] and "changed the prediction" in \
        reasons["sensitivity"]
    row.update(sensitivity=0.5, cose=0.6, n_images=1)
    assert dict(na_reasons(row))["the COSE interval"].startswith("1 image(s) scored")
    assert na_reasons(row, bootstrap=0) == []
    row.update(cose_lo=0.5, cose_hi=0.7, n_images=5)
    assert na_reasons(row) == []


def _folder_all_one_class(base: Path) -> Path:
    """train/{a,b}/*.png and test/b/*.png: every test label is 1."""
    from PIL import Image

    for split, cls in (("train", "a"), ("train", "b"), ("test", "b")):
        (base / split / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (16, 16), (30 * i, 90, 200)).save(base / split / cls / f"{i}.png")
    return base


def test_evaluate_stops_early_when_no_image_is_right(tmp_path, monkeypatch, capsys):
    (tmp_path / "always0.py").write_text(
        "import torch\n"
        "class M(torch.nn.Module):\n"
        "    def __init__(self, n):\n"
        "        super().__init__(); self.n = n; self.w = torch.nn.Parameter(torch.ones(1))\n"
        "    def forward(self, x):\n"
        "        out = torch.zeros(len(x), self.n); out[:, 0] = 10 * self.w; return out\n"
        "def make(num_classes):\n"
        "    return M(num_classes)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COSE_DEVICE", "cpu")
    data = _folder_all_one_class(tmp_path / "imgs")
    started = time.monotonic()
    rc = main(["--quiet", "evaluate", "--model", "always0:make", "--data", str(data),
               "--methods", "gradcam,ig", "--images", "3", "--size", "16"])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "gets none of the 3 test images right" in err and "--weights" in err
    assert time.monotonic() - started < 60  # before any map


@pytest.mark.parametrize("argv, needle", [
    (["--methods", "nope"], "unknown saliency method 'nope'"),
    (["--methods", "ig", "--setting", "ig.stepz=3"], "ig: unknown setting(s) stepz"),
    (["--methods", "ig", "--setting", "gradcam.layer=x"], "'gradcam' is not among --methods"),
    (["--transforms", "Spin"], "--transforms: unknown value 'Spin'"),
    (["--magnitudes", "0"], "--magnitudes: got 0, expected >= 1"),
    (["--weights", "no-such.pt"], "no-such.pt"),
    (["--data", "no-such-folder"], "no-such-folder"),
])
def test_evaluate_bad_input_exits_2_like_every_command(tmp_path, monkeypatch, capsys, argv,
                                                       needle):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COSE_DEVICE", "cpu")
    data = _folder_all_one_class(tmp_path / "imgs")
    base = ["evaluate", "--model", "demo_resnet", "--data", str(data)]
    rc = main([*base, *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("cose: error: ") and needle in err[-1], err
    with pytest.raises(SystemExit) as exc:  # argparse's own refusals: 2 as well
        main(["evaluate", "--model", "demo_resnet", "--data", str(data), "--images", "x"])
    assert exc.value.code == 2


def test_evaluate_hub_weights_say_where_they_cannot_come_from(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COSE_DEVICE", "cpu")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub unreachable, also on an online machine
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)  # read at its import
    data = _folder_all_one_class(tmp_path / "imgs")
    rc = main(["evaluate", "--model", "demo_resnet", "--weights", "hub", "--data", str(data)])
    assert rc == 2 and "demo_resnet has no timm hub tag" in capsys.readouterr().err
    rc = main(["evaluate", "--model", "resnet18", "--weights", "hub", "--data", str(data),
               "--size", "32"])
    last = capsys.readouterr().err.strip().splitlines()[-1]  # one line, no traceback of ours
    assert rc == 1 and last.startswith(
        "cose: error: --weights hub: could not load timm hub weights 'resnet18'"), last
    assert last.endswith("--weights FILE")


# --------------------------------------------------------------------------- smaller traps


def test_unknown_option_shows_the_usage_of_the_command_typed(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--foo"])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert err.startswith("usage: cose train") and "unrecognized arguments: --foo" in err
    with pytest.raises(SystemExit):
        main(["data", "fetch", "digits", "--bar"])
    assert capsys.readouterr().err.startswith("usage: cose data fetch")


def test_ui_and_evaluate_options_have_help():
    from cose.cli import build_parser

    text = subprocess.run([str(BIN / "cose"), "ui", "--help"], capture_output=True,
                          text=True).stdout
    assert "--port PORT  port of the UI" in " ".join(text.split()) or "port of the UI" in text
    assert "address to listen on" in text
    parser = build_parser()
    ev = next(a for a in parser._actions if a.dest == "command").choices["evaluate"]
    mag = next(a for a in ev._actions if a.dest == "magnitudes")
    assert "the demo's params.yaml lowers explain.magnitudes to 3" in mag.help


def test_cose_ui_finds_mlflow_without_an_activated_venv(tmp_path):
    """`cose ui` runs mlflow with its own interpreter: no `[Errno 2]` when mlflow is not on
    PATH (a venv used without activating it)."""
    env = {"PATH": "/usr/bin:/bin", "COSE_PROJECT_ROOT": str(tmp_path), "HOME": str(tmp_path)}
    proc = subprocess.Popen([str(BIN / "cose"), "ui", "--port", str(_free_port())],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        lines = [proc.stdout.readline() for _ in range(6)]
        assert any(ln.startswith("MLflow UI: http://127.0.0.1:") for ln in lines), lines
        time.sleep(3)
        assert proc.poll() is None, proc.stdout.read()[-2000:]  # mlflow is serving
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_make_exp_needs_no_install(tmp_path):
    """`make exp` in a fresh clone: no venv is built; without dvc it says what to install."""
    clone = tmp_path / "clone"
    clone.mkdir()
    shutil.copy(ROOT / "Makefile", clone / "Makefile")
    res = subprocess.run(["make", "-n", "exp"], cwd=clone, capture_output=True, text=True)
    assert "-m pip install" not in res.stdout and "-m venv" not in res.stdout, res.stdout
    res = subprocess.run(["make", "exp"], cwd=clone, capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin"})
    assert res.returncode != 0 and "make exp needs dvc" in res.stderr
    assert not (clone / ".venv").exists()


def test_plugins_readme_shows_the_readmes_registration():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- cose-plugin-example:start -->", 1)[1]
    first = block[block.index("```python"):block.index("```\n", block.index("```python") + 9)]
    assert first in (ROOT / "plugins" / "README.md").read_text()


def test_compile_prints_the_table_once_under_make_demo(monkeypatch):
    """`make demo` prints results/cose_table.md after `dvc repro`; compile run by DVC does not
    print it too (by hand, `cose compile` does)."""
    import cose.cli as cli

    text = Path(cli.__file__).read_text()
    assert 'if not os.environ.get("DVC_STAGE")' in text
    assert "@cat results/cose_table.md" in (ROOT / "Makefile").read_text()
