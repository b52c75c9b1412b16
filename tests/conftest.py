"""Shared fixtures: a tiny, real project (git + DVC + MLflow store) made from this checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

torch.set_num_threads(2)

# The tiny config every pipeline test uses: two models, all seven methods, a few images.
TINY = {
    "models": ["demo_resnet", "demo_vit"],
    "train": {"epochs": 4, "save_epochs": [1, 2, 3], "max_train_images": 256},
    "explain": {"images": 2, "shard_size": 1, "magnitudes": 2, "sample_maps": 1,
                "transforms": ["TranslateX", "Rotate", "FlipLR", "Brightness", "Blur"],
                "settings": {"ig": {"steps": 4}, "smoothgrad": {"samples": 3},
                             "blur_ig": {"steps": 4}, "guided_ig": {"steps": 4},
                             "lime": {"samples": 20}}},
}


def tiny_params(extra: dict | None = None) -> dict:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in {**TINY, **(extra or {})}.items():
        if isinstance(values, dict) and isinstance(raw.get(section), dict):
            raw[section] = {**raw[section], **values}
        else:
            raw[section] = values
    return raw


def project_env(path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["CI"] = "true"
    env["COSE_DEVICE"] = "cpu"
    env["PYTHONPATH"] = str(path / "src")  # the project's own copy, not this checkout's
    env["GIT_AUTHOR_NAME"] = env["GIT_COMMITTER_NAME"] = "cose-tests"
    env["GIT_AUTHOR_EMAIL"] = env["GIT_COMMITTER_EMAIL"] = "tests@cose.invalid"
    env.pop("COSE_PROJECT_ROOT", None)
    return env


def sh(cmd: list[str] | str, cwd: Path, check: bool = True, timeout: float = 900,
       env: dict | None = None) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=cwd, env=env or project_env(cwd), capture_output=True,
                         text=True, timeout=timeout, shell=isinstance(cmd, str))
    if check and res.returncode != 0:
        raise AssertionError(
            f"{cmd} failed ({res.returncode})\nstdout:\n{res.stdout[-4000:]}\n"
            f"stderr:\n{res.stderr[-6000:]}"
        )
    return res


def make_project(dest: Path, params: dict | None = None) -> Path:
    """A git repo with this checkout's tracked files and tiny params (no data, no outputs)."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    untracked = subprocess.run(["git", "ls-files", "-z", "--others", "--exclude-standard"],
                               cwd=ROOT, capture_output=True, check=True).stdout.decode()
    for rel in [f for f in files + untracked.split("\0") if f]:
        src = ROOT / rel
        if not src.is_file() or rel.startswith("tests/"):
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel)
    (dest / "params.yaml").write_text(yaml.safe_dump(params or tiny_params(), sort_keys=False))
    sh(["git", "init", "-q", "-b", "main"], dest)
    sh(["git", "add", "-A"], dest)
    sh(["git", "commit", "-qm", "tiny project"], dest)
    return dest


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory) -> Path:
    """A tiny project after `cose data fetch digits` and a full `dvc repro` (read-only use)."""
    path = make_project(tmp_path_factory.mktemp("tiny") / "proj")
    sh(["cose", "data", "fetch", "digits"], path)
    sh(["dvc", "repro"], path)
    return path
