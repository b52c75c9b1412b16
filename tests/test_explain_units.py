"""The explain stage's units, run in process as its executors run them.

- Which units a config makes: per-method image counts (`explain.images_by_method`).
- Context loads: the next (dataset, model) is loaded in the background while the current one
  computes (`COSE_PREFETCH`), with the same results, load errors raised by the unit that needs
  the data, and checkpoints changed meanwhile loaded again.

A real project layout in a temp folder: the digits export and COSE checkpoints of two demo
models (final, random-init, one epoch), written directly instead of trained.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

import cose.data as D
import cose.models as M
from cose import config
from cose.stages import explain

torch.set_num_threads(2)
MODELS = ("demo_resnet", "demo_vit")


def _write_checkpoints(root: Path, model: str, seed: int) -> None:
    d = root / "checkpoints" / "digits" / model
    d.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(("final.pt", "random.pt", "epoch_001.pt")):
        torch.save(M.cose_checkpoint(M.create(model, 10, seed=seed + i)), d / name)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    D.fetch("digits", root)
    return root


@pytest.fixture
def project(tmp_path, data_root, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COSE_DEVICE", "cpu")
    for i, model in enumerate(MODELS):
        _write_checkpoints(tmp_path, model, 10 * i)
    cfg = config.from_dict({
        "datasets": ["digits"], "models": list(MODELS), "methods": ["gradcam", "ig"],
        "data": {"root": str(data_root)}, "train": {"save_epochs": [1]},
        "explain": {"images": 2, "shard_size": 1, "magnitudes": 1, "sample_maps": 1,
                    "transforms": ["Rotate", "FlipLR", "Brightness"],
                    "settings": {"ig": {"steps": 4}}},
    })
    explain.release()
    yield tmp_path, cfg
    explain.release()


def _counts() -> tuple[int, int]:
    """This process's context loads so far, and how many of them were prefetched."""
    return explain.WORKER.loads, explain.WORKER.prefetched


def _since(before: tuple[int, int], result: dict) -> tuple[int, int]:
    return result["loads"] - before[0], result["prefetched"] - before[1]


def _run(cfg, monkeypatch, prefetch: str) -> tuple[dict[str, bytes], tuple[int, int]]:
    """Every unit through the executor's call, as `explain.run` makes it: the shards' bytes,
    and the (loads, prefetched loads) it took."""
    monkeypatch.setenv("COSE_PREFETCH", prefetch)
    explain.release()
    before = _counts()
    units = explain.plan(cfg)
    results = [explain.run_job(job, cfg.to_dict()) for job in explain.jobs(units)]
    shards = {u.key: u.parquet.read_bytes() for u in units}
    return shards, _since(before, results[-1])


def test_images_by_method_explains_the_first_n_images_with_the_same_shards(project, monkeypatch):
    _, cfg = project
    all_images, _ = _run(cfg, monkeypatch, "0")
    fewer = config.from_dict({**cfg.to_dict(), "explain": {
        **cfg.to_dict()["explain"], "images_by_method": {"ig": 1}}})
    units = explain.plan(fewer)
    assert [(u.model, u.method, u.start, u.stop) for u in units] == [
        (m, meth, s, s + 1) for m in MODELS for meth, shards in (("gradcam", 2), ("ig", 1))
        for s in range(shards)]
    # the count is not part of a shard's fingerprint: the first ig shard is kept, not redone
    assert {u.key: u.fingerprint for u in units} == {
        u.key: u.fingerprint for u in explain.plan(cfg) if u.key in {v.key for v in units}}
    explain._prune(units)
    assert not any(u.parquet.exists() for u in explain.plan(cfg) if u.key not in
                   {v.key for v in units})
    assert all(explain.shard_ok(u) for u in units)
    fewer_images, _ = _run(fewer, monkeypatch, "0")
    assert fewer_images == {k: v for k, v in all_images.items() if k in fewer_images}
    assert len(fewer_images) == 6


def test_jobs_name_the_next_other_dataset_model():
    def unit(d, m, s):
        return explain.Unit(d, m, "gradcam", s, s, s + 1, "fp")

    a0, a1, b0, c0, c1 = (unit("x", "a", 0), unit("x", "a", 1), unit("x", "b", 0),
                          unit("y", "a", 0), unit("y", "a", 1))
    assert explain.jobs([a0, a1, b0, c0, c1]) == [
        (a0, ("x", "b")), (a1, ("x", "b")), (b0, ("y", "a")), (c0, None), (c1, None)]
    assert explain.jobs([a0, b0, a1]) == [(a0, ("x", "b")), (b0, ("x", "a")), (a1, None)]
    assert explain.jobs([]) == []


def test_prefetch_loads_the_next_model_during_compute_with_the_same_results(
        project, monkeypatch):
    _, cfg = project
    events: list[tuple] = []
    real_load, real_unit = explain._load_host, None
    import cose.engine as engine

    real_unit = engine.explain_unit

    def load(cfg_, dataset, model):
        events.append(("load", model, threading.current_thread().name, time.perf_counter()))
        return real_load(cfg_, dataset, model)

    def unit(model, images, *args, **kwargs):
        out = real_unit(model, images, *args, **kwargs)
        events.append(("unit", model.cose_meta["model"], time.perf_counter()))
        return out

    monkeypatch.setattr(explain, "_load_host", load)
    monkeypatch.setattr(engine, "explain_unit", unit)
    with_prefetch, counts = _run(cfg, monkeypatch, "1")
    loads = [e for e in events if e[0] == "load"]
    assert [(e[1], e[2].startswith("cose-prefetch")) for e in loads] == [
        ("demo_resnet", False), ("demo_vit", True)]
    # the ViT's load began while demo_resnet's units were still running
    last_resnet_unit = max(e[2] for e in events if e[0] == "unit" and e[1] == "demo_resnet")
    assert loads[1][3] < last_resnet_unit
    assert counts == (2, 1)

    events.clear()
    without, counts = _run(cfg, monkeypatch, "0")
    assert [(e[1], e[2]) for e in events if e[0] == "load"] == [
        ("demo_resnet", "MainThread"), ("demo_vit", "MainThread")]
    assert counts == (2, 0)
    assert len(with_prefetch) == 8 and with_prefetch == without


def test_a_failed_prefetch_fails_the_unit_that_needs_it(project, monkeypatch):
    root, cfg = project
    (root / "checkpoints" / "digits" / "demo_vit" / "epoch_001.pt").write_bytes(b"not torch")
    monkeypatch.setenv("COSE_PREFETCH", "1")
    units = explain.plan(cfg)
    jobs = explain.jobs(units)
    for job in jobs[:4]:  # demo_resnet's units finish while the ViT's load fails behind them
        assert explain.run_job(job, cfg.to_dict())["rows"] > 0
    assert explain.WORKER.pending  # the failed load is still waiting for its unit
    with pytest.raises(ValueError, match=r"epoch_001\.pt: cannot be read as a weights-only"):
        explain.run_job(jobs[4], cfg.to_dict())
    assert all(explain.shard_ok(u) for u in units[:4])
    assert not any(explain.shard_ok(u) for u in units[4:])


def test_checkpoints_changed_after_the_prefetch_are_loaded_again(project, monkeypatch):
    root, cfg = project
    monkeypatch.setenv("COSE_PREFETCH", "1")
    jobs = explain.jobs(explain.plan(cfg))
    for job in jobs[:4]:
        explain.run_job(job, cfg.to_dict())
    next(iter(explain.WORKER.pending.values())).result()  # the old ViT checkpoints are loaded
    _write_checkpoints(root, "demo_vit", 99)  # e.g. retrained meanwhile
    new_jobs = explain.jobs(explain.plan(cfg))
    before = _counts()
    res = [explain.run_job(job, cfg.to_dict()) for job in new_jobs[4:]]
    assert _since(before, res[-1]) == (1, 0)  # loaded again; the prefetched models dropped
    got = {u.key: u.parquet.read_bytes() for u, _ in new_jobs[4:]}

    fresh, _ = _run(cfg, monkeypatch, "0")
    assert got == {k: fresh[k] for k in got}


def test_prefetch_setting(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for raw, on_cpu, on_cuda in (("", False, True), ("auto", False, True), ("1", True, True),
                                 ("on", True, True), ("0", False, False), ("off", False, False)):
        monkeypatch.setenv("COSE_PREFETCH", raw)
        assert (explain.prefetch_enabled(cpu), explain.prefetch_enabled(cuda)) == (on_cpu,
                                                                                    on_cuda)
    monkeypatch.setenv("COSE_PREFETCH", "sometimes")
    with pytest.raises(ValueError, match="COSE_PREFETCH: got 'sometimes', expected 1, 0 or auto"):
        explain.prefetch_enabled(cpu)


def test_context_load_benchmark_runs_and_checks_its_models(tmp_path):
    """benchmarks/context_load.py on two small checkpoints per model (its numbers mean
    nothing here; the models it times must equal create()'s, or it exits 1)."""
    import json
    import subprocess
    import sys

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "context_load.py"
    out = tmp_path / "ctx.json"
    res = subprocess.run([sys.executable, str(script), "--models", "demo_swin,demo_vit",
                          "--checkpoints", "2", "--repeats", "1", "--units", "3",
                          "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["checkpoints"], r["identical"]) for r in rows] == [
        ("demo_swin", 2, True), ("demo_vit", 2, True)]
    assert all(r["switch_s"] is None for r in rows)  # the GPU columns need --device cuda
    assert "| demo_swin | 2 (" in res.stdout


def test_auto_precision_fingerprints_the_resolved_precision(project, monkeypatch):
    """explain.precision auto: a unit's fingerprint holds the precision its method resolves
    to, so auto equals fp32 while nothing is validated, and a validated pair recomputes that
    method's units only."""
    from cose import precision

    _, cfg = project

    def fps(c) -> dict[str, str]:
        return {u.key: u.fingerprint for u in explain.plan(c)}

    def with_precision(p: str):
        return config.from_dict({**cfg.to_dict(), "explain": {**cfg.to_dict()["explain"],
                                                              "precision": p}})

    assert cfg.explain.precision == "auto"
    auto, fp32, bf16 = fps(cfg), fps(with_precision("fp32")), fps(with_precision("bf16"))
    assert auto == fp32 and all(auto[k] != bf16[k] for k in auto)
    monkeypatch.setattr(precision, "VALIDATED", frozenset({("bf16", "ig")}))
    now = fps(cfg)
    assert {k for k in now if now[k] != auto[k]} == {k for k in now if "/ig/" in k}
    assert all(now[k] == bf16[k] for k in now if "/ig/" in k)
