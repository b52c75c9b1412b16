"""The Ray executor: same results as `local`, one model load per worker, GPU scheduling.

- `COSE_BACKEND=ray dvc repro explain` on a local 2-CPU Ray cluster (started by the executor
  on loopback) writes the same explain output as the local run of test_resilience's reference
  project, byte for byte, so DVC sees nothing to do afterwards (the backend is not a param);
- on a Ray cluster that declares two GPUs, the executor starts one actor per GPU, each sees
  only its own device, and `COSE_DEVICE=cuda:N` becomes `cuda` inside the actor; with
  `COSE_DEVICE=cpu` it requests no GPU;
- backend selection by flag or `COSE_BACKEND`, and bad worker counts, fail clearly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from conftest import sh
from test_resilience import (
    UNITS,
    assert_pairs_equal,
    copy_project,
    env_for,
    lock_md5,
    reproduced_project,
    tree_bytes,
)


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> Path:
    return reproduced_project(tmp_path_factory)


@pytest.mark.slow
def test_ray_backend_gives_the_local_results(reference, tmp_path):
    proj = copy_project(reference, tmp_path / "proj")
    shutil.rmtree(proj / "outputs" / "explain")
    env = env_for(proj, COSE_BACKEND="ray", COSE_RAY_CPUS="2", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    res = sh(["dvc", "repro", "explain"], proj, env=env)
    out = res.stdout + res.stderr
    assert "Running stage 'explain'" in out
    assert f"explain: ran {UNITS} units on backend ray: 2 workers, 2 model loads" in out, out
    assert_pairs_equal(proj, reference)
    assert tree_bytes(proj / "outputs" / "explain") == tree_bytes(
        reference / "outputs" / "explain")
    # switching the backend does not invalidate DVC's cache: compile stays up to date
    assert (lock_md5(proj, "explain", "outputs/explain")
            == lock_md5(reference, "explain", "outputs/explain"))
    assert json.loads(sh(["dvc", "status", "--json"], proj, env=env).stdout or "{}") == {}
    summary = pd.read_csv(proj / "results" / "summary.csv")
    assert len(summary) == 3


@pytest.mark.slow
def test_one_actor_per_gpu_each_on_its_own_device(tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    from cose.backends.ray import RayExecutor

    def probe(unit, cfg, root):  # runs in the actor (pickled by value)
        import os

        import ray as ray_

        return {"unit": unit, "worker": os.getpid(), "gpus": list(ray_.get_gpu_ids()),
                "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "device": os.environ.get("COSE_DEVICE"), "cwd": os.getcwd(),
                "cfg": cfg, "root": root}

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1")  # two declared (logical) GPUs
    try:
        monkeypatch.setenv("COSE_DEVICE", "cuda:1")
        got = list(RayExecutor().run(probe, list(range(6)), {"k": 1}))
        assert sorted(r["unit"] for r in got) == list(range(6))
        by_worker = {r["worker"]: r for r in got}
        assert len(by_worker) == 2  # one actor per GPU
        assert sorted(r["gpus"][0] for r in by_worker.values()) == [0, 1]
        for r in got:
            assert len(r["gpus"]) == 1 and r["visible"] == str(r["gpus"][0])
            assert r["device"] == "cuda"  # cuda:1 would not exist with one visible device
            assert Path(r["cwd"]) == tmp_path.resolve() == Path(r["root"])
            assert r["cfg"] == {"k": 1}

        monkeypatch.setenv("COSE_DEVICE", "cpu")
        got = list(RayExecutor(workers=2).run(probe, list(range(4)), {}))
        assert all(r["gpus"] == [] and r["device"] == "cpu" for r in got)
        assert len({r["worker"] for r in got}) == 2
        assert ray.is_initialized()  # a cluster the caller started is left running
    finally:
        ray.shutdown()


def test_backend_is_a_flag_or_env_choice(monkeypatch):
    from cose import backends
    from cose.cli import build_parser

    monkeypatch.delenv("COSE_BACKEND", raising=False)
    assert backends.get().name == "local"
    monkeypatch.setenv("COSE_BACKEND", "ray")
    assert backends.get().name == "ray"
    assert backends.get("local").name == "local"  # the flag wins over the env
    with pytest.raises(ValueError, match="backend: unknown value 'spark'; allowed: local, ray"):
        backends.get("spark")
    assert build_parser().parse_args(["explain", "--backend", "ray"]).backend == "ray"
    monkeypatch.setenv("COSE_RAY_WORKERS", "0")
    with pytest.raises(ValueError, match="COSE_RAY_WORKERS: got '0'"):
        backends.get("ray")
    monkeypatch.setenv("COSE_RAY_WORKERS", "2")
    monkeypatch.setenv("COSE_RAY_THREADS", "many")
    with pytest.raises(ValueError, match="COSE_RAY_THREADS: got 'many'"):
        backends.get("ray")
