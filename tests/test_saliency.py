"""cose.saliency: API, settings, bad input, model hygiene, seeds, batching, architectures."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from cose import saliency as S

torch.set_num_threads(2)

SIZE = 64  # resnet18's layer4 is 2x2 here (1x1 at 32 px would make every CAM constant)

# cheap settings: the algorithms are the same, the paths shorter
FAST = {
    "gradcam": {},
    "gradcampp": {},
    "ig": {"steps": 5},
    "smoothgrad": {"samples": 4},
    "blur_ig": {"steps": 5},
    "guided_ig": {"steps": 5},
    "lime": {"samples": 30},
}


def _resnet(num_classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=num_classes).eval()


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    return _resnet()


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 3, SIZE, SIZE, generator=g), torch.tensor([0, 3, 9])


# ----------------------------------------------------------------------------- registry, settings


def test_methods_and_defaults_are_the_reference_settings():
    assert S.METHODS == ("gradcam", "gradcampp", "ig", "smoothgrad", "blur_ig", "guided_ig", "lime")
    assert S.defaults("ig")["steps"] == 25
    assert S.defaults("smoothgrad") | {} == {"samples": 50, "noise": 0.15, "seed": 0,
                                             "batch_size": S.DEFAULT_BATCH_SIZE}
    assert {k: S.defaults("blur_ig")[k] for k in ("steps", "max_sigma", "grad_step")} == {
        "steps": 100, "max_sigma": 50.0, "grad_step": 0.01}
    assert {k: S.defaults("guided_ig")[k] for k in ("steps", "max_dist", "fraction")} == {
        "steps": 200, "max_dist": 0.02, "fraction": 0.25}
    assert {k: S.defaults("lime")[k] for k in ("samples", "num_features", "seed")} == {
        "samples": 1000, "num_features": 10, "seed": 0}
    for m in ("gradcam", "gradcampp"):
        assert set(S.defaults(m)) == {"layer", "reshape", "batch_size"}
    for m in S.METHODS:
        assert "batch_size" in S.defaults(m)
    d = S.defaults("ig")
    d["steps"] = 1
    assert S.defaults("ig")["steps"] == 25  # a copy


def test_unknown_method_names_it(resnet, batch):
    with pytest.raises(ValueError, match=r"unknown saliency method 'gradcam\+\+'.*gradcampp"):
        S.explain("gradcam++", resnet, *batch)
    with pytest.raises(ValueError, match="unknown saliency method 'nope'"):
        S.defaults("nope")


def test_unknown_setting_lists_allowed(resnet, batch):
    with pytest.raises(ValueError, match=r"ig: unknown setting\(s\) samples; allowed: steps, batch_size"):
        S.explain("ig", resnet, *batch, samples=3)


@pytest.mark.parametrize(
    "method,settings,pattern",
    [
        ("ig", {"steps": 0}, "steps=0"),
        ("smoothgrad", {"noise": -1.0}, "noise=-1.0"),
        ("lime", {"seed": 1.5}, "seed=1.5"),
        ("guided_ig", {"fraction": 2.0}, "fraction"),
        ("gradcam", {"batch_size": 0}, "batch_size=0"),
    ],
)
def test_bad_setting_values(resnet, batch, method, settings, pattern):
    with pytest.raises(ValueError, match=pattern):
        S.explain(method, resnet, *batch, **settings)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("method", S.METHODS)
def test_target_out_of_range(resnet, batch, method):
    x, _ = batch
    layer = {"layer": resnet.layer4[-1]} if method.startswith("gradcam") else {}
    with pytest.raises(ValueError, match=r"class index 10 out of range.*10 classes"):
        S.explain(method, resnet, x, torch.tensor([0, 10, 1]), **layer, **FAST[method])


def test_negative_or_misshapen_targets(resnet, batch):
    x, _ = batch
    with pytest.raises(ValueError, match="class index -1"):
        S.explain("ig", resnet, x, torch.tensor([0, -1, 1]), steps=2)
    with pytest.raises(ValueError, match=r"targets: expected shape \[3\]"):
        S.explain("ig", resnet, x, torch.tensor([0, 1]), steps=2)
    with pytest.raises(ValueError, match="integer class indices"):
        S.explain("ig", resnet, x, torch.tensor([0.5, 1.0, 2.0]), steps=2)


@pytest.mark.parametrize("method", ["gradcam", "ig", "lime"])
def test_nan_input_is_named(resnet, batch, method):
    x, t = batch
    x = x.clone()
    x[1, 0, 3, 4] = float("nan")
    with pytest.raises(ValueError, match=r"images: contain NaN \(batch rows \[1\]\)"):
        S.explain(method, resnet, x, t)


def test_bad_image_shape(resnet):
    with pytest.raises(ValueError, match=r"images: expected shape \[B,C,H,W\]"):
        S.explain("ig", resnet, torch.zeros(3, SIZE, SIZE), torch.tensor([0]))


class _Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


@pytest.mark.parametrize("method", ["gradcam", "gradcampp"])
def test_cam_without_known_layer_names_the_model(batch, method):
    model = _Plain().eval()
    with pytest.raises(ValueError, match="no known CAM layer for model _Plain.*layer="):
        S.explain(method, model, *batch)
    # an explicit layer works, by module or by name
    a = S.explain(method, model, *batch, layer=model.conv)
    b = S.explain(method, model, *batch, layer="conv")
    assert torch.equal(a, b) and a.shape == (3, SIZE, SIZE)
    with pytest.raises(ValueError, match="'nope' is not a submodule of _Plain"):
        S.explain(method, model, *batch, layer="nope")


# ----------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("method", S.METHODS)
def test_shapes_ranges_device(resnet, batch, method):
    x, t = batch
    m = S.explain(method, resnet, x, t, **FAST[method])
    assert m.shape == (3, SIZE, SIZE) and m.dtype == torch.float32 and m.device == x.device
    assert torch.isfinite(m).all()
    if method == "lime":
        assert set(m.unique().tolist()) <= {-1.0, 0.0, 1.0}
        assert (m != 0).any()
    else:
        assert m.min() >= 0 and m.max() <= 1
        assert m.max() > 0.5  # scaled to [0,1], not collapsed


def test_inference_mode_tensors_accepted(resnet, batch):
    x, _ = batch
    with torch.inference_mode():
        xi = x.clone()
        ti = resnet(xi).argmax(1)
    assert S.explain("ig", resnet, xi, ti, steps=2).shape == (3, SIZE, SIZE)


# ----------------------------------------------------------------------------- model hygiene


def _state(model: nn.Module):
    return (
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
        [p.grad for p in model.parameters()],
        [
            (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for m in model.modules()
        ],
    )


@pytest.mark.parametrize("method", S.METHODS)
def test_model_left_as_it_was(batch, method):
    model = _resnet()
    model.train()
    model.layer1.eval()  # mixed modes survive
    for p in model.layer2.parameters():
        p.requires_grad_(False)
    before = _state(model)
    bn = model.bn1.running_mean.clone()
    S.explain(method, model, *batch, **FAST[method])
    after = _state(model)
    assert before[0] == after[0] and before[1] == after[1] and before[3] == after[3]
    assert all(g is None for g in after[2])  # no .grad left on parameters
    assert torch.equal(bn, model.bn1.running_mean)  # ran in eval mode: BN stats untouched


@pytest.mark.parametrize("method", ["gradcam", "ig", "guided_ig", "lime"])
def test_model_left_as_it_was_on_error(batch, method):
    model = _resnet()
    model.train()
    before = _state(model)
    with pytest.raises(ValueError, match="out of range"):
        S.explain(method, model, batch[0], torch.tensor([0, 1, 12]), **FAST[method])
    after = _state(model)
    assert before[0] == after[0] and before[1] == after[1] and before[3] == after[3]


# ----------------------------------------------------------------------------- seeds, batching


@pytest.mark.parametrize("method", ["smoothgrad", "lime"])
def test_same_seed_same_map(resnet, batch, method):
    a = S.explain(method, resnet, *batch, seed=7, **FAST[method])
    b = S.explain(method, resnet, *batch, seed=7, **FAST[method])
    c = S.explain(method, resnet, *batch, seed=8, **FAST[method])
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("method", S.METHODS)
def test_map_does_not_depend_on_batching(resnet, batch, method):
    x, t = batch
    full = S.explain(method, resnet, x, t, **FAST[method])
    chunked = S.explain(method, resnet, x, t, **{**FAST[method], "batch_size": 2})
    alone = S.explain(method, resnet, x[1:2], t[1:2], **FAST[method])
    if method == "lime":
        assert torch.equal(full, chunked) and torch.equal(full[1:2], alone)
    elif method == "guided_ig":
        # the path follows the lowest-|gradient| features: float noise of a different batch
        # shape can flip a near-tie and move a whole step elsewhere
        for a, b in [(full, chunked), (full[1:2], alone)]:
            for i in range(a.shape[0]):
                assert torch.corrcoef(torch.stack([a[i].flatten(), b[i].flatten()]))[0, 1] > 0.99
    else:
        torch.testing.assert_close(full, chunked, atol=2e-4, rtol=0)
        torch.testing.assert_close(full[1:2], alone, atol=2e-4, rtol=0)


def test_targets_select_the_class(resnet, batch):
    x, _ = batch
    a = S.explain("ig", resnet, x, torch.tensor([0, 0, 0]), steps=4)
    b = S.explain("ig", resnet, x, torch.tensor([5, 5, 5]), steps=4)
    assert not torch.allclose(a, b)


def test_scalar_target_broadcasts(resnet, batch):
    x, _ = batch
    a = S.explain("gradcam", resnet, x, 4)
    b = S.explain("gradcam", resnet, x, torch.tensor([4, 4, 4]))
    assert torch.equal(a, b)


def test_register_a_method(resnet, batch):
    def ones(model, images, targets, max_target, *, scale=1.0):
        return torch.full((images.shape[0], *images.shape[-2:]), scale)

    S.register("test_ones", ones, {"scale": 1.0}, replace=True)
    try:
        m = S.explain("test_ones", resnet, *batch, scale=0.5)
        assert torch.equal(m, torch.full((3, SIZE, SIZE), 0.5))
        assert "test_ones" in S.registered()
        with pytest.raises(ValueError, match="already registered"):
            S.register("test_ones", ones, {})
    finally:
        S._REGISTRY.pop("test_ones", None)


# ----------------------------------------------------------------------------- architectures


def _tv_vit() -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    model = VisionTransformer(image_size=SIZE, patch_size=8, num_layers=2, num_heads=2,
                              hidden_dim=32, mlp_dim=64, num_classes=10)
    nn.init.normal_(model.heads.head.weight, std=0.5)  # torchvision zero-inits the head
    return model


def _tv_swin() -> nn.Module:
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                           window_size=[4, 4], num_classes=10)


def _timm(name: str, **kw):
    timm = pytest.importorskip("timm")
    return timm.create_model(name, pretrained=False, num_classes=10, **kw)


ARCHS = {
    "tv_resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "tv_vit": _tv_vit,
    "tv_swin": _tv_swin,
    "tv_convnext": lambda: torchvision.models.convnext.ConvNeXt(
        [torchvision.models.convnext.CNBlockConfig(16, 32, 1),
         torchvision.models.convnext.CNBlockConfig(32, None, 1)], num_classes=10),
    "tv_vgg11": lambda: torchvision.models.vgg11(num_classes=10),
    "tv_densenet121": lambda: torchvision.models.densenet121(num_classes=10),
    "timm_resnet": lambda: _timm("resnet10t"),
    "timm_vit": lambda: _timm("vit_tiny_patch16_224", img_size=SIZE, patch_size=8, depth=2),
    "timm_swin": lambda: _timm("swin_tiny_patch4_window7_224", img_size=SIZE, window_size=4,
                               depths=(1, 1), num_heads=(2, 4), embed_dim=16),
    "timm_convnext": lambda: _timm("convnext_atto"),
}


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("method", ["gradcam", "gradcampp", "ig"])
def test_architectures_resolve_their_cam_layer(arch, method):
    pytest.importorskip("cose.models")
    torch.manual_seed(0)
    model = ARCHS[arch]().eval()
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([1, 2])
    m = S.explain(method, model, x, t, **FAST[method])
    assert m.shape == (2, SIZE, SIZE) and torch.isfinite(m).all()
    assert m.min() >= 0 and m.max() <= 1
    assert not any(len(mod._forward_hooks) for mod in model.modules())


def test_registry_demo_models_work_with_every_method():
    M = pytest.importorskip("cose.models")
    for name in getattr(M, "DEMO_MODELS", ()):
        model = M.create(name, 10, seed=0)
        size = M.preprocess(name).crop
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
        for method in S.METHODS:
            m = S.explain(method, model, x, torch.tensor([0, 1]), **FAST[method])
            assert m.shape == (2, size, size), (name, method)


# ----------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", S.METHODS)
def test_cuda_matches_cpu(batch, method):
    model = _resnet()
    x, t = batch
    cpu = S.explain(method, model, x, t, **FAST[method])
    model_gpu = _resnet().cuda()
    gpu = S.explain(method, model_gpu, x.cuda(), t.cuda(), **FAST[method])
    assert gpu.device.type == "cuda" and gpu.shape == cpu.shape
    # images on the CPU, model on the GPU: computed there, returned on the images' device
    mixed = S.explain(method, model_gpu, x, t, **FAST[method])
    assert mixed.device.type == "cpu"
    gpu = gpu.cpu()
    if method == "lime":
        assert (gpu == cpu).float().mean() > 0.95  # cuDNN vs CPU float noise may flip a tie
    else:
        for i in range(x.shape[0]):
            r = torch.corrcoef(torch.stack([gpu[i].flatten(), cpu[i].flatten()]))[0, 1]
            assert r > 0.99, (method, i, float(r))


# ----------------------------------------------------------------------------- conv+BN folding


def test_bn_folding_is_cached_exact_and_tracks_weights(batch):
    from cose.saliency import _core

    model = _resnet()
    x, t = batch
    fast = _core.fast_model(model, x)
    assert fast is not model and _core.fast_model(model, x) is fast  # cached
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # original untouched
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-5)
    # new weights (a checkpoint loaded in place) -> rebuilt
    other = _resnet()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(0.5)
    model.load_state_dict(other.state_dict())
    fast2 = _core.fast_model(model, x)
    assert fast2 is not fast
    with torch.no_grad():
        torch.testing.assert_close(fast2(x), model(x), rtol=1e-4, atol=1e-5)


def test_bn_folding_does_not_change_maps(batch, monkeypatch):
    from cose.saliency import _core

    model = _resnet()
    x, t = batch
    for method in ("ig", "smoothgrad", "blur_ig", "lime"):
        folded = S.explain(method, model, x, t, **FAST[method])
        monkeypatch.setattr(_core, "FUSE_BN", False)
        plain = S.explain(method, model, x, t, **FAST[method])
        monkeypatch.setattr(_core, "FUSE_BN", True)
        if method == "lime":
            assert (folded == plain).float().mean() > 0.95
        else:
            torch.testing.assert_close(folded, plain, atol=1e-3, rtol=0)


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        h = self.bn(self.conv(x))
        if h.mean() > 1e9:  # data-dependent control flow: torch.fx cannot trace it
            h = h * 0
        return self.fc(h.mean((2, 3)))


def test_bn_folding_falls_back_for_untraceable_models(batch):
    from cose.saliency import _core

    model = _Untraceable().eval()
    assert _core.fast_model(model, batch[0]) is model
    m = S.explain("ig", model, *batch, steps=3)
    assert m.shape == (3, SIZE, SIZE)


def test_lime_superpixels_scale_with_the_image():
    """lime's quickshift geometry (kernel 4, max_dist 200) at 224 px, scaled elsewhere: a
    32 px digit gets tens of superpixels, not one; a warning names images with almost none."""
    import warnings

    import cose.data as D
    import cose.models as M
    from cose.saliency.lime import segment, segmentation_settings

    assert segmentation_settings(224, 300) == (4.0, 200.0)
    assert segmentation_settings(32, 32) == (1.0, 200.0 * 32 / 224)
    root = D.fetch("digits", Path(tempfile.mkdtemp()))
    x, _ = D.load_split("digits", root.parent, "test", M.preprocess("demo_resnet"),
                        indices=list(range(6)))
    xn = M.normalize(x, "demo_resnet")
    counts = []
    for i in range(6):
        img = xn[i].permute(1, 2, 0).numpy()
        scaled = len(torch.unique(torch.from_numpy(segment(img, 0, *segmentation_settings(32, 32)))))
        default = len(torch.unique(torch.from_numpy(segment(img, 0))))
        assert scaled > default and default <= 5, (scaled, default)
        counts.append(scaled)
    assert sum(counts) / len(counts) >= 8, counts
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        S.explain("lime", _resnet(), xn[:2], torch.tensor([0, 1]), samples=10, kernel_size=20,
                  max_dist=1000)
    assert any("fewer than 3 superpixels" in str(w.message) for w in seen)


def test_lime_segments_while_the_model_runs(monkeypatch):
    """LIME's quickshift runs on a thread pool; with ``overlap`` the model already evaluates
    the perturbations of the images segmented so far (the default off the CPU); on the CPU by
    default every image is segmented first (torch's threads share those cores: issue #36).
    The forward batches (and so the maps) are those of one pass over all images' rows."""
    import threading
    import time

    from cose.saliency import lime as L

    events: list[tuple[str, float, int]] = []
    real_segment = L.segment

    def slow_segment(*a, **k):
        time.sleep(0.05)
        out = real_segment(*a, **k)
        events.append(("segment", time.perf_counter(), threading.get_ident()))
        return out

    class Recorder(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 4))
            self.rows: list[int] = []

        def forward(self, x):
            events.append(("forward", time.perf_counter(), len(x)))
            self.rows.append(len(x))
            return self.net(x)

    monkeypatch.setattr(L, "segment", slow_segment)
    torch.manual_seed(0)
    model = Recorder().eval()
    x = torch.rand(6, 3, 16, 16)
    t = torch.tensor([0, 1, 2, 3, 0, 1])
    kw = dict(samples=24, num_features=3, seed=0, batch_size=16, kernel_size=2, max_dist=4)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        streamed = L.compute(model, x, t, 3, overlap=True, **kw)
        first_forward = min(e[1] for e in events if e[0] == "forward")
        last_segment = max(e[1] for e in events if e[0] == "segment")
        assert first_forward < last_segment  # the model ran before segmentation was over
        assert len({e[2] for e in events if e[0] == "segment"}) == 2  # on two threads
        rows = list(model.rows)
        assert all(r == 16 for r in rows[:-1]) and 0 < rows[-1] <= 16
        model.rows.clear()
        events.clear()
        phases: dict = {}
        on_cpu = L.compute(model, x, t, 3, phases=phases, **kw)  # auto: no overlap on the CPU
        assert phases["overlap"] is False and phases["forward_rows"] == sum(rows)
        assert min(e[1] for e in events if e[0] == "forward") > max(
            e[1] for e in events if e[0] == "segment")
        assert len({e[2] for e in events if e[0] == "segment"}) == 2  # still on two threads
        assert model.rows == rows and torch.equal(on_cpu, streamed)
        assert all(phases[k] >= 0 for k in ("segment", "forward", "fit", "mask"))
        model.rows.clear()
        torch.set_num_threads(1)  # one thread: segment, then run, image after image
        sequential = L.compute(model, x, t, 3, **kw)
    finally:
        torch.set_num_threads(threads)
    assert model.rows == rows  # the same batches
    assert torch.equal(streamed, sequential)


def test_auto_batch_size_by_device_and_kind():
    """batch_size null: 32 inputs per call on the CPU; off it 64 for the methods that hold an
    autograd graph, 256 for the forward-only LIME."""
    assert S.auto_batch_size("lime", "cpu") == S.auto_batch_size("ig", "cpu") == 32
    assert S.auto_batch_size("ig", "cuda") == S.auto_batch_size("gradcam", "mps") == 64
    assert S.auto_batch_size("lime", "cuda") == 256


class _RowwiseModel(nn.Module):
    """Logits from elementwise ops and per-row sums only, so every row's float results are
    the same in any batch: a batched method must then give each image exactly its own map."""

    def __init__(self, features: int, classes: int = 5) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(classes, features, generator=torch.Generator()
                                          .manual_seed(3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = torch.tanh(x.flatten(1))
        return torch.stack([(f * w).sum(1) for w in self.w], 1)


def test_guided_ig_rows_are_independent_exactly():
    """GuidedIG's inner loop runs over all rows until the last one is done: a row that is done
    (or equal to the baseline) must come out exactly as when it runs alone, however many more
    iterations the other rows need."""
    from cose.saliency import guided_ig

    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 3, 12, 12, generator=g)
    # rows that need 1 to 5 inner iterations per step (counted): heavy-tailed, all of one
    # magnitude, plain
    x[0], x[1], x[2] = x[0] ** 5 * 0.1, x[1].sign() * 0.01, x[2] * 3
    x[3] = 0  # equal to the baseline: a zero attribution, never active
    x[2, :, :3] = 0  # zero-diff features
    model = _RowwiseModel(3 * 12 * 12)
    t = torch.tensor([0, 2, 4, 1])
    kw = dict(steps=10, fraction=0.1, max_dist=0.02, batch_size=4)
    full = guided_ig.attribution(model, x, t, 4, **kw)
    assert torch.equal(full[3], torch.zeros_like(full[3]))
    for i in range(4):
        alone = guided_ig.attribution(model, x[i : i + 1], t[i : i + 1], 4, **kw)
        assert torch.equal(full[i], alone[0]), i
    assert full[:3].abs().sum((1, 2, 3)).min() > 0
    # nothing but baseline rows: no inner iteration at all, zero attributions
    zero = guided_ig.attribution(model, torch.zeros(2, 3, 12, 12), t[:2], 4, **kw)
    assert torch.equal(zero, torch.zeros_like(zero))


def test_lime_benchmark_compares_equal_segmentation_and_prints_phases(tmp_path, capsys):
    """benchmarks/saliency_speed.py: `lime` runs both sides at the reference's segmentation,
    `lime_scaled` both at the project's scaled one (issue #36), each with our phases."""
    import json
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import saliency_speed

    out = tmp_path / "rows.json"
    assert saliency_speed.main(["--device", "cpu", "--model", "resnet18", "--size", "32",
                                "--images", "1", "--methods", "lime,lime_scaled",
                                "--json", str(out)]) == 0
    rows = {r["method"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"lime", "lime_scaled"}
    for row in rows.values():
        ph = row["phases"]
        assert ph["overlap"] is False and ph["forward_rows"] > 0
        assert ph["total"] >= ph["forward"] > 0
    # the reference's quickshift finds fewer superpixels at 32 px: fewer distinct samples
    assert rows["lime"]["phases"]["forward_rows"] < rows["lime_scaled"]["phases"]["forward_rows"]
    printed = capsys.readouterr().out
    assert "lime       phases: segment" in printed and "geometric mean speedup" in printed
