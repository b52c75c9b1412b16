"""Fault injection for the audit's numbered cases (issue: no stale or lost results).

A real project layout in a temp folder (the digits export, COSE checkpoints of a demo model
written directly), the stages run in process or through the `cose` command as a user runs them:

1. data changed under the same params (another data.root with changed images, an image
   corrupted after its shards exist): recomputed, or a one-line error naming the file;
3. a second writer of an output tree: one line naming the holder; a killed holder leaves no
   lock behind;
4. samples.npz truncated or deleted: regenerated;
5. bad per-method settings: one line before any work; another method's settings leave a
   method's shards alone;
6. images beyond the split: capped with a warning; empty params, duplicate keys: one line;
7. a truncated image, label 99, a manifest without a column, a path with '..', a truncated or
   code-running last.pt: one line naming the file (or, for last.pt, a warning and a fresh run);
9. `cose log` with a corrupt pending file: quarantined and named, the others replayed; tracking
   URIs with credentials redacted;
10. no temp files left by a rerun; outputs keep the umask's mode.
(2: tests/test_resilience.py checks dvc.yaml deps and the fingerprint against the import
closure; 8: tests/test_scoring.py checks the reference CSVs' ranges.)
"""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

import cose.data as D
import cose.models as M
from cose import config
from cose.stages import common, explain

torch.set_num_threads(2)
MODEL = "demo_resnet"
BIN = Path(sys.executable).parent


def _write_checkpoints(root: Path) -> None:
    d = root / "checkpoints" / "digits" / MODEL
    d.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(("final.pt", "random.pt", "epoch_001.pt")):
        torch.save(M.cose_checkpoint(M.create(MODEL, 10, seed=i)), d / name)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    D.fetch("digits", root)
    return root


def _params(data_root: Path, **explain_extra) -> dict:
    return {
        "datasets": ["digits"], "models": [MODEL], "methods": ["gradcam", "ig"],
        "data": {"root": str(data_root)}, "train": {"save_epochs": [1]},
        "explain": {"images": 2, "shard_size": 1, "magnitudes": 1, "sample_maps": 1,
                    "transforms": ["Rotate", "FlipLR"], "settings": {"ig": {"steps": 3}},
                    **explain_extra},
        "tracking": {"retries": 0, "backoff_s": 0.0},
    }


@pytest.fixture
def project(tmp_path, digits, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COSE_DEVICE", "cpu")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    data = tmp_path / "data"
    shutil.copytree(digits / "digits", data / "digits")
    _write_checkpoints(tmp_path)
    explain.release()
    yield tmp_path
    explain.release()


def _cfg(project: Path, data_root: Path | None = None, **extra) -> config.Config:
    return config.validate(config.from_dict(_params(data_root or project / "data", **extra)))


def _run_units(cfg) -> dict[str, bytes]:
    """What the explain stage computes, in process: the shards' bytes by unit key."""
    explain._run_units(cfg, "local")
    return {u.key: u.parquet.read_bytes() for u in explain.plan(cfg)}


def _cose(project: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    e = {**os.environ, "CI": "true", "COSE_DEVICE": "cpu", "PATH": f"{BIN}:{os.environ['PATH']}",
         **(env or {})}
    return subprocess.run([str(BIN / "cose"), *args], cwd=project, env=e, capture_output=True,
                          text=True, timeout=600)


def _one_error(res: subprocess.CompletedProcess) -> str:
    """The run's one error line (log lines may precede it; no traceback)."""
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("cose: error:")]
    assert len(errors) == 1 and "Traceback" not in res.stderr, res.stderr
    return errors[0]


def _test_rows(root: Path) -> list[dict[str, str]]:
    return [r for r in D.read_rows(root / "digits") if r["split"] == "test"]


# --------------------------------------------------------------------------- 1. data


def test_other_data_root_with_changed_images_is_recomputed(project):
    """The audit's case: the same params on a copy of the data whose test images differ (the
    manifest rewritten for them) must recompute, not report 'done' with the old numbers."""
    cfg = _cfg(project)
    first = _run_units(cfg)
    other = project / "data2"
    shutil.copytree(project / "data" / "digits", other / "digits")
    sel = common.selection(cfg, "digits", MODEL, "gradcam").test_idx
    rows = _test_rows(other)
    for i in sel:  # invert the chosen test images and record their new checksums
        path = other / "digits" / rows[i]["path"]
        from PIL import Image, ImageOps

        ImageOps.invert(Image.open(path).convert("L")).save(path)
    _rewrite_manifest(other / "digits")
    cfg2 = _cfg(project, data_root=other)
    fresh = {u.key: u for u in explain.plan(cfg2)}
    assert not any(explain.shard_ok(u) for u in fresh.values())  # nothing is "done"
    second = _run_units(cfg2)
    assert set(second) == set(first) and any(second[k] != first[k] for k in first)


def _rewrite_manifest(folder: Path) -> None:
    from cose.data.manifest import sha256_file

    text = (folder / "manifest.csv").read_text()
    rows = list(csv.DictReader(io.StringIO(text)))
    for r in rows:
        r["sha256"] = sha256_file(folder / r["path"])
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    (folder / "manifest.csv").write_text(buf.getvalue())


def test_image_corrupted_after_its_shards_is_an_error_naming_it(project):
    cfg = _cfg(project)
    _run_units(cfg)
    i = common.selection(cfg, "digits", MODEL, "gradcam").test_idx[0]
    path = project / "data" / "digits" / _test_rows(project / "data")[i]["path"]
    path.write_bytes(path.read_bytes()[:-7] + b"garbage")
    res = _cose(project, "explain", "--params", _write_params(project, _params(project / "data")))
    assert res.returncode == 1
    line = _one_error(res)
    assert path.name in line and "differ from the sha256" in line


def _write_params(project: Path, raw: dict, name: str = "params.yaml") -> str:
    (project / name).write_text(yaml.safe_dump(raw))
    return name


# --------------------------------------------------------------------------- 3. lock


def test_second_writer_gets_one_line_naming_the_holder_and_a_killed_holder_no_lock(project):
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\n"
         "from cose.stages import common\n"
         "with common.output_lock('explain', 'outputs/explain'):\n"
         "    print('held', flush=True); time.sleep(60)\n"],
        cwd=project, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        raw = _params(project / "data")
        res = _cose(project, "explain", "--params", _write_params(project, raw))
        assert res.returncode == 1
        line = _one_error(res)
        assert f"pid {holder.pid}" in line and "outputs/explain is being written" in line
        assert not (project / "outputs" / "explain" / "digits").exists()  # nothing touched
    finally:
        holder.kill()
        holder.wait()
    with common.output_lock("explain", "outputs/explain"):  # the OS dropped the dead one's lock
        pass


def test_lock_wait_lets_a_second_writer_wait(project, monkeypatch):
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import time\nfrom cose.stages import common\n"
         "with common.output_lock('compile', 'results'):\n"
         "    print('held', flush=True); time.sleep(1.5)\n"],
        cwd=project, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    monkeypatch.setenv("COSE_LOCK_WAIT", "30")
    t0 = time.monotonic()
    with common.output_lock("compile", "results"):
        assert time.monotonic() - t0 > 0.5
    holder.wait()


# --------------------------------------------------------------------------- 4. samples


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_samples_npz_under_the_shard_checksum(project, damage):
    cfg = _cfg(project)
    _run_units(cfg)
    unit = next(u for u in explain.plan(cfg) if u.method == "gradcam" and u.shard == 0)
    before = unit.samples.read_bytes()
    if damage == "truncate":
        unit.samples.write_bytes(before[: len(before) // 2])
    else:
        unit.samples.unlink()
    assert not explain.shard_ok(unit)
    assert all(explain.shard_ok(u) for u in explain.plan(cfg) if u != unit)
    _run_units(cfg)
    assert unit.samples.read_bytes() == before


# --------------------------------------------------------------------------- 5. settings


@pytest.mark.parametrize("value, message", [
    ("abc", "explain.settings.ig.steps: got 'abc', expected an integer >= 1"),
    ("-5", "explain.settings.ig.steps: got -5, expected an integer >= 1"),
])
def test_bad_method_setting_stops_before_any_work(project, value, message):
    cfg = _cfg(project)
    shards = _run_units(cfg)
    raw = _params(project / "data")
    res = _cose(project, "explain", "--params", _write_params(project, raw),
                "-S", f"explain.settings.ig.steps={value}")
    assert res.returncode == 2 and res.stderr.strip() == f"cose: error: {message}"
    assert {u.key: u.parquet.read_bytes() for u in explain.plan(cfg)} == shards


def test_one_methods_settings_leave_the_others_shards_valid(project):
    cfg = _cfg(project)
    _run_units(cfg)
    changed = _cfg(project, settings={"ig": {"steps": 4}})
    status = {u.key: explain.shard_ok(u) for u in explain.plan(changed)}
    assert all(ok for k, ok in status.items() if "/gradcam/" in k)
    assert not any(ok for k, ok in status.items() if "/ig/" in k)


# --------------------------------------------------------------------------- 6. params


def test_images_beyond_the_split_are_capped_with_a_warning(project, caplog):
    cfg = _cfg(project, images=1_000_000_000)
    n = D.split_size("digits", project / "data", "test")
    units = explain.plan(cfg)  # returns at once: the selection holds the split's images
    assert sum(u.stop - u.start for u in units if u.method == "gradcam") == n
    with caplog.at_level("WARNING", logger="cose.explain"):
        explain._warn_capped(cfg)
    assert f"1000000000 asked, but digits has {n} test images" in caplog.text


def test_empty_params_and_duplicate_keys_are_one_line_errors(project):
    (project / "empty.yaml").write_text("")
    res = _cose(project, "explain", "--params", "empty.yaml")
    assert res.returncode == 2 and "empty.yaml: empty" in res.stderr
    (project / "dup.yaml").write_text("seed: 0\nexplain:\n  images: 3\n  images: 4\n")
    res = _cose(project, "train", "--params", "dup.yaml")
    assert res.returncode == 2
    assert res.stderr.strip() == ("cose: error: dup.yaml: not valid YAML (line 4): duplicate "
                                  "key 'images' (first at line 3)")


# --------------------------------------------------------------------------- 7. inputs


def _manifest(project: Path) -> Path:
    return project / "data" / "digits" / "manifest.csv"


@pytest.mark.parametrize("stage", ["explain", "train"])
def test_truncated_image_is_one_line_naming_it(project, stage):
    raw = _params(project / "data")
    raw["train"] = {"epochs": 1, "save_epochs": []}  # every training image is read
    cfg = config.validate(config.from_dict(raw))
    rows = D.read_rows(project / "data" / "digits")
    if stage == "explain":
        i = common.selection(cfg, "digits", MODEL, "gradcam").test_idx[0]
        row = [r for r in rows if r["split"] == "test"][i]
    else:
        row = next(r for r in rows if r["split"] == "train")
    path = project / "data" / "digits" / row["path"]
    path.write_bytes(path.read_bytes()[:20])
    _rewrite_manifest(project / "data" / "digits")  # the checksum matches: decoding fails
    res = _cose(project, stage, "--params", _write_params(project, raw),
                env={"MLFLOW_TRACKING_URI": f"sqlite:///{project}/mlruns/mlflow.db"})
    assert res.returncode == 1
    assert f"{row['path']}: cannot read the image" in _one_error(res)


@pytest.mark.parametrize("edit, message", [
    (lambda rows: rows[3].__setitem__("label", "99"),
     r"manifest.csv: line 5: label 99 outside 0..9 \(classes.txt lists 10 classes\)"),
    (lambda rows: rows[3].__setitem__("path", "../../secret.png"),
     r"manifest.csv: line 5: path '../../secret.png' is not inside the dataset folder"),
    (lambda rows: [r.pop("label") for r in rows],
     r"manifest.csv: missing column\(s\) label"),
])
def test_bad_manifest_is_one_line_and_writes_nothing(project, edit, message):
    text = _manifest(project).read_text()
    rows = list(csv.DictReader(io.StringIO(text)))
    edit(rows)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    _manifest(project).write_text(buf.getvalue())
    shutil.rmtree(project / "checkpoints")
    raw = _params(project / "data")
    raw["train"] = {"epochs": 1, "save_epochs": [], "max_train_images": 16}
    res = _cose(project, "train", "--params", _write_params(project, raw))
    assert res.returncode == 1
    import re

    assert re.search(message, _one_error(res)), res.stderr
    assert not (project / "checkpoints" / "digits" / MODEL / "random.pt").exists()


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


@pytest.mark.parametrize("damage", ["truncated", "code"])
def test_unreadable_last_pt_is_moved_aside_and_training_starts_over(tmp_path, damage, caplog):
    from cose import training as T

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    if damage == "code":
        (ckpt / "last.pt").write_bytes(pickle.dumps({"fingerprint": _Evil()}))
    else:
        torch.save({"fingerprint": "x", "model": torch.zeros(1000)}, ckpt / "last.pt")
        (ckpt / "last.pt").write_bytes((ckpt / "last.pt").read_bytes()[:100])
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(32, 3, 32, 32, generator=g), torch.randint(0, 3, (32,), generator=g)
    with caplog.at_level("WARNING", logger="cose.training"):
        hist = T.fit(M.create(MODEL, 3, seed=0), x, y, None, None,
                     T.TrainConfig(epochs=1, batch_size=16), ckpt, seed=0)
    assert [h["epoch"] for h in hist] == [1] and (ckpt / "final.pt").exists()
    assert "last.pt cannot be resumed from" in caplog.text
    assert any(p.name.startswith("last.pt.unreadable-") for p in ckpt.iterdir())
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


# --------------------------------------------------------------------------- 9. tracking


def test_cose_log_quarantines_a_corrupt_pending_file_and_replays_the_rest(project):
    from cose.tracking import Journal

    cfg = _cfg(project)
    journal = Journal.for_config("explain", cfg)
    journal.root_run.log_metrics({"x": 1.0})
    good = journal.save_pending()
    bad = good.parent / "explain-corrupt.json"
    bad.write_text('{"stage": "explain", "runs": ')
    res = _cose(project, "log", env={"MLFLOW_TRACKING_URI":
                                     f"sqlite:///{project}/mlruns/mlflow.db"})
    assert res.returncode == 0, res.stderr
    assert "replayed 1 pending log(s); 0 still pending" in res.stdout
    assert "explain-corrupt.json is not a readable pending log" in res.stderr
    assert (good.parent / "quarantine" / bad.name).exists() and not good.exists()


def test_tracking_credentials_never_printed(project):
    raw = _params(project / "data")
    raw["tracking"] = {"required": True, "retries": 0, "backoff_s": 0.0}
    secret = "http://alice:s3cr3t-token@127.0.0.1:9/"  # a closed port
    res = _cose(project, "compile", "--params", _write_params(project, raw),
                env={"MLFLOW_TRACKING_URI": secret})
    assert res.returncode == 1
    assert "s3cr3t-token" not in res.stderr + res.stdout
    assert "alice:***@127.0.0.1:9" in res.stderr


# --------------------------------------------------------------------------- 10. files


def test_outputs_keep_the_umask_and_reruns_clear_stale_temp_files(project):
    from cose.io import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(project / "results" / "x.md", "x")
        mode = stat.S_IMODE((project / "results" / "x.md").stat().st_mode)
    finally:
        os.umask(old)
    assert mode == 0o644
    cfg = _cfg(project)
    _run_units(cfg)
    stale = project / "results" / ".summary.csv.abc123.tmp"
    stale.write_text("half")
    from cose.stages import compile as compile_stage

    compile_stage._compile(cfg)
    assert not stale.exists()
    assert not list((project / "results").rglob("*.tmp"))
    assert json.loads((project / "results" / "metrics.json").read_text())
    assert len(pd.read_csv(project / "results" / "summary.csv")) == 2


# --------------------------------------------------------------------------- 11. labels (#29)


def test_compile_refuses_settings_that_did_not_make_the_outputs(project):
    """`cose compile -S explain.settings.ig.steps=8` on outputs made with 3 steps: one line
    naming the setting and both values, nothing written; the params that made them compile."""
    _run_units(_cfg(project))
    params = _write_params(project, _params(project / "data"))
    for override, made, asked in (("explain.settings.ig.steps=8", "steps=3", "8"),
                                  ("explain.images=1", "images=2", "1"),
                                  ("explain.magnitudes=4", "magnitudes=1", "4"),
                                  ("seed=5", "seed=0", "5")):
        res = _cose(project, "compile", "--params", params, "-S", override)
        line = _one_error(res)
        assert res.returncode == 2 and made in line and f"params say {asked}" in line, line
        assert not (project / "results" / "summary.csv").exists()
    res = _cose(project, "compile", "--params", params)
    assert res.returncode == 0, res.stderr
    made = json.loads((common.explain_dir("digits", MODEL, "ig") / common.CELL_PARAMS)
                      .read_text())
    assert made["explain"]["settings"] == {"steps": 3, "batch_size": None}
    # a setting written out at its default is the same params as one left unset
    res = _cose(project, "compile", "--params", params, "-S", "explain.settings.gradcam.layer=null")
    assert res.returncode == 0, res.stderr


def test_report_refuses_outputs_without_their_params(project):
    _run_units(_cfg(project))
    (common.explain_dir("digits", MODEL, "gradcam") / common.CELL_PARAMS).unlink()
    res = _cose(project, "report", "--params", _write_params(project, _params(project / "data")))
    assert res.returncode == 2
    assert "holds no record of the params that made it" in _one_error(res)


def test_killed_compile_marks_the_results_folder_incomplete(project, monkeypatch):
    from cose.stages import compile as compile_stage

    cfg = _cfg(project)
    _run_units(cfg)
    compile_stage._compile(cfg)
    marker = project / "results" / compile_stage.INCOMPLETE
    assert not marker.exists()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # a kill between the tables and the report

    original = compile_stage.write_report
    monkeypatch.setattr(compile_stage, "write_report", killed)
    with pytest.raises(KeyboardInterrupt):
        compile_stage._compile(cfg)
    assert marker.exists() and "did not finish" in marker.read_text()
    monkeypatch.setattr(compile_stage, "write_report", original)
    compile_stage._compile(cfg)
    assert not marker.exists()
