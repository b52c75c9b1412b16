"""DVC remotes against real servers on loopback, started here.

A temporary git+DVC repo (the project's committed .dvc/config, a `data/` folder tracked by
`dvc add`, a stage whose outs are `checkpoints/...` and `outputs/explain/...`) is reproduced,
pushed, cloned fresh with git, pulled, and compared byte for byte:
- through an S3-compatible server (moto's server mode, IAM authentication on) via the `team`
  remote: pushed with credentials and endpoint from the environment, pulled in the clone with
  them in the git-ignored .dvc/config.local;
- through the one-machine `local` directory remote, moved with `dvc remote modify --local`.
`cose.remote.check_remote` turns a closed port, missing / wrong credentials, a missing bucket
or directory and an unknown name into one line naming the remote.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cose.remote import RemoteError, check_remote, default_remote, default_remote_source

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BUCKET = "cose"
OUTS = ("data", "checkpoints", "outputs/explain")

# The stage: checkpoints and explanation outputs derived from the data, as bytes.
GEN = '''\
import hashlib, pathlib, random
seed = hashlib.sha256(pathlib.Path("data/digits/manifest.csv").read_bytes()).digest()
rng = random.Random(seed)
for rel, size in [("checkpoints/digits/demo_resnet/epoch_001.pt", 300_000),
                  ("checkpoints/digits/demo_resnet/final.pt", 300_000),
                  ("outputs/explain/digits/demo_resnet/gradcam/pairs.parquet", 40_000),
                  ("outputs/explain/digits/demo_resnet/gradcam/samples.npz", 70_000)]:
    p = pathlib.Path(rel)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(rng.randbytes(size))
'''

DVC_YAML = """\
stages:
  make:
    cmd: python gen.py
    deps:
      - data
      - gen.py
    outs:
      - checkpoints
      - outputs/explain
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(home: Path, **extra: str) -> dict[str, str]:
    """No AWS settings from the caller; no ~/.aws, no instance metadata lookups."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "DVC_", "MLFLOW_"))}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        HOME=str(home),
        AWS_EC2_METADATA_DISABLED="true",
        AWS_SHARED_CREDENTIALS_FILE=str(home / "no-aws-credentials"),
        AWS_CONFIG_FILE=str(home / "no-aws-config"),
        DVC_NO_ANALYTICS="1",
        DVC_GLOBAL_CONFIG_DIR=str(home / "dvc-global"),
        DVC_SYSTEM_CONFIG_DIR=str(home / "dvc-system"),
        DVC_SITE_CACHE_DIR=str(home / "dvc-site"),
        GIT_AUTHOR_NAME="cose-tests", GIT_COMMITTER_NAME="cose-tests",
        GIT_AUTHOR_EMAIL="tests@cose.invalid", GIT_COMMITTER_EMAIL="tests@cose.invalid",
        GIT_CONFIG_NOSYSTEM="1",
    )
    env.update(extra)
    return env


def _sh(cmd: list[str], cwd: Path, env: dict[str, str], check: bool = True
        ) -> subprocess.CompletedProcess[str]:
    if cmd[0] == "dvc":
        cmd = [sys.executable, "-m", "dvc", *cmd[1:]]
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=180)
    if check and res.returncode != 0:
        raise AssertionError(f"{cmd} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res


def _files(repo: Path) -> dict[str, bytes]:
    out = {}
    for top in OUTS:
        for p in sorted((repo / top).rglob("*")):
            if p.is_file():
                out[p.relative_to(repo).as_posix()] = p.read_bytes()
    return out


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def s3(home):
    """moto's S3 server on a free loopback port, IAM auth on, bucket `cose` created."""
    boto3 = pytest.importorskip("boto3")
    pytest.importorskip("moto.server")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    # The first 3 requests (IAM setup) are unauthenticated, every later one is checked.
    env = _env(home, INITIAL_NO_AUTH_ACTION_COUNT="3")
    log = (home / "moto.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                             "-p", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"moto server did not start: {(home / 'moto.log').read_text()}"
                    ) from None
                time.sleep(0.1)
        kw = {"endpoint_url": url, "region_name": "us-east-1"}
        iam = boto3.client("iam", aws_access_key_id="setup", aws_secret_access_key="setup",
                           **kw)
        iam.create_user(UserName="dvc")
        key = iam.create_access_key(UserName="dvc")["AccessKey"]
        iam.put_user_policy(
            UserName="dvc", PolicyName="all",
            PolicyDocument='{"Version": "2012-10-17", "Statement": '
                           '[{"Effect": "Allow", "Action": "*", "Resource": "*"}]}',
        )
        creds = {"key": key["AccessKeyId"], "secret": key["SecretAccessKey"]}
        client = boto3.client("s3", aws_access_key_id=creds["key"],
                              aws_secret_access_key=creds["secret"], **kw)
        client.create_bucket(Bucket=BUCKET)
        yield {"url": url, "port": port, "client": client, **creds}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def source(tmp_path_factory, home) -> Path:
    """A reproduced git+DVC repo with the project's .dvc/config (remotes team and local)."""
    repo = tmp_path_factory.mktemp("remotes") / "src"
    repo.mkdir()
    env = _env(home)
    _sh(["git", "init", "-q", "-b", "main"], repo, env)
    _sh(["dvc", "init", "-q"], repo, env)
    (repo / ".dvc" / "config").write_text((ROOT / ".dvc" / "config").read_text())
    digits = repo / "data" / "digits"
    (digits / "img" / "0").mkdir(parents=True)
    (digits / "manifest.csv").write_text("path,label,split\nimg/0/000.png,0,train\n")
    (digits / "classes.txt").write_text("0\n")
    (digits / "img" / "0" / "000.png").write_bytes(bytes(range(256)) * 64)
    (digits / "empty.txt").write_bytes(b"")
    (repo / "gen.py").write_text(GEN)
    (repo / "dvc.yaml").write_text(DVC_YAML)
    _sh(["dvc", "add", "data"], repo, env)
    _sh(["dvc", "repro"], repo, env)
    _sh(["git", "add", "-A"], repo, env)
    _sh(["git", "commit", "-qm", "data, stage, lock"], repo, env)
    status = _sh(["git", "status", "--porcelain"], repo, env).stdout
    assert status == "", status
    return repo


def _clone(source: Path, name: str, env: dict[str, str]) -> Path:
    dest = source.parent / name
    _sh(["git", "clone", "-q", str(source), str(dest)], source.parent, env)
    for top in OUTS:
        assert not (dest / top).exists()
    return dest


# ------------------------------------------------------------------------------- push/pull


def test_push_pull_through_s3_team_remote(source, s3, home):
    expected = _files(source)
    assert {p.split("/")[0] for p in expected} == {"data", "checkpoints", "outputs"}

    # push: credentials and endpoint from the environment (.env / CI secrets)
    push_env = _env(home, AWS_ACCESS_KEY_ID=s3["key"], AWS_SECRET_ACCESS_KEY=s3["secret"],
                    AWS_ENDPOINT_URL_S3=s3["url"])
    assert "local" in _sh(["dvc", "remote", "default"], source, push_env).stdout
    _sh(["dvc", "push", "-r", "team"], source, push_env)
    listed = s3["client"].list_objects_v2(Bucket=BUCKET, Prefix="dvc/")
    assert listed["KeyCount"] >= len(expected)

    # pull in a fresh clone: credentials in .dvc/config.local, nothing in the environment
    env = _env(home)
    clone = _clone(source, "clone-s3", env)
    for key, value in (("endpointurl", s3["url"]), ("access_key_id", s3["key"]),
                       ("secret_access_key", s3["secret"])):
        _sh(["dvc", "remote", "modify", "--local", "team", key, value], clone, env)
    _sh(["dvc", "remote", "default", "--local", "team"], clone, env)  # a team member's clone
    assert _sh(["git", "status", "--porcelain"], clone, env).stdout == ""  # config.local ignored
    _sh(["dvc", "pull"], clone, env)
    assert _files(clone) == expected
    assert "up to date" in _sh(["dvc", "status"], clone, env).stdout.lower()


def test_push_pull_through_local_directory_remote(source, tmp_path, home):
    expected = _files(source)
    store = tmp_path / "one-machine-remote"
    env = _env(home)
    _sh(["dvc", "remote", "modify", "--local", "local", "url", str(store)], source, env)
    try:
        _sh(["dvc", "push", "-r", "local"], source, env)
    finally:
        (source / ".dvc" / "config.local").unlink()
    assert any(p.is_file() for p in (store / "files" / "md5").rglob("*"))

    clone = _clone(source, "clone-local", env)
    _sh(["dvc", "remote", "modify", "--local", "local", "url", str(store)], clone, env)
    _sh(["dvc", "pull", "-r", "local"], clone, env)
    assert _files(clone) == expected


# --------------------------------------------------------------------------- check_remote


@pytest.fixture
def aws_env(monkeypatch, home):
    """This process's AWS settings as in `_env`, for in-process check_remote calls."""
    for k in list(os.environ):
        if k.startswith("AWS_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(home / "no-aws-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(home / "no-aws-config"))
    monkeypatch.setenv("DVC_GLOBAL_CONFIG_DIR", str(home / "dvc-global"))
    monkeypatch.setenv("DVC_SYSTEM_CONFIG_DIR", str(home / "dvc-system"))
    return monkeypatch


def test_check_remote_accepts_good_settings(source, s3, aws_env):
    assert default_remote(source) == "local"
    aws_env.setenv("AWS_ACCESS_KEY_ID", s3["key"])
    aws_env.setenv("AWS_SECRET_ACCESS_KEY", s3["secret"])
    aws_env.setenv("AWS_ENDPOINT_URL_S3", s3["url"])
    check_remote("team", root=source)


def test_default_remote_says_where_it_is_set(source, tmp_path, aws_env):
    """A fresh clone pulls from the credential-free local remote (.dvc/config); a team member's
    `dvc remote default --local team` makes S3 this clone's default (.dvc/config.local)."""
    assert default_remote_source(source) == ("local", ".dvc/config")
    _sh(["dvc", "remote", "default", "--local", "team"], source, _env(tmp_path))
    try:
        assert default_remote_source(source) == ("team", ".dvc/config.local")
    finally:
        (source / ".dvc" / "config.local").unlink()


@pytest.mark.parametrize("key_id, code", [("AKIAWRONGWRONGWRONG1", "InvalidAccessKeyId"),
                                          (None, "SignatureDoesNotMatch")])
def test_check_remote_names_rejected_credentials(source, s3, aws_env, key_id, code):
    aws_env.setenv("AWS_ACCESS_KEY_ID", key_id or s3["key"])
    aws_env.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    aws_env.setenv("AWS_ENDPOINT_URL_S3", s3["url"])
    with pytest.raises(RemoteError) as err:
        check_remote("team", root=source)
    msg = str(err.value)
    assert msg.startswith("remote 'team': credentials rejected by ")
    assert f"({code})" in msg and s3["url"] in msg and "\n" not in msg


def test_check_remote_names_missing_credentials(source, s3, aws_env):
    aws_env.setenv("AWS_ENDPOINT_URL_S3", s3["url"])
    with pytest.raises(RemoteError, match=r"^remote 'team': no S3 credentials .*"
                                          r"AWS_ACCESS_KEY_ID"):
        check_remote("team", root=source)


def test_check_remote_names_unreachable_endpoint(source, s3, aws_env):
    closed = _free_port()  # bound then released: nothing listens there
    aws_env.setenv("AWS_ACCESS_KEY_ID", s3["key"])
    aws_env.setenv("AWS_SECRET_ACCESS_KEY", s3["secret"])
    aws_env.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{closed}")
    started = time.monotonic()
    with pytest.raises(RemoteError) as err:
        check_remote("team", root=source)
    assert str(err.value).startswith(
        f"remote 'team': cannot reach endpoint http://127.0.0.1:{closed} (connection refused)"
    )
    assert time.monotonic() - started < 20  # no long retry loop


def test_check_remote_names_missing_bucket(source, s3, aws_env, tmp_path):
    aws_env.setenv("AWS_ACCESS_KEY_ID", s3["key"])
    aws_env.setenv("AWS_SECRET_ACCESS_KEY", s3["secret"])
    aws_env.setenv("AWS_ENDPOINT_URL_S3", s3["url"])
    env = _env(tmp_path)
    _sh(["dvc", "remote", "add", "--local", "elsewhere", "s3://no-such-bucket/dvc"], source,
        env)
    try:
        with pytest.raises(RemoteError,
                           match=r"^remote 'elsewhere': bucket 'no-such-bucket' does not exist"):
            check_remote("elsewhere", root=source)
    finally:
        (source / ".dvc" / "config.local").unlink()


def test_check_remote_local_directory_and_unknown_name(source, tmp_path, aws_env):
    env = _env(tmp_path)
    missing = tmp_path / "not-there"
    _sh(["dvc", "remote", "modify", "--local", "local", "url", str(missing)], source, env)
    try:
        with pytest.raises(RemoteError, match=rf"^remote 'local': directory {missing} does "
                                              r"not exist .*dvc remote modify --local local"):
            check_remote("local", root=source)
        missing.mkdir()
        check_remote("local", root=source)
    finally:
        (source / ".dvc" / "config.local").unlink()
    with pytest.raises(RemoteError, match=r"^remote 'nope' is not configured \(configured: "
                                          r"local, team\)"):
        check_remote("nope", root=source)
    with pytest.raises(RemoteError, match=r"^remote 'team': not inside a DVC repository"):
        check_remote("team", root=tmp_path)
