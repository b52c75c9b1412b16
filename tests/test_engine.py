"""cose.engine.explain_unit: every record is what the primitives give for its one image, the
variants stream through in batches of `batch_size`, and the unit's memory does not grow with
the number of variants."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch

from cose import models, saliency, similarity
from cose import transforms as T
from cose.engine import _variant_batches, draw_magnitudes, explain_unit

TF = ("TranslateX", "Rotate", "FlipUD", "Brightness", "Equalize")


def demo(seed: int) -> torch.nn.Module:
    return models.create("demo_resnet", 10, seed=seed).eval()


def norm(t: torch.Tensor) -> torch.Tensor:
    return models.normalize(t, "demo_resnet")


def images(n: int, px: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, px, px, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("method", ["gradcam", "ig"])
def test_every_record_is_its_image_through_the_primitives(method):
    """Batches of 3 over 5 images cut variants apart; each record must still be the image's
    own transform, prediction, map, inverse and similarity (REFERENCE.md, step 6)."""
    model, rnd, ckpt = demo(0), demo(1), demo(2)
    x, idx = images(5), [40, 41, 42, 43, 44]
    settings = {"steps": 4} if method == "ig" else {}
    res = explain_unit(model, x, torch.arange(5), idx, method, norm, transforms=TF,
                       magnitudes=2, seed=7, random_model=rnd, checkpoints={"mid": ckpt},
                       settings=settings, batch_size=3, keep_samples=2)
    pairs, samples = res.pairs, res.samples

    per_image = 2 + 2 + 1 + 2 + 1 + 2  # signed x2, FlipUD, Equalize, random, mid
    assert len(pairs) == 5 * per_image
    assert not pairs.duplicated(["test_idx", "transform_type", "transform_magnitude"]).any()
    geometric = pairs.transform_type.isin(T.GEOMETRIC).to_numpy()
    first_geometric = int(np.argmax(geometric))
    assert not geometric[:first_geometric].any() and geometric[first_geometric:].all()

    def explain(m, xi, target):
        return saliency.explain(method, m, xi, target, **settings)

    with torch.no_grad():
        pred = model(norm(x)).argmax(1)
    map0 = torch.cat([explain(model, norm(x[i : i + 1]), pred[i : i + 1]) for i in range(5)])
    mags = {n: draw_magnitudes(n, 2, idx, 7, 32) for n in TF}
    names = list(samples["variant_names"])
    for row in pairs.itertuples():
        i = idx.index(row.test_idx)
        assert row.pred_class == pred[i]
        name, mag = row.transform_type, torch.tensor([row.transform_magnitude])
        if name in TF:
            assert row.transform_magnitude in mags[name][i].tolist()
            m, xi = model, norm(T.apply(name, x[i : i + 1], mag))
        else:
            assert row.transform_magnitude == 0
            m, xi = {"random": rnd, "mid": ckpt}[name], norm(x[i : i + 1])
        with torch.no_grad():
            tp = m(xi).argmax(1)
        assert row.t_pred_class == tp.item(), row
        mv = explain(m, xi, tp)
        mask = None
        if name in TF:
            mv = T.invert(name, mv, mag)
            mask = T.valid_mask(name, mag, 32, 32) if name in T.GEOMETRIC else None
        a = map0[i : i + 1]
        assert row.ssim == pytest.approx(similarity.ssim(a, mv, mask).item(), abs=1e-4), row
        assert row.spearman == pytest.approx(similarity.spearman(a, mv, mask).item(), abs=1e-4)
        if i < 2:  # the kept sample maps are the same maps, in the original frame
            v = next(k for k, n in enumerate(names)
                     if n == name and samples["variant_magnitudes"][k, i] == mag.item())
            assert samples["variant_pred"][v, i] == tp.item()
            np.testing.assert_allclose(samples["variant_maps"][v, i], mv[0].numpy(), atol=1e-4)
    np.testing.assert_allclose(samples["map"], map0[:2].numpy(), atol=1e-4)
    assert samples["variant_maps"].shape == (len(names), 2, 32, 32)


def test_no_call_sees_more_than_batch_size_images():
    model, ckpt = demo(0), demo(2)
    seen: list[int] = []
    for m in (model, ckpt):
        m.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[0]))
    x = images(6)
    res = explain_unit(model, x, torch.zeros(6, dtype=torch.long), list(range(6)), "gradcam",
                       norm, magnitudes=3, checkpoints={"mid": ckpt}, batch_size=4)
    variants = sum(1 if n not in T.SIGNED else 3 for n in T.TRANSFORMS) + 1
    assert len(res.pairs) == 6 * variants
    assert max(seen) == 4 and sum(seen) >= 2 * 6 * variants  # predictions + CAM passes


def test_variant_batches_cover_every_image_once_in_order():
    x = images(5, px=8)
    variants = [("Brightness", torch.full((5,), 0.3)), ("FlipLR", torch.zeros(5)),
                ("Rotate", torch.linspace(-20, 20, 5))]
    whole = torch.cat([norm(T.apply(n, x, m)) for n, m in variants])
    for bs in (1, 2, 4, 5, 7, 15, 100):
        got = list(_variant_batches(variants, x, norm, bs))
        sizes = [b.shape[0] for _, b in got]
        assert all(s == bs for s in sizes[:-1]) and 0 < sizes[-1] <= bs
        cover = [(v, i) for pieces, _ in got for v, lo, hi in pieces for i in range(lo, hi)]
        assert cover == [(v, i) for v in range(3) for i in range(5)]
        torch.testing.assert_close(torch.cat([b for _, b in got]), whole, rtol=0, atol=0)


_PEAK = textwrap.dedent(
    """
    import json, resource, sys, torch
    from cose import models
    from cose.engine import explain_unit
    torch.set_num_threads(1)
    B = int(sys.argv[1])
    m = models.create("demo_resnet", 10, seed=0).eval()
    x = torch.rand(B, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    explain_unit(m, x, torch.zeros(B, dtype=torch.long), list(range(B)), "gradcam",
                 lambda t: models.normalize(t, "demo_resnet"), magnitudes=12, batch_size=8)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"growth_bytes": (after - before) * 1024}))
    """
)


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_variants():
    """The 90 transform variants of 32 more images at 64 px take 141 MB as one tensor;
    streamed in batches of 8, the unit's peak (RSS, fresh process) must grow by well under half
    that: by what the unit holds per image (its transform's temporaries, ~30 MB here).
    Concatenating every variant before the model calls, as the unit once did, grows it by more
    than the tensor itself."""

    def growth(b: int) -> int:
        out = subprocess.run([sys.executable, "-c", _PEAK, str(b)], capture_output=True,
                             text=True, check=True, timeout=300)
        return json.loads(out.stdout.strip().splitlines()[-1])["growth_bytes"]

    variants = sum(1 if n not in T.SIGNED else 12 for n in T.TRANSFORMS)
    assert variants == 90
    extra = variants * (40 - 8) * 3 * 64 * 64 * 4
    small, large = growth(8), growth(40)
    assert large - small < extra / 2, (small, large, extra)


def test_units_with_few_or_no_variants():
    model, x, y = demo(0), images(2), torch.zeros(2, dtype=torch.long)
    only_random = explain_unit(model, x, y, [0, 1], "gradcam", norm, transforms=(),
                               random_model=demo(1), keep_samples=2)
    assert list(only_random.pairs.transform_type) == ["random", "random"]
    assert only_random.samples["variant_maps"].shape == (1, 2, 32, 32)
    nothing = explain_unit(model, x, y, [0, 1], "gradcam", norm, transforms=(), keep_samples=1)
    assert nothing.pairs.empty and list(nothing.pairs.columns) == list(only_random.pairs.columns)
    assert nothing.samples["variant_maps"].shape == (0, 1, 32, 32)
    assert nothing.samples["map"].shape == (1, 32, 32)


@pytest.mark.parametrize("method, settings, deterministic", [
    ("gradcam", {}, True), ("ig", {"steps": 4}, True),
    ("smoothgrad", {"samples": 6}, False), ("lime", {"samples": 60, "max_dist": 8.0}, False),
])
def test_noise_floor_variant(method, settings, deterministic):
    """The `seed` variant: the same image and model once more with another seed. Exactly 1 for
    a deterministic method; below 1 where the method's own randomness moves the map."""
    x = images(3)
    res = explain_unit(demo(0), x, torch.arange(3), [0, 1, 2], method, norm,
                       transforms=("FlipLR",), magnitudes=1, settings=settings,
                       batch_size=8, noise_floor=True)
    seed_rows = res.pairs[res.pairs.transform_type == "seed"]
    assert len(seed_rows) == 3
    assert (seed_rows.t_pred_class == seed_rows.pred_class).all()  # the same prediction
    if deterministic:
        assert (seed_rows.ssim == 1.0).all()
    else:
        assert (seed_rows.ssim < 0.999).all() and seed_rows.ssim.notna().all()
    from cose import scoring

    out = scoring.score(res.pairs.assign(target_class=res.pairs.pred_class))
    assert out["noise_floor"] == pytest.approx(float(seed_rows.ssim.mean()))
    assert out["n_noise_floor"] == 3  # and the seed rows enter no other metric
    assert out["n_overall_consistency"] + out["n_overall_fidelity"] == 3
    without = explain_unit(demo(0), x, torch.arange(3), [0, 1, 2], method, norm,
                           transforms=("FlipLR",), magnitudes=1, settings=settings,
                           batch_size=8)
    assert "seed" not in set(without.pairs.transform_type)


# ----------------------------------------------------------------------------- model variants


def _variant_unit(method, settings, streams, precision="fp32", models=None, noise_floor=False):
    model, rand, *ckpts = models or [demo(s) for s in range(5)]
    return explain_unit(model, images(5), torch.arange(5), list(range(5)), method, norm,
                        transforms=("Rotate", "Brightness"), magnitudes=1, random_model=rand,
                        checkpoints={f"mid_ckpt_e{i:03d}": m for i, m in enumerate(ckpts)},
                        settings=settings, batch_size=4, keep_samples=2, precision=precision,
                        noise_floor=noise_floor, streams=streams)


@pytest.mark.parametrize("method, settings, precision", [
    ("gradcam", {}, "fp32"), ("gradcampp", {}, "bf16"), ("ig", {"steps": 5}, "fp32"),
    ("guided_ig", {"steps": 6}, "fp32"), ("smoothgrad", {"samples": 4}, "bf16"),
    ("lime", {"samples": 40, "max_dist": 8.0}, "fp32"),
])
def test_model_variants_at_once_give_the_same_records(method, settings, precision):
    """Mapping the random-init model, the checkpoints and the seed variant three at a time
    (each whole on its own thread; on CUDA its own stream) gives exactly the records and
    sample maps of one at a time: the same kernels on the same inputs, per-call seeds, bf16's
    autocast entered in the thread that runs the model."""
    one = _variant_unit(method, settings, 1, precision, noise_floor=True)
    many = _variant_unit(method, settings, 3, precision, noise_floor=True)
    pd.testing.assert_frame_equal(one.pairs, many.pairs, check_exact=True)
    assert one.samples.keys() == many.samples.keys()
    for k in one.samples:
        np.testing.assert_array_equal(one.samples[k], many.samples[k])
    assert (one.pairs.transform_type == "random").sum() == 5


def test_model_variants_at_once_overlap_but_one_model_never_twice():
    """Three workers: the different models' passes overlap; a model given twice (the same
    module as two checkpoints) is never in two passes at once, since its eval mode and hooks
    are per call; and the pool's threads are gone when the unit returns."""
    import threading
    import time

    lock = threading.Lock()
    active: dict[int, int] = {}
    most = {"all": 0, "same": 0}

    def enter(mod, _args):
        with lock:
            active[id(mod)] = active.get(id(mod), 0) + 1
            most["all"] = max(most["all"], sum(active.values()))
            most["same"] = max(most["same"], active[id(mod)])
        time.sleep(0.02)

    def leave(mod, _args, _out):
        with lock:
            active[id(mod)] -= 1

    model, rand, twice, other = (demo(s) for s in range(4))
    for m in (rand, twice, other):
        m.register_forward_pre_hook(enter)
        m.register_forward_hook(leave)
    res = _variant_unit("gradcam", {}, 3, models=[model, rand, twice, twice, other])
    assert most["all"] >= 2 and most["same"] == 1, most
    names = list(res.pairs.transform_type.unique())
    assert names[names.index("random"):names.index("random") + 4] == [
        "random", "mid_ckpt_e000", "mid_ckpt_e001", "mid_ckpt_e002"]
    assert not [t for t in threading.enumerate() if t.name.startswith("cose-variant")]


class _Failing(torch.nn.Module):
    """A checkpoint that predicts (no grad) but fails in its saliency passes."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = demo(9)

    def forward(self, x):
        if torch.is_grad_enabled():
            raise RuntimeError("checkpoint mid_ckpt_e001: broken layer")
        return self.inner(x)


def test_a_failing_model_variant_raises_its_error_after_the_others_stop():
    import threading

    models_ = [demo(0), demo(1), demo(2), _Failing(), demo(3)]
    with pytest.raises(RuntimeError, match="^checkpoint mid_ckpt_e001: broken layer$"):
        _variant_unit("ig", {"steps": 3}, 3, models=models_)
    assert not [t for t in threading.enumerate() if t.name.startswith("cose-variant")]


@pytest.mark.parametrize("concurrent", [False, True])
def test_a_plugin_method_runs_its_model_variants_at_once_only_when_declared(concurrent):
    """A registered method may keep global state (a global random stream): its model variants
    run one at a time on the caller's thread unless it is registered ``concurrent``."""
    import threading

    from cose.saliency import _core
    from cose.saliency.postprocess import gradient_map

    threads: list[str] = []

    def grad_x_input(model, images, targets, max_target, *, batch_size=None):
        threads.append(threading.current_thread().name)
        return gradient_map(_core.prob_grad(model, images, targets, max_target) * images)

    saliency.register("tmp_grad_x_input", grad_x_input, {"batch_size": None},
                      concurrent=concurrent, fusable=True)
    try:
        one = _variant_unit("tmp_grad_x_input", {}, 1)
        threads.clear()
        many = _variant_unit("tmp_grad_x_input", {}, 3)
    finally:
        from cose import spec

        saliency._REGISTRY.pop("tmp_grad_x_input", None)
        spec.unregister_method("tmp_grad_x_input")
    pd.testing.assert_frame_equal(one.pairs, many.pairs, check_exact=True)
    on_pool = [t for t in threads if t.startswith("cose-variant")]
    # random + 3 checkpoints, two calls each (5 images in calls of at most 4)
    assert len(on_pool) == (8 if concurrent else 0), threads
    assert saliency.get("guided_ig").spec.concurrent and saliency.get("gradcam").spec.concurrent


def test_variant_workers_by_setting_device_and_memory(monkeypatch):
    from cose import engine

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert engine.variant_workers(3, cpu, 11) == 3
    assert engine.variant_workers(8, cpu, 2) == 2
    assert engine.variant_workers("auto", cpu, 11) == 1
    monkeypatch.setenv("COSE_STREAMS", "5")
    assert engine.variant_workers(None, cpu, 11) == 5
    for bad in (0, -1, "2", 1.5, True):
        with pytest.raises(ValueError, match="^streams: expected auto or an integer >= 1"):
            engine.variant_workers(bad, cpu, 11)
    # auto on CUDA: as many as fit in 80% of the free memory at the unit's working set
    GiB = 2**30
    mem = {"held": 10 * GiB, "peak": 30 * GiB, "free": 40 * GiB, "reserved": 32 * GiB}
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d=None: mem["held"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d=None: mem["peak"])
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d=None: mem["reserved"])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (mem["free"], 141 * GiB))
    # working set 20 GiB; free 40 + (32 - 10) = 62 GiB; 0.8 * 62 / 20 = 2.48 -> 2
    assert engine.variant_workers("auto", cuda, 11) == 2
    mem["free"] = 100 * GiB  # 0.8 * 122 / 20 = 4.88 -> the cap, 4
    assert engine.variant_workers("auto", cuda, 11) == engine.AUTO_STREAMS == 4
    assert engine.variant_workers("auto", cuda, 3) == 3
    assert engine.variant_workers("auto", cuda, 1) == 1
    mem["free"] = 0  # nothing free beyond the cache: one at a time
    assert engine.variant_workers("auto", cuda, 11) == 1
