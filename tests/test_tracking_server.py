"""Stages logging to a real MLflow tracking server on loopback, started here.

`mlflow server` (sqlite backend and proxied artifacts in tmp, --host 127.0.0.1, a free port,
the --allowed-hosts list of docker/compose.yaml) serves:
- a stage-like process that records a `cose.tracking.Journal` (params, stepped metrics, a
  nested run, file and folder artifacts) and flushes it with MLFLOW_TRACKING_URI set; the
  runs are read back with `MlflowClient`, artifacts byte-identical, stored by the server;
- a journal flushed during an outage (closed port) that `cose log` replays once the server
  is there, exactly once;
- the host-header guard: the compose service name passes, a foreign Host is refused;
- when the pipeline runs end to end, a real `cose compile` on the tiny project.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _compose_allowed_hosts() -> str:
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    command = " ".join(compose["services"]["mlflow"]["command"])
    hosts = re.search(r"--allowed-hosts=(\S+)", command).group(1)
    return re.sub(r"\$\{MLFLOW_EXTRA_ALLOWED_HOSTS:-([^}]*)\}", r"\1", hosts)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "COSE_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`mlflow server` with a sqlite backend and proxied artifacts under a tmp dir."""
    base = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = (base / "server.log").open("wb")
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server",
         "--backend-store-uri", f"sqlite:///{base / 'mlflow.db'}",
         "--artifacts-destination", str(base / "artifacts"),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--allowed-hosts", _compose_allowed_hosts()],
        cwd=base, env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start:\n"
                                   f"{(base / 'server.log').read_text()[-3000:]}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            time.sleep(0.25)
        yield {"url": url, "port": port, "artifacts": base / "artifacts"}
    finally:
        try:  # the server's own process group: uvicorn and its worker
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        except ProcessLookupError:
            pass
        log.close()


STAGE = textwrap.dedent("""\
    import json, sys
    from pathlib import Path
    from cose.tracking import Journal

    root = Path(sys.argv[1])
    j = Journal("explain", experiment=sys.argv[2], required=sys.argv[3] == "required",
                retries=int(sys.argv[4]), backoff_s=0.1, root=root)
    j.root_run.log_params({"explain": {"images": 4, "seed": 0}, "methods": "gradcam"})
    j.root_run.log_metric("cose", 0.5)
    child = j.run("digits/demo_resnet/gradcam", "digits/demo_resnet/gradcam")
    child.set_tags({"cose.method": "gradcam"})
    child.log_metric("ssim", 0.7, step=0)
    child.log_metric("ssim", 0.8, step=1)
    child.log_artifact(root / "table.csv", "tables")
    child.log_artifact(root / "figures", "figures")
    ok = j.flush()
    print(json.dumps({"ok": ok, "execution_id": j.execution_id}))
""")


def _project(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "stage.py").write_text(STAGE)
    (path / "table.csv").write_text("method,ssim\ngradcam,0.8\n")
    (path / "figures").mkdir(exist_ok=True)
    (path / "figures" / "maps.png").write_bytes(bytes(range(256)) * 40)
    return path


def _stage(project: Path, uri: str, experiment: str, required: bool, retries: int,
           **env: str) -> dict:
    res = subprocess.run(
        [sys.executable, "stage.py", str(project), experiment,
         "required" if required else "optional", str(retries)],
        cwd=project, capture_output=True, text=True, timeout=180,
        env=_env(MLFLOW_TRACKING_URI=uri, COSE_PROJECT_ROOT=str(project), **env),
    )
    assert res.returncode == 0, res.stdout + res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def _runs(client, experiment: str, execution_id: str) -> dict:
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"experiment {experiment} not on the server"
    runs = client.search_runs([exp.experiment_id],
                              filter_string=f"tags.`cose.execution_id` = '{execution_id}'")
    return {r.data.tags["mlflow.runName"]: r for r in runs}


def _check_logged(client, runs: dict, project: Path, tmp_path: Path) -> None:
    assert set(runs) == {"explain", "digits/demo_resnet/gradcam"}
    top, child = runs["explain"], runs["digits/demo_resnet/gradcam"]
    assert top.data.params["explain.images"] == "4"
    assert top.data.metrics["cose"] == 0.5
    assert child.data.tags["mlflow.parentRunId"] == top.info.run_id
    assert child.data.tags["cose.method"] == "gradcam"
    for run in (top, child):
        assert run.data.tags["cose.complete"] == "1"
        assert run.data.tags["dvc.stage"] == "explain"
        assert run.info.status == "FINISHED"
    history = client.get_metric_history(child.info.run_id, "ssim")
    assert sorted((m.step, m.value) for m in history) == [(0, 0.7), (1, 0.8)]
    assert child.info.artifact_uri.startswith("mlflow-artifacts:/")  # proxied by the server
    out = Path(client.download_artifacts(child.info.run_id, "", str(tmp_path)))
    assert (out / "tables" / "table.csv").read_bytes() == (project / "table.csv").read_bytes()
    assert ((out / "figures" / "maps.png").read_bytes()
            == (project / "figures" / "maps.png").read_bytes())
    assert not list((project / "mlruns" / "pending").glob("*.json"))


def test_stage_journal_reaches_the_server(server, tmp_path):
    from mlflow.tracking import MlflowClient

    project = _project(tmp_path / "proj")
    result = _stage(project, server["url"], "cose-server", required=True, retries=1)
    assert result["ok"] is True
    client = MlflowClient(tracking_uri=server["url"])
    _check_logged(client, _runs(client, "cose-server", result["execution_id"]), project,
                  tmp_path / "download")
    # the bytes live in the server's artifact store, not in the client's project
    stored = list(server["artifacts"].rglob("maps.png"))
    assert stored and stored[0].read_bytes() == (project / "figures" / "maps.png").read_bytes()
    assert not (project / "mlruns" / "artifacts").exists()


def test_outage_then_cose_log_replays_once(server, tmp_path):
    from mlflow.tracking import MlflowClient

    project = _project(tmp_path / "proj")
    down = f"http://127.0.0.1:{_free_port()}"
    result = _stage(project, down, "cose-replay", required=False, retries=0,
                    MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="5")
    assert result["ok"] is False
    assert len(list((project / "mlruns" / "pending").glob("*.json"))) == 1

    env = _env(MLFLOW_TRACKING_URI=server["url"], COSE_PROJECT_ROOT=str(project))
    for expected in ("replayed 1 pending log(s); 0 still pending",
                     "replayed 0 pending log(s); 0 still pending"):
        res = subprocess.run([str(BIN / "cose"), "log"], cwd=project, env=env,
                             capture_output=True, text=True, timeout=180)
        assert res.returncode == 0, res.stdout + res.stderr
        assert expected in res.stdout
    client = MlflowClient(tracking_uri=server["url"])
    _check_logged(client, _runs(client, "cose-replay", result["execution_id"]), project,
                  tmp_path / "download")


@pytest.mark.parametrize("host, allowed", [("mlflow:5000", True), ("127.0.0.1:{port}", True),
                                           ("localhost:{port}", True),
                                           ("evil.example", False)])
def test_compose_allowed_hosts_guard(server, host, allowed):
    conn = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=10)
    conn.putrequest("GET", "/api/2.0/mlflow/experiments/search?max_results=1",
                    skip_host=True)
    conn.putheader("Host", host.format(port=server["port"]))
    conn.endheaders()
    status = conn.getresponse().status
    assert (status == 200) if allowed else (status in (400, 403)), status


def test_cose_compile_logs_to_the_server(server, tmp_project_copy):
    """A real stage: `cose compile` on the tiny project, its run read back from the server."""
    from mlflow.tracking import MlflowClient

    env = _env(MLFLOW_TRACKING_URI=server["url"], CI="true", COSE_DEVICE="cpu")
    started = int(time.time() * 1000)
    res = subprocess.run([str(BIN / "cose"), "compile"], cwd=tmp_project_copy, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    client = MlflowClient(tracking_uri=server["url"])
    params = yaml.safe_load((tmp_project_copy / "params.yaml").read_text())
    exp = client.get_experiment_by_name(params.get("tracking", {}).get("experiment", "cose"))
    assert exp is not None
    runs = client.search_runs([exp.experiment_id],
                              filter_string=f"tags.`cose.stage` = 'compile' and "
                                            f"attributes.start_time >= {started}")
    assert runs, "no compile run on the server"
    assert all(r.data.tags.get("cose.complete") == "1" for r in runs)
    assert any(r.data.metrics for r in runs)
    assert not list((tmp_project_copy / "mlruns" / "pending").glob("*.json"))


@pytest.fixture
def tmp_project_copy(request, tmp_path):
    """A copy of conftest's reproduced tiny project (skipped where there is none)."""
    try:
        source = request.getfixturevalue("tiny_project")
    except pytest.FixtureLookupError:
        pytest.skip("no tiny_project fixture in tests/conftest.py")
    dest = tmp_path / "proj"
    shutil.copytree(source, dest, symlinks=True)
    shutil.rmtree(dest / "mlruns", ignore_errors=True)
    return dest


def test_credentials_in_the_tracking_uri_never_printed(server, tmp_path):
    """A tracking URI with a login (``http://user:password@host``) and a password in the
    environment: MLflow's own "View run ... at: <URI>" lines, and every line of ours, are
    printed with the credentials masked (the server here takes no login, so the push runs)."""
    project = _project(tmp_path / "proj")
    down = f"http://127.0.0.1:{_free_port()}"
    result = _stage(project, down, "cose-redact", required=False, retries=0,
                    MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="5")
    assert result["ok"] is False
    secret, token = "pw-Kq8d7Hs2x", "tok-Zr91mmYw0"
    uri = server["url"].replace("http://", f"http://alice:{secret}@")
    env = _env(MLFLOW_TRACKING_URI=uri, COSE_PROJECT_ROOT=str(project),
               MLFLOW_TRACKING_TOKEN=token)
    res = subprocess.run([str(BIN / "cose"), "log"], cwd=project, env=env,
                         capture_output=True, text=True, timeout=180)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "View run" in out and "alice:***@127.0.0.1" in out  # MLflow's line, masked
    assert secret not in out and token not in out
