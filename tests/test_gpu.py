"""The GPU benchmark script (its CPU smoke run) and the CUDA parity of the explain unit.

(a) `benchmarks/explain_gpu.py --smoke` runs every code path on the CPU with a tiny model and
    writes a JSON whose schema and numbers are checked here.
(b) On a CUDA machine (marked `gpu`, skipped elsewhere): `cose.engine.explain_unit` on CUDA vs
    on the CPU, same models, images and settings, for each of the seven methods: every map
    whose explained class agrees has Pearson >= 0.99 with its CPU twin, and every pair's SSIM
    agrees within 1e-3. Strict fp32 (no TF32) on both sides: TF32 and bf16 are measured by the
    benchmark (`--precision`), not asserted here.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cose import models as M
from cose import saliency
from cose.engine import explain_unit

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "explain_gpu.py"


def _bench():
    """benchmarks/explain_gpu.py as a module (it is a script, not part of the package)."""
    if "explain_gpu" in sys.modules:
        return sys.modules["explain_gpu"]
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("explain_gpu", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["explain_gpu"] = mod
    spec.loader.exec_module(mod)
    return mod


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0


# ----------------------------------------------------------------------------- (a) smoke


def _smoke(out: Path, *extra: str) -> subprocess.CompletedProcess:
    """`explain_gpu.py --smoke ... --json out` in a subprocess; it must succeed."""
    pytest.importorskip("pytorch_grad_cam")
    pytest.importorskip("saliency.core")
    pytest.importorskip("lime")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    res = subprocess.run([sys.executable, str(SCRIPT), "--smoke", *extra, "--json", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def test_smoke_run_writes_the_schema(tmp_path):
    out = tmp_path / "smoke.json"
    res = _smoke(out)
    assert "SMOKE, not a result" in res.stdout
    data = json.loads(out.read_text())

    assert data["schema"] == "cose.explain_gpu/1"
    assert set(data) >= {"meta", "limits", "rows", "skipped", "projection",
                         "grid_mean_of_models", "recommendations"}
    meta = data["meta"]
    assert meta["smoke"] is True and meta["complete"] is True and meta["device"] == "cpu"
    assert meta["precisions"] == ["fp32", "bf16"]
    assert meta["device_name"] and meta["torch"]
    for key in ("maps_per_image", "unit_batch_size", "saliency_batch_size", "limit_batch",
                "budget_s", "elapsed_s"):
        assert _positive(meta[key]), key
    assert not meta["over_budget"]

    assert len(data["limits"]) == 2  # one model x two precisions
    for lm in data["limits"]:
        assert _positive(lm["fwd_bwd_img_s"]) and _positive(lm["fwd_img_s"])
        assert _positive(lm["batch"])
        # forward+backward at the curve's batches and the limit's (the smoke's is 8)
        curve = lm["fwd_bwd_img_s_by_batch"]
        assert list(curve) == ["8", "16", "50", "64", "256"] and all(_positive(v) for v in curve.values())
        assert curve["8"] == lm["formats"]["nchw"]["fwd_bwd_img_s"]

    # every method at both precisions, none skipped (the smoke budget is loose)
    assert data["skipped"] == []
    got = {(r["method"], r["precision"]) for r in data["rows"]}
    assert got == {(m, p) for m in saliency.METHODS for p in ("fp32", "bf16")}
    for r in data["rows"]:
        assert r["status"] == "ok"
        for key in ("images", "maps", "maps_per_image", "ours_s", "ours_s_per_map",
                    "passes_per_map", "limit_img_s", "pct_of_limit", "reference_maps",
                    "reference_s_per_map", "reference_map_only_s_per_map", "speedup",
                    "unit_batch_size", "saliency_batch_size"):
            assert _positive(r[key]), (r["method"], r["precision"], key, r[key])
        assert r["maps"] == r["images"] * r["maps_per_image"] == r["images"] * meta[
            "maps_per_image"]
        assert r["limit_kind"] == ("fwd_img_s" if r["method"] == "lime" else "fwd_bwd_img_s")
        assert set(r["flags"]) == {"matmul_allow_tf32", "cudnn_allow_tf32"}
        if r["method"] == "lime":
            assert _positive(r["pct_of_limit_with_segmentation"])
        # the share inside the model passes: for the methods that call prob_grad
        if r["method"] in ("ig", "smoothgrad", "blur_ig", "guided_ig"):
            assert 0 < r["pass_share"] < 1 and 0 < r["pass_s"] < r["ours_s"]
        else:
            assert r["pass_share"] is None and r["pass_s"] is None
        # every unit maps its model variants two at a time (the smoke's --streams)
        assert r["streams"] == 2 and r["variant_workers"] == 2
        if r["precision"] == "fp32":
            assert r["parity_vs_fp32"] is None
            # and the fp32 unit's model variants alone: one at a time, then two at once
            mv = r["model_variants"]
            assert (mv["images"], mv["models"], mv["workers"]) == (r["images"], 3, 2)
            assert _positive(mv["one_at_a_time_s"]) and _positive(mv["at_once_s"])
            assert mv["speedup"] == pytest.approx(mv["one_at_a_time_s"] / mv["at_once_s"])
            assert mv["identical"] is True and mv["ssim_max_abs_diff"] == 0
        else:  # compared with the fp32 run of the same images
            assert r["model_variants"] is None
            par = r["parity_vs_fp32"]
            assert par["maps"] == r["maps"] and par["maps_compared"] >= 1
            assert -1.0 <= par["pearson_min"] <= par["pearson_mean"] <= 1.0
            assert par["ssim_max_abs_diff"] >= 0
            # validated by what COSE reports: every pair is scored (labels = predictions)
            assert par["pairs_scored"] > 0 and par["class_flip_fraction"] == 0
            assert par["cose_agrees"] == (max(par["delta_cose"], par["delta_consistency"],
                                              par["delta_sensitivity"]) <= 0.005)
            assert 0 <= par["ssim_diff_p50"] <= par["ssim_diff_p99"] <= par[
                "ssim_max_abs_diff"] + 1e-12

    assert {p["precision"] for p in data["projection"]} == {"fp32", "bf16", "auto"}
    auto = next(p for p in data["projection"] if p["precision"] == "auto")
    assert auto["chosen"] == data["fastest"] and auto["complete"]
    for p in data["projection"]:
        assert p["complete"] and p["missing"] == []
        if p["precision"] == "auto":
            continue
        for key in ("ours_h_per_dataset_model", "reference_h_per_dataset_model",
                    "ours_h_grid", "reference_h_grid"):
            assert _positive(p[key]), key
        assert p["ours_h_grid"] == pytest.approx(65 * p["ours_h_per_dataset_model"], rel=1e-3)
    assert [g["precision"] for g in data["grid_mean_of_models"]] == ["fp32", "bf16", "auto"]
    assert [r["precision"] for r in data["recommendations"]] == ["bf16"]
    recommended = data["recommendations"][0]["recommended_for"]
    assert data["validated"] == [["bf16", m] for m in recommended]  # one model: the same
    by = {(r["method"], r["precision"]): r for r in data["rows"]}
    for m, prec in data["fastest"].items():  # auto's choice: the fastest validated one when
        t32 = by[(m, "fp32")]["ours_s_per_map"]  # it beats fp32 by 5%, else fp32
        faster = [by[(m, p)]["ours_s_per_map"] for p, m2 in data["validated"]
                  if m2 == m and by[(m, p)]["ours_s_per_map"] <= 0.95 * t32]
        assert by[(m, prec)]["ours_s_per_map"] == (min(faster) if faster else t32)
    assert "cose.precision.VALIDATED candidates" in res.stdout
    assert "with 2 at once" in res.stdout and "records identical" in res.stdout


def test_smoke_run_skips_what_the_budget_does_not_fit(tmp_path):
    out = tmp_path / "skip.json"
    res = _smoke(out, "--budget-s", "0.5")
    data = json.loads(out.read_text())
    assert data["rows"] == [] and data["projection"] == []
    assert len(data["skipped"]) == 2 * len(saliency.METHODS)
    assert all(s["reason"].startswith("budget:") for s in data["skipped"])
    assert data["meta"]["complete"] and data["meta"]["over_budget"]
    assert "skipped" in res.stdout


def test_unit_sizes_and_the_planner():
    """Each item is measured on its full unit or skipped: a short budget measures fewer items
    at the stated size, never every item at one image."""
    bench = _bench()
    auto = bench.images_per_method("auto", list(saliency.METHODS))
    # a full unit of the presets (GuidedIG at 8 of its steps, scaled in the projection)
    assert auto["gradcam"] == auto["gradcampp"] == auto["guided_ig"] == 50
    assert all(auto[m] >= 16 for m in ("ig", "smoothgrad", "blur_ig"))
    assert auto["lime"] == 4
    assert bench.BENCH_SETTINGS == {"guided_ig": {"steps": 8}}
    assert bench.images_per_method("ig=32,lime=4", ["ig", "lime"]) == {"ig": 32, "lime": 4}
    assert bench.images_per_method("24", ["ig", "lime"]) == {"ig": 24, "lime": 24}
    with pytest.raises(SystemExit, match="ig=4: cheap methods need at least 16"):
        bench.images_per_method("ig=4", ["ig"])
    with pytest.raises(SystemExit, match="expected auto, N or method=N"):
        bench.images_per_method("foo=3", ["ig"])
    assert bench.images_per_method("2", ["ig"], smoke=True) == {"ig": 2}
    # greedy in order: an item that does not fit is skipped whole, later ones still run
    assert bench.plan_items([1.0, 1.0, 5.0, 1.0], 3.5) == [True, True, False, True]
    assert bench.plan_items([4.0], 4.0) == [False]  # the 10% margin
    assert bench.plan_items([], 1.0) == []


def test_stream_and_variant_options():
    bench = _bench()
    args = bench.parse([])
    assert args.streams == "auto" and args.variants == {"gradcam", "gradcampp", "guided_ig"}
    args = bench.parse(["--streams", "3", "--variants", "none"])
    assert args.streams == 3 and args.variants == set()
    assert bench.parse(["--variants", "all"]).variants == set(saliency.METHODS)
    with pytest.raises(SystemExit, match="^--variants: unknown bogus; allowed: gradcam"):
        bench.parse(["--variants", "ig,bogus"])
    with pytest.raises(SystemExit, match="^--streams: expected auto or an integer >= 1"):
        bench.parse(["--streams", "two"])


def test_pass_time_counts_overlapping_passes_once():
    """Model variants at once overlap their passes: the union counts, so the share of the
    unit's wall time stays a share."""
    union = _bench().union_length
    assert union([]) == 0.0
    assert union([(3.0, 4.0), (0.0, 1.0), (0.5, 2.0), (3.5, 3.7)]) == pytest.approx(3.0)
    assert union([(0.0, 1.0), (1.0, 2.0), (0.0, 2.0)]) == pytest.approx(2.0)


def test_passes_per_map_match_the_reference_count():
    bench = _bench()
    for m in saliency.METHODS:
        assert bench.passes_per_map(m, {}) == bench.SP.PASSES[m]
    import cose.transforms as T

    assert bench.maps_per_image(T.TRANSFORMS, 6, 10) == 60  # the paper's ~60 maps per image


def test_fastest_keeps_fp32_unless_clearly_faster():
    bench = _bench()

    def row(m, p, t, model="a"):
        return {"method": m, "precision": p, "ours_s_per_map": t, "model": model}

    rows = [row("ig", "fp32", 1.0), row("ig", "bf16", 0.5), row("ig", "reference", 0.97),
            row("lime", "fp32", 1.0), row("lime", "reference", 0.97),
            row("gradcam", "fp32", 1.0), row("gradcam", "bf16", 0.3)]
    valid = [["bf16", "ig"], ["reference", "ig"], ["reference", "lime"]]
    assert bench.fastest(rows, valid, ["a"], ["ig", "lime", "gradcam"]) == {
        "ig": "bf16", "lime": "fp32", "gradcam": "fp32"}  # 3% is noise; gradcam: not valid
    assert bench.fastest(rows, valid, ["a", "b"], ["ig"]) == {}  # not measured on b


def test_validated_pairs_need_every_measured_model():
    bench = _bench()
    recs = [{"model": "a", "precision": "bf16", "recommended_for": ["smoothgrad", "lime"]},
            {"model": "b", "precision": "bf16", "recommended_for": ["ig", "lime"]},
            {"model": "a", "precision": "tf32", "recommended_for": ["gradcam", "ig"]}]
    assert bench.validated(recs, ["a", "b"]) == [["bf16", "lime"]]  # tf32: b not measured
    assert bench.validated(recs, ["a"]) == [["bf16", "smoothgrad"], ["bf16", "lime"],
                                            ["tf32", "gradcam"], ["tf32", "ig"]]
    assert bench.validated([], ["a"]) == []


def test_compare_units_finds_identical_runs_identical():
    bench = _bench()
    torch.manual_seed(0)
    model = M.create("demo_resnet", 10, seed=0)
    x = torch.rand(2, 3, 32, 32)
    kw = dict(transforms=("FlipLR", "Rotate", "Brightness"), magnitudes=2, keep_samples=2,
              settings={"steps": 3})
    y = torch.zeros(2, dtype=torch.long)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny work: two threads only add OpenMP stalls on a busy CPU
    try:
        a = explain_unit(model, x, y, [0, 1], "ig", lambda t: t, **kw)
        b = explain_unit(model, x, y, [0, 1], "ig", lambda t: t, **kw)
    finally:
        torch.set_num_threads(threads)
    par = bench.compare_units(a, b)
    assert par["maps_compared"] == par["maps"] == 2 * (1 + 1 + 2 + 2)  # original, FlipLR, 2+2
    assert par["pearson_min"] == pytest.approx(1.0)
    assert par["ssim_max_abs_diff"] == 0 and par["maps_class_flips"] == 0


# ----------------------------------------------------------------------------- (b) CUDA parity

PARITY_SETTINGS = {
    "ig": {"steps": 8},
    "smoothgrad": {"samples": 8},
    "blur_ig": {"steps": 8},
    "guided_ig": {"steps": 16},
    "lime": {"samples": 100},
}
_MODELS: dict[str, tuple] = {}


def _models(name: str):
    """(model, random, checkpoints) on the CPU, built once per model name."""
    if name not in _MODELS:
        model = M.create(name, 10, seed=0)
        rand = M.create(name, 10, seed=1)
        ckpts = {f"mid_ckpt_e{e:03d}": M.create(name, 10, seed=10 + e) for e in (1, 3)}
        _MODELS[name] = (model, rand, ckpts)
    return _MODELS[name]


@pytest.fixture
def strict_fp32():
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("model_name", ["demo_resnet", "demo_vit"])
@pytest.mark.parametrize("method", saliency.METHODS)
def test_explain_unit_on_cuda_matches_cpu(method, model_name, strict_fp32):
    if method == "lime":
        pytest.importorskip("lime")
    bench = _bench()
    model, rand, ckpts = _models(model_name)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 32, 32, generator=g)
    images = torch.nn.functional.avg_pool2d(images, 3, 1, 1)  # smoother, image-like
    labels = torch.tensor([0, 1, 2])

    def run(device: str):
        dev = torch.device(device)
        cp = {k: copy.deepcopy(v).to(dev) for k, v in ckpts.items()}
        return explain_unit(
            copy.deepcopy(model).to(dev), images.to(dev), labels.to(dev), [0, 1, 2], method,
            lambda t: M.normalize(t, model_name), random_model=copy.deepcopy(rand).to(dev),
            checkpoints=cp, settings=PARITY_SETTINGS.get(method, {}), keep_samples=3,
        )

    cpu, cuda = run("cpu"), run("cuda")
    par = bench.compare_units(cpu, cuda)
    # a near-tie logit may pick another class on another device; those maps explain another
    # class and are left out, but they must stay rare
    assert par["maps_class_flips"] <= 0.05 * par["maps"], par
    assert par["maps_compared"] >= 0.95 * par["maps"], par
    assert par["pearson_min"] >= 0.99, par
    assert par["ssim_max_abs_diff"] <= 1e-3, par
    assert par["ssim_nan_on_one_side"] == 0, par


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["reference", "bf16"])
def test_fast_precisions_run_conv_nets_channels_last_on_cuda(precision):
    """At reference/tf32/bf16 a conv net's passes run a channels_last copy on CUDA: the unit
    runs, its predictions are fp32 (no class flips), and its maps follow the fp32 unit's (a
    sanity bound: the benchmark validates precisions by COSE)."""
    from cose import precision as P
    from cose.saliency import _core

    bench = _bench()
    model, rand, ckpts = _models("demo_resnet")
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    images = torch.nn.functional.avg_pool2d(torch.rand(3, 3, 32, 32, generator=g), 3, 1, 1)
    m = copy.deepcopy(model).to(dev)
    x = M.normalize(images.to(dev), "demo_resnet")
    assert P.layout(precision, "ig", m, "cuda") == "channels_last"
    run = P.wrap(m, precision, "ig", x[:1])
    assert any(isinstance(k, _core.ChannelsLast) for k in run.modules())

    def unit(prec: str):
        return explain_unit(
            m, images.to(dev), torch.zeros(3, dtype=torch.long, device=dev), [0, 1, 2], "ig",
            lambda t: M.normalize(t, "demo_resnet"), random_model=copy.deepcopy(rand).to(dev),
            checkpoints={k: copy.deepcopy(v).to(dev) for k, v in ckpts.items()},
            settings={"steps": 8}, keep_samples=3, precision=prec)

    par = bench.compare_units(unit("fp32"), unit(precision))
    assert par["maps_class_flips"] == 0 and par["maps_compared"] == par["maps"], par
    assert par["pearson_mean"] >= 0.9, par


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", saliency.METHODS)
def test_model_variants_on_side_streams_match_one_at_a_time(method, strict_fp32):
    """The model variants mapped four at a time, each on its own CUDA stream, against one at
    a time on the default stream: the same kernels, so the same records (up to cuDNN picking
    another algorithm when less memory is free: a bound far below the CPU parity's)."""
    if method == "lime":
        pytest.importorskip("lime")
    bench = _bench()
    model, rand, ckpts = _models("demo_resnet")
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    images = torch.nn.functional.avg_pool2d(torch.rand(6, 3, 32, 32, generator=g), 3, 1, 1)
    more = {**ckpts, **{f"mid_ckpt_e{e:03d}": M.create("demo_resnet", 10, seed=10 + e)
                        for e in (5, 7, 9)}}

    def unit(streams: int):
        return explain_unit(
            copy.deepcopy(model).to(dev), images.to(dev), torch.zeros(6, dtype=torch.long,
                                                                      device=dev),
            list(range(6)), method, lambda t: M.normalize(t, "demo_resnet"),
            transforms=("Rotate",), magnitudes=1, random_model=copy.deepcopy(rand).to(dev),
            checkpoints={k: copy.deepcopy(v).to(dev) for k, v in more.items()},
            settings=PARITY_SETTINGS.get(method, {}), keep_samples=6, streams=streams,
            noise_floor=saliency.get(method).spec.stochastic)

    par = bench.compare_units(unit(1), unit(4))
    assert par["maps_class_flips"] == 0 and par["maps_compared"] == par["maps"], par
    assert par["ssim_max_abs_diff"] <= 1e-5 and par["pearson_min"] >= 0.9999, par


# ----------------------------------------------------------------------------- (c) ViT-L memory

_VIT_L: list[torch.nn.Module] = []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "method,settings", [("gradcam", {}), ("ig", {"steps": 1}), ("guided_ig", {"steps": 2})]
)
def test_vit_l16_unit_fits_an_80gb_card(method, settings, strict_fp32):
    """The paper's unit on ViT-L/16 at 224 px: every variant (13 transforms x 6 magnitudes,
    the random model, 10 checkpoints, all twelve models resident), the pipeline's unit batch
    256 and the GPU saliency batch (64 inputs per pass). Fewer steps than the reference: the
    peak is per pass and per image, not per step. It must stay well inside an 80 GB card.
    With COSE_GPU_REPORT=<dir> the peak is written there (docs/gpu.md)."""
    dev = torch.device("cuda")
    if not _VIT_L:
        _VIT_L.append(M.create("vit_l16", 1000, seed=0).to(dev))
        _VIT_L.extend(copy.deepcopy(_VIT_L[0]) for _ in range(11))
    model, rand, *ckpts = _VIT_L
    g = torch.Generator(device=dev).manual_seed(0)
    images = torch.rand(8, 3, 224, 224, device=dev, generator=g)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated()
    res = explain_unit(
        model, images, torch.zeros(8, dtype=torch.long, device=dev), list(range(8)), method,
        lambda t: M.normalize(t, "vit_l16"), random_model=rand,
        checkpoints={f"mid_ckpt_e{i:03d}": m for i, m in enumerate(ckpts, 1)},
        settings=settings, batch_size=256, keep_samples=2,
    )
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    assert len(res.pairs) == 8 * 59  # 48 transform variants + random + 10 checkpoints
    report = {"method": method, "settings": settings, "images": 8, "unit_batch_size": 256,
              "saliency_batch_size": saliency.auto_batch_size(method, "cuda"),
              "resident_gib": resident / 2**30, "peak_gib": peak / 2**30,
              "card": torch.cuda.get_device_name(), "torch": torch.__version__}
    if os.environ.get("COSE_GPU_REPORT"):
        out = Path(os.environ["COSE_GPU_REPORT"]) / f"vit_l16_memory_{method}.json"
        out.write_text(json.dumps(report, indent=1))
    assert peak < 72 * 2**30, report
