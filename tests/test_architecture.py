"""The code's shape: imports flow one way with no cycle, the library never imports a stage,
`COSE_*` settings are read in one place, and the library and the pipeline give the same
numbers by construction (cose.evaluate and the explain stage: identical per-pair tables)."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
import torch

from cose import closure

SRC = closure.SRC


def _graph() -> dict[str, set[str]]:
    mods = {closure._package_of(f): f for f in SRC.rglob("*.py") if "__pycache__" not in f.parts}
    return {name: {m for m in closure.imports_of(f) if m in mods and m != name}
            for name, f in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_import_graph_has_no_cycle():
    """Every import anywhere in a module counts (function-level ones too); importing a
    submodule is an edge to it, not to its package's __init__."""
    assert _cycles(_graph()) == []


def test_the_library_never_imports_a_stage():
    for name, deps in _graph().items():
        if name.startswith("cose.stages") or name == "cose.cli":
            continue
        assert not [d for d in deps if d.startswith("cose.stages")], name


def test_environment_settings_are_read_in_one_module():
    """COSE_* variables: cose.runtime reads them all (documented in its table)."""
    reads = re.compile(r"""(?:environ(?:\.get)?\(|environ\[|getenv\()\s*["'](COSE_\w+)""")
    where = {}
    for f in SRC.rglob("*.py"):
        for var in reads.findall(f.read_text()):
            where.setdefault(var, set()).add(f.relative_to(SRC).as_posix())
    assert where and all(files == {"runtime.py"} for files in where.values()), where
    from cose import runtime

    for var in where:
        assert var in runtime.SETTINGS, f"{var} is read but not in cose.runtime.SETTINGS"


@pytest.mark.parametrize("method", ["gradcam", "ig", "smoothgrad"])
def test_evaluate_and_the_explain_stage_give_identical_pairs(tmp_path, monkeypatch, method):
    """The same images, models and settings through cose.evaluate and through the explain
    stage's units: the same per-pair table, row for row, bit for bit."""
    import cose
    import cose.data as D
    import cose.models as M
    from cose import config
    from cose.stages import common, explain

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COSE_DEVICE", "cpu")
    D.fetch("digits", tmp_path / "data")
    d = tmp_path / "checkpoints" / "digits" / "demo_resnet"
    d.mkdir(parents=True)
    for i, name in enumerate(("final.pt", "random.pt", "epoch_001.pt")):
        torch.save(M.cose_checkpoint(M.create("demo_resnet", 10, seed=i)), d / name)
    settings = {"ig": {"steps": 4}, "smoothgrad": {"samples": 3}}.get(method, {})
    cfg = config.validate(config.from_dict({
        "datasets": ["digits"], "models": ["demo_resnet"], "methods": [method],
        "data": {"root": "data"}, "train": {"save_epochs": [1]},
        "explain": {"images": 4, "shard_size": 2, "magnitudes": 2, "sample_maps": 0,
                    "transforms": ["TranslateX", "Rotate", "FlipLR", "Contrast"],
                    "settings": {method: settings} if settings else {}}}))
    explain.release()
    try:
        stage = explain._run_units(cfg, "local")[0][("digits", "demo_resnet", method)]
    finally:
        explain.release()
    images, labels, ids = common.explain_subset(cfg, "digits", "demo_resnet")
    load = lambda name: M.create("demo_resnet", 10, weights=d / name)  # noqa: E731
    result = cose.evaluate(
        load("final.pt"), images, labels, methods=[method], transforms=cfg.explain.transforms,
        normalize="demo_resnet", random_model=load("random.pt"),
        checkpoints={"e001": load("epoch_001.pt")}, magnitudes=2, seed=cfg.explain.seed,
        settings={method: settings}, batch_size=cfg.explain.batch_size, ids=ids,
        chunk_size=cfg.explain.shard_size, sample_maps=0, dataset="digits",
        model_name="demo_resnet", progress=False)
    ours = result.pairs.reset_index(drop=True)
    pd.testing.assert_frame_equal(ours, stage[list(ours.columns)].reset_index(drop=True),
                                  check_exact=True)


def test_runtime_settings_parse_document_and_fail_in_one_line(monkeypatch):
    from cose import runtime

    rt = runtime.current({"COSE_DEVICE": "cpu", "COSE_PREFETCH": "0", "COSE_LOCK_WAIT": "2.5",
                          "COSE_RAY_CPUS": "3", "CI": "true", "COSE_LOG_LEVEL": "warning"})
    assert (rt.device, rt.prefetch, rt.lock_wait, rt.ray_cpus, rt.quiet, rt.log_level) == (
        "cpu", "off", 2.5, 3, True, "WARNING")
    assert not rt.prefetch_on("cuda") and runtime.current({}).prefetch_on("cuda")
    assert not runtime.current({}).prefetch_on("cpu")
    assert runtime.current({}).streams == "auto"
    assert runtime.current({"COSE_STREAMS": " 3 "}).streams == 3
    for var, bad, msg in (("COSE_RAY_CPUS", "two", "expected an integer >= 1"),
                          ("COSE_PREFETCH", "sometimes", "expected 1, 0 or auto"),
                          ("COSE_BACKEND", "spark", "expected one of local, ray"),
                          ("COSE_LOCK_WAIT", "-1", "expected seconds >= 0"),
                          ("COSE_STREAMS", "0", "expected auto or an integer >= 1"),
                          ("COSE_STREAMS", "many", "expected auto or an integer >= 1")):
        with pytest.raises(ValueError, match=f"^{var}: got '{bad}', {msg}$"):
            runtime.current({var: bad})
    doc = (closure.SRC.parent.parent / "docs" / "environment.md").read_text()
    assert runtime.table() in doc  # the documented table is the code's
    assert runtime.worker_env({"COSE_DEVICE": "cuda", "PATH": "/bin"}) == {"COSE_DEVICE": "cuda"}


def test_a_bad_environment_setting_is_one_line_from_the_cli(tmp_path):
    import subprocess
    import sys

    env = {"PATH": str(Path(sys.executable).parent), "COSE_RAY_CPUS": "two", "HOME": str(tmp_path)}
    res = subprocess.run([str(Path(sys.executable).parent / "cose"), "explain"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert res.stderr.strip() == "cose: error: COSE_RAY_CPUS: got 'two', expected an integer >= 1"
