"""Fault injection on a real, tiny project: killed runs, damaged shards, a tracking outage.

One project (git + DVC + MLflow store, one model, three methods, six explain units) is
reproduced once per session with `dvc repro` (local backend); it is the uninterrupted reference
and every test works on a copy of it:
- `dvc repro` SIGKILLed during explain, then rerun: resumes (log line), redoes no finished
  unit, gives the reference's results byte for byte;
- truncated, missing, unreadable and other-params shards and temp files of a killed writer are
  detected and recomputed; the intact shards are kept;
- the MLflow server dies during the stage: it still finishes, warns and leaves a pending log
  that `cose log` pushes once the server is back, idempotently; `tracking.required: true`
  fails clearly instead.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import make_project, project_env, sh, tiny_params

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
METHODS = ["gradcam", "gradcampp", "ig"]
IMAGES = 2  # one image per shard: 3 methods x 2 shards = 6 units
UNITS = len(METHODS) * IMAGES

# Smaller than conftest's tiny set: one model, three cheap methods, three transforms.
EXTRA = {
    "models": ["demo_resnet"],
    "methods": METHODS,
    "train": {"epochs": 2, "save_epochs": [1], "max_train_images": 128},
    "explain": {"images": IMAGES, "shard_size": 1, "magnitudes": 1, "sample_maps": 1,
                "transforms": ["Rotate", "FlipLR", "Brightness"],
                "settings": {"ig": {"steps": 4}}},
    "tracking": {"retries": 1, "backoff_s": 0.1},
}

_BUILT: dict[str, Path] = {}


def env_for(proj: Path, **extra: str) -> dict[str, str]:
    """conftest's project env, running the project's own copy of `cose` (its src/), so the
    code matches the stages' DVC deps and edits to this checkout during a run change nothing.

    Every process runs torch with one thread, as each actor of a 2-CPU, 2-worker Ray cluster
    does: torch's CPU reductions (IG's gradients, ...) round differently with another thread
    count (about 1e-7 in SSIM), and byte-identical outputs are what these tests compare.
    """
    env = project_env(proj)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(
        [str(proj / "src"), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    env.update(extra)
    return env


def reproduced_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: a tiny project after `cose data fetch digits` and a full `dvc repro`.

    Built once per session (test_ray_backend.py shares it); use copies, never change it.
    """
    if "ref" not in _BUILT:
        path = make_project(tmp_path_factory.mktemp("resilience") / "ref", tiny_params(EXTRA))
        sh(["cose", "data", "fetch", "digits"], path, env=env_for(path))
        sh(["dvc", "repro"], path, env=env_for(path))
        _BUILT["ref"] = path
    return _BUILT["ref"]


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> Path:
    return reproduced_project(tmp_path_factory)


def copy_project(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, symlinks=True)
    shutil.rmtree(dest / "mlruns" / "pending", ignore_errors=True)
    return dest


def explain_dir(proj: Path) -> Path:
    return proj / "outputs" / "explain" / "digits" / "demo_resnet"


def sidecars(proj: Path) -> list[Path]:
    return sorted((proj / "outputs" / "explain").glob("*/*/*/shards/shard_*.json"))


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def lock_md5(proj: Path, stage: str, out: str) -> str:
    lock = yaml.safe_load((proj / "dvc.lock").read_text())
    return next(o["md5"] for o in lock["stages"][stage]["outs"] if o["path"] == out)


def assert_pairs_equal(proj: Path, ref: Path) -> None:
    for method in METHODS:
        got = pd.read_parquet(explain_dir(proj) / method / "pairs.parquet")
        want = pd.read_parquet(explain_dir(ref) / method / "pairs.parquet")
        assert len(want) > 0
        pd.testing.assert_frame_equal(got, want, check_exact=True)


def valid_shard(sidecar: Path) -> bool:
    import hashlib

    try:
        meta = json.loads(sidecar.read_text())
        data = sidecar.with_suffix(".parquet").read_bytes()
    except (OSError, ValueError):
        return False
    return hashlib.sha256(data).hexdigest() == meta["sha256"]


# --------------------------------------------------------------------------- killed run


def test_killed_repro_resumes_without_redoing_finished_units(reference, tmp_path):
    proj = copy_project(reference, tmp_path / "proj")
    shutil.rmtree(proj / "outputs" / "explain")
    shutil.rmtree(proj / "results")

    log = (tmp_path / "killed.log").open("w")
    proc = subprocess.Popen(["dvc", "repro"], cwd=proj, env=env_for(proj), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not sidecars(proj):
            assert proc.poll() is None, "dvc repro ended before a shard was written:\n" + (
                (tmp_path / "killed.log").read_text()[-3000:])
            assert time.monotonic() < deadline, "no shard within 600 s"
            time.sleep(0.02)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # dvc, the shell and `cose explain`
        except ProcessLookupError:
            pass
        proc.wait(timeout=60)
        log.close()

    finished = [s for s in sidecars(proj) if valid_shard(s)]
    assert 1 <= len(finished) < UNITS, f"kill landed outside the explain stage: {finished}"
    assert not (proj / "results" / "summary.csv").exists()
    before = {s: (s.read_bytes(), s.stat().st_mtime_ns,
                  s.with_suffix(".parquet").stat().st_mtime_ns) for s in finished}

    res = sh(["dvc", "repro"], proj, env=env_for(proj))
    out = res.stdout + res.stderr
    k = len(finished)
    assert f"explain: resumed: {k} of {UNITS} units already done, {UNITS - k} to run" in out, out
    ran = [line for line in out.splitlines() if "explain [" in line]
    assert len(ran) == UNITS - k, ran
    for s, (data, mtime, parquet_mtime) in before.items():
        unit_key = "/".join(s.relative_to(proj / "outputs" / "explain").with_suffix("").parts)
        unit_key = unit_key.replace("/shards/", "/")
        assert not any(unit_key in line for line in ran), (unit_key, ran)
        assert s.read_bytes() == data
        assert s.stat().st_mtime_ns == mtime
        assert s.with_suffix(".parquet").stat().st_mtime_ns == parquet_mtime

    # the same results as the uninterrupted run: tables, summary, even DVC's output hash
    pd.testing.assert_frame_equal(pd.read_csv(proj / "results" / "summary.csv"),
                                  pd.read_csv(reference / "results" / "summary.csv"))
    assert_pairs_equal(proj, reference)
    assert (lock_md5(proj, "explain", "outputs/explain")
            == lock_md5(reference, "explain", "outputs/explain"))
    assert not list((proj / "outputs").rglob("*.tmp"))
    assert json.loads(sh(["dvc", "status", "--json"], proj, env=env_for(proj)).stdout
                      or "{}") == {}


# --------------------------------------------------------------------------- damaged shards


def test_damaged_and_stale_shards_are_recomputed(reference, tmp_path, monkeypatch):
    from cose import config
    from cose.stages import explain

    proj = copy_project(reference, tmp_path / "proj")
    base = explain_dir(proj)

    # a shard made with other params (explain.seed=1), by the real unit code (this process's
    # copy of it: the fingerprint differs by the seed, and by the code if it was edited)
    monkeypatch.chdir(proj)
    monkeypatch.setenv("COSE_DEVICE", "cpu")
    cfg0 = config.load("params.yaml")
    cfg1 = config.load("params.yaml", ["explain.seed=1"])
    unit0, unit1 = explain.plan(cfg0)[0], explain.plan(cfg1)[0]
    assert (unit0.key, unit0.start, unit0.stop) == (unit1.key, unit1.start, unit1.stop)
    assert unit0.fingerprint != unit1.fingerprint
    try:
        explain.compute_unit(unit1, cfg1.to_dict())
    finally:
        explain.release()
    stale = base / "gradcam" / "shards" / "shard_0000.json"
    assert json.loads(stale.read_text())["fingerprint"] == unit1.fingerprint
    assert not pd.read_parquet(stale.with_suffix(".parquet")).equals(
        pd.read_parquet(explain_dir(reference) / "gradcam" / "shards" / "shard_0000.parquet"))

    truncated = base / "gradcampp" / "shards" / "shard_0001.parquet"
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    (base / "ig" / "shards" / "shard_0000.json").write_text('{"fingerprint": ')  # torn sidecar
    (base / "ig" / "shards" / "shard_0001.parquet").unlink()  # sidecar without its shard
    # temp files of a writer killed between write and rename
    (base / "gradcam" / "shards" / ".shard_0001.parquet.x1y2.tmp").write_bytes(b"PAR1")
    (base / "gradcam" / ".pairs.parquet.z3.tmp").write_bytes(b"PAR1")
    intact = [base / "gradcam" / "shards" / "shard_0001.json",
              base / "gradcampp" / "shards" / "shard_0000.json"]
    mtimes = {p: p.stat().st_mtime_ns for p in intact}

    res = sh(["cose", "explain"], proj, env=env_for(proj))
    out = res.stdout + res.stderr
    assert f"explain: resumed: 2 of {UNITS} units already done, 4 to run" in out, out
    ran = {line.split("] ")[1].split(":")[0] for line in out.splitlines() if "explain [" in line}
    assert ran == {"digits/demo_resnet/gradcam/shard_0000", "digits/demo_resnet/gradcampp/shard_0001",
                   "digits/demo_resnet/ig/shard_0000", "digits/demo_resnet/ig/shard_0001"}
    assert {p: p.stat().st_mtime_ns for p in intact} == mtimes
    assert not list((proj / "outputs").rglob("*.tmp"))
    # every file of the output is again the reference's, byte for byte
    assert tree_bytes(proj / "outputs" / "explain") == tree_bytes(
        reference / "outputs" / "explain")
    assert_pairs_equal(proj, reference)


# --------------------------------------------------------------------------- tracking outage


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(base: Path, port: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "COSE_"))}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no job runner: 8 fewer processes
    log = (base / f"server-{time.monotonic_ns()}.log").open("wb")
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{base / 'mlflow.db'}",
         "--artifacts-destination", str(base / "artifacts"), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        cwd=base, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop_server(proc)
            raise RuntimeError(f"mlflow server did not start:\n{Path(log.name).read_text()[-3000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            pass
        time.sleep(0.25)


def _stop_server(proc: subprocess.Popen) -> None:
    try:  # the server's own process group: the CLI, uvicorn and its worker
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def test_tracking_outage_finishes_then_cose_log_replays_once(reference, tmp_path):
    from mlflow.tracking import MlflowClient

    proj = copy_project(reference, tmp_path / "proj")
    (explain_dir(proj) / "ig" / "shards" / "shard_0001.json").unlink()  # one unit to run
    server_dir = tmp_path / "server"
    server_dir.mkdir()
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = env_for(proj, MLFLOW_TRACKING_URI=url)
    pending = proj / "mlruns" / "pending"

    server = _start_server(server_dir, port)
    try:
        stage_log = tmp_path / "explain.log"
        with stage_log.open("w") as fh:
            stage = subprocess.Popen(["cose", "explain"], cwd=proj, env=env, stdout=fh,
                                     stderr=subprocess.STDOUT, start_new_session=True)
            try:
                deadline = time.monotonic() + 300
                while "to run" not in stage_log.read_text():  # the stage is running
                    assert stage.poll() is None, stage_log.read_text()
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
                _stop_server(server)  # dies before the stage's flush
                rc = stage.wait(timeout=600)
            finally:
                if stage.poll() is None:
                    os.killpg(stage.pid, signal.SIGKILL)
        out = stage_log.read_text()
        assert rc == 0, out
        assert "explain: resumed: 5 of 6 units already done, 1 to run" in out
        assert f"MLflow tracking at {url} failed after 2 attempts" in out, out
        assert "replay it with `cose log`" in out
        assert_pairs_equal(proj, reference)  # outputs complete
        journals = list(pending.glob("explain-*.json"))
        assert len(journals) == 1, journals
        execution_id = journals[0].stem.removeprefix("explain-")
        saved = journals[0].read_bytes()

        # tracking.required: a clear error, before any work, and no pending log
        res = sh(["cose", "explain", "-S", "tracking.required=true"], proj, check=False,
                 env=env, timeout=300)
        assert res.returncode != 0
        assert "cose: error: MLflow tracking at" in res.stderr
        assert "tracking.required is true" in res.stderr, res.stderr
        assert "to run" not in res.stderr
        assert list(pending.glob("*.json")) == journals

        server = _start_server(server_dir, port)  # back, same store
        res = sh(["cose", "log"], proj, env=env, timeout=300)
        assert "replayed 1 pending log(s); 0 still pending" in res.stdout
        assert not list(pending.glob("*.json"))
        client = MlflowClient(tracking_uri=url)
        exp = client.get_experiment_by_name("cose")
        runs = client.search_runs([exp.experiment_id],
                                  filter_string=f"tags.`cose.execution_id` = '{execution_id}'")
        names = {r.data.tags["mlflow.runName"]: r for r in runs}
        assert set(names) == {"explain"} | {f"explain digits/demo_resnet/{m}" for m in METHODS}
        root = names.pop("explain")
        assert root.data.tags["cose.backend"] == "local"
        assert root.data.tags["cose.precision_unvalidated"] == "none"  # fp32
        for run in names.values():
            assert run.data.tags["mlflow.parentRunId"] == root.info.run_id
            assert run.data.tags["cose.complete"] == "1"
            assert run.data.metrics["pairs"] > 0
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["pairs.parquet"]

        # the stage's run is nested under its pipeline execution's run
        before = client.search_runs([exp.experiment_id], max_results=1000)
        parents = [r for r in before if r.data.tags.get("cose.stage") == "pipeline"]
        assert [r.info.run_id for r in parents] == [root.data.tags["mlflow.parentRunId"]]
        assert {r.info.run_id for r in before} == {r.info.run_id for r in [*runs, *parents]}

        # replaying the same journal again adds nothing
        (pending / journals[0].name).write_bytes(saved)
        res = sh(["cose", "log"], proj, env=env, timeout=300)
        assert "replayed 1 pending log(s); 0 still pending" in res.stdout
        again = client.search_runs([exp.experiment_id], max_results=1000)
        assert sorted(r.info.run_id for r in again) == sorted(r.info.run_id for r in before)
    finally:
        _stop_server(server)


def test_shard_fingerprint_covers_the_code_explain_units_run():
    """Every cose module an explain unit imports (engine, saliency, similarity and its compiled
    kernels, transforms, precision, selection, models, data) is in the static import closure
    hashed into the shard fingerprints, so changing any of them recomputes the shards instead
    of reusing stale numbers."""
    probe = (
        "import sys, torch, cose.engine as e, cose.similarity as s\n"
        "import cose.stages.common, cose.selection, cose.models, cose.data\n"
        "a = torch.rand(2, 8, 8)\n"
        "s.ssim(a, a.flip(1)); s.spearman(a, a.flip(1))\n"  # the lazily imported kernels
        "print('\\n'.join(sorted(m.__file__ for n, m in list(sys.modules.items())\n"
        "      if n.startswith('cose') and getattr(m, '__file__', None))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=300
    )
    from cose.closure import EXPLAIN_ROOTS, closure

    covered = set(closure(EXPLAIN_ROOTS))
    for line in out.stdout.split():
        f = Path(line).resolve()
        assert f in covered, f"{f} is imported by a unit but not in its fingerprint's closure"


def test_dvc_deps_cover_each_stage_import_closure():
    """A stage's dvc.yaml deps list every source file its module imports, directly or not:
    `echo '#x' >> src/cose/_similarity_cpu.py` must make `dvc status` report the explain stage
    changed (it did not before this test)."""
    import yaml

    from cose.closure import closure

    root = Path(__file__).resolve().parent.parent
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        deps = [root / d for d in stage["deps"] if d.startswith("src/")]
        for f in closure([f"cose.stages.{name}"]):
            assert any(f == d or d in f.parents for d in deps), (
                f"dvc.yaml stage {name!r}: {f.relative_to(root)} is in its import closure but "
                "not in its deps")
